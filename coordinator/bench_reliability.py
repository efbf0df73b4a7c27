"""``moe2 bench reliability``: load, faults, broker restart, coordinator kill, fuzzing, bounds.

Everything runs against real processes on loopback: a private mosquitto (with persistence, as a
site broker runs it), ``moe2 agent`` processes serving tiny GGUF experts and ``moe2 coordinator``
processes in one shared-subscription group. Phones are :class:`PhoneClient` s with persistent
sessions that reconnect by themselves and check the PUBACK of every request.

Per request the bench records how the phone was told:

- ``final`` or ``error`` (by code): a message from a coordinator -- the request was *sent*
  (the broker acknowledged it);
- ``phone_error`` (``connection_lost``): sent, then the phone's own broker connection dropped
  before any reply and none came within its grace after the reconnect; the phone's client told
  the app (a request in transit to a coordinator when the broker stops is dropped by MQTT);
- ``lost``: sent, and nothing came back within the phone's silence timeout:
  ``lost = sent - finals - errors - phone_errors``, and must be 0;
- ``no_coordinator`` (PUBACK "No matching subscribers") and ``not_connected`` / ``send_failed``
  (the phone had no broker): *not sent*, and the phone knew at once.

Phases (each returns plain figures; :func:`run_reliability_bench` runs them all, and
``tests/test_chaos.py`` runs the same phases with smaller numbers):

- :func:`phase_load`: many phones at once; throughput, p50/p99 latency.
- :func:`phase_agent_faults`: SIGKILL one agent and SIGSTOP another under load; restart and
  resume them; both rejoin the plan.
- :func:`phase_broker_restart`: stop and start the broker under load.
- :func:`phase_coordinator_kill`: SIGKILL one of two coordinators under load.
- :func:`phase_fuzz`: random, mutated and forged messages on every topic a coordinator or agent
  subscribes to; RSS of every process before and after.
- :func:`phase_bounds`: rate, concurrency, prompt length and max_tokens limits on a coordinator
  configured with small ones (its own topic root).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pwd
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import aiomqtt
import msgspec
import psutil

from moe2.coordinator.phone import AskError, PhoneClient, session_client
from moe2.coordinator.service import InflightMarker, inflight_topic
from moe2.shared import wire
from moe2.shared.localbroker import LocalBroker
from moe2.shared.mqtt import (
    get_prop,
    make_client,
    parse_broker_url,
    payload_bytes,
    response_properties,
)
from moe2.shared.topics import Topics, publishable_topic

log = logging.getLogger(__name__)

T = TypeVar("T")

#: a site broker: Debian's mosquitto persists sessions and retained messages across restarts
BROKER_CONF = (
    "listener {port} 127.0.0.1\n"
    "allow_anonymous true\n"
    "persistence true\n"
    "persistence_location {dir}/\n"
    "autosave_interval 60\n"
    "max_queued_messages 100000\n"
    "max_inflight_messages 0\n"
    "message_size_limit 0\n"
    "set_tcp_nodelay true\n"
)

AGENT_ARGS = ("--n-ctx", "512", "--max-sessions", "96", "--threads", "1",
              "--telemetry-interval", "0.5", "--meter", "estimated")

MAIN_COORDINATOR_TOML = (
    "max_concurrent = 512\n"
    "max_concurrent_per_client = 16\n"
    "rate_per_client_per_s = 1000.0\n"
)
BOUNDS_ROOT = "bounds"
BOUNDS_COORDINATOR_TOML = (
    "max_concurrent_per_client = 2\n"
    "rate_per_client_per_s = 5.0\n"
    "max_prompt_chars = 256\n"
    "max_tokens_limit = 32\n"
)

PROMPTS = (
    "What is 12 plus 7?", "Name a colour of the sky.", "Count to five:", "The capital of France",
    "Write one word about rain.", "2 + 2 =", "A short greeting:", "List three fruits:",
)


class FleetError(RuntimeError):
    pass


# --------------------------------------------------------------------------- outcomes


@dataclass(frozen=True)
class Outcome:
    """How one phone request ended (see the module docstring for the kinds)."""

    phase: str
    client: str
    kind: str
    sent_s: float
    latency_s: float
    code: str = ""
    message: str = ""
    coordinator: str = ""
    experts: tuple[str, ...] = ()
    dropped: tuple[tuple[str, str], ...] = ()  # (expert, reason)

    @property
    def ended_s(self) -> float:
        return self.sent_s + self.latency_s

    @property
    def sent(self) -> bool:
        return self.kind in SENT_KINDS


SENT_KINDS = ("final", "error", "phone_error", "lost")
PHONE_ERRORS = ("connection_lost", "coordinator_lost")
NOT_SENT_KINDS = ("no_coordinator", "not_connected", "send_failed")


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    i = min(len(s) - 1, max(0, round(q / 100.0 * (len(s) - 1))))
    return s[i]


def tally(outcomes: Iterable[Outcome], wall_s: float | None = None) -> dict[str, Any]:
    """Counts by kind and error code, lost, latency percentiles of finals, throughput."""
    outs = list(outcomes)
    kinds = Counter(o.kind for o in outs)
    codes = Counter(o.code for o in outs if o.kind == "error")
    phone = Counter(o.code for o in outs if o.kind == "phone_error")
    lat = [o.latency_s for o in outs if o.kind == "final"]
    sent = sum(kinds[k] for k in SENT_KINDS)
    out: dict[str, Any] = {
        "attempted": len(outs),
        "sent": sent,
        "finals": kinds["final"],
        "errors": kinds["error"],
        "errors_by_code": dict(sorted(codes.items())),
        "phone_errors": dict(sorted(phone.items())),
        "lost": sent - kinds["final"] - kinds["error"] - kinds["phone_error"],
        "not_sent": {k: kinds[k] for k in NOT_SENT_KINDS if kinds[k]},
        "latency_p50_s": _r(percentile(lat, 50)),
        "latency_p99_s": _r(percentile(lat, 99)),
    }
    if wall_s is not None:
        out["wall_s"] = _r(wall_s)
        out["throughput_rps"] = _r(kinds["final"] / wall_s) if wall_s > 0 else None
    return out


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(x, nd)


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


# --------------------------------------------------------------------------- load


@dataclass(frozen=True)
class LoadSpec:
    clients: int
    per_client: int
    concurrency: int = 2
    max_tokens: int = 16
    #: a phone treats a request that stays silent this long as failed (counted as lost)
    timeout_s: float = 45.0
    #: after a request could not be sent, the phone waits this long before the next one
    retry_pause_s: float = 0.2

    @property
    def total(self) -> int:
        return self.clients * self.per_client


class Progress:
    """Completed requests so far; fault injectors wait for a share of the load."""

    def __init__(self) -> None:
        self.done = 0
        self._changed = asyncio.Event()

    def bump(self) -> None:
        self.done += 1
        self._changed.set()

    async def reached(self, n: int) -> None:
        while self.done < n:
            self._changed.clear()
            await self._changed.wait()


async def ask_once(phone: PhoneClient, phase: str, request: wire.PhoneRequest,
                   timeout_s: float) -> Outcome:
    """One request, classified (never raises for a protocol outcome)."""
    t0 = time.monotonic()
    chunks = 0
    try:
        async for msg in phone.stream(request, timeout_s=timeout_s):
            if isinstance(msg, wire.FinalReply):
                return Outcome(
                    phase, phone.client_id, "final", t0, time.monotonic() - t0,
                    coordinator=msg.coordinator_id,
                    experts=tuple(e.id for e in msg.experts if not e.dropped),
                    dropped=tuple((e.id, e.reason or "") for e in msg.experts if e.dropped))
            if isinstance(msg, wire.ErrorReplyPhone):
                return Outcome(phase, phone.client_id, "error", t0, time.monotonic() - t0,
                               code=msg.code.value, message=msg.message)
            chunks += 1
    except AskError as exc:
        kind = "phone_error" if exc.code in PHONE_ERRORS else exc.code
        return Outcome(phase, phone.client_id, kind, t0, time.monotonic() - t0,
                       code=exc.code, message=exc.message)
    except asyncio.TimeoutError:
        return Outcome(phase, phone.client_id, "lost", t0, time.monotonic() - t0,
                       message=f"silent for {timeout_s:g}s after {chunks} token chunk(s)")
    except aiomqtt.MqttError as exc:
        return Outcome(phase, phone.client_id, "send_failed", t0, time.monotonic() - t0,
                       message=str(exc))
    raise AssertionError("a reply stream ended without a final or error")  # pragma: no cover


@dataclass
class LoadRun:
    outcomes: list[Outcome]
    wall_s: float
    unmatched: int  # replies no request waited for: duplicates, or late after a timeout
    injected: Any = None


async def drive_load(fleet: Fleet, phase: str, spec: LoadSpec,
                     injector: Callable[[Progress], Coroutine[Any, Any, Any]] | None = None,
                     seed: int = 0) -> LoadRun:
    """``spec.clients`` phones, each with ``spec.concurrency`` requests in flight, until each
    has made ``spec.per_client`` requests; ``injector`` runs alongside (faults)."""
    progress = Progress()
    outcomes: list[Outcome] = []
    rng = random.Random(seed)
    tag = uuid.uuid4().hex[:6]
    phones = [fleet.phone(f"{phase}-{tag}-{i}") for i in range(spec.clients)]

    async def client(phone: PhoneClient, quota: list[int]) -> None:
        while quota[0] > 0:
            quota[0] -= 1
            prompt = f"{rng.choice(PROMPTS)} ({len(outcomes)})"
            out = await ask_once(phone, phase, wire.PhoneRequest(
                prompt=prompt, max_tokens=spec.max_tokens, raw=True), spec.timeout_s)
            outcomes.append(out)
            progress.bump()
            if not out.sent:
                await asyncio.sleep(spec.retry_pause_s)

    async with contextlib.AsyncExitStack() as stack:
        for ph in phones:
            await stack.enter_async_context(ph)
        t0 = time.monotonic()
        workers = []
        for ph in phones:
            quota = [spec.per_client]
            workers += [asyncio.create_task(client(ph, quota), name=f"load-{ph.client_id}")
                        for _ in range(spec.concurrency)]
        inj: asyncio.Task[Any] | None = (
            asyncio.create_task(injector(progress), name=f"{phase}-injector")
            if injector is not None else None)
        try:
            await asyncio.gather(*workers)
            wall = time.monotonic() - t0
            injected = await inj if inj is not None else None
        finally:
            for t in [*workers, *([inj] if inj is not None else [])]:
                t.cancel()
            await asyncio.gather(*workers, *([inj] if inj is not None else []),
                                 return_exceptions=True)
        unmatched = sum(ph.unmatched for ph in phones)
    return LoadRun(outcomes, wall, unmatched, injected)


async def phase_load(fleet: Fleet, spec: LoadSpec, seed: int = 0) -> dict[str, Any]:
    """Many phones at once: every request ends in exactly one final or error."""
    await fleet.wait_ready()
    run = await drive_load(fleet, "load", spec, seed=seed)
    fleet.check_alive()
    out = tally(run.outcomes, run.wall_s)
    out.update(clients=spec.clients, requests=spec.total, concurrency=spec.concurrency,
               max_tokens=spec.max_tokens, unmatched_replies=run.unmatched)
    out["outcomes"] = run.outcomes
    return out


# --------------------------------------------------------------------------- agent faults


async def phase_agent_faults(fleet: Fleet, spec: LoadSpec, *, hang_s: float = 3.0,
                             seed: int = 0) -> dict[str, Any]:
    """SIGKILL ``a1`` and SIGSTOP ``a2`` under load; restart/resume them; both rejoin."""
    await fleet.wait_ready()
    killed, hung = fleet.agents[1], fleet.agents[2]
    times: dict[str, float] = {}

    async def inject(progress: Progress) -> None:
        await progress.reached(max(1, spec.total * 15 // 100))
        times["kill"] = time.monotonic()
        fleet.signal(killed, signal.SIGKILL)
        await progress.reached(max(1, spec.total * 35 // 100))
        fleet.restart(killed)
        times["restart"] = time.monotonic()
        await progress.reached(max(1, spec.total * 55 // 100))
        times["stop"] = time.monotonic()
        fleet.signal(hung, signal.SIGSTOP)
        await asyncio.sleep(hang_s)
        fleet.signal(hung, signal.SIGCONT)
        times["cont"] = time.monotonic()

    run = await drive_load(fleet, "agent_faults", spec, inject, seed=seed)
    rejoin_s = await fleet.wait_ready()
    rejoined = time.monotonic()
    fleet.check_alive()
    finals = [o for o in run.outcomes if o.kind == "final"]
    dropped_killed = [r for o in finals for a, r in o.dropped if a == killed]
    # the kill's own effect: drops of the killed agent in requests that were in flight when it
    # died (later ones may drop its restarted successor for lateness on a loaded box)
    kill_s = times.get("kill", float("inf"))
    dropped_by_kill = [r for o in finals if o.sent_s < kill_s < o.ended_s
                       for a, r in o.dropped if a == killed]
    dropped_hung = [r for o in finals for a, r in o.dropped if a == hung]
    out = tally(run.outcomes, run.wall_s)
    out.update(
        killed_agent=killed, hung_agent=hung, hang_s=hang_s,
        finals_with_killed_dropped=len(dropped_killed),
        finals_with_hung_dropped=len(dropped_hung),
        hung_dropped_by_step_deadline=sum("deadline" in r for r in dropped_hung),
        finals_in_flight_at_kill_with_killed_dropped=len(dropped_by_kill),
        killed_drop_reasons=sorted(set(dropped_by_kill))[:3],
        hung_drop_reasons=sorted(set(dropped_hung))[:3],
        finals_using_restarted_agent=sum(killed in o.experts for o in finals
                                         if o.sent_s > times.get("restart", float("inf"))),
        rejoined_within_s=_r(rejoined - times["restart"], 2) if "restart" in times else None,
        ready_again_after_load_s=_r(rejoin_s, 2),
        unmatched_replies=run.unmatched,
        faults_survived=2 if "cont" in times else 0,
    )
    out["outcomes"] = run.outcomes
    return out


# --------------------------------------------------------------------------- broker restart


async def phase_broker_restart(fleet: Fleet, spec: LoadSpec, *, down_s: float = 1.0,
                               seed: int = 0) -> dict[str, Any]:
    """Stop the broker under load, start it again on the same port; everyone reconnects."""
    await fleet.wait_ready()
    times: dict[str, float] = {}

    async def inject(progress: Progress) -> None:
        await progress.reached(max(1, spec.total * 30 // 100))
        times["down"] = time.monotonic()
        await asyncio.to_thread(fleet.broker.stop)
        await asyncio.sleep(down_s)
        await asyncio.to_thread(fleet.broker.start)
        times["up"] = time.monotonic()
        await fleet.wait_ready()
        times["recovered"] = time.monotonic()

    run = await drive_load(fleet, "broker_restart", spec, inject, seed=seed)
    fleet.check_alive()
    if "recovered" not in times:  # the load ended before the injector: wait for recovery now
        await fleet.wait_ready()
        times["recovered"] = time.monotonic()
    # requests after recovery: a fresh round of phones
    after = await drive_load(fleet, "after_broker_restart", LoadSpec(
        clients=spec.clients, per_client=1, concurrency=1, max_tokens=spec.max_tokens),
        seed=seed + 100)
    down = times["down"]
    in_flight = [o for o in run.outcomes if o.sent and o.sent_s < down < o.ended_s]
    out = tally([*run.outcomes, *after.outcomes], run.wall_s)
    out.update(
        down_s=down_s,
        recovered_after_s=_r(times["recovered"] - times["up"], 2),
        in_flight_at_stop=tally(in_flight),
        during=tally(run.outcomes),
        after_recovery=tally(after.outcomes),
        unmatched_replies=run.unmatched + after.unmatched,
        faults_survived=1,
    )
    out["outcomes"] = [*run.outcomes, *after.outcomes]
    return out


# --------------------------------------------------------------------------- coordinator kill


async def phase_coordinator_kill(fleet: Fleet, spec: LoadSpec, *, restart: bool = True,
                                 seed: int = 0, freeze_agents_s: float = 0.0) -> dict[str, Any]:
    """SIGKILL one of two coordinators under load: the other carries on and tells the phones
    of the dead one's requests (from its in-flight markers). ``freeze_agents_s`` > 0 stops the
    agents (SIGSTOP) from just before the kill for that long, so the dead coordinator surely
    holds unfinished requests (the CI test needs the takeover to happen, not just to be
    possible)."""
    await fleet.wait_ready()
    victim, survivor = fleet.coordinators[0], fleet.coordinators[1]
    times: dict[str, float] = {}

    async def inject(progress: Progress) -> None:
        await progress.reached(max(1, spec.total * 30 // 100))
        if freeze_agents_s > 0:
            for a in fleet.agents:
                fleet.signal(a, signal.SIGSTOP)
        times["kill"] = time.monotonic()
        fleet.signal(victim, signal.SIGKILL)
        if freeze_agents_s > 0:
            await asyncio.sleep(freeze_agents_s)
            for a in fleet.agents:
                fleet.signal(a, signal.SIGCONT)

    run = await drive_load(fleet, "coordinator_kill", spec, inject, seed=seed)
    kill = times["kill"]
    in_flight = [o for o in run.outcomes if o.sent and o.sent_s < kill < o.ended_s
                 and o.coordinator != survivor]
    told = [o for o in run.outcomes if o.kind == "error" and f"coordinator {victim} " in o.message]
    after = [o for o in run.outcomes if o.sent_s > kill]
    out = tally(run.outcomes, run.wall_s)
    out.update(
        killed=victim, survivor=survivor,
        in_flight_at_kill=len(in_flight),
        in_flight_failed=sum(o.kind != "final" for o in in_flight),
        told_by_survivor=len(told),
        told_how=(f"error {wire.ErrorCode.SHUTTING_DOWN.value!r} from {survivor}: "
                  f"{told[0].message!r}" if told else None),
        told_after_kill_s=_r(max((o.ended_s - kill for o in told), default=0.0), 3),
        told_by_phone_client=sum(o.kind == "phone_error" for o in in_flight),
        told_by_phone_how=next((f"AskError {o.code!r} (no reply within the phone's grace after "
                                f"{victim}'s Last Will): {o.message!r}"
                                for o in in_flight if o.kind == "phone_error"), None),
        lost_in_flight=sum(o.kind == "lost" for o in in_flight),
        lost_sent_before_kill_s=[_r(kill - o.sent_s, 3) for o in in_flight if o.kind == "lost"],
        finals_after_kill_by=dict(Counter(o.coordinator for o in after if o.kind == "final")),
        unmatched_replies=run.unmatched,
        faults_survived=1,
    )
    if restart:
        fleet.restart(victim)
        out["victim_back_within_s"] = _r(await fleet.wait_ready(), 2)
    fleet.check_alive([n for n in fleet.procs if restart or n != victim])
    out["outcomes"] = run.outcomes
    return out


# --------------------------------------------------------------------------- fuzzing


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One random structural mutation of ``data`` (flip, insert, delete, truncate, splice)."""
    b = bytearray(data)
    op = rng.randrange(6)
    if not b:
        return bytes(rng.randbytes(rng.randint(1, 8)))
    i = rng.randrange(len(b))
    if op == 0:
        b[i] ^= 1 << rng.randrange(8)
    elif op == 1:
        b[i:i] = rng.randbytes(rng.randint(1, 8))
    elif op == 2:
        del b[i:i + rng.randint(1, 8)]
    elif op == 3:
        del b[i:]
    elif op == 4:
        b[i] = rng.choice((0x00, 0x7F, 0x80, 0xC0, 0xC1, 0xDC, 0xDD, 0xDF, 0xFF))
    else:
        j = rng.randrange(len(b))
        b[i:i] = b[j:j + rng.randint(1, 16)]
    return bytes(b)


@dataclass(frozen=True)
class FuzzMessage:
    family: str
    topic: str
    payload: bytes
    response_topic: str | None = None
    correlation: bytes | None = None
    content_type: str | None = None
    #: replies expected with this correlation data: exact count (terminal messages for phones)
    expect: int = 0
    #: the correlation data replies carry, when it is not the message's own (markers)
    reply_key: bytes | None = None

    @property
    def key(self) -> bytes | None:
        return self.reply_key if self.reply_key is not None else self.correlation


@dataclass
class FuzzTargets:
    topics: Topics
    agents: Sequence[str]
    coordinators: Sequence[str]
    inbox: str  # where agents answer the fuzzer (a coordinator inbox nobody else uses)
    phone: str  # the fuzzer's phone client id
    victim: str  # another phone that must never get anything


def _agent_samples(n_vocab: int = 64) -> list[bytes]:
    return [wire.encode(m) for m in (
        wire.OpenSession(session_id="fz-open", k=8, prompt="hello"),
        wire.OpenSession(session_id="fz-msgs", k=0,
                         messages=[wire.ChatMessage("user", "hi")]),
        wire.OpenSession(session_id="fz-tok", k=4, tokens=[1, 5, 9], raw=True),
        wire.Step(items=[wire.StepItem("fz-open", 5, 1, 8), wire.StepItem("nope", 3, 4, 2)]),
        wire.Step(items=[wire.StepItem("fz-none", n_vocab + 5, 1, 4000)]),
        wire.CloseSession(session_ids=["fz-open", "fz-msgs", "fz-tok"]),
    )]


def _reply_samples(agents: Sequence[str]) -> list[bytes]:
    probs = wire.Distribution.pack_probs([0.5, 0.25, 0.25])
    ids = wire.Distribution.pack_ids([1, 2, 3])
    out = []
    for a in [*agents, "ghost-agent"]:
        out.append(wire.encode(wire.Reply(agent_id=a, dists=[wire.Distribution(
            session_id=f"no-such-session-{a}", seq=1, probs=probs, ids=ids, rest_mass=0.0,
            n_past=3, n_evaluated=1)])))
        out.append(wire.encode(wire.Reply(agent_id=a, errors=[wire.ErrorItem(
            code=wire.ErrorCode.UNKNOWN_SESSION, message="forged", session_id="x", seq=2)])))
    return out


def _presence_samples(agent: str) -> list[tuple[str, bytes]]:
    st = wire.AgentStatus(agent_id=agent, state="online", model="m", n_ctx=512, n_vocab=64,
                          vocab_fp="fp", eos_id=2)
    tm = wire.Telemetry(agent_id=agent, ts=1.0, power_w=1.0, energy_j=1.0, tokens_total=1,
                        tokens_per_s=1.0, joules_per_token=0.1, step_latency_s=0.001,
                        open_sessions=0, meter="estimated")
    vb = wire.Vocab(agent_id=agent, vocab_fp="fp", pieces=[b"a", b"b", b""])
    return [("status", wire.encode(st)), ("telemetry", wire.encode(tm)), ("vocab", wire.encode(vb))]


def fuzz_messages(t: FuzzTargets, n_per_family: int, rng: random.Random, batch: str = "fz"
                  ) -> list[FuzzMessage]:
    """``n_per_family`` messages for each topic family a coordinator or agent subscribes to.

    Payloads: random bytes, mutations of valid encodings, and valid but hostile messages
    (forged distributions for sessions that do not exist, replies from agents outside the plan,
    steps for unknown sessions, out-of-range tokens and k, forged in-flight markers, offline
    statuses of coordinators and agents that never existed, vocabularies of unknown families).
    Mutations that still decode, and empty payloads, are kept off the real agents' status and
    vocab topics, and no ``online`` status is sent at all: a valid status (or an empty one, which
    clears an agent's retained status) is a registration or a deregistration, which the broker's
    ACL (agents may only write their own topics) -- not the coordinator -- refuses.
    """
    tp = t.topics
    out: list[FuzzMessage] = []
    n = 0

    def corr() -> bytes:
        nonlocal n
        n += 1
        return f"{batch}{n:08d}".encode()

    # -- agent RPC: every message with a response topic gets exactly one reply, except a close
    samples = _agent_samples()
    for i in range(n_per_family):
        agent = t.agents[i % len(t.agents)]
        r = rng.random()
        payload = (rng.randbytes(rng.randint(0, 200)) if r < 0.3
                   else mutate(rng.choice(samples), rng) if r < 0.8 else rng.choice(samples))
        r_rt = rng.random()
        # no response topic (no reply), the inbox, or one with wildcards that mosquitto
        # forwards but no reply can be published to (dropped unanswered)
        rt = None if r_rt < 0.1 else rng.choice((f"{t.inbox}/+", "#", "+/x")) \
            if r_rt < 0.15 else t.inbox
        try:
            msg: Any = wire.decode_agent_inbound(payload)
        except wire.DecodeError:
            msg = None
        is_close = isinstance(msg, wire.CloseSession)
        c = corr()
        out.append(FuzzMessage("agent_rpc", tp.agent_rpc(agent), payload, rt, c,
                               expect=1 if rt == t.inbox and not is_close else 0))
    # -- coordinator inbox: forged replies (no answer expected; the coordinator must not care)
    replies = _reply_samples(t.agents)
    for i in range(n_per_family):
        coord = t.coordinators[i % len(t.coordinators)]
        r = rng.random()
        payload = (rng.randbytes(rng.randint(0, 200)) if r < 0.3
                   else mutate(rng.choice(replies), rng) if r < 0.7 else rng.choice(replies))
        out.append(FuzzMessage("coordinator_inbox", tp.coordinator_inbox(coord).topic, payload))
    # -- agent presence: status, telemetry, vocab
    for i in range(n_per_family):
        real = rng.random() < 0.5
        agent = t.agents[i % len(t.agents)] if real else f"ghost-{rng.randrange(10**6)}"
        kind, valid = rng.choice(_presence_samples(agent))
        topic = f"{tp.root}/agents/{agent}/{kind}"
        payload = (rng.randbytes(rng.randint(0, 200)) if rng.random() < 0.3
                   else mutate(valid, rng))
        try:
            decoded: Any = wire.decode_any(payload)
        except wire.DecodeError:
            decoded = None
        if (real and kind in ("status", "vocab") and (decoded is not None or not payload)) or (
                isinstance(decoded, wire.AgentStatus) and decoded.state == "online"):
            payload = b"\xc1" + payload  # no (de)registrations (see the docstring)
        elif not real and kind == "status" and rng.random() < 0.5:
            payload = wire.encode(wire.AgentStatus(agent_id=agent, state="offline"))
        elif not real and kind == "vocab" and rng.random() < 0.5:
            payload = wire.encode(wire.Vocab(agent_id=agent, vocab_fp=f"fp-{rng.randrange(10**9)}",
                                             pieces=[rng.randbytes(4) for _ in range(64)]))
        out.append(FuzzMessage("agent_presence", topic, payload))
    # -- phone requests: one terminal reply when the response topic is the phone's own
    good = [
        wire.encode_phone(wire.PhoneRequest(prompt="hi", max_tokens=1, raw=True), None),
        wire.encode_phone(wire.PhoneRequest(prompt="hi", max_tokens=1, raw=True),
                          wire.CONTENT_TYPE_MSGPACK),
        b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}',
    ]
    for _ in range(n_per_family):
        r = rng.random()
        ct = rng.choice((None, wire.CONTENT_TYPE_JSON, wire.CONTENT_TYPE_MSGPACK, "text/x-odd"))
        payload = (rng.randbytes(rng.randint(0, 200)) if r < 0.3
                   else mutate(rng.choice(good), rng))
        try:
            req: wire.PhoneRequest | None = wire.decode_phone_request(payload, ct)
        except wire.DecodeError:
            req = None
        if req is not None and req.max_tokens > 4:
            payload = b"\xc1" + payload  # mutated into a long valid request: keep it cheap
        where = rng.random()
        c = corr()
        if where < 0.85:
            out.append(FuzzMessage("phone_requests", tp.request(t.phone), payload,
                                   tp.response_prefix(t.phone) + "fz", c, ct, expect=1))
        elif where < 0.95:
            out.append(FuzzMessage("phone_requests", tp.request(t.phone), payload,
                                   tp.response_prefix(t.victim) + "stolen", c, ct))
        else:
            out.append(FuzzMessage("phone_requests", tp.request(t.phone), payload, None, c, ct))
    # -- coordinator control: peer statuses and in-flight markers
    st_valid = wire.encode(wire.CoordinatorStatus(coordinator_id="phantom", state="offline"))
    for i in range(n_per_family):
        coord = t.coordinators[i % len(t.coordinators)]
        r = rng.random()
        if r < 0.35:
            phantom = f"phantom-{rng.randrange(10**6)}"
            payload = (wire.encode(wire.CoordinatorStatus(coordinator_id=phantom,
                                                          state="offline"))
                       if rng.random() < 0.5 else mutate(st_valid, rng))
            out.append(FuzzMessage("coordinator_control",
                                   tp.coordinator_status(phantom).topic, payload))
            continue
        c = corr()
        marker = InflightMarker(coordinator_id=coord, incarnation="fuzz", client_id=t.phone,
                                response_topic=tp.response_prefix(t.phone) + "fz",
                                correlation=c, content_type=None)
        valid = msgspec.msgpack.encode(marker)
        payload = valid if r < 0.6 else (mutate(valid, rng) if r < 0.9
                                         else rng.randbytes(rng.randint(0, 120)))
        expect = 0
        try:
            m = msgspec.msgpack.decode(payload, type=InflightMarker)
            if (m.coordinator_id == coord and m.correlation == c and m.v == wire.PROTOCOL_VERSION
                    and m.incarnation and tp.response_allowed(m.client_id, m.response_topic)
                    and publishable_topic(m.response_topic)
                    and m.response_topic.startswith(tp.response_prefix(t.phone))):
                expect = 1
            elif m.correlation != c:
                payload = b"\xc1" + payload  # a mutation changed where the answer goes
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError):
            pass
        out.append(FuzzMessage("coordinator_control",
                               inflight_topic(tp, coord, f"{batch}{i}"), payload, expect=expect,
                               reply_key=c))
    return out


class ReplyCounter:
    """Counts every reply the fuzzer's topics receive, by correlation data."""

    def __init__(self) -> None:
        self.terminal: Counter[bytes] = Counter()
        self.agent_replies: Counter[bytes] = Counter()
        self.bad_agent_replies = 0
        self.victim_messages = 0
        self.other = 0
        self.opened: dict[str, set[str]] = {}  # agent -> sessions the fuzz opened
        self._changed = asyncio.Event()

    def on_message(self, m: aiomqtt.Message, inbox: str, victim_prefix: str) -> None:
        topic = str(m.topic)
        corr = get_prop(m, "CorrelationData")
        key = bytes(corr) if corr is not None else b""
        data = payload_bytes(m)
        if topic.startswith(victim_prefix):
            self.victim_messages += 1
        elif topic == inbox:
            try:
                r = wire.decode_as(data, wire.Reply)
            except wire.DecodeError:
                self.bad_agent_replies += 1
                return
            if not r.dists and not r.errors:
                self.bad_agent_replies += 1
            self.agent_replies[key] += 1
            self.opened.setdefault(r.agent_id, set()).update(d.session_id for d in r.dists)
        else:
            try:
                msg = wire.decode_phone_reply(data, get_prop(m, "ContentType"))
            except wire.DecodeError:
                self.other += 1
                return
            if isinstance(msg, (wire.FinalReply, wire.ErrorReplyPhone)):
                self.terminal[key] += 1
        self._changed.set()

    async def until(self, pred: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not pred():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))
        return True


@contextlib.asynccontextmanager
async def _listener(url: str, topics: Iterable[str], on_message: Callable[[aiomqtt.Message], None]
                    ) -> AsyncIterator[aiomqtt.Client]:
    client = make_client(parse_broker_url(url), identifier=f"fz-listen-{uuid.uuid4().hex[:6]}")
    async with client:
        for t in topics:
            await client.subscribe(t, qos=1)

        async def read() -> None:
            async for m in client.messages:
                on_message(m)

        task = asyncio.create_task(read(), name="fuzz-listener")
        try:
            yield client
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task


async def publish_all(client: aiomqtt.Client, msgs: Sequence[FuzzMessage],
                      window: int = 200) -> None:
    """QoS 1, ``window`` publishes outstanding at a time."""
    for i in range(0, len(msgs), window):
        await asyncio.gather(*[client.publish(
            m.topic, m.payload, qos=1, properties=response_properties(
                m.response_topic, m.correlation, m.content_type)
            if (m.response_topic or m.correlation or m.content_type) else None)
            for m in msgs[i:i + window]])


async def _barrier(client: aiomqtt.Client, counter: ReplyCounter, t: FuzzTargets,
                   timeout_s: float) -> bool:
    """A message to every agent and coordinator that each answers after all earlier ones."""
    tp = t.topics
    want: list[tuple[str, bytes]] = []
    for a in t.agents:
        c = f"barrier-{a}-{uuid.uuid4().hex[:6]}".encode()
        await client.publish(tp.agent_rpc(a), wire.encode(wire.Step(items=[
            wire.StepItem("barrier-no-session", 3, 1, 1)])), qos=1,
            properties=response_properties(t.inbox, c))
        want.append(("agent", c))
    for co in t.coordinators:
        c = f"barrier-{co}-{uuid.uuid4().hex[:6]}".encode()
        marker = InflightMarker(coordinator_id=co, incarnation="barrier", client_id=t.phone,
                                response_topic=tp.response_prefix(t.phone) + "fz",
                                correlation=c)
        await client.publish(inflight_topic(tp, co, "barrier"), msgspec.msgpack.encode(marker),
                             qos=1)
        want.append(("coord", c))
    return await counter.until(lambda: all(
        (counter.agent_replies if k == "agent" else counter.terminal)[c] >= 1 for k, c in want),
        timeout_s)


def _answered(counter: ReplyCounter, batch: Sequence[FuzzMessage]) -> bool:
    """Every message of ``batch`` that expects a reply has one."""
    return all((counter.agent_replies if m.family == "agent_rpc" else counter.terminal)[m.key] >= 1
               for m in batch if m.expect and m.key is not None)


async def phase_fuzz(fleet: Fleet, n_per_family: int, *, rounds: int = 2, seed: int = 0,
                     warmup_fraction: float = 0.1, pace: int = 2000,
                     timeout_s: float = 120.0) -> dict[str, Any]:
    """Hostile input on every subscribed topic: no crash, replies where a reply topic exists,
    and RSS of every agent and coordinator after a warm-up and after each of ``rounds`` rounds
    of ``n_per_family`` messages per topic family.

    Messages go out ``pace`` at a time, each batch followed by a barrier that every process
    answers only after handling everything before it: the backlog stays bounded, so RSS growth
    measures state that stays behind (a leak grows in every round), not how far a flood got
    ahead of the receive loop (an MQTT client library buffers everything it reads)."""
    await fleet.wait_ready()
    rng = random.Random(seed)
    tag = uuid.uuid4().hex[:6]
    t = FuzzTargets(fleet.topics, fleet.agents, fleet.coordinators,
                    inbox=fleet.topics.coordinator_inbox(f"fuzzer-{tag}").topic,
                    phone=f"fuzzphone-{tag}", victim=f"victim-{tag}")
    counter = ReplyCounter()
    victim_prefix = fleet.topics.response_prefix(t.victim)
    listen = [t.inbox, fleet.topics.response_prefix(t.phone) + "#", victim_prefix + "#"]
    watched = [*fleet.agents, *fleet.coordinators]
    warm = fuzz_messages(t, max(1, int(n_per_family * warmup_fraction)), rng, "warm")
    batches = [fuzz_messages(t, n_per_family, rng, f"r{i}-") for i in range(rounds)]
    every = [*warm, *(m for b in batches for m in b)]
    expected_agent = {m.key for m in every
                      if m.family == "agent_rpc" and m.expect and m.key is not None}
    expected_term = [m.key for m in every
                     if m.family != "agent_rpc" and m.expect and m.key is not None]
    complete = True
    rss: list[dict[str, float]] = []
    timings: list[dict[str, float | None]] = []
    async with _listener(fleet.url, listen,
                         lambda m: counter.on_message(m, t.inbox, victim_prefix)), \
            make_client(parse_broker_url(fleet.url), identifier=f"fuzzer-{tag}") as pub:
        pub.pending_calls_threshold = 1000  # publish_all keeps many in flight on purpose
        for batch in [warm, *batches]:
            t0 = time.monotonic()
            for i in range(0, len(batch), pace):
                await publish_all(pub, batch[i:i + pace])
                # every process has handled everything before it answers the barrier
                complete = await _barrier(pub, counter, t, timeout_s) and complete
            complete = await counter.until(partial(_answered, counter, batch),
                                           timeout_s) and complete
            timings.append({"messages": len(batch), "s": _r(time.monotonic() - t0, 2)})
            rss.append({n: fleet.rss_mib(n) for n in watched})
        # leave the agents as we found them: close what (mutated) opens opened
        for a, sessions in counter.opened.items():
            if a in fleet.agents and sessions:
                await pub.publish(fleet.topics.agent_rpc(a), wire.encode(wire.CloseSession(
                    session_ids=sorted(sessions))), qos=1)
    crashed = fleet.dead()
    fleet.check_alive()
    health = await drive_load(fleet, "after_fuzz", LoadSpec(clients=2, per_client=4,
                                                            concurrency=1, max_tokens=4))
    by_family = Counter(m.family for b in batches for m in b)
    growth = [{n: after[n] - before[n] for n in watched}
              for before, after in itertools.pairwise(rss)]
    missing_agent = sum(1 for c in expected_agent if counter.agent_replies[c] == 0)
    missing_term = sum(1 for c in expected_term if counter.terminal[c] == 0)
    extra_agent = sum(n for c, n in counter.agent_replies.items()
                      if c not in expected_agent and not c.startswith(b"barrier-"))
    dup_agent = sum(n - 1 for c, n in counter.agent_replies.items() if n > 1)
    exp_term = set(expected_term)
    extra_term = sum(n for c, n in counter.terminal.items()
                     if c not in exp_term and not c.startswith(b"barrier-"))
    dup_term = sum(n - 1 for c, n in counter.terminal.items() if n > 1)
    return {
        "inputs_tried": len(every),
        "rounds": rounds,
        "per_round_per_family": dict(sorted(
            (k, v // rounds) for k, v in by_family.items())),
        "timings": timings,
        "replies_complete": complete,
        "agent_replies_expected": len(expected_agent),
        "agent_replies_missing": missing_agent,
        "agent_replies_unexpected": extra_agent,
        "agent_replies_duplicated": dup_agent,
        "agent_replies_malformed": counter.bad_agent_replies,
        "phone_replies_expected": len(expected_term),
        "phone_replies_missing": missing_term,
        "phone_replies_unexpected": extra_term,
        "phone_replies_duplicated": dup_term,
        "victim_messages": counter.victim_messages,
        "crashed": crashed,
        "rss_after_warmup_mib": {n: _r(v, 1) for n, v in rss[0].items()},
        "rss_growth_mib_per_round": [{n: _r(v, 1) for n, v in g.items()} for g in growth],
        "rss_growth_max_mib": _r(max(max(g.values()) for g in growth), 1),
        "rss_growth_last_round_max_mib": _r(max(growth[-1].values()), 1),
        "rss_growth_total_max_mib": _r(max(rss[-1][n] - rss[0][n] for n in watched), 1),
        "healthy_after": tally(health.outcomes),
        "outcomes": health.outcomes,
    }


# --------------------------------------------------------------------------- bounds


async def phase_bounds(fleet: Fleet, *, burst: int = 6, sequential: int = 12) -> dict[str, Any]:
    """Limits of the ``bounds`` coordinator: 2 concurrent and 5 requests/s per client,
    256 prompt characters, 32 max tokens. Each refusal is a typed error with a clear message."""
    await fleet.wait_ready(agents=["b0"], coordinators=["cb"], root=BOUNDS_ROOT)
    tag = uuid.uuid4().hex[:6]
    outcomes: list[Outcome] = []
    checks: dict[str, Any] = {}

    async with fleet.phone(f"bounds-a-{tag}", root=BOUNDS_ROOT) as ph:
        long = await ask_once(ph, "bounds", wire.PhoneRequest(prompt="x" * 257, max_tokens=4),
                              30)
        many = await ask_once(ph, "bounds", wire.PhoneRequest(prompt="hi", max_tokens=33), 30)
        outcomes += [long, many]
        checks["prompt_too_long"] = {"code": long.code, "message": long.message}
        checks["max_tokens"] = {"code": many.code, "message": many.message}
    async with fleet.phone(f"bounds-b-{tag}", root=BOUNDS_ROOT) as ph:
        burst_out = await asyncio.gather(*[ask_once(ph, "bounds", wire.PhoneRequest(
            prompt=f"{PROMPTS[i % len(PROMPTS)]}", max_tokens=32, raw=True), 30)
            for i in range(burst)])
        outcomes += burst_out
        conc = [o for o in burst_out if o.code == wire.ErrorCode.TOO_MANY_REQUESTS.value]
        checks["concurrency"] = {"sent_at_once": burst, "finals": sum(
            o.kind == "final" for o in burst_out), "too_many_requests": len(conc),
            "message": conc[0].message if conc else None}
    async with fleet.phone(f"bounds-c-{tag}", root=BOUNDS_ROOT) as ph:
        seq_out = []
        for _ in range(sequential):
            seq_out.append(await ask_once(ph, "bounds", wire.PhoneRequest(
                prompt="hi", max_tokens=1, raw=True), 30))
        outcomes += seq_out
        rl = [o for o in seq_out if o.code == wire.ErrorCode.RATE_LIMITED.value]
        checks["rate"] = {"sent_one_after_another": sequential, "finals": sum(
            o.kind == "final" for o in seq_out), "rate_limited": len(rl),
            "message": rl[0].message if rl else None}
    fleet.check_alive(["b0", "cb"])
    out = tally(outcomes)
    out["checks"] = checks
    out["outcomes"] = outcomes
    return out


# --------------------------------------------------------------------------- the bench


@dataclass(frozen=True)
class BenchSpec:
    load: LoadSpec
    faults: LoadSpec
    fuzz_per_family: int
    hang_s: float = 3.0
    down_s: float = 1.0


FULL = BenchSpec(
    load=LoadSpec(clients=20, per_client=10, concurrency=2, max_tokens=16),
    faults=LoadSpec(clients=20, per_client=6, concurrency=2, max_tokens=16),
    fuzz_per_family=10_000,
)
QUICK = BenchSpec(
    load=LoadSpec(clients=10, per_client=4, concurrency=2, max_tokens=12),
    faults=LoadSpec(clients=10, per_client=4, concurrency=2, max_tokens=12),
    fuzz_per_family=400,
)


def _strip(d: dict[str, Any]) -> tuple[dict[str, Any], list[Outcome]]:
    outs: list[Outcome] = d.pop("outcomes", [])
    return d, outs


async def _run_all(fleet: Fleet, spec: BenchSpec, seed: int) -> dict[str, Any]:
    phases: dict[str, Any] = {}
    every: list[Outcome] = []
    ready_s = await fleet.wait_ready(timeout_s=180)
    steps: list[tuple[str, Callable[[], Awaitable[dict[str, Any]]]]] = [
        ("load", lambda: phase_load(fleet, spec.load, seed=seed)),
        ("agent_faults", lambda: phase_agent_faults(fleet, spec.faults, hang_s=spec.hang_s,
                                                    seed=seed + 1)),
        ("broker_restart", lambda: phase_broker_restart(fleet, spec.faults, down_s=spec.down_s,
                                                        seed=seed + 2)),
        ("coordinator_kill", lambda: phase_coordinator_kill(fleet, spec.faults, seed=seed + 3)),
        ("fuzz", lambda: phase_fuzz(fleet, spec.fuzz_per_family, seed=seed + 4)),
        ("bounds", lambda: phase_bounds(fleet)),
    ]
    for name, step in steps:
        log.info("reliability: %s", name)
        t0 = time.monotonic()
        result, outs = _strip(await step())
        result["phase_s"] = _r(time.monotonic() - t0, 1)
        phases[name] = result
        every += outs
    total = tally(every)
    faults = {
        "agent_sigkill": phases["agent_faults"]["faults_survived"] >= 1,
        "agent_sigstop": phases["agent_faults"]["faults_survived"] >= 2,
        "broker_restart": phases["broker_restart"]["faults_survived"] == 1,
        "coordinator_sigkill": phases["coordinator_kill"]["faults_survived"] == 1,
    }
    fz = phases["fuzz"]
    return {
        "summary": {
            "requests_sent": total["sent"],
            "finals": total["finals"],
            "errors": total["errors"],
            "errors_by_code": total["errors_by_code"],
            "phone_errors": total["phone_errors"],
            "lost": total["lost"],
            "not_sent": total["not_sent"],
            "load_clients": spec.load.clients,
            "load_requests": spec.load.total,
            "load_throughput_rps": phases["load"]["throughput_rps"],
            "load_latency_p50_s": phases["load"]["latency_p50_s"],
            "load_latency_p99_s": phases["load"]["latency_p99_s"],
            "faults_survived": sum(faults.values()),
            "faults": faults,
            "fuzz_inputs_tried": fz["inputs_tried"],
            "fuzz_crashes": len(fz["crashed"]),
            "fuzz_rounds": fz["rounds"],
            "fuzz_rss_growth_max_mib_by_round": [
                _r(max(g.values()), 1) for g in fz["rss_growth_mib_per_round"]],
            "fuzz_rss_growth_total_max_mib": fz["rss_growth_total_max_mib"],
            "coordinator_kill_in_flight": phases["coordinator_kill"]["in_flight_at_kill"],
            "coordinator_kill_in_flight_failed": phases["coordinator_kill"]["in_flight_failed"],
            "coordinator_kill_told_by_survivor": phases["coordinator_kill"]["told_by_survivor"],
            "coordinator_kill_told_by_phone_client":
                phases["coordinator_kill"]["told_by_phone_client"],
            "fleet_ready_s": _r(ready_s, 1),
        },
        "phases": phases,
    }


def run_reliability_bench(*, quick: bool = False, out_dir: str | None = None,
                          seed: int = 0) -> dict[str, Any]:
    """The full form (or ``quick``): its own mosquitto, 3 agents and 2 coordinators (+ a bounds
    agent and coordinator) as subprocesses on loopback; returns plain figures."""
    from moe2.shared.gguf_models import make_test_experts

    spec = QUICK if quick else FULL
    work = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="moe2-reliability-"))
    work.mkdir(parents=True, exist_ok=True)
    experts = make_test_experts(work / "experts", count=3)
    t0 = time.monotonic()
    with Fleet(work / "fleet", [e.path for e in experts]) as fleet:
        result = asyncio.run(_run_all(fleet, spec, seed))
    result["form"] = "quick" if quick else "full"
    result["seed"] = seed
    result["total_s"] = _r(time.monotonic() - t0, 1)
    result["work_dir"] = str(work)
    return result
