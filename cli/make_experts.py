"""``moe2 make-experts``: build K domain experts (GGUF f32 + 4-bit) from a generated corpus."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from moe2.cli._common import emit_json, fail

HELP = "build K domain-expert GGUFs offline: corpus, MiniLM + k-means, base model, fine-tunes"
log = logging.getLogger("moe2.make_experts")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--experts", type=int, default=4, help="number of experts K (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of corpus, clustering and training")
    p.add_argument("--tiny", action="store_true",
                   help="tiny corpus, tiny models, few steps (CI; well under a minute)")
    p.add_argument("--base-steps", type=int, help="base-model training steps")
    p.add_argument("--finetune-steps", type=int, help="fine-tuning steps per expert")
    p.add_argument("--per-domain", type=int, help="prompts per domain in the corpus")
    p.add_argument("--quant", choices=["q4_0", "q4_k_m", "q8_0"],
                   help="llama.cpp quantisation of the 4-bit files (default q4_0)")
    p.add_argument("--threads", type=int, help="torch threads (default 1)")
    p.add_argument("--tokenizers", default="spm", metavar="LIST",
                   help="each expert's tokenizer, cycled: spm (trained on the corpus, the "
                        "default), mixed (qwen2,llama-bpe,llama-spm) or a comma list of llama.cpp "
                        "vocabulary names (installed by scripts/install.sh)")
    p.add_argument("--calibrate", action="store_true",
                   help="also write calibration.json (teacher forcing of the f32 experts on the "
                        "calib, validation and test splits, for moe2 train-gate)")
    p.add_argument("--eval", action="store_true",
                   help="also measure greedy exact-match accuracy on the validation split "
                        "(each expert, equal weights, oracle cluster routing)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def run(args: argparse.Namespace) -> int:
    if args.experts < 1:
        fail("--experts must be at least 1")
    for flag in ("base_steps", "finetune_steps", "per_domain", "threads"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag.endswith("steps") else 1):
            fail(f"--{flag.replace('_', '-')} is out of range: {value}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        fail(f"--out {out} exists and is not a directory")
    try:
        from moe2.tools.offline.experts import ExpertsConfig, make_experts
        from moe2.tools.offline.real_tokenizers import parse_tokenizers
    except ImportError as exc:
        fail(f"make-experts needs the training extras: pip install 'moe2[train]' ({exc})")
    try:
        tokenizers = parse_tokenizers(args.tokenizers)
    except (ValueError, OSError) as exc:
        fail(f"--tokenizers: {exc}")
    if len(set(tokenizers[:args.experts])) > 1 and (args.calibrate or args.eval):
        fail("--calibrate and --eval read the experts with one shared tokenizer; for experts "
             "of several tokenizers serve them and run `moe2 calibrate --broker URL` and "
             "`moe2 eval --broker URL` (or `moe2 reproduce --tokenizers ...`)")

    overrides: dict[str, Any] = {"n_experts": args.experts, "seed": args.seed,
                                 "tokenizers": tokenizers}
    for flag, key in (("base_steps", "base_steps"), ("finetune_steps", "finetune_steps"),
                      ("per_domain", "per_domain"), ("quant", "quant"), ("threads", "threads")):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    config = ExpertsConfig.tiny(**overrides) if args.tiny else ExpertsConfig(**overrides)
    logging.getLogger("gguf").setLevel(logging.WARNING)  # one INFO line per written file
    try:
        manifest = make_experts(out, config, progress=True)
    except (ValueError, RuntimeError, OSError) as exc:
        fail(str(exc))

    result: dict[str, Any] = {
        "out": str(out),
        "manifest": str(out / "manifest.json"),
        "experts": [
            {"name": e.name, "cluster": e.cluster, "gguf": str(out / e.gguf),
             "gguf_q4": str(out / e.gguf_q4), "quant": e.quant, "family_mix": e.family_mix,
             "train_samples": e.train_samples, "tokenizer": e.tokenizer,
             "n_vocab": e.n_vocab}
            for e in manifest.experts
        ],
        "vocab_fingerprint": manifest.vocab_fingerprint,
        "n_params": manifest.spec.n_params,
        "timings_s": manifest.timings_s,
    }
    if args.calibrate:
        from moe2.tools.offline.corpus import read_jsonl
        from moe2.tools.offline.gate_data import build_calibration_from_gguf, save_calibration

        splits = {name: read_jsonl(manifest.split_path(name))
                  for name in ("calib", "validation", "test")}
        cal = build_calibration_from_gguf(manifest.expert_paths(), splits,
                                          vocab_fingerprint=manifest.vocab_fingerprint,
                                          progress=True)
        save_calibration(out / "calibration.json", cal)
        result["calibration"] = str(out / "calibration.json")
    if args.eval:
        from moe2.tools.offline.corpus import read_jsonl
        from moe2.tools.offline.experts_eval import evaluate_experts

        samples = read_jsonl(manifest.split_path("validation"))
        result["eval"] = evaluate_experts(manifest.expert_paths(), samples,
                                          manifest.clusters["validation"], progress=True)

    if args.json:
        emit_json(result)
    else:
        _print_human(result)
    return 0


def _print_human(result: dict[str, Any]) -> None:
    print(f"wrote {len(result['experts'])} experts to {result['out']} "
          f"({result['n_params']:,} parameters each, {result['timings_s']['total']:.0f} s)")
    for e in result["experts"]:
        mix = ", ".join(f"{k} {v}" for k, v in e["family_mix"].items())
        print(f"  {e['name']}  cluster {e['cluster']} ({e['tokenizer']}, {e['n_vocab']:,} "
              f"tokens): {mix}")
        print(f"      {e['gguf']}  {e['gguf_q4']}")
    if "calibration" in result:
        print(f"calibration: {result['calibration']}")
    if "eval" in result:
        ev = result["eval"]
        print(f"validation accuracy ({ev['samples']} prompts, greedy exact match):")
        def fmt(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.3f}"

        for name, row in ev["experts"].items():
            print(f"  {name}: {fmt(row['accuracy'])} (own cluster {fmt(row['own_cluster'])}, "
                  f"others {fmt(row['other_clusters'])})")
        print(f"  equal weights: {ev['equal_weights']['all']:.3f}   "
              f"oracle routing: {ev['oracle_cluster']['all']:.3f}")
        fams = ", ".join(f"{k} {v:.2f}" for k, v in ev["oracle_cluster"].items() if k != "all")
        print(f"  oracle routing by family: {fams}")
