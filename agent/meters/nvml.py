"""NVIDIA GPU energy through NVML (package ``nvidia-ml-py``, import name ``pynvml``).

Volta and newer expose a total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``, mJ);
older boards only report power (``nvmlDeviceGetPowerUsage``, mW), which we integrate. On Jetson
NVML initialises but answers NotSupported to both, so :meth:`NvmlMeter.probe` demands real data.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

from moe2.agent.meters.base import (
    Clock,
    CounterDelta,
    MeterError,
    PollingMeter,
    PowerIntegrator,
    WindowedRate,
)

logger = logging.getLogger(__name__)

NvmlMode = Literal["auto", "energy", "power"]


def _import_pynvml() -> Any:
    try:
        import pynvml
    except ImportError as e:
        raise MeterError("nvidia-ml-py is not installed (pip install 'moe2[agent]')") from e
    return pynvml


class NvmlMeter(PollingMeter):
    """GPU energy: the total-energy counter where supported (``kind`` ``nvml-energy``), else
    integrated power samples (``nvml-power``). ``nvml`` is the module object (``pynvml`` or a
    test fake with the same functions and ``NVMLError``)."""

    kind = "nvml"

    def __init__(
        self,
        gpu_index: int = 0,
        *,
        nvml: Any | None = None,
        mode: NvmlMode = "auto",
        clock: Clock = time.monotonic,
        sample_interval_s: float | None = 0.1,
        power_window_s: float = 0.05,
    ) -> None:
        super().__init__(clock=clock, sample_interval_s=sample_interval_s)
        self._gpu_index = gpu_index
        self._nvml_arg = nvml
        self._nvml: Any = None
        self._mode: NvmlMode = mode
        self._handle: Any = None
        self._initialised = False
        self._probed = False
        self._has_energy = False
        self._has_power = False
        self._name = ""
        self._counter: CounterDelta | None = None
        self._integrator = PowerIntegrator()
        self._rate = WindowedRate(power_window_s)

    def _errors(self) -> tuple[type[BaseException], ...]:
        err = getattr(self._nvml, "NVMLError", None)
        if isinstance(err, type) and issubclass(err, BaseException):
            return (err, OSError)
        return (OSError,)

    def _energy_mj(self) -> int:
        return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))

    def _power_mw(self) -> float:
        return float(self._nvml.nvmlDeviceGetPowerUsage(self._handle))

    def probe(self) -> None:
        if self._probed:
            return
        self._nvml = self._nvml_arg if self._nvml_arg is not None else _import_pynvml()
        errors = self._errors()
        try:
            self._nvml.nvmlInit()
        except errors as e:
            raise MeterError(f"NVML init failed: {e}") from e
        self._initialised = True
        try:
            self._handle = self._nvml.nvmlDeviceGetHandleByIndex(self._gpu_index)
        except errors as e:
            raise MeterError(f"NVML has no GPU {self._gpu_index}: {e}") from e
        reasons: list[str] = []
        if self._mode in ("auto", "energy"):
            try:
                self._energy_mj()
                self._has_energy = True
            except errors as e:
                reasons.append(f"total-energy counter: {e}")
        try:
            self._power_mw()
            self._has_power = True
        except errors as e:
            reasons.append(f"power usage: {e}")
        if self._mode == "energy" and not self._has_energy:
            raise MeterError(f"NVML GPU {self._gpu_index} has no energy counter ({reasons[0]})")
        if not (self._has_energy or self._has_power):
            raise MeterError(
                f"NVML initialised but GPU {self._gpu_index} returns no energy or power data "
                f"({'; '.join(reasons)}); on Jetson use the ina3221 or tegrastats meter"
            )
        self.kind = "nvml-energy" if self._has_energy and self._mode != "power" else "nvml-power"
        errors_or_attr: tuple[type[BaseException], ...] = (*errors, AttributeError)
        try:
            name = self._nvml.nvmlDeviceGetName(self._handle)
            self._name = name.decode() if isinstance(name, bytes) else str(name)
        except errors_or_attr:
            self._name = ""
        self._probed = True

    @property
    def uses_energy_counter(self) -> bool:
        return self.kind == "nvml-energy"

    def _open(self, now_s: float) -> None:
        if self.uses_energy_counter:
            self._counter = CounterDelta(self._energy_mj())
            self._rate.update(now_s, 0.0)
        self._sample(now_s)

    def _sample(self, now_s: float) -> None:
        if self._counter is not None:
            self._energy_j = self._counter.update(self._energy_mj()) / 1000.0
            if self._has_power:
                self._power_w = self._power_mw() / 1000.0
            else:
                self._power_w = self._rate.update(now_s, self._energy_j)
        else:
            self._integrator.add(now_s, self._power_mw() / 1000.0)
            self._energy_j = self._integrator.energy_j
            self._power_w = self._integrator.power_w

    def _release(self) -> None:
        if self._initialised:
            self._initialised = False
            try:
                self._nvml.nvmlShutdown()
            except self._errors() as e:
                logger.debug("nvmlShutdown failed: %s", e)

    def temperature_c(self) -> float | None:
        with self._lock:
            if not self._initialised or self._handle is None:
                return None
            errors: tuple[type[BaseException], ...] = (*self._errors(), AttributeError)
            try:
                gpu_sensor = getattr(self._nvml, "NVML_TEMPERATURE_GPU", 0)
                return float(self._nvml.nvmlDeviceGetTemperature(self._handle, gpu_sensor))
            except errors:
                return None

    def describe(self) -> str:
        name = f" ({self._name})" if self._name else ""
        method = (
            "total-energy counter (mJ)" if self.uses_energy_counter else "integrated power (mW)"
        )
        return f"{self.kind}: NVIDIA GPU {self._gpu_index}{name}, {method}"
