"""Exactly one answer per request across two bridged brokers, in memory.

Two :class:`MemoryBroker` s joined by a :class:`MemoryBridge` (B runs it, as a spoke would),
the production :class:`Coordinator` and :class:`AgentDaemon` (fake engines), phones on both
brokers that keep reading after their final (:class:`LedgerPhone`), and the agents' RPC topics
read on their own broker (:class:`AgentLedger`). Heartbeats every 0.5 s: a peer is out of the
view after 1.5 s of silence, longer than this process's event loop stalls on a loaded box. The
same cases run on real bridged mosquittos in ``tests/e2e/test_bridged.py``; here they take
milliseconds and the partition is exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

import aiomqtt
import pytest

from moe2.agent.daemon import AgentDaemon
from moe2.agent.meters import ManualMeter
from moe2.coordinator.gating import FixedGate, UniformGate
from moe2.coordinator.once import ranking, request_key
from moe2.coordinator.service import Coordinator
from moe2.shared import wire
from moe2.shared.config import CoordinatorConfig, PlannerSection
from moe2.shared.mqtt import response_properties
from moe2.shared.topics import Topics
from moe2.tools.bench.reliability.ledger import (
    AgentLedger,
    LedgerPhone,
    ReplyLedger,
    fence_topic,
    sniff,
    stepped_once,
)
from moe2.tools.fleet.memory import MemoryBridge, MemoryBroker
from tests.agent_helpers import FakeEngine, agent_config, wait_until
from tests.unit.test_memory_fleet import Gate

TP = Topics()
TIMEOUT_S = 30.0
REQ = wire.PhoneRequest(prompt="hello", max_tokens=6, raw=True)


class Wall:
    """The coordinators' wall clock (claims carry it); a test moves it on."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class Bridged:
    brokers: dict[str, MemoryBroker]
    bridge: MemoryBridge
    agents: dict[str, AgentDaemon]
    gates: dict[str, Gate]
    coordinators: dict[str, Coordinator]
    where: dict[str, str]  # process -> broker
    wall: Wall
    ledger: ReplyLedger = field(default_factory=ReplyLedger)
    agent_ledgers: dict[str, AgentLedger] = field(default_factory=dict)
    tasks: dict[str, asyncio.Task[int]] = field(default_factory=dict)

    def phone(self, client_id: str, broker: str) -> LedgerPhone:
        return LedgerPhone(self.brokers[broker].client(client_id), client_id, TP, self.ledger)

    def kill(self, name: str) -> None:
        """As SIGKILL: the connection ends without a DISCONNECT, the process is gone."""
        self.brokers[self.where[name]].drop(name if name in self.coordinators
                                            else f"agent-{name}")
        self.tasks[name].cancel()

    async def settle(self, phones: Sequence[str]) -> None:
        """Until no coordinator holds or serves anything, and whatever they sent arrived
        (a fence on each broker behind it)."""
        live = [c for n, c in self.coordinators.items() if not self.tasks[n].done()]
        await wait_until(lambda: all(c.in_flight == 0 and c.once.held == 0 for c in live),
                         TIMEOUT_S, "coordinators idle")
        for i, (name, broker) in enumerate(self.brokers.items()):
            for p in phones:
                await broker.client(f"fence-{name}-{p}-{i}").__aenter__()
                broker.publish(fence_topic(TP, p), f"{name}-{p}".encode(), qos=1)
        for name in self.brokers:
            for p in phones:
                await self.ledger.fenced(f"{name}-{p}", TIMEOUT_S)


@contextlib.asynccontextmanager
async def bridged(agents: Mapping[str, str], coordinators: Mapping[str, tuple[str, Sequence[str]]],
                  *, fallback_s: float = TIMEOUT_S) -> AsyncIterator[Bridged]:
    """``agents``: id -> broker ("A" or "B"); ``coordinators``: id -> (broker, the experts its
    fixed gate weighs). Each coordinator's node is its broker's name."""
    brokers = {"A": MemoryBroker(), "B": MemoryBroker()}
    bridge = MemoryBridge(brokers["B"], brokers["A"], ("moe2/#",))
    gates = {a: Gate() for a in agents}
    daemons = {a: AgentDaemon(agent_config(a, max_sessions=96), FakeEngine(on_decode=gates[a]),
                              ManualMeter(),
                              lambda will, a=a, b=b: brokers[b].client(f"agent-{a}", will=will))
               for a, b in agents.items()}
    wall = Wall()
    coords = {c: Coordinator(
        CoordinatorConfig(id=c, node=b, dist_k=0, planner=PlannerSection(enabled=False),
                          step_deadline_min_s=TIMEOUT_S, step_deadline_max_s=TIMEOUT_S,
                          heartbeat_s=0.5, fallback_s=fallback_s),
        FixedGate(dict.fromkeys(experts, 1.0)),
        lambda will, c=c, b=b: brokers[b].client(c, will=will), wall=wall)
        for c, (b, experts) in coordinators.items()}
    where = {**agents, **{c: b for c, (b, _e) in coordinators.items()}}
    f = Bridged(brokers, bridge, daemons, gates, coords, where, wall)
    f.agent_ledgers = {b: AgentLedger([a for a, ab in agents.items() if ab == b])
                       for b in brokers}
    sniffers = []
    for b, broker in brokers.items():
        ready = asyncio.Event()
        sniffers.append(asyncio.create_task(sniff(broker.client(f"sniff-{b}"), TP,
                                                  [f.agent_ledgers[b]], ready)))
        await ready.wait()
    f.tasks = {**{a: asyncio.create_task(d.run()) for a, d in daemons.items()},
               **{c: asyncio.create_task(co.run()) for c, co in coords.items()}}
    nodes = {b for b, _e in coordinators.values()}
    try:
        await wait_until(lambda: all(
            set(experts) <= set(co.registry.agents)
            and all(co.registry.pieces(v.family) is not None for v in co.registry.agents.values())
            and set(co.once.weights()) == nodes
            for co, (_b, experts) in zip(coords.values(), coordinators.values(), strict=True)),
            TIMEOUT_S, "agents registered and every node in every view")
        yield f
    finally:
        for g in gates.values():
            g.open.set()
        for d in daemons.values():
            d.request_stop()
        for c in coords.values():
            c.request_stop()
        for t in sniffers:
            t.cancel()
        await asyncio.wait_for(asyncio.gather(*f.tasks.values(), *sniffers,
                                              return_exceptions=True), TIMEOUT_S)


SITES = {"a0": "A", "b0": "B"}
SITE_COORDINATORS = {"c0": ("A", ["a0"]), "c1": ("B", ["b0"])}


def one_answer_each(f: Bridged, records: Sequence[bytes] | None = None) -> dict[str, object]:
    recs = [f.ledger.records[c] for c in (records or f.ledger.records)]
    s = f.ledger.summary(recs)
    assert s["lost"] == 0, s
    assert s["duplicates"] == 0, s
    assert s["answered_once"] == len(recs), s
    return s


async def test_bridged_brokers_answer_every_request_once() -> None:
    """Two brokers, a coordinator on each, phones on both: every request one final, no chunk
    twice, and on the agents every request's sessions were opened and stepped by one
    coordinator -- with no wait (the fallback is 30 s here, and never needed)."""
    async with bridged(SITES, SITE_COORDINATORS) as f, f.phone("pa", "A") as pa, \
            f.phone("pb", "B") as pb:
        for i in range(40):
            await (pa if i % 2 else pb).ask(REQ)
        assert await f.ledger.answered(TIMEOUT_S)
        await f.settle(["pa", "pb"])
        s = one_answer_each(f)
        assert s["duplicate_chunks"] == 0
        assert set(s["finals_by"]) == {"c0", "c1"}  # type: ignore[arg-type]
        steps = stepped_once(f.ledger, list(f.agent_ledgers.values()))
        assert steps["requests_by_coordinators_that_opened"] == {1: 40}, steps
        assert steps["requests_by_coordinators_that_stepped"] == {1: 40}, steps
        for c in f.coordinators.values():
            assert c.counters["fallback_serves"] == 0
            assert c.counters["aborted"] == c.counters["late_conflicts"] == 0
        # each copy that was not served was held, then dropped when the claim came
        assert sum(c.counters["held_dropped"] + c.counters["copies_dropped"]
                   for c in f.coordinators.values()) == 40


async def test_a_partition_and_its_heal_answer_nothing_twice() -> None:
    """The bridge drops: each side answers its own phones (once the far node leaves its view).
    It comes back 10 s later: B's queued requests reach A together with c1's claims, and c0
    drops or aborts those stale copies before any token. Requests sent the moment it is back
    (each side still alone in its view) may start on both sides: the loser stops, the phone
    gets one final. Once the views agree again, nothing is served twice at all."""
    async with bridged(SITES, SITE_COORDINATORS) as f, f.phone("pa", "A") as pa, \
            f.phone("pb", "B") as pb:
        c0, c1 = f.coordinators["c0"], f.coordinators["c1"]
        f.bridge.cut()
        await wait_until(lambda: set(c0.once.weights()) == {"A"}
                         and set(c1.once.weights()) == {"B"}, TIMEOUT_S,
                         "each side's view without the other")
        during = [await (pa if i % 2 else pb).ask(REQ) for i in range(10)]
        assert await f.ledger.answered(TIMEOUT_S, during)
        f.wall.offset += 10.0
        f.bridge.restore()
        at_heal = [await (pa if i % 2 else pb).ask(REQ) for i in range(10)]
        assert await f.ledger.answered(TIMEOUT_S)
        await f.settle(["pa", "pb"])
        one_answer_each(f)
        during_finals = f.ledger.summary([f.ledger.records[c] for c in during])
        assert during_finals["finals_by"] == {"c0": 5, "c1": 5}
        assert during_finals["duplicate_chunks"] == 0  # stale copies stopped before a token
        assert len(at_heal) == 10
        await wait_until(lambda: set(c0.once.weights()) == set(c1.once.weights()) == {"A", "B"},
                         TIMEOUT_S, "the views agree again")
        conflicts = {c.cfg.id: (c.counters["aborted"], c.counters["late_conflicts"])
                     for c in (c0, c1)}
        healed = [await (pa if i % 2 else pb).ask(REQ) for i in range(20)]
        assert await f.ledger.answered(TIMEOUT_S)
        await f.settle(["pa", "pb"])
        s = one_answer_each(f)
        assert f.ledger.summary([f.ledger.records[c] for c in healed])["duplicate_chunks"] == 0
        assert conflicts == {c.cfg.id: (c.counters["aborted"], c.counters["late_conflicts"])
                             for c in (c0, c1)}
        assert s["requests"] == 40


async def test_a_far_coordinator_dying_mid_request_is_reported_by_the_survivor() -> None:
    """c1 (on B) dies while it serves a phone on A: its retained in-flight marker crossed the
    bridge, its Last Will crosses too, and c0 tells the phone (one error, no final). Requests
    afterwards from B's phones cross to A and are served there."""
    async with bridged(SITES, SITE_COORDINATORS) as f, f.phone("pa", "A") as pa, \
            f.phone("pb", "B") as pb:
        c1 = f.coordinators["c1"]
        f.gates["b0"].open.clear()  # c1's requests hang in their first decode
        sent: list[bytes] = []
        while c1.in_flight == 0:
            sent.append(await pa.ask(REQ))
            await asyncio.sleep(0.01)
            assert len(sent) < 40
        await wait_until(lambda: any(t.startswith(TP.coordinator_inflight("c1", "").topic)
                                     for t in f.brokers["A"].retained), TIMEOUT_S,
                         "c1's marker retained on A too")
        f.kill("c1")
        f.gates["b0"].open.set()
        assert await f.ledger.answered(TIMEOUT_S)
        errors = [f.ledger.records[c] for c in sent if f.ledger.records[c].errors]
        assert len(errors) == 1 and errors[0].errors == ["shutting_down"]
        later = [await pb.ask(REQ) for _ in range(6)]
        assert await f.ledger.answered(TIMEOUT_S, later)
        await f.settle(["pa", "pb"])
        one_answer_each(f)
        assert f.ledger.summary([f.ledger.records[c] for c in later])["finals_by"] == {"c0": 6}


async def test_an_agent_seen_through_the_bridge_goes_away() -> None:
    """c0 on A fuses a0 (on A) and x0 (on B, seen through the bridge); x0 dies mid-request:
    its will crosses, it is dropped from the request, which still gets its one final."""
    async with bridged({"a0": "A", "x0": "B"}, {"c0": ("A", ["a0", "x0"])}) as f, \
            f.phone("pb", "B") as pb:
        c0 = f.coordinators["c0"]
        f.gates["x0"].open.clear()
        corr = await pb.ask(REQ)
        await wait_until(lambda: c0.rpc.waiting > 0, TIMEOUT_S, "a step in flight")
        f.kill("x0")
        f.gates["x0"].open.set()
        assert await f.ledger.answered(TIMEOUT_S)
        rec = f.ledger.records[corr]
        assert rec.finals == ["c0"]
        after = await pb.ask(REQ)
        assert await f.ledger.answered(TIMEOUT_S)
        await f.settle(["pb"])
        one_answer_each(f)
        assert f.ledger.records[after].finals == ["c0"]
        assert f.agent_ledgers["B"].opened.get(f.ledger.records[after].key[:16]) is None


@pytest.mark.parametrize("first_dies", [True, False])
async def test_a_copy_held_for_a_node_that_never_claims_is_served(first_dies: bool) -> None:
    """The node ranked first never answers: its coordinator dies (its will re-ranks at once)
    or stops taking requests; the holder serves every such copy itself."""
    async with bridged(SITES, SITE_COORDINATORS, fallback_s=0.2) as f, \
            f.phone("pb", "B") as pb:
        if first_dies:
            f.kill("c0")
        else:  # c0 still heartbeats as accepting, but takes no requests: only the fallback
            link = f.coordinators["c0"].link
            await link.unsubscribe(TP.requests_shared())
        sent = [await pb.ask(REQ) for _ in range(8)]
        assert await f.ledger.answered(TIMEOUT_S)
        await f.settle(["pb"])
        one_answer_each(f)
        assert f.ledger.summary([f.ledger.records[c] for c in sent])["finals_by"] == {"c1": 8}
        if not first_dies:
            assert f.coordinators["c1"].counters["fallback_serves"] >= 1


@pytest.mark.parametrize("will_first", [False, True])
async def test_a_survivor_holding_a_copy_answers_it_rather_than_telling_the_phone(
        will_first: bool) -> None:
    """The far coordinator died after its in-flight marker went out but before its claim: the
    survivor still holds its own copy of the request, so it answers that copy (once its view
    drops the dead node) instead of sending the phone shutting_down -- one terminal reply.
    ``will_first``: the order on a real broker -- the Last Will makes the held copy due at
    once, the takeover of the dead one's markers comes a grace period later, when the copy is
    no longer held but served."""
    broker = MemoryBroker()
    coord = Coordinator(CoordinatorConfig(id="c0", node="A", planner=PlannerSection(
        enabled=False)), UniformGate(), lambda will: broker.client("c0", will=will))
    hb = TP.coordinator_heartbeat("c9")
    coord.once.on_heartbeat_message(hb.topic, hb.encode(wire.CoordinatorHeartbeat(
        coordinator_id="c9", node="B", incarnation="x")))
    rt = TP.response_prefix("p") + "r"
    bodies = [wire.encode_phone(wire.PhoneRequest(prompt=f"q{i}"), None) for i in range(64)]
    body = next(b for b in bodies  # a request whose first node is c9's
                if ranking(request_key("p", rt, b"c", None, b), {"A": 1, "B": 1})[0] == "B")
    key = request_key("p", rt, b"c", None, body)
    coord._on_message(aiomqtt.Message(TP.request("p"), body, 1, False, 1,
                                      response_properties(rt, b"c")))
    assert coord.once.holds(key)
    marker = wire.InflightMarker(coordinator_id="c9", incarnation="x", client_id="p",
                                 response_topic=rt, correlation=b"c", request_key=key)
    if will_first:
        coord.once.on_peer_gone("c9")
        coord.once.serve_due(coord.clock())
        assert not coord.once.holds(key) and coord.in_flight == 1
    await coord._tell_orphan(marker)
    assert coord.outbox.pending() == [] and coord.counters["taken_over"] == 0
    coord.once.on_peer_gone("c9")
    coord.once.serve_due(coord.clock())
    while coord._requests:
        await asyncio.gather(*list(coord._requests), return_exceptions=True)
    await coord._tell_orphan(marker)  # the takeover again, after the answer: still nothing
    [reply] = coord.outbox.pending()
    msg = wire.decode_phone_reply(reply.payload, None)
    assert isinstance(msg, wire.ErrorReplyPhone) and msg.code == wire.ErrorCode.NO_EXPERTS
