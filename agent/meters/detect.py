"""Choose this box's energy meter: from config, or the first that yields real data.

Auto order: NVML (only with real energy or power data), INA3221 sysfs, ``tegrastats`` (on
PATH), RAPL (readable), then the estimate. Every skip is logged with its reason and kept in the
chosen meter's ``skipped`` mapping.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from moe2.agent.meters.base import Clock, EnergyMeter, MeterError, ReadText, read_text_file
from moe2.agent.meters.estimated import EstimatedMeter
from moe2.agent.meters.ina3221 import Ina3221Meter
from moe2.agent.meters.jtop import JtopFactory, JtopMeter
from moe2.agent.meters.nvml import NvmlMeter, NvmlMode
from moe2.agent.meters.rapl import RaplMeter
from moe2.agent.meters.tegrastats import PopenFactory, TegrastatsMeter, Which

logger = logging.getLogger(__name__)

METER_KINDS: tuple[str, ...] = (
    "auto",
    "nvml",
    "nvml-energy",
    "nvml-power",
    "ina3221",
    "tegrastats",
    "jtop",
    "rapl",
    "estimated",
)
AUTO_ORDER: tuple[str, ...] = ("nvml", "ina3221", "tegrastats", "rapl", "estimated")


class _MeterSectionLike(Protocol):
    """The fields :class:`MeterConfig` takes from a config file's meter section."""

    @property
    def kind(self) -> str: ...
    @property
    def estimated_watts(self) -> float: ...
    @property
    def idle_watts(self) -> float: ...
    @property
    def gpu_index(self) -> int: ...
    @property
    def rails(self) -> Sequence[str]: ...
    @property
    def sample_interval_s(self) -> float: ...


@dataclass(frozen=True)
class MeterConfig:
    """Which meter to use and its parameters (``kind="auto"`` probes in :data:`AUTO_ORDER`)."""

    kind: str = "auto"
    estimated_watts: float = 10.0
    """Power while busy, for the estimated meter."""
    idle_watts: float = 0.0
    """Power while idle, for the estimated meter."""
    gpu_index: int = 0
    rails: tuple[str, ...] = ()
    """Jetson rails to sum instead of the automatic choice."""
    sample_interval_s: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in METER_KINDS:
            raise ValueError(f"unknown meter kind {self.kind!r}; one of {', '.join(METER_KINDS)}")
        if self.estimated_watts < 0 or self.idle_watts < 0:
            raise ValueError("meter watts must be >= 0")
        if self.idle_watts > self.estimated_watts:
            raise ValueError("idle_watts must not exceed estimated_watts")
        if self.sample_interval_s <= 0:
            raise ValueError("sample_interval_s must be > 0")
        object.__setattr__(self, "rails", tuple(self.rails))

    @classmethod
    def from_section(cls, section: _MeterSectionLike) -> MeterConfig:
        """From a config file's ``[meter]`` section (``moe2.shared.config.MeterSection``)."""
        return cls(
            kind=section.kind,
            estimated_watts=section.estimated_watts,
            idle_watts=section.idle_watts,
            gpu_index=section.gpu_index,
            rails=tuple(section.rails),
            sample_interval_s=section.sample_interval_s,
        )


def build_meter(
    kind: str,
    config: MeterConfig | None = None,
    *,
    sys_root: Path | str = "/sys",
    nvml: Any | None = None,
    which: Which = shutil.which,
    clock: Clock = time.monotonic,
    read_text: ReadText = read_text_file,
    popen: PopenFactory = subprocess.Popen,
    jtop_factory: JtopFactory | None = None,
) -> EnergyMeter:
    """A meter of ``kind`` (not ``auto``), neither probed nor started."""
    cfg = config or MeterConfig()
    interval = cfg.sample_interval_s
    if kind in ("nvml", "nvml-energy", "nvml-power"):
        mode: NvmlMode = "auto"
        if kind == "nvml-energy":
            mode = "energy"
        elif kind == "nvml-power":
            mode = "power"
        return NvmlMeter(
            cfg.gpu_index,
            nvml=nvml,
            mode=mode,
            clock=clock,
            sample_interval_s=interval,
        )
    if kind == "ina3221":
        return Ina3221Meter(
            cfg.rails,
            sys_root=sys_root,
            clock=clock,
            sample_interval_s=interval,
            read_text=read_text,
        )
    if kind == "tegrastats":
        return TegrastatsMeter(
            cfg.rails, interval_s=interval, clock=clock, which=which, popen=popen
        )
    if kind == "jtop":
        return JtopMeter(
            cfg.rails, jtop_factory=jtop_factory, clock=clock, sample_interval_s=max(interval, 0.5)
        )
    if kind == "rapl":
        # Counters, not samples: poll only often enough to never miss a wraparound.
        return RaplMeter(
            sys_root=sys_root,
            clock=clock,
            sample_interval_s=max(interval, 1.0),
            read_text=read_text,
        )
    if kind == "estimated":
        return EstimatedMeter(cfg.estimated_watts, cfg.idle_watts, clock=clock)
    raise ValueError(f"unknown meter kind {kind!r}")


def detect_meter(
    config: MeterConfig | None = None,
    *,
    sys_root: Path | str = "/sys",
    nvml: Any | None = None,
    which: Which = shutil.which,
    clock: Clock = time.monotonic,
    read_text: ReadText = read_text_file,
    popen: PopenFactory = subprocess.Popen,
    jtop_factory: JtopFactory | None = None,
) -> EnergyMeter:
    """The configured meter, probed (raises :class:`MeterError` with the reason when it cannot
    work), or with ``kind="auto"`` the first meter in :data:`AUTO_ORDER` that yields real data.
    The meter is returned probed but not started: use it as a context manager."""
    cfg = config or MeterConfig()

    def build(kind: str) -> EnergyMeter:
        return build_meter(
            kind,
            cfg,
            sys_root=sys_root,
            nvml=nvml,
            which=which,
            clock=clock,
            read_text=read_text,
            popen=popen,
            jtop_factory=jtop_factory,
        )

    if cfg.kind != "auto":
        meter = build(cfg.kind)
        try:
            meter.probe()
        except MeterError as e:
            meter.close()
            logger.error("energy meter %s unavailable: %s", cfg.kind, e)
            raise
        logger.info("energy meter (configured): %s", meter.describe())
        return meter

    skipped: dict[str, str] = {}
    for kind in AUTO_ORDER:
        meter = build(kind)
        try:
            meter.probe()
        except MeterError as e:
            meter.close()
            skipped[kind] = str(e)
            if isinstance(meter, RaplMeter) and meter.permission_hint is not None:
                logger.warning("energy meter rapl skipped: %s", e)
            else:
                logger.info("energy meter %s skipped: %s", kind, e)
            continue
        meter.skipped = skipped
        if meter.estimated:
            logger.warning("no readable power sensor; energy is ESTIMATED: %s", meter.describe())
        else:
            logger.info("energy meter (auto): %s", meter.describe())
        return meter
    raise AssertionError("the estimated meter always probes")  # pragma: no cover
