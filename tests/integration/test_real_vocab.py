"""Real tokenizers (llama.cpp's vocabulary GGUFs) in the agent's engine: llama.cpp's own
tokenizer test vectors round-trip through our tokenisation and through the token texts the
agent publishes (what the coordinator streams to phones with)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe2.agent.engine import LlamaEngine, family_size
from moe2.coordinator.textstream import TextStream
from moe2.tools.models.fixtures import make_real_vocab_expert
from moe2.tools.models.real_vocab import (
    GgufTokenizer,
    read_gguf_metadata,
    tokenizer_test_vectors,
    vocab_path,
)
from tests.conftest import RealGgufs

VOCABS = ("qwen2", "llama-bpe", "llama-spm", "phi-3")


@pytest.mark.parametrize("vocab", VOCABS)
def test_tokenizer_vectors_round_trip(vocab: str, tmp_path_factory: pytest.TempPathFactory,
                                      real_ggufs: RealGgufs) -> None:
    """Every vector: llama.cpp tokenises the text to the expected ids, and the published pieces
    of those ids stream back to the text byte for byte (SentencePiece adds its dummy space)."""
    known = {"qwen2": real_ggufs.qwen2, "llama-bpe": real_ggufs.llama3,
             "llama-spm": real_ggufs.spm}
    expert = known.get(vocab) or make_real_vocab_expert(tmp_path_factory.mktemp(vocab), vocab)
    engine = LlamaEngine(str(expert.path), n_ctx=256, max_sessions=1)
    spm = GgufTokenizer.load(vocab).model == "llama"
    try:
        vectors = tokenizer_test_vectors(vocab)
        assert len(vectors) >= 40
        for text, ids in vectors:
            assert engine.tokenize(text, add_bos=False, parse_special=False) == ids, text
            stream = TextStream(engine.info.pieces)
            out = "".join(stream.push(i) for i in ids) + stream.flush()
            assert out == (" " + text if spm and text else text), (text, out)
    finally:
        engine.close()


def test_padding_is_not_part_of_the_family(real_ggufs: RealGgufs) -> None:
    """Qwen2.5-7B's vocabulary padded to 152,064 and -3B's 151,936 keep the same tokens: the
    same family fingerprint and size, and no padding id is ever offered."""
    a = LlamaEngine(str(real_ggufs.qwen2.path), n_ctx=64, max_sessions=1)
    b = LlamaEngine(str(real_ggufs.qwen2_padded.path), n_ctx=64, max_sessions=1)
    try:
        assert (a.info.n_vocab_model, b.info.n_vocab_model) == (151_936, 152_064)
        assert a.info.vocab_fp == b.info.vocab_fp
        assert a.info.n_vocab == b.info.n_vocab < 151_936
        assert a.info.pieces == b.info.pieces
        assert not any(p.startswith(b"[PAD") for p in a.info.pieces)
        assert {151_643, 151_645} <= set(a.info.eog_ids)  # <|endoftext|>, <|im_end|>
        from moe2.agent.engine import DecodeJob

        tokens = a.tokenize("Hello world", add_bos=False, parse_special=False)
        (logits,) = b.decode([DecodeJob(0, tokens, 0)])
        assert logits.shape == (b.info.n_vocab,)  # the padding's logits are not even read
    finally:
        a.close()
        b.close()


def test_family_size_cuts_trailing_padding_only() -> None:
    unused, user, normal = 2, 16, 4
    texts = [b"a", b"[PAD1]", b"b", b"[PAD3]", b"x"]
    assert family_size(texts, [normal, user, normal, user, unused]) == 3
    assert family_size(texts[:3], [normal, user, normal]) == 3  # padding in the middle stays
    assert family_size([b"[PAD0]"], [user]) == 0


def test_fast_metadata_reader_agrees_with_gguf() -> None:
    import gguf

    path = vocab_path("llama-spm")
    ours = read_gguf_metadata(path)
    theirs = gguf.GGUFReader(path)
    field = theirs.get_field("tokenizer.ggml.tokens")
    assert field is not None
    assert ours["tokenizer.ggml.tokens"] == [bytes(field.parts[i]) for i in field.data]
    assert int(ours["tokenizer.ggml.eos_token_id"]) == 2  # type: ignore[call-overload]


def test_bench_experts_are_confident_fine_tunes(tmp_path: Path, real_ggufs: RealGgufs) -> None:
    """The benches' real-vocabulary pair: the base is sure of itself like a trained model (its
    greedy top-1 probability above the agents' speculate_min_p, where the default generator's
    151,936-token expert is flat and almost never speculated on), the fine-tune is the base's
    weights plus a little noise, and both files hold exactly the weights their ExpertFile
    regenerates."""
    import gguf
    import numpy as np

    from moe2.shared.config import SPECULATE_MIN_P
    from moe2.tools.bench.fusion import greedy_top1_p
    from moe2.tools.models.fixtures import CONFIDENT_LOGIT_STD

    out = tmp_path / "bench"
    base = make_real_vocab_expert(out, "qwen2", name="base", seed=4200,
                                  logit_std=CONFIDENT_LOGIT_STD)
    tuned = make_real_vocab_expert(out, "qwen2", name="tuned", seed=4200,
                                   logit_std=CONFIDENT_LOGIT_STD, perturb=0.05, perturb_seed=1)
    flat = real_ggufs.qwen2  # the default generator's
    tops = {e.name: sorted(greedy_top1_p(e.path, 16)) for e in (base, tuned, flat)}
    assert tops["base"][8] > 2 * SPECULATE_MIN_P
    assert tops["tuned"][8] > 2 * SPECULATE_MIN_P
    assert tops[flat.name][8] < SPECULATE_MIN_P
    written = {e.name: {t.name: np.asarray(t.data, dtype=np.float32).reshape(-1)
                        for t in gguf.GGUFReader(e.path).tensors} for e in (base, tuned)}
    for e in (base, tuned):
        for name, value in e.weights().items():
            np.testing.assert_array_equal(written[e.name][name], value.reshape(-1), err_msg=name)
    w_base, w_tuned = base.weights()["output.weight"], tuned.weights()["output.weight"]
    spread = float(np.std(w_tuned - w_base) / np.std(w_base))
    assert 0.03 < spread < 0.07  # 5 % of the matrix's spread, as perturb says
