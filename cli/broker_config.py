"""``moe2 broker-config``: write a secured Mosquitto 2 configuration for a moe2 site."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from moe2.cli._common import emit_json, fail

HELP = "write a Mosquitto 2 config with per-role accounts, ACLs and a TLS listener"


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="directory to write the files into")
    p.add_argument("--phones", type=_names, default=(), metavar="A,B",
                   help="phone client ids (each may ask under requests/<id>)")
    p.add_argument("--agents", type=_names, default=(), metavar="E0,E1", help="agent (expert) ids")
    p.add_argument("--coordinators", type=_names, default=(), metavar="C0",
                   help="coordinator ids")
    p.add_argument("--monitors", type=_names, default=(), metavar="M0",
                   help="read-only accounts for `moe2 monitor` (status, telemetry, plan)")
    p.add_argument("--gateways", type=_names, default=(), metavar="G0",
                   help="HTTP gateways (`moe2 gateway --id G0`): may ask as any client id "
                        "and read replies to their own level")
    p.add_argument("--bridges", type=_names, default=(), metavar="SITE1,SITE2",
                   help="accounts for the bridges of site brokers below this one (a hub): each "
                        "site runs `moe2 broker-config --bridge-to` with its entry's URL")
    p.add_argument("--bridge-to", metavar="URL",
                   help="this broker's one uplink: mqtts://NAME:SECRET@hub:8883 (the entry "
                        "NAME of the hub's credentials.json); bridges must form a tree")
    p.add_argument("--bridge-ca-file", metavar="FILE",
                   help="the hub's CA certificate (its ca.crt), copied next to the config")
    p.add_argument("--bridge-name",
                   help="the bridge's name (default: the user name in --bridge-to)")
    p.add_argument("--bridge-agents", action="store_true",
                   help="agents' topics cross the bridge too (coordinators then fuse experts "
                        "of the other side: ~40 ms per token on mosquitto 2.0's bridge); give "
                        "it on both sides")
    p.add_argument("--bridge-queue", type=int, default=10_000, metavar="N",
                   help="messages queued here while the uplink is down (default 10000)")
    p.add_argument("--root", default="moe2", help="topic root (default moe2)")
    p.add_argument("--port", type=int, default=1883,
                   help="plain MQTT listener on 127.0.0.1 (default 1883; 0 = none)")
    p.add_argument("--tls-port", type=int, default=8883, help="TLS listener (default 8883)")
    p.add_argument("--tls-bind", default="",
                   help="address the TLS listener binds (default: every interface)")
    p.add_argument("--hostname", type=_names, default=(), metavar="NAME[,NAME]",
                   help="names/IPs clients use to reach the broker, for the certificate "
                        "(default: this host's name; localhost and 127.0.0.1 are always in)")
    p.add_argument("--conf-dir",
                   help="where the files will live on the broker host, for the paths in "
                        "mosquitto.conf (default: --out)")
    p.add_argument("--broker-user", default="mosquitto",
                   help="user mosquitto runs as (default mosquitto); it must read the files")
    p.add_argument("--iterations", type=int, default=101,
                   help="PBKDF2 iterations of the password hashes (default 101, as "
                        "mosquitto_passwd)")
    p.add_argument("--rotate", action="store_true",
                   help="new passwords and a new CA even when --out holds earlier ones")
    p.add_argument("--json", action="store_true", help="print one JSON summary (no passwords)")


def run(args: argparse.Namespace) -> int:
    from moe2.tools.ops.bridgeconf import BridgeConfigError, spec_from_url
    from moe2.tools.ops.brokerconf import (
        BRIDGE_CA_NAME,
        BrokerConfigError,
        BrokerSpec,
        Fleet,
        write_broker_config,
    )

    out = Path(args.out).expanduser().absolute()
    conf_dir = Path(args.conf_dir) if args.conf_dir else out
    if not conf_dir.is_absolute():
        fail(f"--conf-dir {args.conf_dir!r} must be an absolute path")
    if args.iterations < 1:
        fail("--iterations must be >= 1")
    fleet = Fleet(phones=args.phones, agents=args.agents, coordinators=args.coordinators,
                  monitors=args.monitors, gateways=args.gateways, bridges=args.bridges,
                  bridge_agents=args.bridge_agents)
    bridge_ca = Path(args.bridge_ca_file).expanduser() if args.bridge_ca_file else None
    if bridge_ca is not None and not bridge_ca.is_file():
        fail(f"--bridge-ca-file {args.bridge_ca_file!r} is not a file")
    try:
        bridge = None if args.bridge_to is None else spec_from_url(
            args.bridge_to, name=args.bridge_name, agents=args.bridge_agents,
            ca_file=conf_dir / BRIDGE_CA_NAME if bridge_ca is not None else None,
            queue=args.bridge_queue)
    except BridgeConfigError as exc:
        fail(str(exc))
    spec = BrokerSpec(conf_dir=conf_dir, port=args.port, tls_port=args.tls_port,
                      tls_bind=args.tls_bind, hostnames=args.hostname,
                      broker_user=args.broker_user, root=args.root, bridge=bridge)
    try:
        files = write_broker_config(out, fleet, spec, iterations=args.iterations,
                                    rotate=args.rotate, bridge_ca=bridge_ca)
    except BrokerConfigError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write {out}: {exc.strerror or exc}")
    summary = {
        "out": str(out),
        "conf": str(files.conf),
        "passwd": str(files.passwd),
        "acl": str(files.acl),
        "credentials": str(files.credentials),
        "ca_cert": str(files.tls.ca_cert),
        "ca_key": str(files.tls.ca_key),
        "server_cert": str(files.tls.server_cert),
        "server_key": str(files.tls.server_key),
        "sans": list(files.tls.sans),
        "port": args.port or None,
        "tls_port": args.tls_port,
        "root": args.root,
        "accounts": {a.name: {"username": a.username, "role": a.role} for a in files.accounts},
        "needs_chown": [str(conf_dir / p.name) for p in files.needs_chown],
        "broker_user": args.broker_user,
        "broker_group": files.broker_group,
        "unreachable": str(files.unreachable) if files.unreachable else None,
        "start": f"mosquitto -c {files.conf}",
        "bridge": None if bridge is None else {
            "name": bridge.name, "to": f"{bridge.host}:{bridge.port}", "tls": bridge.tls,
            "agents": bridge.agents, "queue": bridge.queue,
            "notification_topic": f"{args.root}/bridges/{bridge.name}/state"},
        "bridges": list(args.bridges),
    }
    if args.json:
        emit_json(summary)
        return 0
    print(f"wrote {files.conf} for {len(files.accounts)} accounts "
          f"({', '.join(f'{a.role} {a.name}' for a in files.accounts)})")
    print(f"  passwords: {files.credentials} (secret: hand each device only its own entry)")
    print(f"  TLS: listener {args.tls_port}, CA {files.tls.ca_cert} "
          f"(clients need it: --ca-file), SANs {', '.join(files.tls.sans)}")
    print(f"  keep {files.tls.ca_key} off the broker host; it signs new server certificates")
    if args.port:
        print(f"  plain MQTT: 127.0.0.1:{args.port} only")
    if files.needs_chown:
        who = getpass.getuser()
        group = files.broker_group or args.broker_user
        print(f"  mosquitto runs as {args.broker_user!r}, not {who!r}: on the broker host run")
        paths = " ".join(str(conf_dir / p.name) for p in files.needs_chown)
        print(f"    sudo chgrp {group} {conf_dir} {paths} && sudo chmod 0750 {conf_dir} "
              f"&& sudo chmod 0640 {paths}")
    if files.unreachable is not None:
        print(f"  warning: {args.broker_user!r} cannot enter {files.unreachable}, so mosquitto "
              f"could not open its password file after dropping root: choose another --out "
              f"(e.g. /etc/mosquitto/moe2) or let that user in", file=sys.stderr)
    if bridge is not None:
        print(f"  bridge {bridge.name}: uplink to {bridge.host}:{bridge.port} "
              f"({'TLS' if bridge.tls else 'plain MQTT: the password crosses in clear'}), "
              f"MQTT 5, {'agents shared' if bridge.agents else 'agents stay on this site'}; "
              f"state on {args.root}/bridges/{bridge.name}/state")
    if args.bridges:
        agents = " --bridge-agents" if args.bridge_agents else ""
        print(f"  bridge accounts {', '.join(args.bridges)}: each site broker runs "
              f"`moe2 broker-config --bridge-to <its url in credentials.json> "
              f"--bridge-ca-file {files.tls.ca_cert}{agents}`")
    print(f"  start: mosquitto -c {files.conf}   (or include it from /etc/mosquitto/conf.d/)")
    return 0
