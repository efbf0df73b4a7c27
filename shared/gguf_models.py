"""Small llama-architecture GGUF "experts" with a real tokenizer, built entirely offline.

Used by tests, ``moe2 make-experts`` and ``moe2 bench``: nothing here downloads anything.

* :func:`synthetic_corpus` generates deterministic English-ish sentences (arithmetic Q/A,
  capitals, word reversal, colours, ...); :func:`train_spm_tokenizer` trains a real SentencePiece
  BPE model with byte fallback on it, in memory. :func:`default_vocab` is the vocabulary the
  test experts share; :func:`other_vocab` is a different one of the same size (mismatch path).
* :class:`LlamaSpec` + :func:`random_weights` define a model in llama.cpp tensor naming and
  layout; :func:`write_gguf` writes it with the ``gguf`` package (architecture ``llama``).
* :func:`reference_logits` is a plain float64 numpy forward pass that follows llama.cpp's
  conventions for ``LLM_ARCH_LLAMA`` (rope type NORM: adjacent pairs ``(x[2i], x[2i+1])`` are
  rotated). It is the specification any other implementation of these experts must match.
* :func:`make_test_experts`, :func:`make_mismatch_expert` and :func:`make_large_expert` write
  ready-made fleets.

Layout convention: every 2-D weight is stored as a numpy array of shape ``(out, in)`` and applied
as ``y = W @ x`` (the GGUF writer reverses the shape, so llama.cpp sees ``ne = [in, out]``).
Attention projections are head-major: row ``h * head_dim + d`` is dimension ``d`` of head ``h``.

Needs ``numpy``, ``gguf`` and ``sentencepiece`` (the ``train`` or ``dev`` extras).

Checked against llama-cpp-python 0.3.36 (``tests/test_gguf_models.py``):

* f32 GGUF with ``type_k=type_v=GGML_TYPE_F32``: logits agree with :func:`reference_logits` to
  about 4e-6. llama.cpp's default f16 KV cache alone moves them by up to ~5e-3.
* Read logits with ``llama_get_logits_ith(llm.ctx, -1)``; ``Llama.scores`` stays zero unless the
  model is opened with ``logits_all=True``.
* llama.cpp's SPM tokenizer equals ``SpmVocab.encode`` (with BOS) on corpus text and fuzzed
  strings (tabs, CR, NBSP, CJK, emoji via byte fallback). ``Llama.detokenize`` strips the dummy
  prefix space only when the token list starts with BOS, and a byte-fallback token alone is a
  partial UTF-8 sequence: stream text by decoding accumulated bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import logging
import math
import os
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np
import numpy.typing as npt
import sentencepiece as spm

__all__ = [
    "DEFAULT_VOCAB_SIZE",
    "SIMPLE_CHAT_TEMPLATE",
    "SMALL_SHAPES",
    "ExpertFile",
    "FileType",
    "GgufModel",
    "LlamaSpec",
    "SpmVocab",
    "default_vocab",
    "fingerprint_tokens",
    "make_large_expert",
    "make_mismatch_expert",
    "make_test_experts",
    "other_vocab",
    "random_weights",
    "read_gguf",
    "reference_logits",
    "round_weights",
    "synthetic_corpus",
    "train_spm_tokenizer",
    "write_gguf",
]

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
FileType = Literal["f32", "f16"]
CorpusVariant = Literal["base", "alt"]

#: A minimal Jinja chat template (llama-cpp-python renders it with ``messages``,
#: ``add_generation_prompt``, ``bos_token`` and ``eos_token``).
SIMPLE_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

DEFAULT_VOCAB_SIZE = 512
DEFAULT_CORPUS_SENTENCES = 4000


# --------------------------------------------------------------------------- corpus

_CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Japan", "Tokyo"), ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
    ("Peru", "Lima"), ("Norway", "Oslo"), ("Greece", "Athens"), ("Chile", "Santiago"),
    ("India", "New Delhi"), ("China", "Beijing"), ("Brazil", "Brasilia"), ("Poland", "Warsaw"),
    ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Sweden", "Stockholm"), ("Cuba", "Havana"),
)
_COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "black", "white", "grey", "pink")
_THINGS = (
    ("sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"),
    ("banana", "yellow"), ("tomato", "red"), ("orange", "orange"), ("plum", "purple"),
    ("cloud", "grey"), ("rose", "pink"),
)
_WORDS = (
    "apple", "river", "garden", "window", "pencil", "rocket", "silver", "planet", "dragon",
    "market", "castle", "forest", "winter", "summer", "coffee", "bridge", "letter", "number",
    "sister", "doctor", "yellow", "animal", "button", "candle", "mirror", "pocket", "ticket",
    "travel", "museum", "violin", "basket", "island", "jacket", "kitten", "ladder", "meadow",
)
_ANIMALS = (
    ("cat", 4), ("dog", 4), ("bird", 2), ("spider", 8), ("ant", 6), ("horse", 4), ("snake", 0),
    ("duck", 2), ("crab", 10), ("cow", 4),
)
_NAMES = ("Alice", "Bob", "Carol", "David", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy")
_FOODS = ("bread", "rice", "soup", "cheese", "apples", "pasta", "eggs", "fish", "beans", "salad")
_NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve",
)


def _base_sentence(rng: random.Random) -> str:
    kind = rng.randrange(10)
    if kind == 0:
        a, b = rng.randrange(100), rng.randrange(100)
        op, value = rng.choice((("plus", a + b), ("minus", a - b), ("times", a * b)))
        return f"Q: What is {a} {op} {b}? A: {value}."
    if kind == 1:
        country, capital = rng.choice(_CAPITALS)
        return rng.choice((
            f"The capital of {country} is {capital}.",
            f"Q: What is the capital of {country}? A: {capital}.",
            f"{capital} is the capital city of {country}.",
        ))
    if kind == 2:
        word = rng.choice(_WORDS)
        return f"Reverse the word {word}: {word[::-1]}."
    if kind == 3:
        thing, colour = rng.choice(_THINGS)
        other = rng.choice(_COLOURS)
        return f"The {thing} is {colour}, not {other}." if other != colour else (
            f"The {thing} is {colour}."
        )
    if kind == 4:
        start = rng.randrange(20)
        stop = start + rng.randrange(2, 7)
        return f"Count from {start} to {stop}: " + " ".join(str(i) for i in range(start, stop + 1))
    if kind == 5:
        animal, legs = rng.choice(_ANIMALS)
        return f"A {animal} has {_NUMBER_WORDS[legs] if legs <= 12 else legs} legs."
    if kind == 6:
        word = rng.choice(_WORDS)
        return f"Spell {word}: " + " ".join(word) + "."
    if kind == 7:
        name, food = rng.choice(_NAMES), rng.choice(_FOODS)
        n = rng.randrange(1, 10)
        return f"{name} ate {n} bowls of {food} and said it was very good."
    if kind == 8:
        n = rng.randrange(13)
        return f"The number {n} is written as {_NUMBER_WORDS[n]}."
    a, b = rng.randrange(1, 50), rng.randrange(1, 50)
    bigger = max(a, b)
    return f"Which is larger, {a} or {b}? The larger number is {bigger}."


_ALT_VERBS = ("print", "return", "yield", "raise", "assert", "import", "lambda", "while")
_ALT_UNITS = (
    ("metres", "centimetres", 100), ("kilograms", "grams", 1000), ("hours", "minutes", 60),
)
_ALT_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def _alt_sentence(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        x, k = rng.randrange(10), rng.randrange(2, 9)
        return f"def f{x}(x): return x * {k}  # {rng.choice(_ALT_VERBS)}"
    if kind == 1:
        big, small, factor = rng.choice(_ALT_UNITS)
        n = rng.randrange(1, 20)
        return f"CONVERT {n} {big.upper()} TO {small.upper()} => {n * factor}"
    if kind == 2:
        i = rng.randrange(7)
        day, after, before = _ALT_DAYS[i], _ALT_DAYS[(i + 1) % 7], _ALT_DAYS[i - 1]
        return f"After {day} comes {after}; before it was {before}."
    if kind == 3:
        values = [rng.randrange(100) for _ in range(rng.randrange(3, 7))]
        return f"sorted({values}) == {sorted(values)}"
    if kind == 4:
        a = rng.randrange(2, 12)
        return f"SQUARE OF {a} IS {a * a}; CUBE OF {a} IS {a ** 3}"
    word = "".join(rng.choice("xyzqkvw") for _ in range(rng.randrange(3, 8)))
    return f"<tag id={rng.randrange(1000)}>{word}</tag>"


def synthetic_corpus(
    n_sentences: int = DEFAULT_CORPUS_SENTENCES, *, seed: int = 0, variant: CorpusVariant = "base"
) -> list[str]:
    """Deterministic English-ish training sentences (no newlines). ``variant="alt"`` is a
    different distribution (code, units, upper case) that yields a different vocabulary."""
    rng = random.Random(f"moe2-corpus-{variant}-{seed}")
    make = _base_sentence if variant == "base" else _alt_sentence
    return [make(rng) for _ in range(n_sentences)]


# --------------------------------------------------------------------------- vocabulary


def fingerprint_tokens(tokens: Sequence[str], types: Sequence[int]) -> str:
    """sha256 (hex) over the token pieces and their gguf ``TokenType`` values, in id order.

    Each token contributes ``uint32_le(len(utf8)) + utf8 + uint8(type)``. Two experts can share
    next-token distributions exactly when their fingerprints are equal. An agent can recompute it
    from llama.cpp alone: ``llama_token_get_text`` gives the piece and ``llama_token_get_attr``
    the type (NORMAL=1, UNKNOWN=2, CONTROL=3, USER_DEFINED=4, UNUSED=5, BYTE=6).
    """
    if len(tokens) != len(types):
        raise ValueError(f"{len(tokens)} tokens but {len(types)} token types")
    digest = hashlib.sha256()
    for piece, kind in zip(tokens, types, strict=True):
        raw = piece.encode("utf-8")
        digest.update(len(raw).to_bytes(4, "little"))
        digest.update(raw)
        digest.update(int(kind).to_bytes(1, "little"))
    return digest.hexdigest()


@functools.lru_cache(maxsize=16)
def _processor(model_proto: bytes) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_proto=model_proto)


@dataclass(frozen=True)
class SpmVocab:
    """A SentencePiece vocabulary as GGUF stores it (``tokenizer.ggml.model = "llama"``)."""

    tokens: tuple[str, ...]
    scores: tuple[float, ...]
    types: tuple[int, ...]  # gguf.TokenType values
    bos_id: int
    eos_id: int
    unk_id: int
    #: Serialized sentencepiece ``ModelProto``; ``None`` when read back from a GGUF file.
    model_proto: bytes | None = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not len(self.tokens) == len(self.scores) == len(self.types):
            raise ValueError("tokens, scores and types must have the same length")
        for tid in (self.bos_id, self.eos_id, self.unk_id):
            if not 0 <= tid < len(self.tokens):
                raise ValueError(f"special token id {tid} outside the vocabulary")

    @property
    def size(self) -> int:
        return len(self.tokens)

    def fingerprint(self) -> str:
        """See :func:`fingerprint_tokens`."""
        return fingerprint_tokens(self.tokens, self.types)

    @classmethod
    def from_model_proto(cls, model_proto: bytes) -> SpmVocab:
        """Build from a serialized sentencepiece model (as written by the trainer)."""
        sp = _processor(model_proto)
        tokens: list[str] = []
        scores: list[float] = []
        types: list[int] = []
        for i in range(sp.get_piece_size()):
            tokens.append(sp.id_to_piece(i))
            scores.append(float(sp.get_score(i)))
            if sp.is_unknown(i):
                kind = gguf.TokenType.UNKNOWN
            elif sp.is_control(i):
                kind = gguf.TokenType.CONTROL
            elif sp.is_unused(i):
                kind = gguf.TokenType.UNUSED
            elif sp.is_byte(i):
                kind = gguf.TokenType.BYTE
            else:
                kind = gguf.TokenType.NORMAL
            types.append(int(kind))
        return cls(
            tokens=tuple(tokens),
            scores=tuple(scores),
            types=tuple(types),
            bos_id=int(sp.bos_id()),
            eos_id=int(sp.eos_id()),
            unk_id=int(sp.unk_id()),
            model_proto=model_proto,
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SpmVocab:
        """Load a ``.model`` file written by :meth:`save` (or by sentencepiece itself)."""
        return cls.from_model_proto(Path(path).read_bytes())

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the sentencepiece ``.model`` file."""
        Path(path).write_bytes(self._require_proto())

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Tokenise with sentencepiece itself (the reference for llama.cpp's tokenizer)."""
        ids = [int(i) for i in _processor(self._require_proto()).encode(text)]
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        return str(_processor(self._require_proto()).decode([int(i) for i in ids]))

    def _require_proto(self) -> bytes:
        if self.model_proto is None:
            raise ValueError("this vocabulary has no sentencepiece model (read from a GGUF?)")
        return self.model_proto


def train_spm_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    seed: int = 0,
    model_type: Literal["bpe", "unigram"] = "bpe",
) -> SpmVocab:
    """Train a SentencePiece model in memory: byte fallback, single thread, deterministic.

    Normalisation is ``identity`` and extra whitespace is kept, because llama.cpp's SPM tokenizer
    does neither NFKC nor whitespace folding; with a BPE model llama.cpp then tokenises exactly as
    sentencepiece does. (llama.cpp applies BPE-style score merges to every ``llama`` vocabulary,
    so a ``unigram`` model can tokenise differently there; it is offered for experiments only.)
    """
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    sentences: Iterator[str] = (t.replace("\n", " ") for t in texts)
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences,
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        num_threads=1,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    vocab = SpmVocab.from_model_proto(model.getvalue())
    logger.debug("trained %s vocabulary of %d pieces (%s)", model_type, vocab.size,
                 vocab.fingerprint()[:12])
    return vocab


@functools.lru_cache(maxsize=8)
def default_vocab(vocab_size: int = DEFAULT_VOCAB_SIZE) -> SpmVocab:
    """The vocabulary shared by the test experts (trained on the ``base`` corpus)."""
    return train_spm_tokenizer(synthetic_corpus(variant="base"), vocab_size)


@functools.lru_cache(maxsize=8)
def other_vocab(vocab_size: int = DEFAULT_VOCAB_SIZE) -> SpmVocab:
    """A different vocabulary (trained on the ``alt`` corpus): same ``n_vocab`` as
    :func:`default_vocab`, different tokens, so only a fingerprint tells them apart."""
    return train_spm_tokenizer(synthetic_corpus(variant="alt"), vocab_size)


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class LlamaSpec:
    """Hyper-parameters of a llama-architecture model (GQA when ``n_kv_heads < n_heads``)."""

    n_vocab: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    n_ctx_train: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if min(self.n_vocab, self.dim, self.n_layers, self.n_heads, self.n_kv_heads,
               self.ffn_dim, self.n_ctx_train) <= 0:
            raise ValueError(f"all sizes must be positive: {self}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not a multiple of n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rope")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def n_params(self) -> int:
        """Parameter count, with separate (untied) input embedding and output matrix."""
        attn = 2 * self.dim * self.dim + 2 * self.dim * self.kv_dim
        ffn = 3 * self.dim * self.ffn_dim
        per_layer = attn + ffn + 2 * self.dim
        return 2 * self.n_vocab * self.dim + self.n_layers * per_layer + self.dim

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """numpy shapes (``(out, in)`` for matrices) in llama.cpp tensor naming."""
        shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (self.n_vocab, self.dim)}
        for i in range(self.n_layers):
            p = f"blk.{i}."
            shapes[p + "attn_norm.weight"] = (self.dim,)
            shapes[p + "attn_q.weight"] = (self.dim, self.dim)
            shapes[p + "attn_k.weight"] = (self.kv_dim, self.dim)
            shapes[p + "attn_v.weight"] = (self.kv_dim, self.dim)
            shapes[p + "attn_output.weight"] = (self.dim, self.dim)
            shapes[p + "ffn_norm.weight"] = (self.dim,)
            shapes[p + "ffn_gate.weight"] = (self.ffn_dim, self.dim)
            shapes[p + "ffn_up.weight"] = (self.ffn_dim, self.dim)
            shapes[p + "ffn_down.weight"] = (self.dim, self.ffn_dim)
        shapes["output_norm.weight"] = (self.dim,)
        shapes["output.weight"] = (self.n_vocab, self.dim)
        return shapes


def random_weights(
    spec: LlamaSpec, seed: int, *, logit_std: float = 2.5, residual_scale: float = 1.0
) -> dict[str, FloatArray]:
    """Random float32 weights in llama.cpp naming; different seeds give different experts.

    Matrices are Gaussian with std ``residual_scale / sqrt(fan_in)`` so every block adds an O(1)
    update to the residual stream; norm weights are ``1 + 0.1 * N(0, 1)`` so a wrong norm shows up
    in the logits. The output matrix has std ``logit_std / sqrt(dim)``: since the final RMSNorm
    makes the hidden state unit-RMS, logits have std about ``logit_std``, which keeps next-token
    distributions peaked but far from one-hot (top probability roughly 0.05-0.9 for 512 tokens).
    """
    rng = np.random.default_rng(seed)
    out: dict[str, FloatArray] = {}
    for name, shape in spec.tensor_shapes().items():
        if len(shape) == 1:
            values = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
        elif name == "token_embd.weight":
            values = rng.standard_normal(shape, dtype=np.float32)
        elif name == "output.weight":
            values = rng.standard_normal(shape, dtype=np.float32)
            values *= np.float32(logit_std / math.sqrt(shape[1]))
        else:
            values = rng.standard_normal(shape, dtype=np.float32)
            values *= np.float32(residual_scale / math.sqrt(shape[1]))
        out[name] = np.ascontiguousarray(values, dtype=np.float32)
    return out


def round_weights(weights: Mapping[str, FloatArray], file_type: FileType) -> dict[str, FloatArray]:
    """The weights as a GGUF of ``file_type`` stores them (f16 rounds matrices, not norms);
    feed these to :func:`reference_logits` when comparing with an f16 file."""
    if file_type == "f32":
        return dict(weights)
    return {k: (v.astype(np.float16).astype(np.float32) if v.ndim == 2 else v)
            for k, v in weights.items()}


def _rms_norm(x: npt.NDArray[np.float64], w: npt.NDArray[np.float64], eps: float
              ) -> npt.NDArray[np.float64]:
    out: npt.NDArray[np.float64] = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w
    return out


def _rope_norm(x: npt.NDArray[np.float64], positions: npt.NDArray[np.float64], theta: float
               ) -> npt.NDArray[np.float64]:
    """llama.cpp rope mode NORM over ``x`` of shape (T, heads, head_dim): each adjacent pair
    ``(x[2i], x[2i+1])`` rotates by ``pos * theta^(-2i/head_dim)``."""
    head_dim = x.shape[-1]
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = positions[:, None] * inv_freq[None, :]  # (T, head_dim/2)
    cos = np.cos(angles)[:, None, :]
    sin = np.sin(angles)[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def reference_logits(
    spec: LlamaSpec, weights: Mapping[str, FloatArray], tokens: Sequence[int]
) -> npt.NDArray[np.float64]:
    """Float64 forward pass of the llama architecture as llama.cpp runs ``LLM_ARCH_LLAMA``:
    RMSNorm, rope NORM (adjacent pairs), causal softmax attention scaled by ``1/sqrt(head_dim)``
    with grouped-query heads (query head ``h`` reads KV head ``h // (n_heads // n_kv_heads)``),
    SwiGLU ``down(silu(gate(x)) * up(x))``, final RMSNorm and the output matrix.

    Returns logits of shape ``(len(tokens), n_vocab)``; row ``t`` predicts token ``t + 1``.
    """
    if not tokens:
        raise ValueError("need at least one token")
    ids = np.asarray(tokens, dtype=np.int64)
    if ids.min() < 0 or ids.max() >= spec.n_vocab:
        raise ValueError("token id outside the vocabulary")

    def w(name: str) -> npt.NDArray[np.float64]:
        return np.asarray(weights[name], dtype=np.float64)

    n_tok = len(ids)
    hd, n_h, n_kv = spec.head_dim, spec.n_heads, spec.n_kv_heads
    positions = np.arange(n_tok, dtype=np.float64)
    causal = np.triu(np.full((n_tok, n_tok), -np.inf), k=1)
    x = w("token_embd.weight")[ids]
    for i in range(spec.n_layers):
        p = f"blk.{i}."
        h = _rms_norm(x, w(p + "attn_norm.weight"), spec.norm_eps)
        q = (h @ w(p + "attn_q.weight").T).reshape(n_tok, n_h, hd)
        k = (h @ w(p + "attn_k.weight").T).reshape(n_tok, n_kv, hd)
        v = (h @ w(p + "attn_v.weight").T).reshape(n_tok, n_kv, hd)
        q = _rope_norm(q, positions, spec.rope_theta)
        k = _rope_norm(k, positions, spec.rope_theta)
        k = np.repeat(k, n_h // n_kv, axis=1)
        v = np.repeat(v, n_h // n_kv, axis=1)
        scores = np.einsum("thd,shd->hts", q, k) / math.sqrt(hd) + causal
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        attn = np.einsum("hts,shd->thd", probs, v).reshape(n_tok, n_h * hd)
        x = x + attn @ w(p + "attn_output.weight").T
        h = _rms_norm(x, w(p + "ffn_norm.weight"), spec.norm_eps)
        gate = h @ w(p + "ffn_gate.weight").T
        up = h @ w(p + "ffn_up.weight").T
        x = x + (gate / (1.0 + np.exp(-gate)) * up) @ w(p + "ffn_down.weight").T
    x = _rms_norm(x, w("output_norm.weight"), spec.norm_eps)
    logits: npt.NDArray[np.float64] = x @ w("output.weight").T
    return logits


# --------------------------------------------------------------------------- GGUF I/O


def write_gguf(
    path: str | os.PathLike[str],
    spec: LlamaSpec,
    weights: Mapping[str, FloatArray],
    vocab: SpmVocab,
    *,
    name: str,
    chat_template: str | None = None,
    file_type: FileType = "f32",
) -> None:
    """Write a llama-architecture GGUF (all matrices f32, or f16 with f32 norms).

    The file is written next to ``path`` and renamed into place, so readers never see half a file.
    """
    if vocab.size != spec.n_vocab:
        raise ValueError(f"vocabulary has {vocab.size} tokens, spec says {spec.n_vocab}")
    shapes = spec.tensor_shapes()
    if set(weights) != set(shapes):
        raise ValueError(f"weights do not match the spec: {sorted(set(weights) ^ set(shapes))}")
    for key, shape in shapes.items():
        if weights[key].shape != shape:
            raise ValueError(f"{key}: shape {weights[key].shape}, expected {shape}")

    target = Path(path)
    tmp = target.with_name(target.name + ".part")
    ftype = gguf.LlamaFileType.ALL_F32 if file_type == "f32" else gguf.LlamaFileType.MOSTLY_F16
    writer = gguf.GGUFWriter(tmp, arch="llama")
    try:
        writer.add_name(name)
        writer.add_file_type(int(ftype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_vocab_size(spec.n_vocab)
        writer.add_context_length(spec.n_ctx_train)
        writer.add_embedding_length(spec.dim)
        writer.add_block_count(spec.n_layers)
        writer.add_feed_forward_length(spec.ffn_dim)
        writer.add_head_count(spec.n_heads)
        writer.add_head_count_kv(spec.n_kv_heads)
        writer.add_layer_norm_rms_eps(spec.norm_eps)
        writer.add_rope_dimension_count(spec.head_dim)
        writer.add_rope_freq_base(spec.rope_theta)

        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(list(vocab.tokens))
        writer.add_token_scores(list(vocab.scores))
        writer.add_token_types(list(vocab.types))
        writer.add_bos_token_id(vocab.bos_id)
        writer.add_eos_token_id(vocab.eos_id)
        writer.add_unk_token_id(vocab.unk_id)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        writer.add_add_space_prefix(True)
        if chat_template is not None:
            writer.add_chat_template(chat_template)

        for key in shapes:
            array = np.ascontiguousarray(weights[key], dtype=np.float32)
            if file_type == "f16" and array.ndim == 2:
                writer.add_tensor(key, array.astype(np.float16))
            else:
                writer.add_tensor(key, array)

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(tmp, target)
    logger.debug("wrote %s (%s, %d params, %s)", target, name, spec.n_params, file_type)


@dataclass(frozen=True)
class GgufModel:
    """A llama GGUF read back with :func:`read_gguf` (weights as float32, ``(out, in)``)."""

    name: str
    spec: LlamaSpec
    weights: dict[str, FloatArray]
    vocab: SpmVocab
    chat_template: str | None


def _field(reader: gguf.GGUFReader, key: str) -> object:
    field = reader.get_field(key)
    if field is None:
        raise KeyError(f"GGUF has no {key}")
    return field.contents()


def read_gguf(path: str | os.PathLike[str]) -> GgufModel:
    """Read a llama GGUF written by :func:`write_gguf` (f32/f16 tensors only)."""
    reader = gguf.GGUFReader(path)
    arch = str(_field(reader, "general.architecture"))
    if arch != "llama":
        raise ValueError(f"not a llama GGUF: {arch}")

    def num(key: str) -> float:
        value = _field(reader, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{key} is {value!r}")
        return value

    tokens = tuple(str(t) for t in _as_list(_field(reader, "tokenizer.ggml.tokens")))
    spec = LlamaSpec(
        n_vocab=len(tokens),
        dim=int(num("llama.embedding_length")),
        n_layers=int(num("llama.block_count")),
        n_heads=int(num("llama.attention.head_count")),
        n_kv_heads=int(num("llama.attention.head_count_kv")),
        ffn_dim=int(num("llama.feed_forward_length")),
        n_ctx_train=int(num("llama.context_length")),
        rope_theta=_f32_to_float(num("llama.rope.freq_base")),
        norm_eps=_f32_to_float(num("llama.attention.layer_norm_rms_epsilon")),
    )
    vocab = SpmVocab(
        tokens=tokens,
        scores=tuple(float(s) for s in _as_list(_field(reader, "tokenizer.ggml.scores"))),
        types=tuple(int(t) for t in _as_list(_field(reader, "tokenizer.ggml.token_type"))),
        bos_id=int(num("tokenizer.ggml.bos_token_id")),
        eos_id=int(num("tokenizer.ggml.eos_token_id")),
        unk_id=int(num("tokenizer.ggml.unknown_token_id")),
    )
    weights: dict[str, FloatArray] = {}
    for tensor in reader.tensors:
        if tensor.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            raise ValueError(f"{tensor.name}: unsupported tensor type {tensor.tensor_type.name}")
        weights[tensor.name] = np.array(tensor.data, dtype=np.float32)
    template_field = reader.get_field("tokenizer.chat_template")
    template = None if template_field is None else str(template_field.contents())
    return GgufModel(
        name=str(_field(reader, "general.name")),
        spec=spec,
        weights=weights,
        vocab=vocab,
        chat_template=template,
    )


def _f32_to_float(value: float) -> float:
    """The shortest decimal that a float32 GGUF value stands for (1e-05, not 9.9999997e-06)."""
    return float(str(np.float32(value)))


def _as_list(value: object) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------- fleets


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

    def weights(self) -> dict[str, FloatArray]:
        """Regenerate the exact weights that were written (rounded for f16 files)."""
        return round_weights(random_weights(self.spec, self.seed), self.file_type)


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
