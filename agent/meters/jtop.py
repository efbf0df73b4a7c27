"""Jetson board power through jetson-stats (``jtop``), an opt-in alternative (``kind = "jtop"``).

``jtop`` talks to the ``jtop.service`` daemon; ``jetson.power`` is
``{"rail": {name: {"power": mW, ...}}, "tot": {"power": mW, ...}}``. We choose rails with the
same rule as the other Jetson meters rather than trusting ``tot`` (which sums sub-rails on some
boards).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from moe2.agent.meters.base import (
    Clock,
    MeterError,
    PollingMeter,
    PowerIntegrator,
    pick_temperature_c,
)
from moe2.agent.meters.rails import total_power_w

logger = logging.getLogger(__name__)

JtopFactory = Callable[[], Any]


def _default_factory(interval_s: float) -> JtopFactory:
    try:
        from jtop import jtop
    except ImportError as e:
        raise MeterError("jetson-stats is not installed (pip install 'moe2[jetson]')") from e

    def make() -> Any:
        return jtop(interval=interval_s)

    return make


def jtop_power_w(power: Any, rails: Sequence[str] = ()) -> float:
    """Board watts from a ``jetson.power`` dict."""
    rail_dict = (power.get("rail") or {}) if isinstance(power, dict) else {}
    rail_w = {
        name: float(values["power"]) / 1000.0
        for name, values in rail_dict.items()
        if isinstance(values, dict) and "power" in values
    }
    if rail_w or rails:
        return total_power_w(rail_w, rails)
    try:
        return float(power["tot"]["power"]) / 1000.0
    except (KeyError, TypeError, ValueError) as e:
        raise MeterError(f"jtop reports no power: {power!r}") from e


class JtopMeter(PollingMeter):
    """Integrated board power from jetson-stats; ``jtop_factory`` builds the jtop object."""

    kind = "jtop"

    def __init__(
        self,
        rails: Sequence[str] = (),
        *,
        jtop_factory: JtopFactory | None = None,
        clock: Clock = time.monotonic,
        sample_interval_s: float | None = 0.5,
    ) -> None:
        super().__init__(clock=clock, sample_interval_s=sample_interval_s)
        self._rails = tuple(rails)
        self._factory = jtop_factory
        self._jetson: Any = None
        self._integrator = PowerIntegrator()

    def probe(self) -> None:
        if self._jetson is not None:
            return
        factory = self._factory or _default_factory(self._interval_s or 0.5)
        jetson = factory()
        try:
            jetson.start()
        except Exception as e:  # jtop raises its own JtopException (service not running)
            raise MeterError(f"jtop failed to start (is jtop.service running?): {e}") from e
        self._jetson = jetson
        jtop_power_w(jetson.power, self._rails)

    def _open(self, now_s: float) -> None:
        self._sample(now_s)

    def _sample(self, now_s: float) -> None:
        self._integrator.add(now_s, jtop_power_w(self._jetson.power, self._rails))
        self._energy_j = self._integrator.energy_j
        self._power_w = self._integrator.power_w

    def _release(self) -> None:
        jetson, self._jetson = self._jetson, None
        if jetson is not None:
            try:
                jetson.close()
            except Exception as e:  # noqa: BLE001 - best effort on shutdown; jtop has its own errors
                logger.debug("jtop close failed: %s", e)

    def temperature_c(self) -> float | None:
        with self._lock:
            jetson = self._jetson
            if jetson is None:
                return None
            temps: dict[str, float] = {}
            for name, value in dict(jetson.temperature).items():
                if isinstance(value, dict):
                    if value.get("online", True) and "temp" in value:
                        temps[str(name)] = float(value["temp"])
                elif isinstance(value, int | float):
                    temps[str(name)] = float(value)
            return pick_temperature_c(temps)

    def describe(self) -> str:
        rails = " + ".join(self._rails) if self._rails else "auto-selected rails"
        return f"jtop: jetson-stats power, {rails}"
