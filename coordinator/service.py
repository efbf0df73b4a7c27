"""The coordinator service: phones' requests in, fused tokens out.

One task group of named loops (STYLE.md): the MQTT session with its reconnect loop, the phone
outbox, the in-flight markers, the planner, the watchdog (steps to agents are written from the
request tasks themselves, see :meth:`Coordinator._send_rpc_now`); plus one task per accepted
request, tracked and awaited -- never fire-and-forget. Gate, client factory, clock and planner
are injected; ``cli/coordinator`` wires the real ones.

In-flight markers (how phones hear about a coordinator that dies mid-request): while it serves a
request, a coordinator keeps a retained :class:`InflightMarker` (the phone's response topic and
correlation data) on ``{root}/coordinators/{id}/inflight/{request_id}`` and clears it together
with the request's final or error (final first: a crash between the two can duplicate the
terminal message, as QoS 1 may anyway, but never lose it). When a coordinator's Last Will (its
retained ``offline`` status) arrives live and it stays offline for ``TAKEOVER_GRACE_S``, the
surviving coordinator with the lowest id subscribes to the dead one's markers and sends each
phone a ``shutting_down`` error, clearing each marker. A coordinator restarted under the same id
does the same for the markers of its previous incarnation. Wills that arrive while the survivor
itself loses the broker (a broker restart sends every client's will) start no takeover. A
request still on its way into a coordinator that dies (no marker yet: MQTT drops what a clean
session had not processed) is left to the phone, which saw the will (see
:mod:`moe2.coordinator.phone`); with no coordinator left, to the phone's silence timeout.

Markers live under ``{root}/coordinators/+/inflight/+``: a secured broker must let coordinators
read and write there (and phones read ``{root}/coordinators/+/status``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, TypeVar

import aiomqtt
import msgspec

from moe2.coordinator.fleetcheck import fleet_warnings
from moe2.coordinator.generation import GenerationSettings, RequestContext, run_request
from moe2.coordinator.limits import Limits
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
from moe2.shared import __version__, wire
from moe2.shared.config import CoordinatorConfig
from moe2.shared.mqtt import (
    Client,
    cancel_and_wait,
    get_prop,
    payload_bytes,
    response_properties,
    run_session,
)
from moe2.shared.sdnotify import Notifier, watchdog_interval_s
from moe2.shared.topics import Topics, publishable_topic, valid_name

log = logging.getLogger(__name__)

ClientFactory = Callable[[aiomqtt.Will], Client]
T = TypeVar("T")

#: how long a peer must stay offline after its Last Will before its phones are told
TAKEOVER_GRACE_S = 1.0
#: how long a takeover listens for the dead peer's retained markers
TAKEOVER_WINDOW_S = 10.0
#: bounds on peer bookkeeping (hostile status floods cannot grow it further)
MAX_PEERS = 1024
#: a vocabulary with more pieces is refused (the largest real ones have ~256k): each piece
#: costs far more in memory than its two bytes on the wire
MAX_VOCAB_PIECES = 1 << 20
#: an outbox reply during whose publishing this many connections were lost is dropped
OUTBOX_MAX_LOSSES = 3
#: the planner does not wait longer than this for the broker to acknowledge a plan
PLAN_PUBLISH_TIMEOUT_S = 2.0
#: the smallest non-zero sampling temperature accepted (0 = greedy)
MIN_TEMPERATURE = 1e-6


class InflightMarker(msgspec.Struct, frozen=True, forbid_unknown_fields=True,
                     tag_field="type", tag="inflight"):
    """Retained while a coordinator serves one request: how to reach the phone if it dies.

    Coordinator-to-coordinator only (phones never see it); MessagePack.
    """

    coordinator_id: str
    incarnation: str
    client_id: str
    response_topic: str
    correlation: bytes | None = None
    content_type: str | None = None
    v: int = wire.PROTOCOL_VERSION


_marker_decoder = msgspec.msgpack.Decoder(InflightMarker)


def decode_marker(data: bytes) -> InflightMarker:
    try:
        m = _marker_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError,
            RecursionError, OverflowError) as exc:
        raise wire.DecodeError(str(exc) or type(exc).__name__) from None
    if m.v != wire.PROTOCOL_VERSION:
        raise wire.DecodeError(f"marker version {m.v} is not supported")
    return m


def inflight_topic(topics: Topics, coordinator_id: str, request_id: str) -> str:
    """``{root}/coordinators/{id}/inflight/{request_id}`` (retained marker of one request)."""
    return topics.coordinator_inflight(coordinator_id, request_id)


def inflight_filter(topics: Topics, coordinator_id: str = "+") -> str:
    return topics.coordinator_inflight(coordinator_id, "+")


def coordinator_of(topics: Topics, topic: str) -> str | None:
    """``{root}/coordinators/{id}/...`` -> id (a valid name), else None."""
    prefix = f"{topics.root}/coordinators/"
    if not topic.startswith(prefix):
        return None
    cid = topic[len(prefix):].split("/", 1)[0]
    return cid if valid_name(cid) else None


def takeover_handler(self_id: str, peers_online: Sequence[str]) -> bool:
    """Whether ``self_id`` is the one coordinator that tells a dead peer's phones (lowest id)."""
    return min([self_id, *peers_online]) == self_id


class Coordinator:
    def __init__(
        self,
        cfg: CoordinatorConfig,
        gate: Any,
        client_factory: ClientFactory,
        *,
        topics: Topics | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        notifier: Notifier | None = None,
        planner: Any | None = None,
        metrics: Any | None = None,
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
        self.rpc = AgentRpc(self.topics, cfg.id)
        self._rpc_props = response_properties(response_topic=self.rpc.inbox)
        self.rpc.direct = self._send_rpc_now
        self.limits = Limits(cfg.max_concurrent, cfg.max_concurrent_per_client,
                             cfg.rate_per_client_per_s)
        self.settings = GenerationSettings(
            dist_k=cfg.dist_k, top_k=cfg.top_k, unknown_expert_weight=cfg.unknown_expert_weight,
            step_deadline_min_s=cfg.step_deadline_min_s,
            step_deadline_factor=cfg.step_deadline_factor, open_deadline_s=cfg.open_deadline_s,
            step_deadline_max_s=cfg.step_deadline_max_s,
        )
        self._client: Client | None = None
        self._connected = asyncio.Event()
        self._conn_lost = asyncio.Event()  # set when the current connection ends
        self._stopping = asyncio.Event()
        self._accepting = True
        self._requests: dict[asyncio.Task[None], str] = {}
        # (topic, payload, properties, qos, connections lost while publishing it)
        self._outbox: deque[tuple[str, bytes, Any, int, int]] = deque(maxlen=100_000)
        self._outbox_event = asyncio.Event()
        self._ready_sent = False
        self._n = 0
        # in-flight markers (see the module docstring)
        self.incarnation = uuid.uuid4().hex[:12]
        self._markers: dict[str, bytes] = {}  # marker topic -> payload, while the request runs
        self._marker_dirty: set[str] = set()  # topics whose retained state is not published yet
        self._peers: set[str] = set()  # other coordinators seen online
        self._takeover_due: dict[str, float] = {}  # dead peer -> when its phones may be told
        self._takeovers: dict[str, float] = {}  # dead peer -> when we subscribed to its markers
        self._orphans: deque[tuple[str, InflightMarker]] = deque(maxlen=100_000)
        self._reassert = False
        self._inflight_event = asyncio.Event()
        self._warned: set[str] = set()
        self.counters: dict[str, int] = {"accepted": 0, "rejected": 0, "finals": 0, "errors": 0,
                                         "malformed": 0, "dropped_no_reply_topic": 0,
                                         "taken_over": 0}
        self.ctx = RequestContext(
            rpc=self.rpc, registry=lambda: self.registry, gate_values=self._gate_values,
            gate_is_uniform=getattr(gate, "kind", "uniform") == "uniform",
            plan_for=self.plan_for, top_k_for=self._top_k_for, coordinator_id=cfg.id,
            allow_overrides=cfg.allow_overrides, clock=clock,
            on_step_overhead=getattr(planner, "record_step_overhead", None),
        )

    # ------------------------------------------------------------------ decisions
    def plan_for(self, app: str) -> Sequence[str] | None:
        """The expert set the current plan allows for ``app`` (None = every online expert)."""
        if self.planner is None:
            return None
        result: Sequence[str] | None = self.planner.allowed(app)
        return result

    def _top_k_for(self, app: str) -> int | None:
        a = self.cfg.apps.get(app)
        return a.top_k if a is not None else None

    async def _gate_values(self, text: str) -> Mapping[str, float]:
        if getattr(self.gate, "kind", "uniform") == "uniform":
            return {}
        values: Mapping[str, float] = await asyncio.to_thread(self.gate.values, text)
        return values

    def status(self, state: str) -> wire.CoordinatorStatus:
        return wire.CoordinatorStatus(
            coordinator_id=self.cfg.id, state="online" if state == "online" else "offline",
            gate=getattr(self.gate, "kind", "uniform"), version=__version__, ts=self.wall())

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
            asyncio.create_task(self._outbox_loop(), name="outbox"),
            asyncio.create_task(self._inflight_loop(), name="inflight"),
        ]
        if self.notifier.enabled:
            tasks.append(asyncio.create_task(self._watchdog_loop(), name="watchdog"))
        if self.planner is not None:
            tasks.append(asyncio.create_task(self.planner.run(self), name="planner"))
        stop: asyncio.Task[Any] = asyncio.create_task(self._wait_stop(), name="stop-wait")
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

    async def _wait_stop(self) -> None:
        await self._stopping.wait()

    async def _drain(self) -> None:
        self._accepting = False
        client = self._client
        if client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await client.unsubscribe(self.topics.requests_shared(self.cfg.group))
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
        await self._flush_markers()
        await self._flush_outbox()
        if client is not None:
            st = self.topics.coordinator_status(self.cfg.id)
            with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
                await asyncio.wait_for(client.publish(
                    st.topic, st.encode(self.status("offline")), qos=1, retain=True), 3.0)

    # ------------------------------------------------------------------ MQTT session
    def will(self) -> aiomqtt.Will:
        t = self.topics.coordinator_status(self.cfg.id)
        return aiomqtt.Will(t.topic, t.encode(self.status("offline")), qos=1, retain=True)

    async def _session_loop(self) -> None:
        def new_client() -> Client:
            self._conn_lost = asyncio.Event()  # one per connection attempt
            return self.client_factory(self.will())

        await run_session(new_client, self._on_connect, self._on_message, self._on_lost,
                          f"coordinator {self.cfg.id}")

    def _on_lost(self) -> None:
        self._conn_lost.set()
        self._client = None
        self._connected.clear()
        self._forget_peers()

    async def _on_connect(self, client: Client) -> None:
        self._client = client
        tp = self.topics
        await client.subscribe(tp.coordinator_inbox(self.cfg.id).topic, qos=0)
        await client.subscribe(tp.all_agent_status, qos=1)
        await client.subscribe(f"{tp.root}/agents/+/vocab", qos=1)
        await client.subscribe(tp.all_agent_telemetry, qos=0)
        await client.subscribe(tp.all_coordinator_status, qos=1)
        await client.subscribe(inflight_filter(tp, self.cfg.id), qos=1)
        if self._accepting:
            await client.subscribe(tp.requests_shared(self.cfg.group), qos=1)
        st = tp.coordinator_status(self.cfg.id)
        await client.publish(st.topic, st.encode(self.status("online")), qos=1, retain=True)
        self._connected.set()
        # The finals and errors that waited in the outbox, then the markers (a broker without
        # persistence lost them; clears of those finals may be pending).
        await self._flush_outbox()
        self._marker_dirty.update(self._markers)
        await self._flush_markers()
        log.info("coordinator %s: online (gate %s, dist_k %d)", self.cfg.id,
                 getattr(self.gate, "kind", "uniform"), self.cfg.dist_k)
        if not self._ready_sent:
            self._ready_sent = True
            self.notifier.ready("accepting requests")

    def _on_message(self, message: aiomqtt.Message) -> None:
        topic = str(message.topic)
        tp = self.topics
        data = payload_bytes(message)
        if message.topic.matches(tp.coordinator_inbox(self.cfg.id).topic):
            try:
                self.rpc.on_reply(tp.coordinator_inbox(self.cfg.id).decode(data))
            except wire.DecodeError as exc:
                log.debug("malformed reply dropped: %s", exc)
            return
        if message.topic.matches(tp.all_requests):
            self._on_request(message, topic, data)
            return
        if message.topic.matches(tp.all_coordinator_status):
            self._on_peer_status(topic, data, retained=bool(message.retain))
            return
        if message.topic.matches(inflight_filter(tp)):
            self._on_marker(topic, data)
            return
        agent_id = tp.agent_id_of(topic)
        if agent_id is None:
            return
        now = self.clock()
        event: Event | None = None
        try:
            if topic.endswith("/status"):
                if not data:
                    event = GoneEvent(agent_id)
                else:
                    st = tp.agent_status(agent_id).decode(data)
                    if st.agent_id != agent_id:
                        raise wire.DecodeError("agent id does not match its topic")
                    event = StatusEvent(st, now)
            elif topic.endswith("/telemetry"):
                tm = tp.agent_telemetry(agent_id).decode(data)
                if tm.agent_id != agent_id:
                    raise wire.DecodeError("agent id does not match its topic")
                event = TelemetryEvent(tm, now)
            elif topic.endswith("/vocab") and data:
                vocab = tp.agent_vocab(agent_id).decode(data)
                if vocab.agent_id != agent_id:
                    raise wire.DecodeError("agent id does not match its topic")
                if not 0 < len(vocab.pieces) <= MAX_VOCAB_PIECES:
                    raise wire.DecodeError(f"{len(vocab.pieces)} pieces (at most "
                                           f"{MAX_VOCAB_PIECES})")
                event = VocabEvent(vocab)
        except wire.DecodeError as exc:
            log.debug("malformed message on %s dropped: %s", topic, exc)
            return
        if event is not None:
            self.apply(event)

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

    def fleet_warnings(self, registry: Registry | None = None) -> list[str]:
        """What the operator must know about the fleet now (see coordinator.fleetcheck)."""
        experts = tuple(getattr(self.gate, "experts", ()))
        return fleet_warnings(experts, self.cfg.unknown_expert_weight,
                              registry if registry is not None else self.registry)

    def _check_fleet(self) -> None:
        """Log each warning when it first appears (membership changes call this)."""
        now = self.fleet_warnings()
        for w in now:
            if w not in self._warned:
                log.warning("coordinator %s: %s", self.cfg.id, w)
        self._warned = set(now)

    # ------------------------------------------------------------------ phones
    def _on_request(self, message: aiomqtt.Message, topic: str, data: bytes) -> None:
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
        emit = self._phone_emitter(rt, corr, ct)
        if not self._accepting:
            self._reject(emit, wire.ErrorCode.SHUTTING_DOWN, "the coordinator is shutting down")
            return
        try:
            req = wire.decode_phone_request(data, ct)
        except wire.DecodeError as exc:
            self.counters["malformed"] += 1
            self._reject(emit, wire.ErrorCode.BAD_REQUEST, f"bad request: {exc}")
            return
        problem = self._check_bounds(req)
        if problem is not None:
            self._reject(emit, wire.ErrorCode.BAD_REQUEST, problem)
            return
        refusal = self.limits.admit(client_id, self.clock())
        if refusal is not None:
            self._reject(emit, refusal.code, refusal.message)
            return
        self._n += 1
        self.counters["accepted"] += 1
        if self.metrics is not None:
            self.metrics.observe_request(req.app)
        request_id = f"{self._n}{uuid.uuid4().hex[:6]}"
        marker = inflight_topic(self.topics, self.cfg.id, request_id)
        self._markers[marker] = msgspec.msgpack.encode(InflightMarker(
            coordinator_id=self.cfg.id, incarnation=self.incarnation, client_id=client_id,
            response_topic=rt, correlation=corr, content_type=ct))
        self._marker_dirty.add(marker)
        self._inflight_event.set()
        emit = self._phone_emitter(rt, corr, ct, marker)
        task = asyncio.create_task(self._serve(req, emit, request_id, client_id, marker),
                                   name=f"request-{request_id}")
        self._requests[task] = client_id

    def _check_bounds(self, req: wire.PhoneRequest) -> str | None:
        n_chars = len(req.prompt or "") + sum(len(m.content) for m in req.messages or [])
        if n_chars > self.cfg.max_prompt_chars:
            return (f"prompt has {n_chars} characters; this coordinator accepts at most "
                    f"{self.cfg.max_prompt_chars}")
        if req.max_tokens > self.cfg.max_tokens_limit:
            return f"max_tokens {req.max_tokens} exceeds the limit of {self.cfg.max_tokens_limit}"
        if 0.0 < req.temperature < MIN_TEMPERATURE:  # p^(1/T) overflows to NaN below this
            return (f"temperature {req.temperature:g} is too small: use 0 for greedy decoding "
                    f"or at least {MIN_TEMPERATURE:g}")
        if self.cfg.apps and req.app not in self.cfg.apps:
            return f"unknown app {req.app!r}; known: {', '.join(sorted(self.cfg.apps))}"
        return None

    async def _serve(self, req: wire.PhoneRequest, emit: Any, request_id: str,
                     client_id: str, marker: str) -> None:
        try:
            await run_request(req, self.ctx, self.settings, emit, request_id)
        finally:
            if self._markers.pop(marker, None) is not None:  # normally cleared by the emitter
                self._marker_dirty.add(marker)
                self._inflight_event.set()
            self.limits.release(client_id)
            task = asyncio.current_task()
            if task is not None:
                self._requests.pop(task, None)

    def _reject(self, emit: Any, code: wire.ErrorCode, message: str) -> None:
        self.counters["rejected"] += 1
        msg = wire.ErrorReplyPhone(code=code, message=message)
        self._queue_phone(*emit.pack(msg))

    def _phone_emitter(self, rt: str, corr: bytes | None, ct: str | None,
                       marker: str | None = None) -> Any:
        coordinator = self

        class _Emit:
            def pack(self, msg: Any) -> tuple[str, bytes, Any, int]:
                props = response_properties(correlation_data=corr, content_type=(
                    wire.CONTENT_TYPE_MSGPACK if wire.is_msgpack(ct) else wire.CONTENT_TYPE_JSON))
                qos = 0 if isinstance(msg, wire.TokenChunk) else 1
                return rt, wire.encode_phone(msg, ct), props, qos

            async def __call__(self, msg: Any) -> None:
                if isinstance(msg, wire.FinalReply):
                    coordinator.counters["finals"] += 1
                elif isinstance(msg, wire.ErrorReplyPhone):
                    coordinator.counters["errors"] += 1
                if coordinator.metrics is not None:
                    coordinator.metrics.observe_reply(msg)
                if marker is None or isinstance(msg, wire.TokenChunk):
                    await coordinator._publish(*self.pack(msg))
                    return
                # The final goes out before its marker is cleared, both handed to the client in
                # one step: a crash between them can make the phone hear twice (QoS 1 allows
                # that anyway), never not at all.
                coordinator._markers.pop(marker, None)
                await asyncio.gather(coordinator._publish(*self.pack(msg)),
                                     coordinator._publish_marker(marker))

        return _Emit()

    def _queue_phone(self, topic: str, payload: bytes, props: Any, qos: int) -> None:
        self._outbox.append((topic, payload, props, qos, 0))
        self._outbox_event.set()

    async def _publish(self, topic: str, payload: bytes, props: Any, qos: int) -> None:
        """Publish to a phone. While the broker is away, finals and errors (QoS 1) wait in the
        outbox and go out after the reconnect; token chunks are dropped (the final has the
        whole text)."""
        client = self._client
        if client is not None and self._connected.is_set():
            try:
                if qos > 0:
                    await self._until_lost(client.publish(topic, payload, qos=qos,
                                                          properties=props))
                else:
                    client.publish_now(topic, payload, properties=props)
                return
            except aiomqtt.MqttError:
                pass
        if qos > 0:
            self._outbox.append((topic, payload, props, qos, 0))
            self._outbox_event.set()

    async def _until_lost(self, op: Coroutine[Any, Any, T]) -> T:
        """Await a publish or (un)subscribe unless its connection drops first (then MqttError):
        aiomqtt would wait its 10 s timeout for an acknowledgement that cannot come -- holding a
        request's final that long before it could go to the outbox, or the in-flight loop."""
        lost = self._conn_lost
        pub = asyncio.ensure_future(op)
        watch = asyncio.ensure_future(lost.wait())
        try:
            await asyncio.wait({pub, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not pub.done():
                pub.cancel()
        if not pub.done() or pub.cancelled():
            raise aiomqtt.MqttError("the connection was lost before the broker acknowledged")
        return pub.result()

    async def _flush_outbox(self) -> None:
        while self._outbox:
            client = self._client
            if client is None or not self._connected.is_set():
                return
            item = self._outbox.popleft()
            lost = self._conn_lost  # this connection's (a reconnect makes a new one)
            try:
                await self._until_lost(client.publish(item[0], item[1], qos=item[3],
                                                      properties=item[2]))
            except aiomqtt.MqttError:
                if not lost.is_set():  # refused or timed out on a live connection: retry
                    self._outbox.appendleft(item)
                    return
                if item[4] + 1 >= OUTBOX_MAX_LOSSES:
                    # The same message lost the connection again and again: the broker refuses
                    # it (and disconnects us for it); retrying forever would keep us offline.
                    log.error("reply to %r dropped: %d connections lost while sending it",
                              item[0][:200], item[4] + 1)
                else:
                    self._outbox.appendleft((*item[:4], item[4] + 1))
                return

    # ------------------------------------------------------------------ in-flight markers
    async def _publish_marker(self, topic: str) -> None:
        """Publish a marker's current state: its payload while the request runs, else a clear.

        The state is read and handed to the client in one step, so whichever call goes last
        leaves the right retained message; a failed publish is retried after the reconnect.
        """
        client = self._client
        if client is None or not self._connected.is_set():
            self._marker_dirty.add(topic)
            return
        self._marker_dirty.discard(topic)
        try:
            await self._until_lost(client.publish(topic, self._markers.get(topic, b""), qos=1,
                                                  retain=True))
        except aiomqtt.MqttError:
            self._marker_dirty.add(topic)
            self._inflight_event.set()

    async def _flush_markers(self) -> None:
        """Every pending marker change, handed to the client at once."""
        if self._marker_dirty:
            await asyncio.gather(*[self._publish_marker(t) for t in list(self._marker_dirty)])

    def _forget_peers(self) -> None:
        """Without the broker we cannot tell a dead peer from our own outage: start over."""
        self._peers.clear()
        self._takeover_due.clear()
        self._takeovers.clear()

    def _on_peer_status(self, topic: str, data: bytes, *, retained: bool) -> None:
        cid = coordinator_of(self.topics, topic)
        if cid is None:
            return
        try:
            st = self.topics.coordinator_status(cid).decode(data) if data else None
        except wire.DecodeError as exc:
            log.debug("malformed coordinator status on %s dropped: %s", topic, exc)
            return
        if st is not None and st.coordinator_id != cid:
            return
        online = st is not None and st.state == "online"
        if cid == self.cfg.id:
            if not online and not self._stopping.is_set():
                self._reassert = True  # a stale will or a forged status: we are alive
                self._inflight_event.set()
            return
        if online:
            if cid in self._peers or len(self._peers) < MAX_PEERS:
                self._peers.add(cid)
            self._takeover_due.pop(cid, None)
            if cid in self._takeovers:
                self._inflight_event.set()  # the loop unsubscribes
            return
        self._peers.discard(cid)
        # Only a will seen live while we are connected means the peer died; a retained offline
        # status is history, and the peer may be reconnecting.
        if (not retained and cid not in self._takeovers and cid not in self._takeover_due
                and len(self._takeover_due) < MAX_PEERS):
            self._takeover_due[cid] = self.clock() + TAKEOVER_GRACE_S
            self._inflight_event.set()

    def _on_marker(self, topic: str, data: bytes) -> None:
        cid = coordinator_of(self.topics, topic)
        if cid is None or not data:
            return
        try:
            m = decode_marker(data)
        except wire.DecodeError as exc:
            log.debug("malformed in-flight marker on %s dropped: %s", topic, exc)
            return
        if m.coordinator_id != cid:
            return
        if cid == self.cfg.id:
            if m.incarnation == self.incarnation:
                return  # our own, live
        elif cid not in self._takeovers or cid in self._peers:
            return
        self._orphans.append((topic, m))
        self._inflight_event.set()

    async def _tell_orphan(self, client: aiomqtt.Client, topic: str, m: InflightMarker) -> None:
        """A request whose coordinator died: tell the phone, then clear the marker."""
        if (self.topics.response_allowed(m.client_id, m.response_topic)
                and publishable_topic(m.response_topic)):
            self.counters["taken_over"] += 1
            who = ("a previous run of this coordinator" if m.coordinator_id == self.cfg.id
                   else f"coordinator {m.coordinator_id}")
            log.info("telling %s that %s died during its request", m.client_id, who)
            emit = self._phone_emitter(m.response_topic, m.correlation, m.content_type)
            await emit(wire.ErrorReplyPhone(
                code=wire.ErrorCode.SHUTTING_DOWN,
                message=f"{who} went offline before this request finished; retry"))
        with contextlib.suppress(aiomqtt.MqttError):
            await self._until_lost(client.publish(topic, b"", qos=1, retain=True))

    async def _inflight_loop(self) -> None:
        """Publish marker changes; take over dead peers' markers; answer orphaned requests."""
        while True:
            wake_s = min([*self._takeover_due.values(),
                          *(t + TAKEOVER_WINDOW_S for t in self._takeovers.values())],
                         default=None)
            timeout = None if wake_s is None else max(0.0, wake_s - self.clock())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._inflight_event.wait(), timeout)
            self._inflight_event.clear()
            client = self._client
            if client is None or not self._connected.is_set():
                continue  # _on_connect flushes the markers; peers are forgotten
            await self._flush_markers()
            if self._reassert and not self._stopping.is_set():
                self._reassert = False
                st = self.topics.coordinator_status(self.cfg.id)
                with contextlib.suppress(aiomqtt.MqttError):
                    await self._until_lost(client.publish(
                        st.topic, st.encode(self.status("online")), qos=1, retain=True))
            now = self.clock()
            for cid, due in list(self._takeover_due.items()):
                if due > now:
                    continue
                del self._takeover_due[cid]
                if cid in self._peers or not takeover_handler(self.cfg.id, sorted(self._peers)):
                    continue
                log.warning("coordinator %s is gone: telling the phones of its requests", cid)
                self._takeovers[cid] = now
                with contextlib.suppress(aiomqtt.MqttError):
                    await self._until_lost(client.subscribe(inflight_filter(self.topics, cid),
                                                            qos=1))
            for cid, since in list(self._takeovers.items()):
                if cid in self._peers or now - since > TAKEOVER_WINDOW_S:
                    del self._takeovers[cid]
                    with contextlib.suppress(aiomqtt.MqttError):
                        await self._until_lost(client.unsubscribe(
                            inflight_filter(self.topics, cid)))
            while self._orphans:
                topic, marker = self._orphans.popleft()
                await self._tell_orphan(client, topic, marker)

    # ------------------------------------------------------------------ loops
    async def _outbox_loop(self) -> None:
        while True:
            await self._outbox_event.wait()
            await self._connected.wait()
            await self._flush_outbox()
            if not self._outbox:
                self._outbox_event.clear()
            else:
                await asyncio.sleep(0.1)

    def _send_rpc_now(self, out: Outgoing) -> bool:
        """The token path: write a step to its agent in this loop iteration. While the broker
        is away it is dropped, not queued -- sent after a reconnect it could overtake a later
        close (a leaked session) -- and the step deadline drops the expert."""
        client = self._client
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
        client = self._client
        if client is None:
            return
        t = self.topics.plan
        with contextlib.suppress(aiomqtt.MqttError):
            # A connection that just died never acknowledges; without a short timeout the
            # planner would wait aiomqtt's default 10 s here before it could replan.
            await client.publish(t.topic, t.encode(msg), qos=1, retain=True,
                                 timeout=PLAN_PUBLISH_TIMEOUT_S)
