"""Issue 7, the bounded CI form: reliability under load, faults and hostile input.

The live tests run the phases of :mod:`moe2.tools.bench.reliability` (``moe2 bench
reliability`` is the full form) with small figures against a private mosquitto, three agents and
two coordinators in one shared-subscription group (plus one agent and one coordinator with small
limits under their own topic root). The in-process tests feed hypothesis-generated messages
straight into a coordinator's and an agent's message handlers and check the invariants that the
live fuzz can only sample: nothing raises, every request with a reply topic gets exactly one
final or error, bookkeeping stays bounded, the agent's KV cache stays consistent. The last tests
pin the bugs this suite found.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Sequence

import aiomqtt
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe2.agent.daemon import AgentDaemon, Work
from moe2.agent.meters import ManualMeter
from moe2.coordinator import once
from moe2.coordinator import registry as reg
from moe2.coordinator.gating import UniformGate
from moe2.coordinator.inflight import MAX_PEERS, takeover_handler
from moe2.coordinator.outbox import PhoneMessage
from moe2.coordinator.service import Coordinator
from moe2.shared import wire
from moe2.shared.config import CoordinatorConfig
from moe2.shared.mqtt import make_client, parse_broker_url, response_properties
from moe2.shared.topics import Topics, publishable_topic
from moe2.tools.bench.reliability import (
    LoadSpec,
    mutate,
    tally,
)
from moe2.tools.clients.phone import AskError, PhoneClient
from tests.agent_helpers import FakeEngine, agent_config

pytestmark = pytest.mark.chaos

LOAD = LoadSpec(clients=10, per_client=4, concurrency=2, max_tokens=12, timeout_s=20.0)
FAULTS = LoadSpec(clients=10, per_client=4, concurrency=2, max_tokens=12, timeout_s=20.0)
ERROR_CODES = {c.value for c in wire.ErrorCode}


REQUEST_BODIES = [
    wire.encode_phone(wire.PhoneRequest(prompt="hi", max_tokens=2, raw=True), None),
    wire.encode_phone(wire.PhoneRequest(prompt="hi", max_tokens=2), wire.CONTENT_TYPE_MSGPACK),
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stop": ["x"]}',
]


# --------------------------------------------------------------------------- in process


PHONE = "hp"
TP = Topics()


def _status(agent: str, state: str) -> bytes:
    return wire.encode(wire.AgentStatus(agent_id=agent, state=state,  # type: ignore[arg-type]
                                        model="m", n_ctx=64, n_vocab=8, vocab_fp="fp", eos_id=2))


COORDINATOR_SAMPLES: list[tuple[str, bytes]] = [
    (TP.request(PHONE), REQUEST_BODIES[0]),
    (TP.request(PHONE), REQUEST_BODIES[2]),
    # a cancel before, during or after its request: still exactly one terminal message
    (TP.cancel(PHONE), wire.encode_phone(wire.PhoneCancel(), None)),
    (TP.cancel(PHONE), wire.encode_phone(wire.PhoneCancel(), wire.CONTENT_TYPE_MSGPACK)),
    (TP.coordinator_inbox("c0").topic, wire.encode(wire.Reply(agent_id="a0", dists=[
        wire.Distribution(session_id="nope", seq=1, probs=wire.Distribution.pack_probs([1.0]))]))),
    (TP.coordinator_inbox("c0").topic, wire.encode(wire.Reply(agent_id="ghost", errors=[
        wire.ErrorItem(code=wire.ErrorCode.UNKNOWN_SESSION, message="x", session_id="s")]))),
    (TP.agent_status("a0").topic, _status("a0", "online")),
    (TP.agent_status("a0").topic, _status("a0", "offline")),
    (TP.agent_vocab("a0").topic, wire.encode(wire.Vocab(agent_id="a0", vocab_fp="fp",
                                                        pieces=[b"a", b"b", b""] + [b"c"] * 5))),
    (TP.agent_vocab("g1").topic, wire.encode(wire.Vocab(agent_id="g1", vocab_fp="fp-g1",
                                                        pieces=[b"z"]))),
    (TP.agent_telemetry("a0").topic, wire.encode(wire.Telemetry(
        agent_id="a0", ts=1.0, power_w=1.0, energy_j=1.0, tokens_total=1, tokens_per_s=1.0,
        joules_per_token=0.1, step_latency_s=0.001, open_sessions=0, meter="x"))),
    (TP.coordinator_status("peer").topic, wire.encode(wire.CoordinatorStatus(
        coordinator_id="peer", state="offline"))),
    (TP.coordinator_status("c0").topic, wire.encode(wire.CoordinatorStatus(
        coordinator_id="c0", state="offline"))),
    (TP.coordinator_inflight("c0", "r1").topic, wire.encode(wire.InflightMarker(
        coordinator_id="c0", incarnation="old", client_id=PHONE,
        response_topic=TP.response_prefix(PHONE) + "r", correlation=b"m"))),
    (TP.coordinator_inflight("peer", "r1").topic, wire.encode(wire.InflightMarker(
        coordinator_id="peer", incarnation="old", client_id=PHONE,
        response_topic=TP.response_prefix(PHONE) + "r"))),
    # another broker node with a coordinator: some requests are held for it, then served here
    (TP.coordinator_heartbeat("peer").topic, wire.encode(wire.CoordinatorHeartbeat(
        coordinator_id="peer", node="far:1883", incarnation="i1"))),
    (TP.coordinator_claims("peer").topic, wire.encode(wire.RequestClaim(
        key="0" * 32, coordinator_id="peer", node="far:1883", incarnation="i1", ts=1.0))),
    (TP.coordinator_claims("c0").topic, wire.encode(wire.RequestClaim(
        key="f" * 32, coordinator_id="c0", node="x", incarnation="old", ts=1.0, rank=1))),
]
RESPONSE_TOPICS = [None, TP.response_prefix(PHONE) + "r", TP.response_prefix(PHONE) + "x/y",
                   TP.response_prefix("other") + "r", "elsewhere/r", TP.response_prefix(PHONE)]


@st.composite
def coordinator_message(draw: st.DrawFn) -> tuple[str, bytes, str | None, bytes | None,
                                                   str | None, bool]:
    if draw(st.booleans()):
        topic, payload = draw(st.sampled_from(COORDINATOR_SAMPLES))
        if draw(st.booleans()):
            payload = mutate(payload, random.Random(draw(st.integers(0, 2**32))))
    else:
        topic = draw(st.sampled_from([s[0] for s in COORDINATOR_SAMPLES] + [
            f"moe2/agents/{draw(st.from_regex(r'[a-z0-9]{1,8}', fullmatch=True))}/status",
            f"moe2/coordinators/{draw(st.from_regex(r'[a-z0-9]{1,8}', fullmatch=True))}/status",
            "moe2/other/topic"]))
        payload = draw(st.binary(max_size=120))
    rt = draw(st.sampled_from(RESPONSE_TOPICS))
    corr = draw(st.one_of(st.none(), st.binary(min_size=1, max_size=8)))
    ct = draw(st.sampled_from([None, wire.CONTENT_TYPE_JSON, wire.CONTENT_TYPE_MSGPACK, "a/b"]))
    return topic, payload, rt, corr, ct, draw(st.booleans())


def _no_client(_will: aiomqtt.Will) -> aiomqtt.Client:
    raise AssertionError("the in-process tests never connect")


def _message(topic: str, payload: bytes, rt: str | None, corr: bytes | None, ct: str | None,
             retain: bool) -> aiomqtt.Message:
    props = response_properties(rt, corr, ct) if (rt or corr or ct) else None
    return aiomqtt.Message(topic, payload, qos=1, retain=retain, mid=1, properties=props)


@settings(max_examples=300, deadline=None)
@given(st.lists(coordinator_message(), min_size=1, max_size=25))
def test_coordinator_handles_any_message(msgs: Sequence[tuple[str, bytes, str | None,
                                                             bytes | None, str | None, bool]]
                                         ) -> None:
    """Nothing raises out of the receive path; a request with a reply topic of its own phone
    gets exactly one final or error (identical copies of one request: one), any other request
    none -- also when forged heartbeats make this coordinator hold copies for another node and
    serve them when the fallback is due; bookkeeping stays bounded."""

    async def main() -> None:
        cfg = CoordinatorConfig(id="c0", open_deadline_s=0.05, step_deadline_min_s=0.05)
        coord = Coordinator(cfg, UniformGate(), _no_client)
        expected: Counter[bytes | None] = Counter()
        keys: set[str] = set()
        for topic, payload, rt, corr, ct, retain in msgs:
            coord._on_message(_message(topic, payload, rt, corr, ct, retain))
            if topic == TP.request(PHONE) and rt is not None and rt.startswith(
                    TP.response_prefix(PHONE)) and publishable_topic(rt):
                key = once.request_key(PHONE, rt, corr, ct, payload)
                expected[corr] += key not in keys
                keys.add(key)
        coord.once.serve_due(float("inf"))  # every held copy's fallback is due
        while coord._requests:
            await asyncio.gather(*list(coord._requests))
        got: Counter[bytes | None] = Counter()
        for m in coord.outbox.pending():
            reply = wire.decode_phone_reply(m.payload, getattr(m.properties, "ContentType", None))
            assert m.topic.startswith(TP.response_prefix(PHONE))
            if isinstance(reply, (wire.FinalReply, wire.ErrorReplyPhone)):
                got[getattr(m.properties, "CorrelationData", None)] += 1
        assert got == expected
        assert coord.inflight.open_markers == 0
        assert coord.rpc.waiting == 0
        assert len(coord.inflight.peers.online) <= MAX_PEERS
        assert coord.once.held == 0
        assert len(coord.once.peers) <= once.MAX_PEERS and coord.once.claims <= once.MAX_CLAIMS
        assert len(coord.registry.vocabs) <= reg.MAX_VOCABS

    asyncio.run(main())


AGENT_IDS = ["s0", "s1", "s2", "s3"]


@st.composite
def agent_payload(draw: st.DrawFn) -> bytes:
    sid = st.sampled_from(AGENT_IDS)
    kind = draw(st.integers(0, 5))
    msg: wire.OpenSession | wire.Step | wire.CloseSession
    if kind == 0:
        return draw(st.binary(max_size=100))
    if kind == 1:
        msg = wire.OpenSession(session_id=draw(sid), k=draw(st.integers(-1, 70)),
                               prompt=draw(st.text(max_size=20)))
    elif kind == 2:
        msg = wire.OpenSession(session_id=draw(sid), k=draw(st.integers(0, 8)),
                               tokens=draw(st.lists(st.integers(-2, 70), max_size=6)))
    elif kind == 3:
        msg = wire.Step(items=draw(st.lists(st.builds(
            wire.StepItem, sid, st.integers(-1, 70), st.integers(0, 4), st.integers(0, 8)),
            min_size=1, max_size=4)))
    else:
        msg = wire.CloseSession(session_ids=draw(st.lists(sid, max_size=3)))
    data = wire.encode(msg)
    if kind == 5:
        data = mutate(data, random.Random(draw(st.integers(0, 2**32))))
    return data


def _agent(max_sessions: int = 3) -> tuple[AgentDaemon, FakeEngine]:
    engine = FakeEngine(n_vocab=64, n_ctx=32)
    cfg = agent_config("fz", max_sessions=max_sessions, n_ctx=32)
    return AgentDaemon(cfg, engine, ManualMeter(), _no_client), engine


def _batch(d: AgentDaemon, payloads: Sequence[bytes], with_rt: bool = True) -> list[Work]:
    for i, p in enumerate(payloads):
        d._on_message(_message(TP.agent_rpc("fz"), p,
                               TP.coordinator_inbox("c0").topic if with_rt else None,
                               str(i).encode(), None, False))
    out = list(d._inbox)
    d._inbox.clear()
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(agent_payload(), min_size=1, max_size=8), min_size=1, max_size=6))
def test_agent_handles_any_rpc(batches: Sequence[Sequence[bytes]]) -> None:
    """Any RPC batch: one reply per message (none only for a clean close), each with a
    distribution or a typed error; never a failed decode (the fake engine refuses positions
    that do not continue a sequence); sessions and KV slots stay consistent and bounded."""
    d, engine = _agent()
    for payloads in batches:
        work = _batch(d, payloads)
        replies = d.process(work)
        assert len(replies) == len(work)
        for w, r in zip(work, replies, strict=True):
            if r is None:
                assert isinstance(w.msg, wire.CloseSession)
                continue
            assert r.dists or r.errors
            assert all(e.code != wire.ErrorCode.INTERNAL for e in r.errors), r.errors
        t = d.table
        assert len(t.sessions) + len(t._free) == t.max_sessions
        assert len({s.seq_id for s in t.sessions.values()}) == len(t.sessions)
        for s in t.sessions.values():
            assert len(engine.history.get(s.seq_id, [])) == s.n_past


def test_phone_gives_up_on_a_silent_request_after_a_coordinator_will() -> None:
    """Only the live will of a coordinator seen online makes unanswered requests suspect; a
    request that had a reply keeps waiting (a coordinator has it)."""

    def status(cid: str, state: str, retain: bool) -> aiomqtt.Message:
        payload = wire.encode(wire.CoordinatorStatus(coordinator_id=cid,
                                                     state=state))  # type: ignore[arg-type]
        return aiomqtt.Message(TP.coordinator_status(cid).topic, payload, qos=1, retain=retain,
                               mid=1, properties=None)

    async def main() -> None:
        client = make_client(parse_broker_url("mqtt://127.0.0.1:1"), identifier="unused")
        ph = PhoneClient(client, "p", TP, watch_coordinators=True, grace_s=0.01)
        ph._connected.set()
        silent: asyncio.Queue[wire.PhoneReply | AskError] = asyncio.Queue()
        streaming: asyncio.Queue[wire.PhoneReply | AskError] = asyncio.Queue()
        ph._queues = {b"silent": silent, b"streaming": streaming}
        ph._answered.add(b"streaming")
        ph._on_coordinator_status(status("c9", "offline", False))  # never seen online
        ph._on_coordinator_status(status("c0", "online", True))
        ph._on_coordinator_status(status("c0", "offline", True))  # retained: history
        assert ph._suspect == {}
        ph._on_coordinator_status(status("c0", "offline", False))
        err = await asyncio.wait_for(silent.get(), 10)
        assert isinstance(err, AskError) and err.code == "coordinator_lost"
        assert streaming.empty()

    asyncio.run(main())


# --------------------------------------------------------------------------- regressions


def test_close_in_the_same_batch_as_a_step_fails_only_that_step() -> None:
    """Found by the SIGSTOP phase: a hung agent woke up to [step s0, close s0, ...] in one batch;
    the close freed s0's KV sequence before the step was decoded, the decode failed, and every
    other session in that llama_decode call was killed with it."""
    d, _engine = _agent()
    opened = d.process(_batch(d, [wire.encode(wire.OpenSession(session_id=s, k=4, tokens=[1, 5]))
                                  for s in ("s0", "s1")]))
    assert all(r is not None and r.dists for r in opened)
    step = wire.encode(wire.Step(items=[wire.StepItem("s0", 7, 1, 4),
                                        wire.StepItem("s1", 7, 1, 4)]))
    close = wire.encode(wire.CloseSession(session_ids=["s0"]))
    replies = d.process(_batch(d, [step, close]))
    r = replies[0]
    assert r is not None
    assert [x.session_id for x in r.dists] == ["s1"]
    assert [(e.session_id, e.code) for e in r.errors] == [("s0", wire.ErrorCode.UNKNOWN_SESSION)]
    assert replies[1] is None
    again = d.process(_batch(d, [wire.encode(wire.Step(items=[wire.StepItem("s1", 3, 2, 4)]))]))
    assert again[0] is not None and [x.session_id for x in again[0].dists] == ["s1"]


def test_vocab_flood_stays_bounded_and_keeps_used_families() -> None:
    """Forged vocabularies of families nobody uses must not grow the registry without bound."""
    state = reg.apply(reg.Registry(), reg.VocabEvent(wire.Vocab(agent_id="a0", vocab_fp="real",
                                                                pieces=[b"a"])))
    state = reg.apply(state, reg.StatusEvent(wire.AgentStatus(
        agent_id="a0", state="online", vocab_fp="real"), 0.0))
    for i in range(10 * reg.MAX_VOCABS):
        state = reg.apply(state, reg.VocabEvent(wire.Vocab(agent_id=f"g{i}", vocab_fp=f"f{i}",
                                                           pieces=[b"x"] * 10)))
        assert len(state.vocabs) <= reg.MAX_VOCABS
    assert "real" in state.vocabs
    assert f"f{10 * reg.MAX_VOCABS - 1}" in state.vocabs  # new families still get in


def test_subnormal_temperature_is_a_bad_request() -> None:
    """Found by the fuzzer: temperature 1e-310 made p^(1/T) NaN and the request an internal
    error; it is now refused up front with a clear message."""

    async def main() -> list[PhoneMessage]:
        coord = Coordinator(CoordinatorConfig(id="c0"), UniformGate(), _no_client)
        for i, t in enumerate((1e-310, 0.0, 0.5)):
            body = wire.encode_phone(wire.PhoneRequest(prompt="hi", temperature=t), None)
            coord._on_message(_message(TP.request(PHONE), body, TP.response_prefix(PHONE) + "r",
                                       b"%d" % i, None, False))
        while coord._requests:
            await asyncio.gather(*list(coord._requests))
        return coord.outbox.pending()

    out = {getattr(m.properties, "CorrelationData", None): wire.decode_phone_reply(m.payload, None)
           for m in asyncio.run(main())}
    tiny = out[b"0"]
    assert isinstance(tiny, wire.ErrorReplyPhone)
    assert tiny.code == wire.ErrorCode.BAD_REQUEST and "temperature" in tiny.message
    for ok in (b"1", b"2"):  # no expert here, but the temperature passed the bounds
        reply = out[ok]
        assert isinstance(reply, wire.ErrorReplyPhone) and reply.code == wire.ErrorCode.NO_EXPERTS


@pytest.mark.parametrize(("topic", "ok"), [
    ("moe2/responses/p/r", True), ("moe2/responses/p/", True), ("moe2/responses/p/ü", True),
    ("moe2/responses/p/\x7f", False), ("moe2/responses/p/\x01", False),
    ("moe2/responses/p/\u0085", False), ("moe2/responses/p/+", False), ("", False),
])
def test_publishable_topic(topic: str, ok: bool) -> None:
    """Found by the fuzzer: a forged marker whose response topic held U+007F made the
    coordinator publish there, and mosquitto disconnected the coordinator for it."""
    assert publishable_topic(topic) is ok


@pytest.mark.parametrize(("client_id", "topic", "ok"), [
    ("p", "moe2/responses/p/r", True), ("p", "moe2/responses/q/r", False),
    ("p", "moe2/responses/p/+", False), ("p", "moe2/responses/p/#", False),
    ("p", "moe2/responses/p/\x01", False), ("p", "moe2/responses/p/\x7f", False),
    ("p", "moe2/responses/pp/r", False),
])
def test_response_allowed_only_below_the_phones_prefix_and_publishable(
        client_id: str, topic: str, ok: bool) -> None:
    assert Topics().response_allowed(client_id, topic) is ok


def test_marker_decoding_and_takeover_choice() -> None:
    m = wire.InflightMarker(coordinator_id="c1", incarnation="i", client_id="p",
                            response_topic="moe2/responses/p/r", correlation=b"x")
    t = TP.coordinator_inflight("c1", "r")
    assert t.decode(t.encode(m)) == m
    for bad in (b"", b"\xc1", b"\x93\x01\x02\x03", msgspec.msgpack.encode({"type": "inflight"}),
                msgspec.msgpack.encode({**msgspec.to_builtins(m, builtin_types=(bytes,)),
                                        "v": 99})):
        with pytest.raises(wire.DecodeError):
            t.decode(bad)
    assert takeover_handler("c0", ["c1", "c2"])
    assert not takeover_handler("c1", ["c0", "c2"])
    assert takeover_handler("c1", [])


def test_tally_counts_lost_as_sent_without_reply() -> None:
    from moe2.tools.bench.reliability import Outcome

    outs = [Outcome("p", "c", "final", 0.0, 1.0), Outcome("p", "c", "error", 0.0, 0.1,
                                                           code="timeout"),
            Outcome("p", "c", "lost", 0.0, 9.0), Outcome("p", "c", "no_coordinator", 0.0, 0.0)]
    outs.append(Outcome("p", "c", "phone_error", 0.0, 3.0, code="connection_lost"))
    t = tally(outs, wall_s=2.0)
    assert (t["sent"], t["finals"], t["errors"], t["lost"]) == (4, 1, 1, 1)
    assert t["phone_errors"] == {"connection_lost": 1}
    assert t["not_sent"] == {"no_coordinator": 1}
    assert t["errors_by_code"] == {"timeout": 1}
    assert t["throughput_rps"] == 0.5


def test_a_cancel_right_behind_its_request_still_gives_exactly_one_terminal() -> None:
    """The cancel arrives in the same loop iteration as its request (before the request's task
    ran at all): the request still ends with one terminal message, and its bookkeeping goes."""

    async def main() -> None:
        coord = Coordinator(CoordinatorConfig(id="c0"), UniformGate(), _no_client)
        rt = TP.response_prefix(PHONE) + "r"
        for corr in (b"a", b"b"):
            coord._on_message(_message(TP.request(PHONE), REQUEST_BODIES[0], rt, corr, None,
                                       False))
            coord._on_message(_message(TP.cancel(PHONE), b'{"type":"cancel"}', None, corr, None,
                                       False))
        while coord._requests:
            await asyncio.gather(*list(coord._requests))
        terminals = [wire.decode_phone_reply(m.payload, None) for m in coord.outbox.pending()]
        assert len(terminals) == 2
        assert all(isinstance(t, wire.ErrorReplyPhone) for t in terminals)
        assert not coord._serving and not coord._cancelled_by_phone
        assert coord.inflight.open_markers == 0 and not coord.limits.active

    asyncio.run(main())
