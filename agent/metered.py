"""One decode call with what it cost: the meter's energy delta and the wall time over it.

Every decode of the agent (steps, text-mode steps, speculation) goes through
:func:`metered_decode`, so the energy shared among sessions is measured the same way
everywhere; the estimated meter counts the call as busy time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from moe2.agent.engine import DecodeJob, Engine
from moe2.agent.meters import EnergyMeter, EstimatedMeter


@dataclass(frozen=True)
class Decoded:
    logits: list[npt.NDArray[np.float32]]
    energy_j: float
    latency_s: float


def metered_decode(engine: Engine, meter: EnergyMeter, clock: Callable[[], float],
                   jobs: Sequence[DecodeJob]) -> Decoded:
    """``engine.decode(jobs)`` (raises :class:`~moe2.agent.engine.EngineError`) measured."""
    e0 = meter.read_energy_j()
    t0 = clock()
    with (meter.busy() if isinstance(meter, EstimatedMeter) else contextlib.nullcontext()):
        logits = engine.decode(jobs)
    return Decoded(logits, max(0.0, meter.read_energy_j() - e0), clock() - t0)
