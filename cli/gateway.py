"""``moe2 gateway``: the OpenAI-compatible HTTP API, one more phone with many users.

``moe2 gateway --broker URL --listen HOST:PORT [--api-keys FILE]`` serves; ``moe2 gateway
add-key NAME --keys FILE`` prints a new key once (the file keeps only its salted hash) and
``moe2 gateway remove-key NAME --keys FILE`` revokes it (a running gateway notices either
within a second).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from moe2.cli._common import (
    add_daemon_arguments,
    emit_json,
    fail,
    run_daemon,
    with_daemon_arguments,
)

HELP = "serve the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models) over the fleet"
log = logging.getLogger("moe2.gateway")

DEFAULT_KEYS = "/etc/moe2/gateway.keys"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_daemon_arguments(p, "gateway")
    p.add_argument("--id", help="this gateway's name: its MQTT client id moe2-gateway-NAME, the "
                                "level its replies come to, its broker user (default 'gateway')")
    p.add_argument("--listen", help="HOST:PORT to serve HTTP on (default 127.0.0.1:8000)")
    p.add_argument("--api-keys", help="key file written by `moe2 gateway add-key`; each key "
                                      "asks upstream as its own client id")
    p.add_argument("--allow-unauthenticated", action="store_true", default=None,
                   help="serve a non-loopback address without --api-keys")
    p.add_argument("--timeout", type=float, help="seconds to wait for the fleet's next reply "
                                                 "before answering 504 (default 120)")
    p.add_argument("--ssl-certfile", help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--ssl-keyfile", help="... and this private key")
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    add = sub.add_parser("add-key", help="create an API key for NAME; prints it once")
    add.add_argument("name", help="the key's name: its client id upstream")
    add.add_argument("--keys", default=DEFAULT_KEYS, help=f"key file (default {DEFAULT_KEYS})")
    add.add_argument("--replace", action="store_true", help="replace NAME's existing key")
    add.add_argument("--json", action="store_true", help="print one JSON object")
    rm = sub.add_parser("remove-key", help="revoke NAME's API key")
    rm.add_argument("name")
    rm.add_argument("--keys", default=DEFAULT_KEYS, help=f"key file (default {DEFAULT_KEYS})")


def run(args: argparse.Namespace) -> int:
    if args.action == "add-key":
        return _add_key(args)
    if args.action == "remove-key":
        return _remove_key(args)
    return _serve(args)


def _add_key(args: argparse.Namespace) -> int:
    from moe2.gateway.keys import KeyFileError, add_key

    path = Path(args.keys)
    try:
        key = add_key(path, args.name, replace=args.replace)
    except (KeyFileError, ValueError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write {path}: {exc.strerror or exc}")
    if args.json:
        emit_json({"name": args.name, "key": key, "keys": str(path)})
    else:
        sys.stdout.write(key + "\n")
        sys.stderr.write(f"key for {args.name!r} added to {path}; it is shown only now\n")
    return 0


def _remove_key(args: argparse.Namespace) -> int:
    from moe2.gateway.keys import KeyFileError, remove_key

    try:
        removed = remove_key(Path(args.keys), args.name)
    except KeyFileError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write {args.keys}: {exc.strerror or exc}")
    if not removed:
        fail(f"{args.keys} has no key named {args.name!r}", code=1)
    sys.stderr.write(f"key {args.name!r} removed from {args.keys}\n")
    return 0


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn  # noqa: F401 - the extra's presence, checked before anything starts
    except ImportError as exc:
        fail(f"the gateway needs its extra: pip install 'moe2[gateway]' ({exc})")
    import time

    from moe2.gateway.app import GatewayApp, Settings
    from moe2.gateway.config import GatewayConfig
    from moe2.gateway.keys import KeyFileError, KeyStore
    from moe2.gateway.metrics import GatewayMetrics
    from moe2.gateway.service import Gateway
    from moe2.gateway.upstream import MqttUpstream
    from moe2.shared.config import ConfigError, load
    from moe2.shared.mqtt import (
        BrokerRefusedError,
        BrokerUrlError,
        TlsOptions,
        make_client,
        parse_broker_url,
    )
    from moe2.shared.topics import Topics
    from moe2.tools.clients.phone import PhoneClient

    try:
        cfg = with_daemon_arguments(
            load(args.config, GatewayConfig), args, id=args.id, listen=args.listen,
            api_keys=args.api_keys, allow_unauthenticated=args.allow_unauthenticated,
            timeout_s=args.timeout, ssl_certfile=args.ssl_certfile,
            ssl_keyfile=args.ssl_keyfile).validate()
        url = parse_broker_url(cfg.broker)
        keys = (KeyStore(Path(cfg.api_keys), clock=time.monotonic)
                if cfg.api_keys is not None else None)
    except (ConfigError, BrokerUrlError, KeyFileError) as exc:
        fail(str(exc))
    tls = TlsOptions(cfg.tls.ca_file, cfg.tls.cert_file, cfg.tls.key_file, cfg.tls.insecure)

    def client() -> Any:
        # a persistent session: replies published while the gateway reconnects wait for it
        return make_client(url, identifier=f"moe2-gateway-{cfg.id}", tls=tls,
                           clean_start=False, session_expiry_s=300)

    metrics = GatewayMetrics(cfg.id) if cfg.metrics_port is not None else None
    phone = PhoneClient(client, cfg.id, Topics(cfg.root), msgpack=True, check_delivery=True,
                        watch_coordinators=True, watch_plan=True, on_behalf=True,
                        reply_level=cfg.id, grace_s=cfg.grace_s)
    if metrics is not None:
        metrics.watch_connection(lambda: phone.is_connected)
    app = GatewayApp(MqttUpstream(phone), Settings(
        timeout_s=cfg.timeout_s, default_max_tokens=cfg.default_max_tokens, client_id=cfg.id,
        max_body_bytes=cfg.max_body_bytes), keys=keys, metrics=metrics)
    try:
        gateway = Gateway(cfg, phone, app)
    except OSError as exc:
        fail(f"cannot listen on {cfg.listen}: {exc.strerror or exc}")

    def start_metrics() -> Any:
        if metrics is None or cfg.metrics_port is None:
            return None
        return metrics.serve(cfg.metrics_port)

    log.info("gateway %s: broker %s", cfg.id, url.redacted())
    try:
        return run_daemon(gateway.run, gateway.request_stop, start_metrics)
    except BrokerRefusedError as exc:
        fail(f"gateway {cfg.id}: {url.redacted()}: {exc}")
