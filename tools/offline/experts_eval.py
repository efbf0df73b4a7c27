"""Run the GGUF experts with llama-cpp-python: teacher forcing, greedy decoding, and greedy
decoding of a weighted mixture (the fused distribution of eq. 3 with fixed per-prompt weights).

Everything here uses llama.cpp's exact settings (f32 KV cache, flash attention off), so the
numbers agree with the PyTorch twin of each model to ~1e-5 in logits. Prompts are tokenised as
is, with BOS (llama.cpp's SPM tokenizer equals sentencepiece on our corpus); an answer is the
text of the generated tokens up to EOS, stripped of surrounding whitespace.

Needs ``llama-cpp-python`` and ``numpy`` only.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from moe2.tools.offline.corpus import Sample

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "ExpertRunner",
    "MixtureResult",
    "accuracy_by",
    "evaluate_experts",
    "greedy_accuracy",
    "greedy_mixture",
    "open_runners",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 12
F64 = npt.NDArray[np.float64]


def _softmax(logits: F64) -> F64:
    z = np.exp(logits - logits.max())
    out: F64 = z / z.sum()
    return out


class ExpertRunner:
    """One GGUF expert opened in llama.cpp with exact (f32 KV, no flash attention) settings.

    ``n_ctx=0`` (the default) uses the model's training context. Use as a context manager, or
    call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike[str], *, n_ctx: int = 0, n_threads: int = 1
                 ) -> None:
        import llama_cpp

        self._llama_cpp = llama_cpp
        self.path = os.fspath(path)
        self.llm: Any = llama_cpp.Llama(
            model_path=self.path, n_ctx=n_ctx, n_batch=4096, n_threads=n_threads,
            n_threads_batch=n_threads, logits_all=True, verbose=False, flash_attn=False,
            type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
        )
        self.n_vocab = int(self.llm.n_vocab())
        self.eos = int(self.llm.token_eos())
        self.n_ctx = int(self.llm.n_ctx())

    def __enter__(self) -> ExpertRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.close()

    def tokenize(self, text: str) -> list[int]:
        """Tokens of ``text`` as is, with BOS."""
        return [int(t) for t in self.llm.tokenize(text.encode("utf-8"), add_bos=True,
                                                  special=False)]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return bytes(self.llm.detokenize(list(tokens))).decode("utf-8", errors="replace")

    def logits(self, tokens: Sequence[int]) -> F64:
        """Logits of every position, shape ``(len(tokens), n_vocab)`` (fresh context)."""
        if len(tokens) > self.n_ctx:
            raise ValueError(f"{len(tokens)} tokens exceed n_ctx {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(list(tokens))
        return np.array(self.llm.scores[: len(tokens)], dtype=np.float64)

    def teacher_forced_probs(self, prompt_tokens: Sequence[int], answer_tokens: Sequence[int]
                             ) -> F64:
        """Probability of each answer token given the prompt and the answer tokens before it."""
        if not answer_tokens:
            raise ValueError("no answer tokens")
        full = [*prompt_tokens, *answer_tokens]
        logits = self.logits(full)
        out = np.empty(len(answer_tokens), dtype=np.float64)
        for i, tok in enumerate(answer_tokens):
            out[i] = _softmax(logits[len(prompt_tokens) - 1 + i])[tok]
        return out

    def start(self, tokens: Sequence[int]) -> F64:
        """Reset, evaluate ``tokens`` and return the next-token distribution."""
        self.llm.reset()
        self.llm.eval(list(tokens))
        return self._last()

    def step(self, token: int) -> F64:
        """Append one token and return the next-token distribution."""
        self.llm.eval([token])
        return self._last()

    def _last(self) -> F64:
        ptr = self._llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float64)
        return _softmax(logits)


@dataclass(frozen=True)
class MixtureResult:
    sample: Sample
    text: str
    correct: bool


def greedy_mixture(
    runners: Sequence[ExpertRunner],
    weights: Sequence[float],
    prompt: str,
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> str:
    """Greedy decoding of ``sum_n w_n f_n`` (weights renormalised; zero weights skip the
    expert). All runners must share one vocabulary."""
    if len(runners) != len(weights) or not runners:
        raise ValueError("need one weight per runner")
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError("weights must be non-negative and not all zero")
    w = w / w.sum()
    active = [(r, float(x)) for r, x in zip(runners, w, strict=True) if x > 0]
    prompt_tokens = active[0][0].tokenize(prompt)
    mixed = sum(x * r.start(prompt_tokens) for r, x in active)
    eos = active[0][0].eos
    out: list[int] = []
    for _ in range(max_new_tokens):
        tok = int(np.argmax(mixed))
        if tok == eos:
            break
        out.append(tok)
        if len(prompt_tokens) + len(out) >= active[0][0].n_ctx:
            break
        mixed = sum(x * r.step(tok) for r, x in active)
    return active[0][0].detokenize(out).strip()


def greedy_accuracy(
    runners: Sequence[ExpertRunner],
    samples: Sequence[Sample],
    weights_for: Callable[[Sample], Sequence[float]],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    progress: bool = False,
    desc: str = "decode",
) -> list[MixtureResult]:
    """Greedy exact match of the mixture with per-sample weights ``weights_for(sample)``
    (one-hot weights evaluate a single expert)."""
    from tqdm import tqdm

    results: list[MixtureResult] = []
    for s in tqdm(samples, desc=desc, disable=not progress, leave=False):
        text = greedy_mixture(runners, weights_for(s), s.prompt, max_new_tokens=max_new_tokens)
        results.append(MixtureResult(sample=s, text=text, correct=text == s.answer.strip()))
    return results


def accuracy_by(results: Sequence[MixtureResult], key: Callable[[Sample], str]
                ) -> dict[str, float]:
    """Accuracy per group (``key(sample)``) plus ``"all"``."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for r in results:
        groups[key(r.sample)].append(r.correct)
        groups["all"].append(r.correct)
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def open_runners(paths: Mapping[str, str | os.PathLike[str]], stack: ExitStack, *,
                 n_ctx: int = 0) -> dict[str, ExpertRunner]:
    """Open every expert inside ``stack`` (closed when the stack closes)."""
    return {name: stack.enter_context(ExpertRunner(path, n_ctx=n_ctx))
            for name, path in paths.items()}


def evaluate_experts(
    paths: Mapping[str, str | os.PathLike[str]],
    samples: Sequence[Sample],
    clusters: Sequence[int],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    progress: bool = False,
) -> dict[str, Any]:
    """Greedy exact-match accuracy of each expert, of the equal-weight mixture ("majority
    voting": the average of all distributions) and of oracle cluster routing (the expert of the
    sample's k-means cluster alone), overall and per family.

    ``clusters[i]`` is sample ``i``'s cluster, which is the index of its expert in ``paths``.
    Each expert also gets its accuracy on its own cluster and on the other clusters.
    """
    if len(clusters) != len(samples):
        raise ValueError("one cluster id per sample")
    names = list(paths)
    n = len(names)
    cluster_of = {id(s): int(c) for s, c in zip(samples, clusters, strict=True)}

    def family(s: Sample) -> str:
        return s.family

    report: dict[str, Any] = {"samples": len(samples), "experts": {}}
    with ExitStack() as stack:
        runners = list(open_runners(paths, stack).values())
        for k, name in enumerate(names):
            one_hot = [1.0 if j == k else 0.0 for j in range(n)]

            def fixed(s: Sample, w: list[float] = one_hot) -> list[float]:
                return w

            res = greedy_accuracy(runners, samples, fixed, max_new_tokens=max_new_tokens,
                                  progress=progress, desc=name)
            own = [r.correct for r in res if cluster_of[id(r.sample)] == k]
            other = [r.correct for r in res if cluster_of[id(r.sample)] != k]
            report["experts"][name] = {
                "accuracy": accuracy_by(res, family)["all"],
                "own_cluster": sum(own) / len(own) if own else None,
                "other_clusters": sum(other) / len(other) if other else None,
                "by_family": accuracy_by(res, family),
            }
        res = greedy_accuracy(runners, samples, lambda s: [1.0] * n,
                              max_new_tokens=max_new_tokens, progress=progress, desc="equal")
        report["equal_weights"] = accuracy_by(res, family)

        def oracle(s: Sample) -> list[float]:
            return [1.0 if j == cluster_of[id(s)] else 0.0 for j in range(n)]

        res = greedy_accuracy(runners, samples, oracle, max_new_tokens=max_new_tokens,
                              progress=progress, desc="oracle")
        report["oracle_cluster"] = accuracy_by(res, family)
    best = max(v["accuracy"] for v in report["experts"].values())
    report["best_single"] = best
    report["oracle_minus_best_single"] = report["oracle_cluster"]["all"] - best
    report["oracle_minus_equal"] = (report["oracle_cluster"]["all"]
                                    - report["equal_weights"]["all"])
    return report
