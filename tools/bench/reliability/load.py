"""Many phones at once: the load every phase drives (faults are injected alongside)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import random
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aiomqtt

from moe2.shared import wire
from moe2.tools.bench.reliability.fleet import ReliabilityFleet
from moe2.tools.bench.reliability.outcomes import PHONE_ERRORS, PROMPTS, Outcome, tally
from moe2.tools.clients.phone import AskError, PhoneClient

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- load


@dataclass(frozen=True)
class LoadSpec:
    clients: int
    per_client: int
    concurrency: int = 2
    max_tokens: int = 16
    #: a phone treats a request that stays silent this long as failed (counted as lost)
    timeout_s: float = 45.0
    #: after a request could not be sent, the phone waits this long before the next one
    retry_pause_s: float = 0.2

    @property
    def total(self) -> int:
        return self.clients * self.per_client


class Progress:
    """Completed requests so far, and the requests now early in their answer; fault injectors
    wait for a share of the load with requests mid-answer, so that a fault always finds some
    in flight with steps left (completions come in waves: the nth may arrive while every other
    request is at its last token too)."""

    def __init__(self, max_tokens: int = 16) -> None:
        self.done = 0
        self._chunks: dict[int, int] = {}  # request in flight -> token chunks it received
        # a request with fewer chunks than this is early in its answer
        self._early_below = max(2, max_tokens // 2)
        self.finished = False  # the load is over: nothing more to wait for
        self._changed = asyncio.Event()

    def bump(self) -> None:
        self.done += 1
        self._changed.set()

    def chunk(self, request: int) -> None:
        """``request`` received one more token chunk."""
        self._chunks[request] = self._chunks.get(request, 0) + 1
        self._changed.set()

    def ended(self, request: int) -> None:
        self._chunks.pop(request, None)

    def finish(self) -> None:
        """Every request ended: a waiting injector goes on (and its fault finds no load, which
        the phase's figures show) instead of waiting for ever."""
        self.finished = True
        self._changed.set()

    def early(self) -> int:
        """Requests that are streaming their answer with half of it or more still to come."""
        return sum(1 for n in self._chunks.values() if n < self._early_below)

    async def reached(self, n: int, *, mid_answer: bool = True) -> None:
        """``n`` requests completed and (``mid_answer``) one or more early in its answer: its
        experts chosen, its sessions open, steps left to take."""
        while not self.finished and (self.done < n or (mid_answer and not self.early())):
            self._changed.clear()
            await self._changed.wait()


async def ask_once(phone: PhoneClient, phase: str, request: wire.PhoneRequest,
                   timeout_s: float, on_chunk: Callable[[], None] | None = None) -> Outcome:
    """One request, classified (never raises for a protocol outcome); ``on_chunk`` is called
    for every token chunk."""
    t0 = time.monotonic()
    chunks = 0
    try:
        async for msg in phone.stream(request, timeout_s=timeout_s):
            if isinstance(msg, wire.FinalReply):
                return Outcome(
                    phase, phone.client_id, "final", t0, time.monotonic() - t0,
                    coordinator=msg.coordinator_id,
                    experts=tuple(e.id for e in msg.experts if not e.dropped),
                    dropped=tuple((e.id, e.reason or "") for e in msg.experts if e.dropped))
            if isinstance(msg, wire.ErrorReplyPhone):
                return Outcome(phase, phone.client_id, "error", t0, time.monotonic() - t0,
                               code=msg.code.value, message=msg.message)
            chunks += 1
            if on_chunk is not None:
                on_chunk()
    except AskError as exc:
        kind = "phone_error" if exc.code in PHONE_ERRORS else exc.code
        return Outcome(phase, phone.client_id, kind, t0, time.monotonic() - t0,
                       code=exc.code, message=exc.message)
    except asyncio.TimeoutError:
        return Outcome(phase, phone.client_id, "lost", t0, time.monotonic() - t0,
                       message=f"silent for {timeout_s:g}s after {chunks} token chunk(s)")
    except aiomqtt.MqttError as exc:
        return Outcome(phase, phone.client_id, "send_failed", t0, time.monotonic() - t0,
                       message=str(exc))
    raise AssertionError("a reply stream ended without a final or error")  # pragma: no cover


@dataclass
class LoadRun:
    outcomes: list[Outcome]
    wall_s: float
    unmatched: int  # replies no request waited for: duplicates, or late after a timeout
    injected: Any = None


async def drive_load(fleet: ReliabilityFleet, phase: str, spec: LoadSpec,
                     injector: Callable[[Progress], Coroutine[Any, Any, Any]] | None = None,
                     seed: int = 0) -> LoadRun:
    """``spec.clients`` phones, each with ``spec.concurrency`` requests in flight, until each
    has made ``spec.per_client`` requests; ``injector`` runs alongside (faults)."""
    progress = Progress(spec.max_tokens)
    outcomes: list[Outcome] = []
    rng = random.Random(seed)
    tag = uuid.uuid4().hex[:6]
    numbers = itertools.count()
    phones = [fleet.phone(f"{phase}-{tag}-{i}") for i in range(spec.clients)]

    async def client(phone: PhoneClient, quota: list[int]) -> None:
        while quota[0] > 0:
            quota[0] -= 1
            prompt = f"{rng.choice(PROMPTS)} ({len(outcomes)})"
            n = next(numbers)
            out = await ask_once(phone, phase, wire.PhoneRequest(
                prompt=prompt, max_tokens=spec.max_tokens, raw=True), spec.timeout_s,
                on_chunk=functools.partial(progress.chunk, n))
            progress.ended(n)
            outcomes.append(out)
            progress.bump()
            if not out.sent:
                await asyncio.sleep(spec.retry_pause_s)

    async with contextlib.AsyncExitStack() as stack:
        for ph in phones:
            await stack.enter_async_context(ph)
        t0 = time.monotonic()
        workers = []
        for ph in phones:
            quota = [spec.per_client]
            workers += [asyncio.create_task(client(ph, quota), name=f"load-{ph.client_id}")
                        for _ in range(spec.concurrency)]
        inj: asyncio.Task[Any] | None = (
            asyncio.create_task(injector(progress), name=f"{phase}-injector")
            if injector is not None else None)
        try:
            await asyncio.gather(*workers)
            wall = time.monotonic() - t0
            progress.finish()
            injected = await inj if inj is not None else None
        finally:
            for t in [*workers, *([inj] if inj is not None else [])]:
                t.cancel()
            await asyncio.gather(*workers, *([inj] if inj is not None else []),
                                 return_exceptions=True)
        unmatched = sum(ph.unmatched for ph in phones)
    return LoadRun(outcomes, wall, unmatched, injected)


async def phase_load(fleet: ReliabilityFleet, spec: LoadSpec, seed: int = 0) -> dict[str, Any]:
    """Many phones at once: every request ends in exactly one final or error."""
    await fleet.wait_ready()
    run = await drive_load(fleet, "load", spec, seed=seed)
    fleet.check_alive()
    out = tally(run.outcomes, run.wall_s)
    out.update(clients=spec.clients, requests=spec.total, concurrency=spec.concurrency,
               max_tokens=spec.max_tokens, unmatched_replies=run.unmatched)
    out["outcomes"] = run.outcomes
    return out


