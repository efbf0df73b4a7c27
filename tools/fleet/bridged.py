"""Two bridged brokers on one machine, for tests and benches of exactly-once serving.

``with BridgedFleet(work) as f:`` starts broker A (the hub: the fleet harness's own broker) and
broker B (a site broker) whose MQTT 5 bridge -- the stanza ``moe2 broker-config --bridge-to``
writes (:func:`moe2.tools.ops.bridgeconf.bridge_conf_text`), without accounts -- connects to A
through a :class:`LinkProxy`, so that ``f.cut()`` drops the bridge and ``f.restore()`` brings it
back. Processes start on either side (``site="A"`` or ``"B"``) through the one fleet harness.
Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from types import TracebackType

from moe2.shared.mqtt import MessageReader, make_client, parse_broker_url, payload_bytes
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
        """Broker A (the hub) or B (the site broker)."""
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
