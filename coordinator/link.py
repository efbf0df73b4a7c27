"""The coordinator's current broker connection, as its parts (outbox, in-flight markers, planner,
request runner) see it.

The session loop (:func:`moe2.shared.mqtt.run_session`) attaches each new connection and detaches
it when it ends; everyone else publishes through the link and never holds a client of its own.
A publish that needs the broker's acknowledgement fails with :class:`aiomqtt.MqttError` as soon
as its connection drops -- aiomqtt would otherwise wait its 10 s timeout for a PUBACK that cannot
come.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import aiomqtt
from paho.mqtt.properties import Properties

from moe2.shared.mqtt import MqttClient

T = TypeVar("T")


class BrokerLink:
    def __init__(self) -> None:
        self.client: MqttClient | None = None
        self.connected = asyncio.Event()
        self._lost = asyncio.Event()  # set when the current connection ends

    # ------------------------------------------------------------------ the session's side
    def attach(self, client: MqttClient) -> None:
        """A new connection attempt (``connected`` is set once it is subscribed)."""
        self._lost = asyncio.Event()
        self.client = client

    def detach(self) -> None:
        self._lost.set()
        self.client = None
        self.connected.clear()

    # ------------------------------------------------------------------ everyone else's side
    @property
    def up(self) -> bool:
        return self.client is not None and self.connected.is_set()

    def lost_event(self) -> asyncio.Event:
        """The event of the current connection: set when it ends (a reconnect makes a new
        one), so a caller can tell "lost while I was sending" from "refused"."""
        return self._lost

    def _client(self) -> MqttClient:
        client = self.client
        if client is None or not self.connected.is_set():
            raise aiomqtt.MqttError("not connected to the broker")
        return client

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                      properties: Properties | None = None,
                      timeout_s: float | None = None) -> None:
        client = self._client()
        await self.until_lost(client.publish(topic, payload, qos=qos, retain=retain,
                                             properties=properties, timeout=timeout_s))

    def publish_now(self, topic: str, payload: bytes, *,
                    properties: Properties | None = None) -> None:
        """QoS 0 on the token path, written at once (see :meth:`Client.publish_now`)."""
        self._client().publish_now(topic, payload, properties=properties)

    async def subscribe(self, topic: str, qos: int = 1) -> None:
        await self.until_lost(self._client().subscribe(topic, qos=qos))

    async def unsubscribe(self, topic: str) -> None:
        await self.until_lost(self._client().unsubscribe(topic))

    async def until_lost(self, op: Coroutine[Any, Any, T]) -> T:
        """Await ``op`` unless the connection drops first (then :class:`aiomqtt.MqttError`)."""
        lost = self._lost
        pub = asyncio.ensure_future(op)
        watch = asyncio.ensure_future(lost.wait())
        try:
            await asyncio.wait({pub, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not pub.done():
                pub.cancel()
        if not pub.done() or pub.cancelled():
            raise aiomqtt.MqttError("the connection was lost before the broker acknowledged")
        return pub.result()
