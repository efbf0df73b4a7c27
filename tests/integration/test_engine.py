"""LlamaEngine against plain llama-cpp-python: logits, KV-cache accounting, batching,
sequence reuse, tokenisation, chat templates, metadata; and the pure softmax/top-k."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moe2.agent.engine import DecodeJob, EngineError, LlamaEngine, softmax_topk, vocab_fingerprint
from moe2.tools import models as gm
from tests.agent_helpers import assert_not_degenerate, llama_greedy, llama_tokenize, softmax64
from tests.conftest import Ggufs

PROMPT = "Q: What is 12 plus 7? A:"


@pytest.fixture(scope="module")
def fleet(ggufs: Ggufs) -> Ggufs:
    return ggufs


@pytest.fixture
def engine(fleet: Ggufs) -> Iterator[LlamaEngine]:
    eng = LlamaEngine(str(fleet.shared[1].path), n_ctx=128, max_sessions=4, n_threads=2)
    try:
        yield eng
    finally:
        eng.close()


def greedy(eng: LlamaEngine, seq_id: int, tokens: list[int], n_steps: int,
           follow: list[int] | None = None) -> tuple[list[int], list[np.ndarray]]:
    out = [softmax64(eng.decode([DecodeJob(seq_id, tokens, 0)])[0])]
    n_past = len(tokens)
    fed = []
    for i in range(n_steps):
        tok = follow[i] if follow is not None else int(np.argmax(out[-1]))
        out.append(softmax64(eng.decode([DecodeJob(seq_id, [tok], n_past)])[0]))
        fed.append(tok)
        n_past += 1
    return fed, out


@pytest.mark.parametrize(("kv_type", "n_batch"), [("f16", 512), ("f32", 512), ("f16", 4)])
def test_distributions_equal_plain_llama(fleet: Ggufs, kv_type: str, n_batch: int) -> None:
    """Same KV type, flash attention off on both sides: the engine computes what a plain
    ``llama_cpp.Llama`` does (also when the prompt is split into several n_batch chunks)."""
    for ex in fleet.shared[:2]:
        eng = LlamaEngine(str(ex.path), n_ctx=128, max_sessions=4, n_threads=2,
                          kv_type=kv_type, n_batch=n_batch)
        try:
            tokens = eng.tokenize(PROMPT, add_bos=True, parse_special=False)
            if n_batch < 512:
                assert len(tokens) > 2 * n_batch  # several chunks
            fed, ref = llama_greedy(ex.path, tokens, 10, n_ctx=128, kv_type=kv_type)
            _fed, got = greedy(eng, 2, tokens, 10, follow=fed)
        finally:
            eng.close()
        for g, r in zip(got, ref, strict=True):
            assert_not_degenerate(r)
            np.testing.assert_allclose(g, r, rtol=0, atol=1e-5)


def test_evaluated_tokens_counts_only_new_tokens(engine: LlamaEngine) -> None:
    tokens = engine.tokenize(PROMPT, add_bos=True, parse_special=False)
    before = engine.evaluated_tokens
    engine.decode([DecodeJob(0, tokens, 0)])
    assert engine.evaluated_tokens - before == len(tokens)
    for i in range(30):
        before = engine.evaluated_tokens
        engine.decode([DecodeJob(0, [40 + i], len(tokens) + i)])
        assert engine.evaluated_tokens - before == 1
    before = engine.evaluated_tokens
    engine.decode([DecodeJob(1, [1, 5], 0), DecodeJob(2, [1, 6, 7], 0)])
    assert engine.evaluated_tokens - before == 5


def test_batched_decode_equals_separate_decodes(fleet: Ggufs) -> None:
    """Several sequences in one llama_decode call get what each gets alone (f32 KV: with f16
    a multi-token round rounds differently, ~1e-3 in the logits)."""
    eng = LlamaEngine(str(fleet.shared[0].path), n_ctx=64, max_sessions=4, n_threads=2,
                      kv_type="f32")
    try:
        prompts = [eng.tokenize(p, add_bos=True, parse_special=False)
                   for p in ("The capital of France is", "A spider has", "Reverse apple:")]
        alone = [greedy(eng, i, t, 4) for i, t in enumerate(prompts)]
        for i in range(len(prompts)):
            eng.free(i)
        together = [[softmax64(x)] for x in
                    eng.decode([DecodeJob(i, t, 0) for i, t in enumerate(prompts)])]
        n_past = [len(t) for t in prompts]
        for step in range(4):
            logits = eng.decode([DecodeJob(i, [alone[i][0][step]], n_past[i])
                                 for i in range(len(prompts))])
            for i, lg in enumerate(logits):
                together[i].append(softmax64(lg))
                n_past[i] += 1
    finally:
        eng.close()
    for (_fed, a), t in zip(alone, together, strict=True):
        for x, y in zip(a, t, strict=True):
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)
    assert np.abs(together[0][-1] - together[1][-1]).max() > 1e-3


@pytest.mark.parametrize(("n_ctx", "max_sessions"), [(100, 3), (257, 2)])
def test_every_session_holds_its_full_context_at_once(fleet: Ggufs, n_ctx: int,
                                                      max_sessions: int) -> None:
    """Each session has its own KV stream of at least ``n_ctx`` cells, all full at the same
    time (sizes llama.cpp does not divide evenly included), and a full one does not disturb
    the others: the last step of each session equals that sequence decoded alone."""
    eng = LlamaEngine(str(fleet.shared[0].path), n_ctx=n_ctx, max_sessions=max_sessions,
                      n_threads=1, kv_type="f32")
    try:
        tokens = [[1] + [(7 * s + i) % 200 + 3 for i in range(n_ctx - 1)]
                  for s in range(max_sessions)]
        last: list[np.ndarray] = []
        for pos in range(0, n_ctx, 40):  # interleaved chunks, every session in each call
            out = eng.decode([DecodeJob(s, tokens[s][pos:pos + 40], pos)
                              for s in range(max_sessions)])
            last = [softmax64(x) for x in out]
        for s in range(max_sessions):
            eng.free(s)
        for s in range(max_sessions):
            alone = softmax64(eng.decode([DecodeJob(0, tokens[s], 0)])[0])
            eng.free(0)
            np.testing.assert_allclose(last[s], alone, rtol=0, atol=1e-5)
    finally:
        eng.close()


def test_jobs_out_of_seq_order_get_their_own_logits(fleet: Ggufs) -> None:
    """decode orders a batch by seq_id (consecutive ids share a ubatch); the logits still come
    back in the order of the jobs given."""
    eng = LlamaEngine(str(fleet.shared[0].path), n_ctx=64, max_sessions=4, n_threads=1,
                      kv_type="f32")
    try:
        prompts = {3: [1, 40, 41], 0: [1, 50], 2: [1, 60, 61, 62]}
        alone = {}
        for sid, toks in prompts.items():
            alone[sid] = softmax64(eng.decode([DecodeJob(sid, toks, 0)])[0])
            eng.free(sid)
        together = eng.decode([DecodeJob(sid, toks, 0) for sid, toks in prompts.items()])
    finally:
        eng.close()
    for (sid, _toks), lg in zip(prompts.items(), together, strict=True):
        np.testing.assert_allclose(softmax64(lg), alone[sid], rtol=0, atol=1e-5)


def test_free_clears_the_sequence_for_reuse(engine: LlamaEngine) -> None:
    tokens = engine.tokenize(PROMPT, add_bos=True, parse_special=False)
    _fed, first = greedy(engine, 3, tokens, 5)
    engine.free(3)
    _fed, again = greedy(engine, 3, tokens, 5)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    # without free, the old cells would still be attended to: llama.cpp refuses or differs
    try:
        _fed, stale = greedy(engine, 3, tokens, 0)
    except EngineError:
        return
    assert not np.allclose(stale[0], first[0], atol=1e-6)


def test_decode_on_an_unknown_sequence_is_an_engine_error(engine: LlamaEngine) -> None:
    with pytest.raises(EngineError):
        engine.decode([DecodeJob(99, [1, 5], 0)])


def test_model_info(fleet: Ggufs) -> None:
    infos = []
    for ex in [*fleet.shared, fleet.mismatch]:
        eng = LlamaEngine(str(ex.path), n_ctx=32, max_sessions=1, n_threads=1)
        try:
            infos.append((ex, eng.info))
        finally:
            eng.close()
    for ex, info in infos:
        assert info.name == ex.name
        assert info.quant == "F32"
        assert info.n_vocab == ex.spec.n_vocab == len(info.pieces)
        assert info.n_ctx == 32
        assert (info.bos_id, info.eos_id) == (1, 2)
        assert info.n_params == ex.n_params
        assert (info.chat_template is not None) == (ex.chat_template is not None)
    fps = [info.vocab_fp for _ex, info in infos]
    assert fps[0] == fps[1] == fps[2]
    assert fps[3] != fps[0]
    assert infos[2][1].chat_template == gm.SIMPLE_CHAT_TEMPLATE


def test_vocab_fingerprint_covers_text_and_attributes() -> None:
    base = vocab_fingerprint([b"a", b"bc"], [1, 2])
    assert base == vocab_fingerprint([b"a", b"bc"], [1, 2])
    assert base != vocab_fingerprint([b"ab", b"c"], [1, 2])
    assert base != vocab_fingerprint([b"a", b"bc"], [1, 4])
    assert base != vocab_fingerprint([b"a", b"bc", b""], [1, 2, 0])


def test_tokenize_matches_llama_cpp_and_sentencepiece(engine: LlamaEngine,
                                                      fleet: Ggufs) -> None:
    path = fleet.shared[1].path
    vocab = gm.default_vocab()
    for text in (PROMPT, "  two  spaces", "naïve café 🙂", "line\nbreak\ttab", "x"):
        ours = engine.tokenize(text, add_bos=True, parse_special=False)
        assert ours == llama_tokenize(path, text, add_bos=True)
        assert ours == vocab.encode(text, add_bos=True)
        assert engine.tokenize(text, add_bos=False, parse_special=False) == ours[1:]
    # special tokens are text unless parse_special
    assert engine.tokenize("<s>", add_bos=False, parse_special=True) == [1]
    assert engine.tokenize("<s>", add_bos=False, parse_special=False) != [1]
    long_text = "the sky is blue " * 200
    assert len(engine.tokenize(long_text, add_bos=True, parse_special=False)) > 400


def test_render_chat_matches_llama_cpp_formatter(fleet: Ggufs) -> None:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    ex = fleet.shared[2]
    assert ex.chat_template is not None
    messages = [("system", "Be brief."), ("user", "What is 2 plus 3?"),
                ("assistant", "5"), ("user", "And 4 plus 4?")]
    eng = LlamaEngine(str(ex.path), n_ctx=64, max_sessions=1, n_threads=1)
    try:
        ours = eng.render_chat(messages)
        assert eng.bos_text() == "<s>"
    finally:
        eng.close()
    chat: Any = [{"role": r, "content": c} for r, c in messages]
    ref = Jinja2ChatFormatter(template=ex.chat_template, eos_token="</s>", bos_token="<s>")(
        messages=chat).prompt
    assert ours == ref
    assert ours.endswith("<|assistant|>")


def test_render_chat_without_template_is_an_error(engine: LlamaEngine) -> None:
    with pytest.raises(EngineError, match="no chat template"):
        engine.render_chat([("user", "hi")])


def test_bad_inputs_are_engine_errors(tmp_path: Path, fleet: Ggufs) -> None:
    with pytest.raises(EngineError, match="does not exist"):
        LlamaEngine(str(tmp_path / "missing.gguf"), n_ctx=32, max_sessions=1)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(EngineError, match="could not load"):
        LlamaEngine(str(junk), n_ctx=32, max_sessions=1)
    with pytest.raises(EngineError, match="kv_type"):
        LlamaEngine(str(fleet.shared[0].path), n_ctx=32, max_sessions=1, kv_type="q4")


# --------------------------------------------------------------------------- softmax_topk


def test_softmax_topk_full_vocabulary() -> None:
    logits = np.array([1.0, 3.0, -2.0, 3.0], np.float32)
    ids, probs, rest = softmax_topk(logits, 0)
    assert ids is None
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs, softmax64(logits), rtol=1e-6, atol=1e-9)
    assert rest == 0.0
    ids, probs, rest = softmax_topk(logits, 4)  # k >= n_vocab is the full vocabulary too
    assert ids is None


def test_softmax_topk_sorted_with_rest_mass() -> None:
    rng = np.random.default_rng(0)
    logits = (3 * rng.standard_normal(500)).astype(np.float32)
    p = softmax64(logits)
    for k in (1, 8, 64, 499):
        ids, probs, rest = softmax_topk(logits, k)
        assert ids is not None
        assert ids.dtype == np.int32
        assert len(ids) == len(set(ids.tolist())) == k
        assert ids.tolist() == np.argsort(-p, kind="stable")[:k].tolist()
        np.testing.assert_allclose(probs, p[ids], rtol=1e-5, atol=1e-9)
        assert np.all(np.diff(probs) <= 0)
        assert rest == pytest.approx(1.0 - p[ids].sum(), abs=1e-6)


def test_softmax_topk_is_stable_for_huge_logits() -> None:
    logits = np.array([1e4, 1e4 - 1.0, -1e4], np.float32)
    ids, probs, _rest = softmax_topk(logits, 2)
    assert ids is not None
    assert ids.tolist() == [0, 1]
    assert np.isfinite(probs).all()
    assert probs[0] == pytest.approx(1 / (1 + np.exp(-1.0)))


@pytest.mark.parametrize("scale", [0.0, 1e-3, 3.0, 40.0])
def test_softmax_topk_at_a_real_vocabulary_size(scale: float) -> None:
    """Qwen2's 151,646 ids, logits from flat (every id tied: the lowest ids win) to peaked:
    float32 probabilities within 1e-6 of a float64 softmax, the same ids in the same order as
    a stable float64 argsort, and ``overwrite`` leaves the result the same."""
    rng = np.random.default_rng(7)
    logits = (scale * rng.standard_normal(151_646)).astype(np.float32)
    logits[[5, 99, 150_000]] = logits.max()  # ties at the top
    p = softmax64(logits)
    for k in (1, 64, 4096):
        ids, probs, rest = softmax_topk(logits, k)
        assert ids is not None
        assert ids.tolist() == np.argsort(-p, kind="stable")[:k].tolist()
        np.testing.assert_allclose(probs, p[ids], rtol=1e-5, atol=1e-9)
        assert rest == pytest.approx(1.0 - p[ids].sum(), abs=1e-5)
        again = softmax_topk(logits.copy(), k, overwrite=True)
        assert again[0] is not None
        assert again[0].tolist() == ids.tolist()
        np.testing.assert_array_equal(again[1], probs)
    before = logits.copy()
    _ids, full, _rest = softmax_topk(logits, 0)
    np.testing.assert_array_equal(logits, before)  # not overwritten unless asked
    np.testing.assert_allclose(full, p, rtol=1e-5, atol=1e-9)
    assert abs(float(full.sum(dtype=np.float64)) - 1.0) < 1e-5
