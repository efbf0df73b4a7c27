"""Gating values at run time: what the coordinator imports (onnxruntime + tokenizers, no torch).

A :class:`Gate` maps a prompt to a positive gating value ``g_n(x)`` per expert it knows
(paper eq. 2: the coordinator renormalises over the experts it actually uses):

* :class:`OnnxGate` runs a gate exported by ``moe2 train-gate``: one ONNX graph from MiniLM
  word-piece ids (``input_ids``, ``attention_mask``: int64 ``[batch, seq]``) to ``gates``
  (float32 ``[batch, n_experts]``, strictly positive). The file is self-contained: its
  ``metadata_props`` carry the expert names (:data:`META_EXPERTS`, a JSON list in output order),
  the tokenizer.json text (:data:`META_TOKENIZER`) and the truncation length
  (:data:`META_MAX_LENGTH`).
* :class:`UniformGate` gives every expert the value 1.0 (no gate configured; the coordinator
  should flag answers made with it).
* :class:`FixedGate` returns fixed values (tests, experiments).

:func:`load_gate` picks one from an optional path.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "EMBEDDING_DIM",
    "EMBEDDING_MODEL",
    "GATE_FORMAT",
    "MAX_LENGTH",
    "META_EXPERTS",
    "META_FORMAT",
    "META_MAX_LENGTH",
    "META_TOKENIZER",
    "FixedGate",
    "Gate",
    "GateLoadError",
    "OnnxGate",
    "UniformGate",
    "load_gate",
    "values_for",
]

logger = logging.getLogger(__name__)

#: The sentence embedder inside every exported gate.
EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDING_DIM = 384
#: Word pieces kept per prompt (sentence-transformers' max_seq_length for this model).
MAX_LENGTH = 256

GATE_FORMAT = "moe2-gate"
GATE_VERSION = 1
META_FORMAT = "moe2.format"
META_VERSION = "moe2.version"
META_EXPERTS = "moe2.experts"
META_TOKENIZER = "moe2.tokenizer"
META_MAX_LENGTH = "moe2.max_length"
META_EMBEDDING = "moe2.embedding_model"
META_TRAINING = "moe2.training"


class GateLoadError(ValueError):
    """The file is missing, not ONNX, or not a moe2 gate."""


@runtime_checkable
class Gate(Protocol):
    """Positive gating values per known expert for a prompt."""

    @property
    def kind(self) -> str:
        """``"onnx"``, ``"uniform"`` or ``"fixed"``."""
        ...

    @property
    def experts(self) -> tuple[str, ...]:
        """Names the gate knows (empty for :class:`UniformGate`)."""
        ...

    def values(self, text: str) -> dict[str, float]:
        """``{expert: g > 0}`` for every known expert."""
        ...


@dataclass(frozen=True)
class UniformGate:
    """Every expert gets 1.0; :attr:`experts` is empty because it knows none in particular."""

    kind: str = "uniform"
    experts: tuple[str, ...] = ()

    def values(self, text: str) -> dict[str, float]:
        return dict.fromkeys(self.experts, 1.0)


class FixedGate:
    """The same values for every prompt (0 means: never choose this expert)."""

    kind = "fixed"

    def __init__(self, values: Mapping[str, float]) -> None:
        bad = {k: v for k, v in values.items() if not (float(v) >= 0 and np.isfinite(v))}
        if bad:
            raise ValueError(f"gating values must be finite and non-negative: {bad}")
        self._values = {str(k): float(v) for k, v in values.items()}
        self.experts: tuple[str, ...] = tuple(self._values)

    def values(self, text: str) -> dict[str, float]:
        return dict(self._values)

    def __repr__(self) -> str:
        return f"FixedGate({self._values!r})"


class OnnxGate:
    """A gate exported by ``moe2 train-gate``, run with onnxruntime on the CPU."""

    kind = "onnx"

    def __init__(self, session: Any, tokenizer: Any, experts: Sequence[str], *,
                 max_length: int, path: str | None = None,
                 metadata: Mapping[str, str] | None = None) -> None:
        self._session = session
        self._tokenizer = tokenizer
        self.experts: tuple[str, ...] = tuple(experts)
        self.max_length = max_length
        self.path = path
        self.metadata: dict[str, str] = dict(metadata or {})
        outputs = session.get_outputs()
        self._output = outputs[0].name

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, threads: int = 1) -> OnnxGate:
        """Open a gate file; :class:`GateLoadError` says why a file is not one."""
        import onnxruntime as ort
        from tokenizers import Tokenizer

        p = Path(path)
        if not p.is_file():
            raise GateLoadError(f"{p}: no such gate file")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            session = ort.InferenceSession(str(p), sess_options=opts,
                                           providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 (onnxruntime's errors derive from Exception only)
            raise GateLoadError(f"{p}: not an ONNX model ({exc})") from None
        meta = dict(session.get_modelmeta().custom_metadata_map)
        if meta.get(META_FORMAT) != GATE_FORMAT:
            raise GateLoadError(f"{p}: an ONNX model but not a moe2 gate "
                                f"(metadata {META_FORMAT!r} is {meta.get(META_FORMAT)!r})")
        try:
            experts = json.loads(meta[META_EXPERTS])
            max_length = int(meta[META_MAX_LENGTH])
            tokenizer = Tokenizer.from_str(meta[META_TOKENIZER])
        except Exception as exc:  # noqa: BLE001 (tokenizers raises a bare Exception)
            raise GateLoadError(f"{p}: damaged moe2 gate metadata ({exc!r})") from None
        if (not isinstance(experts, list) or not experts
                or not all(isinstance(e, str) for e in experts)):
            raise GateLoadError(f"{p}: {META_EXPERTS} must be a non-empty JSON list of names")
        inputs = {i.name for i in session.get_inputs()}
        if inputs != {"input_ids", "attention_mask"}:
            raise GateLoadError(f"{p}: gate inputs are {sorted(inputs)}, "
                                "expected input_ids and attention_mask")
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=max_length)
        logger.info("gate %s: %d experts (%s)", p, len(experts), ", ".join(experts))
        return cls(session, tokenizer, experts, max_length=max_length, path=str(p),
                   metadata=meta)

    def values(self, text: str) -> dict[str, float]:
        return self.values_batch([text])[0]

    def values_batch(self, texts: Sequence[str]) -> list[dict[str, float]]:
        """Gating values for several prompts in one run."""
        if not texts:
            return []
        encodings = self._tokenizer.encode_batch(list(texts))
        width = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(texts), width), dtype=np.int64)
        mask = np.zeros((len(texts), width), dtype=np.int64)
        for i, e in enumerate(encodings):
            ids[i, : len(e.ids)] = e.ids
            mask[i, : len(e.ids)] = 1
        (gates,) = self._session.run([self._output], {"input_ids": ids, "attention_mask": mask})
        out = np.asarray(gates, dtype=np.float64)
        if out.shape != (len(texts), len(self.experts)):
            raise RuntimeError(f"gate returned shape {out.shape}, expected "
                               f"{(len(texts), len(self.experts))}")
        return [{name: float(v) for name, v in zip(self.experts, row, strict=True)}
                for row in out]

    def __repr__(self) -> str:
        return f"OnnxGate({self.path!r}, experts={self.experts!r})"


def load_gate(path: str | os.PathLike[str] | None, *, threads: int = 1) -> Gate:
    """:class:`OnnxGate` from ``path``, or :class:`UniformGate` when ``path`` is None/empty."""
    if path is None or not os.fspath(path):
        return UniformGate()
    return OnnxGate.load(path, threads=threads)


def values_for(gate: Gate, text: str, names: Sequence[str]) -> tuple[dict[str, float], list[str]]:
    """Gating values for the experts ``names`` (pure helper for the coordinator).

    A uniform gate gives 1.0 to every name. Otherwise names the gate does not know are left
    out and returned as the second element, so the caller can drop or flag them.
    """
    if gate.kind == "uniform":
        return dict.fromkeys(names, 1.0), []
    known = gate.values(text)
    return ({n: known[n] for n in names if n in known}, [n for n in names if n not in known])
