"""Typed topics: every topic string of the system is built here and nowhere else.

A :class:`TypedTopic` knows its pattern under the configurable root (default ``moe2``) and the
payload type it carries, so a publisher cannot put a telemetry struct on a status topic and a
receive loop decodes with the right decoder. Phone-facing topics carry JSON or MessagePack by
content type and are therefore untyped here (see :mod:`moe2.shared.wire` for the phone codecs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Generic, TypeVar

import msgspec

from moe2.shared import wire

T = TypeVar("T", bound=msgspec.Struct)

_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def valid_name(name: str) -> bool:
    """Ids that become topic levels: no wildcards, separators or control characters."""
    return bool(_NAME_RE.match(name))


#: mosquitto 2 refuses (and disconnects) a PUBLISH whose topic has more '/' than this; it
#: forwards such a Response Topic all the same
MAX_TOPIC_SEPARATORS = 200


def publishable_topic(topic: str) -> bool:
    """A topic name the broker accepts in a PUBLISH. Mosquitto disconnects a client that
    publishes to a topic with wildcards, control characters (U+0000-U+001F, U+007F-U+009F) or
    more than 200 levels, and paho refuses wildcards with ValueError before sending. Response
    Topics arrive from the network unchecked (mosquitto 2.0 forwards ``a/+/b`` as one), so every
    reply checks first."""
    return (0 < len(topic.encode("utf-8", "surrogatepass")) <= 65535
            and topic.count("/") <= MAX_TOPIC_SEPARATORS
            and not any(c in "+#" or ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in topic)
            and not any(0xD800 <= ord(c) <= 0xDFFF for c in topic))


def check_name(kind: str, name: str) -> str:
    if not valid_name(name):
        raise ValueError(
            f"{kind} {name!r} is not valid: use 1-64 characters from letters, digits, '_', '.', '-'"
        )
    return name


@dataclass(frozen=True)
class TypedTopic(Generic[T]):
    """A concrete topic and the protocol message type that travels on it."""

    topic: str
    payload: type[T]
    retain: bool = False

    def encode(self, msg: T) -> bytes:
        if not isinstance(msg, self.payload):
            raise TypeError(
                f"{self.topic} carries {self.payload.__name__}, not {type(msg).__name__}")
        return wire.encode(msg)

    def decode(self, data: bytes) -> T:
        return wire.decode_as(data, self.payload)


@dataclass(frozen=True)
class Topics:
    """All topics under one root. Build once from config; pass it around."""

    root: str = "moe2"

    def __post_init__(self) -> None:
        if not self.root or any(c in self.root for c in "+#\0") or self.root.startswith("$"):
            raise ValueError(f"topic root {self.root!r} is not valid")

    # ---- agents
    def agent_status(self, agent_id: str) -> TypedTopic[wire.AgentStatus]:
        return TypedTopic(f"{self.root}/agents/{agent_id}/status", wire.AgentStatus, retain=True)

    def agent_telemetry(self, agent_id: str) -> TypedTopic[wire.Telemetry]:
        return TypedTopic(f"{self.root}/agents/{agent_id}/telemetry", wire.Telemetry)

    def agent_vocab(self, agent_id: str) -> TypedTopic[wire.Vocab]:
        return TypedTopic(f"{self.root}/agents/{agent_id}/vocab", wire.Vocab, retain=True)

    def agent_rpc(self, agent_id: str) -> str:
        """Where coordinators send Open/Step/Close (union-decoded by the agent)."""
        return f"{self.root}/agents/{agent_id}/rpc"

    @property
    def all_agent_status(self) -> str:
        return f"{self.root}/agents/+/status"

    @property
    def all_agent_telemetry(self) -> str:
        return f"{self.root}/agents/+/telemetry"

    @property
    def all_agent_vocab(self) -> str:
        return f"{self.root}/agents/+/vocab"

    def agent_id_of(self, topic: str) -> str | None:
        """``root/agents/{id}/...`` -> id, else None."""
        prefix = f"{self.root}/agents/"
        if not topic.startswith(prefix):
            return None
        rest = topic[len(prefix):].split("/")
        return rest[0] if len(rest) >= 2 and rest[0] else None

    # ---- coordinators
    def coordinator_inbox(self, coordinator_id: str) -> TypedTopic[wire.Reply]:
        """Agents' replies to one coordinator (the Response Topic of its RPCs)."""
        return TypedTopic(f"{self.root}/coordinators/{coordinator_id}/inbox", wire.Reply)

    def is_coordinator_inbox(self, topic: str) -> bool:
        """Whether ``topic`` is some coordinator's inbox: the only place agents reply to (the
        broker ACL says the same; without one, an agent must not be a reflector that sends
        distributions, k = 0 ones of 4 bytes a vocabulary entry, wherever a request says)."""
        prefix = f"{self.root}/coordinators/"
        if not (topic.startswith(prefix) and topic.endswith("/inbox")):
            return False
        return valid_name(topic[len(prefix):-len("/inbox")])

    def coordinator_status(self, coordinator_id: str) -> TypedTopic[wire.CoordinatorStatus]:
        return TypedTopic(
            f"{self.root}/coordinators/{coordinator_id}/status", wire.CoordinatorStatus, retain=True
        )

    def coordinator_inflight(self, coordinator_id: str,
                             request_id: str) -> TypedTopic[wire.InflightMarker]:
        """Retained marker of one request a coordinator is serving (so a surviving peer can
        tell the phone when this coordinator dies); an empty payload clears it."""
        return TypedTopic(f"{self.root}/coordinators/{coordinator_id}/inflight/{request_id}",
                          wire.InflightMarker, retain=True)

    def inflight_filter(self, coordinator_id: str = "+") -> str:
        """Every in-flight marker of one coordinator (or of all, ``"+"``)."""
        return f"{self.root}/coordinators/{coordinator_id}/inflight/+"

    def coordinator_claims(self, coordinator_id: str) -> TypedTopic[wire.RequestClaim]:
        """Claims of the requests one coordinator answers (exactly once across brokers: see
        :mod:`moe2.coordinator.once`); not retained, the key is in the payload."""
        return TypedTopic(f"{self.root}/coordinators/{coordinator_id}/claims", wire.RequestClaim)

    def coordinator_heartbeat(self, coordinator_id: str
                              ) -> TypedTopic[wire.CoordinatorHeartbeat]:
        """Which broker node a coordinator takes requests from (QoS 0, not retained)."""
        return TypedTopic(f"{self.root}/coordinators/{coordinator_id}/heartbeat",
                          wire.CoordinatorHeartbeat)

    @property
    def all_coordinator_claims(self) -> str:
        return f"{self.root}/coordinators/+/claims"

    @property
    def all_coordinator_heartbeats(self) -> str:
        return f"{self.root}/coordinators/+/heartbeat"

    def bridge_state(self, bridge: str) -> str:
        """Where a Mosquitto bridge generated by ``moe2 broker-config --bridge-to`` publishes its
        connection state (``1`` up, ``0`` down; retained)."""
        return f"{self.root}/bridges/{bridge}/state"

    def coordinator_of(self, topic: str) -> str | None:
        """``{root}/coordinators/{id}/...`` -> id (a valid name), else None."""
        prefix = f"{self.root}/coordinators/"
        if not topic.startswith(prefix):
            return None
        cid = topic[len(prefix):].split("/", 1)[0]
        return cid if valid_name(cid) else None

    @property
    def all_coordinator_status(self) -> str:
        return f"{self.root}/coordinators/+/status"

    @property
    def plan(self) -> TypedTopic[wire.PlanMsg]:
        return TypedTopic(f"{self.root}/plan", wire.PlanMsg, retain=True)

    # ---- phones (public API)
    def request(self, client_id: str) -> str:
        return f"{self.root}/requests/{client_id}"

    def requests_shared(self, group: str = "coordinators") -> str:
        """Shared subscription: several coordinators split the phones' requests."""
        return f"$share/{group}/{self.root}/requests/+"

    @property
    def all_requests(self) -> str:
        return f"{self.root}/requests/+"

    def response_prefix(self, client_id: str) -> str:
        return f"{self.root}/responses/{client_id}/"

    def response(self, client_id: str, level: str = "r") -> str:
        """A phone's response topic: one ``level`` below its own prefix."""
        return f"{self.response_prefix(client_id)}{level}"

    def responses_of_every_client(self, level: str) -> str:
        """Every client's response topic ending in ``level``: a gateway asks on behalf of many
        client ids (one per API key) and reads all their replies on one subscription."""
        return f"{self.root}/responses/+/{level}"

    def cancel(self, client_id: str) -> str:
        """Where a phone cancels one of its requests (same correlation data as the request).
        Not shared: every coordinator reads every cancel and acts on the requests it serves."""
        return f"{self.root}/cancel/{client_id}"

    @property
    def all_cancels(self) -> str:
        return f"{self.root}/cancel/+"

    def client_of_cancel(self, topic: str) -> str | None:
        prefix = f"{self.root}/cancel/"
        if not topic.startswith(prefix):
            return None
        rest = topic[len(prefix):]
        return rest if rest and "/" not in rest else None

    def client_of_request(self, topic: str) -> str | None:
        prefix = f"{self.root}/requests/"
        if not topic.startswith(prefix):
            return None
        rest = topic[len(prefix):]
        return rest if rest and "/" not in rest else None

    def response_allowed(self, client_id: str, response_topic: str) -> bool:
        """A reply may only go below the requesting phone's own response prefix."""
        return response_topic.startswith(self.response_prefix(client_id)) and publishable_topic(
            response_topic)
