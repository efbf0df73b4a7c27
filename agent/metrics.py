"""Prometheus metrics of one agent, read from the daemon's own state at scrape time.

A custom collector on a dedicated :class:`~prometheus_client.CollectorRegistry` (never the global
one) turns ``daemon.stats``, ``daemon.meter`` and ``daemon.table`` into metrics when Prometheus
scrapes, so the serving path does no extra work. Every series carries the ``agent`` label (the
agent id). Rates are left to PromQL: tokens/s is ``rate(moe2_agent_tokens_total[1m])`` and
joules per token ``rate(moe2_agent_energy_joules_total[1m]) / rate(moe2_agent_tokens_total[1m])``.

The collector runs in the HTTP server's thread while the engine thread updates the statistics;
a reading that fails (a meter error, a window changed mid-read) drops that one metric from the
scrape instead of failing it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)

from moe2.shared import __version__
from moe2.shared.metrics_http import MetricsServer

if TYPE_CHECKING:
    from moe2.agent.daemon import AgentDaemon

log = logging.getLogger(__name__)

T = TypeVar("T")

#: every metric name this module exports (samples add ``_total``/``_info`` as Prometheus does)
AGENT_METRICS: tuple[str, ...] = (
    "moe2_agent_info",
    "moe2_agent_energy_joules_total",
    "moe2_agent_power_watts",
    "moe2_agent_tokens_total",
    "moe2_agent_evaluated_tokens_total",
    "moe2_agent_step_latency_seconds",
    "moe2_agent_step_latency_by_ctx_seconds",
    "moe2_agent_open_sessions",
    "moe2_agent_max_sessions",
    "moe2_agent_temperature_celsius",
    "moe2_agent_mqtt_connections_total",
)


def _read(what: str, fn: Callable[[], T]) -> T | None:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - one bad reading must not fail the scrape
        log.debug("metrics: %s unavailable: %s", what, exc)
        return None


class AgentCollector:
    """Reads an :class:`~moe2.agent.daemon.AgentDaemon` on every scrape."""

    def __init__(self, daemon: AgentDaemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        d = self.daemon
        agent = d.cfg.id
        meter_kind = d.meter.kind
        info = d.engine.info

        fam_info = InfoMetricFamily("moe2_agent", "The expert this agent serves",
                                    labels=["agent"])
        fam_info.add_metric([agent], {
            "model": info.name, "quant": info.quant, "device": d.device, "meter": meter_kind,
            "estimated": "true" if d.meter.estimated else "false",
            "vocab_fp": info.vocab_fp, "version": __version__,
        })
        yield fam_info

        energy = _read("energy", d.meter.read_energy_j)
        if energy is not None:
            fam = CounterMetricFamily(
                "moe2_agent_energy_joules",
                "Energy since the agent started, from its meter (see the meter label)",
                labels=["agent", "meter"])
            fam.add_metric([agent, meter_kind], energy)
            yield fam
        power = _read("power", d.meter.read_power_w)
        if power is not None:
            fam_g = GaugeMetricFamily("moe2_agent_power_watts", "Latest power reading",
                                      labels=["agent", "meter"])
            fam_g.add_metric([agent, meter_kind], power)
            yield fam_g
        temp = _read("temperature", d.meter.temperature_c)
        if temp is not None:
            fam_g = GaugeMetricFamily("moe2_agent_temperature_celsius",
                                      "A representative temperature of the box",
                                      labels=["agent"])
            fam_g.add_metric([agent], temp)
            yield fam_g

        fam = CounterMetricFamily("moe2_agent_tokens",
                                  "Tokens generated (session steps decoded)", labels=["agent"])
        fam.add_metric([agent], d.stats.tokens_total)
        yield fam
        evaluated = _read("evaluated tokens",
                          lambda: int(getattr(d.engine, "evaluated_tokens", 0)))
        if evaluated is not None:
            fam = CounterMetricFamily("moe2_agent_evaluated_tokens",
                                      "Tokens decoded by the engine, prompts included",
                                      labels=["agent"])
            fam.add_metric([agent], evaluated)
            yield fam

        latency = _read("step latency", d.stats.step_latency_s)
        if latency is not None:
            fam_g = GaugeMetricFamily("moe2_agent_step_latency_seconds",
                                      "Median per-token step latency over recent steps",
                                      labels=["agent"])
            fam_g.add_metric([agent], latency)
            yield fam_g
        bins = _read("latency bins", d.stats.latency_bins)
        if bins:
            fam_g = GaugeMetricFamily(
                "moe2_agent_step_latency_by_ctx_seconds",
                "Median step latency for contexts up to ctx_upto tokens",
                labels=["agent", "ctx_upto"])
            for b in bins:
                fam_g.add_metric([agent, str(b.ctx_upto)], b.latency_s)
            yield fam_g

        fam_g = GaugeMetricFamily("moe2_agent_open_sessions", "Sessions open now",
                                  labels=["agent"])
        fam_g.add_metric([agent], len(d.table.sessions))
        yield fam_g
        fam_g = GaugeMetricFamily("moe2_agent_max_sessions", "Sessions this agent holds at once",
                                  labels=["agent"])
        fam_g.add_metric([agent], d.cfg.max_sessions)
        yield fam_g
        fam = CounterMetricFamily("moe2_agent_mqtt_connections",
                                  "Broker sessions established (reconnects add one)",
                                  labels=["agent"])
        fam.add_metric([agent], d.connections)
        yield fam
        fam = CounterMetricFamily("moe2_agent_dropped_requests",
                                  "Requests dropped unanswered: their response topic cannot be "
                                  "published to", labels=["agent"])
        fam.add_metric([agent], d.dropped_requests)
        yield fam
        spec = d.spec.stats
        for name, doc, value in (
                ("moe2_agent_speculation_hits", "Steps answered from a speculative decode",
                 spec.hits),
                ("moe2_agent_speculation_misses", "Speculative decodes thrown away",
                 spec.misses),
                ("moe2_agent_speculation_wasted_seconds",
                 "Decode time of the speculations thrown away", spec.wasted_s),
                ("moe2_agent_speculation_wasted_joules",
                 "Energy of the speculations thrown away (in the energy counter too)",
                 spec.wasted_j)):
            fam = CounterMetricFamily(name, doc, labels=["agent"])
            fam.add_metric([agent], value)
            yield fam


def agent_registry(daemon: AgentDaemon) -> CollectorRegistry:
    """A dedicated registry holding only this agent's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(daemon))
    return registry


def serve_agent_metrics(daemon: AgentDaemon, port: int, addr: str = "0.0.0.0") -> MetricsServer:
    """Serve ``daemon``'s metrics on ``addr:port`` (port 0 picks a free one: see ``.port``)."""
    server = MetricsServer(agent_registry(daemon), port, addr)
    log.info("agent %s: Prometheus metrics on %s:%d/metrics", daemon.cfg.id, addr or "*",
             server.port)
    return server
