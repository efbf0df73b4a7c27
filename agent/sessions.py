"""Session bookkeeping for the agent: pure decisions, no llama.cpp and no MQTT.

A session owns one KV-cache sequence id in the engine. :class:`SessionTable` validates every
request against the bounds (max sessions, max context, k range, token range, step order) and
returns typed errors instead of raising into the receive loop.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

from moe2.shared.wire import ErrorCode, ErrorItem


@dataclass
class Session:
    session_id: str
    seq_id: int
    n_past: int = 0
    last_seq: int = 0
    last_used_s: float = 0.0
    k: int = 0
    busy: bool = False
    #: tokens admitted but not decoded yet (the prompt at open, one a step): they count
    #: against the context when later steps of the same batch are admitted
    pending: int = 0
    #: every token in the KV cache, the prompt's first (``n_prompt`` of them)
    tokens: list[int] = field(default_factory=list)
    n_prompt: int = 0
    #: text mode: emitted bytes without a token yet, and the logits they are healed from
    pending_bytes: bytes = b""
    last_logits: Any = None
    #: follows text (a text-mode step came): never speculated on
    text_mode: bool = False
    #: the coordinator's hint with the last open or step: speculation is worth it
    speculate: bool = True


class SessionError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def item(self, session_id: str | None, seq: int | None) -> ErrorItem:
        return ErrorItem(code=self.code, message=self.message, session_id=session_id, seq=seq)


@dataclass
class SessionTable:
    max_sessions: int
    n_ctx: int
    n_vocab: int
    max_k: int
    sessions: dict[str, Session] = field(default_factory=dict)
    _free: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        # a heap: the lowest free KV sequence first, so the sessions open at once hold
        # consecutive ids -- llama.cpp puts consecutive sequences of one batch into one ubatch
        self._free = list(range(self.max_sessions))

    def check_k(self, k: int) -> None:
        if not (0 <= k <= min(self.max_k, self.n_vocab)):
            raise SessionError(
                ErrorCode.BAD_K,
                f"k={k} is out of range: use 0 (full vocabulary) to "
                f"{min(self.max_k, self.n_vocab)}",
            )

    def check_tokens(self, tokens: list[int]) -> None:
        for t in tokens:
            if not (0 <= t < self.n_vocab):
                raise SessionError(ErrorCode.BAD_TOKEN,
                                   f"token id {t} is outside 0..{self.n_vocab - 1}")

    def open(self, session_id: str, n_prompt: int, k: int, now_s: float) -> Session:
        """Reserve a KV sequence for a new session with an ``n_prompt``-token prompt."""
        self.check_k(k)
        if session_id in self.sessions:
            raise SessionError(ErrorCode.SESSION_EXISTS, f"session {session_id!r} is already open")
        if n_prompt < 1:
            raise SessionError(ErrorCode.BAD_REQUEST, "the prompt has no tokens")
        if n_prompt >= self.n_ctx:
            raise SessionError(
                ErrorCode.PROMPT_TOO_LONG,
                f"prompt has {n_prompt} tokens; this agent's context holds {self.n_ctx} "
                f"(at most {self.n_ctx - 1} prompt tokens)",
            )
        if not self._free:
            raise SessionError(
                ErrorCode.TOO_MANY_SESSIONS,
                f"all {self.max_sessions} sessions are in use; retry later",
            )
        # The prompt counts against the context from now on: steps of this session that
        # arrive in the same batch as its open are checked before the prompt is decoded.
        s = Session(session_id, heapq.heappop(self._free), n_past=0, last_seq=0,
                    last_used_s=now_s, k=k, pending=n_prompt)
        self.sessions[session_id] = s
        return s

    def step(self, session_id: str, token: int, seq: int, k: int, now_s: float, *,
             text: bool = False) -> Session:
        s = self.sessions.get(session_id)
        if s is None:
            raise SessionError(ErrorCode.UNKNOWN_SESSION, f"no open session {session_id!r}")
        self.check_k(k)
        if not (text and token == -1):  # a text-mode step may come without a token hint
            self.check_tokens([token])
        if seq != s.last_seq + 1:
            raise SessionError(
                ErrorCode.BAD_REQUEST, f"step seq {seq} out of order (expected {s.last_seq + 1})"
            )
        if s.n_past + s.pending + 1 > self.n_ctx:
            raise SessionError(
                ErrorCode.CONTEXT_FULL,
                f"session {session_id!r} reached the context of {self.n_ctx}",
            )
        # Admitted: a second step of this session in the same batch (a retry, a duplicate)
        # must follow this one, and this token counts against the context before decoding.
        s.last_seq = seq
        s.pending += 1
        s.last_used_s = now_s
        s.k = k
        return s

    def close(self, session_id: str) -> Session | None:
        s = self.sessions.pop(session_id, None)
        if s is not None:
            heapq.heappush(self._free, s.seq_id)
        return s

    def expired(self, now_s: float, idle_timeout_s: float) -> list[str]:
        # Called on the event loop while the engine thread may open and close sessions: a
        # snapshot (one C-level copy under the GIL), not a live iteration that can fail with
        # "dictionary changed size during iteration" and take the daemon down.
        snapshot = list(self.sessions.items())
        return [sid for sid, s in snapshot
                if not s.busy and now_s - s.last_used_s > idle_timeout_s]
