"""A whole fleet on one machine: private mosquitto, agent and coordinator processes.

Used by ``moe2 demo``, ``moe2 reproduce``, ``moe2 eval`` and the benches. Every process is a
real ``moe2 agent`` / ``moe2 coordinator`` subprocess talking MQTT through the private broker --
the production serving path, not a shortcut -- and every one is stopped (SIGTERM, then SIGKILL)
when the context exits.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import aiomqtt

from moe2.shared import wire
from moe2.shared.mqtt import MessageReader, make_client, parse_broker_url, payload_bytes
from moe2.shared.topics import Topics
from moe2.tools.fleet.localbroker import LocalBroker

log = logging.getLogger(__name__)


class FleetError(RuntimeError):
    pass


class LocalFleet:
    def __init__(self, workdir: str | Path | None = None, root: str = "moe2") -> None:
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="moe2-fleet-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.topics = Topics(root)
        self.broker = LocalBroker()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return self.broker.url

    def __enter__(self) -> LocalFleet:
        self.broker.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _spawn(self, name: str, args: Sequence[str]) -> subprocess.Popen[bytes]:
        log_path = self.workdir / f"{name}.log"
        with log_path.open("wb") as logf:
            p = subprocess.Popen([sys.executable, "-m", "moe2.cli.main", *args],
                                 stdout=logf, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL)
        self.procs[name] = p
        return p

    def start_agent(self, agent_id: str, model: str | Path, *extra: str,
                    threads: int = 1) -> subprocess.Popen[bytes]:
        return self._spawn(f"agent-{agent_id}", [
            "agent", "--broker", self.url, "--id", agent_id, "--model", str(model),
            "--root", self.topics.root, "--threads", str(threads), *extra])

    def start_coordinator(self, *extra: str, coordinator_id: str = "coordinator",
                          config_text: str | None = None) -> subprocess.Popen[bytes]:
        args = ["coordinator", "--broker", self.url, "--id", coordinator_id,
                "--root", self.topics.root]
        if config_text is not None:
            cfg = self.workdir / f"{coordinator_id}.toml"
            cfg.write_text(config_text)
            args += ["--config", str(cfg)]
        return self._spawn(f"coordinator-{coordinator_id}", [*args, *extra])

    def log_tail(self, name: str, n: int = 1500) -> str:
        try:
            return (self.workdir / f"{name}.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise FleetError(f"{name} exited with code {p.returncode}:\n{self.log_tail(name)}")

    async def wait_statuses(self, agent_ids: Sequence[str], timeout_s: float = 120.0
                            ) -> dict[str, wire.AgentStatus]:
        """Until every agent has published its retained online status."""
        want = set(agent_ids)
        seen: dict[str, wire.AgentStatus] = {}
        deadline = time.monotonic() + timeout_s
        async with make_client(parse_broker_url(self.url),
                               identifier=f"fleet-{uuid.uuid4().hex[:6]}") as c, \
                MessageReader(c) as reader:
            await c.subscribe(self.topics.all_agent_status, qos=1)
            while not want <= set(seen):
                self.check_alive()
                if time.monotonic() > deadline:
                    raise FleetError(f"agents not online: {sorted(want - set(seen))}")
                m = await reader.next(timeout_s=0.5)
                if m is None:
                    continue
                aid = self.topics.agent_id_of(str(m.topic))
                if aid is None or not payload_bytes(m):
                    continue
                st = self.topics.agent_status(aid).decode(payload_bytes(m))
                if st.state == "online":
                    seen[aid] = st
        return seen

    async def wait_plan(self, agent_ids: Sequence[str], timeout_s: float = 120.0) -> None:
        """Until a coordinator's retained plan covers every agent."""
        want = set(agent_ids)
        deadline = time.monotonic() + timeout_s
        async with make_client(parse_broker_url(self.url),
                               identifier=f"fleet-{uuid.uuid4().hex[:6]}") as c, \
                MessageReader(c) as reader:
            await c.subscribe(self.topics.plan.topic, qos=1)
            while True:
                self.check_alive()
                if time.monotonic() > deadline:
                    raise FleetError(f"the coordinator never planned with {sorted(want)}")
                m = await reader.next(timeout_s=0.5)
                if m is None:
                    continue
                plan = self.topics.plan.decode(payload_bytes(m))
                if want <= set(plan.joint.experts or []) or any(
                        want <= set(a.experts or []) for a in plan.apps.values()):
                    return

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for name, p in self.procs.items():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop on SIGTERM; killing it", name)
                p.kill()
                p.wait()
        self.procs.clear()
        with contextlib.suppress(Exception):
            self.broker.close()


async def reachable(url: str) -> bool:
    try:
        async with make_client(parse_broker_url(url), identifier=f"probe-{uuid.uuid4().hex[:6]}"):
            return True
    except aiomqtt.MqttError:
        return False
