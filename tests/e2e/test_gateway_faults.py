"""Issue 15: every 429, 503 and 504 of the gateway produced by a real cause on a real fleet,
and the coordinator's per-client limits applying per API key.

One agent, one coordinator (1 request at a time per client, one request per client per 1000 s,
a 1 s drain), one gateway (5 s reply timeout, 1 s grace after a coordinator's Last Will). The
steps share the fleet and run in file order; each brings back what it needs first. Every key
is used for at most one admitted request (the rate limit), so each step has its own key.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from moe2.gateway.keys import add_key
from moe2.shared import wire
from moe2.shared.mqtt import MessageReader, make_client, parse_broker_url, payload_bytes
from moe2.tools.clients.phone import AskError, PhoneClient
from moe2.tools.fleet.harness import Fleet
from moe2.tools.fleet.localbroker import free_port
from tests.conftest import Ggufs

AGENT = "f-a"
COORDINATOR = """
max_concurrent_per_client = 1
rate_per_client_per_s = 0.001
drain_timeout_s = 1.0
"""
GATEWAY = "timeout_s = 5.0\ngrace_s = 1.0\n"
KEYS = ("first", "alice", "bob", "noexp", "shut", "nocoord", "slow", "lost")
#: a bound for a loaded CI box, not a measurement
WAIT_S = 90.0
BODY = {"model": "moe2-default", "prompt": "Q: What is 2 plus 3? A:", "max_tokens": 4,
        "temperature": 0}


@dataclass
class Faults:
    fleet: Fleet
    url: str
    keys: dict[str, str]
    metrics_port: int

    def post(self, key: str, **extra: Any) -> httpx.Response:
        with httpx.Client(base_url=self.url, timeout=WAIT_S,
                          headers={"Authorization": f"Bearer {self.keys[key]}"}) as http:
            return http.post("/completions", json={**BODY, **extra})

    def in_flight(self) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith("moe2_gateway_upstream_in_flight{"):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError("no in-flight gauge")

    def wait_in_flight(self, n: int) -> None:
        """Until the gateway has ``n`` requests published (the broker acknowledged them)."""
        deadline = time.monotonic() + WAIT_S
        while self.in_flight() != n:
            assert time.monotonic() < deadline, f"never {n} request(s) in flight"
            time.sleep(0.05)

    def coordinator_up(self) -> None:
        """The coordinator (restarted if it is not running) answers with the agent fused."""
        if self.fleet.procs["coordinator-coordinator"].popen.poll() is not None:
            self.fleet.restart("coordinator-coordinator")
        _wait_ready_fresh_clients(self.fleet)


def _wait_ready_fresh_clients(fleet: Fleet) -> None:
    """Like ``Fleet.wait_ready``, but every try asks as a new client id: with one request per
    client per 1000 s, a retry as the same phone would only be rate limited."""
    async def probe() -> None:
        deadline = time.monotonic() + WAIT_S
        last: object = None
        while time.monotonic() < deadline:
            fleet.check_alive()
            cid = f"probe-{uuid.uuid4().hex[:8]}"
            try:
                async with make_client(parse_broker_url(fleet.url), identifier=cid) as c, \
                        PhoneClient(c, cid, check_delivery=True) as phone:
                    ans = await phone.ask(wire.PhoneRequest(prompt="x", max_tokens=1, raw=True),
                                          timeout_s=5)
            except (AskError, asyncio.TimeoutError) as exc:  # no coordinator yet, or its
                last = exc                                  # subscription was not ready
            else:
                last = ans.error
                if ans.final is not None and [
                        e.id for e in ans.final.experts if not e.dropped] == [AGENT]:
                    return
            await asyncio.sleep(0.2)
        raise AssertionError(f"fleet not ready: {last}")

    asyncio.run(probe())


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory, ggufs: Ggufs) -> Iterator[Faults]:
    work = tmp_path_factory.mktemp("gateway-faults")
    keyfile = work / "gateway.keys"
    keys = {name: add_key(keyfile, name) for name in KEYS}
    port = free_port()
    with Fleet(work / "fleet") as fleet:
        fleet.start_agent(AGENT, ggufs.shared[0].path, "--n-ctx", "256", "--meter",
                          "estimated", "--telemetry-interval", "0.5")
        fleet.start_coordinator(config_text=COORDINATOR)
        url = fleet.start_gateway("--api-keys", str(keyfile), "--metrics-port", str(port),
                                  config_text=GATEWAY)
        _wait_ready_fresh_clients(fleet)
        asyncio.run(fleet.wait_models(url, ["moe2-default"], api_key=keys["first"],
                                      name="gateway-gateway"))
        yield Faults(fleet, url, keys, port)


def _error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code, err
    if status in (429, 503):
        assert r.headers["retry-after"]


def test_limits_apply_per_key(faults: Faults) -> None:
    """429 too_many_requests and rate_limited: alice at her limits, bob not."""
    assert faults.post("first").status_code == 200
    faults.fleet.signal(f"agent-{AGENT}", signal.SIGSTOP)  # alice's request stays in flight
    try:
        held: list[httpx.Response] = []
        t = threading.Thread(target=lambda: held.append(faults.post("alice")))
        t.start()
        faults.wait_in_flight(1)
        # the coordinator admitted alice's first request before it sees her second
        _error(faults.post("alice"), 429, "too_many_requests")
    finally:
        faults.fleet.signal(f"agent-{AGENT}", signal.SIGCONT)
    t.join(WAIT_S)
    assert held and held[0].status_code == 200, held
    assert faults.post("bob").status_code == 200  # another key: its own limits
    _error(faults.post("alice"), 429, "rate_limited")  # alice's one request per 1000 s is used


def test_no_experts_is_503(faults: Faults) -> None:
    fleet = faults.fleet
    assert fleet.stop(f"agent-{AGENT}") == 0  # SIGTERM: the agent says it goes offline

    async def offline_seen() -> None:
        # the coordinator reads the same retained status before the next request
        async with make_client(parse_broker_url(fleet.url), identifier="watch") as c, \
                MessageReader(c) as reader:
            await c.subscribe(fleet.topics.agent_status(AGENT).topic, qos=1)
            while True:
                m = await reader.next(timeout_s=WAIT_S)
                assert m is not None, "no status"
                st = fleet.topics.agent_status(AGENT).decode(payload_bytes(m))
                if st.state == "offline":
                    return

    asyncio.run(offline_seen())
    _error(faults.post("noexp"), 503, "no_experts")
    fleet.restart(f"agent-{AGENT}")
    _wait_ready_fresh_clients(fleet)


def test_shutting_down_then_no_coordinator_are_503(faults: Faults) -> None:
    fleet = faults.fleet
    fleet.signal(f"agent-{AGENT}", signal.SIGSTOP)  # the request cannot finish ...
    try:
        held: list[httpx.Response] = []
        t = threading.Thread(target=lambda: held.append(faults.post("shut")))
        t.start()
        faults.wait_in_flight(1)
        fleet.signal("coordinator-coordinator", signal.SIGTERM)  # ... within the 1 s drain
        t.join(WAIT_S)
        assert fleet.procs["coordinator-coordinator"].popen.wait(WAIT_S) == 0
    finally:
        fleet.signal(f"agent-{AGENT}", signal.SIGCONT)
    assert held
    _error(held[0], 503, "shutting_down")
    # nobody is subscribed to requests now: the broker's PUBACK says so at once
    _error(faults.post("nocoord"), 503, "no_coordinator")


def test_silence_is_504_and_a_dead_coordinator_is_503(faults: Faults) -> None:
    faults.coordinator_up()
    fleet = faults.fleet
    fleet.signal("coordinator-coordinator", signal.SIGSTOP)  # alive but silent
    try:
        _error(faults.post("slow", stream=True), 504, "timeout")
        held: list[httpx.Response] = []
        t = threading.Thread(target=lambda: held.append(faults.post("lost")))
        t.start()
        faults.wait_in_flight(1)
        fleet.signal("coordinator-coordinator", signal.SIGKILL)  # its Last Will goes out
        t.join(WAIT_S)
    finally:
        fleet.signal("coordinator-coordinator", signal.SIGCONT)
    assert held
    _error(held[0], 503, "coordinator_lost")
    faults.coordinator_up()  # and the gateway serves again once a coordinator is back
    r = httpx.get(f"{faults.url}/models", timeout=WAIT_S,
                  headers={"Authorization": f"Bearer {faults.keys['first']}"})
    assert r.status_code == 200
