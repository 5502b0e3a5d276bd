"""What the real prefill->decode path costs beyond the engine steps: `--pd-calibration`.

`pdserve profile --pd-calibration` starts a real 1P+1D deployment (`pdserve up`'s Cluster on
127.0.0.1 free ports; prefill worker on the first of this process's cores, decode worker on the
next one when there is one) and sends it one streamed request at a time, so nothing queues.
For each prompt length n it compares what the client sees with the engine-only step times the
same profile measured:

- prefill path: TTFT - prefill_time(n). The router's call to the prefill worker, that worker's
  HTTP and serving work, the KV export, and the first chunk back through the router.
- hand-off: (second token - first token) - decode_time(1, n). The router's call to the decode
  worker, the KV pull over this host's transport, and the decode side's join of the request.

The fixed cost of each is the median over all samples (a burst of other load spoils a sample,
not the figure). No per-byte term is fitted: at the prompt lengths a one-core CPU profile can
afford, this host's shm transport moves the KV in a few ms, below the noise, so the bytes stay
with the cluster config's `link_bw`. ProfilePerf's profile carries them as `pd_overhead`; the
simulator charges them on every remote prefill.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
import urllib.request


def _stream_times(url: str, prompt: list[int], max_tokens: int) -> list[float]:
    """Client-side time of each streamed chunk, from just before the request is sent."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
                       "temperature": 0}).encode()
    req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    times = []
    with urllib.request.urlopen(req, timeout=120) as r:
        for line in r:
            if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                times.append(time.perf_counter() - t0)
    return times


def pd_lengths(profile: dict, lo: int = 64, hi: int = 512) -> list[int]:
    """Prompt lengths the profile measured itself: the prefill extra is then a difference of two
    measurements, not of a measurement and an interpolation (which at 384 tokens between the
    256 and 512 points was off by more than the cost being measured)."""
    return [p["tokens"] for p in profile["prefill"] if lo <= p["tokens"] <= hi] or [profile["prefill"][0]["tokens"]]


def _deployment(engine: dict, cores: list[int], model: str | None):
    from pdserve.launch.config import load_deployment
    pc, dc = str(cores[0]), str(cores[1 % len(cores)])
    spec = {"port": 0, **({"model": model} if model else {}), "prefill": {"count": 1, "cpus": [pc], "engine": engine},
            "decode": {"count": 1, "cpus": [dc], "engine": engine}}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        return load_deployment(argparse.Namespace(config=f.name))
    finally:
        os.unlink(f.name)


def calibrate(engine: dict, lengths: list[int], perf, vocab: int, kv_bytes_per_token: int,
              repeats: int = 3, max_tokens: int = 4, model: str | None = None) -> dict:
    """perf: a ProfilePerf built from this profile's engine-only measurements."""
    from pdserve.launch.cluster import Cluster
    cores = sorted(os.sched_getaffinity(0))
    all_cores = sorted(range(os.cpu_count() or 1))
    dep = _deployment(engine, all_cores if len(cores) < 2 else cores, model)
    rng = random.Random(2)
    samples = []
    with tempfile.TemporaryDirectory() as logs, Cluster(dep, logs).start() as cluster:
        url = cluster.router_url
        _stream_times(url, [rng.randrange(vocab) for _ in range(16)], max_tokens)   # warm-up
        for _ in range(repeats):          # sweeps: a burst of other load spoils one visit only
            for n in lengths:
                t = _stream_times(url, [rng.randrange(vocab) for _ in range(n)], max_tokens)
                if len(t) >= 2:
                    samples.append({"tokens": n, "kv_bytes": n * kv_bytes_per_token,
                                    "prefill_extra_s": t[0] - perf.prefill_time(n),
                                    "handoff_extra_s": t[1] - t[0] - perf.decode_time(1, n + 1)})
    pre = statistics.median(s["prefill_extra_s"] for s in samples)
    hand = statistics.median(s["handoff_extra_s"] for s in samples)
    return {"prefill_s": max(0.0, pre), "handoff_s": max(0.0, hand), "samples": samples}
