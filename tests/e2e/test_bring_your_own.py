"""Bring your own fleet (issue 13): GGUF experts that `moe2 make-experts` did not write, the
operator's own JSONL data -- calibrate through the agents, train the gate, run a coordinator
with that gate and that planner calibration, evaluate -- and every bad input answered with one
clear line and exit code 2."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from moe2.shared.topics import Topics
from moe2.tools.fleet.harness import moe2_argv
from moe2.tools.fleet.localbroker import LocalBroker
from tests.conftest import RealGgufs, log_of
from tests.fleet import plan_where, start_agent, start_coordinator

ROOT = "byo"
REAL_AGENT_ARGS = ("--max-sessions", "4", "--n-ctx", "512", "--root", ROOT)
ROWS = [
    {"prompt": "Q: What is the capital of France? A:", "answer": "Paris", "app": "geo",
     "raw": True},
    {"prompt": "Q: What is 2 plus 2? A:", "answer": "4", "app": "math", "raw": True},
    {"messages": [{"role": "user", "content": "Say hello."}], "answer": "Hello!"},
    {"question": "Which planet is the largest?", "choices": ["Mars", "Jupiter", "Venus"],
     "answer": 1, "app": "science"},
    {"question": "2 + 3 = ?", "choices": ["4", "5"], "answer": "B", "app": "math"},
    {"prompt": "Translate to French: cat", "answer": "chat", "app": "lang"},
]


def moe2(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*moe2_argv(), *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def last_json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def one_error_line(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("moe2: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_own_experts_and_data_through_calibrate_train_plan_and_eval(
        procs: Any, broker: LocalBroker, real_ggufs: RealGgufs, tmp_path: Path) -> None:
    experts = {"qwen3b": real_ggufs.qwen2, "qwen7b": real_ggufs.qwen2_padded,
               "mistral": real_ggufs.spm}
    for name, e in experts.items():
        start_agent(procs, broker.url, name, e.path, *REAL_AGENT_ARGS)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cal_path = tmp_path / "cal.json"
    cal = last_json(moe2("calibrate", "--broker", broker.url, "--root", ROOT, "--data",
                         str(data), "--out", str(cal_path), "--json"))
    assert sorted(cal["experts"]) == sorted(experts)
    assert cal["source"] == "agents"
    assert sum(cal["samples"].values()) == len(ROWS)
    doc = json.loads(cal_path.read_text())
    assert doc["version"] == 2
    record = next(iter(doc["splits"]["calib"]))
    by_name = dict(zip(doc["experts"], record["tokens"], strict=True))
    assert by_name["qwen3b"] == by_name["qwen7b"]  # one family: the same tokens
    assert all(0.0 <= p <= 1.0 for row in record["probs"] for p in row)

    gate = tmp_path / "gate.onnx"
    trained = last_json(moe2("train-gate", "--calibration", str(cal_path), "--out", str(gate),
                             "--epochs", "20", "--patience", "20", "--json"))
    assert sorted(trained["experts"]) == sorted(experts)

    coord = start_coordinator(procs, broker.url, "--root", ROOT, "--gate", str(gate),
                              "--calibration", str(cal_path), name="cbyo")
    # the first plan that sees every agent and plans on the calibration's loss
    plan, _last = asyncio.run(plan_where(
        broker.url, lambda p: p.loss_source == "calibration"
        and sum(map(len, p.families.values())) == 3, timeout_s=120.0, topics=Topics(ROOT)))
    assert plan is not None, log_of(coord)[-2000:]
    assert sorted(a for m in plan.families.values() for a in m) == sorted(experts)
    assert plan.joint.experts  # whichever set the calibration loss favours

    result = last_json(moe2("eval", "--broker", broker.url, "--root", ROOT, "--gate",
                            str(gate), "--data", str(data), "--max-tokens", "4",
                            "--out", str(tmp_path / "eval"), "--json"))
    acc = result["accuracy"]
    assert set(acc) >= {"moe2", "single", "majority_voting", "average_expert", "oracle"}
    assert sorted(acc["single"]) == sorted(experts)
    assert acc["oracle"] >= max(acc["single"].values())
    assert result["samples"] == len(ROWS)
    assert set(result["per_app"]) == {"geo", "math", "default", "science", "lang"}
    assert (tmp_path / "eval" / "eval.md").read_text().count("| Single Agent") == 3

    # bad inputs: one line, exit 2, nothing written
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + '{"prompt": "x"}\n')
    out = tmp_path / "never.json"
    one_error_line(moe2("calibrate", "--broker", broker.url, "--root", ROOT, "--data", str(bad),
                        "--out", str(out)), "bad.jsonl:2", "no answer")
    assert not out.exists()
    one_error_line(moe2("calibrate", "--broker", broker.url, "--root", ROOT, "--data",
                        str(data), "--agents", "qwen3b,nobody", "--out", str(out)),
                   "nobody", "not online")
    assert not out.exists()
    one_error_line(moe2("eval", "--broker", broker.url, "--root", ROOT, "--data", str(bad)),
                   "bad.jsonl:2")
    not_cal = tmp_path / "not-cal.json"
    not_cal.write_text('{"experts": ["a"], "gates": [[1.0]]}')
    one_error_line(moe2("coordinator", "--broker", broker.url, "--root", ROOT, "--id", "cbad",
                        "--calibration", str(not_cal)), "not a moe2 calibration file")
    other = json.loads(cal_path.read_text())
    other["experts"] = ["somebody", *other["experts"][1:]]
    mismatched = tmp_path / "mismatched.json"
    mismatched.write_text(json.dumps(other))
    one_error_line(moe2("coordinator", "--broker", broker.url, "--root", ROOT, "--id", "cbad",
                        "--gate", str(gate), "--calibration", str(mismatched)),
                   "somebody", "the gate does not know")


@pytest.mark.parametrize(("text", "needle"), [
    ("not json\n", "not JSON"),
    ('{"prompt": "p", "answer": "a", "colour": "red"}\n', "unknown key"),
    ('{"question": "q", "choices": ["x", "y"], "answer": "C"}\n', "letters AB"),
    ('{"question": "q", "choices": ["x", "y"], "answer": 5}\n', "answer index 5"),
    ('{"prompt": "p", "messages": [], "answer": "a"}\n', "exactly one of"),
    ("", "no rows"),
])
def test_malformed_data_is_one_line_and_exit_2(tmp_path: Path, text: str, needle: str) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(text)
    out = tmp_path / "cal.json"
    one_error_line(moe2("calibrate", "--broker", "mqtt://127.0.0.1:1", "--data", str(data),
                        "--out", str(out)), needle)
    assert not out.exists()
