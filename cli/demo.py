"""``moe2 demo``: the whole system on this machine, in one command.

Starts a private mosquitto on a free loopback port, builds (or reuses) a demo fleet of domain
experts and a gate, starts one agent per expert and a coordinator, asks a few prompts like a
phone, prints the fused answers with the energy and experts used, and shuts everything down.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

from moe2.cli._common import emit_json, fail, log_to_file

HELP = "run a whole MoE2 fleet on this machine and ask it a few questions"


def _default_workdir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "moe2", "demo")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default=_default_workdir(),
                   help="where the demo experts and gate are built and reused "
                        "(default ~/.cache/moe2/demo)")
    p.add_argument("--experts", type=int, default=4, help="number of experts (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", type=int, default=6, help="how many test prompts to ask")
    p.add_argument("--fresh", action="store_true", help="rebuild experts and gate")
    p.add_argument("--tiny", action="store_true",
                   help="smoke-test size: tiny experts that answer badly, in seconds")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def run(args: argparse.Namespace) -> int:
    try:
        from moe2.shared import wire
        from moe2.shared.mqtt import make_client, parse_broker_url
        from moe2.tools.clients.phone import PhoneClient
        from moe2.tools.fleet.harness import Fleet, FleetError
        from moe2.tools.fleet.localbroker import BrokerError, find_mosquitto
        from moe2.tools.offline import pipeline as pl
        from moe2.tools.offline.corpus import read_jsonl
    except ImportError as exc:
        fail(f"the demo needs moe2[agent,coordinator,train] installed ({exc})")
    try:
        find_mosquitto()
    except BrokerError as exc:
        fail(str(exc))
    if args.experts < 2:
        fail("--experts must be at least 2")
    work = Path(args.workdir)
    if args.fresh and work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    log_to_file(args, work / "demo.log")
    t0 = time.monotonic()
    say = pl._say
    # A demo-sized fleet: fewer training steps than `moe2 reproduce`, same recipe.
    settings = pl.PipelineSettings(experts=args.experts, seed=args.seed,
                                   calib_limit=40 if args.tiny else 160,
                                   gate_epochs=40 if args.tiny else 300)
    from moe2.tools.offline.experts import ExpertsConfig, load_manifest, make_experts

    manifest_path = work / "experts" / "manifest.json"
    manifest = None
    if manifest_path.is_file():
        try:
            manifest = load_manifest(manifest_path)
            if len(manifest.experts) != args.experts or manifest.config.get("seed") != args.seed \
                    or not all(
                    p.is_file() for p in manifest.expert_paths().values()):
                manifest = None
        except (OSError, ValueError, KeyError):
            manifest = None
    if manifest is None:
        say(f"building {args.experts} demo experts in {work / 'experts'} (once; reused later)")
        cfg = (ExpertsConfig.tiny(n_experts=args.experts, seed=args.seed) if args.tiny else
               ExpertsConfig(n_experts=args.experts, seed=args.seed, per_domain=240,
                             base_steps=200, finetune_steps=300))
        manifest = make_experts(work / "experts", cfg, progress=True)
    else:
        say(f"reusing the demo experts in {work / 'experts'}")
    answers: list[dict[str, Any]] = []
    try:
        with Fleet(work / "fleet") as fleet:
            say(f"private broker on {fleet.url}")
            names = pl.start_agents(fleet, manifest, settings)
            say(f"{len(names)} agents online: {', '.join(names)}")
            cal = pl.calibrate(fleet, manifest, work, settings, say)
            gate = pl.train_gate(cal, work, settings, say)
            pl.start_coordinator(fleet, gate, names, overrides=False)
            say("coordinator online with the learned gate; asking like a phone would\n")
            test = read_jsonl(manifest.split_path("test"))
            # one prompt from each family first, then more
            firsts: dict[str, Any] = {}
            for s in test:
                firsts.setdefault(s.family, s)
            picked = list(firsts.values())
            picked = (picked + [s for s in test if s not in picked])[: args.prompts]

            async def ask_all() -> None:
                async with make_client(parse_broker_url(fleet.url), identifier="demo-phone") as c, \
                        PhoneClient(c, "demo-phone", topics=fleet.topics) as phone:
                    for s in picked:
                        ans = await phone.ask(wire.PhoneRequest(prompt=s.prompt, max_tokens=16,
                                                                raw=True))
                        answers.append(_show(s, ans, args.json))

            asyncio.run(ask_all())
            say("shutting down the coordinator, agents and broker")
    except FleetError as exc:
        fail(str(exc), code=1)
    correct = sum(1 for a in answers if a["correct"])
    say(f"done in {time.monotonic() - t0:.0f} s: {correct}/{len(answers)} answers correct")
    if args.json:
        emit_json({"answers": answers, "correct": correct, "asked": len(answers),
                   "elapsed_s": time.monotonic() - t0, "workdir": str(work)})
    return 0


def _show(sample: Any, ans: Any, quiet: bool) -> dict[str, Any]:
    if ans.final is None:
        err = ans.error
        line = {"prompt": sample.prompt, "error": f"{err.code.value}: {err.message}",
                "correct": False}
        if not quiet:
            sys.stdout.write(f"{sample.prompt}\n   error: {line['error']}\n")
        return line
    f = ans.final
    used = sorted(f.experts, key=lambda e: -e.weight)
    text = f.text.strip()
    ok = text == sample.answer
    if not quiet:
        experts = ", ".join(f"{e.id} {e.weight:.2f}" for e in used if e.weight >= 0.01)
        sys.stdout.write(
            f"{sample.prompt}\n   -> {text!r} "
            f"{'(correct)' if ok else f'(expected {sample.answer!r})'}"
            f"\n      experts (gate weight): {experts}\n"
            f"      {f.tokens} tokens, {f.latency_s * 1e3:.0f} ms, {f.energy_j:.4f} J "
            "(estimated meter)\n")
        sys.stdout.flush()
    return {"prompt": sample.prompt, "answer": text, "expected": sample.answer, "correct": ok,
            "tokens": f.tokens, "latency_s": f.latency_s, "energy_j": f.energy_j,
            "experts": [{"id": e.id, "weight": e.weight, "energy_j": e.energy_j}
                        for e in used]}
