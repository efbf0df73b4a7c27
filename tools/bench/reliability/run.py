"""The bounds phase and the whole bench (``moe2 bench reliability``)."""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe2.shared import wire
from moe2.tools.bench.reliability.bridged import phase_bridged
from moe2.tools.bench.reliability.faults import (
    phase_agent_faults,
    phase_broker_restart,
    phase_coordinator_kill,
)
from moe2.tools.bench.reliability.fleet import BOUNDS_ROOT, ReliabilityFleet
from moe2.tools.bench.reliability.fuzz import phase_fuzz
from moe2.tools.bench.reliability.load import LoadSpec, ask_once, phase_load
from moe2.tools.bench.reliability.outcomes import PROMPTS, Outcome, _r, tally

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- bounds


async def phase_bounds(fleet: ReliabilityFleet, *, burst: int = 6,
                       sequential: int = 12) -> dict[str, Any]:
    """Limits of the ``bounds`` coordinator: 2 concurrent and 5 requests/s per client,
    256 prompt characters, 32 max tokens. Each refusal is a typed error with a clear message."""
    await fleet.wait_ready(agents=["b0"], coordinators=["cb"], root=BOUNDS_ROOT)
    tag = uuid.uuid4().hex[:6]
    outcomes: list[Outcome] = []
    checks: dict[str, Any] = {}

    async with fleet.phone(f"bounds-a-{tag}", root=BOUNDS_ROOT) as ph:
        long = await ask_once(ph, "bounds", wire.PhoneRequest(prompt="x" * 257, max_tokens=4),
                              30)
        many = await ask_once(ph, "bounds", wire.PhoneRequest(prompt="hi", max_tokens=33), 30)
        outcomes += [long, many]
        checks["prompt_too_long"] = {"code": long.code, "message": long.message}
        checks["max_tokens"] = {"code": many.code, "message": many.message}
    async with fleet.phone(f"bounds-b-{tag}", root=BOUNDS_ROOT) as ph:
        burst_out = await asyncio.gather(*[ask_once(ph, "bounds", wire.PhoneRequest(
            prompt=f"{PROMPTS[i % len(PROMPTS)]}", max_tokens=32, raw=True), 30)
            for i in range(burst)])
        outcomes += burst_out
        conc = [o for o in burst_out if o.code == wire.ErrorCode.TOO_MANY_REQUESTS.value]
        checks["concurrency"] = {"sent_at_once": burst, "finals": sum(
            o.kind == "final" for o in burst_out), "too_many_requests": len(conc),
            "message": conc[0].message if conc else None}
    async with fleet.phone(f"bounds-c-{tag}", root=BOUNDS_ROOT) as ph:
        seq_out = []
        for _ in range(sequential):
            seq_out.append(await ask_once(ph, "bounds", wire.PhoneRequest(
                prompt="hi", max_tokens=1, raw=True), 30))
        outcomes += seq_out
        rl = [o for o in seq_out if o.code == wire.ErrorCode.RATE_LIMITED.value]
        checks["rate"] = {"sent_one_after_another": sequential, "finals": sum(
            o.kind == "final" for o in seq_out), "rate_limited": len(rl),
            "message": rl[0].message if rl else None}
    fleet.check_alive(["b0", "cb"])
    out = tally(outcomes)
    out["checks"] = checks
    out["outcomes"] = outcomes
    return out


# --------------------------------------------------------------------------- the bench


@dataclass(frozen=True)
class BenchSpec:
    load: LoadSpec
    faults: LoadSpec
    fuzz_per_family: int
    hang_s: float = 3.0
    down_s: float = 1.0
    #: requests per run of the bridged phase (one broker, then two bridged)
    bridged_requests: int = 200


FULL = BenchSpec(
    load=LoadSpec(clients=20, per_client=10, concurrency=2, max_tokens=16),
    faults=LoadSpec(clients=20, per_client=6, concurrency=2, max_tokens=16),
    fuzz_per_family=10_000,
)
QUICK = BenchSpec(
    load=LoadSpec(clients=10, per_client=4, concurrency=2, max_tokens=12),
    faults=LoadSpec(clients=10, per_client=4, concurrency=2, max_tokens=12),
    fuzz_per_family=400,
    bridged_requests=60,
)


def _strip(d: dict[str, Any]) -> tuple[dict[str, Any], list[Outcome]]:
    outs: list[Outcome] = d.pop("outcomes", [])
    return d, outs


async def _run_all(fleet: ReliabilityFleet, spec: BenchSpec, seed: int) -> dict[str, Any]:
    phases: dict[str, Any] = {}
    every: list[Outcome] = []
    ready_s = await fleet.wait_ready(timeout_s=180)
    steps: list[tuple[str, Callable[[], Awaitable[dict[str, Any]]]]] = [
        ("load", lambda: phase_load(fleet, spec.load, seed=seed)),
        ("agent_faults", lambda: phase_agent_faults(fleet, spec.faults, hang_s=spec.hang_s,
                                                    seed=seed + 1)),
        ("broker_restart", lambda: phase_broker_restart(fleet, spec.faults, down_s=spec.down_s,
                                                        seed=seed + 2)),
        ("coordinator_kill", lambda: phase_coordinator_kill(fleet, spec.faults, seed=seed + 3)),
        ("fuzz", lambda: phase_fuzz(fleet, spec.fuzz_per_family, seed=seed + 4)),
        ("bounds", lambda: phase_bounds(fleet)),
    ]
    for name, step in steps:
        log.info("reliability: %s", name)
        t0 = time.monotonic()
        result, outs = _strip(await step())
        result["phase_s"] = _r(time.monotonic() - t0, 1)
        phases[name] = result
        every += outs
    total = tally(every)
    faults = {
        "agent_sigkill": phases["agent_faults"]["faults_survived"] >= 1,
        "agent_sigstop": phases["agent_faults"]["faults_survived"] >= 2,
        "broker_restart": phases["broker_restart"]["faults_survived"] == 1,
        "coordinator_sigkill": phases["coordinator_kill"]["faults_survived"] == 1,
    }
    fz = phases["fuzz"]
    return {
        "summary": {
            "requests_sent": total["sent"],
            "finals": total["finals"],
            "errors": total["errors"],
            "errors_by_code": total["errors_by_code"],
            "phone_errors": total["phone_errors"],
            "lost": total["lost"],
            "not_sent": total["not_sent"],
            "load_clients": spec.load.clients,
            "load_requests": spec.load.total,
            "load_throughput_rps": phases["load"]["throughput_rps"],
            "load_latency_p50_s": phases["load"]["latency_p50_s"],
            "load_latency_p99_s": phases["load"]["latency_p99_s"],
            "faults_survived": sum(faults.values()),
            "faults": faults,
            "fuzz_inputs_tried": fz["inputs_tried"],
            "fuzz_crashes": len(fz["crashed"]),
            "fuzz_rounds": fz["rounds"],
            "fuzz_rss_growth_max_mib_by_round": [
                _r(max(g.values()), 1) for g in fz["rss_growth_mib_per_round"]],
            "fuzz_rss_growth_total_max_mib": fz["rss_growth_total_max_mib"],
            "coordinator_kill_in_flight": phases["coordinator_kill"]["in_flight_at_kill"],
            "coordinator_kill_in_flight_failed": phases["coordinator_kill"]["in_flight_failed"],
            "coordinator_kill_told_by_survivor": phases["coordinator_kill"]["told_by_survivor"],
            "coordinator_kill_told_by_phone_client":
                phases["coordinator_kill"]["told_by_phone_client"],
            "fleet_ready_s": _r(ready_s, 1),
        },
        "phases": phases,
    }


def run_reliability_bench(*, quick: bool = False, out_dir: str | None = None,
                          seed: int = 0) -> dict[str, Any]:
    """The full form (or ``quick``): its own mosquitto, 3 agents and 2 coordinators (+ a bounds
    agent and coordinator) as subprocesses on loopback; returns plain figures."""
    from moe2.tools.models import make_test_experts

    spec = QUICK if quick else FULL
    work = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="moe2-reliability-"))
    work.mkdir(parents=True, exist_ok=True)
    experts = make_test_experts(work / "experts", count=3)
    t0 = time.monotonic()
    with ReliabilityFleet(work / "fleet", [e.path for e in experts]) as fleet:
        result = asyncio.run(_run_all(fleet, spec, seed))
    log.info("reliability: bridged")
    t1 = time.monotonic()
    bridged = asyncio.run(phase_bridged(work / "bridged", [e.path for e in experts],
                                        requests=spec.bridged_requests))
    bridged["phase_s"] = _r(time.monotonic() - t1, 1)
    result["phases"]["bridged"] = bridged
    b, d = bridged["bridged"], bridged["bridge_drop"]
    result["summary"].update({
        "bridged_requests": b["requests"] + d["requests"],
        "bridged_answered_once": b["answered_once"] + d["answered_once"],
        "bridged_duplicates": b["duplicates"] + d["duplicates"],
        "bridged_duplicate_chunks": b["duplicate_chunks"] + d["duplicate_chunks"],
        "bridged_lost": b["lost"] + d["lost"],
        "bridged_stepped_by_two": (b["requests_stepped_by_two_or_more"]
                                   + d["requests_stepped_by_two_or_more"]),
        "single_broker_ttft_p50_s": bridged["single_broker"]["ttft_p50_s"],
        "bridged_ttft_p50_s": b["ttft_p50_s"],
        "bridged_added_ttft_p50_s": bridged["added_ttft_p50_s"],
    })
    result["form"] = "quick" if quick else "full"
    result["seed"] = seed
    result["total_s"] = _r(time.monotonic() - t0, 1)
    result["work_dir"] = str(work)
    return result
