"""``moe2 calibrate``: the gate's training data and the planner's loss, from the live agents
(the production path, any GGUF experts) or straight from the generated fleet's GGUF files.

Either way the result is the calibration file of :mod:`moe2.coordinator.calibration`: per row,
the gate text's MiniLM embedding and, per expert, its own answer tokens with the teacher-forced
probability of each. Through agents, the probabilities come from the very engines the
coordinator fuses, so a gate trained on them is trained on what serving does.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from moe2.coordinator.calibration import Calibration, CalibrationRecord
from moe2.coordinator.gating import EMBEDDING_DIM, EMBEDDING_MODEL, MAX_LENGTH
from moe2.coordinator.rpc import RpcError
from moe2.shared.topics import Topics
from moe2.tools.clients.agent_driver import AgentDriver
from moe2.tools.offline.corpus import Sample
from moe2.tools.offline.dataset import Row

Embed = Callable[[Sequence[str]], npt.NDArray[np.float32]]
Progress = Callable[[int], None]


class CalibrationFailed(RuntimeError):
    """An agent could not score a row (the message says which and why)."""


def rows_from_samples(samples: Sequence[Sample]) -> list[Row]:
    """The generated corpus as operator rows (raw prompts, the family as app and label)."""
    return [Row(answer=s.answer, prompt=s.prompt, app=s.family or "default", raw=True,
                label=s.family) for s in samples]


def default_embed(progress: bool = False) -> Embed:
    from moe2.tools.offline.embed import Embedder

    embedder = Embedder()

    def embed(texts: Sequence[str]) -> npt.NDArray[np.float32]:
        out: npt.NDArray[np.float32] = embedder(texts, progress=progress)
        return out

    return embed


async def resolve_agents(url: str, agent_ids: Sequence[str] | None, *, root: str = "moe2",
                         timeout_s: float = 10.0) -> list[str]:
    """The agents to calibrate: the named ones (each must be online) or every online one."""
    async with AgentDriver(url, Topics(root)) as drv:
        return list(await drv.wait_agents(agent_ids, timeout_s))


async def score_rows(url: str, agent_ids: Sequence[str], rows: Sequence[Row], *,
                     root: str = "moe2", concurrency: int = 8,
                     progress: Progress | None = None
                     ) -> list[list[tuple[list[int], list[float]]]]:
    """Per row, per agent (in ``agent_ids`` order): the agent's answer tokens and their
    teacher-forced probabilities."""
    out: list[list[tuple[list[int], list[float]]]] = [[] for _ in rows]
    sem = asyncio.Semaphore(concurrency)
    async with AgentDriver(url, Topics(root)) as drv:
        await drv.wait_agents(agent_ids)

        async def one(i: int) -> None:
            row = rows[i]
            async with sem:
                try:
                    out[i] = list(await asyncio.gather(*[
                        drv.score(a, row.score_message(f"{drv.driver_id}-{uuid.uuid4().hex[:8]}"))
                        for a in agent_ids]))
                except (RpcError, asyncio.TimeoutError) as exc:
                    where = f"line {row.line}" if row.line else f"row {i + 1}"
                    raise CalibrationFailed(
                        f"{where}: an agent could not score it: "
                        f"{getattr(exc, 'message', None) or type(exc).__name__}") from None
            if progress is not None:
                progress(1)

        await asyncio.gather(*[one(i) for i in range(len(rows))])
    return out


def build_calibration_via_agents(
    url: str,
    agent_ids: Sequence[str],
    splits: Mapping[str, Sequence[Row]],
    *,
    root: str = "moe2",
    embed: Embed | None = None,
    vocab_fingerprint: str | None = None,
    concurrency: int = 8,
    progress: bool = False,
    extra: Mapping[str, object] | None = None,
) -> Calibration:
    """Teacher forcing of every row through every named agent, plus the gate texts'
    embeddings: the calibration file (see :mod:`moe2.coordinator.calibration`)."""
    from tqdm import tqdm

    if not agent_ids:
        raise ValueError("no agents")
    embed = embed or default_embed(progress)
    names = list(agent_ids)
    out: dict[str, tuple[CalibrationRecord, ...]] = {}
    for split, rows in splits.items():
        with tqdm(total=len(rows), desc=f"calibrate {split}", disable=not progress,
                  unit="row") as bar:
            scored = asyncio.run(score_rows(url, names, rows, root=root,
                                            concurrency=concurrency, progress=bar.update))
        texts = [r.gate_text() for r in rows]
        vectors = embed(texts) if rows else np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        out[split] = tuple(
            CalibrationRecord(
                prompt=text, answer=row.answer, family=row.label, app=row.app,
                embedding=tuple(float(x) for x in vec),
                tokens=tuple(tuple(toks) for toks, _p in per_agent),
                probs=tuple(tuple(p) for _t, p in per_agent),
            )
            for row, text, vec, per_agent in zip(rows, texts, vectors, scored, strict=True)
        )
    return Calibration(experts=tuple(names), splits=out, embedding_model=EMBEDDING_MODEL,
                       embedding_dim=EMBEDDING_DIM, max_length=MAX_LENGTH,
                       vocab_fingerprint=vocab_fingerprint, extra=dict(extra or {}))
