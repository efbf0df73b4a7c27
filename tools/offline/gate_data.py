"""Calibration data from GGUF files directly (llama.cpp teacher forcing), for the generated
fleet of ``moe2 make-experts``. The file format lives in :mod:`moe2.coordinator.calibration`
(the planner reads it too); this module re-exports it for the offline tools."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from moe2.coordinator.calibration import (
    CALIBRATION_FORMAT,
    CALIBRATION_VERSION,
    Calibration,
    CalibrationError,
    CalibrationRecord,
    load_calibration,
    save_calibration,
)
from moe2.coordinator.gating import EMBEDDING_DIM, EMBEDDING_MODEL, MAX_LENGTH
from moe2.tools.offline.corpus import Sample

__all__ = [
    "CALIBRATION_FORMAT",
    "CALIBRATION_VERSION",
    "Calibration",
    "CalibrationError",
    "CalibrationRecord",
    "build_calibration_from_gguf",
    "compute_calibration_from_gguf",
    "load_calibration",
    "save_calibration",
]

logger = logging.getLogger(__name__)



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
                app=f.sample.family or "default",
                embedding=tuple(float(x) for x in vec),
                tokens=(f.answer_tokens,) * len(f.probs), probs=f.probs,
            )
            for f, vec in zip(forced, vectors, strict=True)
        )
    return Calibration(experts=tuple(experts), splits=out, embedding_model=EMBEDDING_MODEL,
                       embedding_dim=EMBEDDING_DIM, max_length=MAX_LENGTH,
                       vocab_fingerprint=vocab_fingerprint)
