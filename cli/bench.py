"""``moe2 bench {agent,fusion,planner,reliability,gateway,speculation}``: measurements, side by
side in one run.

Each bench returns a plain dict (medians over repeated runs, ratios computed from figures taken
in the same run); this module only parses flags and prints. Figures go into BENCHMARKS.md
together with the command that produced them.
"""

from __future__ import annotations

import argparse
import importlib
import json
from typing import Any

from moe2.cli._common import emit_json, fail

HELP = "measure agent, fusion, planner, reliability and gateway figures (see BENCHMARKS.md)"

# bench name -> (module, function, help)
BENCHES: dict[str, tuple[str, str, str]] = {
    "agent": ("moe2.tools.bench.agent", "run_agent_bench",
              "tokens/s stepping through MQTT vs a direct llama-cpp-python loop"),
    "fusion": ("moe2.tools.bench.fusion", "run_fusion_bench",
               "fused step overhead vs bare MQTT round trip; fused tokens/s at 1/8/64 requests"),
    "planner": ("moe2.tools.bench.planner", "run_planner_bench_cli",
                "planner time and evaluations vs 2^N"),
    "speculation": ("moe2.tools.bench.speculation", "run_speculation_bench",
                    "how often agents' speculative decodes hit, by speculate_min_p"),
    "reliability": ("moe2.tools.bench.reliability", "run_reliability_bench",
                    "load, faults, broker restart, coordinator kill, fuzzing"),
    "gateway": ("moe2.tools.bench.gateway", "run_gateway_bench",
                "time to first token and tokens/s through the HTTP gateway vs direct MQTT at "
                "1 and 16 clients"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("which", choices=sorted(BENCHES), help="what to measure")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--quick", action="store_true", help="fewer repeats (for a smoke run)")
    p.add_argument("--out", help="work directory for generated models (default: a temp dir)")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    module_name, func_name, _help = BENCHES[args.which]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        fail(f"bench {args.which} is unavailable: {exc}")
    func = getattr(module, func_name)
    result: dict[str, Any] = func(quick=args.quick, out_dir=args.out, seed=args.seed)
    if args.json:
        emit_json(result)
    else:
        print(json.dumps(result, indent=2, default=str))
    return 0
