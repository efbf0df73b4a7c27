"""A llama-architecture model in llama.cpp tensor naming and layout, and a plain float64 numpy
forward pass (:func:`reference_logits`) following llama.cpp's ``LLM_ARCH_LLAMA`` conventions
(rope type NORM: adjacent pairs ``(x[2i], x[2i+1])`` are rotated): the specification any other
implementation of these experts must match.

Layout convention: every 2-D weight is stored as a numpy array of shape ``(out, in)`` and applied
as ``y = W @ x`` (the GGUF writer reverses the shape, so llama.cpp sees ``ne = [in, out]``).
Attention projections are head-major: row ``h * head_dim + d`` is dimension ``d`` of head ``h``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
FileType = Literal["f32", "f16"]




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


def perturb_weights(weights: Mapping[str, FloatArray], share: float, seed: int
                    ) -> dict[str, FloatArray]:
    """A fine-tune of the same base, as a stand-in: every matrix plus Gaussian noise of
    ``share`` of its own spread, norm weights kept. Two such experts agree on most tokens but
    not all, as fine-tunes of one base do (experts of different seeds agree on almost none)."""
    rng = np.random.default_rng(seed)
    return {k: (v + share * float(v.std()) * rng.standard_normal(v.shape).astype(np.float32))
            if v.ndim == 2 else v for k, v in weights.items()}


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


