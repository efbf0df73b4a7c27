"""The whole chain, reduced for CI: make experts, serve, calibrate through agents, train the
gate, evaluate through the serving path; and the demo."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from moe2.tools.fleet.harness import moe2_argv

pytestmark = pytest.mark.slow


def moe2(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*moe2_argv(), *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_reproduce_tiny_end_to_end(tmp_path: Path) -> None:
    out = moe2("reproduce", "--out", str(tmp_path / "run"), "--tiny", "--experts", "3",
               "--limit", "24", "--gate-epochs", "40", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    acc = result["accuracy"]
    assert set(acc) >= {"moe2", "majority_voting", "average_expert", "single", "oracle"}
    assert acc["oracle"] >= acc["best_single"]
    assert set(result["per_app"]) <= {"arithmetic", "units", "capitals", "continents",
                                      "languages", "antonyms", "letters", "reverse"}
    assert sorted(acc["single"]) == ["expert-0", "expert-1", "expert-2"]
    for v in [acc["moe2"], acc["majority_voting"], acc["average_expert"], *acc["single"].values()]:
        assert 0.0 <= v <= 100.0
    assert acc["average_expert"] == pytest.approx(sum(acc["single"].values()) / 3)
    assert result["samples"] == 24
    grid = result["budget_grid"]
    assert len(grid) >= 3
    for row in grid:
        assert {"max_latency_s", "max_energy_j", "moe2", "smo_mv", "random_mv"} <= set(row)
        if row["subset"] is not None:
            assert set(row["subset"]) <= {"expert-0", "expert-1", "expert-2"}
    for kind in ("json", "markdown", "png"):
        assert Path(result["files"][kind]).stat().st_size > 0
    # the calibration went through the agents and matches the files the experts came from
    cal = json.loads((tmp_path / "run" / "calibration-agents.json").read_text())
    assert cal["experts"] == ["expert-0", "expert-1", "expert-2"]
    assert len(cal["splits"]["calib"]) > 0


def test_demo_smoke(tmp_path: Path) -> None:
    out = moe2("demo", "--workdir", str(tmp_path / "demo"), "--tiny", "--experts", "2",
               "--prompts", "3", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["asked"] == 3
    for a in result["answers"]:
        assert "error" not in a, a
        assert a["tokens"] >= 1
        assert a["energy_j"] > 0
        assert {e["id"] for e in a["experts"]} == {"expert-0", "expert-1"}
    # a second run reuses the experts and the gate
    again = moe2("demo", "--workdir", str(tmp_path / "demo"), "--tiny", "--experts", "2",
                 "--prompts", "1", "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing the demo experts" in again.stderr
