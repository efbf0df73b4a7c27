"""API keys (hashing, the key file, reloads) and where the gateway may listen (issue 15)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from moe2.gateway import keys as k
from moe2.gateway.config import GatewayConfig, is_loopback, parse_listen
from moe2.shared.config import ConfigError


def test_a_new_key_verifies_and_only_its_hash_is_stored() -> None:
    key, entry = k.new_key("alice")
    assert key.startswith(k.KEY_PREFIX)
    entries = {entry.key_id: entry}
    assert k.verify(key, entries) == "alice"
    key_id, secret = k.split_key(key)  # type: ignore[misc]
    assert secret not in entry.line() and key not in entry.line()
    assert entry.line().startswith(f"alice:{key_id}:sha256:")
    other, _ = k.new_key("bob")
    assert k.verify(other, entries) is None  # unknown key id
    forged = key[:-1] + ("0" if key[-1] != "0" else "1")
    assert k.verify(forged, entries) is None  # right id, wrong secret
    for bad in ("", "sk-moe2-", "Bearer " + key, key + "0", key.upper(), "sk-other-" + key[8:]):
        assert k.verify(bad, entries) is None


def test_hashes_are_salted() -> None:
    same = lambda n: "ab" * n  # noqa: E731 - the same "random" key twice
    key1, e1 = k.new_key("a", token_hex=same)
    key2, e2 = k.new_key("b", token_hex=same)
    assert key1 == key2 and e1.digest != e2.digest


@pytest.mark.parametrize(("header", "token"), [
    ("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("Basic abc", None), ("Bearer", None),
    ("", None), (None, None)])
def test_bearer_token(header: str | None, token: str | None) -> None:
    assert k.bearer_token(header) == token


def test_key_file_round_trip_and_permissions(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "gateway.keys"
    key_a = k.add_key(path, "alice")
    key_b = k.add_key(path, "bob")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert key_a not in text and key_b not in text
    entries = k.parse_key_file(text)
    assert sorted(e.name for e in entries.values()) == ["alice", "bob"]
    assert k.verify(key_a, entries) == "alice" and k.verify(key_b, entries) == "bob"
    with pytest.raises(k.KeyFileError, match="already has a key named 'alice'"):
        k.add_key(path, "alice")
    key_a2 = k.add_key(path, "alice", replace=True)
    entries = k.parse_key_file(path.read_text())
    assert k.verify(key_a, entries) is None and k.verify(key_a2, entries) == "alice"
    assert k.remove_key(path, "bob")
    assert not k.remove_key(path, "bob")
    assert k.verify(key_b, k.parse_key_file(path.read_text())) is None
    with pytest.raises(ValueError, match="not valid"):
        k.add_key(path, "a/b")


@pytest.mark.parametrize(("text", "why"), [
    ("alice:0123456789ab:md5:00:00\n", "expected NAME:KEY_ID"),
    ("alice:0123456789ab:sha256:zz:" + "00" * 32, "line 1"),
    ("alice:0123:sha256:00:" + "00" * 32, "malformed"),
    ("# c\n\na/b:0123456789ab:sha256:00:" + "00" * 32, "line 3"),
    ("a:0123456789ab:sha256:00:" + "00" * 32 + "\nb:0123456789ab:sha256:00:" + "00" * 32,
     "given twice"),
])
def test_a_bad_key_file_names_the_line(text: str, why: str) -> None:
    with pytest.raises(k.KeyFileError, match=why):
        k.parse_key_file(text, "f")


def test_key_store_picks_up_changes_and_keeps_the_last_good_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    key_a = k.add_key(path, "alice")
    now = [0.0]
    store = k.KeyStore(path, clock=lambda: now[0], check_every_s=1.0)
    assert store.lookup(key_a) == "alice"
    key_b = k.add_key(path, "bob")
    os.utime(path, ns=(1, 10**18))  # a distinct mtime even within one clock tick
    assert store.lookup(key_b) is None  # not re-read within check_every_s
    now[0] = 1.0
    assert store.lookup(key_b) == "bob"
    path.write_text("garbage\n")
    now[0] = 2.0
    assert store.lookup(key_b) == "bob"  # invalid file: the previous keys stay
    k.remove_key(tmp_path / "fresh", "x")  # a missing file has no keys
    with pytest.raises(k.KeyFileError, match="cannot use API key file"):
        k.KeyStore(tmp_path / "missing", clock=lambda: 0.0)


def test_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:8000") == ("127.0.0.1", 8000)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen("0.0.0.0:443") == ("0.0.0.0", 443)
    for bad in ("8000", ":8000", "host:", "host:http", "h:70000"):
        with pytest.raises(ConfigError):
            parse_listen(bad)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1")
    assert not is_loopback("gateway.example")


def test_no_keys_means_loopback_only_unless_told_otherwise() -> None:
    GatewayConfig(listen="127.0.0.1:8000").validate()
    with pytest.raises(ConfigError, match="--allow-unauthenticated"):
        GatewayConfig(listen="0.0.0.0:8000").validate()
    GatewayConfig(listen="0.0.0.0:8000", allow_unauthenticated=True).validate()
    GatewayConfig(listen="0.0.0.0:8000", api_keys="/etc/moe2/gateway.keys").validate()
    with pytest.raises(ConfigError, match="gateway id"):
        GatewayConfig(id="a/b").validate()
    with pytest.raises(ConfigError, match="ssl"):
        GatewayConfig(ssl_certfile="c.pem").validate()
    with pytest.raises(ConfigError, match="timeout_s"):
        GatewayConfig(timeout_s=0).validate()
