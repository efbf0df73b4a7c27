"""Domain experts with real tokenizers (issue 14): a compacted vocabulary exports exactly, the
training sequences are the ones an agent scores, and make-experts builds a mixed fleet."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import llama_cpp  # noqa: F401 - the experts are read back with llama.cpp
import numpy as np
import pytest
import torch

from moe2.tools.fleet.harness import moe2_argv
from moe2.tools.models import LlamaSpec, write_gguf
from moe2.tools.models.real_vocab import VocabMissingError
from moe2.tools.offline.experts import load_manifest
from moe2.tools.offline.experts_eval import ExpertRunner
from moe2.tools.offline.real_tokenizers import MIXED, Codec, parse_tokenizers, tokenizer_for
from moe2.tools.offline.torch_llama import TorchLlama

PAIRS = [("Q: What is the capital of France? A:", "Paris"),
         ("Q: What is the opposite of the word small? A:", "big"),
         ("Q: Express 11 kilograms in grams. A:", "11000")]


@pytest.mark.parametrize("name", ["llama-spm", "qwen2"])
def test_a_compacted_expert_exports_into_its_full_vocabulary_exactly(
        tmp_path: Path, name: str) -> None:
    """llama.cpp's softmax over the full vocabulary of the exported GGUF equals the compact
    model's, id for id, and the unused ids together hold exactly OTHER's mass."""
    codec = Codec.build(name, PAIRS)
    try:
        assert codec.n_compact < 200 < codec.tok.size
        spec = LlamaSpec(n_vocab=codec.n_compact, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                         ffn_dim=64, n_ctx_train=64)
        model = TorchLlama.random(spec, seed=7)
        model.logit_offset = torch.from_numpy(codec.logit_offset())
        tokens, mask = codec.encode_example(*PAIRS[0])
        assert len(mask) == len(tokens) - 1
        with torch.no_grad():
            compact = torch.softmax(model(torch.tensor([tokens]))[0].double(), -1).numpy()
        path = tmp_path / f"{name}.gguf"
        write_gguf(path, dataclasses.replace(spec, n_vocab=codec.tok.size),
                   codec.export(model.gguf_weights()), codec.tok, name=name)
    finally:
        codec.close()
    full_ids = [int(codec.used[t]) for t in tokens]
    with ExpertRunner(path) as runner:
        logits = runner.logits(full_ids)
    full = np.exp(logits - logits.max(axis=1, keepdims=True))
    full /= full.sum(axis=1, keepdims=True)
    unused = np.ones(codec.tok.size, dtype=bool)
    unused[codec.used] = False
    np.testing.assert_allclose(full[:, codec.used], compact[:, :-1], rtol=2e-3, atol=1e-7)
    np.testing.assert_allclose(full[:, unused].sum(axis=1), compact[:, -1], rtol=2e-3,
                               atol=1e-7)


@pytest.mark.parametrize("name", ["qwen2", "llama-bpe", "llama-spm"])
def test_training_sequences_are_what_an_agent_reads(name: str) -> None:
    """Prompt with the vocabulary's own BOS rule, the answer as it follows the prompt in one
    tokenisation (its text is " " + answer), then EOS."""
    codec = Codec.build(name, PAIRS)
    try:
        for prompt, answer in PAIRS:
            tokens, mask = codec.encode_example(prompt, answer, prompt_loss_weight=0.25)
            ids = [int(codec.used[t]) for t in tokens]
            n_prompt = mask.count(0.25) + 1
            assert ids[-1] == codec.tok.eos_id
            assert (ids[0] == codec.tok.bos_id) == (name != "qwen2")
            answer_text = b"".join(codec.tok.tokens[i] for i in ids[n_prompt:-1])
            spaced = answer_text.replace("\u2581".encode(), b" ").replace("\u0120".encode(), b" ")
            assert spaced == f" {answer}".encode()
    finally:
        codec.close()


def test_tokenizer_lists() -> None:
    assert parse_tokenizers("mixed") == MIXED
    assert parse_tokenizers("spm, qwen2") == ("spm", "qwen2")
    assert [tokenizer_for(MIXED, k) for k in range(4)] == [*MIXED, MIXED[0]]
    with pytest.raises(VocabMissingError, match=r"install\.sh"):
        parse_tokenizers("no-such-vocab")
    with pytest.raises(ValueError, match="empty"):
        parse_tokenizers(" , ")


def test_make_experts_builds_a_mixed_fleet(tmp_path: Path) -> None:
    out = tmp_path / "mixed"
    proc = subprocess.run(
        moe2_argv("make-experts", "--out", str(out), "--tiny", "--experts", "3",
                  "--tokenizers", "mixed", "--base-steps", "5", "--finetune-steps", "5",
                  "--json"), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [e["tokenizer"] for e in result["experts"]] == list(MIXED)
    m = load_manifest(out)
    assert m.vocab_fingerprint == ""  # several tokenizers
    for e, size in zip(m.experts, (151_936, 128_256, 32_000), strict=True):
        assert e.n_vocab == size
        with ExpertRunner(out / e.gguf) as runner:
            assert runner.n_vocab == size
    refused = subprocess.run(
        moe2_argv("make-experts", "--out", str(tmp_path / "x"), "--tiny", "--experts", "3",
                  "--tokenizers", "mixed", "--calibrate"), capture_output=True, text=True,
        timeout=120, check=False)
    assert refused.returncode == 2 and "moe2 calibrate --broker" in refused.stderr
