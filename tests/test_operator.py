"""Issue 11: what a new operator hits in the first hour -- each must fail loudly and at once.

Against real processes: a secured mosquitto written by ``moe2 broker-config``, ``moe2 ask``,
agents and coordinators started as an operator would start them.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from moe2.coordinator.fleetcheck import gate_coverage
from moe2.shared import wire
from moe2.shared.mqtt import MessageReader, make_client, parse_broker_url, payload_bytes
from moe2.shared.topics import Topics
from moe2.tools.fleet.harness import moe2_argv
from moe2.tools.fleet.localbroker import LocalBroker, free_port
from moe2.tools.models import ExpertFile, make_test_experts
from moe2.tools.ops import brokerconf as bc
from tests.conftest import log_of
from tests.fleet import start_agent, start_coordinator

#: a hung command is a failed test; the commands here must answer at once
COMMAND_TIMEOUT_S = 60.0


@dataclass
class Secured:
    port: int
    passwords: dict[str, str]

    def url(self, name: str, password: str | None = None) -> str:
        return f"mqtt://{name}:{password or self.passwords[name]}@127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    out = tmp_path_factory.mktemp("secured")
    port = free_port()
    me = pwd.getpwuid(os.geteuid()).pw_name
    spec = bc.BrokerSpec(conf_dir=out, port=port, tls_port=free_port(), hostnames=("h",),
                         broker_user=me)
    files = bc.write_broker_config(out, bc.Fleet(phones=("p1",), agents=("e0",),
                                                 coordinators=("c0",)), spec)
    text = files.conf.read_text().replace("{", "{{").replace("}", "}}")
    with LocalBroker(port=port, config_text=text):
        yield Secured(port, {a.name: a.password for a in files.accounts})


@pytest.fixture(scope="module")
def experts(tmp_path_factory: pytest.TempPathFactory) -> list[ExpertFile]:
    return make_test_experts(tmp_path_factory.mktemp("experts"), count=1)


def moe2(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*moe2_argv(), *args], capture_output=True,
                          text=True, timeout=COMMAND_TIMEOUT_S, check=False)


# --------------------------------------------------------------------------- moe2 ask


def test_ask_is_the_url_user_by_default_and_hears_no_coordinator_at_once(
        secured: Secured) -> None:
    """With p1's credentials and no --client-id the request goes out as p1 (the ACL allows
    it); no coordinator is subscribed, which the broker's PUBACK says: one line, exit 1 --
    not a 120 s wait for "is a coordinator running?"."""
    proc = moe2("ask", "--broker", secured.url("p1"), "--timeout", "600", "hello")
    assert proc.returncode == 1, proc.stderr
    assert "no_coordinator" in proc.stderr, proc.stderr
    assert "not_authorized" not in proc.stderr


def test_ask_under_another_client_id_is_refused_by_the_acl_at_once(secured: Secured) -> None:
    proc = moe2("ask", "--broker", secured.url("p1"), "--client-id", "someone-else",
                "--timeout", "600", "hello")
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("moe2: error: not_authorized"), proc.stderr
    assert "moe2/requests/someone-else" in line


def test_ask_with_a_wrong_password_says_refused(secured: Secured) -> None:
    proc = moe2("ask", "--broker", secured.url("p1", "wrong"), "--timeout", "600", "hello")
    assert proc.returncode == 1
    assert "refused the connection" in proc.stderr, proc.stderr


# --------------------------------------------------------------------------- daemons


@pytest.mark.parametrize("role", ["agent", "coordinator"])
def test_a_daemon_whose_credentials_are_refused_exits_with_code_2(
        procs: Any, secured: Secured, experts: list[ExpertFile], role: str) -> None:
    """Not "connection lost" forever: "refused", then exit code 2 (systemd shows the failed
    unit; its restart policy retries)."""
    wrong = secured.url("e0" if role == "agent" else "c0", "not-the-password")
    if role == "agent":
        p = start_agent(procs, wrong, "e0", experts[0].path)
    else:
        p = start_coordinator(procs, wrong, name="c0")
    code = p.wait(timeout=COMMAND_TIMEOUT_S)
    log = log_of(p)
    assert code == 2, log[-2000:]
    assert "refused" in log
    assert "connection lost" not in log
    assert log.strip().splitlines()[-1].startswith("moe2: error:"), log[-500:]


# --------------------------------------------------------------------------- gate vs fleet


def test_gate_coverage_names_the_mismatch() -> None:
    assert gate_coverage([], ["a"]) == []  # a uniform gate knows no names: weighs everyone
    assert gate_coverage(["a", "b"], []) == []  # nobody online yet
    assert gate_coverage(["a", "b"], ["a", "b"]) == []
    [none] = gate_coverage(["x", "y"], ["a", "b"])
    assert "none of the online agents" in none and "no_experts" in none
    assert "x, y" in none and "a, b" in none
    [part] = gate_coverage(["a", "x"], ["a", "b"])
    assert "b" in part and "never used" in part
    [fallback] = gate_coverage(["x"], ["a"], unknown_expert_weight=0.5)
    assert "fallback weight" in fallback


async def _plan_with_warnings(url: str, topics: Topics, timeout_s: float) -> wire.PlanMsg:
    async with make_client(parse_broker_url(url)) as c, MessageReader(c) as reader:
        await c.subscribe(topics.plan.topic, qos=1)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            m = await reader.next(timeout_s=deadline - loop.time())
            if m is not None and payload_bytes(m):
                plan = topics.plan.decode(payload_bytes(m))
                if plan.warnings:
                    return plan
    raise AssertionError("no plan with warnings was published")


def test_a_gate_that_knows_none_of_the_agents_is_reported(
        procs: Any, broker: LocalBroker, experts: list[ExpertFile]) -> None:
    """Log, plan message and monitor say so, instead of answering no_experts in silence."""
    topics = Topics("gatecheck")
    start_agent(procs, broker.url, "math", experts[0].path, "--root", topics.root)
    coord = start_coordinator(procs, broker.url, "--root", topics.root,
                              "--fixed-gate", "expert-0=1", "--fixed-gate", "expert-1=1")
    plan = asyncio.run(_plan_with_warnings(broker.url, topics, COMMAND_TIMEOUT_S))
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


def test_readme_names_files_that_exist_and_prompts_the_demo_answers() -> None:
    """The README's phone example asks what the demo fleet answers, in its form, and every
    repository file it names exists (issue 11.6)."""
    repo = Path(__file__).resolve().parent.parent
    readme = (repo / "README.md").read_text()
    assert "What is 2 plus 3?" not in readme  # the toy experts answered "4"
    assert '"prompt": "Q: Which city is the capital of Peru? A:", "raw": True' in readme
    assert "Peru" in (repo / "tools" / "offline" / "corpus.py").read_text()
    named = set(re.findall(r"`((?:agent|coordinator|shared|cli|tools|gateway|scripts|systemd|"
                           r"dashboards|tests)/[\w./@-]+)`", readme))
    assert named, "the README names no repository files?"
    missing = sorted(p for p in named if not (repo / p).exists())
    assert not missing, f"the README names files that do not exist: {missing}"
    assert "joint=[...]" in readme  # the monitor's joint plan is explained
