"""The gateway's pure mappings: OpenAI request -> PhoneRequest, FinalReply -> completion object,
SSE chunks, error mapping, models from the plan (issue 15)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from moe2.gateway import openai_api as oa
from moe2.shared import wire

MSG = [{"role": "user", "content": "hi"}]


def chat(**body: Any) -> oa.Parsed:
    return oa.parse_chat({"model": "moe2-default", "messages": MSG, **body})


def final(**kw: Any) -> wire.FinalReply:
    base: dict[str, Any] = {
        "text": "Paris.", "tokens": 3, "finish_reason": "stop", "ttft_s": 0.01,
        "latency_s": 0.2, "energy_j": 1.5, "app": "chat", "coordinator_id": "c0",
        "prompt_tokens": 9,
        "experts": [wire.ExpertUsage(id="e0", weight=0.75, tokens=3, energy_j=1.0, dropped=False),
                    wire.ExpertUsage(id="e1", weight=0.25, tokens=1, energy_j=0.5, dropped=True,
                                     reason="missed the 2.00s step deadline")]}
    base.update(kw)
    return wire.FinalReply(**base)


# --------------------------------------------------------------------------- requests


def test_chat_request_becomes_a_phone_request() -> None:
    p = oa.parse_chat({
        "model": "moe2-chat", "temperature": 0.5, "top_p": 0.9, "seed": 7, "stop": "\n",
        "max_tokens": 12, "stream": True, "stream_options": {"include_usage": True},
        "user": "ignored", "metadata": {"x": 1}, "n": 1, "logprobs": False,
        "messages": [{"role": "developer", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "a"},
                                                  {"type": "text", "text": "b"}]},
                     {"role": "assistant", "content": None, "name": "bot"}]})
    assert (p.kind, p.model, p.stream, p.include_usage) == ("chat", "moe2-chat", True, True)
    r = p.request
    assert r.messages == [wire.ChatMessage("system", "be brief"), wire.ChatMessage("user", "ab"),
                          wire.ChatMessage("assistant", "")]
    assert (r.temperature, r.top_p, r.seed, r.stop, r.max_tokens) == (0.5, 0.9, 7, ["\n"], 12)
    assert r.prompt is None and not r.raw


def test_chat_defaults_follow_openai() -> None:
    r = oa.parse_chat({"model": "m", "messages": MSG}, default_max_tokens=99).request
    assert (r.temperature, r.top_p, r.seed, r.stop, r.max_tokens) == (1.0, 1.0, None, None, 99)
    assert not chat(stream_options={"include_usage": True}).include_usage  # not streaming


def test_max_completion_tokens_wins_and_top_p_zero_is_greedy() -> None:
    r = chat(max_tokens=5, max_completion_tokens=7, top_p=0).request
    assert r.max_tokens == 7
    assert 0 < r.top_p <= oa.TOP_P_GREEDY


def test_completion_request_is_raw_text_by_default() -> None:
    p = oa.parse_completion({"model": "moe2-default", "prompt": ["Q: 1+1? A:"], "stream": True,
                             "temperature": 0})
    assert (p.kind, p.stream) == ("completion", True)
    assert (p.request.prompt, p.request.raw, p.request.max_tokens) == ("Q: 1+1? A:", True, 16)
    assert not oa.parse_completion({"model": "m", "prompt": "x", "raw": False}).request.raw


@pytest.mark.parametrize(("body", "param"), [
    ({"n": 2}, "n"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"function_call": "auto"}, "function_call"),
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 2}, "logprobs"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"presence_penalty": -1}, "presence_penalty"),
    ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": 1.5}, "max_completion_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"top_p": 1.5}, "top_p"),
    ({"seed": -1}, "seed"),
    ({"stop": [1]}, "stop"),
    ({"stop": ["x"] * 17}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": []}, "stream_options"),
    ({"model": None}, "model"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages[0]"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "1"}]}]}, "messages[0]"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
])
def test_what_moe2_cannot_do_is_a_clear_400(body: dict[str, Any], param: str) -> None:
    with pytest.raises(oa.ApiError) as info:
        oa.parse_chat({"model": "moe2-default", "messages": MSG, **body})
    err = info.value
    assert (err.status, err.param, err.type) == (400, param, "invalid_request_error")
    assert err.message


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": [1, 2]}, "prompt"), ({}, "prompt"),
    ({"prompt": "x", "echo": True}, "echo"), ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "best_of": 2}, "best_of"), ({"prompt": "x", "logprobs": 3}, "logprobs"),
    ({"prompt": "x", "n": 3}, "n"),
])
def test_completion_refusals(body: dict[str, Any], param: str) -> None:
    with pytest.raises(oa.ApiError) as info:
        oa.parse_completion({"model": "moe2-default", **body})
    assert (info.value.status, info.value.param) == (400, param)


@pytest.mark.parametrize("body", [[], "x", None, 3])
def test_a_body_that_is_not_an_object_is_refused(body: Any) -> None:
    for parse in (oa.parse_chat, oa.parse_completion):
        with pytest.raises(oa.ApiError) as info:
            parse(body)
        assert info.value.status == 400


# --------------------------------------------------------------------------- errors


def test_every_coordinator_error_code_has_a_status() -> None:
    assert set(oa.REPLY_STATUS) == set(wire.ErrorCode)


@pytest.mark.parametrize(("code", "status", "type_"), [
    (wire.ErrorCode.BAD_REQUEST, 400, "invalid_request_error"),
    (wire.ErrorCode.PROMPT_TOO_LONG, 400, "invalid_request_error"),
    (wire.ErrorCode.TOO_MANY_REQUESTS, 429, "rate_limit_error"),
    (wire.ErrorCode.RATE_LIMITED, 429, "rate_limit_error"),
    (wire.ErrorCode.NO_EXPERTS, 503, "server_error"),
    (wire.ErrorCode.SHUTTING_DOWN, 503, "server_error"),
    (wire.ErrorCode.TIMEOUT, 504, "server_error"),
    (wire.ErrorCode.INTERNAL, 500, "server_error"),
])
def test_coordinator_errors_map_to_http(code: wire.ErrorCode, status: int, type_: str) -> None:
    err = oa.error_for_reply(wire.ErrorReplyPhone(code=code, message="why"))
    assert err.body() == {"error": {"message": "why", "type": type_, "param": None,
                                    "code": code.value}}
    assert err.status == status


@pytest.mark.parametrize("code", ["no_coordinator", "coordinator_lost", "connection_lost",
                                  "not_connected", "not_authorized", "something_new"])
def test_requests_the_phone_client_gave_up_on_are_503(code: str) -> None:
    err = oa.error_for_ask(code, "m")
    assert (err.status, err.code, err.type) == (503, code, "server_error")


def test_timeout_404_and_401_shapes() -> None:
    t = oa.timeout_error(3.0)
    assert (t.status, t.code) == (504, "timeout")
    m = oa.model_not_found("gpt-4")
    assert (m.status, m.param, m.code, m.type) == (404, "model", "model_not_found",
                                                   "invalid_request_error")
    assert oa.ApiError(401, "no").type == "authentication_error"


# --------------------------------------------------------------------------- models


def plan() -> wire.PlanMsg:
    ap = wire.AppPlan(experts=["e0", "e1"], feasible=True, loss=1.0, latency_s=0.01,
                      energy_j=0.1, max_latency_s=0.25)
    return wire.PlanMsg(coordinator_id="c0", ts=1700000000.5, method="smo", max_energy_j=None,
                        apps={"chat": ap, "default": wire.AppPlan(
                            experts=["e0"], feasible=True, loss=1.0, latency_s=0.01,
                            energy_j=0.1)}, joint=ap)


def test_one_model_per_application_class_with_its_experts() -> None:
    listed = oa.models_list(plan())
    assert listed["object"] == "list"
    assert [m["id"] for m in listed["data"]] == ["moe2-chat", "moe2-default"]
    chat_model = listed["data"][0]
    assert chat_model["object"] == "model" and chat_model["owned_by"] == "moe2"
    assert chat_model["created"] == 1700000000
    assert chat_model["moe2"] == {"app": "chat", "experts": ["e0", "e1"], "feasible": True,
                                  "max_latency_s": 0.25}
    assert oa.app_of_model("moe2-chat", plan()) == "chat"
    with pytest.raises(oa.ApiError) as info:
        oa.app_of_model("moe2-assistant", plan())
    assert info.value.status == 404


def test_without_a_plan_the_default_class_is_served() -> None:
    assert [m["id"] for m in oa.models_list(None)["data"]] == ["moe2-default"]
    assert oa.app_of_model("moe2-default", None) == "default"


# --------------------------------------------------------------------------- responses


def test_chat_completion_object() -> None:
    obj = oa.completion_object("chat", "chatcmpl-1", 5, "moe2-chat", final())
    assert obj["object"] == "chat.completion"
    assert obj["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Paris.",
                                                       "refusal": None},
                               "logprobs": None, "finish_reason": "stop"}]
    assert obj["usage"] == {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
    extra = obj["moe2"]
    assert (extra["energy_j"], extra["latency_s"], extra["ttft_s"]) == (1.5, 0.2, 0.01)
    assert extra["experts"][1] == {"id": "e1", "weight": 0.25, "tokens": 1, "energy_j": 0.5,
                                   "dropped": True, "reason": "missed the 2.00s step deadline"}
    assert (obj["id"], obj["created"], obj["model"]) == ("chatcmpl-1", 5, "moe2-chat")


def test_text_completion_object_and_finish_reasons() -> None:
    obj = oa.completion_object("completion", "cmpl-1", 5, "m", final(finish_reason="length",
                                                                      prompt_tokens=None))
    assert obj["object"] == "text_completion"
    assert obj["choices"] == [{"text": "Paris.", "index": 0, "logprobs": None,
                               "finish_reason": "length"}]
    assert obj["usage"]["prompt_tokens"] == 0
    assert oa.finish_reason(final(finish_reason="stop")) == "stop"


def events(data: bytes) -> list[Any]:
    assert data.endswith(b"\n\n")
    out = []
    for block in data.decode().split("\n\n")[:-1]:
        assert block.startswith("data: ")
        body = block[len("data: "):]
        out.append(body if body == "[DONE]" else json.loads(body))
    return out


@pytest.mark.parametrize("text", ["x", 'quote " and \\ and \n', "日本語 🙂", "", "\x00\x1f"])
@pytest.mark.parametrize("kind", ["chat", "completion"])
@pytest.mark.parametrize("include_usage", [False, True])
def test_text_chunks_are_the_bytes_of_the_chunk_object(text: str, kind: oa.Kind,
                                                       include_usage: bool) -> None:
    fmt = oa.ChunkFormatter(kind, "id-1", 7, "moe2-chat", include_usage)
    choice: dict[str, Any] = ({"index": 0, "delta": {"content": text}, "logprobs": None,
                               "finish_reason": None} if kind == "chat" else
                              {"text": text, "index": 0, "logprobs": None,
                               "finish_reason": None})
    assert fmt.text(text) == oa.sse(fmt.chunk(choice))
    [ev] = events(fmt.text(text))
    assert ev["object"] == ("chat.completion.chunk" if kind == "chat" else "text_completion")
    assert (ev["id"], ev["created"], ev["model"]) == ("id-1", 7, "moe2-chat")
    assert ("usage" in ev) == include_usage and ev.get("usage") is None


def test_a_chat_stream_as_openai_sends_it() -> None:
    fmt = oa.ChunkFormatter("chat", "c", 1, "m", include_usage=True)
    stream = fmt.start() + fmt.text("Par") + fmt.text("is.") + fmt.end(final())
    evs = events(stream)
    assert evs[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None}]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in evs[1:3]) == "Paris."
    finish = evs[3]
    assert finish["choices"] == [{"index": 0, "delta": {}, "logprobs": None,
                                  "finish_reason": "stop"}]
    assert finish["moe2"]["experts"][0]["id"] == "e0" and finish["usage"] is None
    assert evs[4]["choices"] == [] and evs[4]["usage"] == {
        "prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
    assert evs[5] == "[DONE]"
    assert all(e["id"] == "c" for e in evs[:5])


def test_a_text_completion_stream_and_no_usage_chunk_unless_asked() -> None:
    fmt = oa.ChunkFormatter("completion", "c", 1, "m", include_usage=False)
    assert fmt.start() == b""
    evs = events(fmt.text("ab") + fmt.end(final(finish_reason="length")))
    assert [e["choices"][0]["text"] for e in evs[:2]] == ["ab", ""]
    assert evs[1]["choices"][0]["finish_reason"] == "length"
    assert "usage" not in evs[0] and evs[2] == "[DONE]"


def test_an_error_after_the_stream_began_is_an_error_event() -> None:
    err = oa.error_for_reply(wire.ErrorReplyPhone(code=wire.ErrorCode.NO_EXPERTS, message="m"))
    [ev] = events(oa.error_event(err))
    assert ev == {"error": {"message": "m", "type": "server_error", "param": None,
                            "code": "no_experts"}}
