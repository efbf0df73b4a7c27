"""Speculative next step: decode the expert's own likeliest token while the coordinator decides.

Every fused token costs an agent decode, a round trip through the broker and the coordinator's
work, in series. After replying with its distribution for position t, an idle agent decodes
its own most likely token at t (one batched decode for every such session) and keeps the
logits: when the coordinator's step brings that token (a *hit*) the reply goes out at once,
with the same distribution a decode would give -- and the next speculation starts; with
another token (a *miss*) the speculative token is removed from the session's KV cache
(llama.cpp's sequence remove on the memory) and the chosen one decoded, as without speculation.

A miss wastes a decode, so a session is speculated on only when the expert's own top
probability is at least ``speculate_min_p`` (0 turns speculation off) and never past the
context, on an end token, for a text-mode session (those follow bytes, see
:mod:`.textmode`), or when the coordinator says the expert weighs too little for its guess to
be the fused token (``StepItem.speculate``). Hits, misses and the wasted decode time and
joules are counted (:class:`SpecStats`): they go to telemetry and, per session, into each
step's distribution, whose energy includes the waste. Real work always goes first: the daemon
speculates only when its queue is empty, one batched decode at a time.

Runs in the engine thread, like every decode.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from moe2.agent.engine import DecodeJob, Engine, EngineError
from moe2.agent.metered import metered_decode
from moe2.agent.meters import EnergyMeter
from moe2.agent.sessions import Session, SessionTable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Speculated:
    """A session's speculative decode: its token (at position ``n_past``), the logits after
    it, and what the decode cost (the batch's time, the session's share of its energy)."""

    session: Session
    token: int
    logits: npt.NDArray[np.float32]
    latency_s: float
    energy_j: float


@dataclass
class SpecStats:
    hits: int = 0
    misses: int = 0
    wasted_s: float = 0.0
    wasted_j: float = 0.0


@dataclass(frozen=True)
class Outcome:
    """What a step found: ``hit`` (its logits are ready) or a miss (its waste)."""

    hit: Speculated | None = None
    missed: Speculated | None = None


NO_SPECULATION = Outcome()


def top_token(probs: npt.NDArray[np.floating[Any]], ids: npt.NDArray[np.int32] | None
              ) -> tuple[int, float]:
    """The expert's likeliest token and its probability, from a reply's distribution (ids
    sorted by probability; None = the full vocabulary in id order)."""
    if ids is None:
        i = int(np.argmax(probs))
        return i, float(probs[i])
    return int(ids[0]), float(probs[0])


class Speculator:
    def __init__(self, engine: Engine, meter: EnergyMeter, table: SessionTable,
                 clock: Callable[[], float], min_p: float) -> None:
        self.engine = engine
        self.meter = meter
        self.table = table
        self.clock = clock
        self.min_p = min_p
        self.stats = SpecStats()
        self._eog = frozenset(engine.info.eog_ids) | {engine.info.eos_id}
        self._ready: dict[str, tuple[int, float]] = {}  # session -> (top token, its p)
        self.spec: dict[str, Speculated] = {}  # session -> its speculative decode

    @property
    def enabled(self) -> bool:
        return self.min_p > 0.0

    def offer(self, s: Session, token: int, p: float) -> None:
        """After a reply: this session may be speculated on with ``token``."""
        if not self.enabled or s.text_mode or not s.speculate or token in self._eog \
                or p < self.min_p \
                or s.n_past + 1 >= self.table.n_ctx:
            self._ready.pop(s.session_id, None)
            return
        self._ready[s.session_id] = (token, p)

    def pending(self) -> bool:
        """Some session waits for a speculative decode."""
        return bool(self._ready)

    def round(self) -> int:
        """One batched speculative decode of every offered session still idle; how many."""
        work: list[tuple[Session, int]] = []
        for sid, (token, _p) in list(self._ready.items()):
            del self._ready[sid]
            s = self.table.sessions.get(sid)
            if s is None or s.busy or s.pending or sid in self.spec:
                continue
            work.append((s, token))
        if not work:
            return 0
        jobs = [DecodeJob(s.seq_id, [t], s.n_past) for s, t in work]
        try:
            out = metered_decode(self.engine, self.meter, self.clock, jobs)
        except EngineError as exc:  # the real step will decode: nothing is lost
            log.warning("speculative decode failed: %s", exc)
            for s, _t in work:
                self.engine.remove_from(s.seq_id, s.n_past)
            return 0
        share = out.energy_j / len(work)
        for (s, token), lg in zip(work, out.logits, strict=True):
            self.spec[s.session_id] = Speculated(s, token, lg, out.latency_s, share)
        for sid in [sid for sid, sp in self.spec.items()  # closed since: nothing to keep
                    if self.table.sessions.get(sid) is not sp.session]:
            del self.spec[sid]
        return len(work)

    def resolve(self, s: Session, token: int) -> Outcome:
        """A step of ``s`` brings ``token``: its speculation is a hit, or removed (a miss)."""
        self._ready.pop(s.session_id, None)
        sp = self.spec.pop(s.session_id, None)
        if sp is None or sp.session is not s:  # none, or a closed session's of the same name
            return Outcome()
        if sp.token == token:
            self.stats.hits += 1
            return Outcome(hit=sp)
        self.engine.remove_from(s.seq_id, s.n_past)
        self.stats.misses += 1
        self.stats.wasted_s += sp.latency_s
        self.stats.wasted_j += sp.energy_j
        return Outcome(missed=sp)

    def forget(self, session_id: str) -> None:
        """The session closed (its KV sequence is freed with it): a speculation it still held
        was decoded for nothing -- wasted, like a miss's (every request's last one, when the
        coordinator closes instead of stepping)."""
        self._ready.pop(session_id, None)
        sp = self.spec.pop(session_id, None)
        if sp is not None:
            self.stats.wasted_s += sp.latency_s
            self.stats.wasted_j += sp.energy_j
