"""``moe2 train-gate``: train the gating network on a calibration file and export it to ONNX."""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any

from moe2.cli._common import emit_json, fail

HELP = "train the gating network (Algorithm 1, eq. 13-15) and export one ONNX file"
log = logging.getLogger("moe2.train_gate")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibration", required=True,
                   help="calibration JSON (moe2 calibrate or make-experts --calibrate)")
    p.add_argument("--out", required=True, help="the gate file to write (.onnx)")
    p.add_argument("--hidden", type=int, default=128, help="hidden width (default 128)")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout (default 0.1)")
    p.add_argument("--lr", type=float, default=1e-5,
                   help="AdamW learning rate (paper default 1e-5; small data wants ~1e-3)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--epochs", type=int, default=1000, help="maximum epochs (default 1000)")
    p.add_argument("--patience", type=int, default=100,
                   help="early stopping: epochs without validation improvement (default 100)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size (default 8)")
    p.add_argument("--grad-accum", type=int, default=8, help="accumulation steps (default 8)")
    p.add_argument("--lr-factor", type=float, default=0.8, help="ReduceLROnPlateau factor")
    p.add_argument("--lr-patience", type=int, default=50, help="ReduceLROnPlateau patience")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--train-split", default="calib", help="split to train on (default calib)")
    p.add_argument("--val-split", default="validation",
                   help="split for early stopping (default validation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip comparing onnxruntime with torch after the export")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def _check(args: argparse.Namespace) -> None:
    positive = {"hidden": args.hidden, "epochs": args.epochs, "patience": args.patience,
                "batch-size": args.batch_size, "grad-accum": args.grad_accum,
                "lr-patience": args.lr_patience, "threads": args.threads}
    for name, value in positive.items():
        if value < 1:
            fail(f"--{name} must be at least 1 (got {value})")
    if not (math.isfinite(args.lr) and args.lr > 0):
        fail(f"--lr must be positive (got {args.lr})")
    if not 0.0 <= args.dropout < 1.0:
        fail(f"--dropout must be in [0, 1) (got {args.dropout})")
    if not 0.0 < args.lr_factor < 1.0:
        fail(f"--lr-factor must be in (0, 1) (got {args.lr_factor})")
    if not (math.isfinite(args.grad_clip) and args.grad_clip > 0):
        fail(f"--grad-clip must be positive (got {args.grad_clip})")
    if not Path(args.calibration).is_file():
        fail(f"--calibration {args.calibration}: no such file")
    out = Path(args.out)
    if out.is_dir():
        fail(f"--out {out} is a directory")
    if not out.parent.exists():
        fail(f"--out {out}: directory {out.parent} does not exist")


def run(args: argparse.Namespace) -> int:
    _check(args)
    try:
        from moe2.tools.offline.gate_train import (
            GateTrainConfig,
            export_gate_onnx,
            load_calibration,
            train_gate,
        )
    except ImportError as exc:
        fail(f"train-gate needs the training extras: pip install 'moe2[train]' ({exc})")
    try:
        cal = load_calibration(args.calibration)
        config = GateTrainConfig(
            hidden=args.hidden, dropout=args.dropout, lr=args.lr, weight_decay=args.weight_decay,
            epochs=args.epochs, patience=args.patience, batch_size=args.batch_size,
            grad_accum=args.grad_accum, lr_factor=args.lr_factor, lr_patience=args.lr_patience,
            grad_clip=args.grad_clip, seed=args.seed, train_split=args.train_split,
            val_split=args.val_split, threads=args.threads,
        )
        result = train_gate(cal, config, progress=True)
    except ValueError as exc:
        fail(str(exc))
    summary = result.summary()
    model = export_gate_onnx(result.mlp, cal.experts, args.out, training=summary)
    out: dict[str, Any] = {"out": str(args.out), **summary}
    if not args.no_verify:
        out["onnx_max_abs_diff"] = _verify(model, args.out, cal, args.val_split)
    if args.json:
        emit_json(out)
    else:
        print(f"wrote {args.out}: {len(cal.experts)} experts, best epoch {result.best_epoch} "
              f"of {result.epochs_run}")
        print(f"validation loss {result.val_loss:.4f} (equal weights {result.val_loss_uniform:.4f})"
              f", routing accuracy {result.val_routing_accuracy:.3f}")
        if "onnx_max_abs_diff" in out:
            print(f"onnxruntime vs torch: max abs diff {out['onnx_max_abs_diff']:.2e}")
    return 0


def _verify(model: Any, path: str, cal: Any, split: str) -> float:
    """Max |onnxruntime - torch| over a few prompts of ``split``."""
    import numpy as np
    import torch

    from moe2.coordinator.gating import OnnxGate
    from moe2.tools.offline.embed import encode_batch, load_tokenizer

    texts = [r.prompt for r in cal.splits[split][:8]] or ["hello"]
    gate = OnnxGate.load(path)
    got = np.array([[v[n] for n in gate.experts] for v in gate.values_batch(texts)])
    ids, mask = encode_batch(load_tokenizer(max_length=gate.max_length), texts)
    with torch.no_grad():
        want = model(ids, mask).numpy()
    diff = float(np.abs(got - want).max())
    if diff > 1e-4:
        log.warning("onnxruntime and torch differ by %.2e", diff)
    return diff
