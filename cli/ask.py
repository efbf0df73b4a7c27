"""``moe2 ask``: behave like a phone -- send one prompt, stream the fused answer."""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import uuid

from moe2.cli._common import emit_json, fail

HELP = "send a prompt like a phone would and stream the fused answer"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883",
                   help="mqtt://[user:pass@]host:port or mqtts://...")
    p.add_argument("--app", default="default", help="application class (default 'default')")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--raw", action="store_true", help="no chat template; tokenise as is")
    p.add_argument("--client-id",
                   help="phone id (default: the broker URL's user name, else random); a "
                        "secured broker takes requests only from <name> logged in as <name>")
    p.add_argument("--root", default="moe2")
    p.add_argument("--ca-file", help="CA certificate for mqtts://")
    p.add_argument("--msgpack", action="store_true", help="send MessagePack instead of JSON")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for replies")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def run(args: argparse.Namespace) -> int:
    from moe2.shared import wire
    from moe2.shared.mqtt import BrokerUrlError, TlsOptions, make_client, parse_broker_url
    from moe2.shared.topics import Topics
    from moe2.tools.clients.phone import AskError, PhoneClient

    try:
        url = parse_broker_url(args.broker)
        req = wire.PhoneRequest(prompt=args.prompt, app=args.app, max_tokens=args.max_tokens,
                                temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                stop=args.stop, raw=args.raw)
    except (BrokerUrlError, ValueError) as exc:
        fail(str(exc))
    client_id = args.client_id or url.username or f"cli-{uuid.uuid4().hex[:8]}"

    async def main() -> int:
        import aiomqtt
        from aiomqtt.exceptions import MqttConnectError

        client = make_client(url, identifier=client_id, tls=TlsOptions(ca_file=args.ca_file))
        try:
            # check_delivery: an ACL refusal or "no matching subscribers" (no coordinator) is
            # reported by the broker's PUBACK at once, instead of a silent wait
            # a request still undelivered when this phone would give up is dropped on the way
            async with client, PhoneClient(client, client_id, Topics(args.root),
                                           msgpack=args.msgpack, check_delivery=True,
                                           request_expiry_s=max(1, math.ceil(args.timeout))
                                           ) as phone:
                def show(text: str) -> None:
                    if not args.json:
                        sys.stdout.write(text)
                        sys.stdout.flush()

                answer = await phone.ask(req, timeout_s=args.timeout, on_chunk=show)
        except AskError as exc:
            fail(f"{exc.code}: {exc.message}", code=1)
        except MqttConnectError as exc:
            fail(f"the broker at {url.redacted()} refused the connection: {exc}", code=1)
        except aiomqtt.MqttError as exc:
            fail(f"cannot reach the broker at {url.redacted()}: {exc}", code=1)
        except (TimeoutError, asyncio.TimeoutError):
            fail(f"no answer within {args.timeout:g}s (is a coordinator running?)", code=1)
        if args.json:
            emit_json(answer.as_dict())
        elif answer.final is not None:
            f = answer.final
            sys.stdout.write("\n")
            experts = ", ".join(
                f"{e.id} w={e.weight:.2f}{' (dropped)' if e.dropped else ''}" for e in f.experts)
            sys.stderr.write(f"[{f.tokens} tokens, {f.finish_reason}, ttft {f.ttft_s or 0:.3f}s,"
                             f" {f.latency_s:.3f}s, {f.energy_j:.3f} J; experts: {experts}]\n")
        if answer.error is not None:
            if not args.json:
                sys.stderr.write(f"error: {answer.error.code.value}: {answer.error.message}\n")
            return 1
        return 0

    return asyncio.run(main())
