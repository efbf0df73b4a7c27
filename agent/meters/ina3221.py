"""Jetson board power from the INA3221 monitors' hwmon files (no root needed).

Each channel ``N`` of an ``ina3221`` hwmon device has ``inN_label`` (the rail name),
``inN_input`` (bus voltage, mV) and ``currN_input`` (current, mA); power is V x I. The meter
integrates the chosen rails' power (see :mod:`moe2.agent.meters.rails`) over sampling times.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from moe2.agent.meters.base import (
    Clock,
    MeterError,
    PollingMeter,
    PowerIntegrator,
    ReadText,
    read_text_file,
    read_thermal_c,
)
from moe2.agent.meters.rails import select_total_rails

logger = logging.getLogger(__name__)

_LABEL_RE = re.compile(r"in(\d+)_label")


@dataclass(frozen=True)
class Ina3221Channel:
    """One monitored rail: its label and the two files to read."""

    label: str
    voltage_path: Path
    current_path: Path

    def read_power_w(self, read_text: ReadText = read_text_file) -> float:
        voltage_mv = float(read_text(self.voltage_path).strip())
        current_ma = float(read_text(self.current_path).strip())
        return voltage_mv * current_ma / 1e6


def _hwmon_dirs(sys_root: Path) -> list[Path]:
    candidates = sorted((sys_root / "bus" / "i2c" / "drivers" / "ina3221").glob("*/hwmon/hwmon*"))
    candidates += sorted((sys_root / "class" / "hwmon").glob("hwmon*"))
    seen: set[str] = set()
    out: list[Path] = []
    for d in candidates:
        real = os.path.realpath(d)  # /sys/class/hwmon/hwmonN links to the device's dir
        if real not in seen:
            seen.add(real)
            out.append(d)
    return out


def find_ina3221_channels(
    sys_root: Path | str = "/sys", read_text: ReadText = read_text_file
) -> list[Ina3221Channel]:
    """Every labelled INA3221 channel under ``sys_root`` (unconnected ``NC`` channels and the
    driver's summation channel skipped; the first channel of a duplicated label wins)."""
    channels: dict[str, Ina3221Channel] = {}
    for d in _hwmon_dirs(Path(sys_root)):
        try:
            if read_text(d / "name").strip() != "ina3221":
                continue
        except OSError:
            continue
        for label_file in sorted(d.glob("in*_label")):
            m = _LABEL_RE.fullmatch(label_file.name)
            if m is None:
                continue
            n = m.group(1)
            try:
                label = read_text(label_file).strip()
            except OSError as e:
                logger.debug("cannot read %s: %s", label_file, e)
                continue
            if not label or label.upper() == "NC" or "sum" in label.lower():
                continue
            voltage, current = d / f"in{n}_input", d / f"curr{n}_input"
            if not (voltage.exists() and current.exists()):
                continue
            if label in channels:
                logger.debug("duplicate INA3221 rail %s at %s ignored", label, d)
                continue
            channels[label] = Ina3221Channel(label, voltage, current)
    return list(channels.values())


class Ina3221Meter(PollingMeter):
    """Integrated board power from INA3221 hwmon sysfs files."""

    kind = "ina3221"

    def __init__(
        self,
        rails: Sequence[str] = (),
        *,
        sys_root: Path | str = "/sys",
        clock: Clock = time.monotonic,
        sample_interval_s: float | None = 0.1,
        read_text: ReadText = read_text_file,
    ) -> None:
        super().__init__(clock=clock, sample_interval_s=sample_interval_s)
        self._configured_rails = tuple(rails)
        self._sys_root = Path(sys_root)
        self._read_text = read_text
        self._channels: tuple[Ina3221Channel, ...] = ()
        self._integrator = PowerIntegrator()

    @property
    def rails(self) -> tuple[str, ...]:
        """The rails summed (after :meth:`probe`)."""
        return tuple(c.label for c in self._channels)

    def probe(self) -> None:
        if self._channels:
            return
        found = find_ina3221_channels(self._sys_root, self._read_text)
        if not found:
            raise MeterError(f"no INA3221 hwmon device under {self._sys_root}")
        by_label = {c.label: c for c in found}
        chosen = tuple(by_label[r] for r in select_total_rails(by_label, self._configured_rails))
        try:
            for c in chosen:
                c.read_power_w(self._read_text)
        except (OSError, ValueError) as e:
            raise MeterError(f"INA3221 rail unreadable: {e}") from e
        self._channels = chosen

    def rail_power_w(self) -> dict[str, float]:
        """Each chosen rail's current power (diagnostics)."""
        return {c.label: c.read_power_w(self._read_text) for c in self._channels}

    def _open(self, now_s: float) -> None:
        self._sample(now_s)

    def _sample(self, now_s: float) -> None:
        power_w = sum(c.read_power_w(self._read_text) for c in self._channels)
        self._integrator.add(now_s, power_w)
        self._energy_j = self._integrator.energy_j
        self._power_w = self._integrator.power_w

    def temperature_c(self) -> float | None:
        return read_thermal_c(self._sys_root, self._read_text)

    def describe(self) -> str:
        rails = " + ".join(self.rails) or "(not probed)"
        return f"ina3221: Jetson INA3221 hwmon under {self._sys_root}, rails {rails}"
