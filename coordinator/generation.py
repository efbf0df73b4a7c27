"""One phone request, end to end: gate, choose experts, open sessions, fused step loop, final.

The runner gathers inputs (distributions over MQTT through :class:`AgentRpc`) and calls the pure
pieces (:mod:`fusion`, :mod:`registry`, :mod:`textstream`); it emits token chunks and exactly one
final or error message through the injected ``emit`` coroutine, whatever happens -- including
cancellation at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from moe2.coordinator.fusion import ExpertDist, Fused, mix, renormalise, sample, top_k_weights
from moe2.coordinator.registry import Registry, choose_family
from moe2.coordinator.rpc import AgentRpc, RpcError
from moe2.coordinator.textstream import TextStream
from moe2.coordinator.xfusion import MAX_CANDIDATES, FamilyStep, FamilyVocabView
from moe2.coordinator.xfusion import choose as xchoose
from moe2.shared import wire
from moe2.shared.utf8 import utf8_tail

log = logging.getLogger(__name__)

Emit = Callable[[wire.TokenChunk | wire.FinalReply | wire.ErrorReplyPhone], Awaitable[None]]


class RequestFailed(Exception):
    def __init__(self, code: wire.ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


#: the text path's step observer: (request id, step, [(candidate text or None = the end,
#: score)], the chosen text or None at the end)
TextObserver = Callable[[str, int, Sequence[tuple[bytes | None, float]], bytes | None], None]


@dataclass
class ExpertState:
    agent_id: str
    weight: float
    session_id: str
    active: bool = True
    tokens: int = 0
    energy_j: float = 0.0
    reason: str | None = None
    n_past: int = 0
    n_ctx: int = 0
    spec_hits: int = 0
    spec_misses: int = 0
    spec_wasted_j: float = 0.0


@dataclass(frozen=True)
class GenerationSettings:
    dist_k: int = 64
    top_k: int | None = None
    unknown_expert_weight: float = 0.0
    step_deadline_min_s: float = 2.0
    step_deadline_factor: float = 20.0
    step_deadline_max_s: float = 30.0
    open_deadline_s: float = 30.0
    #: "auto": ids within one vocabulary family, texts across families (:mod:`.xfusion`);
    #: "token": one family per request, the others left out; "text": texts always
    fusion: Literal["auto", "token", "text"] = "auto"


@dataclass
class RequestContext:
    """What the runner reads from the coordinator (injected; tests pass plain values)."""

    rpc: AgentRpc
    registry: Callable[[], Registry]
    gate_values: Callable[[str], Awaitable[Mapping[str, float]]]
    gate_is_uniform: bool
    plan_for: Callable[[str], Sequence[str] | None]
    top_k_for: Callable[[str], int | None]
    coordinator_id: str
    allow_overrides: bool = False
    clock: Callable[[], float] = time.monotonic
    #: called with (request id, step, fused distribution, chosen token) -- tests and tracing
    observer: Callable[[str, int, Fused, int], None] | None = None
    #: the text path's: (request id, step, [(candidate text or None = end, score)], chosen)
    text_observer: TextObserver | None = None
    #: called with every step's replies (request id, step, agent -> distribution): tests
    dists_observer: Callable[[str, int, Mapping[str, wire.Distribution]], None] | None = None
    #: ask the agents for each session's context when it closes (tests: the AgentRpc's
    #: ``contexts_sink`` receives them)
    report_contexts: bool = False
    #: a family's vocabulary for the text path (the coordinator caches them per fingerprint)
    vocab_view: Callable[[str], FamilyVocabView] = field(
        default=lambda fam: FamilyVocabView.build((), frozenset()))
    #: called once a token with the seconds its cycle (steps sent -> next steps sent) took
    #: beyond the slowest expert's decode window (the largest ``latency_s``), and how many
    #: experts the step had
    on_step_overhead: Callable[[float, int], None] | None = None
    sessions_prefix: str = field(default_factory=lambda: uuid.uuid4().hex[:8])


def gate_text(req: wire.PhoneRequest) -> str:
    if req.prompt is not None:
        return req.prompt
    users = [m.content for m in (req.messages or []) if m.role == "user"]
    return users[-1] if users else (req.messages or [wire.ChatMessage("user", "")])[-1].content


async def run_request(req: wire.PhoneRequest, ctx: RequestContext, settings: GenerationSettings,
                      emit: Emit, request_id: str, *,
                      cancelled_by_phone: Callable[[], bool] | None = None) -> None:
    """Serve one accepted request; always ends with exactly one final or error message.

    Cancelling the task ends it with ``shutting_down`` (the coordinator stops), or with
    ``cancelled`` when ``cancelled_by_phone()`` says the phone asked for it; then the
    cancellation is the request's normal end and is not propagated. A cancellation that comes
    while the final (or error) is on its way does not stop it: that message is the one. Either
    way the agents' sessions are closed."""
    t0 = ctx.clock()
    experts: list[ExpertState] = []
    sending: asyncio.Future[None] | None = None  # the terminal message, once decided
    try:
        try:
            terminal: wire.FinalReply | wire.ErrorReplyPhone = await _generate(
                req, ctx, settings, emit, request_id, t0, experts)
        except RequestFailed as exc:
            terminal = wire.ErrorReplyPhone(code=exc.code, message=exc.message)
        sending = asyncio.ensure_future(emit(terminal))
        await asyncio.shield(sending)
    except asyncio.CancelledError:
        by_phone = cancelled_by_phone is not None and cancelled_by_phone()
        if sending is not None:
            with contextlib.suppress(Exception):
                await sending  # finish delivering it
        else:
            await _quiet_emit(emit, wire.ErrorReplyPhone(
                code=wire.ErrorCode.CANCELLED,
                message="cancelled by the client") if by_phone else wire.ErrorReplyPhone(
                code=wire.ErrorCode.SHUTTING_DOWN,
                message="the coordinator stopped before this request finished; retry"))
        if not by_phone:
            raise
    except Exception as exc:
        log.exception("request %s failed", request_id)
        if sending is None:
            await _quiet_emit(emit, wire.ErrorReplyPhone(
                code=wire.ErrorCode.INTERNAL, message=f"internal error: {type(exc).__name__}"))
    finally:
        for e in experts:
            if e.session_id:
                ctx.rpc.close(e.agent_id, [e.session_id], report=ctx.report_contexts)


async def _quiet_emit(emit: Emit, msg: wire.ErrorReplyPhone) -> None:
    try:
        await emit(msg)
    except Exception:  # noqa: BLE001 - nothing more can be done for this phone
        log.warning("could not deliver error to phone: %s", msg.message)


@dataclass(frozen=True)
class Selection:
    """The experts one request is served by: their vocabulary family and Top-k weights, and
    the experts the plan and gate chose that the request cannot use (with the reason)."""

    family: str
    weights: dict[str, float]
    left_out: tuple[tuple[str, str], ...] = ()


def select_experts(reg: Registry, allowed: Sequence[str] | None, gates_raw: Mapping[str, float],
                   *, uniform: bool, unknown_expert_weight: float, k: int | None,
                   app: str = "default", cross_family: bool = True) -> Selection:
    """Paper Algorithm 3's choice, pure: the online experts the plan allows (``allowed``;
    None = everyone) whose vocabulary is known, weighed by the gate (``uniform``: all alike;
    an expert the gate does not know gets ``unknown_expert_weight``), the Top-``k``
    renormalised -- of any tokenizer families (``cross_family``), or of the one family with
    the most gate weight, the others' chosen experts listed as left out.
    Raises :class:`RequestFailed` (``no_experts``) when nothing is left, saying why."""
    if allowed is not None and not allowed:
        raise RequestFailed(wire.ErrorCode.NO_EXPERTS,
                            f"the current plan allows no expert for app {app!r} "
                            "(budgets infeasible?)")
    candidates_all = [a.agent_id for a in reg.online()]
    if uniform:
        gates = dict.fromkeys(candidates_all, 1.0)
    else:
        gates = {c: gates_raw.get(c, unknown_expert_weight) for c in candidates_all}
    usable = [c for c in candidates_all if (allowed is None or c in allowed)
              and reg.agents[c].family in reg.vocabs]
    if not usable:
        raise RequestFailed(wire.ErrorCode.NO_EXPERTS, "no expert is online for this request")
    if cross_family:
        weights = top_k_weights(gates, usable, k)
        if not weights:
            raise RequestFailed(wire.ErrorCode.NO_EXPERTS,
                                "the gate gives no weight to any available expert")
        return Selection(reg.agents[next(iter(weights))].family, weights)
    fam = choose_family(reg, allowed, gates)
    if fam is None:
        raise RequestFailed(wire.ErrorCode.NO_EXPERTS, "no expert is online for this request")
    family, members = fam
    weights = top_k_weights(gates, members, k)
    if not weights:
        raise RequestFailed(wire.ErrorCode.NO_EXPERTS,
                            "the gate gives no weight to any available expert")
    # Whom the plan and the gate would have chosen, whatever their vocabulary: those of other
    # families are reported, never silently absent.
    left_out = tuple(
        (c, f"different tokenizer family: vocabulary {reg.agents[c].family[:12]} is not "
            f"fused with {family[:12]} (fusion = token)")
        for c in top_k_weights(gates, usable, k) if reg.agents[c].family != family)
    return Selection(family, weights, left_out)


@dataclass(frozen=True)
class _Decision:
    """One fused step: the bytes emitted, or the end of the answer."""

    text: bytes
    end: bool
    token: int = -1  # the token path's chosen id
    hints: Mapping[str, int] = field(default_factory=dict)  # the text path's, per family


class _TokenPath:
    """Experts of one vocabulary family: the exact mixture over ids (paper eq. 3)."""

    def __init__(self, pieces: Sequence[bytes], eog: frozenset[int]) -> None:
        self.pieces = pieces
        self.eog = eog

    def n_vocab(self, e: ExpertState) -> int:
        return len(self.pieces)

    def decide(self, parts: Sequence[tuple[ExpertState, float, wire.Distribution]],
               req: wire.PhoneRequest, rng: np.random.Generator, ctx: RequestContext,
               request_id: str, seq: int) -> _Decision:
        fused = mix([(w, _expert_dist(d)) for _e, w, d in parts], len(self.pieces))
        token = sample(fused, req.temperature, req.top_p, rng)
        if ctx.observer is not None:
            ctx.observer(request_id, seq, fused, token)
        if token in self.eog:
            return _Decision(b"", True, token)
        piece = self.pieces[token] if 0 <= token < len(self.pieces) else b""
        return _Decision(piece, False, token)

    def item(self, e: ExpertState, d: _Decision, seq: int, k: int, speculate: bool
             ) -> wire.StepItem:
        return wire.StepItem(e.session_id, d.token, seq, k, speculate=speculate)

    def room(self, e: ExpertState, d: _Decision) -> int:
        """Context cells the next step may take in ``e``'s session: one token."""
        return 1


class _TextPath:
    """Experts of several vocabulary families: fused over texts (:mod:`.xfusion`); every
    agent follows the emitted bytes in its own tokens."""

    def __init__(self, families: Mapping[str, str], views: Mapping[str, FamilyVocabView]
                 ) -> None:
        self.families = families  # agent -> family
        self.views = views  # family -> vocabulary
        self.utf8_tail = b""  # the incomplete character the answer ends with
        self._group: dict[str, str] = {}  # agent -> its fusion group this step
        self._pending: dict[str, int] = {}  # agent -> how many bytes it holds pending

    def n_vocab(self, e: ExpertState) -> int:
        return len(self.views[self.families[e.agent_id]].pieces)

    def decide(self, parts: Sequence[tuple[ExpertState, float, wire.Distribution]],
               req: wire.PhoneRequest, rng: np.random.Generator, ctx: RequestContext,
               request_id: str, seq: int) -> _Decision:
        # Members of one family may hold different pending bytes (whether an agent commits a
        # held token at once depends on its own logits, agent.textmode): their distributions
        # are conditioned on different texts, so each (family, pending) is fused as a group of
        # its own -- mixing them would read one member's healed tokens as fresh text and emit
        # its pending bytes twice.
        by_group: dict[tuple[str, bytes], list[tuple[float, ExpertDist]]] = {}
        self._group = {}
        for e, w, d in parts:
            key = (self.families[e.agent_id], d.pending)
            by_group.setdefault(key, []).append((w, _expert_dist(d)))
            self._group[e.agent_id] = _group_name(*key)
            self._pending[e.agent_id] = len(d.pending)
        steps = [FamilyStep(_group_name(fam, pend), sum(w for w, _ in members), members, pend,
                            self.views[fam]) for (fam, pend), members in sorted(by_group.items())]
        # across families the answer stays valid UTF-8, so that every family can spell it and
        # the phone reads exactly the agents' bytes; one family (forced text path) follows by
        # its own tokens, whatever they are, exactly as the token path does
        several = len({fam for fam, _pend in by_group}) > 1
        choice = xchoose(steps, req.temperature, req.top_p, rng,
                         self.utf8_tail if several else None)
        if not choice.end:
            data = self.utf8_tail + choice.text
            self.utf8_tail = data[len(data) - utf8_tail(data):]
        if ctx.text_observer is not None:
            ctx.text_observer(request_id, seq, [(c.text, c.score) for c in choice.candidates],
                              None if choice.end else choice.text)
        return _Decision(choice.text, choice.end, hints=choice.hints)

    def item(self, e: ExpertState, d: _Decision, seq: int, k: int, speculate: bool
             ) -> wire.StepItem:
        return wire.StepItem(e.session_id, d.hints.get(self._group.get(e.agent_id, ""), -1),
                             seq, k, d.text, speculate=False)

    def room(self, e: ExpertState, d: _Decision) -> int:
        """Context cells the next step may take in ``e``'s session: its own tokens for its
        pending bytes + the new ones, at most one a byte (agent.textmode)."""
        return max(1, self._pending.get(e.agent_id, 0) + len(d.text))


def _group_name(family: str, pending: bytes) -> str:
    """The text path's fusion group: a family's members holding the same pending bytes."""
    return f"{family}:{pending.hex()}"


def worth_speculating(weights: Mapping[str, float], agent_id: str) -> bool:
    """Whether an expert's own likeliest token may well be the fused one: it weighs at least its
    fair share of the request (1/n). A low-weight expert's guess rarely is -- measured by
    ``moe2 bench speculation`` -- so its speculative decodes would mostly be wasted energy."""
    return weights.get(agent_id, 0.0) * len(weights) >= 1.0 - 1e-9


def _expert_dist(d: wire.Distribution) -> ExpertDist:
    return ExpertDist(d.prob_array(), None if not d.ids else d.id_array(), d.rest_mass)


async def _generate(req: wire.PhoneRequest, ctx: RequestContext, settings: GenerationSettings,
                    emit: Emit, request_id: str, t0: float,
                    experts: list[ExpertState]) -> wire.FinalReply:
    gates_raw = await ctx.gate_values(gate_text(req))
    # The fleet as it is now, after the gate's wait (a worker thread): an agent whose Last
    # Will arrived meanwhile must not be chosen -- nothing would fail its session's open then,
    # and the request would wait the whole open deadline for it. No await from here to the
    # opens below.
    allowed = ctx.plan_for(req.app)
    overrides = ctx.allow_overrides
    if overrides and req.experts is not None:
        allowed = list(req.experts)
    reg = ctx.registry()
    k = (req.top_k if overrides and req.top_k else None) or ctx.top_k_for(req.app) \
        or settings.top_k
    selection = select_experts(
        reg, allowed, gates_raw, uniform=ctx.gate_is_uniform or (
            overrides and req.gating == "uniform"),
        unknown_expert_weight=settings.unknown_expert_weight, k=k, app=req.app,
        cross_family=settings.fusion != "token")
    weights = selection.weights
    families = {a: reg.agents[a].family for a in weights}
    path: _TokenPath | _TextPath
    if len(set(families.values())) == 1 and settings.fusion != "text":
        family = selection.family
        path = _TokenPath(reg.pieces(family) or (), reg.eog_ids(family))
        stream_pieces: Sequence[bytes] = reg.pieces(family) or ()
    else:
        path = _TextPath(families, {fam: ctx.vocab_view(fam) for fam in set(families.values())})
        stream_pieces = ()
    for i, (agent_id, w) in enumerate(weights.items()):
        view = reg.agents[agent_id]
        experts.append(ExpertState(agent_id, w, f"{ctx.sessions_prefix}-{request_id}-{i}",
                                   n_ctx=view.status.n_ctx))
    for agent_id, reason in selection.left_out:
        experts.append(ExpertState(agent_id, 0.0, "", active=False, reason=reason))
    by_id = {e.agent_id: e for e in experts}
    # the text path looks at a family's top MAX_CANDIDATES tokens at most: full
    # distributions (dist_k = 0) would only cost bytes on the wire
    dist_k = settings.dist_k if isinstance(path, _TokenPath) or settings.dist_k > 0 \
        else MAX_CANDIDATES

    open_msg = {
        "k": dist_k, "raw": req.raw, "text": isinstance(path, _TextPath),
        "prompt": req.prompt if req.messages is None else None,
        "messages": req.messages,
    }
    futs = {e.agent_id: ctx.rpc.open(e.agent_id, wire.OpenSession(
                session_id=e.session_id, speculate=worth_speculating(weights, e.agent_id),
                **open_msg))  # type: ignore[arg-type]
            for e in experts if e.active}
    dists = _drop_invalid(await _gather(futs, settings.open_deadline_s, by_id), by_id, path)
    # the prompt as the heaviest expert that opened tokenised it (n_past after the prompt)
    prompt_tokens = next((dists[e.agent_id].n_past for e in experts if e.agent_id in dists),
                         None)
    stream = TextStream(stream_pieces, req.stop_list())
    rng = np.random.default_rng(req.seed)
    n_tokens = 0
    ttft_s: float | None = None
    finish = "length"
    seq = 0
    # (steps sent at, slowest decode window, experts)
    last_step: tuple[float, float, int] | None = None
    while True:
        active = [e for e in experts if e.active and e.agent_id in dists]
        for e in experts:
            if e.active and e.agent_id not in dists:
                e.active = False
        if not active:
            raise RequestFailed(wire.ErrorCode.NO_EXPERTS,
                                "every selected expert failed: " + "; ".join(
                                    f"{e.agent_id}: {e.reason}" for e in experts))
        weights_now = renormalise({e.agent_id: e.weight for e in experts},
                                  [e.agent_id for e in active])
        if ctx.dists_observer is not None:
            ctx.dists_observer(request_id, seq, dists)
        parts = []
        for e in active:
            d = dists[e.agent_id]
            e.energy_j += d.energy_j
            e.n_past = d.n_past
            e.spec_hits += d.spec == 1
            e.spec_misses += d.spec == 2
            e.spec_wasted_j += d.wasted_j
            parts.append((e, weights_now[e.agent_id], d))
        decision = path.decide(parts, req, rng, ctx, request_id, seq)
        n_tokens += 1
        for e in active:
            e.tokens += 1
        if decision.end:
            finish = "stop"
            break
        chunk = stream.push_bytes(decision.text)
        done = stream.stopped or n_tokens >= req.max_tokens or any(
            e.n_past + path.room(e, decision) >= e.n_ctx for e in active)  # a context is full
        if not done:
            # Send the next step before streaming this token: the phone's publish is then off
            # the critical path, overlapping the agents' decode.
            seq += 1
            futs = {e.agent_id: ctx.rpc.step(e.agent_id, path.item(
                        e, decision, seq, dist_k, worth_speculating(weights_now, e.agent_id)))
                    for e in active}
            t_sent = ctx.clock()
            if ctx.on_step_overhead is not None and last_step is not None:
                # one whole token cycle (wait, checks, mixing, sampling, detokenising) beyond
                # the slowest expert's decode window of the previous step
                ctx.on_step_overhead(step_overhead_s(t_sent - last_step[0], last_step[1]),
                                     last_step[2])
            last_step = None
            # The steps leave in the RPC flush (call_soon, so that steps due for one agent in
            # this tick share a message): let it run before the phone's chunk is written.
            await asyncio.sleep(0)
        if chunk:
            if ttft_s is None:
                ttft_s = ctx.clock() - t0
            await emit(wire.TokenChunk(index=n_tokens - 1, text=chunk))
        if done:
            finish = "stop" if stream.stopped else "length"
            break
        dists = _drop_invalid(await _gather(futs, _deadline(ctx.registry(), active, settings),
                                            by_id), by_id, path)
        if dists and len(dists) == len(futs):  # no drop (a deadline wait is no sample)
            last_step = (t_sent, max(d.latency_s for d in dists.values()), len(dists))
    tail = stream.flush()
    if tail:
        if ttft_s is None:
            ttft_s = ctx.clock() - t0
        await emit(wire.TokenChunk(index=n_tokens, text=tail))
    return wire.FinalReply(
        text=stream.text, tokens=n_tokens, finish_reason=finish, ttft_s=ttft_s,
        latency_s=ctx.clock() - t0, energy_j=sum(e.energy_j for e in experts),
        experts=[wire.ExpertUsage(id=e.agent_id, weight=e.weight, tokens=e.tokens,
                                  energy_j=e.energy_j, dropped=not e.active, reason=e.reason,
                                  spec_hits=e.spec_hits, spec_misses=e.spec_misses,
                                  spec_wasted_j=e.spec_wasted_j)
                 for e in experts],
        app=req.app, coordinator_id=ctx.coordinator_id, prompt_tokens=prompt_tokens,
    )


#: float32 probabilities may sum a little above 1
_PROB_SLACK = 1e-3
#: how far from 1 a reply's probabilities plus rest mass may be (float32 rounding is ~1e-6)
_MASS_SLACK = 1e-2


def invalid_distribution(d: wire.Distribution, n_vocab: int) -> str | None:
    """Why ``d`` cannot be fused (an agent's reply is network input), or None when it can:
    float32 probabilities in [0, 1] summing to at most 1, one distinct in-vocabulary id per
    probability (a full-vocabulary reply has exactly ``n_vocab``), rest mass in [0, 1], and
    finite non-negative energy and latency (they are summed into the phone's final)."""
    n = len(d.probs) // 4  # whole 4-byte values, as many ids: the wire decoder checked that
    if n == 0:
        return "no probabilities"
    if not d.ids and n != n_vocab:
        return f"a full distribution of {n} probabilities for a vocabulary of {n_vocab}"
    p = d.prob_array()
    mass = float(p.sum())  # NaN or inf when any entry is (float32 pairwise: ~1e-7 here)
    if not math.isfinite(mass) or p.min() < 0 or p.max() > 1 + _PROB_SLACK \
            or mass > 1 + _PROB_SLACK:
        return "probabilities are not a distribution"
    if d.ids:
        ids = d.id_array()
        if ids.min() < 0 or ids.max() >= n_vocab:
            return "token ids outside the vocabulary"
        if np.unique(ids).shape[0] != n:
            return "repeated token ids"
    if not (0.0 <= d.rest_mass <= 1.0 + _PROB_SLACK):  # NaN fails too
        return "rest mass outside [0, 1]"
    total = mass + d.rest_mass
    if abs(total - 1.0) > _MASS_SLACK:  # an all-zero reply would divide fusion by zero
        return f"probabilities and rest mass sum to {total:.4g}, not 1"
    if not (0.0 <= d.energy_j < math.inf) or not (0.0 <= d.latency_s < math.inf) \
            or not (0.0 <= d.wasted_j < math.inf):
        return "energy or latency not finite and non-negative"
    return None


def _drop_invalid(dists: dict[str, wire.Distribution], by_id: Mapping[str, ExpertState],
                  path: _TokenPath | _TextPath) -> dict[str, wire.Distribution]:
    for agent_id, d in list(dists.items()):
        problem = invalid_distribution(d, path.n_vocab(by_id[agent_id]))
        if problem is not None:
            e = by_id[agent_id]
            e.active = False
            e.reason = f"sent an invalid distribution: {problem}"
            log.warning("expert %s dropped: %s", agent_id, e.reason)
            del dists[agent_id]
    return dists


def step_overhead_s(cycle_s: float, slowest_decode_s: float) -> float:
    """What one token cycle (steps sent to steps sent) cost beyond the slowest expert's decode
    window: MQTT both ways, the agents' and this coordinator's work. Never negative (the two
    come from different clocks)."""
    return max(0.0, cycle_s - slowest_decode_s)


def _deadline(reg: Registry, active: Sequence[ExpertState], s: GenerationSettings) -> float:
    """Per-step deadline from the agents' measured step latency (slowest member)."""
    lat = [v.step_latency_s() or 0.0 for e in active if (v := reg.agents.get(e.agent_id))]
    # reported latencies are network input: bounded on both sides (registry ignores NaN/inf)
    return min(s.step_deadline_max_s,
               max(s.step_deadline_min_s, s.step_deadline_factor * max(lat, default=0.0)))


async def _gather(futs: Mapping[str, asyncio.Future[wire.Distribution]], timeout_s: float,
                  by_id: Mapping[str, ExpertState]) -> dict[str, wire.Distribution]:
    """Wait for every expert's distribution up to the deadline; the late and failed are dropped."""
    if futs:
        await asyncio.wait(list(futs.values()), timeout=timeout_s)
    out: dict[str, wire.Distribution] = {}
    for agent_id, fut in futs.items():
        e = by_id[agent_id]
        if not fut.done():
            fut.cancel()
            e.active = False
            e.reason = f"missed the {timeout_s:.2f}s step deadline"
            log.warning("expert %s dropped: %s", agent_id, e.reason)
            continue
        exc = fut.exception() if not fut.cancelled() else RpcError(
            wire.ErrorCode.INTERNAL, "cancelled")
        if exc is not None:
            e.active = False
            e.reason = exc.message if isinstance(exc, RpcError) else str(exc)
            log.warning("expert %s dropped: %s", agent_id, e.reason)
            continue
        out[agent_id] = fut.result()
    return out
