"""Drive agents directly over MQTT (no phone, no gate): teacher forcing for calibration.

This is the production path of ``moe2 calibrate --broker``: the same agents, the same RPC and
the same distributions the coordinator fuses. For each (prompt tokens, target tokens) item and
each agent, a session is opened on the prompt with the full vocabulary (k = 0), and stepped
through the targets; the probability of every target token is read off the distribution that
precedes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Sequence

import aiomqtt

from moe2.coordinator.rpc import AgentRpc, RpcError
from moe2.shared import wire
from moe2.shared.mqtt import make_client, parse_broker_url, payload_bytes, response_properties
from moe2.shared.topics import Topics

log = logging.getLogger(__name__)


class AgentDriver:
    """An async context: one MQTT connection, an AgentRpc, and its sender/receiver loops."""

    def __init__(self, url: str, topics: Topics | None = None, driver_id: str | None = None,
                 timeout_s: float = 60.0) -> None:
        self.url = url
        self.topics = topics or Topics()
        self.driver_id = driver_id or f"driver-{uuid.uuid4().hex[:8]}"
        self.rpc = AgentRpc(self.topics, self.driver_id)
        self.timeout_s = timeout_s
        self._client: aiomqtt.Client | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._sending = False

    async def __aenter__(self) -> AgentDriver:
        self._client = make_client(parse_broker_url(self.url), identifier=self.driver_id)
        await self._client.__aenter__()
        await self._client.subscribe(self.rpc.inbox, qos=0)
        self._tasks = [asyncio.create_task(self._send(), name="driver-send"),
                       asyncio.create_task(self._receive(), name="driver-receive")]
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Let the last messages (session closes) go out before the connection does: aiomqtt's
        # disconnect can wait forever when a publish was cancelled half-way.
        for _ in range(300):
            if self.rpc.outgoing.empty() and not self._sending:
                break
            await asyncio.sleep(0.01)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self._client is not None:
            try:
                await asyncio.wait_for(self._client.__aexit__(None, None, None), 5.0)
            except (asyncio.TimeoutError, aiomqtt.MqttError):
                log.debug("driver %s: disconnect did not complete", self.driver_id)

    async def _send(self) -> None:
        assert self._client is not None
        props = response_properties(response_topic=self.rpc.inbox)
        while True:
            out = await self.rpc.outgoing.get()
            self._sending = True
            try:
                await self._client.publish(out.topic, out.payload, qos=0, properties=props)
            finally:
                self._sending = False

    async def _receive(self) -> None:
        assert self._client is not None
        inbox = self.topics.coordinator_inbox(self.driver_id)
        async for m in self._client.messages:
            try:
                self.rpc.on_reply(inbox.decode(payload_bytes(m)))
            except wire.DecodeError as exc:
                log.debug("bad reply dropped: %s", exc)

    async def teacher_forced(self, agent_id: str, prompt_tokens: Sequence[int],
                             targets: Sequence[int]) -> list[float]:
        """P(target_t | prompt, targets_<t) for every t, from the agent's distributions."""
        sid = f"{self.driver_id}-{uuid.uuid4().hex[:10]}"
        out: list[float] = []
        try:
            fut = self.rpc.open(agent_id, wire.OpenSession(
                session_id=sid, k=0, tokens=list(prompt_tokens)))
            d = await asyncio.wait_for(fut, self.timeout_s)
            for i, t in enumerate(targets):
                probs = d.prob_array()
                out.append(float(probs[t]) if 0 <= t < probs.shape[0] else 0.0)
                if i == len(targets) - 1:
                    break
                d = await asyncio.wait_for(
                    self.rpc.step(agent_id, wire.StepItem(sid, int(t), i + 1, 0)), self.timeout_s)
        finally:
            self.rpc.close(agent_id, [sid])
        return out


async def calibrate_via_agents(
    url: str, agent_ids: Sequence[str], items: Sequence[tuple[Sequence[int], Sequence[int]]],
    *, topics: Topics | None = None, concurrency: int = 8,
    progress: Callable[[int], None] | None = None,
) -> dict[str, list[list[float]]]:
    """Teacher-forced target probabilities of every item under every agent."""
    results: dict[str, list[list[float]]] = {a: [[] for _ in items] for a in agent_ids}
    sem = asyncio.Semaphore(concurrency)
    async with AgentDriver(url, topics) as drv:

        async def one(i: int) -> None:
            prompt, targets = items[i]
            async with sem:
                per_agent = await asyncio.gather(*[
                    drv.teacher_forced(a, prompt, targets) for a in agent_ids])
            for a, probs in zip(agent_ids, per_agent, strict=True):
                results[a][i] = probs
            if progress is not None:
                progress(1)

        try:
            await asyncio.gather(*[one(i) for i in range(len(items))])
        except RpcError as exc:
            raise RuntimeError(f"calibration failed: an agent refused a step: {exc}") from exc
    return results
