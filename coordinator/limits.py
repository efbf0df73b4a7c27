"""Admission control for phone requests: pure bookkeeping, clock passed in.

Per-client token-bucket rate, per-client and global concurrency. ``admit`` returns None when the
request may start, else the typed error to send back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moe2.shared import wire
from moe2.shared.config import CoordinatorConfig

#: the smallest non-zero sampling temperature accepted (0 = greedy)
MIN_TEMPERATURE = 1e-6


def request_problem(req: wire.PhoneRequest, cfg: CoordinatorConfig) -> str | None:
    """Why this coordinator refuses a well-formed request (a ``bad_request`` reply), or None:
    prompt length, ``max_tokens``, a temperature too small to sample with, an unknown app."""
    n_chars = len(req.prompt or "") + sum(len(m.content) for m in req.messages or [])
    if n_chars > cfg.max_prompt_chars:
        return (f"prompt has {n_chars} characters; this coordinator accepts at most "
                f"{cfg.max_prompt_chars}")
    if req.max_tokens > cfg.max_tokens_limit:
        return f"max_tokens {req.max_tokens} exceeds the limit of {cfg.max_tokens_limit}"
    if 0.0 < req.temperature < MIN_TEMPERATURE:  # p^(1/T) overflows to NaN below this
        return (f"temperature {req.temperature:g} is too small: use 0 for greedy decoding "
                f"or at least {MIN_TEMPERATURE:g}")
    if cfg.apps and req.app not in cfg.apps:
        return f"unknown app {req.app!r}; known: {', '.join(sorted(cfg.apps))}"
    return None


@dataclass
class Limits:
    max_concurrent: int
    max_per_client: int
    rate_per_client_per_s: float
    burst: float = 0.0
    max_clients_tracked: int = 100_000
    active: dict[str, int] = field(default_factory=dict)
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # client -> (tokens, t)

    def admit(self, client_id: str, now_s: float) -> wire.ErrorReplyPhone | None:
        total = sum(self.active.values())
        if total >= self.max_concurrent:
            return wire.ErrorReplyPhone(
                code=wire.ErrorCode.TOO_MANY_REQUESTS,
                message=f"the coordinator is serving its maximum of {self.max_concurrent} "
                "requests; retry later")
        if self.active.get(client_id, 0) >= self.max_per_client:
            return wire.ErrorReplyPhone(
                code=wire.ErrorCode.TOO_MANY_REQUESTS,
                message=f"at most {self.max_per_client} requests at once per client")
        if self.rate_per_client_per_s > 0:
            cap = max(1.0, self.burst or self.rate_per_client_per_s)
            tokens, t = self._buckets.get(client_id, (cap, now_s))
            tokens = min(cap, tokens + (now_s - t) * self.rate_per_client_per_s)
            if tokens < 1.0:
                self._buckets[client_id] = (tokens, now_s)
                return wire.ErrorReplyPhone(
                    code=wire.ErrorCode.RATE_LIMITED,
                    message=f"more than {self.rate_per_client_per_s:g} requests/s from this "
                    "client; slow down")
            if len(self._buckets) >= self.max_clients_tracked and client_id not in self._buckets:
                self._buckets.clear()  # bounded memory under hostile client-id churn
            self._buckets[client_id] = (tokens - 1.0, now_s)
        self.active[client_id] = self.active.get(client_id, 0) + 1
        return None

    def release(self, client_id: str) -> None:
        n = self.active.get(client_id, 0) - 1
        if n > 0:
            self.active[client_id] = n
        else:
            self.active.pop(client_id, None)
