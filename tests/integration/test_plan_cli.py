"""``moe2 plan``: JSON contract, readable output, and one clear error line for bad files."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moe2.cli.main import main
from moe2.coordinator.planner import METHODS
from moe2.tools.fleet.harness import moe2_argv

FIELDS = ("subset", "loss", "feasible", "latency_s", "energy_j", "evaluations", "method")


def problem_doc(n: int = 6, samples: int = 8, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "experts": [
            {
                "name": f"e{k}",
                "latency_s": float(rng.uniform(0.01, 0.2)),
                "energy_j": float(rng.uniform(0.5, 2.0)),
            }
            for k in range(n)
        ],
        "applications": [
            {"name": "chat", "max_latency_s": 0.12},
            {"name": "batch", "max_latency_s": 0.5},
        ],
        "max_energy_j": 3.0,
        "calibration": {
            "gates": rng.uniform(0.1, 1.0, size=(samples, n)).tolist(),
            "target_probs": rng.uniform(0.0, 1.0, size=(samples, n)).tolist(),
        },
    }


def write(tmp_path: Path, doc: object, name: str = "problem.json") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc), encoding="utf-8")
    return path


def last_json(out: str) -> dict[str, Any]:
    lines = out.strip().splitlines()
    obj = json.loads(lines[-1])
    assert isinstance(obj, dict)
    return obj


@pytest.mark.parametrize("method", METHODS)
def test_json_output_has_the_fields(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], method: str
) -> None:
    path = write(tmp_path, problem_doc())
    code = main(["plan", "--problem", str(path), "--method", method, "--seed", "1", "--json"])
    assert code == 0
    obj = last_json(capsys.readouterr().out)
    for field in FIELDS:
        assert field in obj
    assert obj["method"] == method
    assert obj["loss_model"] == "calibration"
    assert set(obj["per_application"]) == {"chat", "batch"}
    for app in obj["per_application"].values():
        for field in FIELDS:
            assert field in app
    assert obj["max_latency_s"] == 0.12  # the joint plan takes every application's budget
    if obj["feasible"]:
        assert isinstance(obj["subset"], list)
        assert obj["energy_j"] <= 3.0 + 1e-9
        assert obj["latency_s"] <= 0.12


def test_methods_agree_where_they_must(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, problem_doc(n=8, seed=3))
    losses = {}
    for method in ("exact", "exhaustive", "smo", "greedy"):
        assert main(["plan", "--problem", str(path), "--method", method, "--json"]) == 0
        losses[method] = last_json(capsys.readouterr().out)["per_application"]["batch"]["loss"]
    assert losses["exact"] == pytest.approx(losses["exhaustive"], abs=1e-9)
    assert losses["smo"] >= losses["exact"] - 1e-9
    assert losses["greedy"] >= losses["exact"] - 1e-9


def test_infeasible_plan_is_reported_not_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = problem_doc()
    doc["max_energy_j"] = 0.1  # below every expert's energy
    path = write(tmp_path, doc)
    assert main(["plan", "--problem", str(path), "--method", "smo", "--json"]) == 0
    obj = last_json(capsys.readouterr().out)
    assert obj["subset"] is None
    assert obj["feasible"] is False
    assert all(app["subset"] is None for app in obj["per_application"].values())


def test_without_calibration_the_prior_is_used(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = problem_doc()
    del doc["calibration"]
    path = write(tmp_path, doc)
    assert main(["plan", "--problem", str(path), "--method", "exact", "--json"]) == 0
    obj = last_json(capsys.readouterr().out)
    assert obj["loss_model"] == "prior"
    assert obj["feasible"] is True


def test_readable_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, problem_doc())
    assert main(["plan", "--problem", str(path)]) == 0
    out = capsys.readouterr().out
    assert "(joint)" in out
    assert "chat" in out
    assert "batch" in out


def _mutations() -> list[tuple[str, Any]]:
    def edit(fn: Any) -> dict[str, Any]:
        doc = problem_doc()
        fn(doc)
        return doc

    return [
        ("not json", "{"),
        ("not an object", [1, 2]),
        ("missing experts", edit(lambda d: d.pop("experts"))),
        ("unknown key", edit(lambda d: d.update(extra=1))),
        ("empty experts", edit(lambda d: d.update(experts=[]))),
        ("empty applications", edit(lambda d: d.update(applications=[]))),
        ("duplicate expert", edit(lambda d: d["experts"].append(dict(d["experts"][0])))),
        (
            "duplicate app",
            edit(lambda d: d["applications"].append(dict(d["applications"][0]))),
        ),
        ("name not a string", edit(lambda d: d["experts"][0].update(name=3))),
        ("empty name", edit(lambda d: d["experts"][0].update(name=""))),
        ("latency a string", edit(lambda d: d["experts"][1].update(latency_s="0.1"))),
        ("latency a bool", edit(lambda d: d["experts"][1].update(latency_s=True))),
        ("negative energy", edit(lambda d: d["experts"][2].update(energy_j=-1.0))),
        ("expert key typo", edit(lambda d: d["experts"][0].update(energy=1.0))),
        ("negative budget", edit(lambda d: d["applications"][0].update(max_latency_s=-1))),
        ("energy budget null", edit(lambda d: d.update(max_energy_j=None))),
        ("row too short", edit(lambda d: d["calibration"]["gates"][0].pop())),
        ("rows differ", edit(lambda d: d["calibration"]["target_probs"].pop())),
        ("zero gate", edit(lambda d: d["calibration"]["gates"][1].__setitem__(0, 0.0))),
        ("prob above 1", edit(lambda d: d["calibration"]["target_probs"][1].__setitem__(0, 1.5))),
        ("gates not a list", edit(lambda d: d["calibration"].update(gates=5))),
        ("calibration key missing", edit(lambda d: d["calibration"].pop("gates"))),
        ("NaN", json.dumps(problem_doc()).replace('"max_energy_j": 3.0', '"max_energy_j": NaN')),
        (
            "Infinity in a matrix",
            json.dumps(problem_doc()).replace('"gates": [[', '"gates": [[Infinity, '),
        ),
    ]


@pytest.mark.parametrize(("label", "doc"), _mutations(), ids=[m[0] for m in _mutations()])
def test_malformed_files_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], label: str, doc: object
) -> None:
    path = write(tmp_path, doc)
    with pytest.raises(SystemExit) as info:
        main(["plan", "--problem", str(path), "--method", "smo", "--json"])
    assert info.value.code == 2, label
    captured = capsys.readouterr()
    err_lines = captured.err.strip().splitlines()
    assert len(err_lines) == 1, captured.err
    assert err_lines[0].startswith("moe2: error:")
    assert captured.out == ""


def test_unreadable_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["plan", "--problem", str(tmp_path / "missing.json"), "--json"])
    assert info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_exhaustive_refusal_and_bad_flags_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = problem_doc(n=22)
    doc["applications"] = [{"name": "all", "max_latency_s": 1.0}]
    path = write(tmp_path, doc)
    with pytest.raises(SystemExit) as info:
        main(["plan", "--problem", str(path), "--method", "exhaustive", "--json"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "refused" in err
    assert err.count("\n") == 1
    with pytest.raises(SystemExit) as info:
        main(["plan", "--problem", str(path), "--epsilon", "-1"])
    assert info.value.code == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["plan", "--problem", str(path), "--method", "magic"])
    assert info.value.code == 2


def test_time_limit_returns_plans_with_a_consistent_gap(tmp_path: Path) -> None:
    """``--time-limit 1`` on 64 experts with unstructured calibration (where no method proves
    optimality in a second): every plan is there, feasible, with a lower bound below its loss
    and gap = loss - bound. (How fast it returns is measured by ``moe2 bench planner``.)"""
    rng = np.random.default_rng(5)
    n = 64
    doc = problem_doc(n=n, samples=256, seed=5)
    doc["calibration"]["gates"] = rng.uniform(0.05, 1.0, size=(256, n)).tolist()
    doc["applications"].append({"name": "all", "max_latency_s": 1.0})
    doc["max_energy_j"] = 20.0
    path = write(tmp_path, doc)
    proc = subprocess.run(
        [*moe2_argv(), "plan", "--problem", str(path), "--method", "exact", "--time-limit", "1",
         "--json"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    obj = last_json(proc.stdout)
    assert obj["time_limit_s"] == 1.0
    for plan in (obj, *obj["per_application"].values()):
        assert plan["feasible"] is True
        assert plan["bound"] is not None
        assert plan["gap"] is not None
        assert plan["bound"] <= plan["loss"]
        assert plan["gap"] == pytest.approx(plan["loss"] - plan["bound"], abs=1e-12)
        assert plan["gap"] == 0.0 or not plan["optimal"]
    assert obj["per_application"]["all"]["timed_out"] is True  # 2^64 subsets


def test_bad_time_limit_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, problem_doc())
    for bad in ("0", "-1", "nan"):
        with pytest.raises(SystemExit) as info:
            main(["plan", "--problem", str(path), "--time-limit", bad])
        assert info.value.code == 2
        assert "--time-limit" in capsys.readouterr().err
