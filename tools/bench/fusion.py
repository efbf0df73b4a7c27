"""``moe2 bench fusion``: what a fused step costs on top of the slowest expert, in MQTT round
trips, and fused throughput under concurrency -- all measured side by side in one run.

overhead = (fused per-token time - slowest expert's own per-token time) / bare MQTT round trip

* fused per-token time: a phone's greedy request through the coordinator, steady state
  ((latency - ttft) / (tokens - 1)), two experts fused, ``dist_k`` 64;
* an expert's own per-token time: a direct llama-cpp-python greedy loop on the same GGUF, one
  thread, in this process;
* bare round trip: one aiomqtt client publishes a payload the size of a step reply, a second
  echoes it back, through the same local mosquitto.

Beside it, ``fusion_over_alone_rtts`` compares the fused step with the slowest expert served
alone through the same coordinator (an ``experts`` evaluation override): what the second
expert and the mixing cost, separately from what any request through MQTT costs.

``large``: two ~51M-parameter experts fused with and without the agents' speculation
(:mod:`moe2.tools.bench.large`), ``large_ratio`` = fused tokens/s / the slowest expert's direct
tokens/s. ``families``: coordinator CPU per fused token with one tokenizer family versus
three (fusion across tokenizers), see :mod:`moe2.tools.bench.families`.

Medians over repeated runs. Every process shares this machine's cores, which is the honest
setting for a single edge box and the pessimistic one for the overhead. To show what that
costs, the single-request phase also reads every process's CPU time (Linux ``/proc``): CPU
milliseconds per fused token for each agent, the coordinator, the broker and the phone (this
process), and their sum divided by the core count -- the per-token time below which no
scheduling could go on this machine.

``real_vocab``: a same-family pair with llama.cpp's real Qwen2 tokenizer (151,936 ids,
random weights: decode is dominated by the 151,936-row output matrix): a base as sure of itself
as a trained model (greedy top-1 probability ~0.55; at the generator's default the experts
were flat, ~0.02, and almost never speculated) and a fine-tune of it, greedy 48-token
requests: per token through the coordinator, the first expert alone and both fused (target:
fused ≤ 1.3 × alone), beside the experts' direct llama-cpp-python decode -- on a broker with
``set_tcp_nodelay true``, on a stock one (Mosquitto's default), and on the stock one with the
coordinator's quick ACKs off (``tcp_quickack = false``: the stall its clients otherwise hide),
with what the coordinator's plan then says (``stall_warning``); and the flat random pair of
earlier runs on the first broker, for comparison. Each expert's median greedy top-1
probability and each case's speculation hit rate are in the result.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moe2.shared import wire
from moe2.shared.mqtt import (
    MessageReader,
    cancel_and_wait,
    make_client,
    parse_broker_url,
    payload_bytes,
    publish_qos0,
)
from moe2.tools.clients.phone import PhoneClient
from moe2.tools.fleet.harness import Fleet
from moe2.tools.models import make_test_experts
from moe2.tools.models.fixtures import CONFIDENT_LOGIT_STD, make_real_vocab_expert

PROMPT = "What is the capital of France?"
#: the real-vocabulary pairs: a base and a fine-tune of it (its matrices plus noise of this
#: share of their spread, as in the large case), or two random experts of different seeds
REAL_VOCAB_PERTURB = 0.05
PAIR_TUNED = "confident base + fine-tune"
PAIR_FLAT = "flat random pair (no speculation)"


def start_bench_fleet(fleet: Fleet, experts: Sequence[Any], extra_config: str = "") -> None:
    """The tiny experts as agents (64 sessions each, estimated meters) and one coordinator
    with ``dist_k`` 64 and no per-client limits in the way of a bench's load."""
    for e in experts:
        fleet.start_agent(e.name, e.path, "--max-sessions", "64", "--n-ctx", "256",
                          "--meter", "estimated", log_level="WARNING", name=e.name)
    fleet.start_coordinator(
        log_level="WARNING", name="coordinator",
        config_text=("dist_k = 64\nmax_concurrent_per_client = 64\n"
                     "rate_per_client_per_s = 1000.0\n" + extra_config))


def _direct_llm(path: Path) -> Any:
    """An expert loaded straight into llama-cpp-python, as the direct side of a bench."""
    import llama_cpp

    return llama_cpp.Llama(str(path), n_ctx=512, n_threads=1, verbose=False)


def _greedy_per_token_s(llm: Any, n_tokens: int,
                        ready: Callable[[], object] | None = None) -> float:
    """One greedy run of ``n_tokens`` after :data:`PROMPT` from an empty cache, seconds a
    token; ``ready`` is called between the prompt and the clock's start."""
    import llama_cpp

    n_vocab = llm.n_vocab()
    llm.reset()
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
    llm.eval(llm.tokenize(PROMPT.encode(), add_bos=True, special=False))
    if ready is not None:
        ready()
    t0 = time.perf_counter()
    for _ in range(n_tokens):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1),
                                       shape=(n_vocab,))
        llm.eval([int(np.argmax(logits))])
    return (time.perf_counter() - t0) / n_tokens


def _direct_per_token_s(path: Path, n_tokens: int, repeats: int) -> float:
    llm = _direct_llm(path)
    return statistics.median(_greedy_per_token_s(llm, n_tokens) for _ in range(repeats))


def greedy_top1_p(path: Path, n_tokens: int) -> list[float]:
    """The probability of the likeliest token at each of ``n_tokens`` greedy steps after
    :data:`PROMPT`: how sure of itself an expert is (speculation needs ``speculate_min_p``)."""
    import llama_cpp

    llm = _direct_llm(path)
    n_vocab = llm.n_vocab()
    llm.eval(llm.tokenize(PROMPT.encode(), add_bos=True, special=False))
    tops: list[float] = []
    for _ in range(n_tokens):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1),
                                       shape=(n_vocab,)).astype(np.float64)
        best = int(np.argmax(logits))
        tops.append(float(1.0 / np.exp(logits - logits[best]).sum()))
        llm.eval([best])
    return tops


async def _bare_rtt_s(url: str, payload_size: int, n: int) -> float:
    u = parse_broker_url(url)
    ping, pong = f"bench/{uuid.uuid4().hex}/ping", f"bench/{uuid.uuid4().hex}/pong"
    payload = os.urandom(payload_size)
    async with make_client(u, identifier="bench-a") as a, make_client(u, identifier="bench-b") as b:
        await a.subscribe(pong, qos=0)
        await b.subscribe(ping, qos=0)

        async def echo() -> None:
            async for m in b.messages:
                await publish_qos0(b, pong, payload_bytes(m))

        task = asyncio.create_task(echo())
        times = []
        try:
            async with MessageReader(a) as replies:
                for i in range(n + 10):
                    t0 = time.perf_counter()
                    await publish_qos0(a, ping, payload)
                    if await replies.next(timeout_s=10.0) is None:
                        raise RuntimeError("the echo did not come back")
                    if i >= 10:
                        times.append(time.perf_counter() - t0)
        finally:
            await cancel_and_wait([task])
        return statistics.median(times)


def usable_cores() -> int:
    """The cores this process may run on (affinity and cpusets included, where the OS says)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of a process so far (Linux), or None where unreadable."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class CpuTally:
    """CPU seconds each of some processes spends inside measured windows (Linux ``/proc``),
    summed over the windows: ``w = tally.start(); ...; tally.stop(w)``. A process whose
    counters cannot be read is left out."""

    def __init__(self, pids: Mapping[str, int | None]) -> None:
        self._pids = dict(pids)
        self.spent_s = dict.fromkeys(self._pids, 0.0)
        self._unread: set[str] = set()

    def start(self) -> dict[str, float | None]:
        return {name: _cpu_s(pid) for name, pid in self._pids.items()}

    def stop(self, window: Mapping[str, float | None]) -> None:
        for name, pid in self._pids.items():
            before, after = window[name], _cpu_s(pid)
            if before is None or after is None:
                self._unread.add(name)
            else:
                self.spent_s[name] += after - before

    def ms_per_token(self, tokens: int) -> dict[str, float]:
        return {name: 1000.0 * v / max(1, tokens) for name, v in self.spent_s.items()
                if name not in self._unread}

    def floor_ms_per_token(self, tokens: int) -> float:
        """The processes' CPU per token summed over the usable cores: no scheduling makes a
        token take less wall time than that for this work."""
        return sum(self.ms_per_token(tokens).values()) / usable_cores()


def _checked_final(ans: Any) -> wire.FinalReply:
    """A bench request's final reply, or an error when it failed or was too short to time."""
    f: wire.FinalReply | None = ans.final
    if f is None or f.tokens < 2 or f.ttft_s is None:
        raise RuntimeError(f"bench request failed: {ans.error}")
    return f


def _steady_per_token_s(ans: Any) -> float:
    f = _checked_final(ans)
    assert f.ttft_s is not None  # checked
    return float((f.latency_s - f.ttft_s) / (f.tokens - 1))


async def _fused(url: str, n_tokens: int, repeats: int, concurrency: tuple[int, ...],
                 pids: dict[str, int | None], slowest: str) -> dict[str, Any]:
    u = parse_broker_url(url)
    req = wire.PhoneRequest(prompt=PROMPT, max_tokens=n_tokens, raw=True)
    # the slowest expert alone through the same coordinator (an evaluation override)
    alone = wire.PhoneRequest(prompt=PROMPT, max_tokens=n_tokens, raw=True, experts=[slowest])
    per_token: list[float] = []
    alone_per_token: list[float] = []
    async with make_client(u, identifier="bench-phone") as c, PhoneClient(c, "bench-phone") as ph:
        for _ in range(2):  # warm up
            await ph.ask(req)
            await ph.ask(alone)
        for _ in range(repeats):
            alone_per_token.append(_steady_per_token_s(await ph.ask(alone)))
        tally = CpuTally(pids)
        window = tally.start()
        tokens_total = 0
        for _ in range(repeats):
            ans = await ph.ask(req)
            per_token.append(_steady_per_token_s(ans))
            tokens_total += _checked_final(ans).tokens
        tally.stop(window)
        cpu_ms = tally.ms_per_token(tokens_total)
    throughput: dict[str, float] = {}
    for conc in concurrency:
        n_clients = max(1, conc // 8)
        clients = [make_client(u, identifier=f"bench-p{i}") for i in range(n_clients)]
        phones = [PhoneClient(cl, f"bench-p{i}") for i, cl in enumerate(clients)]
        for cl, ph in zip(clients, phones, strict=True):
            await cl.__aenter__()
            await ph.__aenter__()
        try:
            t0 = time.perf_counter()
            answers = await asyncio.gather(*[phones[i % n_clients].ask(req, timeout_s=300)
                                             for i in range(conc)])
            wall = time.perf_counter() - t0
        finally:
            for cl, ph in zip(clients, phones, strict=True):
                await ph.__aexit__(None, None, None)
                await cl.__aexit__(None, None, None)
        tokens = sum(a.final.tokens for a in answers if a.final is not None)
        throughput[str(conc)] = tokens / wall
    return {"per_token_s": statistics.median(per_token), "per_token_runs_s": per_token,
            "alone_per_token_s": statistics.median(alone_per_token),
            "tokens_per_s": throughput, "cpu_ms_per_token": cpu_ms}


async def _latest_plan(fleet: Fleet, wait_s: float) -> wire.PlanMsg | None:
    """The retained plan after ``wait_s`` (the coordinator replans meanwhile)."""
    latest: wire.PlanMsg | None = None
    async with make_client(parse_broker_url(fleet.url),
                           identifier=f"bench-plan-{uuid.uuid4().hex[:6]}") as c, \
            MessageReader(c) as reader:
        await c.subscribe(fleet.topics.plan.topic, qos=1)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while (left := deadline - loop.time()) > 0:
            m = await reader.next(timeout_s=left)
            if m is not None and payload_bytes(m):
                latest = fleet.topics.plan.decode(payload_bytes(m))
    return latest


async def _alone_and_fused(fleet: Fleet, names: list[str], n_tokens: int, repeats: int,
                           pids: dict[str, int | None]
                           ) -> tuple[list[float], list[float], CpuTally, int, list[int]]:
    """Per-token seconds of greedy requests, the first expert alone and both fused,
    interleaved; the CPU each process spent on the fused requests and their tokens; and the
    fused requests' speculation hits and misses (all experts, [hits, misses])."""
    u = parse_broker_url(fleet.url)
    fused = wire.PhoneRequest(prompt=PROMPT, max_tokens=n_tokens, raw=True)
    alone = wire.PhoneRequest(prompt=PROMPT, max_tokens=n_tokens, raw=True, experts=names[:1])
    alone_s: list[float] = []
    fused_s: list[float] = []
    tally = CpuTally(pids)
    tokens = 0
    spec = [0, 0]
    cid = f"bench-{uuid.uuid4().hex[:6]}"
    async with make_client(u, identifier=cid) as c, PhoneClient(c, cid) as ph:
        for _ in range(2):  # warm up
            await ph.ask(fused)
            await ph.ask(alone)
        for _ in range(repeats):
            alone_s.append(_steady_per_token_s(await ph.ask(alone)))
            window = tally.start()
            ans = await ph.ask(fused)
            tally.stop(window)
            fused_s.append(_steady_per_token_s(ans))
            f = _checked_final(ans)
            tokens += f.tokens
            spec[0] += sum(e.spec_hits for e in f.experts)
            spec[1] += sum(e.spec_misses for e in f.experts)
    return alone_s, fused_s, tally, tokens, spec


def _real_vocab_case(work: Path, experts: list[Any], *, nodelay: bool, quickack: bool,
                     n_tokens: int, repeats: int, pair: str = PAIR_TUNED) -> dict[str, Any]:
    label = (f"{'nodelay' if nodelay else 'stock'}{'' if quickack else '-no-quickack'}"
             f"{'' if pair == PAIR_TUNED else '-flat'}")
    names = [e.name for e in experts]
    with Fleet(work / f"fleet-{label}", broker_nodelay=nodelay) as fleet:
        for e in experts:
            fleet.start_agent(e.name, e.path, "--max-sessions", "4", "--n-ctx", "256",
                              "--meter", "estimated", log_level="WARNING", name=e.name)
        fleet.start_coordinator(
            log_level="WARNING", name="coordinator",
            config_text=(f"dist_k = 64\nallow_overrides = true\n"
                         f"tcp_quickack = {'true' if quickack else 'false'}\n"
                         "[planner]\ninterval_s = 0.5\n"))

        pids: dict[str, int | None] = {n: fleet.pid(n) for n in names}
        pids["coordinator"] = fleet.pid("coordinator")
        pids["broker"] = fleet.broker.pid
        pids["phone"] = os.getpid()

        async def main() -> tuple[list[float], list[float], CpuTally, int, list[int],
                                  wire.PlanMsg | None]:
            await fleet.wait_plan(names)
            measured = await _alone_and_fused(fleet, names, n_tokens, repeats, pids)
            return *measured, await _latest_plan(fleet, 2.0)

        alone_s, fused_s, tally, tokens, spec, plan = asyncio.run(main())
    alone, fused = statistics.median(alone_s), statistics.median(fused_s)
    warnings = plan.warnings if plan is not None else []
    return {
        "pair": pair,
        "broker": "set_tcp_nodelay true" if nodelay else "stock (Nagle on)",
        "coordinator_tcp_quickack": quickack,
        "alone_per_token_ms": alone * 1e3,
        "fused_per_token_ms": fused * 1e3,
        "fused_over_alone": fused / alone,
        "alone_runs_ms": [x * 1e3 for x in alone_s],
        "fused_runs_ms": [x * 1e3 for x in fused_s],
        "coordinator_step_overhead_ms": None if plan is None else plan.step_overhead_s * 1e3,
        "stall_warning": any("set_tcp_nodelay" in w for w in warnings),
        # share of the fused requests' expert-steps answered from a speculative decode
        "spec_hit_rate": spec[0] / (spec[0] + spec[1]) if spec[0] + spec[1] else None,
        "spec_steps": spec[0] + spec[1],
        # fused requests: CPU ms each process spent per token, and their sum over the cores
        "cpu_ms_per_fused_token": tally.ms_per_token(tokens),
        "cpu_floor_ms_per_fused_token": tally.floor_ms_per_token(tokens),
        # the least fused ÷ alone these cores allow for that work (above 1.3: no scheduling
        # of the messaging can meet the target on this machine)
        "cpu_floor_over_alone": tally.floor_ms_per_token(tokens) / (alone * 1e3),
    }


def coordinator_step_ms(n_vocab: int = 151_646, repeats: int = 50) -> dict[str, float]:
    """The coordinator's own work for one fused token of two experts, in this process: decode
    both replies from bytes, check them, mix, sample -- with top-64 and with full-vocabulary
    (k = 0) distributions, greedy and sampled (T 0.8, top_p 0.95); median milliseconds."""
    from moe2.agent.engine import softmax_topk
    from moe2.coordinator.fusion import ExpertDist, mix, sample
    from moe2.coordinator.generation import invalid_distribution

    rng = np.random.default_rng(0)
    out: dict[str, float] = {}
    for k in (64, 0):
        replies = []
        for agent in ("a", "b"):
            ids, p, rest = softmax_topk((3 * rng.standard_normal(n_vocab)).astype(np.float32), k)
            replies.append(wire.encode(wire.Reply(agent_id=agent, dists=[wire.Distribution(
                session_id="s", seq=1, probs=wire.Distribution.pack_probs(p),
                ids=b"" if ids is None else wire.Distribution.pack_ids(ids), rest_mass=rest)])))
        for label, temperature in (("greedy", 0.0), ("sampled", 0.8)):
            times: list[float] = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                parts = []
                for w, raw in zip((0.3, 0.7), replies, strict=True):
                    d = wire.decode_as(raw, wire.Reply).dists[0]
                    if invalid_distribution(d, n_vocab) is not None:
                        raise RuntimeError("the bench's distribution is invalid")
                    parts.append((w, ExpertDist(d.prob_array(),
                                                None if not d.ids else d.id_array(),
                                                d.rest_mass)))
                sample(mix(parts, n_vocab), temperature, 0.95, rng)
                times.append(time.perf_counter() - t0)
            out[f"k{k}_{label}"] = 1000.0 * statistics.median(times)
    return out


def run_real_vocab_fusion(work: Path, *, quick: bool = False) -> dict[str, Any]:
    """Two Qwen2-vocabulary experts (see the module docstring): a base as sure of itself as a
    trained model and a fine-tune of it, on the three brokers; and the flat random pair of
    earlier runs (two seeds, top-1 probability ~0.02, under ``speculate_min_p``: the agents
    almost never speculate) on the ``set_tcp_nodelay`` broker, for comparison."""
    n_tokens, repeats = (24, 3) if quick else (48, 7)
    base = make_real_vocab_expert(work / "qwen2", "qwen2", name="qwen2-0", seed=4200,
                                  logit_std=CONFIDENT_LOGIT_STD)
    tuned = make_real_vocab_expert(work / "qwen2", "qwen2", name="qwen2-1", seed=4200,
                                   logit_std=CONFIDENT_LOGIT_STD, perturb=REAL_VOCAB_PERTURB,
                                   perturb_seed=1)
    flat = [make_real_vocab_expert(work / "qwen2-flat", "qwen2", name=f"flat-{i}", seed=4200 + i)
            for i in range(2)]
    experts = [base, tuned]
    direct = {e.name: _direct_per_token_s(e.path, n_tokens, 3 if quick else 5)
              for e in [*experts, *flat]}
    top1 = {e.name: statistics.median(greedy_top1_p(e.path, n_tokens)) for e in [*experts, *flat]}
    cases = [_real_vocab_case(work, experts, nodelay=nodelay, quickack=quickack,
                              n_tokens=n_tokens, repeats=repeats)
             for nodelay, quickack in ((True, True), (False, True), (False, False))]
    cases.append(_real_vocab_case(work, flat, nodelay=True, quickack=True, n_tokens=n_tokens,
                                  repeats=repeats, pair=PAIR_FLAT))
    return {
        "vocab": "qwen2 (llama.cpp ggml-vocab-qwen2.gguf)",
        "experts": {e.name: {"params": e.n_params, "n_vocab": e.spec.n_vocab,
                             "direct_per_token_ms": direct[e.name] * 1e3,
                             "greedy_top1_p_median": top1[e.name]}
                    for e in [*experts, *flat]},
        "tokens_per_request": n_tokens, "repeats": repeats, "dist_k": 64,
        "target_fused_over_alone": 1.3,
        "cases": cases,
        "coordinator_step_ms": coordinator_step_ms(repeats=10 if quick else 50),
    }


def run_fusion_bench(*, quick: bool = False, out_dir: str | None = None,
                     seed: int = 0) -> dict[str, Any]:
    n_tokens = 24 if quick else 64
    repeats = 3 if quick else 9
    work = Path(out_dir or tempfile.mkdtemp(prefix="moe2-bench-fusion-"))
    experts = make_test_experts(work, count=2)
    direct = {e.name: _direct_per_token_s(e.path, n_tokens, repeats) for e in experts}
    slowest = max(direct.values())
    reply_size = len(wire.encode(wire.Reply(agent_id="e0", dists=[wire.Distribution(
        session_id="x" * 24, seq=1, probs=bytes(4 * 64), ids=bytes(4 * 64))])))
    with Fleet(work / "fleet") as fleet:
        start_bench_fleet(fleet, experts, "allow_overrides = true\n")

        async def main() -> tuple[float, dict[str, Any], float]:
            await fleet.wait_plan([e.name for e in experts])
            rtt_before = await _bare_rtt_s(fleet.url, reply_size, 100 if quick else 300)
            pids: dict[str, int | None] = {e.name: fleet.pid(e.name) for e in experts}
            pids["coordinator"] = fleet.pid("coordinator")
            pids["broker"] = fleet.broker.pid
            pids["phone"] = os.getpid()
            fused = await _fused(fleet.url, n_tokens, repeats, (1, 8) if quick else (1, 8, 64),
                                 pids, max(direct, key=lambda n: direct[n]))
            rtt_after = await _bare_rtt_s(fleet.url, reply_size, 100 if quick else 300)
            return rtt_before, fused, rtt_after

        rtt_before, fused, rtt_after = asyncio.run(main())
    rtt = statistics.median([rtt_before, rtt_after])
    overhead = (fused["per_token_s"] - slowest) / rtt
    from moe2.tools.bench.families import run_families
    from moe2.tools.bench.large import run_large

    real_vocab = run_real_vocab_fusion(work / "real-vocab", quick=quick)
    families = run_families(work / "families", quick=quick, seed=seed)
    large = run_large(work / "large", quick=quick, seed=seed)
    return {
        "bench": "fusion",
        "experts": {e.name: {"params": e.n_params, "direct_per_token_ms": direct[e.name] * 1e3}
                    for e in experts},
        "dist_k": 64,
        "tokens_per_request": n_tokens,
        "repeats": repeats,
        "bare_mqtt_rtt_ms": rtt * 1e3,
        "bare_mqtt_rtt_payload_bytes": reply_size,
        "slowest_expert_per_token_ms": slowest * 1e3,
        "fused_per_token_ms": fused["per_token_s"] * 1e3,
        "overhead_rtts": overhead,
        "target_overhead_rtts": 1.5,
        # what fusing costs over serving the slowest expert alone through the same coordinator
        # (same phone, same broker, an `experts` override): the price of the second expert
        "slowest_alone_through_coordinator_per_token_ms": fused["alone_per_token_s"] * 1e3,
        "fusion_over_alone_rtts": (fused["per_token_s"] - fused["alone_per_token_s"]) / rtt,
        "fused_tokens_per_s": fused["tokens_per_s"],
        "cpu_count": usable_cores(),
        # single-request phase: CPU ms each process spent per fused token, and the sum spread
        # over every core (a lower bound on the per-token time on this machine)
        "cpu_ms_per_token": fused["cpu_ms_per_token"],
        "cpu_floor_ms_per_token": (sum(fused["cpu_ms_per_token"].values()) / usable_cores()
                                   if fused["cpu_ms_per_token"] else None),
        "real_vocab": real_vocab,
        # one tokenizer family vs three (tools/bench/families.py)
        "families": families,
        # two ~51M-parameter experts, with and without speculation (tools/bench/large.py)
        "large": large,
        "large_ratio": large["large_ratio"],
        "large_ratio_no_speculation": large["large_ratio_no_speculation"],
        "large_spec_hit_rate": large["spec_hit_rate"],
        "large_cpu_ceiling_ratio": large["cpu_ceiling_ratio"],
    }
