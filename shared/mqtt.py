"""MQTT session helpers: broker URLs, client construction, reconnect backoff.

aiomqtt 2.x does not reconnect by itself: every long-lived component wraps its session in one
loop (``async for attempt in reconnecting(...)``) with jittered, capped exponential backoff and
re-subscribes inside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, TypeVar
from urllib.parse import unquote, urlsplit

import aiomqtt
import paho.mqtt.client as paho
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

_log = logging.getLogger(__name__)


class BrokerUrlError(ValueError):
    pass


@dataclass(frozen=True)
class BrokerUrl:
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None

    def redacted(self) -> str:
        auth = f"{self.username}:***@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{auth}{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerUrl:
    """``mqtt://[user:pass@]host:port`` or ``mqtts://...`` (default ports 1883 / 8883)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise BrokerUrlError(f"broker URL {url!r} must start with mqtt:// or mqtts://")
    if not parts.hostname:
        raise BrokerUrlError(f"broker URL {url!r} has no host")
    try:
        port = parts.port
    except ValueError as exc:
        raise BrokerUrlError(f"broker URL {url!r}: {exc}") from None
    tls = parts.scheme == "mqtts"
    return BrokerUrl(
        host=parts.hostname,
        port=port or (8883 if tls else 1883),
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


@dataclass(frozen=True)
class TlsOptions:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False


def make_client(
    url: BrokerUrl,
    *,
    identifier: str | None = None,
    will: aiomqtt.Will | None = None,
    tls: TlsOptions | None = None,
    keepalive_s: int = 10,
    clean_start: bool = True,
    max_queued_outgoing: int | None = 10000,
    session_expiry_s: int | None = None,
    quickack: bool = True,
) -> Client:
    """An MQTT 5 client for ``url``; TLS from the URL scheme with an optional private CA.
    ``session_expiry_s`` (with ``clean_start=False``): a persistent session, so that what the
    broker has for this client while it reconnects is kept for it.

    ``quickack``: acknowledge what the broker sends at once (Linux TCP_QUICKACK, re-armed after
    every read). A broker with Nagle's algorithm on its sockets (Mosquitto's default, without
    ``set_tcp_nodelay true``) holds a second small message until the first is acknowledged,
    and a delayed ACK takes 40 ms: two experts' replies to a coordinator cost that every token
    (measured: a fused Qwen2-vocabulary pair 53 ms a token, 12.8 ms with quick ACKs)."""
    tls_context: ssl.SSLContext | None = None
    if url.tls:
        tls_context = ssl.create_default_context(cafile=tls.ca_file if tls else None)
        if tls and tls.cert_file:
            tls_context.load_cert_chain(tls.cert_file, tls.key_file)
        if tls and tls.insecure:
            tls_context.check_hostname = False
            tls_context.verify_mode = ssl.CERT_NONE
    # TCP_NODELAY: paho leaves Nagle on, and Nagle + delayed ACKs turn two small publishes in a
    # row (a token to the phone, then steps to the agents) into a 40 ms stall per token.
    kwargs: dict[str, Any] = {
        "socket_options": ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
    }
    if max_queued_outgoing is not None:
        kwargs["max_queued_outgoing_messages"] = max_queued_outgoing
    if session_expiry_s is not None:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = session_expiry_s
        kwargs["properties"] = props
    client = Client(
        quickack=quickack,
        hostname=url.host,
        port=url.port,
        username=url.username,
        password=url.password,
        identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V5,
        will=will,
        tls_context=tls_context,
        keepalive=keepalive_s,
        clean_start=clean_start,
        **kwargs,
    )
    # Many concurrent requests per connection are normal here (a coordinator, a load test);
    # aiomqtt's default warns past 10 pending publishes.
    client.pending_calls_threshold = 100_000
    return client


#: Linux's TCP_QUICKACK (see :meth:`Client._read_ready`)
QUICKACK_SUPPORTED = hasattr(socket, "TCP_QUICKACK")


def _quickack(sock: Any) -> None:
    with contextlib.suppress(OSError, ValueError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


class Client(aiomqtt.Client):
    """aiomqtt's client plus :meth:`publish_now`, a QoS 0 publish written to the socket at once.

    aiomqtt hands every outgoing packet to the event loop as a writer callback (paho's
    ``on_socket_register_write``): the bytes leave one to two loop iterations later, after a
    ``call_soon_threadsafe`` self-pipe wake-up and an ``epoll_ctl`` pair, and the publishing
    task resumes another iteration after that. On the token path (a step to every expert, a
    distribution back, every generated token) that is paid on each hop; ``publish_now`` writes
    the packet in the caller's loop iteration instead, the way paho itself does when it owns
    the loop. It only claims writes that its own call queues; what the socket does not take at
    once (a partial write) goes to a writer as before, so paho's single FIFO keeps the order.

    Writers asked for on the loop thread are added at once, not through aiomqtt's
    ``call_soon_threadsafe``: in that one-iteration window the socket can be closed and its
    file descriptor reused by another connection, and a writer added then would stay on the
    new socket and spin the loop (an aiomqtt race; ``publish_now`` would be one more way in).
    Registrations from other threads (paho's CONNECT, sent from aiomqtt's executor) keep
    aiomqtt's path.
    """

    def __init__(self, *args: Any, quickack: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # binds the running loop: we are on its thread
        self._loop_thread = threading.get_ident()
        self._paho: paho.Client = self._client
        self._deferred_register = self._paho.on_socket_register_write
        self._claim = False
        self._claimed = False
        self._paho.on_socket_register_write = self._register_write
        self._aiomqtt_open: Callable[[paho.Client, Any, Any], None] | None = None
        if quickack and QUICKACK_SUPPORTED:
            self._aiomqtt_open = self._paho.on_socket_open
            self._paho.on_socket_open = self._socket_open

    def _socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        """aiomqtt's reader, then ours in its place (scheduled after it, from paho's thread)."""
        if self._aiomqtt_open is not None:
            self._aiomqtt_open(client, userdata, sock)
        self._loop.call_soon_threadsafe(self._loop.add_reader, sock.fileno(), self._read_ready,
                                        sock)
        _quickack(sock)

    def _read_ready(self, sock: Any) -> None:
        """aiomqtt's reader callback, then TCP_QUICKACK again: Linux leaves quick-ACK mode
        after a few segments, and the next reply must be acknowledged at once too."""
        try:
            while True:
                self._paho.loop_read()
                pending = getattr(self._paho._sock, "pending", None)  # SSL: decoded bytes left
                if pending is not None and pending() > 0:
                    continue
                break
        except Exception as exc:  # noqa: BLE001 - handed to the session as the disconnect cause
            self._fail(exc)
            return
        _quickack(sock)

    def _register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if self._claim:
            self._claimed = True  # publish_now writes it below, in this same iteration
            return
        if threading.get_ident() == self._loop_thread:
            self._loop.add_writer(sock.fileno(), self._write_ready)
        elif self._deferred_register is not None:
            self._deferred_register(client, userdata, sock)

    def _write_ready(self) -> None:
        """The writer callback, as aiomqtt's: a failed write ends the connection."""
        try:
            self._paho.loop_write()
        except Exception as exc:  # noqa: BLE001 - handed to the session as the disconnect cause
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if not self._disconnected.done():
            self._disconnected.set_exception(exc)

    def publish_now(self, topic: str, payload: bytes, *,
                    properties: Properties | None = None) -> None:
        """Publish at QoS 0 and write it before returning (call on the event-loop thread).

        Raises :class:`aiomqtt.MqttError` when paho refuses it (not connected) or the write
        finds the connection broken (the session then ends and reconnects as usual). QoS 0 has
        no acknowledgement and paho no queue limit for it: what the socket cannot take waits in
        paho's queue for the writer, and a dead link is dropped by the keepalive."""
        self._claim = True
        try:
            info = self._paho.publish(topic, payload, 0, False, properties)
        finally:
            self._claim = False
        rc = paho.MQTT_ERR_SUCCESS
        error: Exception | None = None
        if self._claimed:
            self._claimed = False
            # Inside a paho callback (paho holds its non-reentrant callback lock) writing here
            # would deadlock in on_publish: paho's own _packet_queue makes the same check.
            lock = self._paho._in_callback_mutex
            if lock.acquire(False):
                lock.release()
                try:
                    rc = self._paho.loop_write()
                except Exception as exc:  # noqa: BLE001 - raised below as the publish's error
                    error = exc
            # paho marked the socket as waiting for a writer before we claimed the write: what
            # is still queued (partial write, the callback case) needs the writer after all.
            sock = self._paho.socket()
            if self._paho.want_write() and sock is not None:
                self._loop.add_writer(sock.fileno(), self._write_ready)
        if error is not None:
            self._fail(error)
            raise aiomqtt.MqttError(f"Could not publish message: {error}") from error
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
        if rc != paho.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(rc, "Could not publish message")


class MqttClient(Protocol):
    """What the daemons use of an MQTT 5 client: :class:`Client` on a real broker, the
    in-memory transport (:mod:`moe2.tools.fleet.memory`) in tests. One context per
    connection; ``messages`` raises :class:`aiomqtt.MqttError` when the connection ends."""

    async def __aenter__(self) -> Any: ...

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> Any: ...

    @property
    def messages(self) -> AsyncIterator[aiomqtt.Message]: ...

    async def subscribe(self, topic: str, qos: int = 0, *args: Any, **kwargs: Any) -> Any: ...

    async def unsubscribe(self, topic: str, *args: Any, **kwargs: Any) -> Any: ...

    async def publish(self, topic: str, payload: bytes | None = None, qos: int = 0,
                      retain: bool = False, properties: Properties | None = None,
                      *args: Any, **kwargs: Any) -> Any: ...

    def publish_now(self, topic: str, payload: bytes, *,
                    properties: Properties | None = None) -> None: ...


async def publish_qos0(client: MqttClient | aiomqtt.Client, topic: str, payload: bytes, *,
                       properties: Properties | None = None,
                       timeout_s: float | None = None) -> None:
    """QoS 0 publish on the token path: written at once by a client with ``publish_now``
    (which never waits, so ``timeout_s`` does not apply), through aiomqtt's ordinary publish
    (waiting up to ``timeout_s`` for the write) for a plain aiomqtt client."""
    now = getattr(client, "publish_now", None)
    if now is not None:
        now(topic, payload, properties=properties)
        return
    await client.publish(topic, payload, qos=0, properties=properties, timeout=timeout_s)


class MessageReader:
    """The one long-lived consumer of a client's messages, for code that waits with a deadline.

    aiomqtt 2.5's ``MessagesIterator.__anext__`` takes the message off its queue in a task of
    its own; when the wait around it is cancelled in the iteration in which that task finished
    (``asyncio.wait_for(anext(messages), t)`` timing out just as a message arrives), the message
    is gone. A retained status is sent once, so losing it made ``moe2 reproduce`` wait for an
    agent that was online. Here one task reads ``client.messages`` for the whole connection and
    keeps what it read in a deque; :meth:`next` waits for *something to be there* with a
    deadline and only then takes it, synchronously -- a timeout or a cancellation can never
    drop a message.

    ``async with MessageReader(client) as reader: m = await reader.next(timeout_s=1.0)``.
    """

    def __init__(self, client: aiomqtt.Client, *, name: str = "mqtt-reader") -> None:
        self._client = client
        self._name = name
        self._items: deque[aiomqtt.Message] = deque()
        self._ready = asyncio.Event()
        self._error: aiomqtt.MqttError | None = None
        self._closed = False
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> MessageReader:
        if self._task is not None:
            raise RuntimeError("a MessageReader can be entered once")
        self._task = asyncio.create_task(self._run(), name=self._name)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])

    async def _run(self) -> None:
        try:
            async for m in self._client.messages:
                self._items.append(m)
                self._ready.set()
        except aiomqtt.MqttError as exc:
            self._error = exc
        finally:
            self._closed = True
            self._ready.set()

    def __len__(self) -> int:
        return len(self._items)

    async def next(self, timeout_s: float | None = None) -> aiomqtt.Message | None:
        """The next message; None when none came within ``timeout_s`` (None: wait forever).
        Raises :class:`aiomqtt.MqttError` once the connection ended and everything received
        before that was read."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while not self._items:
            if self._closed:
                raise self._error or aiomqtt.MqttError("the message reader stopped")
            self._ready.clear()
            if deadline is None:
                await self._ready.wait()
                continue
            left = deadline - loop.time()
            if left <= 0:
                return None
            # Cancelling this wait loses nothing: a message is only taken below, after it.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._ready.wait(), left)
        return self._items.popleft()


class Backoff:
    """Jittered, capped exponential backoff (full jitter). ``reset()`` after a good session."""

    def __init__(
        self, initial_s: float = 0.2, cap_s: float = 5.0, rng: random.Random | None = None
    ) -> None:
        self.initial_s = initial_s
        self.cap_s = cap_s
        self._attempt = 0
        self._rng = rng or random.Random()

    def next_delay_s(self) -> float:
        ceiling = min(self.cap_s, self.initial_s * (2**self._attempt))
        self._attempt = min(self._attempt + 1, 30)
        return self._rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self._attempt = 0


def response_properties(
    response_topic: str | None = None,
    correlation_data: bytes | None = None,
    content_type: str | None = None,
) -> Properties:
    """MQTT 5 PUBLISH properties for request/response."""
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if response_topic is not None:
        props.ResponseTopic = response_topic
    if correlation_data is not None:
        props.CorrelationData = correlation_data
    if content_type is not None:
        props.ContentType = content_type
    return props


def get_prop(message: aiomqtt.Message, name: str) -> Any:
    """A PUBLISH property of a received message, or None."""
    props = message.properties
    if props is None:
        return None
    return getattr(props, name, None)


def payload_bytes(message: aiomqtt.Message) -> bytes:
    p = message.payload
    if isinstance(p, (bytes, bytearray)):
        return bytes(p)
    if isinstance(p, str):
        return p.encode()
    if p is None:
        return b""
    return str(p).encode()


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], grace_s: float = 3.0) -> None:
    """Cancel ``tasks`` and wait for them; cancel again whatever is still running after
    ``grace_s``. A task that owns an ``async with aiomqtt.Client`` runs the client's graceful
    disconnect when cancelled, and that disconnect waits without a timeout: a second
    cancellation is what ends a shutdown whose broker no longer answers."""
    pending = [t for t in tasks if not t.done()]
    for t in pending:
        t.cancel()
    if not pending:
        return
    _done, still = await asyncio.wait(pending, timeout=grace_s)
    for t in still:
        t.cancel()
    if still:
        await asyncio.wait(still, timeout=grace_s)


C = TypeVar("C", bound=MqttClient)

#: CONNACK reason codes that mean "these credentials are not accepted" (MQTT 3.1.1: 4 bad
#: username or password, 5 not authorised; MQTT 5: 134, 135, 138 banned, 140 bad auth method)
AUTH_REFUSALS = frozenset({4, 5, 134, 135, 138, 140})
#: refusals of the credentials in a row after which a daemon gives up (exit code 2)
MAX_AUTH_REFUSALS = 3


class BrokerRefusedError(RuntimeError):
    """The broker refused this client's credentials again and again: retrying cannot help, the
    configuration must change (daemons exit with code 2; systemd shows the failure)."""


def refusal_code(exc: BaseException) -> int | None:
    """The CONNACK reason code of a refused connection, or None for any other failure."""
    if not isinstance(exc, MqttConnectError):
        return None
    rc = exc.rc
    value = getattr(rc, "value", rc)
    return value if isinstance(value, int) else None


async def run_session(
    new_client: Callable[[], C],
    on_connect: Callable[[C], Awaitable[None]],
    on_message: Callable[[aiomqtt.Message], None],
    on_lost: Callable[[], None],
    name: str,
    *,
    max_auth_refusals: int | None = MAX_AUTH_REFUSALS,
) -> None:
    """The one reconnect loop (STYLE.md 2): connect, ``on_connect`` (subscribe, publish status),
    hand every message to ``on_message``; when the broker goes away call ``on_lost`` and retry
    after a jittered, capped backoff. Runs until cancelled. A message handler that raises is
    logged, never allowed to end the session.

    A connection the broker *refuses* is reported as such (not as "lost"); after
    ``max_auth_refusals`` refusals of the credentials in a row it raises
    :class:`BrokerRefusedError` instead of retrying forever with credentials that cannot work.
    """
    backoff = Backoff()
    refusals = 0
    while True:
        client = new_client()
        try:
            async with client:
                refusals = 0
                await on_connect(client)
                backoff.reset()
                async for message in client.messages:
                    try:
                        on_message(message)
                    except Exception:  # noqa: BLE001 - one bad message must not end the session
                        _log.exception("%s: message on %s not handled", name, message.topic)
        except aiomqtt.MqttError as exc:
            on_lost()
            delay = backoff.next_delay_s()
            code = refusal_code(exc)
            if code is None:
                _log.warning("%s: broker connection lost (%s); retrying in %.1fs", name, exc,
                             delay)
            elif code in AUTH_REFUSALS:
                refusals += 1
                if max_auth_refusals is not None and refusals >= max_auth_refusals:
                    raise BrokerRefusedError(
                        f"the broker refused the credentials {refusals} times ({exc}): check "
                        "the user name and password in the broker URL and the broker's "
                        "password file and ACL") from None
                _log.error("%s: the broker refused the connection (%s); retrying in %.1fs",
                           name, exc, delay)
            else:
                _log.warning("%s: the broker refused the connection (%s); retrying in %.1fs",
                             name, exc, delay)
            await asyncio.sleep(delay)
        finally:
            on_lost()
