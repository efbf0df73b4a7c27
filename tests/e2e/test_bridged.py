"""Issue 17: exactly one answer per request across two bridged Mosquitto brokers.

Two real mosquitto processes on 127.0.0.1, B bridged to A by the stanza ``moe2 broker-config
--bridge-to`` writes (MQTT 5, each topic with its QoS), through a relay that can cut the link.
A coordinator and an agent on each broker (each coordinator's fixed gate weighs its own site's
agent, so fused steps stay on one broker), phones on both brokers that keep reading after
their final, and the agents' RPC topics read on each agent's own broker: per request, which
coordinators opened sessions and sent steps.

The coordinators run with ``fallback_s = 2``: a copy held for the other node is served only if
no claim came within 2 s, so that a claim slowed down by this shared 2-core machine does not
start a second serve (which the loser would stop, but after chunks had gone out, and this test
counts duplicate chunks too). The default, 0.3 s, is what ``moe2 bench reliability`` measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import pytest

from moe2.shared import wire
from moe2.shared.mqtt import MessageReader, make_client, parse_broker_url, payload_bytes
from moe2.shared.topics import Topics
from moe2.tools.bench.reliability.fleet import AGENT_ARGS
from moe2.tools.bench.reliability.ledger import (
    AgentLedger,
    CoordinatorWatch,
    LedgerPhone,
    ReplyLedger,
    fence_topic,
    sniff,
    stepped_by_two,
    stepped_once,
)
from moe2.tools.fleet.bridged import BridgedFleet
from tests.conftest import Ggufs

TIMEOUT_S = 90.0
REQ = wire.PhoneRequest(prompt="What is 12 plus 7?", max_tokens=6, raw=True)
AGENT_SITES = {"a0": "A", "b0": "B", "x0": "B"}
SITE_OF = {**AGENT_SITES, "c0": "A", "c1": "B"}
COORDINATOR_TOML = (
    "max_concurrent = 256\n"
    "max_concurrent_per_client = 64\n"
    "rate_per_client_per_s = 1000.0\n"
    "step_deadline_min_s = 4.0\n"
    "step_deadline_max_s = 5.0\n"
    "fallback_s = 2.0\n"
    "[fixed_gates]\n"
)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, ggufs: Ggufs) -> Iterator[BridgedFleet]:
    model = ggufs.shared[0].path
    with BridgedFleet(tmp_path_factory.mktemp("bridged"), bridge_agents=True) as f:
        for agent in ("a0", "b0"):
            f.start_agent(agent, model, *AGENT_ARGS, name=agent,
                          broker=f.url_of(SITE_OF[agent]))
        gates = {"c0": "a0 = 1.0\nx0 = 1.0\n", "c1": "b0 = 1.0\n"}
        for c, gate in gates.items():
            f.start_coordinator(coordinator_id=c, name=c, config_text=COORDINATOR_TOML + gate,
                                broker=f.url_of(SITE_OF[c]), log_level="DEBUG")
        asyncio.run(f.wait_bridge(up=True))
        asyncio.run(f.wait_sites({"c0": {"a0"}, "c1": {"b0"}}))
        yield f


@dataclass
class Observers:
    f: BridgedFleet
    ledger: ReplyLedger = field(default_factory=ReplyLedger)
    agents: dict[str, AgentLedger] = field(default_factory=dict)
    watch: CoordinatorWatch | None = None
    watch_b: CoordinatorWatch | None = None
    phones: dict[str, LedgerPhone] = field(default_factory=dict)

    async def send(self, n: int, phones: Sequence[str] = ("pa", "pb"),
                   in_flight: int = 16) -> list[bytes]:
        """``n`` requests, alternating phones, at most ``in_flight`` unanswered at once."""
        out: list[bytes] = []
        for i in range(n):
            await self.ledger.until(
                lambda: sum(not self.ledger.records[c].terminals for c in out) < in_flight,
                TIMEOUT_S, "a request answered")
            out.append(await self.phones[phones[i % len(phones)]].ask(REQ))
        assert await self.ledger.answered(TIMEOUT_S, out), (self.ledger.summary(),
                                                            self.why(out))
        return out

    async def settle(self, coordinators: Sequence[str]) -> None:
        """Until every coordinator says (in a heartbeat sent after the last answer) that it
        holds and serves nothing, then a fence on both brokers behind whatever they sent."""
        assert self.watch is not None
        await self.watch.idle(coordinators, time.time(), TIMEOUT_S)
        tag = uuid.uuid4().hex[:6]
        for site in ("A", "B"):
            async with make_client(parse_broker_url(self.f.url_of(site))) as c:
                for p in self.phones:
                    await c.publish(fence_topic(self.f.topics, p), f"{tag}{site}{p}".encode(),
                                    qos=1)
        for site in ("A", "B"):
            for p in self.phones:
                await self.ledger.fenced(f"{tag}{site}{p}", TIMEOUT_S)

    def check(self, corrs: Sequence[bytes] | None = None, *,
              chunks_once: bool = True) -> dict[str, object]:
        corrs = list(corrs or self.ledger.records)
        recs = [self.ledger.records[c] for c in corrs]
        s = self.ledger.summary(recs)
        why = self.why(corrs)
        assert s["lost"] == 0, (s, why)
        assert s["duplicates"] == 0, (s, why)
        assert s["answered_once"] == len(recs), (s, why)
        if chunks_once:
            assert s["duplicate_chunks"] == 0, (s, why)
        sub = ReplyLedger()
        sub.records = {c: self.ledger.records[c] for c in corrs}
        steps = stepped_once(sub, list(self.agents.values()))
        assert steps["requests_stepped_by_two_or_more"] == 0, (
            steps, stepped_by_two(sub, list(self.agents.values())), self.logs())
        return {**s, **steps}

    def why(self, corrs: Sequence[bytes] | None = None) -> dict[str, object]:
        """What a failed check shows: the requests in trouble, and where the logs are (the
        coordinators log each copy's fate at DEBUG, by the key's first 12 characters)."""
        return {"troubles": self.ledger.troubles(corrs), "logs": self.logs()}

    def logs(self) -> str:
        return str(self.f.workdir)


@contextlib.asynccontextmanager
async def observers(f: BridgedFleet) -> AsyncIterator[Observers]:
    obs = Observers(f)
    obs.agents = {site: AgentLedger([a for a, s in AGENT_SITES.items() if s == site])
                  for site in ("A", "B")}
    obs.watch, obs.watch_b = CoordinatorWatch(f.topics), CoordinatorWatch(f.topics)
    tasks = []
    for site in ("A", "B"):
        url = parse_broker_url(f.url_of(site))
        ready, wready = asyncio.Event(), asyncio.Event()
        tasks.append(asyncio.create_task(sniff(make_client(url), f.topics,
                                               [obs.agents[site]], ready)))
        watch = obs.watch if site == "A" else obs.watch_b
        tasks.append(asyncio.create_task(watch.run(make_client(url), wready)))
        await asyncio.wait_for(asyncio.gather(ready.wait(), wready.wait()), TIMEOUT_S)
    phones = {"pa": "A", "pb": "B"}
    async with contextlib.AsyncExitStack() as stack:
        for p, site in phones.items():
            client = make_client(parse_broker_url(f.url_of(site)),
                                 identifier=f"{p}-{uuid.uuid4().hex[:6]}")
            obs.phones[p] = await stack.enter_async_context(
                LedgerPhone(client, p, f.topics, obs.ledger))
        try:
            yield obs
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def test_bridged_brokers_answer_every_request_exactly_once(fleet: BridgedFleet) -> None:
    """100 requests from phones on both brokers: each one final, no token chunk twice, and on
    the agents each request's sessions opened and stepped by one coordinator only."""

    async def main() -> dict[str, object]:
        async with observers(fleet) as obs:
            sent = await obs.send(100)
            await obs.settle(["c0", "c1"])
            return obs.check(sent)

    s = asyncio.run(main())
    assert s["requests"] == 100 and s["answered_once"] == 100
    assert s["requests_by_coordinators_that_opened"] == {1: 100}, s
    assert s["requests_by_coordinators_that_stepped"] == {1: 100}, s
    assert set(s["finals_by"]) == {"c0", "c1"}, s  # type: ignore[call-overload]
    fleet.check_alive()


def test_the_bridge_drops_and_comes_back(fleet: BridgedFleet) -> None:
    """While the bridge is down each broker's coordinator answers its own phones; when it is
    back, the requests B queued for A arrive with c1's claims behind them and c0 does not
    answer them again; afterwards both serve as before. Nothing lost, nothing answered twice.
    (Nothing is in flight across the bridge when it drops: a reply the hub publishes for the
    site while the link is down is lost -- mosquitto's v5 bridge keeps nothing on its remote
    side -- and that phone's timeout applies, as the README says.)"""

    async def main() -> dict[str, object]:
        async with observers(fleet) as obs:
            before = await obs.send(10)
            await obs.settle(["c0", "c1"])
            fleet.cut()
            await fleet.wait_bridge(up=False)
            during = await obs.send(20)
            fleet.restore()
            healed = await fleet.wait_bridge(up=True)
            assert obs.watch is not None and obs.watch_b is not None
            await asyncio.gather(  # each side hears the other again
                obs.watch.idle(["c1"], healed, TIMEOUT_S),
                obs.watch_b.idle(["c0"], healed, TIMEOUT_S))
            after = await obs.send(30)
            await obs.settle(["c0", "c1"])
            s = obs.check()
            d = obs.ledger.summary([obs.ledger.records[c] for c in during])
            assert d["finals_by"] == {"c0": 10, "c1": 10}, d  # each side its own phones
            assert len(before) + len(during) + len(after) == s["requests"] == 60
            return s

    asyncio.run(main())
    fleet.check_alive()


def test_an_agent_seen_through_the_bridge_goes_away(fleet: BridgedFleet, ggufs: Ggufs) -> None:
    """x0 runs on B; c0 (on A) fuses it with a0, through the bridge. x0 is killed while c0
    waits for it: its Last Will crosses the bridge, c0 drops it from the request (reason:
    offline), the request still gets its one final."""
    fleet.start_agent("x0", ggufs.shared[0].path, *AGENT_ARGS, name="x0",
                      broker=fleet.url_of("B"))
    asyncio.run(fleet.wait_sites({"c0": {"a0", "x0"}, "c1": {"b0"}}))

    async def main() -> None:
        async with observers(fleet) as obs:
            for agent in ("a0", "x0"):
                fleet.signal(agent, signal.SIGSTOP)  # c0's requests stay in flight
            try:
                sent: list[bytes] = []
                while obs.agents["B"].opened_on["x0"] == 0:  # only c0 uses x0
                    sent.append(await obs.phones["pa"].ask(REQ))
                    with contextlib.suppress(asyncio.TimeoutError):
                        await obs.ledger.until(lambda: obs.agents["B"].opened_on["x0"] > 0,
                                               1.0, "a session on x0")
                    assert len(sent) < 40, "c0 never opened a session on x0"
                fleet.signal("x0", signal.SIGKILL)
            finally:
                fleet.signal("a0", signal.SIGCONT)
            assert await obs.ledger.answered(TIMEOUT_S, sent), obs.why(sent)
            await obs.settle(["c0", "c1"])
            obs.check(sent)
            dropped = [(e, why) for c in sent for e, was, why in obs.ledger.records[c].experts
                       if was and e == "x0"]
            assert dropped and all("offline" in why for _e, why in dropped), (
                dropped, {obs.ledger.records[c].key[:16]: obs.ledger.records[c].experts
                          for c in sent}, obs.logs())

    asyncio.run(main())
    fleet.check_alive(["a0", "b0", "c0", "c1"])


async def c1_serving(reader: MessageReader, topics: Topics, served: set[str],
                     claimed: set[str], timeout_s: float) -> None:
    """Read c1's in-flight markers and claims as broker A has them (their request keys into
    ``served`` and ``claimed``) until one request has both, or ``timeout_s`` passed."""
    deadline = time.monotonic() + timeout_s
    claims = topics.coordinator_claims("c1")
    while not served & claimed:
        left = deadline - time.monotonic()
        m = await reader.next(timeout_s=left) if left > 0 else None
        if m is None:
            return
        if not (data := payload_bytes(m)):
            continue  # a marker cleared
        if str(m.topic) == claims.topic:
            claimed.add(claims.decode(data).key)
        else:
            served.add(topics.coordinator_inflight("c1", "x").decode(data).request_key)


def test_a_far_coordinator_dies_mid_request(fleet: BridgedFleet) -> None:
    """c1 (on B) dies while it serves a phone on A: its retained in-flight marker and its claim
    crossed the bridge (so c0 dropped its own copy of the request), its Last Will crosses too,
    and c0 tells that phone (one shutting_down error, no final). A request c1 took but had
    not claimed yet when it died, c0 answers itself (a final, no error: one terminal reply).
    Requests from B's phones afterwards cross to A and c0 answers them."""

    async def main() -> None:
        async with observers(fleet) as obs:
            fleet.signal("b0", signal.SIGSTOP)  # c1's requests stay in flight
            try:
                sent: list[bytes] = []
                served: set[str] = set()
                claimed: set[str] = set()
                async with make_client(parse_broker_url(fleet.url)) as c, \
                        MessageReader(c) as reader:
                    await c.subscribe(fleet.topics.inflight_filter("c1"), qos=1)
                    await c.subscribe(fleet.topics.coordinator_claims("c1").topic, qos=1)
                    while not served:
                        sent.append(await obs.phones["pa"].ask(REQ))
                        await c1_serving(reader, fleet.topics, served, claimed, 1.0)
                        assert len(sent) < 40, "c1 served none of 40 requests"
                    # its claim too: killed between the two, c1 would leave that request to
                    # c0's own copy (answered, not told)
                    await c1_serving(reader, fleet.topics, served, claimed, TIMEOUT_S)
                    assert served & claimed, (served, claimed, obs.logs())
                fleet.signal("c1", signal.SIGKILL)
            finally:
                fleet.signal("b0", signal.SIGCONT)
            assert await obs.ledger.answered(TIMEOUT_S, sent), obs.why(sent)
            told = [obs.ledger.records[c] for c in sent if obs.ledger.records[c].errors]
            keys = {obs.ledger.records[c].key for c in sent}
            assert served & claimed & keys, (served, claimed, keys)
            assert {r.key for r in told} >= served & claimed, (
                told, [obs.ledger.records[c] for c in sent], obs.logs())
            assert all(r.errors == ["shutting_down"] for r in told), (told, obs.logs())
            later = await obs.send(10, phones=["pb"])
            await obs.settle(["c0"])
            obs.check(sent)
            assert obs.ledger.summary([obs.ledger.records[c] for c in later])["finals_by"] \
                == {"c0": 10}

    asyncio.run(main())
