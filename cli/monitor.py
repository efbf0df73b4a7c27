"""``moe2 monitor``: a live view of every agent (power, energy, speed, plan membership).

Live mode redraws a rich table on every message (and each ``--interval`` for the ages) and
reconnects when the broker goes away. ``--once`` collects the retained status and plan, waits for
one telemetry message from every online agent (at most ``--timeout`` seconds) and prints one
snapshot; with ``--json`` that snapshot is the last stdout line. ``--json`` without ``--once``
prints one snapshot line every ``--interval`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from typing import Any

from moe2.cli._common import emit_json, fail

HELP = "watch the fleet: power, energy, tokens/s, J/token, latency and plan per agent"
log = logging.getLogger("moe2.monitor")

#: after SUBACK the broker sends the retained messages; give them this long before --once may end
RETAINED_SETTLE_S = 0.5


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883",
                   help="mqtt://[user:pass@]host:port or mqtts://... (default mqtt://127.0.0.1:1883)")
    p.add_argument("--root", default="moe2", help="topic root (default moe2)")
    p.add_argument("--ca-file", help="CA certificate for mqtts://")
    p.add_argument("--once", action="store_true",
                   help="print one snapshot after one telemetry round from every online agent")
    p.add_argument("--json", action="store_true", help="print JSON snapshots instead of a table")
    p.add_argument("--timeout", type=float, default=5.0,
                   help="--once: seconds to wait for the telemetry round (default 5)")
    p.add_argument("--interval", type=float, default=1.0,
                   help="live mode: seconds between redraws / JSON lines (default 1)")


class _Session:
    """The monitor's MQTT side: feeds decoded events into the state and signals changes."""

    def __init__(self, args: argparse.Namespace) -> None:
        from moe2.shared.mqtt import TlsOptions, parse_broker_url
        from moe2.shared.topics import Topics
        from moe2.tools.ops.monitor import MonitorState

        self.args = args
        self.url = parse_broker_url(args.broker)
        self.tls = TlsOptions(ca_file=args.ca_file)
        self.topics = Topics(args.root)
        self.state = MonitorState()
        self.changed = asyncio.Event()
        self.stop = asyncio.Event()

    def client(self) -> Any:
        from moe2.shared.mqtt import make_client

        return make_client(self.url, tls=self.tls, keepalive_s=10)

    async def subscribe(self, client: Any) -> None:
        from moe2.tools.ops.monitor import subscriptions

        for topic in subscriptions(self.topics):
            await client.subscribe(topic, qos=1)

    def feed(self, message: Any) -> None:
        from moe2.shared.mqtt import payload_bytes
        from moe2.tools.ops.monitor import apply, event_for

        event = event_for(self.topics, str(message.topic), payload_bytes(message), time.time())
        if event is not None:
            self.state = apply(self.state, event)
            self.changed.set()

    async def once(self) -> None:
        """Collect until :func:`once_complete` (after the retained messages) or the timeout."""
        from moe2.tools.ops.monitor import once_complete

        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, self.args.timeout)
        settle = loop.time() + min(RETAINED_SETTLE_S, max(0.0, self.args.timeout))
        from moe2.shared.mqtt import MessageReader

        async with self.client() as client, MessageReader(client) as reader:
            await self.subscribe(client)
            while not self.stop.is_set():
                now = loop.time()
                if now >= settle and once_complete(self.state):
                    return
                if now >= deadline:
                    return
                wait = (settle if now < settle else deadline) - now
                message = await reader.next(timeout_s=wait)
                if message is not None:
                    self.feed(message)

    async def live(self) -> None:
        """Receive until stopped, reconnecting with backoff."""
        import aiomqtt

        from moe2.shared.mqtt import Backoff

        backoff = Backoff(cap_s=10.0)
        while True:
            if self.stop.is_set():
                return
            try:
                async with self.client() as client:
                    await self.subscribe(client)
                    backoff.reset()
                    async for message in client.messages:
                        self.feed(message)
            except aiomqtt.MqttError as exc:
                delay = backoff.next_delay_s()
                log.warning("broker %s: %s; retrying in %.1fs", self.url.redacted(), exc, delay)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), timeout=delay)


def _console() -> Any:
    """A terminal keeps its width; piped output gets room for every column."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=200)


def _install_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)


async def _run_once(args: argparse.Namespace) -> int:
    import aiomqtt

    from moe2.tools.ops.monitor import render, snapshot

    session = _Session(args)
    _install_signals(session.stop)
    try:
        await session.once()
    except aiomqtt.MqttError as exc:
        fail(f"broker {session.url.redacted()}: {exc}", code=1)
    now = time.time()
    if args.json:
        emit_json(snapshot(session.state, now))
    else:
        _console().print(render(session.state, now))
    return 0


async def _run_live(args: argparse.Namespace) -> int:
    from moe2.tools.ops.monitor import render, snapshot

    session = _Session(args)
    _install_signals(session.stop)
    receiver = asyncio.create_task(session.live(), name="monitor-mqtt")
    interval = max(0.1, args.interval)

    async def tick() -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(session.stop.wait(), timeout=interval)

    try:
        if args.json:
            while not session.stop.is_set():
                await tick()
                emit_json(snapshot(session.state, time.time()))
        else:
            from rich.live import Live

            console = _console()
            title = f"moe2 fleet @ {session.url.redacted()} (root {args.root}; Ctrl-C quits)"
            with Live(render(session.state, time.time(), title=title), console=console,
                      refresh_per_second=4, transient=False) as live:
                while not session.stop.is_set():
                    changed = asyncio.create_task(session.changed.wait())
                    stopping = asyncio.create_task(session.stop.wait())
                    await asyncio.wait({changed, stopping}, timeout=interval,
                                       return_when=asyncio.FIRST_COMPLETED)
                    for t in (changed, stopping):
                        t.cancel()
                    await asyncio.gather(changed, stopping, return_exceptions=True)
                    session.changed.clear()
                    live.update(render(session.state, time.time(), title=title))
    finally:
        receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await receiver
    return 0


def run(args: argparse.Namespace) -> int:
    from moe2.shared.mqtt import BrokerUrlError, parse_broker_url
    from moe2.shared.topics import Topics

    try:
        parse_broker_url(args.broker)
        Topics(args.root)
    except (BrokerUrlError, ValueError) as exc:
        fail(str(exc))
    if args.timeout < 0:
        fail("--timeout must be >= 0")
    if args.interval <= 0:
        fail("--interval must be > 0")
    try:
        return asyncio.run(_run_once(args) if args.once else _run_live(args))
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return 0
