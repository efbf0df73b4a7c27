"""The agent as users run it: ``moe2 agent`` subprocesses on test GGUFs, a real mosquitto.

Presence (retained status, Last Will, graceful offline), distributions equal to a plain
llama-cpp-python evaluation, the KV cache at work, typed errors for bad requests, the chat
template path, and a broker restart.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from moe2.shared import __version__, wire
from moe2.shared.mqtt import MessageReader, make_client, parse_broker_url, response_properties
from moe2.shared.topics import Topics
from moe2.tools import models as gm
from moe2.tools.fleet.harness import moe2_argv
from moe2.tools.fleet.localbroker import LocalBroker
from tests.agent_helpers import (
    AgentRpcClient,
    assert_dist_matches,
    assert_not_degenerate,
    llama_greedy,
    llama_tokenize,
    read_retained,
)
from tests.conftest import Ggufs, Procs, log_of

E = wire.ErrorCode
TOPICS = Topics()
N_CTX_SMALL = 64
PROMPT = "The capital of France is"


@dataclass(frozen=True)
class Experts:
    plain: gm.ExpertFile      # tiny-0, no chat template
    other: gm.ExpertFile      # tiny-1, no chat template
    templated: gm.ExpertFile  # tiny-2, SIMPLE_CHAT_TEMPLATE


@pytest.fixture(scope="module")
def experts(ggufs: Ggufs) -> Experts:
    files = ggufs.shared
    return Experts(plain=files[0], other=files[1], templated=files[2])


def agent_args(broker: LocalBroker, agent_id: str, model: Path, *extra: str) -> list[str]:
    return ["agent", "--broker", broker.url, "--id", agent_id, "--model", str(model),
            "--meter", "estimated", "--threads", "2", *extra]


@dataclass(frozen=True)
class RunningAgents:
    url: str         # the broker
    small: str       # tiny-0, --n-ctx 64 --max-sessions 2
    templated: str   # tiny-2 with its chat template
    procs: Procs


@pytest.fixture(scope="module")
def agents(broker: LocalBroker, experts: Experts,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgents]:
    """Two CLI agents shared by the tests of this module (each test closes its sessions)."""
    ps = Procs(tmp_path_factory.mktemp("agents"))
    try:
        ps.moe2(*agent_args(broker, "small", experts.plain.path, "--n-ctx", str(N_CTX_SMALL),
                            "--max-sessions", "2"), log_name="small")
        ps.moe2(*agent_args(broker, "tmpl", experts.templated.path, "--n-ctx", "128",
                            "--max-sessions", "2"), log_name="tmpl")
        yield RunningAgents(url=broker.url, small="small", templated="tmpl", procs=ps)
        for p in ps.procs:
            assert p.poll() is None, f"agent died during the module:\n{log_of(p)[-3000:]}"
    finally:
        ps.close()


async def online(c: AgentRpcClient, agent_id: str) -> wire.AgentStatus:
    return (await c.wait_status(agent_id, "online", timeout_s=30.0)).status


async def close_confirmed(c: AgentRpcClient, agent_id: str, *session_ids: str) -> None:
    """Close sessions and make sure the agent processed it (same topic, so in order)."""
    await c.close_sessions(agent_id, session_ids)
    for sid in session_ids:
        reply = await c.step(agent_id, [wire.StepItem(sid, 3, 1, 1)])
        assert [e.code for e in reply.errors] == [E.UNKNOWN_SESSION]


# --------------------------------------------------------------------------- presence


async def test_online_status_and_last_will_after_sigkill(
        broker: LocalBroker, procs: Procs, experts: Experts) -> None:
    p = procs.moe2(*agent_args(broker, "will0", experts.other.path, "--n-ctx", "128"))
    async with AgentRpcClient(broker.url) as c:
        st = await online(c, "will0")
        assert (st.agent_id, st.model, st.quant) == ("will0", "tiny-1", "F32")
        assert (st.n_ctx, st.n_vocab) == (128, 512)
        assert st.device == "cpu"
        assert st.meter == "estimated"
        assert st.version == __version__
        assert len(st.vocab_fp) == 32
        assert not st.chat_template
        # the vocabulary is retained too, under the same fingerprint
        vocab = await read_retained(broker.url, TOPICS.agent_vocab("will0").topic, wire.Vocab)
        assert vocab is not None
        assert vocab.vocab_fp == st.vocab_fp
        assert len(vocab.pieces) == 512
        # the retained status a late subscriber sees is this online one
        retained = await read_retained(broker.url, TOPICS.agent_status("will0").topic,
                                       wire.AgentStatus)
        assert retained is not None
        assert retained.state == "online"

        mark = c.status_mark()
        killed_at = time.time()
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)
        ev = await c.wait_status("will0", "offline", since=mark, timeout_s=15.0)
        # the Last Will was written at connect time, before the kill
        assert ev.status.ts < killed_at
        assert ev.status.vocab_fp == st.vocab_fp
    retained = await read_retained(broker.url, TOPICS.agent_status("will0").topic,
                                   wire.AgentStatus)
    assert retained is not None
    assert retained.state == "offline"


async def test_sigterm_exits_zero_and_publishes_offline(
        broker: LocalBroker, procs: Procs, experts: Experts) -> None:
    p = procs.moe2(*agent_args(broker, "term0", experts.other.path, "--n-ctx", "128"))
    async with AgentRpcClient(broker.url) as c:
        await online(c, "term0")
        reply = await c.open("term0", "s", k=4, prompt=PROMPT)
        assert not reply.errors
        mark = c.status_mark()
        termed_at = time.time()
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=20) == 0, log_of(p)[-3000:]
        ev = await c.wait_status("term0", "offline", since=mark)
        # published on the way out (not the Last Will, which carries the connect time)
        assert ev.status.ts >= termed_at
    retained = await read_retained(broker.url, TOPICS.agent_status("term0").topic,
                                   wire.AgentStatus)
    assert retained is not None
    assert retained.state == "offline"
    assert "stopping" in log_of(p)


async def test_broker_restart_agent_comes_back_and_serves(
        fresh_broker: LocalBroker, procs: Procs, experts: Experts) -> None:
    p = procs.moe2(*agent_args(fresh_broker, "rs0", experts.other.path, "--n-ctx", "128"))
    async with AgentRpcClient(fresh_broker.url) as c:
        first = await online(c, "rs0")
        assert not (await c.open("rs0", "before", k=4, prompt=PROMPT)).errors
    fresh_broker.stop()
    fresh_broker.start()
    # the broker keeps no state across the restart: any online status now is a new one
    async with AgentRpcClient(fresh_broker.url) as c:
        again = await c.wait_status("rs0", "online", timeout_s=10.0)
        assert again.status.ts > first.ts
        dists = await c.greedy("rs0", "after", k=4, prompt=PROMPT, n_steps=3)
        assert [d.seq for d in dists] == [0, 1, 2, 3]
    assert p.poll() is None
    assert "broker connection lost" in log_of(p)


# --------------------------------------------------------------------------- distributions


@pytest.mark.parametrize("k", [8, 0])
async def test_distributions_equal_llama_cpp(agents: RunningAgents, experts: Experts,
                                             k: int) -> None:
    """Stepping over MQTT gives what a plain llama_cpp.Llama computes (same f16 KV type,
    flash attention off on both sides): same top-k ids, probabilities within 1e-5."""
    n_steps = 12
    path = experts.plain.path
    prompt_tokens = llama_tokenize(path, PROMPT)
    follow, ref = llama_greedy(path, prompt_tokens, n_steps, n_ctx=N_CTX_SMALL)
    for p in ref:
        assert_not_degenerate(p)
    async with AgentRpcClient(agents.url) as c:
        await online(c, agents.small)
        sid = f"eq-{k}"
        dists = await c.greedy(agents.small, sid, k=k, prompt=PROMPT, n_steps=n_steps,
                               follow=follow)
        await close_confirmed(c, agents.small, sid)
    assert dists[0].n_past == len(prompt_tokens)
    assert dists[0].n_evaluated == len(prompt_tokens)
    for seq, (d, r) in enumerate(zip(dists, ref, strict=True)):
        assert d.session_id == sid
        assert d.seq == seq
        assert_dist_matches(d, r, k)
    # greedy on the agent's replies picks the tokens the reference picked
    if k:
        assert [int(d.id_array()[0]) for d in dists[:-1]] == follow


async def test_kv_cache_one_token_per_step_until_context_full(agents: RunningAgents) -> None:
    """Every step decodes exactly one token whatever the history length; the step that would
    exceed the session's context is refused with CONTEXT_FULL."""
    async with AgentRpcClient(agents.url) as c:
        await online(c, agents.small)
        reply = await c.open(agents.small, "kv", k=4, prompt=PROMPT)
        assert not reply.errors
        n_prompt = reply.dists[0].n_past
        assert reply.dists[0].n_evaluated == n_prompt
        d = reply.dists[0]
        seq = 0
        while d.n_past < N_CTX_SMALL:
            seq += 1
            d = await c.step_one(agents.small, "kv", int(d.id_array()[0]), seq, 4)
            assert (d.seq, d.n_evaluated, d.n_past) == (seq, 1, n_prompt + seq)
        reply = await c.step(agents.small, [wire.StepItem("kv", 5, seq + 1, 4)])
        assert [e.code for e in reply.errors] == [E.CONTEXT_FULL]
        assert not reply.dists
        await close_confirmed(c, agents.small, "kv")


# --------------------------------------------------------------------------- typed errors

Case = Callable[[AgentRpcClient, str], Awaitable[wire.Reply]]


def _raw(payload: bytes) -> Case:
    async def case(c: AgentRpcClient, agent: str) -> wire.Reply:
        return await c.request(agent, payload)
    return case


async def _unknown_session(c: AgentRpcClient, agent: str) -> wire.Reply:
    return await c.step(agent, [wire.StepItem("no-such-session", 5, 1, 4)])


async def _open_bad_k_negative(c: AgentRpcClient, agent: str) -> wire.Reply:
    return await c.open(agent, "badk", k=-1, prompt=PROMPT)


async def _open_bad_k_large(c: AgentRpcClient, agent: str) -> wire.Reply:
    return await c.open(agent, "badk", k=513, prompt=PROMPT)


async def _step_bad_k(c: AgentRpcClient, agent: str) -> wire.Reply:
    return await c.step(agent, [wire.StepItem("healthy", 5, 1, 100000)])


async def _step_token_too_large(c: AgentRpcClient, agent: str) -> wire.Reply:
    return await c.step(agent, [wire.StepItem("healthy", 512, 1, 4)])


async def _step_token_negative(c: AgentRpcClient, agent: str) -> wire.Reply:
    return await c.step(agent, [wire.StepItem("healthy", -1, 1, 4)])


async def _open_bad_token(c: AgentRpcClient, agent: str) -> wire.Reply:
    return await c.open(agent, "badtok", k=4, tokens=[1, 40, 9999])


async def _open_no_tokens(c: AgentRpcClient, agent: str) -> wire.Reply:
    return await c.open(agent, "empty", k=4, tokens=[])


async def _prompt_too_long_tokens(c: AgentRpcClient, agent: str) -> wire.Reply:
    return await c.open(agent, "long", k=4, tokens=[1] + [40] * (N_CTX_SMALL - 1))


async def _prompt_too_long_text(c: AgentRpcClient, agent: str) -> wire.Reply:
    return await c.open(agent, "long", k=4, prompt="the sky is blue " * 40)


async def _duplicate_session(c: AgentRpcClient, agent: str) -> wire.Reply:
    return await c.open(agent, "healthy", k=4, prompt="again")


async def _seq_ahead(c: AgentRpcClient, agent: str) -> wire.Reply:
    return await c.step(agent, [wire.StepItem("healthy", 5, 3, 4)])


async def _seq_replayed(c: AgentRpcClient, agent: str) -> wire.Reply:
    return await c.step(agent, [wire.StepItem("healthy", 5, 0, 4)])


async def _too_many_sessions(c: AgentRpcClient, agent: str) -> wire.Reply:
    # "healthy" holds one of the two slots; fill the other, then ask for a third
    assert not (await c.open(agent, "second", k=4, prompt=PROMPT)).errors
    try:
        return await c.open(agent, "third", k=4, prompt=PROMPT)
    finally:
        await close_confirmed(c, agent, "second")


def _version_2_open() -> bytes:
    return msgspec.msgpack.encode(
        {"type": "open", "session_id": "v2", "k": 4, "prompt": "x", "v": 2})


ERROR_CASES: dict[str, tuple[Case, set[wire.ErrorCode], str | None]] = {
    # name: (request, acceptable codes, session id the error must name)
    "garbage-bytes": (_raw(b"\x00\xffnot msgpack"), {E.MALFORMED}, None),
    "empty-payload": (_raw(b""), {E.MALFORMED}, None),
    "json-not-msgpack": (_raw(b'{"type": "open", "session_id": "j", "k": 4, "prompt": "x"}'),
                         {E.MALFORMED}, None),
    "unknown-type": (_raw(msgspec.msgpack.encode({"type": "launch", "session_id": "x"})),
                     {E.MALFORMED}, None),
    "missing-field": (_raw(msgspec.msgpack.encode({"type": "open", "session_id": "x"})),
                      {E.MALFORMED}, None),
    "unknown-field": (_raw(msgspec.msgpack.encode(
        {"type": "close", "session_ids": ["x"], "please": "crash"})), {E.MALFORMED}, None),
    "wrong-field-type": (_raw(msgspec.msgpack.encode(
        {"type": "step", "items": [["healthy", "five", 1, 4]]})), {E.MALFORMED}, None),
    "empty-step": (_raw(msgspec.msgpack.encode({"type": "step", "items": []})),
                   {E.MALFORMED}, None),
    "two-prompts": (_raw(msgspec.msgpack.encode(
        {"type": "open", "session_id": "x", "k": 4, "prompt": "a", "tokens": [1]})),
        {E.MALFORMED}, None),
    "version-2": (_raw(_version_2_open()), {E.MALFORMED, E.UNSUPPORTED_VERSION}, None),
    "unknown-session": (_unknown_session, {E.UNKNOWN_SESSION}, "no-such-session"),
    "open-k-negative": (_open_bad_k_negative, {E.BAD_K}, "badk"),
    "open-k-above-vocab": (_open_bad_k_large, {E.BAD_K}, "badk"),
    "step-k-too-large": (_step_bad_k, {E.BAD_K}, "healthy"),
    "step-token-too-large": (_step_token_too_large, {E.BAD_TOKEN}, "healthy"),
    "step-token-negative": (_step_token_negative, {E.BAD_TOKEN}, "healthy"),
    "open-bad-token": (_open_bad_token, {E.BAD_TOKEN}, "badtok"),
    "open-no-tokens": (_open_no_tokens, {E.BAD_REQUEST}, "empty"),
    "prompt-too-long-tokens": (_prompt_too_long_tokens, {E.PROMPT_TOO_LONG}, "long"),
    "prompt-too-long-text": (_prompt_too_long_text, {E.PROMPT_TOO_LONG}, "long"),
    "duplicate-session": (_duplicate_session, {E.SESSION_EXISTS}, "healthy"),
    "seq-ahead": (_seq_ahead, {E.BAD_REQUEST}, "healthy"),
    "seq-replayed": (_seq_replayed, {E.BAD_REQUEST}, "healthy"),
    "too-many-sessions": (_too_many_sessions, {E.TOO_MANY_SESSIONS}, "third"),
}


@pytest.mark.parametrize("name", list(ERROR_CASES))
async def test_bad_request_gets_typed_error_and_agent_keeps_serving(
        agents: RunningAgents, name: str) -> None:
    case, codes, sid = ERROR_CASES[name]
    async with AgentRpcClient(agents.url) as c:
        await online(c, agents.small)
        opened = await c.open(agents.small, "healthy", k=4, prompt=PROMPT)
        assert not opened.errors
        try:
            reply = await case(c, agents.small)
            assert reply.agent_id == agents.small
            assert not reply.dists
            assert len(reply.errors) == 1, reply.errors
            err = reply.errors[0]
            assert err.code in codes, err
            assert err.message
            assert err.session_id == sid
            # the agent still serves, and the healthy session was not disturbed
            d = await c.step_one(agents.small, "healthy", int(opened.dists[0].id_array()[0]),
                                 1, 4)
            assert (d.n_evaluated, d.n_past) == (1, opened.dists[0].n_past + 1)
        finally:
            await close_confirmed(c, agents.small, "healthy")


async def test_step_message_mixes_results_and_errors_per_item(agents: RunningAgents) -> None:
    async with AgentRpcClient(agents.url) as c:
        await online(c, agents.small)
        a = await c.open(agents.small, "mix-a", k=4, prompt=PROMPT)
        b = await c.open(agents.small, "mix-b", k=4, prompt="Q: What is 2 plus 3?")
        assert not a.errors
        assert not b.errors
        reply = await c.step(agents.small, [
            wire.StepItem("mix-a", int(a.dists[0].id_array()[0]), 1, 4),
            wire.StepItem("ghost", 5, 1, 4),
            wire.StepItem("mix-b", 600, 1, 4),
            wire.StepItem("mix-b", int(b.dists[0].id_array()[0]), 1, 8),
        ])
        assert [(d.session_id, d.seq, len(d.id_array())) for d in reply.dists] == [
            ("mix-a", 1, 4), ("mix-b", 1, 8)]
        assert [(e.code, e.session_id) for e in reply.errors] == [
            (E.UNKNOWN_SESSION, "ghost"), (E.BAD_TOKEN, "mix-b")]
        await close_confirmed(c, agents.small, "mix-a", "mix-b")


async def test_request_with_an_unusable_response_topic_is_dropped(agents: RunningAgents) -> None:
    """Mosquitto forwards a Response Topic with wildcards; paho refuses to publish to it. Such a
    request is dropped unprocessed (it once killed the agent's worker), and the agent serves on.
    So is one asking for the reply anywhere but a coordinator's inbox (a phone's topic, say):
    the agent is no reflector."""
    async with AgentRpcClient(agents.url) as c, \
            make_client(parse_broker_url(agents.url)) as forger, MessageReader(forger) as seen:
        await online(c, agents.small)
        await forger.subscribe("moe2/responses/#", qos=0)
        for i, rt in enumerate(["x/+/y", "x/#", "+", "moe2/responses/victim/r",
                                "moe2/coordinators/a/b/inbox", "moe2/coordinators/+/inbox"]):
            await forger.publish(
                c.topics.agent_rpc(agents.small),
                wire.encode(wire.OpenSession(session_id="forged", k=4, prompt=PROMPT)),
                properties=response_properties(rt, bytes([i])))
        # the same session id is still free: none of the forged opens ran
        opened = await c.open(agents.small, "forged", k=4, prompt=PROMPT)
        assert not opened.errors, opened.errors
        await close_confirmed(c, agents.small, "forged")
        assert await seen.next(timeout_s=0.5) is None  # and nothing reached the victim


@pytest.mark.parametrize("forged", ["offline", "empty", "other-model"])
async def test_a_forged_retained_status_is_replaced_by_the_live_agent(
        agents: RunningAgents, forged: str) -> None:
    """A retained offline (or cleared, or someone else's) status for a running agent kept every
    coordinator from using it until it reconnected; the agent now puts its own back."""
    async with AgentRpcClient(agents.url) as c, \
            make_client(parse_broker_url(agents.url)) as forger:
        live = await online(c, agents.small)
        st = c.topics.agent_status(agents.small)
        payload = {"offline": st.encode(msgspec.structs.replace(live, state="offline")),
                   "empty": b"",
                   "other-model": st.encode(msgspec.structs.replace(live, model="impostor"))
                   }[forged]
        mark = c.status_mark()
        await forger.publish(st.topic, payload, qos=1, retain=True)
        back = await c.wait_status(agents.small, "online", since=mark, timeout_s=10)
        if forged == "other-model":  # the forged one is "online" too: wait for the real one
            while back.status.model == "impostor":
                mark = c.statuses.index(back) + 1
                back = await c.wait_status(agents.small, "online", since=mark, timeout_s=10)
        assert back.status.model == live.model
        # and it serves
        opened = await c.open(agents.small, "after-forgery", k=4, prompt=PROMPT)
        assert not opened.errors
        await close_confirmed(c, agents.small, "after-forgery")


# --------------------------------------------------------------------------- chat template


MESSAGES = [("system", "Answer briefly."), ("user", "What is 2 plus 3?")]


def rendered_template(expert: gm.ExpertFile, messages: list[tuple[str, str]]) -> str:
    """The template rendered the way llama-cpp-python's own chat formatter does it."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    assert expert.chat_template is not None
    fmt = Jinja2ChatFormatter(template=expert.chat_template, eos_token="</s>", bos_token="<s>")
    chat: Any = [{"role": r, "content": c} for r, c in messages]
    prompt: str = fmt(messages=chat).prompt
    return prompt


async def test_chat_template_renders_messages_and_raw_bypasses_it(
        agents: RunningAgents, experts: Experts) -> None:
    path = experts.templated.path
    text = rendered_template(experts.templated, MESSAGES)
    assert text.startswith("<|system|>Answer briefly.\n<|user|>")
    assert text.endswith("<|assistant|>")
    # the template has no {{ bos_token }}, so the agent adds BOS itself
    templated_tokens = llama_tokenize(path, text, add_bos=True, special=True)
    user_only = llama_tokenize(path, rendered_template(experts.templated, [MESSAGES[1]]),
                               add_bos=True, special=True)
    raw_tokens = llama_tokenize(path, MESSAGES[1][1], add_bos=True, special=False)
    assert len({len(templated_tokens), len(user_only), len(raw_tokens)}) == 3

    async with AgentRpcClient(agents.url) as c:
        await online(c, agents.templated)
        st = (await c.wait_status(agents.templated)).status
        assert st.chat_template
        via_messages = await c.open(agents.templated, "m", k=0, messages=MESSAGES)
        via_prompt = await c.open(agents.templated, "p", k=0, prompt=MESSAGES[1][1])
        await close_confirmed(c, agents.templated, "m", "p")
        via_raw = await c.open(agents.templated, "r", k=0, prompt=MESSAGES[1][1], raw=True)
        await close_confirmed(c, agents.templated, "r")

    for reply, tokens in ((via_messages, templated_tokens), (via_prompt, user_only),
                          (via_raw, raw_tokens)):
        assert not reply.errors
        d = reply.dists[0]
        assert d.n_past == len(tokens)
        _fed, ref = llama_greedy(path, tokens, 0, n_ctx=128)
        assert_not_degenerate(ref[0])
        assert_dist_matches(d, ref[0], 0)
    # and the three prompts really are different inputs
    assert not np.allclose(via_raw.dists[0].prob_array(), via_prompt.dists[0].prob_array(),
                           atol=1e-3)


async def test_no_template_joins_messages_and_tokenises_as_is(
        agents: RunningAgents, experts: Experts) -> None:
    """An expert without a chat template tokenises the text as is, with BOS (DESIGN.md)."""
    path = experts.plain.path
    async with AgentRpcClient(agents.url) as c:
        await online(c, agents.small)
        reply = await c.open(agents.small, "nt", k=0, prompt=PROMPT)
        await close_confirmed(c, agents.small, "nt")
    tokens = llama_tokenize(path, PROMPT, add_bos=True)
    assert tokens[0] == 1
    _fed, ref = llama_greedy(path, tokens, 0, n_ctx=N_CTX_SMALL)
    assert reply.dists[0].n_past == len(tokens)
    assert_dist_matches(reply.dists[0], ref[0], 0)



# --------------------------------------------------------------------------- bench


@pytest.mark.slow
def test_bench_agent_quick_prints_one_json_object() -> None:
    """``moe2 bench agent --quick --json``: the contract (one JSON object, last line) and the
    fields BENCHMARKS.md quotes. No timing is asserted; both paths must agree on the tokens."""
    proc = subprocess.run(
        [*moe2_argv(), "--log-level", "WARNING", "bench", "agent",
         "--quick", "--json"],  # models go to a temporary directory the bench removes
        capture_output=True, text=True, timeout=280, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["bench"] == "agent"
    assert result["machine"]["cpu_count"] >= 1
    assert result["settings"]["k"] == 64
    roles = {m["role"]: m for m in result["models"]}
    assert set(roles) == {"tiny", "large", "qwen2"}
    assert roles["large"]["n_params"] >= 50_000_000
    assert roles["qwen2"]["n_vocab"] == 151_936
    # the real vocabulary on both brokers: with set_tcp_nodelay and Mosquitto's default
    assert set(result["real_vocab"]) == {"set_tcp_nodelay true", "stock (Nagle on)"}
    for m in result["models"]:
        assert m["same_tokens"] is True
        assert m["agent_exit_code"] == 0
        assert len(m["direct"]["runs_tokens_per_s"]) == len(m["mqtt"]["runs_tokens_per_s"]) == 2
        assert m["ratio"] == pytest.approx(m["mqtt"]["tokens_per_s"] / m["direct"]["tokens_per_s"])
    assert result["large_ratio"] == roles["large"]["ratio"]
    assert result["meets_target"] == (result["large_ratio"] >= result["target_ratio"] == 0.93)
