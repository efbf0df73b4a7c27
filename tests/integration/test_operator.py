"""Issue 11: what a new operator hits in the first hour -- each must fail loudly and at once.

Against real processes: a secured mosquitto written by ``moe2 broker-config``, ``moe2 ask``,
agents and coordinators started as an operator would start them.
"""

from __future__ import annotations

import os
import pwd
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from moe2.tools.fleet.harness import moe2_argv
from moe2.tools.fleet.localbroker import LocalBroker, free_port
from moe2.tools.models import ExpertFile
from moe2.tools.ops import brokerconf as bc
from tests.conftest import Ggufs, log_of
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
def experts(ggufs: Ggufs) -> list[ExpertFile]:
    return list(ggufs.shared[:1])


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
