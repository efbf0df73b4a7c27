"""Energy meters for the agent: cumulative joules, instantaneous watts, and how they were measured.

Implementations: NVML (energy counter or integrated power), Jetson INA3221 hwmon sysfs,
``tegrastats`` lines, jetson-stats (``jtop``), Intel/AMD RAPL, and an estimate from busy time.
:func:`detect_meter` picks one; :class:`ReplayMeter` and :class:`ManualMeter` serve tests.
"""

from moe2.agent.meters.base import (
    Clock,
    EnergyMeter,
    MeterError,
    PollingMeter,
    PowerIntegrator,
    ReadText,
    pick_temperature_c,
    read_text_file,
    read_thermal_c,
)
from moe2.agent.meters.detect import (
    AUTO_ORDER,
    METER_KINDS,
    MeterConfig,
    build_meter,
    detect_meter,
)
from moe2.agent.meters.estimated import EstimatedMeter
from moe2.agent.meters.fakes import FakeMeter, ManualClock, ManualMeter, ReplayMeter
from moe2.agent.meters.ina3221 import Ina3221Channel, Ina3221Meter, find_ina3221_channels
from moe2.agent.meters.jtop import JtopMeter, jtop_power_w
from moe2.agent.meters.nvml import NvmlMeter
from moe2.agent.meters.rails import AGX_ORIN_RAILS, INPUT_RAILS, select_total_rails, total_power_w
from moe2.agent.meters.rapl import RAPL_UDEV_RULE, RaplMeter, rapl_permission_message
from moe2.agent.meters.tegrastats import (
    TegrastatsMeter,
    TegrastatsSample,
    parse_tegrastats_line,
    tegrastats_total_power_w,
)

__all__ = [
    "AGX_ORIN_RAILS",
    "AUTO_ORDER",
    "INPUT_RAILS",
    "METER_KINDS",
    "RAPL_UDEV_RULE",
    "Clock",
    "EnergyMeter",
    "EstimatedMeter",
    "FakeMeter",
    "Ina3221Channel",
    "Ina3221Meter",
    "JtopMeter",
    "ManualClock",
    "ManualMeter",
    "MeterConfig",
    "MeterError",
    "NvmlMeter",
    "PollingMeter",
    "PowerIntegrator",
    "RaplMeter",
    "ReadText",
    "ReplayMeter",
    "TegrastatsMeter",
    "TegrastatsSample",
    "build_meter",
    "detect_meter",
    "find_ina3221_channels",
    "jtop_power_w",
    "parse_tegrastats_line",
    "pick_temperature_c",
    "rapl_permission_message",
    "read_text_file",
    "read_thermal_c",
    "select_total_rails",
    "tegrastats_total_power_w",
    "total_power_w",
]
