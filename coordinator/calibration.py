"""The calibration file: what ``moe2 calibrate`` writes, ``moe2 train-gate`` trains the gate on,
and the coordinator's planner reads for its loss table L(S) -- one format for all three.

JSON, UTF-8::

    {
      "format": "moe2-calibration",
      "version": 2,
      "experts": ["qwen-7b", "llama-3b", ...],       # the order of every per-expert list
      "embedding": {"model": "sentence-transformers/all-MiniLM-L6-v2", "dim": 384,
                    "max_length": 256},
      "vocab_fingerprint": "<hex>" | null,           # of the experts' shared vocabulary, if any
      "extra": {...},                                # how it was made (free form)
      "splits": {
        "calib": [                                   # e.g. "calib", "validation"
          {
            "prompt": "Q: What is 7 plus 5? A:",     # the text the gate sees
            "answer": "12",
            "app": "default",                        # the row's application class
            "family": "arithmetic",                  # a free label ("" when none)
            "embedding": [384 floats],               # MiniLM(prompt), mean-pooled, unit norm
            "tokens": [[29871, 29896, 29906, 2], ...],   # per expert: its own answer tokens
            "probs": [[p_1, ..., p_T], ...]              # per expert: f_{n,y_t}, teacher forced
          }, ...
        ]
      }
    }

``probs[n][t]`` is expert ``n``'s probability of its answer token ``tokens[n][t]`` given the
prompt and its tokens before ``t`` (the answer ends with its EOS). Experts of one vocabulary
family tokenise the answer alike and eq. 13 (``-sum_t log sum_n w_n f_{n,y_t}``) applies token by
token. Experts of different families split it differently: then every expert's row becomes
``T`` equal pseudo-tokens of its per-token geometric-mean probability (``T`` = the rounded mean
of the experts' lengths), so the same mixture loss -- gate training and the planner's L(S) --
compares them over the same answer (:meth:`CalibrationRecord.token_probs`). Version 1 files
(one ``answer_tokens`` list shared by every expert) are read as well.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from moe2.coordinator.gating import EMBEDDING_DIM, EMBEDDING_MODEL, MAX_LENGTH

CALIBRATION_FORMAT = "moe2-calibration"
CALIBRATION_VERSION = 2
#: probabilities are floored here before logs (a teacher-forced zero would be -inf)
PROB_FLOOR = 1e-12


class CalibrationError(ValueError):
    """Not a calibration file, a damaged one, or one that does not fit (one line)."""


@dataclass(frozen=True)
class CalibrationRecord:
    """One sample of the calibration file (see the module doc)."""

    prompt: str
    answer: str
    family: str
    embedding: tuple[float, ...]
    tokens: tuple[tuple[int, ...], ...]  # [expert][token]
    probs: tuple[tuple[float, ...], ...]  # [expert][token]
    app: str = "default"

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.probs):
            raise ValueError(f"{self.prompt!r}: {len(self.tokens)} token lists for "
                             f"{len(self.probs)} probability lists")
        for toks, row in zip(self.tokens, self.probs, strict=True):
            if not toks:
                raise ValueError(f"{self.prompt!r}: no answer tokens")
            if len(row) != len(toks):
                raise ValueError(f"{self.prompt!r}: {len(row)} probabilities for "
                                 f"{len(toks)} tokens")
            if any(not 0.0 <= p <= 1.0 for p in row):
                raise ValueError(f"{self.prompt!r}: probability outside [0, 1]")

    @property
    def aligned(self) -> bool:
        """Every expert tokenised the answer alike (one vocabulary family)."""
        return all(t == self.tokens[0] for t in self.tokens)

    def token_probs(self) -> npt.NDArray[np.float64]:
        """``(experts, T)`` per-token probabilities for the mixture loss (see the module doc:
        geometric-mean pseudo-tokens when the experts tokenise differently)."""
        if self.aligned:
            return np.asarray(self.probs, dtype=np.float64)
        t = max(1, round(sum(len(r) for r in self.probs) / len(self.probs)))
        geo = [math.exp(float(np.mean(np.log(np.maximum(np.asarray(r), PROB_FLOOR)))))
               for r in self.probs]
        return np.repeat(np.asarray(geo, dtype=np.float64)[:, None], t, axis=1)

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt, "answer": self.answer, "app": self.app,
            "family": self.family, "embedding": list(self.embedding),
            "tokens": [list(t) for t in self.tokens], "probs": [list(r) for r in self.probs],
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], n_experts: int) -> CalibrationRecord:
        probs = tuple(tuple(float(p) for p in row) for row in obj["probs"])
        if "tokens" in obj:
            tokens = tuple(tuple(int(x) for x in t) for t in obj["tokens"])
        else:  # version 1: one tokenisation shared by every expert
            shared = tuple(int(x) for x in obj["answer_tokens"])
            tokens = (shared,) * n_experts
        return cls(prompt=str(obj["prompt"]), answer=str(obj["answer"]),
                   family=str(obj.get("family", "")), app=str(obj.get("app", "default")),
                   embedding=tuple(float(x) for x in obj["embedding"]), tokens=tokens,
                   probs=probs)


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
        """``(embeddings (S, D), probs (S, N, T_max), mask (S, T_max))`` with zero padding,
        per-token probabilities as :meth:`CalibrationRecord.token_probs` gives them."""
        records = self.splits[split]
        if not records:
            raise ValueError(f"split {split!r} is empty")
        rows = [r.token_probs() for r in records]
        t_max = max(p.shape[1] for p in rows)
        emb = np.array([r.embedding for r in records], dtype=np.float32)
        probs = np.ones((len(records), len(self.experts), t_max), dtype=np.float64)
        mask = np.zeros((len(records), t_max), dtype=np.bool_)
        for i, p in enumerate(rows):
            probs[i, :, : p.shape[1]] = p
            mask[i, : p.shape[1]] = True
        return emb, probs, mask

    def planner_rows(self, gates: Sequence[Mapping[str, float]], split: str | None = None,
                     names: Sequence[str] | None = None
                     ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """The planner's loss table input (paper eq. 13-15): one row per answer token of
        ``split`` (default: ``validation`` if present, else every split), columns ``names``
        (default every expert): the prompt's gating values and each expert's probability.
        ``gates`` holds one mapping per record of that split, in order."""
        records = self.records(split)
        if len(gates) != len(records):
            raise ValueError(f"{len(gates)} gate rows for {len(records)} records")
        names = list(names or self.experts)
        cols = [self.experts.index(n) for n in names]
        g_rows: list[list[float]] = []
        p_rows: list[npt.NDArray[np.float64]] = []
        for rec, g in zip(records, gates, strict=True):
            tp = rec.token_probs()[cols]
            for t in range(tp.shape[1]):
                g_rows.append([float(g.get(n, 0.0)) for n in names])
                p_rows.append(tp[:, t])
        return np.asarray(g_rows, dtype=np.float64), np.asarray(p_rows, dtype=np.float64)

    def records(self, split: str | None = None) -> tuple[CalibrationRecord, ...]:
        if split is not None:
            return self.splits[split]
        if "validation" in self.splits:
            return self.splits["validation"]
        return tuple(r for recs in self.splits.values() for r in recs)

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
    """Written next to ``path`` and renamed into place: never half a file."""
    target = Path(path)
    tmp = target.with_name(target.name + ".part")
    tmp.write_text(json.dumps(calibration.to_json(), separators=(",", ":")) + "\n",
                   encoding="utf-8")
    os.replace(tmp, target)


def load_calibration(path: str | os.PathLike[str]) -> Calibration:
    """Read and validate a calibration file; :class:`CalibrationError` says why it is not one."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise CalibrationError(f"cannot read calibration {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CalibrationError(f"{path}: not a JSON calibration file ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != CALIBRATION_FORMAT:
        raise CalibrationError(f"{path}: not a moe2 calibration file (write one with "
                               "`moe2 calibrate`)")
    if raw.get("version") not in (1, CALIBRATION_VERSION):
        raise CalibrationError(f"{path}: unsupported calibration version {raw.get('version')!r}")
    try:
        emb = raw.get("embedding", {})
        experts = tuple(str(x) for x in raw["experts"])
        return Calibration(
            experts=experts,
            splits={str(name): tuple(CalibrationRecord.from_json(r, len(experts))
                                     for r in records)
                    for name, records in raw["splits"].items()},
            embedding_model=str(emb.get("model", EMBEDDING_MODEL)),
            embedding_dim=int(emb.get("dim", EMBEDDING_DIM)),
            max_length=int(emb.get("max_length", MAX_LENGTH)),
            vocab_fingerprint=raw.get("vocab_fingerprint"),
            extra=dict(raw.get("extra", {})),
        )
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise CalibrationError(f"{path}: malformed calibration file ({exc})") from None
