"""The agent daemon in-process: injected engine, meter and clock, a real mosquitto.

The KV cache counted inside the engine, batching correctness and energy shares, idle expiry,
telemetry, and the engine-thread batch logic (``AgentDaemon.process``) without a broker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from moe2.agent.daemon import Work
from moe2.agent.engine import DecodeJob, LlamaEngine
from moe2.agent.meters import ManualClock, ManualMeter
from moe2.shared import wire
from moe2.shared.mqtt import make_client, parse_broker_url, payload_bytes
from moe2.shared.topics import Topics
from moe2.tools import models as gm
from moe2.tools.fleet.localbroker import LocalBroker
from tests.agent_helpers import (
    AgentRpcClient,
    FakeEngine,
    MeteredEngine,
    agent_config,
    assert_dist_matches,
    assert_not_degenerate,
    llama_greedy,
    make_daemon,
    running,
    top_id,
    wait_until,
)
from tests.conftest import Ggufs

E = wire.ErrorCode

PROMPTS = [
    "The capital of France is",
    "Q: What is 12 plus 7? A:",
    "Reverse the word apple:",
    "the sky is blue, not green",
    "Alice has three apples and",
    "The colour of snow is",
    "A spider has",
    "Numbers 0123456789 and",
]


@pytest.fixture(scope="module")
def expert(ggufs: Ggufs) -> gm.ExpertFile:
    return ggufs.shared[1]


@pytest.fixture
def llama_engine(expert: gm.ExpertFile) -> Iterator[LlamaEngine]:
    eng = LlamaEngine(str(expert.path), n_ctx=128, max_sessions=2, n_threads=2)
    try:
        yield eng
    finally:
        eng.close()


# --------------------------------------------------------------------------- KV cache


async def test_engine_decodes_one_token_per_step_at_any_history_length(
        broker: LocalBroker, expert: gm.ExpertFile, llama_engine: LlamaEngine) -> None:
    """Counted inside the engine (not just the reply's claim): opening decodes the prompt,
    every later step exactly one token; the distributions stay those of llama-cpp-python."""
    n_steps = 40
    # speculation off: it decodes ahead, and here every decode is counted
    daemon = make_daemon(agent_config("kv0", speculate_min_p=0.0), llama_engine, broker.url)
    async with running(daemon), AgentRpcClient(broker.url) as c:
        before = llama_engine.evaluated_tokens
        reply = await c.open("kv0", "s", k=8, prompt=PROMPTS[0])
        assert not reply.errors
        d = reply.dists[0]
        n_prompt = d.n_past
        assert llama_engine.evaluated_tokens - before == n_prompt == d.n_evaluated
        dists = [d]
        for seq in range(1, n_steps + 1):
            before = llama_engine.evaluated_tokens
            d = await c.step_one("kv0", "s", top_id(d), seq, 8)
            assert llama_engine.evaluated_tokens - before == 1
            assert (d.n_evaluated, d.n_past) == (1, n_prompt + seq)
            dists.append(d)
    prompt_tokens = llama_engine.tokenize(PROMPTS[0], add_bos=True, parse_special=False)
    follow = [top_id(x) for x in dists[:-1]]
    _fed, ref = llama_greedy(expert.path, prompt_tokens, n_steps, n_ctx=128, follow=follow)
    for x, r in zip(dists, ref, strict=True):
        assert_not_degenerate(r)
        assert_dist_matches(x, r, 8)


# --------------------------------------------------------------------------- batching


async def test_sessions_stepped_together_equal_each_alone_and_share_energy(
        broker: LocalBroker, expert: gm.ExpertFile) -> None:
    """8 sessions stepped in one Step message are decoded in ONE llama_decode call, give each
    session what it gets when run alone, and the meter's delta over that call is split among
    them exactly.

    The KV cache is float32 here: with llama.cpp's default f16 cache a one-token decode and a
    multi-token decode round differently (logits differ by ~1e-3), so batch-invariance to 1e-5
    only holds with f32. An agent that mixed up sessions or positions is off by far more.
    """
    n_steps = 6
    meter = ManualMeter()
    inner = LlamaEngine(str(expert.path), n_ctx=64, max_sessions=8, n_threads=2, kv_type="f32")
    engine = MeteredEngine(inner, meter, joules_per_call=0.5, joules_per_token=0.1)
    daemon = make_daemon(agent_config("b0", max_sessions=8, n_ctx=64, speculate_min_p=0.0),
                         engine, broker.url, meter=meter)
    try:
        async with running(daemon), AgentRpcClient(broker.url) as c:
            # together: open all, then step all 8 in one message per tick
            together: list[list[wire.Distribution]] = []
            for i, prompt in enumerate(PROMPTS):
                reply = await c.open("b0", f"t{i}", k=0, prompt=prompt)
                assert not reply.errors
                together.append([reply.dists[0]])
            for seq in range(1, n_steps + 1):
                calls_before = len(engine.calls)
                reply = await c.step("b0", [wire.StepItem(f"t{i}", top_id(together[i][-1]), seq,
                                                          0) for i in range(len(PROMPTS))])
                assert not reply.errors
                assert [d.session_id for d in reply.dists] == [f"t{i}" for i in
                                                               range(len(PROMPTS))]
                assert engine.calls[calls_before:] == [[1] * len(PROMPTS)]
                delta = engine.energy_per_call[-1]
                shares = [d.energy_j for d in reply.dists]
                assert sum(shares) == pytest.approx(delta, abs=1e-9)
                assert shares == pytest.approx([delta / len(PROMPTS)] * len(PROMPTS), abs=1e-9)
                for i, d in enumerate(reply.dists):
                    assert d.seq == seq
                    together[i].append(d)
            await c.close_sessions("b0", [f"t{i}" for i in range(len(PROMPTS))])

            # alone: the same sessions one at a time, one token per decode call
            for i, prompt in enumerate(PROMPTS):
                follow = [top_id(d) for d in together[i][:-1]]
                calls_before = len(engine.calls)
                alone = await c.greedy("b0", f"a{i}", k=0, prompt=prompt, n_steps=n_steps,
                                       follow=follow)
                assert all(len(call) == 1 for call in engine.calls[calls_before:])
                for a, t in zip(alone, together[i], strict=True):
                    assert a.energy_j == pytest.approx(
                        engine.joules_per_call + engine.joules_per_token * a.n_evaluated)
                    pa = a.prob_array().astype(np.float64)
                    assert_not_degenerate(pa)
                    np.testing.assert_allclose(t.prob_array(), pa, rtol=0, atol=1e-5)
                await c.close_sessions("b0", [f"a{i}"])
        # the sessions really differ, so a mix-up could not pass unnoticed
        last = [t[-1].prob_array() for t in together]
        for i in range(len(last)):
            for j in range(i):
                assert np.abs(last[i] - last[j]).max() > 1e-3
    finally:
        inner.close()


def _work(msg: wire.OpenSession | wire.Step | wire.CloseSession) -> Work:
    return Work(msg, None, "inbox", b"c")


def test_one_batch_shares_energy_by_tokens_and_keeps_session_order() -> None:
    """``process`` (the engine-thread half, no broker): two opens in one batch are one decode
    call and split its energy 5:3 by prompt tokens; two steps of one session in one message
    are decoded in order, in two rounds."""
    meter = ManualMeter()
    per_call: list[float] = []

    def add_energy(jobs: Sequence[DecodeJob]) -> None:
        j = 0.2 * sum(len(x.tokens) for x in jobs)
        per_call.append(j)
        meter.add_energy(j)

    engine = FakeEngine(on_decode=add_energy)
    daemon = make_daemon(agent_config("p0", max_sessions=4), engine, "mqtt://127.0.0.1:1",
                         meter=meter)
    replies = daemon.process([
        _work(wire.OpenSession(session_id="a", k=4, tokens=[1, 5, 6, 7, 8])),
        _work(wire.OpenSession(session_id="b", k=0, tokens=[1, 9, 10])),
    ])
    assert engine.calls == [[5, 3]]
    a, b = (r.dists[0] for r in replies if r is not None)
    assert (a.n_evaluated, b.n_evaluated) == (5, 3)
    assert a.energy_j == pytest.approx(per_call[0] * 5 / 8)
    assert b.energy_j == pytest.approx(per_call[0] * 3 / 8)
    assert len(a.id_array()) == 4
    assert len(b.prob_array()) == engine.n_vocab

    [reply] = daemon.process([_work(wire.Step(items=[
        wire.StepItem("a", 11, 1, 2), wire.StepItem("a", 12, 2, 2), wire.StepItem("b", 13, 1, 2),
    ]))])
    assert reply is not None
    assert not reply.errors
    assert [(d.session_id, d.seq, d.n_past) for d in reply.dists] == [
        ("a", 1, 6), ("b", 1, 4), ("a", 2, 7)]
    assert engine.calls[1:] == [[1, 1], [1]]
    expected = engine.logits_for([1, 5, 6, 7, 8, 11, 12])
    order = np.argsort(-expected)[:2]
    assert reply.dists[2].id_array().tolist() == order.tolist()

    # a close needs no reply and frees the KV sequence
    seq_a = daemon.table.sessions["a"].seq_id
    assert daemon.process([_work(wire.CloseSession(session_ids=["a", "nope"]))]) == [None]
    assert engine.freed == [seq_a]
    assert "a" not in daemon.table.sessions


def test_duplicate_step_in_one_batch_is_decoded_once() -> None:
    """A retried step that lands in the same tick as the original must not append the token
    twice: the second copy is refused as out of order and the KV sequence stays consistent."""
    engine = FakeEngine(n_ctx=8)
    daemon = make_daemon(agent_config("dup0", max_sessions=2), engine,
                         "mqtt://127.0.0.1:1")
    daemon.process([_work(wire.OpenSession(session_id="s", k=2, tokens=[1, 4]))])
    step = wire.Step(items=[wire.StepItem("s", 5, 1, 2)])
    first, second = daemon.process([_work(step), _work(step)])
    assert first is not None
    assert second is not None
    assert [(d.seq, d.n_past) for d in first.dists] == [(1, 3)]
    assert [(e.code, e.seq) for e in second.errors] == [(E.BAD_REQUEST, 1)]
    assert not second.dists
    assert engine.history[daemon.table.sessions["s"].seq_id] == [1, 4, 5]
    # steps beyond the context are counted before they are decoded, within one batch too
    items = [wire.StepItem("s", 6 + i, 2 + i, 2) for i in range(6)]
    [reply] = daemon.process([_work(wire.Step(items=items))])
    assert reply is not None
    assert [d.n_past for d in reply.dists] == [4, 5, 6, 7, 8]
    assert [e.code for e in reply.errors] == [E.CONTEXT_FULL]


def test_steps_in_the_batch_of_their_open_count_the_prompt_against_the_context() -> None:
    """Found by an adversarial review: an open with n_ctx - 1 prompt tokens and steps 1-3 in
    the same batch were all admitted (the prompt was not decoded yet) and overran the KV
    stream, failing the whole round -- other sessions included."""
    engine = FakeEngine(n_ctx=8)
    daemon = make_daemon(agent_config("ctx0", max_sessions=2), engine, "mqtt://127.0.0.1:1")
    daemon.process([_work(wire.OpenSession(session_id="other", k=2, tokens=[1, 4]))])
    opened, stepped = daemon.process([
        _work(wire.OpenSession(session_id="s", k=2, tokens=[1, 4, 5, 6, 7, 8, 9])),
        _work(wire.Step(items=[wire.StepItem("s", 5, 1, 2), wire.StepItem("s", 5, 2, 2),
                               wire.StepItem("other", 5, 1, 2)]))])
    assert opened is not None and stepped is not None
    assert not opened.errors
    assert sorted((d.session_id, d.seq, d.n_past) for d in stepped.dists) == [
        ("other", 1, 3), ("s", 1, 8)]
    assert [(e.code, e.session_id, e.seq) for e in stepped.errors] == [
        (E.CONTEXT_FULL, "s", 2)]


def test_sessions_get_the_lowest_free_kv_sequence() -> None:
    """Sessions open together hold consecutive sequence ids (one ubatch in llama.cpp)."""
    from moe2.agent.sessions import SessionTable

    t = SessionTable(max_sessions=4, n_ctx=32, n_vocab=64, max_k=64)
    assert [t.open(s, 2, 1, 0.0).seq_id for s in "abcd"] == [0, 1, 2, 3]
    t.close("c")
    t.close("a")
    assert [t.open(s, 2, 1, 0.0).seq_id for s in "ef"] == [0, 2]


def test_a_failed_round_does_not_decode_later_steps_of_its_sessions() -> None:
    engine = FakeEngine()
    daemon = make_daemon(agent_config("fr0", max_sessions=2), engine, "mqtt://127.0.0.1:1")
    daemon.process([_work(wire.OpenSession(session_id="s", k=2, tokens=[1, 4]))])
    seq_id = daemon.table.sessions["s"].seq_id
    engine.fail_next = True
    [reply] = daemon.process([_work(wire.Step(items=[wire.StepItem("s", 5, 1, 2),
                                                     wire.StepItem("s", 6, 2, 2)]))])
    assert reply is not None and not reply.dists
    assert [(e.code, e.seq) for e in reply.errors] == [
        (E.INTERNAL, 1), (E.UNKNOWN_SESSION, 2)]
    assert seq_id not in engine.history  # nothing written into the freed sequence


def test_decode_failure_is_an_internal_error_and_frees_the_session() -> None:
    engine = FakeEngine()
    daemon = make_daemon(agent_config("f0", max_sessions=2), engine, "mqtt://127.0.0.1:1")
    [ok] = daemon.process([_work(wire.OpenSession(session_id="s", k=2, tokens=[1, 4]))])
    assert ok is not None
    assert not ok.errors
    engine.fail_next = True
    [bad] = daemon.process([_work(wire.Step(items=[wire.StepItem("s", 5, 1, 2)]))])
    assert bad is not None
    assert [(e.code, e.session_id, e.seq) for e in bad.errors] == [(E.INTERNAL, "s", 1)]
    assert "s" not in daemon.table.sessions
    # the slot is usable again
    [again] = daemon.process([_work(wire.OpenSession(session_id="s", k=2, tokens=[1, 4]))])
    assert again is not None
    assert not again.errors


def test_template_with_bos_token_gets_exactly_one_bos(tmp_path: Path) -> None:
    """A template that writes ``{{ bos_token }}`` itself must not get a second BOS."""
    template = "{{ bos_token }}" + gm.SIMPLE_CHAT_TEMPLATE
    [ex] = gm.make_test_experts(tmp_path, count=1, chat_template_index=0,
                                chat_template=template)
    eng = LlamaEngine(str(ex.path), n_ctx=64, max_sessions=1, n_threads=2)
    try:
        daemon = make_daemon(agent_config("bos"), eng, "mqtt://127.0.0.1:1")
        tokens = daemon.tokenize_request(wire.OpenSession(
            session_id="s", k=1, messages=[wire.ChatMessage("user", "hi")]))
        assert tokens[0] == eng.info.bos_id
        assert tokens.count(eng.info.bos_id) == 1
        raw = daemon.tokenize_request(wire.OpenSession(session_id="s", k=1, prompt="hi",
                                                       raw=True))
        assert raw == eng.tokenize("hi", add_bos=True, parse_special=False)
    finally:
        eng.close()


# --------------------------------------------------------------------------- periodic loops


async def test_idle_sessions_expire_and_free_their_sequence(broker: LocalBroker) -> None:
    clock = ManualClock(100.0)
    engine = FakeEngine()
    daemon = make_daemon(agent_config("idle0", idle_timeout_s=1.0, max_sessions=2), engine,
                         broker.url, clock=clock)
    async with running(daemon), AgentRpcClient(broker.url) as c:
        for sid in ("old", "fresh"):
            assert not (await c.open("idle0", sid, k=2, tokens=[1, 7])).errors
        seq_old = daemon.table.sessions["old"].seq_id
        clock.advance(0.6)
        await c.step_one("idle0", "fresh", 9, 1, 2)   # "fresh" was used at t=100.6
        clock.advance(0.9)                            # t=101.5: "old" idle 1.5 s, "fresh" 0.9 s
        await wait_until(lambda: "old" not in daemon.table.sessions, 10.0, "expiry of 'old'")
        assert "fresh" in daemon.table.sessions
        assert engine.freed == [seq_old]
        reply = await c.step("idle0", [wire.StepItem("old", 9, 1, 2)])
        assert [e.code for e in reply.errors] == [E.UNKNOWN_SESSION]
        await c.step_one("idle0", "fresh", 10, 2, 2)
        # the freed slot serves a new session
        assert not (await c.open("idle0", "new", k=2, tokens=[1, 8])).errors


async def test_telemetry_reports_tokens_sessions_and_meter(broker: LocalBroker) -> None:
    meter = ManualMeter("manual-test", power_w=12.5, temperature_c=41.0)
    engine = FakeEngine(on_decode=lambda jobs: meter.add_energy(1.0))
    # speculation off: its decodes would add energy (tests/unit/test_speculation.py)
    daemon = make_daemon(agent_config("tel0", telemetry_interval_s=0.05, speculate_min_p=0.0),
                         engine, broker.url, meter=meter)
    topic = Topics().agent_telemetry("tel0")
    async with running(daemon), AgentRpcClient(broker.url) as c, \
            make_client(parse_broker_url(broker.url)) as sub:
        await sub.subscribe(topic.topic)
        d = (await c.open("tel0", "s", k=2, tokens=[1, 5])).dists[0]
        for seq in range(1, 4):
            d = await c.step_one("tel0", "s", top_id(d), seq, 2)

        async def matching() -> wire.Telemetry:
            async for m in sub.messages:
                t = topic.decode(payload_bytes(m))
                if t.tokens_total == 3:
                    return t
            raise AssertionError("telemetry stream ended")

        tel = await asyncio.wait_for(matching(), timeout=10.0)
    assert tel.agent_id == "tel0"
    assert tel.open_sessions == 1
    assert tel.meter == "manual-test"
    assert tel.power_w == 12.5
    assert tel.temperature_c == 41.0
    assert tel.energy_j == pytest.approx(4.0)  # one open + three steps, 1 J each
    assert sum(b.n for b in tel.latency_by_ctx) == 3
