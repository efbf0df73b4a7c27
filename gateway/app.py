"""The gateway's ASGI app (Starlette): OpenAI's routes over an injected upstream.

``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/chat/completions``,
``POST /v1/completions``, and ``GET /health`` for load balancers. Every request is
authenticated (a bearer key from the key file names its client id upstream; without a key file
every request asks as ``Settings.client_id``), parsed by :mod:`.openai_api`, published upstream,
and answered when the fleet's first reply is in: an error before any token becomes an HTTP
error with its status, a stream becomes server-sent events. A client that goes away before
its answer is complete (the HTTP connection closes) has its request cancelled upstream at
once, streamed or not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from moe2.gateway import openai_api as oa
from moe2.gateway.keys import bearer_token
from moe2.gateway.metrics import GatewayMetrics
from moe2.gateway.upstream import Replies, Upstream
from moe2.shared import wire
from moe2.shared.mqtt import cancel_and_wait
from moe2.tools.clients.phone import AskError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: status recorded for a request whose HTTP client went away first (nginx's convention)
CLIENT_GONE = 499


@dataclass(frozen=True)
class Settings:
    #: the longest wait for the fleet's next reply (first token, or the next one): then 504
    timeout_s: float = 120.0
    #: ``max_tokens`` when a chat request gives none (OpenAI: "as many as fit")
    default_max_tokens: int = 256
    #: the client id upstream when there is no key file
    client_id: str = "gateway"
    max_body_bytes: int = 1 << 20


class KeyLookup(Protocol):
    def lookup(self, key: str) -> str | None: ...


class ClientGone(Exception):
    """The HTTP client closed the connection before its answer was complete."""


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(receive: Receive, work: Coroutine[Any, Any, T]) -> T:
    """``work``'s result, or :class:`ClientGone` (``work`` cancelled) when the client's
    connection closes first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            if gone.done():
                await cancel_and_wait([task])
            else:  # we were cancelled ourselves
                await cancel_and_wait([task, gone])
        await cancel_and_wait([gone])
    if task.cancelled():
        raise ClientGone
    return task.result()


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> Response:
    return Response(msgspec.json.encode(obj), status_code=status, headers=headers,
                    media_type="application/json")


def error_response(err: oa.ApiError) -> Response:
    headers = {"retry-after": "1"} if err.status in (429, 503) else None
    if err.status == 401:
        headers = {"www-authenticate": "Bearer"}
    return json_response(err.body(), err.status, headers)


class GatewayApp:
    """The OpenAI routes. ``upstream``, ``keys``, ``metrics`` and the clocks are injected;
    :mod:`.service` wires the real ones."""

    def __init__(self, upstream: Upstream, settings: Settings | None = None, *,
                 keys: KeyLookup | None = None, metrics: GatewayMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.upstream = upstream
        self.settings = settings or Settings()
        self.keys = keys
        self.metrics = metrics
        self.clock = clock
        self.wall = wall
        self.counters: dict[str, int] = {"requests": 0, "client_gone": 0}
        self.app = Starlette(routes=[
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
        ])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)

    # ------------------------------------------------------------------ common
    def client_id(self, request: Request) -> str:
        """The client id to ask as: the key's name; 401 for a missing or unknown key."""
        if self.keys is None:
            return self.settings.client_id
        token = bearer_token(request.headers.get("authorization"))
        if token is None:
            raise oa.ApiError(401, "missing API key: send 'Authorization: Bearer <key>' (from "
                                   "`moe2 gateway add-key NAME`)", code="invalid_api_key")
        name = self.keys.lookup(token)
        if name is None:
            raise oa.ApiError(401, "incorrect API key provided", code="invalid_api_key")
        return name

    async def body(self, request: Request) -> Any:
        size = 0
        parts = []
        async for part in request.stream():
            size += len(part)
            if size > self.settings.max_body_bytes:
                raise oa.ApiError(413, f"the request body exceeds "
                                       f"{self.settings.max_body_bytes} bytes",
                                  code="request_too_large")
            parts.append(part)
        try:
            return msgspec.json.decode(b"".join(parts))
        except msgspec.DecodeError as exc:
            raise oa.bad(f"the request body is not valid JSON: {exc}",
                         code="invalid_json") from None

    def observe(self, endpoint: str, status: int, t0: float) -> None:
        if self.metrics is not None:
            self.metrics.observe_request(endpoint, status, self.clock() - t0)
        if status == CLIENT_GONE:
            self.counters["client_gone"] += 1

    async def next_reply(self, ex: Replies) -> wire.PhoneReply:
        try:
            return await ex.next(self.settings.timeout_s)
        except AskError as exc:
            raise oa.error_for_ask(exc.code, exc.message) from None
        except asyncio.TimeoutError:
            raise oa.timeout_error(self.settings.timeout_s) from None

    def close(self, ex: Replies) -> None:
        ex.close()
        if self.metrics is not None:
            self.metrics.upstream_ended()

    def account(self, client_id: str, final: wire.FinalReply) -> None:
        if self.metrics is not None:
            self.metrics.observe_tokens(client_id, final.prompt_tokens or 0, final.tokens)

    def first_token(self, endpoint: str, t0: float) -> None:
        if self.metrics is not None:
            self.metrics.observe_ttft(endpoint, self.clock() - t0)

    # ------------------------------------------------------------------ routes
    async def health(self, request: Request) -> Response:
        up = self.upstream.connected
        return json_response({"status": "ok" if up else "broker unreachable"},
                             200 if up else 503)

    async def models(self, request: Request) -> Response:
        t0 = self.clock()
        try:
            self.client_id(request)
            resp = json_response(oa.models_list(self.upstream.plan))
        except oa.ApiError as err:
            resp = error_response(err)
        self.observe("models", resp.status_code, t0)
        return resp

    async def model(self, request: Request) -> Response:
        t0 = self.clock()
        try:
            self.client_id(request)
            mid = request.path_params["model"]
            info = oa.models_of(self.upstream.plan).get(mid)
            if info is None:
                raise oa.model_not_found(mid)
            resp = json_response(oa.model_object(mid, info))
        except oa.ApiError as err:
            resp = error_response(err)
        self.observe("models", resp.status_code, t0)
        return resp

    async def chat(self, request: Request) -> Response:
        return await self.complete(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self.complete(request, "completion")

    async def complete(self, request: Request, kind: oa.Kind) -> Response:
        t0 = self.clock()
        self.counters["requests"] += 1
        endpoint = "chat" if kind == "chat" else "completions"
        try:
            client_id = self.client_id(request)
            body = await self.body(request)
            parsed = (oa.parse_chat(body, default_max_tokens=self.settings.default_max_tokens)
                      if kind == "chat" else oa.parse_completion(body))
            app = oa.app_of_model(parsed.model, self.upstream.plan)
            req = msgspec.structs.replace(parsed.request, app=app)
            try:
                ex = await self.upstream.send(req, client_id)
            except AskError as exc:
                raise oa.error_for_ask(exc.code, exc.message) from None
            if self.metrics is not None:
                self.metrics.upstream_started()
            try:
                first = await unless_disconnected(request.receive, self.next_reply(ex))
                if isinstance(first, wire.ErrorReplyPhone):
                    raise oa.error_for_reply(first)
            except BaseException:
                self.close(ex)
                raise
        except ClientGone:
            self.observe(endpoint, CLIENT_GONE, t0)
            return Response(status_code=CLIENT_GONE)
        except oa.ApiError as err:
            self.observe(endpoint, err.status, t0)
            if err.status >= 500 or err.status == 429:
                log.info("%s request from %s: %d %s", endpoint, request.client, err.status,
                         err.message)
            return error_response(err)
        if isinstance(first, wire.TokenChunk):  # (else the first reply is the final)
            self.first_token(endpoint, t0)
        call = Call(self, ex, parsed, client_id, endpoint, t0)
        if parsed.stream:
            return EventStream(call, first)
        return await call.collect(request, first)


class Call:
    """One completion being answered (after the fleet's first reply)."""

    def __init__(self, gw: GatewayApp, ex: Replies, parsed: oa.Parsed, client_id: str,
                 endpoint: str, t0: float) -> None:
        self.gw = gw
        self.ex = ex
        self.parsed = parsed
        self.client_id = client_id
        self.endpoint = endpoint
        self.t0 = t0
        self.cid = oa.new_id(parsed.kind)
        self.created = int(gw.wall())

    async def _final(self, first: wire.PhoneReply) -> wire.FinalReply:
        msg = first
        while True:
            if isinstance(msg, wire.FinalReply):
                return msg
            if isinstance(msg, wire.ErrorReplyPhone):
                raise oa.error_for_reply(msg)
            msg = await self.gw.next_reply(self.ex)

    async def collect(self, request: Request, first: wire.PhoneReply) -> Response:
        """The non-streamed answer (the request is cancelled if the client leaves first)."""
        gw = self.gw
        try:
            final = await unless_disconnected(request.receive, self._final(first))
        except ClientGone:
            gw.observe(self.endpoint, CLIENT_GONE, self.t0)
            return Response(status_code=CLIENT_GONE)
        except oa.ApiError as err:
            gw.observe(self.endpoint, err.status, self.t0)
            return error_response(err)
        finally:
            gw.close(self.ex)
        gw.account(self.client_id, final)
        gw.observe(self.endpoint, 200, self.t0)
        return json_response(oa.completion_object(self.parsed.kind, self.cid, self.created,
                                                  self.parsed.model, final))

    async def pump(self, send: Send, first: wire.PhoneReply) -> None:
        """Write the stream: every reply that is in goes out in one write."""
        p = self.parsed
        fmt = oa.ChunkFormatter(p.kind, self.cid, self.created, p.model, p.include_usage)
        out = fmt.start()
        msg = first
        while True:
            for m in [msg, *self.ex.ready()]:
                if isinstance(m, wire.TokenChunk):
                    out += fmt.text(m.text)
                elif isinstance(m, wire.FinalReply):
                    self.gw.account(self.client_id, m)
                    out += fmt.end(m)
                else:
                    out += oa.error_event(oa.error_for_reply(m))
            if self.ex.ended:  # the last events and the end of the body in one write
                await send({"type": "http.response.body", "body": out, "more_body": False})
                return
            if out:
                await send({"type": "http.response.body", "body": out, "more_body": True})
                out = b""
            try:
                msg = await self.gw.next_reply(self.ex)
            except oa.ApiError as err:
                await send({"type": "http.response.body", "body": oa.error_event(err),
                            "more_body": False})
                return


class EventStream(Response):
    """``text/event-stream`` of one call; cancelled upstream when the client leaves."""

    media_type = "text/event-stream"

    def __init__(self, call: Call, first: wire.PhoneReply) -> None:
        self.call = call
        self.first = first
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        call = self.call
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        try:
            await unless_disconnected(receive, call.pump(send, self.first))
            status = 200
        except ClientGone:
            status = CLIENT_GONE
        finally:
            call.gw.close(call.ex)
        call.gw.observe(call.endpoint, status, call.t0)
