"""Gating network: calibration data, loss (eq. 13-15), training, ONNX export, runtime gates."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import llama_cpp  # noqa: F401 - the train extra must be installed
import numpy as np
import onnx
import pytest
import torch

from moe2.coordinator.gating import (
    FixedGate,
    Gate,
    GateLoadError,
    OnnxGate,
    UniformGate,
    load_gate,
    values_for,
)
from moe2.tools.offline.corpus import read_jsonl
from moe2.tools.offline.gate_data import (
    Calibration,
    CalibrationRecord,
    compute_calibration_from_gguf,
    load_calibration,
    save_calibration,
)
from moe2.tools.offline.gate_train import (
    GateMLP,
    GateTrainConfig,
    export_gate_onnx,
    mixture_nll,
    train_gate,
)
from tests.integration.test_experts import TinyFleet, last_json, run_cli, tiny_fleet


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> TinyFleet:
    return tiny_fleet(tmp_path_factory)


# --------------------------------------------------------------------------- runtime gates


def test_uniform_and_fixed_gates() -> None:
    uniform = UniformGate()
    assert isinstance(uniform, Gate)
    assert uniform.kind == "uniform" and uniform.experts == () and uniform.values("x") == {}
    fixed = FixedGate({"a": 0.7, "b": 0.3})
    assert isinstance(fixed, Gate)
    assert fixed.kind == "fixed" and fixed.experts == ("a", "b")
    assert fixed.values("anything") == {"a": 0.7, "b": 0.3}
    with pytest.raises(ValueError, match="non-negative"):
        FixedGate({"a": -1.0})
    with pytest.raises(ValueError, match="non-negative"):
        FixedGate({"a": math.nan})
    assert values_for(uniform, "x", ["p", "q"]) == ({"p": 1.0, "q": 1.0}, [])
    assert values_for(fixed, "x", ["a", "z"]) == ({"a": 0.7}, ["z"])
    assert isinstance(load_gate(None), UniformGate)
    assert isinstance(load_gate(""), UniformGate)


def test_onnx_gate_rejects_files_that_are_not_gates(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    with pytest.raises(GateLoadError, match="no such gate file"):
        OnnxGate.load(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a protobuf at all\xff" * 10)
    with pytest.raises(GateLoadError, match="not an ONNX model"):
        OnnxGate.load(garbage)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "plain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    plain = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), plain)
    with pytest.raises(GateLoadError, match="not a moe2 gate"):
        OnnxGate.load(plain)
    assert issubclass(GateLoadError, ValueError)


# --------------------------------------------------------------------------- loss and training


def test_mixture_nll_is_eq_13() -> None:
    gates = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
    probs = np.array([[[0.5, 0.9, 1.0], [0.1, 0.2, 1.0]],
                      [[0.3, 1.0, 1.0], [0.7, 1.0, 1.0]]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    got = mixture_nll(gates, torch.from_numpy(np.log(probs)), mask).numpy()
    w0, w1 = np.array([0.25, 0.75]), np.array([0.5, 0.5])
    want0 = -(math.log(w0 @ probs[0, :, 0]) + math.log(w0 @ probs[0, :, 1]))
    want1 = -math.log(w1 @ probs[1, :, 0])
    np.testing.assert_allclose(got, [want0, want1], rtol=1e-6)
    # scaling every gate leaves the weights (and the loss) unchanged: eq. 2 normalises
    again = mixture_nll(gates * 7.0, torch.from_numpy(np.log(probs)), mask).numpy()
    np.testing.assert_allclose(again, got, rtol=1e-6)


def test_gate_mlp_is_positive_and_starts_uniform() -> None:
    mlp = GateMLP(384, 3, hidden=16, dropout=0.1).eval()
    x = torch.nn.functional.normalize(torch.randn(5, 384), dim=-1)
    g = mlp(x)
    assert g.shape == (5, 3) and bool((g > 0).all())
    torch.testing.assert_close(g, torch.full_like(g, g[0, 0].item()))
    with pytest.raises(ValueError):
        GateMLP(384, 0)


def _synthetic(n_per: int, seed: int) -> list[CalibrationRecord]:
    """Three experts; expert k is right (p=0.9) on cluster k and wrong (p=0.05) elsewhere."""
    centers = np.linalg.qr(np.random.default_rng(123).standard_normal((384, 3)))[0].T
    rng = np.random.default_rng(seed)
    records = []
    for k in range(3):
        for _ in range(n_per):
            v = centers[k] + 0.3 * rng.standard_normal(384) / math.sqrt(384)
            v /= np.linalg.norm(v)
            t = int(rng.integers(1, 4))
            probs = tuple(tuple([0.9 if j == k else 0.05] * t) for j in range(3))
            records.append(CalibrationRecord(
                prompt=f"p{k}", answer="a", family=f"f{k}", embedding=tuple(float(x) for x in v),
                tokens=(tuple(range(t)),) * 3, probs=probs))
    return records


def test_train_gate_learns_routing_and_round_trips(tmp_path: Path) -> None:
    cal = Calibration(experts=("a", "b", "c"),
                      splits={"calib": tuple(_synthetic(20, 0)),
                              "validation": tuple(_synthetic(8, 1))})
    path = tmp_path / "cal.json"
    save_calibration(path, cal)
    assert load_calibration(path) == cal
    cfg = GateTrainConfig(lr=3e-3, epochs=60, patience=60, seed=0)
    result = train_gate(cal, cfg, progress=False)
    assert result.val_loss < 0.5 * result.val_loss_uniform
    assert result.val_routing_accuracy == 1.0
    assert 1 <= result.best_epoch <= result.epochs_run <= 60
    summary = result.summary()
    assert summary["experts"] == ["a", "b", "c"] and summary["config"]["lr"] == 3e-3
    # Table VI defaults
    d = GateTrainConfig()
    assert (d.hidden, d.dropout, d.lr, d.lr_factor, d.lr_patience, d.grad_clip,
            d.batch_size, d.grad_accum) == (128, 0.1, 1e-5, 0.8, 50, 1.0, 8, 8)
    with pytest.raises(ValueError, match="no split"):
        train_gate(cal, GateTrainConfig(train_split="nope"), progress=False)


def test_load_calibration_rejects_other_files(tmp_path: Path) -> None:
    p = tmp_path / "x.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON calibration"):
        load_calibration(p)
    p.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a moe2 calibration"):
        load_calibration(p)
    p.write_text(json.dumps({"format": "moe2-calibration", "version": 1, "experts": ["a"]}))
    with pytest.raises(ValueError, match="malformed"):
        load_calibration(p)
    with pytest.raises(ValueError, match="probabilities for"):
        CalibrationRecord(prompt="p", answer="a", family="", embedding=(0.0,),
                          tokens=((1, 2),), probs=((0.5,),))


# --------------------------------------------------------------------------- with the fleet


def test_calibration_from_gguf_matches_torch(fleet: TinyFleet) -> None:
    from moe2.tools.models import read_gguf
    from moe2.tools.offline.torch_llama import TorchLlama

    samples = read_jsonl(fleet.manifest.split_path("validation"))[:4]
    paths = fleet.manifest.expert_paths()
    forced = compute_calibration_from_gguf(paths, samples)
    assert [f.sample for f in forced] == samples
    models = []
    for p in paths.values():
        gg = read_gguf(p)
        models.append(TorchLlama.from_weights(gg.spec, gg.weights))
    for f in forced:
        assert f.answer_tokens[-1] == 2  # EOS
        assert len(f.probs) == len(paths)
        with torch.no_grad():
            from moe2.tools.models import SpmVocab

            vocab = SpmVocab.load(fleet.root / "vocab.model")
            prompt = vocab.encode(f.sample.prompt)
            seq = torch.tensor([[*prompt, *f.answer_tokens]])
            for row, model in zip(f.probs, models, strict=True):
                logp = torch.log_softmax(model(seq)[0].double(), dim=-1)
                want = [math.exp(float(logp[len(prompt) - 1 + i, tok]))
                        for i, tok in enumerate(f.answer_tokens)]
                np.testing.assert_allclose(row, want, atol=1e-4)


def test_calibration_file_from_make_experts(fleet: TinyFleet) -> None:
    cal = load_calibration(fleet.root / "calibration.json")
    assert cal.experts == tuple(e.name for e in fleet.manifest.experts)
    assert set(cal.splits) == {"calib", "validation", "test"}
    assert cal.vocab_fingerprint == fleet.manifest.vocab_fingerprint
    for name, records in cal.splits.items():
        assert [r.prompt for r in records] == [
            s.prompt for s in read_jsonl(fleet.manifest.split_path(name))]
        for r in records:
            assert len(r.embedding) == 384
            assert abs(float(np.linalg.norm(r.embedding)) - 1.0) < 1e-4
            assert all(0.0 < p <= 1.0 for row in r.probs for p in row)


@pytest.mark.slow
def test_gate_pipeline_onnx_matches_torch(fleet: TinyFleet, tmp_path: Path) -> None:
    """make-experts (tiny) -> calibration from GGUF -> train a few epochs -> ONNX -> OnnxGate."""
    cal = load_calibration(fleet.root / "calibration.json")
    result = train_gate(cal, GateTrainConfig(lr=1e-3, epochs=15, patience=15), progress=False)
    path = tmp_path / "gate.onnx"
    model = export_gate_onnx(result.mlp, cal.experts, path, training=result.summary())
    gate = OnnxGate.load(path)
    assert isinstance(gate, Gate)
    assert gate.kind == "onnx" and gate.experts == cal.experts
    assert gate.max_length == 256
    assert json.loads(gate.metadata["moe2.training"])["experts"] == list(cal.experts)
    from moe2.tools.offline.embed import encode_batch, load_tokenizer

    texts = [r.prompt for r in cal.splits["test"][:5]] + ["", "naïve café 日本語 🙂 " * 80]
    got = gate.values_batch(texts)
    ids, mask = encode_batch(load_tokenizer(), texts)
    assert ids.shape[1] == 256  # the long text was truncated
    with torch.no_grad():
        want = model(ids, mask).numpy()
    for row, ref in zip(got, want, strict=True):
        values = np.array([row[n] for n in gate.experts])
        assert np.all(values > 0)
        np.testing.assert_allclose(values, ref, atol=1e-4, rtol=0)
    assert gate.values(texts[0]) == pytest.approx(got[0], abs=1e-5)
    # the learned MLP on the stored embedding agrees with the end-to-end graph
    emb = torch.tensor([cal.splits["test"][0].embedding], dtype=torch.float32)
    with torch.no_grad():
        direct = result.mlp(emb).numpy()[0]
    np.testing.assert_allclose([got[0][n] for n in gate.experts], direct, atol=1e-4)
    # the runtime never needs torch
    code = (
        "import sys; from moe2.coordinator.gating import load_gate; "
        f"g = load_gate({str(path)!r}); v = g.values('Q: What is 2 plus 2? A:'); "
        "assert all(x > 0 for x in v.values()), v; "
        "assert 'torch' not in sys.modules, 'gating imported torch'; print(sorted(v))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().replace("'", '"')) == sorted(cal.experts)


@pytest.mark.slow
def test_train_gate_cli(fleet: TinyFleet, tmp_path: Path) -> None:
    out = tmp_path / "gate.onnx"
    proc = run_cli("train-gate", "--calibration", str(fleet.root / "calibration.json"),
                   "--out", str(out), "--epochs", "5", "--lr", "1e-3", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = last_json(proc.stdout)
    assert result["out"] == str(out) and out.is_file()
    assert result["experts"] == [e.name for e in fleet.manifest.experts]
    assert result["onnx_max_abs_diff"] <= 1e-4
    assert result["epochs_run"] <= 5 and result["config"]["lr"] == 1e-3
    assert OnnxGate.load(out).experts == tuple(result["experts"])


@pytest.mark.parametrize(("extra", "message"), [
    (["--lr", "-1"], "--lr"),
    (["--epochs", "0"], "--epochs"),
    (["--dropout", "1.5"], "--dropout"),
    (["--calibration", "/nonexistent/cal.json"], "no such file"),
])
def test_train_gate_bad_args_exit_2(tmp_path: Path, extra: list[str], message: str) -> None:
    cal = tmp_path / "cal.json"
    save_calibration(cal, Calibration(experts=("a", "b", "c"),
                                      splits={"calib": tuple(_synthetic(2, 0)),
                                              "validation": tuple(_synthetic(1, 1))}))
    args = ["train-gate", "--calibration", str(cal), "--out", str(tmp_path / "g.onnx"), *extra]
    proc = run_cli(*args, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_train_gate_cli_rejects_a_non_calibration_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    proc = run_cli("train-gate", "--calibration", str(bad), "--out", str(tmp_path / "g.onnx"),
                   timeout=60)
    assert proc.returncode == 2
    assert "not a moe2 calibration file" in proc.stderr
