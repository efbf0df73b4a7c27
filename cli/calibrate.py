"""``moe2 calibrate``: teacher-forced answer probabilities of every expert -- the gate's
training data and the planner's loss table, in one file."""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from moe2.cli._common import emit_json, fail

HELP = "teacher-force your data through every expert (live agents, any GGUF) for train-gate"


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", help="the agents' broker: go through the live agents (the "
                   "production path; required with --data)")
    p.add_argument("--data", help="JSONL rows: {prompt|messages|question+choices, answer, app?}")
    p.add_argument("--validation-data", help="JSONL rows for the gate's early stopping "
                   "(default: hold out --validation-fraction of --data)")
    p.add_argument("--validation-fraction", type=float, default=0.2,
                   help="share of --data held out for validation (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    p.add_argument("--agents", type=_names, metavar="A,B",
                   help="the agents to calibrate (default: every online agent)")
    p.add_argument("--experts", help="instead of --data: a `moe2 make-experts` directory (its "
                   "calib and validation splits; through --broker, or from the GGUF files)")
    p.add_argument("--out", required=True, help="calibration file to write (JSON)")
    p.add_argument("--root", default="moe2", help="topic root of the agents")
    p.add_argument("--limit", type=int, help="at most this many rows per split")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def run(args: argparse.Namespace) -> int:
    try:
        from moe2.coordinator.calibration import save_calibration
        from moe2.tools.clients.agent_driver import UnknownAgentsError
        from moe2.tools.offline.calibrate import (
            CalibrationFailed,
            build_calibration_via_agents,
            resolve_agents,
            rows_from_samples,
        )
        from moe2.tools.offline.dataset import DataError, read_rows, split_validation
    except ImportError as exc:
        fail(f"calibrate needs the train extra: pip install 'moe2[train]' ({exc})")
    if (args.data is None) == (args.experts is None):
        fail("give --data FILE.jsonl (your data, through --broker) or --experts DIR")
    if args.data is not None and not args.broker:
        fail("--data calibrates through the live agents: give --broker URL")
    t0 = time.monotonic()
    try:
        if args.data is not None:
            rows = read_rows(args.data)
            if args.validation_data:
                splits = {"calib": rows, "validation": read_rows(args.validation_data)}
            else:
                calib, val = split_validation(rows, args.validation_fraction, args.seed)
                splits = {"calib": calib, "validation": val}
            fingerprint = None
        else:
            from moe2.tools.offline.corpus import read_jsonl
            from moe2.tools.offline.experts import load_manifest

            path = Path(args.experts)
            manifest = load_manifest(path / "manifest.json" if path.is_dir() else path)
            samples = {s: read_jsonl(manifest.split_path(s)) for s in ("calib", "validation")}
            splits = {s: rows_from_samples(v) for s, v in samples.items()}
            fingerprint = manifest.vocab_fingerprint
    except DataError as exc:
        fail(str(exc))
    except (OSError, ValueError, KeyError) as exc:
        fail(f"cannot read the experts manifest at {args.experts!r}: {exc}")
    if args.limit is not None:
        splits = {s: r[: args.limit] for s, r in splits.items()}
    if args.broker:
        try:
            wanted = args.agents or (
                [e.name for e in manifest.experts] if args.experts is not None else None)
            agents = asyncio.run(resolve_agents(args.broker, wanted, root=args.root))
            cal = build_calibration_via_agents(
                args.broker, agents, splits, root=args.root, vocab_fingerprint=fingerprint,
                progress=not args.json, extra={"data": args.data or args.experts})
        except UnknownAgentsError as exc:
            fail(str(exc))
        except CalibrationFailed as exc:
            fail(str(exc), code=1)
    else:
        from moe2.tools.offline.gate_data import build_calibration_from_gguf

        cal = build_calibration_from_gguf(manifest.expert_paths(), samples,
                                          vocab_fingerprint=fingerprint, progress=not args.json)
    save_calibration(args.out, cal)
    result = {"out": str(args.out), "experts": list(cal.experts),
              "samples": {s: len(r) for s, r in cal.splits.items()},
              "source": "agents" if args.broker else "gguf",
              "elapsed_s": round(time.monotonic() - t0, 2)}
    if args.json:
        emit_json(result)
    else:
        print(f"wrote {args.out}: {result['samples']} rows, experts "
              f"{', '.join(cal.experts)} ({result['source']})")
    return 0
