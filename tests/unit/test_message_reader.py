"""shared.mqtt.Client.publish_now: QoS 0 written in the caller's loop iteration, in order, with
partial writes and errors handed back to aiomqtt's own writer (real mosquitto)."""

from __future__ import annotations

import ast
import asyncio
import contextlib
from pathlib import Path

import aiomqtt

from moe2.shared.mqtt import (
    MessageReader,
    make_client,
    parse_broker_url,
)


def _message(payload: bytes) -> aiomqtt.Message:
    return aiomqtt.Message("t/race", payload, qos=1, retain=True, mid=1, properties=None)


#: loop iterations between a message's arrival and the cancellation of the wait for it: every
#: interleaving of "the queue read finished" and "the deadline cancelled the wait"
INTERLEAVINGS = range(6)


async def test_wait_for_anext_drops_a_message_when_the_wait_is_cancelled() -> None:
    """The hazard (aiomqtt 2.5): ``wait_for(anext(client.messages), t)`` timing out in the loop
    iteration in which the iterator's queue read finished drops that message. Reproduced
    deterministically by cancelling the wait after each number of loop iterations."""
    client = make_client(parse_broker_url("mqtt://127.0.0.1:1"))  # never connected
    lost = []
    for n in INTERLEAVINGS:
        it = aiter(client.messages)
        waiter = asyncio.create_task(anext(it))
        for _ in range(3):
            await asyncio.sleep(0)  # the iterator now waits on its queue
        client._queue.put_nowait(_message(b"%d" % n))
        for _ in range(n):
            await asyncio.sleep(0)
        waiter.cancel()  # what a timeout of wait_for does
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
        delivered = waiter.done() and not waiter.cancelled()
        if not delivered and client._queue.empty():
            lost.append(n)
        while not client._queue.empty():
            client._queue.get_nowait()
    assert lost, "aiomqtt no longer drops the message: the MessageReader is still correct"


async def test_message_reader_never_drops_a_message_to_a_cancelled_wait() -> None:
    """The same interleavings through :class:`MessageReader`: every message is delivered
    exactly once, either to the cancelled wait (it finished first) or to the next one."""
    client = make_client(parse_broker_url("mqtt://127.0.0.1:1"))
    async with MessageReader(client) as reader:
        for n in INTERLEAVINGS:
            waiter = asyncio.create_task(reader.next(timeout_s=30))
            for _ in range(3):
                await asyncio.sleep(0)
            client._queue.put_nowait(_message(b"%d" % n))
            for _ in range(n):
                await asyncio.sleep(0)
            waiter.cancel()
            got: list[bytes] = []
            with contextlib.suppress(asyncio.CancelledError):
                m = await waiter
                assert m is not None
                got.append(m.payload)  # type: ignore[arg-type]
            if not got:  # the cancelled wait did not take it: the next one must
                nxt = await reader.next(timeout_s=10)
                assert nxt is not None, f"interleaving {n}: the message was lost"
                got.append(nxt.payload)  # type: ignore[arg-type]
            assert got == [b"%d" % n], f"interleaving {n}: got {got}"
            assert await reader.next(timeout_s=0) is None


def _cancellable_anext_waits(tree: ast.AST) -> list[int]:
    """Lines of ``wait_for(anext(...), t)`` / ``wait_for(x.__anext__(), t)`` calls."""
    lines = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and node.args):
            continue
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
        inner = node.args[0]
        if name != "wait_for" or not isinstance(inner, ast.Call):
            continue
        g = inner.func
        if (isinstance(g, ast.Name) and g.id == "anext") or (
                isinstance(g, ast.Attribute) and g.attr == "__anext__"):
            lines.append(node.lineno)
    return lines


def test_no_code_waits_for_a_message_with_a_cancellable_anext() -> None:
    """Every subscription is read by one long-lived consumer (MessageReader or an ``async
    for``): no module of the product or the tests uses the pattern that drops messages."""
    repo = Path(__file__).resolve().parents[2]
    found = []
    for folder in ("agent", "coordinator", "shared", "cli", "tools", "gateway", "tests"):
        for path in sorted((repo / folder).rglob("*.py")):
            for line in _cancellable_anext_waits(ast.parse(path.read_text(), str(path))):
                found.append(f"{path.relative_to(repo)}:{line}")
    assert not found, f"wait_for(anext(...)) drops messages; use MessageReader: {found}"
    # the check itself finds the pattern
    assert _cancellable_anext_waits(ast.parse("asyncio.wait_for(anext(it), 1)")) == [1]
    assert _cancellable_anext_waits(ast.parse("wait_for(m.__anext__(), timeout=1)")) == [1]


async def test_message_reader_times_out_without_losing_later_messages() -> None:
    client = make_client(parse_broker_url("mqtt://127.0.0.1:1"))
    async with MessageReader(client) as reader:
        assert await reader.next(timeout_s=0.01) is None
        client._queue.put_nowait(_message(b"late"))
        m = await reader.next(timeout_s=5)
        assert m is not None and m.payload == b"late"
