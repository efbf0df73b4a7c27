"""Running statistics for telemetry: tokens/s, joules per token, step latency by context length.

Pure and clock-free: callers pass timestamps. Latency is kept per context-length bin (powers of
two) as a bounded window of recent samples, so the planner can model latency growing with the
history length.
"""

from __future__ import annotations

import bisect
import statistics
from collections import deque
from dataclasses import dataclass, field

from moe2.shared.wire import LatencyBin

CTX_BINS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


@dataclass
class AgentStats:
    window: int = 256
    tokens_total: int = 0
    energy_at_tokens_j: float = 0.0
    _by_bin: dict[int, deque[float]] = field(default_factory=dict)
    _recent_steps: deque[float] = field(default_factory=lambda: deque(maxlen=256))
    _rate: deque[tuple[float, int, float]] = field(default_factory=lambda: deque(maxlen=64))

    def record_step(self, latency_s: float, n_past: int) -> None:
        """One session-step decoded (``latency_s`` is the batch's decode time)."""
        i = bisect.bisect_left(CTX_BINS, max(1, n_past))
        b = CTX_BINS[min(i, len(CTX_BINS) - 1)]
        self._by_bin.setdefault(b, deque(maxlen=self.window)).append(latency_s)
        self._recent_steps.append(latency_s)

    def record_tokens(self, n: int) -> None:
        self.tokens_total += n

    def snapshot_rate(self, now_s: float, energy_j: float) -> tuple[float, float]:
        """(tokens/s, joules/token) over the last telemetry intervals."""
        self._rate.append((now_s, self.tokens_total, energy_j))
        # keep roughly the last 30 s
        while len(self._rate) > 2 and now_s - self._rate[0][0] > 30.0:
            self._rate.popleft()
        t0, n0, e0 = self._rate[0]
        dt = now_s - t0
        dn = self.tokens_total - n0
        tps = dn / dt if dt > 0 else 0.0
        jpt = (energy_j - e0) / dn if dn > 0 else 0.0
        return tps, jpt

    def step_latency_s(self) -> float:
        return statistics.median(self._recent_steps) if self._recent_steps else 0.0

    def latency_bins(self) -> list[LatencyBin]:
        return [
            LatencyBin(ctx_upto=b, latency_s=statistics.median(v), n=len(v))
            for b, v in sorted(self._by_bin.items())
            if v
        ]
