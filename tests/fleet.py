"""Test helpers: a fleet of real agents and coordinators on a private mosquitto."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiomqtt

from moe2.shared import wire
from moe2.shared.mqtt import MessageReader, make_client, parse_broker_url, payload_bytes
from moe2.shared.topics import Topics
from moe2.tools.clients.phone import Answer, PhoneClient

AGENT_ARGS = ("--n-ctx", "512", "--max-sessions", "64", "--threads", "1",
              "--telemetry-interval", "0.5", "--meter", "estimated")


def start_agent(procs: Any, broker_url: str, name: str, model: Path | str,
                *extra: str) -> Any:
    return procs.moe2("agent", "--broker", broker_url, "--id", name, "--model", str(model),
                      *AGENT_ARGS, *extra, log_name=f"agent-{name}")


def start_coordinator(procs: Any, broker_url: str, *extra: str, name: str = "c0") -> Any:
    return procs.moe2("coordinator", "--broker", broker_url, "--id", name, *extra,
                      log_name=f"coordinator-{name}")


async def plan_where(broker_url: str, pred: Callable[[wire.PlanMsg], bool], *,
                     timeout_s: float = 60.0, topics: Topics | None = None
                     ) -> tuple[wire.PlanMsg | None, wire.PlanMsg | None]:
    """The first retained or published plan ``pred`` accepts (None at the deadline), and the
    last plan seen; reconnects while the broker is not there yet."""
    topics = topics or Topics()
    deadline = time.monotonic() + timeout_s
    last: wire.PlanMsg | None = None
    while time.monotonic() < deadline:
        try:
            async with make_client(parse_broker_url(broker_url),
                                   identifier=f"t-{uuid.uuid4().hex[:6]}") as c, \
                    MessageReader(c) as reader:
                await c.subscribe(topics.plan.topic, qos=1)
                while time.monotonic() < deadline:
                    m = await reader.next(timeout_s=min(1.0, deadline - time.monotonic()))
                    if m is None or not payload_bytes(m):
                        continue
                    last = topics.plan.decode(payload_bytes(m))
                    if pred(last):
                        return last, last
        except aiomqtt.MqttError:
            await asyncio.sleep(0.2)
    return None, last


async def wait_plan(broker_url: str, experts: Sequence[str], timeout_s: float = 60.0,
                    app: str = "default", topics: Topics | None = None) -> wire.PlanMsg:
    """Until the retained plan lets ``app`` use exactly ``experts`` (coordinator sees them)."""
    want = sorted(experts)
    plan, last = await plan_where(
        broker_url, lambda p: sorted(p.apps.get(app, p.joint).experts or []) == want,
        timeout_s=timeout_s, topics=topics)
    if plan is None:
        raise AssertionError(f"plan never showed {want}; last plan: {last}")
    return plan


async def ask(broker_url: str, request: wire.PhoneRequest, *, client_id: str | None = None,
              timeout_s: float = 60.0, msgpack: bool = False) -> Answer:
    cid = client_id or f"phone-{uuid.uuid4().hex[:6]}"
    async with make_client(parse_broker_url(broker_url), identifier=cid) as c, \
            PhoneClient(c, cid, msgpack=msgpack) as phone:
        return await phone.ask(request, timeout_s=timeout_s)


async def wait_for(pred: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
