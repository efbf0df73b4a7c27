"""The load driver's fault trigger: a fault waits for requests mid-answer, never for ever."""

from __future__ import annotations

import asyncio

from moe2.tools.bench.reliability.load import Progress


def test_a_fault_waits_for_a_request_early_in_its_answer() -> None:
    """Completions come in waves: at the nth, every other request may be at its last token,
    and a fault injected then finds nothing in flight (the chaos test saw no drop)."""

    async def scenario() -> list[str]:
        p = Progress(max_tokens=12)
        seen: list[str] = []

        async def injector() -> None:
            await p.reached(2)
            seen.append("fault")

        task = asyncio.create_task(injector())
        p.bump()
        p.bump()  # two done, but no request is streaming yet
        await asyncio.sleep(0)
        for _ in range(7):
            p.chunk(1)  # request 1 is past half of its answer
        await asyncio.sleep(0)
        seen.append("late ones only")
        p.chunk(2)  # request 2 has just begun
        await task
        assert p.early() == 1
        p.ended(2)
        assert p.early() == 0
        return seen

    assert asyncio.run(scenario()) == ["late ones only", "fault"]


def test_the_end_of_the_load_releases_a_waiting_fault() -> None:
    async def scenario() -> bool:
        p = Progress()
        task = asyncio.create_task(p.reached(5))
        await asyncio.sleep(0)
        assert not task.done()
        p.finish()
        await asyncio.wait_for(task, 10)
        return p.finished

    assert asyncio.run(scenario())


def test_a_count_alone_when_asked() -> None:
    async def scenario() -> None:
        p = Progress()
        p.bump()
        await asyncio.wait_for(p.reached(1, mid_answer=False), 10)

    asyncio.run(scenario())
