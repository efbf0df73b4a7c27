"""Pure decisions of the coordinator: Top-k, mixing, sampling, text streaming, registry, limits."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe2.coordinator.fusion import ExpertDist, mix, renormalise, sample, top_k_weights
from moe2.coordinator.limits import Limits
from moe2.coordinator.registry import (
    GoneEvent,
    Registry,
    StatusEvent,
    TelemetryEvent,
    VocabEvent,
    apply,
    choose_family,
)
from moe2.coordinator.textstream import TextStream
from moe2.shared import wire


def test_top_k_sorts_by_gate_and_renormalises() -> None:
    w = top_k_weights({"a": 1.0, "b": 3.0, "c": 2.0, "d": 0.0}, ["a", "b", "c", "d"], 2)
    assert w == pytest.approx({"b": 0.6, "c": 0.4})
    assert top_k_weights({"a": 0.0}, ["a"], None) == {}
    assert renormalise({"b": 0.6, "c": 0.4}, ["c"]) == pytest.approx({"c": 1.0})


def test_full_vocab_mix_is_exact_weighted_sum() -> None:
    rng = np.random.default_rng(0)
    p1 = rng.dirichlet(np.ones(50))
    p2 = rng.dirichlet(np.ones(50))
    f = mix([(0.25, ExpertDist(p1, None)), (0.75, ExpertDist(p2, None))], 50)
    np.testing.assert_allclose(f.probs, 0.25 * p1 + 0.75 * p2, atol=1e-12)
    assert f.argmax() == int(np.argmax(0.25 * p1 + 0.75 * p2))


def test_topk_mix_spreads_rest_mass_uniformly_over_unreturned_ids() -> None:
    # vocab 10; expert A returns ids 0,1 with 0.5,0.3 (rest 0.2 over 8 ids); B returns id 2: 0.9
    a = ExpertDist(np.array([0.5, 0.3]), np.array([0, 1]), 0.2)
    b = ExpertDist(np.array([0.9]), np.array([2]), 0.1)
    f = mix([(0.5, a), (0.5, b)], 10)
    assert list(f.ids) == [0, 1, 2]
    raw = np.array([0.5 * 0.5 + 0.5 * 0.1 / 9, 0.5 * 0.3 + 0.5 * 0.1 / 9,
                    0.5 * 0.2 / 8 + 0.5 * 0.9])
    np.testing.assert_allclose(f.probs, raw / raw.sum())
    assert f.argmax() == 2


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.01, 1.0), min_size=2, max_size=30), st.floats(0.1, 2.0),
       st.floats(0.05, 1.0), st.integers(0, 2**32 - 1))
def test_sampling_stays_in_nucleus(ps: list[float], t: float, top_p: float, seed: int) -> None:
    p = np.array(ps) / sum(ps)
    f = mix([(1.0, ExpertDist(p, None))], len(p))
    tok = sample(f, t, top_p, np.random.default_rng(seed))
    q = p ** (1 / t)
    q /= q.sum()
    order = np.argsort(-q, kind="stable")
    cut = min(len(q), int(np.searchsorted(np.cumsum(q[order]), top_p) + 1))
    # in the nucleus: at least as likely as its least likely member (up to rounding: tokens
    # one ulp apart may sort either way)
    assert q[tok] >= q[order[cut - 1]] * (1 - 1e-9)
    assert sample(f, 0.0, top_p, np.random.default_rng(seed)) == f.argmax()


def test_text_stream_utf8_across_byte_tokens_and_stop_strings() -> None:
    pieces = [b"", b"he", b"llo", b" wor", b"ld", "é".encode()[:1], "é".encode()[1:], b"!"]
    s = TextStream(pieces)
    out = "".join(s.push(t) for t in [1, 2, 5, 6, 7]) + s.flush()
    assert out == "helloé!" and s.text == "helloé!"
    s = TextStream(pieces, stop=["wor"])
    chunks = [s.push(t) for t in [1, 2, 3, 4]]
    assert s.stopped and s.text == "hello "
    assert "".join(chunks) + s.flush() == "hello "


def _status(aid: str, fp: str = "fp1", state: str = "online") -> wire.AgentStatus:
    return wire.AgentStatus(agent_id=aid, state=state, vocab_fp=fp)  # type: ignore[arg-type]


def test_registry_apply_membership_families_and_offline() -> None:
    r = Registry()
    r = apply(r, StatusEvent(_status("a"), 1.0))
    r = apply(r, StatusEvent(_status("b"), 1.0))
    r = apply(r, StatusEvent(_status("x", fp="fp2"), 1.0))
    r = apply(r, VocabEvent(wire.Vocab(agent_id="a", vocab_fp="fp1", pieces=[b"a"])))
    assert r.families() == {"fp1": ["a", "b"], "fp2": ["x"]}
    # fp2's vocab is unknown: never chosen; gates favour fp1 anyway
    assert choose_family(r, None, {"x": 10.0}) == ("fp1", ["a", "b"])
    assert choose_family(r, ["b"], {}) == ("fp1", ["b"])
    assert choose_family(r, ["zz"], {}) is None
    tel = wire.Telemetry(agent_id="a", ts=1, power_w=1, energy_j=1, tokens_total=1,
                         tokens_per_s=1, joules_per_token=1, step_latency_s=0.01,
                         open_sessions=0, meter="m")
    r2 = apply(r, TelemetryEvent(tel, 2.0))
    assert r2.agents["a"].step_latency_s() == 0.01 and r2.version == r.version
    r3 = apply(r2, StatusEvent(_status("a", state="offline"), 3.0))
    assert "a" not in r3.agents and r3.version == r2.version + 1
    assert "b" not in apply(r3, GoneEvent("b")).agents


def test_limits_concurrency_and_rate() -> None:
    lim = Limits(max_concurrent=3, max_per_client=2, rate_per_client_per_s=2.0)
    assert lim.admit("p", 0.0) is None
    assert lim.admit("p", 0.0) is None
    err = lim.admit("p", 0.0)
    assert err is not None and err.code == wire.ErrorCode.TOO_MANY_REQUESTS
    lim.release("p")
    lim.release("p")
    err = lim.admit("p", 0.0)  # the bucket (2 per second) is empty at t=0
    assert err is not None and err.code == wire.ErrorCode.RATE_LIMITED
    assert lim.admit("p", 1.0) is None
    assert lim.admit("q", 1.0) is None
    assert lim.admit("r", 1.0) is None
    err = lim.admit("s", 1.0)
    assert err is not None and "maximum of 3" in err.message
