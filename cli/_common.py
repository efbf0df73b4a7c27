"""Helpers every subcommand uses: one JSON object as the last stdout line, clear fatal errors."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import msgspec

C = TypeVar("C", bound="msgspec.Struct")


class UsageError(Exception):
    """Bad input or configuration: reported as one line on stderr, exit code 2."""


def add_daemon_arguments(p: argparse.ArgumentParser, role: str) -> None:
    """The flags every daemon (agent, coordinator, gateway) takes the same way."""
    p.add_argument("--config", help=f"{role} TOML file (the command line wins over it)")
    p.add_argument("--broker", help="mqtt://[user:pass@]host:port or mqtts://...")
    p.add_argument("--root", help="topic root (default moe2)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    p.add_argument("--ca-file", help="CA certificate for mqtts://")


def with_daemon_arguments(cfg: C, args: argparse.Namespace, **more: Any) -> C:
    """``cfg`` with the common daemon flags (and ``more``) applied: the command line wins."""
    from moe2.shared.config import override

    cfg = override(cfg, broker=args.broker, root=args.root, metrics_port=args.metrics_port,
                   **more)
    if args.ca_file:
        tls: msgspec.Struct = cfg.tls  # type: ignore[attr-defined]
        cfg = override(cfg, tls=override(tls, ca_file=args.ca_file))
    return cfg


def log_to_file(args: Any, path: str | os.PathLike[str]) -> None:
    """For long-running tools with their own progress lines (demo, reproduce): every log record
    goes to ``path``; the terminal keeps warnings and errors (everything with ``--verbose``)."""
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    stderr: logging.Handler | None = getattr(args, "log_handler", None)
    if stderr is not None and not getattr(args, "verbose", False):
        stderr.setLevel(logging.WARNING)


def emit_json(obj: Any) -> None:
    """Print exactly one JSON object on one line (the contract for ``--json``)."""
    sys.stdout.write(json.dumps(obj, separators=(",", ":"), default=_default) + "\n")
    sys.stdout.flush()


def _default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "__float__"):
        return float(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def fail(message: str, code: int = 2) -> NoReturn:
    """Exit with one clear error line on stderr."""
    sys.stderr.write(f"moe2: error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(code)


def run_daemon(run: Callable[[], Awaitable[int]], request_stop: Callable[[], None],
               start_metrics: Callable[[], Any] | None = None) -> int:
    """Run a daemon's main coroutine with SIGTERM/SIGINT wired to its graceful stop; a second
    signal exits at once. ``start_metrics`` returns a server with ``shutdown()`` (or None)."""
    log = logging.getLogger("moe2")

    async def main() -> int:
        loop = asyncio.get_running_loop()
        signals = 0

        def on_signal() -> None:
            nonlocal signals
            signals += 1
            if signals > 1:
                log.warning("second signal: exiting now")
                os._exit(1)
            request_stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        server = start_metrics() if start_metrics is not None else None
        try:
            return await run()
        finally:
            if server is not None:
                server.shutdown()

    return asyncio.run(main())
