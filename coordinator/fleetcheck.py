"""What an operator must be told about the fleet as the coordinator sees it: pure checks.

Each check turns the coordinator's view (the gate's expert names, the online agents) into
plain-sentence warnings. The coordinator logs a warning when it first appears, the planner puts
the current ones into the retained plan message, and ``moe2 monitor`` shows them -- so a fleet
that cannot serve says why at once instead of answering every request ``no_experts``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

from moe2.coordinator.registry import Registry


def _names(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def gate_coverage(gate_experts: Sequence[str], online: Sequence[str],
                  unknown_expert_weight: float = 0.0) -> list[str]:
    """Warnings when the gate's experts and the online agents do not (fully) overlap.

    A gate knows experts by name (``moe2 train-gate`` writes them into the ONNX file); an
    online agent whose id the gate does not know gets ``unknown_expert_weight`` -- 0 by
    default, so it never serves. A uniform gate (no names) weighs every agent alike: no
    warning. Nothing online yet: no warning either (agents join over time)."""
    if not gate_experts or not online:
        return []
    known = set(gate_experts)
    unknown = [a for a in online if a not in known]
    if not unknown:
        return []
    serving = "they are never used" if unknown_expert_weight <= 0 else (
        f"they get the fallback weight {unknown_expert_weight:g}")
    if len(unknown) == len(online):
        what = ("every request is answered no_experts" if unknown_expert_weight <= 0
                else "every answer uses the fallback weight")
        return [f"the gate knows experts {_names(gate_experts)} but none of the online agents "
                f"({_names(online)}) is among them: {what}; start the agents with the ids the "
                "gate was trained with, or train a gate for these agents (moe2 calibrate, "
                "moe2 train-gate)"]
    return [f"the gate does not know the online agents {_names(unknown)}: {serving} "
            "(train a gate that includes them)"]


def family_split(families: Mapping[str, Sequence[str]],
                 sizes: Mapping[str, int] | None = None) -> list[str]:
    """A warning when the online experts belong to more than one tokenizer family: a request
    is served by one family, the others are listed as dropped in its final."""
    if len(families) <= 1:
        return []
    parts = [f"{fp[:12]}{f' ({sizes[fp]} ids)' if sizes and fp in sizes else ''}: "
             f"{_names(members)}" for fp, members in sorted(families.items())]
    return [f"the online experts belong to {len(families)} tokenizer families that are not "
            f"fused token by token ({'; '.join(parts)}): a request is served by the family its "
            "gate weights favour, and its final lists the others as dropped"]


#: a fused step's median overhead from which a broker stall is reported (seconds): a LAN and
#: this coordinator cost a few ms; Linux delays an ACK 40 ms, others up to 200 ms
STALL_MIN_S: Final = 0.025
STALL_MAX_S: Final = 0.25
#: fused steps measured before the check says anything
STALL_MIN_STEPS: Final = 16


def broker_stall(fused_overhead_s: float, steps: int,
                 slowest_decode_s: float | None = None) -> list[str]:
    """A warning when fused steps wait tens of milliseconds beyond their slowest expert.

    With Nagle's algorithm on the broker's sockets (Mosquitto's default: no
    ``set_tcp_nodelay true``) the broker sends the first expert's reply to the coordinator and
    holds the second until the first is acknowledged; the coordinator, waiting for both, has
    nothing to send, so the ACK goes out when its delayed-ACK timer fires: about 40 ms on
    Linux, every token. The coordinator's clients acknowledge at once where they can (Linux
    TCP_QUICKACK); elsewhere, or past another hop, this is what the step overhead shows.
    ``fused_overhead_s``: the median overhead of the last ``steps`` steps with two or more
    experts (see :class:`moe2.coordinator.liveplan.StepOverhead`)."""
    if steps < STALL_MIN_STEPS or not STALL_MIN_S <= fused_overhead_s <= STALL_MAX_S:
        return []
    decode = (f" (the slowest expert decodes in {1000 * slowest_decode_s:.1f} ms)"
              if slowest_decode_s is not None else "")
    return [f"fused steps wait {1000 * fused_overhead_s:.0f} ms a token beyond their slowest "
            f"expert's decode{decode}, median of the last {steps}, where a few ms is normal: "
            "the broker is likely holding each second reply until the coordinator acknowledges "
            "the first (Nagle's algorithm on the broker's sockets against a delayed ACK, "
            "Mosquitto's default). Set `set_tcp_nodelay true` in mosquitto.conf (moe2 "
            "broker-config writes it) and restart the broker"]


def fleet_warnings(gate_experts: Sequence[str], unknown_expert_weight: float,
                   registry: Registry, fusion: str = "auto") -> list[str]:
    """Every current warning for this coordinator's fleet (the plan message carries them).
    Several tokenizer families are a warning only where they are not fused together
    (``fusion = "token"``)."""
    online = [a.agent_id for a in registry.online()]
    sizes = {fp: len(v.pieces) for fp, v in registry.vocabs.items()}
    split = family_split(registry.families(), sizes) if fusion == "token" else []
    return [*gate_coverage(gate_experts, online, unknown_expert_weight), *split]
