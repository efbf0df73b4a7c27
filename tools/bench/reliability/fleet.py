"""The bench's fleet: a persistent mosquitto, agents a0.., coordinators in one group, and a
small-limits coordinator under its own root for the bounds phase."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import aiomqtt
import psutil

from moe2.shared import wire
from moe2.shared.mqtt import (
    parse_broker_url,
)
from moe2.shared.topics import Topics
from moe2.tools.bench.reliability.outcomes import (
    AGENT_ARGS,
    BOUNDS_COORDINATOR_TOML,
    BOUNDS_ROOT,
    BROKER_CONF,
    MAIN_COORDINATOR_TOML,
    FleetError,
)
from moe2.tools.clients.phone import AskError, PhoneClient, session_client
from moe2.tools.fleet.localbroker import LocalBroker

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- the fleet


def broker_config() -> str:
    """BROKER_CONF plus ``user``: mosquitto started as root drops to 'mosquitto' and could not
    write its persistence file in our directory."""
    return BROKER_CONF + f"user {pwd.getpwuid(os.getuid()).pw_name}\n"


@dataclass
class _Proc:
    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path


class Fleet:
    """Broker, agents and coordinators as subprocesses on loopback; all stopped on exit.

    ``with Fleet(work, experts) as f:`` starts the broker, ``n_agents`` agents ``a0..`` serving
    ``experts`` (cycled), ``coordinators`` in one group and, with ``bounds``, one agent ``b0`` and
    one coordinator ``cb`` with small limits under the topic root :data:`BOUNDS_ROOT`.
    """

    def __init__(self, work: Path, experts: Sequence[Path], *, n_agents: int = 3,
                 coordinators: Sequence[str] = ("c0", "c1"), bounds: bool = True,
                 root: str = "moe2") -> None:
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "broker").mkdir(exist_ok=True)
        self.experts = [Path(e) for e in experts]
        self.topics = Topics(root)
        self.agents = [f"a{i}" for i in range(n_agents)]
        self.coordinators = list(coordinators)
        self.bounds = bounds
        self.broker = LocalBroker(config_text=broker_config(), workdir=str(self.work / "broker"))
        self.procs: dict[str, _Proc] = {}

    @property
    def url(self) -> str:
        return self.broker.url

    def __enter__(self) -> Fleet:
        self.broker.start()
        try:
            main_cfg = self.work / "coordinator.toml"
            main_cfg.write_text(MAIN_COORDINATOR_TOML)
            for i, name in enumerate(self.agents):
                self.spawn(name, self._agent_argv(name, self.experts[i % len(self.experts)],
                                                  self.topics.root))
            for name in self.coordinators:
                self.spawn(name, self._coordinator_argv(name, main_cfg, self.topics.root))
            if self.bounds:
                bounds_cfg = self.work / "bounds.toml"
                bounds_cfg.write_text(BOUNDS_COORDINATOR_TOML)
                self.spawn("b0", self._agent_argv("b0", self.experts[0], BOUNDS_ROOT))
                self.spawn("cb", self._coordinator_argv("cb", bounds_cfg, BOUNDS_ROOT))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _agent_argv(self, name: str, model: Path, root: str) -> list[str]:
        return ["agent", "--broker", self.url, "--id", name, "--model", str(model),
                "--root", root, *AGENT_ARGS]

    def _coordinator_argv(self, name: str, cfg: Path, root: str) -> list[str]:
        return ["coordinator", "--broker", self.url, "--id", name, "--root", root,
                "--config", str(cfg)]

    def spawn(self, name: str, argv: Sequence[str]) -> None:
        log_path = self.work / f"{name}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with log_path.open("ab") as logf:
            p = subprocess.Popen([sys.executable, "-m", "moe2.cli.main", *argv], stdout=logf,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        self.procs[name] = _Proc(name, list(argv), p, log_path)

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

    def pid(self, name: str) -> int:
        return self.procs[name].popen.pid

    def rss_mib(self, name: str) -> float:
        return float(psutil.Process(self.pid(name)).memory_info().rss) / 2**20

    def log_tail(self, name: str, n: int = 2000) -> str:
        try:
            return self.procs[name].log_path.read_text(errors="replace")[-n:]
        except OSError:
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
                    p.popen.kill()
        for p in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout=10)
        self.broker.stop()

    # ------------------------------------------------------------------ phones
    def phone(self, client_id: str, *, root: str | None = None,
              check_delivery: bool = True) -> PhoneClient:
        """A reconnecting phone with a persistent session (enter it with ``async with``)."""
        url = parse_broker_url(self.url)
        return PhoneClient(lambda: session_client(url, client_id), client_id,
                           Topics(root or self.topics.root), check_delivery=check_delivery,
                           watch_coordinators=True)

    async def wait_ready(self, *, agents: Sequence[str] | None = None,
                         coordinators: Sequence[str] | None = None, root: str | None = None,
                         timeout_s: float = 90.0) -> float:
        """Until every coordinator answers with every agent fused (none dropped); seconds."""
        want_agents = set(self.agents if agents is None else agents)
        want_coords = set(self.coordinators if coordinators is None else coordinators)
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        ok: set[str] = set()
        last: str = "no answer"
        cid = f"probe-{uuid.uuid4().hex[:8]}"
        while time.monotonic() < deadline:
            self.check_alive([*want_agents, *want_coords])
            try:
                async with self.phone(cid, root=root) as ph:
                    while time.monotonic() < deadline and not want_coords <= ok:
                        self.check_alive([*want_agents, *want_coords])
                        try:
                            ans = await ph.ask(wire.PhoneRequest(
                                prompt="ping", max_tokens=1, raw=True), timeout_s=10)
                        except (AskError, asyncio.TimeoutError, aiomqtt.MqttError) as exc:
                            last = f"{type(exc).__name__}: {exc}"
                            log.debug("probe %s: %s", cid, last)
                            await asyncio.sleep(0.2)
                            continue
                        log.debug("probe %s: %s", cid, ans.final or ans.error)
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


