"""Prometheus metrics of agents and coordinators, and the Grafana dashboard built on them."""

from __future__ import annotations

import json
import re
import urllib.request
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from moe2.agent.daemon import AgentDaemon
from moe2.agent.meters import ManualMeter
from moe2.agent.metrics import AGENT_METRICS, agent_registry, serve_agent_metrics
from moe2.coordinator.metrics import COORDINATOR_METRICS, OTHER, CoordinatorMetrics
from moe2.shared import wire
from moe2.shared.config import AgentConfig
from tests.agent_helpers import FakeEngine
from tests.conftest import REPO

DASHBOARD = REPO / "dashboards" / "grafana-moe2.json"


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """(sample name, labels) -> value, from the text exposition format."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    want = frozenset(labels.items())
    for (n, ls), v in samples(text).items():
        if n == name and want <= ls:
            return v
    raise AssertionError(f"no sample {name}{labels} in:\n{text}")


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        body: bytes = r.read()
    return body.decode()


def fake_daemon(meter: ManualMeter, agent_id: str = "x0") -> AgentDaemon:
    cfg = AgentConfig(id=agent_id, model="unused.gguf", max_sessions=4)

    def no_client(_will: Any) -> Any:
        raise AssertionError("the collector never connects")

    return AgentDaemon(cfg, FakeEngine(), meter, no_client, device="cpu")


def exported_names() -> set[str]:
    """Every sample name the agent and coordinator endpoints can expose."""
    meter = ManualMeter("manual", energy_j=1.0, power_w=1.0, temperature_c=30.0)
    d = fake_daemon(meter)
    d.stats.record_step(0.01, 10)
    names = {n for n, _ in samples(generate_latest(agent_registry(d)).decode())}
    m = CoordinatorMetrics("c0")
    m.attach(_FakeCoordinator())
    m.observe_request("chat")
    m.observe_reply(final(dropped=True))
    m.observe_reply(wire.ErrorReplyPhone(code=wire.ErrorCode.TIMEOUT, message="late"))
    names |= {n for n, _ in samples(generate_latest(m.registry).decode())}
    return names


class _Registry:
    def __init__(self) -> None:
        self.agents = {"e0": object(), "e1": object()}


class _FakeCoordinator:
    def __init__(self) -> None:
        self.counters = {"accepted": 3, "rejected": 1}
        self.registry = _Registry()


def final(app: str = "chat", *, dropped: bool = False, experts: int = 2) -> wire.FinalReply:
    return wire.FinalReply(
        text="hi", tokens=5, finish_reason="length", ttft_s=0.02, latency_s=0.3, energy_j=1.5,
        experts=[wire.ExpertUsage(id=f"e{i}", weight=1.0 / experts, tokens=5, energy_j=0.75,
                                  dropped=dropped and i == 0) for i in range(experts)],
        app=app, coordinator_id="c0")


# --------------------------------------------------------------------------- agent


def test_agent_collector_reads_the_daemon_state() -> None:
    meter = ManualMeter("manual", energy_j=12.5, power_w=3.25, temperature_c=41.0)
    d = fake_daemon(meter)
    d.stats.record_step(0.010, 40)
    d.stats.record_step(0.030, 100)
    d.stats.record_tokens(2)
    d.table.open("s1", 3, 0, 0.0)
    text = generate_latest(agent_registry(d)).decode()
    assert value(text, "moe2_agent_energy_joules_total", agent="x0", meter="manual") == 12.5
    assert value(text, "moe2_agent_power_watts", agent="x0", meter="manual") == 3.25
    assert value(text, "moe2_agent_temperature_celsius", agent="x0") == 41.0
    assert value(text, "moe2_agent_tokens_total", agent="x0") == 2
    assert value(text, "moe2_agent_evaluated_tokens_total", agent="x0") == 0
    assert value(text, "moe2_agent_step_latency_seconds", agent="x0") == pytest.approx(0.02)
    assert value(text, "moe2_agent_step_latency_by_ctx_seconds", agent="x0",
                 ctx_upto="64") == pytest.approx(0.01)
    assert value(text, "moe2_agent_step_latency_by_ctx_seconds", agent="x0",
                 ctx_upto="128") == pytest.approx(0.03)
    assert value(text, "moe2_agent_open_sessions", agent="x0") == 1
    assert value(text, "moe2_agent_max_sessions", agent="x0") == 4
    assert value(text, "moe2_agent_mqtt_connections_total", agent="x0") == 0
    assert value(text, "moe2_agent_info", agent="x0", model="fake", device="cpu",
                 meter="manual", estimated="false") == 1
    # the reading moves with the meter: nothing is cached between scrapes
    meter.set(energy_j=20.0)
    text = generate_latest(agent_registry(d)).decode()
    assert value(text, "moe2_agent_energy_joules_total", agent="x0") == 20.0
    names = {n for n, _ in samples(text)}
    assert set(AGENT_METRICS) <= names


def test_a_failing_meter_drops_only_its_metrics() -> None:
    class Broken(ManualMeter):
        def read_energy_j(self) -> float:
            raise RuntimeError("sensor gone")

    d = fake_daemon(Broken("manual", power_w=2.0))
    text = generate_latest(agent_registry(d)).decode()
    names = {n for n, _ in samples(text)}
    assert "moe2_agent_energy_joules_total" not in names
    assert value(text, "moe2_agent_power_watts", agent="x0") == 2.0


def test_serve_agent_metrics_uses_a_dedicated_registry() -> None:
    from prometheus_client import REGISTRY

    d = fake_daemon(ManualMeter("manual", energy_j=7.0))
    server = serve_agent_metrics(d, 0, addr="127.0.0.1")
    try:
        text = scrape(server.port)
    finally:
        server.shutdown()
    server.shutdown()  # idempotent
    assert value(text, "moe2_agent_energy_joules_total", agent="x0") == 7.0
    assert "python_gc_objects_collected_total" not in text, "not the global registry"
    assert REGISTRY.get_sample_value("moe2_agent_energy_joules_total", {"agent": "x0"}) is None


# --------------------------------------------------------------------------- coordinator


def test_coordinator_metrics_count_replies() -> None:
    m = CoordinatorMetrics("c0")
    m.observe_request("chat")
    m.observe_reply(wire.TokenChunk(index=0, text="h"))  # chunks are not counted
    m.observe_reply(final())
    m.observe_reply(final(dropped=True))
    m.observe_reply(wire.ErrorReplyPhone(code=wire.ErrorCode.NO_EXPERTS, message="none"))
    text = generate_latest(m.registry).decode()
    c = {"coordinator": "c0"}
    assert value(text, "moe2_coordinator_requests_total", app="chat", **c) == 1
    assert value(text, "moe2_coordinator_finals_total", app="chat", finish_reason="length",
                 **c) == 2
    assert value(text, "moe2_coordinator_errors_total", code="no_experts", **c) == 1
    assert value(text, "moe2_coordinator_tokens_total", app="chat", **c) == 10
    assert value(text, "moe2_coordinator_energy_joules_total", app="chat", **c) == 3.0
    assert value(text, "moe2_coordinator_request_latency_seconds_count", app="chat", **c) == 2
    assert value(text, "moe2_coordinator_request_latency_seconds_sum", app="chat",
                 **c) == pytest.approx(0.6)
    assert value(text, "moe2_coordinator_ttft_seconds_bucket", app="chat", le="0.025",
                 **c) == 2
    assert value(text, "moe2_coordinator_request_energy_joules_count", app="chat", **c) == 2
    assert value(text, "moe2_coordinator_expert_tokens_total", expert="e0", **c) == 10
    assert value(text, "moe2_coordinator_expert_energy_joules_total", expert="e1", **c) == 1.5
    assert value(text, "moe2_coordinator_expert_dropped_total", expert="e0", **c) == 1
    names = {n for n, _ in samples(text)}
    assert "moe2_coordinator_expert_dropped_total" in names
    assert "moe2_coordinator_events_total" not in names, "only once a coordinator is attached"


def test_label_values_from_requests_are_capped() -> None:
    m = CoordinatorMetrics("c0", max_label_values=2)
    for app in ("a", "b", "c", "d", "a"):
        m.observe_reply(final(app))
    text = generate_latest(m.registry).decode()
    apps = {dict(ls).get("app") for (n, ls) in samples(text)
            if n == "moe2_coordinator_finals_total"}
    assert apps == {"a", "b", OTHER}
    assert value(text, "moe2_coordinator_finals_total", app=OTHER) == 2
    assert value(text, "moe2_coordinator_finals_total", app="a") == 2


def test_coordinator_serve_exports_the_coordinators_own_counters() -> None:
    m = CoordinatorMetrics("c0")
    coordinator = _FakeCoordinator()
    server = m.serve(0, coordinator, addr="127.0.0.1")
    try:
        text = scrape(server.port)
        assert value(text, "moe2_coordinator_events_total", event="accepted") == 3
        assert value(text, "moe2_coordinator_events_total", event="rejected") == 1
        assert value(text, "moe2_coordinator_agents_online", coordinator="c0") == 2
        coordinator.counters["accepted"] = 4
        assert value(scrape(server.port), "moe2_coordinator_events_total",
                     event="accepted") == 4
    finally:
        server.shutdown()


def test_every_documented_metric_is_exported() -> None:
    names = exported_names()
    assert set(AGENT_METRICS) <= names
    for name in COORDINATOR_METRICS:
        assert name in names or f"{name}_count" in names, name


# --------------------------------------------------------------------------- dashboard


def _exprs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [e for v in node.values() for e in _exprs(v)]
    if isinstance(node, list):
        return [e for v in node for e in _exprs(v)]
    return []


def test_dashboard_queries_only_metrics_that_exist() -> None:
    dash = json.loads(DASHBOARD.read_text())
    exprs = _exprs(dash["panels"])
    assert exprs
    names = exported_names()
    used: set[str] = set()
    for expr in exprs:
        for metric in re.findall(r"\bmoe2_[a-z0-9_]+", expr):
            used.add(metric)
            assert metric in names, f"{metric} (in {expr!r}) is not exported"
    templ = json.dumps(dash["templating"])
    for metric in re.findall(r"\bmoe2_[a-z0-9_]+", templ):
        assert metric in names, metric


def test_dashboard_has_the_panels_an_operator_needs() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "moe2-fleet"
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    by_metric: dict[str, set[str]] = {}
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        for expr in _exprs(p):
            for metric in re.findall(r"\bmoe2_[a-z0-9_]+", expr):
                by_metric.setdefault(metric, set()).add(p["title"])
    for metric in ("moe2_agent_power_watts", "moe2_agent_energy_joules_total",
                   "moe2_agent_tokens_total", "moe2_agent_step_latency_seconds",
                   "moe2_coordinator_events_total", "moe2_coordinator_errors_total",
                   "moe2_coordinator_request_latency_seconds_bucket"):
        assert metric in by_metric, metric
    titles = {p["title"] for p in panels}
    assert {"Power (W)", "Tokens/s", "Joules per token", "Step latency (median)",
            "Request rate", "Request latency", "Errors"} <= titles
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "agent", "coordinator"} <= variables
