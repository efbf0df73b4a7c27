"""Coordinator -> agent RPC: sessions opened and stepped over MQTT, replies matched to futures.

Steps due for one agent in the same event-loop tick travel as ONE :class:`wire.Step` message:
:meth:`AgentRpc.step` queues the item and schedules a flush with ``call_soon``; the flush hands
one message per agent to ``direct`` (the coordinator writes it to the socket in the same
iteration), or, without one or when it declines, to the :attr:`outgoing` queue that its owner
drains (the calibration driver, :mod:`moe2.tools.clients.agent_driver`). Replies arrive on this
coordinator's inbox and resolve futures keyed by (agent, session, seq).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from moe2.shared import wire
from moe2.shared.topics import Topics

log = logging.getLogger(__name__)

Key = tuple[str, str, int]


class RpcError(Exception):
    """An agent could not serve a step: typed error reply, offline, or timeout."""

    def __init__(self, code: wire.ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Outgoing:
    topic: str
    payload: bytes


class AgentRpc:
    def __init__(self, topics: Topics, coordinator_id: str, max_queue: int = 100_000, *,
                 send: Callable[[Outgoing], bool] | None = None) -> None:
        self.topics = topics
        self.inbox = topics.coordinator_inbox(coordinator_id).topic
        self.outgoing: asyncio.Queue[Outgoing] = asyncio.Queue(maxsize=max_queue)
        self._waiters: dict[Key, asyncio.Future[wire.Distribution]] = {}
        self._by_agent: dict[str, set[Key]] = defaultdict(set)
        self._pending: dict[str, list[wire.StepItem]] = defaultdict(list)
        self._flush_scheduled = False
        #: sends one message now and returns True, or returns False to use the sender queue
        self.direct = send
        #: receives the sessions' contexts agents report on a close with ``report`` (tests)
        self.contexts_sink: Callable[[str, list[wire.SessionContext]], None] | None = None
        self.messages_sent = 0
        self.stray_replies = 0

    # ------------------------------------------------------------------ requests
    def _waiter(self, key: Key) -> asyncio.Future[wire.Distribution]:
        fut: asyncio.Future[wire.Distribution] = asyncio.get_running_loop().create_future()
        old = self._waiters.pop(key, None)
        if old is not None and not old.done():
            old.cancel()
        self._waiters[key] = fut
        self._by_agent[key[0]].add(key)
        return fut

    def _send(self, agent_id: str,
              msg: wire.OpenSession | wire.Step | wire.CloseSession | wire.ScoreAnswer) -> None:
        out = Outgoing(self.topics.agent_rpc(agent_id), wire.encode(msg))
        if self.direct is not None and self.direct(out):
            self.messages_sent += 1
            return
        try:
            self.outgoing.put_nowait(out)
            self.messages_sent += 1
        except asyncio.QueueFull:
            log.error("rpc queue full: message to %s dropped", agent_id)

    def open(self, agent_id: str, msg: wire.OpenSession) -> asyncio.Future[wire.Distribution]:
        fut = self._waiter((agent_id, msg.session_id, 0))
        self._send(agent_id, msg)
        return fut

    def score(self, agent_id: str, msg: wire.ScoreAnswer) -> asyncio.Future[wire.Distribution]:
        """Teacher forcing in one message (``moe2 calibrate``); the reply is one distribution."""
        fut = self._waiter((agent_id, msg.session_id, 0))
        self._send(agent_id, msg)
        return fut

    def step(self, agent_id: str, item: wire.StepItem) -> asyncio.Future[wire.Distribution]:
        fut = self._waiter((agent_id, item.session_id, item.seq))
        self._pending[agent_id].append(item)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, defaultdict(list)
        for agent_id, items in pending.items():
            if items:
                self._send(agent_id, wire.Step(items=items))

    def close(self, agent_id: str, session_ids: list[str], *, report: bool = False) -> None:
        if session_ids:
            self._send(agent_id, wire.CloseSession(session_ids=session_ids, report=report))
        self.forget(agent_id, set(session_ids))

    def forget(self, agent_id: str, session_ids: set[str]) -> None:
        keys = [k for k in self._by_agent.get(agent_id, set()) if k[1] in session_ids]
        for k in keys:
            self._discard(k)

    def _discard(self, key: Key) -> asyncio.Future[wire.Distribution] | None:
        fut = self._waiters.pop(key, None)
        keys = self._by_agent.get(key[0])
        if keys is not None:
            keys.discard(key)
            if not keys:
                self._by_agent.pop(key[0], None)
        return fut

    # ------------------------------------------------------------------ replies
    def on_reply(self, reply: wire.Reply) -> None:
        if reply.contexts and self.contexts_sink is not None:
            self.contexts_sink(reply.agent_id, list(reply.contexts))
        for d in reply.dists:
            fut = self._discard((reply.agent_id, d.session_id, d.seq))
            if fut is None:
                self.stray_replies += 1  # late, forged, or for a request already finished
                continue
            if not fut.done():
                fut.set_result(d)
        for e in reply.errors:
            if e.session_id is None:
                log.warning("agent %s reported: %s (%s)", reply.agent_id, e.message, e.code.value)
                continue
            keys = [k for k in self._by_agent.get(reply.agent_id, set())
                    if k[1] == e.session_id and (e.seq is None or k[2] == e.seq)]
            if not keys:
                self.stray_replies += 1
            for k in keys:
                fut = self._discard(k)
                if fut is not None and not fut.done():
                    fut.set_exception(RpcError(e.code, e.message))

    def fail_agent(self, agent_id: str, code: wire.ErrorCode, message: str) -> None:
        """The agent went offline: every step waiting on it fails now, not at its deadline."""
        for k in list(self._by_agent.get(agent_id, set())):
            fut = self._discard(k)
            if fut is not None and not fut.done():
                fut.set_exception(RpcError(code, message))

    @property
    def waiting(self) -> int:
        return len(self._waiters)
