"""``moe2 monitor``: the pure snapshot logic, and ``--once --json`` against a real agent."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from moe2.shared import wire
from moe2.shared.mqtt import make_client, parse_broker_url
from moe2.shared.topics import Topics
from moe2.tools.fleet.harness import moe2_argv
from moe2.tools.fleet.localbroker import LocalBroker, free_port
from tests.agent_helpers import AgentRpcClient, top_id
from tests.conftest import Procs, log_of

T = Topics()


# --------------------------------------------------------------------------- CLI


def app_plan(experts: list[str] | None) -> wire.AppPlan:
    return wire.AppPlan(experts=experts, feasible=experts is not None, loss=1.0, latency_s=0.01,
                        energy_j=0.5)


def plan(apps: dict[str, list[str] | None], joint: list[str] | None) -> wire.PlanMsg:
    return wire.PlanMsg(coordinator_id="c0", ts=1000.0, method="smo", max_energy_j=2.0,
                        apps={k: app_plan(v) for k, v in apps.items()}, joint=app_plan(joint))



async def run_monitor(*args: str, timeout_s: float = 120.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *moe2_argv(), "monitor", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=timeout_s)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError("moe2 monitor did not finish") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def last_json(stdout: str) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return obj


async def test_monitor_unreachable_broker_fails_in_one_line() -> None:
    code, _out, err = await run_monitor("--broker", f"mqtt://127.0.0.1:{free_port()}", "--once",
                                        "--json", "--timeout", "2")
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("moe2: error: broker")


async def test_monitor_once_without_agents_ends_at_the_timeout(
    fresh_broker: LocalBroker,
) -> None:
    code, out, _err = await run_monitor("--broker", fresh_broker.url, "--once", "--json",
                                        "--timeout", "1")
    assert code == 0
    assert last_json(out) == {"agents": [], "plan": None, "coordinators": [],
                              "complete": False}


async def test_monitor_once_json_shows_a_live_agent_and_its_energy_growing(
    broker: LocalBroker, procs: Procs, tiny_model: Path,
) -> None:
    aid = "mon0"
    agent = procs.moe2("agent", "--broker", broker.url, "--id", aid, "--model", str(tiny_model),
                       "--meter", "estimated", "--estimated-watts", "10",
                       "--telemetry-interval", "0.3", log_name="agent")
    async with AgentRpcClient(broker.url) as rpc:
        try:
            await rpc.wait_status(aid, timeout_s=90)
        except AssertionError:
            raise AssertionError(log_of(agent)) from None

        code, out, err = await run_monitor("--broker", broker.url, "--once", "--json",
                                           "--timeout", "30")
        assert code == 0, err
        snap = last_json(out)
        (row,) = [a for a in snap["agents"] if a["id"] == aid]
        assert row["online"] is True
        assert row["model"]
        assert row["device"] == "cpu"
        assert row["meter"] == "estimated"
        for key in ("power_w", "energy_j", "joules_per_token", "tokens_per_s",
                    "step_latency_s"):
            assert isinstance(row[key], float), key
        assert row["open_sessions"] == 0
        assert row["tokens_total"] == 0
        assert row["in_plan"] is False
        assert snap["plan"] is None
        assert snap["complete"] is True
        energy_before = row["energy_j"]

        # A request, the way a coordinator makes one: open a session and step it.
        dists = await rpc.greedy(aid, "s1", k=8, n_steps=4, prompt="hello world")
        assert len(dists) == 5
        assert top_id(dists[-1]) >= 0
        await rpc.close_sessions(aid, ["s1"])

        # A retained plan naming the agent.
        p = plan({"chat": [aid]}, [aid])
        p = wire.PlanMsg(coordinator_id="c0", ts=time.time(), method="smo", max_energy_j=None,
                         apps=p.apps, joint=p.joint)
        async with make_client(parse_broker_url(broker.url)) as c:
            await c.publish(T.plan.topic, T.plan.encode(p), qos=1, retain=True)
        try:
            code, out, err = await run_monitor("--broker", broker.url, "--once", "--json",
                                               "--timeout", "30")
        finally:
            async with make_client(parse_broker_url(broker.url)) as c:
                await c.publish(T.plan.topic, b"", qos=1, retain=True)
        assert code == 0, err
        snap = last_json(out)
        (row,) = [a for a in snap["agents"] if a["id"] == aid]
        assert row["energy_j"] > energy_before, (energy_before, row)
        assert row["tokens_total"] == 4
        assert row["in_plan"] is True
        assert row["plan_apps"] == ["chat", "joint"]
        assert snap["plan"]["coordinator_id"] == "c0"

        # without --json: the table
        code, out, err = await run_monitor("--broker", broker.url, "--once", "--timeout", "30")
        assert code == 0, err
        assert aid in out
        assert "online" in out
