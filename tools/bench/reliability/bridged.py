"""The bridged phase of ``moe2 bench reliability``: exactly one answer per request across two
bridged brokers, and what it costs against one broker.

Two sites, each a coordinator and an agent whose fixed gate weighs its own site's agent (fused
steps stay on one broker, as the README recommends), phones on both. The same processes and
load first run on one broker (the baseline), then on two brokers bridged by the stanza ``moe2
broker-config --bridge-to`` writes, then through a bridge drop. Every phone keeps reading after
its final (:mod:`.ledger`), the agents' RPC topics are read on their own broker, and each
coordinator's event counters (aborted, fallback serves, late conflicts ...) are scraped from
its Prometheus endpoint at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe2.shared import wire
from moe2.shared.mqtt import make_client, parse_broker_url
from moe2.tools.bench.reliability.fleet import AGENT_ARGS
from moe2.tools.bench.reliability.ledger import (
    AgentLedger,
    CoordinatorWatch,
    LedgerPhone,
    ReplyLedger,
    fence_topic,
    sniff,
    stepped_once,
)
from moe2.tools.bench.reliability.outcomes import PROMPTS, _r, percentile
from moe2.tools.fleet.bridged import BridgedFleet
from moe2.tools.fleet.harness import Fleet
from moe2.tools.fleet.localbroker import free_port

log = logging.getLogger(__name__)

SITES = {"a0": "A", "c0": "A", "b0": "B", "c1": "B"}
GATES = {"c0": "a0", "c1": "b0"}
PHONES = {"pa": "A", "pb": "B"}
COORDINATOR_TOML = (
    "max_concurrent = 512\n"
    "max_concurrent_per_client = 64\n"
    "rate_per_client_per_s = 1000.0\n"
    "step_deadline_min_s = 4.0\n"
    "step_deadline_max_s = 5.0\n"
)
TIMEOUT_S = 120.0


@dataclass
class Run:
    """One fleet's phones, ledgers and watches (``url`` maps a site to its broker)."""

    fleet: Fleet
    urls: dict[str, str]
    ledger: ReplyLedger = field(default_factory=ReplyLedger)
    agents: dict[str, AgentLedger] = field(default_factory=dict)
    watches: dict[str, CoordinatorWatch] = field(default_factory=dict)
    phones: dict[str, LedgerPhone] = field(default_factory=dict)

    async def load(self, n: int, in_flight: int, max_tokens: int) -> list[bytes]:
        out: list[bytes] = []
        names = list(self.phones)
        for i in range(n):
            await self.ledger.until(
                lambda: sum(not self.ledger.records[c].terminals for c in out) < in_flight,
                TIMEOUT_S, "a request answered")
            req = wire.PhoneRequest(prompt=PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens,
                                    raw=True)
            out.append(await self.phones[names[i % len(names)]].ask(req))
        await self.ledger.answered(TIMEOUT_S, out)  # what is still silent counts as lost
        return out

    async def settle(self, coordinators: Sequence[str]) -> None:
        await self.watches["A"].idle(coordinators, time.time(), TIMEOUT_S)
        tag = uuid.uuid4().hex[:6]
        for site, url in self.urls.items():
            async with make_client(parse_broker_url(url)) as c:
                for p in self.phones:
                    await c.publish(fence_topic(self.fleet.topics, p), f"{tag}{site}{p}".encode(),
                                    qos=1)
        for site in self.urls:
            for p in self.phones:
                await self.ledger.fenced(f"{tag}{site}{p}", TIMEOUT_S)

    def site(self, name: str) -> str:
        """The broker a process or phone is on in this run (one broker: all on A)."""
        site = {**SITES, **PHONES}[name]
        return site if site in self.urls else "A"

    def figures(self, corrs: Sequence[bytes]) -> dict[str, Any]:
        recs = [self.ledger.records[c] for c in corrs]
        s = self.ledger.summary(recs)
        sub = ReplyLedger()
        sub.records = {c: self.ledger.records[c] for c in corrs}
        steps = stepped_once(sub, list(self.agents.values()))
        same: list[float] = []
        cross: list[float] = []
        for r in recs:
            if r.ttft_s is None or len(r.finals) != 1:
                continue
            (same if self.site(r.finals[0]) == self.site(r.client_id) else cross).append(
                r.ttft_s)
        return {**s, "requests_stepped_by_two_or_more": steps["requests_stepped_by_two_or_more"],
                "ttft_p50_same_broker_s": _r(percentile(same, 50), 4),
                "ttft_p50_cross_bridge_s": _r(percentile(cross, 50), 4),
                "answered_across_the_bridge": len(cross)}


@contextlib.asynccontextmanager
async def observed(fleet: Fleet, urls: dict[str, str]) -> AsyncIterator[Run]:
    run = Run(fleet, urls)
    run.agents = {s: AgentLedger([a for a, site in SITES.items() if site == s
                                  and a in GATES.values()]) for s in urls}
    tasks: list[asyncio.Task[None]] = []
    for site, url in urls.items():
        u = parse_broker_url(url)
        ready, wready = asyncio.Event(), asyncio.Event()
        run.watches[site] = CoordinatorWatch(fleet.topics)
        tasks.append(asyncio.create_task(sniff(make_client(u), fleet.topics, [run.agents[site]],
                                               ready)))
        tasks.append(asyncio.create_task(run.watches[site].run(make_client(u), wready)))
        await asyncio.wait_for(asyncio.gather(ready.wait(), wready.wait()), TIMEOUT_S)
    try:
        async with contextlib.AsyncExitStack() as stack:
            for p, site in PHONES.items():
                client = make_client(parse_broker_url(urls.get(site, urls["A"])),
                                     identifier=f"{p}-{uuid.uuid4().hex[:6]}")
                run.phones[p] = await stack.enter_async_context(
                    LedgerPhone(client, p, fleet.topics, run.ledger))
            yield run
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _start(fleet: Fleet, experts: Sequence[Path], urls: dict[str, str]) -> dict[str, int]:
    """The two sites' processes; returns each coordinator's metrics port."""
    ports: dict[str, int] = {}
    for i, agent in enumerate(GATES.values()):
        fleet.start_agent(agent, experts[i % len(experts)], *AGENT_ARGS, name=agent,
                          broker=urls.get(SITES[agent], urls["A"]))
    for c, agent in GATES.items():
        ports[c] = free_port()
        fleet.start_coordinator("--metrics-port", str(ports[c]), coordinator_id=c, name=c,
                                config_text=COORDINATOR_TOML + f"[fixed_gates]\n{agent} = 1.0\n",
                                broker=urls.get(SITES[c], urls["A"]))
    return ports


_EVENT_RE = re.compile(r'^moe2_coordinator_events_total\{coordinator="([^"]+)",event="([^"]+)"\}'
                       r" ([0-9.e+]+)$")
EVENTS = ("copies_held", "held_dropped", "copies_dropped", "fallback_serves", "aborted",
          "late_conflicts", "claims_resent")


def scrape(ports: dict[str, int]) -> dict[str, dict[str, int]]:
    """Each coordinator's exactly-once counters from its /metrics."""
    out: dict[str, dict[str, int]] = {}
    for c, port in ports.items():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                text = r.read().decode()
        except OSError as exc:
            log.warning("metrics of %s unavailable: %s", c, exc)
            continue
        counts = {m.group(2): int(float(m.group(3))) for line in text.splitlines()
                  if (m := _EVENT_RE.match(line))}
        out[c] = {e: counts.get(e, 0) for e in EVENTS}
    return out


async def _ready(fleet: Fleet) -> None:
    if isinstance(fleet, BridgedFleet):
        await fleet.wait_bridge(up=True)
    await fleet.wait_sites({c: {a} for c, a in GATES.items()})


async def _measured_load(run: Run, n: int, in_flight: int, max_tokens: int) -> dict[str, Any]:
    """A warm-up, then ``n`` requests whose every reply is counted once it has settled."""
    await run.load(max(8, n // 10), in_flight, max_tokens)
    run.ledger.records.clear()
    sent = await run.load(n, in_flight, max_tokens)
    await run.settle(list(GATES))
    return run.figures(sent)


async def _single(work: Path, experts: Sequence[Path], n: int, in_flight: int,
                  max_tokens: int) -> dict[str, Any]:
    with Fleet(work / "single") as fleet:
        urls = {"A": fleet.url}
        ports = _start(fleet, experts, urls)
        await _ready(fleet)
        async with observed(fleet, urls) as run:
            out = await _measured_load(run, n, in_flight, max_tokens)
        out["coordinator_events"] = scrape(ports)
        return out


async def _bridged(work: Path, experts: Sequence[Path], n: int, in_flight: int,
                   max_tokens: int, drop_s: float) -> tuple[dict[str, Any], dict[str, Any]]:
    with BridgedFleet(work / "bridged") as fleet:
        urls = {"A": fleet.url, "B": fleet.url_of("B")}
        ports = _start(fleet, experts, urls)
        await _ready(fleet)
        async with observed(fleet, urls) as run:
            load = await _measured_load(run, n, in_flight, max_tokens)
            load["coordinator_events"] = scrape(ports)
            # the bridge drops for drop_s under load, and comes back
            t0 = time.monotonic()
            fleet.cut()
            await fleet.wait_bridge(up=False)
            during: list[bytes] = []
            while time.monotonic() - t0 < drop_s:
                during += await run.load(10, in_flight, max_tokens)
            fleet.restore()
            healed = await fleet.wait_bridge(up=True)
            back_s = time.monotonic() - t0
            await asyncio.gather(run.watches["A"].idle(["c1"], healed, TIMEOUT_S),
                                 run.watches["B"].idle(["c0"], healed, TIMEOUT_S))
            after = await run.load(max(10, n // 4), in_flight, max_tokens)
            await run.settle(list(GATES))
            drop = run.figures([*during, *after])
            drop["during_drop"] = run.figures(during)["requests"]
            drop["link_down_s"] = _r(back_s, 1)
            events = scrape(ports)
            drop["coordinator_events"] = {
                c: {e: v - load["coordinator_events"].get(c, {}).get(e, 0) for e, v in ev.items()}
                for c, ev in events.items()}
        return load, drop


async def phase_bridged(work: Path, experts: Sequence[Path], *, requests: int = 200,
                        in_flight: int = 8, max_tokens: int = 12,
                        drop_s: float = 3.0) -> dict[str, Any]:
    """One broker, then two bridged brokers, then a bridge drop; plain figures."""
    single = await _single(work, experts, requests, in_flight, max_tokens)
    bridged, drop = await _bridged(work, experts, requests, in_flight, max_tokens, drop_s)
    p50_1, p50_2 = single["ttft_p50_s"], bridged["ttft_p50_s"]
    return {
        "requests_per_run": requests,
        "in_flight": in_flight,
        "max_tokens": max_tokens,
        "single_broker": single,
        "bridged": bridged,
        "bridge_drop": drop,
        "added_ttft_p50_s": None if p50_1 is None or p50_2 is None else _r(p50_2 - p50_1, 4),
        "added_ttft_p50_same_broker_s": None if p50_1 is None
        or bridged["ttft_p50_same_broker_s"] is None
        else _r(bridged["ttft_p50_same_broker_s"] - p50_1, 4),
    }
