"""``moe2 calibrate``: teacher-forced answer probabilities of every expert, for the gate."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from moe2.cli._common import emit_json, fail

HELP = "teacher-force the splits through every expert (via agents or GGUF) for train-gate"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experts", required=True,
                   help="directory (or manifest.json) written by `moe2 make-experts`")
    p.add_argument("--out", required=True, help="calibration file to write (JSON)")
    p.add_argument("--broker", help="go through running agents on this broker (the production "
                   "path); agent ids must be the manifest's expert names")
    p.add_argument("--root", default="moe2", help="topic root of the agents")
    p.add_argument("--splits", default="calib,validation",
                   help="comma-separated splits to calibrate (default calib,validation)")
    p.add_argument("--limit", type=int, help="at most this many samples per split")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def run(args: argparse.Namespace) -> int:
    try:
        from moe2.tools.offline.calibrate import build_calibration_via_agents
        from moe2.tools.offline.corpus import read_jsonl
        from moe2.tools.offline.experts import load_manifest
        from moe2.tools.offline.gate_data import build_calibration_from_gguf, save_calibration
    except ImportError as exc:
        fail(f"calibrate needs the train extra: pip install 'moe2[train]' ({exc})")
    path = Path(args.experts)
    try:
        manifest = load_manifest(path / "manifest.json" if path.is_dir() else path)
    except (OSError, ValueError, KeyError) as exc:
        fail(f"cannot read the experts manifest at {str(path)!r}: {exc}")
    names = [s for s in args.splits.split(",") if s]
    unknown = [s for s in names if s not in manifest.splits]
    if unknown or not names:
        fail(f"unknown split(s) {unknown}; the manifest has {sorted(manifest.splits)}")
    splits = {s: read_jsonl(manifest.split_path(s))[: args.limit] for s in names}
    experts = manifest.expert_paths()
    t0 = time.monotonic()
    if args.broker:
        cal = build_calibration_via_agents(
            args.broker, experts, splits, root=args.root,
            vocab_fingerprint=manifest.vocab_fingerprint, progress=True)
    else:
        cal = build_calibration_from_gguf(experts, splits,
                                          vocab_fingerprint=manifest.vocab_fingerprint,
                                          progress=True)
    save_calibration(args.out, cal)
    result = {"out": str(args.out), "experts": list(cal.experts),
              "samples": {s: len(r) for s, r in cal.splits.items()},
              "source": "agents" if args.broker else "gguf",
              "elapsed_s": round(time.monotonic() - t0, 2)}
    if args.json:
        emit_json(result)
    else:
        print(f"wrote {args.out}: {result['samples']} samples from {result['source']}")
    return 0
