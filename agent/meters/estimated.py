"""An estimate when no power sensor is readable: configured watts x busy time.

Always labelled ``estimated``. The agent marks decoding with :meth:`EstimatedMeter.busy` (or
reports :meth:`EstimatedMeter.add_busy` seconds); idle time costs ``idle_power_w`` (default 0).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from moe2.agent.meters.base import Clock, EnergyMeter


class EstimatedMeter(EnergyMeter):
    """``busy_power_w`` while busy, ``idle_power_w`` otherwise, from construction on."""

    kind = "estimated"
    estimated = True

    def __init__(
        self,
        busy_power_w: float = 10.0,
        idle_power_w: float = 0.0,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__()
        if busy_power_w < 0 or idle_power_w < 0:
            raise ValueError("estimated watts must be >= 0")
        if idle_power_w > busy_power_w:
            raise ValueError(f"idle_power_w {idle_power_w} exceeds busy_power_w {busy_power_w}")
        self.busy_power_w = busy_power_w
        self.idle_power_w = idle_power_w
        self._clock = clock
        self._lock = threading.Lock()
        self._t0_s = clock()
        self._busy_s = 0.0
        self._depth = 0
        self._busy_since_s = 0.0

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Mark the enclosed block as busy (nesting and concurrent blocks count once)."""
        with self._lock:
            if self._depth == 0:
                self._busy_since_s = self._clock()
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    self._busy_s += max(0.0, self._clock() - self._busy_since_s)

    def add_busy(self, seconds: float) -> None:
        """Count ``seconds`` of busy time measured elsewhere."""
        if seconds < 0:
            raise ValueError(f"busy seconds must be >= 0, got {seconds}")
        with self._lock:
            self._busy_s += seconds

    def busy_s(self) -> float:
        """Busy seconds so far, an open :meth:`busy` block included."""
        with self._lock:
            return self._busy_now(self._clock())

    def _busy_now(self, now_s: float) -> float:
        extra = max(0.0, now_s - self._busy_since_s) if self._depth else 0.0
        return self._busy_s + extra

    def read_energy_j(self) -> float:
        with self._lock:
            now = self._clock()
            busy = self._busy_now(now)
            idle = max(0.0, (now - self._t0_s) - busy)
            return self.busy_power_w * busy + self.idle_power_w * idle

    def read_power_w(self) -> float:
        with self._lock:
            return self.busy_power_w if self._depth else self.idle_power_w

    def describe(self) -> str:
        return (
            f"estimated: {self.busy_power_w:g} W while busy, {self.idle_power_w:g} W idle "
            "(no power sensor; not a measurement)"
        )
