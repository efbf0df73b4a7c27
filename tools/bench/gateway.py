"""``moe2 bench gateway``: the HTTP gateway against direct MQTT on the same fleet, in one run.

Two tiny experts as agent processes, one coordinator, one ``moe2 gateway`` (no keys, loopback),
all started by the fleet harness. At each concurrency (1 and 16 clients) every repeat runs the
same greedy streamed request from every client both ways, in alternating order:

* direct: each client is a phone with its own MQTT connection (:class:`PhoneClient`, what
  ``moe2 ask`` does), reading token chunks and the final;
* gateway: each client is an HTTP client with its own keep-alive connection, streaming
  ``POST /v1/completions`` (server-sent events, ``include_usage``).

Per request: time to first token (send -> first text) as the client sees it. Per batch: tokens
per second = every client's completion tokens / the batch's wall time. Medians over repeats;
the ratios gateway / direct come from the same run. Connections are opened before the clock
starts on both sides. The gateway process's CPU time per token is read from /proc to say
what the extra hop costs on this machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import tempfile
import time
import uuid
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from moe2.shared import wire
from moe2.shared.mqtt import make_client, parse_broker_url
from moe2.tools.bench.fusion import _cpu_s, start_bench_fleet
from moe2.tools.clients.phone import PhoneClient
from moe2.tools.fleet.harness import Fleet
from moe2.tools.models import make_test_experts

PROMPT = "Q: What is 2 plus 3? A:"
TARGET_RATIO = 0.95
REQUEST_TIMEOUT_S = 300.0

#: (time to first token s, completion tokens) of one request
Result = tuple[float, int]


async def _direct_one(phone: PhoneClient, req: wire.PhoneRequest) -> Result:
    t0 = time.perf_counter()
    ttft: float | None = None
    async for msg in phone.stream(req, timeout_s=REQUEST_TIMEOUT_S):
        if isinstance(msg, wire.TokenChunk) and ttft is None and msg.text:
            ttft = time.perf_counter() - t0
        elif isinstance(msg, wire.FinalReply):
            return ttft if ttft is not None else time.perf_counter() - t0, msg.tokens
        elif isinstance(msg, wire.ErrorReplyPhone):
            raise RuntimeError(f"bench request failed: {msg.code.value}: {msg.message}")
    raise RuntimeError("no final")


async def _http_one(client: Any, body: dict[str, Any]) -> Result:
    t0 = time.perf_counter()
    ttft: float | None = None
    tokens = None
    async with client.stream("POST", "/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"gateway answered {r.status_code}: {await r.aread()!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                raise RuntimeError(f"gateway stream failed: {obj['error']}")
            if obj["choices"] and obj["choices"][0]["text"] and ttft is None:
                ttft = time.perf_counter() - t0
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
    if tokens is None:
        raise RuntimeError("the gateway's stream had no usage chunk")
    return (ttft if ttft is not None else time.perf_counter() - t0), tokens


async def _batch_direct(url: str, clients: int, req: wire.PhoneRequest
                        ) -> tuple[float, list[Result]]:
    u = parse_broker_url(url)
    async with AsyncExitStack() as stack:
        phones = []
        for i in range(clients):
            cid = f"bench-d{i}-{uuid.uuid4().hex[:6]}"
            c = await stack.enter_async_context(make_client(u, identifier=cid))
            phones.append(await stack.enter_async_context(PhoneClient(c, cid, msgpack=True)))
        t0 = time.perf_counter()
        results = await asyncio.gather(*[_direct_one(p, req) for p in phones])
        return time.perf_counter() - t0, list(results)


async def _batch_gateway(base_url: str, clients: int, body: dict[str, Any]
                         ) -> tuple[float, list[Result]]:
    import httpx

    async with AsyncExitStack() as stack:
        https = []
        for _ in range(clients):
            h = await stack.enter_async_context(httpx.AsyncClient(
                base_url=base_url, timeout=REQUEST_TIMEOUT_S,
                limits=httpx.Limits(max_connections=1)))
            (await h.get("/models")).raise_for_status()  # the connection is open and kept
            https.append(h)
        t0 = time.perf_counter()
        results = await asyncio.gather(*[_http_one(h, body) for h in https])
        return time.perf_counter() - t0, list(results)


def _summary(batches: list[tuple[float, list[Result]]]) -> dict[str, Any]:
    per_batch = [sum(tok for _t, tok in res) / wall for wall, res in batches]
    ttfts = [t for _wall, res in batches for t, _tok in res]
    return {"tokens_per_s": statistics.median(per_batch), "tokens_per_s_runs": per_batch,
            "ttft_ms": 1e3 * statistics.median(ttfts),
            "tokens_per_request": statistics.median(
                [tok for _w, res in batches for _t, tok in res])}


async def _measure(fleet: Fleet, base_url: str, n_tokens: int, repeats: int,
                   levels: tuple[int, ...], gateway_pid: int) -> dict[str, Any]:
    req = wire.PhoneRequest(prompt=PROMPT, max_tokens=n_tokens, raw=True, temperature=0.0)
    body = {"model": "moe2-default", "prompt": PROMPT, "max_tokens": n_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    for _ in range(2):  # warm up both paths
        await _batch_direct(fleet.url, 2, req)
        await _batch_gateway(base_url, 2, body)
    out: dict[str, Any] = {}
    me = os.getpid()
    for clients in levels:
        batches: dict[str, list[tuple[float, list[Result]]]] = {"direct": [], "gateway": []}
        # CPU seconds and tokens: the gateway process; the clients (this process) per path
        cpu = {"gateway": 0.0, "client_direct": 0.0, "client_gateway": 0.0}
        tokens = {"direct": 0, "gateway": 0}
        for r in range(repeats):
            order = ("direct", "gateway") if r % 2 == 0 else ("gateway", "direct")
            for path in order:
                before = _cpu_s(gateway_pid), _cpu_s(me)
                batch = (await _batch_direct(fleet.url, clients, req) if path == "direct"
                         else await _batch_gateway(base_url, clients, body))
                after = _cpu_s(gateway_pid), _cpu_s(me)
                batches[path].append(batch)
                tokens[path] += sum(tok for _t, tok in batch[1])
                if None not in before and None not in after:
                    cpu[f"client_{path}"] += after[1] - before[1]  # type: ignore[operator]
                    if path == "gateway":
                        cpu["gateway"] += after[0] - before[0]  # type: ignore[operator]
        d, g = _summary(batches["direct"]), _summary(batches["gateway"])
        out[str(clients)] = {
            "direct": d, "gateway": g,
            "ratio_tokens_per_s": g["tokens_per_s"] / d["tokens_per_s"],
            "ttft_ratio": g["ttft_ms"] / d["ttft_ms"],
            "ttft_extra_ms": g["ttft_ms"] - d["ttft_ms"],
            # what the extra hop costs per token: the gateway process, and the HTTP client
            # (SSE parsing) against the MQTT phone client, both in this process
            "cpu_ms_per_token": {
                "gateway_process": 1e3 * cpu["gateway"] / max(1, tokens["gateway"]),
                "http_clients": 1e3 * cpu["client_gateway"] / max(1, tokens["gateway"]),
                "mqtt_clients": 1e3 * cpu["client_direct"] / max(1, tokens["direct"]),
            },
        }
    return out


def run_gateway_bench(*, quick: bool = False, out_dir: str | None = None,
                      seed: int = 0) -> dict[str, Any]:
    n_tokens = 32 if quick else 64
    repeats = 2 if quick else 7
    levels = (1, 16)
    work = Path(out_dir or tempfile.mkdtemp(prefix="moe2-bench-gateway-"))
    experts = make_test_experts(work, count=2)
    with Fleet(work / "fleet") as fleet:
        start_bench_fleet(fleet, experts)
        base_url = fleet.start_gateway(log_level="WARNING", name="gateway")

        async def main() -> dict[str, Any]:
            await fleet.wait_ready([e.name for e in experts], ["coordinator"])
            await fleet.wait_models(base_url, ["moe2-default"], name="gateway")
            return await _measure(fleet, base_url, n_tokens, repeats, levels,
                                  fleet.pid("gateway"))

        measured = asyncio.run(main())
    ratios = {k: v["ratio_tokens_per_s"] for k, v in measured.items() if k.isdigit()}
    return {
        "bench": "gateway",
        "experts": [e.name for e in experts],
        "tokens_per_request": n_tokens,
        "repeats": repeats,
        "concurrency": {k: v for k, v in measured.items() if k.isdigit()},
        "ratio_tokens_per_s": ratios,
        "target_ratio": TARGET_RATIO,
        "target_met": all(r >= TARGET_RATIO for r in ratios.values()),
        "cpu_count": os.cpu_count(),
    }
