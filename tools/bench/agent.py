"""``moe2 bench agent``: tokens/s of one session stepped through MQTT vs a direct llama-cpp-python
greedy loop on the same GGUF, side by side in one run.

For each model (a tiny test expert, a ~51M-parameter one, and a tiny one with llama.cpp's real
Qwen2 tokenizer: 151,936 ids, so the vocabulary dominates its decode and the agent's per-step
work) the bench starts a real ``moe2 agent`` subprocess on a private mosquitto it starts
itself (``set_tcp_nodelay true``; the Qwen2 model also on a stock one, Mosquitto's default),
then alternates runs of

* **direct**: ``llama_cpp.Llama`` (same ``n_threads``, same f16 KV type, flash attention off),
  evaluate the prompt, then greedily ``eval`` one token at a time, argmax over the logits;
* **mqtt**: open a session on the agent with the same prompt tokens, then step it greedily,
  one Step in flight at a time, each waiting for its Reply (top ``k`` ids, the coordinator's
  default ``dist_k``), exactly as a coordinator with a single expert does. The agent runs with
  its default speculation (agent/speculation.py): steps it decoded ahead are counted as hits,
  the others as misses (wasted decodes);
* **mqtt_no_speculation**: the same with a second agent started with ``--speculate-min-p 0``.

Figures are medians over the runs; the first run of each side is a warm-up (page faults of the
memory-mapped weights) and is not counted. Besides tokens/s the result splits the MQTT path's
per-token time into the agent's decode window (``Distribution.latency_s``) and the rest
(MQTT round trip, event-loop/thread hops, softmax and top-k, msgpack), and measures a bare MQTT
echo round trip through the same broker for reference: back to back, and with an idle gap as
long as one direct step before every ping (the floor the message path has at that step rate).

This is an offline tool: it builds its GGUFs with :mod:`moe2.tools.models` (the
``dev``/``train`` extras), imported lazily so importing this module needs neither.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import platform
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moe2.agent.engine import softmax_topk
from moe2.shared import wire
from moe2.shared.config import CoordinatorConfig
from moe2.shared.mqtt import (
    MessageReader,
    get_prop,
    make_client,
    parse_broker_url,
    payload_bytes,
    publish_qos0,
    response_properties,
)
from moe2.shared.topics import Topics
from moe2.tools.fleet.harness import Fleet

log = logging.getLogger(__name__)

PROMPT = "The capital of France is"
TARGET_RATIO = 0.93
ONLINE_TIMEOUT_S = 120.0
STEP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class BenchModel:
    name: str
    path: Path
    n_params: int
    role: str  # "tiny", "large" or "qwen2"


@dataclass
class SideRuns:
    """Per-run tokens/s of one side, plus every step's time (and the agent's decode window)."""

    tokens_per_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    spec: list[int] = field(default_factory=list)  # per step: 0 none, 1 hit, 2 miss

    def summary(self) -> dict[str, Any]:
        tps = statistics.median(self.tokens_per_s)
        out: dict[str, Any] = {
            "tokens_per_s": tps,
            "ms_per_token": 1000.0 / tps,
            "runs_tokens_per_s": self.tokens_per_s,
            "step_ms_median": 1000.0 * statistics.median(self.step_s),
        }
        if self.decode_s:
            out["agent_decode_ms_median"] = 1000.0 * statistics.median(self.decode_s)
            outside = [s - d for s, d in zip(self.step_s, self.decode_s, strict=True)]
            out["outside_decode_ms_median"] = 1000.0 * statistics.median(outside)
        if self.spec:
            hits, misses = self.spec.count(1), self.spec.count(2)
            out["spec_hits"], out["spec_misses"] = hits, misses
            out["spec_hit_rate"] = hits / (hits + misses) if hits + misses else None
            out["wasted_decodes"] = misses
        return out


# --------------------------------------------------------------------------- models


def _make_models(work: Path, seed: int) -> list[BenchModel]:
    """A tiny test expert, one of at least 50M parameters and a tiny one with the real Qwen2
    vocabulary, written into ``work``."""
    gm = importlib.import_module("moe2.tools.models")
    fixtures = importlib.import_module("moe2.tools.models.fixtures")
    tiny = gm.make_test_experts(work / "tiny", count=1, seeds=[1000 + seed])[0]
    large = gm.make_large_expert(work / "large", seed=3000 + seed)
    # as sure of itself as a trained model: at the generator's default a 151,936-token expert
    # is flat (top-1 ~0.02, under speculate_min_p), and the agent almost never speculated
    qwen2 = fixtures.make_real_vocab_expert(work / "qwen2", "qwen2", seed=4000 + seed,
                                            logit_std=fixtures.CONFIDENT_LOGIT_STD)
    return [BenchModel(tiny.name, tiny.path, tiny.n_params, "tiny"),
            BenchModel(large.name, large.path, large.n_params, "large"),
            BenchModel(qwen2.name, qwen2.path, qwen2.n_params, "qwen2")]


# --------------------------------------------------------------------------- direct side


class _Direct:
    """A plain llama-cpp-python model, greedy one token at a time."""

    def __init__(self, path: Path, *, n_ctx: int, n_threads: int) -> None:
        import llama_cpp

        self._L = llama_cpp
        self.llm: Any = llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
            type_k=llama_cpp.GGML_TYPE_F16, type_v=llama_cpp.GGML_TYPE_F16, flash_attn=False,
            verbose=False,
        )
        self.n_vocab = int(self.llm.n_vocab())

    def tokenize(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=True))

    def run(self, prompt: Sequence[int], n_tokens: int, into: SideRuns | None,
            n_ids: int | None = None) -> list[int]:
        """Greedy over the first ``n_ids`` ids (the agent's vocabulary family: padding ids
        are never sampled), default all."""
        llm, L = self.llm, self._L
        n_ids = n_ids or self.n_vocab
        llm.reset()
        llm.eval(list(prompt))
        out: list[int] = []
        steps: list[float] = []
        t_start = time.perf_counter()
        for _ in range(n_tokens):
            t0 = time.perf_counter()
            logits = np.ctypeslib.as_array(L.llama_get_logits_ith(llm.ctx, -1),
                                           shape=(self.n_vocab,))
            tok = int(np.argmax(logits[:n_ids]))
            llm.eval([tok])
            out.append(tok)
            steps.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - t_start
        if into is not None:
            into.tokens_per_s.append(n_tokens / elapsed)
            into.step_s.extend(steps)
            into.tokens.append(out)
        return out

    def close(self) -> None:
        self.llm.close()


# --------------------------------------------------------------------------- MQTT side


class _MqttStepper:
    """A coordinator reduced to one session and one step in flight."""

    def __init__(self, broker_url: str, agent_id: str, k: int) -> None:
        self.topics = Topics()
        self.agent_id = agent_id
        self.k = k
        self.name = f"bench-{uuid.uuid4().hex[:8]}"
        self.inbox = self.topics.coordinator_inbox(self.name).topic
        self.client = make_client(parse_broker_url(broker_url), identifier=self.name,
                                  keepalive_s=60)
        self.reader = MessageReader(self.client, name=f"{self.name}-reader")
        self._n = 0

    async def wait_online(self, proc: subprocess.Popen[bytes],
                          log_path: Path) -> wire.AgentStatus:
        status_topic = self.topics.agent_status(self.agent_id)
        await self.client.subscribe(status_topic.topic, qos=1)
        deadline = time.monotonic() + ONLINE_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                tail = await asyncio.to_thread(log_path.read_text, errors="replace")
                raise RuntimeError(f"bench agent exited with {proc.returncode}: {tail[-2000:]}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"bench agent not online within {ONLINE_TIMEOUT_S}s")
            m = await self.reader.next(timeout_s=min(left, 1.0))
            if m is None:
                continue
            if str(m.topic) == status_topic.topic:
                status = status_topic.decode(payload_bytes(m))
                if status.state == "online":
                    break
        await self.client.unsubscribe(status_topic.topic)
        await self.client.subscribe(self.inbox, qos=0)
        return status

    async def call(self, msg: wire.OpenSession | wire.Step) -> wire.Reply:
        self._n += 1
        corr = self._n.to_bytes(8, "little")
        await publish_qos0(self.client, self.topics.agent_rpc(self.agent_id), wire.encode(msg),
                           properties=response_properties(self.inbox, corr))
        while True:
            m = await self.reader.next(timeout_s=STEP_TIMEOUT_S)
            if m is None:
                raise RuntimeError(f"no reply from the agent within {STEP_TIMEOUT_S}s")
            if get_prop(m, "CorrelationData") != corr:
                continue
            reply = wire.decode_as(payload_bytes(m), wire.Reply)
            if reply.errors:
                raise RuntimeError(f"agent error: {reply.errors[0].code.value}: "
                                   f"{reply.errors[0].message}")
            return reply

    async def run(self, session_id: str, prompt: Sequence[int], n_tokens: int,
                  into: SideRuns | None) -> list[int]:
        reply = await self.call(wire.OpenSession(session_id=session_id, k=self.k,
                                                 tokens=list(prompt)))
        d = reply.dists[0]
        out: list[int] = []
        steps: list[float] = []
        decodes: list[float] = []
        spec: list[int] = []
        t_start = time.perf_counter()
        for seq in range(1, n_tokens + 1):
            t0 = time.perf_counter()
            tok = int(d.id_array()[0]) if d.ids else int(np.argmax(d.prob_array()))
            reply = await self.call(wire.Step(items=[wire.StepItem(session_id, tok, seq,
                                                                   self.k)]))
            d = reply.dists[0]
            out.append(tok)
            steps.append(time.perf_counter() - t0)
            decodes.append(d.latency_s)
            spec.append(d.spec)
        elapsed = time.perf_counter() - t_start
        await self.client.publish(self.topics.agent_rpc(self.agent_id),
                                  wire.encode(wire.CloseSession(session_ids=[session_id])))
        if into is not None:
            into.tokens_per_s.append(n_tokens / elapsed)
            into.step_s.extend(steps)
            into.decode_s.extend(decodes)
            into.tokens.append(out)
            into.spec.extend(spec)
        return out


async def _echo_rtt_ms(broker_url: str, n: int, gap_s: float = 0.0) -> float:
    """Median round trip of a 300-byte payload bounced by a second client through the broker.

    With ``gap_s`` every ping follows that long an idle sleep, as a step follows the agent's
    decode: every process on the path then wakes from idle for each message, which on a VM
    costs far more than back-to-back messages do (measured here: 0.35 -> 0.8 ms)."""
    url = parse_broker_url(broker_url)
    tag = uuid.uuid4().hex[:8]
    ping, pong = f"bench/{tag}/ping", f"bench/{tag}/pong"
    payload = b"x" * 300
    async with make_client(url) as a, make_client(url) as b:
        await b.subscribe(ping)
        await a.subscribe(pong)

        async def echo() -> None:
            async for m in b.messages:
                await publish_qos0(b, pong, payload_bytes(m))

        task = asyncio.create_task(echo(), name="bench-echo")
        try:
            rtts: list[float] = []
            async with MessageReader(a) as replies:
                for i in range(n + 10):
                    if gap_s > 0:
                        await asyncio.sleep(gap_s)
                    t0 = time.perf_counter()
                    await publish_qos0(a, ping, payload)
                    if await replies.next(timeout_s=STEP_TIMEOUT_S) is None:
                        raise RuntimeError("the echo did not come back")
                    if i >= 10:  # warm-up
                        rtts.append(time.perf_counter() - t0)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return 1000.0 * statistics.median(rtts)


# --------------------------------------------------------------------------- one model


async def _bench_model(model: BenchModel, fleet: Fleet, *, runs: int, n_tokens: int, k: int,
                       n_threads: int, n_ctx: int, rtt_ms: float) -> dict[str, Any]:
    from moe2.tools.bench.fusion import greedy_top1_p  # needs the models' extras, like this

    tag = uuid.uuid4().hex[:4]  # the same model may be benched on two brokers in one run
    agent_id = f"bench-{model.role}-{tag}"
    plain_id = f"bench-{model.role}-nospec-{tag}"
    broker_url = fleet.url
    procs = {}
    for aid, min_p in ((agent_id, None), (plain_id, "0")):
        procs[aid] = fleet.start_agent(
            aid, model.path, "--n-ctx", str(n_ctx), "--kv-type", "f16", "--meter",
            "estimated", "--telemetry-interval", "5",
            *(("--speculate-min-p", min_p) if min_p is not None else ()),
            threads=n_threads, log_level="WARNING", name=aid)
    direct = _Direct(model.path, n_ctx=n_ctx, n_threads=n_threads)
    d_runs, m_runs, p_runs = SideRuns(), SideRuns(), SideRuns()
    try:
        prompt = direct.tokenize(PROMPT)
        stepper = _MqttStepper(broker_url, agent_id, k)
        plain = _MqttStepper(broker_url, plain_id, k)
        async with stepper.client, stepper.reader, plain.client, plain.reader:
            status = await stepper.wait_online(procs[agent_id],
                                               fleet.procs[agent_id].log_path)
            await plain.wait_online(procs[plain_id], fleet.procs[plain_id].log_path)
            n_ids = status.n_vocab  # the family: the agent never samples padding ids
            # warm-up (weights paged in, caches, JIT-free but first-touch costs)
            # (the direct loop runs in a worker thread, one hop per run, so this event loop
            # keeps the MQTT connection alive meanwhile)
            await asyncio.to_thread(direct.run, prompt, min(8, n_tokens), None, n_ids)
            await stepper.run("warmup", prompt, min(8, n_tokens), None)
            await plain.run("warmup", prompt, min(8, n_tokens), None)
            # alternate the sides so drift in machine load hits them alike
            for r in range(runs):
                await asyncio.to_thread(direct.run, prompt, n_tokens, d_runs, n_ids)
                await stepper.run(f"run{r}", prompt, n_tokens, m_runs)
                await plain.run(f"run{r}", prompt, n_tokens, p_runs)
    finally:
        direct.close()
        rc = fleet.stop(agent_id)
        fleet.stop(plain_id)
    d, m, p = d_runs.summary(), m_runs.summary(), p_runs.summary()
    ratio = m["tokens_per_s"] / d["tokens_per_s"]
    gap_rtt_ms = await _echo_rtt_ms(broker_url, 50 if runs < 5 else 150,
                                    gap_s=d["step_ms_median"] / 1000.0)
    # softmax + top-k over the vocabulary, as the agent does per step (in this process)
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(direct.n_vocab).astype(np.float32)
    t0 = time.perf_counter()
    for _ in range(200):
        softmax_topk(logits, k)
    softmax_ms = 1000.0 * (time.perf_counter() - t0) / 200
    return {
        "name": model.name,
        "role": model.role,
        "broker": "set_tcp_nodelay true" if fleet.broker.tcp_nodelay else "stock (Nagle on)",
        "n_params": model.n_params,
        "file_mb": round(model.path.stat().st_size / 2**20, 2),
        "n_vocab": direct.n_vocab,
        "prompt_tokens": len(prompt),
        "direct": d,
        "mqtt": m,
        "ratio": ratio,
        # the same agent with speculation off (--speculate-min-p 0), in the same run
        "mqtt_no_speculation": p,
        "ratio_no_speculation": p["tokens_per_s"] / d["tokens_per_s"],
        # the same ratio from per-step medians: robust to bursts of load from other processes
        "ratio_step_medians": d["step_ms_median"] / m["step_ms_median"],
        "overhead_ms_per_token": m["ms_per_token"] - d["ms_per_token"],
        "breakdown_ms": {
            "direct_step": d["step_ms_median"],
            "agent_decode": m["agent_decode_ms_median"],
            "agent_decode_minus_direct": m["agent_decode_ms_median"] - d["step_ms_median"],
            # per step: round trip minus the agent's decode window (MQTT both ways, the
            # agent's thread hops, softmax/top-k, msgpack), median over all steps
            "mqtt_step_outside_decode": m["outside_decode_ms_median"],
            "bare_mqtt_echo_rtt": rtt_ms,
            # the same echo, each ping after an idle gap as long as one direct step: the
            # message path's floor at this model's step rate on this machine
            "bare_mqtt_echo_rtt_after_step_gap": gap_rtt_ms,
            # what the agent itself adds per step beyond that floor (event-loop and thread
            # hops, msgpack, top-k)
            "agent_own": m["outside_decode_ms_median"] - gap_rtt_ms,
            "softmax_topk": softmax_ms,
        },
        "same_tokens": d_runs.tokens == m_runs.tokens == p_runs.tokens,
        # how sure of itself the expert is (speculation needs speculate_min_p)
        "greedy_top1_p_median": statistics.median(greedy_top1_p(model.path, 32)),
        "agent_exit_code": rc,
    }


# --------------------------------------------------------------------------- entry point


def run_agent_bench(*, quick: bool = False, out_dir: str | None = None,
                    seed: int = 0) -> dict[str, Any]:
    """Measure and return the figures (see the module docstring); prints nothing."""
    runs, n_tokens = (2, 16) if quick else (5, 64)
    k = CoordinatorConfig().dist_k
    # One core is left to the agent's event loop, the broker and the bench client. With every
    # core given to llama.cpp, ggml's spin-waiting thread barriers collapse as soon as anything
    # else runs (measured on a shared 2-core box: 1.7 tok/s with 2 threads, 72 with 1).
    n_threads = max(1, (os.cpu_count() or 1) - 1)
    n_ctx = 256
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="moe2-bench-agent-")
        work = Path(tmp.name)
    else:
        work = Path(out_dir)
        work.mkdir(parents=True, exist_ok=True)
    try:
        models = _make_models(work, seed)

        async def on(fleet: Fleet, chosen: list[BenchModel]) -> tuple[list[dict[str, Any]],
                                                                       float]:
            rtt = await _echo_rtt_ms(fleet.url, 50 if quick else 200)
            return [await _bench_model(m, fleet, runs=runs, n_tokens=n_tokens, k=k,
                                       n_threads=n_threads, n_ctx=n_ctx, rtt_ms=rtt)
                    for m in chosen], rtt

        with Fleet(work / "fleet") as fleet:
            results, rtt_ms = asyncio.run(on(fleet, models))
        # the real vocabulary again on Mosquitto's defaults (Nagle on its sockets)
        with Fleet(work / "fleet-stock", broker_nodelay=False) as fleet:
            stock, _rtt = asyncio.run(on(fleet, [m for m in models if m.role == "qwen2"]))
        results += stock
    finally:
        if tmp is not None:
            tmp.cleanup()
    large = next(r for r in results if r["role"] == "large")
    import llama_cpp

    return {
        "bench": "agent",
        "quick": quick,
        "seed": seed,
        "settings": {
            "runs": runs, "tokens_per_run": n_tokens, "k": k,
            "k_source": "coordinator default dist_k", "n_threads": n_threads,
            "n_threads_rule": "cpu_count - 1, both sides",
            "kv_type": "f16", "flash_attn": False, "n_ctx": n_ctx,
            "agent": "moe2 agent subprocess (estimated meter)", "broker": "local mosquitto",
            "steps_in_flight": 1, "statistic": "median over runs; first run per side is warm-up",
        },
        "machine": {
            "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "system": platform.system(), "python": platform.python_version(),
            "llama_cpp_python": getattr(llama_cpp, "__version__", "?"),
            "loadavg_1m_before": load_before,
            "loadavg_1m_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
        "mqtt_echo_rtt_ms": rtt_ms,
        "models": results,
        "target_ratio": TARGET_RATIO,
        "large_ratio": large["ratio"],
        "large_ratio_no_speculation": large["ratio_no_speculation"],
        "large_spec_hit_rate": large["mqtt"].get("spec_hit_rate"),
        "meets_target": large["ratio"] >= TARGET_RATIO,
        # the Qwen2-vocabulary expert: ms a token direct and served alone, on each broker
        "real_vocab": {
            r["broker"]: {"direct_ms": r["direct"]["ms_per_token"],
                          "through_mqtt_ms": r["mqtt"]["ms_per_token"], "ratio": r["ratio"],
                          "softmax_topk_ms": r["breakdown_ms"]["softmax_topk"],
                          "agent_own_ms": r["breakdown_ms"]["agent_own"]}
            for r in results if r["role"] == "qwen2"},
    }
