"""The bench's fleet: a persistent mosquitto, agents a0.., coordinators in one group, and a
small-limits coordinator under its own root for the bounds phase -- all through the one fleet
harness (:mod:`moe2.tools.fleet.harness`)."""

from __future__ import annotations

import os
import pwd
from collections.abc import Sequence
from pathlib import Path

from moe2.tools.fleet.harness import Fleet, FleetError

__all__ = ["AGENT_ARGS", "BOUNDS_COORDINATOR_TOML", "BOUNDS_ROOT", "BROKER_CONF",
           "MAIN_COORDINATOR_TOML", "STEP_DEADLINE_MAX_S", "STEP_DEADLINE_MIN_S", "FleetError",
           "ReliabilityFleet", "broker_config"]

#: a site broker: Debian's mosquitto persists sessions and retained messages across restarts
BROKER_CONF = (
    "listener {port} 127.0.0.1\n"
    "allow_anonymous true\n"
    "persistence true\n"
    "persistence_location {dir}/\n"
    "autosave_interval 60\n"
    "max_queued_messages 100000\n"
    "max_inflight_messages 0\n"
    "message_size_limit 0\n"
    "set_tcp_nodelay true\n"
)

AGENT_ARGS = ("--n-ctx", "512", "--max-sessions", "96", "--threads", "1",
              "--telemetry-interval", "0.5", "--meter", "estimated")

#: the step deadline of the main coordinators, bounded on both sides: a healthy expert on a
#: loaded box is never dropped for lateness, a hung one (SIGSTOP for longer) always is
STEP_DEADLINE_MIN_S = 4.0
STEP_DEADLINE_MAX_S = 5.0
MAIN_COORDINATOR_TOML = (
    "max_concurrent = 512\n"
    "max_concurrent_per_client = 16\n"
    "rate_per_client_per_s = 1000.0\n"
    f"step_deadline_min_s = {STEP_DEADLINE_MIN_S}\n"
    f"step_deadline_max_s = {STEP_DEADLINE_MAX_S}\n"
)
BOUNDS_ROOT = "bounds"
BOUNDS_COORDINATOR_TOML = (
    "max_concurrent_per_client = 2\n"
    "rate_per_client_per_s = 5.0\n"
    "max_prompt_chars = 256\n"
    "max_tokens_limit = 32\n"
)


def broker_config() -> str:
    """BROKER_CONF plus ``user``: mosquitto started as root drops to 'mosquitto' and could not
    write its persistence file in our directory."""
    return BROKER_CONF + f"user {pwd.getpwuid(os.getuid()).pw_name}\n"


class ReliabilityFleet(Fleet):
    """``with ReliabilityFleet(work, experts) as f:`` starts the broker, ``n_agents`` agents
    ``a0..`` serving ``experts`` (cycled), ``coordinators`` in one group and, with ``bounds``,
    one agent ``b0`` and one coordinator ``cb`` with small limits under :data:`BOUNDS_ROOT`.
    Processes are named by their ids (``a1``, ``c0``) for :meth:`signal` and :meth:`restart`.
    """

    def __init__(self, work: Path, experts: Sequence[Path], *, n_agents: int = 3,
                 coordinators: Sequence[str] = ("c0", "c1"), bounds: bool = True,
                 root: str = "moe2") -> None:
        super().__init__(work, root=root, broker_config=broker_config())
        self.experts = [Path(e) for e in experts]
        self.agents = [f"a{i}" for i in range(n_agents)]
        self.coordinators = list(coordinators)
        self.bounds = bounds

    def __enter__(self) -> ReliabilityFleet:
        super().__enter__()
        try:
            for i, name in enumerate(self.agents):
                self.start_agent(name, self.experts[i % len(self.experts)], *AGENT_ARGS,
                                 name=name)
            for name in self.coordinators:
                self.start_coordinator(coordinator_id=name, config_text=MAIN_COORDINATOR_TOML,
                                       name=name)
            if self.bounds:
                self.start_agent("b0", self.experts[0], *AGENT_ARGS, root=BOUNDS_ROOT,
                                 name="b0")
                self.start_coordinator(coordinator_id="cb", config_text=BOUNDS_COORDINATOR_TOML,
                                       root=BOUNDS_ROOT, name="cb")
        except BaseException:
            self.close()
            raise
        return self

    async def wait_ready(self, agents: Sequence[str] | None = None,  # type: ignore[override]
                         coordinators: Sequence[str] | None = None, *, root: str | None = None,
                         timeout_s: float = 90.0, required: Sequence[str] = ()) -> float:
        """Until every coordinator fuses every agent (default: the main group's)."""
        return await super().wait_ready(
            self.agents if agents is None else agents,
            self.coordinators if coordinators is None else coordinators,
            root=root, timeout_s=timeout_s, required=required)
