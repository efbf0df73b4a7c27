"""The gateway's ASGI app over a scripted upstream (no broker): routes, statuses, streams, and
that every request it gives up is cancelled upstream (issue 15). The real fleet is in
tests/e2e/test_gateway.py."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from typing import Any

import httpx
import pytest

from moe2.gateway.app import GatewayApp, Settings
from moe2.gateway.metrics import GatewayMetrics
from moe2.shared import wire
from moe2.tools.clients.phone import AskError

Script = list[wire.PhoneReply | BaseException | str]
KEY = "sk-moe2-good"
#: in a script: no further reply ever comes (until the reader gives up)
HANG = "hang"


class FakeReplies:
    def __init__(self, script: Script) -> None:
        self.script = deque(script)
        self.ended = False
        self.closed = False

    def _take(self) -> wire.PhoneReply:
        item = self.script.popleft()
        assert not isinstance(item, str)
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, (wire.FinalReply, wire.ErrorReplyPhone)):
            self.ended = True
        return item

    async def next(self, timeout_s: float) -> wire.PhoneReply:
        if not self.script:
            raise asyncio.TimeoutError
        if self.script[0] == HANG:
            await asyncio.Event().wait()
        return self._take()

    def ready(self) -> list[wire.PhoneReply]:
        out = []
        while self.script and not self.ended and isinstance(self.script[0], wire.PhoneReply):
            out.append(self._take())
        return out

    def close(self) -> None:
        self.closed = True

    @property
    def cancelled(self) -> bool:
        return self.closed and not self.ended


class FakeUpstream:
    def __init__(self, *scripts: Script, refuse: AskError | None = None) -> None:
        self.scripts = deque(scripts)
        self.sent: list[tuple[wire.PhoneRequest, str]] = []
        self.exchanges: list[FakeReplies] = []
        self.refuse = refuse
        self.plan: wire.PlanMsg | None = None
        self.connected = True

    async def send(self, request: wire.PhoneRequest, client_id: str) -> FakeReplies:
        if self.refuse is not None:
            raise self.refuse
        self.sent.append((request, client_id))
        ex = FakeReplies(self.scripts.popleft())
        self.exchanges.append(ex)
        return ex


class Keys:
    def lookup(self, key: str) -> str | None:
        return "alice" if key == KEY else None


def final(text: str = "Paris.", **kw: Any) -> wire.FinalReply:
    return wire.FinalReply(text=text, tokens=2, finish_reason="stop", ttft_s=0.01,
                           latency_s=0.1, energy_j=0.5, prompt_tokens=4,
                           experts=[wire.ExpertUsage("e0", 1.0, 2, 0.5, False)], **kw)


def tokens(*texts: str) -> list[wire.PhoneReply | BaseException | str]:
    return [wire.TokenChunk(index=i, text=t) for i, t in enumerate(texts)]


@pytest.fixture
def metrics() -> GatewayMetrics:
    return GatewayMetrics("gw")


async def client_for(up: FakeUpstream, metrics: GatewayMetrics | None = None, *,
                     keys: bool = True) -> httpx.AsyncClient:
    app = GatewayApp(up, Settings(timeout_s=1.0), keys=Keys() if keys else None,  # type: ignore[arg-type]
                     metrics=metrics)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                             base_url="http://gw/v1", headers={"Authorization": f"Bearer {KEY}"})


def chat_body(**kw: Any) -> dict[str, Any]:
    return {"model": "moe2-default", "messages": [{"role": "user", "content": "hi"}],
            "seed": 1, **kw}


def sse_events(text: str) -> list[Any]:
    out: list[Any] = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            body = block[len("data: "):]
            out.append(body if body == "[DONE]" else json.loads(body))
    return out


async def test_a_chat_completion_asks_as_the_keys_client(metrics: GatewayMetrics) -> None:
    up = FakeUpstream([*tokens("Par", "is."), final()])
    async with await client_for(up, metrics) as c:
        r = await c.post("/chat/completions", json=chat_body(max_tokens=5))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"] == "Paris."
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    assert body["moe2"]["energy_j"] == 0.5
    [(req, cid)] = up.sent
    assert cid == "alice" and req.max_tokens == 5 and req.seed == 1 and req.app == "default"
    assert up.exchanges[0].closed and not up.exchanges[0].cancelled
    assert metrics.requests.labels("gw", "chat", "200")._value.get() == 1
    assert metrics.tokens.labels("gw", "alice", "completion")._value.get() == 2


async def test_a_stream_is_sse_ending_in_done() -> None:
    up = FakeUpstream([*tokens("Par", "is."), final()])
    async with await client_for(up) as c:
        r = await c.post("/chat/completions",
                         json=chat_body(stream=True, stream_options={"include_usage": True}))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    evs = sse_events(r.text)
    assert evs[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in evs[:-1]
                   if isinstance(e, dict) and e["choices"])
    assert text == "Paris."
    assert evs[-2]["usage"]["total_tokens"] == 6
    assert up.exchanges[0].closed and not up.exchanges[0].cancelled


async def test_text_completions_stream_too() -> None:
    up = FakeUpstream([*tokens("4"), final("4")])
    async with await client_for(up) as c:
        r = await c.post("/completions", json={"model": "moe2-default", "prompt": "2+2=",
                                               "stream": True})
    evs = sse_events(r.text)
    assert [e["choices"][0]["text"] for e in evs[:-1]] == ["4", ""]
    assert up.sent[0][0].raw and up.sent[0][0].prompt == "2+2="


@pytest.mark.parametrize(("headers", "status"), [
    ({}, 401), ({"Authorization": "Bearer nope"}, 401), ({"Authorization": "Basic x"}, 401)])
async def test_keys_are_required(headers: dict[str, str], status: int) -> None:
    up = FakeUpstream()
    async with await client_for(up) as c:
        c.headers.pop("Authorization")
        for path, method in (("/chat/completions", "POST"), ("/models", "GET")):
            r = await c.request(method, path, json=chat_body(), headers=headers)
            assert r.status_code == status
            assert r.json()["error"]["type"] == "authentication_error"
            assert r.headers["www-authenticate"] == "Bearer"
    assert not up.sent


async def test_without_keys_every_request_asks_as_the_gateway() -> None:
    up = FakeUpstream([final()])
    async with await client_for(up, keys=False) as c:
        c.headers.pop("Authorization")
        assert (await c.post("/chat/completions", json=chat_body())).status_code == 200
    assert up.sent[0][1] == "gateway"


async def test_bad_input_is_400_before_anything_is_sent() -> None:
    up = FakeUpstream()
    async with await client_for(up) as c:
        r = await c.post("/chat/completions", content=b"{not json",
                         headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        r = await c.post("/chat/completions", json=chat_body(n=3))
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        r = await c.post("/chat/completions", json=chat_body(model="gpt-4o"))
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = await c.get("/models/gpt-4o")
        assert r.status_code == 404
        r = await c.get("/models/moe2-default")
        assert r.status_code == 200 and r.json()["id"] == "moe2-default"
    assert not up.sent


@pytest.mark.parametrize(("code", "status"), [
    (wire.ErrorCode.BAD_REQUEST, 400), (wire.ErrorCode.RATE_LIMITED, 429),
    (wire.ErrorCode.TOO_MANY_REQUESTS, 429), (wire.ErrorCode.NO_EXPERTS, 503),
    (wire.ErrorCode.SHUTTING_DOWN, 503)])
@pytest.mark.parametrize("stream", [False, True])
async def test_an_error_before_any_token_is_an_http_error(code: wire.ErrorCode, status: int,
                                                          stream: bool) -> None:
    up = FakeUpstream([wire.ErrorReplyPhone(code=code, message="why")])
    async with await client_for(up) as c:
        r = await c.post("/chat/completions", json=chat_body(stream=stream))
    assert r.status_code == status
    assert r.json()["error"] == {"message": "why", "type": r.json()["error"]["type"],
                                 "param": None, "code": code.value}
    if status in (429, 503):
        assert r.headers["retry-after"] == "1"
    assert up.exchanges[0].closed and not up.exchanges[0].cancelled


async def test_silence_is_504_and_the_request_is_cancelled_upstream() -> None:
    up = FakeUpstream([], tokens("a"))  # nothing at all; then one token and silence
    async with await client_for(up) as c:
        r = await c.post("/chat/completions", json=chat_body())
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        r = await c.post("/chat/completions", json=chat_body())
        assert r.status_code == 504
    assert all(ex.cancelled for ex in up.exchanges)


async def test_phone_client_failures_are_503() -> None:
    up = FakeUpstream([AskError("coordinator_lost", "a coordinator went offline")])
    async with await client_for(up) as c:
        r = await c.post("/chat/completions", json=chat_body())
    assert r.status_code == 503 and r.json()["error"]["code"] == "coordinator_lost"
    up = FakeUpstream(refuse=AskError("no_coordinator", "nobody subscribed"))
    async with await client_for(up) as c:
        r = await c.post("/chat/completions", json=chat_body())
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_coordinator"


async def test_a_failure_mid_stream_is_the_last_event() -> None:
    up = FakeUpstream([*tokens("a", "b"),
                       wire.ErrorReplyPhone(code=wire.ErrorCode.NO_EXPERTS, message="gone")],
                      [*tokens("a"), AskError("connection_lost", "broker away")])
    async with await client_for(up) as c:
        for _ in range(2):
            r = await c.post("/chat/completions", json=chat_body(stream=True))
            evs = sse_events(r.text)
            assert r.status_code == 200
            assert "error" in evs[-1] and "[DONE]" not in evs
    assert sse_events(r.text)[-1]["error"]["code"] == "connection_lost"
    assert not up.exchanges[0].cancelled and up.exchanges[1].cancelled


async def test_models_and_health() -> None:
    up = FakeUpstream()
    async with await client_for(up) as c:
        r = await c.get("/models")
        assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["moe2-default"]
        up.connected = False
        r = await c.get("http://gw/health")
        assert r.status_code == 503


async def test_a_client_that_leaves_cancels_upstream() -> None:
    """ASGI level: the server reports the disconnect while the answer is still coming."""
    up = FakeUpstream([*tokens("a"), HANG])  # the answer is not complete
    app = GatewayApp(up, Settings(timeout_s=30.0))  # type: ignore[arg-type]
    body = json.dumps(chat_body(stream=True)).encode()
    gone = asyncio.Event()
    sent: list[dict[str, Any]] = []
    requests = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if requests:
            return requests.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(msg: dict[str, Any]) -> None:
        sent.append(msg)
        if msg.get("body"):
            gone.set()  # the client reads the first event, then closes the connection

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
             "headers": [(b"content-type", b"application/json")], "query_string": b"",
             "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "scheme": "http", "server": ("gw", 80), "client": ("c", 1), "root_path": ""}
    await asyncio.wait_for(app(scope, receive, send), 10.0)  # type: ignore[arg-type]
    assert sent[0]["status"] == 200
    assert up.exchanges[0].cancelled
    assert app.counters["client_gone"] == 1
