"""Issue 15 must-shows: the OpenAI HTTP gateway against a real broker, agents and coordinator,
driven by the official ``openai`` package (sync and async, streamed and not) and plain HTTP.

The faults (429, 503, 504 by real causes) are in ``test_gateway_faults.py``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from moe2.gateway.keys import add_key
from moe2.shared import wire
from moe2.shared.mqtt import MessageReader, get_prop, make_client, parse_broker_url, payload_bytes
from moe2.tools.fleet.harness import Fleet, moe2_argv
from moe2.tools.fleet.localbroker import free_port
from tests.conftest import Ggufs

AGENTS = ("g-a", "g-b")
AGENT_ARGS = ("--n-ctx", "512", "--max-sessions", "16", "--telemetry-interval", "0.5",
              "--meter", "estimated")
COORDINATOR = """
max_tokens_limit = 480
[apps.default]
max_latency_s = 10.0
[apps.chat]
max_latency_s = 10.0
"""
#: what the test experts continue at length (greedy: a long repetition, no EOS)
PROMPT = "Q: What is 2 plus 3? A:"
#: generous: a bound for a loaded CI box, not a measurement
WAIT_S = 90.0


@dataclass
class GatewayFleet:
    fleet: Fleet
    url: str
    keys: dict[str, str]
    metrics_port: int

    def client(self, key: str = "alice") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=self.keys[key], max_retries=0,
                             timeout=WAIT_S)

    def async_client(self, key: str = "alice") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url, api_key=self.keys[key], max_retries=0,
                                  timeout=WAIT_S)

    def http(self, key: str | None = "alice") -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys[key]}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=WAIT_S)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, ggufs: Ggufs) -> Iterator[GatewayFleet]:
    work = tmp_path_factory.mktemp("gateway")
    keyfile = work / "gateway.keys"
    # the CLI prints a key once; the file keeps its hash
    out = subprocess.run([*moe2_argv(), "gateway", "add-key", "alice", "--keys", str(keyfile),
                          "--json"], capture_output=True, text=True, timeout=120, check=True)
    keys = {"alice": json.loads(out.stdout.strip().splitlines()[-1])["key"]}
    assert keys["alice"] not in keyfile.read_text()
    keys.update({name: add_key(keyfile, name) for name in ("bob", "carol")})
    metrics_port = free_port()
    with Fleet(work / "fleet") as fleet:
        for name, e in zip(AGENTS, ggufs.shared[:2], strict=True):
            fleet.start_agent(name, e.path, *AGENT_ARGS)
        fleet.start_coordinator(config_text=COORDINATOR)
        url = fleet.start_gateway("--api-keys", str(keyfile), "--metrics-port",
                                  str(metrics_port))

        async def ready() -> None:
            await fleet.wait_ready(list(AGENTS), ["coordinator"])
            await fleet.wait_models(url, ["moe2-chat", "moe2-default"], api_key=keys["alice"],
                                    name="gateway-gateway")

        asyncio.run(ready())
        yield GatewayFleet(fleet, url, keys, metrics_port)


def test_models_are_the_plans_application_classes(gw: GatewayFleet) -> None:
    with gw.client() as client:
        models = {m.id: m for m in client.models.list()}
        assert client.models.retrieve("moe2-default").id == "moe2-default"
    assert set(models) == {"moe2-chat", "moe2-default"}
    extra = models["moe2-chat"].model_extra or {}
    assert extra["moe2"]["app"] == "chat"
    assert sorted(extra["moe2"]["experts"]) == sorted(AGENTS)


def test_sync_chat_streamed_equals_not_streamed_for_the_same_seed(gw: GatewayFleet) -> None:
    with gw.client() as client:
        _streamed_equals_whole(client)


def _streamed_equals_whole(client: openai.OpenAI) -> None:
    args: dict[str, Any] = {"model": "moe2-chat", "max_tokens": 24, "temperature": 0.9,
                            "seed": 11, "messages": [{"role": "user", "content": PROMPT}]}
    whole = client.chat.completions.create(**args)
    choice = whole.choices[0]
    assert whole.object == "chat.completion" and choice.message.role == "assistant"
    text = choice.message.content
    assert text
    assert choice.finish_reason in ("stop", "length")
    assert whole.usage is not None and whole.usage.completion_tokens >= 1
    assert whole.usage.prompt_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    extra = (whole.model_extra or {})["moe2"]
    assert extra["energy_j"] > 0 and extra["latency_s"] > 0 and extra["app"] == "chat"
    assert {e["id"] for e in extra["experts"]} == set(AGENTS)
    assert sum(e["weight"] for e in extra["experts"]) == pytest.approx(1.0)

    parts: list[str] = []
    finish: str | None = None
    usage = None
    roles = []
    with client.chat.completions.create(**args, stream=True,
                                        stream_options={"include_usage": True}) as stream:
        for chunk in stream:
            assert chunk.object == "chat.completion.chunk"
            if chunk.usage is not None:
                assert chunk.choices == []
                usage = chunk.usage
                continue
            delta = chunk.choices[0].delta
            roles += [delta.role] if delta.role else []
            parts.append(delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert roles == ["assistant"]
    assert "".join(parts) == text
    assert finish == choice.finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


async def test_async_completions_streamed_equals_not_streamed(gw: GatewayFleet) -> None:
    async with gw.async_client("bob") as client:
        await _async_streamed_equals_whole(client)


async def _async_streamed_equals_whole(client: openai.AsyncOpenAI) -> None:
    args: dict[str, Any] = {"model": "moe2-default", "prompt": PROMPT, "max_tokens": 20,
                            "temperature": 0.8, "seed": 5}
    whole = await client.completions.create(**args)
    assert whole.object == "text_completion"
    text = whole.choices[0].text
    assert text and whole.usage is not None and whole.usage.completion_tokens >= 1
    stream = await client.completions.create(**args, stream=True)
    parts = [chunk.choices[0].text async for chunk in stream]
    assert "".join(parts) == text
    # and greedy chat through the async client, streamed vs not
    chat: dict[str, Any] = {"model": "moe2-default", "max_tokens": 12, "temperature": 0,
                            "messages": [{"role": "user", "content": PROMPT}]}
    whole_chat = await client.chat.completions.create(**chat)
    stream_chat = await client.chat.completions.create(**chat, stream=True)
    streamed = "".join([c.choices[0].delta.content or "" async for c in stream_chat
                        if c.choices])
    assert streamed == whole_chat.choices[0].message.content


def _error(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    err: dict[str, Any] = body["error"]
    assert err["message"]
    return err


def test_client_errors_by_real_causes(gw: GatewayFleet) -> None:
    chat = {"model": "moe2-default", "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 4}
    with gw.http(key=None) as anon:
        r = anon.post("/chat/completions", json=chat)
        assert r.status_code == 401 and _error(r)["type"] == "authentication_error"
        r = anon.get("/models", headers={"Authorization": "Bearer sk-moe2-not-a-key"})
        assert r.status_code == 401 and _error(r)["code"] == "invalid_api_key"
    with gw.http() as http:
        r = http.post("/chat/completions", content=b'{"model": ', headers={
            "content-type": "application/json"})
        assert r.status_code == 400 and _error(r)["code"] == "invalid_json"
        for extra, param in (({"n": 2}, "n"), ({"logprobs": True}, "logprobs"),
                             ({"tools": [{"type": "function",
                                          "function": {"name": "f", "parameters": {}}}]},
                              "tools"),
                             ({"temperature": 7}, "temperature")):
            r = http.post("/chat/completions", json={**chat, **extra})
            assert r.status_code == 400, r.text
            err = _error(r)
            assert (err["param"], err["type"]) == (param, "invalid_request_error")
        # refused by the coordinator itself: more tokens than its max_tokens_limit
        r = http.post("/chat/completions", json={**chat, "max_tokens": 481, "stream": True})
        assert r.status_code == 400 and _error(r)["code"] == "bad_request"
        assert "exceeds the limit of 480" in _error(r)["message"]
        r = http.post("/completions", json={"model": "gpt-4o", "prompt": "x"})
        assert r.status_code == 404 and _error(r)["code"] == "model_not_found"
    with gw.client() as client:
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="moe2-nope", messages=chat["messages"])
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="moe2-default", n=2, messages=chat["messages"])
    with openai.OpenAI(base_url=gw.url, api_key="wrong", max_retries=0) as client, \
            pytest.raises(openai.AuthenticationError):
        client.models.list()


def _metric(port: int, name: str, **labels: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(p in line for p in want.split(",")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_a_client_that_disconnects_mid_stream_frees_the_agents_sessions(
        gw: GatewayFleet) -> None:
    topics = gw.fleet.topics
    reply_topic = topics.response("carol", "gateway")
    url = parse_broker_url(gw.fleet.url)
    max_tokens = 470
    async with make_client(url, identifier="watch-carol") as watch, \
            MessageReader(watch) as reader:
        await watch.subscribe(topics.all_agent_telemetry, qos=0)
        await watch.subscribe(reply_topic, qos=1)
        before_499 = _metric(gw.metrics_port, "moe2_gateway_requests_total", status="499")
        async with httpx.AsyncClient(base_url=gw.url, timeout=WAIT_S, headers={
                "Authorization": f"Bearer {gw.keys['carol']}"}) as http:
            body = {"model": "moe2-default", "prompt": PROMPT, "max_tokens": max_tokens,
                    "temperature": 0, "stream": True}
            async with http.stream("POST", "/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                        break  # one token read: now the client goes away mid-stream
        closed_at = time.monotonic()
        # The coordinator ends the request with one `cancelled` error (no final) ...
        terminal: wire.PhoneReply | None = None
        chunks = 0
        open_sessions: dict[str, int] = {}
        deadline = closed_at + WAIT_S
        while time.monotonic() < deadline:
            m = await reader.next(timeout_s=1.0)
            if m is None:
                continue
            if str(m.topic) == reply_topic:
                msg = wire.decode_phone_reply(payload_bytes(m), get_prop(m, "ContentType"))
                if isinstance(msg, wire.TokenChunk):
                    chunks += 1
                elif terminal is None:
                    terminal = msg
                continue
            tel = topics.agent_telemetry(topics.agent_id_of(str(m.topic)) or "").decode(
                payload_bytes(m))
            if terminal is not None and tel.agent_id in AGENTS:
                open_sessions[tel.agent_id] = tel.open_sessions
            # ... and both agents report no open session after it (their telemetry)
            if terminal is not None and len(open_sessions) == len(AGENTS) and not any(
                    open_sessions.values()):
                break
    assert isinstance(terminal, wire.ErrorReplyPhone), terminal
    assert terminal.code == wire.ErrorCode.CANCELLED
    assert chunks < max_tokens - 1  # it stopped stepping long before max_tokens
    assert open_sessions == dict.fromkeys(AGENTS, 0)
    after_499 = _metric(gw.metrics_port, "moe2_gateway_requests_total", status="499")
    assert after_499 == before_499 + 1
    # the fleet still serves the same key afterwards
    async with gw.async_client("carol") as client:
        again = await client.completions.create(model="moe2-default", prompt=PROMPT,
                                                max_tokens=3, temperature=0)
    assert again.choices[0].text


def test_gateway_metrics_count_requests_tokens_and_ttft(gw: GatewayFleet) -> None:
    with gw.client() as client:
        client.chat.completions.create(model="moe2-default", max_tokens=3, messages=[
            {"role": "user", "content": PROMPT}])
    port = gw.metrics_port
    assert _metric(port, "moe2_gateway_requests_total", endpoint="chat", status="200") >= 1
    assert _metric(port, "moe2_gateway_requests_total", endpoint="chat", status="401") >= 1
    assert _metric(port, "moe2_gateway_tokens_total", key="alice", kind="completion") >= 3
    assert _metric(port, "moe2_gateway_ttft_seconds_count", endpoint="chat") >= 1
    assert _metric(port, "moe2_gateway_upstream_connected") == 1.0
    assert _metric(port, "moe2_gateway_upstream_in_flight") == 0.0


def test_the_key_file_is_reread_without_a_restart(gw: GatewayFleet) -> None:
    keyfile = Path(gw.fleet.procs["gateway-gateway"].argv[
        gw.fleet.procs["gateway-gateway"].argv.index("--api-keys") + 1])
    key = add_key(keyfile, "dave")
    deadline = time.monotonic() + WAIT_S
    with openai.OpenAI(base_url=gw.url, api_key=key, max_retries=0, timeout=WAIT_S) as client:
        while True:  # the gateway checks the file at most once a second
            try:
                client.models.list()
                break
            except openai.AuthenticationError:
                assert time.monotonic() < deadline, "the new key was never accepted"
                time.sleep(0.2)
