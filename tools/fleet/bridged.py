"""Two bridged brokers on one machine, for tests and benches of exactly-once serving.

``with BridgedFleet(work) as f:`` starts broker A (the hub: the fleet harness's own broker) and
broker B (a site broker) whose MQTT 5 bridge -- the stanza ``moe2 broker-config --bridge-to``
writes (:func:`moe2.tools.ops.bridgeconf.bridge_conf_text`), without accounts -- connects to A
through a :class:`LinkProxy`, so that ``f.cut()`` drops the bridge and ``f.restore()`` brings it
back. Processes start on either side (``site="A"`` or ``"B"``) through the one fleet harness.
Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import aiomqtt

from moe2.shared import wire
from moe2.shared.mqtt import MessageReader, make_client, parse_broker_url, payload_bytes
from moe2.tools.clients.phone import AskError, PhoneClient
from moe2.tools.fleet.harness import Fleet, FleetError
from moe2.tools.fleet.linkproxy import LinkProxy
from moe2.tools.fleet.localbroker import LocalBroker
from moe2.tools.ops.bridgeconf import BridgeSpec, bridge_conf_text

#: the site broker's own settings (the bridge stanza adds the outage queue). Not
#: ``max_inflight_messages 0``: mosquitto 2.0.11 then sends Receive Maximum 0 in the bridge's
#: CONNECT, a protocol error the hub disconnects it for (see moe2.tools.ops.bridgeconf)
SITE_BROKER_CONF = (
    "listener {port} 127.0.0.1\n"
    "allow_anonymous true\n"
    "persistence false\n"
    "message_size_limit 0\n"
    "set_tcp_nodelay true\n"
)
BRIDGE_NAME = "siteb"


class BridgedFleet(Fleet):
    def __init__(self, workdir: str | Path | None = None, *, root: str = "moe2",
                 bridge_agents: bool = False) -> None:
        super().__init__(workdir, root=root)
        self.proxy = LinkProxy(self.broker.port)
        spec = BridgeSpec(name=BRIDGE_NAME, host="127.0.0.1", port=self.proxy.port, tls=False,
                          agents=bridge_agents)
        text = SITE_BROKER_CONF + bridge_conf_text(spec, self.topics).replace(
            "{", "{{").replace("}", "}}")
        site_dir = self.workdir / "broker-b"
        site_dir.mkdir(exist_ok=True)
        self.site = LocalBroker(config_text=text, workdir=str(site_dir))

    def __enter__(self) -> BridgedFleet:
        super().__enter__()
        try:
            self.proxy.__enter__()
            self.site.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        super().close()  # the processes first, while both brokers are there
        self.site.close()
        self.proxy.close()

    def url_of(self, site: str) -> str:
        return self.url if site == "A" else self.site.url

    # ------------------------------------------------------------------ the link
    def cut(self) -> None:
        """The bridge drops (every relayed connection reset, new ones refused)."""
        self.proxy.cut()

    def restore(self) -> None:
        self.proxy.restore()

    async def wait_bridge(self, up: bool, timeout_s: float = 60.0) -> float:
        """Until broker A says the bridge is up (its ``1``) or down (its Last Will ``0``);
        returns the wall time it said so. Mosquitto 2.0.11 reconnects a bridge 5-6 s after the
        link is back, whatever ``restart_timeout`` says."""
        want = b"1" if up else b"0"
        deadline = time.monotonic() + timeout_s
        async with make_client(parse_broker_url(self.url),
                               identifier=f"bridge-watch-{uuid.uuid4().hex[:6]}") as c, \
                MessageReader(c) as reader:
            await c.subscribe(self.topics.bridge_state(BRIDGE_NAME), qos=1)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise FleetError(f"the bridge never went {'up' if up else 'down'}")
                m = await reader.next(timeout_s=left)
                if m is not None and payload_bytes(m) == want:
                    return time.time()

    # ------------------------------------------------------------------ readiness
    async def wait_sites(self, expect: Mapping[str, set[str]], timeout_s: float = 120.0,
                         site: str = "A") -> float:
        """Until each coordinator has answered a probe (from a phone on ``site``) fusing
        exactly the agents ``expect`` names for it; seconds."""
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        ok: set[str] = set()
        last = "no answer"
        cid = f"probe-{uuid.uuid4().hex[:8]}"
        url = parse_broker_url(self.url_of(site))
        while not set(expect) <= ok:
            self.check_alive()
            if time.monotonic() > deadline:
                raise FleetError(f"bridged fleet not ready: ok {sorted(ok)}; last: {last}")
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
