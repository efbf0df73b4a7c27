"""``moe2 eval``: MoE2 against each single expert, Majority Voting, the Average Expert and the
oracle, on your JSONL data, through the live agents (and the budget grid with a calibration)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from moe2.cli._common import emit_json, fail

HELP = "evaluate MoE2 against the paper's baselines and the oracle on your data, via the agents"


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", required=True, help="the agents' broker")
    p.add_argument("--gate", help="gate from `moe2 train-gate` (default: uniform weights)")
    p.add_argument("--data", required=True,
                   help="JSONL rows: {prompt|messages|question+choices, answer, app?}")
    p.add_argument("--agents", type=_names, metavar="A,B",
                   help="the experts to compare (default: the gate's, else every online agent)")
    p.add_argument("--calibration", help="calibration file: adds the paper's budget grid")
    p.add_argument("--root", default="moe2", help="topic root of the agents")
    p.add_argument("--max-tokens", type=int, default=12,
                   help="tokens generated per row (default 12; multiple choice: 1)")
    p.add_argument("--limit", type=int, help="at most this many rows")
    p.add_argument("--out", default="eval-out", help="where eval.json/.md/.png go")
    p.add_argument("--json", action="store_true", help="print the eval JSON as the last line")


def run(args: argparse.Namespace) -> int:
    try:
        from moe2.coordinator.calibration import CalibrationError, load_calibration
        from moe2.coordinator.gating import GateLoadError, load_gate
        from moe2.shared.topics import Topics
        from moe2.tools.clients.agent_driver import UnknownAgentsError
        from moe2.tools.offline.calibrate import resolve_agents
        from moe2.tools.offline.dataset import DataError, read_rows
        from moe2.tools.offline.evaluate import EvalSettings, run_evaluation, write_outputs
    except ImportError as exc:
        fail(f"eval needs the coordinator and train extras ({exc})")
    if args.max_tokens < 1:
        fail("--max-tokens must be at least 1")
    try:
        rows = read_rows(args.data)[: args.limit]
        gate = load_gate(args.gate)
        cal = load_calibration(args.calibration) if args.calibration else None
    except (DataError, CalibrationError) as exc:
        fail(str(exc))
    except (OSError, GateLoadError) as exc:
        fail(f"cannot load gate {args.gate!r}: {exc}")
    wanted = args.agents or (list(gate.experts) if gate.experts else None)
    try:
        agents = asyncio.run(resolve_agents(args.broker, wanted, root=args.root))
    except UnknownAgentsError as exc:
        fail(str(exc))
    if gate.experts and not set(agents) <= set(gate.experts):
        fail(f"the gate does not know {sorted(set(agents) - set(gate.experts))} "
             f"(it knows {', '.join(gate.experts)})")
    if cal is not None and not set(agents) <= set(cal.experts):
        fail(f"the calibration does not cover {sorted(set(agents) - set(cal.experts))}")

    def say(msg: str) -> None:
        if not args.json:
            sys.stderr.write(f"==> {msg}\n")

    result = run_evaluation(args.broker, Topics(args.root), agents, rows, gate=gate,
                            calibration=cal, settings=EvalSettings(max_tokens=args.max_tokens),
                            progress=say)
    result["data"] = str(args.data)
    result["files"] = write_outputs(result, args.out)
    if args.json:
        emit_json(result)
    else:
        sys.stdout.write(Path(result["files"]["markdown"]).read_text())
    return 0
