"""The gateway's side of the broker: one reconnecting MQTT connection, many requests.

:class:`MqttUpstream` is the reference phone client (:class:`~moe2.tools.clients.phone.PhoneClient`)
in its ``on_behalf`` form: each request is published as the client id of its API key
(``requests/{key name}``), replies come to ``responses/{key name}/{gateway id}`` and one
subscription reads them all, matched by correlation data. It also watches the coordinators'
Last Wills (a request that got no reply when its coordinator died fails ``coordinator_lost``),
checks each request's PUBACK (``no_coordinator`` when nobody is subscribed) and keeps the
retained plan (the models the gateway lists).

An :class:`Exchange` is one request in flight: its replies as they arrive, and, when the caller
gives it up before the final or error, a ``cancel`` to the coordinator serving it.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from typing import Protocol

from moe2.shared import wire
from moe2.tools.clients.phone import AskError, PhoneClient


class Exchange:
    """One request published upstream (the broker acknowledged it) and its replies."""

    def __init__(self, phone: PhoneClient, correlation: bytes, client_id: str,
                 queue: asyncio.Queue[wire.PhoneReply | AskError]) -> None:
        self._phone = phone
        self._corr = correlation
        self._client_id = client_id
        self._q = queue
        self.ended = False  # a final or error arrived
        self._closed = False
        self._failure: AskError | None = None  # met by ready(), raised by next()

    def _take(self, msg: wire.PhoneReply | AskError) -> wire.PhoneReply:
        if isinstance(msg, AskError):
            raise msg
        if isinstance(msg, (wire.FinalReply, wire.ErrorReplyPhone)):
            self.ended = True
        return msg

    async def next(self, timeout_s: float) -> wire.PhoneReply:
        """The next reply; :class:`AskError` when the phone client gave the request up,
        ``asyncio.TimeoutError`` when nothing came for ``timeout_s``."""
        if self._failure is not None:
            raise self._failure
        try:
            msg = self._q.get_nowait()
        except asyncio.QueueEmpty:
            if sys.version_info >= (3, 11):  # no task per wait (this is once per token)
                async with asyncio.timeout(timeout_s):
                    msg = await self._q.get()
            else:  # pragma: no cover - JetPack 6's Python 3.10
                msg = await asyncio.wait_for(self._q.get(), timeout_s)
        return self._take(msg)

    def ready(self) -> list[wire.PhoneReply]:
        """The replies that already arrived (up to a final or error), without waiting; a
        failure among them is left for :meth:`next` to raise."""
        out: list[wire.PhoneReply] = []
        while not self.ended and self._failure is None:
            try:
                msg = self._q.get_nowait()
            except asyncio.QueueEmpty:
                break
            if isinstance(msg, AskError):
                self._failure = msg
                break
            out.append(self._take(msg))
        return out

    def close(self) -> None:
        """Done with it: forgotten after its final or error, cancelled upstream before."""
        if self._closed:
            return
        self._closed = True
        if self.ended:
            self._phone.done_with(self._corr)
        else:
            self._phone.cancel(self._corr, self._client_id)


class Replies(Protocol):
    """One request in flight, as the HTTP side reads it (:class:`Exchange`, or a test fake)."""

    ended: bool

    async def next(self, timeout_s: float) -> wire.PhoneReply: ...

    def ready(self) -> list[wire.PhoneReply]: ...

    def close(self) -> None: ...


class Upstream(Protocol):
    """What the HTTP side needs of the fleet (tests pass a fake)."""

    @property
    def plan(self) -> wire.PlanMsg | None: ...

    @property
    def connected(self) -> bool: ...

    async def send(self, request: wire.PhoneRequest, client_id: str) -> Replies: ...


class MqttUpstream:
    """:class:`Upstream` over a :class:`PhoneClient` (``on_behalf=True``, entered by the
    caller); requests travel as MessagePack."""

    def __init__(self, phone: PhoneClient) -> None:
        if not phone.on_behalf:
            raise ValueError("the gateway's phone client must ask on_behalf of its keys")
        self.phone = phone
        self._ct = wire.CONTENT_TYPE_MSGPACK if phone.msgpack else wire.CONTENT_TYPE_JSON

    @property
    def plan(self) -> wire.PlanMsg | None:
        return self.phone.plan

    @property
    def connected(self) -> bool:
        return self.phone.is_connected

    async def send(self, request: wire.PhoneRequest, client_id: str) -> Exchange:
        corr = uuid.uuid4().bytes
        q = await self.phone.send_raw(wire.encode_phone(request, self._ct), correlation=corr,
                                      content_type=self._ct, client_id=client_id)
        return Exchange(self.phone, corr, client_id, q)
