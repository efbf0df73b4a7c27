"""``moe2 plan``: choose which experts may serve each application, from a problem file.

The problem file is JSON (units: seconds and joules per generated token)::

    {"experts": [{"name": "e0", "latency_s": 0.05, "energy_j": 1.2}, ...],
     "applications": [{"name": "chat", "max_latency_s": 0.08}, ...],
     "max_energy_j": 3.0,
     "calibration": {"gates": [[g_0, ..., g_{N-1}], ...],
                     "target_probs": [[p_0, ..., p_{N-1}], ...]}}

``calibration`` holds one row per calibration sample (token): the gate value of every expert
(> 0) and the probability each expert gave the reference token ([0, 1]), columns in the order
of ``experts``. Without it the planner uses its monotone prior loss. Unknown keys are errors.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moe2.cli._common import UsageError, emit_json, fail
from moe2.coordinator.planner import (
    DEFAULT_EPSILON,
    DEFAULT_MAX_EXPANSIONS,
    MAX_EXPERTS,
    METHODS,
    LossModel,
    LossTable,
    PlannerError,
    PlanResult,
    Problem,
    plan_all,
)

HELP = "Plan which experts serve each application under latency and energy budgets (SMO)."

_TOP_KEYS = {"experts", "applications", "max_energy_j", "calibration"}
_EXPERT_KEYS = {"name", "latency_s", "energy_j"}
_APP_KEYS = {"name", "max_latency_s"}
_CALIBRATION_KEYS = {"gates", "target_probs"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--problem",
        required=True,
        metavar="FILE",
        help="JSON: experts [{name, latency_s, energy_j}], applications [{name, max_latency_s}], "
        "max_energy_j, optional calibration {gates, target_probs} (samples x experts); "
        "seconds and joules per generated token",
    )
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="smo",
        help="smo (default), exact (branch and bound), exhaustive (N <= 20), greedy or random",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for --method random")
    parser.add_argument(
        "--epsilon",
        type=float,
        default=DEFAULT_EPSILON,
        help=f"SMO tolerance in nats per token (default {DEFAULT_EPSILON:g})",
    )
    parser.add_argument(
        "--max-expansions",
        type=int,
        default=DEFAULT_MAX_EXPANSIONS,
        metavar="N",
        help=f"SMO expansion cap (default {DEFAULT_MAX_EXPANSIONS})",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=None,
        metavar="S",
        help="seconds for the whole command, start-up and reading the problem included (smo "
        "and exact): past it each plan is the best set found, with its proven lower bound "
        "and gap (default: no limit)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object as the last stdout line"
    )


def _process_age_s() -> float:
    """Seconds since this process started (interpreter start-up and imports are part of what
    ``--time-limit`` promises): Linux's /proc, to 10 ms; 0 where unknown."""
    try:
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
        stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        age = uptime_s - int(stat[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0
    return age if 0.0 <= age < 60.0 else 0.0


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter() - _process_age_s()
    if not math.isfinite(args.epsilon) or args.epsilon < 0.0:
        fail("--epsilon must be a finite number >= 0")
    if args.max_expansions < 0:
        fail("--max-expansions must be >= 0")
    if args.time_limit is not None and not (math.isfinite(args.time_limit) and args.time_limit > 0):
        fail("--time-limit must be a number of seconds > 0")
    try:
        problem, source = load_problem(Path(args.problem))
        left = None
        if args.time_limit is not None:
            # what is left, less a margin for the last solve's start (greedy), the output and
            # the interpreter's exit
            margin_s = max(0.05, 0.1 * args.time_limit)
            left = max(0.0, args.time_limit - margin_s - (time.perf_counter() - t0))
        plans = plan_all(
            problem,
            args.method,
            seed=args.seed,
            epsilon=args.epsilon,
            max_expansions=args.max_expansions,
            time_limit_s=left,
        )
    except (UsageError, PlannerError) as exc:
        fail(str(exc))
    joint = plans["joint"]
    per_app = plans["per_application"]
    if args.json:
        emit_json(
            {
                **joint.to_dict(),
                "loss_model": source,
                "n_experts": problem.n_experts,
                "max_energy_j": problem.max_energy_j,
                "per_application": {app: res.to_dict() for app, res in per_app.items()},
                "time_limit_s": args.time_limit,
            }
        )
    else:
        _print_table(problem, args.method, source, joint, per_app)
    return 0


# ---------------------------------------------------------------------------------------------
# reading and validating the problem file


def load_problem(path: Path) -> tuple[Problem, str]:
    """Read and validate a problem file; returns the problem and the loss source
    ("calibration" or "prior"). Raises :class:`UsageError` with one clear line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read problem file {path}: {exc}") from None
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: invalid JSON: {exc}") from None
    except UsageError as exc:
        raise UsageError(f"{path}: {exc}") from None
    try:
        return parse_problem(doc)
    except UsageError as exc:
        raise UsageError(f"{path}: {exc}") from None


def _reject_constant(name: str) -> Any:
    raise UsageError(f"non-finite number {name} is not allowed")


def parse_problem(doc: object) -> tuple[Problem, str]:
    """Validate a decoded problem document (see the module docstring)."""
    top = _obj(doc, "problem", _TOP_KEYS, required={"experts", "applications", "max_energy_j"})
    experts = _list(top["experts"], "experts")
    if len(experts) > MAX_EXPERTS:
        raise UsageError(f"experts: at most {MAX_EXPERTS} experts, got {len(experts)}")
    names: list[str] = []
    latency: list[float] = []
    energy: list[float] = []
    for k, item in enumerate(experts):
        where = f"experts[{k}]"
        e = _obj(item, where, _EXPERT_KEYS)
        names.append(_name(e["name"], f"{where}.name"))
        latency.append(_number(e["latency_s"], f"{where}.latency_s"))
        energy.append(_number(e["energy_j"], f"{where}.energy_j"))
    _unique(names, "expert")
    apps: dict[str, float] = {}
    for k, item in enumerate(_list(top["applications"], "applications")):
        where = f"applications[{k}]"
        a = _obj(item, where, _APP_KEYS)
        name = _name(a["name"], f"{where}.name")
        if name in apps:
            raise UsageError(f"duplicate application name {name!r}")
        apps[name] = _number(a["max_latency_s"], f"{where}.max_latency_s")
    max_energy = _number(top["max_energy_j"], "max_energy_j")
    loss: LossModel
    if "calibration" in top:
        cal = _obj(top["calibration"], "calibration", _CALIBRATION_KEYS)
        gates = _matrix(cal["gates"], "calibration.gates", len(names))
        probs = _matrix(cal["target_probs"], "calibration.target_probs", len(names))
        if len(gates) != len(probs):
            raise UsageError(
                f"calibration: {len(gates)} rows of gates but {len(probs)} rows of target_probs"
            )
        for i, row in enumerate(gates):
            if any(g <= 0.0 for g in row):
                raise UsageError(f"calibration.gates[{i}]: gate values must be > 0")
        for i, row in enumerate(probs):
            if any(not 0.0 <= p <= 1.0 for p in row):
                raise UsageError(f"calibration.target_probs[{i}]: probabilities must be in [0, 1]")
        loss, source = LossTable(gates, probs), "calibration"
    else:
        loss, source = LossTable.prior(len(names)), "prior"
    try:
        problem = Problem.create(names, latency, energy, apps, max_energy, loss)
    except PlannerError as exc:
        raise UsageError(str(exc)) from None
    return problem, source


def _obj(
    value: object, where: str, allowed: set[str], required: set[str] | None = None
) -> Mapping[str, object]:
    if not isinstance(value, dict):
        raise UsageError(f"{where} must be an object")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}")
    missing = sorted((allowed if required is None else required) - set(value))
    if missing:
        raise UsageError(f"{where}: missing key(s) {', '.join(map(repr, missing))}")
    return value


def _list(value: object, where: str) -> list[object]:
    if not isinstance(value, list) or not value:
        raise UsageError(f"{where} must be a non-empty list")
    return value


def _name(value: object, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{where} must be a non-empty string")
    return value


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UsageError(f"{where} must be a number")
    out = float(value)
    if not math.isfinite(out) or out < 0.0:
        raise UsageError(f"{where} must be a finite number >= 0")
    return out


def _matrix(value: object, where: str, n_cols: int) -> list[list[float]]:
    rows = _list(value, where)
    out: list[list[float]] = []
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != n_cols:
            raise UsageError(f"{where}[{i}] must be a list of {n_cols} numbers (one per expert)")
        vals: list[float] = []
        for x in row:
            if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
                raise UsageError(f"{where}[{i}] must hold finite numbers only")
            vals.append(float(x))
        out.append(vals)
    return out


def _unique(names: list[str], what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise UsageError(f"duplicate {what} name {name!r}")
        seen.add(name)


# ---------------------------------------------------------------------------------------------
# human output


def _print_table(
    problem: Problem,
    method: str,
    source: str,
    joint: PlanResult,
    per_app: Mapping[str, PlanResult],
) -> None:
    print(
        f"moe2 plan: method {method}, loss from {source}, {problem.n_experts} experts, "
        f"energy budget {problem.max_energy_j:g} J/token"
    )
    header = (
        f"{'plan':<16} {'budget_s':>9} {'loss':>9} {'gap':>9} {'latency_s':>9} {'energy_j':>9} "
        f"{'evals':>7}  experts"
    )
    print(header)
    rows = [("(joint)", joint), *per_app.items()]
    for label, res in rows:
        if res.subset is None:
            cells = f"{'-':>9} {'-':>9} {'-':>9} {'-':>9} {res.evaluations:>7}  infeasible"
        else:
            flag = " (capped)" if res.capped else " (time limit)" if res.timed_out else ""
            gap = "-" if res.gap is None else f"{res.gap:.4f}"
            cells = (
                f"{res.loss:>9.4f} {gap:>9} {res.latency_s:>9.4f} {res.energy_j:>9.4f} "
                f"{res.evaluations:>7}  {', '.join(res.subset)}{flag}"
            )
        print(f"{label:<16} {res.max_latency_s:>9.4g} {cells}")
