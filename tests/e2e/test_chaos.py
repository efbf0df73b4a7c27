"""Issue 7, the bounded CI form: reliability under load, faults and hostile input.

The live tests run the phases of :mod:`moe2.tools.bench.reliability` (``moe2 bench
reliability`` is the full form) with small figures against a private mosquitto, three agents and
two coordinators in one shared-subscription group (plus one agent and one coordinator with small
limits under their own topic root). The in-process tests feed hypothesis-generated messages
straight into a coordinator's and an agent's message handlers and check the invariants that the
live fuzz can only sample: nothing raises, every request with a reply topic gets exactly one
final or error, bookkeeping stays bounded, the agent's KV cache stays consistent. The last tests
pin the bugs this suite found.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe2.shared import wire
from moe2.shared.mqtt import make_client, parse_broker_url
from moe2.tools.bench.reliability import (
    LoadSpec,
    ReliabilityFleet,
    mutate,
    phase_agent_faults,
    phase_bounds,
    phase_broker_restart,
    phase_coordinator_kill,
    phase_fuzz,
    phase_load,
)
from moe2.tools.clients.phone import AskError, PhoneClient
from tests.conftest import Ggufs

pytestmark = pytest.mark.chaos

LOAD = LoadSpec(clients=10, per_client=4, concurrency=2, max_tokens=12, timeout_s=20.0)
FAULTS = LoadSpec(clients=10, per_client=4, concurrency=2, max_tokens=12, timeout_s=20.0)
ERROR_CODES = {c.value for c in wire.ErrorCode}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory,
          ggufs: Ggufs) -> Iterator[ReliabilityFleet]:
    experts = ggufs.shared
    with ReliabilityFleet(tmp_path_factory.mktemp("fleet"), [e.path for e in experts]) as f:
        asyncio.run(f.wait_ready(timeout_s=120))
        yield f


def _typed(errors: dict[str, int]) -> bool:
    return set(errors) <= ERROR_CODES


# --------------------------------------------------------------------------- live phases


def test_load_every_request_gets_exactly_one_final(fleet: ReliabilityFleet) -> None:
    r = asyncio.run(phase_load(fleet, LOAD))
    assert r["sent"] == LOAD.total, r["not_sent"]
    assert r["finals"] == LOAD.total, r["errors_by_code"]
    assert r["lost"] == 0
    assert r["unmatched_replies"] == 0  # no duplicate or stray terminal message
    assert r["throughput_rps"] > 0
    assert r["latency_p50_s"] <= r["latency_p99_s"]


def test_agent_sigkill_and_sigstop_under_load(fleet: ReliabilityFleet) -> None:
    """The killed agent leaves its requests, the hung one is dropped at the step deadline,
    requests still finish; both rejoin the plan (the phase waits until every coordinator fuses
    all three agents again, and fails otherwise)."""
    r = asyncio.run(phase_agent_faults(fleet, FAULTS))
    outcomes = r.pop("outcomes")
    assert r["lost"] == 0, r
    assert r["sent"] == FAULTS.total
    assert _typed(r["errors_by_code"])
    assert r["finals_with_killed_dropped"] >= 1, (r, Counter(o.dropped for o in outcomes))
    # the kill is seen through the agent's Last Will, not a deadline
    assert r["finals_in_flight_at_kill_with_killed_dropped_offline"] >= 1, \
        r["killed_drop_reasons"]
    assert r["hung_dropped_by_step_deadline"] >= 1, (r["finals_with_hung_dropped"],
                                                     r["hung_drop_reasons"],
                                                     r["finals_in_flight_at_stop"])
    assert r["faults_survived"] == 2
    assert r["rejoined_within_s"] is not None


def test_broker_restart_under_load(fleet: ReliabilityFleet) -> None:
    r = asyncio.run(phase_broker_restart(fleet, FAULTS, down_s=1.0))
    assert r["lost"] == 0
    assert _typed(r["errors_by_code"])
    assert r["in_flight_at_stop"]["sent"] >= 1
    assert r["in_flight_at_stop"]["lost"] == 0  # each got its final or a typed error
    after = r["after_recovery"]
    assert after["sent"] == FAULTS.clients
    assert after["finals"] == after["sent"]


def test_coordinator_sigkill_phones_are_told(fleet: ReliabilityFleet) -> None:
    """Two coordinators, one SIGKILLed under load: the survivor carries on and tells the phones
    of the dead one's requests (from its retained in-flight markers). A request still on its
    way into the dying coordinator (MQTT drops what a clean session had not processed) is told
    by the phone client: it saw the coordinator's Last Will and got no reply within its grace.
    No phone is left to its silence timeout."""
    r = asyncio.run(phase_coordinator_kill(fleet, FAULTS, freeze_agents_s=0.5))
    assert r["in_flight_at_kill"] >= 1
    assert r["told_by_survivor"] >= 1
    assert "went offline before this request finished" in r["told_how"]
    assert r["finals_after_kill_by"].get(r["survivor"], 0) >= 1, r
    assert r["finals_after_kill_by"].get(r["killed"], 0) == 0
    assert _typed(r["errors_by_code"])
    assert set(r["phone_errors"]) <= {"coordinator_lost"}
    assert r["lost"] == 0


def test_fuzz_every_subscribed_topic(fleet: ReliabilityFleet) -> None:
    r = asyncio.run(phase_fuzz(fleet, 200, rounds=2, seed=7, timeout_s=60.0))
    assert r["crashed"] == {}
    assert r["replies_complete"]
    assert r["agent_replies_missing"] == 0
    assert r["agent_replies_unexpected"] == 0
    assert r["agent_replies_duplicated"] == 0
    assert r["agent_replies_malformed"] == 0
    assert r["phone_replies_missing"] == 0
    assert r["phone_replies_unexpected"] == 0
    assert r["phone_replies_duplicated"] == 0
    assert r["victim_messages"] == 0
    assert r["inputs_tried"] >= 2000
    # a gross bound; the in-process tests below check the bookkeeping itself
    assert r["rss_growth_total_max_mib"] < 32
    healthy = r["healthy_after"]
    assert healthy["finals"] == healthy["sent"] > 0


def test_bounds_rate_concurrency_prompt_and_max_tokens(fleet: ReliabilityFleet) -> None:
    r = asyncio.run(phase_bounds(fleet))
    c = r["checks"]
    assert c["prompt_too_long"]["code"] == "bad_request"
    assert "256" in c["prompt_too_long"]["message"]
    assert c["max_tokens"]["code"] == "bad_request"
    assert "32" in c["max_tokens"]["message"]
    assert c["concurrency"]["too_many_requests"] >= 1
    assert c["concurrency"]["finals"] >= 1
    assert "2 requests at once" in c["concurrency"]["message"]
    assert c["rate"]["rate_limited"] >= 1
    assert c["rate"]["finals"] >= 1
    assert "requests/s" in c["rate"]["message"]
    assert r["lost"] == 0


REQUEST_BODIES = [
    wire.encode_phone(wire.PhoneRequest(prompt="hi", max_tokens=2, raw=True), None),
    wire.encode_phone(wire.PhoneRequest(prompt="hi", max_tokens=2), wire.CONTENT_TYPE_MSGPACK),
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stop": ["x"]}',
]


@st.composite
def request_body(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return draw(st.binary(max_size=200))
    base = draw(st.sampled_from(REQUEST_BODIES))
    if kind == 1:
        return base
    out = base
    for _ in range(draw(st.integers(1, 3))):
        out = mutate(out, random.Random(draw(st.integers(0, 2**32))))
    try:
        req = wire.decode_phone_request(out, None)
    except wire.DecodeError:
        return out
    return out if req.max_tokens <= 4 else b"\xc1" + out  # keep the fleet's work small


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=request_body(),
       ct=st.sampled_from([None, wire.CONTENT_TYPE_JSON, wire.CONTENT_TYPE_MSGPACK, "x/y"]))
def test_hypothesis_requests_get_exactly_one_terminal_reply(fleet: ReliabilityFleet, body: bytes,
                                                            ct: str | None) -> None:
    async def main() -> list[wire.PhoneReply | AskError]:
        cid = f"hyp-{uuid.uuid4().hex[:8]}"
        async with make_client(parse_broker_url(fleet.url), identifier=cid) as c, \
                PhoneClient(c, cid, fleet.topics) as phone:
            q = await phone.send_raw(body, correlation=b"c", content_type=ct)
            got: list[wire.PhoneReply | AskError] = []
            while not got or isinstance(got[-1], wire.TokenChunk):
                got.append(await asyncio.wait_for(q.get(), 30))
            return got

    replies = asyncio.run(main())
    assert sum(isinstance(m, (wire.FinalReply, wire.ErrorReplyPhone)) for m in replies) == 1
