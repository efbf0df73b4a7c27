"""Exactly one answer per request across brokers: the pure decisions of
:mod:`moe2.coordinator.once` and its shell's bounded tables, without a broker or a clock."""

from __future__ import annotations

import math
from collections import Counter

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe2.coordinator import once
from moe2.coordinator.link import BrokerLink
from moe2.coordinator.once import Drop, Hold, Reaction, Serve
from moe2.shared import wire
from moe2.shared.topics import Topics

TP = Topics()
KEY = once.request_key("p1", "moe2/responses/p1/r", b"c1", None, b'{"prompt":"hi"}')


def claim(cid: str = "c0", node: str = "A", ts: float = 100.0, rank: int = 0,
          key: str = KEY, done: bool = False, incarnation: str = "i") -> wire.RequestClaim:
    return wire.RequestClaim(key=key, coordinator_id=cid, node=node, incarnation=incarnation,
                             ts=ts, rank=rank, done=done)


# --------------------------------------------------------------------------- keys and ranking


def test_request_key_names_one_request_whatever_copy() -> None:
    parts = ("p1", "moe2/responses/p1/r", b"corr", "application/json", b"{}")
    k = once.request_key(*parts)
    assert k == once.request_key(*parts) and len(k) == wire.REQUEST_KEY_CHARS
    assert all(c in "0123456789abcdef" for c in k)
    for i, other in enumerate(("p2", "moe2/responses/p1/s", b"corr2", None, b"[]")):
        changed = list(parts)
        changed[i] = other
        assert once.request_key(*changed) != k  # type: ignore[arg-type]
    # length prefixes: moving a byte from one part to the next is another request
    assert once.request_key("ab", "c", None, None, b"") != once.request_key("a", "bc", None,
                                                                            None, b"")


def test_default_node_is_the_brokers_host_and_port() -> None:
    assert once.default_node("mqtt://u:p@Broker.Local:1884") == "broker.local:1884"
    assert once.default_node("mqtts://hub") == "hub:8883"
    assert once.default_node("mqtt://127.0.0.1") == "127.0.0.1:1883"


def test_every_coordinator_ranks_the_nodes_alike() -> None:
    weights = {"A": 2, "B": 1, "C": 1}
    for i in range(200):
        key = f"{i:032x}"
        order = once.ranking(key, weights)
        assert order == once.ranking(key, dict(reversed(list(weights.items()))))
        assert sorted(order) == sorted(weights)
        assert [once.rank_of(key, n, weights) for n in order] == [0, 1, 2]
    assert once.rank_of(KEY, "Z", weights) == 3  # outside the view: last


def test_a_nodes_share_of_first_ranks_follows_its_coordinators() -> None:
    weights = {"A": 2, "B": 1}
    firsts = Counter(once.ranking(f"{i:032x}", weights)[0] for i in range(3000))
    assert abs(firsts["A"] / 3000 - 2 / 3) < 0.04


def test_while_healing_a_copy_ranked_first_waits_half_a_period() -> None:
    weights = {"A": 1, "B": 1}
    order = once.ranking(KEY, weights)
    assert once.on_copy(KEY, known=False, node=order[0], weights=weights, now_s=1.0,
                        fallback_s=0.3, healing=True) == Hold(0, pytest.approx(1.15))
    assert once.on_copy(KEY, known=False, node=order[1], weights=weights, now_s=1.0,
                        fallback_s=0.3, healing=True) == Hold(1, pytest.approx(1.3))
    assert once.on_copy(KEY, known=True, node=order[0], weights=weights, now_s=1.0,
                        fallback_s=0.3, healing=True) == Drop()


def test_one_node_serves_every_copy_at_once() -> None:
    """One broker (or one cluster): every coordinator is on the same node, so every copy ranks
    first -- no wait, ever."""
    for i in range(100):
        action = once.on_copy(f"{i:032x}", known=False, node="A", weights={"A": 3},
                              now_s=5.0, fallback_s=0.3)
        assert action == Serve(0)


def test_on_copy_drops_known_keys_and_holds_by_rank() -> None:
    weights = {"A": 1, "B": 1, "C": 1}
    order = once.ranking(KEY, weights)
    assert once.on_copy(KEY, known=True, node=order[0], weights=weights, now_s=1.0,
                        fallback_s=0.3) == Drop()
    assert once.on_copy(KEY, known=False, node=order[0], weights=weights, now_s=1.0,
                        fallback_s=0.3) == Serve(0)
    for r in (1, 2):
        action = once.on_copy(KEY, known=False, node=order[r], weights=weights, now_s=1.0,
                              fallback_s=0.3)
        assert action == Hold(r, pytest.approx(1.0 + 0.3 * r))


def test_live_weights_count_live_accepting_coordinators() -> None:
    peers = {
        "c1": once.PeerView("A", True, "i", seen_s=9.5, period_s=1.0),
        "c2": once.PeerView("B", True, "i", seen_s=9.0, period_s=1.0),
        "c3": once.PeerView("B", False, "i", seen_s=9.9, period_s=1.0),  # draining
        "c4": once.PeerView("C", True, "i", seen_s=5.0, period_s=1.0),  # 3 heartbeats missed
    }
    assert once.live_weights(peers, "A", True, now_s=10.0) == {"A": 2, "B": 1}
    assert once.live_weights(peers, "A", False, now_s=10.0) == {"A": 1, "B": 1}
    assert once.live_weights({}, "A", False, now_s=10.0) == {}


# --------------------------------------------------------------------------- precedence


claims_st = st.builds(
    claim, cid=st.sampled_from(["c0", "c1", "c2"]), node=st.sampled_from(["A", "B", "C"]),
    ts=st.floats(0, 2, allow_nan=False), rank=st.integers(0, 3),
    incarnation=st.sampled_from(["i", "j"]))


@settings(max_examples=200, deadline=None)
@given(st.lists(claims_st, min_size=2, max_size=6, unique_by=lambda c: (c.coordinator_id,
                                                                       c.incarnation)))
def test_precedence_is_a_strict_total_order(cs: list[wire.RequestClaim]) -> None:
    """Of any claims of one key exactly one wins on every coordinator: no two both stop (a
    loss), no two both go on (a duplicate)."""
    for a in cs:
        assert not once.precedes(a, a)
        for b in cs:
            if a is not b:
                assert once.precedes(a, b) != once.precedes(b, a)
                for c in cs:
                    if once.precedes(a, b) and once.precedes(b, c):
                        assert once.precedes(a, c)
    winners = [a for a in cs if all(a is b or once.precedes(a, b) for b in cs)]
    assert len(winners) == 1


def test_precedence_older_bucket_then_rank_then_score_then_id() -> None:
    old, new = claim("c1", "B", ts=100.0), claim("c0", "A", ts=105.0)
    assert once.precedes(old, new)  # a stale copy served after a partition loses
    first, fallback = claim("c0", "A", ts=100.01, rank=0), claim("c1", "B", ts=100.02, rank=1)
    assert once.precedes(first, fallback)
    a, b = claim("c0", "A", ts=100.01), claim("c1", "B", ts=100.02)
    assert once.precedes(a, b) == (once.node_score(KEY, "A") > once.node_score(KEY, "B"))
    assert once.precedes(claim("c0", "A", ts=100.01), claim("c1", "A", ts=100.0))


def test_an_answered_claim_is_remembered_first() -> None:
    serving, done = claim("c0", ts=100.0), claim("c1", ts=109.0, done=True)
    assert once.better(done, serving) and not once.better(serving, done)
    assert once.better(claim("c0", ts=1.0), claim("c1", ts=9.0))


@pytest.mark.parametrize(("theirs", "mine", "serving", "sent", "held", "want"), [
    (claim("c1"), None, False, False, False, Reaction.RECORD),
    (claim("c1"), None, False, False, True, Reaction.DROP_HELD),
    (claim("c1", ts=99.0), claim("c0"), True, False, False, Reaction.ABORT),
    (claim("c1", ts=99.0), claim("c0"), True, True, False, Reaction.STOP_LATE),
    (claim("c1", ts=109.0), claim("c0"), True, False, False, Reaction.RESEND),
    # an answered claim stops a serve whatever the order (the phone has its final)
    (claim("c1", ts=109.0, done=True), claim("c0"), True, False, False, Reaction.ABORT),
    # we answered: whoever claims after us hears it again; both answered: a late conflict
    (claim("c1", ts=99.0), claim("c0", done=True), False, True, False, Reaction.RESEND),
    (claim("c1", done=True), claim("c0", done=True), False, True, False,
     Reaction.CONFLICT_DONE),
])
def test_reactions_to_a_claim(theirs: wire.RequestClaim, mine: wire.RequestClaim | None,
                              serving: bool, sent: bool, held: bool, want: Reaction) -> None:
    assert once.on_claim(theirs, mine=mine, serving=serving, sent=sent, held=held) is want


def test_claims_and_heartbeats_round_trip_and_refuse_garbage() -> None:
    c = claim(done=True, rank=2)
    t = TP.coordinator_claims("c0")
    assert t.topic == "moe2/coordinators/c0/claims"
    assert t.decode(t.encode(c)) == c
    hb = wire.CoordinatorHeartbeat(coordinator_id="c0", node="h:1883", incarnation="i",
                                   held=3, serving=1)
    h = TP.coordinator_heartbeat("c0")
    assert h.decode(h.encode(hb)) == hb
    good = msgspec.to_builtins(c)
    for bad in ({**good, "key": "xyz"}, {**good, "key": "A" * 32}, {**good, "rank": -1},
                {**good, "ts": math.inf}, {**good, "node": ""}, {**good, "node": "n" * 300},
                {**good, "extra": 1}):
        with pytest.raises(wire.DecodeError):
            t.decode(msgspec.msgpack.encode(bad))
    with pytest.raises(wire.DecodeError):
        h.decode(msgspec.msgpack.encode({**msgspec.to_builtins(hb), "interval_s": 0}))


# --------------------------------------------------------------------------- the shell


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def shell(node: str = "A", fallback_s: float = 0.3) -> tuple[once.ExactlyOnce, Clock,
                                                               dict[str, int]]:
    clock = Clock()
    counters: dict[str, int] = {}
    eo = once.ExactlyOnce(TP, "c0", node, "inc0", BrokerLink(), clock=clock, wall=clock,
                          fallback_s=fallback_s, claim_ttl_s=120.0, heartbeat_s=1.0,
                          counters=counters, accepting=lambda: True)
    return eo, clock, counters


def heartbeat(eo: once.ExactlyOnce, cid: str, node: str, **kw: object) -> None:
    t = TP.coordinator_heartbeat(cid)
    eo.on_heartbeat_message(t.topic, t.encode(wire.CoordinatorHeartbeat(
        coordinator_id=cid, node=node, incarnation="x", **kw)))  # type: ignore[arg-type]


def test_a_held_copy_is_dropped_by_a_claim_or_served_when_its_time_comes() -> None:
    eo, clock, counters = shell()
    heartbeat(eo, "c9", "B")
    keys = [f"{i:032x}" for i in range(40)]
    ours = [k for k in keys if once.ranking(k, {"A": 1, "B": 1})[0] == "A"]
    theirs = [k for k in keys if k not in ours]
    admitted: list[tuple[str, int]] = []

    def admit(k: str, rank: int) -> None:  # what the coordinator does: answer and claim
        admitted.append((k, rank))
        eo.claim(k, rank)

    for k in keys:
        eo.on_copy(k, lambda rank, k=k: admit(k, rank))
    assert sorted(admitted) == sorted((k, 0) for k in ours)  # no wait for our own
    assert eo.held == len(theirs) == counters["copies_held"]
    eo.on_claim(claim("c9", "B", key=theirs[0]))  # B answers its first one
    assert eo.held == len(theirs) - 1 and counters["held_dropped"] == 1
    eo.serve_due(clock.now + 0.29)
    assert eo.held == len(theirs) - 1  # not yet
    clock.now += 0.3
    eo.serve_due(clock.now)  # the rest never got a claim: served here, as fallbacks
    assert eo.held == 0
    assert sorted(admitted[len(ours):]) == sorted((k, 1) for k in theirs[1:])
    assert counters["fallback_serves"] == len(theirs) - 1
    for k in keys:  # every one is claimed now: a late copy is a duplicate
        eo.on_copy(k, lambda rank: pytest.fail("served twice"))
    assert counters["copies_dropped"] == len(keys)
    assert eo.held == 0


def test_a_copy_of_a_key_claimed_or_served_here_is_dropped() -> None:
    eo, _clock, counters = shell()
    eo.on_claim(claim("c9", "B", key="1" * 32))
    eo.claim("2" * 32, 0)  # we refused it
    eo.claim("3" * 32, 0, sent=lambda: False, abort=lambda: None)  # we serve it
    for k in ("1" * 32, "2" * 32, "3" * 32):
        eo.on_copy(k, lambda rank: pytest.fail("a duplicate was answered"))
    assert counters["copies_dropped"] == 3


def test_a_losing_serve_is_aborted_before_its_first_token_or_stopped_after() -> None:
    eo, _clock, counters = shell()
    stopped: list[str] = []
    sent = {"a" * 32: False, "b" * 32: True}
    for k, was_sent in sent.items():
        eo.claim(k, 0, sent=lambda s=was_sent: s, abort=lambda k=k: stopped.append(k))
    for k in sent:  # an older claim from another node (a copy it served long before)
        eo.on_claim(claim("c9", "B", ts=1.0, key=k))
    assert stopped == list(sent)
    assert (counters["aborted"], counters["late_conflicts"]) == (1, 1)
    eo.on_claim(claim("c8", "C", ts=0.5, key="a" * 32))  # stopping is done once
    assert stopped == list(sent)


def test_a_winner_sends_its_claim_again_and_an_answered_one_says_done() -> None:
    eo, _clock, counters = shell()
    eo.claim("a" * 32, 0, sent=lambda: True, abort=lambda: pytest.fail("we win"))
    eo.on_claim(claim("c9", "B", ts=2000.0, key="a" * 32))  # a later claim: ours precedes
    assert counters["claims_resent"] == 1
    eo.finished("a" * 32)
    eo.on_claim(claim("c9", "B", ts=0.0, key="a" * 32))  # precedes, but we answered already
    assert counters["claims_resent"] == 2 and counters["late_conflicts"] == 0
    assert eo._pending.count("a" * 32) == 2  # queued for the loop to publish
    mine = eo._claims["a" * 32].claim
    assert mine.done and mine.coordinator_id == "c0"


def test_view_changes_reschedule_held_copies() -> None:
    """The first node's only coordinator stops (or its Last Will arrives): its held copies
    are served now, not after the fallback."""
    eo, clock, counters = shell(fallback_s=5.0)
    heartbeat(eo, "c9", "B")
    key = next(f"{i:032x}" for i in range(100)
               if once.ranking(f"{i:032x}", {"A": 1, "B": 1})[0] == "B")
    got: list[int] = []
    eo.on_copy(key, got.append)
    assert eo.held == 1
    eo.on_peer_gone("c9")
    eo.serve_due(clock.now)
    assert got == [0] and counters["fallback_serves"] == 1
    heartbeat(eo, "c9", "B")
    eo.on_copy("f" * 32, got.append)
    heartbeat(eo, "c9", "B", accepting=False)  # draining: out of the view at once
    eo.serve_due(clock.now)
    assert eo.held == 0


def test_after_a_bridge_comes_back_copies_ranked_first_wait_for_a_claim_behind_them() -> None:
    """A bridge (re)connects: the far side's outage queue brings copies it answered meanwhile,
    each with its claim right behind it. For a few heartbeats a copy that ranks this node first
    waits half a fallback period: its claim drops it (nothing answered twice); a copy with no
    claim is served then. Stale claims keep the window open; then copies are served at once."""
    eo, clock, counters = shell(fallback_s=2.0)
    clock.now = 5000.0  # the wall clock too: claims made before the heal are older than it
    keys = [f"{i:032x}" for i in range(3)]
    got: list[str] = []
    eo.on_bridge_up()
    for k in keys:
        eo.on_copy(k, lambda rank, k=k: got.append(k))
    assert got == [] and eo.held == 3
    eo.on_claim(claim("c9", "B", ts=4990.0, key=keys[0]))  # a stale copy: answered there
    eo.serve_due(clock.now + 0.99)
    assert got == [] and eo.held == 2
    clock.now += 1.0
    eo.serve_due(clock.now)  # no claim came for these: served here, once
    assert sorted(got) == sorted(keys[1:]) and eo.held == 0
    assert counters["held_dropped"] == 1
    clock.now += 1.5
    eo.on_claim(claim("c9", "B", ts=4990.0, key="c" * 32))  # the queue still arrives ...
    clock.now += 2.5  # ... so the window (3 heartbeats) is open past its first end
    eo.on_copy("a" * 32, got.append)
    assert eo.held == 1
    eo.on_claim(claim("c9", "B", ts=4990.0, key="a" * 32))
    clock.now += 3.5
    eo.on_copy("b" * 32, lambda rank: got.append("b" * 32))  # closed: served at once
    assert got[-1] == "b" * 32 and eo.held == 0


def test_a_dead_coordinators_request_is_told_only_when_nobody_answers_it() -> None:
    """What the survivor checks before it tells the phone of a dead coordinator's in-flight
    request to retry: a copy held or served here, another coordinator's claim, or an answered
    one mean the phone gets (or got) its answer -- telling it too would be a second reply."""
    eo, _clock, _counters = shell()
    dead = ("c9", "i")
    eo.on_claim(claim("c9", "B", key="1" * 32))  # the dead one claimed it: nobody else will
    assert not eo.answered_without("1" * 32, *dead)
    assert eo.answered_without("1" * 32, "c9", "an-earlier-run")
    assert not eo.answered_without("2" * 32, *dead)  # nobody claimed it
    eo.claim("2" * 32, 0, sent=lambda: False, abort=lambda: None)  # we serve it
    assert eo.answered_without("2" * 32, *dead)
    eo.finished("2" * 32)  # ... and answered it
    assert eo.answered_without("2" * 32, *dead)
    eo.on_claim(claim("c8", "C", key="3" * 32))  # a live peer answers it
    assert eo.answered_without("3" * 32, *dead)
    eo.claim("4" * 32, 0, sent=lambda: False, abort=lambda: None)
    eo.on_claim(claim("c9", "B", ts=1.0, key="4" * 32))  # the dead one's claim won: we stopped
    assert not eo.answered_without("4" * 32, *dead)


def test_floods_stay_bounded() -> None:
    eo, clock, _counters = shell()
    for i in range(once.MAX_PEERS + 50):
        heartbeat(eo, f"p{i}", f"n{i}")
    assert len(eo.peers) == once.MAX_PEERS
    clock.now += 1000  # their heartbeats stop: they expire, and room is made for new ones
    heartbeat(eo, "late", "B")
    assert len(eo.peers) == 1

    eo, clock, _counters = shell()
    heartbeat(eo, "c9", "B")
    for i in range(once.MAX_CLAIMS + 500):
        eo.on_claim(claim("c9", "B", key=f"{i:032x}"))
    assert eo.claims == once.MAX_CLAIMS
    served = 0

    def admit(rank: int) -> None:
        nonlocal served
        served += 1

    for i in range(once.MAX_HELD + 100):  # about half held (the other node ranks first)
        eo.on_copy(f"{i + 10**9:032x}", admit, size=10)
    assert eo.held <= once.MAX_HELD
    assert served + eo.held == once.MAX_HELD + 100  # a full table serves, never drops
    eo.serve_due(clock.now + 1)
    assert eo.held == 0
    eo.on_copy("e" * 32, admit, size=once.MAX_HELD_BYTES + 1)  # too big to hold: served
    assert eo.held == 0
    clock.now += 1000  # the claims expire
    eo.claim("d" * 32, 0)
    assert eo.claims == 1


def test_a_copy_waits_a_bounded_time_however_many_nodes_rank_first() -> None:
    weights = {f"n{i}": 1 for i in range(40)}
    last = once.ranking(KEY, weights)[-1]
    action = once.on_copy(KEY, known=False, node=last, weights=weights, now_s=0.0,
                          fallback_s=0.3)
    assert action == Hold(39, pytest.approx(once.MAX_HOLD_RANKS * 0.3))


@pytest.mark.parametrize("bad", [{"fallback_s": 0.0}, {"fallback_s": math.inf},
                                 {"claim_ttl_s": -1.0}, {"heartbeat_s": 11.0},
                                 {"node": "a/b"}, {"node": "x" * 256}])
def test_exactly_once_knobs_are_checked(bad: dict[str, object]) -> None:
    from moe2.shared.config import ConfigError, CoordinatorConfig

    CoordinatorConfig(node="site-a", fallback_s=0.5, claim_ttl_s=60, heartbeat_s=2).validate()
    with pytest.raises(ConfigError):
        CoordinatorConfig(**bad).validate()  # type: ignore[arg-type]
