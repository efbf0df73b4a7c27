"""Prometheus metrics of the HTTP gateway: requests by status, latency, time to first token,
tokens, requests in flight upstream.

One :class:`GatewayMetrics` per gateway, on its own registry, served on ``--metrics-port`` like
the agents' and coordinators'. Status ``499`` counts requests whose HTTP client went away
before the answer (nginx's code; the gateway cancelled them upstream). Key names are capped
like the coordinator's labels: past ``max_label_values`` the rest count as ``other``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from moe2.shared.metrics_http import MetricsServer

log = logging.getLogger(__name__)

#: seconds (the coordinator's buckets: a request of a few to a few hundred tokens)
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

GATEWAY_METRICS: tuple[str, ...] = (
    "moe2_gateway_requests_total",
    "moe2_gateway_request_latency_seconds",
    "moe2_gateway_ttft_seconds",
    "moe2_gateway_tokens_total",
    "moe2_gateway_upstream_in_flight",
    "moe2_gateway_upstream_connected",
)

OTHER = "other"


class GatewayMetrics:
    def __init__(self, gateway_id: str, *, max_label_values: int = 64) -> None:
        self.gateway_id = gateway_id
        self.registry = CollectorRegistry()
        self._keys: set[str] = set()
        self._max_keys = max_label_values
        reg = self.registry
        gl = ["gateway"]
        self.requests = Counter("moe2_gateway_requests", "HTTP requests by endpoint and status",
                                [*gl, "endpoint", "status"], registry=reg)
        self.latency = Histogram("moe2_gateway_request_latency_seconds",
                                 "HTTP request arrival to its last byte", [*gl, "endpoint"],
                                 buckets=LATENCY_BUCKETS_S, registry=reg)
        self.ttft = Histogram("moe2_gateway_ttft_seconds",
                              "HTTP request arrival to the first token from the fleet",
                              [*gl, "endpoint"], buckets=TTFT_BUCKETS_S, registry=reg)
        self.tokens = Counter("moe2_gateway_tokens", "Prompt and completion tokens per API key",
                              [*gl, "key", "kind"], registry=reg)
        self.in_flight = Gauge("moe2_gateway_upstream_in_flight",
                               "Requests published to the broker and not answered yet",
                               gl, registry=reg)
        self.connected = Gauge("moe2_gateway_upstream_connected",
                               "1 while the gateway's MQTT connection is up", gl, registry=reg)
        self.in_flight.labels(gateway_id).set(0)
        self.connected.labels(gateway_id).set(0)

    def watch_connection(self, is_connected: Callable[[], bool]) -> None:
        """Read the MQTT connection's state at every scrape."""
        self.connected.labels(self.gateway_id).set_function(
            lambda: 1.0 if is_connected() else 0.0)

    def _key(self, key: str) -> str:
        if key in self._keys:
            return key
        if len(self._keys) >= self._max_keys:
            return OTHER
        self._keys.add(key)
        return key

    def observe_request(self, endpoint: str, status: int, latency_s: float) -> None:
        self.requests.labels(self.gateway_id, endpoint, str(status)).inc()
        self.latency.labels(self.gateway_id, endpoint).observe(max(0.0, latency_s))

    def observe_ttft(self, endpoint: str, ttft_s: float) -> None:
        self.ttft.labels(self.gateway_id, endpoint).observe(max(0.0, ttft_s))

    def observe_tokens(self, key: str, prompt: int, completion: int) -> None:
        k = self._key(key)
        self.tokens.labels(self.gateway_id, k, "prompt").inc(max(0, prompt))
        self.tokens.labels(self.gateway_id, k, "completion").inc(max(0, completion))

    def upstream_started(self) -> None:
        self.in_flight.labels(self.gateway_id).inc()

    def upstream_ended(self) -> None:
        self.in_flight.labels(self.gateway_id).dec()

    def serve(self, port: int, addr: str = "0.0.0.0") -> Any:
        """Serve ``/metrics`` on ``addr:port`` (0 picks a free port: see ``.port``)."""
        server = MetricsServer(self.registry, port, addr)
        log.info("gateway %s: Prometheus metrics on %s:%d/metrics", self.gateway_id,
                 addr or "*", server.port)
        return server
