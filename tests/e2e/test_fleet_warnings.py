"""Issue 11: what a new operator hits in the first hour -- each must fail loudly and at once.

Against real processes: a secured mosquitto written by ``moe2 broker-config``, ``moe2 ask``,
agents and coordinators started as an operator would start them.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

from moe2.shared.topics import Topics
from moe2.tools.fleet.harness import moe2_argv
from moe2.tools.fleet.localbroker import LocalBroker
from tests.conftest import log_of
from tests.fleet import plan_where, start_agent, start_coordinator

#: a hung command is a failed test; the commands here must answer at once
COMMAND_TIMEOUT_S = 60.0


def moe2(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*moe2_argv(), *args], capture_output=True,
                          text=True, timeout=COMMAND_TIMEOUT_S, check=False)


def test_a_gate_that_knows_none_of_the_agents_is_reported(
        procs: Any, broker: LocalBroker, tiny_model: Path) -> None:
    """Log, plan message and monitor say so, instead of answering no_experts in silence."""
    topics = Topics("gatecheck")
    start_agent(procs, broker.url, "math", tiny_model, "--root", topics.root)
    coord = start_coordinator(procs, broker.url, "--root", topics.root,
                              "--fixed-gate", "expert-0=1", "--fixed-gate", "expert-1=1")
    plan, last = asyncio.run(plan_where(broker.url, lambda p: bool(p.warnings),
                                        timeout_s=COMMAND_TIMEOUT_S, topics=topics))
    assert plan is not None, f"no plan with warnings was published; last plan: {last}"
    [warning] = plan.warnings
    assert "expert-0, expert-1" in warning and "math" in warning
    assert warning in log_of(coord)
    mon = moe2("monitor", "--broker", broker.url, "--root", topics.root, "--once", "--json",
               "--timeout", "30")
    assert mon.returncode == 0, mon.stderr
    snapshot = json.loads(mon.stdout.strip().splitlines()[-1])
    assert snapshot["plan"]["warnings"] == [warning]
    mon = moe2("monitor", "--broker", broker.url, "--root", topics.root, "--once",
               "--timeout", "30")
    assert "warning: the gate knows experts" in mon.stdout.replace("\n", " ")
