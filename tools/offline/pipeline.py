"""The whole MoE2 chain on one machine, through the serving path: what ``moe2 reproduce``,
``moe2 eval`` and ``moe2 demo`` run.

make experts -> start broker, agents (one per expert) -> calibrate through the agents ->
train and export the gate -> start a coordinator with the gate -> evaluate / ask -> shut down.

Agents emulate heterogeneous boxes on this one machine only through their *estimated* energy
meter (different configured watts, labelled ``estimated``); latency is whatever they measure.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Watts the estimated meter assumes per expert (cycled): a Jetson-class, a laptop-class, a
#: desktop-GPU-class and a server-class box, so the energy budget has something to choose.
EMULATED_WATTS = (15.0, 30.0, 60.0, 120.0)


@dataclass(frozen=True)
class PipelineSettings:
    experts: int = 4
    seed: int = 0
    tiny: bool = False
    quantized: bool = False
    gate_lr: float = 1e-3
    gate_epochs: int = 400
    eval_limit: int | None = None
    calib_limit: int | None = None
    max_tokens: int = 12
    kv_type: str = "f32"
    tokenizers: tuple[str, ...] = ("spm",)


def _say(msg: str) -> None:
    sys.stderr.write(f"==> {msg}\n")
    sys.stderr.flush()


def build_experts(out: Path, s: PipelineSettings, say: Callable[[str], None] = _say) -> Any:
    from moe2.tools.offline.experts import ExpertsConfig, load_manifest, make_experts

    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        try:
            m = load_manifest(manifest_path)
            if (len(m.experts) == s.experts and m.config.get("seed") == s.seed
                    and tuple(m.config.get("tokenizers", ("spm",))) == s.tokenizers
                    and all(p.is_file() for p in m.expert_paths().values())):
                say(f"reusing the experts in {out}")
                return m
        except (OSError, ValueError, KeyError):
            pass
    tokenizers = "" if s.tokenizers == ("spm",) else f", tokenizers {','.join(s.tokenizers)}"
    say(f"building {s.experts} experts in {out} (seed {s.seed}{tokenizers})")
    cfg = (ExpertsConfig.tiny(n_experts=s.experts, seed=s.seed, tokenizers=s.tokenizers)
           if s.tiny else ExpertsConfig(n_experts=s.experts, seed=s.seed,
                                        tokenizers=s.tokenizers))
    return make_experts(out, cfg, progress=True)


def start_agents(fleet: Any, manifest: Any, s: PipelineSettings) -> list[str]:
    names = []
    for i, (name, path) in enumerate(manifest.expert_paths(quantized=s.quantized).items()):
        fleet.start_agent(name, path, "--kv-type", s.kv_type, "--telemetry-interval", "0.5",
                          "--meter", "estimated", "--estimated-watts",
                          str(EMULATED_WATTS[i % len(EMULATED_WATTS)]),
                          "--max-sessions", "32", "--n-ctx", "256")
        names.append(name)
    asyncio.run(fleet.wait_statuses(names))
    return names


def calibrate(fleet: Any, manifest: Any, out: Path, s: PipelineSettings,
              say: Callable[[str], None] = _say) -> Any:
    from moe2.tools.offline.calibrate import build_calibration_via_agents, rows_from_samples
    from moe2.tools.offline.corpus import read_jsonl
    from moe2.tools.offline.gate_data import load_calibration, save_calibration

    path = out / "calibration-agents.json"
    if path.is_file():
        cal = load_calibration(path)
        if list(cal.experts) == [e.name for e in manifest.experts]:
            say(f"reusing {path}")
            return cal
    say("calibrating through the agents (teacher forcing, full distributions)")
    splits = {sp: rows_from_samples(read_jsonl(manifest.split_path(sp))[: s.calib_limit])
              for sp in ("calib", "validation")}
    cal = build_calibration_via_agents(fleet.url, [e.name for e in manifest.experts], splits,
                                       root=fleet.topics.root,
                                       vocab_fingerprint=manifest.vocab_fingerprint or None,
                                       progress=True)
    save_calibration(path, cal)
    return cal


def train_gate(cal: Any, out: Path, s: PipelineSettings,
               say: Callable[[str], None] = _say) -> Path:
    from moe2.tools.offline.gate_train import GateTrainConfig, export_gate_onnx
    from moe2.tools.offline.gate_train import train_gate as train

    path = out / "gate.onnx"
    if path.is_file() and (out / "gate.json").is_file():
        meta = json.loads((out / "gate.json").read_text())
        if meta.get("experts") == list(cal.experts) and meta.get("seed") == s.seed:
            say(f"reusing {path}")
            return path
    say("training the gate (paper Table VI network) and exporting it to ONNX")
    result = train(cal, GateTrainConfig(lr=s.gate_lr, epochs=s.gate_epochs, seed=s.seed))
    export_gate_onnx(result.mlp, list(cal.experts), path, training=result.summary())
    (out / "gate.json").write_text(json.dumps({"experts": list(cal.experts), "seed": s.seed,
                                               "training": result.summary()}, default=str))
    return path


def start_coordinator(fleet: Any, gate: Path, names: Sequence[str], *, overrides: bool) -> None:
    fleet.start_coordinator(
        "--gate", str(gate),
        config_text=(f"allow_overrides = {'true' if overrides else 'false'}\ndist_k = 0\n"
                     "max_concurrent_per_client = 64\nrate_per_client_per_s = 1000.0\n"))
    asyncio.run(fleet.wait_plan(names))


def reproduce(out_dir: str | Path, s: PipelineSettings,
              say: Callable[[str], None] = _say) -> dict[str, Any]:
    from moe2.coordinator.gating import OnnxGate
    from moe2.tools.fleet.harness import Fleet
    from moe2.tools.offline.calibrate import rows_from_samples
    from moe2.tools.offline.corpus import read_jsonl
    from moe2.tools.offline.evaluate import EvalSettings, run_evaluation, write_outputs

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    manifest = build_experts(out / "experts", s, say)
    with Fleet(out / "fleet") as fleet:
        say(f"broker on {fleet.url}; starting {len(manifest.experts)} agents")
        names = start_agents(fleet, manifest, s)
        cal = calibrate(fleet, manifest, out, s, say)
        gate_path = train_gate(cal, out, s, say)
        gate = OnnxGate.load(gate_path)
        test = rows_from_samples(read_jsonl(manifest.split_path("test"))[: s.eval_limit])
        say(f"evaluating on {len(test)} held-out test prompts through the serving path")
        result = run_evaluation(fleet.url, fleet.topics, names, test, gate=gate,
                                calibration=cal, settings=EvalSettings(max_tokens=s.max_tokens),
                                progress=say)
    result["seed"] = s.seed
    result["experts"] = s.experts
    result["total_s"] = time.monotonic() - t0
    result["files"] = write_outputs(result, out)
    return result
