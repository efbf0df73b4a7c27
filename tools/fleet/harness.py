"""A whole fleet on one machine: a private mosquitto and ``moe2`` agent and coordinator processes.

The one place that starts ``moe2`` processes (:func:`spawn_moe2`): ``moe2 demo``, ``moe2
reproduce``, ``moe2 eval``, every bench and the tests use it. Every process is a real
``moe2 agent`` / ``moe2 coordinator`` talking MQTT through the private broker -- the production
serving path, not a shortcut -- and every one is stopped (SIGTERM, then SIGKILL; a frozen one is
resumed first) when the fleet closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import aiomqtt
import psutil

from moe2.shared import wire
from moe2.shared.mqtt import MessageReader, make_client, parse_broker_url, payload_bytes
from moe2.shared.topics import Topics
from moe2.tools.clients.phone import AskError, PhoneClient, session_client
from moe2.tools.fleet.localbroker import LocalBroker, free_port

log = logging.getLogger(__name__)

#: seconds a process gets to stop on SIGTERM before it is killed
STOP_TIMEOUT_S = 15.0


class FleetError(RuntimeError):
    """A fleet process died, or the fleet never became ready (the message has the log tail)."""


def moe2_argv(*args: str) -> list[str]:
    """The command line of a ``moe2`` subcommand run by this interpreter."""
    return [sys.executable, "-m", "moe2.cli.main", *args]


def spawn_moe2(args: Sequence[str], log_path: Path | None = None,
               env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``moe2 ARGS`` with its output in ``log_path`` (discarded without one)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1")
    if env:
        full_env.update(env)
    if log_path is None:
        return subprocess.Popen(moe2_argv(*args), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=full_env)
    with log_path.open("ab") as logf:
        return subprocess.Popen(moe2_argv(*args), stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=full_env)


def _get_json(url: str, api_key: str | None = None, timeout_s: float = 5.0) -> Any:
    """GET ``url`` (stdlib only: the harness needs no HTTP client library)."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"}
                                 if api_key else {})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def _log_args(level: str | None) -> list[str]:
    return [] if level is None else ["--log-level", level]


def stop_process(p: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> int:
    """SIGTERM (after SIGCONT: a frozen process cannot handle it), then SIGKILL."""
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGCONT)
            p.terminate()
        try:
            p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("process %d did not stop on SIGTERM; killing it", p.pid)
            p.kill()
            p.wait()
    return p.returncode


@dataclass
class Proc:
    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path


class Fleet:
    """``with Fleet(workdir) as f:`` -- a broker on a free loopback port; then
    :meth:`start_agent`, :meth:`start_coordinator` (or :meth:`spawn` any subcommand), waits for
    the fleet (:meth:`wait_statuses`, :meth:`wait_plan`, :meth:`wait_ready`), phones
    (:meth:`phone`) and faults (:meth:`signal`, :meth:`restart`)."""

    def __init__(self, workdir: str | Path | None = None, *, root: str = "moe2",
                 broker_config: str | None = None, broker_nodelay: bool = True) -> None:
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="moe2-fleet-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.topics = Topics(root)
        broker_dir = self.workdir / "broker"
        broker_dir.mkdir(exist_ok=True)
        self.broker = LocalBroker(config_text=broker_config, workdir=str(broker_dir),
                                  tcp_nodelay=broker_nodelay)
        self.procs: dict[str, Proc] = {}

    @property
    def url(self) -> str:
        return self.broker.url

    def __enter__(self) -> Fleet:
        self.broker.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------ processes
    def spawn(self, name: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        p = spawn_moe2(argv, self.workdir / f"{name}.log")
        self.procs[name] = Proc(name, list(argv), p, self.workdir / f"{name}.log")
        return p

    def start_agent(self, agent_id: str, model: str | Path, *extra: str, threads: int = 1,
                    root: str | None = None, name: str | None = None,
                    log_level: str | None = None,
                    broker: str | None = None) -> subprocess.Popen[bytes]:
        """``broker``: another broker's URL than the fleet's own (a bridged site's)."""
        return self.spawn(name or f"agent-{agent_id}", [
            *_log_args(log_level), "agent", "--broker", broker or self.url, "--id", agent_id,
            "--model", str(model), "--root", root or self.topics.root,
            "--threads", str(threads), *extra])

    def start_coordinator(self, *extra: str, coordinator_id: str = "coordinator",
                          config_text: str | None = None, root: str | None = None,
                          name: str | None = None, log_level: str | None = None,
                          broker: str | None = None) -> subprocess.Popen[bytes]:
        args = [*_log_args(log_level), "coordinator", "--broker", broker or self.url,
                "--id", coordinator_id, "--root", root or self.topics.root]
        if config_text is not None:
            cfg = self.workdir / f"{coordinator_id}.toml"
            cfg.write_text(config_text)
            args += ["--config", str(cfg)]
        return self.spawn(name or f"coordinator-{coordinator_id}", [*args, *extra])

    def start_gateway(self, *extra: str, gateway_id: str = "gateway",
                      config_text: str | None = None, root: str | None = None,
                      name: str | None = None, log_level: str | None = None,
                      port: int | None = None) -> str:
        """``moe2 gateway`` on a free loopback port; returns its base URL (``.../v1``)."""
        port = port or free_port()
        args = [*_log_args(log_level), "gateway", "--broker", self.url, "--id", gateway_id,
                "--root", root or self.topics.root, "--listen", f"127.0.0.1:{port}"]
        if config_text is not None:
            cfg = self.workdir / f"{gateway_id}.toml"
            cfg.write_text(config_text)
            args += ["--config", str(cfg)]
        self.spawn(name or f"gateway-{gateway_id}", [*args, *extra])
        return f"http://127.0.0.1:{port}/v1"

    async def wait_models(self, base_url: str, models: Sequence[str], *,
                          api_key: str | None = None, timeout_s: float = 90.0,
                          name: str | None = None) -> dict[str, Any]:
        """Until the gateway at ``base_url`` answers ``GET /models`` listing ``models``; the
        list. ``name``: the gateway's process (its death fails the wait at once)."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            if name is not None:
                self.check_alive([name])
            try:
                listed: dict[str, Any] = await asyncio.to_thread(
                    _get_json, f"{base_url}/models", api_key)
            except (OSError, ValueError) as exc:
                last = str(exc)
            else:
                ids = {m.get("id") for m in listed.get("data", [])}
                if set(models) <= ids:
                    return listed
                last = f"models {sorted(map(str, ids))}"
            await asyncio.sleep(0.2)
        raise FleetError(f"gateway {base_url} never listed {sorted(models)}; last: {last}")

    def restart(self, name: str) -> None:
        """Start ``name`` again with the same arguments (after it died or was killed)."""
        proc = self.procs[name]
        if proc.popen.poll() is None:
            raise FleetError(f"{name} is still running")
        self.spawn(name, proc.argv)

    def signal(self, name: str, sig: int) -> None:
        self.procs[name].popen.send_signal(sig)
        if sig == signal.SIGKILL:
            self.procs[name].popen.wait(timeout=10)

    def stop(self, name: str) -> int:
        return stop_process(self.procs[name].popen)

    def pid(self, name: str) -> int:
        return self.procs[name].popen.pid

    def rss_mib(self, name: str) -> float:
        return float(psutil.Process(self.pid(name)).memory_info().rss) / 2**20

    def log_tail(self, name: str, n: int = 2000) -> str:
        try:
            return self.procs[name].log_path.read_text(errors="replace")[-n:]
        except (OSError, KeyError):
            return ""

    def dead(self) -> dict[str, int]:
        """Processes that exited (name -> exit code)."""
        return {n: p.popen.returncode for n, p in self.procs.items()
                if p.popen.poll() is not None}

    def check_alive(self, names: Iterable[str] | None = None) -> None:
        for name in names if names is not None else self.procs:
            p = self.procs[name].popen
            if p.poll() is not None:
                raise FleetError(f"{name} exited with code {p.returncode}:\n{self.log_tail(name)}")

    def close(self) -> None:
        for p in self.procs.values():
            if p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.popen.send_signal(signal.SIGCONT)
                    p.popen.terminate()
        for p in self.procs.values():
            stop_process(p.popen)
        self.broker.close()

    # ------------------------------------------------------------------ waits
    async def wait_statuses(self, agent_ids: Sequence[str], timeout_s: float = 120.0,
                            root: str | None = None) -> dict[str, wire.AgentStatus]:
        """Until every agent has published its retained online status."""
        topics = Topics(root) if root else self.topics
        want = set(agent_ids)
        seen: dict[str, wire.AgentStatus] = {}
        deadline = time.monotonic() + timeout_s
        async with make_client(parse_broker_url(self.url),
                               identifier=f"fleet-{uuid.uuid4().hex[:6]}") as c, \
                MessageReader(c) as reader:
            await c.subscribe(topics.all_agent_status, qos=1)
            while not want <= set(seen):
                self.check_alive()
                if time.monotonic() > deadline:
                    raise FleetError(f"agents not online: {sorted(want - set(seen))}")
                m = await reader.next(timeout_s=0.5)
                if m is None:
                    continue
                aid = topics.agent_id_of(str(m.topic))
                if aid is None or not payload_bytes(m):
                    continue
                st = topics.agent_status(aid).decode(payload_bytes(m))
                if st.state == "online":
                    seen[aid] = st
        return seen

    async def wait_plan(self, agent_ids: Sequence[str], timeout_s: float = 120.0,
                        root: str | None = None) -> wire.PlanMsg:
        """Until a coordinator's retained plan covers every agent (in some application)."""
        topics = Topics(root) if root else self.topics
        want = set(agent_ids)
        deadline = time.monotonic() + timeout_s
        async with make_client(parse_broker_url(self.url),
                               identifier=f"fleet-{uuid.uuid4().hex[:6]}") as c, \
                MessageReader(c) as reader:
            await c.subscribe(topics.plan.topic, qos=1)
            while True:
                self.check_alive()
                if time.monotonic() > deadline:
                    raise FleetError(f"the coordinator never planned with {sorted(want)}")
                m = await reader.next(timeout_s=0.5)
                if m is None or not payload_bytes(m):
                    continue
                plan = topics.plan.decode(payload_bytes(m))
                if want <= set(plan.joint.experts or []) or any(
                        want <= set(a.experts or []) for a in plan.apps.values()):
                    return plan

    def phone(self, client_id: str, *, root: str | None = None,
              check_delivery: bool = True) -> PhoneClient:
        """A reconnecting phone with a persistent session (enter it with ``async with``)."""
        url = parse_broker_url(self.url)
        return PhoneClient(lambda: session_client(url, client_id), client_id,
                           Topics(root or self.topics.root), check_delivery=check_delivery,
                           watch_coordinators=True)

    async def wait_sites(self, expect: Mapping[str, set[str]], timeout_s: float = 120.0,
                         broker: str | None = None) -> float:
        """Until each coordinator named in ``expect`` has answered a probe fusing exactly the
        agents named for it (coordinators with gates of their own, sites of a bridged fleet);
        probes go through ``broker`` (default: the fleet's own). Seconds."""
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        ok: set[str] = set()
        last = "no answer"
        cid = f"probe-{uuid.uuid4().hex[:8]}"
        url = parse_broker_url(broker or self.url)
        while not set(expect) <= ok:
            self.check_alive()
            if time.monotonic() > deadline:
                raise FleetError(f"fleet not ready after {timeout_s:.0f}s: ok {sorted(ok)} of "
                                 f"{sorted(expect)}; last: {last}")
            try:
                async with make_client(url, identifier=cid) as c, \
                        PhoneClient(c, cid, self.topics) as ph:
                    while not set(expect) <= ok and time.monotonic() < deadline:
                        ans = await ph.ask(wire.PhoneRequest(prompt="ping", max_tokens=1,
                                                             raw=True), timeout_s=10)
                        if ans.final is None:
                            last = f"error {ans.error}"
                            await asyncio.sleep(0.2)
                            continue
                        used = {e.id for e in ans.final.experts if not e.dropped}
                        who = ans.final.coordinator_id
                        if expect.get(who) == used:
                            ok.add(who)
                        else:
                            last = f"{who} fused {sorted(used)}"
                            await asyncio.sleep(0.1)
            except (AskError, asyncio.TimeoutError, aiomqtt.MqttError) as exc:
                last = f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(0.3)
        return time.monotonic() - t0

    async def wait_ready(self, agents: Sequence[str], coordinators: Sequence[str], *,
                         root: str | None = None, timeout_s: float = 90.0,
                         required: Iterable[str] = ()) -> float:
        """Until every coordinator answers with every agent fused (none dropped); seconds.
        ``required``: processes whose death fails the wait at once (default: the ones named)."""
        want_agents, want_coords = set(agents), set(coordinators)
        must_live = [n for n in [*required] if n in self.procs] or [
            n for n in self.procs if n in want_agents | want_coords]
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        ok: set[str] = set()
        last = "no answer"
        cid = f"probe-{uuid.uuid4().hex[:8]}"
        while time.monotonic() < deadline:
            self.check_alive(must_live)
            try:
                async with self.phone(cid, root=root) as ph:
                    while time.monotonic() < deadline and not want_coords <= ok:
                        self.check_alive(must_live)
                        try:
                            ans = await ph.ask(wire.PhoneRequest(
                                prompt="ping", max_tokens=1, raw=True), timeout_s=10)
                        except (AskError, asyncio.TimeoutError, aiomqtt.MqttError) as exc:
                            last = f"{type(exc).__name__}: {exc}"
                            await asyncio.sleep(0.2)
                            continue
                        if ans.final is None:
                            last = f"error {ans.error}"
                            await asyncio.sleep(0.2)
                            continue
                        used = {e.id for e in ans.final.experts if not e.dropped}
                        if used == want_agents:
                            ok.add(ans.final.coordinator_id)
                        else:
                            last = f"{ans.final.coordinator_id} fused {sorted(used)}"
                            await asyncio.sleep(0.1)
                if want_coords <= ok:
                    return time.monotonic() - t0
            except aiomqtt.MqttError as exc:
                last = f"broker: {exc}"
                await asyncio.sleep(0.3)
        raise FleetError(f"fleet not ready after {timeout_s:.0f}s: coordinators ok {sorted(ok)} of "
                         f"{sorted(want_coords)}; last: {last}")
