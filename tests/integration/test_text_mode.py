"""Text mode in the agent with real tokenizers (agent.textmode): an agent follows an answer
written in another family's tokens, keeps its own tokenisation extended only at the end, and
its context spells the text byte for byte."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from moe2.agent.daemon import AgentDaemon, Work
from moe2.agent.engine import LlamaEngine
from moe2.agent.meters import ManualMeter
from moe2.agent.textmode import spell
from moe2.shared import wire
from moe2.tools.models.fixtures import make_real_vocab_expert
from tests.agent_helpers import agent_config
from tests.conftest import RealGgufs

TEXTS = [
    " Paris is the capital of France, and Berlin is Germany's.",
    "\n\n  def f(x):\n\treturn x ** 2  # squares\n",
    " 日本語のテキスト and 中文 mixed with emoji 🚀🎉 and ünïcödé.",
    " a▁b c\u00a0d  \u2581 spaces",
]


@pytest.fixture(scope="module")
def engines(real_ggufs: RealGgufs, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[dict[str, LlamaEngine]]:
    phi = make_real_vocab_expert(tmp_path_factory.mktemp("phi"), "phi-3")
    out = {name: LlamaEngine(str(e.path), n_ctx=512, max_sessions=2)
           for name, e in (("qwen2", real_ggufs.qwen2), ("llama3", real_ggufs.llama3),
                           ("spm", real_ggufs.spm), ("phi3", phi))}
    yield out
    for e in out.values():
        e.close()


def _daemon(engine: LlamaEngine) -> AgentDaemon:
    return AgentDaemon(agent_config("t", n_ctx=512, max_sessions=2), engine, ManualMeter(),
                       lambda will: None)  # type: ignore[arg-type,return-value]


def _reply(d: AgentDaemon, msg: object) -> wire.Reply:
    [r] = d.process([Work(msg, None, "moe2/coordinators/t/inbox", None)])  # type: ignore[arg-type]
    assert r is not None
    return r


@pytest.mark.parametrize("writer", ["qwen2", "llama3", "spm", "phi3"])
@pytest.mark.parametrize("reader", ["qwen2", "llama3", "spm", "phi3"])
def test_an_agent_follows_another_tokenizers_text_byte_exactly(
        engines: dict[str, LlamaEngine], writer: str, reader: str) -> None:
    w, r = engines[writer], engines[reader]
    d, wd = _daemon(r), _daemon(w)
    for text in TEXTS:
        # the writer's tokens of the text mid-answer, as the coordinator would emit them
        # (byte tokens where its tokenizer cannot spell the text: SentencePiece and U+2581)
        units = [w.info.pieces[t] for t in spell(text.encode(), wd.text.piece_index,
                                                  wd.text._tokenize_mid)]
        assert b"".join(units) == text.encode(), (writer, text)
        sid = uuid.uuid4().hex[:8]
        opened = _reply(d, wire.OpenSession(session_id=sid, k=8, prompt="Q:", raw=True))
        assert not opened.errors, opened.errors
        evaluated = []
        for seq, unit in enumerate(units, 1):
            hint = next(iter(d.text.piece_index.exact(unit)), -1) if reader == writer else -1
            rep = _reply(d, wire.Step(items=[wire.StepItem(sid, hint, seq, 8, unit)]))
            assert not rep.errors, (reader, writer, text, rep.errors)
            [dist] = rep.dists
            evaluated.append(dist.n_evaluated)
            if dist.pending:  # healed: every offered token begins with the pending bytes
                assert all(r.info.pieces[t].startswith(dist.pending) and
                           r.info.pieces[t] != dist.pending for t in dist.id_array())
        closed = _reply(d, wire.CloseSession(session_ids=[sid], report=True))
        [ctx] = closed.contexts
        assert ctx.answer + ctx.pending == text.encode(), (reader, writer, text, ctx)
        # extended only at the end: every token of its context decoded once, never the
        # history again; a step decodes its own tokens for the bytes it settles (usually one,
        # at most what a held token's bytes spell)
        assert sum(evaluated) + opened.dists[0].n_evaluated == ctx.tokens
        assert max(evaluated) <= 16, evaluated
        held_steps = sum(1 for e in evaluated if e == 0)
        assert held_steps <= len(units), evaluated
        if reader == writer:  # its own tokens with the hint: one a step, nothing pending
            assert evaluated == [1] * len(units) and not ctx.pending



def test_a_heal_over_most_of_a_vocabulary(engines: dict[str, LlamaEngine]) -> None:
    """Pending b" " in Qwen2: 53,021 tokens begin with it (their text lengths are an array
    lookup: a Python loop over them took 21 ms a step). The same as the definition."""
    import numpy as np

    from moe2.agent.textmode import PieceIndex, heal

    pieces = engines["qwen2"].info.pieces
    index = PieceIndex(pieces)
    logits = np.random.default_rng(0).standard_normal(len(pieces)).astype(np.float32)
    h = heal(logits, b" ", index, 64)
    cand = [i for i, p in enumerate(pieces) if p.startswith(b" ")]
    assert len(cand) > 50_000
    p = np.exp(logits[cand].astype(np.float64) - logits[cand].max())
    p /= p.sum()
    exact = [j for j, i in enumerate(cand) if pieces[i] == b" "]
    assert h.exact_id == cand[exact[0]] and h.exact_mass == pytest.approx(p[exact].sum())
    longer = np.delete(p, exact)
    assert h.probs[0] == pytest.approx(longer.max() / longer.sum())
    assert all(pieces[int(t)].startswith(b" ") and pieces[int(t)] != b" " for t in h.ids)
