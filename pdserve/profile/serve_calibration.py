"""What a served step costs beyond `LLMEngine.step()`: HTTP, SSE chunks, the asyncio loop.

`pdserve profile --serve-calibration` starts one real worker (`pdserve serve`, 127.0.0.1, a free
port), streams `batch` identical-length decode-heavy requests at once for a few batch sizes, and
compares the gaps between streamed tokens with the engine-only decode steps it measured on the
same grid. A least-squares line through (batch, extra seconds per step) gives a per-step and a
per-sequence cost, which ProfilePerf adds to every simulated step.
"""
from __future__ import annotations

import asyncio
import os
import random
import statistics
import time

from pdserve import procs


async def _stream_gaps(url: str, prompts: list[list[int]], max_tokens: int) -> list[float]:
    """Stream all prompts at once; return the gaps between tokens after the first few."""
    import aiohttp

    async def one(session, prompt):
        body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True, "temperature": 0}
        times = []
        async with session.post(url + "/v1/completions", json=body) as r:
            async for line in r.content:
                if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                    times.append(time.perf_counter())
        return times

    async with aiohttp.ClientSession() as session:
        runs = await asyncio.gather(*(one(session, p) for p in prompts))
    skip = 4   # the first tokens overlap the other requests' prefills
    return [b - a for t in runs for a, b in zip(t[skip:], t[skip + 1:])]


def calibrate(engine_args: list[str], batches: list[int], context: int, decode_time, vocab: int,
              max_tokens: int = 40) -> dict:
    """decode_time(batch, context) -> engine-only seconds per step, from the same profile."""
    port = procs.free_port()
    url = f"http://127.0.0.1:{port}"
    proc = procs.start(procs.pdserve_command("serve", "--host", "127.0.0.1", "--port", port, *engine_args))
    try:
        procs.wait_healthy(url, proc, timeout=300.0, interval=0.5)
        # the client parses the streams; keep it off the worker's core where it can
        cores = sorted(os.sched_getaffinity(0))
        all_cores = sorted(range(os.cpu_count() or 1))
        if len(all_cores) > len(cores):
            os.sched_setaffinity(0, [c for c in all_cores if c not in cores] or all_cores)
        rng = random.Random(1)
        points = []
        for b in batches:
            prompts = [[rng.randrange(vocab) for _ in range(context)] for _ in range(b)]
            gaps = asyncio.run(_stream_gaps(url, prompts, max_tokens))
            served = statistics.median(gaps)
            points.append({"batch": b, "served_step_s": served, "engine_step_s": decode_time(b, context + max_tokens // 2)})
        os.sched_setaffinity(0, cores)
    finally:
        procs.stop(proc, timeout=20)
    xs = [p["batch"] for p in points]
    ys = [p["served_step_s"] - p["engine_step_s"] for p in points]
    if len(xs) > 1:
        slope, intercept = statistics.linear_regression(xs, ys)
    else:
        slope, intercept = 0.0, ys[0]
    return {"per_step_s": max(0.0, intercept), "per_seq_s": max(0.0, slope), "points": points}
