"""``moe2 broker-config --bridge-to`` / ``--bridges``: the stanza, the hub's bridge account,
and two secured mosquittos on loopback bridged over TLS with what it writes.

Every claim about delivery is checked against the real brokers; an absence is proved with a
fence (see ``test_broker_config.py``): after the message that must not arrive, the same
publisher sends one that must, over the same bridge.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from moe2.shared import wire
from moe2.shared.mqtt import (
    get_prop,
    make_client,
    parse_broker_url,
    payload_bytes,
    response_properties,
)
from moe2.shared.topics import Topics
from moe2.tools.fleet.localbroker import LocalBroker, free_port
from moe2.tools.ops import bridgeconf as brc
from tests.integration.test_broker_config import connected, receive_until, run_cli

TOPICS = Topics()
TIMEOUT_S = 30.0


def me() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


# --------------------------------------------------------------------------- pure parts


def test_the_stanza_is_mqtt5_with_a_qos_on_every_topic() -> None:
    spec = brc.BridgeSpec(name="siteb", host="hub.example", port=8883, tls=True,
                          username="siteb", password="s3cret", ca_file=Path("/etc/m/ca.crt"))
    text = brc.bridge_conf_text(spec, TOPICS)
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert "bridge_protocol_version mqttv50" in lines
    assert "address hub.example:8883" in lines
    assert {"remote_username siteb", "remote_password s3cret", "bridge_cafile /etc/m/ca.crt",
            "bridge_insecure false", "cleansession false",
            "notification_topic moe2/bridges/siteb/state"} <= set(lines)
    topic_lines = [ln.split() for ln in lines if ln.startswith("topic ")]
    assert all(len(t) == 4 and t[2] == "both" and t[3] in "01" for t in topic_lines)
    forwarded = {t[1]: int(t[3]) for t in topic_lines}
    assert forwarded == {"moe2/requests/+": 1, "moe2/responses/+/#": 1,
                         "moe2/coordinators/+/status": 1, "moe2/coordinators/+/inflight/+": 1,
                         "moe2/coordinators/+/claims": 1, "moe2/coordinators/+/heartbeat": 0}
    assert "max_inflight_messages" not in text
    shared = brc.bridge_conf_text(brc.BridgeSpec(name="s", host="h", port=1883, tls=False,
                                                 agents=True), Topics("site/moe2"))
    assert "topic site/moe2/agents/+/rpc both 0" in shared
    assert "topic site/moe2/agents/+/status both 1" in shared
    assert "bridge_cafile" not in shared and "remote_username" not in shared


def test_the_hubs_bridge_account_may_forward_exactly_that() -> None:
    acl = brc.bridge_acl("siteb", TOPICS, agents=False)
    assert ("write", "moe2/bridges/siteb/state") in acl
    assert {p for a, p in acl if a == "readwrite"} == {
        t.pattern for t in brc.bridge_topics(TOPICS, agents=False)}
    assert len(brc.bridge_acl("siteb", TOPICS, agents=True)) > len(acl)


@pytest.mark.parametrize(("kw", "fragment"), [
    ({"tls": True}, "CA"),
    ({"username": "u"}, "both a user name and a password"),
    ({"username": "u", "password": "has space"}, "without spaces"),
    ({"name": "a/b"}, "not valid"),
    ({"host": "bad host"}, "not valid"),
    ({"port": 0}, "TCP port"),
])
def test_bad_bridges_are_refused(kw: dict[str, Any], fragment: str) -> None:
    base: dict[str, Any] = {"name": "s", "host": "h", "port": 1883, "tls": False}
    with pytest.raises(brc.BridgeConfigError, match=fragment):
        brc.BridgeSpec(**{**base, **kw}).validate()


def test_cli_refuses_a_tls_bridge_without_the_hubs_ca(tmp_path: Path) -> None:
    proc = run_cli("--out", str(tmp_path / "x"), "--phones", "p", "--bridge-to",
                   "mqtts://siteb:pw@hub:8883")
    assert proc.returncode == 2
    assert "--bridge-ca-file" in proc.stderr.strip().splitlines()[-1]
    proc = run_cli("--out", str(tmp_path / "y"), "--phones", "p", "--bridge-to",
                   "mqtt://hub:1883")
    assert proc.returncode == 2 and "--bridge-name" in proc.stderr


# --------------------------------------------------------------------------- two real brokers


@dataclass
class Site:
    out: Path
    port: int
    tls_port: int
    accounts: dict[str, dict[str, str]]
    broker: LocalBroker

    def client(self, name: str, **kw: Any) -> aiomqtt.Client:
        pw = self.accounts[name]["password"]
        return make_client(parse_broker_url(f"mqtt://{name}:{pw}@127.0.0.1:{self.port}"), **kw)


def _site(out: Path, *args: str) -> tuple[Path, int, int, dict[str, Any]]:
    port, tls_port = free_port(), free_port()
    proc = run_cli("--out", str(out), "--port", str(port), "--tls-port", str(tls_port),
                   "--tls-bind", "127.0.0.1", "--broker-user", me(), "--json", *args)
    assert proc.returncode == 0, proc.stderr
    return out, port, tls_port, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Site, Site]]:
    base = tmp_path_factory.mktemp("bridge")
    hub_dir, hub_port, hub_tls, _summary = _site(
        base / "hub", "--phones", "pa", "--coordinators", "c0", "--agents", "a0",
        "--bridges", "siteb")
    hub_acc = json.loads((hub_dir / "credentials.json").read_text())["accounts"]
    assert hub_acc["siteb"]["role"] == "bridge"
    secret = hub_acc["siteb"]["password"]
    spoke_dir, spoke_port, spoke_tls, summary = _site(
        base / "spoke", "--phones", "pb", "--coordinators", "c1",
        "--bridge-to", f"mqtts://siteb:{secret}@localhost:{hub_tls}",
        "--bridge-ca-file", str(hub_dir / "ca.crt"))
    assert summary["bridge"]["name"] == "siteb" and summary["bridge"]["tls"]
    assert "password" not in json.dumps(summary)
    spoke_acc = json.loads((spoke_dir / "credentials.json").read_text())["accounts"]

    def text(d: Path) -> str:
        return (d / "mosquitto.conf").read_text().replace("{", "{{").replace("}", "}}")

    with LocalBroker(port=hub_port, config_text=text(hub_dir)) as hub, \
            LocalBroker(port=spoke_port, config_text=text(spoke_dir)) as spoke:
        yield (Site(hub_dir, hub_port, hub_tls, hub_acc, hub),
               Site(spoke_dir, spoke_port, spoke_tls, spoke_acc, spoke))


def test_a_secret_bridge_config_is_not_world_readable(sites: tuple[Site, Site]) -> None:
    _hub, spoke = sites
    assert (spoke.out / "mosquitto.conf").stat().st_mode & 0o077 == 0
    assert (spoke.out / "bridge-ca.crt").read_bytes() == (_hub.out / "ca.crt").read_bytes()


def test_bridged_over_tls_with_the_generated_acls(sites: tuple[Site, Site]) -> None:
    """The bridge logs in to the hub over TLS and may publish its state there; a phone's
    request from the site reaches the hub's coordinator with its Response Topic and
    Correlation Data, and the reply comes back; claims, heartbeats and retained in-flight
    markers cross both ways; agents' topics stay on their site (no ``--bridge-agents``)."""
    hub, spoke = sites

    async def main() -> None:
        c0, c1, pb, a0 = hub.client("c0"), spoke.client("c1"), spoke.client("pb"), \
            hub.client("a0")
        async with connected(c0, c1, pb, a0):
            await c0.subscribe(TOPICS.bridge_state("siteb"), qos=1)
            state = TOPICS.bridge_state("siteb")

            async def bridge_up() -> None:
                async for m in c0.messages:
                    if str(m.topic) == state and payload_bytes(m) == b"1":
                        return

            await asyncio.wait_for(bridge_up(), TIMEOUT_S)
            for c in (c0, c1):
                await c.subscribe(TOPICS.all_coordinator_claims, qos=1)
                await c.subscribe(TOPICS.all_coordinator_heartbeats, qos=0)
                await c.subscribe(TOPICS.inflight_filter("+"), qos=1)
            await c0.subscribe(TOPICS.requests_shared(), qos=1)
            await c1.subscribe(TOPICS.all_agent_status, qos=1)
            rt = TOPICS.response_prefix("pb") + "r"
            await pb.subscribe(rt, qos=1)
            # a request from the site, answered on the hub
            await pb.publish(TOPICS.request("pb"), b'{"prompt": "hi"}', qos=1,
                             properties=response_properties(rt, b"\x00corr", "application/json"))
            got = await receive_until(c0, TOPICS.request("pb"))
            [(_t, body)] = [g for g in got if g[0] == TOPICS.request("pb")]
            assert body == b'{"prompt": "hi"}'
            await c0.publish(rt, b'{"type": "final"}', qos=1,
                             properties=response_properties(correlation_data=b"\x00corr"))
            async for m in pb.messages:
                assert str(m.topic) == rt and get_prop(m, "CorrelationData") == b"\x00corr"
                break
            # exactly-once traffic, both ways
            claim = wire.RequestClaim(key="a" * 32, coordinator_id="c1", node="spoke:1883",
                                      incarnation="i", ts=1.0)
            marker = TOPICS.coordinator_inflight("c1", "r1")
            await c1.publish(marker.topic, marker.encode(wire.InflightMarker(
                coordinator_id="c1", incarnation="i", client_id="pb", response_topic=rt)),
                qos=1, retain=True)
            await c1.publish(TOPICS.coordinator_heartbeat("c1").topic, b"hb", qos=0)
            await c1.publish(TOPICS.coordinator_claims("c1").topic,
                             TOPICS.coordinator_claims("c1").encode(claim), qos=1)
            seen = {t for t, _p in await receive_until(c0, TOPICS.coordinator_claims("c1").topic)}
            assert {marker.topic, TOPICS.coordinator_heartbeat("c1").topic} <= seen
            # the marker is retained on the hub too: a survivor there finds it
            async with hub.client("c0", identifier="late-c0") as late:
                await late.subscribe(TOPICS.inflight_filter("c1"), qos=1)
                async for m in late.messages:
                    assert str(m.topic) == marker.topic and m.retain
                    break
            # an agent's status stays on the hub; the claim after it is the fence
            await a0.publish(TOPICS.agent_status("a0").topic, b"online", qos=1, retain=True)
            await c0.publish(TOPICS.coordinator_claims("c0").topic, b"fence", qos=1)
            got = await receive_until(c1, TOPICS.coordinator_claims("c0").topic)
            assert [t for t, _p in got if "/agents/" in t] == []

    asyncio.run(main())
    for site in sites:
        assert "Denied" not in site.broker.log_tail(100_000)


def test_a_bridge_with_a_wrong_password_is_refused_and_the_hub_says_why(
        tmp_path: Path, sites: tuple[Site, Site]) -> None:
    """The bridge's credentials are checked like anyone's (and a site broker can start with a
    bad one: mosquitto keeps retrying, and logs the refusal)."""
    hub, _spoke = sites
    out, port, _tls, _summary = _site(
        tmp_path / "bad", "--phones", "pz", "--bridge-to",
        f"mqtts://siteb:wrong@localhost:{hub.tls_port}", "--bridge-ca-file",
        str(hub.out / "ca.crt"))
    text = (out / "mosquitto.conf").read_text().replace("{", "{{").replace("}", "}}")
    with LocalBroker(port=port, config_text=text):
        deadline = time.monotonic() + TIMEOUT_S
        while "not authorised" not in hub.broker.log_tail(100_000):  # the hub's log line
            assert time.monotonic() < deadline, hub.broker.log_tail()
            time.sleep(0.1)
