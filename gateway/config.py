"""The gateway's configuration file (TOML), strict like the daemons' (see moe2.shared.config),
and the pure checks of where it may listen."""

from __future__ import annotations

import ipaddress
import math

import msgspec

from moe2.shared.config import ConfigError, TlsSection
from moe2.shared.topics import check_name


class GatewayConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    #: MQTT client id ``moe2-gateway-{id}``, the level its replies come to
    #: (``responses/{client}/{id}``), and its broker user with ``moe2 broker-config --gateways``
    id: str = "gateway"
    broker: str = "mqtt://127.0.0.1:1883"
    root: str = "moe2"
    listen: str = "127.0.0.1:8000"
    #: the key file (``moe2 gateway add-key``); None: no keys, every request asks as ``id``
    api_keys: str | None = None
    #: serve a non-loopback address without a key file (anyone who reaches it may ask)
    allow_unauthenticated: bool = False
    #: the longest wait for the fleet's next reply (first token or the next): then 504
    timeout_s: float = 120.0
    #: a request with no reply yet when a coordinator's Last Will arrives fails after this
    #: (``coordinator_lost``, 503)
    grace_s: float = 10.0
    #: ``max_tokens`` of a chat request that gives none (/v1/completions: 16, as OpenAI)
    default_max_tokens: int = 256
    #: SIGTERM: stop accepting, let answers finish this long, then cancel them upstream
    drain_timeout_s: float = 10.0
    max_body_bytes: int = 1 << 20
    metrics_port: int | None = None
    #: HTTPS by uvicorn itself (a reverse proxy in front is the README's first choice)
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    #: MQTT TLS (mqtts://)
    tls: TlsSection = TlsSection()

    def validate(self) -> GatewayConfig:
        try:
            check_name("gateway id", self.id)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        host, _port = parse_listen(self.listen)
        for name in ("timeout_s", "grace_s", "drain_timeout_s"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ConfigError(f"{name} must be a positive number of seconds, got {v!r}")
        if self.default_max_tokens < 1 or self.max_body_bytes < 1:
            raise ConfigError("default_max_tokens and max_body_bytes must be >= 1")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ConfigError("HTTPS needs both ssl_certfile and ssl_keyfile")
        if self.api_keys is None and not is_loopback(host) and not self.allow_unauthenticated:
            raise ConfigError(
                f"--listen {self.listen} is reachable from other hosts and there is no "
                "--api-keys file: anyone could use the fleet. Give --api-keys FILE (moe2 "
                "gateway add-key NAME), listen on 127.0.0.1, or pass --allow-unauthenticated")
        return self


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8000`` for IPv6) -> (host, port); port 0 picks a free one."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"--listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:8000")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    """Only this machine can connect (``localhost``, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to, assume others can reach it
