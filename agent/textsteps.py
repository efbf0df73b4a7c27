"""Text-mode steps in the agent daemon: the effects around :mod:`moe2.agent.textmode`.

Runs in the engine thread, like every decode (the daemon calls :meth:`TextSteps.round` with
the text-mode steps of a batch, one per session a round, after its token steps).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from moe2.agent.engine import DecodeJob, Engine, EngineError, softmax_topk
from moe2.agent.metered import metered_decode
from moe2.agent.meters import EnergyMeter
from moe2.agent.sessions import Session, SessionTable
from moe2.agent.stats import AgentStats
from moe2.agent.textmode import (
    COMMIT_EXACT_MASS,
    Healed,
    PieceIndex,
    TextModeError,
    heal,
    plan_append,
)
from moe2.shared import wire

log = logging.getLogger(__name__)


@dataclass
class TextJob:
    """A text-mode step (see agent.textmode): bytes to follow, with the coordinator's hint."""

    work_index: int
    session: Session
    append: bytes
    hint: int | None
    seq: int
    k: int


class TextSteps:
    def __init__(self, agent_id: str, engine: Engine, meter: EnergyMeter, table: SessionTable,
                 stats: AgentStats, clock: Callable[[], float]) -> None:
        self.agent_id = agent_id
        self.engine = engine
        self.meter = meter
        self.table = table
        self.stats = stats
        self.clock = clock
        self._piece_index: PieceIndex | None = None
        self._dummy_space: bool | None = None

    @property
    def piece_index(self) -> PieceIndex:
        """Sorted token texts (built on the first text-mode step: ~0.3 s at 152k tokens)."""
        if self._piece_index is None:
            self._piece_index = PieceIndex(self.engine.info.pieces)
        return self._piece_index

    def _tokenize_mid(self, text: str) -> list[int]:
        """Tokens for ``text`` in the middle of a text: no BOS, and no SentencePiece dummy
        space (tokenised after a newline anchor, whose own tokens are cut off)."""
        eng = self.engine
        if self._dummy_space is None:
            probe = eng.tokenize("a", add_bos=False, parse_special=False)
            self._dummy_space = b"".join(eng.info.pieces[t] for t in probe).startswith(b" ")
        if not self._dummy_space:
            return eng.tokenize(text, add_bos=False, parse_special=False)
        anchor = eng.tokenize("\n", add_bos=False, parse_special=False)
        toks = eng.tokenize("\n" + text, add_bos=False, parse_special=False)
        if toks[:len(anchor)] == anchor:
            return toks[len(anchor):]
        return eng.tokenize(text, add_bos=False, parse_special=False)  # checked by spell()

    def context(self, s: Session) -> wire.SessionContext:
        pieces = self.engine.info.pieces
        return wire.SessionContext(
            session_id=s.session_id, prompt=b"".join(pieces[t] for t in s.tokens[:s.n_prompt]),
            answer=b"".join(pieces[t] for t in s.tokens[s.n_prompt:]),
            pending=s.pending_bytes, tokens=len(s.tokens))

    def round(self, jobs: list[TextJob], dists: list[list[wire.Distribution]],
                    errors: list[list[wire.ErrorItem]]) -> None:
        """Follow the emitted bytes (agent.textmode): commit what is settled -- one batched
        decode -- hold the rest, commit a pending token the expert is sure of (a second
        batched decode at most), and reply with each session's healed distribution."""
        index = self.piece_index
        plans: dict[int, list[int]] = {}
        live: list[TextJob] = []
        for tj in jobs:
            s = tj.session
            s.pending -= 1  # admitted as one token; the plan says how many it really is
            try:
                plan = plan_append(s.pending_bytes, tj.append, tj.hint, index,
                                   self._tokenize_mid)
            except TextModeError as exc:
                self._fail(tj, wire.ErrorCode.BAD_TOKEN, str(exc), errors)
                continue
            if s.n_past + len(plan.commit) >= self.table.n_ctx:
                self._fail(tj, wire.ErrorCode.CONTEXT_FULL,
                                f"session {s.session_id!r} reached the context of "
                                f"{self.table.n_ctx}", errors)
                continue
            s.pending_bytes = plan.pending
            plans[id(tj)] = list(plan.commit)
            live.append(tj)
        energy_j, latency_s, evaluated = self._decode(
            [(tj, plans[id(tj)]) for tj in live], errors)
        # a pending token the expert is sure of is committed now (its word ends there)
        second: list[tuple[TextJob, list[int]]] = []
        healed: dict[str, Healed | None] = {}
        for tj in live:
            s = tj.session
            if s.session_id not in self.table.sessions or s.last_logits is None:
                continue
            if not s.pending_bytes:
                healed[s.session_id] = None
                continue
            h = heal(s.last_logits, s.pending_bytes, index, tj.k)
            if h.exact_id is not None and h.exact_mass >= COMMIT_EXACT_MASS:
                s.pending_bytes = b""
                second.append((tj, [h.exact_id]))
                healed[s.session_id] = None
            else:
                healed[s.session_id] = h
        if second:
            e2, l2, ev2 = self._decode(second, errors)
            energy_j, latency_s = energy_j + e2, latency_s + l2
            for sid, n in ev2.items():
                evaluated[sid] = evaluated.get(sid, 0) + n
        for tj in live:
            s = tj.session
            if s.session_id not in self.table.sessions or s.session_id not in healed:
                continue
            s.last_seq = max(s.last_seq, tj.seq)
            s.busy = False
            conditioned = healed[s.session_id]
            probs: npt.NDArray[np.floating[Any]]
            if conditioned is None:
                ids, probs, rest = softmax_topk(s.last_logits, tj.k)
            else:
                ids, probs, rest = conditioned.ids, conditioned.probs, conditioned.rest
            dists[tj.work_index].append(wire.Distribution(
                session_id=s.session_id, seq=tj.seq, probs=wire.Distribution.pack_probs(probs),
                ids=(b"" if ids is None else wire.Distribution.pack_ids(ids)), rest_mass=rest,
                n_past=s.n_past, n_evaluated=evaluated.get(s.session_id, 0),
                energy_j=energy_j / max(1, len(live)), latency_s=latency_s,
                pending=s.pending_bytes))
            if evaluated.get(s.session_id):
                self.stats.record_step(latency_s, s.n_past)
        self.stats.record_tokens(len(live))

    def _decode(self, work: list[tuple[TextJob, list[int]]],
                     errors: list[list[wire.ErrorItem]]) -> tuple[float, float, dict[str, int]]:
        """Decode each session's committed tokens in one batch; (energy J, latency s, tokens
        evaluated per session)."""
        todo = [(tj, toks) for tj, toks in work if toks]
        if not todo:
            return 0.0, 0.0, {}
        jobs = [DecodeJob(tj.session.seq_id, toks, tj.session.n_past) for tj, toks in todo]
        try:
            out = metered_decode(self.engine, self.meter, self.clock, jobs)
        except EngineError as exc:
            log.error("agent %s: decode failed: %s", self.agent_id, exc)
            for tj, _toks in todo:
                self._fail(tj, wire.ErrorCode.INTERNAL, f"decode failed: {exc}", errors)
            return 0.0, 0.0, {}
        evaluated: dict[str, int] = {}
        for (tj, toks), lg in zip(todo, out.logits, strict=True):
            s = tj.session
            s.tokens.extend(toks)
            s.n_past += len(toks)
            s.last_logits = lg
            evaluated[s.session_id] = len(toks)
        return out.energy_j, out.latency_s, evaluated

    def _fail(self, tj: TextJob, code: wire.ErrorCode, message: str,
                   errors: list[list[wire.ErrorItem]]) -> None:
        s = tj.session
        errors[tj.work_index].append(wire.ErrorItem(code=code, message=message,
                                                    session_id=s.session_id, seq=tj.seq))
        if self.table.close(s.session_id) is not None:
            self.engine.free(s.seq_id)

