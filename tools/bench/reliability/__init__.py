"""``moe2 bench reliability``: load, faults, broker restart, coordinator kill, fuzzing, bounds.

Everything runs against real processes on loopback: a private mosquitto (with persistence, as a
site broker runs it), ``moe2 agent`` processes serving tiny GGUF experts and ``moe2 coordinator``
processes in one shared-subscription group. Phones are :class:`PhoneClient` s with persistent
sessions that reconnect by themselves and check the PUBACK of every request.

Per request the bench records how the phone was told:

- ``final`` or ``error`` (by code): a message from a coordinator -- the request was *sent*
  (the broker acknowledged it);
- ``phone_error`` (``connection_lost``): sent, then the phone's own broker connection dropped
  before any reply and none came within its grace after the reconnect; the phone's client told
  the app (a request in transit to a coordinator when the broker stops is dropped by MQTT);
- ``lost``: sent, and nothing came back within the phone's silence timeout:
  ``lost = sent - finals - errors - phone_errors``, and must be 0;
- ``no_coordinator`` (PUBACK "No matching subscribers") and ``not_connected`` / ``send_failed``
  (the phone had no broker): *not sent*, and the phone knew at once.

Phases (each returns plain figures; :func:`run_reliability_bench` runs them all, and
``tests/test_chaos.py`` runs the same phases with smaller numbers):

- :func:`phase_load`: many phones at once; throughput, p50/p99 latency.
- :func:`phase_agent_faults`: SIGKILL one agent and SIGSTOP another under load; restart and
  resume them; both rejoin the plan.
- :func:`phase_broker_restart`: stop and start the broker under load.
- :func:`phase_coordinator_kill`: SIGKILL one of two coordinators under load.
- :func:`phase_fuzz`: random, mutated and forged messages on every topic a coordinator or agent
  subscribes to; RSS of every process before and after.
- :func:`phase_bounds`: rate, concurrency, prompt length and max_tokens limits on a coordinator
  configured with small ones (its own topic root).
- :func:`phase_bridged` (its own fleets, :mod:`.bridged`): two sites on one broker, then on two
  bridged brokers, then through a bridge drop: every request answered once (finals,
  duplicates, duplicate chunks, lost, requests stepped by two coordinators), and the time to
  first token against one broker.
"""

from __future__ import annotations

from moe2.tools.bench.reliability.bridged import phase_bridged
from moe2.tools.bench.reliability.faults import (
    phase_agent_faults,
    phase_broker_restart,
    phase_coordinator_kill,
)
from moe2.tools.bench.reliability.fleet import (
    AGENT_ARGS,
    BOUNDS_COORDINATOR_TOML,
    BOUNDS_ROOT,
    BROKER_CONF,
    MAIN_COORDINATOR_TOML,
    STEP_DEADLINE_MAX_S,
    STEP_DEADLINE_MIN_S,
    FleetError,
    ReliabilityFleet,
    broker_config,
)
from moe2.tools.bench.reliability.fuzz import (
    FuzzMessage,
    FuzzTargets,
    ReplyCounter,
    fuzz_messages,
    mutate,
    phase_fuzz,
    publish_all,
)
from moe2.tools.bench.reliability.load import (
    LoadRun,
    LoadSpec,
    Progress,
    ask_once,
    drive_load,
    phase_load,
)
from moe2.tools.bench.reliability.outcomes import (
    NOT_SENT_KINDS,
    PHONE_ERRORS,
    PROMPTS,
    SENT_KINDS,
    Outcome,
    percentile,
    tally,
)
from moe2.tools.bench.reliability.run import (
    FULL,
    QUICK,
    BenchSpec,
    phase_bounds,
    run_reliability_bench,
)

__all__ = [
    "AGENT_ARGS",
    "BOUNDS_COORDINATOR_TOML",
    "BOUNDS_ROOT",
    "BROKER_CONF",
    "FULL",
    "MAIN_COORDINATOR_TOML",
    "NOT_SENT_KINDS",
    "PHONE_ERRORS",
    "PROMPTS",
    "QUICK",
    "SENT_KINDS",
    "STEP_DEADLINE_MAX_S",
    "STEP_DEADLINE_MIN_S",
    "BenchSpec",
    "FleetError",
    "FuzzMessage",
    "FuzzTargets",
    "LoadRun",
    "LoadSpec",
    "Outcome",
    "Progress",
    "ReliabilityFleet",
    "ReplyCounter",
    "ask_once",
    "broker_config",
    "drive_load",
    "fuzz_messages",
    "mutate",
    "percentile",
    "phase_agent_faults",
    "phase_bounds",
    "phase_bridged",
    "phase_broker_restart",
    "phase_coordinator_kill",
    "phase_fuzz",
    "phase_load",
    "publish_all",
    "run_reliability_bench",
    "tally",
]
