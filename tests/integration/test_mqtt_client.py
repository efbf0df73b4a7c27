"""shared.mqtt.Client.publish_now: QoS 0 written in the caller's loop iteration, in order, with
partial writes and errors handed back to aiomqtt's own writer (real mosquitto)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiomqtt
import pytest

from moe2.shared.mqtt import (
    Client,
    MessageReader,
    make_client,
    parse_broker_url,
    payload_bytes,
    publish_qos0,
)
from moe2.tools.fleet.localbroker import LocalBroker


async def _receive(sub: aiomqtt.Client, n: int) -> list[bytes]:
    got: list[bytes] = []
    async with MessageReader(sub) as reader:
        while len(got) < n:
            m = await reader.next(timeout_s=10)
            assert m is not None, f"only {len(got)} of {n} messages arrived"
            got.append(payload_bytes(m))
    return got


#: loop iterations between a message's arrival and the cancellation of the wait for it: every
#: interleaving of "the queue read finished" and "the deadline cancelled the wait"
INTERLEAVINGS = range(6)


async def test_message_reader_reports_the_end_of_the_connection(broker: LocalBroker) -> None:
    """What arrived before the connection ended is read first; then MqttError, not a hang."""
    url = parse_broker_url(broker.url)
    async with make_client(url) as pub:
        sub = make_client(url)
        async with sub:
            await sub.subscribe("t/end", qos=1)
            reader = MessageReader(sub)
            await reader.__aenter__()
            await pub.publish("t/end", b"before", qos=1)
            m = await reader.next(timeout_s=10)
            assert m is not None and m.payload == b"before"
            sub._disconnected.set_exception(aiomqtt.MqttError("gone"))
            with pytest.raises(aiomqtt.MqttError):
                await reader.next(timeout_s=10)
            await reader.__aexit__(None, None, None)
            sub._disconnected = asyncio.get_running_loop().create_future()


async def _no_writer_left(client: Client) -> bool:
    """After a few loop iterations no writer may stay registered for the socket: a stale one
    would spin the event loop at 100% CPU (aiomqtt's writer re-arms only through paho)."""
    for _ in range(5):
        await asyncio.sleep(0)
    sock = client._paho.socket()
    assert sock is not None
    return not asyncio.get_running_loop().remove_writer(sock.fileno())


async def test_publish_now_writes_before_returning_and_keeps_order(broker: LocalBroker) -> None:
    url = parse_broker_url(broker.url)
    async with make_client(url) as pub, make_client(url) as sub:
        assert isinstance(pub, Client)
        await sub.subscribe("t/now", qos=1)
        expected: list[bytes] = []
        for i in range(300):
            body = f"{i}".encode()
            expected.append(body)
            if i % 7 == 3:  # ordinary aiomqtt publishes interleaved
                await pub.publish("t/now", body, qos=1)
                continue
            pub.publish_now("t/now", body)
            # nothing left for the event loop to write: the packet is on the socket already
            assert not pub._paho.want_write()
        assert await _receive(sub, len(expected)) == expected
        assert await _no_writer_left(pub)


async def test_partial_write_is_finished_by_the_event_loop(broker: LocalBroker) -> None:
    url = parse_broker_url(broker.url)
    async with make_client(url) as pub, make_client(url) as sub:
        assert isinstance(pub, Client)
        await sub.subscribe("t/partial", qos=0)
        paho = pub._paho
        real_send = paho._sock_send
        calls = {"n": 0}

        def half_then_block(data: Any) -> int:
            calls["n"] += 1
            if calls["n"] == 1:
                return int(real_send(bytes(data)[: len(data) // 2]))
            if calls["n"] == 2:
                raise BlockingIOError  # the socket buffer is full: wait for writability
            return int(real_send(data))

        paho._sock_send = half_then_block
        try:
            pub.publish_now("t/partial", b"a" * 4000)
            assert paho.want_write()  # the rest waits for aiomqtt's writer ...
            pub.publish_now("t/partial", b"b" * 10)  # ... and so does what comes after it
            got = await _receive(sub, 2)
        finally:
            paho._sock_send = real_send
        assert got == [b"a" * 4000, b"b" * 10]
        assert not paho.want_write()
        assert await _no_writer_left(pub)


async def test_publish_now_inside_a_paho_callback_leaves_the_write_to_the_loop(
        broker: LocalBroker) -> None:
    """Within a paho callback (paho holds its non-reentrant callback lock) an immediate write
    would deadlock in on_publish; the packet goes to the loop's writer instead."""
    url = parse_broker_url(broker.url)
    async with make_client(url) as pub, make_client(url) as sub:
        assert isinstance(pub, Client)
        await sub.subscribe("t/cb", qos=0)
        lock = pub._paho._in_callback_mutex
        with lock:  # as during paho's on_message / on_publish
            pub.publish_now("t/cb", b"from a callback")
            assert pub._paho.want_write()
        assert await _receive(sub, 1) == [b"from a callback"]
        assert await _no_writer_left(pub)


async def test_publish_now_without_a_connection_raises() -> None:
    client = make_client(parse_broker_url("mqtt://127.0.0.1:1"))
    assert isinstance(client, Client)
    with pytest.raises(aiomqtt.MqttError):
        client.publish_now("t/x", b"x")


async def test_publish_qos0_uses_ordinary_publish_for_other_clients(broker: LocalBroker) -> None:
    plain = aiomqtt.Client("127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V5)
    async with plain, make_client(parse_broker_url(broker.url)) as sub:
        await sub.subscribe("t/plain", qos=0)
        await publish_qos0(plain, "t/plain", b"hello")
        assert await _receive(sub, 1) == [b"hello"]


@pytest.mark.parametrize("quickack", [True, False])
async def test_quick_acks_keep_the_read_path_whole(quickack: bool) -> None:
    """With TCP_QUICKACK re-armed after every read (our reader in place of aiomqtt's) a client
    on a stock broker (Nagle on) still gets everything, in order, and ends its connection
    cleanly; without it aiomqtt's own reader stays."""
    import socket

    with LocalBroker(tcp_nodelay=False) as stock:
        url = parse_broker_url(stock.url)
        async with make_client(url, quickack=quickack) as sub, make_client(url) as pub:
            assert (sub._aiomqtt_open is not None) == (
                quickack and hasattr(socket, "TCP_QUICKACK"))
            await sub.subscribe("q/#")
            payloads = [f"m{i}".encode() * (1 + i % 7) for i in range(200)]
            receiving = asyncio.create_task(_receive(sub, len(payloads)))
            for p in payloads:
                pub.publish_now("q/x", p)
            assert await receiving == payloads
