"""Shared fixtures: a private mosquitto per test module, processes that are always reaped."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from moe2.tools.fleet.harness import spawn_moe2
from moe2.tools.fleet.localbroker import LocalBroker

REPO = Path(__file__).resolve().parent.parent


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
