"""The OpenAI HTTP API in moe2's terms, pure: request bodies -> phone requests, replies ->
completion objects and SSE chunks, failures -> OpenAI error objects with their HTTP status.

Shapes follow OpenAI's API reference (chat completion, chat completion chunk, completion, model
and error objects): a stream is ``data: {chunk}\\n\\n`` events ending in ``data: [DONE]``; with
``stream_options.include_usage`` every chunk carries ``"usage": null`` and one last chunk with
no choices carries the usage. Every response also carries a ``moe2`` object (energy in joules,
latency, time to first token, the experts with their weights and drops).

What moe2 cannot do is refused with a 400 naming the parameter: ``n`` > 1, tools and functions,
log probabilities, non-text response formats, penalties and logit biases. Parameters with no
effect on a moe2 answer (``user``, ``metadata``, ``store``, ``service_tier``, ...) are ignored.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from moe2.shared import __version__, wire

Kind = Literal["chat", "completion"]

MODEL_PREFIX = "moe2-"
DEFAULT_APP = "default"
SYSTEM_FINGERPRINT = f"moe2-{__version__}"
#: OpenAI's temperature range (the coordinator would take up to 100)
MAX_TEMPERATURE = 2.0
#: ``top_p`` 0 (OpenAI allows it) keeps only the most likely token: the smallest positive nucleus
TOP_P_GREEDY = 1e-9
SSE_DONE = b"data: [DONE]\n\n"

_json = msgspec.json.Encoder()


# --------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An OpenAI error object and its HTTP status."""

    def __init__(self, status: int, message: str, *, type_: str | None = None,
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_ or error_type(status)
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


#: a coordinator's error code -> HTTP status
REPLY_STATUS: dict[wire.ErrorCode, int] = {
    wire.ErrorCode.BAD_REQUEST: 400,
    wire.ErrorCode.MALFORMED: 400,
    wire.ErrorCode.UNSUPPORTED_VERSION: 400,
    wire.ErrorCode.PROMPT_TOO_LONG: 400,
    wire.ErrorCode.CONTEXT_FULL: 400,
    wire.ErrorCode.BAD_K: 400,
    wire.ErrorCode.BAD_TOKEN: 400,
    wire.ErrorCode.TOO_MANY_REQUESTS: 429,
    wire.ErrorCode.RATE_LIMITED: 429,
    wire.ErrorCode.NO_EXPERTS: 503,
    wire.ErrorCode.SHUTTING_DOWN: 503,
    wire.ErrorCode.TOO_MANY_SESSIONS: 503,
    wire.ErrorCode.VOCAB_MISMATCH: 503,
    wire.ErrorCode.TIMEOUT: 504,
    wire.ErrorCode.UNKNOWN_SESSION: 500,
    wire.ErrorCode.SESSION_EXISTS: 500,
    wire.ErrorCode.INTERNAL: 500,
    # only ever sent after this gateway gave a request up: nobody reads it (nginx's 499)
    wire.ErrorCode.CANCELLED: 499,
}

#: the phone client's own failure codes (tools.clients.phone.AskError) -> HTTP status
ASK_STATUS: dict[str, int] = {
    "no_coordinator": 503, "coordinator_lost": 503, "connection_lost": 503,
    "not_connected": 503, "not_authorized": 503, "refused": 503,
}


def error_for_reply(err: wire.ErrorReplyPhone) -> ApiError:
    """A coordinator's ``error`` reply as the HTTP error an OpenAI client expects."""
    code = wire.ErrorCode(err.code)
    return ApiError(REPLY_STATUS.get(code, 500), err.message, code=code.value)


def error_for_ask(code: str, message: str) -> ApiError:
    """A request the phone client gave up on (no coordinator, one died, the broker is away)."""
    return ApiError(ASK_STATUS.get(code, 503), message, code=code)


def timeout_error(timeout_s: float) -> ApiError:
    return ApiError(504, f"no answer from the fleet within {timeout_s:g}s", code="timeout")


def model_not_found(model: str) -> ApiError:
    return ApiError(404, f"The model '{model}' does not exist (GET /v1/models lists them)",
                    param="model", code="model_not_found")


# --------------------------------------------------------------------------- models


def model_id(app: str) -> str:
    return f"{MODEL_PREFIX}{app}"


def models_of(plan: wire.PlanMsg | None) -> dict[str, dict[str, Any]]:
    """Model id -> what it is: one per application class of the current plan, with the experts
    it may use (the plan's set for that class). Without a plan (no planner, or none published
    yet) the coordinators serve the ``default`` class with every online expert."""
    if plan is None:
        return {model_id(DEFAULT_APP): {"app": DEFAULT_APP, "experts": None, "feasible": None,
                                        "max_latency_s": None, "created": 0}}
    return {model_id(app): {"app": app, "experts": ap.experts, "feasible": ap.feasible,
                            "max_latency_s": ap.max_latency_s, "created": int(plan.ts)}
            for app, ap in sorted(plan.apps.items())}


def model_object(mid: str, info: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": mid, "object": "model", "created": info["created"], "owned_by": "moe2",
            "moe2": {k: v for k, v in info.items() if k != "created"}}


def models_list(plan: wire.PlanMsg | None) -> dict[str, Any]:
    return {"object": "list",
            "data": [model_object(mid, info) for mid, info in models_of(plan).items()]}


def app_of_model(model: str, plan: wire.PlanMsg | None) -> str:
    """The application class a model id names; 404 for a model the plan does not have."""
    info = models_of(plan).get(model)
    if info is None:
        raise model_not_found(model)
    app: str = info["app"]
    return app


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Parsed:
    """An OpenAI request as moe2 serves it."""

    kind: Kind
    model: str
    request: wire.PhoneRequest
    stream: bool = False
    include_usage: bool = False


def _get(body: Mapping[str, Any], name: str, types: type | tuple[type, ...],
         what: str) -> Any:
    v = body.get(name)
    if v is None:
        return None
    # bool is an int in Python; a JSON true is never a number here
    if not isinstance(v, types) or (isinstance(v, bool) and bool not in (
            types if isinstance(types, tuple) else (types,))):
        raise bad(f"'{name}' must be {what}", name, "invalid_type")
    return v


def _number(body: Mapping[str, Any], name: str) -> float | None:
    v = _get(body, name, (int, float), "a number")
    return None if v is None else float(v)


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    n = _get(body, "n", int, "an integer")
    if n is not None and n != 1:
        raise bad("moe2 generates one choice per request: 'n' must be 1", "n",
                  "unsupported_parameter")
    for name in ("tools", "functions"):
        if body.get(name):
            raise bad(f"moe2 does not support tool or function calling ('{name}')", name,
                      "unsupported_parameter")
    for name in ("tool_choice", "function_call"):
        if body.get(name) not in (None, "none"):
            raise bad(f"moe2 does not support tool or function calling ('{name}')", name,
                      "unsupported_parameter")
    logprobs = body.get("logprobs")
    if logprobs not in (None, False, 0) or body.get("top_logprobs") is not None:
        raise bad("moe2 does not return log probabilities", "logprobs", "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise bad("moe2 answers in plain text only ('response_format')", "response_format",
                  "unsupported_parameter")
    for name in ("frequency_penalty", "presence_penalty"):
        v = _number(body, name)
        if v not in (None, 0.0):
            raise bad(f"moe2 does not apply '{name}'", name, "unsupported_parameter")
    if body.get("logit_bias"):
        raise bad("moe2 does not apply 'logit_bias'", "logit_bias", "unsupported_parameter")


def _stop(body: Mapping[str, Any]) -> list[str] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad("'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(stop) > wire.MAX_STOP_STRINGS or any(len(s) > wire.MAX_STOP_CHARS for s in stop):
        raise bad(f"'stop' takes at most {wire.MAX_STOP_STRINGS} strings of at most "
                  f"{wire.MAX_STOP_CHARS} characters", "stop")
    return stop


def _sampling(body: Mapping[str, Any], default_max_tokens: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    max_tokens = _get(body, "max_completion_tokens", int, "an integer")
    param = "max_completion_tokens"
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", int, "an integer")
        param = "max_tokens"
    if max_tokens is not None and max_tokens < 1:
        raise bad(f"'{param}' must be at least 1", param)
    out["max_tokens"] = default_max_tokens if max_tokens is None else max_tokens
    temperature = _number(body, "temperature")
    if temperature is not None:
        if not 0.0 <= temperature <= MAX_TEMPERATURE:
            raise bad(f"'temperature' must be between 0 and {MAX_TEMPERATURE:g}", "temperature")
        out["temperature"] = temperature
    else:
        out["temperature"] = 1.0  # OpenAI's default
    top_p = _number(body, "top_p")
    if top_p is not None:
        if not 0.0 <= top_p <= 1.0:
            raise bad("'top_p' must be between 0 and 1", "top_p")
        out["top_p"] = top_p or TOP_P_GREEDY
    seed = _get(body, "seed", int, "an integer")
    if seed is not None:
        if seed < 0:
            raise bad("'seed' must be >= 0", "seed")
        out["seed"] = seed
    out["stop"] = _stop(body)
    return out


def _stream_flags(body: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = bool(_get(body, "stream", bool, "a boolean"))
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise bad("'stream_options' must be an object", "stream_options", "invalid_type")
        include_usage = bool(_get(opts, "include_usage", bool, "a boolean"))
    return stream, include_usage and stream


def _message_text(content: Any, i: int) -> str:
    param = f"messages[{i}].content"
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise bad("moe2 experts read text only: every content part must be "
                          '{"type": "text", "text": ...}', param, "unsupported_parameter")
            texts.append(part["text"])
        return "".join(texts)
    raise bad("a message's content must be a string or a list of text parts", param,
              "invalid_type")


#: OpenAI roles -> the role the experts' chat template sees
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _messages(body: Mapping[str, Any]) -> list[wire.ChatMessage]:
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise bad("'messages' must be a non-empty list", "messages", "invalid_type")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise bad("every message must be an object", f"messages[{i}]", "invalid_type")
        role = m.get("role")
        if role in ("tool", "function") or m.get("tool_calls") or m.get("function_call"):
            raise bad("moe2 does not support tool or function calling", f"messages[{i}]",
                      "unsupported_parameter")
        if role not in ROLES:
            raise bad(f"unknown role {role!r} (system, developer, user or assistant)",
                      f"messages[{i}].role")
        out.append(wire.ChatMessage(role=ROLES[role], content=_message_text(m.get("content"),
                                                                            i)))
    return out


def _model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required (GET /v1/models lists them)", "model", "missing")
    return model


def _phone_request(fields: dict[str, Any]) -> wire.PhoneRequest:
    try:
        return wire.PhoneRequest(**fields)
    except (TypeError, ValueError) as exc:  # a bound the checks above did not know
        raise bad(str(exc)) from None


def parse_chat(body: Any, *, app: str | None = None, default_max_tokens: int = 256) -> Parsed:
    """``POST /v1/chat/completions``. ``raw`` (a moe2 extension) skips the chat template."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", code="invalid_type")
    model = _model(body)
    _refuse_unsupported(body)
    stream, include_usage = _stream_flags(body)
    raw = bool(_get(body, "raw", bool, "a boolean"))
    req = _phone_request({"messages": _messages(body), "app": app or DEFAULT_APP, "raw": raw,
                          **_sampling(body, default_max_tokens)})
    return Parsed("chat", model, req, stream, include_usage)


def parse_completion(body: Any, *, app: str | None = None,
                     default_max_tokens: int = 16) -> Parsed:
    """``POST /v1/completions``: one prompt string continued as is (``raw``, no chat template,
    unless ``"raw": false``). Batches, ``echo``, ``suffix`` and ``best_of`` > 1 are refused."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", code="invalid_type")
    model = _model(body)
    _refuse_unsupported(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad("'prompt' must be one string (moe2 serves no batches or token arrays)",
                  "prompt", "invalid_type")
    if body.get("echo"):
        raise bad("moe2 does not echo the prompt ('echo')", "echo", "unsupported_parameter")
    if body.get("suffix") is not None:
        raise bad("moe2 does not insert text ('suffix')", "suffix", "unsupported_parameter")
    best_of = _get(body, "best_of", int, "an integer")
    if best_of not in (None, 1):
        raise bad("moe2 generates one choice per request: 'best_of' must be 1", "best_of",
                  "unsupported_parameter")
    stream, include_usage = _stream_flags(body)
    raw = _get(body, "raw", bool, "a boolean")
    req = _phone_request({"prompt": prompt, "app": app or DEFAULT_APP,
                          "raw": True if raw is None else raw,
                          **_sampling(body, default_max_tokens)})
    return Parsed("completion", model, req, stream, include_usage)


# --------------------------------------------------------------------------- responses


def new_id(kind: Kind) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def finish_reason(final: wire.FinalReply) -> str:
    """moe2 ends on EOS or a stop string (``stop``) or at ``max_tokens`` or a full context
    (``length``): the OpenAI reasons of the same name."""
    return "length" if final.finish_reason == "length" else "stop"


def usage(final: wire.FinalReply) -> dict[str, int]:
    prompt = final.prompt_tokens or 0
    return {"prompt_tokens": prompt, "completion_tokens": final.tokens,
            "total_tokens": prompt + final.tokens}


def moe2_extra(final: wire.FinalReply) -> dict[str, Any]:
    """What moe2 adds to a completion: energy, timing and the experts (dropped ones with why)."""
    return {
        "energy_j": final.energy_j, "latency_s": final.latency_s, "ttft_s": final.ttft_s,
        "app": final.app, "coordinator_id": final.coordinator_id,
        "finish_reason": final.finish_reason,
        "experts": [{"id": e.id, "weight": e.weight, "tokens": e.tokens,
                     "energy_j": e.energy_j, "dropped": e.dropped, "reason": e.reason}
                    for e in final.experts],
    }


def completion_object(kind: Kind, cid: str, created: int, model: str,
                      final: wire.FinalReply) -> dict[str, Any]:
    """The non-streamed answer: a ``chat.completion`` or a ``text_completion``."""
    if kind == "chat":
        choice: dict[str, Any] = {
            "index": 0, "message": {"role": "assistant", "content": final.text, "refusal": None},
            "logprobs": None, "finish_reason": finish_reason(final)}
        obj = "chat.completion"
    else:
        choice = {"text": final.text, "index": 0, "logprobs": None,
                  "finish_reason": finish_reason(final)}
        obj = "text_completion"
    return {"id": cid, "object": obj, "created": created, "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT, "choices": [choice],
            "usage": usage(final), "moe2": moe2_extra(final)}


def sse(obj: Any) -> bytes:
    """One server-sent event carrying ``obj`` as JSON."""
    return b"data: " + _json.encode(obj) + b"\n\n"


class ChunkFormatter:
    """The SSE events of one streamed completion, exactly as OpenAI sends them. The text
    events -- one per token -- are two constant byte strings around the JSON-encoded text
    (the same bytes :meth:`chunk` + :func:`sse` would make, checked by the unit tests)."""

    def __init__(self, kind: Kind, cid: str, created: int, model: str,
                 include_usage: bool) -> None:
        self.kind = kind
        self.cid = cid
        self.created = created
        self.model = model
        self.include_usage = include_usage
        marker = "\x00moe2-text\x00"
        template = sse(self.chunk(self._choice(marker)))
        quoted = _json.encode(marker)
        self._before, self._after = template.split(quoted)

    def _choice(self, text: str | None, reason: str | None = None, *,
                role: bool = False) -> dict[str, Any]:
        if self.kind == "completion":
            return {"text": text or "", "index": 0, "logprobs": None, "finish_reason": reason}
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}

    def chunk(self, choice: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.cid,
            "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": self.created, "model": self.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [] if choice is None else [choice]}
        if self.include_usage:
            out["usage"] = None
        out.update(extra)
        return out

    def start(self) -> bytes:
        """A chat stream opens with the assistant's role and empty content; a text
        completion's opens with its first text."""
        return sse(self.chunk(self._choice("", role=True))) if self.kind == "chat" else b""

    def text(self, text: str) -> bytes:
        return self._before + _json.encode(text) + self._after

    def end(self, final: wire.FinalReply) -> bytes:
        """The finish chunk (with the ``moe2`` object), the usage chunk when asked for, and
        ``[DONE]``."""
        last = self._choice(None if self.kind == "chat" else "", finish_reason(final))
        out = sse(self.chunk(last, moe2=moe2_extra(final)))
        if self.include_usage:
            out += sse(self.chunk(None, usage=usage(final)))
        return out + SSE_DONE


def error_event(err: ApiError) -> bytes:
    """A failure after the stream began (status 200 is sent): an ``error`` object as the last
    event, which OpenAI's SDKs raise as an APIError; no ``[DONE]`` follows."""
    return sse(err.body())
