"""Speculation with llama.cpp (agent/speculation.py): the same distributions with and without
it over 64 greedy and 64 sampled tokens, misses forced, and no speculative token left in the
KV cache after a miss."""

from __future__ import annotations

import numpy as np
import pytest

from moe2.agent.daemon import AgentDaemon, Work
from moe2.agent.engine import LlamaEngine
from moe2.shared import wire
from tests.agent_helpers import agent_config, make_daemon
from tests.conftest import Ggufs

PROMPT = [1, 17, 43, 88, 120, 7]


def _daemon(path: str, min_p: float) -> tuple[AgentDaemon, LlamaEngine]:
    engine = LlamaEngine(path, n_ctx=256, max_sessions=2, n_threads=1, kv_type="f32")
    cfg = agent_config(f"spec{min_p}", max_sessions=2, speculate_min_p=min_p)
    return make_daemon(cfg, engine, "mqtt://127.0.0.1:1"), engine


def _dist(d: AgentDaemon, msg: wire.OpenSession | wire.Step) -> wire.Distribution:
    [reply] = d.process([Work(msg, None, "inbox", b"c")])
    assert reply is not None and not reply.errors, reply
    return reply.dists[0]


def _full(dist: wire.Distribution) -> np.ndarray:
    return dist.prob_array().astype(np.float64)


@pytest.mark.parametrize("sampled", [False, True])
def test_the_same_distributions_with_and_without_speculation(ggufs: Ggufs, sampled: bool
                                                              ) -> None:
    path = str(ggufs.shared[0].path)
    plain, plain_engine = _daemon(path, 0.0)
    spec, spec_engine = _daemon(path, 1e-9)  # speculate on every step
    rng = np.random.default_rng(7)
    try:
        a = _dist(plain, wire.OpenSession(session_id="s", k=0, tokens=PROMPT))
        b = _dist(spec, wire.OpenSession(session_id="s", k=0, tokens=PROMPT))
        np.testing.assert_allclose(_full(b), _full(a), atol=1e-5)
        s = spec.table.sessions["s"]
        hits = misses = 0
        for seq in range(1, 65):
            p = _full(a)
            if sampled:
                token = int(rng.choice(p.shape[0], p=p / p.sum()))
            elif seq % 3 == 0:  # a forced miss: the second likeliest
                token = int(np.argsort(-p)[1])
            else:
                token = int(np.argmax(p))
            assert spec.spec.round() == 1  # the agent was idle: it speculated on its top
            a = _dist(plain, wire.Step(items=[wire.StepItem("s", token, seq, 0)]))
            b = _dist(spec, wire.Step(items=[wire.StepItem("s", token, seq, 0)]))
            np.testing.assert_allclose(_full(b), _full(a), atol=1e-5)
            assert b.spec in (1, 2)
            hits += b.spec == 1
            misses += b.spec == 2
            # the KV cache holds the session's tokens and nothing speculative
            assert spec_engine.cached_positions(s.seq_id) == s.n_past == len(s.tokens)
            assert s.n_past == len(PROMPT) + seq
        assert (spec.spec.stats.hits, spec.spec.stats.misses) == (hits, misses)
        if sampled:  # a random-weight model is far from sure: both happen
            assert misses >= 10 and hits >= 1
        else:  # every third token forced off the expert's top: exactly those miss
            assert (hits, misses) == (43, 21)
    finally:
        plain_engine.close()
        spec_engine.close()
