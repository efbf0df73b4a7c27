"""The agent's engine thread (agent/daemon.py ``_engine_run``): queued work before
speculation, a step that arrives during a speculative decode answered from it in the same run,
and work taken after a stop without drain answered per session."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from moe2.agent.daemon import Work
from moe2.shared import wire
from tests.agent_helpers import FakeEngine, agent_config, make_daemon
from tests.unit.test_speculation import _daemon, _work


def test_the_engine_thread_serves_queued_work_before_speculating_and_until_idle() -> None:
    """One run of the engine thread: the open queued for it first, then the speculation its
    reply made worth it, then the step that arrived meanwhile -- answered from that
    speculation without going back to the event loop -- then the next speculation; replies are
    handed to the loop in order, and the thread returns once nothing is left."""
    d, engine, _meter = _daemon()
    loop = asyncio.new_event_loop()
    handed: list[tuple[list[wire.Reply | None], int]] = []
    try:
        def hand_over(batch: Sequence[Work], replies: Sequence[wire.Reply | None]) -> None:
            handed.append((list(replies), len(engine.calls)))

        speculate = d.spec.round

        def round_then_a_step_arrives() -> int:
            n = speculate()
            if len(handed) == 1:  # the coordinator's step, sent while the thread decoded
                [dist] = next(r for r in handed[0][0] if r is not None).dists
                d._inbox.append(_work(wire.Step(items=[
                    wire.StepItem("s", int(dist.id_array()[0]), 1, 4)])))
            return n

        d.spec.round = round_then_a_step_arrives  # type: ignore[method-assign]
        d._start_sending = hand_over  # type: ignore[method-assign]
        d._inbox.append(_work(wire.OpenSession(session_id="s", k=4, tokens=[1, 5, 6])))
        # the loop's callbacks are run by hand: call_soon_threadsafe only queues them
        real = loop.call_soon_threadsafe

        def run_now(cb: Any, *args: Any) -> Any:
            cb(*args)
            return real(lambda: None)

        loop.call_soon_threadsafe = run_now  # type: ignore[method-assign]
        d._engine_run(loop)
    finally:
        loop.close()
    assert len(handed) == 2
    open_calls, step_calls = handed[0][1], handed[1][1]
    assert step_calls == open_calls + 1  # the one speculative decode; the hit decoded nothing
    [[step_reply]] = [handed[1][0]]
    assert step_reply is not None and step_reply.dists[0].spec == 1  # a hit
    assert len(engine.calls) == step_calls + 1  # and the next speculation, then idle
    assert not d._inbox and not d.spec.pending()


def test_work_taken_after_a_stop_without_drain_tells_each_of_its_sessions() -> None:
    """A stop with ``drain_timeout_s = 0``: work the engine thread still takes is answered
    ``shutting_down`` for each session and step it names, so that the coordinator fails those
    steps at once -- an error without a session would only be logged there."""
    from moe2.coordinator.rpc import AgentRpc, RpcError
    from moe2.shared.topics import Topics

    engine = FakeEngine()
    d = make_daemon(agent_config("spec", drain_timeout_s=0.0), engine, "mqtt://127.0.0.1:1")

    async def scenario() -> list[BaseException | None]:
        rpc = AgentRpc(Topics("moe2"), "c0", send=lambda _out: True)
        opened = rpc.open("spec", wire.OpenSession(session_id="a", k=4, tokens=[1]))
        stepped = rpc.step("spec", wire.StepItem("b", 7, 3, 4))
        await asyncio.sleep(0)  # the step's flush
        handed: list[wire.Reply | None] = []
        d._start_sending = lambda _b, replies: handed.extend(replies)  # type: ignore[method-assign]
        d._inbox.extend([_work(wire.OpenSession(session_id="a", k=4, tokens=[1])),
                         _work(wire.Step(items=[wire.StepItem("b", 7, 3, 4)]))])
        d._stopping.set()
        loop = asyncio.get_running_loop()
        await asyncio.to_thread(d._engine_run, loop)
        await asyncio.sleep(0)  # the hand-over callback
        assert engine.calls == []  # nothing decoded after the stop
        for reply in handed:
            assert reply is not None
            rpc.on_reply(reply)
        assert rpc.stray_replies == 0
        return [f.exception() if f.done() else None for f in (opened, stepped)]

    errors = asyncio.run(scenario())
    assert all(isinstance(e, RpcError) and e.code == wire.ErrorCode.SHUTTING_DOWN
               for e in errors), errors
