"""A TCP relay on loopback that can cut a link and restore it: a bridge that drops and comes
back, for tests and benches (``with LinkProxy(target_port) as p: ... p.cut(); p.restore()``).

Threads, not asyncio: the relay must keep running while a test's own event loop is blocked or
absent. Every thread ends when the proxy closes; nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading

from moe2.tools.fleet.localbroker import free_port

log = logging.getLogger(__name__)

#: how long a relay thread waits in one select() before it looks at the proxy's state again
POLL_S = 0.2


class LinkProxy:
    """Relays 127.0.0.1:``port`` to 127.0.0.1:``target``. :meth:`cut` resets every relayed
    connection and refuses new ones (accepted, then closed at once) until :meth:`restore`."""

    def __init__(self, target: int, port: int | None = None) -> None:
        self.target = target
        self.port = port or free_port()
        self.up = True
        self.connections = 0  # accepted and relayed so far
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> LinkProxy:
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(16)
        ls.settimeout(POLL_S)
        self._listener = ls
        t = threading.Thread(target=self._accept, name=f"linkproxy-{self.port}", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed.set()
        self._reset_all()
        if self._listener is not None:
            self._listener.close()
        for t in self._threads:
            t.join(timeout=5)

    def cut(self) -> None:
        """The link drops: relayed connections are reset, new ones refused."""
        self.up = False
        self._reset_all()

    def restore(self) -> None:
        self.up = True

    def _reset_all(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for a, b in pairs:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._closed.is_set():
            try:
                client, _addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.settimeout(None)
            with self._lock:
                self._pairs.append((client, upstream))
                self.connections += 1
            t = threading.Thread(target=self._relay, args=(client, upstream), daemon=True,
                                 name=f"linkproxy-{self.port}-relay")
            t.start()
            self._threads = [x for x in self._threads if x.is_alive()] + [t]

    def _relay(self, a: socket.socket, b: socket.socket) -> None:
        peer = {a: b, b: a}
        try:
            while not self._closed.is_set():
                ready, _w, _x = select.select([a, b], [], [], POLL_S)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    peer[s].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()
            with self._lock:
                self._pairs = [p for p in self._pairs if p != (a, b)]
