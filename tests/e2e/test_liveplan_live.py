"""Issue 4 live behaviour: plans follow telemetry, membership and application classes."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from moe2.shared import wire
from moe2.shared.mqtt import make_client, parse_broker_url
from moe2.shared.topics import Topics
from moe2.tools.fleet.localbroker import LocalBroker
from tests.conftest import Ggufs
from tests.fleet import ask, start_agent, start_coordinator, wait_plan


def telemetry(agent_id: str, latency_s: float, ts: float, jpt: float = 0.1) -> wire.Telemetry:
    return wire.Telemetry(agent_id=agent_id, ts=ts, power_w=5.0, energy_j=1.0, tokens_total=10,
                          tokens_per_s=10.0, joules_per_token=jpt, step_latency_s=latency_s,
                          open_sessions=0, meter="estimated")



async def _forge(url: str, topics: Topics, agent_id: str, latencies: list[float]) -> None:
    async with make_client(parse_broker_url(url), identifier=f"forge-{agent_id}") as c:
        t = topics.agent_telemetry(agent_id)
        for lat in latencies:
            await c.publish(t.topic, t.encode(telemetry(agent_id, lat, time.time())), qos=1)
            await asyncio.sleep(0.05)



def test_live_replanning_follows_telemetry_membership_and_apps(
        procs: Any, tmp_path: Path, ggufs: Ggufs) -> None:
    experts = ggufs.shared[:2]
    topics = Topics()
    cfg = tmp_path / "coordinator.toml"
    cfg.write_text(
        "[apps.chat]\nmax_latency_s = 0.05\n[apps.batch]\nmax_latency_s = 5.0\n"
        "[planner]\ninterval_s = 60.0\n")
    with LocalBroker() as b:
        # Real agents serve the requests; their own telemetry is slow to come (60 s), so the
        # planner sees the telemetry this test publishes for them.
        agents = {name: start_agent(procs, b.url, name, e.path, "--telemetry-interval", "60")
                  for name, e in zip(("a", "b"), experts, strict=True)}
        start_coordinator(procs, b.url, "--config", str(cfg))
        asyncio.run(wait_plan(b.url, ["a", "b"], app="chat"))

        # b becomes slower than the chat budget: it leaves chat's plan, stays in batch's.
        asyncio.run(_forge(b.url, topics, "b", [0.2, 0.2, 0.2]))
        plan = asyncio.run(wait_plan(b.url, ["a"], app="chat"))
        assert sorted(plan.apps["batch"].experts or []) == ["a", "b"]
        chat = asyncio.run(ask(b.url, wire.PhoneRequest(prompt="hi", app="chat", max_tokens=3)))
        batch = asyncio.run(ask(b.url, wire.PhoneRequest(prompt="hi", app="batch",
                                                         max_tokens=3)))
        assert chat.final is not None and [e.id for e in chat.final.experts] == ["a"]
        assert batch.final is not None
        assert sorted(e.id for e in batch.final.experts) == ["a", "b"]
        unknown = asyncio.run(ask(b.url, wire.PhoneRequest(prompt="hi", app="nope")))
        assert unknown.error is not None and "unknown app" in unknown.error.message

        # b recovers: it returns to chat's plan, which now counts the messaging overhead the
        # coordinator measured while serving the requests above.
        asyncio.run(_forge(b.url, topics, "b", [0.01] * 5))
        plan = asyncio.run(wait_plan(b.url, ["a", "b"], app="chat"))
        assert plan.step_overhead_s > 0
        assert plan.apps["chat"].latency_s == pytest.approx(0.01 + plan.step_overhead_s)

        # a leaves (killed; the broker sends its Last Will): replanned at once, not at 60 s.
        agents["a"].send_signal(signal.SIGKILL)
        asyncio.run(wait_plan(b.url, ["b"], app="chat", timeout_s=30))
