"""The operator's data: JSON lines for ``moe2 calibrate`` and ``moe2 eval``, one object a line.

Three kinds of row (DESIGN, "Operator data"):

* ``{"prompt": "...", "answer": "..."}`` -- the prompt as a phone would send it;
* ``{"messages": [{"role": "user", "content": "..."}], "answer": "..."}`` -- a chat;
* ``{"question": "...", "choices": ["...", ...], "answer": 2 | "C"}`` -- multiple choice, asked
  the MMLU way (:func:`mc_prompt`: the question, lettered options, ``Answer:``) and scored by the
  option letter with the highest fused probability.

Optional keys: ``app`` (application class: per-app results, the request's app), ``raw`` (no chat
template for a ``prompt`` row, as a phone's ``raw``), ``family`` (a label; the generated corpus
writes it), ``id``. Anything else is an error: :func:`read_rows` reads the whole file first and
raises :class:`DataError` naming the file and line of the first bad row, so a command can say
it in one line and write nothing.
"""

from __future__ import annotations

import json
import os
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from moe2.coordinator.generation import gate_text
from moe2.shared import wire

#: option letters of multiple-choice rows
LETTERS = string.ascii_uppercase
KNOWN_KEYS = frozenset({"prompt", "messages", "question", "choices", "answer", "app", "raw",
                        "family", "id"})


class DataError(ValueError):
    """A bad row (the message names the file and line) or an unusable file."""


@dataclass(frozen=True)
class Row:
    """One calibration or evaluation item."""

    answer: str
    prompt: str | None = None
    messages: tuple[wire.ChatMessage, ...] | None = None
    choices: tuple[str, ...] | None = None
    question: str | None = None
    app: str = "default"
    raw: bool = False
    label: str = ""
    line: int = 0

    @property
    def multiple_choice(self) -> bool:
        return self.choices is not None

    @property
    def letters(self) -> str:
        return LETTERS[: len(self.choices or ())]

    def request(self, *, max_tokens: int, **overrides: object) -> wire.PhoneRequest:
        """The phone request this row stands for (greedy)."""
        return wire.PhoneRequest(
            prompt=self.prompt, messages=list(self.messages) if self.messages else None,
            app=self.app, max_tokens=max_tokens, temperature=0.0, raw=self.raw,
            **overrides)  # type: ignore[arg-type]

    def gate_text(self) -> str:
        """What the gate sees (the coordinator's rule: the prompt, or the last user turn)."""
        return gate_text(self.request(max_tokens=1))

    def score_message(self, session_id: str) -> wire.ScoreAnswer:
        """Teacher forcing of the answer through one agent (its own tokenisation)."""
        return wire.ScoreAnswer(
            session_id=session_id, continuation=self.answer, prompt=self.prompt,
            messages=list(self.messages) if self.messages else None, raw=self.raw)


def mc_prompt(question: str, choices: Sequence[str]) -> str:
    """The standard MMLU prompt: the question, one lettered option a line, ``Answer:``."""
    lines = [question.strip(), *(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)),
             "Answer:"]
    return "\n".join(lines)


def _row(obj: object, where: str, line: int) -> Row:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a row must be a JSON object")
    unknown = sorted(set(obj) - KNOWN_KEYS)
    if unknown:
        raise DataError(f"{where}: unknown key(s) {', '.join(unknown)} (a row has prompt, "
                        "messages or question+choices, answer, and optionally app, raw)")
    app = obj.get("app", "default")
    if not isinstance(app, str) or not app or len(app) > 64:
        raise DataError(f"{where}: app must be a string of 1-64 characters")
    raw = obj.get("raw", False)
    if not isinstance(raw, bool):
        raise DataError(f"{where}: raw must be true or false")
    label = obj.get("family", "")
    if not isinstance(label, str):
        raise DataError(f"{where}: family must be a string")
    kinds = [k for k in ("prompt", "messages", "question") if k in obj]
    if len(kinds) != 1:
        raise DataError(f"{where}: give exactly one of prompt, messages, question "
                        f"(got {', '.join(kinds) or 'none'})")
    if "answer" not in obj:
        raise DataError(f"{where}: no answer")
    answer = obj["answer"]
    if kinds[0] == "question":
        question, choices = obj["question"], obj.get("choices")
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{where}: question must be a non-empty string")
        if (not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS)
                or not all(isinstance(c, str) and c.strip() for c in choices)):
            raise DataError(f"{where}: choices must be a list of 2-26 non-empty strings")
        if isinstance(answer, bool) or not isinstance(answer, (int, str)):
            raise DataError(f"{where}: a multiple-choice answer is an index or a letter")
        if isinstance(answer, int):
            if not 0 <= answer < len(choices):
                raise DataError(f"{where}: answer index {answer} is not one of the "
                                f"{len(choices)} choices")
            letter = LETTERS[answer]
        else:
            letter = answer.strip().upper()
            if len(letter) != 1 or letter not in LETTERS[: len(choices)]:
                raise DataError(f"{where}: answer {answer!r} is not one of the letters "
                                f"{LETTERS[: len(choices)]}")
        return Row(answer=letter, prompt=mc_prompt(question, choices), choices=tuple(choices),
                   question=question, app=app, raw=raw, label=label, line=line)
    if not isinstance(answer, str) or not answer.strip():
        raise DataError(f"{where}: answer must be a non-empty string")
    if kinds[0] == "prompt":
        prompt = obj["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise DataError(f"{where}: prompt must be a non-empty string")
        return Row(answer=answer, prompt=prompt, app=app, raw=raw, label=label, line=line)
    messages = obj["messages"]
    if (not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and set(m) == {"role", "content"}
            and isinstance(m["role"], str) and isinstance(m["content"], str) for m in messages)):
        raise DataError(f"{where}: messages must be a non-empty list of "
                        "{\"role\": ..., \"content\": ...}")
    return Row(answer=answer, messages=tuple(wire.ChatMessage(m["role"], m["content"])
                                             for m in messages),
               app=app, raw=raw, label=label, line=line)


def read_rows(path: str | os.PathLike[str]) -> list[Row]:
    """Every row of a JSONL file (blank lines skipped); :class:`DataError` on the first bad
    one, naming the file and line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot read {p}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{p}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    rows: list[Row] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not JSON ({exc.msg} at column {exc.colno})") from None
        rows.append(_row(obj, where, n))
    if not rows:
        raise DataError(f"{p}: no rows")
    return rows


def split_validation(rows: Sequence[Row], fraction: float, seed: int
                     ) -> tuple[list[Row], list[Row]]:
    """A seeded held-out share for early stopping when no validation file is given (at least
    one row each side when there are two or more)."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"the validation fraction must be in (0, 1), got {fraction}")
    if len(rows) < 2:
        raise DataError("at least two rows are needed to hold out a validation split")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = min(len(rows) - 1, max(1, round(fraction * len(rows))))
    val = set(order[:n_val])
    return ([r for i, r in enumerate(rows) if i not in val],
            [r for i, r in enumerate(rows) if i in val])
