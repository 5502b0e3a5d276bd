"""`pdserve bench` against a real `pdserve serve --role both` worker with the default model.

The independent reference here is the worker's own Prometheus counters: tokens it generated
and first-token latencies it measured from the request's arrival, which cannot exceed what
the client measured from sending it.
"""
from __future__ import annotations

import urllib.request

import pytest

from pdserve.bench.metrics import summarize
from pdserve.bench.runner import RunConfig, run
from pdserve.bench.text import PromptText
from pdserve.bench.workloads import random_workload
from pdserve.procs import free_port, pdserve_command, start, stop, wait_healthy
from helpers import metric_value

pytestmark = pytest.mark.slow


def metric(text: str, name: str) -> float:
    return metric_value(text, "pdserve:" + name)


def test_bench_against_a_real_worker(tmp_path, default_model_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(pdserve_command("serve", "--role", "both", "--kv-cache-memory", "128MiB", "--port", port),
                 tmp_path / "worker.log")
    try:
        wait_healthy(url, proc, timeout=180)
        reqs = random_workload(3, 32, 6, 0.0, PromptText(None, 0), seed=0)
        records, duration, model = run(reqs, RunConfig(url, ignore_eos=True, progress=False, num_warmups=0))
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            prom = r.read().decode()
    finally:
        stop(proc)
    assert "SmolLM2" in model
    assert all(r.success for r in records), [r.error for r in records]
    for r in records:
        assert r.output_tokens == 6  # --ignore-eos: exactly max_tokens, counted by the server's usage
        assert 28 <= r.prompt_len <= 40  # ~32 words of one token each, plus any BOS
        assert 0 < r.ttft < r.e2el and 1 <= len(r.itl) <= 5
        assert r.tpot == pytest.approx((r.e2el - r.ttft) / 5)
    s = summarize(records, duration)
    assert s["total_output_tokens"] == metric(prom, "generation_tokens_total") == 18
    assert metric(prom, "time_to_first_token_seconds_count") == 3
    assert metric(prom, "time_to_first_token_seconds_sum") <= sum(r.ttft for r in records) + 1e-3
