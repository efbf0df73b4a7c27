"""Experts that ``make-experts`` did not write, with real tokenizers, served and fused (issue
13): the paper's testbed pair -- Qwen2 vocabularies of 151,936 and 152,064 ids (padding) -- is
one family and fused exactly; another tokenizer family is reported, never silently absent."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import llama_cpp
import numpy as np

from moe2.coordinator.fusion import Fused
from moe2.coordinator.gating import FixedGate
from moe2.coordinator.service import Coordinator
from moe2.shared import wire
from moe2.shared.config import CoordinatorConfig
from moe2.shared.mqtt import make_client, parse_broker_url
from moe2.tools.clients.phone import Answer, PhoneClient
from moe2.tools.fleet.localbroker import LocalBroker
from tests.conftest import RealGgufs
from tests.fleet import start_agent, wait_for

#: fewer sessions than the default: every session's logits row is 151,646 floats
REAL_AGENT_ARGS = ("--max-sessions", "4", "--n-ctx", "256")
PROMPT = "The capital of France is"


class Observer:
    def __init__(self) -> None:
        self.steps: list[tuple[Fused, int]] = []

    def __call__(self, request_id: str, step: int, fused: Fused, token: int) -> None:
        self.steps.append((fused, token))


async def _ask_in_process(broker: LocalBroker, root: str, gates: dict[str, float],
                          request: wire.PhoneRequest, *, dist_k: int,
                          observer: Observer | None = None, fusion: str = "auto") -> Answer:
    """A coordinator in this process (to observe every fused step) and one phone request."""
    url = parse_broker_url(broker.url)
    ident = f"c-{uuid.uuid4().hex[:6]}"
    cfg = CoordinatorConfig(id=ident, root=root, dist_k=dist_k, broker=broker.url,
                            step_deadline_min_s=30.0, open_deadline_s=60.0,
                            fusion=fusion)  # type: ignore[arg-type]
    coord = Coordinator(cfg, FixedGate(gates), lambda will: make_client(url, identifier=ident,
                                                                        will=will))
    coord.ctx.observer = observer
    task = asyncio.create_task(coord.run())
    try:
        await wait_for(lambda: set(gates) <= set(coord.registry.agents) and all(
            coord.registry.pieces(coord.registry.agents[a].family) is not None for a in gates),
            120, "the agents and their vocabularies")
        cid = f"phone-{uuid.uuid4().hex[:6]}"
        async with make_client(url, identifier=cid) as c, \
                PhoneClient(c, cid, topics=coord.topics) as phone:
            return await phone.ask(request, timeout_s=120)
    finally:
        coord.request_stop()
        await task


def _logits(llm: llama_cpp.Llama, n: int) -> np.ndarray:
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1),
                                 shape=(llm.n_vocab(),))[:n].astype(np.float64)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def test_qwen2_pair_with_padded_vocabulary_is_fused_exactly(
        procs: Any, broker: LocalBroker, real_ggufs: RealGgufs) -> None:
    """Qwen2.5-7B-like (152,064 ids) beside -3B-like (151,936): both in the final, none dropped,
    and every fused step equals the gate-weighted mixture computed directly with
    llama-cpp-python from both files over the common ids."""
    a, b = real_ggufs.qwen2, real_ggufs.qwen2_padded
    start_agent(procs, broker.url, "q3b", a.path, "--root", "qwen", *REAL_AGENT_ARGS)
    start_agent(procs, broker.url, "q7b", b.path, "--root", "qwen", *REAL_AGENT_ARGS)
    gates = {"q3b": 0.3, "q7b": 0.7}
    obs = Observer()
    ans = asyncio.run(_ask_in_process(
        broker, "qwen", gates, wire.PhoneRequest(prompt=PROMPT, max_tokens=8, raw=True),
        dist_k=0, observer=obs))
    assert ans.final is not None, ans.error
    assert {e.id: (e.weight, e.dropped) for e in ans.final.experts} == {
        "q3b": (0.3, False), "q7b": (0.7, False)}
    assert len(obs.steps) == ans.final.tokens >= 1
    la = llama_cpp.Llama(str(a.path), n_ctx=256, verbose=False)
    lb = llama_cpp.Llama(str(b.path), n_ctx=256, verbose=False)
    n_common = obs.steps[0][0].ids.shape[0]
    assert n_common < min(la.n_vocab(), lb.n_vocab()) == 151_936  # the padding is not fused
    tokens = la.tokenize(PROMPT.encode(), add_bos=True, special=False)
    assert tokens == lb.tokenize(PROMPT.encode(), add_bos=True, special=False)
    la.eval(tokens)
    lb.eval(tokens)
    for fused, token in obs.steps:
        want = 0.3 * _softmax(_logits(la, n_common)) + 0.7 * _softmax(_logits(lb, n_common))
        np.testing.assert_allclose(fused.probs, want, atol=1e-5)
        top = np.argsort(-want, kind="stable")[:10]
        assert list(np.argsort(-fused.probs, kind="stable")[:10]) == list(top)
        assert token == int(np.argmax(want))
        la.eval([token])
        lb.eval([token])


def test_with_token_fusion_a_second_family_is_listed_dropped(
        procs: Any, broker: LocalBroker, real_ggufs: RealGgufs) -> None:
    """With ``fusion = "token"`` Qwen2 and Llama 3 experts are not fused together: every
    request is answered by one family and the final lists the other expert, dropped, with the
    reason (the default, "auto", fuses them over text: tests/e2e/test_cross_family.py)."""
    start_agent(procs, broker.url, "qwen", real_ggufs.qwen2.path, "--root", "mixed",
                *REAL_AGENT_ARGS)
    start_agent(procs, broker.url, "llama", real_ggufs.llama3.path, "--root", "mixed",
                *REAL_AGENT_ARGS)
    for gates, used, left in (({"qwen": 0.6, "llama": 0.4}, "qwen", "llama"),
                              ({"qwen": 0.2, "llama": 0.8}, "llama", "qwen")):
        ans = asyncio.run(_ask_in_process(
            broker, "mixed", gates, wire.PhoneRequest(prompt=PROMPT, max_tokens=6, raw=True),
            dist_k=64, fusion="token"))
        assert ans.final is not None, ans.error
        by_id = {e.id: e for e in ans.final.experts}
        assert set(by_id) == {"qwen", "llama"}
        assert not by_id[used].dropped and by_id[used].weight == 1.0
        assert by_id[left].dropped and by_id[left].weight == 0.0
        assert "different tokenizer family" in (by_id[left].reason or "")
        assert by_id[left].tokens == 0


def test_real_vocabulary_experts_serve_alone(
        procs: Any, broker: LocalBroker, real_ggufs: RealGgufs) -> None:
    """Each real tokenizer (Qwen2 padded, Llama 3 BPE, SentencePiece) serves requests: the
    streamed text is the final text, and it is what the pieces of the tokens say."""
    for name, expert in (("spm", real_ggufs.spm), ("llama3", real_ggufs.llama3),
                         ("qwen7b", real_ggufs.qwen2_padded)):
        root = f"alone-{name}"
        start_agent(procs, broker.url, name, expert.path, "--root", root, *REAL_AGENT_ARGS)
        obs = Observer()
        ans = asyncio.run(_ask_in_process(
            broker, root, {name: 1.0}, wire.PhoneRequest(prompt=PROMPT, max_tokens=12,
                                                         temperature=0.8, seed=3), dist_k=64,
            observer=obs))
        assert ans.final is not None, (name, ans.error)
        assert ans.final.tokens == len(obs.steps) >= 1
        assert "".join(c.text for c in ans.chunks) == ans.final.text
