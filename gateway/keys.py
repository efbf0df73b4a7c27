"""API keys: a file of salted hashes, one key per client id upstream.

``moe2 gateway add-key NAME`` prints a new key once (``sk-moe2-<key id>-<secret>``) and appends
only ``NAME:<key id>:sha256:<salt hex>:<digest hex>`` to the key file (mode 0600). A key is 192
random bits, so a fast salted SHA-256 is enough: key stretching (PBKDF2, scrypt) protects
guessable passwords, and would cost every HTTP request milliseconds of CPU here. The key id
finds the one line to check (no scan over every hash), the comparison is constant-time.

NAME is the client id the gateway asks with on the broker (``requests/NAME``): the
coordinators' per-client limits apply per key. Names share one namespace with the site's
phones (a key named like a phone shares that phone's limits).

Everything except :func:`add_key`, :func:`remove_key` and :class:`KeyStore`'s file reading is
pure.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from moe2.shared.topics import check_name

log = logging.getLogger(__name__)

KEY_PREFIX = "sk-moe2-"
KEY_ID_HEX = 12
SECRET_HEX = 48  # 192 bits
SALT_BYTES = 16
SCHEME = "sha256"


class KeyFileError(ValueError):
    """A key file that cannot be used (one line for the operator, naming the file and line)."""


@dataclass(frozen=True)
class KeyEntry:
    name: str
    key_id: str
    salt: bytes
    digest: bytes

    def line(self) -> str:
        return f"{self.name}:{self.key_id}:{SCHEME}:{self.salt.hex()}:{self.digest.hex()}"


def digest_of(secret: str, salt: bytes) -> bytes:
    return hashlib.sha256(salt + secret.encode()).digest()


def split_key(key: str) -> tuple[str, str] | None:
    """``sk-moe2-<key id>-<secret>`` -> (key id, secret), or None when not of that form."""
    if not key.startswith(KEY_PREFIX):
        return None
    key_id, sep, secret = key[len(KEY_PREFIX):].partition("-")
    if not sep or len(key_id) != KEY_ID_HEX or len(secret) != SECRET_HEX:
        return None
    if not all(c in "0123456789abcdef" for c in key_id + secret):
        return None
    return key_id, secret


def new_key(name: str, *, token_hex: Callable[[int], str] = secrets.token_hex,
            salt: bytes | None = None) -> tuple[str, KeyEntry]:
    """A fresh key for ``name`` and the entry that stores only its salted hash."""
    check_name("key name", name)
    key_id, secret = token_hex(KEY_ID_HEX // 2), token_hex(SECRET_HEX // 2)
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    return (f"{KEY_PREFIX}{key_id}-{secret}",
            KeyEntry(name, key_id, salt, digest_of(secret, salt)))


def parse_key_file(text: str, source: str = "key file") -> dict[str, KeyEntry]:
    """Key id -> entry. Blank lines and ``#`` comments are skipped; anything else that is not
    a valid entry, a repeated key id or a repeated name is a :class:`KeyFileError`."""
    out: dict[str, KeyEntry] = {}
    names: set[str] = set()
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        where = f"{source}, line {n}"
        if len(parts) != 5 or parts[2] != SCHEME:
            raise KeyFileError(f"{where}: expected NAME:KEY_ID:{SCHEME}:SALT:DIGEST")
        name, key_id, _scheme, salt_hex, digest_hex = parts
        try:
            check_name("key name", name)
            salt, digest = bytes.fromhex(salt_hex), bytes.fromhex(digest_hex)
        except ValueError as exc:
            raise KeyFileError(f"{where}: {exc}") from None
        if len(key_id) != KEY_ID_HEX or len(digest) != hashlib.sha256().digest_size:
            raise KeyFileError(f"{where}: malformed key id or digest")
        if key_id in out or name in names:
            raise KeyFileError(f"{where}: key id {key_id} or name {name!r} is given twice")
        out[key_id] = KeyEntry(name, key_id, salt, digest)
        names.add(name)
    return out


def verify(key: str, entries: Mapping[str, KeyEntry]) -> str | None:
    """The name (client id) whose key this is, or None."""
    parts = split_key(key)
    if parts is None:
        return None
    entry = entries.get(parts[0])
    if entry is None:
        return None
    if not hmac.compare_digest(digest_of(parts[1], entry.salt), entry.digest):
        return None
    return entry.name


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme case-insensitive)."""
    if not authorization:
        return None
    scheme, _sep, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


# --------------------------------------------------------------------------- the file


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically with a 0600 file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def add_key(path: Path, name: str, *, replace: bool = False) -> str:
    """Create a key for ``name`` in ``path`` (created 0600 when missing); returns the key,
    which is stored nowhere else. ``replace``: drop ``name``'s old key first."""
    text = _read(path)
    entries = parse_key_file(text, str(path))
    if any(e.name == name for e in entries.values()):
        if not replace:
            raise KeyFileError(f"{path} already has a key named {name!r} (remove-key it, or "
                               "add it again with --replace)")
        text = _without(text, name)
    key, entry = new_key(name)
    if text and not text.endswith("\n"):
        text += "\n"
    if not text:
        text = "# moe2 gateway API keys (moe2 gateway add-key): NAME:KEY_ID:sha256:SALT:DIGEST\n"
    _write_private(path, text + entry.line() + "\n")
    return key


def _without(text: str, name: str) -> str:
    return "".join(ln for ln in text.splitlines(keepends=True)
                   if ln.strip().split(":", 1)[0] != name or ln.strip().startswith("#"))


def remove_key(path: Path, name: str) -> bool:
    """Remove ``name``'s key from ``path``; whether there was one."""
    text = _read(path)
    entries = parse_key_file(text, str(path))
    if not any(e.name == name for e in entries.values()):
        return False
    _write_private(path, _without(text, name))
    return True


class KeyStore:
    """The key file as the gateway sees it: re-read when it changes (at most once per
    ``check_every_s``), so ``add-key`` and ``remove-key`` take effect without a restart. A
    file that becomes unreadable or invalid keeps the last good keys (logged)."""

    def __init__(self, path: Path, *, clock: Callable[[], float],
                 check_every_s: float = 1.0) -> None:
        self.path = path
        self.clock = clock
        self.check_every_s = check_every_s
        self._entries: dict[str, KeyEntry] = {}
        self._stamp: tuple[int, int] | None = None
        self._checked_at: float | None = None
        self.reload(strict=True)

    def reload(self, *, strict: bool = False) -> None:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            entries = parse_key_file(self.path.read_text(), str(self.path))
        except (OSError, KeyFileError) as exc:
            if strict:
                raise KeyFileError(f"cannot use API key file {self.path}: {exc}") from None
            log.error("API key file %s not reloaded (%s); the previous keys stay in force",
                      self.path, exc)
            return
        self._entries, self._stamp = entries, stamp
        log.info("API keys: %d in %s", len(entries), self.path)

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: str) -> str | None:
        """The client id of a valid key, else None."""
        now = self.clock()
        if self._checked_at is None or now - self._checked_at >= self.check_every_s:
            self._checked_at = now
            self.reload()
        return verify(key, self._entries)
