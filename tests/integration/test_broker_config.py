"""``moe2 broker-config``: the files it writes, and what a real Mosquitto 2 makes of them.

Every ACL check is against a running mosquitto started with the generated configuration. A
refused delivery is proved with a fence: after the forbidden message the same publisher sends an
allowed one on the same connection; once the fence arrives, anything the broker would have
delivered from the forbidden publish has arrived before it.
"""

from __future__ import annotations

import asyncio
import grp
import json
import os
import pwd
import shlex
import shutil
import socket
import ssl
import stat
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import openai
import pytest

from moe2.gateway.keys import add_key
from moe2.shared import wire
from moe2.shared.mqtt import TlsOptions, make_client, parse_broker_url, payload_bytes
from moe2.shared.topics import Topics
from moe2.tools.fleet.harness import moe2_argv
from moe2.tools.fleet.localbroker import LocalBroker, free_port
from moe2.tools.ops import brokerconf as bc
from tests.conftest import Ggufs

TOPICS = Topics()
TIMEOUT_S = 15.0


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*moe2_argv(), "broker-config", *args],
                          capture_output=True, text=True, check=False, timeout=120)


def me() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


@dataclass
class SecureBroker:
    out: Path
    port: int
    tls_port: int
    summary: dict[str, Any]
    accounts: dict[str, dict[str, str]]
    broker: LocalBroker

    def url(self, name: str, *, password: str | None = None, tls: bool = False) -> str:
        pw = self.accounts[name]["password"] if password is None else password
        if tls:
            return f"mqtts://{name}:{pw}@localhost:{self.tls_port}"
        return f"mqtt://{name}:{pw}@127.0.0.1:{self.port}"

    def client(self, name: str, *, tls: bool = False, password: str | None = None,
               ca_file: str | None = None) -> aiomqtt.Client:
        tls_opts = TlsOptions(ca_file=ca_file or str(self.out / "ca.crt")) if tls else None
        return make_client(parse_broker_url(self.url(name, password=password, tls=tls)),
                           tls=tls_opts)


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    out = tmp_path_factory.mktemp("broker") / "conf"
    port, tls_port = free_port(), free_port()
    proc = run_cli("--out", str(out), "--phones", "a,b", "--agents", "e0,e1",
                   "--coordinators", "c0", "--monitors", "m0", "--gateways", "g0",
                   "--port", str(port),
                   "--tls-port", str(tls_port), "--hostname", "broker.example",
                   "--broker-user", me(), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    creds = json.loads((out / "credentials.json").read_text())
    conf = (out / "mosquitto.conf").read_text()
    # LocalBroker formats {port}/{dir}; the generated file has no braces to escape but be safe.
    text = conf.replace("{", "{{").replace("}", "}}")
    with LocalBroker(port=port, config_text=text) as broker:
        yield SecureBroker(out, port, tls_port, summary, creds["accounts"], broker)


@asynccontextmanager
async def connected(*clients: aiomqtt.Client) -> AsyncIterator[None]:
    entered: list[aiomqtt.Client] = []
    try:
        for c in clients:
            await c.__aenter__()
            entered.append(c)
        yield
    finally:
        for c in reversed(entered):
            await c.__aexit__(None, None, None)


async def receive_until(client: aiomqtt.Client, fence_topic: str) -> list[tuple[str, bytes]]:
    """Every message up to and including the first one on ``fence_topic``."""
    got: list[tuple[str, bytes]] = []

    async def loop() -> None:
        async for m in client.messages:
            got.append((str(m.topic), payload_bytes(m)))
            if str(m.topic) == fence_topic:
                return

    try:
        await asyncio.wait_for(loop(), timeout=TIMEOUT_S)
    except asyncio.TimeoutError:
        raise AssertionError(f"fence on {fence_topic} never arrived; got {got}") from None
    return got


# --------------------------------------------------------------------------- pure parts


def test_hash_format_is_what_mosquitto_passwd_writes(tmp_path: Path) -> None:
    exe = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    pwfile = tmp_path / "pw"
    subprocess.run([exe, "-c", "-b", str(pwfile), "alice", "s3cret"], check=True,
                   capture_output=True, timeout=30)
    theirs = pwfile.read_text().strip().split(":", 1)[1]
    assert bc.verify_password("s3cret", theirs)
    assert not bc.verify_password("wrong", theirs)
    ours = bc.hash_password("s3cret")
    kind, iterations, salt, digest = ours.split("$")[1:]
    t_kind, t_iterations, t_salt, t_digest = theirs.split("$")[1:]
    assert (kind, iterations) == (t_kind, t_iterations) == ("7", "101")
    assert (len(salt), len(digest)) == (len(t_salt), len(t_digest))
    assert bc.verify_password("s3cret", ours)
    assert not bc.verify_password("s3cret", "$7$101$not-base64$x")
    fixed = bc.hash_password("pw", salt=b"\0" * 12, iterations=5)
    assert fixed == bc.hash_password("pw", salt=b"\0" * 12, iterations=5)
    assert fixed.startswith("$7$5$AAAAAAAAAAAAAAAA$")


def test_acl_rules_per_role_use_the_topic_root() -> None:
    topics = Topics("site1/moe2")
    phone = bc.role_acl("phone", "p1", topics)
    assert phone == [("write", "site1/moe2/requests/p1"),
                     ("read", "site1/moe2/responses/p1/#"),
                     ("read", "site1/moe2/coordinators/+/status"),
                     ("write", "site1/moe2/cancel/p1")]
    agent = {t: a for a, t in bc.role_acl("agent", "e0", topics)}
    assert agent == {
        "site1/moe2/agents/e0/status": "readwrite", "site1/moe2/agents/e0/telemetry": "write",
        "site1/moe2/agents/e0/vocab": "write", "site1/moe2/agents/e0/rpc": "read",
        "site1/moe2/coordinators/+/inbox": "write",
    }
    coord = bc.role_acl("coordinator", "c0", topics)
    assert ("read", "site1/moe2/requests/+") in coord
    assert ("read", "site1/moe2/coordinators/c0/inbox") in coord
    assert ("write", "site1/moe2/responses/+/#") in coord
    assert ("readwrite", "site1/moe2/coordinators/+/inflight/+") in coord
    assert not any("$share" in t for _a, t in coord)
    assert ("read", "site1/moe2/cancel/+") in coord
    assert all(a == "read" for a, _t in bc.role_acl("monitor", "m0", topics))
    assert bc.role_acl("gateway", "g0", topics) == [
        ("write", "site1/moe2/requests/+"), ("write", "site1/moe2/cancel/+"),
        ("read", "site1/moe2/responses/+/g0"), ("read", "site1/moe2/coordinators/+/status"),
        ("read", "site1/moe2/plan")]


def test_fleet_rejects_bad_and_duplicate_names() -> None:
    with pytest.raises(bc.BrokerConfigError, match="given twice"):
        bc.Fleet(phones=("x",), agents=("x",)).validate()
    with pytest.raises(bc.BrokerConfigError, match="not valid"):
        bc.Fleet(phones=("a/b",)).validate()
    with pytest.raises(bc.BrokerConfigError, match="not valid"):
        bc.Fleet(agents=("+",)).validate()
    with pytest.raises(bc.BrokerConfigError, match="no accounts"):
        bc.Fleet().validate()


def test_cli_reports_bad_input_in_one_line(tmp_path: Path) -> None:
    proc = run_cli("--out", str(tmp_path / "x"), "--phones", "a,a")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("moe2: error:")
    proc = run_cli("--out", str(tmp_path / "y"), "--phones", "a", "--port", "8883")
    assert proc.returncode == 2
    assert "differ" in proc.stderr


def test_rerun_keeps_passwords_and_ca_unless_rotated(tmp_path: Path) -> None:
    spec = bc.BrokerSpec(conf_dir=tmp_path, hostnames=("h",), broker_user=me())
    first = bc.write_broker_config(tmp_path, bc.Fleet(phones=("a",), agents=("e0",)), spec)
    ca = first.tls.ca_cert.read_bytes()
    again = bc.write_broker_config(tmp_path, bc.Fleet(phones=("a", "b"), agents=("e0",)), spec)
    pw = {a.name: a.password for a in again.accounts}
    assert pw["a"] == next(a.password for a in first.accounts if a.name == "a")
    assert set(pw) == {"a", "b", "e0"}
    assert again.tls.ca_cert.read_bytes() == ca
    rotated = bc.write_broker_config(tmp_path, bc.Fleet(phones=("a",)), spec, rotate=True)
    assert rotated.accounts[0].password != pw["a"]
    assert rotated.tls.ca_cert.read_bytes() != ca


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _wait_listening(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mosquitto exited with {proc.returncode}: "
                                 f"{log.read_text(errors='replace')[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"mosquitto never listened on {port}")


@pytest.mark.skipif(os.geteuid() != 0 or not _has_user("mosquitto"),
                    reason="starts mosquitto as root so that it drops to the mosquitto user, "
                           "as on a real host; CI runs as root with the Debian package")
def test_the_printed_start_command_starts_the_broker_as_root() -> None:
    """Run as root, as the README says: mosquitto drops to its own user before it opens the
    password file, so the folder and the files it reads must be that user's to read -- and
    nothing else may be readable by anyone but root."""
    base = Path(tempfile.mkdtemp(prefix="moe2-etc-"))
    base.chmod(0o755)  # like /etc/mosquitto: the broker user may enter
    out = base / "moe2"
    port, tls_port = free_port(), free_port()
    broker: subprocess.Popen[bytes] | None = None
    try:
        proc = run_cli("--out", str(out), "--phones", "p1", "--agents", "e0",
                       "--coordinators", "c0", "--port", str(port), "--tls-port", str(tls_port))
        assert proc.returncode == 0, proc.stderr
        assert "cannot enter" not in proc.stderr
        start = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith("start:")]
        assert len(start) == 1, proc.stdout
        command = start[0].split("start:", 1)[1].split("   (")[0].strip()
        log = base / "broker.log"
        with log.open("wb") as logf:
            broker = subprocess.Popen(shlex.split(command), stdout=logf, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL)
        _wait_listening(broker, port, log)
        creds = json.loads((out / "credentials.json").read_text())["accounts"]

        async def login() -> None:
            plain = make_client(parse_broker_url(creds["p1"]["local_url"]))
            # credentials.json names this host; the certificate also holds localhost
            url = parse_broker_url(creds["p1"]["url"])
            url = parse_broker_url(f"mqtts://p1:{url.password}@localhost:{tls_port}")
            secured = make_client(url, tls=TlsOptions(ca_file=str(out / "ca.crt")))
            async with plain, secured:
                pass

        _wait_listening(broker, tls_port, log)
        asyncio.run(login())
        assert broker.poll() is None
        gid = grp.getgrnam("mosquitto").gr_gid

        def mode(name: str) -> tuple[int, int, int]:
            st = (out / name).stat() if name else out.stat()
            return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid

        assert mode("") == (0o750, 0, gid)
        for name in ("passwd", "acl", "server.key"):
            assert mode(name) == (0o640, 0, gid), name
        for name in ("ca.key", "credentials.json"):  # private: root alone
            assert mode(name)[:2] == (0o600, 0), name
        for name in ("ca.crt", "server.crt", "mosquitto.conf"):
            assert mode(name)[0] == 0o644, name
    finally:
        if broker is not None:
            broker.terminate()
            broker.wait(timeout=10)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(not _has_user("mosquitto") or me() == "mosquitto",
                    reason="needs a mosquitto user other than the one running the tests")
def test_a_folder_the_broker_user_cannot_enter_is_reported(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    locked.chmod(0o700)
    proc = run_cli("--out", str(locked / "moe2"), "--phones", "p1",
                   "--port", str(free_port()), "--tls-port", str(free_port()), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["unreachable"] is not None
    assert Path(summary["unreachable"]) in (locked, *locked.parents)
    proc = run_cli("--out", str(locked / "moe3"), "--phones", "p1",
                   "--port", str(free_port()), "--tls-port", str(free_port()))
    assert "cannot enter" in proc.stderr


def test_can_enter_follows_owner_group_other_bits() -> None:
    d = 0o040000
    assert bc.can_enter(d | 0o750, 0, 5, 7, {5})  # group may enter
    assert not bc.can_enter(d | 0o700, 0, 5, 7, {5})
    assert bc.can_enter(d | 0o711, 0, 0, 7, {5})  # others may
    assert not bc.can_enter(d | 0o077, 7, 5, 7, {5})  # the owner bits decide for the owner
    assert bc.can_enter(d | 0o000, 9, 9, 0, set())  # root enters anywhere


# --------------------------------------------------------------------------- generated files


def test_files_permissions_and_contents(secure: SecureBroker) -> None:
    out = secure.out
    for name in ("passwd", "acl", "server.key", "ca.key", "credentials.json"):
        mode = stat.S_IMODE((out / name).stat().st_mode)
        assert mode == 0o600, f"{name} is {oct(mode)}"
    conf = (out / "mosquitto.conf").read_text().splitlines()
    assert "per_listener_settings false" in conf
    assert "allow_anonymous false" in conf
    assert f"listener {secure.port} 127.0.0.1" in conf, "the plain listener is loopback only"
    assert f"listener {secure.tls_port}" in conf
    assert f"password_file {out / 'passwd'}" in conf
    assert f"acl_file {out / 'acl'}" in conf
    # without it two experts' replies cost a delayed ACK (40 ms) every fused token
    assert "set_tcp_nodelay true" in conf
    accounts = secure.accounts
    assert {n: a["role"] for n, a in accounts.items()} == {
        "a": "phone", "b": "phone", "e0": "agent", "e1": "agent", "c0": "coordinator",
        "m0": "monitor", "g0": "gateway"}
    assert all(a["username"] == n for n, a in accounts.items())
    assert len({a["password"] for a in accounts.values()}) == len(accounts)
    lines = (out / "passwd").read_text().splitlines()
    assert len(lines) == len(accounts)
    for line in lines:
        user, encoded = line.split(":", 1)
        assert bc.verify_password(accounts[user]["password"], encoded)
    # the --json summary never carries passwords
    assert "password" not in json.dumps(secure.summary)
    assert set(secure.summary["sans"]) == {"DNS:localhost", "IP:127.0.0.1", "DNS:broker.example"}


def test_server_certificate_has_the_sans_and_chains_to_the_ca(secure: SecureBroker) -> None:
    openssl = shutil.which("openssl")
    assert openssl
    out = secure.out
    text = subprocess.run([openssl, "x509", "-in", str(out / "server.crt"), "-noout", "-text"],
                          capture_output=True, text=True, check=True, timeout=30).stdout
    assert "DNS:localhost" in text
    assert "IP Address:127.0.0.1" in text
    assert "DNS:broker.example" in text
    verify = subprocess.run([openssl, "verify", "-x509_strict", "-CAfile", str(out / "ca.crt"),
                             str(out / "server.crt")], capture_output=True, text=True,
                            check=False, timeout=30)
    assert verify.returncode == 0, verify.stderr


# --------------------------------------------------------------------------- the real broker


async def test_anonymous_and_wrong_password_are_refused(secure: SecureBroker) -> None:
    anon = make_client(parse_broker_url(f"mqtt://127.0.0.1:{secure.port}"))
    with pytest.raises(aiomqtt.MqttError):
        async with anon:
            pass
    with pytest.raises(aiomqtt.MqttError):
        async with secure.client("a", password="wrong-password"):
            pass
    with pytest.raises(aiomqtt.MqttError):  # a phone's password is not an agent's
        async with secure.client("e0", password=secure.accounts["a"]["password"]):
            pass
    async with secure.client("a"):  # the right password works
        pass


async def test_phone_cannot_read_another_phones_responses(secure: SecureBroker) -> None:
    a, c0 = secure.client("a"), secure.client("c0")
    async with connected(a, c0):
        await a.subscribe(TOPICS.response_prefix("b") + "#", qos=1)
        await a.subscribe(TOPICS.response_prefix("a") + "#", qos=1)
        await c0.publish(TOPICS.response_prefix("b") + "r1", b"for b", qos=1)
        fence = TOPICS.response_prefix("a") + "r1"
        await c0.publish(fence, b"for a", qos=1)
        got = await receive_until(a, fence)
    assert got == [(fence, b"for a")]


async def test_phone_cannot_publish_where_agents_or_other_phones_publish(
    secure: SecureBroker,
) -> None:
    a, c0 = secure.client("a"), secure.client("c0")
    async with connected(a, c0):
        await c0.subscribe(TOPICS.all_agent_status, qos=1)
        await c0.subscribe(TOPICS.all_agent_telemetry, qos=1)
        await c0.subscribe(TOPICS.all_requests, qos=1)
        forged = wire.AgentStatus(agent_id="e0", state="online")
        await a.publish(TOPICS.agent_status("e0").topic, wire.encode(forged), qos=1)
        await a.publish(TOPICS.agent_telemetry("e0").topic, b"x", qos=1)
        await a.publish(TOPICS.request("b"), b'{"prompt": "as b"}', qos=1)
        fence = TOPICS.request("a")
        await a.publish(fence, b'{"prompt": "hi"}', qos=1)
        got = await receive_until(c0, fence)
    assert got == [(fence, b'{"prompt": "hi"}')]


async def test_agent_acl(secure: SecureBroker) -> None:
    e0, c0 = secure.client("e0"), secure.client("c0")
    async with connected(e0, c0):
        await e0.subscribe(TOPICS.agent_rpc("e1"), qos=1)
        await e0.subscribe(TOPICS.agent_rpc("e0"), qos=1)
        await c0.subscribe(TOPICS.all_agent_status, qos=1)
        await c0.subscribe(TOPICS.coordinator_inbox("c0").topic, qos=1)
        # e0 cannot read e1's requests
        await c0.publish(TOPICS.agent_rpc("e1"), b"for e1", qos=1)
        await c0.publish(TOPICS.agent_rpc("e0"), b"for e0", qos=1)
        assert await receive_until(e0, TOPICS.agent_rpc("e0")) == [
            (TOPICS.agent_rpc("e0"), b"for e0")]
        # e0 cannot speak for e1; its own status and its replies to a coordinator get through
        await e0.publish(TOPICS.agent_status("e1").topic, b"forged", qos=1)
        await e0.publish(TOPICS.agent_status("e0").topic, b"mine", qos=1)
        inbox = TOPICS.coordinator_inbox("c0").topic
        await e0.publish(inbox, b"reply", qos=1)
        got = await receive_until(c0, inbox)
        # e0 reads its own status -- it watches for a stale or forged retained one
        await e0.subscribe(TOPICS.agent_status("e0").topic, qos=1)
        await e0.publish(TOPICS.agent_status("e0").topic, b"watched", qos=1)
        own = await receive_until(e0, TOPICS.agent_status("e0").topic)
    assert got == [(TOPICS.agent_status("e0").topic, b"mine"), (inbox, b"reply")]
    assert own == [(TOPICS.agent_status("e0").topic, b"watched")]


async def test_monitor_reads_status_but_cannot_publish_a_plan(secure: SecureBroker) -> None:
    m0, e0, c0 = secure.client("m0"), secure.client("e0"), secure.client("c0")
    async with connected(m0, e0, c0):
        await m0.subscribe(TOPICS.all_agent_status, qos=1)
        await c0.subscribe(TOPICS.plan.topic, qos=1)
        await c0.subscribe(TOPICS.all_requests, qos=1)
        await m0.publish(TOPICS.plan.topic, b"forged plan", qos=1)
        await m0.publish(TOPICS.request("m0"), b"not a phone", qos=1)
        fence = TOPICS.plan.topic
        await c0.publish(fence, b"real plan", qos=1)
        assert await receive_until(c0, fence) == [(fence, b"real plan")]
        status = TOPICS.agent_status("e0").topic
        await e0.publish(status, b"online", qos=1)
        assert await receive_until(m0, status) == [(status, b"online")]


async def test_gateway_asks_as_any_client_and_reads_only_its_own_replies(
    secure: SecureBroker,
) -> None:
    """A gateway account publishes requests and cancels as any client id (one per API key)
    and reads replies to its own level below any client's response prefix -- not the phones'
    own replies, and it cannot publish what coordinators publish."""
    g0, c0 = secure.client("g0"), secure.client("c0")
    async with connected(g0, c0):
        await c0.subscribe(TOPICS.all_requests, qos=1)
        await c0.subscribe(TOPICS.all_cancels, qos=1)
        await c0.subscribe(TOPICS.plan.topic, qos=1)
        await g0.subscribe(TOPICS.responses_of_every_client("g0"), qos=1)
        await g0.subscribe(TOPICS.response_prefix("a") + "#", qos=1)
        await g0.publish(TOPICS.plan.topic, b"forged plan", qos=1)
        await g0.publish(TOPICS.request("alice"), b"as alice", qos=1)
        await g0.publish(TOPICS.cancel("bob"), b"cancel as bob", qos=1)
        fence = TOPICS.request("key-3")
        await g0.publish(fence, b"as key-3", qos=1)
        assert await receive_until(c0, fence) == [
            (TOPICS.request("alice"), b"as alice"), (TOPICS.cancel("bob"), b"cancel as bob"),
            (fence, b"as key-3")]
        await c0.publish(TOPICS.response("a", "r"), b"the phone's own", qos=1)
        mine = TOPICS.response("alice", "g0")
        await c0.publish(mine, b"for the gateway", qos=1)
        assert await receive_until(g0, mine) == [(mine, b"for the gateway")]


async def test_tls_shared_subscription_round_trip(secure: SecureBroker) -> None:
    """A coordinator's $share subscription over mqtts receives a phone's request (the ACL names
    the plain topic), and the phone gets the answer on its response topic."""
    c0, a = secure.client("c0", tls=True), secure.client("a", tls=True)
    async with connected(c0, a):
        await c0.subscribe(TOPICS.requests_shared("coordinators"), qos=1)
        response = TOPICS.response_prefix("a") + "1"
        await a.subscribe(response, qos=1)
        await a.publish(TOPICS.request("a"), b'{"prompt": "hello"}', qos=1)
        got = await receive_until(c0, TOPICS.request("a"))
        assert got == [(TOPICS.request("a"), b'{"prompt": "hello"}')]
        await c0.publish(response, b'{"type": "final"}', qos=1)
        assert await receive_until(a, response) == [(response, b'{"type": "final"}')]


def test_tls_needs_the_generated_ca(secure: SecureBroker, tmp_path: Path) -> None:
    """The handshake verifies against the generated CA and fails against any other.
    (Plain ssl sockets: paho leaks the socket of a failed handshake.)"""
    other = bc.generate_tls(tmp_path, ["localhost"])  # a different CA

    def handshake(ca_file: Path) -> None:
        ctx = ssl.create_default_context(cafile=str(ca_file))
        with socket.create_connection(("127.0.0.1", secure.tls_port), timeout=TIMEOUT_S) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")

    handshake(secure.out / "ca.crt")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(other.ca_cert)


def test_ask_end_to_end_over_mqtts_with_acls(secure: SecureBroker, procs: Any,
                                             ggufs: Ggufs, tmp_path: Path) -> None:
    """A phone, an agent, a coordinator and an HTTP gateway, each with its own account, all
    over TLS: the gateway's account (``--gateways g0``) lets it ask as its API key's name."""
    expert = ggufs.shared[0]
    ca = str(secure.out / "ca.crt")
    procs.moe2("agent", "--broker", secure.url("e0", tls=True), "--ca-file", ca, "--id", "e0",
               "--model", str(expert.path), "--threads", "1", "--meter", "estimated",
               log_name="agent-e0")
    procs.moe2("coordinator", "--broker", secure.url("c0", tls=True), "--ca-file", ca,
               "--id", "c0", log_name="coordinator-c0")
    last = None
    for _ in range(60):
        last = subprocess.run(
            [*moe2_argv(), "ask", "--broker", secure.url("a", tls=True),
             "--ca-file", ca, "--client-id", "a", "--max-tokens", "5", "--timeout", "5",
             "--json", "What is 1 plus 1?"], capture_output=True, text=True, timeout=60,
            check=False)
        if last.returncode == 0:
            break
        time.sleep(0.5)
    assert last is not None
    assert last.returncode == 0, last.stderr
    result = json.loads(last.stdout.strip().splitlines()[-1])
    assert result["tokens"] >= 1
    assert [e["id"] for e in result["experts"]] == ["e0"]
    # the gateway g0 asks as "alice" (its API key's name), which no phone account is
    keyfile = tmp_path / "gateway.keys"
    key = add_key(keyfile, "alice")
    port = free_port()
    procs.moe2("gateway", "--broker", secure.url("g0", tls=True), "--ca-file", ca, "--id", "g0",
               "--listen", f"127.0.0.1:{port}", "--api-keys", str(keyfile),
               log_name="gateway-g0")
    with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0,
                       timeout=60) as client:
        deadline = time.monotonic() + 60
        while True:
            try:
                assert [m.id for m in client.models.list()] == ["moe2-default"]
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, "the gateway never listened"
                time.sleep(0.2)
        whole = client.chat.completions.create(
            model="moe2-default", max_tokens=5, messages=[{"role": "user", "content": "1+1?"}])
        assert [e["id"] for e in (whole.model_extra or {})["moe2"]["experts"]] == ["e0"]
        with client.completions.create(model="moe2-default", prompt="1+1?", max_tokens=5,
                                       stream=True) as stream:
            assert "".join(c.choices[0].text for c in stream)
