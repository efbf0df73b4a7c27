"""Issue 16: a stock Mosquitto (no ``set_tcp_nodelay``) stalls every fused token for a delayed
ACK; the coordinator recognises it from its measured step overhead and tells the operator how
to fix it -- in its log, the retained plan and ``moe2 monitor``."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

from moe2.shared import wire
from moe2.shared.mqtt import MessageReader, make_client, parse_broker_url, payload_bytes
from moe2.shared.topics import Topics
from moe2.tools.clients.phone import PhoneClient
from moe2.tools.fleet.harness import moe2_argv
from moe2.tools.fleet.localbroker import LocalBroker
from tests.conftest import RealGgufs, log_of
from tests.fleet import start_agent, start_coordinator, wait_plan

REAL_AGENT_ARGS = ("--max-sessions", "4", "--n-ctx", "256")
#: requests sent before giving up on the warning (each fuses ~47 steps; 16 are enough)
MAX_REQUESTS = 12


async def _ask_until_warned(url: str, topics: Topics) -> wire.PlanMsg:
    """Fused greedy requests, one at a time, until the retained plan carries the warning."""
    cid = f"phone-{uuid.uuid4().hex[:6]}"
    u = parse_broker_url(url)
    async with make_client(u, identifier=cid) as c, PhoneClient(c, cid, topics=topics) as phone, \
            make_client(u, identifier=f"{cid}-plan") as pc, MessageReader(pc) as plans:
        await pc.subscribe(topics.plan.topic, qos=1)
        for _ in range(MAX_REQUESTS):
            ans = await phone.ask(wire.PhoneRequest(prompt="The capital of France is",
                                                    max_tokens=48, raw=True), timeout_s=120)
            assert ans.final is not None, ans.error
            assert [e.dropped for e in ans.final.experts] == [False, False]
            # every plan published meanwhile (the planner replans every 0.5 s)
            while (m := await plans.next(timeout_s=2.0)) is not None:
                plan = topics.plan.decode(payload_bytes(m))
                if any("set_tcp_nodelay true" in w for w in plan.warnings):
                    return plan
    raise AssertionError(f"no stall warning after {MAX_REQUESTS} fused requests")


def test_a_stock_broker_stall_is_reported_with_the_fix(
        procs: Any, tmp_path: Path, real_ggufs: RealGgufs) -> None:
    """Two Qwen2-vocabulary experts behind Mosquitto's defaults, and a coordinator whose
    sockets do not quick-ACK (as on any OS but Linux; moe2's clients do on Linux, which hides
    the stall): the plan, the log and the monitor name ``set_tcp_nodelay true``."""
    topics = Topics("stall")
    with LocalBroker(tcp_nodelay=False) as broker:
        for name, expert in (("q3b", real_ggufs.qwen2), ("q7b", real_ggufs.qwen2_padded)):
            start_agent(procs, broker.url, name, expert.path, "--root", topics.root,
                        *REAL_AGENT_ARGS)
        cfg = tmp_path / "coordinator.toml"
        cfg.write_text("tcp_quickack = false\n[planner]\ninterval_s = 0.5\n")
        coord = start_coordinator(procs, broker.url, "--root", topics.root, "--config", str(cfg))
        asyncio.run(wait_plan(broker.url, ["q3b", "q7b"], timeout_s=120, topics=topics))
        plan = asyncio.run(_ask_until_warned(broker.url, topics))
        [warning] = [w for w in plan.warnings if "set_tcp_nodelay true" in w]
        assert "mosquitto.conf" in warning
        assert "set_tcp_nodelay true" in log_of(coord)
        mon = subprocess.run([*moe2_argv(), "monitor", "--broker", broker.url, "--root",
                              topics.root, "--once", "--json", "--timeout", "30"],
                             capture_output=True, text=True, timeout=60, check=False)
        assert mon.returncode == 0, mon.stderr
        snapshot = json.loads(mon.stdout.strip().splitlines()[-1])
        assert any("set_tcp_nodelay true" in w for w in snapshot["plan"]["warnings"])
