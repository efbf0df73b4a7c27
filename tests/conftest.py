"""Shared fixtures: the test GGUFs (written once per session), a private mosquitto per test
module, processes that are always reaped; and the unit / integration / e2e markers, given by
folder:

* ``tests/unit``: pure functions and in-process objects, the in-memory MQTT transport -- no
  broker, no subprocess, no llama.cpp model;
* ``tests/integration``: one component against the real thing (mosquitto, llama.cpp, a CLI
  subprocess, torch);
* ``tests/e2e``: whole fleets of agent and coordinator processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import settings

from moe2.tools.fleet.harness import spawn_moe2
from moe2.tools.fleet.localbroker import LocalBroker
from moe2.tools.models import ExpertFile, make_mismatch_expert, make_test_experts
from moe2.tools.models.fixtures import make_real_vocab_expert

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


# Property tests draw the same examples on every run (CI must not pass or fail by the draw);
# HYPOTHESIS_PROFILE=explore draws fresh ones, to look for new counterexamples.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        rel = Path(str(item.fspath)).resolve().relative_to(TESTS)
        if rel.parts[0] in ("unit", "integration", "e2e"):
            item.add_marker(getattr(pytest.mark, rel.parts[0]))


@dataclass(frozen=True)
class Ggufs:
    """The tiny experts every test shares: ``shared`` tiny-0..2 with one vocabulary (tiny-2
    carries a chat template), ``mismatch`` with another vocabulary of the same size."""

    shared: tuple[ExpertFile, ...]
    mismatch: ExpertFile


@pytest.fixture(scope="session")
def ggufs(tmp_path_factory: pytest.TempPathFactory) -> Ggufs:
    out = tmp_path_factory.mktemp("ggufs")
    return Ggufs(tuple(make_test_experts(out, count=3, chat_template_index=2)),
                     make_mismatch_expert(out))


@dataclass(frozen=True)
class RealGgufs:
    """Random-weight experts carrying llama.cpp's real tokenizers (vocabulary GGUFs from the
    llama-cpp-python sdist, see tools/models/real_vocab.py): the paper's Qwen2 pair -- the
    vocabulary file's own 151,936 ids, and padded to 152,064 like Qwen2.5-7B -- Llama 3's BPE
    and Llama 2 / Mistral-style SentencePiece."""

    qwen2: ExpertFile
    qwen2_padded: ExpertFile
    llama3: ExpertFile
    spm: ExpertFile


@pytest.fixture(scope="session")
def real_ggufs(tmp_path_factory: pytest.TempPathFactory) -> RealGgufs:
    out = tmp_path_factory.mktemp("real-ggufs")
    return RealGgufs(
        qwen2=make_real_vocab_expert(out, "qwen2", seed=4100),
        qwen2_padded=make_real_vocab_expert(out, "qwen2", pad_to=152_064, seed=4101),
        llama3=make_real_vocab_expert(out, "llama-bpe", seed=4102),
        spm=make_real_vocab_expert(out, "llama-spm", seed=4103),
    )


@pytest.fixture(scope="session")
def tiny_model(ggufs: Ggufs) -> Path:
    """One tiny expert's GGUF (tiny-0)."""
    return ggufs.shared[0].path


@pytest.fixture(scope="module")
def broker() -> Iterator[LocalBroker]:
    """A mosquitto on a free loopback port, started by the test itself."""
    with LocalBroker() as b:
        yield b


@pytest.fixture
def fresh_broker() -> Iterator[LocalBroker]:
    with LocalBroker() as b:
        yield b


class Procs:
    """Start ``moe2`` subprocesses; every one is killed at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def moe2(self, *args: str, env: dict[str, str] | None = None,
             log_name: str | None = None) -> subprocess.Popen[bytes]:
        name = log_name or f"proc{len(self.procs)}"
        p = spawn_moe2(args, self.tmp / f"{name}.log", env)  # the fleet harness's one way in
        p.log_path = self.tmp / f"{name}.log"  # type: ignore[attr-defined]
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGCONT)
                    p.kill()
                except ProcessLookupError:
                    pass
                p.wait(timeout=10)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    ps = Procs(tmp_path)
    try:
        yield ps
    finally:
        ps.close()


def log_of(p: subprocess.Popen[bytes]) -> str:
    path: Path = p.log_path  # type: ignore[attr-defined]
    return path.read_text(errors="replace")
