"""How each phone request of a phase ended, and the tallies the phases report."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# --------------------------------------------------------------------------- outcomes


@dataclass(frozen=True)
class Outcome:
    """How one phone request ended (see the module docstring for the kinds)."""

    phase: str
    client: str
    kind: str
    sent_s: float
    latency_s: float
    code: str = ""
    message: str = ""
    coordinator: str = ""
    experts: tuple[str, ...] = ()
    dropped: tuple[tuple[str, str], ...] = ()  # (expert, reason)

    @property
    def ended_s(self) -> float:
        return self.sent_s + self.latency_s

    @property
    def sent(self) -> bool:
        return self.kind in SENT_KINDS


PROMPTS = (
    "What is 12 plus 7?", "Name a colour of the sky.", "Count to five:", "The capital of France",
    "Write one word about rain.", "2 + 2 =", "A short greeting:", "List three fruits:",
)


SENT_KINDS = ("final", "error", "phone_error", "lost")
PHONE_ERRORS = ("connection_lost", "coordinator_lost")
NOT_SENT_KINDS = ("no_coordinator", "not_connected", "send_failed")


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    i = min(len(s) - 1, max(0, round(q / 100.0 * (len(s) - 1))))
    return s[i]


def tally(outcomes: Iterable[Outcome], wall_s: float | None = None) -> dict[str, Any]:
    """Counts by kind and error code, lost, latency percentiles of finals, throughput."""
    outs = list(outcomes)
    kinds = Counter(o.kind for o in outs)
    codes = Counter(o.code for o in outs if o.kind == "error")
    phone = Counter(o.code for o in outs if o.kind == "phone_error")
    lat = [o.latency_s for o in outs if o.kind == "final"]
    sent = sum(kinds[k] for k in SENT_KINDS)
    out: dict[str, Any] = {
        "attempted": len(outs),
        "sent": sent,
        "finals": kinds["final"],
        "errors": kinds["error"],
        "errors_by_code": dict(sorted(codes.items())),
        "phone_errors": dict(sorted(phone.items())),
        "lost": sent - kinds["final"] - kinds["error"] - kinds["phone_error"],
        "not_sent": {k: kinds[k] for k in NOT_SENT_KINDS if kinds[k]},
        "latency_p50_s": _r(percentile(lat, 50)),
        "latency_p99_s": _r(percentile(lat, 99)),
    }
    if wall_s is not None:
        out["wall_s"] = _r(wall_s)
        out["throughput_rps"] = _r(kinds["final"] / wall_s) if wall_s > 0 else None
    return out


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(x, nd)


