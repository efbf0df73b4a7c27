"""``moe2 calibrate``: the gate's training data, from running agents (the production path) or
straight from the GGUF files.

Either way the result is the calibration file of :mod:`moe2.tools.offline.gate_data`: per sample,
the prompt's MiniLM embedding and, per expert, the teacher-forced probability of every answer
token (ending with EOS). Through agents, each expert's probabilities come from the very
distributions the coordinator fuses (k = 0, the full vocabulary), so a gate trained on them is
trained on what serving does.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from moe2.coordinator.gating import EMBEDDING_DIM, EMBEDDING_MODEL, MAX_LENGTH
from moe2.shared.topics import Topics
from moe2.tools.clients.agent_driver import calibrate_via_agents
from moe2.tools.offline.corpus import Sample
from moe2.tools.offline.gate_data import Calibration, CalibrationRecord

Embed = Callable[[Sequence[str]], npt.NDArray[np.float32]]


class Tokenizer:
    """The experts' own tokenizer (llama.cpp, vocabulary only) for prompt and answer tokens."""

    def __init__(self, gguf_path: str | os.PathLike[str]) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
        self.eos = int(self.llm.token_eos())

    def prompt(self, text: str) -> list[int]:
        return [int(t) for t in self.llm.tokenize(text.encode(), add_bos=True, special=False)]

    def answer(self, text: str) -> list[int]:
        toks = self.llm.tokenize(text.encode(), add_bos=False, special=False)
        return [*(int(t) for t in toks), self.eos]


def default_embed(progress: bool = False) -> Embed:
    from moe2.tools.offline.embed import Embedder

    embedder = Embedder()

    def embed(texts: Sequence[str]) -> npt.NDArray[np.float32]:
        out: npt.NDArray[np.float32] = embedder(texts, progress=progress)
        return out

    return embed


def build_calibration_via_agents(
    url: str,
    experts: Mapping[str, str | os.PathLike[str]],
    splits: Mapping[str, Sequence[Sample]],
    *,
    root: str = "moe2",
    embed: Embed | None = None,
    vocab_fingerprint: str | None = None,
    concurrency: int = 8,
    progress: bool = False,
) -> Calibration:
    """Teacher forcing through the agents named by ``experts`` (ids; the GGUF paths are only
    read for their shared tokenizer), plus the prompts' embeddings."""
    from tqdm import tqdm

    if not experts:
        raise ValueError("no experts")
    tok = Tokenizer(next(iter(experts.values())))
    embed = embed or default_embed(progress)
    names = list(experts)
    out: dict[str, tuple[CalibrationRecord, ...]] = {}
    for split, samples in splits.items():
        items = [(tok.prompt(s.prompt), tok.answer(s.answer)) for s in samples]
        bar = tqdm(total=len(items), desc=f"calibrate {split} via agents", disable=not progress,
                   leave=False)
        try:
            probs = asyncio.run(calibrate_via_agents(
                url, names, items, topics=Topics(root), concurrency=concurrency,
                progress=bar.update))
        finally:
            bar.close()
        vectors = embed([s.prompt for s in samples]) if samples else np.zeros((0, EMBEDDING_DIM))
        out[split] = tuple(
            CalibrationRecord(
                prompt=s.prompt, answer=s.answer, family=s.family,
                embedding=tuple(float(x) for x in vec), answer_tokens=tuple(items[i][1]),
                probs=tuple(tuple(probs[n][i]) for n in names),
            )
            for i, (s, vec) in enumerate(zip(samples, vectors, strict=True))
        )
    return Calibration(experts=tuple(names), splits=out, embedding_model=EMBEDDING_MODEL,
                       embedding_dim=EMBEDDING_DIM, max_length=MAX_LENGTH,
                       vocab_fingerprint=vocab_fingerprint)


