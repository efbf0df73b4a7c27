"""Exactly one answer per phone request, whatever the broker topology.

Several coordinators on one broker split the phones' requests through one MQTT shared
subscription: each request goes to one of them. But every broker *node* whose shared group has
members takes its own copy -- two bridged Mosquittos, a misconfigured bridge, two sites -- so
without more, a request is served once per node that has a coordinator: double the agents' work
and two finals for the phone. (A clustered MQTT 5 broker -- EMQX, HiveMQ, VerneMQ -- makes one
shared group of the whole cluster: one copy, one node, nothing here costs anything.)

The mechanism (rendezvous + claim + fallback; measured on real bridged brokers in the research
that chose it, see README "Scale-out"):

- **Request key** (:func:`request_key`): a hash of the phone's client id, response topic,
  correlation data, content type and payload -- the same on every copy of one request, whichever
  broker it came through. A phone that retries must use fresh correlation data.
- **View**: every coordinator says, every ``heartbeat_s`` (QoS 0, not retained, short Message
  Expiry), which node it takes requests from and whether it takes them now. The view is how many
  live, accepting coordinators each node has (:func:`live_weights`). Retained statuses cannot
  serve here: they stay ``online`` on the far side of a partition.
- **Ranking** (:func:`ranking`): weighted rendezvous hashing of the key over the view's nodes --
  every coordinator computes the same order without a message, and a node's share of requests
  is proportional to its coordinators.
- **On a copy** (:func:`on_copy`): a key already claimed, held or served is dropped. A node that
  ranks first serves at once -- the common case, and the only case on one broker: *no added
  wait*. A node ranked ``r`` holds the copy and serves it only when no claim for the key came
  within ``r * fallback_s`` (the first node never got it, or died with it). For a few
  heartbeats after a bridge of its broker (re)connects, a first-ranked copy waits half a period
  too (*healing*): the far side's outage queue brings copies answered there meanwhile, each
  with its claim right behind it, and those are dropped rather than answered again.
- **Claim**: whoever answers a request -- a final, or any error -- publishes a
  :class:`wire.RequestClaim` (QoS 1, Message Expiry = the claim TTL), after the request's
  retained in-flight marker, so that a claim is never seen without the marker that lets a
  survivor tell the phone when its claimer dies. A claim makes holders drop their copies.
- **Precedence** (:func:`precedes`): when two coordinators answer one key anyway (views that
  disagree while a node joins or leaves, a claim slower than ``fallback_s``, a stale copy
  released from a bridge queue after a partition heals), a strict total order over the two
  claims decides -- earlier clock bucket (:data:`CLAIM_SKEW_S`), then lower rank, then the
  node's unweighted rendezvous score, then the coordinator id -- a pure function of the claims,
  so both sides always agree. The loser stops and emits nothing more: before its first token
  that is an *abort* (agent sessions closed, nothing sent); after it a *late conflict* (the
  phone saw chunks twice, but one final). A winner that hears a losing claim sends its own
  again, so a loser whose copy of the first claim was lost still learns.

Counters (``coordinator.counters``, exported as ``moe2_coordinator_events_total``):
``copies_dropped`` (a key already claimed or held), ``copies_held``, ``held_dropped`` (the
claim came), ``fallback_serves``, ``aborted``, ``late_conflicts``, ``claims_resent``.

What it cannot do: exactly-once under arbitrary partitions is impossible. A reply published on
the remote side of a Mosquitto bridge while the bridge is down is lost (the v5 bridge queues only
on its local side), so a phone must time out and retry; a claim that misses a holder by more than
``fallback_s`` plus the time to a first token gives a duplicate (counted as a late conflict on
the side that learns of it). See README "Scale-out" for the costs.

Decisions are pure functions (tested without a broker); :class:`ExactlyOnce` is the thin shell
that keeps the bounded tables, publishes heartbeats and claims through the coordinator's
:class:`BrokerLink` and serves held copies when their time comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import heapq
import logging
import math
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import aiomqtt
import msgspec
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from moe2.coordinator.link import BrokerLink
from moe2.shared import wire
from moe2.shared.mqtt import BrokerUrlError, parse_broker_url
from moe2.shared.topics import Topics

log = logging.getLogger(__name__)

#: claims whose wall clocks fall in different buckets of this width are ordered by time first
#: (the older answer wins: a stale copy released after a partition loses); within one bucket
#: by rank, score and id. Wider than the skew of NTP-synced clocks, narrower than fallback_s.
CLAIM_SKEW_S = 0.25
#: a peer whose heartbeats stopped for this many of its periods has left the view
HEARTBEAT_MISSES = 3
#: bounds of the bookkeeping (a hostile flood of heartbeats, claims or requests cannot grow it)
MAX_PEERS = 256
MAX_CLAIMS = 100_000
MAX_HELD = 10_000
MAX_HELD_BYTES = 64 << 20
#: a claim that could not be published is tried again after this (or at the reconnect)
RETRY_S = 0.2
#: a peer's heartbeat period is believed within these bounds
MIN_PERIOD_S, MAX_PERIOD_S = 0.05, 10.0
#: a copy waits at most this many fallback periods, however many nodes rank before its own
#: (many nodes, or forged heartbeats, cannot delay a request without bound)
MAX_HOLD_RANKS = 3
#: while healing, a first-ranked copy waits this share of ``fallback_s`` for a claim behind it
#: (under one period: a node holding a fresh copy for a period still hears our claim in time)
HEAL_HOLD_SHARE = 0.5


# --------------------------------------------------------------------------- decisions (pure)


def request_key(client_id: str, response_topic: str, correlation: bytes | None,
                content_type: str | None, payload: bytes) -> str:
    """The name of one phone request, the same on each of its copies (32 hex characters).
    Every part is length-prefixed, so no two different requests can share their bytes."""
    h = hashlib.sha256()
    for part in (client_id.encode("utf-8", "surrogatepass"),
                 response_topic.encode("utf-8", "surrogatepass"), correlation or b"",
                 (content_type or "").encode("utf-8", "surrogatepass"), payload):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()[:wire.REQUEST_KEY_CHARS]


def default_node(broker_url: str) -> str:
    """The node a coordinator is on when its config names none: its broker's ``host:port``."""
    try:
        url = parse_broker_url(broker_url)
    except BrokerUrlError:
        return broker_url[:wire.MAX_NODE_CHARS] or "broker"
    return f"{url.host.lower()}:{url.port}"


def node_score(key: str, node: str, weight: int = 1) -> float:
    """Weighted rendezvous score (higher wins): ``-w / ln(u)`` with ``u`` uniform in (0, 1)
    from the hash of key and node -- the highest-score node is node n with probability
    proportional to ``w_n``."""
    d = hashlib.sha256(f"{key}\0{node}".encode("utf-8", "surrogatepass")).digest()
    u = (int.from_bytes(d[:8], "big") + 0.5) / 2.0**64
    return -weight / math.log(u)


def ranking(key: str, weights: Mapping[str, int]) -> list[str]:
    """The nodes in the order they should serve ``key`` (best first)."""
    return sorted(weights, key=lambda n: (-node_score(key, n, weights[n]), n))


def rank_of(key: str, node: str, weights: Mapping[str, int]) -> int:
    """``node``'s position for ``key``; a node outside the view ranks last."""
    order = ranking(key, weights)
    return order.index(node) if node in weights else len(order)


@dataclass(frozen=True)
class PeerView:
    """What the last heartbeat of one other coordinator said."""

    node: str
    accepting: bool
    incarnation: str
    seen_s: float
    period_s: float


def peer_alive(p: PeerView, now_s: float) -> bool:
    return now_s - p.seen_s <= HEARTBEAT_MISSES * p.period_s


def live_weights(peers: Mapping[str, PeerView], self_node: str, self_accepting: bool,
                 now_s: float) -> dict[str, int]:
    """Node -> how many live, accepting coordinators it has (this one included when it
    accepts)."""
    weights: dict[str, int] = {self_node: 1} if self_accepting else {}
    for p in peers.values():
        if p.accepting and peer_alive(p, now_s):
            weights[p.node] = weights.get(p.node, 0) + 1
    return weights


@dataclass(frozen=True)
class Serve:
    """Answer this copy now."""

    rank: int


@dataclass(frozen=True)
class Hold:
    """Keep this copy until ``until_s``; serve it then unless a claim came."""

    rank: int
    until_s: float


@dataclass(frozen=True)
class Drop:
    """Someone answers (or answered) this request already."""


CopyAction = Serve | Hold | Drop


def hold_s(rank: int, fallback_s: float, healing: bool = False) -> float:
    """How long a copy ranked ``rank`` here waits for a claim: ``rank`` periods (at most
    :data:`MAX_HOLD_RANKS`); ranked first, none -- or a share of one while ``healing``."""
    if rank == 0:
        return HEAL_HOLD_SHARE * fallback_s if healing else 0.0
    return min(rank, MAX_HOLD_RANKS) * fallback_s


def on_copy(key: str, *, known: bool, node: str, weights: Mapping[str, int], now_s: float,
            fallback_s: float, healing: bool = False) -> CopyAction:
    """What to do with a copy of a request: drop a known key, serve when this node ranks
    first (unless ``healing``), else hold it for :func:`hold_s`."""
    if known:
        return Drop()
    r = rank_of(key, node, weights)
    wait_s = hold_s(r, fallback_s, healing)
    return Hold(r, now_s + wait_s) if wait_s > 0 else Serve(r)


def claim_order(c: wire.RequestClaim) -> tuple[int, int, float, str, str]:
    """The sort key of :func:`precedes` (smaller answers)."""
    return (math.floor(c.ts / CLAIM_SKEW_S), c.rank, -node_score(c.key, c.node),
            c.coordinator_id, c.incarnation)


def precedes(a: wire.RequestClaim, b: wire.RequestClaim) -> bool:
    """Whether claim ``a`` rather than ``b`` answers their request: a strict total order (a
    lexicographic key), so of any set of claims exactly one wins everywhere."""
    return claim_order(a) < claim_order(b)


def better(a: wire.RequestClaim, b: wire.RequestClaim) -> bool:
    """Whether ``a`` replaces ``b`` as the claim a coordinator remembers for their key: an
    answered (``done``) claim first -- the phone has its answer -- then :func:`precedes`."""
    return a.done and not b.done if a.done != b.done else precedes(a, b)


class Reaction(enum.Enum):
    """What a claim from another coordinator means here."""

    RECORD = "record"  # remember it: later copies of the key are dropped
    DROP_HELD = "drop_held"  # the copy we held is answered elsewhere
    ABORT = "abort"  # we lost before our first token: stop, emit nothing
    STOP_LATE = "stop_late"  # we lost after our first token: stop, emit nothing more
    CONFLICT_DONE = "conflict_done"  # both of us answered already: count it
    RESEND = "resend"  # we win, or answered already: send our claim again, so they stop


def on_claim(theirs: wire.RequestClaim, *, mine: wire.RequestClaim | None, serving: bool,
             sent: bool, held: bool) -> Reaction:
    """React to ``theirs`` given our own claim of the key (``mine``: while we serve it, or
    ``done`` once we answered), whether our serve has sent the phone anything, and whether we
    hold a copy. A serve stops for a preceding claim or for an answered one (the phone has a
    final already: a stale copy, served again after a partition, whatever the order says); an
    answered claim is sent again to whoever claims the key after it."""
    if mine is not None:
        if serving:
            if theirs.done or precedes(theirs, mine):
                return Reaction.STOP_LATE if sent else Reaction.ABORT
            return Reaction.RESEND
        return Reaction.CONFLICT_DONE if theirs.done else Reaction.RESEND
    return Reaction.DROP_HELD if held else Reaction.RECORD


# --------------------------------------------------------------------------- the shell


@dataclass
class Serving:
    """A request this coordinator answers right now: its claim, whether anything went to the
    phone yet, and how to stop it silently."""

    claim: wire.RequestClaim
    sent: Callable[[], bool]
    abort: Callable[[], None]
    aborted: bool = False


@dataclass
class _Held:
    since_s: float
    until_s: float
    rank: int
    admit: Callable[[int], None]
    size: int
    healing: bool  # it came while a bridge's outage queue could still be arriving


@dataclass(slots=True)
class _Entry:
    claim: wire.RequestClaim  # the preceding claim seen so far (ours or another's)
    seen_s: float  # monotonic: when the key was first claimed here


def _expiry_props(seconds: float) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.MessageExpiryInterval = max(1, math.ceil(seconds))
    return props


class ExactlyOnce:
    """The bounded tables and the heartbeat / claim / fallback loop of one coordinator.

    ``counters`` is the coordinator's counters dict (this adds its own keys);
    ``accepting`` says whether the coordinator takes requests now."""

    def __init__(self, topics: Topics, self_id: str, node: str, incarnation: str,
                 link: BrokerLink, *, clock: Callable[[], float], wall: Callable[[], float],
                 fallback_s: float, claim_ttl_s: float, heartbeat_s: float,
                 counters: dict[str, int], accepting: Callable[[], bool]) -> None:
        self.topics = topics
        self.self_id = self_id
        self.node = node
        self.incarnation = incarnation
        self._link = link
        self._clock = clock
        self._wall = wall
        self.fallback_s = fallback_s
        self.claim_ttl_s = claim_ttl_s
        self.heartbeat_s = heartbeat_s
        self._accepting = accepting
        self.counters = counters
        for name in ("copies_dropped", "copies_held", "held_dropped", "fallback_serves",
                     "aborted", "late_conflicts", "claims_resent"):
            counters.setdefault(name, 0)
        self.peers: dict[str, PeerView] = {}
        self._claims: OrderedDict[str, _Entry] = OrderedDict()
        self._serving: dict[str, Serving] = {}
        self._held: OrderedDict[str, _Held] = OrderedDict()
        self._held_bytes = 0
        self._due: list[tuple[float, int, str]] = []  # (until_s, seq, key), lazily cleaned
        self._seq = 0
        self._pending: deque[str] = deque(maxlen=MAX_CLAIMS)  # keys whose claim must go out
        self._weights: dict[str, int] = {}
        self._warned_nodes: set[str] = set()
        self._greeted_s = -math.inf
        self._heal_until_s = -math.inf  # monotonic: copies ranked first wait until then
        self._heal_wall_s = -math.inf  # wall clock of the last bridge (re)connection
        self._names: dict[str, str] = {}  # peers' ids, nodes and incarnations (bounded)
        self._event = asyncio.Event()

    # ------------------------------------------------------------------ the view
    def weights(self) -> dict[str, int]:
        return live_weights(self.peers, self.node, self._accepting(), self._clock())

    @property
    def held(self) -> int:
        return len(self._held)

    @property
    def claims(self) -> int:
        return len(self._claims)

    def _is_mine(self, c: wire.RequestClaim) -> bool:
        return c.coordinator_id == self.self_id and c.incarnation == self.incarnation

    # ------------------------------------------------------------------ copies
    def _entry(self, key: str) -> _Entry | None:
        e = self._claims.get(key)
        if e is not None and self._clock() - e.seen_s > self.claim_ttl_s:
            del self._claims[key]
            return None
        return e

    def holds(self, key: str) -> bool:
        """Whether a copy of ``key`` waits here for its fallback."""
        return key in self._held

    def known(self, key: str) -> bool:
        """Whether ``key`` is claimed (by anyone), held or served here."""
        return key in self._serving or key in self._held or self._entry(key) is not None

    def answered_without(self, key: str, coordinator_id: str, incarnation: str) -> bool:
        """Whether ``key``, which that coordinator served when it died, is answered anyway (its
        phone must not be told to retry): held or served here, claimed by another, or done."""
        serving = self._serving.get(key)
        if key in self._held or (serving is not None and not serving.aborted):
            return True
        e = self._entry(key)
        return e is not None and (e.claim.done or (e.claim.coordinator_id, e.claim.incarnation)
                                  != (coordinator_id, incarnation))

    def on_copy(self, key: str, admit: Callable[[int], None], size: int = 0) -> None:
        """A copy of a request (``size`` bytes) arrived: ``admit(rank)`` answers it now (the
        caller claims it), later (a held copy whose claim never came), or never (a
        duplicate)."""
        now = self._clock()
        healing = now < self._heal_until_s
        action = on_copy(key, known=self.known(key), node=self.node, weights=self.weights(),
                         now_s=now, fallback_s=self.fallback_s, healing=healing)
        if isinstance(action, Drop):
            self.counters["copies_dropped"] += 1
            log.debug("request %s: copy dropped", key[:12])
            return
        if isinstance(action, Serve) or len(self._held) >= MAX_HELD \
                or self._held_bytes + size > MAX_HELD_BYTES:
            # a full table serves at once: a rare duplicate rather than a loss
            log.debug("request %s: copy served here (rank %d)", key[:12], action.rank)
            admit(action.rank)
            return
        self.counters["copies_held"] += 1
        log.debug("request %s: copy held until +%.2fs (rank %d)", key[:12],
                  action.until_s - now, action.rank)
        self._held[key] = _Held(now, action.until_s, action.rank, admit, size, healing)
        self._held_bytes += size
        self._schedule(key, action.until_s)

    def _unhold(self, key: str) -> _Held:
        h = self._held.pop(key)
        self._held_bytes -= h.size
        return h

    def _schedule(self, key: str, until_s: float) -> None:
        self._seq += 1
        heapq.heappush(self._due, (until_s, self._seq, key))
        if len(self._due) > 4 * MAX_HELD:  # rescheduling left stale entries: rebuild
            self._due = [(h.until_s, i, k) for i, (k, h) in enumerate(self._held.items())]
            heapq.heapify(self._due)
        self._event.set()

    # ------------------------------------------------------------------ claims
    def claim(self, key: str, rank: int, *, sent: Callable[[], bool] | None = None,
              abort: Callable[[], None] | None = None) -> wire.RequestClaim:
        """This coordinator answers ``key``. With ``abort`` (a request it generates for;
        ``sent`` says whether anything went to the phone yet) the request task calls
        :meth:`announce` once its in-flight marker is out; without (an error answered at
        once), the claim goes out now."""
        c = wire.RequestClaim(key=key, coordinator_id=self.self_id, node=self.node,
                              incarnation=self.incarnation, ts=self._wall(), rank=rank,
                              done=abort is None)
        self._record(c)
        if abort is not None:
            self._serving[key] = Serving(c, sent or (lambda: False), abort)
        else:
            self.announce(key)
        return c

    def announce(self, key: str) -> None:
        """Publish our claim of ``key`` (from the loop, in order)."""
        self._pending.append(key)
        self._event.set()

    def finished(self, key: str) -> None:
        """A request this coordinator served has ended: answered (our claim is ``done`` now),
        or stopped for another claim."""
        serving = self._serving.pop(key, None)
        e = self._entry(key)
        if serving is not None and not serving.aborted and e is not None \
                and self._is_mine(e.claim):
            e.claim = msgspec.structs.replace(e.claim, done=True)

    def _record(self, c: wire.RequestClaim) -> None:
        now = self._clock()
        e = self._entry(c.key)
        if e is None:
            self._claims[c.key] = _Entry(c, now)
            while self._claims:
                key, first = next(iter(self._claims.items()))
                if len(self._claims) <= MAX_CLAIMS and now - first.seen_s <= self.claim_ttl_s:
                    break
                del self._claims[key]
        elif better(c, e.claim):
            e.claim = c

    def on_claim_message(self, topic: str, data: bytes) -> None:
        cid = self.topics.coordinator_of(topic)
        if cid is None:
            return
        try:
            theirs = self.topics.coordinator_claims(cid).decode(data)
        except wire.DecodeError as exc:
            log.debug("malformed claim on %s dropped: %s", topic, exc)
            return
        if theirs.coordinator_id != cid or self._is_mine(theirs):
            return
        self.on_claim(self._compact(theirs))

    def _compact(self, c: wire.RequestClaim) -> wire.RequestClaim:
        """The same claim with the peer's names shared with earlier ones: a table of 100,000
        claims from a few peers then holds their names a few times, not 100,000 times."""
        names = self._names
        if len(names) >= 4 * MAX_PEERS:
            return c
        cid = names.setdefault(c.coordinator_id, c.coordinator_id)
        node = names.setdefault(c.node, c.node)
        inc = names.setdefault(c.incarnation, c.incarnation)
        if cid is c.coordinator_id and node is c.node and inc is c.incarnation:
            return c
        return msgspec.structs.replace(c, coordinator_id=cid, node=node, incarnation=inc)

    def on_claim(self, theirs: wire.RequestClaim) -> None:
        key = theirs.key
        serving = self._serving.get(key)
        if serving is not None and serving.aborted:
            self._record(theirs)
            return
        e = self._entry(key)
        mine = serving.claim if serving is not None else (
            e.claim if e is not None and self._is_mine(e.claim) else None)
        reaction = on_claim(theirs, mine=mine, serving=serving is not None,
                            sent=serving is not None and serving.sent(), held=key in self._held)
        log.debug("request %s: claim of %s (rank %d, done %s): %s", key[:12],
                  theirs.coordinator_id, theirs.rank, theirs.done, reaction.value)
        now = self._clock()
        if now < self._heal_until_s and theirs.ts < self._heal_wall_s - CLAIM_SKEW_S:
            # a claim made before the bridge came back: its outage queue is still arriving
            self._heal_until_s = max(self._heal_until_s,
                                     now + HEARTBEAT_MISSES * self.heartbeat_s)
        self._record(theirs)
        if reaction is Reaction.DROP_HELD:
            self._unhold(key)
            self.counters["held_dropped"] += 1
        elif reaction in (Reaction.ABORT, Reaction.STOP_LATE):
            assert serving is not None
            serving.aborted = True
            late = reaction is Reaction.STOP_LATE
            self.counters["late_conflicts" if late else "aborted"] += 1
            log.info("request %s: %s of %s answers it; stopping ours%s", key[:12],
                     theirs.coordinator_id, theirs.node,
                     " (the phone saw chunks from both)" if late else " before its first token")
            serving.abort()
        elif reaction is Reaction.CONFLICT_DONE:
            self.counters["late_conflicts"] += 1
            log.warning("request %s was answered here and by %s of %s (their claim came too "
                        "late)", key[:12], theirs.coordinator_id, theirs.node)
        elif reaction is Reaction.RESEND:
            self.counters["claims_resent"] += 1
            self.announce(key)

    # ------------------------------------------------------------------ peers
    def on_heartbeat_message(self, topic: str, data: bytes) -> None:
        cid = self.topics.coordinator_of(topic)
        if cid is None or cid == self.self_id:
            return
        try:
            hb = self.topics.coordinator_heartbeat(cid).decode(data)
        except wire.DecodeError as exc:
            log.debug("malformed heartbeat on %s dropped: %s", topic, exc)
            return
        if hb.coordinator_id != cid:
            return
        if cid not in self.peers and len(self.peers) >= MAX_PEERS:
            self._expire_peers()
            if len(self.peers) >= MAX_PEERS:
                return
        period = min(MAX_PERIOD_S, max(MIN_PERIOD_S, hb.interval_s))
        now = self._clock()
        before = self.peers.get(cid)
        self.peers[cid] = PeerView(hb.node, hb.accepting, hb.incarnation, now, period)
        if before is None or not peer_alive(before, now):
            self.greet()  # a peer (re)joins -- a partition healed: it learns of us now too
        self._view_changed()

    def greet(self) -> None:
        """Send a heartbeat now (at most one per quarter period): a peer that joins, or a
        bridge that connects again, should not wait a whole period to see us."""
        now = self._clock()
        if now - self._greeted_s >= self.heartbeat_s / 4:
            self._greeted_s = now
            self.heartbeat()

    def on_bridge_up(self) -> None:
        """A bridge of our broker (re)connected: heal for a few heartbeats (longer while claims
        made before now keep coming from its outage queue); the far side learns of us now."""
        self._heal_until_s = self._clock() + HEARTBEAT_MISSES * self.heartbeat_s
        self._heal_wall_s = self._wall()
        self.greet()

    def on_peer_gone(self, cid: str) -> None:
        """A peer's Last Will arrived live: it is out of the view now, not in a few seconds."""
        if self.peers.pop(cid, None) is not None:
            self._view_changed()

    def _expire_peers(self) -> None:
        now = self._clock()
        for cid in [c for c, p in self.peers.items() if not peer_alive(p, now)]:
            del self.peers[cid]

    def _view_changed(self) -> None:
        """When a node leaves the view (or loses coordinators), held copies are rescheduled by
        their rank in the new view: a first node that left makes the next one serve now. A
        node that joins changes nothing for copies already held (it never got them)."""
        weights = self.weights()
        before, self._weights = self._weights, weights
        if weights != before:
            log.debug("view: %s", weights)
        if all(weights.get(n, 0) >= w for n, w in before.items()):
            return
        for key, h in self._held.items():
            until = h.since_s + hold_s(rank_of(key, self.node, weights), self.fallback_s,
                                       h.healing)
            if until != h.until_s:
                h.until_s = until
                self._schedule(key, until)

    # ------------------------------------------------------------------ the loop
    def _heartbeat_msg(self, accepting: bool) -> tuple[str, bytes]:
        t = self.topics.coordinator_heartbeat(self.self_id)
        return t.topic, t.encode(wire.CoordinatorHeartbeat(
            coordinator_id=self.self_id, node=self.node, incarnation=self.incarnation,
            accepting=accepting, ts=self._wall(), interval_s=self.heartbeat_s,
            held=len(self._held), serving=len(self._serving)))

    def heartbeat(self, accepting: bool | None = None) -> None:
        """Say which node we are on (QoS 0, written now; nothing when the broker is away)."""
        if not self._link.up:
            return
        topic, payload = self._heartbeat_msg(self._accepting() if accepting is None
                                             else accepting)
        with contextlib.suppress(aiomqtt.MqttError):
            self._link.publish_now(topic, payload, properties=_expiry_props(
                HEARTBEAT_MISSES * self.heartbeat_s))

    def on_connect(self) -> None:
        """Claims of the requests still being served go out again (the broker may have lost
        them with the connection); peers heard before are kept and expire by themselves."""
        for key in self._serving:
            self._pending.append(key)
        self.heartbeat()
        self._event.set()

    def serve_due(self, now: float) -> None:
        """Serve the held copies whose fallback time has come (the loop calls this)."""
        while self._due and self._due[0][0] <= now:
            until, _seq, key = heapq.heappop(self._due)
            h = self._held.get(key)
            if h is None or h.until_s != until:
                continue  # answered elsewhere, or rescheduled
            self._unhold(key)
            self.counters["fallback_serves"] += 1
            first = ranking(key, self.weights())[:1]
            waited = now - h.since_s
            log.debug("request %s: no claim within %.2fs; serving it here", key[:12], waited)
            if first and first[0] != self.node and first[0] not in self._warned_nodes \
                    and len(self._warned_nodes) < MAX_PEERS:
                self._warned_nodes.add(first[0])
                log.warning("coordinator %s: node %s ranked first for a request but did not "
                            "claim it within %.2fs, so it was served here (node %s): the link "
                            "to %s is down, or its coordinators never get requests -- if it is "
                            "this very broker (one broker under two names, a clustered broker), "
                            "give every coordinator the same `node`", self.self_id, first[0],
                            waited, self.node, first[0])
            h.admit(rank_of(key, self.node, self.weights()))

    async def _publish_pending(self) -> bool:
        """Our claims, oldest first; False when one could not go out (it waits for the next
        connection, or the next try)."""
        now = self._clock()
        batch: list[tuple[str, bytes, Properties]] = []
        t = self.topics.coordinator_claims(self.self_id)
        while self._pending:
            key = self._pending.popleft()
            e = self._entry(key)
            serving = self._serving.get(key)
            c = serving.claim if serving is not None else (
                e.claim if e is not None and self._is_mine(e.claim) else None)
            if c is None or (serving is not None and serving.aborted):
                continue  # expired, or lost to another claim
            left = self.claim_ttl_s - (now - e.seen_s) if e is not None else self.claim_ttl_s
            if left < 1:
                continue
            batch.append((key, t.encode(c), _expiry_props(left)))
        if not batch:
            return True
        results = await asyncio.gather(*[
            self._link.publish(t.topic, payload, qos=1, properties=props)
            for _key, payload, props in batch], return_exceptions=True)
        ok = True
        for (key, _payload, _props), r in zip(batch, results, strict=True):
            if isinstance(r, aiomqtt.MqttError):
                self._pending.append(key)
                ok = False
            elif isinstance(r, BaseException):
                raise r
        return ok

    async def run(self) -> None:
        """Heartbeats, held copies whose time has come, claims to publish."""
        next_hb = self._clock()
        while True:
            now = self._clock()
            if now >= next_hb:
                self.heartbeat()
                next_hb = now + self.heartbeat_s
                self._expire_peers()
                self._view_changed()
            self.serve_due(now)
            self._event.clear()
            retry_s = math.inf
            if self._link.up and not await self._publish_pending():
                retry_s = RETRY_S
            wake = min(next_hb, self._due[0][0]) if self._due else next_hb
            timeout = max(0.0, min(wake - self._clock(), retry_s))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._event.wait(), timeout)
