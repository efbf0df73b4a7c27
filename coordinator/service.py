"""The coordinator service: phones' requests in, fused tokens out.

One task group of named loops (STYLE.md): the MQTT session with its reconnect loop, the RPC
sender, the planner, the watchdog; plus one task per accepted request, tracked and awaited --
never fire-and-forget. Gate, client factory, clock and planner are injected; ``cli/coordinator``
wires the real ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import aiomqtt

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
from moe2.coordinator.rpc import AgentRpc
from moe2.shared import __version__, wire
from moe2.shared.config import CoordinatorConfig
from moe2.shared.mqtt import Backoff, get_prop, payload_bytes, response_properties
from moe2.shared.sdnotify import Notifier, watchdog_interval_s
from moe2.shared.topics import Topics

log = logging.getLogger(__name__)

ClientFactory = Callable[[aiomqtt.Will], aiomqtt.Client]


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
        self.limits = Limits(cfg.max_concurrent, cfg.max_concurrent_per_client,
                             cfg.rate_per_client_per_s)
        self.settings = GenerationSettings(
            dist_k=cfg.dist_k, top_k=cfg.top_k, unknown_expert_weight=cfg.unknown_expert_weight,
            step_deadline_min_s=cfg.step_deadline_min_s,
            step_deadline_factor=cfg.step_deadline_factor, open_deadline_s=cfg.open_deadline_s,
        )
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._stopping = asyncio.Event()
        self._accepting = True
        self._requests: dict[asyncio.Task[None], str] = {}
        self._outbox: deque[tuple[str, bytes, Any, int]] = deque(maxlen=100_000)
        self._outbox_event = asyncio.Event()
        self._ready_sent = False
        self._n = 0
        self.counters: dict[str, int] = {"accepted": 0, "rejected": 0, "finals": 0, "errors": 0,
                                         "malformed": 0, "dropped_no_reply_topic": 0}
        self.ctx = RequestContext(
            rpc=self.rpc, registry=lambda: self.registry, gate_values=self._gate_values,
            gate_is_uniform=getattr(gate, "kind", "uniform") == "uniform",
            plan_for=self.plan_for, top_k_for=self._top_k_for, coordinator_id=cfg.id,
            clock=clock,
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
            asyncio.create_task(self._rpc_sender(), name="rpc-sender"),
            asyncio.create_task(self._outbox_loop(), name="outbox"),
        ]
        if self.notifier.enabled:
            tasks.append(asyncio.create_task(self._watchdog_loop(), name="watchdog"))
        if self.planner is not None:
            tasks.append(asyncio.create_task(self.planner.run(self), name="planner"))
        try:
            stop = asyncio.create_task(self._stopping.wait(), name="stop-wait")
            done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stop and not t.cancelled() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            await self._drain()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return 0

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
        backoff = Backoff()
        while True:
            client = self.client_factory(self.will())
            try:
                async with client:
                    self._client = client
                    await self._on_connect(client)
                    backoff.reset()
                    async for message in client.messages:
                        try:
                            self._on_message(message)
                        except Exception:
                            log.exception("coordinator: message on %s not handled",
                                          message.topic)
            except aiomqtt.MqttError as exc:
                delay = backoff.next_delay_s()
                log.warning("coordinator %s: broker connection lost (%s); retrying in %.1fs",
                            self.cfg.id, exc, delay)
                self._client = None
                self._connected.clear()
                await asyncio.sleep(delay)
            finally:
                self._client = None
                self._connected.clear()

    async def _on_connect(self, client: aiomqtt.Client) -> None:
        tp = self.topics
        await client.subscribe(tp.coordinator_inbox(self.cfg.id).topic, qos=0)
        await client.subscribe(tp.all_agent_status, qos=1)
        await client.subscribe(f"{tp.root}/agents/+/vocab", qos=1)
        await client.subscribe(tp.all_agent_telemetry, qos=0)
        if self._accepting:
            await client.subscribe(tp.requests_shared(self.cfg.group), qos=1)
        st = tp.coordinator_status(self.cfg.id)
        await client.publish(st.topic, st.encode(self.status("online")), qos=1, retain=True)
        self._connected.set()
        await self._flush_outbox()
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
                event = VocabEvent(tp.agent_vocab(agent_id).decode(data))
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
        if self.planner is not None:
            self.planner.on_registry(before, self.registry)

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
        request_id = f"{self._n}{uuid.uuid4().hex[:6]}"
        task = asyncio.create_task(self._serve(req, emit, request_id, client_id),
                                   name=f"request-{request_id}")
        self._requests[task] = client_id

    def _check_bounds(self, req: wire.PhoneRequest) -> str | None:
        n_chars = len(req.prompt or "") + sum(len(m.content) for m in req.messages or [])
        if n_chars > self.cfg.max_prompt_chars:
            return (f"prompt has {n_chars} characters; this coordinator accepts at most "
                    f"{self.cfg.max_prompt_chars}")
        if req.max_tokens > self.cfg.max_tokens_limit:
            return f"max_tokens {req.max_tokens} exceeds the limit of {self.cfg.max_tokens_limit}"
        if self.cfg.apps and req.app not in self.cfg.apps:
            return f"unknown app {req.app!r}; known: {', '.join(sorted(self.cfg.apps))}"
        return None

    async def _serve(self, req: wire.PhoneRequest, emit: Any, request_id: str,
                     client_id: str) -> None:
        try:
            await run_request(req, self.ctx, self.settings, emit, request_id)
        finally:
            self.limits.release(client_id)
            task = asyncio.current_task()
            if task is not None:
                self._requests.pop(task, None)

    def _reject(self, emit: Any, code: wire.ErrorCode, message: str) -> None:
        self.counters["rejected"] += 1
        msg = wire.ErrorReplyPhone(code=code, message=message)
        self._queue_phone(*emit.pack(msg))

    def _phone_emitter(self, rt: str, corr: bytes | None, ct: str | None) -> Any:
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
                await coordinator._publish(*self.pack(msg))

        return _Emit()

    def _queue_phone(self, topic: str, payload: bytes, props: Any, qos: int) -> None:
        self._outbox.append((topic, payload, props, qos))
        self._outbox_event.set()

    async def _publish(self, topic: str, payload: bytes, props: Any, qos: int) -> None:
        """Publish to a phone. While the broker is away, finals and errors (QoS 1) wait in the
        outbox and go out after the reconnect; token chunks are dropped (the final has the
        whole text)."""
        client = self._client
        if client is not None and self._connected.is_set():
            try:
                await client.publish(topic, payload, qos=qos, properties=props)
                return
            except aiomqtt.MqttError:
                pass
        if qos > 0:
            self._outbox.append((topic, payload, props, qos))
            self._outbox_event.set()

    async def _flush_outbox(self) -> None:
        while self._outbox:
            client = self._client
            if client is None or not self._connected.is_set():
                return
            item = self._outbox.popleft()
            try:
                await client.publish(item[0], item[1], qos=item[3], properties=item[2])
            except aiomqtt.MqttError:
                self._outbox.appendleft(item)
                return

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

    async def _rpc_sender(self) -> None:
        props = response_properties(response_topic=self.rpc.inbox)
        while True:
            out = await self.rpc.outgoing.get()
            client = self._client
            if client is None:
                continue  # the step deadline will drop the expert
            try:
                await client.publish(out.topic, out.payload, qos=0, properties=props)
            except aiomqtt.MqttError as exc:
                log.debug("rpc not sent: %s", exc)

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
            await client.publish(t.topic, t.encode(msg), qos=1, retain=True)
