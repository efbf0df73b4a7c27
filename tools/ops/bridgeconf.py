"""The bridge side of a moe2 Mosquitto topology (pure; :mod:`.brokerconf` writes the files).

A site broker (a *spoke*) runs one bridge to the broker above it (the *hub*):
``moe2 broker-config --bridge-to mqtts://NAME:SECRET@hub:8883 --bridge-ca-file hub-ca.crt``
writes the stanza into the spoke's ``mosquitto.conf``; ``moe2 broker-config --bridges NAME`` on
the hub creates the account ``NAME`` the bridge logs in with, and its ACL. Every broker has at
most one uplink, so the brokers form a tree (a cycle of bridges forwards each message forever).

What Mosquitto 2.0.11 does with a bridge (measured; see README "Scale-out"):

- ``bridge_protocol_version mqttv50`` is required: a v3.1.1 bridge drops every MQTT 5 property,
  the phones' Response Topic and Correlation Data among them. A v5 bridge subscribes with No
  Local, so nothing loops in a tree.
- ``topic P both`` without a QoS means QoS 0 (a request could be dropped): each line here says
  its QoS. QoS 0 lines are the ones nothing should be queued for (heartbeats, telemetry, fused
  steps: stale ones are worse than none).
- While the link is down, the bridge's *local* side (the spoke) queues QoS 1 messages, up to
  ``max_queued_messages`` (a global setting, written with the bridge); the remote side (the
  hub) queues nothing -- what is published there for the spoke meanwhile is lost, and phones
  must time out and retry (with fresh correlation data).
- On the hub, the bridge is an ordinary client under the ACL: it needs ``readwrite`` on every
  forwarded topic and ``write`` on its notification topic (``{root}/bridges/{name}/state``,
  retained ``1``/``0``; the coordinators listen to it to greet the far side at once).
- A broker that runs a bridge must not set ``max_inflight_messages 0`` ("unlimited"):
  mosquitto 2.0.11 then puts Receive Maximum 0 in the bridge's MQTT 5 CONNECT, a protocol
  error the hub disconnects it for, again and again (checked here; the configuration this
  module's caller writes leaves the default).
- The bridge's outgoing socket has Nagle's algorithm on (mosquitto sets TCP_NODELAY only on
  accepted sockets): a fused step crossing it can wait ~40 ms for a delayed ACK. So experts
  stay with their site's coordinators by default; ``agents=True`` shares them across the
  bridge, at that cost per token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from moe2.shared.topics import Topics, check_name

Access = Literal["read", "write", "readwrite"]

#: the bridge's outage queue on the spoke (mosquitto's default, 1000, is a few seconds of a busy
#: site); entries also expire by their Message Expiry
DEFAULT_QUEUE = 10_000
#: seconds; a silent link is noticed after 1.5 x this on the hub
KEEPALIVE_S = 10


class BridgeConfigError(ValueError):
    """Bad input for the bridge (one line for the operator)."""


@dataclass(frozen=True)
class BridgeTopic:
    """One ``topic <pattern> both <qos>`` line, and why it crosses."""

    pattern: str
    qos: int
    why: str


def bridge_topics(topics: Topics, *, agents: bool) -> list[BridgeTopic]:
    """Exactly what crosses, both ways: phones and coordinators may be on either side; with
    ``agents``, agents too (each site's coordinators then fuse experts of the other)."""
    r = topics.root
    out = [
        BridgeTopic(topics.all_requests, 1, "phones' requests, to coordinators on either side"),
        BridgeTopic(f"{topics.response_prefix('+')}#", 1, "replies to phones on either side"),
        BridgeTopic(topics.all_coordinator_status, 1,
                    "coordinators' statuses and Last Wills (retained): takeovers, phones"),
        BridgeTopic(topics.inflight_filter("+"), 1,
                    "in-flight markers (retained): a survivor across tells a dead one's phones"),
        BridgeTopic(topics.all_coordinator_claims, 1,
                    "claims: each request answered once whichever broker's copy it took"),
        BridgeTopic(topics.all_coordinator_heartbeats, 0,
                    "which broker node each coordinator is on (never queued)"),
    ]
    if agents:
        out += [
            BridgeTopic(topics.all_agent_status, 1, "agents' statuses and Last Wills"),
            BridgeTopic(topics.all_agent_vocab, 1, "agents' vocabularies (retained)"),
            BridgeTopic(topics.all_agent_telemetry, 0, "agents' telemetry (never queued)"),
            BridgeTopic(topics.agent_rpc("+"), 0, "fused steps to agents (never queued)"),
            BridgeTopic(topics.coordinator_inbox("+").topic, 0,
                        "agents' replies to coordinators (never queued)"),
            BridgeTopic(topics.plan.topic, 1, "the plan (retained): one fleet, one plan"),
        ]
    assert all(t.pattern.startswith(r + "/") for t in out)
    return out


def notification_topic(topics: Topics, name: str) -> str:
    return topics.bridge_state(name)


def bridge_acl(name: str, topics: Topics, *, agents: bool) -> list[tuple[Access, str]]:
    """The hub's ACL for the bridge account ``name``: what its bridge forwards, and its own
    notification topic."""
    acl: list[tuple[Access, str]] = [("readwrite", t.pattern)
                                     for t in bridge_topics(topics, agents=agents)]
    acl.append(("write", notification_topic(topics, name)))
    return acl


_HOST_RE = re.compile(r"^[A-Za-z0-9.\-:\[\]]{1,253}$")


@dataclass(frozen=True)
class BridgeSpec:
    """The uplink of one broker: where it connects (``host:port``, TLS or not), as whom (the
    account the hub made with ``--bridges name``), the CA file it trusts (a path on the broker
    host), whether agents' topics cross, and the outage queue."""

    name: str
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    agents: bool = False
    queue: int = DEFAULT_QUEUE

    def validate(self) -> BridgeSpec:
        try:
            check_name("bridge name", self.name)
        except ValueError as exc:
            raise BridgeConfigError(str(exc)) from None
        if not _HOST_RE.match(self.host):
            raise BridgeConfigError(f"bridge host {self.host!r} is not valid")
        if not 0 < self.port <= 65535:
            raise BridgeConfigError(f"bridge port {self.port} is not a TCP port")
        for label, value in (("user name", self.username), ("password", self.password)):
            if value is not None and (not value or any(c.isspace() for c in value)):
                raise BridgeConfigError(f"the bridge {label} must be non-empty, without "
                                        "spaces (mosquitto.conf cannot quote it)")
        if (self.username is None) != (self.password is None):
            raise BridgeConfigError("give the bridge both a user name and a password "
                                    "(mqtts://NAME:SECRET@hub:8883), or neither")
        if self.tls and self.ca_file is None:
            raise BridgeConfigError("a TLS bridge needs the hub's CA: --bridge-ca-file FILE "
                                    "(the ca.crt `moe2 broker-config` wrote for the hub)")
        if self.queue < 1:
            raise BridgeConfigError("the bridge queue must hold at least one message")
        return self


def bridge_conf_text(spec: BridgeSpec, topics: Topics) -> str:
    """The ``connection`` stanza (and the global outage queue) for ``mosquitto.conf``."""
    spec = spec.validate()
    host = spec.host if ":" not in spec.host or spec.host.startswith("[") else f"[{spec.host}]"
    lines = [
        f"# Bridge {spec.name}: this broker's one uplink, to {host}:{spec.port}. Brokers must",
        "# form a tree: no other bridge may lead back here.",
        "# While the link is down, QoS 1 messages for the hub queue here (up to this many, all",
        "# clients together); what the hub publishes for this side meanwhile is lost.",
        f"max_queued_messages {spec.queue}",
        "",
        f"connection moe2-{spec.name}",
        f"address {host}:{spec.port}",
        "# MQTT 5: a v3.1.1 bridge drops the phones' Response Topic and Correlation Data",
        "bridge_protocol_version mqttv50",
        f"remote_clientid moe2-bridge-{spec.name}",
        f"local_clientid moe2-bridge-{spec.name}-local",
    ]
    if spec.username is not None:
        lines += [f"remote_username {spec.username}", f"remote_password {spec.password}"]
    if spec.tls:
        lines += [f"bridge_cafile {spec.ca_file}", "bridge_insecure false",
                  "bridge_tls_version tlsv1.2"]
    lines += [
        "# keep the local queue across link drops (the v5 remote side keeps nothing)",
        "cleansession false",
        "notifications true",
        f"notification_topic {notification_topic(topics, spec.name)}",
        f"keepalive_interval {KEEPALIVE_S}",
        "restart_timeout 2 10",
        "# What crosses, both ways (QoS 0: never queued; a line without a QoS would be QoS 0):",
    ]
    for t in bridge_topics(topics, agents=spec.agents):
        lines += [f"# {t.why}", f"topic {t.pattern} both {t.qos}"]
    if not spec.agents:
        lines.append("# Agents stay with their site's coordinators (fused steps do not cross).")
    return "\n".join(lines) + "\n"


def spec_from_url(url: str, *, name: str | None, ca_file: Path | None, agents: bool,
                  queue: int = DEFAULT_QUEUE) -> BridgeSpec:
    """``--bridge-to URL`` (``mqtt[s]://[NAME:SECRET@]host[:port]``): the bridge name defaults
    to the URL's user name -- the account ``--bridges NAME`` made on the hub."""
    from moe2.shared.mqtt import BrokerUrlError, parse_broker_url

    try:
        u = parse_broker_url(url)
    except BrokerUrlError as exc:
        raise BridgeConfigError(f"--bridge-to: {exc}") from None
    bridge_name = name or u.username
    if not bridge_name:
        raise BridgeConfigError("--bridge-to without a user name needs --bridge-name NAME")
    return BridgeSpec(name=bridge_name, host=u.host, port=u.port, tls=u.tls,
                      username=u.username, password=u.password, ca_file=ca_file, agents=agents,
                      queue=queue).validate()
