"""A secured Mosquitto 2 configuration for one moe2 site: accounts, ACLs, TLS.

``moe2 broker-config`` writes, into one directory:

- ``mosquitto.conf``: ``per_listener_settings false``, ``allow_anonymous false``, a plain
  listener on 127.0.0.1 only (same-box services, local tools) and a TLS listener for everyone else;
- ``passwd``: Mosquitto's own hash format, ``user:$7$<iterations>$<b64 salt>$<b64 hash>``
  (PBKDF2-HMAC-SHA512, 12-byte salt, 64-byte hash; 101 iterations is mosquitto_passwd's default);
- ``acl``: one ``user`` block per account with the topics its role may read or write;
- ``ca.crt``/``ca.key`` (a development CA) and ``server.crt``/``server.key`` (SAN: localhost,
  127.0.0.1 and the given host names), made with the ``openssl`` command line;
- ``credentials.json``: every account's name, role, username and password (keep it secret);
- with ``--bridge-to``, the bridge to the broker above this one (a hub) and the hub's CA as
  ``bridge-ca.crt``; with ``--bridges NAME``, the accounts such bridges log in with here
  (see :mod:`.bridgeconf`).

How Mosquitto 2.0.11 applies an ``acl_file`` (checked against the real broker in
``tests/test_broker_config.py``): a SUBSCRIBE is granted whatever the filter, including
``$share/<group>/...``; each message is checked at delivery against the subscriber's ``read``
patterns with the message's concrete topic, so a coordinator's shared subscription
``$share/coordinators/moe2/requests/+`` needs ``topic read moe2/requests/+`` and an ACL entry
naming ``$share/...`` has no effect. A PUBLISH to a topic without a ``write`` pattern is dropped
silently (the client stays connected).

Everything here except :func:`generate_tls` and :func:`write_broker_config` is pure.
"""

from __future__ import annotations

import base64
import grp
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from moe2.shared.topics import Topics, check_name
from moe2.tools.ops.bridgeconf import BridgeConfigError, BridgeSpec, bridge_acl, bridge_conf_text

log = logging.getLogger(__name__)

Role = Literal["phone", "agent", "coordinator", "monitor", "gateway", "bridge"]
ROLES: tuple[Role, ...] = ("phone", "agent", "coordinator", "monitor", "gateway", "bridge")
Access = Literal["read", "write", "readwrite"]

#: mosquitto_passwd's defaults (mosquitto 2.0): PBKDF2-SHA512, 101 iterations, 12-byte salt.
DEFAULT_ITERATIONS = 101
SALT_BYTES = 12
HASH_BYTES = 64
CREDENTIALS_VERSION = 1

CONF_NAME = "mosquitto.conf"
PASSWD_NAME = "passwd"
ACL_NAME = "acl"
CA_CERT_NAME = "ca.crt"
CA_KEY_NAME = "ca.key"
SERVER_CERT_NAME = "server.crt"
SERVER_KEY_NAME = "server.key"
BRIDGE_CA_NAME = "bridge-ca.crt"
CREDENTIALS_NAME = "credentials.json"


class BrokerConfigError(ValueError):
    """Bad input for the broker configuration (one line for the operator)."""


# --------------------------------------------------------------------------- passwords


def hash_password(
    password: str, *, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None
) -> str:
    """Mosquitto 2's ``$7$`` hash of ``password`` (what ``mosquitto_passwd`` writes)."""
    if iterations < 1:
        raise ValueError("iterations must be >= 1")
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, HASH_BYTES)
    return (
        f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"
    )


def verify_password(password: str, encoded: str) -> bool:
    """True when ``encoded`` (a ``$7$`` or ``$6$`` mosquitto hash) matches ``password``."""
    parts = encoded.split("$")
    try:
        if len(parts) == 5 and parts[1] == "7":
            iterations = int(parts[2])
            salt = base64.b64decode(parts[3], validate=True)
            want = base64.b64decode(parts[4], validate=True)
            got = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, len(want))
            return hmac.compare_digest(got, want)
        if len(parts) == 4 and parts[1] == "6":  # mosquitto 1.x: salted SHA-512
            salt = base64.b64decode(parts[2], validate=True)
            want = base64.b64decode(parts[3], validate=True)
            return hmac.compare_digest(hashlib.sha512(password.encode() + salt).digest(), want)
    except ValueError:
        return False
    return False


# --------------------------------------------------------------------------- accounts and ACLs


@dataclass(frozen=True)
class Account:
    """One broker login. The username is the name (a topic level, unique across roles)."""

    name: str
    role: Role
    password: str

    @property
    def username(self) -> str:
        return self.name


@dataclass(frozen=True)
class Fleet:
    """Who may connect: names per role, as given on the command line."""

    phones: tuple[str, ...] = ()
    agents: tuple[str, ...] = ()
    coordinators: tuple[str, ...] = ()
    monitors: tuple[str, ...] = ()
    #: HTTP gateways (``moe2 gateway``): phones with many users, one client id per API key
    gateways: tuple[str, ...] = ()
    #: bridges of the brokers below this one (each logs in as its name)
    bridges: tuple[str, ...] = ()
    #: those bridges carry agents' topics too (their ACL then allows them)
    bridge_agents: bool = False

    def members(self) -> list[tuple[str, Role]]:
        out: list[tuple[str, Role]] = []
        out += [(n, "phone") for n in self.phones]
        out += [(n, "agent") for n in self.agents]
        out += [(n, "coordinator") for n in self.coordinators]
        out += [(n, "monitor") for n in self.monitors]
        out += [(n, "gateway") for n in self.gateways]
        out += [(n, "bridge") for n in self.bridges]
        return out

    def validate(self) -> Fleet:
        seen: dict[str, Role] = {}
        for name, role in self.members():
            try:
                check_name(f"{role} name", name)
            except ValueError as exc:
                raise BrokerConfigError(str(exc)) from None
            if name in seen:
                raise BrokerConfigError(
                    f"name {name!r} is given twice ({seen[name]} and {role}); usernames must be "
                    "unique across phones, agents, coordinators, monitors, gateways and "
                    "bridges"
                )
            seen[name] = role
        if not self.members():
            raise BrokerConfigError("no accounts: give --phones, --agents, --coordinators and/or "
                                    "--bridges")
        return self


def make_accounts(
    fleet: Fleet,
    previous: Mapping[str, Account] | None = None,
    *,
    token: Callable[[], str] = lambda: secrets.token_urlsafe(24),
) -> list[Account]:
    """One account per member; a member already in ``previous`` with the same role keeps its
    password, so adding a phone does not log the rest of the fleet out."""
    out: list[Account] = []
    for name, role in fleet.validate().members():
        old = (previous or {}).get(name)
        password = old.password if old is not None and old.role == role else token()
        out.append(Account(name=name, role=role, password=password))
    return out


def role_acl(role: Role, name: str, topics: Topics, *,
             bridge_agents: bool = False) -> list[tuple[Access, str]]:
    """The topic patterns one account may read and write (mosquitto ``topic`` lines)."""
    if role == "phone":
        return [
            ("write", topics.request(name)),
            ("read", topics.response_prefix(name) + "#"),
            # which coordinators are alive (their Last Will tells a waiting phone to give up)
            ("read", topics.all_coordinator_status),
            ("write", topics.cancel(name)),
        ]
    if role == "gateway":
        # A phone with many users: it asks as any client id (one per API key, so that the
        # coordinators' per-client limits apply per key) and reads the replies addressed to
        # its own level below every client's response prefix; and the plan (its models).
        return [
            ("write", topics.request("+")),
            ("write", topics.cancel("+")),
            ("read", topics.responses_of_every_client(name)),
            ("read", topics.all_coordinator_status),
            ("read", topics.plan.topic),
        ]
    if role == "agent":
        return [
            # read too: the agent watches its retained status and puts its own back when a
            # stale or forged one is there
            ("readwrite", topics.agent_status(name).topic),
            ("write", topics.agent_telemetry(name).topic),
            ("write", topics.agent_vocab(name).topic),
            ("read", topics.agent_rpc(name)),
            ("write", topics.coordinator_inbox("+").topic),
        ]
    if role == "coordinator":
        return [
            # Delivery through $share/<group>/... is checked against the plain topic.
            ("read", topics.all_requests),
            ("read", topics.all_cancels),
            ("read", topics.all_agent_status),
            ("read", topics.all_agent_telemetry),
            ("read", topics.agent_vocab("+").topic),
            ("read", topics.all_coordinator_status),
            # in-flight markers: its own, and a dead peer's that it reports and clears
            ("readwrite", topics.inflight_filter("+")),
            ("readwrite", topics.plan.topic),
            ("read", topics.coordinator_inbox(name).topic),
            ("write", topics.coordinator_status(name).topic),
            ("write", topics.agent_rpc("+")),
            ("write", topics.response_prefix("+") + "#"),
            # exactly once across brokers: its own claims and heartbeats, everyone's to read
            ("write", topics.coordinator_claims(name).topic),
            ("write", topics.coordinator_heartbeat(name).topic),
            ("read", topics.all_coordinator_claims),
            ("read", topics.all_coordinator_heartbeats),
            ("read", topics.bridge_state("+")),
        ]
    if role == "monitor":
        return [
            ("read", topics.all_agent_status),
            ("read", topics.all_agent_telemetry),
            ("read", topics.all_coordinator_status),
            ("read", topics.plan.topic),
            ("read", topics.bridge_state("+")),
        ]
    if role == "bridge":
        return bridge_acl(name, topics, agents=bridge_agents)
    raise ValueError(f"unknown role {role!r}")


def acl_text(accounts: Iterable[Account], topics: Topics, *, bridge_agents: bool = False) -> str:
    """The ``acl_file``: one ``user`` block per account; nothing is allowed to anyone else."""
    lines = [
        "# moe2 broker ACL, written by `moe2 broker-config`. Anything not listed is denied.",
        "# A shared subscription ($share/<group>/<filter>) is checked against the plain topic.",
        "",
    ]
    for acc in accounts:
        lines.append(f"# {acc.role} {acc.name}")
        lines.append(f"user {acc.username}")
        lines += [f"topic {access} {pattern}" for access, pattern in role_acl(
            acc.role, acc.name, topics, bridge_agents=bridge_agents)]
        lines.append("")
    return "\n".join(lines)


def password_file_text(
    accounts: Iterable[Account],
    *,
    iterations: int = DEFAULT_ITERATIONS,
    salt: Callable[[], bytes] = lambda: secrets.token_bytes(SALT_BYTES),
) -> str:
    return "".join(
        f"{a.username}:{hash_password(a.password, iterations=iterations, salt=salt())}\n"
        for a in accounts
    )


# --------------------------------------------------------------------------- mosquitto.conf


@dataclass(frozen=True)
class BrokerSpec:
    """How the broker listens and where its files will be on the broker host."""

    conf_dir: Path
    port: int = 1883
    tls_port: int = 8883
    tls_bind: str = ""
    hostnames: tuple[str, ...] = ()
    broker_user: str = "mosquitto"
    root: str = "moe2"
    #: this broker's uplink (``--bridge-to``), if any
    bridge: BridgeSpec | None = None

    def validate(self) -> BrokerSpec:
        for label, port in (("--port", self.port), ("--tls-port", self.tls_port)):
            if not 0 <= port <= 65535:
                raise BrokerConfigError(f"{label} {port} is not a TCP port")
        if self.tls_port == 0:
            raise BrokerConfigError("--tls-port must be a port: remote hosts connect over TLS")
        if self.port == self.tls_port:
            raise BrokerConfigError("--port and --tls-port must differ")
        try:
            Topics(self.root)
        except ValueError as exc:
            raise BrokerConfigError(str(exc)) from None
        for h in self.hostnames:
            if not h or any(c in h for c in " ,/\\\"'\n"):
                raise BrokerConfigError(f"host name {h!r} is not valid")
        if self.bridge is not None:
            try:
                self.bridge.validate()
            except BridgeConfigError as exc:
                raise BrokerConfigError(str(exc)) from None
        return self


def mosquitto_conf_text(spec: BrokerSpec, accounts: Sequence[Account]) -> str:
    d = spec.conf_dir
    roles = {r: sum(1 for a in accounts if a.role == r) for r in ROLES}
    counts = ", ".join(f"{n} {r}{'s' if n != 1 else ''}" for r, n in roles.items() if n)
    lines = [
        "# Mosquitto 2 configuration for moe2, written by `moe2 broker-config`.",
        f"# Accounts: {counts}; see credentials.json (secret) for their passwords.",
        "# Use it as is (mosquitto -c mosquitto.conf) or include it from the system broker",
        "# (Debian: ln -s <this file> /etc/mosquitto/conf.d/moe2.conf;",
        "#  systemctl restart mosquitto).",
        "# The password and ACL files are re-read on SIGHUP (systemctl reload mosquitto).",
        "",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {d / PASSWD_NAME}",
        f"acl_file {d / ACL_NAME}",
        "# When started as root mosquitto switches to this user before reading the files above.",
        f"user {spec.broker_user}",
        "# Every fused token is one broker round trip: do not delay small packets. Without",
        "# this line Nagle's algorithm holds each second expert reply until the coordinator",
        "# acknowledges the first: a delayed ACK, 40 ms, every fused token.",
        "set_tcp_nodelay true",
        "",
    ]
    if spec.port:
        lines += [
            "# Plain MQTT for services and tools on this host only.",
            f"listener {spec.port} 127.0.0.1",
            "protocol mqtt",
            "",
        ]
    lines += [
        "# MQTT over TLS for phones, agents and coordinators on other hosts.",
        f"listener {spec.tls_port}{' ' + spec.tls_bind if spec.tls_bind else ''}",
        "protocol mqtt",
        f"cafile {d / CA_CERT_NAME}",
        f"certfile {d / SERVER_CERT_NAME}",
        f"keyfile {d / SERVER_KEY_NAME}",
        "tls_version tlsv1.2",
        "",
    ]
    if spec.bridge is not None:
        lines.append(bridge_conf_text(spec.bridge, Topics(spec.root)))
    return "\n".join(lines)


# --------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    sans: tuple[str, ...]


def subject_alt_names(hostnames: Iterable[str]) -> tuple[str, ...]:
    """``DNS:``/``IP:`` entries: localhost and 127.0.0.1 always, then each host name."""
    out = ["DNS:localhost", "IP:127.0.0.1"]
    for h in hostnames:
        try:
            entry = f"IP:{ipaddress.ip_address(h)}"
        except ValueError:
            entry = f"DNS:{h}"
        if entry not in out:
            out.append(entry)
    return tuple(out)


def find_openssl() -> str:
    exe = shutil.which("openssl")
    if exe is None:
        raise BrokerConfigError(
            "the openssl command is needed to make the TLS certificates "
            "(Debian: apt-get install -y openssl)"
        )
    return exe


def _openssl(args: Sequence[str], cwd: Path) -> None:
    proc = subprocess.run(
        [find_openssl(), *args], cwd=cwd, capture_output=True, text=True, check=False,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        raise BrokerConfigError(
            f"openssl {args[0]} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}"
        )


def _ec_key(path: Path, cwd: Path) -> None:
    # private from the first byte: openssl truncates the file and keeps its mode
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_MODE))
    os.chmod(path, PRIVATE_MODE)
    _openssl(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
              "-out", str(path)], cwd)
    path.chmod(0o600)


def generate_tls(
    out_dir: Path,
    hostnames: Sequence[str],
    *,
    reuse_ca: bool = True,
    ca_days: int = 3650,
    server_days: int = 825,
) -> TlsFiles:
    """A development CA (kept when present and ``reuse_ca``) and a server certificate it signs.

    Keys are ECDSA P-256. The server certificate carries SANs for localhost, 127.0.0.1 and
    ``hostnames``; 825 days is the longest lifetime Apple clients accept.
    """
    ca_cert, ca_key = out_dir / CA_CERT_NAME, out_dir / CA_KEY_NAME
    srv_cert, srv_key = out_dir / SERVER_CERT_NAME, out_dir / SERVER_KEY_NAME
    sans = subject_alt_names(hostnames)
    if not (reuse_ca and ca_cert.is_file() and ca_key.is_file()):
        _ec_key(ca_key, out_dir)
        _openssl([
            "req", "-x509", "-new", "-key", str(ca_key), "-sha256", "-days", str(ca_days),
            "-subj", "/O=moe2/CN=moe2 development CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-addext", "subjectKeyIdentifier=hash",
            "-out", str(ca_cert),
        ], out_dir)
    _ec_key(srv_key, out_dir)
    with tempfile.TemporaryDirectory(prefix="moe2-tls-") as tmp:
        csr = Path(tmp) / "server.csr"
        ext = Path(tmp) / "server.ext"
        ext.write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyAgreement\n"
            "extendedKeyUsage=serverAuth\n"
            "subjectKeyIdentifier=hash\n"
            "authorityKeyIdentifier=keyid,issuer\n"
            f"subjectAltName={','.join(sans)}\n"
        )
        cn = next((h for h in hostnames if h), "localhost")
        _openssl(["req", "-new", "-key", str(srv_key), "-subj", f"/O=moe2/CN={cn}",
                  "-out", str(csr)], out_dir)
        _openssl([
            "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
            "-set_serial", str(secrets.randbits(120)), "-days", str(server_days), "-sha256",
            "-extfile", str(ext), "-out", str(srv_cert),
        ], out_dir)
    return TlsFiles(ca_cert, ca_key, srv_cert, srv_key, sans)


# --------------------------------------------------------------------------- credentials


def credentials_doc(
    accounts: Sequence[Account], spec: BrokerSpec
) -> dict[str, object]:
    """What ``credentials.json`` holds: per name its username, password, role and broker URLs."""
    host = spec.hostnames[0] if spec.hostnames else "localhost"
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    entries: dict[str, object] = {}
    for a in accounts:
        entry: dict[str, object] = {
            "username": a.username, "password": a.password, "role": a.role,
            "url": f"mqtts://{a.username}:{a.password}@{host}:{spec.tls_port}",
        }
        if spec.port:
            entry["local_url"] = f"mqtt://{a.username}:{a.password}@127.0.0.1:{spec.port}"
        entries[a.name] = entry
    return {
        "version": CREDENTIALS_VERSION,
        "root": spec.root,
        "ca_file": CA_CERT_NAME,
        "accounts": entries,
    }


def load_previous_accounts(path: Path) -> dict[str, Account]:
    """Accounts of an earlier ``credentials.json`` (empty when absent or unreadable)."""
    try:
        doc = json.loads(path.read_text())
        raw = doc["accounts"]
        out: dict[str, Account] = {}
        for name, entry in raw.items():
            role = entry["role"]
            if role in ROLES and isinstance(entry["password"], str) and entry["password"]:
                out[name] = Account(name=name, role=role, password=entry["password"])
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        if path.exists():
            log.warning("ignoring unreadable %s: %s", path, exc)
        return {}


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class BrokerFiles:
    out_dir: Path
    conf: Path
    passwd: Path
    acl: Path
    credentials: Path
    tls: TlsFiles
    accounts: tuple[Account, ...]
    #: files mosquitto must read but the broker user cannot yet (give them its group on install)
    needs_chown: tuple[Path, ...] = field(default=())
    #: the broker user's group (name), which may read the folder and the files mosquitto opens
    broker_group: str | None = None
    #: a folder above ``out_dir`` that the broker user cannot enter (mosquitto would then fail
    #: to open its password file after dropping root), or None
    unreachable: Path | None = None


#: the folder: owner all, the broker's group may enter and list it, nobody else anything
DIR_MODE = 0o750
#: files mosquitto opens after dropping root (passwd, acl, server.key): its group reads them
BROKER_READ_MODE = 0o640
#: secrets nobody but the owner reads (ca.key, credentials.json)
PRIVATE_MODE = 0o600


def _write_private(path: Path, text: str, mode: int = 0o600) -> None:
    """Create ``path`` with ``mode`` before any secret is written into it."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _broker_ids(user: str) -> tuple[int, int] | None:
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return None
    return pw.pw_uid, pw.pw_gid


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _user_gids(user: str, gid: int) -> set[int]:
    return {gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}


def can_enter(st_mode: int, st_uid: int, st_gid: int, uid: int, gids: set[int]) -> bool:
    """Whether a user may traverse a folder with these owner, group and mode bits (pure)."""
    if uid == 0:
        return True
    if st_uid == uid:
        return bool(st_mode & stat.S_IXUSR)
    if st_gid in gids:
        return bool(st_mode & stat.S_IXGRP)
    return bool(st_mode & stat.S_IXOTH)


def unreachable_folder(path: Path, user: str) -> Path | None:
    """The first folder above ``path`` (exclusive) that ``user`` cannot enter, or None (also
    when the user does not exist here: the files are meant for another host)."""
    ids = _broker_ids(user)
    if ids is None:
        return None
    gids = _user_gids(user, ids[1])
    for folder in reversed(path.absolute().parents):
        try:
            st = folder.stat()
        except OSError:
            return None
        if not can_enter(st.st_mode, st.st_uid, st.st_gid, ids[0], gids):
            return folder
    return None


def write_broker_config(
    out_dir: Path,
    fleet: Fleet,
    spec: BrokerSpec,
    *,
    iterations: int = DEFAULT_ITERATIONS,
    rotate: bool = False,
    bridge_ca: Path | None = None,
) -> BrokerFiles:
    """Write every file into ``out_dir`` (``bridge_ca``: the hub's CA certificate, copied to
    ``bridge-ca.crt`` for ``spec.bridge``, which must name that file under ``conf_dir``).

    Without ``rotate``, accounts already in ``credentials.json`` keep their passwords and an
    existing CA is reused (clients keep trusting it); the server certificate is always renewed.

    Who reads what: mosquitto started as root switches to ``spec.broker_user`` before it opens
    the password file, the ACL and the server key, so those are owner-writable and readable by
    the broker user's group (0640), and the folder is 0750 with that group (run as root, they
    are given the group here; otherwise ``needs_chown`` lists them). The CA key and
    ``credentials.json`` stay 0600, readable by their owner alone; certificates and
    ``mosquitto.conf`` are public (0644) -- except a ``mosquitto.conf`` that holds a bridge's
    password, which is treated as the password file.
    """
    spec = spec.validate()
    fleet = fleet.validate()
    topics = Topics(spec.root)
    created = not out_dir.exists()
    out_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    cred_path = out_dir / CREDENTIALS_NAME
    previous = {} if rotate else load_previous_accounts(cred_path)
    accounts = make_accounts(fleet, previous)
    if not spec.hostnames:
        spec = replace(spec, hostnames=(socket.gethostname(),))
    tls = generate_tls(out_dir, spec.hostnames, reuse_ca=not rotate)
    passwd = out_dir / PASSWD_NAME
    acl = out_dir / ACL_NAME
    conf = out_dir / CONF_NAME
    _write_private(passwd, password_file_text(accounts, iterations=iterations))
    _write_private(acl, acl_text(accounts, topics, bridge_agents=fleet.bridge_agents))
    secret_conf = spec.bridge is not None and spec.bridge.password is not None
    _write_private(conf, mosquitto_conf_text(spec, accounts), 0o600 if secret_conf else 0o644)
    if spec.bridge is not None and bridge_ca is not None:
        ca_copy = out_dir / BRIDGE_CA_NAME
        _write_private(ca_copy, bridge_ca.read_text(), 0o644)
    os.chmod(tls.ca_cert, 0o644)
    os.chmod(tls.server_cert, 0o644)
    os.chmod(tls.ca_key, PRIVATE_MODE)
    _write_private(cred_path, json.dumps(credentials_doc(accounts, spec), indent=2) + "\n")
    broker_read = (passwd, acl, tls.server_key, *((conf,) if secret_conf else ()))
    needs_chown: tuple[Path, ...] = ()
    ids = _broker_ids(spec.broker_user)
    me = os.geteuid()
    group: str | None = None
    if ids is not None and ids[0] == me:
        pass  # mosquitto runs as this very user: owner-only files are what it needs
    elif ids is not None and me == 0:
        group = _group_name(ids[1])
        for p in broker_read:
            os.chown(p, -1, ids[1])
            os.chmod(p, BROKER_READ_MODE)
        st = out_dir.stat()
        if created or not can_enter(st.st_mode, st.st_uid, st.st_gid, ids[0],
                                    _user_gids(spec.broker_user, ids[1])):
            os.chown(out_dir, -1, ids[1])
            os.chmod(out_dir, DIR_MODE if created else stat.S_IMODE(st.st_mode) | 0o050)
    else:
        needs_chown = broker_read
        group = _group_name(ids[1]) if ids is not None else spec.broker_user
    unreachable = (unreachable_folder(out_dir, spec.broker_user)
                   if spec.conf_dir.absolute() == out_dir.absolute() else None)
    return BrokerFiles(out_dir=out_dir, conf=conf, passwd=passwd, acl=acl, credentials=cred_path,
                       tls=tls, accounts=tuple(accounts), needs_chown=needs_chown,
                       broker_group=group, unreachable=unreachable)
