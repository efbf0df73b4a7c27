"""Entry point of the ``moe2`` console script.

Each subcommand lives in its own module ``moe2.cli.<name>`` exposing ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Those modules import heavy dependencies
(llama-cpp-python, onnxruntime, torch) only inside ``run`` so that ``moe2 --help`` works on an
agent box that has no coordinator extras and the other way round.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# name -> module under moe2.cli. Order is the order shown in --help.
SUBCOMMANDS: tuple[tuple[str, str], ...] = (
    ("agent", "agent"),
    ("coordinator", "coordinator"),
    ("ask", "ask"),
    ("monitor", "monitor"),
    ("plan", "plan"),
    ("make-experts", "make_experts"),
    ("calibrate", "calibrate"),
    ("train-gate", "train_gate"),
    ("eval", "evaluate"),
    ("reproduce", "reproduce"),
    ("bench", "bench"),
    ("broker-config", "broker_config"),
    ("demo", "demo"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe2", description="MoE2: mixture of edge experts over MQTT."
    )
    parser.add_argument(
        "--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"moe2.cli.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"moe2.cli.{module_name}":
                raise
            continue  # not built yet in this release
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    code: int = args._run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
