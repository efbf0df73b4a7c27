"""Prometheus metrics of agents and coordinators, and the Grafana dashboard built on them."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from moe2.tools.fleet.localbroker import LocalBroker, free_port
from tests.agent_helpers import AgentRpcClient, wait_until
from tests.conftest import REPO, Procs, log_of

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



async def test_running_agent_serves_metrics_with_its_id(
    broker: LocalBroker, procs: Procs, tiny_model: Path,
) -> None:
    aid, port = "met0", free_port()
    agent = procs.moe2("agent", "--broker", broker.url, "--id", aid, "--model", str(tiny_model),
                       "--meter", "estimated", "--metrics-port", str(port), log_name="agent")
    async with AgentRpcClient(broker.url) as rpc:
        try:
            await rpc.wait_status(aid, timeout_s=90)
        except AssertionError:
            raise AssertionError(log_of(agent)) from None
        text = scrape(port)
        assert value(text, "moe2_agent_energy_joules_total", agent=aid,
                     meter="estimated") >= 0.0
        assert value(text, "moe2_agent_tokens_total", agent=aid) == 0
        # the daemon counts the session right after publishing "online"
        await wait_until(
            lambda: value(scrape(port), "moe2_agent_mqtt_connections_total", agent=aid) == 1,
            30.0, "the broker session to be counted")
        energy_before = value(text, "moe2_agent_energy_joules_total", agent=aid)
        await rpc.greedy(aid, "s1", k=4, n_steps=3, prompt="hi there")
        text = scrape(port)
        assert value(text, "moe2_agent_tokens_total", agent=aid) == 3
        assert value(text, "moe2_agent_open_sessions", agent=aid) == 1
        assert value(text, "moe2_agent_energy_joules_total", agent=aid) > energy_before
        assert value(text, "moe2_agent_evaluated_tokens_total", agent=aid) > 3
        assert value(text, "moe2_agent_step_latency_seconds", agent=aid) > 0
        await rpc.close_sessions(aid, ["s1"])
        await wait_until(lambda: value(scrape(port), "moe2_agent_open_sessions", agent=aid) == 0,
                         30.0, "the session to close")
