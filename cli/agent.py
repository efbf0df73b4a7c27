"""``moe2 agent``: run the agent daemon for one GGUF expert."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from moe2.cli._common import add_daemon_arguments, fail, run_daemon, with_daemon_arguments
from moe2.shared.config import AgentConfig, ConfigError, MeterSection, load, override
from moe2.shared.topics import check_name

HELP = "serve one GGUF expert's next-token distributions over MQTT"
log = logging.getLogger("moe2.agent")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_daemon_arguments(p, "agent")
    p.add_argument("--id", help="this expert's name (a topic level)")
    p.add_argument("--model", help="the GGUF file to serve")
    p.add_argument("--n-ctx", type=int, help="context tokens per session")
    p.add_argument("--n-gpu-layers", type=int, help="layers to offload to the GPU (-1 = all)")
    p.add_argument("--threads", type=int, dest="n_threads", help="CPU threads for llama.cpp")
    p.add_argument("--max-sessions", type=int, help="sessions open at once")
    p.add_argument("--kv-type", choices=["f16", "f32", "q8_0"], help="KV cache type")
    p.add_argument("--meter", choices=["auto", "nvml", "ina3221", "tegrastats", "jtop", "rapl",
                                       "estimated"], help="energy meter (default auto)")
    p.add_argument("--estimated-watts", type=float, help="watts while busy, for the estimate")
    p.add_argument("--telemetry-interval", type=float, dest="telemetry_interval_s",
                   help="seconds between telemetry messages")
    p.add_argument("--speculate-min-p", type=float,
                   help="decode the likeliest next token while the coordinator decides, when "
                        "its probability is at least this (0 = off; default 0.1)")


def build_config(args: argparse.Namespace) -> AgentConfig:
    cfg = load(args.config, AgentConfig)
    cfg = with_daemon_arguments(
        cfg, args, id=args.id, model=args.model, n_ctx=args.n_ctx,
        n_gpu_layers=args.n_gpu_layers, n_threads=args.n_threads, max_sessions=args.max_sessions,
        kv_type=args.kv_type, telemetry_interval_s=args.telemetry_interval_s,
        speculate_min_p=args.speculate_min_p,
    )
    if args.meter or args.estimated_watts is not None:
        cfg = override(cfg, meter=override(cfg.meter, kind=args.meter,
                                           estimated_watts=args.estimated_watts))
    try:
        check_name("agent id", cfg.id or "?")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return cfg.validate()


def _meter_config(section: MeterSection) -> object:
    from moe2.agent.meters import MeterConfig

    return MeterConfig(kind=section.kind, estimated_watts=section.estimated_watts,
                       idle_watts=section.idle_watts, gpu_index=section.gpu_index,
                       rails=tuple(section.rails), sample_interval_s=section.sample_interval_s)


def device_kind(n_gpu_layers: int) -> str:
    """What the box is, for the status message: jetson, cuda, or cpu."""
    if os.path.exists("/etc/nv_tegra_release") or os.path.exists("/sys/module/tegra_fuse"):
        return "jetson"
    if n_gpu_layers != 0:
        try:
            import llama_cpp

            if llama_cpp.llama_supports_gpu_offload():
                return "cuda"
        except (ImportError, AttributeError):
            pass
    return "cpu"


def run(args: argparse.Namespace) -> int:
    from moe2.shared.mqtt import BrokerUrlError, TlsOptions, make_client, parse_broker_url

    try:
        cfg = build_config(args)
        url = parse_broker_url(cfg.broker)
    except (ConfigError, BrokerUrlError) as exc:
        fail(str(exc))
    try:
        from moe2.agent.daemon import AgentDaemon
        from moe2.agent.engine import EngineError, LlamaEngine
        from moe2.agent.meters import MeterConfig, MeterError, detect_meter
    except ImportError as exc:
        fail(f"the agent needs its extras: pip install 'moe2[agent]' ({exc})")
    try:
        engine = LlamaEngine(cfg.model, n_ctx=cfg.n_ctx, max_sessions=cfg.max_sessions,
                             n_gpu_layers=cfg.n_gpu_layers, n_threads=cfg.n_threads,
                             n_batch=cfg.n_batch, kv_type=cfg.kv_type, flash_attn=cfg.flash_attn)
    except EngineError as exc:
        fail(str(exc))
    mc = _meter_config(cfg.meter)
    assert isinstance(mc, MeterConfig)
    try:
        meter = detect_meter(mc)
    except MeterError as exc:
        fail(str(exc))
    tls = TlsOptions(cfg.tls.ca_file, cfg.tls.cert_file, cfg.tls.key_file, cfg.tls.insecure)

    def client_factory(will: object) -> object:
        return make_client(url, identifier=f"moe2-agent-{cfg.id}", will=will,  # type: ignore[arg-type]
                           tls=tls, keepalive_s=5)

    from moe2.shared.allocator import keep_freed_memory

    keep_freed_memory()  # per-token logits of a real vocabulary: no page faults per token
    daemon = AgentDaemon(cfg, engine, meter, client_factory,  # type: ignore[arg-type]
                         device=device_kind(cfg.n_gpu_layers))
    log.info("agent %s: model %s (%d params, vocab %d, fp %s), meter %s, broker %s", cfg.id,
             engine.info.name, engine.info.n_params, engine.info.n_vocab, engine.info.vocab_fp,
             meter.describe(), url.redacted())

    def start_metrics() -> Any:
        if cfg.metrics_port is None:
            return None
        from moe2.agent.metrics import serve_agent_metrics

        return serve_agent_metrics(daemon, cfg.metrics_port)

    from moe2.shared.mqtt import BrokerRefusedError

    with meter:
        try:
            code = run_daemon(daemon.run, daemon.request_stop, start_metrics)
        except BrokerRefusedError as exc:
            fail(f"agent {cfg.id}: {url.redacted()}: {exc}")
        finally:
            engine.close()
    return code
