"""In-memory meters for tests of the agent and other components (no hardware, no timing).

- :class:`ManualClock`: a clock the test advances.
- :class:`ManualMeter` (alias :data:`FakeMeter`): the test sets energy, power and temperature.
- :class:`ReplayMeter`: plays back a recorded ``(t_s, energy_j, power_w)`` trace on a clock.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable
from itertools import pairwise

from moe2.agent.meters.base import Clock, EnergyMeter


class ManualClock:
    """Seconds that move only when the test says so; pass it wherever a ``clock`` is taken."""

    def __init__(self, start_s: float = 0.0) -> None:
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("a monotonic clock does not go back")
        self.now_s += seconds
        return self.now_s


class ManualMeter(EnergyMeter):
    """A meter whose readings the test sets; records start/close like a real one."""

    def __init__(
        self,
        kind: str = "manual",
        *,
        energy_j: float = 0.0,
        power_w: float = 0.0,
        temperature_c: float | None = None,
        estimated: bool = False,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.estimated = estimated
        self._lock = threading.Lock()
        self._energy_j = energy_j
        self._power_w = power_w
        self._temperature_c = temperature_c
        self.start_calls = 0
        self.reads = 0

    def set(
        self,
        *,
        energy_j: float | None = None,
        power_w: float | None = None,
        temperature_c: float | None = None,
    ) -> None:
        """Set readings; energy may not go down (a real meter's never does)."""
        with self._lock:
            if energy_j is not None:
                if energy_j < self._energy_j:
                    raise ValueError(f"energy went down: {self._energy_j} -> {energy_j}")
                self._energy_j = energy_j
            if power_w is not None:
                self._power_w = power_w
            if temperature_c is not None:
                self._temperature_c = temperature_c

    def add_energy(self, joules: float) -> None:
        if joules < 0:
            raise ValueError("energy increments must be >= 0")
        with self._lock:
            self._energy_j += joules

    def _start(self) -> None:
        self.start_calls += 1

    def read_energy_j(self) -> float:
        with self._lock:
            self.reads += 1
            return self._energy_j

    def read_power_w(self) -> float:
        with self._lock:
            return self._power_w

    def temperature_c(self) -> float | None:
        with self._lock:
            return self._temperature_c

    def describe(self) -> str:
        return f"{self.kind}: manual test meter"


FakeMeter = ManualMeter


class ReplayMeter(EnergyMeter):
    """Plays back a trace of ``(t_s, energy_j, power_w)`` rows on an injected clock.

    Row times are relative: the first row happens when the meter is created. Energy is
    interpolated linearly between rows and reported relative to the first row; power holds the
    latest row's value. Before the first row both are zero, after the last they stay.
    """

    def __init__(
        self,
        trace: Iterable[tuple[float, float, float]],
        *,
        clock: Clock,
        kind: str = "replay",
        estimated: bool = False,
        temperature_c: float | None = None,
    ) -> None:
        super().__init__()
        rows = [(float(t), float(e), float(p)) for t, e, p in trace]
        if not rows:
            raise ValueError("empty trace")
        for (t0, e0, _), (t1, e1, _) in pairwise(rows):
            if t1 < t0 or e1 < e0:
                raise ValueError(f"trace must be non-decreasing in time and energy at t={t1}")
        self.kind = kind
        self.estimated = estimated
        self._rows = rows
        self._times = [r[0] for r in rows]
        self._clock = clock
        self._origin_s = clock() - rows[0][0]
        self._temperature_c = temperature_c

    def _t(self) -> float:
        return self._clock() - self._origin_s

    def read_energy_j(self) -> float:
        t = self._t()
        rows = self._rows
        i = bisect.bisect_right(self._times, t)
        if i == 0:
            return 0.0
        if i == len(rows):
            return rows[-1][1] - rows[0][1]
        (t0, e0, _), (t1, e1, _) = rows[i - 1], rows[i]
        frac = (t - t0) / (t1 - t0) if t1 > t0 else 1.0
        return e0 + frac * (e1 - e0) - rows[0][1]

    def read_power_w(self) -> float:
        i = bisect.bisect_right(self._times, self._t())
        return self._rows[i - 1][2] if i else 0.0

    def temperature_c(self) -> float | None:
        return self._temperature_c

    def describe(self) -> str:
        return f"{self.kind}: replay of {len(self._rows)} recorded samples"
