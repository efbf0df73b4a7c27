"""Replies to phones: token chunks written at once, finals and errors never lost to a broker
restart.

A final or error (QoS 1) that cannot be published now -- the broker is away, or the connection
drops before the PUBACK -- waits in the outbox and goes out after the reconnect, in order. Token
chunks (QoS 0) are dropped while the broker is away: the final carries the whole text. A reply
during whose publishing the connection was lost :data:`OUTBOX_MAX_LOSSES` times is dropped and
logged: the broker refuses it (mosquitto disconnects a client for some topics), and retrying it
forever would keep the coordinator offline.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, replace

import aiomqtt
from paho.mqtt.properties import Properties

from moe2.coordinator.link import BrokerLink

log = logging.getLogger(__name__)

#: an outbox reply during whose publishing this many connections were lost is dropped
OUTBOX_MAX_LOSSES = 3
#: replies waiting at most (a broker away for long under load must not grow memory unbounded)
OUTBOX_MAX = 100_000


@dataclass(frozen=True)
class PhoneMessage:
    topic: str
    payload: bytes
    properties: Properties
    qos: int
    #: connections lost while this message was being published
    losses: int = 0


class PhoneOutbox:
    def __init__(self, link: BrokerLink, maxlen: int = OUTBOX_MAX) -> None:
        self._link = link
        self._queue: deque[PhoneMessage] = deque(maxlen=maxlen)
        self._event = asyncio.Event()

    def __len__(self) -> int:
        return len(self._queue)

    def pending(self) -> list[PhoneMessage]:
        """What waits, oldest first (tests and shutdown reports)."""
        return list(self._queue)

    def put(self, msg: PhoneMessage) -> None:
        """Queue a reply for the outbox loop (refusals decided on the receive path)."""
        self._queue.append(msg)
        self._event.set()

    async def publish(self, msg: PhoneMessage) -> None:
        """Publish now; a final or error that cannot go out waits in the outbox."""
        if self._link.up:
            try:
                if msg.qos > 0:
                    await self._link.publish(msg.topic, msg.payload, qos=msg.qos,
                                             properties=msg.properties)
                else:
                    self._link.publish_now(msg.topic, msg.payload, properties=msg.properties)
                return
            except aiomqtt.MqttError:
                pass
        if msg.qos > 0:
            self.put(msg)

    async def flush(self) -> None:
        """Send what waits, in order, while the connection holds."""
        while self._queue:
            if not self._link.up:
                return
            item = self._queue.popleft()
            lost = self._link.lost_event()  # this connection's (a reconnect makes a new one)
            try:
                await self._link.publish(item.topic, item.payload, qos=item.qos,
                                         properties=item.properties)
            except aiomqtt.MqttError:
                if not lost.is_set():  # refused or timed out on a live connection: retry
                    self._queue.appendleft(item)
                    return
                if item.losses + 1 >= OUTBOX_MAX_LOSSES:
                    log.error("reply to %r dropped: %d connections lost while sending it",
                              item.topic[:200], item.losses + 1)
                else:
                    self._queue.appendleft(replace(item, losses=item.losses + 1))
                return

    async def run(self) -> None:
        """The outbox loop: flush whenever something waits and the broker is there."""
        while True:
            await self._event.wait()
            await self._link.connected.wait()
            await self.flush()
            if not self._queue:
                self._event.clear()
            else:
                await asyncio.sleep(0.1)
