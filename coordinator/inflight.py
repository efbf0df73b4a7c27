"""In-flight markers: how phones hear about a coordinator that dies mid-request.

While it serves a request, a coordinator keeps a retained :class:`wire.InflightMarker` (the
phone's response topic and correlation data) on ``{root}/coordinators/{id}/inflight/{request_id}``
and clears it together with the request's final or error (final first: a crash between the two
can duplicate the terminal message, as QoS 1 may anyway, but never lose it). When a coordinator's
Last Will (its retained ``offline`` status) arrives live and it stays offline for
:data:`TAKEOVER_GRACE_S`, the surviving coordinator with the lowest id subscribes to the dead one's
markers and sends each phone a ``shutting_down`` error, clearing each marker. A coordinator
restarted under the same id does the same for the markers of its previous incarnation. Wills
that arrive while the survivor itself loses the broker (a broker restart sends every client's
will) start no takeover. A request still on its way into a coordinator that dies (no marker yet:
MQTT drops what a clean session had not processed) is left to the phone, which saw the will
(see :mod:`moe2.tools.clients.phone`); with no coordinator left, to the phone's silence timeout.

Markers live under ``{root}/coordinators/+/inflight/+``: a secured broker must let coordinators
read and write there (and phones read ``{root}/coordinators/+/status``).

The decisions -- which peers are online, whose phones to tell and when -- are pure functions over
:class:`Peers` (tested without a broker); :class:`InflightTracker` is the thin shell that
publishes markers and runs the takeovers through the coordinator's :class:`BrokerLink`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import aiomqtt

from moe2.coordinator.link import BrokerLink
from moe2.shared import wire
from moe2.shared.topics import Topics

log = logging.getLogger(__name__)

#: how long a peer must stay offline after its Last Will before its phones are told
TAKEOVER_GRACE_S = 1.0
#: how long a takeover listens for the dead peer's retained markers
TAKEOVER_WINDOW_S = 10.0
#: bounds on peer bookkeeping (hostile status floods cannot grow it further)
MAX_PEERS = 1024
#: orphaned markers waiting to be answered at most
MAX_ORPHANS = 100_000


# --------------------------------------------------------------------------- decisions (pure)


@dataclass(frozen=True)
class Peers:
    """What this coordinator knows about the others."""

    online: frozenset[str] = frozenset()
    #: dead peer -> when its phones may be told (its will arrived live)
    due: Mapping[str, float] = field(default_factory=dict)
    #: dead peer -> when we subscribed to its markers
    taking_over: Mapping[str, float] = field(default_factory=dict)


def takeover_handler(self_id: str, peers_online: Sequence[str]) -> bool:
    """Whether ``self_id`` is the one coordinator that tells a dead peer's phones (lowest id)."""
    return min([self_id, *peers_online]) == self_id


def peer_status(state: Peers, cid: str, online: bool, *, retained: bool,
                now_s: float) -> Peers:
    """A peer's status arrived (not our own: the caller handles that)."""
    if online:
        peers = state.online if cid in state.online or len(state.online) >= MAX_PEERS \
            else state.online | {cid}
        due = {k: v for k, v in state.due.items() if k != cid}
        return replace(state, online=peers, due=due)
    # Only a will seen live while we are connected means the peer died; a retained offline
    # status is history, and the peer may be reconnecting.
    state = replace(state, online=state.online - {cid})
    if (not retained and cid not in state.taking_over and cid not in state.due
            and len(state.due) < MAX_PEERS):
        state = replace(state, due={**state.due, cid: now_s + TAKEOVER_GRACE_S})
    return state


@dataclass(frozen=True)
class Takeovers:
    """What the shell must do now: subscribe to these dead peers' markers, stop listening to
    those (back online, or their window closed)."""

    start: tuple[str, ...] = ()
    stop: tuple[str, ...] = ()


def decide_takeovers(state: Peers, self_id: str, now_s: float) -> tuple[Peers, Takeovers]:
    """Due takeovers start (when this coordinator is the lowest id online), finished or
    cancelled ones stop."""
    due = dict(state.due)
    taking = dict(state.taking_over)
    start: list[str] = []
    for cid, when in sorted(state.due.items()):
        if when > now_s:
            continue
        del due[cid]
        if cid in state.online or not takeover_handler(self_id, sorted(state.online)):
            continue
        taking[cid] = now_s
        start.append(cid)
    stop = [cid for cid, since in sorted(taking.items())
            if cid in state.online or now_s - since > TAKEOVER_WINDOW_S]
    for cid in stop:
        del taking[cid]
    return replace(state, due=due, taking_over=taking), Takeovers(tuple(start), tuple(stop))


def next_wake_s(state: Peers) -> float | None:
    """When :func:`decide_takeovers` has something to do next (None: only on news)."""
    return min([*state.due.values(), *(t + TAKEOVER_WINDOW_S for t in state.taking_over.values())],
               default=None)


def is_orphan(state: Peers, self_id: str, incarnation: str, marker: wire.InflightMarker) -> bool:
    """Whether a marker names a request nobody will finish: our previous incarnation's, or a
    dead peer's while we take over for it."""
    cid = marker.coordinator_id
    if cid == self_id:
        return marker.incarnation != incarnation
    return cid in state.taking_over and cid not in state.online


# --------------------------------------------------------------------------- the shell


class InflightTracker:
    """Markers of the requests this coordinator serves, and takeovers for dead peers.

    ``tell`` sends a phone the ``shutting_down`` error for an orphaned marker; ``reassert``
    publishes this coordinator's online status again (a stale will or a forged status)."""

    def __init__(self, topics: Topics, self_id: str, incarnation: str, link: BrokerLink, *,
                 clock: Callable[[], float], stopping: Callable[[], bool],
                 tell: Callable[[wire.InflightMarker], Awaitable[None]],
                 reassert: Callable[[], Awaitable[None]]) -> None:
        self.topics = topics
        self.self_id = self_id
        self.incarnation = incarnation
        self._link = link
        self._clock = clock
        self._stopping = stopping
        self._tell = tell
        self._reassert_status = reassert
        self.peers = Peers()
        self._markers: dict[str, bytes] = {}  # marker topic -> payload, while the request runs
        self._dirty: set[str] = set()  # topics whose retained state is not published yet
        self._orphans: deque[tuple[str, wire.InflightMarker]] = deque(maxlen=MAX_ORPHANS)
        self._reassert = False
        self._event = asyncio.Event()

    # ------------------------------------------------------------------ requests
    def open(self, request_id: str, client_id: str, response_topic: str,
             correlation: bytes | None, content_type: str | None, request_key: str = "") -> str:
        """Mark a request as in flight; returns its marker topic."""
        t = self.topics.coordinator_inflight(self.self_id, request_id)
        self._markers[t.topic] = t.encode(wire.InflightMarker(
            coordinator_id=self.self_id, incarnation=self.incarnation, client_id=client_id,
            response_topic=response_topic, correlation=correlation, content_type=content_type,
            request_key=request_key))
        self._dirty.add(t.topic)
        self._event.set()
        return t.topic

    def close(self, topic: str) -> bool:
        """The request ended (its terminal message is on its way): clear the marker; False when
        it was cleared already."""
        if self._markers.pop(topic, None) is None:
            return False
        self._dirty.add(topic)
        self._event.set()
        return True

    async def close_now(self, topic: str) -> None:
        """Clear the marker and publish the clear in this step (beside the final)."""
        self._markers.pop(topic, None)
        await self._publish_marker(topic)

    @property
    def open_markers(self) -> int:
        return len(self._markers)

    # ------------------------------------------------------------------ connection
    async def on_connect(self) -> None:
        """A broker without persistence lost our markers; clears of finished requests may be
        pending: publish everything's current state."""
        self._dirty.update(self._markers)
        await self.flush()

    def on_lost(self) -> None:
        """Without the broker we cannot tell a dead peer from our own outage: start over."""
        self.peers = Peers()

    async def _publish_marker(self, topic: str) -> None:
        """A marker's current state: its payload while the request runs, else a clear. Read and
        handed to the client in one step, so whichever call goes last leaves the right retained
        message; a failed publish is retried after the reconnect."""
        if not self._link.up:
            self._dirty.add(topic)
            return
        self._dirty.discard(topic)
        try:
            await self._link.publish(topic, self._markers.get(topic, b""), qos=1, retain=True)
        except aiomqtt.MqttError:
            self._dirty.add(topic)
            self._event.set()

    async def flush(self) -> None:
        """Every pending marker change, handed to the client at once."""
        if self._dirty:
            await asyncio.gather(*[self._publish_marker(t) for t in list(self._dirty)])

    # ------------------------------------------------------------------ messages
    def on_status(self, topic: str, data: bytes, *, retained: bool) -> str | None:
        """A coordinator's status; returns the peer's id when this is its Last Will arriving
        live (it died just now), else None."""
        cid = self.topics.coordinator_of(topic)
        if cid is None:
            return None
        try:
            st = self.topics.coordinator_status(cid).decode(data) if data else None
        except wire.DecodeError as exc:
            log.debug("malformed coordinator status on %s dropped: %s", topic, exc)
            return None
        if st is not None and st.coordinator_id != cid:
            return None
        online = st is not None and st.state == "online"
        if cid == self.self_id:
            if not online and not self._stopping():
                self._reassert = True  # a stale will or a forged status: we are alive
                self._event.set()
            return None
        before = self.peers
        self.peers = peer_status(before, cid, online, retained=retained, now_s=self._clock())
        if self.peers.due != before.due or (online and cid in self.peers.taking_over):
            self._event.set()  # a takeover to schedule, or one to stop
        return cid if not online and not retained else None

    async def publish_now(self, topic: str) -> None:
        """Publish one marker's current state now (before the request's claim goes out)."""
        await self._publish_marker(topic)

    def on_marker(self, topic: str, data: bytes) -> None:
        cid = self.topics.coordinator_of(topic)
        if cid is None or not data:
            return
        try:
            m = self.topics.coordinator_inflight(cid, "x").decode(data)
        except wire.DecodeError as exc:
            log.debug("malformed in-flight marker on %s dropped: %s", topic, exc)
            return
        if m.coordinator_id != cid or not is_orphan(self.peers, self.self_id,
                                                    self.incarnation, m):
            return
        self._orphans.append((topic, m))
        self._event.set()

    # ------------------------------------------------------------------ the loop
    async def run(self) -> None:
        """Publish marker changes; take over dead peers' markers; answer orphaned requests."""
        while True:
            wake_s = next_wake_s(self.peers)
            timeout = None if wake_s is None else max(0.0, wake_s - self._clock())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._event.wait(), timeout)
            self._event.clear()
            if not self._link.up:
                continue  # on_connect flushes the markers; peers are forgotten
            await self.flush()
            if self._reassert and not self._stopping():
                self._reassert = False
                with contextlib.suppress(aiomqtt.MqttError):
                    await self._reassert_status()
            self.peers, todo = decide_takeovers(self.peers, self.self_id, self._clock())
            for cid in todo.start:
                log.warning("coordinator %s is gone: telling the phones of its requests", cid)
                with contextlib.suppress(aiomqtt.MqttError):
                    await self._link.subscribe(self.topics.inflight_filter(cid), qos=1)
            for cid in todo.stop:
                with contextlib.suppress(aiomqtt.MqttError):
                    await self._link.unsubscribe(self.topics.inflight_filter(cid))
            while self._orphans:
                topic, marker = self._orphans.popleft()
                await self._tell_orphan(topic, marker)

    async def _tell_orphan(self, topic: str, m: wire.InflightMarker) -> None:
        """A request whose coordinator died: tell the phone, then clear the marker."""
        if self.topics.response_allowed(m.client_id, m.response_topic):
            await self._tell(m)
        with contextlib.suppress(aiomqtt.MqttError):
            await self._link.publish(topic, b"", qos=1, retain=True)
