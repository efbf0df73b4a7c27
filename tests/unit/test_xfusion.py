"""Fusion across tokenizers (coordinator/xfusion.py): candidate scoring, the end of the answer,
UTF-8, and the one-vocabulary case that must pick the exact path's token."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe2.coordinator.fusion import ExpertDist, mix
from moe2.coordinator.xfusion import (
    PREFIX_CREDIT,
    FamilyStep,
    FamilyVocabView,
    candidates,
    choose,
)

# two toy vocabularies that split numbers differently: digit by digit, and in groups
DIGITS = FamilyVocabView.build([b"<e>", b" ", b"1", b"6", b"0", b" 1", b"\xc3", b"\xa9"],
                               frozenset({0}))
GROUPS = FamilyVocabView.build([b"</s>", b"<eot>", b" ", b"11", b"16", b"160", b"1", b" 16"],
                               frozenset({0, 1}))
GREEDY = np.random.default_rng(0)


def dist(probs: dict[int, float], rest: float = 0.0) -> ExpertDist:
    ids = np.asarray(sorted(probs), dtype=np.int32)
    return ExpertDist(np.asarray([probs[i] for i in sorted(probs)], dtype=np.float32), ids,
                      rest)


def step(name: str, weight: float, view: FamilyVocabView, probs: dict[int, float],
         pending: bytes = b"", rest: float = 0.0) -> FamilyStep:
    return FamilyStep(name, weight, [(1.0, dist(probs, rest))], pending, view)


def scores(steps: list[FamilyStep]) -> dict[bytes | None, float]:
    return {c.text: c.score for c in candidates(steps)[0]}


def test_a_longer_candidate_gets_part_of_the_shorter_tokens_mass_never_all() -> None:
    """A family sure of "1" backs "11" only in part: a low-weight family's "11" does not win
    the tie (with full prefix credit it would)."""
    digits = step("d", 0.99, DIGITS, {2: 0.9, 3: 0.1})
    groups = step("g", 0.01, GROUPS, {3: 0.8, 6: 0.2})
    s = scores([digits, groups])
    assert s[b"1"] > s[b"11"]
    assert s[b"11"] == pytest.approx(0.9 * 0.99 * PREFIX_CREDIT + 0.01 * 0.8)
    assert choose([digits, groups], 0.0, 1.0, GREEDY).text == b"1"


def test_a_shorter_candidate_gets_the_mass_of_the_tokens_that_extend_it() -> None:
    # "16" for the digit family is no token: it gets "1"'s half; " 16" for the group family
    # extends " 1" (no exact " 1" there): its mass backs the shorter candidate
    digits = step("d", 0.5, DIGITS, {5: 1.0})
    groups = step("g", 0.5, GROUPS, {7: 0.7, 2: 0.3})
    s = scores([digits, groups])
    assert s[b" 1"] == pytest.approx(0.5 * 1.0 + 0.5 * 0.7)
    out = choose([digits, groups], 0.0, 1.0, GREEDY)
    assert (out.text, out.end) == (b" 1", False)
    assert out.hints == {"d": 5}  # the digit family's own token for exactly these bytes


def test_each_end_token_counts_once() -> None:
    """A family with two end tokens, one returned and one not: the end's mass is the returned
    one's plus the fill for the other -- never the returned one twice."""
    groups = step("g", 1.0, GROUPS, {1: 0.5, 3: 0.3}, rest=0.2)
    fill = 0.2 / (len(GROUPS.pieces) - 2)
    assert scores([groups])[None] == pytest.approx(0.5 + fill)
    pending = step("g", 1.0, GROUPS, {3: 0.5, 4: 0.5}, pending=b"1")
    assert None not in scores([pending])  # bytes still held: this family cannot end here


def test_across_families_the_answer_stays_valid_utf8() -> None:
    """After an incomplete character, a candidate that cannot continue it is not taken, however
    likely; when no candidate can, the likeliest is (a replacement character, not a failure)."""
    whole = FamilyVocabView.build([b"<e>", "\u00e9".encode(), b"1", b"\xc3", b"\xa9"],
                                  frozenset({0}))
    a = step("a", 0.4, whole, {4: 1.0})  # "\xa9": finishes the character
    b = step("b", 0.6, DIGITS, {2: 0.9, 7: 0.1})  # "1" and "\xa9"
    assert choose([a, b], 0.0, 1.0, GREEDY, utf8_tail=b"").text == b"1"
    out = choose([a, b], 0.0, 1.0, GREEDY, utf8_tail=b"\xc3")
    assert out.text == b"\xa9" and out.hints == {"a": 4, "b": 7}
    stuck = step("b", 0.6, DIGITS, {2: 1.0})
    assert choose([stuck], 0.0, 1.0, GREEDY, utf8_tail=b"\xc3").text == b"1"


def test_the_answer_does_not_end_in_the_middle_of_a_character() -> None:
    """The end of the answer is no candidate after an incomplete character while one can
    finish it (found by adversarial review: answers ending in U+FFFD with finish "stop")."""
    whole = FamilyVocabView.build([b"<e>", "\u00e9".encode(), b"1", b"\xc3", b"\xa9"],
                                  frozenset({0}))
    ending = step("a", 0.7, whole, {0: 0.9, 4: 0.1})  # sure the answer ends here
    other = step("b", 0.3, DIGITS, {0: 0.5, 7: 0.5})
    assert choose([ending, other], 0.0, 1.0, GREEDY, utf8_tail=b"").end
    out = choose([ending, other], 0.0, 1.0, GREEDY, utf8_tail=b"\xc3")
    assert not out.end and out.text == b"\xa9"
    for seed in range(20):  # sampling too
        out = choose([ending, other], 1.0, 1.0, np.random.default_rng(seed),
                     utf8_tail=b"\xc3")
        assert not out.end


@settings(max_examples=150, deadline=None)
@given(st.lists(st.floats(0.001, 1.0), min_size=6, max_size=6),
       st.lists(st.floats(0.001, 1.0), min_size=6, max_size=6), st.floats(0.05, 0.95))
def test_on_one_vocabulary_greedy_picks_the_exact_paths_token(
        a: list[float], b: list[float], w: float) -> None:
    pieces = [b"<e>", b"a", b"b", b"ab", b" a", b"ba", b"c"]
    view = FamilyVocabView.build(pieces, frozenset({0}))
    ids = np.arange(1, 7, dtype=np.int32)
    da = ExpertDist(np.asarray(a, np.float32) / sum(a) * 0.9, ids, 0.1)
    db = ExpertDist(np.asarray(b, np.float32) / sum(b) * 0.9, ids, 0.1)
    exact = mix([(w, da), (1 - w, db)], len(pieces))
    out = choose([FamilyStep("f", 1.0, [(w, da), (1 - w, db)], b"", view)], 0.0, 1.0, GREEDY)
    best = exact.argmax()
    if best == 0:
        assert out.end
    else:
        assert out.text == pieces[best] and out.hints == {"f": best}
