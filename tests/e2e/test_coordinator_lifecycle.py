"""Coordinator lifecycle: graceful SIGTERM with drain, drain timeout, broker restart."""

from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from moe2.shared import wire
from moe2.shared.mqtt import make_client, parse_broker_url
from moe2.tools.clients.phone import PhoneClient
from moe2.tools.fleet.localbroker import LocalBroker
from moe2.tools.models import ExpertFile
from tests.conftest import Ggufs, log_of
from tests.fleet import ask, start_agent, start_coordinator, wait_plan

PROMPT = "What is 3 plus 4?"


@pytest.fixture(scope="module")
def experts(ggufs: Ggufs) -> list[ExpertFile]:
    return list(ggufs.shared[:2])


async def _stream_until_sigterm(url: str, proc: Any, max_tokens: int,
                                freeze: Any = None) -> list[Any]:
    cid = "drainphone"
    msgs: list[Any] = []
    async with make_client(parse_broker_url(url), identifier=cid) as c, \
            PhoneClient(c, cid) as phone:
        sent = False
        req = wire.PhoneRequest(prompt=PROMPT, max_tokens=max_tokens, raw=True)
        async for m in phone.stream(req, timeout_s=60):
            msgs.append(m)
            if isinstance(m, wire.TokenChunk) and not sent:
                if freeze is not None:
                    freeze.send_signal(signal.SIGSTOP)  # the request now cannot finish
                proc.send_signal(signal.SIGTERM)
                sent = True
    return msgs


def test_sigterm_drains_in_flight_requests(procs: Any, fresh_broker: LocalBroker,
                                           experts: list[ExpertFile]) -> None:
    url = fresh_broker.url
    start_agent(procs, url, "d0", experts[0].path)
    coord = start_coordinator(procs, url)
    asyncio.run(wait_plan(url, ["d0"]))
    msgs = asyncio.run(_stream_until_sigterm(url, coord, 200))
    assert isinstance(msgs[-1], wire.FinalReply), msgs[-1]
    assert sum(isinstance(m, (wire.FinalReply, wire.ErrorReplyPhone)) for m in msgs) == 1
    assert coord.wait(timeout=30) == 0, log_of(coord)


def test_drain_timeout_turns_unfinished_requests_into_errors(
        procs: Any, fresh_broker: LocalBroker, experts: list[ExpertFile], tmp_path: Path) -> None:
    url = fresh_broker.url
    # the agent is frozen (SIGSTOP) at the first token, so the request outlasts the 0.1 s drain
    agent = start_agent(procs, url, "d1", experts[1].path)
    cfg = tmp_path / "coordinator.toml"
    cfg.write_text('drain_timeout_s = 0.1\nmax_tokens_limit = 5000\n')
    coord = start_coordinator(procs, url, "--config", str(cfg))
    asyncio.run(wait_plan(url, ["d1"]))
    msgs = asyncio.run(_stream_until_sigterm(url, coord, 480, freeze=agent))
    last = msgs[-1]
    assert isinstance(last, wire.ErrorReplyPhone), last
    assert last.code == wire.ErrorCode.SHUTTING_DOWN
    assert sum(isinstance(m, (wire.FinalReply, wire.ErrorReplyPhone)) for m in msgs) == 1
    assert coord.wait(timeout=30) == 0


def test_broker_restart_agents_and_coordinator_come_back(
        procs: Any, experts: list[ExpertFile]) -> None:
    with LocalBroker() as b:
        start_agent(procs, b.url, "r0", experts[0].path)
        start_coordinator(procs, b.url)
        asyncio.run(wait_plan(b.url, ["r0"]))
        assert asyncio.run(ask(b.url, wire.PhoneRequest(prompt=PROMPT, max_tokens=4))).final
        b.stop()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", b.port), timeout=0.5).close()
        b.start()

        async def until_answered() -> wire.FinalReply:
            for _ in range(60):
                try:
                    ans = await ask(b.url, wire.PhoneRequest(prompt=PROMPT, max_tokens=4),
                                    timeout_s=2)
                    if ans.final is not None:
                        return ans.final
                except Exception:  # noqa: BLE001 - broker still coming back
                    pass
                await asyncio.sleep(0.5)
            raise AssertionError("no answer after the broker restart")

        final = asyncio.run(until_answered())
        assert final.tokens >= 1
        assert [e.id for e in final.experts] == ["r0"]
