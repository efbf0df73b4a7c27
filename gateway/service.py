"""The gateway daemon: the HTTP server (uvicorn) and the MQTT connection in one event loop.

:class:`Gateway` owns its loops (STYLE.md 1): the phone client's reconnecting session, the
uvicorn server on a socket it bound itself, the systemd watchdog. READY goes to systemd once
the broker connection is up and the socket listens. SIGTERM (through ``cli._common.run_daemon``)
calls :meth:`Gateway.request_stop`: uvicorn stops accepting, lets answers in progress finish for
``drain_timeout_s``, then cancels them (each is cancelled upstream); a second signal exits at
once. The broker refusing the gateway's credentials again and again ends it
(``BrokerRefusedError``; the CLI exits 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn

from moe2.gateway.app import GatewayApp
from moe2.gateway.config import GatewayConfig, parse_listen
from moe2.shared.mqtt import cancel_and_wait
from moe2.shared.sdnotify import Notifier, watchdog_interval_s
from moe2.tools.clients.phone import PhoneClient

log = logging.getLogger(__name__)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on ``host:port`` (IPv4 or IPv6; port 0: a free one)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _name, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    return sock


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling (the daemon's, ``run_daemon``, stops it), and
    with an event set once it listens."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.listening.set()


class Gateway:
    def __init__(self, cfg: GatewayConfig, phone: PhoneClient, app: GatewayApp, *,
                 sock: socket.socket | None = None, notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.phone = phone
        self.app = app
        self.notifier = notifier or Notifier()
        host, port = parse_listen(cfg.listen)
        self.sock = sock if sock is not None else bind_socket(host, port)
        self.port: int = self.sock.getsockname()[1]
        ssl: dict[str, Any] = {}
        if cfg.ssl_certfile is not None:
            ssl = {"ssl_certfile": cfg.ssl_certfile, "ssl_keyfile": cfg.ssl_keyfile}
        self.server = _Server(uvicorn.Config(
            app, log_config=None, access_log=False, lifespan="off", server_header=False,
            timeout_graceful_shutdown=int(max(1, round(cfg.drain_timeout_s))), **ssl))
        self._stop = asyncio.Event()

    @property
    def scheme(self) -> str:
        return "https" if self.cfg.ssl_certfile else "http"

    def request_stop(self) -> None:
        if not self._stop.is_set():
            log.info("gateway %s: stopping (answers in progress get %.0fs)", self.cfg.id,
                     self.cfg.drain_timeout_s)
            self._stop.set()
            self.server.should_exit = True

    async def run(self) -> int:
        async with self.phone:
            serve = asyncio.create_task(self.server.serve(sockets=[self.sock]), name="http")
            phone = asyncio.create_task(self.phone.until_closed(), name="mqtt")
            tasks = [serve, phone]
            if self.notifier.enabled:
                tasks.append(asyncio.create_task(self._watchdog_loop(), name="watchdog"))
            tasks.append(asyncio.create_task(self._ready_when_listening(), name="ready"))
            try:
                await asyncio.wait([serve, phone], return_when=asyncio.FIRST_COMPLETED)
                if phone.done() and not serve.done():
                    self.server.should_exit = True
                    await serve
                if phone.done():
                    phone.result()  # raises what ended the broker session
            finally:
                self.notifier.stopping()
                await cancel_and_wait(tasks, grace_s=self.cfg.drain_timeout_s + 3.0)
        log.info("gateway %s: stopped", self.cfg.id)
        return 0

    async def _ready_when_listening(self) -> None:
        await self.server.listening.wait()
        host, _port = parse_listen(self.cfg.listen)
        log.info("gateway %s: OpenAI API on %s://%s:%d/v1 (%s)", self.cfg.id, self.scheme,
                 host, self.port,
                 "API keys required" if self.cfg.api_keys else "no API keys")
        self.notifier.ready(f"serving on port {self.port}")

    async def _watchdog_loop(self) -> None:
        interval = watchdog_interval_s(default_s=5.0)
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)
