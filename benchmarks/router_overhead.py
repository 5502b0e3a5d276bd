"""What the router adds: latency per request (p50, p99) and requests/s under many concurrent
streams, against calling the workers directly, in the same run.

Scenarios, each with the same load (C concurrent streams, N requests, T tokens each):
  direct        client -> worker                         (one call)
  router-local  client -> router -> worker               (prefill on the decode worker)
  manual-pd     client -> P (max_tokens 1), client -> D  (the two calls a user would make, seed 002)
  router-pd     client -> router -> P, router -> D       (the router's P->D flow)
Ratios compare router-local with direct and router-pd with manual-pd.

By default the workers are fake (instant, same protocol, a separate process) so that only the
router's cost is measured; `--real` uses the default model instead (pdserve up's Cluster),
where model time dominates and the overhead is the difference of two noisy numbers.

    python benchmarks/router_overhead.py [--concurrency 64] [--requests 2000] [--tokens 16] [--real]

Each scenario runs twice: one request at a time (the latency the router adds to a request)
and with --concurrency streams (the rate it sustains, and its latency under that load).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time

import aiohttp
import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pdserve.procs import free_port, start, stop, wait_healthy  # noqa: E402


# ---- the fake worker (run as a subprocess: `router_overhead.py --fake-worker PORT`) ----------
def fake_worker(port: int) -> None:
    from aiohttp import web

    async def gen(request: web.Request):
        body = await request.json()
        ktp = body.get("kv_transfer_params") or {}
        n = body.get("max_tokens") or 16
        if ktp.get("do_remote_decode"):   # prefill half: the first token and where the KV lies
            return web.json_response({
                "id": "p", "object": "text_completion", "created": 0, "model": "fake",
                "choices": [{"index": 0, "text": " t0", "finish_reason": "length"}],
                "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9},
                "kv_transfer_params": {"do_remote_prefill": True, "remote_engine_id": "fake", "remote_host": "x",
                                       "remote_port": 1, "remote_block_ids": [0], "remote_request_id": "r",
                                       "kv_token": "t", "first_token_id": 0, "prompt_token_ids": [1]}})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(n):
            ch = {"id": "d", "object": "text_completion", "created": 0, "model": "fake",
                  "choices": [{"index": 0, "text": f" t{i}", "finish_reason": "length" if i == n - 1 else None}]}
            await resp.write(b"data: " + json.dumps(ch).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def health(request):
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_post("/v1/completions", gen)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# ---- load --------------------------------------------------------------------------------------
async def one_stream(s: aiohttp.ClientSession, url: str, body: dict) -> float:
    """Send one streamed completion; return its time to first token (the rest is timed outside)."""
    t0 = time.perf_counter()
    ttft = None
    async with s.post(url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.content:
            if line.startswith(b"data:") and ttft is None:
                ttft = time.perf_counter() - t0
    return ttft


async def manual_pd(s: aiohttp.ClientSession, p: str, d: str, body: dict) -> float:
    """What a client without a router does: prefill call, then decode call with its params."""
    t0 = time.perf_counter()
    pb = {**body, "max_tokens": 1, "stream": False, "kv_transfer_params": {"do_remote_decode": True}}
    async with s.post(p + "/v1/completions", json=pb) as r:
        r.raise_for_status()
        ktp = (await r.json())["kv_transfer_params"]
    ttft = time.perf_counter() - t0
    await one_stream(s, d, {**body, "kv_transfer_params": ktp})
    return ttft


async def run_load(call, n: int, concurrency: int) -> dict:
    lat, ttfts = [], []
    left = n

    async def loop(s):
        nonlocal left
        while left > 0:
            left -= 1
            t0 = time.perf_counter()
            ttfts.append(await call(s))
            lat.append(time.perf_counter() - t0)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as s:
        t0 = time.perf_counter()
        await asyncio.gather(*(loop(s) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"n": len(lat), "rps": len(lat) / wall, "p50": pct(lat, 50), "p99": pct(lat, 99),
            "ttft_p50": pct(ttfts, 50), "ttft_p99": pct(ttfts, 99), "mean": statistics.fmean(lat)}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs)) - 1))]


# ---- deployments -------------------------------------------------------------------------------
def start_router(prefill: str | None, decode: str, logs: str, name: str, local_max: int = 0):
    port = free_port()
    cmd = [sys.executable, "-m", "pdserve.router.cli", "--port", str(port), "--decode", decode,
           "--local-prefill-max-tokens", str(local_max)]
    if prefill:
        cmd += ["--prefill", prefill]
    proc = start(cmd, os.path.join(logs, f"{name}.log"))
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, timeout=60)
    return proc, url


def fake_setup(logs: str):
    procs, urls = [], []
    for role in ("prefill", "decode"):
        port = free_port()
        p = start([sys.executable, os.path.abspath(__file__), "--fake-worker", str(port)],
                  os.path.join(logs, f"fake-{role}.log"))
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, p, timeout=60)
        procs.append(p)
        urls.append(url)
    return procs, urls[0], urls[1], None


def real_setup(logs: str):
    from pdserve.launch.cluster import Cluster
    from pdserve.launch.config import Deployment, WorkerSpec
    eng = {"kv_cache_memory": "256MiB"}
    c = Cluster(Deployment(port=0, workers=[WorkerSpec("prefill", eng), WorkerSpec("decode", eng)]), logs)
    c.start()
    c.router.stop()   # this benchmark starts its own routers
    return [], c.workers[0].url, c.workers[1].url, c


async def bench(args, p_url: str, d_url: str, logs: str) -> dict:
    body = {"model": args.model, "prompt": "The router adds how much? " * 4, "max_tokens": args.tokens,
            "temperature": 0, "stream": True}
    r_local, url_local = start_router(None, d_url, logs, "router-local")
    r_pd, url_pd = start_router(p_url, d_url, logs, "router-pd")
    scenarios = {
        "direct": lambda s: one_stream(s, d_url, body),
        "router-local": lambda s: one_stream(s, url_local, body),
        "manual-pd": lambda s: manual_pd(s, p_url, d_url, body),
        "router-pd": lambda s: one_stream(s, url_pd, body),
    }
    # the router's own CPU time per request: unlike latency, it does not depend on what else
    # runs on the machine
    router_proc = {"router-local": psutil.Process(r_local.pid), "router-pd": psutil.Process(r_pd.pid)}
    res = {}
    try:
        for name, call in scenarios.items():
            await run_load(call, min(args.requests, 4 * args.concurrency), args.concurrency)   # warm up
            rp = router_proc.get(name)
            res[name] = {}
            # one at a time: the latency the router adds; many at once: the rate it sustains
            for phase, n, c in (("single", args.latency_requests, 1), ("loaded", args.requests, args.concurrency)):
                cpu0 = sum(rp.cpu_times()[:2]) if rp else 0.0
                res[name][phase] = r = await run_load(call, n, c)
                if rp:
                    r["router_cpu_ms_per_request"] = (sum(rp.cpu_times()[:2]) - cpu0) / r["n"] * 1e3
                cpu = f"  router CPU {r['router_cpu_ms_per_request']:.2f} ms/req" if rp else ""
                print(f"{name:13s} c={c:<4d} {r['rps']:8.1f} req/s  p50 {r['p50'] * 1e3:8.2f} ms  "
                      f"p99 {r['p99'] * 1e3:8.2f} ms  ttft p50 {r['ttft_p50'] * 1e3:7.2f} ms{cpu}", flush=True)
    finally:
        stop(r_local)
        stop(r_pd)
    return res


def report(res: dict, args) -> dict:
    out = {"config": vars(args), "scenarios": res, "added": {}}
    for routed, base in (("router-local", "direct"), ("router-pd", "manual-pd")):
        a1, b1, an, bn = res[routed]["single"], res[base]["single"], res[routed]["loaded"], res[base]["loaded"]
        x = out["added"][routed] = {
            "added_p50_ms": (a1["p50"] - b1["p50"]) * 1e3, "added_p99_ms": (a1["p99"] - b1["p99"]) * 1e3,
            "latency_ratio_p50": a1["p50"] / b1["p50"], "latency_ratio_p99": a1["p99"] / b1["p99"],
            "loaded_added_p50_ms": (an["p50"] - bn["p50"]) * 1e3, "loaded_added_p99_ms": (an["p99"] - bn["p99"]) * 1e3,
            "rps": an["rps"], "rps_ratio": an["rps"] / bn["rps"],
            "router_cpu_ms_per_request": an["router_cpu_ms_per_request"]}
        print(f"{routed} vs {base}: one at a time +{x['added_p50_ms']:.2f} ms p50, +{x['added_p99_ms']:.2f} ms p99 "
              f"(x{x['latency_ratio_p50']:.2f}, x{x['latency_ratio_p99']:.2f}); {args.concurrency} streams: "
              f"{x['rps']:.0f} req/s (x{x['rps_ratio']:.2f}), +{x['loaded_added_p50_ms']:.1f} ms p50, "
              f"+{x['loaded_added_p99_ms']:.1f} ms p99; router CPU {x['router_cpu_ms_per_request']:.2f} ms/req")
    return out


def plot(res: dict, path: str, concurrency: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(res)
    xs = list(range(len(names)))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, phase, title in ((axes[0], "single", "one request at a time"),
                             (axes[1], "loaded", f"{concurrency} concurrent streams")):
        ax.bar([x - 0.2 for x in xs], [res[n][phase]["p50"] * 1e3 for n in names], 0.4, label="p50")
        ax.bar([x + 0.2 for x in xs], [res[n][phase]["p99"] * 1e3 for n in names], 0.4, label="p99")
        ax.set_xticks(xs, names, fontsize=8)
        ax.set_ylabel("request latency (ms)")
        ax.set_title(title)
        ax.legend()
    axes[2].bar(xs, [res[n]["loaded"]["rps"] for n in names])
    axes[2].set_xticks(xs, names, fontsize=8)
    axes[2].set_ylabel("requests/s")
    axes[2].set_title(f"throughput, {concurrency} streams")
    fig.suptitle("router overhead: routed vs direct, same run")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fake-worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--requests", type=int, default=2000, help="requests in the concurrent phase")
    ap.add_argument("--latency-requests", type=int, default=300, help="requests sent one at a time")
    ap.add_argument("--tokens", type=int, default=16, help="output tokens per request")
    ap.add_argument("--real", action="store_true", help="default-model workers instead of fake ones")
    ap.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    ap.add_argument("--out", default="router_overhead", help="writes OUT.json and OUT.png")
    args = ap.parse_args()
    if args.fake_worker:
        fake_worker(args.fake_worker)
        return 0
    logs = tempfile.mkdtemp(prefix="router-overhead-")
    procs, p_url, d_url, cluster = (real_setup if args.real else fake_setup)(logs)
    try:
        print(f"{'real' if args.real else 'fake'} workers; {args.concurrency} concurrent streams, "
              f"{args.requests} requests of {args.tokens} tokens; logs in {logs}", flush=True)
        res = asyncio.run(bench(args, p_url, d_url, logs))
    finally:
        for p in procs:
            stop(p)
        if cluster:
            cluster.stop()
    out = report(res, args)
    with open(args.out + ".json", "w") as f:
        json.dump(out, f, indent=2)
    plot(res, args.out + ".png", args.concurrency)
    print(f"wrote {args.out}.json and {args.out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
