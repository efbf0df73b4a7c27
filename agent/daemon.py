"""The agent daemon: one GGUF expert on one box, serving distributions over MQTT.

Structure (STYLE.md): the daemon owns one task group of named loops -- the MQTT session (with
its reconnect loop), the engine worker, telemetry and the watchdog. Model, meter, clock and the
MQTT client factory are injected; :func:`moe2.cli.agent.run` wires the real ones.

Requests arriving in the same tick are processed as one batch in the engine thread: all steps
due in it are decoded in one llama.cpp call, and the meter's energy delta over that call is
shared among its sessions in proportion to the tokens each one evaluated.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aiomqtt
import msgspec

from moe2.agent.engine import DecodeJob, Engine, EngineError, softmax_topk
from moe2.agent.metered import Decoded, metered_decode
from moe2.agent.meters import EnergyMeter, EstimatedMeter
from moe2.agent.sessions import Session, SessionError, SessionTable
from moe2.agent.speculation import NO_SPECULATION, Outcome, Speculator, top_token
from moe2.agent.stats import AgentStats
from moe2.agent.textsteps import TextJob, TextSteps
from moe2.shared import __version__, wire
from moe2.shared.config import AgentConfig
from moe2.shared.mqtt import (
    MqttClient,
    cancel_and_wait,
    get_prop,
    payload_bytes,
    publish_qos0,
    response_properties,
    run_session,
)
from moe2.shared.sdnotify import Notifier, watchdog_interval_s
from moe2.shared.topics import Topics, publishable_topic

log = logging.getLogger(__name__)

ClientFactory = Callable[[aiomqtt.Will], MqttClient]

#: a reply that cannot be written within this is dropped (coordinators' step deadlines are longer)
REPLY_PUBLISH_TIMEOUT_S = 2.0


@dataclass
class Work:
    """One inbound RPC: the decoded message (or the decode error) and where to reply."""

    msg: wire.OpenSession | wire.Step | wire.CloseSession | wire.ScoreAnswer | None
    error: str | None
    response_topic: str | None
    correlation: bytes | None
    error_code: wire.ErrorCode = wire.ErrorCode.MALFORMED


@dataclass
class _Job:
    work_index: int
    session: Session
    tokens: list[int]
    seq: int
    k: int
    is_open: bool
    spec: Outcome = NO_SPECULATION  # the step's speculation: a hit's logits, or a miss's waste


J = TypeVar("J", _Job, TextJob)


def _one_per_session(jobs: list[J]) -> tuple[list[J], list[J]]:
    """(this round's jobs: each session's first, the rest for later rounds): a session may
    appear once per llama_decode call."""
    seen: set[int] = set()
    now: list[J] = []
    later: list[J] = []
    for j in jobs:
        (later if j.session.seq_id in seen else now).append(j)
        seen.add(j.session.seq_id)
    return now, later


class AgentDaemon:
    def __init__(
        self,
        cfg: AgentConfig,
        engine: Engine,
        meter: EnergyMeter,
        client_factory: ClientFactory,
        *,
        device: str = "cpu",
        topics: Topics | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        notifier: Notifier | None = None,
    ) -> None:
        self.cfg = cfg
        self.engine = engine
        self.meter = meter
        self.client_factory = client_factory
        self.device = device
        self.topics = topics or Topics(cfg.root)
        self.clock = clock
        self.wall = wall
        self.notifier = notifier or Notifier()
        info = engine.info
        self.max_prompt_tokens = min(cfg.max_prompt_tokens or info.n_ctx - 1, info.n_ctx - 1)
        self.table = SessionTable(
            max_sessions=cfg.max_sessions, n_ctx=info.n_ctx, n_vocab=info.n_vocab,
            max_k=cfg.max_k,
        )
        self.stats = AgentStats()
        # Work for the engine thread: appended on the event loop, taken by the engine thread
        # itself between decodes (deque appends and pops are atomic), so that a step which
        # arrives during a decode costs no hand-off back to the loop and out again.
        self._inbox: collections.deque[Work] = collections.deque()
        self._work_ready = asyncio.Event()  # set with every append: wakes an idle worker
        self._sending: set[asyncio.Task[None]] = set()  # replies on their way to the broker
        self._halt = False  # shutdown: the engine thread stops taking work
        self._client: MqttClient | None = None
        self._stopping = asyncio.Event()
        self._connected = asyncio.Event()
        self._ready_sent = False
        self._entered = False
        self.connections = 0  # successful MQTT sessions so far (tests read it)
        self.dropped_requests = 0  # requests no reply could be sent for (bad response topic)
        self._status_topic = self.topics.agent_status(cfg.id).topic
        self._reassert = asyncio.Event()
        self.text = TextSteps(cfg.id, engine, meter, self.table, self.stats, clock)
        self.spec = Speculator(engine, meter, self.table, clock, cfg.speculate_min_p)

    # ------------------------------------------------------------------ messages
    def status(self, state: str) -> wire.AgentStatus:
        info = self.engine.info
        return wire.AgentStatus(
            agent_id=self.cfg.id, state="online" if state == "online" else "offline",
            model=info.name, quant=info.quant, n_ctx=info.n_ctx, n_vocab=info.n_vocab,
            vocab_fp=info.vocab_fp, bos_id=info.bos_id, eos_id=info.eos_id,
            chat_template=info.chat_template is not None, device=self.device,
            meter=self.meter.kind, version=__version__, max_sessions=self.cfg.max_sessions,
            ts=self.wall(),
        )

    def will(self) -> aiomqtt.Will:
        t = self.topics.agent_status(self.cfg.id)
        return aiomqtt.Will(t.topic, t.encode(self.status("offline")), qos=1, retain=True)

    def telemetry(self) -> wire.Telemetry:
        energy_j = self.meter.read_energy_j()
        tps, jpt = self.stats.snapshot_rate(self.clock(), energy_j)
        return wire.Telemetry(
            agent_id=self.cfg.id, ts=self.wall(), power_w=self.meter.read_power_w(),
            energy_j=energy_j, tokens_total=self.stats.tokens_total, tokens_per_s=tps,
            joules_per_token=jpt, step_latency_s=self.stats.step_latency_s(),
            open_sessions=len(self.table.sessions), meter=self.meter.kind,
            latency_by_ctx=self.stats.latency_bins(), temperature_c=self.meter.temperature_c(),
            spec_hits=self.spec.stats.hits, spec_misses=self.spec.stats.misses,
            spec_wasted_s=self.spec.stats.wasted_s, spec_wasted_j=self.spec.stats.wasted_j,
        )

    # ------------------------------------------------------------------ lifecycle
    def request_stop(self) -> None:
        """Signal handler: finish in-flight work, publish offline, exit."""
        if self._stopping.is_set():
            return
        log.info("agent %s: stopping", self.cfg.id)
        self._stopping.set()

    async def run(self) -> int:
        if self._entered:
            raise RuntimeError("AgentDaemon.run() may be called once")
        self._entered = True
        self.notifier.notify("STATUS=connecting")
        session = asyncio.create_task(self._session_loop(), name="mqtt-session")
        loops = [
            asyncio.create_task(self._worker_loop(), name="engine-worker"),
            asyncio.create_task(self._telemetry_loop(), name="telemetry"),
            asyncio.create_task(self._watchdog_loop(), name="watchdog"),
            asyncio.create_task(self._expiry_loop(), name="expiry"),
            asyncio.create_task(self._status_loop(), name="own-status"),
        ]
        stop = asyncio.create_task(self._stopping.wait(), name="stop-wait")
        try:
            # Until a stop is asked for -- or a loop fails (the session gives up when the
            # broker keeps refusing our credentials): that error is re-raised.
            running: set[asyncio.Task[Any]] = {session, *loops, stop}
            while not stop.done():
                done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    if t is not stop and not t.cancelled() and t.exception() is not None:
                        raise t.exception()  # type: ignore[misc]
            # Drain: let queued and in-flight work finish (up to the timeout).
            deadline = self.clock() + self.cfg.drain_timeout_s
            while ((self._inbox or self._busy or self._sending)  # noqa: ASYNC110 - three conditions, polled briefly at shutdown
                   and self.clock() < deadline):
                await asyncio.sleep(0.02)
            self._halt = True
            await cancel_and_wait(loops)
            self.notifier.stopping()
            await self._publish_offline()
        finally:
            self._halt = True  # also when a loop failed: the engine thread takes no more work
            await cancel_and_wait([session, *loops, stop])
        return 0

    _busy = False

    async def _publish_offline(self) -> None:
        client = self._client
        if client is None:
            return
        t = self.topics.agent_status(self.cfg.id)
        with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
            await asyncio.wait_for(
                client.publish(t.topic, t.encode(self.status("offline")), qos=1, retain=True),
                timeout=3.0,
            )

    async def _session_loop(self) -> None:
        await run_session(lambda: self.client_factory(self.will()), self._on_connect,
                          self._on_message, self._on_lost, f"agent {self.cfg.id}")

    def _on_lost(self) -> None:
        self._client = None
        self._connected.clear()

    async def _on_connect(self, client: MqttClient) -> None:
        self._client = client
        await client.subscribe(self.topics.agent_rpc(self.cfg.id), qos=0)
        info = self.engine.info
        vt = self.topics.agent_vocab(self.cfg.id)
        await client.publish(
            vt.topic,
            vt.encode(wire.Vocab(agent_id=self.cfg.id, vocab_fp=info.vocab_fp,
                                 pieces=list(info.pieces), eog_ids=list(info.eog_ids))),
            qos=1, retain=True,
        )
        await self._publish_online(client)
        # Watch our own retained status: a forged or stale one (offline, cleared, or another
        # model's) would keep coordinators from using this agent until it reconnected.
        await client.subscribe(self._status_topic, qos=1)
        self.connections += 1
        self._connected.set()
        log.info("agent %s: online (model %s, %s, meter %s)", self.cfg.id, info.name,
                 info.quant or "?", self.meter.kind)
        if not self._ready_sent:
            self._ready_sent = True
            self.notifier.ready(f"serving {info.name}")

    def _on_message(self, message: aiomqtt.Message) -> None:
        data = payload_bytes(message)
        if str(message.topic) == self._status_topic:
            self._on_own_status(data)
            return
        rt = get_prop(message, "ResponseTopic")
        corr = get_prop(message, "CorrelationData")
        if rt is not None and not (publishable_topic(rt) and self.topics.is_coordinator_inbox(rt)):
            # No reply can go there: paho refuses wildcards, mosquitto disconnects us for some
            # topics, and agents answer only coordinators' inboxes (as the broker ACL allows).
            # Running the request anyway would only move a session nobody hears about.
            log.debug("agent %s: request with an unusable response topic %r dropped",
                      self.cfg.id, rt[:200])
            self.dropped_requests += 1
            return
        try:
            msg = wire.decode_agent_inbound(data)
        except wire.DecodeError as exc:
            log.debug("agent %s: malformed request (%s)", self.cfg.id, exc)
            if rt:
                code = (wire.ErrorCode.UNSUPPORTED_VERSION
                        if isinstance(exc, wire.UnsupportedVersionError)
                        else wire.ErrorCode.MALFORMED)
                self._enqueue(Work(None, f"malformed request: {exc}", rt, corr, code))
            return
        self._enqueue(Work(msg, None, rt, corr))

    def _enqueue(self, work: Work) -> None:
        self._inbox.append(work)
        self._work_ready.set()

    def _on_own_status(self, data: bytes) -> None:
        if self._stopping.is_set():
            return
        mine = self.status("online")
        try:
            seen = wire.decode_as(data, wire.AgentStatus) if data else None
        except wire.DecodeError:
            seen = None
        if seen is not None and msgspec.structs.replace(seen, ts=mine.ts) == mine:
            return
        log.warning("agent %s: the retained status says %s; publishing ours again", self.cfg.id,
                    "nothing" if seen is None else f"{seen.state} ({seen.model})")
        self._reassert.set()

    async def _status_loop(self) -> None:
        """Re-publish our online status when the retained one is not ours (at most 1/s: two
        agents misconfigured with one id must not flood the broker fighting over it)."""
        while True:
            await self._reassert.wait()
            self._reassert.clear()
            client = self._client
            if client is not None and self._connected.is_set() and not self._stopping.is_set():
                with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
                    await asyncio.wait_for(self._publish_online(client),
                                           timeout=REPLY_PUBLISH_TIMEOUT_S)
            await asyncio.sleep(1.0)

    async def _publish_online(self, client: MqttClient) -> None:
        st = self.topics.agent_status(self.cfg.id)
        await client.publish(st.topic, st.encode(self.status("online")), qos=1, retain=True)

    async def _worker_loop(self) -> None:
        """Runs the engine thread whenever there is work, and waits while there is none."""
        loop = asyncio.get_running_loop()
        while True:
            self._work_ready.clear()
            if not self._inbox and not self._may_speculate():
                await self._work_ready.wait()
                continue
            self._busy = True
            try:
                await asyncio.to_thread(self._engine_run, loop)
            finally:
                self._busy = False

    def _may_speculate(self) -> bool:
        return self.spec.pending() and not self._stopping.is_set() and not self._halt

    def _engine_run(self, loop: asyncio.AbstractEventLoop) -> None:
        """Engine thread, until idle: queued work first (a real step always goes before a
        speculative one), then the sessions' speculations (agent/speculation.py) while nothing
        is queued -- a step that arrives meanwhile waits for that one batched decode at most.
        Replies go to the loop to be published while this thread decodes on: with a
        speculation hit, one token costs its decode and nothing else on the critical path."""
        while not self._halt:
            if self._inbox:
                batch: list[Work] = []
                while self._inbox:
                    batch.append(self._inbox.popleft())
                replies: list[wire.Reply | None]
                if self._stopping.is_set() and self.cfg.drain_timeout_s <= 0:
                    replies = [self._shutdown_reply(w) for w in batch]
                else:
                    replies = self.process(batch)
                try:
                    loop.call_soon_threadsafe(self._start_sending, batch, replies)
                except RuntimeError:  # the loop is closed: the daemon has exited
                    return
            elif self._may_speculate():
                self.spec.round()
            else:
                return

    def _start_sending(self, batch: Sequence[Work], replies: Sequence[wire.Reply | None]) -> None:
        task = asyncio.create_task(self._send_replies(batch, replies), name="replies")
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    def _shutdown_reply(self, w: Work) -> wire.Reply:
        """Work taken after a stop without drain: each session it names is told, so that the
        coordinator fails those steps at once (an error without a session only gets logged)."""
        msg = w.msg
        named: list[tuple[str | None, int | None]]
        if isinstance(msg, wire.Step):
            named = [(item.session_id, item.seq) for item in msg.items]
        elif isinstance(msg, (wire.OpenSession, wire.ScoreAnswer)):
            named = [(msg.session_id, None)]
        else:
            named = [(None, None)]
        return wire.Reply(agent_id=self.cfg.id, errors=[wire.ErrorItem(
            code=wire.ErrorCode.SHUTTING_DOWN, message="agent is shutting down",
            session_id=sid, seq=seq) for sid, seq in named])

    async def _send_replies(self, batch: Sequence[Work],
                            replies: Sequence[wire.Reply | None]) -> None:
        client = self._client
        for w, r in zip(batch, replies, strict=True):
            if r is None or not w.response_topic:
                continue
            if client is None:
                log.debug("agent %s: reply dropped, not connected", self.cfg.id)
                continue
            try:
                # Written to the socket at once (QoS 0, see shared.mqtt.Client.publish_now).
                # A connection that just died never confirms a publish: without a timeout the
                # worker would stall on it for aiomqtt's default 10 s after a broker restart.
                await publish_qos0(
                    client, w.response_topic, wire.encode(r),
                    # no property block at all when there is nothing to correlate (every step
                    # reply from a coordinator): paho packs properties in Python, per message
                    properties=(None if w.correlation is None
                                else response_properties(correlation_data=w.correlation)),
                    timeout_s=REPLY_PUBLISH_TIMEOUT_S,
                )
            except aiomqtt.MqttError as exc:
                log.debug("agent %s: reply not sent: %s", self.cfg.id, exc)

    # ------------------------------------------------------------------ engine thread
    def process(self, batch: Sequence[Work]) -> list[wire.Reply | None]:
        """Blocking: validate, tokenise, decode and build one reply per work item."""
        now = self.clock()
        dists: list[list[wire.Distribution]] = [[] for _ in batch]
        errors: list[list[wire.ErrorItem]] = [[] for _ in batch]
        contexts: list[list[wire.SessionContext]] = [[] for _ in batch]
        pending: list[_Job] = []
        text_jobs: list[TextJob] = []
        for i, w in enumerate(batch):
            if w.msg is None:
                errors[i].append(wire.ErrorItem(code=w.error_code,
                                                message=w.error or "malformed"))
                continue
            try:
                if isinstance(w.msg, wire.ScoreAnswer):
                    dists[i].append(self._score(w.msg, now))
                else:
                    self._admit(i, w.msg, now, pending, errors[i], text_jobs, contexts[i])
            except SessionError as exc:  # whole-message errors (open, score)
                sid = (w.msg.session_id if isinstance(w.msg, (wire.OpenSession, wire.ScoreAnswer))
                       else None)
                errors[i].append(exc.item(sid, 0 if sid else None))
        # Rounds: a session may appear once per llama_decode call.
        while pending:
            # A session closed later in the same batch (the coordinator gave up on a step it
            # had sent), or by a failed earlier round, lost its KV sequence: its jobs are not
            # decoded -- that would fail the whole llama_decode call, and with it every other
            # session in the round (or write into a freed sequence).
            round_jobs, pending = _one_per_session(self._drop_closed(pending, errors))
            self._decode_round(round_jobs, dists, errors)
        while text_jobs:  # text-mode steps, one per session a round, after the token steps
            round_text, text_jobs = _one_per_session(text_jobs)
            self.text.round(round_text, dists, errors)
        replies: list[wire.Reply | None] = []
        for i, w in enumerate(batch):
            if isinstance(w.msg, wire.CloseSession) and not errors[i] and not contexts[i]:
                replies.append(None)  # closes need no answer
            else:
                replies.append(wire.Reply(agent_id=self.cfg.id, dists=dists[i], errors=errors[i],
                                          contexts=contexts[i]))
        return replies

    def _drop_closed(self, jobs: list[_Job], errors: list[list[wire.ErrorItem]]) -> list[_Job]:
        live = []
        for j in jobs:
            if self.table.sessions.get(j.session.session_id) is j.session:
                live.append(j)
            else:
                errors[j.work_index].append(wire.ErrorItem(
                    code=wire.ErrorCode.UNKNOWN_SESSION,
                    message=f"session {j.session.session_id!r} was closed",
                    session_id=j.session.session_id, seq=j.seq))
        return live

    def _admit(self, i: int, msg: wire.OpenSession | wire.Step | wire.CloseSession, now: float,
               pending: list[_Job], errors: list[wire.ErrorItem], text_jobs: list[TextJob],
               contexts: list[wire.SessionContext]) -> None:
        if isinstance(msg, wire.CloseSession):
            for sid in msg.session_ids:
                s = self.table.close(sid)
                self.spec.forget(sid)
                if s is not None:
                    if msg.report:
                        contexts.append(self.text.context(s))
                    self.engine.free(s.seq_id)
            return
        if isinstance(msg, wire.OpenSession):
            self.table.check_k(msg.k)
            if msg.session_id in self.table.sessions:
                raise SessionError(wire.ErrorCode.SESSION_EXISTS,
                                   f"session {msg.session_id!r} is already open")
            tokens = self.tokenize_request(msg)
            if len(tokens) > self.max_prompt_tokens:
                raise SessionError(
                    wire.ErrorCode.PROMPT_TOO_LONG,
                    f"prompt has {len(tokens)} tokens; this agent accepts at most "
                    f"{self.max_prompt_tokens}",
                )
            s = self.table.open(msg.session_id, len(tokens), msg.k, now)
            s.busy = True
            s.text_mode = msg.text
            s.speculate = msg.speculate
            pending.append(_Job(i, s, tokens, 0, msg.k, True))
            return
        for item in msg.items:
            text = item.append is not None
            try:
                s = self.table.step(item.session_id, item.token, item.seq, item.k, now,
                                    text=text)
            except SessionError as exc:
                errors.append(exc.item(item.session_id, item.seq))
                continue
            s.busy = True
            if item.append is not None:
                s.text_mode = True
                self.spec.resolve(s, -1)  # opened without ``text``: a speculation is wasted
                text_jobs.append(TextJob(i, s, item.append, None if item.token < 0
                                          else item.token, item.seq, item.k))
            else:
                s.speculate = item.speculate
                pending.append(_Job(i, s, [item.token], item.seq, item.k, False,
                                    self.spec.resolve(s, item.token)))

    def tokenize_request(self, msg: wire.OpenSession | wire.ScoreAnswer,
                         continuation: str = "") -> list[int]:
        """The prompt's tokens (chat template unless raw or absent), and with ``continuation``
        the tokens of prompt + continuation tokenised together."""
        eng = self.engine
        if isinstance(msg, wire.OpenSession) and msg.tokens is not None:
            self.table.check_tokens(msg.tokens)
            return list(msg.tokens)
        template = eng.info.chat_template is not None and not msg.raw
        if msg.messages is not None:
            pairs = [(m.role, m.content) for m in msg.messages]
        else:
            pairs = [("user", msg.prompt or "")]
        if not template:
            text = "\n".join(c for _r, c in pairs)
            return eng.tokenize(text + continuation, add_bos=True, parse_special=False)
        try:
            rendered = eng.render_chat(pairs)
        except Exception as exc:  # noqa: BLE001 - a template error is the request's problem
            raise SessionError(wire.ErrorCode.BAD_REQUEST,
                               f"chat template failed: {exc}") from None
        bos_text = getattr(eng, "bos_text", lambda: "")()
        add_bos = not (bos_text and rendered.startswith(bos_text))
        return eng.tokenize(rendered + continuation, add_bos=add_bos, parse_special=True)

    def _continuation(self, msg: wire.ScoreAnswer) -> str:
        """How this model continues the prompt with the answer: right after a chat template's
        generation prompt; after a space that a raw prompt does not end with otherwise
        (``Q: ... A:`` + `` Paris``)."""
        text = msg.continuation
        templated = self.engine.info.chat_template is not None and not msg.raw
        if templated or not text or text[0].isspace():
            return text
        prompt = msg.prompt if msg.prompt is not None else "\n".join(
            m.content for m in msg.messages or [])
        return text if not prompt or prompt[-1].isspace() else " " + text

    def _score(self, msg: wire.ScoreAnswer, now: float) -> wire.Distribution:
        """Teacher forcing (see :class:`wire.ScoreAnswer`), one token a decode, in a session of
        its own that is freed before returning."""
        prompt = self.tokenize_request(msg)
        full = self.tokenize_request(msg, self._continuation(msg))
        if full[:len(prompt)] == prompt:
            answer = full[len(prompt):]
        else:  # the continuation merged with the prompt's last token: tokenise it alone
            answer = self.engine.tokenize(self._continuation(msg), add_bos=False,
                                          parse_special=False)
        if msg.eos:
            answer.append(self.engine.info.eos_id)
        if not answer:
            raise SessionError(wire.ErrorCode.BAD_REQUEST, "the answer has no tokens")
        self.table.check_tokens(answer)
        if len(prompt) + len(answer) > min(self.max_prompt_tokens, self.table.n_ctx - 1):
            raise SessionError(wire.ErrorCode.PROMPT_TOO_LONG,
                               f"prompt and answer have {len(prompt) + len(answer)} tokens; "
                               f"this agent's context holds {self.table.n_ctx}")
        s = self.table.open(msg.session_id, len(prompt), 0, now)
        probs: list[float] = []
        e0 = self.meter.read_energy_j()
        t0 = self.clock()
        try:
            feed = prompt
            for tok in answer:
                with (self.meter.busy() if isinstance(self.meter, EstimatedMeter)
                      else contextlib.nullcontext()):
                    (logits,) = self.engine.decode([DecodeJob(s.seq_id, feed, s.n_past)])
                s.n_past += len(feed)
                _ids, p, _rest = softmax_topk(logits, 0, overwrite=True)
                probs.append(float(p[tok]))
                feed = [tok]
        except EngineError as exc:
            raise SessionError(wire.ErrorCode.INTERNAL, f"decode failed: {exc}") from None
        finally:
            self.table.close(s.session_id)
            self.engine.free(s.seq_id)
        return wire.Distribution(
            session_id=msg.session_id, seq=0, probs=wire.Distribution.pack_probs(probs),
            ids=wire.Distribution.pack_ids(answer), n_past=s.n_past,
            n_evaluated=len(prompt) + len(answer) - 1,
            energy_j=max(0.0, self.meter.read_energy_j() - e0), latency_s=self.clock() - t0)

    def _decode_round(self, jobs: list[_Job], dists: list[list[wire.Distribution]],
                      errors: list[list[wire.ErrorItem]]) -> None:
        # steps whose token was speculated on have their logits already (agent/speculation.py)
        todo = [j for j in jobs if j.spec.hit is None]
        decode_jobs = [DecodeJob(j.session.seq_id, j.tokens, j.session.n_past) for j in todo]
        try:
            out = (metered_decode(self.engine, self.meter, self.clock, decode_jobs)
                   if decode_jobs else Decoded([], 0.0, 0.0))
        except EngineError as exc:
            log.error("agent %s: decode failed: %s", self.cfg.id, exc)
            for j in todo:
                errors[j.work_index].append(wire.ErrorItem(
                    code=wire.ErrorCode.INTERNAL, message=f"decode failed: {exc}",
                    session_id=j.session.session_id, seq=j.seq))
                self.table.close(j.session.session_id)
                self.engine.free(j.session.seq_id)
            jobs = [j for j in jobs if j.spec.hit is not None]
            out, todo = Decoded([], 0.0, 0.0), []
        latency_s, energy_j = out.latency_s, out.energy_j
        n_tokens = sum(len(j.tokens) for j in todo)
        by_job = dict(zip(map(id, todo), out.logits, strict=True))
        for j in jobs:
            s = j.session
            hit, missed = j.spec.hit, j.spec.missed
            if hit is not None:  # decoded while the coordinator decided
                lg, step_latency_s, share = hit.logits, hit.latency_s, hit.energy_j
            else:
                lg, step_latency_s = by_job[id(j)], latency_s
                share = energy_j * len(j.tokens) / n_tokens if n_tokens else 0.0
            wasted_j = missed.energy_j if missed is not None else 0.0
            s.tokens.extend(j.tokens)
            if j.is_open:
                s.n_prompt = len(j.tokens)
            s.last_logits = lg
            s.n_past += len(j.tokens)
            s.last_seq = max(s.last_seq, j.seq)
            s.pending -= len(j.tokens)  # the prompt at open, one token a step
            s.busy = False
            # a text-mode session heals from its last logits: they must stay intact
            ids, probs, rest = softmax_topk(lg, j.k, overwrite=not s.text_mode)
            dists[j.work_index].append(wire.Distribution(
                session_id=s.session_id, seq=j.seq,
                probs=wire.Distribution.pack_probs(probs),
                ids=b"" if ids is None else wire.Distribution.pack_ids(ids),
                rest_mass=rest, n_past=s.n_past, n_evaluated=len(j.tokens),
                energy_j=share + wasted_j, latency_s=step_latency_s,
                spec=1 if hit is not None else 2 if missed is not None else 0,
                wasted_j=wasted_j,
            ))
            self.spec.offer(s, *top_token(probs, ids))
            if not j.is_open:
                self.stats.record_step(step_latency_s, s.n_past)
        self.stats.record_tokens(sum(1 for j in jobs if not j.is_open))

    # ------------------------------------------------------------------ periodic loops
    async def _telemetry_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.telemetry_interval_s)
            client = self._client
            if client is None or not self._connected.is_set():
                continue
            try:
                msg = await asyncio.to_thread(self.telemetry)
                t = self.topics.agent_telemetry(self.cfg.id)
                await client.publish(t.topic, t.encode(msg), qos=0)
            except aiomqtt.MqttError as exc:
                log.debug("telemetry not sent: %s", exc)
            except Exception:
                log.exception("agent %s: telemetry failed", self.cfg.id)

    async def _watchdog_loop(self) -> None:
        if not self.notifier.enabled:
            return
        interval = watchdog_interval_s(default_s=5.0)
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def _expiry_loop(self) -> None:
        period = min(5.0, max(0.5, self.cfg.idle_timeout_s / 4))
        while True:
            await asyncio.sleep(period)
            expired = self.table.expired(self.clock(), self.cfg.idle_timeout_s)
            if expired:
                log.info("agent %s: closing %d idle session(s)", self.cfg.id, len(expired))
                self._enqueue(Work(wire.CloseSession(session_ids=expired), None, None, None))

