"""Energy meters: tegrastats parsing, fake sysfs trees (INA3221, RAPL), a fake NVML module,
the estimate, the replay fakes and auto-detection. No hardware, no timing assertions."""

from __future__ import annotations

import itertools
import logging
import os
import re
import stat
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from moe2.agent.meters import (
    AGX_ORIN_RAILS,
    EnergyMeter,
    EstimatedMeter,
    FakeMeter,
    Ina3221Meter,
    JtopMeter,
    ManualClock,
    ManualMeter,
    MeterConfig,
    MeterError,
    NvmlMeter,
    RaplMeter,
    ReplayMeter,
    TegrastatsMeter,
    detect_meter,
    find_ina3221_channels,
    jtop_power_w,
    parse_tegrastats_line,
    pick_temperature_c,
    read_text_file,
    read_thermal_c,
    select_total_rails,
    total_power_w,
)


def _fixture_dir() -> Path:
    """Real tegrastats output: a copy inside the repo if there is one, else the shared one."""
    candidates = [
        Path(__file__).resolve().parent.parent / "fixtures" / "tegrastats",
        Path("/work/shared/fixtures/tegrastats"),
    ]
    return next((c for c in candidates if c.is_dir()), candidates[0])


FIXTURES = _fixture_dir()
FIXTURE_FILES = sorted(FIXTURES.glob("*.txt"))
_DATE_LINE = re.compile(r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun) \w{3} +\d+ [\d:]+ \w+ \d{4}$")

JP7_LINE = (
    "11-27-2025 10:00:00 RAM 3000/125772MB (lfb 2x4MB) SWAP 0/62886MB (cached 0MB) "
    "CPU [1%@1728,0%@1728,off,off] GR3D_FREQ 0% cpu@52.968C/52.968C soc2@48.5C/49.1C "
    "tj@53.5C/54.0C VDD_GPU_SOC 5139mW/5139mW/5139mW VDD_CPU_CV 1000mW/900mW/1200mW "
    "VIN_SYS_5V0 4000mW/4000mW/4000mW"
)
NON_ROOT_LINE = (
    "RAM 2448/62840MB (lfb 2x4MB) SWAP 0/31420MB (cached 0MB) CPU [0%@2201,3%@2201] "
    "GR3D_FREQ 7% cpu@42C gpu@37.75C tj@42C VDD_IN 5000mW/4500mW VDD_CPU_GPU_CV 800mW/700mW"
)
IRREGULAR_LINE = (
    "RAM   1000/7000MB  (lfb 5x4MB)    CPU [1%@100,off]      EMC_FREQ 3%@1600   "
    "GR3D_FREQ   5%@[305,305]   NVENC      off   APE        174     tj@50.5C   "
    "VDD_IN    4000mW/3000mW     VDD_SOC  1000mW/900mW   "
)


def _fixture_lines() -> list[tuple[str, int, str]]:
    out = []
    for path in FIXTURE_FILES:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            out.append((path.name, n, line))
    return out


def _is_tegrastats(line: str) -> bool:
    """Independent of the parser: fixture lines are comments, dates, blanks or tegrastats."""
    text = line.strip()
    return bool(text) and not text.startswith("#") and not _DATE_LINE.match(text)


# ---------------------------------------------------------------------------------------------
# tegrastats parser


def test_fixture_files_present() -> None:
    assert len(FIXTURE_FILES) == 3
    assert sum(1 for _ in _fixture_lines() if _is_tegrastats(_[2])) >= 18


@pytest.mark.parametrize(
    ("name", "number", "line"),
    _fixture_lines(),
    ids=[f"{n}:{i}" for n, i, _ in _fixture_lines()],
)
def test_every_fixture_line(name: str, number: int, line: str) -> None:
    sample = parse_tegrastats_line(line)
    if not _is_tegrastats(line):
        assert sample is None
        return
    assert sample is not None, f"{name}:{number} not parsed"
    assert sample.rails_mw, f"{name}:{number} has no rails"
    assert sample.power_w() > 0
    assert sample.ram_used_mb is not None
    assert sample.ram_total_mb is not None
    assert 0 < sample.ram_used_mb < sample.ram_total_mb
    assert sample.cpu_pct
    assert sample.gr3d_pct is not None
    assert sample.temps_c
    temp = sample.temperature_c()
    assert temp is not None
    assert 20 < temp < 100


def _datadog(constant: str) -> str:
    for line in (FIXTURES / "tegrastats_datadog_jetson_test_samples.txt").read_text().splitlines():
        name, sep, rest = line.partition("\t")
        if sep and name == constant:
            return rest
    raise KeyError(constant)


@pytest.mark.parametrize(
    ("constant", "rails", "watts"),
    [
        ("tx1Sample", ("VDD_IN",), 2.532),
        ("tx2Sample", ("VDD_IN",), 3.056),
        ("nanoSample", ("POM_5V_IN",), 1.022),
        ("xavierNxSample", ("VDD_IN",), 4.067),
        ("voltageUnitSample", ("VDD_IN",), 5.299),
        ("r36Sample", AGX_ORIN_RAILS, 3.205 + 4.405 + 4.767),
        ("orinSample", AGX_ORIN_RAILS, 4.940 + 0.988 + 4.442),
        # AGX Xavier has no input rail: an unknown board sums every rail.
        ("agXSample", ("GPU", "CPU", "SOC", "CV", "VDDRQ", "SYS5V"), 3.346),
    ],
)
def test_total_power_per_board(constant: str, rails: tuple[str, ...], watts: float) -> None:
    line = _datadog(constant)
    sample = parse_tegrastats_line(line)
    assert sample is not None
    assert select_total_rails(sample.rails_mw) == rails
    assert sample.power_w() == pytest.approx(watts)
    # The constant's name before the tab does not matter either way.
    assert parse_tegrastats_line(f"{constant}\t{line}") == sample


def test_jetpack4_values_and_fields() -> None:
    sample = parse_tegrastats_line(_datadog("tx1Sample"))
    assert sample is not None
    assert sample.rails_mw["VDD_IN"] == (2532.0, 2698.0)
    assert sample.rails_mw["VDD_CPU"] == (76.0, 178.0)
    assert "IRAM" not in sample.rails_mw
    assert "RAM" not in sample.rails_mw
    assert sample.temps_c["PMIC"] == 100.0  # parsed, but never the representative one
    assert sample.temperature_c() == 42.75  # Tdiode
    assert sample.gr3d_pct == 0.0
    assert sample.gr3d_freq_mhz == 76.0
    assert sample.emc_pct == 7.0
    assert sample.ram_used_mb == 1179
    assert sample.ram_total_mb == 3983
    assert sample.cpu_pct == (1.0, 4.0, 0.0, 0.0)


def test_r36_irregular_spaces_and_gr3d_list() -> None:
    sample = parse_tegrastats_line(_datadog("r36Sample"))
    assert sample is not None
    assert set(sample.rails_mw) == set(AGX_ORIN_RAILS)
    assert sample.gr3d_freq_mhz == 305.0
    assert sample.temps_c["tj"] == 53.062
    assert sample.temperature_c() == 53.062  # tj preferred
    assert sample.swap_used_mb == 4915


def test_offline_cores() -> None:
    sample = parse_tegrastats_line(_datadog("tx2Sample"))
    assert sample is not None
    assert sample.cpu_pct == (1.0, None, None, 1.0, 0.0, 2.0)


def test_jetpack7_three_values() -> None:
    sample = parse_tegrastats_line(JP7_LINE)
    assert sample is not None
    assert sample.rails_mw == {
        "VDD_GPU_SOC": (5139.0, 5139.0),
        "VDD_CPU_CV": (1000.0, 900.0),
        "VIN_SYS_5V0": (4000.0, 4000.0),
    }
    assert sample.power_w() == pytest.approx(10.139)
    assert sample.temps_c == {"cpu": 52.968, "soc2": 48.5, "tj": 53.5}
    assert sample.cpu_pct == (1.0, 0.0, None, None)
    assert sample.gr3d_pct == 0.0
    assert sample.gr3d_freq_mhz is None


def test_non_root_line() -> None:
    sample = parse_tegrastats_line(NON_ROOT_LINE)
    assert sample is not None
    assert sample.emc_pct is None
    assert sample.gr3d_pct == 7.0
    assert sample.gr3d_freq_mhz is None
    assert sample.rails_mw["VDD_IN"] == (5000.0, 4500.0)
    assert sample.power_w() == pytest.approx(5.0)


def test_irregular_spaces() -> None:
    sample = parse_tegrastats_line(IRREGULAR_LINE)
    assert sample is not None
    assert sample.ram_used_mb == 1000
    assert sample.rails_mw == {"VDD_IN": (4000.0, 3000.0), "VDD_SOC": (1000.0, 900.0)}
    assert sample.gr3d_pct == 5.0
    assert sample.gr3d_freq_mhz == 305.0
    assert sample.emc_pct == 3.0
    assert sample.temps_c == {"tj": 50.5}
    assert sample.power_w() == pytest.approx(4.0)


@pytest.mark.parametrize(
    "line",
    [
        "",
        "   ",
        "Tue Jan 26 18:22:31 UTC 2021",
        "# comment RAM",
        "tegrastats: command not found",
        "IRAM 0/252kB(lfb 252kB) VDD_IN 100/100",
    ],
)
def test_not_tegrastats(line: str) -> None:
    assert parse_tegrastats_line(line) is None


def test_line_without_rails_has_no_power() -> None:
    sample = parse_tegrastats_line("RAM 100/1000MB CPU [1%@100] GR3D_FREQ 0%")
    assert sample is not None
    assert not sample.rails_mw
    with pytest.raises(MeterError, match="no power rails"):
        sample.power_w()


def test_rail_selection_rules() -> None:
    assert select_total_rails(["VDD_CPU", "VDD_IN"]) == ("VDD_IN",)
    assert select_total_rails(["POM_5V_GPU", "POM_5V_IN"]) == ("POM_5V_IN",)
    assert select_total_rails([*AGX_ORIN_RAILS, "VDDQ_VDD2_1V8AO"]) == AGX_ORIN_RAILS
    assert select_total_rails(["A", "B"]) == ("A", "B")
    assert select_total_rails(["VDD_IN", "VDD_SOC"], ["vdd_soc"]) == ("VDD_SOC",)
    with pytest.raises(MeterError, match="VDD_GPU not found"):
        select_total_rails(["VDD_IN"], ["VDD_GPU"])
    assert total_power_w({"VDD_IN": 5.0, "VDD_SOC": 1.0}) == 5.0
    assert total_power_w({"VDD_IN": 5.0, "VDD_SOC": 1.0}, ["VDD_IN", "VDD_SOC"]) == 6.0


def test_pick_temperature() -> None:
    assert pick_temperature_c({}) is None
    assert pick_temperature_c({"PMIC": 100.0, "GPU": -256.0}) is None
    assert pick_temperature_c({"CPU": 40.0, "GPU": 45.0, "PMIC": 100.0}) == 45.0
    assert pick_temperature_c({"CPU": 60.0, "tj-thermal": 55.0}) == 55.0


# ---------------------------------------------------------------------------------------------
# tegrastats meter


def test_tegrastats_meter_feed_integrates_over_clock() -> None:
    clock = ManualClock()
    meter = TegrastatsMeter(clock=clock)
    assert meter.estimated is False
    assert meter.kind == "tegrastats"
    assert meter.feed("Tue Jan 26 18:22:31 UTC 2021") is None
    assert meter.feed(NON_ROOT_LINE) is not None  # 5 W at t=0
    assert meter.read_energy_j() == 0.0
    clock.advance(2.0)
    meter.feed(IRREGULAR_LINE)  # 4 W at t=2
    assert meter.read_energy_j() == pytest.approx((5.0 + 4.0) / 2 * 2.0)
    assert meter.read_power_w() == pytest.approx(4.0)
    assert meter.samples == 2
    assert meter.temperature_c() == 50.5
    assert "tegrastats" in meter.describe()


def test_tegrastats_meter_configured_rails_and_bad_lines(caplog: pytest.LogCaptureFixture) -> None:
    clock = ManualClock()
    meter = TegrastatsMeter(["VDD_SOC"], clock=clock)
    meter.feed(IRREGULAR_LINE)  # VDD_SOC 1 W
    clock.advance(1.0)
    meter.feed(IRREGULAR_LINE)
    assert meter.read_energy_j() == pytest.approx(1.0)
    with caplog.at_level(logging.WARNING):
        meter.feed(NON_ROOT_LINE)  # no VDD_SOC rail: skipped, not integrated
    assert meter.samples == 2
    assert "VDD_SOC not found" in caplog.text


def _write_script(path: Path, body: str) -> Path:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.mark.skipif(sys.platform == "win32", reason="needs /bin/sh")
def test_tegrastats_meter_subprocess(tmp_path: Path) -> None:
    source = FIXTURES / "tegrastats_ssaraff98_sample_log_tx2_head.txt"
    exe = _write_script(tmp_path / "tegrastats", f'cat "{source}"; echo "args $*" >&2')
    ticks = itertools.count()
    meter = TegrastatsMeter(
        clock=lambda: float(next(ticks)), executable=str(exe), which=lambda _: None
    )
    with meter:
        assert meter.wait_for_samples(6, timeout_s=30.0)
    assert meter.closed
    expected = [parse_tegrastats_line(line) for line in source.read_text().splitlines()]
    watts = [s.power_w() for s in expected if s is not None]
    assert len(watts) == 6
    trapezoids = sum((a + b) / 2 for a, b in itertools.pairwise(watts))
    assert meter.read_energy_j() == pytest.approx(trapezoids)


def test_tegrastats_probe_needs_binary() -> None:
    meter = TegrastatsMeter(which=lambda _: None, executable="tegrastats-not-here")
    with pytest.raises(MeterError, match="not found on PATH"):
        meter.probe()
    meter.close()


# ---------------------------------------------------------------------------------------------
# fake sysfs trees


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def _ina_channel(d: Path, n: int, label: str, mv: int, ma: int) -> None:
    _write(d / f"in{n}_label", label)
    _write(d / f"in{n}_input", str(mv))
    _write(d / f"curr{n}_input", str(ma))


def make_orin_nx_tree(root: Path) -> Path:
    """Orin NX: one ina3221 with VDD_IN; plus an unrelated hwmon that also has labels."""
    other = root / "class/hwmon/hwmon0"
    _write(other / "name", "nct6775")
    _ina_channel(other, 1, "VDD_IN", 12000, 9999)  # must be ignored: not an ina3221
    ina = root / "class/hwmon/hwmon1"
    _write(ina / "name", "ina3221")
    _ina_channel(ina, 1, "VDD_IN", 5000, 1000)  # 5 W
    _ina_channel(ina, 2, "VDD_CPU_GPU_CV", 5000, 200)  # 1 W
    _ina_channel(ina, 3, "VDD_SOC", 5000, 300)  # 1.5 W
    _write(ina / "in7_label", "sum of shunt voltages")
    _write(ina / "in7_input", "40")
    _write(ina / "curr4_input", "1500")
    for n, (kind, milli_c) in enumerate([("cpu-thermal", 41000), ("tj-thermal", 43500)]):
        _write(root / f"class/thermal/thermal_zone{n}/type", kind)
        _write(root / f"class/thermal/thermal_zone{n}/temp", str(milli_c))
    return ina


def make_agx_orin_tree(root: Path) -> Path:
    """AGX Orin: two ina3221 devices under the i2c driver, linked from /sys/class/hwmon."""
    drv = root / "bus/i2c/drivers/ina3221"
    a = drv / "1-0040/hwmon/hwmon3"
    _write(a / "name", "ina3221")
    _ina_channel(a, 1, "VDD_GPU_SOC", 5000, 600)  # 3 W
    _ina_channel(a, 2, "VDD_CPU_CV", 5000, 400)  # 2 W
    _ina_channel(a, 3, "VIN_SYS_5V0", 5000, 1000)  # 5 W
    b = drv / "1-0041/hwmon/hwmon4"
    _write(b / "name", "ina3221")
    _ina_channel(b, 1, "NC", 0, 0)
    _ina_channel(b, 2, "VDDQ_VDD2_1V8AO", 1800, 500)  # 0.9 W, a sub-rail
    (root / "class/hwmon").mkdir(parents=True, exist_ok=True)
    os.symlink(a, root / "class/hwmon/hwmon3")
    os.symlink(b, root / "class/hwmon/hwmon4")
    _write(root / "class/hwmon/hwmon0/name", "acpitz")
    return a


def test_ina3221_discovery_orin_nx(tmp_path: Path) -> None:
    make_orin_nx_tree(tmp_path)
    channels = find_ina3221_channels(tmp_path)
    assert [c.label for c in channels] == ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"]
    assert channels[0].read_power_w() == pytest.approx(5.0)


def test_ina3221_discovery_agx_orin_dedupes_links(tmp_path: Path) -> None:
    make_agx_orin_tree(tmp_path)
    labels = [c.label for c in find_ina3221_channels(tmp_path)]
    assert labels == ["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO"]


def test_ina3221_meter_integrates_vdd_in(tmp_path: Path) -> None:
    ina = make_orin_nx_tree(tmp_path)
    clock = ManualClock(100.0)
    meter = Ina3221Meter(sys_root=tmp_path, clock=clock, sample_interval_s=None)
    with pytest.raises(MeterError, match="not started"):
        meter.read_energy_j()
    with meter:
        assert meter.rails == ("VDD_IN",)
        assert meter.read_power_w() == pytest.approx(5.0)
        assert meter.read_energy_j() == 0.0
        clock.advance(2.0)
        _write(ina / "curr1_input", "2000")  # 10 W
        assert meter.read_energy_j() == pytest.approx((5.0 + 10.0) / 2 * 2.0)
        assert meter.read_power_w() == pytest.approx(10.0)
        clock.advance(1.0)
        meter.sample()
        assert meter.read_energy_j() == pytest.approx(15.0 + 10.0)
        assert meter.temperature_c() == 43.5
        assert "VDD_IN" in meter.describe()
    final = meter.read_energy_j()
    clock.advance(5.0)
    assert meter.read_energy_j() == final  # closed: frozen


def test_ina3221_meter_agx_orin_sum_and_configured_rails(tmp_path: Path) -> None:
    make_agx_orin_tree(tmp_path)
    with Ina3221Meter(sys_root=tmp_path, clock=ManualClock(), sample_interval_s=None) as meter:
        assert meter.rails == AGX_ORIN_RAILS
        assert meter.read_power_w() == pytest.approx(10.0)
    configured = Ina3221Meter(
        ["VDD_GPU_SOC"], sys_root=tmp_path, clock=ManualClock(), sample_interval_s=None
    )
    with configured:
        assert configured.read_power_w() == pytest.approx(3.0)
    missing = Ina3221Meter(["VDD_IN"], sys_root=tmp_path, sample_interval_s=None)
    with pytest.raises(MeterError, match="VDD_IN not found"):
        missing.probe()


def test_ina3221_absent(tmp_path: Path) -> None:
    _write(tmp_path / "class/hwmon/hwmon0/name", "coretemp")
    with pytest.raises(MeterError, match="no INA3221"):
        Ina3221Meter(sys_root=tmp_path).probe()


def test_ina3221_sampler_thread_stops(tmp_path: Path) -> None:
    make_orin_nx_tree(tmp_path)
    meter = Ina3221Meter(sys_root=tmp_path, sample_interval_s=0.001)
    with meter:
        assert any(t.name == "moe2-meter-ina3221" for t in threading.enumerate())
    assert not any(t.name == "moe2-meter-ina3221" for t in threading.enumerate())
    meter.close()  # idempotent
    with pytest.raises(MeterError, match="closed"):
        meter.start()


def test_thermal_zones_skip_pmic_and_sentinels(tmp_path: Path) -> None:
    for n, (kind, milli_c) in enumerate(
        [("PMIC-Die", 100000), ("GPU-therm", -256000), ("CPU-therm", 38500)]
    ):
        _write(tmp_path / f"class/thermal/thermal_zone{n}/type", kind)
        _write(tmp_path / f"class/thermal/thermal_zone{n}/temp", str(milli_c))
    assert read_thermal_c(tmp_path) == 38.5
    assert read_thermal_c(tmp_path / "nothing") is None


def make_rapl_tree(root: Path, uj: tuple[int, int] = (900_000, 5_000_000)) -> Path:
    cap = root / "class/powercap"
    for n, (name, value, range_uj) in enumerate(
        [("package-0", uj[0], 1_000_000), ("package-1", uj[1], 10_000_000)]
    ):
        d = cap / f"intel-rapl:{n}"
        _write(d / "name", name)
        _write(d / "energy_uj", str(value))
        _write(d / "max_energy_range_uj", str(range_uj))
        sub = cap / f"intel-rapl:{n}:0"  # core subzone: part of the package, never added
        _write(sub / "name", "core")
        _write(sub / "energy_uj", "123456789")
        _write(sub / "max_energy_range_uj", "262143328850")
    _write(cap / "intel-rapl/enabled", "1")  # the control type's own dir
    return cap


def test_rapl_sums_packages_and_handles_wraparound(tmp_path: Path) -> None:
    cap = make_rapl_tree(tmp_path)
    clock = ManualClock()
    meter = RaplMeter(sys_root=tmp_path, clock=clock, sample_interval_s=None)
    with meter:
        assert meter.domains == ("package-0", "package-1")
        assert meter.read_energy_j() == 0.0
        clock.advance(1.0)
        _write(cap / "intel-rapl:0/energy_uj", "100000")  # wrapped: +200000 uJ
        _write(cap / "intel-rapl:0:0/energy_uj", "1")  # subzone change is ignored
        _write(cap / "intel-rapl:1/energy_uj", "5300000")  # +300000 uJ
        assert meter.read_energy_j() == pytest.approx(0.5)
        assert meter.read_power_w() == pytest.approx(0.5)
        clock.advance(2.0)
        _write(cap / "intel-rapl:0/energy_uj", "600000")  # +500000
        assert meter.read_energy_j() == pytest.approx(1.0)
        assert meter.read_power_w() == pytest.approx(0.25)
        assert "package-0" in meter.describe()


def test_rapl_skips_psys_when_packages_exist(tmp_path: Path) -> None:
    cap = make_rapl_tree(tmp_path)
    _write(cap / "intel-rapl:2/name", "psys")
    _write(cap / "intel-rapl:2/energy_uj", "7")
    _write(cap / "intel-rapl:2/max_energy_range_uj", "262143328850")
    meter = RaplMeter(sys_root=tmp_path)
    meter.probe()
    assert meter.domains == ("package-0", "package-1")
    meter.close()


def _denying(path_part: str) -> Callable[[Path], str]:
    def read(path: Path) -> str:
        if path.name == path_part:
            raise PermissionError(13, "Permission denied", str(path))
        return read_text_file(path)

    return read


def test_rapl_permission_denied_message(tmp_path: Path) -> None:
    make_rapl_tree(tmp_path)
    meter = RaplMeter(sys_root=tmp_path, read_text=_denying("energy_uj"))
    with pytest.raises(MeterError) as info:
        meter.probe()
    message = str(info.value)
    assert "CVE-2020-8694" in message
    assert "systemd/99-moe2-rapl.rules" in message
    assert "udevadm trigger" in message
    assert "intel-rapl:0/energy_uj" in message
    assert meter.permission_hint == message


def test_rapl_absent(tmp_path: Path) -> None:
    with pytest.raises(MeterError, match="no RAPL package domains"):
        RaplMeter(sys_root=tmp_path).probe()


# ---------------------------------------------------------------------------------------------
# NVML with a fake module


class FakeNvmlError(Exception):
    pass


class FakeNotSupportedError(FakeNvmlError):
    pass


class FakeNvml:
    """Stands in for the ``pynvml`` module: only what the meter calls."""

    NVMLError = FakeNvmlError
    NVMLError_NotSupported = FakeNotSupportedError
    NVML_TEMPERATURE_GPU = 0

    def __init__(
        self,
        *,
        energy: bool = True,
        power: bool = True,
        init_ok: bool = True,
        gpus: int = 1,
    ) -> None:
        self.energy, self.power, self.init_ok, self.gpus = energy, power, init_ok, gpus
        self.energy_mj = 1_000_000
        self.power_mw = 250_000
        self.inits = 0
        self.shutdowns = 0

    def nvmlInit(self) -> None:  # noqa: N802  (pynvml names)
        if not self.init_ok:
            raise FakeNvmlError("NVML Shared Library Not Found")
        self.inits += 1

    def nvmlShutdown(self) -> None:  # noqa: N802  (pynvml names)
        self.shutdowns += 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802  (pynvml names)
        if index >= self.gpus:
            raise FakeNvmlError("Invalid Argument")
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes:  # noqa: N802  (pynvml names)
        return b"Fake GPU"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:  # noqa: N802  (pynvml names)
        if not self.energy:
            raise FakeNotSupportedError("Not Supported")
        return self.energy_mj

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:  # noqa: N802  (pynvml names)
        if not self.power:
            raise FakeNotSupportedError("Not Supported")
        return self.power_mw

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:  # noqa: N802  (pynvml names)
        return 61


def test_nvml_energy_counter() -> None:
    nvml = FakeNvml()
    clock = ManualClock()
    meter = NvmlMeter(0, nvml=nvml, clock=clock, sample_interval_s=None)
    with meter:
        assert meter.kind == "nvml-energy"
        assert not meter.estimated
        assert meter.read_energy_j() == 0.0
        nvml.energy_mj += 5_000
        assert meter.read_energy_j() == pytest.approx(5.0)
        assert meter.read_power_w() == pytest.approx(250.0)
        assert meter.temperature_c() == 61.0
        assert "Fake GPU" in meter.describe()
        assert "total-energy" in meter.describe()
        nvml.energy_mj = 10  # driver reload resets the counter: no negative step
        assert meter.read_energy_j() == pytest.approx(5.0)
    assert nvml.shutdowns == 1
    assert meter.temperature_c() is None


def test_nvml_energy_counter_without_power_derives_watts() -> None:
    nvml = FakeNvml(power=False)
    clock = ManualClock()
    with NvmlMeter(nvml=nvml, clock=clock, sample_interval_s=None) as meter:
        assert meter.kind == "nvml-energy"
        clock.advance(2.0)
        nvml.energy_mj += 300_000
        assert meter.read_power_w() == pytest.approx(150.0)


def test_nvml_power_integration_when_energy_not_supported() -> None:
    nvml = FakeNvml(energy=False)
    clock = ManualClock()
    meter = NvmlMeter(nvml=nvml, clock=clock, sample_interval_s=None)
    with meter:
        assert meter.kind == "nvml-power"
        nvml.power_mw = 100_000
        clock.advance(1.0)
        meter.sample()  # what the sampler thread does
        clock.advance(1.0)
        nvml.power_mw = 200_000
        # t=0: 250 W (baseline), t=1: 100 W, t=2: 200 W
        assert meter.read_energy_j() == pytest.approx((250 + 100) / 2 + (100 + 200) / 2)
        assert meter.read_power_w() == pytest.approx(200.0)
        assert "integrated power" in meter.describe()


def test_nvml_forced_power_mode() -> None:
    with NvmlMeter(nvml=FakeNvml(), mode="power", sample_interval_s=None) as meter:
        assert meter.kind == "nvml-power"


def test_nvml_jetson_not_supported() -> None:
    nvml = FakeNvml(energy=False, power=False)
    meter = NvmlMeter(nvml=nvml)
    with pytest.raises(MeterError, match="no energy or power data"):
        meter.probe()
    meter.close()
    assert nvml.inits == 1
    assert nvml.shutdowns == 1


def test_nvml_init_failure_and_missing_gpu() -> None:
    with pytest.raises(MeterError, match="NVML init failed"):
        NvmlMeter(nvml=FakeNvml(init_ok=False)).probe()
    with pytest.raises(MeterError, match="no GPU 3"):
        NvmlMeter(3, nvml=FakeNvml()).probe()


# ---------------------------------------------------------------------------------------------
# estimated, manual and replay meters


def test_estimated_meter_busy_time() -> None:
    clock = ManualClock()
    meter = EstimatedMeter(busy_power_w=10.0, clock=clock)
    assert meter.estimated is True
    assert meter.kind == "estimated"
    assert "estimated" in meter.describe()
    clock.advance(5.0)  # idle costs nothing by default
    assert meter.read_energy_j() == 0.0
    with meter.busy():
        assert meter.read_power_w() == 10.0
        clock.advance(2.0)
        assert meter.read_energy_j() == pytest.approx(20.0)
        with meter.busy():  # nested: counted once
            clock.advance(1.0)
    assert meter.read_power_w() == 0.0
    assert meter.busy_s() == pytest.approx(3.0)
    meter.add_busy(1.5)
    assert meter.read_energy_j() == pytest.approx(45.0)
    with pytest.raises(ValueError, match=">= 0"):
        meter.add_busy(-1.0)


def test_estimated_meter_idle_power() -> None:
    clock = ManualClock()
    meter = EstimatedMeter(busy_power_w=20.0, idle_power_w=2.0, clock=clock)
    clock.advance(10.0)
    meter.add_busy(4.0)
    assert meter.read_energy_j() == pytest.approx(20.0 * 4 + 2.0 * 6)
    readings = []
    for _ in range(3):
        meter.add_busy(5.0)  # more busy than elapsed: still never decreasing
        readings.append(meter.read_energy_j())
    assert readings == sorted(readings)
    with pytest.raises(ValueError, match="exceeds"):
        EstimatedMeter(busy_power_w=1.0, idle_power_w=2.0)


def test_manual_meter() -> None:
    meter = ManualMeter("nvml-energy", energy_j=1.0)
    assert FakeMeter is ManualMeter
    with meter as m:
        assert m.started
        assert m.start_calls == 1
        m.start()
        assert m.start_calls == 1
        m.set(energy_j=3.0, power_w=7.0, temperature_c=50.0)
        m.add_energy(1.0)
        assert (m.read_energy_j(), m.read_power_w(), m.temperature_c()) == (4.0, 7.0, 50.0)
        with pytest.raises(ValueError, match="went down"):
            m.set(energy_j=2.0)
    assert meter.closed


def test_replay_meter() -> None:
    clock = ManualClock(50.0)
    meter = ReplayMeter(
        [(10.0, 100.0, 0.0), (11.0, 110.0, 10.0), (13.0, 130.0, 12.0)], clock=clock, kind="rapl"
    )
    assert meter.kind == "rapl"
    assert (meter.read_energy_j(), meter.read_power_w()) == (0.0, 0.0)
    clock.advance(0.5)
    assert meter.read_energy_j() == pytest.approx(5.0)
    clock.advance(1.5)
    assert meter.read_energy_j() == pytest.approx(20.0)
    assert meter.read_power_w() == 10.0
    clock.advance(100.0)
    assert meter.read_energy_j() == pytest.approx(30.0)
    assert meter.read_power_w() == 12.0
    with pytest.raises(ValueError, match="non-decreasing"):
        ReplayMeter([(0.0, 5.0, 1.0), (1.0, 4.0, 1.0)], clock=clock)


# ---------------------------------------------------------------------------------------------
# jtop with a fake jtop object


class FakeJtop:
    def __init__(self) -> None:
        self.power: dict[str, object] = {
            "rail": {"VDD_IN": {"power": 6000, "avg": 5000}, "VDD_SOC": {"power": 1000}},
            "tot": {"power": 7000},
        }
        self.temperature = {
            "cpu": {"temp": 45.0, "online": True},
            "gpu": {"temp": -256.0, "online": False},
        }
        self.closed = False

    def start(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_jtop_meter() -> None:
    fake = FakeJtop()
    clock = ManualClock()
    meter = JtopMeter(jtop_factory=lambda: fake, clock=clock, sample_interval_s=None)
    with meter:
        assert meter.read_power_w() == pytest.approx(6.0)  # VDD_IN, not the summed 'tot'
        clock.advance(1.0)
        assert meter.read_energy_j() == pytest.approx(6.0)
        assert meter.temperature_c() == 45.0
    assert fake.closed
    assert jtop_power_w({"tot": {"power": 3000}}) == 3.0


# ---------------------------------------------------------------------------------------------
# detection


def _no_tegrastats(_: str) -> str | None:
    return None


def _detect(tmp_path: Path, **kwargs: object) -> EnergyMeter:
    defaults: dict[str, object] = {
        "sys_root": tmp_path,
        "nvml": FakeNvml(init_ok=False),
        "which": _no_tegrastats,
        "clock": ManualClock(),
    }
    defaults.update(kwargs)
    return detect_meter(**defaults)  # type: ignore[arg-type]


def test_detect_prefers_nvml(tmp_path: Path) -> None:
    make_orin_nx_tree(tmp_path)
    meter = _detect(tmp_path, nvml=FakeNvml())
    assert meter.kind == "nvml-energy"
    assert meter.skipped == {}
    meter.close()


def test_detect_jetson_nvml_not_supported_falls_to_ina3221(tmp_path: Path) -> None:
    make_orin_nx_tree(tmp_path)
    nvml = FakeNvml(energy=False, power=False)
    meter = _detect(tmp_path, nvml=nvml, which=lambda _: "/usr/bin/tegrastats")
    assert meter.kind == "ina3221"
    assert "no energy or power data" in meter.skipped["nvml"]
    assert nvml.shutdowns == 1
    meter.close()


def test_detect_tegrastats_then_rapl_then_estimated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_rapl_tree(tmp_path)
    meter = _detect(tmp_path, which=lambda name: f"/usr/bin/{name}")
    assert meter.kind == "tegrastats"
    assert set(meter.skipped) == {"nvml", "ina3221"}

    meter = _detect(tmp_path)
    assert meter.kind == "rapl"

    with caplog.at_level(logging.INFO, logger="moe2.agent.meters"):
        meter = _detect(tmp_path, read_text=_denying("energy_uj"))
    assert meter.kind == "estimated"
    assert meter.estimated
    assert set(meter.skipped) == {"nvml", "ina3221", "tegrastats", "rapl"}
    assert "udevadm trigger" in meter.skipped["rapl"]
    assert "99-moe2-rapl.rules" in caplog.text
    assert "ESTIMATED" in caplog.text


def test_detect_estimated_uses_config(tmp_path: Path) -> None:
    config = MeterConfig(estimated_watts=25.0, idle_watts=5.0)
    meter = _detect(tmp_path, config=config)
    assert isinstance(meter, EstimatedMeter)
    assert (meter.busy_power_w, meter.idle_power_w) == (25.0, 5.0)


def test_detect_explicit_kinds(tmp_path: Path) -> None:
    make_rapl_tree(tmp_path)
    meter = _detect(tmp_path, config=MeterConfig(kind="rapl"))
    assert isinstance(meter, RaplMeter)
    with pytest.raises(MeterError, match="udevadm trigger"):
        _detect(tmp_path, config=MeterConfig(kind="rapl"), read_text=_denying("energy_uj"))
    with pytest.raises(MeterError, match="no INA3221"):
        _detect(tmp_path, config=MeterConfig(kind="ina3221"))
    with pytest.raises(MeterError, match="no energy counter"):
        _detect(tmp_path, config=MeterConfig(kind="nvml-energy"), nvml=FakeNvml(energy=False))
    meter = _detect(tmp_path, config=MeterConfig(kind="nvml-power"), nvml=FakeNvml())
    assert meter.kind == "nvml-power"
    meter.close()
    meter = _detect(tmp_path, config=MeterConfig(kind="estimated"), nvml=FakeNvml())
    assert meter.kind == "estimated"
    meter = _detect(tmp_path, config=MeterConfig(kind="jtop"), jtop_factory=FakeJtop)
    assert meter.kind == "jtop"
    meter.close()


@dataclass(frozen=True)
class _Section:
    kind: str = "ina3221"
    estimated_watts: float = 12.0
    idle_watts: float = 1.0
    gpu_index: int = 1
    rails: tuple[str, ...] = ("VDD_IN",)
    sample_interval_s: float = 0.5


def test_meter_config() -> None:
    config = MeterConfig.from_section(_Section())
    assert config == MeterConfig("ina3221", 12.0, 1.0, 1, ("VDD_IN",), 0.5)
    with pytest.raises(ValueError, match="unknown meter kind"):
        MeterConfig(kind="powermeter")
    with pytest.raises(ValueError, match="idle_watts"):
        MeterConfig(estimated_watts=1.0, idle_watts=2.0)
    with pytest.raises(ValueError, match="sample_interval_s"):
        MeterConfig(sample_interval_s=0.0)
