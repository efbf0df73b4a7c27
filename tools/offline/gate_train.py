"""Train the gating network on calibration data (paper Algorithm 1, eq. 13-15) and export it
as one self-contained ONNX graph.

Network (paper Table VI and Appendix A): the MiniLM sentence embedding ``x`` (384-d, unit norm)
goes through two hidden layers ``h1 = drop(PReLU(W1 x))``, ``h2 = drop(PReLU(W2 h1))``; the
input and every hidden activation are concatenated (residual concatenation) before the output
layer, and ``g = softplus(W3 [x, h1, h2]) + 1e-6`` makes every gating value strictly positive.
The output layer starts at zero, so training starts from equal weights.

Loss (eq. 13-15, teacher forcing): with ``w_n = g_n / sum_m g_m`` over *all* experts,
``L = mean over samples of -sum_t log sum_n w_n f_{n,y_t}``, where ``f_{n,y_t}`` are the
per-token probabilities stored in the calibration file (:mod:`moe2.tools.offline.gate_data`).
By Theorem 1 the same gate serves every subset after renormalising.

Optimiser (Table VI defaults, all overridable): AdamW, lr 1e-5, batch 8 with 8 accumulation
steps, gradient clip 1.0, ReduceLROnPlateau (factor 0.8, patience 50 epochs) on the validation
loss, early stopping after ``patience`` epochs without improvement (best weights restored).
lr 1e-5 is the paper's value for 1024-d mGTE inputs and thousands of prompts; with our few
hundred calibration prompts ``moe2 reproduce`` passes a larger one (1e-3 converges in seconds).

Export (:func:`export_gate_onnx`): MiniLM + mean pooling + L2 normalisation + this MLP as one ONNX
graph ``(input_ids, attention_mask) -> gates`` with the expert names, tokenizer.json and
max_length in ``metadata_props`` (see :mod:`moe2.coordinator.gating`).

Needs torch and onnx (the ``train`` extra).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from moe2.coordinator.gating import (
    EMBEDDING_MODEL,
    GATE_FORMAT,
    GATE_VERSION,
    MAX_LENGTH,
    META_EMBEDDING,
    META_EXPERTS,
    META_FORMAT,
    META_MAX_LENGTH,
    META_TOKENIZER,
    META_TRAINING,
    META_VERSION,
)
from moe2.tools.offline.gate_data import (
    Calibration,
    build_calibration_from_gguf,
    compute_calibration_from_gguf,
    load_calibration,
    save_calibration,
)

__all__ = [
    "GATE_FLOOR",
    "GateMLP",
    "GateModel",
    "GateTrainConfig",
    "GateTrainResult",
    "build_calibration_from_gguf",
    "compute_calibration_from_gguf",
    "export_gate_onnx",
    "load_calibration",
    "mixture_nll",
    "save_calibration",
    "train_gate",
]

logger = logging.getLogger(__name__)

#: Added to softplus so that float32 gating values never reach 0.
GATE_FLOOR = 1e-6
_LOG_P_MIN = math.log(1e-30)


class GateMLP(nn.Module):
    """Embedding -> positive gating values (see the module doc)."""

    def __init__(self, in_dim: int, n_experts: int, *, hidden: int = 128,
                 dropout: float = 0.1) -> None:
        super().__init__()
        if n_experts < 1 or hidden < 1 or in_dim < 1:
            raise ValueError("in_dim, n_experts and hidden must be positive")
        if not 0.0 <= dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")
        self.in_dim, self.n_experts, self.hidden = in_dim, n_experts, hidden
        self.fc1 = nn.Linear(in_dim, hidden)
        self.act1 = nn.PReLU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.act2 = nn.PReLU()
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(in_dim + 2 * hidden, n_experts)
        with torch.no_grad():
            self.out.weight.zero_()
            self.out.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1 = self.drop(self.act1(self.fc1(x)))
        h2 = self.drop(self.act2(self.fc2(h1)))
        return F.softplus(self.out(torch.cat((x, h1, h2), dim=-1))) + GATE_FLOOR


class GateModel(nn.Module):
    """MiniLM sentence encoder + :class:`GateMLP`: word-piece ids -> gating values."""

    def __init__(self, encoder: nn.Module, mlp: GateMLP) -> None:
        super().__init__()
        self.encoder = encoder
        self.mlp = mlp

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.mlp(self.encoder(input_ids, attention_mask))
        return out


def mixture_nll(gates: torch.Tensor, log_probs: torch.Tensor, mask: torch.Tensor
                ) -> torch.Tensor:
    """Eq. 13 per sample: ``-sum_t log sum_n (g_n / sum g) f_{n,y_t}``.

    gates: (B, N) positive; log_probs: (B, N, T) log f_{n,y_t}; mask: (B, T) bool.
    """
    log_w = torch.log(gates) - torch.log(gates.sum(dim=-1, keepdim=True))
    mixed = torch.logsumexp(log_w.to(log_probs.dtype)[:, :, None] + log_probs, dim=1)  # (B, T)
    return -(mixed * mask).sum(dim=-1)


@dataclass(frozen=True)
class GateTrainConfig:
    hidden: int = 128
    dropout: float = 0.1
    lr: float = 1e-5
    weight_decay: float = 0.01
    epochs: int = 1000
    patience: int = 100
    batch_size: int = 8
    grad_accum: int = 8
    lr_factor: float = 0.8
    lr_patience: int = 50
    grad_clip: float = 1.0
    seed: int = 0
    train_split: str = "calib"
    val_split: str = "validation"
    #: torch threads while training (0 = leave torch's setting alone)
    threads: int = 1

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.patience < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("epochs, patience, batch_size and grad_accum must be positive")
        if not self.lr > 0:
            raise ValueError("lr must be positive")


@dataclass
class GateTrainResult:
    mlp: GateMLP
    experts: tuple[str, ...]
    config: GateTrainConfig
    best_epoch: int
    epochs_run: int
    train_loss: float
    val_loss: float
    val_loss_uniform: float
    val_routing_accuracy: float
    history: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "experts": list(self.experts),
            "best_epoch": self.best_epoch,
            "epochs_run": self.epochs_run,
            "train_loss": round(self.train_loss, 6),
            "val_loss": round(self.val_loss, 6),
            "val_loss_uniform": round(self.val_loss_uniform, 6),
            "val_routing_accuracy": round(self.val_routing_accuracy, 4),
            "config": asdict(self.config),
        }


def _tensors(cal: Calibration, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if split not in cal.splits:
        raise ValueError(f"calibration file has no split {split!r} "
                         f"(it has {sorted(cal.splits)})")
    emb, probs, mask = cal.arrays(split)
    log_probs = np.log(np.clip(probs, 1e-30, None))
    log_probs[~np.broadcast_to(mask[:, None, :], log_probs.shape)] = 0.0
    return (torch.from_numpy(emb), torch.from_numpy(np.maximum(log_probs, _LOG_P_MIN)),
            torch.from_numpy(mask))


def _eval_loss(mlp: GateMLP, data: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> float:
    emb, logp, mask = data
    mlp.eval()
    with torch.no_grad():
        return float(mixture_nll(mlp(emb), logp, mask).mean())


def _routing_accuracy(mlp: GateMLP, data: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                      ) -> float:
    """How often the largest gate is the expert with the highest likelihood of the answer."""
    emb, logp, mask = data
    mlp.eval()
    with torch.no_grad():
        chosen = mlp(emb).argmax(dim=-1)
    best = (logp * mask[:, None, :]).sum(dim=-1).argmax(dim=-1)
    return float((chosen == best).double().mean())


def train_gate(cal: Calibration, config: GateTrainConfig | None = None, *,
               progress: bool = True) -> GateTrainResult:
    """Train :class:`GateMLP` on ``config.train_split``, early-stopping on ``config.val_split``."""
    from moe2.tools.offline.torch_llama import torch_threads

    cfg = config or GateTrainConfig()
    with torch_threads(cfg.threads):
        return _train_gate(cal, cfg, progress=progress)


def _train_gate(cal: Calibration, cfg: GateTrainConfig, *, progress: bool) -> GateTrainResult:
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    train = _tensors(cal, cfg.train_split)
    val = _tensors(cal, cfg.val_split)
    n_experts = len(cal.experts)
    mlp = GateMLP(cal.embedding_dim, n_experts, hidden=cfg.hidden, dropout=cfg.dropout)
    opt = torch.optim.AdamW(mlp.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=cfg.lr_factor,
                                                       patience=cfg.lr_patience)
    uniform = float(mixture_nll(torch.ones(len(val[0]), n_experts), val[1], val[2]).mean())
    best_loss, best_epoch, best_state = _eval_loss(mlp, val), 0, copy.deepcopy(mlp.state_dict())
    history: list[dict[str, float]] = []
    n = len(train[0])
    epoch = 0
    bar = tqdm(range(1, cfg.epochs + 1), desc="gate", disable=not progress, leave=False,
               mininterval=0.5)
    for epoch in bar:
        mlp.train()
        order = torch.randperm(n, generator=gen)
        total, micro = 0.0, 0
        opt.zero_grad(set_to_none=True)
        batches = [order[i:i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
        for j, idx in enumerate(batches):
            loss = mixture_nll(mlp(train[0][idx]), train[1][idx], train[2][idx]).mean()
            (loss / cfg.grad_accum).backward()  # type: ignore[no-untyped-call]
            total += float(loss.detach()) * len(idx)
            micro += 1
            if micro == cfg.grad_accum or j == len(batches) - 1:
                nn.utils.clip_grad_norm_(mlp.parameters(), cfg.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                micro = 0
        val_loss = _eval_loss(mlp, val)
        sched.step(val_loss)
        history.append({"epoch": epoch, "train_loss": total / n, "val_loss": val_loss,
                        "lr": float(opt.param_groups[0]["lr"])})
        if val_loss < best_loss - 1e-6:
            best_loss, best_epoch, best_state = val_loss, epoch, copy.deepcopy(mlp.state_dict())
        bar.set_postfix(val=f"{val_loss:.4f}", best=f"{best_loss:.4f}", refresh=False)
        if epoch - best_epoch >= cfg.patience:
            logger.info("early stop at epoch %d (best %d, val loss %.5f)", epoch, best_epoch,
                        best_loss)
            break
    bar.close()
    mlp.load_state_dict(best_state)
    mlp.eval()
    result = GateTrainResult(
        mlp=mlp, experts=cal.experts, config=cfg, best_epoch=best_epoch, epochs_run=epoch,
        train_loss=_eval_loss(mlp, train), val_loss=best_loss, val_loss_uniform=uniform,
        val_routing_accuracy=_routing_accuracy(mlp, val), history=history,
    )
    logger.info("gate: val loss %.4f (uniform %.4f), routing accuracy %.3f", result.val_loss,
                uniform, result.val_routing_accuracy)
    return result


# --------------------------------------------------------------------------- export


def export_gate_onnx(
    mlp: GateMLP,
    experts: Sequence[str],
    path: str | os.PathLike[str],
    *,
    training: dict[str, Any] | None = None,
    max_length: int = MAX_LENGTH,
    opset: int = 18,
) -> GateModel:
    """Write MiniLM + pooling + normalisation + ``mlp`` as one ONNX file with the metadata the
    runtime needs; returns the exported torch module (eval mode) for comparisons."""
    import onnx

    from moe2.tools.offline.embed import encode_batch, load_encoder, load_tokenizer, tokenizer_json

    if len(experts) != mlp.n_experts:
        raise ValueError(f"{len(experts)} names for a gate with {mlp.n_experts} outputs")
    model = GateModel(load_encoder(), copy.deepcopy(mlp)).eval()
    tokenizer = load_tokenizer(max_length=max_length)
    ids, mask = encode_batch(tokenizer, ["a moe2 gate", "one longer example sentence, padded"])
    target = Path(path)
    tmp = target.with_name(target.name + ".export")
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=1, max=max_length)
    onnx_logger = logging.getLogger("torch.onnx")
    old_level = onnx_logger.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecation/info noise
        onnx_logger.setLevel(logging.ERROR)  # "torchvision is not installed" and the like
        try:
            program = torch.onnx.export(
                model, (ids, mask), input_names=["input_ids", "attention_mask"],
                output_names=["gates"], opset_version=opset, dynamo=True, external_data=False,
                dynamic_shapes={"input_ids": {0: batch, 1: seq},
                                "attention_mask": {0: batch, 1: seq}},
                verbose=False,
            )
        finally:
            onnx_logger.setLevel(old_level)
        if program is None:
            raise RuntimeError("torch.onnx.export returned no program")
        program.save(str(tmp), external_data=False)
    proto = onnx.load(str(tmp))
    tmp.unlink()
    meta = {
        META_FORMAT: GATE_FORMAT,
        META_VERSION: str(GATE_VERSION),
        META_EXPERTS: json.dumps(list(experts)),
        META_TOKENIZER: tokenizer_json(),
        META_MAX_LENGTH: str(max_length),
        META_EMBEDDING: EMBEDDING_MODEL,
        META_TRAINING: json.dumps(training or {}, sort_keys=True),
    }
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    part = target.with_name(target.name + ".part")
    onnx.save(proto, str(part))
    os.replace(part, target)
    logger.info("wrote gate %s (%d experts, %.1f MB)", target, len(experts),
                target.stat().st_size / 1e6)
    return model
