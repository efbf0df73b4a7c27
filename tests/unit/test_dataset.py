"""The operator's JSONL rows and the calibration file's handling of several tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moe2.coordinator.calibration import Calibration, CalibrationRecord
from moe2.tools.offline.dataset import DataError, mc_prompt, read_rows, split_validation


def _write(tmp_path: Path, *rows: object) -> Path:
    p = tmp_path / "rows.jsonl"
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


def test_the_three_kinds_of_row(tmp_path: Path) -> None:
    rows = read_rows(_write(
        tmp_path,
        {"prompt": "Q: 2+2? A:", "answer": "4", "app": "math", "raw": True},
        "",
        {"messages": [{"role": "user", "content": "hi"}], "answer": "hello"},
        {"question": "Largest planet?", "choices": ["Mars", "Jupiter"], "answer": 1},
        {"question": "q", "choices": ["a", "b", "c"], "answer": "c"},
    ))
    assert [r.line for r in rows] == [1, 3, 4, 5]
    assert rows[0].raw and rows[0].app == "math" and not rows[0].multiple_choice
    assert rows[1].messages is not None and rows[1].app == "default"
    assert rows[2].answer == "B" and rows[2].letters == "AB"
    assert rows[2].prompt == "Largest planet?\nA. Mars\nB. Jupiter\nAnswer:"
    assert rows[3].answer == "C"
    assert rows[1].gate_text() == "hi"
    req = rows[2].request(max_tokens=1)
    assert (req.prompt, req.temperature, req.max_tokens) == (rows[2].prompt, 0.0, 1)


def test_mc_prompt_is_the_mmlu_form() -> None:
    assert mc_prompt(" Q? ", ["x", "y", "z"]) == "Q?\nA. x\nB. y\nC. z\nAnswer:"


@pytest.mark.parametrize(("line", "needle"), [
    ("[1, 2]", "a row must be a JSON object"),
    ('{"prompt": "p"}', "no answer"),
    ('{"prompt": "", "answer": "a"}', "prompt must be a non-empty string"),
    ('{"messages": [{"role": "user"}], "answer": "a"}', "messages must be"),
    ('{"question": "q", "choices": ["x"], "answer": 0}', "2-26"),
    ('{"question": "q", "choices": ["x", "y"], "answer": true}', "index or a letter"),
    ('{"prompt": "p", "answer": "a", "app": ""}', "app must be"),
    ('{"prompt": "p", "answer": "a", "raw": "yes"}', "raw must be"),
])
def test_a_bad_row_names_file_and_line(tmp_path: Path, line: str, needle: str) -> None:
    path = _write(tmp_path, {"prompt": "ok", "answer": "ok"}, line)
    with pytest.raises(DataError) as exc:
        read_rows(path)
    assert f"{path}:2:" in str(exc.value) and needle in str(exc.value)


def test_validation_split_is_seeded_and_disjoint(tmp_path: Path) -> None:
    rows = read_rows(_write(tmp_path, *({"prompt": f"p{i}", "answer": "a"} for i in range(10))))
    a1, v1 = split_validation(rows, 0.2, seed=3)
    a2, v2 = split_validation(rows, 0.2, seed=3)
    assert (a1, v1) == (a2, v2) and len(v1) == 2 and len(a1) == 8
    assert not {r.prompt for r in a1} & {r.prompt for r in v1}
    assert split_validation(rows, 0.2, seed=4)[1] != v1
    with pytest.raises(DataError):
        split_validation(rows[:1], 0.2, seed=0)


def _record(tokens: tuple[tuple[int, ...], ...], probs: tuple[tuple[float, ...], ...]
            ) -> CalibrationRecord:
    return CalibrationRecord(prompt="p", answer="a", family="", embedding=(0.0,) * 384,
                             tokens=tokens, probs=probs)


def test_aligned_experts_keep_their_tokens() -> None:
    r = _record(((1, 2), (1, 2)), ((0.5, 0.25), (0.1, 0.2)))
    assert r.aligned
    np.testing.assert_allclose(r.token_probs(), [[0.5, 0.25], [0.1, 0.2]])


def test_different_tokenizers_become_geometric_mean_pseudo_tokens() -> None:
    """One expert splits the answer in 2 tokens, the other in 4: both become 3 pseudo-tokens
    of their per-token geometric mean, so eq. 13 compares them over the same answer."""
    r = _record(((7, 8), (1, 2, 3, 4)), ((0.5, 0.125), (1.0, 1.0, 0.25, 0.25)))
    assert not r.aligned
    tp = r.token_probs()
    assert tp.shape == (2, 3)
    np.testing.assert_allclose(tp[0], 0.25)
    np.testing.assert_allclose(tp[1], 0.5)
    cal = Calibration(experts=("x", "y"), splits={"validation": (r,)})
    gates, probs = cal.planner_rows([{"x": 1.0, "y": 3.0}])
    np.testing.assert_allclose(gates, [[1.0, 3.0]] * 3)
    np.testing.assert_allclose(probs, [[0.25, 0.5]] * 3)
    _emb, arr, mask = cal.arrays("validation")
    assert arr.shape == (1, 2, 3) and mask.all()
