"""Offline GGUF test experts: tokenizer, writer, numpy reference, and llama.cpp agreeing."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import gguf
import numpy as np
import numpy.typing as npt
import pytest

from moe2.tools import models as gm
from tests.conftest import Ggufs

TEXTS = [
    "Q: What is 12 plus 7? A: 19.",
    "The capital of France is Paris.",
    "Reverse the word apple: elppa.",
    "the sky is blue, not green",
    "  two leading spaces and  a double space",
    "Numbers 0123456789 and symbols #$%&*!?",
    "Unicode falls back to bytes: naïve café, 日本語, 🙂",
    "line one\nline two\ttab",
    "UPPER lower MiXeD",
    "x",
]


ALPHABET = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    " .,:;?!'\"-\n\t()<>/#é日🙂\u00a0\r"
)


@pytest.fixture(scope="module")
def fleet(ggufs: Ggufs) -> Ggufs:
    return ggufs


@pytest.fixture(scope="module")
def llama_cpp() -> ModuleType:
    import llama_cpp as module

    return module


def _open(llama_cpp: ModuleType, path: Path, **kwargs: Any) -> Any:
    return llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=2, logits_all=False,
                           verbose=False, **kwargs)


def _last_logits(llama_cpp: ModuleType, llm: Any) -> npt.NDArray[np.float64]:
    """Logits of the last evaluated position (``Llama.scores`` stays zero without logits_all)."""
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).astype(np.float64)


def _softmax(logits: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    out: npt.NDArray[np.float64] = z / z.sum(axis=-1, keepdims=True)
    return out


def _all(fleet: Ggufs) -> Iterator[gm.ExpertFile]:
    yield from fleet.shared
    yield fleet.mismatch


# ---------------------------------------------------------------- pure (no llama.cpp)


def test_corpus_is_deterministic_and_varied() -> None:
    a = gm.synthetic_corpus(500, seed=3)
    assert a == gm.synthetic_corpus(500, seed=3)
    assert a != gm.synthetic_corpus(500, seed=4)
    assert len(set(a)) > 300
    assert all("\n" not in s for s in a)


def test_vocab_training_is_deterministic() -> None:
    corpus = gm.synthetic_corpus(1000)
    v1 = gm.train_spm_tokenizer(corpus, 400)
    v2 = gm.train_spm_tokenizer(corpus, 400)
    assert v1 == v2
    assert v1.fingerprint() == v2.fingerprint()
    assert v1.model_proto == v2.model_proto


def test_vocab_structure() -> None:
    v = gm.default_vocab()
    assert v.size == 512
    assert (v.unk_id, v.bos_id, v.eos_id) == (0, 1, 2)
    assert v.types[v.unk_id] == gguf.TokenType.UNKNOWN
    assert v.types[v.bos_id] == v.types[v.eos_id] == gguf.TokenType.CONTROL
    byte_tokens = [t for t, k in zip(v.tokens, v.types, strict=True) if k == gguf.TokenType.BYTE]
    assert byte_tokens == [f"<0x{b:02X}>" for b in range(256)]
    assert "▁the" in v.tokens
    assert v.decode(v.encode("The capital of France is Paris.")) == (
        "The capital of France is Paris.")


def test_vocab_save_load(tmp_path: Path) -> None:
    v = gm.default_vocab()
    v.save(tmp_path / "spm.model")
    loaded = gm.SpmVocab.load(tmp_path / "spm.model")
    assert loaded == v
    assert loaded.fingerprint() == v.fingerprint()


def test_other_vocab_differs_at_same_size() -> None:
    a, b = gm.default_vocab(), gm.other_vocab()
    assert a.size == b.size
    assert a.fingerprint() != b.fingerprint()
    assert gm.default_vocab() is a  # cached per size


def test_fingerprint_covers_types() -> None:
    assert gm.fingerprint_tokens(["a", "b"], [1, 1]) != gm.fingerprint_tokens(["a", "b"], [1, 3])
    assert gm.fingerprint_tokens(["ab", ""], [1, 1]) != gm.fingerprint_tokens(["a", "b"], [1, 1])
    with pytest.raises(ValueError, match="token types"):
        gm.fingerprint_tokens(["a"], [])


def test_spec_validation_and_param_count() -> None:
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        gm.LlamaSpec(n_vocab=10, dim=64, n_layers=1, n_heads=4, n_kv_heads=3, ffn_dim=8)
    spec = gm.LlamaSpec(n_vocab=512, dim=96, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=256)
    weights = gm.random_weights(spec, 1)
    assert spec.n_params == sum(w.size for w in weights.values())
    assert weights["blk.0.attn_k.weight"].shape == (48, 96)
    assert not np.array_equal(weights["output.weight"], gm.random_weights(spec, 2)["output.weight"])


def test_rope_is_relative_and_adjacent_pair() -> None:
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((1, 1, 8)), rng.standard_normal((1, 1, 8))

    def rot(x: npt.NDArray[np.float64], pos: float) -> npt.NDArray[np.float64]:
        return gm.llama._rope_norm(x, np.array([pos]), 10000.0)

    # Dot products depend only on the position difference.
    near = float(np.sum(rot(q, 5) * rot(k, 2)))
    assert near == pytest.approx(float(np.sum(rot(q, 13) * rot(k, 10))))
    # NORM mode: the first pair (x0, x1) rotates by exactly pos radians (theta^0 = 1).
    x = np.zeros((1, 1, 8))
    x[0, 0, 0] = 1.0
    np.testing.assert_allclose(rot(x, 0.5)[0, 0, :2], [math.cos(0.5), math.sin(0.5)])
    np.testing.assert_allclose(rot(x, 0.5)[0, 0, 2:], 0.0)


def test_reference_is_causal() -> None:
    spec = gm.LlamaSpec(n_vocab=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
    w = gm.random_weights(spec, 5)
    toks = [1, 40, 300, 77, 5, 9]
    full = gm.reference_logits(spec, w, toks)
    np.testing.assert_allclose(gm.reference_logits(spec, w, toks[:3]), full[:3], atol=1e-12)
    assert not np.allclose(full[2], full[3])


def test_fleet_shares_vocab_and_is_heterogeneous(fleet: Ggufs) -> None:
    prints = {e.fingerprint for e in fleet.shared}
    assert prints == {gm.default_vocab().fingerprint()}
    assert fleet.mismatch.fingerprint != fleet.shared[0].fingerprint
    assert fleet.mismatch.spec.n_vocab == fleet.shared[0].spec.n_vocab
    assert len({e.spec for e in fleet.shared}) == 3
    assert len({e.seed for e in fleet.shared}) == 3
    assert any(e.spec.n_kv_heads < e.spec.n_heads for e in fleet.shared)
    assert [e.chat_template is not None for e in fleet.shared] == [False, False, True]


def test_read_gguf_round_trip(fleet: Ggufs) -> None:
    for e in _all(fleet):
        model = gm.read_gguf(e.path)
        assert model.name == e.name
        assert model.spec == e.spec
        assert model.vocab.fingerprint() == e.fingerprint
        assert model.chat_template == e.chat_template
        expected = e.weights()
        assert set(model.weights) == set(expected)
        for key, value in expected.items():
            np.testing.assert_array_equal(model.weights[key], value, err_msg=key)


def test_gqa_metadata(fleet: Ggufs) -> None:
    gqa = [e for e in fleet.shared if e.spec.n_kv_heads < e.spec.n_heads]
    assert gqa
    for e in gqa:
        reader = gguf.GGUFReader(e.path)
        heads = reader.get_field("llama.attention.head_count")
        kv = reader.get_field("llama.attention.head_count_kv")
        assert heads is not None
        assert kv is not None
        assert kv.contents() < heads.contents()
        arch = reader.get_field("general.architecture")
        assert arch is not None
        assert arch.contents() == "llama"


def test_reference_distributions_non_degenerate(fleet: Ggufs) -> None:
    vocab = gm.default_vocab()
    toks = vocab.encode(" ".join(TEXTS[:4]))
    per_expert = []
    for e in fleet.shared:
        probs = _softmax(gm.reference_logits(e.spec, e.weights(), toks))
        top = probs.max(axis=-1)
        assert np.median(top) > 0.05
        assert np.median(top) < 0.9
        assert top.max() < 0.999
        per_expert.append(probs)
    # Heterogeneous experts disagree.
    assert np.abs(per_expert[0] - per_expert[1]).max() > 0.05


# ---------------------------------------------------------------- llama.cpp


def test_llama_cpp_loads_and_reads_metadata(llama_cpp: ModuleType, fleet: Ggufs) -> None:
    for e in _all(fleet):
        llm = _open(llama_cpp, e.path)
        assert llm.n_vocab() == e.spec.n_vocab
        assert llm.metadata["general.name"] == e.name
        assert int(llm.metadata["llama.attention.head_count_kv"]) == e.spec.n_kv_heads
        assert int(llm.metadata["llama.attention.head_count"]) == e.spec.n_heads
        assert ("tokenizer.chat_template" in llm.metadata) == (e.chat_template is not None)
        assert llm.token_bos() == 1
        assert llm.token_eos() == 2


def test_llama_cpp_tokenizer_matches_sentencepiece(llama_cpp: ModuleType, fleet: Ggufs) -> None:
    for e, vocab in ((fleet.shared[0], gm.default_vocab()), (fleet.mismatch, gm.other_vocab())):
        llm = _open(llama_cpp, e.path)
        rng = random.Random(0)
        noise = ["".join(rng.choices(ALPHABET, k=rng.randrange(30))) for _ in range(200)]
        for text in [*TEXTS, *gm.synthetic_corpus(50, seed=9), *noise]:
            ours = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
            assert ours == vocab.encode(text), text
            # Llama.detokenize drops the dummy-prefix space only when the list starts with BOS.
            assert llm.detokenize(ours).decode("utf-8") == vocab.decode(ours), text


def test_llama_cpp_vocab_fingerprint(llama_cpp: ModuleType, fleet: Ggufs) -> None:
    """An agent can rebuild the fingerprint from llama.cpp alone (text + attribute per token)."""
    attr_to_type = {
        llama_cpp.LLAMA_TOKEN_ATTR_NORMAL: gguf.TokenType.NORMAL,
        llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN: gguf.TokenType.UNKNOWN,
        llama_cpp.LLAMA_TOKEN_ATTR_CONTROL: gguf.TokenType.CONTROL,
        llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED: gguf.TokenType.USER_DEFINED,
        llama_cpp.LLAMA_TOKEN_ATTR_UNUSED: gguf.TokenType.UNUSED,
        llama_cpp.LLAMA_TOKEN_ATTR_BYTE: gguf.TokenType.BYTE,
    }
    mask = sum(attr_to_type)
    for e in _all(fleet):
        llm = _open(llama_cpp, e.path)
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        texts, types = [], []
        for i in range(llm.n_vocab()):
            texts.append(llama_cpp.llama_vocab_get_text(vocab, i).decode("utf-8"))
            types.append(int(attr_to_type[llama_cpp.llama_vocab_get_attr(vocab, i) & mask]))
        assert gm.fingerprint_tokens(texts, types) == e.fingerprint


# llama.cpp's default KV cache is f16, which alone moves logits by up to ~5e-3; the 1e-3
# agreement holds for an f32 GGUF with an f32 KV cache (measured: ~4e-6).
@pytest.mark.parametrize(("kv_type", "atol"), [("f32", 1e-3), ("f16", 2e-2)])
def test_llama_cpp_logits_match_reference(
    llama_cpp: ModuleType, fleet: Ggufs, kv_type: str, atol: float
) -> None:
    ggml_type = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16}[kv_type]
    text = "Q: What is 12 plus 7? A: 19. The capital of France is"
    for e in _all(fleet):
        vocab = gm.default_vocab() if e is not fleet.mismatch else gm.other_vocab()
        toks = vocab.encode(text)
        ref = gm.reference_logits(e.spec, e.weights(), toks)
        llm = _open(llama_cpp, e.path, type_k=ggml_type, type_v=ggml_type)

        # Whole prompt in one batch: only the last position has logits.
        llm.reset()
        llm.eval(toks)
        last = _last_logits(llama_cpp, llm)
        assert np.abs(last).max() > 0.5  # not the zero array
        np.testing.assert_allclose(last, ref[-1], atol=atol, rtol=0, err_msg=e.name)

        # One token at a time: every position.
        llm.reset()
        for pos, tok in enumerate(toks):
            llm.eval([tok])
            np.testing.assert_allclose(_last_logits(llama_cpp, llm), ref[pos], atol=atol,
                                       rtol=0, err_msg=f"{e.name} position {pos}")


def test_llama_cpp_distributions_non_degenerate(llama_cpp: ModuleType, fleet: Ggufs) -> None:
    toks = gm.default_vocab().encode("Reverse the word apple:")
    lasts = []
    for e in fleet.shared:
        llm = _open(llama_cpp, e.path)
        llm.eval(toks)
        probs = _softmax(_last_logits(llama_cpp, llm))
        assert 0.02 < probs.max() < 0.95
        assert -(probs * np.log(probs)).sum() > 1.0  # nats; uniform over 512 is 6.2
        lasts.append(probs)
    assert np.abs(lasts[0] - lasts[1]).max() > 0.01


def test_llama_cpp_f16_file(llama_cpp: ModuleType, tmp_path: Path) -> None:
    (e,) = gm.make_test_experts(tmp_path, count=1, seeds=[77], file_type="f16")
    assert e.path.stat().st_size < 0.6 * e.n_params * 4
    toks = gm.default_vocab().encode("The capital of Peru is Lima.")
    ref = gm.reference_logits(e.spec, e.weights(), toks)
    llm = _open(llama_cpp, e.path, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    llm.eval(toks)
    # llama.cpp rounds activations to f16 for f16 matmuls: agreement is looser than for f32.
    np.testing.assert_allclose(_last_logits(llama_cpp, llm), ref[-1], atol=2e-2, rtol=0)


def test_llama_cpp_chat_template(llama_cpp: ModuleType, fleet: Ggufs) -> None:
    e = fleet.shared[2]
    llm = _open(llama_cpp, e.path)
    assert llm.metadata["tokenizer.chat_template"] == gm.SIMPLE_CHAT_TEMPLATE
    out = llm.create_chat_completion(
        messages=[{"role": "user", "content": "What is 2 plus 2?"}], max_tokens=4, seed=1)
    assert out["choices"][0]["message"]["role"] == "assistant"


def test_llama_cpp_generates(llama_cpp: ModuleType, fleet: Ggufs) -> None:
    llm = _open(llama_cpp, fleet.shared[1].path)
    out = llm("The capital of France is", max_tokens=8, temperature=0.0)
    assert isinstance(out["choices"][0]["text"], str)
    assert out["usage"]["completion_tokens"] >= 1


@pytest.mark.slow
def test_large_expert(llama_cpp: ModuleType, tmp_path: Path) -> None:
    e = gm.make_large_expert(tmp_path)
    assert e.n_params >= 50_000_000
    reader = gguf.GGUFReader(e.path)
    assert sum(int(t.n_elements) for t in reader.tensors) == e.n_params
    assert e.fingerprint == gm.default_vocab().fingerprint()
    llm = _open(llama_cpp, e.path)
    llm.eval(gm.default_vocab().encode("Count from 3 to 7:"))
    probs = _softmax(_last_logits(llama_cpp, llm))
    assert 0.01 < probs.max() < 0.99

