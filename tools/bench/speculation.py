"""``moe2 bench speculation``: what ``speculate_min_p`` buys and costs, offline.

An agent speculates on its own likeliest token when that token's probability is at least the
threshold; the speculation is a hit when the fused token is that token. Both depend only on
the distributions, so they are measured here without MQTT: greedy fused decoding with
llama-cpp-python over

* **fine-tunes**: two ~51M-parameter experts, the second the first's weights plus noise
  (:mod:`moe2.tools.bench.large`), equal weights -- experts that mostly agree;
* **domain experts**: the generated task's four experts (``moe2 make-experts``; the tiny
  recipe with ``--quick``) on held-out prompts, the expert of the prompt's cluster weighted
  0.8 and the others 0.2 / 3 -- a confident gate over experts that disagree outside their
  domain.

Per threshold: the share of expert-steps speculated on, the hit rate among them, and the
wasted decodes per fused token per expert (misses: energy spent for nothing); for the domain
experts also as served, where the coordinator lets only experts of at least their fair share
of the weight speculate (``StepItem.speculate``).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

THRESHOLDS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
PROMPTS = ("What is the capital of France?", "Once upon a time", "The quick brown fox")


Row = tuple[int, float, bool, bool]


def _fused_steps(paths: Sequence[Path], weights: Sequence[float], prompt: str, n_tokens: int
                 ) -> list[Row]:
    """(expert, its top probability, its top == the fused token, the coordinator would let it
    speculate: weight >= 1/n) for every expert-step."""
    import llama_cpp

    llms = [llama_cpp.Llama(str(p), n_ctx=512, n_threads=1, verbose=False) for p in paths]
    rows: list[Row] = []
    fair = [w * len(weights) >= 1.0 - 1e-9 for w in weights]
    try:
        toks = llms[0].tokenize(prompt.encode(), add_bos=True, special=False)
        for m in llms:
            m.eval(toks)
        for _ in range(n_tokens):
            probs = []
            for m in llms:
                lg = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(m.ctx, -1),
                                           shape=(m.n_vocab(),)).astype(np.float64)
                p = np.exp(lg - lg.max())
                probs.append(p / p.sum())
            fused = sum(w * p for w, p in zip(weights, probs, strict=True))
            t = int(np.argmax(fused))
            rows += [(i, float(p.max()), int(np.argmax(p)) == t, fair[i])
                     for i, p in enumerate(probs)]
            if t == llms[0].token_eos():
                break
            for m in llms:
                m.eval([t])
    finally:
        for m in llms:
            m.close()
    return rows


def _table(rows: Sequence[Row], *, fair_share_only: bool = False
           ) -> dict[str, dict[str, float | None]]:
    """Per threshold; ``fair_share_only``: only experts the coordinator marks worth it
    (``StepItem.speculate``) speculate."""
    out: dict[str, dict[str, float | None]] = {}
    for th in THRESHOLDS:
        sel = [hit for _i, p, hit, fair in rows if p >= th and (fair or not fair_share_only)]
        out[str(th)] = {
            "speculated": len(sel) / len(rows),
            "hit_rate": sum(sel) / len(sel) if sel else None,
            "wasted_decodes_per_expert_token": (len(sel) - sum(sel)) / len(rows),
        }
    return out


def run_speculation_bench(*, quick: bool = False, out_dir: str | None = None,
                          seed: int = 0) -> dict[str, Any]:
    from moe2.tools.bench.large import _experts
    from moe2.tools.offline.experts import ExpertsConfig, make_experts

    work = Path(out_dir or tempfile.mkdtemp(prefix="moe2-bench-spec-"))
    n_tokens = 24 if quick else 48
    pair = _experts(work / "finetunes", seed)
    rows = [r for prompt in PROMPTS
            for r in _fused_steps([e.path for e in pair], [0.5, 0.5], prompt, n_tokens)]
    cfg = (ExpertsConfig.tiny(seed=seed) if quick else ExpertsConfig(seed=seed))
    manifest = make_experts(work / "domain", cfg, progress=False)
    paths = list(manifest.expert_paths().values())
    samples = [json.loads(line) for line in
               manifest.split_path("test").read_text().splitlines()][: 12 if quick else 40]
    clusters = manifest.clusters["test"]
    domain: list[Row] = []
    for sample, c in zip(samples, clusters, strict=False):
        w = [0.8 if i == c else 0.2 / (len(paths) - 1) for i in range(len(paths))]
        domain += _fused_steps(paths, w, sample["prompt"], 8)
    return {
        "bench": "speculation",
        "finetunes": {"expert_steps": len(rows), "by_threshold": _table(rows)},
        "domain_experts": {"expert_steps": len(domain), "experts": len(paths),
                           "recipe": "tiny" if quick else "default",
                           "by_threshold": _table(domain),
                           # as served: the coordinator lets only experts of at least their
                           # fair share of the weight speculate
                           "by_threshold_fair_share": _table(domain, fair_share_only=True)},
    }
