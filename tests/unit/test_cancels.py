"""The phone protocol's cancel message: wire form, topics, and early cancels (pure)."""

from __future__ import annotations

import msgspec
import pytest

from moe2.coordinator.cancels import EarlyCancels
from moe2.shared import wire
from moe2.shared.topics import Topics


@pytest.mark.parametrize("ct", [None, wire.CONTENT_TYPE_JSON, wire.CONTENT_TYPE_MSGPACK])
def test_cancel_round_trips_in_both_phone_formats(ct: str | None) -> None:
    data = wire.encode_phone(wire.PhoneCancel(), ct)
    assert isinstance(wire.decode_phone_cancel(data, ct), wire.PhoneCancel)
    if not wire.is_msgpack(ct):
        assert data == b'{"type":"cancel"}'


@pytest.mark.parametrize("bad", [b"", b'{"type":"token"}', b'{"type":"cancel","x":1}',
                                 b"\xff", b"[1]"])
def test_anything_else_is_refused_as_a_decode_error(bad: bytes) -> None:
    with pytest.raises(wire.DecodeError):
        wire.decode_phone_cancel(bad, None)


def test_cancel_topics() -> None:
    tp = Topics("r")
    assert tp.cancel("alice") == "r/cancel/alice"
    assert tp.all_cancels == "r/cancel/+"
    assert tp.client_of_cancel("r/cancel/alice") == "alice"
    assert tp.client_of_cancel("r/cancel/a/b") is None
    assert tp.client_of_cancel("r/requests/a") is None
    assert tp.response("alice", "gw") == "r/responses/alice/gw"
    assert tp.responses_of_every_client("gw") == "r/responses/+/gw"
    assert tp.response_allowed("alice", tp.response("alice", "gw"))


def test_final_reply_reports_prompt_tokens_and_old_finals_still_decode() -> None:
    f = wire.FinalReply(text="a", tokens=1, finish_reason="stop", ttft_s=None, latency_s=0.1,
                        energy_j=0.0, experts=[], prompt_tokens=7)
    back = wire.decode_phone_reply(wire.encode_phone(f, None), None)
    assert isinstance(back, wire.FinalReply) and back.prompt_tokens == 7
    old = msgspec.json.encode({"type": "final", "text": "a", "tokens": 1, "finish_reason": "stop",
                               "ttft_s": None, "latency_s": 0.1, "energy_j": 0.0, "experts": []})
    back = wire.decode_phone_reply(old, None)
    assert isinstance(back, wire.FinalReply) and back.prompt_tokens is None


def test_early_cancels_are_used_once_and_expire() -> None:
    book = EarlyCancels(ttl_s=10.0, capacity=2)
    book.add(("a", b"1"), now_s=0.0)
    assert book.take(("a", b"1"), now_s=1.0)
    assert not book.take(("a", b"1"), now_s=1.0)  # used up
    book.add(("a", b"2"), now_s=0.0)
    assert not book.take(("a", b"2"), now_s=10.0)  # expired
    assert not book.take(("b", b"2"), now_s=0.0)  # another client's


def test_early_cancels_are_bounded() -> None:
    book = EarlyCancels(ttl_s=100.0, capacity=3)
    for i in range(10):
        book.add(("a", bytes([i])), now_s=float(i))
    assert len(book) == 3
    assert not book.take(("a", b"\x00"), now_s=10.0)  # the oldest went first
    assert book.take(("a", b"\x09"), now_s=10.0)
