"""Issue 3 must-shows: the coordinator against a real mosquitto and real agents on test GGUFs."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import pytest

from moe2.coordinator.fusion import Fused
from moe2.coordinator.gating import FixedGate
from moe2.coordinator.service import Coordinator
from moe2.shared import wire
from moe2.shared.config import CoordinatorConfig
from moe2.shared.mqtt import make_client, parse_broker_url
from moe2.tools.clients.phone import PhoneClient
from moe2.tools.fleet.harness import moe2_argv
from moe2.tools.fleet.localbroker import LocalBroker
from moe2.tools.models import ExpertFile
from tests.conftest import Ggufs
from tests.fleet import ask, start_agent, start_coordinator, wait_for, wait_plan

PROMPT = "What is 12 plus 7?"


@pytest.fixture(scope="module")
def experts(ggufs: Ggufs) -> list[ExpertFile]:
    return list(ggufs.shared)


def direct_logits(llm: llama_cpp.Llama) -> np.ndarray:
    n_vocab = llm.n_vocab()
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1),
                                 shape=(n_vocab,)).astype(np.float64)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def greedy_direct(path: Path, prompt: str, n: int) -> str:
    """A plain llama-cpp-python greedy loop: the reference the service must reproduce."""
    llm = llama_cpp.Llama(str(path), n_ctx=512, verbose=False)
    tokens = llm.tokenize(prompt.encode(), add_bos=True, special=False)
    llm.eval(tokens)
    out: list[int] = []
    for _ in range(n):
        tok = int(np.argmax(direct_logits(llm)))
        if tok == llm.token_eos():
            break
        out.append(tok)
        llm.eval([tok])
    return llm.detokenize(out).decode("utf-8", errors="replace")


def test_one_expert_greedy_equals_llama_cpp(procs: Any, broker: LocalBroker,
                                           experts: list[ExpertFile]) -> None:
    e = experts[0]
    start_agent(procs, broker.url, "solo", e.path, "--root", "one")
    start_coordinator(procs, broker.url, "--root", "one")

    async def until_ready() -> None:
        for _ in range(100):
            out = await asyncio.to_thread(subprocess.run, [
                *moe2_argv(), "ask", "--broker", broker.url,
                "--root", "one", "--max-tokens", "1", "--json", "--timeout", "5", "x"],
                capture_output=True, text=True)
            if out.returncode == 0 and '"final"' in out.stdout:
                return
            await asyncio.sleep(0.3)
        raise AssertionError("coordinator never answered")

    asyncio.run(until_ready())
    out = subprocess.run(
        [*moe2_argv(), "ask", "--broker", broker.url, "--root", "one",
         "--max-tokens", "24", "--temperature", "0", "--raw", "--json", PROMPT],
        capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    expected = greedy_direct(e.path, PROMPT, 24)
    assert result["text"] == expected
    assert result["streamed_text"] == expected
    assert len(expected) > 0
    assert [x["id"] for x in result["experts"]] == ["solo"]
    assert result["experts"][0]["weight"] == pytest.approx(1.0)
    for key in ("tokens", "ttft_s", "latency_s", "energy_j", "finish_reason"):
        assert key in result
    assert result["energy_j"] > 0


class Observer:
    def __init__(self) -> None:
        self.steps: list[tuple[Fused, int]] = []

    def __call__(self, request_id: str, step: int, fused: Fused, token: int) -> None:
        self.steps.append((fused, token))


async def _run_coordinator(cfg: CoordinatorConfig, gate: Any, broker_url: str,
                           observer: Any = None) -> tuple[Coordinator, asyncio.Task[int]]:
    url = parse_broker_url(broker_url)
    ident = f"c-{uuid.uuid4().hex[:6]}"
    coord = Coordinator(cfg, gate, lambda will: make_client(url, identifier=ident, will=will))
    coord.ctx.observer = observer
    task = asyncio.create_task(coord.run())
    return coord, task


def test_two_experts_fixed_gates_full_vocab_mixture(procs: Any, broker: LocalBroker,
                                                    experts: list[ExpertFile]) -> None:
    a, b = experts[0], experts[1]
    start_agent(procs, broker.url, "ma", a.path, "--root", "two")
    start_agent(procs, broker.url, "mb", b.path, "--root", "two")
    gates = {"ma": 0.7, "mb": 0.3}
    obs = Observer()

    async def main() -> wire.FinalReply:
        cfg = CoordinatorConfig(id="cfix", root="two", dist_k=0, broker=broker.url)
        coord, task = await _run_coordinator(cfg, FixedGate(gates), broker.url, obs)
        await wait_for(lambda: len(coord.registry.agents) == 2
                       and len(coord.registry.vocabs) == 1, 30, "two agents")
        cid = "phone2"
        async with make_client(parse_broker_url(broker.url), identifier=cid) as c, \
                PhoneClient(c, cid, topics=coord.topics) as phone:
            ans = await phone.ask(wire.PhoneRequest(prompt=PROMPT, max_tokens=16, raw=True))
        coord.request_stop()
        await task
        assert ans.final is not None, ans.error
        return ans.final

    final = asyncio.run(main())
    assert {e.id: e.weight for e in final.experts} == pytest.approx(gates)
    assert len(obs.steps) == final.tokens
    # Replay the same token path directly in llama.cpp and compare every fused step.
    la = llama_cpp.Llama(str(a.path), n_ctx=512, verbose=False)
    lb = llama_cpp.Llama(str(b.path), n_ctx=512, verbose=False)
    toks = la.tokenize(PROMPT.encode(), add_bos=True, special=False)
    la.eval(toks)
    lb.eval(toks)
    for fused, token in obs.steps:
        want = 0.7 * softmax(direct_logits(la)) + 0.3 * softmax(direct_logits(lb))
        assert fused.ids.shape[0] == la.n_vocab()
        np.testing.assert_allclose(fused.probs, want, atol=1e-5)
        assert token == int(np.argmax(want))
        assert want.max() < 0.99  # not degenerate
        la.eval([token])
        lb.eval([token])


def test_expert_killed_mid_generation_is_dropped(procs: Any, broker: LocalBroker,
                                                 experts: list[ExpertFile],
                                                 tmp_path: Path) -> None:
    agents = {f"k{i}": start_agent(procs, broker.url, f"k{i}", e.path, "--root", "kill")
              for i, e in enumerate(experts)}
    # A step deadline no load on a shared CI box reaches: the survivors are never dropped for
    # lateness, and the killed one is dropped by its Last Will, not by the deadline.
    cfg = tmp_path / "coordinator.toml"
    cfg.write_text("step_deadline_min_s = 30.0\n")
    start_coordinator(procs, broker.url, "--root", "kill", "--config", str(cfg))

    async def main() -> wire.FinalReply:
        from moe2.shared.topics import Topics

        await wait_plan(broker.url, sorted(agents), topics=Topics("kill"))
        cid = "phonek"
        async with make_client(parse_broker_url(broker.url), identifier=cid) as c, \
                PhoneClient(c, cid, topics=Topics("kill")) as phone:
            killed = False
            final = None
            req = wire.PhoneRequest(prompt=PROMPT, max_tokens=400, raw=True)
            async for msg in phone.stream(req, timeout_s=60):
                if isinstance(msg, wire.TokenChunk) and not killed and msg.index >= 3:
                    agents["k1"].send_signal(signal.SIGKILL)
                    killed = True
                if isinstance(msg, wire.FinalReply):
                    final = msg
                assert not isinstance(msg, wire.ErrorReplyPhone), msg
            assert killed
            assert final is not None
            return final

    final = asyncio.run(main())
    by_id = {e.id: e for e in final.experts}
    assert by_id["k1"].dropped is True
    assert "offline" in (by_id["k1"].reason or ""), by_id["k1"].reason
    assert by_id["k0"].dropped is False and by_id["k2"].dropped is False
    assert by_id["k0"].tokens > by_id["k1"].tokens
    assert final.tokens > 4


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory,
          experts: list[ExpertFile]) -> Iterator[tuple[LocalBroker, str]]:
    from tests.conftest import Procs

    tmp = tmp_path_factory.mktemp("fleet")
    ps = Procs(tmp)
    with LocalBroker() as b:
        try:
            for i, e in enumerate(experts[:2]):
                start_agent(ps, b.url, f"f{i}", e.path)
            start_coordinator(ps, b.url)
            asyncio.run(wait_plan(b.url, ["f0", "f1"]))
            yield b, str(tmp)
        finally:
            ps.close()


def test_fifty_concurrent_requests_each_get_one_final(fleet: tuple[LocalBroker, str]) -> None:
    b, _ = fleet

    async def one_phone(i: int) -> list[Any]:
        cid = f"p{i}"
        async with make_client(parse_broker_url(b.url), identifier=cid) as c, \
                PhoneClient(c, cid) as phone:
            return await asyncio.gather(*[
                phone.ask(wire.PhoneRequest(prompt=f"{PROMPT} {i} {j}", max_tokens=8,
                                            raw=True), timeout_s=120)
                for j in range(10)])

    async def main() -> list[Any]:
        results = await asyncio.gather(*[one_phone(i) for i in range(5)])
        return [a for r in results for a in r]

    answers = asyncio.run(main())
    assert len(answers) == 50
    for a in answers:
        assert a.error is None, a.error
        assert a.final is not None
        # exactly one final: the stream ends at it, and every message was a chunk or it
        assert a.messages == len(a.chunks) + 1
        assert a.final.tokens >= 1


@pytest.mark.parametrize(("payload", "content_type", "fragment"), [
    (b"\x00\xff garbage", None, "bad request"),
    (b'{"prompt": 5}', "application/json", "bad request"),
    (b'{"app": "default"}', "application/json", "prompt"),
    (b'{"prompt": "hi", "max_tokens": "many"}', "application/json", "bad request"),
    (b'{"prompt": "hi", "max_tokens": 0}', "application/json", "max_tokens"),
    (b"\x93\x01\x02\x03", "application/msgpack", "bad request"),
    (json.dumps({"prompt": "x" * 100_000}).encode(), "application/json", "characters"),
    (b'{"prompt": "hi", "max_tokens": 100000}', "application/json", "max_tokens"),
])
def test_bad_requests_get_error_replies(fleet: tuple[LocalBroker, str], payload: bytes,
                                        content_type: str | None, fragment: str) -> None:
    b, _ = fleet

    async def main() -> None:
        cid = "badphone"
        async with make_client(parse_broker_url(b.url), identifier=cid) as c, \
                PhoneClient(c, cid) as phone:
            q = await phone.send_raw(payload, correlation=b"corr-1", content_type=content_type)
            msg = await asyncio.wait_for(q.get(), 20)
            assert isinstance(msg, wire.ErrorReplyPhone)
            assert fragment in msg.message
            # and the service keeps answering
            ok = await phone.ask(wire.PhoneRequest(prompt=PROMPT, max_tokens=4, raw=True))
            assert ok.final is not None

    asyncio.run(main())


def test_msgpack_phone_and_messages(fleet: tuple[LocalBroker, str]) -> None:
    b, _ = fleet
    ans = asyncio.run(ask(b.url, wire.PhoneRequest(
        messages=[wire.ChatMessage("user", PROMPT)], max_tokens=6, temperature=0.8, seed=3),
        msgpack=True))
    assert ans.final is not None and ans.final.tokens >= 1
    again = asyncio.run(ask(b.url, wire.PhoneRequest(
        messages=[wire.ChatMessage("user", PROMPT)], max_tokens=6, temperature=0.8, seed=3)))
    assert again.final is not None and again.final.text == ans.final.text  # seeded sampling


def test_stop_string_ends_generation(fleet: tuple[LocalBroker, str]) -> None:
    b, _ = fleet
    free = asyncio.run(ask(b.url, wire.PhoneRequest(prompt=PROMPT, max_tokens=20, raw=True)))
    assert free.final is not None
    text = free.final.text
    assert len(text) >= 4
    stop = text[2:4]
    cut = asyncio.run(ask(b.url, wire.PhoneRequest(prompt=PROMPT, max_tokens=20, raw=True,
                                                   stop=[stop])))
    assert cut.final is not None
    assert cut.final.finish_reason == "stop"
    assert cut.final.text == text[: text.find(stop)]
    assert "".join(c.text for c in cut.chunks) == cut.final.text


def test_no_reply_topic_outside_own_prefix(fleet: tuple[LocalBroker, str]) -> None:
    """A phone cannot make the coordinator answer on another phone's topic."""
    b, _ = fleet

    async def main() -> None:
        async with make_client(parse_broker_url(b.url), identifier="victim") as v, \
                PhoneClient(v, "victim") as victim:
            async with make_client(parse_broker_url(b.url), identifier="evil") as c, \
                    PhoneClient(c, "evil") as evil:
                await evil.send_raw(b'{"prompt": "hi"}', correlation=b"zz",
                                    content_type=None, response_topic=victim.response_topic)
                await asyncio.sleep(1.0)
            assert victim.unmatched == 0

    asyncio.run(main())


@pytest.mark.parametrize("fusion", ["token", "auto"])
def test_experts_of_another_vocabulary_fused_over_texts_or_listed_dropped(
        procs: Any, broker: LocalBroker, experts: list[ExpertFile], ggufs: Ggufs,
        fusion: str) -> None:
    """``fusion = "token"``: one family per request, the other listed dropped with the reason;
    the default fuses all three (over texts)."""
    from moe2.shared.topics import Topics
    other = ggufs.mismatch
    assert other.fingerprint != experts[0].fingerprint
    root = f"mix-{fusion}"
    start_agent(procs, broker.url, "same0", experts[0].path, "--root", root)
    start_agent(procs, broker.url, "same1", experts[1].path, "--root", root)
    start_agent(procs, broker.url, "other", other.path, "--root", root)
    start_coordinator(procs, broker.url, "--root", root, "--fusion", fusion)

    async def main() -> list[wire.FinalReply]:
        await wait_plan(broker.url, ["other", "same0", "same1"], topics=Topics(root))
        finals = []
        cid = "phonemix"
        async with make_client(parse_broker_url(broker.url), identifier=cid) as c, \
                PhoneClient(c, cid, topics=Topics(root)) as phone:
            for i in range(3):
                ans = await phone.ask(wire.PhoneRequest(prompt=f"{PROMPT} {i}", max_tokens=4))
                assert ans.final is not None, ans.error
                finals.append(ans.final)
        return finals

    for final in asyncio.run(main()):
        used = {e.id for e in final.experts if not e.dropped}
        if fusion == "auto":
            assert used == {"same0", "same1", "other"}, final.experts
            continue
        # one vocabulary family per request: the larger family wins under uniform gating,
        # and the other family's expert is listed, dropped, with the reason
        assert used == {"same0", "same1"}
        [other_entry] = [e for e in final.experts if e.dropped]
        assert other_entry.id == "other" and "different tokenizer family" in (
            other_entry.reason or "")
