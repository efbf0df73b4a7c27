"""Faults under load: agent SIGKILL/SIGSTOP, broker restart, coordinator SIGKILL."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections import Counter
from typing import Any

from moe2.shared import wire
from moe2.shared.mqtt import MessageReader, make_client, parse_broker_url, payload_bytes
from moe2.tools.bench.reliability.fleet import (
    STEP_DEADLINE_MAX_S,
    ReliabilityFleet,
)
from moe2.tools.bench.reliability.load import LoadSpec, Progress, drive_load
from moe2.tools.bench.reliability.outcomes import _r, tally

log = logging.getLogger(__name__)

#: how long the agents stay frozen around a kill (well below the smallest step deadline)
FREEZE_S = 0.3
#: how long a coordinator kill waits for the victim's in-flight markers to be retained, with
#: the agents frozen (below the fleet's smallest step deadline, STEP_DEADLINE_MIN_S)
MARKER_WAIT_S = 3.0


async def wait_for_marker(fleet: ReliabilityFleet, coordinator_id: str,
                          timeout_s: float = MARKER_WAIT_S) -> bool:
    """Until ``coordinator_id`` has a retained in-flight marker (a request it serves that a
    survivor could report); False when none came within ``timeout_s``."""
    topic = fleet.topics.inflight_filter(coordinator_id)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with make_client(parse_broker_url(fleet.url)) as c, MessageReader(c) as reader:
        await c.subscribe(topic, qos=1)
        while loop.time() < deadline:
            m = await reader.next(timeout_s=deadline - loop.time())
            if m is not None and payload_bytes(m):
                return True
    return False

# --------------------------------------------------------------------------- agent faults


async def phase_agent_faults(fleet: ReliabilityFleet, spec: LoadSpec, *,
                             hang_s: float = STEP_DEADLINE_MAX_S + 1.0,
                             seed: int = 0) -> dict[str, Any]:
    """SIGKILL ``a1`` and SIGSTOP ``a2`` under load; restart/resume them; both rejoin."""
    await fleet.wait_ready()
    killed, hung = fleet.agents[1], fleet.agents[2]
    times: dict[str, float] = {}

    async def inject(progress: Progress) -> None:
        await progress.reached(max(1, spec.total * 15 // 100))
        # Every agent frozen around the kill: the requests in flight stay in flight (each has
        # a session on the victim), however fast or slow this machine is right now.
        for a in fleet.agents:
            fleet.signal(a, signal.SIGSTOP)
        times["kill"] = time.monotonic()
        fleet.signal(killed, signal.SIGKILL)
        await asyncio.sleep(FREEZE_S)
        for a in fleet.agents:
            if a != killed:
                fleet.signal(a, signal.SIGCONT)
        await progress.reached(max(1, spec.total * 35 // 100), mid_answer=False)
        fleet.restart(killed)
        times["restart"] = time.monotonic()
        # while requests are still being sent: the last wave's may all be near their end
        await progress.reached(max(1, spec.total * 45 // 100))
        times["stop"] = time.monotonic()
        fleet.signal(hung, signal.SIGSTOP)
        await asyncio.sleep(hang_s)
        fleet.signal(hung, signal.SIGCONT)
        times["cont"] = time.monotonic()

    run = await drive_load(fleet, "agent_faults", spec, inject, seed=seed)
    rejoin_s = await fleet.wait_ready()
    rejoined = time.monotonic()
    fleet.check_alive()
    finals = [o for o in run.outcomes if o.kind == "final"]
    dropped_killed = [r for o in finals for a, r in o.dropped if a == killed]
    # the kill's own effect: drops of the killed agent in requests that were in flight when it
    # died (one queued across the restart may drop its successor for lateness on a loaded box:
    # the offline ones are the kill's, seen through its Last Will)
    kill_s = times.get("kill", float("inf"))
    dropped_by_kill = [r for o in finals if o.sent_s < kill_s < o.ended_s
                       for a, r in o.dropped if a == killed]
    dropped_hung = [r for o in finals for a, r in o.dropped if a == hung]
    out = tally(run.outcomes, run.wall_s)
    out.update(
        killed_agent=killed, hung_agent=hung, hang_s=hang_s,
        finals_with_killed_dropped=len(dropped_killed),
        finals_with_hung_dropped=len(dropped_hung),
        finals_in_flight_at_stop=sum(1 for o in finals
                                     if o.sent_s < times.get("stop", -1.0) < o.ended_s),
        hung_dropped_by_step_deadline=sum("deadline" in r for r in dropped_hung),
        finals_in_flight_at_kill_with_killed_dropped=len(dropped_by_kill),
        finals_in_flight_at_kill_with_killed_dropped_offline=sum(
            "offline" in r for r in dropped_by_kill),
        killed_drop_reasons=sorted(set(dropped_by_kill))[:3],
        hung_drop_reasons=sorted(set(dropped_hung))[:3],
        finals_using_restarted_agent=sum(killed in o.experts for o in finals
                                         if o.sent_s > times.get("restart", float("inf"))),
        rejoined_within_s=_r(rejoined - times["restart"], 2) if "restart" in times else None,
        ready_again_after_load_s=_r(rejoin_s, 2),
        unmatched_replies=run.unmatched,
        faults_survived=2 if "cont" in times else 0,
    )
    out["outcomes"] = run.outcomes
    return out


# --------------------------------------------------------------------------- broker restart


async def phase_broker_restart(fleet: ReliabilityFleet, spec: LoadSpec, *, down_s: float = 1.0,
                               seed: int = 0) -> dict[str, Any]:
    """Stop the broker under load, start it again on the same port; everyone reconnects."""
    await fleet.wait_ready()
    times: dict[str, float] = {}

    async def inject(progress: Progress) -> None:
        await progress.reached(max(1, spec.total * 30 // 100))
        times["down"] = time.monotonic()
        await asyncio.to_thread(fleet.broker.stop)
        await asyncio.sleep(down_s)
        await asyncio.to_thread(fleet.broker.start)
        times["up"] = time.monotonic()
        await fleet.wait_ready()
        times["recovered"] = time.monotonic()

    run = await drive_load(fleet, "broker_restart", spec, inject, seed=seed)
    fleet.check_alive()
    if "recovered" not in times:  # the load ended before the injector: wait for recovery now
        await fleet.wait_ready()
        times["recovered"] = time.monotonic()
    # requests after recovery: a fresh round of phones
    after = await drive_load(fleet, "after_broker_restart", LoadSpec(
        clients=spec.clients, per_client=1, concurrency=1, max_tokens=spec.max_tokens),
        seed=seed + 100)
    down = times["down"]
    in_flight = [o for o in run.outcomes if o.sent and o.sent_s < down < o.ended_s]
    out = tally([*run.outcomes, *after.outcomes], run.wall_s)
    out.update(
        down_s=down_s,
        recovered_after_s=_r(times["recovered"] - times["up"], 2),
        in_flight_at_stop=tally(in_flight),
        during=tally(run.outcomes),
        after_recovery=tally(after.outcomes),
        unmatched_replies=run.unmatched + after.unmatched,
        faults_survived=1,
    )
    out["outcomes"] = [*run.outcomes, *after.outcomes]
    return out


# --------------------------------------------------------------------------- coordinator kill


async def phase_coordinator_kill(fleet: ReliabilityFleet, spec: LoadSpec, *, restart: bool = True,
                                 seed: int = 0, freeze_agents_s: float = 0.0) -> dict[str, Any]:
    """SIGKILL one of two coordinators under load: the other carries on and tells the phones
    of the dead one's requests (from its in-flight markers). ``freeze_agents_s`` > 0 stops the
    agents (SIGSTOP) from just before the kill for that long, so the dead coordinator surely
    holds unfinished requests (the CI test needs the takeover to happen, not just to be
    possible)."""
    await fleet.wait_ready()
    victim, survivor = fleet.coordinators[0], fleet.coordinators[1]
    times: dict[str, float] = {}

    async def inject(progress: Progress) -> None:
        await progress.reached(max(1, spec.total * 30 // 100))
        if freeze_agents_s > 0:
            for a in fleet.agents:
                fleet.signal(a, signal.SIGSTOP)
            # the victim's requests are stuck now: wait until it has published a marker for
            # one of them (on a loaded box its marker loop can lag its request tasks)
            times["marker_seen"] = float(await wait_for_marker(fleet, victim, MARKER_WAIT_S))
        times["kill"] = time.monotonic()
        fleet.signal(victim, signal.SIGKILL)
        if freeze_agents_s > 0:
            await asyncio.sleep(freeze_agents_s)
            for a in fleet.agents:
                fleet.signal(a, signal.SIGCONT)

    run = await drive_load(fleet, "coordinator_kill", spec, inject, seed=seed)
    # and a fresh round of phones, before the victim is back: when the load's requests all
    # went out before the kill (they can, if they finish in bursts), these still test that
    # the survivor carries on
    extra = await drive_load(fleet, "after_coordinator_kill", LoadSpec(
        clients=spec.clients, per_client=1, concurrency=1, max_tokens=spec.max_tokens),
        seed=seed + 100)
    kill = times["kill"]
    in_flight = [o for o in run.outcomes if o.sent and o.sent_s < kill < o.ended_s
                 and o.coordinator != survivor]
    told = [o for o in run.outcomes if o.kind == "error" and f"coordinator {victim} " in o.message]
    outcomes = [*run.outcomes, *extra.outcomes]
    after = [o for o in outcomes if o.sent_s > kill]
    out = tally(outcomes, run.wall_s)
    out.update(
        killed=victim, survivor=survivor,
        in_flight_at_kill=len(in_flight),
        in_flight_failed=sum(o.kind != "final" for o in in_flight),
        told_by_survivor=len(told),
        told_how=(f"error {wire.ErrorCode.SHUTTING_DOWN.value!r} from {survivor}: "
                  f"{told[0].message!r}" if told else None),
        told_after_kill_s=_r(max((o.ended_s - kill for o in told), default=0.0), 3),
        told_by_phone_client=sum(o.kind == "phone_error" for o in in_flight),
        told_by_phone_how=next((f"AskError {o.code!r} (no reply within the phone's grace after "
                                f"{victim}'s Last Will): {o.message!r}"
                                for o in in_flight if o.kind == "phone_error"), None),
        lost_in_flight=sum(o.kind == "lost" for o in in_flight),
        lost_sent_before_kill_s=[_r(kill - o.sent_s, 3) for o in in_flight if o.kind == "lost"],
        finals_after_kill_by=dict(Counter(o.coordinator for o in after if o.kind == "final")),
        unmatched_replies=run.unmatched + extra.unmatched,
        faults_survived=1,
    )
    if restart:
        fleet.restart(victim)
        out["victim_back_within_s"] = _r(await fleet.wait_ready(), 2)
    fleet.check_alive([n for n in fleet.procs if restart or n != victim])
    out["outcomes"] = outcomes
    return out


