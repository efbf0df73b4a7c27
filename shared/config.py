"""Configuration files (TOML) for the agent and the coordinator.

Configs are frozen, strict structs: an unknown key or a wrong type is a :class:`ConfigError` with
one clear line (the CLI exits with code 2). The command line wins over the file: CLI modules
apply their flags with :func:`override`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec

T = TypeVar("T", bound=msgspec.Struct)


class ConfigError(ValueError):
    """A configuration that cannot be used; the message is one line meant for the operator."""


class _Cfg(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class TlsSection(_Cfg, frozen=True, forbid_unknown_fields=True, kw_only=True):
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False


class MeterSection(_Cfg, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Which energy meter an agent uses. ``auto`` probes NVML, INA3221, tegrastats, RAPL,
    then falls back to an estimate (labelled ``estimated``) of ``estimated_watts`` while busy."""

    kind: Literal["auto", "nvml", "ina3221", "tegrastats", "jtop", "rapl", "estimated"] = "auto"
    estimated_watts: float = 10.0
    idle_watts: float = 0.0
    gpu_index: int = 0
    rails: list[str] = []
    sample_interval_s: float = 0.1


#: default of ``speculate_min_p`` (see BENCHMARKS.md, "Speculative next step")
SPECULATE_MIN_P = 0.1


class AgentConfig(_Cfg, frozen=True, forbid_unknown_fields=True, kw_only=True):
    id: str = ""
    model: str = ""
    broker: str = "mqtt://127.0.0.1:1883"
    root: str = "moe2"
    n_ctx: int = 2048
    n_gpu_layers: int = 0
    n_threads: int | None = None
    n_batch: int = 512
    #: KV cache element type: f16 (llama.cpp's default), f32 (exact) or q8_0 (small)
    kv_type: Literal["f16", "f32", "q8_0"] = "f16"
    flash_attn: bool = False
    max_sessions: int = 16
    max_prompt_tokens: int | None = None
    idle_timeout_s: float = 300.0
    telemetry_interval_s: float = 2.0
    max_k: int = 4096
    device: str = "auto"
    metrics_port: int | None = None
    drain_timeout_s: float = 5.0
    #: speculate on the next token (agent/speculation.py) when the expert's own top
    #: probability is at least this; 0 turns speculation off
    speculate_min_p: float = SPECULATE_MIN_P
    meter: MeterSection = MeterSection()
    tls: TlsSection = TlsSection()

    def validate(self) -> AgentConfig:
        if not self.id:
            raise ConfigError("agent id is required (--id NAME or id = \"...\" in the config)")
        if not self.model:
            raise ConfigError("model is required (--model FILE.gguf or model = \"...\")")
        if not os.path.isfile(self.model):
            raise ConfigError(f"model file {self.model!r} does not exist")
        _positive("n_ctx", self.n_ctx)
        _positive("max_sessions", self.max_sessions)
        _positive("n_batch", self.n_batch)
        _positive("telemetry_interval_s", self.telemetry_interval_s)
        _positive("idle_timeout_s", self.idle_timeout_s)
        if self.max_prompt_tokens is not None:
            _positive("max_prompt_tokens", self.max_prompt_tokens)
        if not 0.0 <= self.speculate_min_p <= 1.0:
            raise ConfigError(f"speculate_min_p must be in [0, 1] (0 = off), got "
                              f"{self.speculate_min_p}")
        return self


class AppSection(_Cfg, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """An application class: its latency budget in seconds per generated token (paper eq. 8)."""

    max_latency_s: float = 1.0
    top_k: int | None = None


class PlannerSection(_Cfg, frozen=True, forbid_unknown_fields=True, kw_only=True):
    method: Literal["smo", "exact", "exhaustive", "greedy", "random"] = "smo"
    #: energy budget in joules per generated token (paper eq. 11); None = unlimited
    max_energy_j: float | None = None
    #: a per-request joule budget, converted to J/token with expected_tokens
    max_request_energy_j: float | None = None
    expected_tokens: int = 64
    interval_s: float = 10.0
    change_fraction: float = 0.2
    calibration: str | None = None
    epsilon: float = 1e-6
    enabled: bool = True
    #: seconds a fused step adds to its slowest expert's decode (MQTT both ways, the agents'
    #: and the coordinator's message handling; the "+ network" of paper eq. 4-8), added to
    #: every set's latency; None = measured from the steps this coordinator serves
    step_overhead_s: float | None = None
    #: seconds one replan may take (all applications together); past it the planner keeps the
    #: best sets found (``exact``: with their proven gap). Well below ``interval_s``: planning
    #: runs in a worker thread beside the requests. None = no limit
    time_limit_s: float | None = 1.0


class CoordinatorConfig(_Cfg, frozen=True, forbid_unknown_fields=True, kw_only=True):
    id: str = "coordinator"
    broker: str = "mqtt://127.0.0.1:1883"
    root: str = "moe2"
    group: str = "coordinators"
    gate: str | None = None
    #: fixed gating values per expert instead of an ONNX gate (tests, manual routing)
    fixed_gates: dict[str, float] = {}
    #: top tokens per expert per step; 0 = the full vocabulary (exact fusion within one
    #: family; fusion across families looks at 64 per family at most and asks for 64)
    dist_k: int = 64
    #: acknowledge the broker's packets at once (Linux TCP_QUICKACK): no 40 ms stall per fused
    #: token on a broker with Nagle's algorithm on (see shared.mqtt.make_client)
    tcp_quickack: bool = True
    top_k: int | None = None
    #: "auto": exact over ids within a vocabulary family, over texts across families;
    #: "token": one family per request (the others listed as dropped); "text": always texts
    fusion: Literal["auto", "token", "text"] = "auto"
    unknown_expert_weight: float = 0.0
    #: let requests pick experts / uniform weights (``moe2 eval`` only; off in production)
    allow_overrides: bool = False
    #: a private coordinator (``moe2 eval``): takes no phone requests and leaves no retained
    #: status behind when it stops
    ephemeral: bool = False
    step_deadline_min_s: float = 2.0
    step_deadline_factor: float = 20.0
    #: the deadline never exceeds this, whatever step latency an agent reports
    step_deadline_max_s: float = 30.0
    open_deadline_s: float = 30.0
    drain_timeout_s: float = 10.0
    max_concurrent: int = 256
    max_concurrent_per_client: int = 16
    rate_per_client_per_s: float = 50.0
    max_prompt_chars: int = 16384
    max_tokens_limit: int = 1024
    metrics_port: int | None = None
    #: exactly one answer per request when requests reach several brokers (bridged Mosquittos,
    #: see moe2.coordinator.once): the broker node this coordinator takes requests from.
    #: Coordinators on one broker -- or on one clustered broker, whichever of its nodes they
    #: connect to -- must name the same node; "" = the broker URL's host:port
    node: str = ""
    #: a copy of a request whose node is not first in the ranking waits this long per rank for
    #: a claim from the first before it is served here (the cost of a lost copy, never of a
    #: normal request)
    fallback_s: float = 0.3
    #: how long a claim is remembered (a copy arriving later is served again): also its MQTT
    #: Message Expiry; phones' requests should expire sooner
    claim_ttl_s: float = 120.0
    #: how often a coordinator says which node it is on (peers expire after 3 missed ones;
    #: at most 10 s)
    heartbeat_s: float = 1.0
    apps: dict[str, AppSection] = {}
    planner: PlannerSection = PlannerSection()
    tls: TlsSection = TlsSection()

    def validate(self) -> CoordinatorConfig:
        if self.dist_k < 0:
            raise ConfigError("dist_k must be >= 0 (0 = the full vocabulary)")
        if self.top_k is not None:
            _positive("top_k", self.top_k)
        if self.gate is not None and not os.path.isfile(self.gate):
            raise ConfigError(f"gate file {self.gate!r} does not exist")
        _positive("max_concurrent", self.max_concurrent)
        _positive("max_tokens_limit", self.max_tokens_limit)
        for name, app in self.apps.items():
            _positive(f"apps.{name}.max_latency_s", app.max_latency_s)
        if not self.step_deadline_min_s <= self.step_deadline_max_s:
            raise ConfigError("step_deadline_max_s must be >= step_deadline_min_s")
        cal = self.planner.calibration
        if cal is not None and not os.path.isfile(cal):
            raise ConfigError(f"planner calibration file {cal!r} does not exist")
        for name in ("fallback_s", "claim_ttl_s", "heartbeat_s"):
            value = getattr(self, name)
            _positive(name, value)
            if not math.isfinite(value):
                raise ConfigError(f"{name} must be finite, got {value!r}")
        if self.heartbeat_s > 10:
            raise ConfigError("heartbeat_s must be at most 10 (peers believe no longer period)")
        if len(self.node) > 255 or any(ord(c) < 0x20 or c in "+#/" for c in self.node):
            raise ConfigError("node must be at most 255 characters, without '/', '+', '#' or "
                              "control characters")
        overhead = self.planner.step_overhead_s
        if overhead is not None and not (overhead >= 0 and math.isfinite(overhead)):
            raise ConfigError("planner.step_overhead_s must be a finite number >= 0 "
                              "(or left out: measured)")
        limit = self.planner.time_limit_s
        if limit is not None and not (limit > 0 and math.isfinite(limit)):
            raise ConfigError("planner.time_limit_s must be a finite number of seconds > 0")
        return self


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}")


def load(path: str | os.PathLike[str] | None, kind: type[T]) -> T:
    """Read a TOML file into ``kind`` (defaults when ``path`` is None)."""
    if path is None:
        return kind()
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config {str(p)!r}: {exc.strerror or exc}") from None
    try:
        return msgspec.toml.decode(data, type=kind)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"config {str(p)!r}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"config {str(p)!r} is not valid TOML: {exc}") from None


def override(cfg: T, **changes: Any) -> T:
    """Apply command-line values (None means "not given on the command line")."""
    given = {k: v for k, v in changes.items() if v is not None}
    try:
        return msgspec.structs.replace(cfg, **given)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
