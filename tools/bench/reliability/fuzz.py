"""Random, mutated and forged messages on every topic a coordinator or agent subscribes to."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import aiomqtt
import msgspec

from moe2.shared import wire
from moe2.shared.mqtt import (
    get_prop,
    make_client,
    parse_broker_url,
    payload_bytes,
    response_properties,
)
from moe2.shared.topics import Topics, publishable_topic
from moe2.tools.bench.reliability.fleet import ReliabilityFleet
from moe2.tools.bench.reliability.load import LoadSpec, drive_load
from moe2.tools.bench.reliability.outcomes import _r, tally

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- fuzzing


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One random structural mutation of ``data`` (flip, insert, delete, truncate, splice)."""
    b = bytearray(data)
    op = rng.randrange(6)
    if not b:
        return bytes(rng.randbytes(rng.randint(1, 8)))
    i = rng.randrange(len(b))
    if op == 0:
        b[i] ^= 1 << rng.randrange(8)
    elif op == 1:
        b[i:i] = rng.randbytes(rng.randint(1, 8))
    elif op == 2:
        del b[i:i + rng.randint(1, 8)]
    elif op == 3:
        del b[i:]
    elif op == 4:
        b[i] = rng.choice((0x00, 0x7F, 0x80, 0xC0, 0xC1, 0xDC, 0xDD, 0xDF, 0xFF))
    else:
        j = rng.randrange(len(b))
        b[i:i] = b[j:j + rng.randint(1, 16)]
    return bytes(b)


@dataclass(frozen=True)
class FuzzMessage:
    family: str
    topic: str
    payload: bytes
    response_topic: str | None = None
    correlation: bytes | None = None
    content_type: str | None = None
    #: replies expected with this correlation data: exact count (terminal messages for phones)
    expect: int = 0
    #: the correlation data replies carry, when it is not the message's own (markers)
    reply_key: bytes | None = None

    @property
    def key(self) -> bytes | None:
        return self.reply_key if self.reply_key is not None else self.correlation


@dataclass
class FuzzTargets:
    topics: Topics
    agents: Sequence[str]
    coordinators: Sequence[str]
    inbox: str  # where agents answer the fuzzer (a coordinator inbox nobody else uses)
    phone: str  # the fuzzer's phone client id
    victim: str  # another phone that must never get anything


def _agent_samples(n_vocab: int = 64) -> list[bytes]:
    return [wire.encode(m) for m in (
        wire.OpenSession(session_id="fz-open", k=8, prompt="hello"),
        wire.OpenSession(session_id="fz-msgs", k=0,
                         messages=[wire.ChatMessage("user", "hi")]),
        wire.OpenSession(session_id="fz-tok", k=4, tokens=[1, 5, 9], raw=True),
        wire.Step(items=[wire.StepItem("fz-open", 5, 1, 8), wire.StepItem("nope", 3, 4, 2)]),
        wire.Step(items=[wire.StepItem("fz-none", n_vocab + 5, 1, 4000)]),
        wire.CloseSession(session_ids=["fz-open", "fz-msgs", "fz-tok"]),
    )]


def _reply_samples(agents: Sequence[str]) -> list[bytes]:
    probs = wire.Distribution.pack_probs([0.5, 0.25, 0.25])
    ids = wire.Distribution.pack_ids([1, 2, 3])
    out = []
    for a in [*agents, "ghost-agent"]:
        out.append(wire.encode(wire.Reply(agent_id=a, dists=[wire.Distribution(
            session_id=f"no-such-session-{a}", seq=1, probs=probs, ids=ids, rest_mass=0.0,
            n_past=3, n_evaluated=1)])))
        out.append(wire.encode(wire.Reply(agent_id=a, errors=[wire.ErrorItem(
            code=wire.ErrorCode.UNKNOWN_SESSION, message="forged", session_id="x", seq=2)])))
    return out


def _presence_samples(agent: str) -> list[tuple[str, bytes]]:
    st = wire.AgentStatus(agent_id=agent, state="online", model="m", n_ctx=512, n_vocab=64,
                          vocab_fp="fp", eos_id=2)
    tm = wire.Telemetry(agent_id=agent, ts=1.0, power_w=1.0, energy_j=1.0, tokens_total=1,
                        tokens_per_s=1.0, joules_per_token=0.1, step_latency_s=0.001,
                        open_sessions=0, meter="estimated")
    vb = wire.Vocab(agent_id=agent, vocab_fp="fp", pieces=[b"a", b"b", b""])
    return [("status", wire.encode(st)), ("telemetry", wire.encode(tm)), ("vocab", wire.encode(vb))]


def fuzz_messages(t: FuzzTargets, n_per_family: int, rng: random.Random, batch: str = "fz"
                  ) -> list[FuzzMessage]:
    """``n_per_family`` messages for each topic family a coordinator or agent subscribes to.

    Payloads: random bytes, mutations of valid encodings, and valid but hostile messages
    (forged distributions for sessions that do not exist, replies from agents outside the plan,
    steps for unknown sessions, out-of-range tokens and k, forged in-flight markers, offline
    statuses of coordinators and agents that never existed, vocabularies of unknown families,
    claims of requests that do not exist and broken heartbeats).
    Mutations that still decode, and empty payloads, are kept off the real agents' status and
    vocab topics, and no ``online`` status is sent at all: a valid status (or an empty one, which
    clears an agent's retained status) is a registration or a deregistration, which the broker's
    ACL (agents may only write their own topics) -- not the coordinator -- refuses.
    """
    tp = t.topics
    out: list[FuzzMessage] = []
    n = 0

    def corr() -> bytes:
        nonlocal n
        n += 1
        return f"{batch}{n:08d}".encode()

    # -- agent RPC: every message with a response topic gets exactly one reply, except a close
    samples = _agent_samples()
    for i in range(n_per_family):
        agent = t.agents[i % len(t.agents)]
        r = rng.random()
        payload = (rng.randbytes(rng.randint(0, 200)) if r < 0.3
                   else mutate(rng.choice(samples), rng) if r < 0.8 else rng.choice(samples))
        r_rt = rng.random()
        # no response topic (no reply), the inbox, or one with wildcards that mosquitto
        # forwards but no reply can be published to (dropped unanswered)
        rt = None if r_rt < 0.1 else rng.choice((f"{t.inbox}/+", "#", "+/x")) \
            if r_rt < 0.15 else t.inbox
        try:
            msg: Any = wire.decode_agent_inbound(payload)
        except wire.DecodeError:
            msg = None
        is_close = isinstance(msg, wire.CloseSession)
        c = corr()
        out.append(FuzzMessage("agent_rpc", tp.agent_rpc(agent), payload, rt, c,
                               expect=1 if rt == t.inbox and not is_close else 0))
    # -- coordinator inbox: forged replies (no answer expected; the coordinator must not care)
    replies = _reply_samples(t.agents)
    for i in range(n_per_family):
        coord = t.coordinators[i % len(t.coordinators)]
        r = rng.random()
        payload = (rng.randbytes(rng.randint(0, 200)) if r < 0.3
                   else mutate(rng.choice(replies), rng) if r < 0.7 else rng.choice(replies))
        out.append(FuzzMessage("coordinator_inbox", tp.coordinator_inbox(coord).topic, payload))
    # -- agent presence: status, telemetry, vocab
    for i in range(n_per_family):
        real = rng.random() < 0.5
        agent = t.agents[i % len(t.agents)] if real else f"ghost-{rng.randrange(10**6)}"
        kind, valid = rng.choice(_presence_samples(agent))
        topic = f"{tp.root}/agents/{agent}/{kind}"
        payload = (rng.randbytes(rng.randint(0, 200)) if rng.random() < 0.3
                   else mutate(valid, rng))
        try:
            decoded: Any = wire.decode_any(payload)
        except wire.DecodeError:
            decoded = None
        if (real and kind in ("status", "vocab") and (decoded is not None or not payload)) or (
                isinstance(decoded, wire.AgentStatus) and decoded.state == "online"):
            payload = b"\xc1" + payload  # no (de)registrations (see the docstring)
        elif not real and kind == "status" and rng.random() < 0.5:
            payload = wire.encode(wire.AgentStatus(agent_id=agent, state="offline"))
        elif not real and kind == "vocab" and rng.random() < 0.5:
            payload = wire.encode(wire.Vocab(agent_id=agent, vocab_fp=f"fp-{rng.randrange(10**9)}",
                                             pieces=[rng.randbytes(4) for _ in range(64)]))
        out.append(FuzzMessage("agent_presence", topic, payload))
    # -- phone requests: one terminal reply when the response topic is the phone's own
    good = [
        wire.encode_phone(wire.PhoneRequest(prompt="hi", max_tokens=1, raw=True), None),
        wire.encode_phone(wire.PhoneRequest(prompt="hi", max_tokens=1, raw=True),
                          wire.CONTENT_TYPE_MSGPACK),
        b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}',
    ]
    for _ in range(n_per_family):
        r = rng.random()
        ct = rng.choice((None, wire.CONTENT_TYPE_JSON, wire.CONTENT_TYPE_MSGPACK, "text/x-odd"))
        payload = (rng.randbytes(rng.randint(0, 200)) if r < 0.3
                   else mutate(rng.choice(good), rng))
        try:
            req: wire.PhoneRequest | None = wire.decode_phone_request(payload, ct)
        except wire.DecodeError:
            req = None
        if req is not None and req.max_tokens > 4:
            payload = b"\xc1" + payload  # mutated into a long valid request: keep it cheap
        where = rng.random()
        c = corr()
        if where < 0.85:
            out.append(FuzzMessage("phone_requests", tp.request(t.phone), payload,
                                   tp.response_prefix(t.phone) + "fz", c, ct, expect=1))
        elif where < 0.95:
            out.append(FuzzMessage("phone_requests", tp.request(t.phone), payload,
                                   tp.response_prefix(t.victim) + "stolen", c, ct))
        else:
            out.append(FuzzMessage("phone_requests", tp.request(t.phone), payload, None, c, ct))
    # -- phone cancels: every coordinator reads them; none names a request in flight (a real
    # one would end that request with its one `cancelled` error), so none is answered
    cancels = [wire.encode_phone(wire.PhoneCancel(), None),
               wire.encode_phone(wire.PhoneCancel(), wire.CONTENT_TYPE_MSGPACK)]
    for _ in range(n_per_family):
        r = rng.random()
        ct = rng.choice((None, wire.CONTENT_TYPE_JSON, wire.CONTENT_TYPE_MSGPACK))
        payload = (rng.randbytes(rng.randint(0, 60)) if r < 0.3
                   else mutate(rng.choice(cancels), rng) if r < 0.7 else rng.choice(cancels))
        out.append(FuzzMessage("phone_cancels", tp.cancel(t.phone), payload, None,
                               corr() if rng.random() < 0.9 else None, ct))
    # -- coordinator control: peer statuses and in-flight markers
    st_valid = wire.encode(wire.CoordinatorStatus(coordinator_id="phantom", state="offline"))
    for i in range(n_per_family):
        coord = t.coordinators[i % len(t.coordinators)]
        r = rng.random()
        if r < 0.35:
            phantom = f"phantom-{rng.randrange(10**6)}"
            payload = (wire.encode(wire.CoordinatorStatus(coordinator_id=phantom,
                                                          state="offline"))
                       if rng.random() < 0.5 else mutate(st_valid, rng))
            out.append(FuzzMessage("coordinator_control",
                                   tp.coordinator_status(phantom).topic, payload))
            continue
        c = corr()
        marker = wire.InflightMarker(coordinator_id=coord, incarnation="fuzz", client_id=t.phone,
                                response_topic=tp.response_prefix(t.phone) + "fz",
                                correlation=c, content_type=None)
        valid = msgspec.msgpack.encode(marker)
        payload = valid if r < 0.6 else (mutate(valid, rng) if r < 0.9
                                         else rng.randbytes(rng.randint(0, 120)))
        expect = 0
        try:
            m = msgspec.msgpack.decode(payload, type=wire.InflightMarker)
            if (m.coordinator_id == coord and m.correlation == c and m.v == wire.PROTOCOL_VERSION
                    and m.incarnation and tp.response_allowed(m.client_id, m.response_topic)
                    and publishable_topic(m.response_topic)
                    and m.response_topic.startswith(tp.response_prefix(t.phone))):
                expect = 1
            elif m.correlation != c:
                payload = b"\xc1" + payload  # a mutation changed where the answer goes
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError):
            pass
        marker_topic = tp.coordinator_inflight(coord, f"{batch}{i}").topic
        out.append(FuzzMessage("coordinator_control", marker_topic, payload, expect=expect,
                               reply_key=c))
    # -- exactly once across brokers: claims of keys no request has, broken heartbeats (a
    # valid heartbeat announces a node -- a registration the ACL, not the coordinator, refuses)
    hb_valid = wire.encode(wire.CoordinatorHeartbeat(coordinator_id="phantom", node="far:1883",
                                                     incarnation="fz"))
    for i in range(n_per_family):
        coord = t.coordinators[i % len(t.coordinators)] if rng.random() < 0.5 \
            else f"phantom-{rng.randrange(10**6)}"
        claim = wire.encode(wire.RequestClaim(key=rng.randbytes(16).hex(), coordinator_id=coord,
                                              node="far:1883", incarnation="fz",
                                              ts=rng.uniform(0, 2e9), rank=rng.randrange(4),
                                              done=rng.random() < 0.5))
        r = rng.random()
        if r < 0.5:
            payload = claim if r < 0.2 else (mutate(claim, rng) if r < 0.4
                                             else rng.randbytes(rng.randint(0, 120)))
            out.append(FuzzMessage("exactly_once", tp.coordinator_claims(coord).topic, payload))
            continue
        payload = mutate(hb_valid, rng) if r < 0.8 else rng.randbytes(rng.randint(0, 120))
        try:
            wire.decode_as(payload, wire.CoordinatorHeartbeat)
            payload = b"\xc1" + payload
        except wire.DecodeError:
            pass
        out.append(FuzzMessage("exactly_once", tp.coordinator_heartbeat(coord).topic, payload))
    return out


class ReplyCounter:
    """Counts every reply the fuzzer's topics receive, by correlation data."""

    def __init__(self) -> None:
        self.terminal: Counter[bytes] = Counter()
        self.agent_replies: Counter[bytes] = Counter()
        self.bad_agent_replies = 0
        self.victim_messages = 0
        self.other = 0
        self.opened: dict[str, set[str]] = {}  # agent -> sessions the fuzz opened
        self._changed = asyncio.Event()

    def on_message(self, m: aiomqtt.Message, inbox: str, victim_prefix: str) -> None:
        topic = str(m.topic)
        corr = get_prop(m, "CorrelationData")
        key = bytes(corr) if corr is not None else b""
        data = payload_bytes(m)
        if topic.startswith(victim_prefix):
            self.victim_messages += 1
        elif topic == inbox:
            try:
                r = wire.decode_as(data, wire.Reply)
            except wire.DecodeError:
                self.bad_agent_replies += 1
                return
            if not r.dists and not r.errors:
                self.bad_agent_replies += 1
            self.agent_replies[key] += 1
            self.opened.setdefault(r.agent_id, set()).update(d.session_id for d in r.dists)
        else:
            try:
                msg = wire.decode_phone_reply(data, get_prop(m, "ContentType"))
            except wire.DecodeError:
                self.other += 1
                return
            if isinstance(msg, (wire.FinalReply, wire.ErrorReplyPhone)):
                self.terminal[key] += 1
        self._changed.set()

    async def until(self, pred: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not pred():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))
        return True


@contextlib.asynccontextmanager
async def _listener(url: str, topics: Iterable[str], on_message: Callable[[aiomqtt.Message], None]
                    ) -> AsyncIterator[aiomqtt.Client]:
    client = make_client(parse_broker_url(url), identifier=f"fz-listen-{uuid.uuid4().hex[:6]}")
    async with client:
        for t in topics:
            await client.subscribe(t, qos=1)

        async def read() -> None:
            async for m in client.messages:
                on_message(m)

        task = asyncio.create_task(read(), name="fuzz-listener")
        try:
            yield client
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task


async def publish_all(client: aiomqtt.Client, msgs: Sequence[FuzzMessage],
                      window: int = 200) -> None:
    """QoS 1, ``window`` publishes outstanding at a time."""
    for i in range(0, len(msgs), window):
        await asyncio.gather(*[client.publish(
            m.topic, m.payload, qos=1, properties=response_properties(
                m.response_topic, m.correlation, m.content_type)
            if (m.response_topic or m.correlation or m.content_type) else None)
            for m in msgs[i:i + window]])


async def _barrier(client: aiomqtt.Client, counter: ReplyCounter, t: FuzzTargets,
                   timeout_s: float) -> bool:
    """A message to every agent and coordinator that each answers after all earlier ones."""
    tp = t.topics
    want: list[tuple[str, bytes]] = []
    for a in t.agents:
        c = f"barrier-{a}-{uuid.uuid4().hex[:6]}".encode()
        await client.publish(tp.agent_rpc(a), wire.encode(wire.Step(items=[
            wire.StepItem("barrier-no-session", 3, 1, 1)])), qos=1,
            properties=response_properties(t.inbox, c))
        want.append(("agent", c))
    for co in t.coordinators:
        c = f"barrier-{co}-{uuid.uuid4().hex[:6]}".encode()
        marker = wire.InflightMarker(coordinator_id=co, incarnation="barrier", client_id=t.phone,
                                response_topic=tp.response_prefix(t.phone) + "fz",
                                correlation=c)
        await client.publish(tp.coordinator_inflight(co, "barrier").topic,
                             msgspec.msgpack.encode(marker), qos=1)
        want.append(("coord", c))
    return await counter.until(lambda: all(
        (counter.agent_replies if k == "agent" else counter.terminal)[c] >= 1 for k, c in want),
        timeout_s)


def _answered(counter: ReplyCounter, batch: Sequence[FuzzMessage]) -> bool:
    """Every message of ``batch`` that expects a reply has one."""
    return all((counter.agent_replies if m.family == "agent_rpc" else counter.terminal)[m.key] >= 1
               for m in batch if m.expect and m.key is not None)


async def phase_fuzz(fleet: ReliabilityFleet, n_per_family: int, *, rounds: int = 2, seed: int = 0,
                     warmup_fraction: float = 0.1, pace: int = 2000,
                     timeout_s: float = 120.0) -> dict[str, Any]:
    """Hostile input on every subscribed topic: no crash, replies where a reply topic exists,
    and RSS of every agent and coordinator after a warm-up and after each of ``rounds`` rounds
    of ``n_per_family`` messages per topic family.

    Messages go out ``pace`` at a time, each batch followed by a barrier that every process
    answers only after handling everything before it: the backlog stays bounded, so RSS growth
    measures state that stays behind (a leak grows in every round), not how far a flood got
    ahead of the receive loop (an MQTT client library buffers everything it reads)."""
    await fleet.wait_ready()
    rng = random.Random(seed)
    tag = uuid.uuid4().hex[:6]
    t = FuzzTargets(fleet.topics, fleet.agents, fleet.coordinators,
                    inbox=fleet.topics.coordinator_inbox(f"fuzzer-{tag}").topic,
                    phone=f"fuzzphone-{tag}", victim=f"victim-{tag}")
    counter = ReplyCounter()
    victim_prefix = fleet.topics.response_prefix(t.victim)
    listen = [t.inbox, fleet.topics.response_prefix(t.phone) + "#", victim_prefix + "#"]
    watched = [*fleet.agents, *fleet.coordinators]
    warm = fuzz_messages(t, max(1, int(n_per_family * warmup_fraction)), rng, "warm")
    batches = [fuzz_messages(t, n_per_family, rng, f"r{i}-") for i in range(rounds)]
    every = [*warm, *(m for b in batches for m in b)]
    expected_agent = {m.key for m in every
                      if m.family == "agent_rpc" and m.expect and m.key is not None}
    expected_term = [m.key for m in every
                     if m.family != "agent_rpc" and m.expect and m.key is not None]
    complete = True
    rss: list[dict[str, float]] = []
    timings: list[dict[str, float | None]] = []
    async with _listener(fleet.url, listen,
                         lambda m: counter.on_message(m, t.inbox, victim_prefix)), \
            make_client(parse_broker_url(fleet.url), identifier=f"fuzzer-{tag}") as pub:
        pub.pending_calls_threshold = 1000  # publish_all keeps many in flight on purpose
        for batch in [warm, *batches]:
            t0 = time.monotonic()
            for i in range(0, len(batch), pace):
                await publish_all(pub, batch[i:i + pace])
                # every process has handled everything before it answers the barrier
                complete = await _barrier(pub, counter, t, timeout_s) and complete
            complete = await counter.until(partial(_answered, counter, batch),
                                           timeout_s) and complete
            timings.append({"messages": len(batch), "s": _r(time.monotonic() - t0, 2)})
            rss.append({n: fleet.rss_mib(n) for n in watched})
        # leave the agents as we found them: close what (mutated) opens opened
        for a, sessions in counter.opened.items():
            if a in fleet.agents and sessions:
                await pub.publish(fleet.topics.agent_rpc(a), wire.encode(wire.CloseSession(
                    session_ids=sorted(sessions))), qos=1)
    crashed = fleet.dead()
    fleet.check_alive()
    health = await drive_load(fleet, "after_fuzz", LoadSpec(clients=2, per_client=4,
                                                            concurrency=1, max_tokens=4))
    by_family = Counter(m.family for b in batches for m in b)
    growth = [{n: after[n] - before[n] for n in watched}
              for before, after in itertools.pairwise(rss)]
    missing_agent = sum(1 for c in expected_agent if counter.agent_replies[c] == 0)
    missing_term = sum(1 for c in expected_term if counter.terminal[c] == 0)
    extra_agent = sum(n for c, n in counter.agent_replies.items()
                      if c not in expected_agent and not c.startswith(b"barrier-"))
    dup_agent = sum(n - 1 for c, n in counter.agent_replies.items() if n > 1)
    exp_term = set(expected_term)
    extra_term = sum(n for c, n in counter.terminal.items()
                     if c not in exp_term and not c.startswith(b"barrier-"))
    dup_term = sum(n - 1 for c, n in counter.terminal.items() if n > 1)
    return {
        "inputs_tried": len(every),
        "rounds": rounds,
        "per_round_per_family": dict(sorted(
            (k, v // rounds) for k, v in by_family.items())),
        "timings": timings,
        "replies_complete": complete,
        "agent_replies_expected": len(expected_agent),
        "agent_replies_missing": missing_agent,
        "agent_replies_unexpected": extra_agent,
        "agent_replies_duplicated": dup_agent,
        "agent_replies_malformed": counter.bad_agent_replies,
        "phone_replies_expected": len(expected_term),
        "phone_replies_missing": missing_term,
        "phone_replies_unexpected": extra_term,
        "phone_replies_duplicated": dup_term,
        "victim_messages": counter.victim_messages,
        "crashed": crashed,
        "rss_after_warmup_mib": {n: _r(v, 1) for n, v in rss[0].items()},
        "rss_growth_mib_per_round": [{n: _r(v, 1) for n, v in g.items()} for g in growth],
        "rss_growth_max_mib": _r(max(max(g.values()) for g in growth), 1),
        "rss_growth_last_round_max_mib": _r(max(growth[-1].values()), 1),
        "rss_growth_total_max_mib": _r(max(rss[-1][n] - rss[0][n] for n in watched), 1),
        "healthy_after": tally(health.outcomes),
        "outcomes": health.outcomes,
    }


