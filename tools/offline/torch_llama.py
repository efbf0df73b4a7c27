"""A trainable PyTorch twin of :func:`moe2.tools.models.reference_logits`.

:class:`TorchLlama` keeps every weight in llama.cpp naming and numpy layout (matrices are
``(out, in)``, exactly like ``nn.Linear.weight``), uses rope NORM (adjacent pairs rotate),
RMSNorm, grouped-query attention and SwiGLU, and an untied output matrix. Exporting to GGUF is
therefore a straight dump: ``write_gguf(path, model.spec, model.gguf_weights(), vocab, ...)``.

Training helpers (:func:`train_lm`) run a plain AdamW loop with a cosine schedule over padded
batches of token sequences with a per-token loss mask; progress goes to a tqdm bar on stderr.

Needs ``torch`` (the ``train`` extra).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from moe2.tools.models.llama import FloatArray, LlamaSpec, random_weights

__all__ = ["LmExample", "TorchLlama", "TrainConfig", "torch_threads", "train_lm"]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch threads (``n <= 0``: leave the setting alone).

    Small models train fastest on one thread, and torch's default (one per core) can be ten
    times slower when other processes compete for the cores.
    """
    if n <= 0:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _rope_tables(head_dim: int, n_pos: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(n_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cos(angles).float(), torch.sin(angles).float()


def _rope_norm(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, H, D); cos/sin: (T, D/2). Adjacent pairs (x[2i], x[2i+1]) rotate."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)


class _RmsNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class _Block(nn.Module):
    def __init__(self, spec: LlamaSpec) -> None:
        super().__init__()
        self.spec = spec
        d, kv, f = spec.dim, spec.kv_dim, spec.ffn_dim
        self.attn_norm = _RmsNorm(d, spec.norm_eps)
        self.attn_q = nn.Linear(d, d, bias=False)
        self.attn_k = nn.Linear(d, kv, bias=False)
        self.attn_v = nn.Linear(d, kv, bias=False)
        self.attn_output = nn.Linear(d, d, bias=False)
        self.ffn_norm = _RmsNorm(d, spec.norm_eps)
        self.ffn_gate = nn.Linear(d, f, bias=False)
        self.ffn_up = nn.Linear(d, f, bias=False)
        self.ffn_down = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        b, t, _ = x.shape
        h = self.attn_norm(x)
        q = _rope_norm(self.attn_q(h).view(b, t, spec.n_heads, spec.head_dim), cos, sin)
        k = _rope_norm(self.attn_k(h).view(b, t, spec.n_kv_heads, spec.head_dim), cos, sin)
        v = self.attn_v(h).view(b, t, spec.n_kv_heads, spec.head_dim)
        group = spec.n_heads // spec.n_kv_heads
        if group > 1:
            k = k.repeat_interleave(group, dim=2)
            v = v.repeat_interleave(group, dim=2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, H, T, D)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(spec.head_dim) + mask
        attn = torch.softmax(scores, dim=-1) @ v
        x = x + self.attn_output(attn.transpose(1, 2).reshape(b, t, spec.dim))
        h = self.ffn_norm(x)
        out: torch.Tensor = x + self.ffn_down(F.silu(self.ffn_gate(h)) * self.ffn_up(h))
        return out


class TorchLlama(nn.Module):
    """llama architecture as llama.cpp runs ``LLM_ARCH_LLAMA`` (see ``reference_logits``)."""

    def __init__(self, spec: LlamaSpec) -> None:
        super().__init__()
        self.spec = spec
        self.token_embd = nn.Embedding(spec.n_vocab, spec.dim)
        self.blocks = nn.ModuleList(_Block(spec) for _ in range(spec.n_layers))
        self.output_norm = _RmsNorm(spec.dim, spec.norm_eps)
        self.output = nn.Linear(spec.dim, spec.n_vocab, bias=False)
        cos, sin = _rope_tables(spec.head_dim, spec.n_ctx_train, spec.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        #: a fixed offset added to the logits in training (a compacted vocabulary's OTHER
        #: class, see moe2.tools.offline.real_tokenizers); not a weight, not exported
        self.logit_offset: torch.Tensor | None = None

    @classmethod
    def initialised(cls, spec: LlamaSpec, seed: int) -> TorchLlama:
        """A fresh model for training: small Gaussian init (std 0.02, residual outputs scaled
        by ``1/sqrt(2 * n_layers)``), unit norms."""
        gen = torch.Generator().manual_seed(seed)
        model = cls(spec)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                    continue
                std = 0.02
                if name.endswith(("attn_output.weight", "ffn_down.weight")):
                    std /= math.sqrt(2 * spec.n_layers)
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        return model

    @classmethod
    def from_weights(cls, spec: LlamaSpec, weights: Mapping[str, FloatArray]) -> TorchLlama:
        """Load weights in llama.cpp naming (``(out, in)`` matrices)."""
        model = cls(spec)
        own = model._gguf_params()
        if set(own) != set(weights):
            raise ValueError(f"weights do not match the spec: {sorted(set(own) ^ set(weights))}")
        with torch.no_grad():
            for key, param in own.items():
                array = np.asarray(weights[key], dtype=np.float32)
                if tuple(array.shape) != tuple(param.shape):
                    raise ValueError(f"{key}: shape {array.shape}, expected {tuple(param.shape)}")
                param.copy_(torch.from_numpy(array.copy()))
        return model

    @classmethod
    def random(cls, spec: LlamaSpec, seed: int) -> TorchLlama:
        """The same random weights as :func:`gguf_models.random_weights`."""
        return cls.from_weights(spec, random_weights(spec, seed))

    def _gguf_params(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {"token_embd.weight": self.token_embd.weight}
        for i, block in enumerate(self.blocks):
            assert isinstance(block, _Block)
            p = f"blk.{i}."
            out[p + "attn_norm.weight"] = block.attn_norm.weight
            out[p + "attn_q.weight"] = block.attn_q.weight
            out[p + "attn_k.weight"] = block.attn_k.weight
            out[p + "attn_v.weight"] = block.attn_v.weight
            out[p + "attn_output.weight"] = block.attn_output.weight
            out[p + "ffn_norm.weight"] = block.ffn_norm.weight
            out[p + "ffn_gate.weight"] = block.ffn_gate.weight
            out[p + "ffn_up.weight"] = block.ffn_up.weight
            out[p + "ffn_down.weight"] = block.ffn_down.weight
        out["output_norm.weight"] = self.output_norm.weight
        out["output.weight"] = self.output.weight
        return out

    def gguf_weights(self) -> dict[str, FloatArray]:
        """float32 numpy copies in llama.cpp naming, ready for ``write_gguf``."""
        return {k: np.ascontiguousarray(p.detach().cpu().numpy(), dtype=np.float32)
                for k, p in self._gguf_params().items()}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: (B, T) int64 -> logits (B, T, n_vocab); row t predicts token t + 1.
        Right padding needs no attention mask (causal attention never looks ahead)."""
        _, t = ids.shape
        if t > self.spec.n_ctx_train:
            raise ValueError(f"{t} tokens exceed the context of {self.spec.n_ctx_train}")
        cos = self.get_buffer("rope_cos")[:t]
        sin = self.get_buffer("rope_sin")[:t]
        mask = torch.full((t, t), float("-inf"), device=ids.device).triu(1)
        x = self.token_embd(ids)
        for block in self.blocks:
            x = block(x, cos, sin, mask)
        out: torch.Tensor = self.output(self.output_norm(x))
        if self.logit_offset is not None:
            out = out + self.logit_offset
        return out

    def copy(self) -> TorchLlama:
        clone = TorchLlama(self.spec)
        clone.load_state_dict(self.state_dict())
        clone.logit_offset = self.logit_offset
        return clone


@dataclass(frozen=True)
class LmExample:
    """One training sequence and a 0/1 weight per *target* position.

    ``loss_mask[t]`` weighs the prediction of ``tokens[t + 1]``; its length is
    ``len(tokens) - 1``.
    """

    tokens: tuple[int, ...]
    loss_mask: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.tokens) < 2 or len(self.loss_mask) != len(self.tokens) - 1:
            raise ValueError("need >= 2 tokens and one mask value per target")


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0


def _batch(examples: Sequence[LmExample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(e.tokens) for e in examples)
    ids = torch.zeros((len(examples), width), dtype=torch.long)
    targets = torch.zeros((len(examples), width - 1), dtype=torch.long)
    weights = torch.zeros((len(examples), width - 1))
    for i, e in enumerate(examples):
        n = len(e.tokens)
        ids[i, :n] = torch.tensor(e.tokens)
        targets[i, : n - 1] = torch.tensor(e.tokens[1:])
        weights[i, : n - 1] = torch.tensor(e.loss_mask)
    return ids[:, :-1], targets, weights


def lm_loss(model: TorchLlama, examples: Sequence[LmExample]) -> torch.Tensor:
    """Mean cross-entropy over the positions whose mask is positive."""
    ids, targets, weights = _batch(examples)
    logits = model(ids)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                          reduction="none").view_as(weights)
    return (nll * weights).sum() / weights.sum().clamp_min(1.0)


def train_lm(
    model: TorchLlama,
    examples: Sequence[LmExample],
    config: TrainConfig,
    *,
    desc: str = "train",
    progress: bool = True,
) -> list[float]:
    """Train in place with AdamW (linear warm-up, cosine decay to ``min_lr_ratio * lr``).

    Batches are drawn by shuffling the examples once per epoch with ``config.seed``.
    Returns the loss of every step.
    """
    if not examples:
        raise ValueError("no training examples")
    from tqdm import tqdm

    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim == 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < config.warmup_steps:
            return config.lr * (step + 1) / config.warmup_steps
        span = max(1, config.steps - config.warmup_steps)
        progress_frac = (step - config.warmup_steps) / span
        cos = 0.5 * (1.0 + math.cos(math.pi * progress_frac))
        return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cos)

    order: list[int] = []
    losses: list[float] = []
    model.train()
    bar = tqdm(range(config.steps), desc=desc, disable=not progress, leave=False,
               mininterval=1.0)
    for step in bar:
        if len(order) < config.batch_size:
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order.extend(fresh)
        picked = [examples[i] for i in order[: config.batch_size]]
        del order[: config.batch_size]
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = lm_loss(model, picked)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        value = float(loss.detach())
        losses.append(value)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{value:.3f}", refresh=False)
    bar.close()
    model.eval()
    logger.debug("%s: %d steps, final loss %.4f", desc, config.steps,
                 losses[-1] if losses else float("nan"))
    return losses
