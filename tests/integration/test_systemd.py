"""systemd units, sysusers.d, tmpfiles.d and the RAPL udev rule; and the daemon's sd_notify side."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from moe2.agent.meters.rapl import RAPL_UDEV_RULE
from moe2.tools.fleet.localbroker import LocalBroker, free_port
from tests.conftest import REPO, Procs, log_of

SYSTEMD = REPO / "systemd"
UNITS = ("moe2-agent@.service", "moe2-coordinator.service", "moe2-gateway.service")
INSTALLED_EXE = "/usr/local/bin/moe2"


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value (systemd allows repeated keys such as DeviceAllow=)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            out.setdefault(section, {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not a key=value line: {raw!r}"
        out[section].setdefault(key.strip(), []).append(value.strip())
    return out


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit[section][key]
    assert len(values) == 1, f"{key} is set {len(values)} times"
    return values[0]


def moe2_executable() -> str:
    """This environment's moe2 script (verify only needs ExecStart's program to exist; the
    interpreter stands in when the package is run from a source tree without the script)."""
    cand = Path(sys.executable).with_name("moe2")
    if cand.is_file() and os.access(cand, os.X_OK):
        return str(cand)
    return shutil.which("moe2") or sys.executable


def sysusers_entries() -> dict[str, set[str]]:
    """Type letter -> names declared in moe2.sysusers."""
    out: dict[str, set[str]] = {}
    for raw in (SYSTEMD / "moe2.sysusers").read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            kind, name = line.split()[:2]
            out.setdefault(kind, set()).add(name)
    return out


# --------------------------------------------------------------------------- unit contents


@pytest.mark.parametrize("name", UNITS)
def test_unit_is_a_watched_notify_service_with_hardening(name: str) -> None:
    unit = parse_unit(SYSTEMD / name)
    svc = unit["Service"]
    assert one(unit, "Service", "Type") == "notify"
    assert one(unit, "Service", "NotifyAccess") == "main"
    assert re.fullmatch(r"\d+s", one(unit, "Service", "WatchdogSec"))
    assert one(unit, "Service", "Restart") == "on-failure"
    assert "RestartSec" in svc
    assert one(unit, "Service", "User") == "moe2"
    assert one(unit, "Service", "Group") == "moe2"
    assert one(unit, "Service", "StateDirectory") == "moe2"
    assert one(unit, "Service", "ConfigurationDirectory") == "moe2"
    for key, want in (("ProtectSystem", "strict"), ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
                      ("NoNewPrivileges", "yes")):
        assert one(unit, "Service", key) == want, key
    # ctypes callbacks (llama-cpp-python) and JIT code need writable+executable pages.
    assert svc.get("MemoryDenyWriteExecute", ["no"]) == ["no"]
    exec_start = one(unit, "Service", "ExecStart").split()
    assert exec_start[0] == INSTALLED_EXE
    config = exec_start[exec_start.index("--config") + 1]
    assert config.startswith("/etc/moe2/"), "configs live in ConfigurationDirectory=moe2"
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


def test_agent_unit_keeps_the_gpu_reachable() -> None:
    unit = parse_unit(SYSTEMD / "moe2-agent@.service")
    svc = unit["Service"]
    exec_start = one(unit, "Service", "ExecStart")
    assert exec_start.split()[1] == "agent"
    assert "/etc/moe2/agent-%i.toml" in exec_start, "the instance name picks the config"
    assert one(unit, "Service", "PrivateDevices") == "no"
    assert one(unit, "Service", "DevicePolicy") == "closed"
    allowed = {v.split()[0] for v in svc["DeviceAllow"]}
    assert {"char-nvidia-frontend", "char-nvidia-uvm", "char-nvidia-caps"} <= allowed
    assert "/dev/nvmap" in allowed
    assert any(a.startswith("/dev/nvhost-") for a in allowed)
    groups = one(unit, "Service", "SupplementaryGroups").split()
    assert {"video", "render", "jtop"} <= set(groups)


@pytest.mark.parametrize("role", ["coordinator", "gateway"])
def test_coordinator_and_gateway_units_need_no_devices(role: str) -> None:
    unit = parse_unit(SYSTEMD / f"moe2-{role}.service")
    assert one(unit, "Service", "ExecStart").split()[1] == role
    assert one(unit, "Service", "PrivateDevices") == "yes"
    assert "DeviceAllow" not in unit["Service"]
    assert one(unit, "Service", "CapabilityBoundingSet") == ""


def test_every_group_and_user_the_units_name_is_created_by_sysusers() -> None:
    """systemd refuses to start a unit whose User=/SupplementaryGroups= does not exist."""
    entries = sysusers_entries()
    users = entries.get("u", set())
    groups = entries.get("g", set()) | users  # `u` creates the same-named group too
    for name in UNITS:
        unit = parse_unit(SYSTEMD / name)
        assert one(unit, "Service", "User") in users
        assert one(unit, "Service", "Group") in groups
        for g in unit["Service"].get("SupplementaryGroups", [""])[0].split():
            assert g in groups, f"{name}: group {g} is not created by moe2.sysusers"


def test_udev_rule_gives_group_moe2_read_access_to_rapl_energy() -> None:
    path = REPO / RAPL_UDEV_RULE
    assert path.name == "99-moe2-rapl.rules"
    rules = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(rules) == 1
    rule = rules[0]
    assert 'SUBSYSTEM=="powercap"' in rule
    assert 'KERNEL=="intel-rapl:*"' in rule
    assert 'ACTION=="add|change"' in rule
    runs = re.findall(r'RUN\+="([^"]+)"', rule)
    assert "/bin/chgrp moe2 /sys%p/energy_uj" in runs
    assert "/bin/chmod g+r /sys%p/energy_uj" in runs
    assert "moe2" in sysusers_entries()["u"]


# --------------------------------------------------------------------------- systemd tools


def _systemd_tool(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:  # scripts/test.sh installs it; a run without it checks nothing here
        pytest.fail(f"{name} is not installed (Debian: apt-get install -y systemd)")
    return exe


@pytest.mark.parametrize("name", [*UNITS, "moe2-agent@e0.service"])
def test_systemd_analyze_verify_is_clean(name: str, tmp_path: Path) -> None:
    analyze = _systemd_tool("systemd-analyze")
    source = SYSTEMD / ("moe2-agent@.service" if name.startswith("moe2-agent@") else name)
    text = source.read_text()
    assert INSTALLED_EXE in text
    # verify checks that ExecStart's program exists: point it at this environment's moe2.
    unit = tmp_path / name
    unit.write_text(text.replace(INSTALLED_EXE, moe2_executable()))
    proc = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True,
                          text=True, check=False, timeout=60,
                          env={**os.environ, "SYSTEMD_LOG_LEVEL": "info"})
    ours = [ln for ln in (proc.stdout + proc.stderr).splitlines()
            if name in ln or str(tmp_path) in ln]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ours == [], "systemd-analyze verify complained:\n" + "\n".join(ours)


def test_sysusers_file_is_valid(tmp_path: Path) -> None:
    sysusers = _systemd_tool("systemd-sysusers")
    conf_dir = tmp_path / "usr/lib/sysusers.d"
    conf_dir.mkdir(parents=True)
    (tmp_path / "etc").mkdir()
    shutil.copy(SYSTEMD / "moe2.sysusers", conf_dir / "moe2.conf")
    proc = subprocess.run([sysusers, "--dry-run", f"--root={tmp_path}"], capture_output=True,
                          text=True, check=False, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "moe2.conf:" not in out, out  # a parse warning names file:line
    assert "Creating user 'moe2'" in out


def test_tmpfiles_create_the_state_and_config_directories(tmp_path: Path) -> None:
    sysusers = _systemd_tool("systemd-sysusers")
    tmpfiles = _systemd_tool("systemd-tmpfiles")
    if os.geteuid() != 0:
        # Real, not a gap: creating /var/lib/moe2 owned by the moe2 user is a chown, which
        # only root may do (no user-namespace trick maps an arbitrary uid). CI runs as root,
        # so there it always runs.
        pytest.skip("needs root: systemd-tmpfiles chowns /var/lib/moe2 to the moe2 user "
                    "(CI runs this as root)")
    for sub, name in (("usr/lib/sysusers.d", "moe2.sysusers"),
                      ("usr/lib/tmpfiles.d", "moe2.tmpfiles")):
        (tmp_path / sub).mkdir(parents=True)
        shutil.copy(SYSTEMD / name, tmp_path / sub / "moe2.conf")
    (tmp_path / "etc").mkdir()
    subprocess.run([sysusers, f"--root={tmp_path}"], check=True, capture_output=True, timeout=60)
    proc = subprocess.run([tmpfiles, f"--root={tmp_path}", "--create"], capture_output=True,
                          text=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "moe2.conf:" not in proc.stderr, proc.stderr
    uid = gid = None
    for line in (tmp_path / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == "moe2":
            uid, gid = int(fields[2]), int(fields[3])
    assert uid is not None
    for rel, owner, mode in (("var/lib/moe2", uid, 0o750), ("var/lib/moe2/models", uid, 0o750),
                             ("etc/moe2", 0, 0o750)):
        st = (tmp_path / rel).stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (owner, gid, mode), rel


# --------------------------------------------------------------------------- the daemon side


class NotifySocket:
    """What systemd's end of NOTIFY_SOCKET sees: datagrams with the sender's credentials."""

    def __init__(self) -> None:
        # sun_path holds 108 bytes: keep the path short (pytest's tmp_path may be long).
        self.dir = tempfile.mkdtemp(prefix="moe2-sd-", dir="/tmp")
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.5)

    def recv(self) -> tuple[str, int | None] | None:
        """One notification and the sender's pid, or None after a short wait."""
        try:
            data, anc, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            return None
        pid = None
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iII", cdata[:12])[0]
        return data.decode(), pid

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    s = NotifySocket()
    try:
        yield s
    finally:
        s.close()


def _ready_then_watchdogs(notify_socket: NotifySocket, p: subprocess.Popen[bytes],
                          what: str) -> list[str]:
    """Every notification until READY=1 and then two WATCHDOG=1, all from the main pid
    (NotifyAccess=main: systemd only listens to the main process)."""
    states: list[str] = []
    ready_index: int | None = None
    deadline = time.monotonic() + 90.0  # generous bound for a slow CI box; not a measurement
    while time.monotonic() < deadline:
        got = notify_socket.recv()
        if got is None:
            assert p.poll() is None, f"{what} exited:\n" + log_of(p)
            continue
        state, pid = got
        assert pid == p.pid, f"notification {state!r} came from pid {pid}, not {p.pid}"
        states.append(state)
        if ready_index is None and "READY=1" in state.split("\n"):
            ready_index = len(states) - 1
        if ready_index is not None and states[ready_index + 1:].count("WATCHDOG=1") >= 2:
            break
    assert ready_index is not None, f"no READY=1 in {states}\n{log_of(p)}"
    assert states[ready_index + 1:].count("WATCHDOG=1") >= 2, states
    return states


def test_agent_sends_ready_then_watchdog_pings_from_its_main_pid(
    broker: LocalBroker, procs: Procs, tiny_model: Path, notify_socket: NotifySocket
) -> None:
    p = procs.moe2(
        "agent", "--broker", broker.url, "--id", "sd0", "--model", str(tiny_model),
        "--meter", "estimated", "--telemetry-interval", "5",
        env={"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "400000"}, log_name="agent",
    )
    states = _ready_then_watchdogs(notify_socket, p, "agent")

    # SIGTERM: STOPPING=1, then a clean exit (what systemctl stop does).
    p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline and "STOPPING=1" not in states:
        got = notify_socket.recv()
        if got is not None:
            states.append(got[0])
        elif p.poll() is not None:
            break
    assert "STOPPING=1" in states, states
    assert p.wait(timeout=60) == 0, log_of(p)


def test_coordinator_sends_ready_then_watchdog_pings(
    broker: LocalBroker, procs: Procs, notify_socket: NotifySocket
) -> None:
    p = procs.moe2("coordinator", "--broker", broker.url, "--id", "sdc",
                   env={"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "400000"},
                   log_name="coordinator")
    _ready_then_watchdogs(notify_socket, p, "coordinator")
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == 0, log_of(p)


def test_gateway_sends_ready_then_watchdog_pings(
    broker: LocalBroker, procs: Procs, notify_socket: NotifySocket
) -> None:
    """READY once the broker session is up and the HTTP socket listens; SIGTERM: exit 0."""
    p = procs.moe2("gateway", "--broker", broker.url, "--id", "sdg",
                   "--listen", f"127.0.0.1:{free_port()}",
                   env={"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "400000"},
                   log_name="gateway")
    states = _ready_then_watchdogs(notify_socket, p, "gateway")
    assert any(s.startswith("READY=1\nSTATUS=serving on port") for s in states), states
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == 0, log_of(p)
