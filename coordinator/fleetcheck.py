"""What an operator must be told about the fleet as the coordinator sees it: pure checks.

Each check turns the coordinator's view (the gate's expert names, the online agents) into
plain-sentence warnings. The coordinator logs a warning when it first appears, the planner puts
the current ones into the retained plan message, and ``moe2 monitor`` shows them -- so a fleet
that cannot serve says why at once instead of answering every request ``no_experts``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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


def fleet_warnings(gate_experts: Sequence[str], unknown_expert_weight: float,
                   registry: Registry, fusion: str = "auto") -> list[str]:
    """Every current warning for this coordinator's fleet (the plan message carries them).
    Several tokenizer families are a warning only where they are not fused together
    (``fusion = "token"``)."""
    online = [a.agent_id for a in registry.online()]
    sizes = {fp: len(v.pieces) for fp, v in registry.vocabs.items()}
    split = family_split(registry.families(), sizes) if fusion == "token" else []
    return [*gate_coverage(gate_experts, online, unknown_expert_weight), *split]
