"""Phones' cancel messages: which request a cancel names, and cancels that came too early.

A phone cancels a request by publishing a ``cancel`` message on ``cancel/{client_id}`` with the
request's correlation data. Every coordinator reads every cancel (the request went to one member
of the shared subscription; the cancel cannot know which) and acts on the requests it serves.
MQTT orders messages per topic only, so a cancel may overtake its request on the way to the
coordinator that will serve it: such a cancel is kept for a while (:class:`EarlyCancels`) and
the request is refused with ``cancelled`` when it arrives. Pure bookkeeping, clock passed in.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

#: (client id, correlation data): a request as its phone names it
RequestKey = tuple[str, bytes]


@dataclass
class EarlyCancels:
    """Cancels for requests this coordinator does not (yet) serve, kept ``ttl_s`` seconds and
    at most ``capacity`` of them (the oldest go first: a flood of cancels costs bounded memory).
    Coordinators that never see the request forget the cancel when it expires."""

    ttl_s: float = 30.0
    capacity: int = 4096
    _seen: OrderedDict[RequestKey, float] = field(default_factory=OrderedDict)

    def add(self, key: RequestKey, now_s: float) -> None:
        self._expire(now_s)
        self._seen.pop(key, None)
        self._seen[key] = now_s + self.ttl_s
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)

    def take(self, key: RequestKey, now_s: float) -> bool:
        """Whether a live cancel for ``key`` was waiting (it is used up)."""
        self._expire(now_s)
        return self._seen.pop(key, None) is not None

    def _expire(self, now_s: float) -> None:
        while self._seen:
            key, until = next(iter(self._seen.items()))
            if until > now_s:
                return
            del self._seen[key]

    def __len__(self) -> int:
        return len(self._seen)
