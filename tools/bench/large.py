"""Part of ``moe2 bench fusion``: two large experts fused, with and without speculation.

The case that matters on real fleets: experts whose decode takes longer than the messaging
(here ~51M parameters, >= 10 ms a token on this machine). Two of them, greedy, ``dist_k`` 64,
through a coordinator; ``large_ratio`` = fused tokens/s / the slowest expert's direct
llama-cpp-python tokens/s, measured in the same run. The second expert is the first one's
weights with Gaussian noise of ``PERTURB`` of each matrix's spread: two fine-tunes of one base,
which agree on most tokens but not all (random experts of different seeds would disagree on
almost every token: no fleet fuses those). Two fleets run side by side, requests alternating:
the agents' default speculation, and ``--speculate-min-p 0``. The hit rate is the share of the
experts' steps answered from a speculative decode (from the finals' expert entries).
``together_direct_per_token_ms``: both experts decoding at once directly, no messaging -- on a
machine where the experts share the cores (and memory bandwidth) that is the floor of a fused
token, and ``together_over_fused`` says how much of the rest the messaging costs.

``cpu_ms_per_fused_token``: the CPU each process (agents, coordinator, broker, this process
as the phone) spent per fused token, and ``cpu_floor_ms_per_fused_token`` their sum over the
cores: a fused token cannot take less wall time than that, so
``cpu_ceiling_ratio`` = slowest direct / that floor is the best ``large_ratio`` this machine
allows for the work done; where it is below the target the box has too few cores for that
work, and no scheduling of the messaging can meet it. The CPU is read around whole requests
(the prompt's decode and a speculation left over from the request before included: about 2 %
above the steady state the per-token times measure), so the ceiling errs low by about that.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import threading
from pathlib import Path
from typing import Any

from moe2.shared import wire
from moe2.shared.mqtt import make_client, parse_broker_url
from moe2.shared.topics import Topics
from moe2.tools.clients.phone import PhoneClient
from moe2.tools.fleet.harness import Fleet

PROMPT = "What is the capital of France?"
#: the second expert's weights: the first's plus noise of this share of each matrix's std
PERTURB = 0.05


def _experts(work: Path, seed: int) -> list[Any]:
    from moe2.tools.models import (
        ExpertFile,
        default_vocab,
        make_large_expert,
        random_weights,
        write_gguf,
    )
    from moe2.tools.models.llama import perturb_weights

    a = make_large_expert(work, seed=3000 + seed, name="large-a")
    weights = perturb_weights(random_weights(a.spec, a.seed), PERTURB, seed + 1)
    path = work / "large-b.gguf"
    vocab = default_vocab(a.spec.n_vocab)
    write_gguf(path, a.spec, weights, vocab, name="large-b")
    b = ExpertFile(name="large-b", path=path, spec=a.spec, seed=a.seed, n_params=a.n_params,
                   fingerprint=a.fingerprint, file_type=a.file_type, chat_template=None,
                   perturb=PERTURB, perturb_seed=seed + 1)
    return [a, b]


def _concurrent_direct_per_token_s(paths: list[Path], n_tokens: int, repeats: int) -> float:
    """Every expert decoding at once with llama-cpp-python, one thread each (llama.cpp drops
    the GIL in its decode), no messaging: the machine's own floor for a fused token, where
    the experts share its cores and memory bandwidth. Per repeat the slowest expert's time a
    token; the median over repeats."""
    from moe2.tools.bench.fusion import _direct_llm, _greedy_per_token_s

    llms = [_direct_llm(p) for p in paths]
    barrier = threading.Barrier(len(llms))
    per_run: list[float] = []

    def run(llm: Any, times: list[float]) -> None:
        times.append(_greedy_per_token_s(llm, n_tokens, barrier.wait))

    for _ in range(repeats):
        times: list[float] = []
        threads = [threading.Thread(target=run, args=(m, times)) for m in llms]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        per_run.append(max(times))
    return statistics.median(per_run)


async def _per_token(fleet: Fleet, roots: dict[str, str], agents: dict[str, list[str]],
                     n_tokens: int, repeats: int) -> dict[str, Any]:
    from moe2.tools.bench.fusion import CpuTally, _checked_final, _steady_per_token_s

    u = parse_broker_url(fleet.url)
    # per side: its agents and coordinator; the broker and this process (the phone) serve both
    # sides, but requests alternate, so each request's CPU belongs to its side
    pids = {side: {**{aid.removesuffix(f"-{side}"): fleet.pid(aid) for aid in agents[side]},
                   "coordinator": fleet.pid(f"coordinator-{side}"),
                   "broker": fleet.broker.pid, "phone": os.getpid()}
            for side in roots}
    out: dict[str, Any] = {}
    phones: dict[str, PhoneClient] = {}
    clients = {side: make_client(u, identifier=f"bench-large-{side}") for side in roots}
    for side, c in clients.items():
        await c.__aenter__()
        phones[side] = PhoneClient(c, f"bench-large-{side}", topics=Topics(roots[side]))
        await phones[side].__aenter__()
    try:
        for side, root in roots.items():
            await fleet.wait_plan(agents[side], root=root)
        req = wire.PhoneRequest(prompt=PROMPT, max_tokens=n_tokens, raw=True)
        per: dict[str, list[float]] = {side: [] for side in roots}
        hits = dict.fromkeys(roots, 0)
        misses = dict.fromkeys(roots, 0)
        tallies = {side: CpuTally(pids[side]) for side in roots}
        tokens = dict.fromkeys(roots, 0)
        for r in range(repeats + 1):  # the first round warms up
            for side in roots:
                window = tallies[side].start()
                ans = await phones[side].ask(req, timeout_s=300)
                if r:
                    tallies[side].stop(window)
                steady_s = _steady_per_token_s(ans)
                f = _checked_final(ans)
                if any(e.dropped for e in f.experts):
                    raise RuntimeError(f"an expert was dropped: {f.experts}")
                if r:
                    tokens[side] += f.tokens
                    per[side].append(steady_s)
                    hits[side] += sum(e.spec_hits for e in f.experts)
                    misses[side] += sum(e.spec_misses for e in f.experts)
        for side in roots:
            out[side] = {
                "fused_per_token_ms": 1e3 * statistics.median(per[side]),
                "runs_per_token_ms": [1e3 * x for x in per[side]],
                "spec_hits": hits[side], "spec_misses": misses[side],
                "spec_hit_rate": (hits[side] / (hits[side] + misses[side])
                                  if hits[side] + misses[side] else None),
                "cpu_ms_per_fused_token": tallies[side].ms_per_token(tokens[side]),
                "cpu_floor_ms_per_fused_token": tallies[side].floor_ms_per_token(tokens[side]),
            }
    finally:
        for side in roots:
            await phones[side].__aexit__(None, None, None)
            await clients[side].__aexit__(None, None, None)
    return out


def run_large(work: Path, *, quick: bool, seed: int) -> dict[str, Any]:
    from moe2.tools.bench.fusion import _direct_per_token_s, usable_cores

    n_tokens = 24 if quick else 64
    repeats = 2 if quick else 5
    work.mkdir(parents=True, exist_ok=True)
    experts = _experts(work, seed)
    direct = {e.name: _direct_per_token_s(e.path, n_tokens, max(2, repeats // 2))
              for e in experts}
    slowest_s = max(direct.values())
    together_s = _concurrent_direct_per_token_s([e.path for e in experts], n_tokens,
                                                max(2, repeats // 2))
    roots = {"speculation": "large-spec", "no_speculation": "large-plain"}
    agents: dict[str, list[str]] = {}
    with Fleet(work / "fleet") as fleet:
        for side, root in roots.items():
            agents[side] = []
            for e in experts:
                aid = f"{e.name}-{side}"
                extra = ("--speculate-min-p", "0") if side == "no_speculation" else ()
                fleet.start_agent(aid, e.path, "--max-sessions", "4", "--n-ctx", "256",
                                  "--meter", "estimated", *extra, root=root,
                                  log_level="WARNING", name=aid)
                agents[side].append(aid)
            fleet.start_coordinator(root=root, log_level="WARNING", name=f"coordinator-{side}",
                                    coordinator_id=f"c-{side}", config_text="dist_k = 64\n")
        sides = asyncio.run(_per_token(fleet, roots, agents, n_tokens, repeats))
    out: dict[str, Any] = {
        "experts": {e.name: {"params": e.n_params, "direct_per_token_ms": 1e3 * direct[e.name]}
                    for e in experts},
        "perturb": PERTURB, "tokens_per_request": n_tokens, "repeats": repeats,
        "slowest_direct_per_token_ms": 1e3 * slowest_s,
        # both decoding at once, directly: what two experts cost on these cores before any
        # messaging (large_ratio's ceiling here when experts share a machine)
        "together_direct_per_token_ms": 1e3 * together_s,
        **sides,
    }
    for side in roots:
        ratio = 1e3 * slowest_s / sides[side]["fused_per_token_ms"]
        out["large_ratio" if side == "speculation" else "large_ratio_no_speculation"] = ratio
    out["together_over_fused"] = (1e3 * together_s
                                  / out["speculation"]["fused_per_token_ms"])
    out["spec_hit_rate"] = sides["speculation"]["spec_hit_rate"]
    # the best large_ratio these cores allow for the work the fused tokens took (module doc)
    out["cpu_ceiling_ratio"] = (1e3 * slowest_s
                                / sides["speculation"]["cpu_floor_ms_per_fused_token"])
    out["cpu_count"] = usable_cores()
    out["target_large_ratio"] = 0.85
    return out
