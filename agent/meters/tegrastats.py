"""``tegrastats`` lines: a pure parser and a meter that integrates the board power they report.

Formats accepted (fields the parser does not know are skipped):

- JetPack 4: ``VDD_IN 2532/2698`` (current/average mW, no unit); AGX Xavier rails have no
  prefix (``GPU 0/0 CPU 311/311``).
- JetPack 5 and 6: ``VDD_IN 5299mW/5299mW``; a ``MM-DD-YYYY HH:MM:SS`` timestamp may lead.
- JetPack 7: three values per rail (``VDD_GPU_SOC 5139mW/5139mW/5139mW``) and temperatures
  with two values (``cpu@52.968C/52.968C``).
- Without root: ``EMC_FREQ`` etc. missing, ``GR3D_FREQ 0%`` without ``@freq``.
- Irregular runs of spaces.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from moe2.agent.meters.base import (
    Clock,
    EnergyMeter,
    MeterError,
    PowerIntegrator,
    pick_temperature_c,
)
from moe2.agent.meters.rails import total_power_w

logger = logging.getLogger(__name__)

Which = Callable[[str], "str | None"]
PopenFactory = Callable[..., "subprocess.Popen[str]"]

_NUM = r"(\d+(?:\.\d+)?)"
_RAM_RE = re.compile(r"(?<![\w])RAM\s+(\d+)/(\d+)MB")
_SWAP_RE = re.compile(r"(?<![\w])SWAP\s+(\d+)/(\d+)MB")
_CPU_RE = re.compile(r"(?<![\w])CPU\s+\[([^\]]*)\]")
_CPU_CORE_RE = re.compile(r"(\d+(?:\.\d+)?)%")
_GR3D_RE = re.compile(r"(?<![\w])GR3D_FREQ\s+(\d+(?:\.\d+)?)%(?:@\[?(\d+))?")
_EMC_RE = re.compile(r"(?<![\w])EMC_FREQ\s+(\d+(?:\.\d+)?)%(?:@(\d+))?")
_RAIL_RE = re.compile(
    rf"(?<![\w@%])([A-Za-z][A-Za-z0-9_]*)\s+{_NUM}(?:mW)?/{_NUM}(?:mW)?(?:/{_NUM}(?:mW)?)?(?=\s|$)"
)
_TEMP_RE = re.compile(
    r"(?<![\w@%])([A-Za-z][A-Za-z0-9_]*)@(-?\d+(?:\.\d+)?)C(?:/-?\d+(?:\.\d+)?C)?(?=\s|$)"
)
_NOT_RAILS = frozenset({"RAM", "SWAP", "IRAM", "LFB"})


@dataclass(frozen=True)
class TegrastatsSample:
    """One parsed line. Rails map to ``(current_mw, average_mw)``; temperatures to Celsius."""

    rails_mw: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    temps_c: Mapping[str, float] = field(default_factory=dict)
    ram_used_mb: int | None = None
    ram_total_mb: int | None = None
    swap_used_mb: int | None = None
    swap_total_mb: int | None = None
    cpu_pct: tuple[float | None, ...] = ()
    """Per core load; ``None`` for an offline core."""
    gr3d_pct: float | None = None
    gr3d_freq_mhz: float | None = None
    emc_pct: float | None = None

    def power_w(self, rails: Sequence[str] = ()) -> float:
        """Board power from the current rail values (see :func:`tegrastats_total_power_w`)."""
        return tegrastats_total_power_w(self, rails)

    def temperature_c(self) -> float | None:
        return pick_temperature_c(self.temps_c)


def tegrastats_total_power_w(sample: TegrastatsSample, rails: Sequence[str] = ()) -> float:
    """Total power in watts: ``VDD_IN`` or ``POM_5V_IN``, or on AGX Orin the sum of
    ``VDD_GPU_SOC + VDD_CPU_CV + VIN_SYS_5V0``, or for unknown boards every rail; ``rails``
    overrides. Raises :class:`MeterError` when the line has no (or not the configured) rails."""
    current_w = {name: cur_mw / 1000.0 for name, (cur_mw, _avg) in sample.rails_mw.items()}
    return total_power_w(current_w, rails)


def parse_tegrastats_line(line: str) -> TegrastatsSample | None:
    """Parse one ``tegrastats`` line; ``None`` when the line is not one (no ``RAM used/totalMB``
    field). Text before ``RAM`` (a timestamp, a label) is ignored."""
    ram = _RAM_RE.search(line)
    if ram is None:
        return None
    body = line[ram.start() :]
    rails: dict[str, tuple[float, float]] = {}
    for m in _RAIL_RE.finditer(body):
        name = m.group(1)
        if name.upper() in _NOT_RAILS:
            continue
        rails[name] = (float(m.group(2)), float(m.group(3)))
    temps = {m.group(1): float(m.group(2)) for m in _TEMP_RE.finditer(body)}
    cpu: tuple[float | None, ...] = ()
    cpu_m = _CPU_RE.search(body)
    if cpu_m is not None:
        cores: list[float | None] = []
        for part in cpu_m.group(1).split(","):
            core = _CPU_CORE_RE.match(part.strip())
            cores.append(float(core.group(1)) if core else None)
        cpu = tuple(cores)
    swap = _SWAP_RE.search(body)
    gr3d = _GR3D_RE.search(body)
    emc = _EMC_RE.search(body)
    return TegrastatsSample(
        rails_mw=rails,
        temps_c=temps,
        ram_used_mb=int(ram.group(1)),
        ram_total_mb=int(ram.group(2)),
        swap_used_mb=int(swap.group(1)) if swap else None,
        swap_total_mb=int(swap.group(2)) if swap else None,
        cpu_pct=cpu,
        gr3d_pct=float(gr3d.group(1)) if gr3d else None,
        gr3d_freq_mhz=float(gr3d.group(2)) if gr3d and gr3d.group(2) else None,
        emc_pct=float(emc.group(1)) if emc else None,
    )


class TegrastatsMeter(EnergyMeter):
    """Integrates the board power of ``tegrastats`` lines over their arrival times.

    :meth:`start` runs ``tegrastats --interval MS`` and feeds its lines from a reader thread;
    tests call :meth:`feed` directly with an injected clock instead.
    """

    kind = "tegrastats"

    def __init__(
        self,
        rails: Sequence[str] = (),
        *,
        interval_s: float = 0.1,
        clock: Clock = time.monotonic,
        executable: str = "tegrastats",
        which: Which = shutil.which,
        popen: PopenFactory = subprocess.Popen,
    ) -> None:
        super().__init__()
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self._rails = tuple(rails)
        self._interval_s = interval_s
        self._clock = clock
        self._executable = executable
        self._which = which
        self._popen = popen
        self._path: str | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._cond = threading.Condition()
        self._integrator = PowerIntegrator()
        self._last: TegrastatsSample | None = None
        self._lines = 0
        self._bad_lines = 0

    def probe(self) -> None:
        if self._path is not None:
            return
        found = self._which(self._executable)
        if found is None and Path(self._executable).is_file():
            found = self._executable
        if found is None:
            raise MeterError(f"{self._executable} not found on PATH")
        self._path = found

    @property
    def samples(self) -> int:
        """How many lines were integrated."""
        with self._cond:
            return self._lines

    @property
    def last_sample(self) -> TegrastatsSample | None:
        with self._cond:
            return self._last

    def feed(self, line: str) -> TegrastatsSample | None:
        """Parse ``line`` and integrate its power at the clock's current time."""
        sample = parse_tegrastats_line(line)
        if sample is None:
            return None
        try:
            power_w = sample.power_w(self._rails)
        except MeterError as e:
            self._bad_lines += 1
            if self._bad_lines == 1:
                logger.warning("tegrastats line without usable power rails skipped: %s", e)
            return sample
        with self._cond:
            self._integrator.add(self._clock(), power_w)
            self._last = sample
            self._lines += 1
            self._cond.notify_all()
        return sample

    def wait_for_samples(self, count: int, timeout_s: float) -> bool:
        """Block until at least ``count`` lines were integrated (or the timeout passes)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._lines >= count, timeout=timeout_s)

    def _start(self) -> None:
        self.probe()
        assert self._path is not None
        interval_ms = max(1, round(self._interval_s * 1000))
        try:
            self._proc = self._popen(
                [self._path, "--interval", str(interval_ms)],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
                text=True,
                bufsize=1,
            )
        except OSError as e:
            raise MeterError(f"cannot run {self._path}: {e}") from e
        stdout = self._proc.stdout
        if stdout is None:
            raise MeterError("tegrastats subprocess has no stdout pipe")
        self._reader = threading.Thread(
            target=self._read_lines, args=(stdout,), name="moe2-meter-tegrastats", daemon=True
        )
        self._reader.start()

    def _read_lines(self, stdout: IO[str]) -> None:
        try:
            for line in stdout:
                self.feed(line)
        except (OSError, ValueError) as e:  # ValueError: the pipe was closed under us
            logger.debug("tegrastats reader stopped: %s", e)

    def _close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=5.0)
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()

    def read_energy_j(self) -> float:
        """Joules integrated up to the latest line."""
        with self._cond:
            return self._integrator.energy_j

    def read_power_w(self) -> float:
        with self._cond:
            return self._integrator.power_w

    def temperature_c(self) -> float | None:
        last = self.last_sample
        return last.temperature_c() if last is not None else None

    def describe(self) -> str:
        rails = " + ".join(self._rails) if self._rails else "auto-selected rails"
        return f"tegrastats: `{self._path or self._executable} --interval` lines, {rails}"
