"""Sends a workload on its arrival schedule (Poisson/gamma, a trace's times, or all at once)."""
from __future__ import annotations

import asyncio
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import aiohttp
import numpy as np

from pdserve.bench.client import build_body, send_request
from pdserve.bench.metrics import RequestRecord
from pdserve.bench.workloads import BenchRequest


@dataclass
class RunConfig:
    base_url: str
    endpoint: str = "/v1/completions"
    model: str | None = None
    request_rate: float | None = None   # None: a trace's own times, else all at once
    burstiness: float = 1.0
    max_concurrency: int | None = None
    seed: int = 0
    ignore_eos: bool = False
    temperature: float = 0.0
    timeout_s: float = 600.0
    api_key: str | None = None
    num_warmups: int = 1
    progress: bool = True
    extra_body: dict = field(default_factory=dict)
    # the run's time source and pacing; tests pass a virtual clock so that no assertion rests on the scheduler
    clock: Callable[[], float] = time.perf_counter
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep


def arrival_times(requests: list[BenchRequest], rate: float | None, burstiness: float, seed: int) -> list[float]:
    """Send offsets in seconds. Gaps are gamma(shape=burstiness, mean=1/rate) as vLLM's
    --burstiness: 1 is Poisson, below 1 burstier, above 1 more even."""
    if rate is None and all(r.arrival is not None for r in requests):
        t0 = min(r.arrival for r in requests)
        return [r.arrival - t0 for r in requests]
    if rate is None or math.isinf(rate):
        return [0.0] * len(requests)
    if rate <= 0 or burstiness <= 0:
        raise ValueError("--request-rate and --burstiness must be positive")
    gaps = np.random.default_rng(seed).gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=len(requests))
    return [0.0] + np.cumsum(gaps[:-1]).tolist()


async def fetch_model(session: aiohttp.ClientSession, base_url: str, headers: dict) -> str:
    async with session.get(base_url.rstrip("/") + "/v1/models", headers=headers) as resp:
        if resp.status != 200:
            raise ValueError(f"GET /v1/models answered HTTP {resp.status}; pass --model")
        return (await resp.json())["data"][0]["id"]


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc="requests", unit="req", file=sys.stderr, dynamic_ncols=True)
        self.failed = 0

    def update(self, rec: RequestRecord):
        self.failed += not rec.success
        if self.bar:
            self.bar.set_postfix(failed=self.failed, refresh=False)
            self.bar.update(1)

    def close(self):
        if self.bar:
            self.bar.close()


async def run_workload(requests: list[BenchRequest], cfg: RunConfig) -> tuple[list[RequestRecord], float, str]:
    """Returns (records in workload order, benchmark duration in seconds, model name)."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    url = cfg.base_url.rstrip("/") + cfg.endpoint
    conn = aiohttp.TCPConnector(limit=cfg.max_concurrency or 0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        model = cfg.model or await fetch_model(session, cfg.base_url, headers)
        await _warmup(session, url, model, requests, cfg, headers)
        offsets = arrival_times(requests, cfg.request_rate, cfg.burstiness, cfg.seed)
        records = [RequestRecord(i, r.prompt_len, r.output_len) for i, r in enumerate(requests)]
        sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
        history: dict[int, list[dict]] = {}
        turn_done: dict[tuple[int, int], asyncio.Event] = {
            (r.conv, r.turn): asyncio.Event() for r in requests if r.conv is not None}
        progress = _Progress(len(requests), cfg.progress)
        clock = cfg.clock
        t0 = clock()

        async def one(i: int, req: BenchRequest):
            await cfg.sleep(max(0.0, t0 + offsets[i] - clock()))
            messages = req.messages
            if req.conv is not None and req.turn > 0:
                prev = turn_done.get((req.conv, req.turn - 1))
                if prev is not None:
                    await prev.wait()
                messages = history.get(req.conv, []) + req.messages
            body = build_body(cfg.endpoint, model, messages, req.output_len, cfg.ignore_eos,
                              cfg.temperature, cfg.extra_body)
            if sem:
                async with sem:
                    await send_request(session, url, body, records[i], t0, headers, clock)
            else:
                await send_request(session, url, body, records[i], t0, headers, clock)
            if req.conv is not None:
                history[req.conv] = messages + [{"role": "assistant", "content": records[i].text}]
                turn_done[(req.conv, req.turn)].set()
            progress.update(records[i])

        try:
            await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
        finally:
            progress.close()
        return records, clock() - t0, model


async def _warmup(session, url, model, requests, cfg, headers):
    """A few untimed requests first, so a lazy first call (allocation, compilation) is not measured."""
    for i, req in enumerate(requests[: cfg.num_warmups]):
        # a different first word: the measured request must not find its prompt already cached
        messages = [{**m, "content": f"warm-up {i}: {m['content']}"} if j == 0 else m
                    for j, m in enumerate(req.messages)]
        body = build_body(cfg.endpoint, model, messages, min(req.output_len, 8), cfg.ignore_eos,
                          cfg.temperature, cfg.extra_body)
        rec = await send_request(session, url, body, RequestRecord(-1, 0, 0), cfg.clock(), headers, cfg.clock)
        if not rec.success:
            print(f"warning: warm-up request failed: {rec.error}", file=sys.stderr)


def run(requests: list[BenchRequest], cfg: RunConfig) -> tuple[list[RequestRecord], float, str]:
    return asyncio.run(run_workload(requests, cfg))
