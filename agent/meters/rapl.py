"""CPU package energy from Intel/AMD RAPL powercap counters.

``/sys/class/powercap/intel-rapl:N/energy_uj`` is a per-package counter in microjoules that wraps
at ``max_energy_range_uj``. Subzones (``intel-rapl:N:M``: core, uncore, dram) are parts of the
package and are not added. Since CVE-2020-8694 (PLATYPUS) ``energy_uj`` is readable only by
root; our udev rule gives group ``moe2`` read access.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from moe2.agent.meters.base import (
    Clock,
    CounterDelta,
    MeterError,
    PollingMeter,
    ReadText,
    WindowedRate,
    read_text_file,
    read_thermal_c,
)

logger = logging.getLogger(__name__)

RAPL_UDEV_RULE = "systemd/99-moe2-rapl.rules"

_DOMAIN_RE = re.compile(r"intel-rapl:\d+")


def rapl_permission_message(path: Path | str) -> str:
    """The operator's fix for an unreadable ``energy_uj``."""
    return (
        f"permission denied reading {path}: RAPL energy counters are root-only since "
        f"CVE-2020-8694. Install the udev rule shipped as {RAPL_UDEV_RULE} "
        "(copy it to /etc/udev/rules.d/99-moe2-rapl.rules, add the agent's user to group moe2, "
        "then run `sudo udevadm control --reload && sudo udevadm trigger "
        "--subsystem-match=powercap`), or run the agent as root"
    )


@dataclass
class _Domain:
    name: str
    energy_path: Path
    counter: CounterDelta


class RaplMeter(PollingMeter):
    """Sum of the RAPL package domains, wraparound handled per domain."""

    kind = "rapl"

    def __init__(
        self,
        *,
        sys_root: Path | str = "/sys",
        clock: Clock = time.monotonic,
        sample_interval_s: float | None = 1.0,
        read_text: ReadText = read_text_file,
        power_window_s: float = 0.05,
    ) -> None:
        super().__init__(clock=clock, sample_interval_s=sample_interval_s)
        self._sys_root = Path(sys_root)
        self._read_text = read_text
        self._domains: list[_Domain] = []
        self._rate = WindowedRate(power_window_s)
        self.permission_hint: str | None = None
        """The udev fix, set when a counter was unreadable for lack of permission."""

    @property
    def domains(self) -> tuple[str, ...]:
        """Names of the domains summed (after :meth:`probe`), e.g. ``package-0``."""
        return tuple(d.name for d in self._domains)

    def _read_uj(self, path: Path) -> int:
        try:
            return int(self._read_text(path).strip())
        except PermissionError as e:
            self.permission_hint = rapl_permission_message(path)
            raise MeterError(self.permission_hint) from e
        except (OSError, ValueError) as e:
            raise MeterError(f"cannot read {path}: {e}") from e

    def probe(self) -> None:
        if self._domains:
            return
        base = self._sys_root / "class" / "powercap"
        top = [d for d in sorted(base.glob("intel-rapl:*")) if _DOMAIN_RE.fullmatch(d.name)]
        if not top:
            raise MeterError(f"no RAPL package domains under {base}")
        named: list[tuple[str, Path]] = []
        for d in top:
            try:
                name = self._read_text(d / "name").strip()
            except OSError:
                name = d.name
            named.append((name, d))
        # psys (platform) already contains the packages: use package domains when there are any.
        packages = [(n, d) for n, d in named if n.startswith("package")] or named
        domains: list[_Domain] = []
        for name, d in packages:
            first = self._read_uj(d / "energy_uj")
            range_uj = self._read_uj(d / "max_energy_range_uj")
            domains.append(_Domain(name, d / "energy_uj", CounterDelta(first, range_uj)))
        self._domains = domains

    def _open(self, now_s: float) -> None:
        for d in self._domains:  # baseline at start, not at probe
            d.counter = CounterDelta(self._read_uj(d.energy_path), d.counter.range_)
        self._energy_j = 0.0
        self._rate.update(now_s, 0.0)

    def _sample(self, now_s: float) -> None:
        total_uj = sum(d.counter.update(self._read_uj(d.energy_path)) for d in self._domains)
        self._energy_j = total_uj / 1e6
        self._power_w = self._rate.update(now_s, self._energy_j)

    def temperature_c(self) -> float | None:
        return read_thermal_c(self._sys_root, self._read_text)

    def describe(self) -> str:
        names = ", ".join(self.domains) or "(not probed)"
        return f"rapl: RAPL energy counters under {self._sys_root}/class/powercap ({names})"
