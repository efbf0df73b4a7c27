"""``moe2 eval``: accuracy of MoE2 vs Single Agent, Majority Voting and Average Expert, and
the budget grid, on the test split through the serving path (a fleet started for the run)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moe2.cli._common import emit_json, fail

HELP = "evaluate MoE2 against the paper's baselines through running agents and a coordinator"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experts", required=True, help="directory from `moe2 make-experts`")
    p.add_argument("--gate", required=True, help="gate from `moe2 train-gate`")
    p.add_argument("--calibration", required=True,
                   help="calibration file (its validation split drives the planner's loss)")
    p.add_argument("--out", default="eval-out", help="where eval.json/.md/.png go")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, help="at most this many prompts")
    p.add_argument("--quantized", action="store_true", help="serve the 4-bit GGUFs")
    p.add_argument("--json", action="store_true", help="print the eval JSON as the last line")


def run(args: argparse.Namespace) -> int:
    try:
        from moe2.coordinator.gating import GateLoadError, OnnxGate
        from moe2.tools.fleet.harness import Fleet
        from moe2.tools.offline import pipeline as pl
        from moe2.tools.offline.corpus import read_jsonl
        from moe2.tools.offline.evaluate import EvalSettings, run_evaluation, write_outputs
        from moe2.tools.offline.experts import load_manifest
        from moe2.tools.offline.gate_data import load_calibration
    except ImportError as exc:
        fail(f"eval needs the agent, coordinator and train extras ({exc})")
    try:
        manifest = load_manifest(Path(args.experts))
        gate = OnnxGate.load(args.gate)
        cal = load_calibration(args.calibration)
    except (OSError, ValueError, KeyError, GateLoadError) as exc:
        fail(str(exc))
    if args.split not in manifest.splits:
        fail(f"unknown split {args.split!r}; the manifest has {sorted(manifest.splits)}")
    names = [e.name for e in manifest.experts]
    if set(gate.experts) != set(names):
        fail(f"the gate knows {list(gate.experts)} but the experts are {names}")
    settings = pl.PipelineSettings(experts=len(names), quantized=args.quantized)
    samples = read_jsonl(manifest.split_path(args.split))[: args.limit]
    with Fleet(Path(args.out) / "fleet") as fleet:
        pl.start_agents(fleet, manifest, settings)
        pl.start_coordinator(fleet, Path(args.gate), names, overrides=True)
        result = run_evaluation(fleet.url, fleet.topics, names, samples,
                                gate_values=gate.values_batch, calibration=cal,
                                settings=EvalSettings(), progress=pl._say)
    result["files"] = write_outputs(result, args.out)
    if args.json:
        emit_json(result)
    else:
        sys.stdout.write(Path(result["files"]["markdown"]).read_text())
    return 0
