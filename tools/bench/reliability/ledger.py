"""Exactly-once accounting: what every phone received and what every agent was asked.

Used by the bridged phase of the reliability bench and by the tests of exactly-once serving
(in memory and on real bridged brokers); works with any client that has the MQTT client
interface of the daemons (:class:`moe2.shared.mqtt.MqttClient`: aiomqtt or the in-memory one).

- :class:`ReplyLedger` / :class:`LedgerPhone`: a phone that sends each request with fresh
  correlation data and keeps reading after the final, so that a second final, an error after a
  final or a token chunk index seen twice is counted, not ignored.
- :class:`AgentLedger`: reads the agents' RPC topics on their own broker -- exactly what the
  agents are asked. A coordinator names each session ``{its prefix}-{request key[:16]}-...``
  (:mod:`moe2.coordinator.service`), so the ledger knows per request which coordinators opened
  sessions and sent steps.
- :class:`CoordinatorWatch`: reads the coordinators' heartbeats; :meth:`CoordinatorWatch.idle`
  waits until each one reports (after a given time) nothing held and nothing being served --
  from then on no reply can come from it for the requests so far, and a fence message on each
  broker proves that whatever was on its way has arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

from moe2.coordinator.once import request_key
from moe2.shared import wire
from moe2.shared.mqtt import MqttClient, get_prop, payload_bytes, response_properties
from moe2.shared.topics import Topics
from moe2.tools.bench.reliability.outcomes import _r, percentile

#: the last level of a fence message's topic (below a phone's response prefix)
FENCE = "fence"


@dataclass
class RequestRecord:
    """Everything one request got back."""

    client_id: str
    key: str
    sent_s: float
    first_chunk_s: float | None = None
    chunks: Counter[int] = field(default_factory=Counter)
    finals: list[str] = field(default_factory=list)  # the coordinator of each final
    errors: list[str] = field(default_factory=list)  # the code of each error
    #: experts of the finals: (id, dropped, reason)
    experts: list[tuple[str, bool, str]] = field(default_factory=list)

    @property
    def terminals(self) -> int:
        return len(self.finals) + len(self.errors)

    @property
    def duplicate_chunks(self) -> bool:
        return any(n > 1 for n in self.chunks.values())

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_chunk_s is None else self.first_chunk_s - self.sent_s


class ReplyLedger:
    """Replies by correlation data, for every phone that records into it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.records: dict[bytes, RequestRecord] = {}
        self.stray = 0  # replies to no request of ours
        self.fences: set[str] = set()
        self._changed = asyncio.Event()

    def sent(self, correlation: bytes, record: RequestRecord) -> None:
        self.records[correlation] = record

    def on_reply(self, m: aiomqtt.Message) -> None:
        topic = str(m.topic)
        if topic.endswith("/" + FENCE):
            self.fences.add(payload_bytes(m).decode(errors="replace"))
            self._changed.set()
            return
        corr = get_prop(m, "CorrelationData")
        rec = self.records.get(bytes(corr)) if isinstance(corr, (bytes, bytearray)) else None
        try:
            msg = wire.decode_phone_reply(payload_bytes(m), get_prop(m, "ContentType"))
        except wire.DecodeError:
            msg = None
        if rec is None or msg is None:
            self.stray += 1
            return
        if isinstance(msg, wire.TokenChunk):
            rec.chunks[msg.index] += 1
            if rec.first_chunk_s is None:
                rec.first_chunk_s = self.clock()
        elif isinstance(msg, wire.FinalReply):
            rec.finals.append(msg.coordinator_id)
            rec.experts += [(e.id, e.dropped, e.reason or "") for e in msg.experts]
            if rec.first_chunk_s is None:  # an answer without chunks: its first token is now
                rec.first_chunk_s = self.clock()
        else:
            rec.errors.append(wire.ErrorCode(msg.code).value)
        self._changed.set()

    async def until(self, done: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Until ``done()`` holds (checked whenever a reply arrives); TimeoutError after
        ``timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not done():
            left = deadline - loop.time()
            if left <= 0:
                raise asyncio.TimeoutError(what)
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    async def answered(self, timeout_s: float,
                       correlations: Iterable[bytes] | None = None) -> bool:
        """Until every request (or those named) has a final or error; False when some have
        none after ``timeout_s`` (they count as lost)."""
        want = list(self.records if correlations is None else correlations)
        try:
            await self.until(lambda: all(self.records[c].terminals for c in want), timeout_s,
                              "unanswered requests")
        except asyncio.TimeoutError:
            return False
        return True

    async def fenced(self, token: str, timeout_s: float) -> None:
        await self.until(lambda: token in self.fences, timeout_s, f"fence {token}")

    def summary(self, records: Iterable[RequestRecord] | None = None) -> dict[str, Any]:
        recs = list(self.records.values() if records is None else records)
        ttft = [r.ttft_s for r in recs if r.ttft_s is not None and r.finals]
        return {
            "requests": len(recs),
            "finals": sum(len(r.finals) for r in recs),
            "answered_once": sum(r.terminals == 1 for r in recs),
            "duplicates": sum(r.terminals > 1 for r in recs),
            "duplicate_chunks": sum(r.duplicate_chunks for r in recs),
            "lost": sum(r.terminals == 0 for r in recs),
            "errors_by_code": dict(sorted(Counter(c for r in recs for c in r.errors).items())),
            "finals_by": dict(sorted(Counter(c for r in recs for c in r.finals).items())),
            "ttft_p50_s": _r(percentile(ttft, 50), 4),
            "ttft_p90_s": _r(percentile(ttft, 90), 4),
        }


    def troubles(self, correlations: Iterable[bytes] | None = None) -> list[dict[str, Any]]:
        """The requests (of those named) that were lost, answered more than once, or got a
        chunk twice -- what an assertion message should show: phone, key (the coordinators'
        logs name a request by its first 12 characters), what came back."""
        out = []
        for c in (self.records if correlations is None else correlations):
            r = self.records[c]
            if r.terminals != 1 or r.duplicate_chunks:
                out.append({"client": r.client_id, "key": r.key[:16], "finals": r.finals,
                            "errors": r.errors, "chunks_twice": sorted(
                                i for i, n in r.chunks.items() if n > 1),
                            "sent_s": round(r.sent_s, 3)})
        return out


class LedgerPhone:
    """``async with LedgerPhone(client, "p1", topics, ledger) as p: await p.ask(req)`` --
    sends requests (fresh correlation data each; ``expiry_s`` sets a Message Expiry) and feeds
    every reply into ``ledger``. The client is entered and left here."""

    def __init__(self, client: MqttClient, client_id: str, topics: Topics, ledger: ReplyLedger,
                 *, expiry_s: int | None = None) -> None:
        self.client = client
        self.client_id = client_id
        self.topics = topics
        self.ledger = ledger
        self.expiry_s = expiry_s
        self.response_topic = topics.response_prefix(client_id) + "r"
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LedgerPhone:
        await self.client.__aenter__()
        await self.client.subscribe(self.topics.response_prefix(self.client_id) + "#", qos=1)
        self._reader = asyncio.create_task(self._read(), name=f"ledger-{self.client_id}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._reader
        with contextlib.suppress(aiomqtt.MqttError):
            await self.client.__aexit__(None, None, None)

    async def _read(self) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            async for m in self.client.messages:
                self.ledger.on_reply(m)

    async def ask(self, request: wire.PhoneRequest) -> bytes:
        """Publish one request (QoS 1); returns its correlation data."""
        corr = uuid.uuid4().bytes
        payload = wire.encode_phone(request, None)
        props = response_properties(self.response_topic, corr, wire.CONTENT_TYPE_JSON)
        if self.expiry_s is not None:
            props.MessageExpiryInterval = self.expiry_s
        key = request_key(self.client_id, self.response_topic, corr, wire.CONTENT_TYPE_JSON,
                          payload)
        self.ledger.sent(corr, RequestRecord(self.client_id, key, self.ledger.clock()))
        await self.client.publish(self.topics.request(self.client_id), payload, qos=1,
                                  properties=props)
        return corr


def fence_topic(topics: Topics, client_id: str) -> str:
    return topics.response_prefix(client_id) + FENCE


class AgentLedger:
    """What the agents on one broker were asked, by request key (16 hex characters) and by the
    coordinator (its session prefix) that asked."""

    def __init__(self, agents: Sequence[str]) -> None:
        self.agents = set(agents)
        self.opened: dict[str, Counter[str]] = {}
        self.steps: dict[str, Counter[str]] = {}
        self.opened_on: Counter[str] = Counter()  # sessions opened, by agent
        self.other = 0  # sessions that name no request (probes of other tools)

    @staticmethod
    def split(session_id: str) -> tuple[str, str] | None:
        """``{prefix}-{key16}-{n}-{i}`` -> (prefix, key16)."""
        parts = session_id.split("-")
        if len(parts) != 4 or len(parts[1]) != 16:
            return None
        return parts[0], parts[1]

    def on_rpc(self, m: aiomqtt.Message, topics: Topics) -> None:
        agent = topics.agent_id_of(str(m.topic))
        if agent not in self.agents:
            return
        try:
            msg = wire.decode_agent_inbound(payload_bytes(m))
        except wire.DecodeError:
            return
        if isinstance(msg, wire.OpenSession):
            self.opened_on[agent] += 1
            self._count(self.opened, msg.session_id)
        elif isinstance(msg, wire.Step):
            for item in msg.items:
                self._count(self.steps, item.session_id)

    def _count(self, table: dict[str, Counter[str]], session_id: str) -> None:
        parts = self.split(session_id)
        if parts is None:
            self.other += 1
            return
        prefix, key16 = parts
        table.setdefault(key16, Counter())[prefix] += 1

    def openers(self, key: str) -> set[str]:
        return set(self.opened.get(key[:16], ()))

    def steppers(self, key: str) -> set[str]:
        return set(self.steps.get(key[:16], ()))


async def sniff(client: MqttClient, topics: Topics, ledgers: Sequence[AgentLedger],
                ready: asyncio.Event) -> None:
    """Feed every agent RPC ``client`` sees into ``ledgers`` (run as a task; the client is
    entered here)."""
    async with client:
        await client.subscribe(topics.agent_rpc("+"), qos=1)
        ready.set()
        with contextlib.suppress(aiomqtt.MqttError):
            async for m in client.messages:
                for led in ledgers:
                    led.on_rpc(m, topics)


class CoordinatorWatch:
    """The coordinators' heartbeats, as they arrive on one broker."""

    def __init__(self, topics: Topics, wall: Callable[[], float] = time.time) -> None:
        self.topics = topics
        self.wall = wall
        self.last: dict[str, wire.CoordinatorHeartbeat] = {}
        self._changed = asyncio.Event()

    def on_message(self, m: aiomqtt.Message) -> None:
        cid = self.topics.coordinator_of(str(m.topic))
        if cid is None:
            return
        try:
            hb = self.topics.coordinator_heartbeat(cid).decode(payload_bytes(m))
        except wire.DecodeError:
            return
        self.last[cid] = hb
        self._changed.set()

    async def run(self, client: MqttClient, ready: asyncio.Event) -> None:
        async with client:
            await client.subscribe(self.topics.all_coordinator_heartbeats, qos=0)
            ready.set()
            with contextlib.suppress(aiomqtt.MqttError):
                async for m in client.messages:
                    self.on_message(m)

    async def idle(self, coordinators: Iterable[str], after_wall_s: float,
                   timeout_s: float) -> None:
        """Until each coordinator's heartbeat sent after ``after_wall_s`` says it holds and
        serves nothing."""
        want = set(coordinators)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s

        def done() -> bool:
            return all((hb := self.last.get(c)) is not None and hb.ts > after_wall_s
                       and hb.held == 0 and hb.serving == 0 for c in want)

        while not done():
            left = deadline - loop.time()
            if left <= 0:
                busy = {c: (hb.held, hb.serving) if (hb := self.last.get(c)) else None
                        for c in want}
                raise asyncio.TimeoutError(f"coordinators not idle: {busy}")
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)


def stepped_by_two(ledger: ReplyLedger, agents: Sequence[AgentLedger]) -> dict[str, list[str]]:
    """Request key (16 characters) -> the coordinators that sent it steps, for each request
    two or more coordinators stepped."""
    out: dict[str, list[str]] = {}
    for rec in ledger.records.values():
        s: set[str] = set()
        for led in agents:
            s |= led.steppers(rec.key)
        if len(s) > 1:
            out[rec.key[:16]] = sorted(s)
    return out


def stepped_once(ledger: ReplyLedger, agents: Sequence[AgentLedger]) -> dict[str, Any]:
    """Per request, how many coordinators opened sessions and sent steps on the agents."""
    openers: Counter[int] = Counter()
    steppers: Counter[int] = Counter()
    for rec in ledger.records.values():
        o: set[str] = set()
        s: set[str] = set()
        for led in agents:
            o |= led.openers(rec.key)
            s |= led.steppers(rec.key)
        openers[len(o)] += 1
        steppers[len(s)] += 1
    return {"requests_by_coordinators_that_opened": dict(sorted(openers.items())),
            "requests_by_coordinators_that_stepped": dict(sorted(steppers.items())),
            "requests_stepped_by_two_or_more": sum(n for k, n in steppers.items() if k > 1)}
