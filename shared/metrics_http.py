"""The Prometheus ``/metrics`` HTTP endpoint both daemons serve (a daemon thread)."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, start_http_server


class MetricsServer:
    """The HTTP endpoint (``/metrics``) in a daemon thread; ``shutdown()`` stops and closes it."""

    def __init__(self, registry: CollectorRegistry, port: int, addr: str = "0.0.0.0") -> None:
        self.registry = registry
        self._httpd, self._thread = start_http_server(port, addr=addr, registry=registry)
        self._lock = threading.Lock()
        self._closed = False

    @property
    def port(self) -> int:
        port: int = self._httpd.server_port
        return port

    def shutdown(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5.0)
