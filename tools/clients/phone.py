"""A phone-side client of the public request/response API (used by ``moe2 ask``, eval, bench
and tests; also the reference for phone developers).

Publish the request on ``{root}/requests/{client_id}`` with an MQTT 5 Response Topic under
``{root}/responses/{client_id}/`` and Correlation Data; read token chunks, then one final or
error message with the same correlation data.

How a phone learns that its request failed (the rules this client follows, and any phone should):

- A typed ``error`` message: bad input, limits, no expert, and a coordinator that stopped or died
  while serving the request (``shutting_down``; when a coordinator dies, a surviving one sends it
  -- see :mod:`moe2.coordinator.service`).
- The PUBACK of the request (QoS 1) carries MQTT 5 reason code 0x10 "No matching subscribers":
  no coordinator is subscribed, nobody will answer (``check_delivery=True``: raises
  :class:`AskError` with code ``no_coordinator`` at once).
- A request that had no reply yet when something happened that can lose requests in transit
  (MQTT hands a request to one coordinator, and a clean session that ends drops what it had
  not processed yet), and that then stays silent for ``grace_s``: :class:`AskError`
  ``connection_lost`` when the phone's own broker connection dropped (factory mode; counted
  from the reconnect, as a broker restart drops such requests), or ``coordinator_lost`` when a
  coordinator's Last Will arrived (``watch_coordinators=True``: the phone subscribes to
  ``{root}/coordinators/+/status``, which the broker ACL must let phones read). A request that
  already had a reply keeps waiting: a coordinator has it and answers (after a reconnect,
  through the persistent session).
- Silence: nothing at all arrives for ``timeout_s``: ``asyncio.TimeoutError``.

Each request carries fresh correlation data (a retry too: coordinators take a request with the
correlation data and payload of one answered in the last two minutes for a copy of it, see
:mod:`moe2.coordinator.once`); ``request_expiry_s`` gives requests a Message Expiry Interval, so
that brokers and bridge queues drop copies nobody waits for.

A request the caller abandons before its final or error (it stops reading
:meth:`PhoneClient.stream`, is cancelled, or times out) is cancelled upstream: the client
publishes a ``cancel`` message on ``{root}/cancel/{client_id}`` with the request's correlation
data, and the coordinator serving it stops stepping the agents, closes their sessions and
answers ``cancelled`` (read by nobody).

Stop reading at the first final or error; anything later with the same correlation data is a
duplicate (QoS 1 is at-least-once) and is counted in :attr:`PhoneClient.unmatched`.

A phone that must ride out broker restarts passes a client *factory* instead of a client: the
PhoneClient then owns its connection and reconnects (jittered backoff) with a persistent session
(:func:`session_client`), so replies published while it was away are queued for it by the
broker -- across a restart too when the broker persists its state (Debian's default).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import msgspec
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from moe2.shared import wire
from moe2.shared.mqtt import (
    AUTH_REFUSALS,
    MAX_AUTH_REFUSALS,
    Backoff,
    BrokerRefusedError,
    BrokerUrl,
    cancel_and_wait,
    get_prop,
    payload_bytes,
    refusal_code,
    response_properties,
)
from moe2.shared.topics import Topics

_log = logging.getLogger(__name__)

#: MQTT 5 PUBACK reason code: the broker had no subscriber for the message
NO_MATCHING_SUBSCRIBERS = 0x10
#: MQTT 5 PUBACK reason code: the broker's ACL refused the publish (mosquitto 2 sends it)
NOT_AUTHORIZED = 0x87


class AskError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass
class Answer:
    text: str = ""
    chunks: list[wire.TokenChunk] = field(default_factory=list)
    final: wire.FinalReply | None = None
    error: wire.ErrorReplyPhone | None = None
    messages: int = 0  # every reply message received for this request

    def as_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"error": {"code": self.error.code.value, "message": self.error.message}}
        assert self.final is not None
        d: dict[str, Any] = msgspec.to_builtins(self.final)
        d["streamed_text"] = "".join(c.text for c in self.chunks)
        return d


def session_client(url: BrokerUrl, client_id: str, *, session_expiry_s: int = 300,
                   keepalive_s: int = 10) -> aiomqtt.Client:
    """A phone's MQTT 5 client with a persistent session (no clean start, session expiry).

    Plain ``mqtt://`` only; for TLS build the client yourself with the same two settings.
    """
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = session_expiry_s
    return aiomqtt.Client(
        hostname=url.host, port=url.port, username=url.username, password=url.password,
        identifier=client_id, protocol=aiomqtt.ProtocolVersion.V5, clean_start=False,
        properties=props, keepalive=keepalive_s,
        socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
    )


class _PubAcks:
    """PUBACK reason codes of one aiomqtt client's publishes, which aiomqtt 2 does not return.

    Wraps the underlying paho client's ``on_publish`` (aiomqtt's own handler still runs) and
    publishes through paho to learn each message id.
    """

    def __init__(self, client: aiomqtt.Client) -> None:
        self._client = client
        self._paho: paho.Client = client._client
        self._inner: Callable[..., None] | None = self._paho.on_publish
        self._waiting: dict[int, asyncio.Future[int]] = {}
        self._early: dict[int, int] = {}
        self._paho.on_publish = self._on_publish

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any,
                    properties: Any) -> None:
        code = int(getattr(reason_code, "value", reason_code) or 0)
        fut = self._waiting.pop(mid, None)
        if fut is None:
            if len(self._early) < 10_000:
                self._early[mid] = code
        elif not fut.done():
            fut.set_result(code)
        if self._inner is not None:
            self._inner(client, userdata, mid, reason_code, properties)

    async def publish(self, topic: str, payload: bytes, props: Properties) -> int:
        """QoS 1 publish; returns the PUBACK reason code."""
        info = self._paho.publish(topic, payload, 1, False, props)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
        if info.mid in self._early:
            return self._early.pop(info.mid)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting[info.mid] = fut
        try:
            return await asyncio.wait_for(fut, self._client.timeout)
        except asyncio.TimeoutError:
            raise aiomqtt.MqttError("no PUBACK for the request") from None
        finally:
            self._waiting.pop(info.mid, None)

    def fail_all(self, exc: Exception) -> None:
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(exc)
        self._waiting.clear()


class PhoneClient:
    """One MQTT connection, many concurrent requests (matched by correlation data).

    ``client`` is either a client the caller connects and owns, or a factory of clients: then
    the PhoneClient connects, re-subscribes and reconnects by itself (see the module docstring)
    and a request made while it is disconnected raises :class:`AskError` ``not_connected``.

    ``on_behalf=True`` makes it a phone with many users (the HTTP gateway): each request may
    name its own client id (``client_id=`` of :meth:`stream`, one per API key, so that the
    coordinators' per-client limits apply per user), its replies come to
    ``responses/{that id}/{reply_level}``, and one subscription reads them all. A secured
    broker must let this connection publish ``requests/+`` and ``cancel/+`` and read
    ``responses/+/{reply_level}`` (``moe2 broker-config --gateways NAME``).
    ``watch_plan=True`` keeps the coordinators' retained plan in :attr:`plan`.
    """

    def __init__(self, client: aiomqtt.Client | Callable[[], aiomqtt.Client], client_id: str,
                 topics: Topics | None = None, msgpack: bool = False, *,
                 check_delivery: bool = False, watch_coordinators: bool = False,
                 grace_s: float = 10.0, reply_level: str = "r", on_behalf: bool = False,
                 watch_plan: bool = False, request_expiry_s: int | None = None) -> None:
        if isinstance(client, aiomqtt.Client):
            self.client: aiomqtt.Client | None = client
            self._factory: Callable[[], aiomqtt.Client] | None = None
        else:
            self.client = None
            self._factory = client
        self.client_id = client_id
        self.topics = topics or Topics()
        self.msgpack = msgpack
        self.check_delivery = check_delivery
        self.watch_coordinators = watch_coordinators
        self.watch_plan = watch_plan
        self.reply_level = reply_level
        self.on_behalf = on_behalf
        self.response_topic = self.topics.response(client_id, reply_level)
        self.grace_s = grace_s
        #: the coordinators' retained plan (``watch_plan``); None until one arrives
        self.plan: wire.PlanMsg | None = None
        self._cancels: set[asyncio.Task[None]] = set()
        self.cancels_sent = 0
        #: MQTT 5 Message Expiry of each request: brokers (and bridge queues) drop a copy
        #: nobody waits for any more
        self.request_expiry_s = request_expiry_s
        self._queues: dict[bytes, asyncio.Queue[wire.PhoneReply | AskError]] = {}
        self._answered: set[bytes] = set()  # requests that got at least one reply
        self._suspect: dict[bytes, str] = {}  # unanswered at a loss event -> the AskError code
        self._grace: asyncio.TimerHandle | None = None
        self._coordinators: set[str] = set()  # seen online
        self._reader: asyncio.Task[None] | None = None
        self._acks: _PubAcks | None = None
        self._connected = asyncio.Event()
        self.unmatched = 0
        self.connections = 0  # successful (re)connections in factory mode

    async def __aenter__(self) -> PhoneClient:
        if self._reader is not None:
            raise RuntimeError("a PhoneClient can be entered once")
        if self._factory is None:
            assert self.client is not None
            await self._subscribe(self.client)
            self._acks = _PubAcks(self.client) if self.check_delivery else None
            self._connected.set()
            self._reader = asyncio.create_task(self._read(self.client),
                                               name=f"phone-{self.client_id}")
            return self
        self._reader = asyncio.create_task(self._session_loop(), name=f"phone-{self.client_id}")
        connected = asyncio.create_task(self._connected.wait())
        try:
            await asyncio.wait([connected, self._reader], return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            await self.__aexit__(None, None, None)
            raise
        finally:
            connected.cancel()
        if self._reader.done():
            self._reader.result()  # raises what ended the session loop
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._grace is not None:
            self._grace.cancel()
        if self._cancels:  # the cancels of abandoned requests get a moment to go out
            await asyncio.wait(list(self._cancels), timeout=2.0)
            await cancel_and_wait(list(self._cancels))
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._reader

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    async def until_closed(self) -> None:
        """Wait while the connection loop runs; raises what ended it (e.g.
        :class:`~moe2.shared.mqtt.BrokerRefusedError`: credentials refused again and again)."""
        if self._reader is None:
            raise RuntimeError("the PhoneClient is not entered")
        await asyncio.shield(self._reader)

    async def _session_loop(self) -> None:
        assert self._factory is not None
        backoff = Backoff()
        refusals = 0
        while True:
            client = self._factory()
            try:
                async with client:
                    refusals = 0
                    self.client = client
                    await self._subscribe(client)
                    self._acks = _PubAcks(client) if self.check_delivery else None
                    self.connections += 1
                    self._connected.set()
                    backoff.reset()
                    if self._suspect:
                        self._arm_grace()
                    await self._read(client)
            except aiomqtt.MqttError as exc:
                if refusal_code(exc) in AUTH_REFUSALS:
                    refusals += 1
                    if refusals >= MAX_AUTH_REFUSALS:
                        raise BrokerRefusedError(
                            f"the broker refused the credentials {refusals} times ({exc}): "
                            "check the user name and password in the broker URL") from None
            finally:
                self._connected.clear()
                if self._acks is not None:
                    self._acks.fail_all(aiomqtt.MqttError("connection lost"))
                self._acks = None
                self._mark_suspects("connection_lost")
                if self._grace is not None:  # counted from the reconnect
                    self._grace.cancel()
                    self._grace = None
            await asyncio.sleep(backoff.next_delay_s())

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        await client.subscribe(self.topics.responses_of_every_client(self.reply_level)
                               if self.on_behalf else self.response_topic, qos=1)
        if self.watch_coordinators:
            await client.subscribe(self.topics.all_coordinator_status, qos=1)
        if self.watch_plan:
            await client.subscribe(self.topics.plan.topic, qos=1)

    def _mark_suspects(self, code: str) -> None:
        for corr in self._queues:
            if corr not in self._answered:
                if code == "connection_lost":  # the phone's own loss explains it best
                    self._suspect[corr] = code
                else:
                    self._suspect.setdefault(corr, code)

    def _arm_grace(self) -> None:
        if self._grace is not None:
            self._grace.cancel()
        self._grace = asyncio.get_running_loop().call_later(self.grace_s, self._give_up_suspects)

    def _give_up_suspects(self) -> None:
        """Requests still unanswered ``grace_s`` after a loss event: tell them."""
        self._grace = None
        why = {"connection_lost": "the phone's broker connection dropped",
               "coordinator_lost": "a coordinator went offline"}
        for corr, code in self._suspect.items():
            q = self._queues.get(corr)
            if q is not None and corr not in self._answered:
                q.put_nowait(AskError(code, f"{why.get(code, code)} before this request got "
                                            "any reply: it may not have reached a coordinator "
                                            "that is still up; retry"))
        self._suspect.clear()

    def _on_coordinator_status(self, m: aiomqtt.Message) -> None:
        try:
            st = wire.decode_as(payload_bytes(m), wire.CoordinatorStatus)
        except wire.DecodeError:
            return
        if st.state == "online":
            if len(self._coordinators) < 1024:
                self._coordinators.add(st.coordinator_id)
            return
        # Only the will of a coordinator we saw online, seen live (a retained one is history).
        if not m.retain and st.coordinator_id in self._coordinators:
            self._mark_suspects("coordinator_lost")
            if self._suspect and self._connected.is_set():
                self._arm_grace()

    async def _read(self, client: aiomqtt.Client) -> None:
        status_filter = self.topics.all_coordinator_status
        plan_topic = self.topics.plan.topic
        async for m in client.messages:
            corr = get_prop(m, "CorrelationData")
            if corr is None:  # replies carry correlation data; statuses and plans do not
                if m.topic.matches(status_filter):
                    self._on_coordinator_status(m)
                elif self.watch_plan and m.topic.value == plan_topic:
                    self._on_plan(m)
                else:
                    self.unmatched += 1
                continue
            q = self._queues.get(bytes(corr))
            if q is None:
                self.unmatched += 1
                continue
            try:
                q.put_nowait(wire.decode_phone_reply(payload_bytes(m), get_prop(m, "ContentType")))
            except wire.DecodeError:
                self.unmatched += 1
                continue
            self._answered.add(bytes(corr))

    def _on_plan(self, m: aiomqtt.Message) -> None:
        data = payload_bytes(m)
        if not data:
            self.plan = None  # cleared
            return
        try:
            self.plan = self.topics.plan.decode(data)
        except wire.DecodeError:
            return

    def _client_for(self, client_id: str | None) -> str:
        if client_id is None or client_id == self.client_id:
            return self.client_id
        if not self.on_behalf:
            raise ValueError("a request on behalf of another client id needs on_behalf=True")
        return client_id

    async def send_raw(self, payload: bytes, *, correlation: bytes, content_type: str | None,
                       response_topic: str | None = None, client_id: str | None = None
                       ) -> asyncio.Queue[wire.PhoneReply | AskError]:
        """Publish one request; its replies (and a local :class:`AskError`) come on the queue.
        ``client_id``: ask as that client (``on_behalf`` only)."""
        cid = self._client_for(client_id)
        client = self.client
        if client is None or not self._connected.is_set():
            raise AskError("not_connected", "the phone is not connected to the broker")
        q: asyncio.Queue[wire.PhoneReply | AskError] = asyncio.Queue()
        self._queues[correlation] = q
        props = response_properties(
            response_topic or self.topics.response(cid, self.reply_level), correlation,
            content_type)
        if self.request_expiry_s is not None:
            props.MessageExpiryInterval = self.request_expiry_s
        topic = self.topics.request(cid)
        try:
            if self._acks is not None:
                code = await self._acks.publish(topic, payload, props)
                if code == NO_MATCHING_SUBSCRIBERS:
                    raise AskError("no_coordinator",
                                   "no coordinator is subscribed to requests; nobody will answer")
                if code == NOT_AUTHORIZED:
                    raise AskError("not_authorized", (
                        f"the broker refused the request on {topic} (not authorised): asking "
                        "as many client ids needs a gateway account (moe2 broker-config "
                        "--gateways NAME)") if self.on_behalf else (
                        f"the broker refused the request on {topic} (not authorised): a secured "
                        f"broker lets a phone publish only on {self.topics.request('<name>')} "
                        "with its MQTT username and client id both <name>"))
                if code >= 0x80:
                    raise AskError("refused", f"the broker refused the request on {topic} "
                                              f"(MQTT 5 reason code 0x{code:02x})")
            else:
                await client.publish(topic, payload, qos=1, properties=props)
        except BaseException:
            self._queues.pop(correlation, None)
            raise
        return q

    def done_with(self, correlation: bytes) -> None:
        """Forget a request (after its final or error, or when abandoning it)."""
        self._queues.pop(correlation, None)
        self._answered.discard(correlation)
        self._suspect.pop(correlation, None)

    def cancel(self, correlation: bytes, client_id: str | None = None) -> None:
        """Tell the coordinators that the request with ``correlation`` is no longer wanted
        (published at QoS 1 by a task this client owns; callable from any cleanup path,
        including a cancelled task's). Replies still arriving for it are counted unmatched."""
        cid = self._client_for(client_id)
        self.done_with(correlation)
        client = self.client
        if client is None or not self._connected.is_set():
            return  # the coordinator's step deadline and max_tokens still end it
        ct = wire.CONTENT_TYPE_MSGPACK if self.msgpack else wire.CONTENT_TYPE_JSON
        payload = wire.encode_phone(wire.PhoneCancel(), ct)
        props = response_properties(correlation_data=correlation, content_type=ct)
        task = asyncio.get_running_loop().create_task(
            self._publish_cancel(client, self.topics.cancel(cid), payload, props),
            name=f"cancel-{cid}")
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def _publish_cancel(self, client: aiomqtt.Client, topic: str, payload: bytes,
                              props: Properties) -> None:
        try:
            await client.publish(topic, payload, qos=1, properties=props)
            self.cancels_sent += 1
        except aiomqtt.MqttError as exc:
            _log.info("cancel on %s not sent: %s", topic, exc)

    async def stream(self, request: wire.PhoneRequest, timeout_s: float = 120.0, *,
                     client_id: str | None = None) -> AsyncIterator[wire.PhoneReply]:
        """Send ``request`` and yield its replies up to the final or error; ``timeout_s`` is
        the longest wait for each one. Leaving early (the caller stops reading, is
        cancelled, or the wait times out) cancels the request upstream."""
        corr = uuid.uuid4().bytes
        ct = wire.CONTENT_TYPE_MSGPACK if self.msgpack else wire.CONTENT_TYPE_JSON
        q = await self.send_raw(wire.encode_phone(request, ct), correlation=corr, content_type=ct,
                                client_id=client_id)
        ended = False
        try:
            while True:
                msg = await asyncio.wait_for(q.get(), timeout_s)
                if isinstance(msg, AskError):
                    raise msg  # given up on: cancelled below in case a coordinator has it
                if isinstance(msg, (wire.FinalReply, wire.ErrorReplyPhone)):
                    ended = True
                yield msg
                if ended:
                    return
        finally:
            if ended:
                self.done_with(corr)
            else:
                self.cancel(corr, client_id)

    async def ask(self, request: wire.PhoneRequest, timeout_s: float = 120.0,
                  on_chunk: Callable[[str], None] | None = None) -> Answer:
        ans = Answer()
        async for msg in self.stream(request, timeout_s):
            ans.messages += 1
            if isinstance(msg, wire.TokenChunk):
                ans.chunks.append(msg)
                if on_chunk is not None:
                    on_chunk(msg.text)
            elif isinstance(msg, wire.FinalReply):
                ans.final = msg
                ans.text = msg.text
            else:
                ans.error = msg
        return ans
