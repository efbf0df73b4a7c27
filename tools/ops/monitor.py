"""What ``moe2 monitor`` shows: a fleet snapshot built from status, telemetry and the plan.

Pure: :func:`event_for` turns one MQTT message into an event, :func:`apply` folds an event into a
:class:`MonitorState`, :func:`snapshot` is the JSON form and :func:`render` the rich table. The
CLI (:mod:`moe2.cli.monitor`) only subscribes, feeds messages in and draws.

Unlike the coordinator's registry, the monitor keeps agents that went offline (an operator wants
to see them) and forgets an agent only when its retained status is cleared.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from rich.console import Group, JustifyMethod, RenderableType
from rich.table import Table
from rich.text import Text

from moe2.shared import wire
from moe2.shared.topics import Topics

# --------------------------------------------------------------------------- state


@dataclass(frozen=True)
class AgentRow:
    agent_id: str
    status: wire.AgentStatus | None = None
    telemetry: wire.Telemetry | None = None
    #: wall-clock seconds (time.time()) when the latest telemetry arrived
    telemetry_at_s: float | None = None
    #: telemetry messages seen since the monitor started (telemetry is never retained)
    telemetry_count: int = 0

    @property
    def online(self) -> bool:
        if self.status is not None:
            return self.status.state == "online"
        return self.telemetry is not None  # telemetry before the retained status arrived


@dataclass(frozen=True)
class MonitorState:
    agents: Mapping[str, AgentRow] = field(default_factory=dict)
    plan: wire.PlanMsg | None = None
    coordinators: Mapping[str, wire.CoordinatorStatus] = field(default_factory=dict)


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class StatusSeen:
    status: wire.AgentStatus


@dataclass(frozen=True)
class StatusCleared:
    """An empty retained payload on an agent's status topic: the agent was removed."""

    agent_id: str


@dataclass(frozen=True)
class TelemetrySeen:
    telemetry: wire.Telemetry
    now_s: float  # wall clock (time.time()) at arrival, like PlanMsg.ts


@dataclass(frozen=True)
class PlanSeen:
    plan: wire.PlanMsg | None  # None: the retained plan was cleared


@dataclass(frozen=True)
class CoordinatorSeen:
    status: wire.CoordinatorStatus


Event = StatusSeen | StatusCleared | TelemetrySeen | PlanSeen | CoordinatorSeen


def subscriptions(topics: Topics) -> list[str]:
    """What the monitor subscribes to."""
    return [
        topics.all_agent_status,
        topics.all_agent_telemetry,
        topics.plan.topic,
        topics.all_coordinator_status,
    ]


def event_for(topics: Topics, topic: str, payload: bytes, now_s: float) -> Event | None:
    """The event one MQTT message means, or None (unrelated topic, malformed payload)."""
    if topic == topics.plan.topic:
        if not payload:
            return PlanSeen(None)
        try:
            return PlanSeen(topics.plan.decode(payload))
        except wire.DecodeError:
            return None
    agent_id = topics.agent_id_of(topic)
    if agent_id is not None:
        if topic == topics.agent_status(agent_id).topic:
            if not payload:
                return StatusCleared(agent_id)
            try:
                status = topics.agent_status(agent_id).decode(payload)
            except wire.DecodeError:
                return None
            return StatusSeen(status) if status.agent_id == agent_id else None
        if topic == topics.agent_telemetry(agent_id).topic:
            try:
                tel = topics.agent_telemetry(agent_id).decode(payload)
            except wire.DecodeError:
                return None
            return TelemetrySeen(tel, now_s) if tel.agent_id == agent_id else None
        return None
    if not payload:
        return None
    try:
        msg = wire.decode_as(payload, wire.CoordinatorStatus)
    except wire.DecodeError:
        return None
    if topic != topics.coordinator_status(msg.coordinator_id).topic:
        return None
    return CoordinatorSeen(msg)


def apply(state: MonitorState, event: Event) -> MonitorState:
    """The state after ``event`` (a new object; ``state`` is not changed)."""
    if isinstance(event, StatusSeen):
        aid = event.status.agent_id
        row = state.agents.get(aid) or AgentRow(aid)
        return replace(state, agents={**state.agents, aid: replace(row, status=event.status)})
    if isinstance(event, StatusCleared):
        agents = {k: v for k, v in state.agents.items() if k != event.agent_id}
        return replace(state, agents=agents)
    if isinstance(event, TelemetrySeen):
        aid = event.telemetry.agent_id
        row = state.agents.get(aid) or AgentRow(aid)
        row = replace(row, telemetry=event.telemetry, telemetry_at_s=event.now_s,
                      telemetry_count=row.telemetry_count + 1)
        return replace(state, agents={**state.agents, aid: row})
    if isinstance(event, PlanSeen):
        return replace(state, plan=event.plan)
    if isinstance(event, CoordinatorSeen):
        cid = event.status.coordinator_id
        return replace(state, coordinators={**state.coordinators, cid: event.status})
    raise TypeError(f"unknown monitor event {event!r}")


# --------------------------------------------------------------------------- queries


def plan_apps(plan: wire.PlanMsg | None) -> dict[str, list[str]]:
    """Agent id -> the plan entries naming it: application classes, and ``joint``."""
    out: dict[str, list[str]] = {}
    if plan is None:
        return out
    entries = [*sorted(plan.apps.items()), ("joint", plan.joint)]
    for app, entry in entries:
        for expert in entry.experts or []:
            apps = out.setdefault(expert, [])
            if app not in apps:
                apps.append(app)
    return out


def once_complete(state: MonitorState) -> bool:
    """``--once`` may stop: some agent is known and every online one has sent telemetry."""
    if not state.agents:
        return False
    return all(row.telemetry_count > 0 for row in state.agents.values() if row.online)


def agent_snapshot(row: AgentRow, in_plan_apps: list[str], now_s: float) -> dict[str, Any]:
    st, tel = row.status, row.telemetry
    return {
        "id": row.agent_id,
        "online": row.online,
        "model": st.model if st else None,
        "quant": st.quant if st else None,
        "device": st.device if st else None,
        "meter": tel.meter if tel else (st.meter if st else None),
        "power_w": tel.power_w if tel else None,
        "energy_j": tel.energy_j if tel else None,
        "joules_per_token": tel.joules_per_token if tel else None,
        "tokens_per_s": tel.tokens_per_s if tel else None,
        "tokens_total": tel.tokens_total if tel else None,
        "spec_hits": tel.spec_hits if tel else None,
        "spec_misses": tel.spec_misses if tel else None,
        "spec_wasted_j": tel.spec_wasted_j if tel else None,
        # share of speculative decodes the coordinator's next token confirmed
        "spec_hit_rate": (tel.spec_hits / (tel.spec_hits + tel.spec_misses)
                          if tel and tel.spec_hits + tel.spec_misses else None),
        "step_latency_s": tel.step_latency_s if tel else None,
        "open_sessions": tel.open_sessions if tel else None,
        "max_sessions": st.max_sessions if st else None,
        "temperature_c": tel.temperature_c if tel else None,
        "n_ctx": st.n_ctx if st else None,
        "vocab_fp": st.vocab_fp if st else None,
        "n_vocab": st.n_vocab if st else None,
        "version": st.version if st else None,
        "in_plan": bool(in_plan_apps),
        "plan_apps": list(in_plan_apps),
        "telemetry_age_s": (
            max(0.0, now_s - row.telemetry_at_s) if row.telemetry_at_s is not None else None
        ),
    }


def snapshot(state: MonitorState, now_s: float) -> dict[str, Any]:
    """The ``--json`` object: ``{"agents": [...], "plan": {...} | None, "coordinators": [...]}``."""
    members = plan_apps(state.plan)
    return {
        "agents": [
            agent_snapshot(row, members.get(aid, []), now_s)
            for aid, row in sorted(state.agents.items())
        ],
        "plan": wire.to_builtins(state.plan) if state.plan is not None else None,
        "coordinators": [
            {"id": c.coordinator_id, "state": c.state, "gate": c.gate, "version": c.version}
            for _cid, c in sorted(state.coordinators.items())
        ],
        "complete": once_complete(state),
    }


# --------------------------------------------------------------------------- rendering


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _energy(value_j: float | None) -> str:
    if value_j is None:
        return "-"
    if value_j >= 1e6:
        return f"{value_j / 3.6e6:.3f} kWh"
    return f"{value_j:.4g}"


def render(state: MonitorState, now_s: float, *, title: str = "moe2 fleet") -> RenderableType:
    """A rich table of every agent, with the plan and the coordinators underneath."""
    snap = snapshot(state, now_s)
    table = Table(title=title, expand=False, header_style="bold")
    columns: list[tuple[str, JustifyMethod]] = [
        ("agent", "left"), ("state", "left"), ("model", "left"), ("vocab", "left"),
        ("device", "left"),
        ("meter", "left"), ("power W", "right"), ("energy J", "right"), ("J/tok", "right"),
        ("tok/s", "right"), ("step ms", "right"), ("spec hit", "right"),
        ("sessions", "right"), ("plan", "left"),
        ("age s", "right"),
    ]
    id_width = min(32, max([5, *(len(a["id"]) for a in snap["agents"])]))
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=True,
                         min_width=id_width if name == "agent" else None)
    for a in snap["agents"]:
        state_text = Text("online", style="green") if a["online"] else Text("offline", "red")
        meter = a["meter"] or "-"
        sessions = "-" if a["open_sessions"] is None else (
            f"{a['open_sessions']}/{a['max_sessions']}" if a["max_sessions"] else
            str(a["open_sessions"]))
        step_ms = None if a["step_latency_s"] is None else a["step_latency_s"] * 1e3
        table.add_row(
            a["id"], state_text, a["model"] or "-", (a["vocab_fp"] or "-")[:8],
            a["device"] or "-",
            Text(meter, style="yellow") if meter == "estimated" else meter,
            _num(a["power_w"], ".1f"), _energy(a["energy_j"]),
            _num(a["joules_per_token"], ".3g"), _num(a["tokens_per_s"], ".1f"),
            _num(step_ms, ".2f"),
            "-" if a["spec_hit_rate"] is None else f"{100 * a['spec_hit_rate']:.0f}%",
            sessions,
            Text(",".join(a["plan_apps"]), style="cyan") if a["plan_apps"] else Text("-", "dim"),
            _num(a["telemetry_age_s"], ".1f"),
        )
    lines: list[RenderableType] = [table]
    plan = state.plan
    if plan is None:
        lines.append(Text("plan: none published yet", style="dim"))
    else:
        age = max(0.0, now_s - plan.ts) if plan.ts else None
        parts = [f"{app}=[{', '.join(e.experts or []) or 'infeasible'}]"
                 for app, e in sorted(plan.apps.items())]
        parts.append(f"joint=[{', '.join(plan.joint.experts or []) or 'infeasible'}]")
        budget = "unlimited" if plan.max_energy_j is None else f"{plan.max_energy_j:g} J/token"
        lines.append(Text(
            f"plan by {plan.coordinator_id} ({plan.method}, energy budget {budget}, "
            f"step overhead {plan.step_overhead_s * 1e3:.1f} ms"
            + (f", {age:.0f}s old" if age is not None else "") + "): " + "  ".join(parts)
        ))
        if len(plan.families) > 1:
            lines.append(Text("tokenizer families: " + "  ".join(
                f"{fp[:8]}=[{', '.join(m)}]" for fp, m in sorted(plan.families.items()))))
        lines += [Text(f"warning: {w}", style="bold red") for w in plan.warnings]
    if state.coordinators:
        lines.append(Text("coordinators: " + ", ".join(
            f"{c.coordinator_id} {c.state} (gate {c.gate})"
            for _cid, c in sorted(state.coordinators.items()))))
    return Group(*lines)
