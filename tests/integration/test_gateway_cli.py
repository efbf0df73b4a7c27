"""``moe2 gateway`` on the command line: keys printed once, refusals in one line (issue 15)."""

from __future__ import annotations

import socket
import stat
import subprocess
from pathlib import Path

from moe2.gateway.keys import parse_key_file, verify
from moe2.tools.fleet.harness import moe2_argv

#: the commands here answer at once; a hang is a failure
TIMEOUT_S = 60


def moe2(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*moe2_argv(), *args], capture_output=True, text=True,
                          timeout=TIMEOUT_S, check=False)


def test_add_key_prints_the_key_once_and_stores_its_hash(tmp_path: Path) -> None:
    keys = tmp_path / "gateway.keys"
    out = moe2("gateway", "add-key", "alice", "--keys", str(keys))
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    assert key.startswith("sk-moe2-") and len(out.stdout.splitlines()) == 1
    assert "shown only now" in out.stderr
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600
    assert key not in keys.read_text()
    assert verify(key, parse_key_file(keys.read_text())) == "alice"
    again = moe2("gateway", "add-key", "alice", "--keys", str(keys))
    assert again.returncode == 2 and again.stderr.startswith("moe2: error:")
    assert "--replace" in again.stderr
    assert moe2("gateway", "remove-key", "alice", "--keys", str(keys)).returncode == 0
    gone = moe2("gateway", "remove-key", "alice", "--keys", str(keys))
    assert gone.returncode == 1 and "no key named 'alice'" in gone.stderr
    bad = moe2("gateway", "add-key", "a/b", "--keys", str(keys))
    assert bad.returncode == 2 and "not valid" in bad.stderr


def test_serving_refusals_are_one_line_and_exit_2(tmp_path: Path) -> None:
    out = moe2("gateway", "--broker", "mqtt://127.0.0.1:1", "--listen", "0.0.0.0:0")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("moe2: error:")
    assert "--allow-unauthenticated" in out.stderr
    broken = tmp_path / "keys"
    broken.write_text("not a key line\n")
    out = moe2("gateway", "--broker", "mqtt://127.0.0.1:1", "--api-keys", str(broken))
    assert out.returncode == 2 and f"{broken}, line 1" in out.stderr
    out = moe2("gateway", "--broker", "mqtt://127.0.0.1:1", "--listen", "localhost")
    assert out.returncode == 2 and "HOST:PORT" in out.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = moe2("gateway", "--broker", "mqtt://127.0.0.1:1", "--listen", f"127.0.0.1:{port}")
    assert out.returncode == 2 and "cannot listen" in out.stderr
