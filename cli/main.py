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
    ("gateway", "gateway"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe2", description="MoE2: mixture of edge experts over MQTT."
    )
    parser.add_argument(
        "--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)"
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true",
        help="also show other libraries' log lines below WARNING (onnx, torch, ...)")
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


#: every log line's shape (the stderr handler and the log files subcommands add)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class OwnLines(logging.Filter):
    """Passes moe2's own records, and anyone's warnings and errors: libraries' INFO chatter
    (onnxscript, onnx_ir, torch, httpx, ...) appears only with ``--verbose``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == "moe2" or record.name.startswith("moe2.") \
            or record.levelno >= logging.WARNING


def configure_logging(level: str, verbose: bool) -> logging.Handler:
    """One stderr handler on the root logger; returns it (quiet subcommands raise its level
    and send the full story to a log file of their own)."""
    root = logging.getLogger()
    root.setLevel(getattr(logging, str(level).upper(), logging.INFO))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    if not verbose:
        handler.addFilter(OwnLines())
    root.addHandler(handler)
    return handler


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.log_handler = configure_logging(args.log_level, args.verbose)
    code: int = args._run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
