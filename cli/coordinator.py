"""``moe2 coordinator``: gating, Top-k and token fusion, serving phones over MQTT 5."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from moe2.cli._common import add_daemon_arguments, fail, run_daemon, with_daemon_arguments
from moe2.shared.config import ConfigError, CoordinatorConfig, load, override
from moe2.shared.topics import check_name

HELP = "serve phones: gate, pick experts, fuse their next-token distributions"
log = logging.getLogger("moe2.coordinator")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_daemon_arguments(p, "coordinator")
    p.add_argument("--id", help="this coordinator's name (default 'coordinator')")
    p.add_argument("--gate", help="gate exported to ONNX by `moe2 train-gate`")
    p.add_argument("--calibration", help="the planner's loss data: the file `moe2 calibrate` "
                   "wrote (overrides [planner] calibration)")
    p.add_argument("--dist-k", type=int,
                   help="top tokens each expert returns per step (0 = the full vocabulary)")
    p.add_argument("--fusion", choices=["auto", "token", "text"],
                   help="auto (default): over token ids within a tokenizer family, over texts "
                        "across families; token: one family per request, experts of the others "
                        "listed as dropped; text: always over texts")
    p.add_argument("--top-k", type=int, help="experts fused per request (default: all in plan)")
    p.add_argument("--group", help="shared-subscription group (default 'coordinators')")
    p.add_argument("--fixed-gate", action="append", default=[], metavar="EXPERT=VALUE",
                   help="fixed gating value for an expert instead of a gate (repeatable)")


def build_config(args: argparse.Namespace) -> CoordinatorConfig:
    cfg = load(args.config, CoordinatorConfig)
    fixed: dict[str, float] | None = None
    if args.fixed_gate:
        fixed = {}
        for item in args.fixed_gate:
            name, sep, value = item.partition("=")
            try:
                fixed[name] = float(value)
            except ValueError:
                raise ConfigError(f"--fixed-gate {item!r}: expected EXPERT=NUMBER") from None
            if not sep or not name or not fixed[name] > 0:
                raise ConfigError(f"--fixed-gate {item!r}: expected EXPERT=POSITIVE_NUMBER")
    cfg = with_daemon_arguments(cfg, args, id=args.id, gate=args.gate, dist_k=args.dist_k,
                                top_k=args.top_k, group=args.group, fixed_gates=fixed,
                                fusion=args.fusion)
    if args.calibration:
        cfg = override(cfg, planner=override(cfg.planner, calibration=args.calibration))
    try:
        check_name("coordinator id", cfg.id)
        check_name("group", cfg.group)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return cfg.validate()


def load_gate(cfg: CoordinatorConfig) -> Any:
    from moe2.coordinator.gating import FixedGate, OnnxGate, UniformGate

    if cfg.fixed_gates:
        return FixedGate(dict(cfg.fixed_gates))
    if cfg.gate:
        return OnnxGate.load(cfg.gate)
    log.warning("no gate configured: every expert gets the same weight (uniform gating)")
    return UniformGate()


def run(args: argparse.Namespace) -> int:
    from moe2.shared.mqtt import BrokerUrlError, TlsOptions, make_client, parse_broker_url

    try:
        cfg = build_config(args)
        url = parse_broker_url(cfg.broker)
    except (ConfigError, BrokerUrlError) as exc:
        fail(str(exc))
    try:
        gate = load_gate(cfg)
    except ImportError as exc:
        fail(f"the coordinator needs its extras: pip install 'moe2[coordinator]' ({exc})")
    except (OSError, ValueError) as exc:
        fail(f"cannot load gate {cfg.gate!r}: {exc}")
    from moe2.coordinator.liveplan import LivePlanner
    from moe2.coordinator.service import Coordinator

    tls = TlsOptions(cfg.tls.ca_file, cfg.tls.cert_file, cfg.tls.key_file, cfg.tls.insecure)

    def client_factory(will: Any) -> Any:
        return make_client(url, identifier=f"moe2-coordinator-{cfg.id}", will=will, tls=tls,
                           keepalive_s=5, quickack=cfg.tcp_quickack)

    from moe2.coordinator.fleetcheck import fleet_warnings

    experts = tuple(getattr(gate, "experts", ()))

    def warnings(registry: Any) -> list[str]:
        return fleet_warnings(experts, cfg.unknown_expert_weight, registry, cfg.fusion)

    from moe2.coordinator.calibration import CalibrationError

    try:
        planner = (LivePlanner.from_config(cfg, warnings, gate) if cfg.planner.enabled
                   else None)
    except CalibrationError as exc:
        fail(str(exc))
    metrics = None
    if cfg.metrics_port is not None:
        from moe2.coordinator.metrics import CoordinatorMetrics

        metrics = CoordinatorMetrics(cfg.id)
    from moe2.shared.allocator import keep_freed_memory

    keep_freed_memory()  # full-vocabulary distributions every token: no page faults each time
    coordinator = Coordinator(cfg, gate, client_factory, planner=planner, metrics=metrics)

    def start_metrics() -> Any:
        if metrics is None or cfg.metrics_port is None:
            return None
        return metrics.serve(cfg.metrics_port, coordinator)

    log.info("coordinator %s: broker %s, gate %s", cfg.id, url.redacted(),
             getattr(gate, "kind", "?"))
    from moe2.shared.mqtt import BrokerRefusedError

    try:
        return run_daemon(coordinator.run, coordinator.request_stop, start_metrics)
    except BrokerRefusedError as exc:
        fail(f"coordinator {cfg.id}: {url.redacted()}: {exc}")
