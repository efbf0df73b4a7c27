"""Shared helpers for tests that talk to agents: an MQTT RPC client that speaks to agents the
way a coordinator does, a llama-cpp-python reference, a fake engine, and in-process daemons.

Nothing here sleeps for a fixed time to "let things settle": every wait is a bounded wait for
a condition (:func:`wait_until`, :meth:`AgentRpcClient.wait_status`), and a timeout is a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import aiomqtt
import msgspec
import numpy as np
import numpy.typing as npt

from moe2.agent.daemon import AgentDaemon
from moe2.agent.engine import DecodeJob, EngineError, ModelInfo
from moe2.agent.meters import EnergyMeter, ManualMeter
from moe2.shared import wire
from moe2.shared.config import AgentConfig
from moe2.shared.mqtt import (
    get_prop,
    make_client,
    parse_broker_url,
    payload_bytes,
    response_properties,
)
from moe2.shared.topics import Topics

F64 = npt.NDArray[np.float64]
M = TypeVar("M", bound=msgspec.Struct)

DEFAULT_TIMEOUT_S = 15.0


async def wait_until(pred: Callable[[], bool], timeout_s: float, what: str = "condition") -> None:
    """Poll ``pred`` until it holds; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------------- MQTT RPC client


@dataclass
class StatusEvent:
    agent_id: str
    status: wire.AgentStatus
    retained: bool


class AgentRpcClient:
    """An async MQTT 5 client that opens sessions, steps them and collects agents' replies.

    Requests go to an agent's RPC topic with a Response Topic (this client's coordinator inbox)
    and fresh Correlation Data; :meth:`request` returns the :class:`wire.Reply` that carries the
    same correlation data. Every agent status message seen is kept in :attr:`statuses`.

    ``async with AgentRpcClient(broker.url) as c:`` -- the client owns one reader task; leaving
    the context cancels it. A second ``async with`` is an error.
    """

    def __init__(self, broker_url: str, *, topics: Topics | None = None,
                 name: str | None = None) -> None:
        self.topics = topics or Topics()
        self.name = name or f"test-{uuid.uuid4().hex[:10]}"
        self.inbox = self.topics.coordinator_inbox(self.name).topic
        self._client = make_client(parse_broker_url(broker_url), identifier=self.name)
        self._pending: dict[bytes, asyncio.Future[wire.Reply]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._entered = False
        self.statuses: list[StatusEvent] = []
        self._status_changed = asyncio.Event()
        self.stray_replies: list[bytes] = []

    async def __aenter__(self) -> AgentRpcClient:
        if self._entered:
            raise RuntimeError("AgentRpcClient can be entered once")
        self._entered = True
        await self._client.__aenter__()
        await self._client.subscribe(self.inbox, qos=0)
        await self._client.subscribe(self.topics.all_agent_status, qos=1)
        self._reader = asyncio.create_task(self._read(), name=f"{self.name}-reader")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._reader
        for fut in self._pending.values():
            fut.cancel()
        with contextlib.suppress(aiomqtt.MqttError):
            await self._client.__aexit__(exc_type, exc, tb)

    async def _read(self) -> None:
        async for m in self._client.messages:
            data = payload_bytes(m)
            topic = str(m.topic)
            if topic == self.inbox:
                corr = get_prop(m, "CorrelationData")
                fut = self._pending.pop(bytes(corr), None) if corr is not None else None
                if fut is None or fut.done():
                    self.stray_replies.append(data)
                    continue
                try:
                    fut.set_result(wire.decode_as(data, wire.Reply))
                except wire.DecodeError as exc:
                    fut.set_exception(exc)
                continue
            agent_id = self.topics.agent_id_of(topic)
            if agent_id is None or not data:
                continue
            try:
                st = wire.decode_as(data, wire.AgentStatus)
            except wire.DecodeError:
                continue
            self.statuses.append(StatusEvent(agent_id, st, bool(m.retain)))
            self._status_changed.set()

    # -------------------------------------------------------------- presence
    def status_mark(self) -> int:
        """A position in :attr:`statuses`; pass it as ``since`` to wait for later messages."""
        return len(self.statuses)

    async def wait_status(self, agent_id: str, state: str = "online", *, since: int = 0,
                          timeout_s: float = DEFAULT_TIMEOUT_S) -> StatusEvent:
        """The first status of ``agent_id`` in ``state`` received at or after ``since``."""
        deadline = time.monotonic() + timeout_s
        while True:
            for ev in self.statuses[since:]:
                if ev.agent_id == agent_id and ev.status.state == state:
                    return ev
            left = deadline - time.monotonic()
            if left <= 0:
                seen = [(e.agent_id, e.status.state) for e in self.statuses[since:]]
                raise AssertionError(
                    f"no {state!r} status from {agent_id!r} within {timeout_s}s (saw {seen})")
            self._status_changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._status_changed.wait(), timeout=min(left, 0.5))

    # -------------------------------------------------------------- RPC
    async def request(self, agent_id: str, msg: msgspec.Struct | bytes, *,
                      timeout_s: float = DEFAULT_TIMEOUT_S) -> wire.Reply:
        """Send one Open/Step/Close (or raw bytes) and wait for the correlated reply."""
        corr = uuid.uuid4().bytes
        fut: asyncio.Future[wire.Reply] = asyncio.get_running_loop().create_future()
        self._pending[corr] = fut
        await self.send(agent_id, msg, correlation=corr)
        try:
            return await asyncio.wait_for(fut, timeout=timeout_s)
        except asyncio.TimeoutError:
            raise AssertionError(f"agent {agent_id!r} did not reply within {timeout_s}s") from None
        finally:
            self._pending.pop(corr, None)

    async def send(self, agent_id: str, msg: msgspec.Struct | bytes, *,
                   correlation: bytes | None = None, reply: bool = True) -> None:
        """Publish without waiting (``reply=False``: no Response Topic, the agent stays silent)."""
        data = msg if isinstance(msg, bytes) else wire.encode(msg)
        props = response_properties(self.inbox if reply else None, correlation)
        await self._client.publish(self.topics.agent_rpc(agent_id), data, qos=0,
                                   properties=props)

    async def open(self, agent_id: str, session_id: str, *, k: int, prompt: str | None = None,
                   messages: Sequence[tuple[str, str]] | None = None,
                   tokens: Sequence[int] | None = None, raw: bool = False,
                   timeout_s: float = DEFAULT_TIMEOUT_S) -> wire.Reply:
        msg = wire.OpenSession(
            session_id=session_id, k=k, prompt=prompt,
            messages=None if messages is None else [
                wire.ChatMessage(role=r, content=c) for r, c in messages],
            tokens=None if tokens is None else [int(t) for t in tokens], raw=raw,
        )
        return await self.request(agent_id, msg, timeout_s=timeout_s)

    async def step(self, agent_id: str, items: Sequence[wire.StepItem], *,
                   timeout_s: float = DEFAULT_TIMEOUT_S) -> wire.Reply:
        return await self.request(agent_id, wire.Step(items=list(items)), timeout_s=timeout_s)

    async def step_one(self, agent_id: str, session_id: str, token: int, seq: int, k: int
                       ) -> wire.Distribution:
        """Step one session and return its distribution (fails on any error item)."""
        reply = await self.step(agent_id, [wire.StepItem(session_id, int(token), seq, k)])
        assert not reply.errors, reply.errors
        assert len(reply.dists) == 1
        return reply.dists[0]

    async def close_sessions(self, agent_id: str, session_ids: Sequence[str]) -> None:
        """Closes get no reply; this only publishes."""
        await self.send(agent_id, wire.CloseSession(session_ids=list(session_ids)), reply=False)

    async def greedy(self, agent_id: str, session_id: str, *, k: int, n_steps: int,
                     tokens: Sequence[int] | None = None, prompt: str | None = None,
                     follow: Sequence[int] | None = None) -> list[wire.Distribution]:
        """Open a session and step it ``n_steps`` times: with the tokens in ``follow`` when
        given, else greedily (each reply's most probable id). Returns seq 0..n_steps."""
        reply = await self.open(agent_id, session_id, k=k, tokens=tokens, prompt=prompt)
        assert not reply.errors, reply.errors
        dists = [reply.dists[0]]
        for seq in range(1, n_steps + 1):
            tok = follow[seq - 1] if follow is not None else top_id(dists[-1])
            dists.append(await self.step_one(agent_id, session_id, tok, seq, k))
        return dists


async def read_retained(broker_url: str, topic: str, kind: type[M], *,
                        timeout_s: float = DEFAULT_TIMEOUT_S) -> M | None:
    """The retained message on ``topic`` as seen by a new subscriber (None when there is none:
    a subscriber gets retained messages first, so a live one arriving first means none)."""
    async with make_client(parse_broker_url(broker_url)) as c:
        await c.subscribe(topic, qos=1)

        async def first() -> M | None:
            async for m in c.messages:
                return wire.decode_as(payload_bytes(m), kind) if m.retain else None
            return None

        try:
            return await asyncio.wait_for(first(), timeout=timeout_s)
        except asyncio.TimeoutError:
            return None


# --------------------------------------------------------------------------- distributions


def top_id(d: wire.Distribution) -> int:
    """The most probable token of a reply (ids are sorted by probability; k=0 is id order)."""
    probs = d.prob_array()
    return int(d.id_array()[0]) if d.ids else int(np.argmax(probs))


def softmax64(logits: npt.ArrayLike) -> F64:
    x = np.asarray(logits, dtype=np.float64)
    z = np.exp(x - x.max())
    out: F64 = z / z.sum()
    return out


def assert_not_degenerate(p: F64) -> None:
    """A distribution a comparison can trust: normalised, not one-hot, not flat, not zeros."""
    assert abs(float(p.sum()) - 1.0) < 1e-6, p.sum()
    assert float(p.max()) < 0.99, p.max()
    entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum())
    assert 0.05 < entropy < math.log(p.shape[0]) - 0.05, entropy


def assert_dist_matches(d: wire.Distribution, ref: F64, k: int, *, atol: float = 1e-5) -> None:
    """``d`` (an agent's reply, top-``k`` or the full vocabulary for k=0) equals ``ref``."""
    probs = d.prob_array().astype(np.float64)
    if k == 0:
        assert d.ids == b"", "a full-vocabulary reply carries no ids"
        assert probs.shape == ref.shape
        np.testing.assert_allclose(probs, ref, rtol=0, atol=atol)
        assert abs(d.rest_mass) < 1e-9
        return
    order = np.argsort(-ref, kind="stable")[:k]
    assert d.id_array().tolist() == order.tolist()
    np.testing.assert_allclose(probs, ref[order], rtol=0, atol=atol)
    assert abs(d.rest_mass - (1.0 - float(ref[order].sum()))) < atol


# --------------------------------------------------------------------------- llama reference


def llama_greedy(path: str | os.PathLike[str], prompt_tokens: Sequence[int], n_steps: int, *,
                 n_ctx: int = 256, kv_type: str = "f16", n_threads: int | None = None,
                 follow: Sequence[int] | None = None) -> tuple[list[int], list[F64]]:
    """Evaluate with a plain ``llama_cpp.Llama`` (flash attention off, its default): the
    float64 softmax after the prompt and after each of ``n_steps`` tokens, chosen greedily
    unless ``follow`` gives them. Returns (tokens fed after the prompt, distributions)."""
    import llama_cpp

    kv = {"f16": llama_cpp.GGML_TYPE_F16, "f32": llama_cpp.GGML_TYPE_F32}[kv_type]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads,
                          type_k=kv, type_v=kv, flash_attn=False, verbose=False)
    try:
        n_vocab = llm.n_vocab()

        def last() -> F64:
            ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
            return softmax64(np.ctypeslib.as_array(ptr, shape=(n_vocab,)))

        llm.eval(list(prompt_tokens))
        dists = [last()]
        fed: list[int] = []
        for i in range(n_steps):
            tok = int(follow[i]) if follow is not None else int(np.argmax(dists[-1]))
            llm.eval([tok])
            fed.append(tok)
            dists.append(last())
        return fed, dists
    finally:
        llm.close()


def llama_tokenize(path: str | os.PathLike[str], text: str, *, add_bos: bool = True,
                   special: bool = False) -> list[int]:
    """llama.cpp's own tokenisation of ``text`` (vocabulary only, no context)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, vocab_only=True, verbose=False)
    try:
        return list(llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special))
    finally:
        llm.close()


# --------------------------------------------------------------------------- fake engine


@dataclass
class FakeEngine:
    """An :class:`~moe2.agent.engine.Engine` without llama.cpp.

    Logits are a deterministic function of a sequence's whole token history, so a daemon that
    mixes up sessions, positions or batches produces different numbers. ``decode`` checks that
    each job continues its sequence at the right position (as llama.cpp's KV cache requires)
    and records every call's job sizes in :attr:`calls`. ``on_decode`` runs inside each decode
    (tests use it to move a :class:`ManualMeter`).
    """

    n_vocab: int = 64
    n_ctx: int = 128
    chat_template: str | None = None
    on_decode: Callable[[Sequence[DecodeJob]], None] | None = None
    fail_next: bool = False
    evaluated_tokens: int = 0
    calls: list[list[int]] = field(default_factory=list)
    freed: list[int] = field(default_factory=list)
    history: dict[int, list[int]] = field(default_factory=dict)
    info: ModelInfo = field(init=False)

    def __post_init__(self) -> None:
        pieces = tuple(b"" if i < 3 else bytes([97 + (i - 3) % 26]) * (1 + (i - 3) // 26)
                       for i in range(self.n_vocab))
        self.info = ModelInfo(
            name="fake", quant="F32", n_vocab=self.n_vocab, n_ctx=self.n_ctx, bos_id=1,
            eos_id=2, vocab_fp="fake-" + hashlib.sha256(b"".join(pieces)).hexdigest()[:8],
            chat_template=self.chat_template, n_params=0, pieces=pieces,
        )

    def tokenize(self, text: str, *, add_bos: bool, parse_special: bool) -> list[int]:
        ids = [3 + b % (self.n_vocab - 3) for b in text.encode("utf-8")]
        return ([1] if add_bos else []) + ids

    def render_chat(self, messages: Sequence[tuple[str, str]]) -> str:
        return "".join(f"[{r}]{c}\n" for r, c in messages) + "[assistant]"

    def logits_for(self, history: Sequence[int]) -> npt.NDArray[np.float32]:
        seed = int.from_bytes(hashlib.sha256(np.asarray(history, "<i4").tobytes()).digest()[:8],
                              "little")
        rng = np.random.default_rng(seed)
        return (2.0 * rng.standard_normal(self.n_vocab)).astype(np.float32)

    def decode(self, jobs: Sequence[DecodeJob]) -> list[npt.NDArray[np.float32]]:
        if self.fail_next:
            self.fail_next = False
            raise EngineError("injected decode failure")
        if len({j.seq_id for j in jobs}) != len(jobs):
            raise EngineError("a sequence appears twice in one decode call")
        out = []
        for j in jobs:
            h = self.history.setdefault(j.seq_id, [])
            if j.pos0 != len(h):
                raise EngineError(f"seq {j.seq_id}: pos0 {j.pos0} but {len(h)} cached")
            if len(h) + len(j.tokens) > self.n_ctx:  # as llama.cpp's per-sequence KV stream
                raise EngineError(f"seq {j.seq_id}: no room for {len(j.tokens)} more tokens")
            h.extend(int(t) for t in j.tokens)
            out.append(self.logits_for(h))
        self.calls.append([len(j.tokens) for j in jobs])
        self.evaluated_tokens += sum(len(j.tokens) for j in jobs)
        if self.on_decode is not None:
            self.on_decode(jobs)
        return out

    def free(self, seq_id: int) -> None:
        self.freed.append(seq_id)
        self.history.pop(seq_id, None)

    def remove_from(self, seq_id: int, pos: int) -> None:
        del self.history.setdefault(seq_id, [])[pos:]

    def cached_positions(self, seq_id: int) -> int:
        return len(self.history.get(seq_id, []))

    def close(self) -> None:
        pass


class MeteredEngine:
    """Wraps a real engine: records each decode call's job sizes and adds
    ``joules_per_call + joules_per_token * tokens`` to a :class:`ManualMeter` inside the call,
    so tests know the exact energy delta of every decode window."""

    def __init__(self, inner: Any, meter: ManualMeter, *, joules_per_call: float = 0.5,
                 joules_per_token: float = 0.1) -> None:
        self.inner = inner
        self.info: ModelInfo = inner.info
        self.meter = meter
        self.joules_per_call = joules_per_call
        self.joules_per_token = joules_per_token
        self.calls: list[list[int]] = []
        self.energy_per_call: list[float] = []

    @property
    def evaluated_tokens(self) -> int:
        n: int = self.inner.evaluated_tokens
        return n

    def tokenize(self, text: str, *, add_bos: bool, parse_special: bool) -> list[int]:
        out: list[int] = self.inner.tokenize(text, add_bos=add_bos, parse_special=parse_special)
        return out

    def render_chat(self, messages: Sequence[tuple[str, str]]) -> str:
        out: str = self.inner.render_chat(messages)
        return out

    def bos_text(self) -> str:
        out: str = self.inner.bos_text()
        return out

    def decode(self, jobs: Sequence[DecodeJob]) -> list[npt.NDArray[np.float32]]:
        out: list[npt.NDArray[np.float32]] = self.inner.decode(jobs)
        joules = self.joules_per_call + self.joules_per_token * sum(len(j.tokens) for j in jobs)
        self.meter.add_energy(joules)
        self.calls.append([len(j.tokens) for j in jobs])
        self.energy_per_call.append(joules)
        return out

    def free(self, seq_id: int) -> None:
        self.inner.free(seq_id)

    def remove_from(self, seq_id: int, pos: int) -> None:
        self.inner.remove_from(seq_id, pos)

    def cached_positions(self, seq_id: int) -> int:
        n: int = self.inner.cached_positions(seq_id)
        return n

    def close(self) -> None:
        self.inner.close()


# --------------------------------------------------------------------------- in-process daemon


def agent_config(agent_id: str = "d0", **kw: Any) -> AgentConfig:
    """An AgentConfig for an in-process daemon (the model path is not read by the daemon)."""
    kw.setdefault("telemetry_interval_s", 60.0)
    return AgentConfig(id=agent_id, model=kw.pop("model", "unused.gguf"), **kw)


def make_daemon(cfg: AgentConfig, engine: Any, broker_url: str, *,
                meter: EnergyMeter | None = None, **kw: Any) -> AgentDaemon:
    url = parse_broker_url(broker_url)

    def factory(will: aiomqtt.Will) -> aiomqtt.Client:
        return make_client(url, identifier=f"moe2-agent-{cfg.id}-{uuid.uuid4().hex[:6]}",
                           will=will, keepalive_s=5)

    return AgentDaemon(cfg, engine, meter or ManualMeter(), factory, **kw)


@contextlib.asynccontextmanager
async def running(daemon: AgentDaemon, *, timeout_s: float = DEFAULT_TIMEOUT_S
                  ) -> AsyncIterator[AgentDaemon]:
    """Run ``daemon.run()`` as a task until the block ends; then stop it and await it."""
    task = asyncio.create_task(daemon.run(), name=f"daemon-{daemon.cfg.id}")
    try:
        await wait_until(lambda: daemon.connections >= 1 or task.done(), timeout_s,
                         "the daemon to connect")
        if task.done():
            task.result()
            raise AssertionError("daemon.run() returned before connecting")
        yield daemon
    finally:
        daemon.request_stop()
        try:
            code = await asyncio.wait_for(task, timeout=timeout_s)
        except asyncio.TimeoutError:
            raise AssertionError("daemon did not stop after request_stop()") from None
        assert code == 0
