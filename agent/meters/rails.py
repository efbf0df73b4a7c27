"""Which Jetson power rails add up to the board's input power.

INA3221 monitors and ``tegrastats`` report several rails; some are the board input, others are
sub-rails of it. Summing them all double counts on boards that have an input rail.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from moe2.agent.meters.base import MeterError

INPUT_RAILS: tuple[str, ...] = ("VDD_IN", "POM_5V_IN")
"""Rails that measure the whole module input (Orin NX/Nano, Xavier NX, TX1/TX2: ``VDD_IN``;
Nano: ``POM_5V_IN``). The first one present wins."""

AGX_ORIN_RAILS: tuple[str, ...] = ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0")
"""AGX Orin has no input rail; its total is the sum of these three."""


def select_total_rails(available: Iterable[str], configured: Sequence[str] = ()) -> tuple[str, ...]:
    """The rails whose sum is the board's total power.

    ``configured`` (matched case-insensitively) wins; otherwise the first of
    :data:`INPUT_RAILS`, else :data:`AGX_ORIN_RAILS` when all are present, else every rail
    (an unknown board). Raises :class:`MeterError` for a configured rail that is absent or
    when there are no rails at all.
    """
    names = list(dict.fromkeys(available))
    if not names:
        raise MeterError("no power rails found")
    by_upper = {n.upper(): n for n in names}
    if configured:
        missing = [r for r in configured if r.upper() not in by_upper]
        if missing:
            raise MeterError(
                f"configured rail(s) {', '.join(missing)} not found; available: {', '.join(names)}"
            )
        return tuple(by_upper[r.upper()] for r in dict.fromkeys(configured))
    for rail in INPUT_RAILS:
        if rail in by_upper:
            return (by_upper[rail],)
    if all(r in by_upper for r in AGX_ORIN_RAILS):
        return tuple(by_upper[r] for r in AGX_ORIN_RAILS)
    return tuple(names)


def total_power_w(rail_power_w: Mapping[str, float], rails: Sequence[str] = ()) -> float:
    """Watts of the board: the sum of the rails chosen by :func:`select_total_rails`."""
    return sum(rail_power_w[r] for r in select_total_rails(rail_power_w, rails))
