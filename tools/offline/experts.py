"""``moe2 make-experts``: build K domain experts from scratch, offline (paper Appendix A).

Pipeline (:func:`make_experts`):

1. generate the mixed-domain QA corpus (:mod:`moe2.tools.offline.corpus`) and write its splits;
2. embed the training prompts with MiniLM (:mod:`moe2.tools.offline.embed`) and cluster them with
   k-means (K = number of experts); the other splits are assigned to the nearest centroid;
3. train a SentencePiece BPE vocabulary on the corpus text (shared by every expert);
4. train a small llama base model in PyTorch (:mod:`moe2.tools.offline.torch_llama`) briefly on the
   whole training split, so it knows the format but is weak everywhere;
5. fine-tune one copy per cluster on that cluster's training prompts (long enough to be good on
   them; the others are forgotten, which is what makes the experts complementary);
6. write each expert as an f32 GGUF and a 4-bit GGUF made by llama.cpp's own quantiser, plus
   ``manifest.json``.

Sequences are ``BOS + tokens(prompt) + tokens(answer) + EOS``: the prompt tokenised as is with
BOS (what llama.cpp does with a raw prompt), the answer tokenised separately (so it starts with
the dummy-prefix space piece). The loss weighs answer and EOS targets 1 and prompt targets
``prompt_loss_weight``.

Default recipe (:class:`ExpertsConfig`): 4 experts, dim 128, 2 layers, 4 heads (2 KV heads),
SwiGLU 384, vocabulary 768, ~0.59M parameters; base 200 steps, 300 fine-tuning steps per expert,
batch 32, one torch thread. About 80 s on the 2-core build machine. On the test split (seed 0,
greedy exact match in llama.cpp) each expert scores 0.84-1.00 on its own domain and ~0 on the
others (0.20-0.27 overall), the equal-weight mixture 0.40, oracle cluster routing 0.94, and a gate
trained on the calib split 0.94 -- for f32 and Q4_0 files alike.

The vocabulary is trained on the text of every split (it is only a tokenizer; the models see
the training split alone).

Real tokenizers (``ExpertsConfig.tokenizers``, ``--tokenizers qwen2,llama-bpe,llama-spm`` or
``mixed``): expert k gets the k-th name, cycled; each real one trains its own base model over the
ids the corpus uses and is exported into its full vocabulary, exactly
(:mod:`moe2.tools.offline.real_tokenizers`). A mixed fleet is what ``moe2 reproduce --tokenizers
mixed`` fuses across tokenizers.

Needs the ``train`` extra (torch, sentencepiece, gguf, scikit-learn, tqdm, llama-cpp-python).
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from moe2.tools.models import LlamaSpec, SpmVocab, train_spm_tokenizer, write_gguf
from moe2.tools.offline.corpus import SPLITS, Corpus, Sample, generate_corpus
from moe2.tools.offline.real_tokenizers import TRAINED, Codec, tokenizer_for

__all__ = [
    "MANIFEST_NAME",
    "ExpertEntry",
    "ExpertsConfig",
    "Manifest",
    "QuantType",
    "choose_quant",
    "encode_example",
    "file_sha256",
    "load_manifest",
    "make_experts",
    "quantize_gguf",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "moe2-experts"
MANIFEST_VERSION = 1
QuantType = Literal["q4_0", "q4_k_m", "q8_0"]


@dataclass(frozen=True)
class ExpertsConfig:
    """Every knob of the pipeline. :meth:`tiny` is the CI preset."""

    n_experts: int = 4
    seed: int = 0
    per_domain: int | None = 480
    vocab_size: int = 768
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 384
    #: llama.cpp pads every context to a multiple of 256 and warns when that exceeds the
    #: training context, so train for 256 positions (prompts use ~30).
    n_ctx_train: int = 256
    base_steps: int = 200
    base_lr: float = 3e-3
    finetune_steps: int = 300
    finetune_lr: float = 2e-3
    batch_size: int = 32
    #: weight of the prompt tokens in the loss (answer and EOS tokens weigh 1); a little
    #: prompt modelling makes the arithmetic expert generalise across templates
    prompt_loss_weight: float = 0.1
    quant: QuantType = "q4_0"
    #: torch threads; 1 is fastest on small models and robust on a busy machine (0 = torch's
    #: default, which can be 10x slower when other processes compete for the cores)
    threads: int = 1
    #: each expert's tokenizer, cycled: "spm" (trained on the corpus) or a llama.cpp
    #: vocabulary name (qwen2, llama-bpe, llama-spm, ...; see real_tokenizers)
    tokenizers: tuple[str, ...] = (TRAINED,)

    @classmethod
    def tiny(cls, **overrides: Any) -> ExpertsConfig:
        """A few-second build for tests: tiny corpus, tiny model, few steps."""
        base: dict[str, Any] = {
            "per_domain": 48, "vocab_size": 320, "dim": 64, "n_layers": 2, "n_heads": 2,
            "n_kv_heads": 1, "ffn_dim": 128, "base_steps": 30, "finetune_steps": 30,
            "batch_size": 32,
        }
        base.update(overrides)
        return cls(**base)

    def spec(self, n_vocab: int) -> LlamaSpec:
        return LlamaSpec(n_vocab=n_vocab, dim=self.dim, n_layers=self.n_layers,
                         n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                         ffn_dim=self.ffn_dim, n_ctx_train=self.n_ctx_train)


@dataclass(frozen=True)
class ExpertEntry:
    """One expert in the manifest (file names are relative to the manifest's directory)."""

    name: str
    cluster: int
    gguf: str  # relative to the manifest's directory
    gguf_q4: str
    quant: str
    family_mix: dict[str, int]
    train_samples: int
    size_bytes: int
    q4_size_bytes: int
    sha256: str
    q4_sha256: str
    final_loss: float
    tokenizer: str = TRAINED
    n_vocab: int = 0  # the exported vocabulary (0 in manifests written before tokenizers)


@dataclass(frozen=True)
class Manifest:
    """What ``manifest.json`` holds; paths are relative to :attr:`root`."""

    root: Path
    experts: tuple[ExpertEntry, ...]
    spec: LlamaSpec  # the first expert's training spec (the architecture every expert shares)
    vocab_fingerprint: str  # "" when the experts have different tokenizers
    splits: dict[str, str]
    clusters: dict[str, list[int]]  # split -> cluster id per sample, in file order
    corpus: dict[str, Any]
    config: dict[str, Any]
    timings_s: dict[str, float]

    def expert_paths(self, *, quantized: bool = False) -> dict[str, Path]:
        """name -> absolute GGUF path (the 4-bit file when ``quantized``)."""
        out: dict[str, Path] = {}
        for e in self.experts:
            out[e.name] = self.root / (e.gguf_q4 if quantized else e.gguf)
        return out

    def split_path(self, split: str) -> Path:
        return self.root / self.splits[split]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "experts": [dataclasses.asdict(e) for e in self.experts],
            "spec": dataclasses.asdict(self.spec),
            "n_params": self.spec.n_params,
            "vocab_fingerprint": self.vocab_fingerprint,
            "splits": self.splits,
            "clusters": self.clusters,
            "corpus": self.corpus,
            "config": self.config,
            "timings_s": self.timings_s,
        }


def load_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read ``manifest.json`` (or the directory that holds it)."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    raw = json.loads(p.read_text(encoding="utf-8"))
    if raw.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{p} is not a moe2 experts manifest")
    if raw.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{p}: unsupported manifest version {raw.get('version')}")
    try:
        return Manifest(
            root=p.parent,
            experts=tuple(ExpertEntry(**e) for e in raw["experts"]),
            spec=LlamaSpec(**raw["spec"]),
            vocab_fingerprint=str(raw["vocab_fingerprint"]),
            splits={str(k): str(v) for k, v in raw["splits"].items()},
            clusters={str(k): [int(c) for c in v] for k, v in raw["clusters"].items()},
            corpus=dict(raw["corpus"]),
            config=dict(raw["config"]),
            timings_s={str(k): float(v) for k, v in raw["timings_s"].items()},
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{p}: malformed manifest ({exc})") from None


# --------------------------------------------------------------------------- data


def encode_example(vocab: SpmVocab, sample: Sample, *, prompt_loss_weight: float = 0.0
                   ) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """``(tokens, loss_mask)`` of one training sequence (see the module doc)."""
    prompt = vocab.encode(sample.prompt, add_bos=True)
    answer = [*vocab.encode(sample.answer, add_bos=False), vocab.eos_id]
    tokens = (*prompt, *answer)
    mask = (prompt_loss_weight,) * (len(prompt) - 1) + (1.0,) * len(answer)
    return tokens, mask


def _cluster(embeddings: npt.NDArray[np.float32], k: int, seed: int) -> Any:
    from sklearn.cluster import KMeans

    if len(embeddings) < k:
        raise ValueError(f"{len(embeddings)} training prompts for {k} clusters")
    model = KMeans(n_clusters=k, n_init=10, random_state=seed)
    model.fit(embeddings)
    return model


def _order_clusters(labels: npt.NDArray[np.int64], samples: Sequence[Sample], k: int
                    ) -> list[int]:
    """A permutation that numbers clusters by their dominant family name (stable names)."""
    keys = []
    for c in range(k):
        fams = Counter(s.family for s, lab in zip(samples, labels, strict=True) if lab == c)
        keys.append((fams.most_common(1)[0][0] if fams else "~", c))
    order = [c for _, c in sorted(keys)]
    return [order.index(c) for c in range(k)]  # old id -> new id


# --------------------------------------------------------------------------- quantisation


_FTYPES: dict[str, str] = {
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
}
_BLOCK = {"q4_0": 32, "q4_k_m": 256, "q8_0": 32}


def choose_quant(spec: LlamaSpec, quant: QuantType) -> QuantType:
    """``quant`` when the model's widths are multiples of its block size (32 for Q4_0/Q8_0,
    256 for the K-quants), else the next type that fits (``q4_k_m`` -> ``q4_0`` -> ``q8_0``),
    with a logged note."""
    widths = {spec.dim, spec.ffn_dim}
    candidates: tuple[QuantType, ...] = (quant, "q4_0", "q8_0")
    for candidate in candidates:
        if all(w % _BLOCK[candidate] == 0 for w in widths):
            if candidate != quant:
                logger.warning("dims %s do not fit %s blocks; quantising to %s instead",
                               sorted(widths), quant, candidate)
            return candidate
    raise ValueError(f"dims {sorted(widths)} are not multiples of 32; cannot quantise")


def quantize_gguf(src: str | os.PathLike[str], dst: str | os.PathLike[str], quant: QuantType,
                  *, threads: int = 1) -> None:
    """Quantise with llama.cpp's own quantiser (``llama_model_quantize``); see
    :func:`choose_quant` for a type that fits the model."""
    import llama_cpp

    from moe2.tools.models.real_vocab import read_gguf_metadata

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, _FTYPES[quant])
    params.nthread = threads
    if int(read_gguf_metadata(src)["llama.embedding_length"]) % 256:  # type: ignore[call-overload]
        # llama.cpp wants Q6_K for output.weight, which needs rows of 256; say Q8_0 up front
        # instead of letting it fall back with a warning on stderr.
        params.output_tensor_type = llama_cpp.GGML_TYPE_Q8_0
    target = Path(dst)
    tmp = target.with_name(target.name + ".part")
    cpp_logger = logging.getLogger("llama-cpp-python")
    old_level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)  # llama.cpp logs every tensor otherwise
    try:
        rc = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(tmp),
                                            ctypes.byref(params))
    finally:
        cpp_logger.setLevel(old_level)
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize failed ({rc}) for {src}")
    os.replace(tmp, target)


# --------------------------------------------------------------------------- pipeline


def make_experts(out_dir: str | os.PathLike[str], config: ExpertsConfig | None = None, *,
                 progress: bool = True) -> Manifest:
    """Run the whole pipeline into ``out_dir`` and return the manifest it wrote."""
    from moe2.tools.offline.torch_llama import torch_threads

    cfg = config or ExpertsConfig()
    if cfg.n_experts < 1:
        raise ValueError("need at least one expert")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch_threads(cfg.threads):
        return _make_experts(out, cfg, progress=progress)


def _make_experts(out: Path, cfg: ExpertsConfig, *, progress: bool) -> Manifest:
    from tqdm import tqdm

    from moe2.tools.offline.embed import Embedder
    from moe2.tools.offline.torch_llama import TorchLlama, TrainConfig, train_lm

    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    def lap(name: str, start: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - start, 3)
        logger.info("%s: %.1f s", name, now - start)
        return now

    # 1. corpus
    corpus: Corpus = generate_corpus(seed=cfg.seed, per_domain=cfg.per_domain)
    split_paths = corpus.write(out)
    train = corpus["train"]
    t = lap("corpus", t0)

    # 2. embed + cluster
    embedder = Embedder()
    embeddings = {name: embedder(
        [s.prompt for s in corpus[name]], progress=progress, desc=f"embed {name}")
        for name in SPLITS}
    km = _cluster(embeddings["train"], cfg.n_experts, cfg.seed)
    remap = _order_clusters(np.asarray(km.labels_), train, cfg.n_experts)
    clusters = {name: [remap[int(c)] for c in km.predict(embeddings[name])] for name in SPLITS}
    t = lap("embed_cluster", t)

    # 3. vocabularies: the trained SentencePiece one and/or real tokenizers, compacted
    vocabs = {name: _Vocab.build(name, cfg, corpus, out) for name in dict.fromkeys(
        tokenizer_for(cfg.tokenizers, k) for k in range(cfg.n_experts))}
    t = lap("vocab", t)

    try:
        # 4. one base model per vocabulary
        bases: dict[str, TorchLlama] = {}
        for name, v in vocabs.items():
            base = TorchLlama.initialised(v.spec, cfg.seed)
            base.logit_offset = v.logit_offset
            train_lm(base, v.examples, TrainConfig(steps=cfg.base_steps,
                                                   batch_size=cfg.batch_size,
                                                   lr=cfg.base_lr, seed=cfg.seed),
                     desc="base" if len(vocabs) == 1 else f"base {name}", progress=progress)
            bases[name] = base
        t = lap("base", t)

        # 5 + 6. fine-tune per cluster, write GGUF + quantised GGUF
        entries: list[ExpertEntry] = []
        width = len(str(cfg.n_experts - 1))
        for k in tqdm(range(cfg.n_experts), desc="experts", disable=not progress):
            idx = [i for i, c in enumerate(clusters["train"]) if c == k]
            if not idx:
                raise RuntimeError(f"cluster {k} has no training prompts")
            tok_name = tokenizer_for(cfg.tokenizers, k)
            v = vocabs[tok_name]
            model = bases[tok_name].copy()
            losses = train_lm(model, [v.examples[i] for i in idx],
                              TrainConfig(steps=cfg.finetune_steps, batch_size=cfg.batch_size,
                                          lr=cfg.finetune_lr, seed=cfg.seed * 1000 + k + 1),
                              desc=f"expert {k}", progress=progress)
            name = f"expert-{k:0{width}d}"
            path = out / f"{name}.gguf"
            v.write(path, model.gguf_weights(), name)
            q_path = out / f"{name}.{v.quant}.gguf"
            quantize_gguf(path, q_path, v.quant, threads=max(1, cfg.threads))
            fam = Counter(train[i].family for i in idx)
            entries.append(ExpertEntry(
                name=name, cluster=k, gguf=path.name, gguf_q4=q_path.name, quant=v.quant,
                family_mix=dict(sorted(fam.items())), train_samples=len(idx),
                size_bytes=path.stat().st_size, q4_size_bytes=q_path.stat().st_size,
                sha256=file_sha256(path), q4_sha256=file_sha256(q_path),
                final_loss=round(float(np.mean(losses[-20:])), 5), tokenizer=tok_name,
                n_vocab=v.n_vocab,
            ))
    finally:
        for v in vocabs.values():
            v.close()
    t = lap("experts", t)
    timings["total"] = round(time.perf_counter() - t0, 3)

    first = vocabs[tokenizer_for(cfg.tokenizers, 0)]
    manifest = Manifest(
        root=out,
        experts=tuple(entries),
        spec=first.spec,
        vocab_fingerprint=first.fingerprint if len(vocabs) == 1 else "",
        splits={name: p.name for name, p in split_paths.items()},
        clusters=clusters,
        corpus=corpus.stats(),
        config=dataclasses.asdict(cfg),
        timings_s=timings,
    )
    tmp = out / (MANIFEST_NAME + ".part")
    tmp.write_text(json.dumps(manifest.to_json(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / MANIFEST_NAME)
    return manifest


@dataclass
class _Vocab:
    """One tokenizer of the fleet: its training examples (train split, in corpus order), the
    spec the models train with, and how an expert is written."""

    name: str
    spec: LlamaSpec
    examples: list[Any]  # LmExample
    fingerprint: str
    n_vocab: int  # exported
    quant: QuantType
    logit_offset: Any  # torch.Tensor | None
    spm: SpmVocab | None = None
    codec: Codec | None = None

    @classmethod
    def build(cls, name: str, cfg: ExpertsConfig, corpus: Corpus, out: Path) -> _Vocab:
        import torch

        from moe2.tools.offline.torch_llama import LmExample

        if name == TRAINED:
            texts = [f"{s.prompt} {s.answer}" for s in corpus.all_samples()]
            spm = train_spm_tokenizer(texts, cfg.vocab_size, seed=cfg.seed)
            spm.save(out / "vocab.model")
            encoded = [encode_example(spm, s, prompt_loss_weight=cfg.prompt_loss_weight)
                       for s in corpus["train"]]
            spec = cfg.spec(spm.size)
            v = cls(name, spec, [], spm.fingerprint(), spm.size, choose_quant(spec, cfg.quant),
                    None, spm=spm)
        else:
            codec = Codec.build(name, [(s.prompt, s.answer) for s in corpus.all_samples()])
            logger.info("%s: the corpus uses %d of %d ids", name, codec.n_compact - 1,
                        codec.tok.size)
            encoded = [codec.encode_example(s.prompt, s.answer,
                                            prompt_loss_weight=cfg.prompt_loss_weight)
                       for s in corpus["train"]]
            spec = cfg.spec(codec.n_compact)
            full = dataclasses.replace(spec, n_vocab=codec.tok.size)
            v = cls(name, spec, [], codec.fingerprint(), codec.tok.size,
                    choose_quant(full, cfg.quant),
                    torch.from_numpy(codec.logit_offset()), codec=codec)
        for (tokens, mask), s in zip(encoded, corpus["train"], strict=True):
            if len(tokens) > spec.n_ctx_train:
                raise ValueError(f"{len(tokens)} {name} tokens exceed n_ctx_train: "
                                 f"{s.prompt!r}")
            v.examples.append(LmExample(tokens, mask))
        return v

    def write(self, path: Path, weights: dict[str, npt.NDArray[np.float32]], name: str
              ) -> None:
        if self.spm is not None:
            write_gguf(path, self.spec, weights, self.spm, name=name)
            return
        assert self.codec is not None
        write_gguf(path, dataclasses.replace(self.spec, n_vocab=self.n_vocab),
                   self.codec.export(weights), self.codec.tok, name=name)

    def close(self) -> None:
        if self.codec is not None:
            self.codec.close()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file (recorded in the manifest for every GGUF)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
