"""Part of ``moe2 bench fusion``: what fusing across tokenizers costs the coordinator.

Two fleets of three agents, measured one after the other in the same run with the same
shapes and ``dist_k`` = 64: one family (three Qwen2-vocabulary experts: the exact path over
ids) and three families (Qwen2, Llama 3 BPE, SentencePiece: the text path of
:mod:`moe2.coordinator.xfusion`). The experts are the random-weight test experts with the real
tokenizers (:func:`moe2.tools.models.make_real_vocab_expert`): decoding is cheap, so the
coordinator's share is what shows.

* ``coordinator_cpu_ms_per_token``: the coordinator process's CPU time (Linux ``/proc``) over
  greedy requests, per fused token;
* ``decision_us``: the fusion decision alone, in this process, on recorded distributions:
  ``mix`` + ``sample`` for one family, ``xfusion.choose`` for three, at k = 16, 64 and 256 --
  it grows with k, not with the 32k-152k vocabularies.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moe2.coordinator.fusion import ExpertDist, mix, sample
from moe2.coordinator.xfusion import FamilyStep, FamilyVocabView, choose
from moe2.shared import wire
from moe2.shared.mqtt import make_client, parse_broker_url
from moe2.tools.clients.phone import PhoneClient
from moe2.tools.fleet.harness import Fleet
from moe2.tools.models.fixtures import make_real_vocab_expert
from moe2.tools.models.real_vocab import GgufTokenizer

PROMPTS = ("The capital of France is", "Once upon a time", "def fibonacci(n):")
SETUPS: dict[str, tuple[str, ...]] = {
    "one_family": ("qwen2", "qwen2", "qwen2"),
    "three_families": ("qwen2", "llama-bpe", "llama-spm"),
}


def _cpu_s(pid: int) -> float:
    from moe2.tools.bench.fusion import _cpu_s as cpu

    value = cpu(pid)
    if value is None:
        raise RuntimeError("cannot read process CPU time (/proc)")
    return value


async def _serve(fleet: Fleet, agents: Sequence[str], n_tokens: int, repeats: int
                 ) -> dict[str, Any]:
    await fleet.wait_plan(agents)
    u = parse_broker_url(fleet.url)
    pid = fleet.pid("coordinator")
    async with make_client(u, identifier="bench-xfam") as c, \
            PhoneClient(c, "bench-xfam", topics=fleet.topics) as phone:
        # warm up until every expert is fused (the coordinator fetches each vocabulary once)
        for _ in range(60):
            ans = await phone.ask(wire.PhoneRequest(prompt=PROMPTS[0], max_tokens=4, raw=True),
                                  timeout_s=120)
            if ans.final is not None and all(not e.dropped for e in ans.final.experts) and \
                    len(ans.final.experts) == len(agents):
                break
            await asyncio.sleep(0.5)
        else:
            raise RuntimeError(f"the fleet never fused all of {list(agents)}")
        per_run: list[float] = []
        tokens = 0
        for i in range(repeats):
            cpu0 = _cpu_s(pid)
            ans = await phone.ask(wire.PhoneRequest(
                prompt=PROMPTS[i % len(PROMPTS)], max_tokens=n_tokens, raw=True),
                timeout_s=300)
            if ans.final is None:
                raise RuntimeError(f"bench request failed: {ans.error}")
            if any(e.dropped for e in ans.final.experts):
                raise RuntimeError(f"an expert was dropped: {ans.final.experts}")
            per_run.append(1000.0 * (_cpu_s(pid) - cpu0) / ans.final.tokens)
            tokens += ans.final.tokens
    return {"coordinator_cpu_ms_per_token": statistics.median(per_run),
            "coordinator_cpu_ms_per_token_runs": per_run, "tokens": tokens}


def _decision_us(families: Sequence[str], k: int, repeats: int, seed: int) -> float:
    """Median microseconds of one greedy fusion decision over three experts' top-k replies
    (random distributions over each vocabulary's ids)."""
    rng = np.random.default_rng(seed)
    toks = {f: GgufTokenizer.load(f) for f in set(families)}
    views = {f: FamilyVocabView.build(t.tokens, frozenset({t.eos_id or 0}))
             for f, t in toks.items()}
    dists = []
    for f in families:
        ids = np.sort(rng.choice(toks[f].size, size=k, replace=False)).astype(np.int32)
        p = rng.dirichlet(np.full(k, 0.3)) * 0.9
        dists.append(ExpertDist(p.astype(np.float32), ids, 0.1))
    times = []
    gen = np.random.default_rng(seed)
    for _ in range(repeats):
        t0 = time.perf_counter()
        if len(set(families)) == 1:
            sample(mix([(1 / 3, d) for d in dists], toks[families[0]].size), 0.0, 1.0, gen)
        else:
            steps = [FamilyStep(f, 1 / 3, [(1.0, d)], b"", views[f])
                     for f, d in zip(families, dists, strict=True)]
            choose(steps, 0.0, 1.0, gen)
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def run_families(work: Path, *, quick: bool, seed: int) -> dict[str, Any]:
    n_tokens = 24 if quick else 64
    repeats = 3 if quick else 9
    out: dict[str, Any] = {"dist_k": 64, "tokens_per_request": n_tokens, "repeats": repeats}
    for setup, vocabs in SETUPS.items():
        experts = [make_real_vocab_expert(work / setup, v, name=f"{setup}-{i}-{v}",
                                          seed=seed + 5000 + i)
                   for i, v in enumerate(vocabs)]
        with Fleet(work / f"fleet-{setup}") as fleet:
            for e in experts:
                fleet.start_agent(e.name, e.path, "--max-sessions", "8", "--n-ctx", "512",
                                  "--meter", "estimated", log_level="WARNING", name=e.name)
            fleet.start_coordinator(log_level="WARNING", name="coordinator",
                                    config_text="dist_k = 64\n")
            out[setup] = asyncio.run(_serve(fleet, [e.name for e in experts], n_tokens,
                                            repeats))
        out[setup]["experts"] = {e.name: e.spec.n_vocab for e in experts}
    one = out["one_family"]["coordinator_cpu_ms_per_token"]
    out["three_over_one_cpu"] = out["three_families"]["coordinator_cpu_ms_per_token"] / one
    out["decision_us"] = {
        setup: {str(k): _decision_us(vocabs, k, 50 if quick else 200, seed)
                for k in (16, 64, 256)}
        for setup, vocabs in SETUPS.items()}
    return out
