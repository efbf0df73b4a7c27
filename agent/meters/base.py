"""The energy-meter interface and the pieces every meter shares.

A meter reports cumulative joules since it started (monotone non-decreasing), the latest power
in watts, how it measures (``kind``) and whether the number is an estimate. Hardware access sits
behind small injectable callables (a clock, a text-file reader) so tests run on fakes.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TypeVar

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
"""Seconds on a monotonic clock (``time.monotonic`` in production, a manual clock in tests)."""

ReadText = Callable[[Path], str]
"""Reads a whole (sysfs) text file; raises ``OSError`` (``PermissionError`` included) on failure."""

_M = TypeVar("_M", bound="EnergyMeter")

# Temperatures outside this range are sensor sentinels (Jetson prints -256C for offline zones).
_MIN_VALID_C = -40.0
_MAX_VALID_C = 150.0


class MeterError(RuntimeError):
    """A meter that cannot deliver real data; the message is one line meant for the operator."""


def read_text_file(path: Path) -> str:
    """The default :data:`ReadText`: the file's text (sysfs files are small ASCII)."""
    with path.open(encoding="ascii", errors="replace") as f:
        return f.read()


class EnergyMeter(ABC):
    """Cumulative energy and instantaneous power of this box (or of its accelerator).

    Lifecycle: :meth:`probe` checks that real data can be read (raises :class:`MeterError`),
    :meth:`start` sets the baseline and starts any sampler thread or subprocess, :meth:`close`
    stops them. Both are idempotent and the meter is a context manager. After ``close`` the
    readings stay at their last values.
    """

    kind: str = "unknown"
    """How the meter measures: ``nvml-energy``, ``nvml-power``, ``ina3221``, ``tegrastats``,
    ``jtop``, ``rapl``, ``estimated``, or a fake's label."""

    estimated: bool = False
    """True when the joules are a model (watts x busy time), not a measurement."""

    def __init__(self) -> None:
        self.skipped: dict[str, str] = {}
        """Set by :func:`detect_meter`: meter kinds tried before this one, with the reason."""
        self._lifecycle_lock = threading.Lock()
        self._started = False
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------
    def probe(self) -> None:  # noqa: B027  (an optional hook, empty on purpose)
        """Raise :class:`MeterError` unless the meter yields real data. Default: always fine."""

    def start(self) -> None:
        """Set the baseline and start sampling. Idempotent; a closed meter cannot restart."""
        with self._lifecycle_lock:
            if self._closed:
                raise MeterError(f"{self.kind} meter is closed")
            if self._started:
                return
            self._start()
            self._started = True

    def close(self) -> None:
        """Stop sampling and release the hardware. Idempotent; also releases a probe's handles."""
        with self._lifecycle_lock:
            if self._closed:
                return
            self._closed = True
            self._close()

    @property
    def started(self) -> bool:
        return self._started

    @property
    def closed(self) -> bool:
        return self._closed

    def _start(self) -> None:  # noqa: B027  (optional hook)
        """Subclass hook for :meth:`start` (called once)."""

    def _close(self) -> None:  # noqa: B027  (optional hook)
        """Subclass hook for :meth:`close` (called once, even when never started)."""

    def __enter__(self: _M) -> _M:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- readings --------------------------------------------------------------------------
    @abstractmethod
    def read_energy_j(self) -> float:
        """Joules since the meter started; never decreases."""

    @abstractmethod
    def read_power_w(self) -> float:
        """The latest power in watts (instantaneous, or over the last sampling window)."""

    def temperature_c(self) -> float | None:
        """A representative temperature in degrees Celsius where one is readable."""
        return None

    @abstractmethod
    def describe(self) -> str:
        """One line for logs and status: kind, device, method."""


class PowerIntegrator:
    """Trapezoidal integration of power samples over time. Pure; not thread-safe by itself."""

    def __init__(self) -> None:
        self.energy_j = 0.0
        self.power_w = 0.0
        self.samples = 0
        self._last_t_s: float | None = None

    def add(self, t_s: float, power_w: float) -> None:
        """Add a sample taken at ``t_s``; negative power (a glitch) counts as zero, a sample
        older than the previous one is ignored."""
        power_w = max(0.0, power_w)
        last = self._last_t_s
        if last is not None:
            if t_s < last:
                return
            self.energy_j += 0.5 * (power_w + self.power_w) * (t_s - last)
        self._last_t_s = t_s
        self.power_w = power_w
        self.samples += 1


class PollingMeter(EnergyMeter):
    """A meter whose state advances in :meth:`sample`. Reads sample too, so they are current;
    a daemon thread also samples every ``sample_interval_s`` (``None``: only on reads and
    explicit :meth:`sample` calls, which is how tests drive it)."""

    def __init__(self, *, clock: Clock = time.monotonic, sample_interval_s: float | None) -> None:
        super().__init__()
        if sample_interval_s is not None and sample_interval_s <= 0:
            raise ValueError(f"sample_interval_s must be > 0 or None, got {sample_interval_s}")
        self._clock = clock
        self._interval_s = sample_interval_s
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._energy_j = 0.0
        self._power_w = 0.0
        self._sample_errors = 0

    @abstractmethod
    def _open(self, now_s: float) -> None:
        """Take the baseline reading (after :meth:`probe`)."""

    @abstractmethod
    def _sample(self, now_s: float) -> None:
        """Read the hardware and update ``_energy_j`` / ``_power_w``."""

    def _release(self) -> None:
        """Release hardware handles (called once from :meth:`close`)."""

    def _start(self) -> None:
        self.probe()
        with self._lock:
            self._open(self._clock())
        if self._interval_s is not None:
            self._thread = threading.Thread(
                target=self._run, name=f"moe2-meter-{self.kind}", daemon=True
            )
            self._thread.start()

    def _close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            if self._thread.is_alive():
                logger.warning("%s sampler thread did not stop within 5 s", self.kind)
        with self._lock:
            self._release()

    def _run(self) -> None:
        assert self._interval_s is not None
        while not self._stop.wait(self._interval_s):
            self._try_sample()

    def _try_sample(self) -> None:
        """Sample, logging (not raising) a failed read: the last values stay."""
        try:
            self.sample()
        except (MeterError, OSError, ValueError) as e:
            self._sample_errors += 1
            if self._sample_errors == 1:
                logger.warning("%s sample failed (further failures at debug): %s", self.kind, e)
            else:
                logger.debug("%s sample failed: %s", self.kind, e)

    @property
    def sample_errors(self) -> int:
        """How many samples failed (each keeps the previous values)."""
        return self._sample_errors

    def sample(self) -> None:
        """Take one sample now (the sampler thread calls this). No-op unless started."""
        with self._lock:
            if self._started and not self._closed:
                self._sample(self._clock())

    def _require_started(self) -> None:
        if not self._started:
            raise MeterError(f"{self.kind} meter not started: call start() or use `with meter:`")

    def read_energy_j(self) -> float:
        self._require_started()
        self._try_sample()
        with self._lock:
            return self._energy_j

    def read_power_w(self) -> float:
        self._require_started()
        self._try_sample()
        with self._lock:
            return self._power_w


class CounterDelta:
    """Accumulates a hardware counter that may wrap (``range_`` given) or reset (``None``)."""

    def __init__(self, first: int, range_: int | None = None) -> None:
        self.last = first
        self.range_ = range_
        self.total = 0

    def update(self, raw: int) -> int:
        """Feed a new raw value; returns the accumulated total since the first value."""
        delta = raw - self.last
        if delta < 0:
            # A wrapped counter restarts at zero after range_; an unranged one was reset.
            delta = delta + self.range_ if self.range_ is not None else 0
            delta = max(delta, 0)
        self.total += delta
        self.last = raw
        return self.total


class WindowedRate:
    """Power from an energy counter: delta joules over delta seconds, recomputed once at least
    ``window_s`` has passed since the previous reference point (tiny windows are noise)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.power_w = 0.0
        self._ref: tuple[float, float] | None = None

    def update(self, t_s: float, energy_j: float) -> float:
        if self._ref is None:
            self._ref = (t_s, energy_j)
        else:
            t0, e0 = self._ref
            if t_s - t0 >= self.window_s and t_s > t0:
                self.power_w = max(0.0, (energy_j - e0) / (t_s - t0))
                self._ref = (t_s, energy_j)
        return self.power_w


def _zone_key(name: str) -> str:
    key = name.strip().lower()
    for suffix in ("-thermal", "_thermal", "-therm"):
        key = key.removesuffix(suffix)
    return key


def pick_temperature_c(temps_c: Mapping[str, float]) -> float | None:
    """The representative temperature: the junction (``tj``) sensor when present, else the
    hottest plausible sensor. PMIC sensors (a constant 100C on Jetson) and sentinels are skipped."""
    valid = {
        _zone_key(name): c
        for name, c in temps_c.items()
        if "pmic" not in name.lower() and _MIN_VALID_C < c < _MAX_VALID_C
    }
    if not valid:
        return None
    if "tj" in valid:
        return valid["tj"]
    return max(valid.values())


_ZONE_RE = re.compile(r"thermal_zone\d+")


def read_thermal_c(
    sys_root: Path | str = "/sys", read_text: ReadText = read_text_file
) -> float | None:
    """The representative temperature from ``/sys/class/thermal/thermal_zone*/{type,temp}``
    (millidegrees); ``None`` when nothing is readable."""
    base = Path(sys_root) / "class" / "thermal"
    temps: dict[str, float] = {}
    for zone in sorted(base.glob("thermal_zone*")):
        if not _ZONE_RE.fullmatch(zone.name):
            continue
        try:
            raw = read_text(zone / "temp").strip()
            name = read_text(zone / "type").strip() if (zone / "type").exists() else zone.name
            temps[name or zone.name] = int(raw) / 1000.0
        except (OSError, ValueError):
            continue
    return pick_temperature_c(temps)
