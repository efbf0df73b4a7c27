"""A phone-side client of the public request/response API (used by ``moe2 ask``, eval, bench
and tests; also the reference for phone developers).

Publish the request on ``{root}/requests/{client_id}`` with an MQTT 5 Response Topic under
``{root}/responses/{client_id}/`` and Correlation Data; read token chunks, then one final or
error message with the same correlation data.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import msgspec

from moe2.shared import wire
from moe2.shared.mqtt import get_prop, payload_bytes, response_properties
from moe2.shared.topics import Topics


class AskError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass
class Answer:
    text: str = ""
    chunks: list[wire.TokenChunk] = field(default_factory=list)
    final: wire.FinalReply | None = None
    error: wire.ErrorReplyPhone | None = None
    messages: int = 0  # every reply message received for this request

    def as_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"error": {"code": self.error.code.value, "message": self.error.message}}
        assert self.final is not None
        d: dict[str, Any] = msgspec.to_builtins(self.final)
        d["streamed_text"] = "".join(c.text for c in self.chunks)
        return d


class PhoneClient:
    """One MQTT connection, many concurrent requests (matched by correlation data)."""

    def __init__(self, client: aiomqtt.Client, client_id: str, topics: Topics | None = None,
                 msgpack: bool = False) -> None:
        self.client = client
        self.client_id = client_id
        self.topics = topics or Topics()
        self.msgpack = msgpack
        self.response_topic = f"{self.topics.response_prefix(client_id)}r"
        self._queues: dict[bytes, asyncio.Queue[wire.PhoneReply]] = {}
        self._reader: asyncio.Task[None] | None = None
        self.unmatched = 0

    async def __aenter__(self) -> PhoneClient:
        await self.client.subscribe(self.response_topic, qos=1)
        self._reader = asyncio.create_task(self._read(), name=f"phone-{self.client_id}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def _read(self) -> None:
        async for m in self.client.messages:
            corr = get_prop(m, "CorrelationData")
            q = self._queues.get(bytes(corr)) if corr is not None else None
            if q is None:
                self.unmatched += 1
                continue
            try:
                q.put_nowait(wire.decode_phone_reply(payload_bytes(m), get_prop(m, "ContentType")))
            except wire.DecodeError:
                self.unmatched += 1

    async def send_raw(self, payload: bytes, *, correlation: bytes, content_type: str | None,
                       response_topic: str | None = None) -> asyncio.Queue[wire.PhoneReply]:
        q: asyncio.Queue[wire.PhoneReply] = asyncio.Queue()
        self._queues[correlation] = q
        props = response_properties(response_topic or self.response_topic, correlation,
                                    content_type)
        await self.client.publish(self.topics.request(self.client_id), payload, qos=1,
                                  properties=props)
        return q

    async def stream(self, request: wire.PhoneRequest, timeout_s: float = 120.0
                     ) -> AsyncIterator[wire.PhoneReply]:
        corr = uuid.uuid4().bytes
        ct = wire.CONTENT_TYPE_MSGPACK if self.msgpack else wire.CONTENT_TYPE_JSON
        q = await self.send_raw(wire.encode_phone(request, ct), correlation=corr, content_type=ct)
        try:
            while True:
                msg = await asyncio.wait_for(q.get(), timeout_s)
                yield msg
                if isinstance(msg, (wire.FinalReply, wire.ErrorReplyPhone)):
                    return
        finally:
            self._queues.pop(corr, None)

    async def ask(self, request: wire.PhoneRequest, timeout_s: float = 120.0,
                  on_chunk: Callable[[str], None] | None = None) -> Answer:
        ans = Answer()
        async for msg in self.stream(request, timeout_s):
            ans.messages += 1
            if isinstance(msg, wire.TokenChunk):
                ans.chunks.append(msg)
                if on_chunk is not None:
                    on_chunk(msg.text)
            elif isinstance(msg, wire.FinalReply):
                ans.final = msg
                ans.text = msg.text
            else:
                ans.error = msg
        return ans
