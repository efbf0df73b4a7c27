"""Calibration data for the gating network: format, I/O, and teacher forcing on GGUF experts.

File format (JSON, UTF-8; ``moe2 calibrate`` and :func:`build_calibration_from_gguf` write it,
``moe2 train-gate`` reads it)::

    {
      "format": "moe2-calibration",
      "version": 1,
      "experts": ["expert-0", "expert-1", ...],        # order of every "probs" list
      "embedding": {"model": "sentence-transformers/all-MiniLM-L6-v2", "dim": 384,
                    "max_length": 256},
      "vocab_fingerprint": "<sha256 hex>" | null,      # see gguf_models.fingerprint_tokens
      "splits": {
        "<split name>": [                              # e.g. "calib", "validation", "test"
          {
            "prompt": "Q: What is 7 plus 5? A:",       # the exact text the experts were given
            "answer": "12",
            "family": "arithmetic",                    # optional label ("" if unknown)
            "embedding": [384 floats],                 # MiniLM(prompt), mean-pooled, unit norm
            "answer_tokens": [29871, 29896, 29906, 2], # y_1..y_T, the last one is EOS
            "probs": [[p_1, ..., p_T], ...]            # per expert: f_{n,y_t}(h(x, t))
          }, ...
        ]
      }
    }

``probs[n][t]`` is expert ``n``'s probability of answer token ``t`` under teacher forcing: the
expert saw ``BOS + tokens(prompt) + y_1 .. y_{t-1}``. The answer is tokenised on its own
(``" " + answer`` through the SPM dummy prefix) and ends with EOS, exactly as the experts were
trained, so Algorithm 1's loss ``-sum_t log sum_n w_n f_{n,y_t}`` (eq. 13) can be computed from
this file alone. ``moe2 train-gate`` trains on one split (default ``calib``) and stops early on
another (default ``validation``).

This module needs numpy only; teacher forcing needs llama-cpp-python and embeddings need the
``train`` extra (torch).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from moe2.coordinator.gating import EMBEDDING_DIM, EMBEDDING_MODEL, MAX_LENGTH
from moe2.tools.offline.corpus import Sample

__all__ = [
    "CALIBRATION_FORMAT",
    "CALIBRATION_VERSION",
    "Calibration",
    "CalibrationRecord",
    "build_calibration_from_gguf",
    "compute_calibration_from_gguf",
    "load_calibration",
    "save_calibration",
]

logger = logging.getLogger(__name__)

CALIBRATION_FORMAT = "moe2-calibration"
CALIBRATION_VERSION = 1


@dataclass(frozen=True)
class CalibrationRecord:
    """One sample of the calibration file (see the module doc)."""

    prompt: str
    answer: str
    family: str
    embedding: tuple[float, ...]
    answer_tokens: tuple[int, ...]
    probs: tuple[tuple[float, ...], ...]  # [expert][token]

    def __post_init__(self) -> None:
        t = len(self.answer_tokens)
        if t == 0:
            raise ValueError(f"{self.prompt!r}: no answer tokens")
        for row in self.probs:
            if len(row) != t:
                raise ValueError(f"{self.prompt!r}: {len(row)} probabilities for {t} tokens")
            if any(not 0.0 <= p <= 1.0 for p in row):
                raise ValueError(f"{self.prompt!r}: probability outside [0, 1]")

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt, "answer": self.answer, "family": self.family,
            "embedding": list(self.embedding), "answer_tokens": list(self.answer_tokens),
            "probs": [list(r) for r in self.probs],
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> CalibrationRecord:
        return cls(
            prompt=str(obj["prompt"]), answer=str(obj["answer"]),
            family=str(obj.get("family", "")),
            embedding=tuple(float(x) for x in obj["embedding"]),
            answer_tokens=tuple(int(x) for x in obj["answer_tokens"]),
            probs=tuple(tuple(float(p) for p in row) for row in obj["probs"]),
        )


@dataclass(frozen=True)
class Calibration:
    experts: tuple[str, ...]
    splits: dict[str, tuple[CalibrationRecord, ...]]
    embedding_model: str = EMBEDDING_MODEL
    embedding_dim: int = EMBEDDING_DIM
    max_length: int = MAX_LENGTH
    vocab_fingerprint: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.experts:
            raise ValueError("no experts")
        if len(set(self.experts)) != len(self.experts):
            raise ValueError("duplicate expert names")
        for name, records in self.splits.items():
            for r in records:
                if len(r.probs) != len(self.experts):
                    raise ValueError(f"split {name}: {r.prompt!r} has {len(r.probs)} expert "
                                     f"rows for {len(self.experts)} experts")
                if len(r.embedding) != self.embedding_dim:
                    raise ValueError(f"split {name}: {r.prompt!r} embedding has "
                                     f"{len(r.embedding)} values, expected {self.embedding_dim}")

    def arrays(self, split: str) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64],
                                          npt.NDArray[np.bool_]]:
        """``(embeddings (S, D), probs (S, N, T_max), mask (S, T_max))`` with zero padding."""
        records = self.splits[split]
        if not records:
            raise ValueError(f"split {split!r} is empty")
        t_max = max(len(r.answer_tokens) for r in records)
        emb = np.array([r.embedding for r in records], dtype=np.float32)
        probs = np.ones((len(records), len(self.experts), t_max), dtype=np.float64)
        mask = np.zeros((len(records), t_max), dtype=np.bool_)
        for i, r in enumerate(records):
            t = len(r.answer_tokens)
            probs[i, :, :t] = np.asarray(r.probs, dtype=np.float64)
            mask[i, :t] = True
        return emb, probs, mask

    def to_json(self) -> dict[str, Any]:
        return {
            "format": CALIBRATION_FORMAT,
            "version": CALIBRATION_VERSION,
            "experts": list(self.experts),
            "embedding": {"model": self.embedding_model, "dim": self.embedding_dim,
                          "max_length": self.max_length},
            "vocab_fingerprint": self.vocab_fingerprint,
            "extra": self.extra,
            "splits": {name: [r.to_json() for r in records]
                       for name, records in self.splits.items()},
        }


def save_calibration(path: str | os.PathLike[str], calibration: Calibration) -> None:
    target = Path(path)
    tmp = target.with_name(target.name + ".part")
    tmp.write_text(json.dumps(calibration.to_json(), separators=(",", ":")) + "\n",
                   encoding="utf-8")
    os.replace(tmp, target)


def load_calibration(path: str | os.PathLike[str]) -> Calibration:
    """Read and validate a calibration file; ``ValueError`` with the reason if it is not one."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a JSON calibration file ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != CALIBRATION_FORMAT:
        raise ValueError(f"{path}: not a moe2 calibration file")
    if raw.get("version") != CALIBRATION_VERSION:
        raise ValueError(f"{path}: unsupported calibration version {raw.get('version')!r}")
    try:
        emb = raw.get("embedding", {})
        return Calibration(
            experts=tuple(str(x) for x in raw["experts"]),
            splits={str(name): tuple(CalibrationRecord.from_json(r) for r in records)
                    for name, records in raw["splits"].items()},
            embedding_model=str(emb.get("model", EMBEDDING_MODEL)),
            embedding_dim=int(emb.get("dim", EMBEDDING_DIM)),
            max_length=int(emb.get("max_length", MAX_LENGTH)),
            vocab_fingerprint=raw.get("vocab_fingerprint"),
            extra=dict(raw.get("extra", {})),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: malformed calibration file ({exc!r})") from None


# --------------------------------------------------------------------------- from GGUF


@dataclass(frozen=True)
class TeacherForced:
    """Per-sample result of :func:`compute_calibration_from_gguf`."""

    sample: Sample
    answer_tokens: tuple[int, ...]
    probs: tuple[tuple[float, ...], ...]  # [expert][token], experts in the given order


def compute_calibration_from_gguf(
    experts: Mapping[str, str | os.PathLike[str]],
    samples: Sequence[Sample],
    *,
    n_ctx: int = 0,
    progress: bool = False,
    desc: str = "teacher forcing",
) -> list[TeacherForced]:
    """Teacher-force every sample through every GGUF expert (llama.cpp, exact settings).

    The prompt is tokenised as is with BOS; the answer tokens are ``tokens(answer)`` (SPM dummy
    prefix, no BOS) followed by EOS. Every expert must tokenise identically (shared vocabulary);
    a mismatch raises ``ValueError``.
    """
    from tqdm import tqdm

    from moe2.tools.offline.experts_eval import ExpertRunner

    if not experts:
        raise ValueError("no experts")
    out: list[TeacherForced] = []
    with ExitStack() as stack:
        runners = [stack.enter_context(ExpertRunner(p, n_ctx=n_ctx)) for p in experts.values()]
        first = runners[0]
        for s in tqdm(samples, desc=desc, disable=not progress, leave=False):
            prompt = first.tokenize(s.prompt)
            answer = [*_answer_tokens(first, s.answer), first.eos]
            for r in runners[1:]:
                if r.tokenize(s.prompt) != prompt or r.eos != first.eos:
                    raise ValueError(f"experts tokenise {s.prompt!r} differently; "
                                     "they must share one vocabulary")
            probs = tuple(tuple(float(p) for p in r.teacher_forced_probs(prompt, answer))
                          for r in runners)
            out.append(TeacherForced(sample=s, answer_tokens=tuple(answer), probs=probs))
    return out


def _answer_tokens(runner: Any, answer: str) -> list[int]:
    return [int(t) for t in runner.llm.tokenize(answer.encode("utf-8"), add_bos=False,
                                                special=False)]


def build_calibration_from_gguf(
    experts: Mapping[str, str | os.PathLike[str]],
    splits: Mapping[str, Sequence[Sample]],
    *,
    embed: Callable[[Sequence[str]], npt.NDArray[np.float32]] | None = None,
    vocab_fingerprint: str | None = None,
    progress: bool = False,
) -> Calibration:
    """The whole calibration file: teacher forcing per split plus MiniLM embeddings of the
    prompts (``embed`` defaults to :class:`moe2.tools.offline.embed.Embedder`, which needs
    torch)."""
    if embed is None:
        from moe2.tools.offline.embed import Embedder

        embedder = Embedder()

        def embed(texts: Sequence[str]) -> npt.NDArray[np.float32]:
            return embedder(texts, progress=progress)

    out: dict[str, tuple[CalibrationRecord, ...]] = {}
    for name, samples in splits.items():
        forced = compute_calibration_from_gguf(experts, samples, progress=progress,
                                               desc=f"teacher forcing {name}")
        vectors = embed([s.prompt for s in samples]) if samples else np.zeros((0, EMBEDDING_DIM))
        out[name] = tuple(
            CalibrationRecord(
                prompt=f.sample.prompt, answer=f.sample.answer, family=f.sample.family,
                embedding=tuple(float(x) for x in vec), answer_tokens=f.answer_tokens,
                probs=f.probs,
            )
            for f, vec in zip(forced, vectors, strict=True)
        )
    return Calibration(experts=tuple(experts), splits=out, embedding_model=EMBEDDING_MODEL,
                       embedding_dim=EMBEDDING_DIM, max_length=MAX_LENGTH,
                       vocab_fingerprint=vocab_fingerprint)
