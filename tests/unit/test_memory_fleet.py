"""Coordinator and agent logic over the in-memory MQTT transport: no mosquitto, no llama.cpp.

The same daemons as in production (:class:`AgentDaemon` with a fake engine,
:class:`Coordinator`) and the reference phone client, connected through
:class:`moe2.tools.fleet.memory.MemoryBroker` -- wildcards, shared subscriptions, retained
messages and Last Will included -- so the request path, expert drops and takeovers are checked
in milliseconds. Real-broker behaviour stays covered by ``tests/integration`` and ``tests/e2e``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import aiomqtt
import pytest

from moe2.agent.daemon import AgentDaemon
from moe2.agent.engine import DecodeJob
from moe2.agent.meters import ManualMeter
from moe2.coordinator.gating import FixedGate
from moe2.coordinator.service import Coordinator
from moe2.shared import wire
from moe2.shared.config import CoordinatorConfig, PlannerSection
from moe2.shared.topics import Topics
from moe2.tools.clients.phone import Answer, PhoneClient
from moe2.tools.fleet.memory import MemoryBroker
from tests.agent_helpers import FakeEngine, agent_config, wait_until

TP = Topics()
TIMEOUT_S = 30.0


# --------------------------------------------------------------------------- the transport


async def test_memory_broker_routes_like_mosquitto() -> None:
    broker = MemoryBroker()
    a, b, c = broker.client("a"), broker.client("b"), broker.client("c")
    async with a, b, c:
        await a.subscribe("x/+/z")
        await b.subscribe("$share/g/x/#")
        await c.subscribe("$share/g/x/#")
        await a.publish("x/y/z", b"1")
        await a.publish("x/y/z", b"2")
        got_a = [m.payload async for m in _take(a, 2)]
        got_bc = [m.payload async for m in _take(b, 1)] + [m.payload async for m in _take(c, 1)]
        assert got_a == [b"1", b"2"]
        assert sorted(got_bc) == [b"1", b"2"]  # each member of the group got one
        await a.publish("r/t", b"kept", retain=True)
        await c.subscribe("r/#")
        [m] = [m async for m in _take(c, 1)]
        assert (m.payload, m.retain) == (b"kept", True)
        await a.publish("r/t", b"", retain=True)  # cleared
        assert "r/t" not in broker.retained


async def test_memory_broker_drop_sends_the_will_and_ends_the_iterator() -> None:
    broker = MemoryBroker()
    watcher = broker.client("w")
    victim = broker.client("v", will=aiomqtt.Will("st/v", b"offline", qos=1, retain=True))
    async with watcher, victim:
        await watcher.subscribe("st/#")
        broker.drop("v")
        [m] = [m async for m in _take(watcher, 1)]
        assert m.payload == b"offline"
        with pytest.raises(aiomqtt.MqttError):
            async for _ in victim.messages:
                pass
    async with broker.client("clean", will=aiomqtt.Will("st/clean", b"x", retain=True)):
        pass
    assert "st/clean" not in broker.retained  # a clean disconnect sends no will


async def _take(client: object, n: int) -> AsyncIterator[aiomqtt.Message]:
    it = client.messages  # type: ignore[attr-defined]
    for _ in range(n):
        yield await asyncio.wait_for(anext_message(it), TIMEOUT_S)


async def anext_message(it: AsyncIterator[aiomqtt.Message]) -> aiomqtt.Message:
    return await it.__anext__()


# --------------------------------------------------------------------------- a fleet in memory


@dataclass
class Gate:
    """Holds a fake engine's decodes while closed (a slow or hung expert, on demand)."""

    open: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.open.set()

    def __call__(self, jobs: Sequence[DecodeJob]) -> None:
        self.open.wait(TIMEOUT_S)


@dataclass
class MemoryFleet:
    broker: MemoryBroker
    agents: dict[str, AgentDaemon]
    gates: dict[str, Gate]
    coordinators: dict[str, Coordinator]
    tasks: list[asyncio.Task[int]]

    def phone(self, client_id: str = "phone") -> PhoneClient:
        return PhoneClient(lambda: self.broker.client(client_id), client_id)

    def kill(self, coordinator_id: str) -> None:
        """As SIGKILL would: the connection ends without a DISCONNECT (the will goes out) and
        the process is gone (it cannot reconnect)."""
        self.broker.drop(coordinator_id)
        self.tasks[len(self.agents) + list(self.coordinators).index(coordinator_id)].cancel()


@contextlib.asynccontextmanager
async def memory_fleet(agents: Sequence[str] = ("e0", "e1"),
                       coordinators: Sequence[str] = ("c0",)) -> AsyncIterator[MemoryFleet]:
    broker = MemoryBroker()
    gates = {a: Gate() for a in agents}
    daemons = {a: AgentDaemon(agent_config(a), FakeEngine(on_decode=gates[a]), ManualMeter(),
                              lambda will, a=a: broker.client(f"agent-{a}", will=will))
               for a in agents}
    cfg = CoordinatorConfig(dist_k=0, planner=PlannerSection(enabled=False),
                            step_deadline_min_s=TIMEOUT_S)
    coords = {c: Coordinator(
        CoordinatorConfig(id=c, dist_k=cfg.dist_k, planner=cfg.planner,
                          step_deadline_min_s=cfg.step_deadline_min_s,
                          step_deadline_max_s=TIMEOUT_S),
        FixedGate({a: 1.0 + i for i, a in enumerate(agents)}),
        lambda will, c=c: broker.client(c, will=will)) for c in coordinators}
    tasks = [asyncio.create_task(d.run()) for d in daemons.values()]
    tasks += [asyncio.create_task(c.run()) for c in coords.values()]
    fleet = MemoryFleet(broker, daemons, gates, coords, tasks)
    try:
        await wait_until(lambda: all(set(agents) <= set(c.registry.agents)
                                     and all(c.registry.pieces(v.family) is not None
                                             for v in c.registry.agents.values())
                                     for c in coords.values()), TIMEOUT_S, "agents registered")
        yield fleet
    finally:
        for g in gates.values():
            g.open.set()
        for d in daemons.values():
            d.request_stop()
        for c in coords.values():
            c.request_stop()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), TIMEOUT_S)


async def _ask(phone: PhoneClient, req: wire.PhoneRequest) -> Answer:
    return await phone.ask(req, timeout_s=TIMEOUT_S)


async def test_a_request_is_fused_by_both_experts_in_memory() -> None:
    async with memory_fleet() as f, f.phone() as phone:
        ans = await _ask(phone, wire.PhoneRequest(prompt="hello", max_tokens=12, raw=True))
        assert ans.final is not None, ans.error
        assert ans.final.tokens >= 1
        assert ans.text == "".join(c.text for c in ans.chunks)
        assert {e.id: e.dropped for e in ans.final.experts} == {"e0": False, "e1": False}
        assert ans.final.experts[0].weight == pytest.approx(2 / 3)  # FixedGate e1=2, e0=1
        for d in f.agents.values():  # every session was closed
            await wait_until(lambda d=d: not d.table.sessions, TIMEOUT_S, "sessions closed")


async def test_an_agent_whose_connection_drops_is_dropped_from_the_request() -> None:
    async with memory_fleet() as f, f.phone() as phone:
        f.gates["e1"].open.clear()  # e1 hangs in its next decode ...
        task = asyncio.create_task(_ask(phone, wire.PhoneRequest(prompt="hi", max_tokens=8,
                                                                 raw=True)))
        coord = f.coordinators["c0"]
        await wait_until(lambda: coord.rpc.waiting > 0, TIMEOUT_S, "a step in flight")
        f.broker.drop("agent-e1")  # ... and its connection drops: the will says offline
        ans = await task
        f.gates["e1"].open.set()
        assert ans.final is not None, ans.error
        used = {e.id: (e.dropped, e.reason or "") for e in ans.final.experts}
        assert used["e0"] == (False, "")
        assert used["e1"][0] and "offline" in used["e1"][1]


class HeldGate(FixedGate):
    """A fixed gate that computes (in the coordinator's worker thread) until released."""

    def __init__(self, values: dict[str, float]) -> None:
        super().__init__(values)
        self.entered = threading.Event()
        self.release = threading.Event()

    def values(self, text: str) -> dict[str, float]:
        self.entered.set()
        self.release.wait(TIMEOUT_S)
        return super().values(text)


async def test_an_agent_gone_while_the_gate_runs_is_not_chosen() -> None:
    """An agent's Last Will arrives while the gate computes a request's values: the request
    is served by the agents online when its sessions open -- the gone one is not asked (its
    open would never be answered nor failed, and the request would wait the open deadline)."""
    async with memory_fleet() as f, f.phone() as phone:
        coord = f.coordinators["c0"]
        coord.gate = gate = HeldGate({"e0": 1.0, "e1": 2.0})
        task = asyncio.create_task(_ask(phone, wire.PhoneRequest(prompt="hi", max_tokens=4,
                                                                 raw=True)))
        await wait_until(gate.entered.is_set, TIMEOUT_S, "the gate computing")
        f.broker.drop("agent-e1")
        await wait_until(lambda: "e1" not in coord.registry.agents, TIMEOUT_S, "e1 gone")
        gate.release.set()
        ans = await task
        assert ans.final is not None, ans.error
        assert [(e.id, e.dropped) for e in ans.final.experts] == [("e0", False)]


async def test_a_dead_coordinators_phone_is_told_by_the_survivor() -> None:
    async with memory_fleet(coordinators=("c0", "c1")) as f, f.phone() as phone:
        for g in f.gates.values():
            g.open.clear()  # every request stays in flight
        task = asyncio.create_task(_ask(phone, wire.PhoneRequest(prompt="x", max_tokens=4,
                                                                 raw=True)))
        await wait_until(lambda: any(c.in_flight for c in f.coordinators.values()), TIMEOUT_S,
                         "a coordinator serving")
        serving = next(c for c in f.coordinators.values() if c.in_flight)
        await wait_until(lambda: serving.inflight.open_markers > 0 and any(
            k.startswith(TP.coordinator_inflight(serving.cfg.id, "").topic)
            for k in f.broker.retained), TIMEOUT_S, "its in-flight marker published")
        f.kill(serving.cfg.id)
        ans = await task
        for g in f.gates.values():
            g.open.set()
        assert ans.error is not None and ans.error.code == wire.ErrorCode.SHUTTING_DOWN
        assert f"coordinator {serving.cfg.id} went offline" in ans.error.message


async def test_a_cancelled_request_ends_with_one_error_and_frees_the_sessions() -> None:
    async with memory_fleet() as f, f.phone() as phone, f.broker.client("watch") as watch:
        await watch.subscribe(TP.response_prefix("phone") + "#")
        f.gates["e1"].open.clear()  # e1 hangs: the request stays in flight
        req = wire.PhoneRequest(prompt="hi", max_tokens=200, raw=True)
        stream = phone.stream(req, timeout_s=TIMEOUT_S)
        first = asyncio.ensure_future(anext_message(stream))  # type: ignore[arg-type]
        coord = f.coordinators["c0"]
        await wait_until(lambda: coord.rpc.waiting > 0, TIMEOUT_S, "a step in flight")
        first.cancel()  # the caller gives up: the stream publishes a cancel
        with contextlib.suppress(asyncio.CancelledError):
            await first
        await stream.aclose()  # type: ignore[attr-defined]
        replies = [wire.decode_phone_reply(bytes(m.payload), None)  # type: ignore[arg-type]
                   async for m in _take(watch, 1)]
        assert isinstance(replies[-1], wire.ErrorReplyPhone)
        assert replies[-1].code == wire.ErrorCode.CANCELLED
        f.gates["e1"].open.set()
        for d in f.agents.values():
            await wait_until(lambda d=d: not d.table.sessions, TIMEOUT_S, "sessions closed")
        assert coord.counters["cancelled"] == 1
        assert coord.in_flight == 0 and phone.cancels_sent == 1


async def test_a_cancel_that_overtakes_its_request_refuses_it() -> None:
    async with memory_fleet() as f, f.phone() as phone:
        phone.cancel(b"early")
        await wait_until(lambda: phone.cancels_sent == 1, TIMEOUT_S, "cancel sent")
        coord = f.coordinators["c0"]
        await wait_until(lambda: len(coord._early_cancels) == 1, TIMEOUT_S, "cancel kept")
        q = await phone.send_raw(
            wire.encode_phone(wire.PhoneRequest(prompt="x", max_tokens=4, raw=True), None),
            correlation=b"early", content_type=None)
        reply = await asyncio.wait_for(q.get(), TIMEOUT_S)
        assert isinstance(reply, wire.ErrorReplyPhone)
        assert reply.code == wire.ErrorCode.CANCELLED
        assert coord.counters["accepted"] == 0
