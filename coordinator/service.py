"""The coordinator service: phones' requests in, fused tokens out.

The :class:`Coordinator` owns one task group of named loops (STYLE.md): the MQTT session with
its reconnect loop, the phone outbox (:mod:`.outbox`), the in-flight markers and takeovers
(:mod:`.inflight`), exactly-once serving across brokers (:mod:`.once`: heartbeats, claims, held
copies), the planner and the watchdog; plus one task per accepted request, tracked and awaited --
never fire-and-forget. Steps to agents are written from the request tasks themselves
(:meth:`Coordinator._send_rpc_now`). What it decides is decided by pure functions elsewhere:
admission (:func:`.limits.request_problem`, :class:`.limits.Limits`), the fleet view
(:func:`.registry.apply`), expert selection and fusion (:mod:`.generation`, :mod:`.fusion`),
takeovers (:mod:`.inflight`), which copy of a request is answered (:mod:`.once`). Gate, client
factory, clock, planner and metrics are injected; ``cli/coordinator`` wires the real ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol

import aiomqtt

from moe2.coordinator.cancels import EarlyCancels, RequestKey
from moe2.coordinator.fleetcheck import fleet_warnings
from moe2.coordinator.fusion import Fused
from moe2.coordinator.gating import Gate
from moe2.coordinator.generation import (
    GenerationSettings,
    RequestContext,
    TextObserver,
    run_request,
)
from moe2.coordinator.inflight import InflightTracker
from moe2.coordinator.limits import Limits, request_problem
from moe2.coordinator.link import BrokerLink
from moe2.coordinator.liveplan import Planner
from moe2.coordinator.once import ExactlyOnce, default_node, request_key
from moe2.coordinator.outbox import PhoneMessage, PhoneOutbox
from moe2.coordinator.registry import (
    Event,
    GoneEvent,
    Registry,
    StatusEvent,
    TelemetryEvent,
    VocabEvent,
    apply,
)
from moe2.coordinator.rpc import AgentRpc, Outgoing
from moe2.coordinator.xfusion import FamilyVocabView
from moe2.shared import __version__, wire
from moe2.shared.config import CoordinatorConfig
from moe2.shared.mqtt import (
    MqttClient,
    cancel_and_wait,
    get_prop,
    payload_bytes,
    response_properties,
    run_session,
)
from moe2.shared.sdnotify import Notifier, watchdog_interval_s
from moe2.shared.topics import Topics

log = logging.getLogger(__name__)

ClientFactory = Callable[[aiomqtt.Will], MqttClient]

#: a vocabulary with more pieces is refused (the largest real ones have ~256k): each piece
#: costs far more in memory than its two bytes on the wire
MAX_VOCAB_PIECES = 1 << 20
#: the planner does not wait longer than this for the broker to acknowledge a plan
PLAN_PUBLISH_TIMEOUT_S = 2.0


class Metrics(Protocol):
    """What the coordinator reports to (see :mod:`.metrics`)."""

    def observe_request(self, app: str) -> None: ...

    def observe_reply(self, msg: wire.TokenChunk | wire.FinalReply | wire.ErrorReplyPhone
                      ) -> None: ...


class PhoneEmitter:
    """Replies to one phone request: chunks at once, the terminal message with its marker.

    The final goes out before its marker is cleared, both handed to the client in one step: a
    crash between them can make the phone hear twice (QoS 1 allows that anyway), never not at
    all."""

    def __init__(self, coordinator: Coordinator, response_topic: str, correlation: bytes | None,
                 content_type: str | None, marker: str | None = None) -> None:
        self._c = coordinator
        self.response_topic = response_topic
        self._correlation = correlation
        self._content_type = content_type
        self._marker = marker
        #: something went to the phone (a copy that loses to another claim after this is a
        #: late conflict, not an abort)
        self.sent = False
        #: another coordinator answers this request: nothing more goes out
        self.muted = False

    def pack(self, msg: wire.TokenChunk | wire.FinalReply | wire.ErrorReplyPhone
             ) -> PhoneMessage:
        ct = self._content_type
        props = response_properties(correlation_data=self._correlation, content_type=(
            wire.CONTENT_TYPE_MSGPACK if wire.is_msgpack(ct) else wire.CONTENT_TYPE_JSON))
        qos = 0 if isinstance(msg, wire.TokenChunk) else 1
        return PhoneMessage(self.response_topic, wire.encode_phone(msg, ct), props, qos)

    async def __call__(self, msg: wire.TokenChunk | wire.FinalReply | wire.ErrorReplyPhone
                       ) -> None:
        c = self._c
        if self.muted:
            return
        self.sent = True
        if isinstance(msg, wire.FinalReply):
            c.counters["finals"] += 1
        elif isinstance(msg, wire.ErrorReplyPhone):
            c.counters["errors"] += 1
        if c.metrics is not None:
            c.metrics.observe_reply(msg)
        if self._marker is None or isinstance(msg, wire.TokenChunk):
            await c.outbox.publish(self.pack(msg))
            return
        await asyncio.gather(c.outbox.publish(self.pack(msg)),
                             c.inflight.close_now(self._marker))


class Coordinator:
    def __init__(
        self,
        cfg: CoordinatorConfig,
        gate: Gate,
        client_factory: ClientFactory,
        *,
        topics: Topics | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        notifier: Notifier | None = None,
        planner: Planner | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.cfg = cfg
        self.gate = gate
        self.client_factory = client_factory
        self.topics = topics or Topics(cfg.root)
        self.clock = clock
        self.wall = wall
        self.notifier = notifier or Notifier()
        self.planner = planner
        self.metrics = metrics
        self.registry = Registry()
        self.link = BrokerLink()
        self.rpc = AgentRpc(self.topics, cfg.id, send=self._send_rpc_now)
        self._rpc_props = response_properties(response_topic=self.rpc.inbox)
        self.outbox = PhoneOutbox(self.link)
        self.incarnation = uuid.uuid4().hex[:12]
        self._stopping = asyncio.Event()
        self.inflight = InflightTracker(
            self.topics, cfg.id, self.incarnation, self.link, clock=clock,
            stopping=self._stopping.is_set, tell=self._tell_orphan,
            reassert=self._publish_online)
        self.limits = Limits(cfg.max_concurrent, cfg.max_concurrent_per_client,
                             cfg.rate_per_client_per_s)
        self.settings = GenerationSettings(
            dist_k=cfg.dist_k, top_k=cfg.top_k, unknown_expert_weight=cfg.unknown_expert_weight,
            step_deadline_min_s=cfg.step_deadline_min_s,
            step_deadline_factor=cfg.step_deadline_factor, open_deadline_s=cfg.open_deadline_s,
            step_deadline_max_s=cfg.step_deadline_max_s, fusion=cfg.fusion,
        )
        self._accepting = True
        self._requests: dict[asyncio.Task[None], str] = {}
        self._ready_sent = False
        self._n = 0
        self._warned: set[str] = set()
        self.counters: dict[str, int] = {"accepted": 0, "rejected": 0, "finals": 0, "errors": 0,
                                         "malformed": 0, "dropped_no_reply_topic": 0,
                                         "taken_over": 0, "cancelled": 0}
        self.node = cfg.node or default_node(cfg.broker)
        self.once = ExactlyOnce(
            self.topics, cfg.id, self.node, self.incarnation, self.link, clock=clock, wall=wall,
            fallback_s=cfg.fallback_s, claim_ttl_s=cfg.claim_ttl_s, heartbeat_s=cfg.heartbeat_s,
            counters=self.counters, accepting=lambda: self._accepting and not cfg.ephemeral)
        self.ctx = RequestContext(
            rpc=self.rpc, registry=lambda: self.registry, gate_values=self._gate_values,
            gate_is_uniform=gate.kind == "uniform",
            plan_for=self.plan_for, top_k_for=self._top_k_for, coordinator_id=cfg.id,
            allow_overrides=cfg.allow_overrides, clock=clock,
            on_step_overhead=planner.record_step_overhead if planner is not None else None,
            vocab_view=self._vocab_view,
        )
        self._vocab_views: dict[str, FamilyVocabView] = {}
        self._views_pending: dict[str, asyncio.Task[None]] = {}
        #: requests with correlation data, as their phone names them (for cancels)
        self._serving: dict[RequestKey, asyncio.Task[None]] = {}
        self._cancelled_by_phone: set[asyncio.Task[None]] = set()
        self._early_cancels = EarlyCancels()

    # ------------------------------------------------------------------ decisions
    def plan_for(self, app: str) -> Sequence[str] | None:
        """The expert set the current plan allows for ``app`` (None = every online expert)."""
        return self.planner.allowed(app) if self.planner is not None else None

    def _top_k_for(self, app: str) -> int | None:
        a = self.cfg.apps.get(app)
        return a.top_k if a is not None else None

    async def _gate_values(self, text: str) -> Mapping[str, float]:
        if self.gate.kind == "uniform":
            return {}
        return await asyncio.to_thread(self.gate.values, text)

    def status(self, state: str) -> wire.CoordinatorStatus:
        return wire.CoordinatorStatus(
            coordinator_id=self.cfg.id, state="online" if state == "online" else "offline",
            gate=self.gate.kind, version=__version__, ts=self.wall())

    def _vocab_view(self, family: str) -> FamilyVocabView:
        """A family's texts indexed for the text path, built once per fingerprint (in a worker
        thread when the vocabulary arrives; here only if a request needs it before that)."""
        view = self._vocab_views.get(family)
        if view is None:
            if len(self._vocab_views) >= 64:  # bounded, like the registry's vocabularies
                self._vocab_views.clear()
            view = FamilyVocabView.build(self.registry.pieces(family) or (),
                                         self.registry.eog_ids(family))
            self._vocab_views[family] = view
        return view

    def fleet_warnings(self, registry: Registry | None = None) -> list[str]:
        """What the operator must know about the fleet now (see coordinator.fleetcheck)."""
        return fleet_warnings(self.gate.experts, self.cfg.unknown_expert_weight,
                              registry if registry is not None else self.registry,
                              self.cfg.fusion)

    # ------------------------------------------------------------------ lifecycle
    def request_stop(self) -> None:
        if not self._stopping.is_set():
            log.info("coordinator %s: stopping (draining %d request(s))", self.cfg.id,
                     len(self._requests))
            self._stopping.set()

    @property
    def in_flight(self) -> int:
        return len(self._requests)

    async def run(self) -> int:
        tasks = [
            asyncio.create_task(self._session_loop(), name="mqtt-session"),
            asyncio.create_task(self.outbox.run(), name="outbox"),
            asyncio.create_task(self.inflight.run(), name="inflight"),
        ]
        if not self.cfg.ephemeral:
            tasks.append(asyncio.create_task(self.once.run(), name="exactly-once"))
        if self.notifier.enabled:
            tasks.append(asyncio.create_task(self._watchdog_loop(), name="watchdog"))
        if self.planner is not None:
            tasks.append(asyncio.create_task(
                self.planner.run(lambda: self.registry, self.publish_plan), name="planner"))
        stop: asyncio.Task[Any] = asyncio.create_task(self._stopping.wait(), name="stop-wait")
        tasks.append(stop)
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stop and not t.cancelled() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            await self._drain()
        finally:
            await cancel_and_wait(tasks)
        return 0

    async def _drain(self) -> None:
        self._accepting = False
        self.once.heartbeat()  # peers re-rank without us now, not after our heartbeats expire
        with contextlib.suppress(aiomqtt.MqttError):
            await self.link.unsubscribe(self.topics.requests_shared(self.cfg.group))
        deadline = self.clock() + self.cfg.drain_timeout_s
        while self._requests and self.clock() < deadline:
            await asyncio.wait(list(self._requests), timeout=max(0.0, deadline - self.clock()))
        if self._requests:
            log.warning("coordinator %s: %d request(s) did not finish within %.1fs; "
                        "their phones get a shutting_down error", self.cfg.id,
                        len(self._requests), self.cfg.drain_timeout_s)
            for t in list(self._requests):
                t.cancel()
            await asyncio.gather(*list(self._requests), return_exceptions=True)
        self.notifier.stopping()
        await self.inflight.flush()
        await self.outbox.flush()
        st = self.topics.coordinator_status(self.cfg.id)
        payload = b"" if self.cfg.ephemeral else st.encode(self.status("offline"))
        with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
            await asyncio.wait_for(self.link.publish(st.topic, payload, qos=1, retain=True), 3.0)

    # ------------------------------------------------------------------ MQTT session
    def will(self) -> aiomqtt.Will:
        t = self.topics.coordinator_status(self.cfg.id)
        return aiomqtt.Will(t.topic, t.encode(self.status("offline")), qos=1, retain=True)

    async def _session_loop(self) -> None:
        def new_client() -> MqttClient:
            client = self.client_factory(self.will())
            self.link.attach(client)
            return client

        await run_session(new_client, self._on_connect, self._on_message, self._on_lost,
                          f"coordinator {self.cfg.id}")

    def _on_lost(self) -> None:
        self.link.detach()
        self.inflight.on_lost()

    async def _on_connect(self, client: MqttClient) -> None:
        tp = self.topics
        await client.subscribe(tp.coordinator_inbox(self.cfg.id).topic, qos=0)
        await client.subscribe(tp.all_agent_status, qos=1)
        await client.subscribe(tp.all_agent_vocab, qos=1)
        await client.subscribe(tp.all_agent_telemetry, qos=0)
        await client.subscribe(tp.all_coordinator_status, qos=1)
        await client.subscribe(tp.inflight_filter(self.cfg.id), qos=1)
        if not self.cfg.ephemeral:
            # not shared: a cancel must reach whichever coordinator serves its request
            await client.subscribe(tp.all_cancels, qos=1)
            await client.subscribe(tp.all_coordinator_claims, qos=1)
            await client.subscribe(tp.all_coordinator_heartbeats, qos=0)
            await client.subscribe(tp.bridge_state("+"), qos=0)
        if self._accepting and not self.cfg.ephemeral:
            await client.subscribe(tp.requests_shared(self.cfg.group), qos=1)
        st = tp.coordinator_status(self.cfg.id)
        await client.publish(st.topic, st.encode(self.status("online")), qos=1, retain=True)
        self.link.connected.set()
        # The finals and errors that waited in the outbox, then the markers.
        await self.outbox.flush()
        await self.inflight.on_connect()
        self.once.on_connect()
        log.info("coordinator %s: online (gate %s, dist_k %d, node %s)", self.cfg.id,
                 self.gate.kind, self.cfg.dist_k, self.node)
        if not self._ready_sent:
            self._ready_sent = True
            self.notifier.ready("accepting requests")

    async def _publish_online(self) -> None:
        st = self.topics.coordinator_status(self.cfg.id)
        await self.link.publish(st.topic, st.encode(self.status("online")), qos=1, retain=True)

    def _on_message(self, message: aiomqtt.Message) -> None:
        topic = str(message.topic)
        tp = self.topics
        data = payload_bytes(message)
        inbox = tp.coordinator_inbox(self.cfg.id)
        if topic == inbox.topic:
            try:
                self.rpc.on_reply(inbox.decode(data))
            except wire.DecodeError as exc:
                log.debug("malformed reply dropped: %s", exc)
            return
        if message.topic.matches(tp.all_requests):
            self._on_request(message, topic, data)
            return
        if message.topic.matches(tp.all_cancels):
            self._on_cancel(message, topic, data)
            return
        if message.topic.matches(tp.all_coordinator_claims):
            self.once.on_claim_message(topic, data)
            return
        if message.topic.matches(tp.all_coordinator_heartbeats):
            self.once.on_heartbeat_message(topic, data)
            return
        if message.topic.matches(tp.bridge_state("+")):
            if data == b"1" and not message.retain:
                log.info("bridge %s connected: its outage queue may follow", topic)
                self.once.on_bridge_up()  # stale copies wait for their claims; greet the far side
            return
        if message.topic.matches(tp.all_coordinator_status):
            gone = self.inflight.on_status(topic, data, retained=bool(message.retain))
            if gone is not None:
                self.once.on_peer_gone(gone)
            return
        if message.topic.matches(tp.inflight_filter()):
            self.inflight.on_marker(topic, data)
            return
        event = self._fleet_event(topic, data)
        if event is not None:
            self.apply(event)

    def _fleet_event(self, topic: str, data: bytes) -> Event | None:
        """An agent's status, telemetry or vocabulary as a registry event (None: not one, or
        malformed -- logged and dropped)."""
        tp = self.topics
        agent_id = tp.agent_id_of(topic)
        if agent_id is None:
            return None
        try:
            if topic.endswith("/status"):
                if not data:
                    return GoneEvent(agent_id)
                st = tp.agent_status(agent_id).decode(data)
                if st.agent_id != agent_id:
                    raise wire.DecodeError("agent id does not match its topic")
                return StatusEvent(st, self.clock())
            if topic.endswith("/telemetry"):
                tm = tp.agent_telemetry(agent_id).decode(data)
                if tm.agent_id != agent_id:
                    raise wire.DecodeError("agent id does not match its topic")
                return TelemetryEvent(tm, self.clock())
            if topic.endswith("/vocab") and data:
                vocab = tp.agent_vocab(agent_id).decode(data)
                if vocab.agent_id != agent_id:
                    raise wire.DecodeError("agent id does not match its topic")
                if not 0 < len(vocab.pieces) <= MAX_VOCAB_PIECES:
                    raise wire.DecodeError(f"{len(vocab.pieces)} pieces (at most "
                                           f"{MAX_VOCAB_PIECES})")
                return VocabEvent(vocab)
        except wire.DecodeError as exc:
            log.debug("malformed message on %s dropped: %s", topic, exc)
        return None

    def apply(self, event: Event) -> None:
        before = self.registry
        self.registry = apply(before, event)
        for gone in set(before.agents) - set(self.registry.agents):
            log.info("agent %s left", gone)
            self.rpc.fail_agent(gone, wire.ErrorCode.INTERNAL, f"agent {gone} went offline")
        for joined in set(self.registry.agents) - set(before.agents):
            log.info("agent %s joined", joined)
        if self.registry.version != before.version:
            self._check_fleet()
        if self.planner is not None:
            self.planner.on_registry(before, self.registry)
        if isinstance(event, VocabEvent):
            self._prepare_views()

    def _prepare_views(self) -> None:
        """Index each new vocabulary for the text path in a worker thread (~0.1-0.3 s for
        150k pieces: not on the event loop, where every request's steps wait)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # applied outside a loop (tests): built when first needed
            return
        for family in self.registry.vocabs:
            if family in self._vocab_views or family in self._views_pending:
                continue
            pieces, eog = self.registry.pieces(family) or (), self.registry.eog_ids(family)

            async def build(family: str = family, pieces: Sequence[bytes] = pieces,
                            eog: frozenset[int] = eog) -> None:
                try:
                    view = await asyncio.to_thread(FamilyVocabView.build, pieces, eog)
                    if self.registry.pieces(family) == pieces:
                        self._vocab_views.setdefault(family, view)
                finally:
                    self._views_pending.pop(family, None)

            self._views_pending[family] = loop.create_task(build(),
                                                           name=f"vocab-view-{family[:8]}")

    def _check_fleet(self) -> None:
        """Log each warning when it first appears (membership changes call this)."""
        now = self.fleet_warnings()
        for w in now:
            if w not in self._warned:
                log.warning("coordinator %s: %s", self.cfg.id, w)
        self._warned = set(now)

    # ------------------------------------------------------------------ phones
    def _on_request(self, message: aiomqtt.Message, topic: str, data: bytes) -> None:
        """A copy of a phone's request: answerable at all? Then :mod:`.once` decides whether
        it is answered here, now (:meth:`_admit`), later or never."""
        client_id = self.topics.client_of_request(topic)
        rt = get_prop(message, "ResponseTopic")
        corr = get_prop(message, "CorrelationData")
        ct = get_prop(message, "ContentType")
        if client_id is None or not rt or not isinstance(rt, str):
            self.counters["dropped_no_reply_topic"] += 1
            log.info("request on %s dropped: no MQTT 5 Response Topic to answer on", topic)
            return
        if not self.topics.response_allowed(client_id, rt):
            self.counters["dropped_no_reply_topic"] += 1
            log.warning("request from %s dropped: response topic %r is outside %s", client_id,
                        rt, self.topics.response_prefix(client_id))
            return
        corr = bytes(corr) if isinstance(corr, (bytes, bytearray)) else None
        ct = ct if isinstance(ct, str) else None
        key = request_key(client_id, rt, corr, ct, data)

        def admit(rank: int) -> None:
            self._admit(key, rank, client_id, rt, corr, ct, data)

        self.once.on_copy(key, admit, len(data))

    def _admit(self, key: str, rank: int, client_id: str, rt: str, corr: bytes | None,
               ct: str | None, data: bytes) -> None:
        """Answer a request here: a refusal (claimed at once), or a served request (claimed
        once its in-flight marker is out)."""
        emit = PhoneEmitter(self, rt, corr, ct)
        if not self._accepting:
            self._reject(emit, wire.ErrorCode.SHUTTING_DOWN, "the coordinator is shutting down",
                         key, rank)
            return
        try:
            req = wire.decode_phone_request(data, ct)
        except wire.DecodeError as exc:
            self.counters["malformed"] += 1
            self._reject(emit, wire.ErrorCode.BAD_REQUEST, f"bad request: {exc}", key, rank)
            return
        problem = request_problem(req, self.cfg)
        if problem is not None:
            self._reject(emit, wire.ErrorCode.BAD_REQUEST, problem, key, rank)
            return
        phone_key = (client_id, corr) if corr is not None else None  # as cancels name it
        if phone_key is not None and self._early_cancels.take(phone_key, self.clock()):
            self._reject(emit, wire.ErrorCode.CANCELLED,
                         "cancelled by the client before it started", key, rank)
            return
        refusal = self.limits.admit(client_id, self.clock())
        if refusal is not None:
            self._reject(emit, refusal.code, refusal.message, key, rank)
            return
        self._n += 1
        self.counters["accepted"] += 1
        if self.metrics is not None:
            self.metrics.observe_request(req.app)
        request_id = f"{key[:16]}-{self._n}"  # agents' session ids carry it (tests count them)
        marker = self.inflight.open(request_id, client_id, rt, corr, ct, key)
        emit = PhoneEmitter(self, rt, corr, ct, marker)
        task = asyncio.create_task(self._serve(req, emit, request_id, marker, key),
                                   name=f"request-{request_id}")
        self._requests[task] = client_id
        if phone_key is not None:
            self._serving[phone_key] = task

        def done(_t: asyncio.Task[None]) -> None:
            # here, not in _serve: a task aborted before it ever ran never enters _serve
            self.inflight.close(marker)  # normally cleared with the terminal message already
            self.limits.release(client_id)
            self.once.finished(key)
            self._requests.pop(task, None)
            self._cancelled_by_phone.discard(task)
            if phone_key is not None and self._serving.get(phone_key) is task:
                del self._serving[phone_key]

        task.add_done_callback(done)

        def abort() -> None:
            emit.muted = True  # whatever the task still tries to send, nothing goes out
            task.cancel()

        self.once.claim(key, rank, sent=lambda: emit.sent, abort=abort)

    async def _serve(self, req: wire.PhoneRequest, emit: PhoneEmitter, request_id: str,
                     marker: str, key: str) -> None:
        announce = asyncio.create_task(self._announce(marker, key), name=f"claim-{request_id}")
        task = asyncio.current_task()
        try:
            await run_request(req, self.ctx, self.settings, emit, request_id,
                              cancelled_by_phone=lambda: task in self._cancelled_by_phone)
        finally:
            if not announce.done():  # ended before its marker was out: no marker to wait for
                announce.cancel()
                if not emit.muted:
                    self.once.announce(key)

    def _on_cancel(self, message: aiomqtt.Message, topic: str, data: bytes) -> None:
        """A phone no longer wants a request: stop the one this coordinator serves (its task
        ends with one ``cancelled`` error and closes the agents' sessions), or remember the
        cancel for a while in case its request is still on the way here."""
        client_id = self.topics.client_of_cancel(topic)
        corr = get_prop(message, "CorrelationData")
        ct = get_prop(message, "ContentType")
        if client_id is None or not isinstance(corr, (bytes, bytearray)):
            return
        try:
            wire.decode_phone_cancel(data, ct if isinstance(ct, str) else None)
        except wire.DecodeError as exc:
            log.debug("malformed cancel from %s dropped: %s", client_id, exc)
            return
        key = (client_id, bytes(corr))
        task = self._serving.get(key)
        if task is None:
            if self._accepting:
                self._early_cancels.add(key, self.clock())
            return
        if task not in self._cancelled_by_phone and not task.done():
            log.info("request %s cancelled by %s", task.get_name(), client_id)
            self.counters["cancelled"] += 1
            self._cancelled_by_phone.add(task)
            # not at once: a task cancelled before its first step never runs its body (no
            # terminal message, no cleanup); scheduled now, this runs after that first step
            asyncio.get_running_loop().call_soon(task.cancel)

    async def _announce(self, marker: str, key: str) -> None:
        """The request's in-flight marker, then its claim: whoever sees the claim can count on
        the marker (a survivor tells the phone if we die)."""
        await self.inflight.publish_now(marker)
        self.once.announce(key)

    def _reject(self, emit: PhoneEmitter, code: wire.ErrorCode, message: str, key: str,
                rank: int) -> None:
        self.counters["rejected"] += 1
        self.once.claim(key, rank)
        self.outbox.put(emit.pack(wire.ErrorReplyPhone(code=code, message=message)))

    async def _tell_orphan(self, m: wire.InflightMarker) -> None:
        """A request whose coordinator died: tell its phone to retry -- unless it is answered
        anyway: this coordinator holds or serves a copy of it (the dead one died before its
        claim went out; its Last Will made the held copy due at once), or answered it, or
        another coordinator's claim says it answers it. One terminal reply, never two."""
        if m.request_key and self.once.answered_without(m.request_key, m.coordinator_id,
                                                        m.incarnation):
            log.info("%s died serving %s's request %s, which is answered anyway (here or by "
                     "another claim): not telling the phone", m.coordinator_id, m.client_id,
                     m.request_key[:12])
            return
        self.counters["taken_over"] += 1
        who = ("a previous run of this coordinator" if m.coordinator_id == self.cfg.id
               else f"coordinator {m.coordinator_id}")
        log.info("telling %s that %s died during its request", m.client_id, who)
        await PhoneEmitter(self, m.response_topic, m.correlation, m.content_type)(
            wire.ErrorReplyPhone(code=wire.ErrorCode.SHUTTING_DOWN,
                                 message=f"{who} went offline before this request finished; "
                                         "retry"))

    async def answer(self, req: wire.PhoneRequest, *,
                     observer: Callable[[str, int, Fused, int], None] | None = None,
                     text_observer: TextObserver | None = None,
                     ) -> tuple[wire.FinalReply | wire.ErrorReplyPhone, str]:
        """Serve one request in this process (``moe2 eval``): the same generation over MQTT as
        a phone's request, without the phone hop. Returns the final (or error) and the text
        streamed in chunks. ``observer`` sees each step fused over ids (one family),
        ``text_observer`` each step fused over texts (across families)."""
        self._n += 1
        out: list[wire.TokenChunk | wire.FinalReply | wire.ErrorReplyPhone] = []

        async def emit(msg: wire.TokenChunk | wire.FinalReply | wire.ErrorReplyPhone) -> None:
            out.append(msg)

        ctx = replace(self.ctx, observer=observer or self.ctx.observer,
                      text_observer=text_observer or self.ctx.text_observer)
        await run_request(req, ctx, self.settings, emit, f"{self._n}{uuid.uuid4().hex[:6]}")
        terminal = out[-1]
        assert isinstance(terminal, (wire.FinalReply, wire.ErrorReplyPhone))
        return terminal, "".join(m.text for m in out if isinstance(m, wire.TokenChunk))

    # ------------------------------------------------------------------ loops
    def _send_rpc_now(self, out: Outgoing) -> bool:
        """The token path: write a step to its agent in this loop iteration. While the broker
        is away it is dropped, not queued -- sent after a reconnect it could overtake a later
        close (a leaked session) -- and the step deadline drops the expert."""
        client = self.link.client
        if client is not None:
            try:
                client.publish_now(out.topic, out.payload, properties=self._rpc_props)
            except aiomqtt.MqttError as exc:
                log.debug("rpc not sent: %s", exc)
        return True

    async def _watchdog_loop(self) -> None:
        interval = watchdog_interval_s(default_s=5.0)
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def publish_plan(self, msg: wire.PlanMsg) -> None:
        t = self.topics.plan
        with contextlib.suppress(aiomqtt.MqttError):
            # A connection that just died never acknowledges; without a short timeout the
            # planner would wait aiomqtt's default 10 s here before it could replan.
            await self.link.publish(t.topic, t.encode(msg), qos=1, retain=True,
                                    timeout_s=PLAN_PUBLISH_TIMEOUT_S)
