"""Ready-made fleets of tiny GGUF experts for tests, benches and ``make-experts``:
:func:`make_test_experts`, :func:`make_mismatch_expert`, :func:`make_large_expert`."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from moe2.tools.models.gguf_io import write_gguf
from moe2.tools.models.llama import (
    FileType,
    FloatArray,
    LlamaSpec,
    perturb_weights,
    random_weights,
    round_weights,
)
from moe2.tools.models.vocab import DEFAULT_VOCAB_SIZE, SpmVocab, default_vocab, other_vocab

logger = logging.getLogger(__name__)


#: A minimal Jinja chat template (llama-cpp-python renders it with ``messages``,
#: ``add_generation_prompt``, ``bos_token`` and ``eos_token``).
SIMPLE_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)



@dataclass(frozen=True)
class ExpertFile:
    """One written expert: where it is and what it is."""

    name: str
    path: Path
    spec: LlamaSpec
    seed: int
    n_params: int
    fingerprint: str
    file_type: FileType = "f32"
    chat_template: str | None = None
    logit_std: float = 2.5
    perturb: float = 0.0  # a fine-tune of the seed's expert (perturb_weights), 0: none
    perturb_seed: int = 0

    def weights(self) -> dict[str, FloatArray]:
        """Regenerate the exact weights that were written (rounded for f16 files)."""
        return round_weights(_weights(self.spec, self.seed, self.logit_std, self.perturb,
                                      self.perturb_seed), self.file_type)


def _weights(spec: LlamaSpec, seed: int, logit_std: float, perturb: float,
             perturb_seed: int) -> dict[str, FloatArray]:
    w = random_weights(spec, seed, logit_std=logit_std)
    return perturb_weights(w, perturb, perturb_seed) if perturb else w


#: Shapes of the small shared-vocabulary experts, cycled by :func:`make_test_experts`:
#: (dim, n_layers, n_heads, n_kv_heads, ffn_dim). Entries 1 and 2 use grouped-query attention.
SMALL_SHAPES: tuple[tuple[int, int, int, int, int], ...] = (
    (64, 2, 4, 4, 176),
    (96, 3, 4, 2, 256),
    (128, 2, 8, 2, 352),
    (64, 4, 2, 1, 192),
)


def _write_expert(
    out_dir: Path, name: str, spec: LlamaSpec, seed: int, vocab: SpmVocab,
    *, chat_template: str | None, file_type: FileType,
) -> ExpertFile:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.gguf"
    write_gguf(path, spec, random_weights(spec, seed), vocab, name=name,
               chat_template=chat_template, file_type=file_type)
    return ExpertFile(name=name, path=path, spec=spec, seed=seed, n_params=spec.n_params,
                      fingerprint=vocab.fingerprint(), file_type=file_type,
                      chat_template=chat_template)


def make_test_experts(
    out_dir: str | os.PathLike[str],
    *,
    count: int = 3,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seeds: Sequence[int] | None = None,
    chat_template_index: int | None = None,
    chat_template: str = SIMPLE_CHAT_TEMPLATE,
    file_type: FileType = "f32",
    n_ctx_train: int = 512,
) -> list[ExpertFile]:
    """Write ``count`` heterogeneous experts ``tiny-0 ...`` sharing :func:`default_vocab`.

    Sizes cycle through :data:`SMALL_SHAPES` (so with ``count >= 2`` at least one uses GQA) and
    each has its own seed (default ``1000 + i``). ``chat_template_index`` selects one expert that
    gets ``chat_template``; the others have none.
    """
    if count < 1:
        raise ValueError("count must be positive")
    seed_list = list(seeds) if seeds is not None else [1000 + i for i in range(count)]
    if len(seed_list) != count:
        raise ValueError(f"{len(seed_list)} seeds for {count} experts")
    vocab = default_vocab(vocab_size)
    experts: list[ExpertFile] = []
    for i, seed in enumerate(seed_list):
        dim, n_layers, n_heads, n_kv_heads, ffn_dim = SMALL_SHAPES[i % len(SMALL_SHAPES)]
        spec = LlamaSpec(n_vocab=vocab.size, dim=dim, n_layers=n_layers, n_heads=n_heads,
                         n_kv_heads=n_kv_heads, ffn_dim=ffn_dim, n_ctx_train=n_ctx_train)
        template = chat_template if i == chat_template_index else None
        experts.append(_write_expert(Path(out_dir), f"tiny-{i}", spec, seed, vocab,
                                     chat_template=template, file_type=file_type))
    return experts


def make_mismatch_expert(
    out_dir: str | os.PathLike[str],
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seed: int = 2000,
    name: str = "tiny-othervocab",
    file_type: FileType = "f32",
) -> ExpertFile:
    """An expert with :func:`other_vocab`: same vocabulary size as the shared experts by
    default, different tokens and fingerprint."""
    vocab = other_vocab(vocab_size)
    spec = LlamaSpec(n_vocab=vocab.size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176)
    return _write_expert(Path(out_dir), name, spec, seed, vocab, chat_template=None,
                         file_type=file_type)


def make_large_expert(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 3000,
    name: str = "large",
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    dim: int = 512,
    n_layers: int = 16,
    n_heads: int = 8,
    n_kv_heads: int = 4,
    ffn_dim: int = 1536,
    n_ctx_train: int = 2048,
    file_type: FileType = "f32",
) -> ExpertFile:
    """A ~51M-parameter expert (random weights, shared vocabulary) for ``moe2 bench agent``."""
    vocab = default_vocab(vocab_size)
    spec = LlamaSpec(n_vocab=vocab.size, dim=dim, n_layers=n_layers, n_heads=n_heads,
                     n_kv_heads=n_kv_heads, ffn_dim=ffn_dim, n_ctx_train=n_ctx_train)
    return _write_expert(Path(out_dir), name, spec, seed, vocab, chat_template=None,
                         file_type=file_type)


#: ``logit_std`` for a real-vocabulary expert as sure of itself as a trained model: with the
#: Qwen2 vocabulary its greedy top-1 probability has a median of 0.5-0.6 (measured on a few
#: seeds: 0.54-0.60; 0.37 at 5, 0.02-0.03 at the default 2.5)
CONFIDENT_LOGIT_STD = 7.0

#: the shape of real-vocabulary test experts: the embedding and output matrices dominate
#: (151,936 x 32 each for Qwen2), the rest is as small as llama.cpp allows
REAL_VOCAB_SHAPE = (32, 1, 2, 1, 64)


def make_real_vocab_expert(
    out_dir: str | os.PathLike[str],
    vocab: str,
    *,
    name: str | None = None,
    pad_to: int | None = None,
    seed: int = 4000,
    shape: tuple[int, int, int, int, int] = REAL_VOCAB_SHAPE,
    chat_template: str | None = None,
    file_type: FileType = "f16",
    n_ctx_train: int = 2048,
    logit_std: float = 2.5,
    perturb: float = 0.0,
    perturb_seed: int = 0,
) -> ExpertFile:
    """A random-weight llama expert that carries llama.cpp's real tokenizer ``vocab``
    (``qwen2``, ``llama-bpe``, ``llama-spm``, ``phi-3``, ...: see
    :mod:`moe2.tools.models.real_vocab`), padded to ``pad_to`` tokens with ``[PADn]`` like
    llama.cpp's converter pads (Qwen2.5-7B: 152,064).

    ``logit_std`` sets how sure the expert is (:func:`random_weights`): at the default a
    151,936-token expert's likeliest token has probability ~0.03, flatter than any trained
    model; :data:`CONFIDENT_LOGIT_STD` gives 0.5-0.6 (benches that measure speculation need it).
    ``perturb`` > 0 makes it a fine-tune of the ``seed`` expert (:func:`perturb_weights`)."""
    from moe2.tools.models.real_vocab import GgufTokenizer

    tok = GgufTokenizer.load(vocab)
    if pad_to is not None:
        tok = tok.padded(pad_to)
    dim, n_layers, n_heads, n_kv_heads, ffn_dim = shape
    spec = LlamaSpec(n_vocab=tok.size, dim=dim, n_layers=n_layers, n_heads=n_heads,
                     n_kv_heads=n_kv_heads, ffn_dim=ffn_dim, n_ctx_train=n_ctx_train)
    label = name or f"{vocab}-{tok.size}"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{label}.gguf"
    write_gguf(path, spec, _weights(spec, seed, logit_std, perturb, perturb_seed), tok,
               name=label, chat_template=chat_template, file_type=file_type)
    return ExpertFile(name=label, path=path, spec=spec, seed=seed, n_params=spec.n_params,
                      fingerprint=f"{vocab}:{tok.size}", file_type=file_type,
                      chat_template=chat_template or tok.chat_template, logit_std=logit_std,
                      perturb=perturb, perturb_seed=perturb_seed)
