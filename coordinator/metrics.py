"""Prometheus metrics of a coordinator: requests, replies, tokens, latency, energy.

One :class:`CoordinatorMetrics` per coordinator, on a dedicated registry (never the global one).
The request path calls :meth:`CoordinatorMetrics.observe_request` when it accepts a request and
:meth:`CoordinatorMetrics.observe_reply` with every reply it sends a phone (token chunks are
ignored; a final carries the totals). :meth:`CoordinatorMetrics.serve` starts the HTTP endpoint;
given the coordinator, it also exports the coordinator's own event counters
(``coordinator.counters``) and how many agents its registry holds.

Label values that come from requests (``app``, expert ids) are capped: past
``max_label_values`` distinct values the rest are counted as ``other``, so a misbehaving phone
cannot grow the series without bound.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from moe2.shared import wire
from moe2.shared.metrics_http import MetricsServer

log = logging.getLogger(__name__)

#: seconds; per-request latency of a few to a few hundred tokens on edge boxes
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ENERGY_BUCKETS_J = (0.1, 0.5, 1.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 5000.0)

#: every metric name this module exports (as they appear on /metrics, without _bucket etc.)
COORDINATOR_METRICS: tuple[str, ...] = (
    "moe2_coordinator_requests_total",
    "moe2_coordinator_finals_total",
    "moe2_coordinator_errors_total",
    "moe2_coordinator_tokens_total",
    "moe2_coordinator_ttft_seconds",
    "moe2_coordinator_request_latency_seconds",
    "moe2_coordinator_energy_joules_total",
    "moe2_coordinator_request_energy_joules",
    "moe2_coordinator_expert_tokens_total",
    "moe2_coordinator_expert_energy_joules_total",
    "moe2_coordinator_expert_dropped_total",
    "moe2_coordinator_events_total",
    "moe2_coordinator_agents_online",
)

OTHER = "other"


class _BoundedLabels:
    """Keeps at most ``limit`` distinct values; later ones map to ``other``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) >= self.limit:
                return OTHER
            self._seen.add(value)
            return value


class _CoordinatorStateCollector:
    """Reads the coordinator's own counters and registry at scrape time."""

    def __init__(self, coordinator_id: str, coordinator: Any) -> None:
        self.coordinator_id = coordinator_id
        self.coordinator = coordinator

    def collect(self) -> Iterator[Metric]:
        cid = self.coordinator_id
        counters = getattr(self.coordinator, "counters", None)
        if isinstance(counters, Mapping):
            fam = CounterMetricFamily(
                "moe2_coordinator_events", "Request handling events (accepted, rejected, ...)",
                labels=["coordinator", "event"])
            for event, n in sorted(dict(counters).items()):
                fam.add_metric([cid, str(event)], float(n))
            yield fam
        registry = getattr(self.coordinator, "registry", None)
        agents = getattr(registry, "agents", None)
        if isinstance(agents, Mapping):
            gauge = GaugeMetricFamily("moe2_coordinator_agents_online",
                                      "Agents online in this coordinator's registry",
                                      labels=["coordinator"])
            gauge.add_metric([cid], float(len(agents)))
            yield gauge


class CoordinatorMetrics:
    def __init__(self, coordinator_id: str, *, max_label_values: int = 64) -> None:
        self.coordinator_id = coordinator_id
        self.registry = CollectorRegistry()
        self._app = _BoundedLabels(max_label_values)
        self._expert = _BoundedLabels(max(max_label_values, 256))
        self._attached = False
        reg = self.registry
        cl = ["coordinator"]
        self.requests = Counter("moe2_coordinator_requests", "Requests accepted",
                                [*cl, "app"], registry=reg)
        self.finals = Counter("moe2_coordinator_finals", "Requests answered with a final reply",
                              [*cl, "app", "finish_reason"], registry=reg)
        self.errors = Counter("moe2_coordinator_errors", "Requests answered with an error",
                              [*cl, "code"], registry=reg)
        self.tokens = Counter("moe2_coordinator_tokens", "Tokens generated for phones",
                              [*cl, "app"], registry=reg)
        self.ttft = Histogram("moe2_coordinator_ttft_seconds", "Time to the first token",
                              [*cl, "app"], buckets=TTFT_BUCKETS_S, registry=reg)
        self.latency = Histogram("moe2_coordinator_request_latency_seconds",
                                 "Request latency, arrival to final reply", [*cl, "app"],
                                 buckets=LATENCY_BUCKETS_S, registry=reg)
        self.energy = Counter("moe2_coordinator_energy_joules",
                              "Energy the experts reported for answered requests",
                              [*cl, "app"], registry=reg)
        self.request_energy = Histogram("moe2_coordinator_request_energy_joules",
                                        "Energy of one answered request", [*cl, "app"],
                                        buckets=ENERGY_BUCKETS_J, registry=reg)
        self.expert_tokens = Counter("moe2_coordinator_expert_tokens",
                                     "Tokens each expert took part in", [*cl, "expert"],
                                     registry=reg)
        self.expert_energy = Counter("moe2_coordinator_expert_energy_joules",
                                     "Energy each expert reported", [*cl, "expert"],
                                     registry=reg)
        self.expert_dropped = Counter("moe2_coordinator_expert_dropped",
                                      "Experts dropped from a request (timeout, error)",
                                      [*cl, "expert"], registry=reg)

    # ------------------------------------------------------------------ observations
    def observe_request(self, app: str) -> None:
        self.requests.labels(self.coordinator_id, self._app(app)).inc()

    def observe_reply(self, msg: wire.TokenChunk | wire.FinalReply | wire.ErrorReplyPhone) -> None:
        """Record one reply sent to a phone (chunks are skipped; the final has the totals)."""
        cid = self.coordinator_id
        if isinstance(msg, wire.FinalReply):
            app = self._app(msg.app)
            self.finals.labels(cid, app, msg.finish_reason).inc()
            self.tokens.labels(cid, app).inc(max(0, msg.tokens))
            if msg.ttft_s is not None and msg.ttft_s >= 0:
                self.ttft.labels(cid, app).observe(msg.ttft_s)
            self.latency.labels(cid, app).observe(max(0.0, msg.latency_s))
            energy_j = max(0.0, msg.energy_j)
            self.energy.labels(cid, app).inc(energy_j)
            self.request_energy.labels(cid, app).observe(energy_j)
            for e in msg.experts:
                expert = self._expert(e.id)
                self.expert_tokens.labels(cid, expert).inc(max(0, e.tokens))
                self.expert_energy.labels(cid, expert).inc(max(0.0, e.energy_j))
                if e.dropped:
                    self.expert_dropped.labels(cid, expert).inc()
        elif isinstance(msg, wire.ErrorReplyPhone):
            self.errors.labels(cid, wire.ErrorCode(msg.code).value).inc()

    # ------------------------------------------------------------------ endpoint
    def attach(self, coordinator: Any) -> None:
        """Also export ``coordinator.counters`` and the size of ``coordinator.registry``."""
        if self._attached:
            return
        self._attached = True
        self.registry.register(_CoordinatorStateCollector(self.coordinator_id, coordinator))

    def serve(self, port: int, coordinator: Any | None = None,
              addr: str = "0.0.0.0") -> MetricsServer:
        """Serve ``/metrics`` on ``addr:port`` (0 picks a free port: see ``.port``)."""
        if coordinator is not None:
            self.attach(coordinator)
        server = MetricsServer(self.registry, port, addr)
        log.info("coordinator %s: Prometheus metrics on %s:%d/metrics", self.coordinator_id,
                 addr or "*", server.port)
        return server
