"""A live view of the fleet from retained status, telemetry and vocab messages.

``apply(state, event) -> state`` is pure: the coordinator's receive loop turns MQTT messages into
events and swaps in the new state. Offline agents leave the view. Experts are grouped into
vocabulary *families* by fingerprint; a request only ever fuses experts of one family.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from moe2.shared import wire

#: vocabularies cached at most: a flood of forged vocab messages must not grow memory without
#: bound (a family no online agent uses is forgotten first; its agent republishes on reconnect)
MAX_VOCABS = 64


@dataclass(frozen=True)
class AgentView:
    status: wire.AgentStatus
    telemetry: wire.Telemetry | None = None
    seen_s: float = 0.0

    @property
    def agent_id(self) -> str:
        return self.status.agent_id

    @property
    def family(self) -> str:
        return self.status.vocab_fp

    def step_latency_s(self) -> float | None:
        t = self.telemetry
        if t is None or not (0.0 < t.step_latency_s < math.inf):  # NaN fails too
            return None
        return t.step_latency_s


@dataclass(frozen=True)
class FamilyVocab:
    """One vocabulary family's token texts and end-of-generation ids (from an agent's Vocab)."""

    pieces: tuple[bytes, ...]
    eog_ids: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Registry:
    agents: Mapping[str, AgentView] = field(default_factory=dict)
    vocabs: Mapping[str, FamilyVocab] = field(default_factory=dict)  # fingerprint -> vocabulary
    version: int = 0  # bumps on membership changes (join/leave), for replanning

    def online(self) -> list[AgentView]:
        return sorted(self.agents.values(), key=lambda a: a.agent_id)

    def families(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for a in self.online():
            out.setdefault(a.family, []).append(a.agent_id)
        return out

    def pieces(self, family: str) -> tuple[bytes, ...] | None:
        v = self.vocabs.get(family)
        return None if v is None else v.pieces

    def eog_ids(self, family: str) -> frozenset[int]:
        """The family's end tokens, with every member's own EOS."""
        v = self.vocabs.get(family)
        own = {a.status.eos_id for a in self.agents.values()
               if a.family == family and a.status.eos_id >= 0}
        return (v.eog_ids if v is not None else frozenset()) | own


@dataclass(frozen=True)
class StatusEvent:
    status: wire.AgentStatus
    now_s: float


@dataclass(frozen=True)
class TelemetryEvent:
    telemetry: wire.Telemetry
    now_s: float


@dataclass(frozen=True)
class VocabEvent:
    vocab: wire.Vocab


@dataclass(frozen=True)
class GoneEvent:
    """An agent cleared its retained status (empty payload) or was deemed lost."""

    agent_id: str


Event = StatusEvent | TelemetryEvent | VocabEvent | GoneEvent


def apply(state: Registry, event: Event) -> Registry:
    if isinstance(event, StatusEvent):
        st = event.status
        if st.state == "offline":
            return _remove(state, st.agent_id)
        old = state.agents.get(st.agent_id)
        view = AgentView(st, old.telemetry if old else None, event.now_s)
        agents = {**state.agents, st.agent_id: view}
        joined = old is None or old.status.vocab_fp != st.vocab_fp
        return replace(state, agents=agents, version=state.version + (1 if joined else 0))
    if isinstance(event, TelemetryEvent):
        t = event.telemetry
        old = state.agents.get(t.agent_id)
        if old is None:
            return state  # telemetry of an agent we have no status for: ignore
        return replace(state, agents={**state.agents,
                                      t.agent_id: replace(old, telemetry=t, seen_s=event.now_s)})
    if isinstance(event, VocabEvent):
        v = event.vocab
        if v.vocab_fp in state.vocabs:
            return state
        vocabs = dict(state.vocabs)
        if len(vocabs) >= MAX_VOCABS:  # bounded: forget families no online agent uses
            used = {a.family for a in state.agents.values()}
            vocabs = {fp: fv for fp, fv in vocabs.items() if fp in used}
            if len(vocabs) >= MAX_VOCABS:
                return state
        vocabs[v.vocab_fp] = FamilyVocab(
            tuple(v.pieces), frozenset(t for t in v.eog_ids if 0 <= t < len(v.pieces)))
        return replace(state, vocabs=vocabs)
    return _remove(state, event.agent_id)


def _remove(state: Registry, agent_id: str) -> Registry:
    if agent_id not in state.agents:
        return state
    agents = {k: v for k, v in state.agents.items() if k != agent_id}
    return replace(state, agents=agents, version=state.version + 1)


def choose_family(
    state: Registry, allowed: Sequence[str] | None, gates: Mapping[str, float]
) -> tuple[str, list[str]] | None:
    """The vocabulary family to use for one request, and its usable members.

    Members must be online, in ``allowed`` (the plan's set; None = everyone), and have their
    vocab known. The family with the most gate weight wins; ties go to the larger family, then
    the fingerprint order (deterministic).
    """
    best: tuple[float, int, str, list[str]] | None = None
    for fp, members in sorted(state.families().items()):
        if fp not in state.vocabs:
            continue
        usable = [m for m in members if allowed is None or m in allowed]
        if not usable:
            continue
        score = sum(gates.get(m, 0.0) for m in usable)
        key = (score, len(usable))
        if best is None or key > (best[0], best[1]):
            best = (score, len(usable), fp, usable)
    if best is None:
        return None
    return best[2], best[3]
