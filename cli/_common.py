"""Helpers every subcommand uses: one JSON object as the last stdout line, clear fatal errors."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn


class UsageError(Exception):
    """Bad input or configuration: reported as one line on stderr, exit code 2."""


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
