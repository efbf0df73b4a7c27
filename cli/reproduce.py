"""``moe2 reproduce``: the paper's claims, end to end, through the serving path."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moe2.cli._common import emit_json, fail, log_to_file

HELP = "make experts, serve them, calibrate, train the gate, evaluate (paper Fig. 3, Tables II-IV)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="work directory (reused when run again)")
    p.add_argument("--experts", type=int, default=4, help="number of experts K (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a reduced chain for CI (minutes)")
    p.add_argument("--quantized", action="store_true", help="serve the 4-bit GGUFs")
    p.add_argument("--limit", type=int, help="at most this many test prompts")
    p.add_argument("--gate-lr", type=float, default=1e-3,
                   help="gate learning rate (the paper's 1e-5 needs ~100x more epochs)")
    p.add_argument("--gate-epochs", type=int, default=400)
    p.add_argument("--tokenizers", default="spm", metavar="LIST",
                   help="each expert's tokenizer, cycled: spm (trained on the corpus, the "
                        "default), mixed (qwen2,llama-bpe,llama-spm) or a comma list of llama.cpp "
                        "vocabulary names (installed by scripts/install.sh)")
    p.add_argument("--json", action="store_true", help="print the eval JSON as the last line")


def run(args: argparse.Namespace) -> int:
    if args.experts < 2:
        fail("--experts must be at least 2")
    try:
        from moe2.tools.offline.pipeline import PipelineSettings, reproduce
        from moe2.tools.offline.real_tokenizers import parse_tokenizers
    except ImportError as exc:
        fail(f"reproduce needs the agent, coordinator and train extras ({exc})")
    try:
        tokenizers = parse_tokenizers(args.tokenizers)
    except (ValueError, OSError) as exc:
        fail(f"--tokenizers: {exc}")
    s = PipelineSettings(experts=args.experts, seed=args.seed, tiny=args.tiny,
                         quantized=args.quantized, eval_limit=args.limit,
                         calib_limit=60 if args.tiny else None, gate_lr=args.gate_lr,
                         gate_epochs=args.gate_epochs, tokenizers=tokenizers)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_to_file(args, out / "reproduce.log")
    result = reproduce(out, s)
    if args.json:
        emit_json(result)
    else:
        sys.stdout.write(Path(result["files"]["markdown"]).read_text())
    return 0
