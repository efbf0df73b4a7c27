"""An in-memory MQTT 5 transport: the client interface the daemons use, without a socket.

The httpx ``MockTransport`` idea for MQTT: :class:`MemoryBroker` routes publishes between
:class:`MemoryClient` s in one event loop, with what the coordinator and agents rely on --
wildcard filters, ``$share/<group>/...`` subscriptions (one member of a group gets each message,
round robin), retained messages (an empty payload clears; sent to new non-shared subscribers
with the retain flag), Last Will on an unclean end, and MQTT 5 properties passed through
untouched. :meth:`MemoryBroker.drop` cuts one client's connection (its will is published, its
message iterator raises :class:`aiomqtt.MqttError`), :meth:`MemoryBroker.restart` cuts every
connection: the reconnect loops see what they see when a real broker goes away.
:class:`MemoryBridge` joins two brokers as a Mosquitto 2 MQTT 5 bridge does (``topic ... both``):
each broker's shared groups take their own copy, retained messages and wills cross, and while
the bridge is cut its local side queues (QoS 1) and its remote side loses -- bridged
topologies in tests, still without a socket.

So :class:`moe2.coordinator.service.Coordinator` and :class:`moe2.agent.daemon.AgentDaemon` are
tested synchronously-fast in one process (``tests/unit``); integration and end-to-end tests keep
the real mosquitto. Delivery is in order per publisher, QoS is accepted and ignored (nothing is
lost in memory), and a publish is delivered before the publishing call returns.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
from paho.mqtt.properties import Properties

from moe2.shared.topics import publishable_topic


@dataclass
class _Subscription:
    filter: str  # without the $share prefix
    group: str | None
    qos: int


@dataclass
class _Retained:
    payload: bytes
    qos: int
    properties: Properties | None


@dataclass
class MemoryBroker:
    """Clients connect by entering :class:`MemoryClient` contexts made by :meth:`client`."""

    retained: dict[str, _Retained] = field(default_factory=dict)
    published: int = 0
    _clients: dict[str, MemoryClient] = field(default_factory=dict)
    _rr: dict[tuple[str, str], itertools.count[int]] = field(
        default_factory=lambda: defaultdict(itertools.count))
    _ids: itertools.count[int] = field(default_factory=itertools.count)
    _bridges: list[MemoryBridge] = field(default_factory=list)

    def client(self, identifier: str | None = None, *, will: aiomqtt.Will | None = None
               ) -> MemoryClient:
        return MemoryClient(self, identifier or f"mem-{next(self._ids)}", will)

    @property
    def connected(self) -> list[str]:
        return sorted(self._clients)

    # ------------------------------------------------------------------ faults
    def drop(self, identifier: str) -> None:
        """Cut one client's connection as a network failure would (its will goes out)."""
        c = self._clients.get(identifier)
        if c is not None:
            c._lost(aiomqtt.MqttError(f"connection of {identifier} dropped"))

    def restart(self) -> None:
        """Cut every connection (a broker restart without persistence keeps nothing but the
        retained messages here, which a real mosquitto without persistence would lose too:
        clear them with ``retained.clear()`` to model that)."""
        for c in list(self._clients.values()):
            c._lost(aiomqtt.MqttError("the broker restarted"), will=False)

    # ------------------------------------------------------------------ routing
    def _connect(self, c: MemoryClient) -> None:
        old = self._clients.get(c.identifier)
        if old is not None and old is not c:  # a client id taken over: the old one is cut
            old._lost(aiomqtt.MqttError("session taken over"), will=True)
        self._clients[c.identifier] = c

    def _disconnect(self, c: MemoryClient, *, will: bool) -> None:
        if self._clients.get(c.identifier) is c:
            del self._clients[c.identifier]
        if will and c.will is not None:
            w = c.will
            payload = w.payload if isinstance(w.payload, bytes) else str(w.payload or "").encode()
            self.publish(w.topic, payload, qos=w.qos, retain=w.retain, properties=w.properties)

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False,
                properties: Properties | None = None, via: MemoryBridge | None = None) -> None:
        """Route one message (``via``: the bridge it arrived through, which it does not go
        back over)."""
        if not publishable_topic(topic):
            raise aiomqtt.MqttError(f"topic {topic!r} cannot be published to")
        self.published += 1
        if retain:
            if payload:
                self.retained[topic] = _Retained(payload, qos, properties)
            else:
                self.retained.pop(topic, None)
        t = aiomqtt.Topic(topic)
        groups: dict[tuple[str, str], list[MemoryClient]] = defaultdict(list)
        for c in list(self._clients.values()):
            delivered = False
            for s in c._subs:
                if not t.matches(s.filter):
                    continue
                if s.group is not None:
                    groups[(s.group, s.filter)].append(c)
                elif not delivered:  # overlapping filters: one copy (mosquitto's default)
                    delivered = True
                    c._deliver(topic, payload, qos, retain=False, properties=properties)
        for key, members in groups.items():
            c = members[next(self._rr[key]) % len(members)]
            c._deliver(topic, payload, qos, retain=False, properties=properties)
        for b in self._bridges:
            if b is not via:
                b._forward(self, topic, payload, qos, retain, properties)

    def _retained_for(self, c: MemoryClient, s: _Subscription) -> None:
        if s.group is not None:  # MQTT 5: no retained messages to shared subscriptions
            return
        for topic, r in list(self.retained.items()):
            if aiomqtt.Topic(topic).matches(s.filter):
                c._deliver(topic, r.payload, r.qos, retain=True, properties=r.properties)


class MemoryClient:
    """What the daemons use of :class:`moe2.shared.mqtt.Client`, connected to a
    :class:`MemoryBroker`. Like aiomqtt's client, one context per connection."""

    def __init__(self, broker: MemoryBroker, identifier: str,
                 will: aiomqtt.Will | None = None) -> None:
        self.broker = broker
        self.identifier = identifier
        self.will = will
        self._subs: list[_Subscription] = []
        self._queue: deque[aiomqtt.Message] = deque()
        self._ready = asyncio.Event()
        self._error: aiomqtt.MqttError | None = None
        self._connected = False
        self._mids = itertools.count(1)

    # ------------------------------------------------------------------ connection
    async def __aenter__(self) -> MemoryClient:
        if self._connected:
            raise aiomqtt.MqttError("already connected")
        self._error = None
        self._connected = True
        self.broker._connect(self)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._connected:
            self._connected = False
            self.broker._disconnect(self, will=False)  # a clean DISCONNECT: no will
        self._subs.clear()

    def _lost(self, error: aiomqtt.MqttError, *, will: bool = True) -> None:
        if not self._connected:
            return
        self._connected = False
        self._error = error
        self.broker._disconnect(self, will=will)
        self._subs.clear()
        self._ready.set()

    def _check(self) -> None:
        if not self._connected:
            raise self._error or aiomqtt.MqttError("not connected")

    def _deliver(self, topic: str, payload: bytes, qos: int, *, retain: bool,
                 properties: Properties | None) -> None:
        self._queue.append(aiomqtt.Message(topic, payload, qos, retain, next(self._mids),
                                           properties))
        self._ready.set()

    # ------------------------------------------------------------------ the client interface
    @property
    def messages(self) -> AsyncIterator[aiomqtt.Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[aiomqtt.Message]:
        while True:
            while self._queue:
                yield self._queue.popleft()
            if not self._connected:
                raise self._error or aiomqtt.MqttError("disconnected")
            self._ready.clear()
            await self._ready.wait()

    async def subscribe(self, topic: str, qos: int = 0, *args: Any, **kwargs: Any) -> None:
        self._check()
        group: str | None = None
        filt = topic
        if topic.startswith("$share/"):
            _, group, filt = topic.split("/", 2)
        sub = _Subscription(filt, group, qos)
        self._subs = [s for s in self._subs if (s.filter, s.group) != (filt, group)] + [sub]
        self.broker._retained_for(self, sub)

    async def unsubscribe(self, topic: str, *args: Any, **kwargs: Any) -> None:
        self._check()
        group: str | None = None
        filt = topic
        if topic.startswith("$share/"):
            _, group, filt = topic.split("/", 2)
        self._subs = [s for s in self._subs if (s.filter, s.group) != (filt, group)]

    async def publish(self, topic: str, payload: bytes | None = None, qos: int = 0,
                      retain: bool = False, properties: Properties | None = None,
                      *args: Any, **kwargs: Any) -> None:
        self.publish_now(topic, payload or b"", properties=properties, qos=qos, retain=retain)
        await asyncio.sleep(0)  # an acknowledged publish yields, as a network round trip would

    def publish_now(self, topic: str, payload: bytes, *, properties: Properties | None = None,
                    qos: int = 0, retain: bool = False) -> None:
        self._check()
        self.broker.publish(topic, payload, qos=qos, retain=retain, properties=properties)


@dataclass
class _Queued:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties | None


class MemoryBridge:
    """A Mosquitto 2 bridge (``bridge_protocol_version mqttv50``, ``topic <f> both 1`` for each
    filter, ``cleansession false``) that ``local`` runs to ``remote``: messages matching
    ``topics`` cross both ways with their properties and retain flag, never back (No Local);
    bridges must form a tree. :meth:`cut` takes the link down: what ``local`` publishes at QoS
    1 meanwhile is queued (up to ``max_queued``) and crosses on :meth:`restore`, what
    ``remote`` publishes is lost -- mosquitto's v5 bridge keeps no session on the remote side.
    On restore both sides' retained messages cross again (so retained state can swap, as on
    mosquitto)."""

    def __init__(self, local: MemoryBroker, remote: MemoryBroker,
                 topics: tuple[str, ...] = ("#",), *, max_queued: int = 1000) -> None:
        self.local = local
        self.remote = remote
        self.topics = topics
        self.up = True
        self.forwarded = 0
        self.lost = 0
        self._queue: deque[_Queued] = deque(maxlen=max_queued)
        local._bridges.append(self)
        remote._bridges.append(self)

    def _matches(self, topic: str) -> bool:
        t = aiomqtt.Topic(topic)
        return any(t.matches(f) for f in self.topics)

    def _forward(self, origin: MemoryBroker, topic: str, payload: bytes, qos: int,
                 retain: bool, properties: Properties | None) -> None:
        if not self._matches(topic):
            return
        if not self.up:
            if origin is self.local and qos > 0:
                self._queue.append(_Queued(topic, payload, qos, retain, properties))
            else:
                self.lost += 1
            return
        other = self.remote if origin is self.local else self.local
        self.forwarded += 1
        other.publish(topic, payload, qos=qos, retain=retain, properties=properties, via=self)

    def cut(self) -> None:
        """The link drops."""
        self.up = False

    def restore(self) -> None:
        """The link is back: the local side's queue crosses first, in order; then the retained
        messages of both sides."""
        self.up = True
        while self._queue:
            q = self._queue.popleft()
            self.forwarded += 1
            self.remote.publish(q.topic, q.payload, qos=q.qos, retain=q.retain,
                                properties=q.properties, via=self)
        snapshots = [(target, [(t, r) for t, r in source.retained.items() if self._matches(t)])
                     for source, target in ((self.local, self.remote), (self.remote, self.local))]
        for target, retained in snapshots:
            for topic, r in retained:
                target.publish(topic, r.payload, qos=r.qos, retain=True,
                               properties=r.properties, via=self)
