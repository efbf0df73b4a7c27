"""Drive agents directly over MQTT (no phone, no gate): teacher forcing for calibration.

This is the production path of ``moe2 calibrate --broker``: the same agents and RPC the
coordinator uses. Each (row, agent) is one :class:`wire.ScoreAnswer`: the agent tokenises the
prompt and the answer with its own tokenizer -- any GGUF, any family -- and returns the
probability of every answer token given everything before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Sequence

import aiomqtt

from moe2.coordinator.rpc import AgentRpc
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
        #: online agents by id (retained statuses)
        self.statuses: dict[str, wire.AgentStatus] = {}

    async def __aenter__(self) -> AgentDriver:
        self._client = make_client(parse_broker_url(self.url), identifier=self.driver_id)
        await self._client.__aenter__()
        await self._client.subscribe(self.rpc.inbox, qos=0)
        await self._client.subscribe(self.topics.all_agent_status, qos=1)
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
            topic = str(m.topic)
            if topic != inbox.topic:  # an agent's retained status
                aid = self.topics.agent_id_of(topic)
                try:
                    st = (self.topics.agent_status(aid).decode(payload_bytes(m))
                          if aid and payload_bytes(m) else None)
                except wire.DecodeError:
                    st = None
                if aid and (st is None or st.state != "online"):
                    self.statuses.pop(aid, None)
                elif aid and st is not None:
                    self.statuses[aid] = st
                continue
            try:
                self.rpc.on_reply(inbox.decode(payload_bytes(m)))
            except wire.DecodeError as exc:
                log.debug("bad reply dropped: %s", exc)

    async def wait_agents(self, agent_ids: Sequence[str] | None,
                          timeout_s: float = 10.0) -> dict[str, wire.AgentStatus]:
        """The online agents (their retained statuses): ``agent_ids`` (every one must be
        online, else :class:`UnknownAgentsError` names the missing), or all that are."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            if agent_ids is not None and set(agent_ids) <= set(self.statuses):
                break
            await asyncio.sleep(0.05)
        if agent_ids is None:
            if not self.statuses:
                raise UnknownAgentsError("no agent is online on this broker")
            return dict(sorted(self.statuses.items()))
        missing = sorted(set(agent_ids) - set(self.statuses))
        if missing:
            online = ", ".join(sorted(self.statuses)) or "none"
            raise UnknownAgentsError(f"agent(s) {', '.join(missing)} are not online "
                                     f"(online: {online})")
        return {a: self.statuses[a] for a in agent_ids}

    async def score(self, agent_id: str, message: wire.ScoreAnswer
                    ) -> tuple[list[int], list[float]]:
        """The agent's answer tokens and the teacher-forced probability of each."""
        d = await asyncio.wait_for(self.rpc.score(agent_id, message), self.timeout_s)
        return [int(t) for t in d.id_array()], [float(p) for p in d.prob_array()]


class UnknownAgentsError(LookupError):
    """Agents named on the command line are not online."""
