"""The one wire module: every message that crosses MQTT, typed, tagged and versioned.

Agent <-> coordinator traffic is MessagePack; phones may use JSON or MessagePack (chosen by
the MQTT 5 content type). Every struct is frozen and rejects unknown fields; decoders are built
once at import and every failure surfaces as :class:`DecodeError` and nothing else, so a hostile
payload can never raise anything a receive loop does not expect.

Probability vectors travel as little-endian float32 bytes and token ids as int32 bytes: a
full-vocabulary distribution of 32k entries is 128 KiB this way instead of ~290 KiB of msgpack
floats, and it decodes with ``numpy.frombuffer`` without a Python loop.
"""

from __future__ import annotations

import enum
import json
import math
from typing import Any, Literal, TypeVar

import msgspec
import numpy as np
import numpy.typing as npt

PROTOCOL_VERSION = 1
PHONE_API_VERSION = 1

CONTENT_TYPE_MSGPACK = "application/msgpack"
CONTENT_TYPE_JSON = "application/json"


class DecodeError(ValueError):
    """A payload that is not a valid message of the expected kind and version."""


class UnsupportedVersionError(DecodeError):
    """A well-formed message of a protocol version this side does not speak."""


class ErrorCode(str, enum.Enum):
    """Typed error codes shared by agents, coordinators and phones."""

    MALFORMED = "malformed"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_SESSION = "unknown_session"
    SESSION_EXISTS = "session_exists"
    BAD_K = "bad_k"
    BAD_TOKEN = "bad_token"
    BAD_REQUEST = "bad_request"
    PROMPT_TOO_LONG = "prompt_too_long"
    CONTEXT_FULL = "context_full"
    TOO_MANY_SESSIONS = "too_many_sessions"
    TOO_MANY_REQUESTS = "too_many_requests"
    RATE_LIMITED = "rate_limited"
    NO_EXPERTS = "no_experts"
    VOCAB_MISMATCH = "vocab_mismatch"
    SHUTTING_DOWN = "shutting_down"
    TIMEOUT = "timeout"
    INTERNAL = "internal"
    #: the phone cancelled its request (a ``cancel`` message): the coordinator stopped
    CANCELLED = "cancelled"


class _Strict(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="type", omit_defaults=True
):
    pass


def _check_version(v: int) -> None:
    if v != PROTOCOL_VERSION:
        raise ValueError(
            f"protocol version {v} is not supported (this side speaks {PROTOCOL_VERSION})")


# --------------------------------------------------------------------------- agent presence


class ChatMessage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    role: str
    content: str


class AgentStatus(_Strict, tag="status", frozen=True):
    """Retained on ``agents/{id}/status``; the ``offline`` form is also the Last Will."""

    agent_id: str
    state: Literal["online", "offline"]
    model: str = ""
    quant: str = ""
    n_ctx: int = 0
    n_vocab: int = 0
    vocab_fp: str = ""
    bos_id: int = -1
    eos_id: int = -1
    chat_template: bool = False
    device: str = ""
    meter: str = ""
    version: str = ""
    max_sessions: int = 0
    ts: float = 0.0
    v: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        _check_version(self.v)


class LatencyBin(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    """Median per-token step latency for contexts up to ``ctx_upto`` tokens."""

    ctx_upto: int
    latency_s: float
    n: int


class Telemetry(_Strict, tag="telemetry", frozen=True):
    agent_id: str
    ts: float
    power_w: float
    energy_j: float
    tokens_total: int
    tokens_per_s: float
    joules_per_token: float
    step_latency_s: float
    open_sessions: int
    meter: str
    latency_by_ctx: list[LatencyBin] = []
    temperature_c: float | None = None
    #: speculative decodes so far: hits, misses, and the decode time and joules misses wasted
    spec_hits: int = 0
    spec_misses: int = 0
    spec_wasted_s: float = 0.0
    spec_wasted_j: float = 0.0
    v: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        _check_version(self.v)


class Vocab(_Strict, tag="vocab", frozen=True):
    """Retained on ``agents/{id}/vocab``: each token id's text bytes (as llama.cpp renders
    it, control tokens empty), so a coordinator can stream text without a tokenizer of its own.
    Published once per connection; coordinators cache it by fingerprint. The ids are the
    vocabulary family's: a model's trailing padding is not part of it. ``eog_ids`` are the
    tokens that end a generation (EOS, EOT, ``<|im_end|>``...)."""

    agent_id: str
    vocab_fp: str
    pieces: list[bytes]
    eog_ids: list[int] = []
    v: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        _check_version(self.v)


# --------------------------------------------------------------------------- agent RPC


class OpenSession(_Strict, tag="open", frozen=True):
    """Start a session: tokenise, evaluate the prompt, reply with the first distribution (seq 0).

    Exactly one of ``prompt``, ``messages`` and ``tokens`` is given. ``raw`` skips the chat
    template. ``k`` is how many top tokens to return per step; 0 means the full vocabulary.
    ``text``: the session will follow text (steps with ``append``), so the agent does not
    speculate on its tokens. ``speculate``: the coordinator's hint that the agent's own next
    token may well be the fused one -- its expert weighs at least its fair share (1/n of the
    request's experts); a low-weight expert's guess rarely is (``moe2 bench speculation``).
    """

    session_id: str
    k: int
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tokens: list[int] | None = None
    raw: bool = False
    text: bool = False
    speculate: bool = True
    v: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        _check_version(self.v)
        given = sum(x is not None for x in (self.prompt, self.messages, self.tokens))
        if given != 1:
            raise ValueError("exactly one of prompt, messages, tokens is required")
        if not self.session_id or len(self.session_id) > 128:
            raise ValueError("session_id must be 1..128 characters")


class ScoreAnswer(_Strict, tag="score", frozen=True):
    """Teacher forcing in one message (``moe2 calibrate``): the agent tokenises the prompt as
    an open does and ``continuation`` as this model would continue that prompt (its own
    tokenizer: ``tokens(prompt + continuation)`` past the prompt's own tokens), appends its EOS
    when ``eos``, and replies with one :class:`Distribution` (``seq`` 0) whose ``ids`` are
    those answer tokens and ``probs`` the probability of each after everything before it.
    No session stays open."""

    session_id: str
    continuation: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    raw: bool = False
    eos: bool = True
    v: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        _check_version(self.v)
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of prompt, messages is required")
        if not self.session_id or len(self.session_id) > 128:
            raise ValueError("session_id must be 1..128 characters")


class StepItem(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    """Append ``token`` to ``session_id`` and return the next distribution, tagged ``seq``.

    Text mode (experts of several tokenizers fused, see :mod:`moe2.agent.textmode`):
    ``append`` carries the bytes just emitted and ``token`` is the agent's own token whose text
    is exactly its pending bytes + ``append`` when the coordinator knows one, else -1; the
    reply is healed by the bytes the agent keeps pending (``Distribution.pending``)."""

    session_id: str
    token: int
    seq: int
    k: int
    append: bytes | None = None
    #: worth speculating on the next token (see :attr:`OpenSession.speculate`)
    speculate: bool = True


class Step(_Strict, tag="step", frozen=True):
    """Steps due for one agent in the same tick travel as one message."""

    items: list[StepItem]
    v: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        _check_version(self.v)
        if not self.items:
            raise ValueError("a step carries at least one item")


class CloseSession(_Strict, tag="close", frozen=True):
    """End sessions; with ``report`` the agent first replies with each one's context
    (tests and debugging: what the agent's KV cache holds, as text)."""

    session_ids: list[str]
    report: bool = False
    v: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        _check_version(self.v)


class Distribution(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Next-token probabilities of one session after step ``seq``.

    ``probs`` are float32 LE, from a temperature-1 softmax over the true logits; ``ids`` are
    int32 LE and empty when the full vocabulary is sent in id order (k = 0). ``rest_mass`` is the
    probability outside the returned ids. ``n_evaluated`` counts the tokens the engine decoded
    for this step (1 for a step when the KV cache works; the prompt length at open).
    ``energy_j`` is the meter's delta over the decode window, shared among the sessions in it.
    """

    session_id: str
    seq: int
    probs: bytes
    ids: bytes = b""
    rest_mass: float = 0.0
    n_past: int = 0
    n_evaluated: int = 0
    energy_j: float = 0.0
    latency_s: float = 0.0
    #: text mode: the emitted bytes this agent holds without a token yet (the ids and probs
    #: are then conditioned on the next token's text beginning with them)
    pending: bytes = b""
    #: the agent's speculative decode for this step (agent/speculation.py): 0 none, 1 hit (no
    #: decode waited for), 2 miss; ``energy_j`` includes a miss's wasted decode, ``wasted_j``
    spec: int = 0
    wasted_j: float = 0.0

    def __post_init__(self) -> None:
        if len(self.probs) % 4 or len(self.ids) % 4:
            raise ValueError("probs and ids must be whole 4-byte values")
        if self.ids and len(self.ids) != len(self.probs):
            raise ValueError("ids and probs differ in length")

    def prob_array(self) -> npt.NDArray[np.float32]:
        return np.frombuffer(self.probs, dtype="<f4")

    def id_array(self) -> npt.NDArray[np.int32]:
        """Token ids of ``prob_array``; for a full-vocabulary reply, 0..n_vocab-1."""
        if not self.ids:
            return np.arange(len(self.probs) // 4, dtype=np.int32)
        return np.frombuffer(self.ids, dtype="<i4")

    @staticmethod
    def pack_probs(a: npt.ArrayLike) -> bytes:
        return np.ascontiguousarray(a, dtype="<f4").tobytes()

    @staticmethod
    def pack_ids(a: npt.ArrayLike) -> bytes:
        return np.ascontiguousarray(a, dtype="<i4").tobytes()


class ErrorItem(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    code: ErrorCode
    message: str
    session_id: str | None = None
    seq: int | None = None


class SessionContext(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a session's KV cache holds, as its tokens' texts: the prompt part, the answer part
    (tokens after the prompt) and the bytes still pending (a ``CloseSession`` with report)."""

    session_id: str
    prompt: bytes
    answer: bytes
    pending: bytes
    tokens: int


class Reply(_Strict, tag="reply", frozen=True):
    """An agent's answer to one Open/Step/Close message: distributions and typed errors."""

    agent_id: str
    dists: list[Distribution] = []
    errors: list[ErrorItem] = []
    contexts: list[SessionContext] = []
    v: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        _check_version(self.v)


# --------------------------------------------------------------------------- coordinator


class AppPlan(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    experts: list[str] | None
    feasible: bool
    loss: float | None
    latency_s: float | None
    energy_j: float | None
    max_latency_s: float | None = None
    #: loss minus the planner's proven lower bound (nats per token; 0: optimal; None: no bound)
    gap: float | None = None


class PlanMsg(_Strict, tag="plan", frozen=True):
    """Retained on ``plan``: the expert set each application class may use."""

    coordinator_id: str
    ts: float
    method: str
    max_energy_j: float | None
    apps: dict[str, AppPlan]
    joint: AppPlan
    loss_source: str = "prior"
    #: what every set's latency includes for messaging (seconds per token; see liveplan)
    step_overhead_s: float = 0.0
    #: what the operator must know about the fleet (e.g. gate experts no agent matches)
    warnings: list[str] = []
    #: vocabulary family (fingerprint) -> the online experts in it
    families: dict[str, list[str]] = {}
    v: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        _check_version(self.v)


class CoordinatorStatus(_Strict, tag="coordinator", frozen=True):
    coordinator_id: str
    state: Literal["online", "offline"]
    gate: str = "uniform"
    version: str = ""
    ts: float = 0.0
    v: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        _check_version(self.v)


class InflightMarker(_Strict, tag="inflight", frozen=True):
    """Retained on ``coordinators/{id}/inflight/{request_id}`` while a coordinator serves one
    request: how to reach the phone if that coordinator dies (a surviving one tells it).
    Coordinator-to-coordinator only (phones never see it)."""

    coordinator_id: str
    incarnation: str
    client_id: str
    response_topic: str
    correlation: bytes | None = None
    content_type: str | None = None
    #: the request's key (see RequestClaim): a survivor that holds a copy of it answers that
    #: copy instead of telling the phone to retry
    request_key: str = ""
    v: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        _check_version(self.v)


#: a request key is this many hex characters (see moe2.coordinator.once.request_key)
REQUEST_KEY_CHARS = 32
#: bounds of names that travel in claims and heartbeats (a node is a broker's host:port)
MAX_NODE_CHARS = 255
MAX_INCARNATION_CHARS = 64


def _check_peer_fields(node: str, incarnation: str, ts: float) -> None:
    if not 0 < len(node) <= MAX_NODE_CHARS:
        raise ValueError(f"node must be 1..{MAX_NODE_CHARS} characters")
    if not 0 < len(incarnation) <= MAX_INCARNATION_CHARS:
        raise ValueError(f"incarnation must be 1..{MAX_INCARNATION_CHARS} characters")
    if not math.isfinite(ts):
        raise ValueError("ts must be finite")


class CoordinatorHeartbeat(_Strict, tag="heartbeat", frozen=True):
    """Published (QoS 0, not retained, with a short Message Expiry) every few seconds on
    ``coordinators/{id}/heartbeat``: the broker *node* this coordinator takes phones' requests
    from, and whether it takes them now. Every coordinator builds its view of the nodes from
    these (see :mod:`moe2.coordinator.once`); a retained status cannot serve, since it stays
    ``online`` on the far side of a partition."""

    coordinator_id: str
    node: str
    incarnation: str
    accepting: bool = True
    ts: float = 0.0
    #: seconds to the next heartbeat (a peer that misses three has left the view)
    interval_s: float = 1.0
    #: copies of requests it holds for another node, and requests it is answering: both 0
    #: means nothing more will come from it for the requests it has seen (tests and benches
    #: wait for that before they count duplicates)
    held: int = 0
    serving: int = 0
    v: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        _check_version(self.v)
        _check_peer_fields(self.node, self.incarnation, self.ts)
        if not 0 < self.interval_s < math.inf:
            raise ValueError("interval_s must be a positive number of seconds")


class RequestClaim(_Strict, tag="claim", frozen=True):
    """Published (QoS 1, not retained, Message Expiry = the claim TTL) on
    ``coordinators/{id}/claims`` when a coordinator answers a phone request: ``key`` names the
    request (:func:`moe2.coordinator.once.request_key`) whichever broker's copy it came from.
    ``ts`` is the claimer's wall clock, ``rank`` the position of its node in its ranking for
    this key (0: it served at once; more: a fallback); ``done``: the claimer has answered
    already (a refusal, or a claim sent again after the final). Coordinator-to-coordinator
    only."""

    key: str
    coordinator_id: str
    node: str
    incarnation: str
    ts: float
    rank: int = 0
    done: bool = False
    v: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        _check_version(self.v)
        _check_peer_fields(self.node, self.incarnation, self.ts)
        if len(self.key) != REQUEST_KEY_CHARS or any(c not in "0123456789abcdef"
                                                     for c in self.key):
            raise ValueError(f"key must be {REQUEST_KEY_CHARS} lowercase hex characters")
        if not 0 <= self.rank <= 1024:
            raise ValueError("rank must be in 0..1024")


AgentInbound = OpenSession | Step | CloseSession | ScoreAnswer
AnyAgentMsg = (OpenSession | Step | CloseSession | ScoreAnswer | Reply | AgentStatus | Telemetry
               | PlanMsg | CoordinatorStatus | Vocab | InflightMarker | CoordinatorHeartbeat
               | RequestClaim)

_encoder = msgspec.msgpack.Encoder()
_agent_inbound = msgspec.msgpack.Decoder(AgentInbound)
_any = msgspec.msgpack.Decoder(AnyAgentMsg)

T = TypeVar("T")


def encode(msg: msgspec.Struct) -> bytes:
    """MessagePack bytes of a protocol message."""
    return _encoder.encode(msg)


def _wrap(exc: Exception) -> DecodeError:
    text = str(exc) or type(exc).__name__
    if "protocol version" in text:
        return UnsupportedVersionError(text)
    return DecodeError(text)


#: what msgspec raises on input it cannot decode (a deep nesting or huge integer included)
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError,
                  RecursionError, OverflowError)


def decode_agent_inbound(data: bytes) -> OpenSession | Step | CloseSession | ScoreAnswer:
    """Decode what a coordinator sends an agent; anything else raises :class:`DecodeError`."""
    try:
        msg: OpenSession | Step | CloseSession | ScoreAnswer = _agent_inbound.decode(data)
        return msg
    except _DECODE_ERRORS as exc:
        raise _wrap(exc) from None


_typed_decoders: dict[type[Any], msgspec.msgpack.Decoder[Any]] = {}


def decode_as(data: bytes, kind: type[T]) -> T:
    """Decode one message of a known kind (status, telemetry, reply, plan ...)."""
    dec = _typed_decoders.get(kind)
    if dec is None:
        dec = _typed_decoders[kind] = msgspec.msgpack.Decoder(kind)
    try:
        out: T = dec.decode(data)
    except _DECODE_ERRORS as exc:
        raise _wrap(exc) from None
    return out


def decode_any(data: bytes) -> AnyAgentMsg:
    try:
        msg: AnyAgentMsg = _any.decode(data)
        return msg
    except _DECODE_ERRORS as exc:
        raise _wrap(exc) from None


# --------------------------------------------------------------------------- phone API


#: bounds of a request's ``stop`` (checked at decode: the reply is a typed ``bad_request``)
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


class PhoneRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a phone publishes on ``requests/{client_id}`` (JSON or MessagePack)."""

    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    app: str = "default"
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | str | None = None
    raw: bool = False
    #: evaluation only (honoured when the coordinator sets ``allow_overrides``): serve with
    #: exactly these experts instead of the app's plan, and/or "uniform" weights (majority
    #: voting) instead of the gate
    experts: list[str] | None = None
    gating: Literal["gate", "uniform"] | None = None
    top_k: int | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of prompt or messages is required")
        if self.messages is not None and not self.messages:
            raise ValueError("messages must not be empty")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if not (0.0 <= self.temperature <= 100.0):
            raise ValueError("temperature must be in [0, 100]")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError("top_p must be in (0, 1]")
        if not self.app or len(self.app) > 64:
            raise ValueError("app must be 1..64 characters")
        if self.seed is not None and self.seed < 0:
            raise ValueError("seed must be >= 0")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        # every stop string is searched for after every token: bounded like the prompt
        if len(stops) > MAX_STOP_STRINGS or any(len(x) > MAX_STOP_CHARS for x in stops):
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} strings of at most "
                             f"{MAX_STOP_CHARS} characters")
        if self.messages is not None and any(len(m.role) > 64 for m in self.messages):
            raise ValueError("a message role must be at most 64 characters")
        if self.experts is not None and len(self.experts) > 256:
            raise ValueError("experts lists at most 256 names")

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]


class ExpertUsage(msgspec.Struct, frozen=True):
    id: str
    weight: float
    tokens: int
    energy_j: float
    dropped: bool
    reason: str | None = None
    #: the expert's speculative decodes in this request: steps answered from one (hits),
    #: speculations thrown away (misses) and their joules (included in ``energy_j``)
    spec_hits: int = 0
    spec_misses: int = 0
    spec_wasted_j: float = 0.0


class TokenChunk(msgspec.Struct, frozen=True, tag_field="type", tag="token"):
    index: int
    text: str


class FinalReply(msgspec.Struct, frozen=True, tag_field="type", tag="final"):
    text: str
    tokens: int
    finish_reason: str
    ttft_s: float | None
    latency_s: float
    energy_j: float
    experts: list[ExpertUsage]
    app: str = "default"
    coordinator_id: str = ""
    #: tokens of the prompt as the first (heaviest) expert tokenised it, chat template and
    #: BOS included (its first distribution's ``n_past``); None when no expert reported it
    prompt_tokens: int | None = None


class ErrorReplyPhone(msgspec.Struct, frozen=True, tag_field="type", tag="error"):
    code: ErrorCode
    message: str


class PhoneCancel(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="type",
                  tag="cancel"):
    """What a phone publishes on ``cancel/{client_id}`` (same MQTT 5 Correlation Data as the
    request, JSON or MessagePack by content type) to stop a request it no longer wants: the
    coordinator serving it stops stepping, closes the agents' sessions and answers with one
    ``cancelled`` error. A cancel for nothing being served is ignored."""


PhoneReply = TokenChunk | FinalReply | ErrorReplyPhone

_phone_req_json = msgspec.json.Decoder(PhoneRequest)
_phone_req_mp = msgspec.msgpack.Decoder(PhoneRequest)
_phone_reply_json = msgspec.json.Decoder(PhoneReply)
_phone_reply_mp = msgspec.msgpack.Decoder(PhoneReply)
_phone_cancel_json = msgspec.json.Decoder(PhoneCancel)
_phone_cancel_mp = msgspec.msgpack.Decoder(PhoneCancel)
_json_encoder = msgspec.json.Encoder()


def is_msgpack(content_type: str | None) -> bool:
    return bool(content_type) and "msgpack" in str(content_type).lower()


def _decode_phone(json_dec: msgspec.json.Decoder[T], mp_dec: msgspec.msgpack.Decoder[T],
                  data: bytes, content_type: str | None) -> T:
    """JSON unless the MQTT 5 content type names MessagePack."""
    try:
        out: T = (mp_dec if is_msgpack(content_type) else json_dec).decode(data)
    except _DECODE_ERRORS as exc:
        raise _wrap(exc) from None
    return out


def decode_phone_request(data: bytes, content_type: str | None) -> PhoneRequest:
    """Decode a phone's request; JSON unless the MQTT 5 content type names MessagePack."""
    return _decode_phone(_phone_req_json, _phone_req_mp, data, content_type)


def decode_phone_cancel(data: bytes, content_type: str | None) -> PhoneCancel:
    """Decode a phone's cancel message; JSON unless the content type names MessagePack."""
    return _decode_phone(_phone_cancel_json, _phone_cancel_mp, data, content_type)


def encode_phone(msg: msgspec.Struct, content_type: str | None) -> bytes:
    """Encode a reply in the phone's own format (the request's content type)."""
    if is_msgpack(content_type):
        return _encoder.encode(msg)
    return _json_encoder.encode(msg)


def decode_phone_reply(data: bytes, content_type: str | None) -> PhoneReply:
    reply: PhoneReply = _decode_phone(_phone_reply_json, _phone_reply_mp, data, content_type)
    return reply


def to_builtins(msg: msgspec.Struct) -> Any:
    """Plain dict/list form (for ``--json`` output)."""
    return json.loads(_json_encoder.encode(msg))
