"""The coordinator's text path (coordinator/generation.py ``_TextPath``): members of one
vocabulary family holding different pending bytes are fused each against its own pending
bytes, never as one family (found by adversarial review: "fiddle Wind Winds")."""

from __future__ import annotations

import numpy as np

from moe2.coordinator.generation import ExpertState, RequestContext, _TextPath
from moe2.coordinator.registry import Registry
from moe2.coordinator.xfusion import FamilyVocabView
from moe2.shared import wire

# one family ("q", two members) and another ("l"): " Wind" and " Winds" are tokens of both
Q = FamilyVocabView.build([b"<e>", b" Wind", b" Winds", b"s", b"x"], frozenset({0}))
L = FamilyVocabView.build([b"</s>", b" Wind", b"s", b"y", b" Winds"], frozenset({0}))


def _dist(sid: str, probs: dict[int, float], pending: bytes = b"") -> wire.Distribution:
    ids = sorted(probs, key=lambda i: -probs[i])
    return wire.Distribution(
        session_id=sid, seq=1, probs=wire.Distribution.pack_probs([probs[i] for i in ids]),
        ids=wire.Distribution.pack_ids(ids), rest_mass=0.0, pending=pending)


def _ctx() -> RequestContext:
    async def gates(_text: str) -> dict[str, float]:
        return {}

    return RequestContext(rpc=None, registry=Registry, gate_values=gates,  # type: ignore[arg-type]
                          gate_is_uniform=True, plan_for=lambda _a: None,
                          top_k_for=lambda _a: None, coordinator_id="c")


def test_members_of_one_family_with_different_pending_bytes_are_not_mixed() -> None:
    """After " Wind" was emitted, q1 committed its " Wind" token (nothing pending) while q2
    holds " Wind" pending: q2's healed distribution (tokens beginning with " Wind": " Winds")
    means "s" next, not " Winds" again."""
    path = _TextPath({"q1": "q", "q2": "q", "l": "l"}, {"q": Q, "l": L})
    e = {a: ExpertState(a, 1 / 3, f"s-{a}") for a in ("q1", "q2", "l")}
    parts = [
        (e["q1"], 0.3, _dist("s-q1", {3: 0.5, 4: 0.5})),  # "s" or "x" after " Wind"
        (e["q2"], 0.4, _dist("s-q2", {2: 1.0}, pending=b" Wind")),  # " Winds" = "s" next
        (e["l"], 0.3, _dist("s-l", {2: 0.6, 3: 0.4})),  # "s" or "y"
    ]
    decision = path.decide(parts, wire.PhoneRequest(prompt="p", raw=True),
                           np.random.default_rng(0), _ctx(), "r", 1)
    assert decision.text == b"s"  # never " Winds" (the answer would read " Wind Winds")
    # each member's hint names its own token for its pending bytes + the text
    assert path.item(e["q2"], decision, 2, 8, False).token == 2  # " Winds"
    assert path.item(e["q1"], decision, 2, 8, False).token == 3  # "s"
    assert path.item(e["l"], decision, 2, 8, False).token == 2  # "s"
