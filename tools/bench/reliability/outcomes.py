"""How each phone request of a phase ended, and the tallies the phases report."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

#: a site broker: Debian's mosquitto persists sessions and retained messages across restarts
BROKER_CONF = (
    "listener {port} 127.0.0.1\n"
    "allow_anonymous true\n"
    "persistence true\n"
    "persistence_location {dir}/\n"
    "autosave_interval 60\n"
    "max_queued_messages 100000\n"
    "max_inflight_messages 0\n"
    "message_size_limit 0\n"
    "set_tcp_nodelay true\n"
)

AGENT_ARGS = ("--n-ctx", "512", "--max-sessions", "96", "--threads", "1",
              "--telemetry-interval", "0.5", "--meter", "estimated")

MAIN_COORDINATOR_TOML = (
    "max_concurrent = 512\n"
    "max_concurrent_per_client = 16\n"
    "rate_per_client_per_s = 1000.0\n"
)
BOUNDS_ROOT = "bounds"
BOUNDS_COORDINATOR_TOML = (
    "max_concurrent_per_client = 2\n"
    "rate_per_client_per_s = 5.0\n"
    "max_prompt_chars = 256\n"
    "max_tokens_limit = 32\n"
)

PROMPTS = (
    "What is 12 plus 7?", "Name a colour of the sky.", "Count to five:", "The capital of France",
    "Write one word about rain.", "2 + 2 =", "A short greeting:", "List three fruits:",
)


class FleetError(RuntimeError):
    pass


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


