"""`pdserve bench` end to end (result JSON, plots, failures shown) and compare's deployments."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from pdserve.bench.compare import run_deployments, write_report
from pdserve.bench.runner import RunConfig
from pdserve.bench.workloads import BenchRequest
from bench_fake_server import start_in_thread
from helpers import free_port

pytestmark = pytest.mark.slow  # starts processes

HERE = os.path.dirname(os.path.abspath(__file__))


def test_cli_writes_result_json_and_plots_and_shows_failures(tmp_path):
    port = free_port()
    _, stop = start_in_thread(port)
    trace = tmp_path / "t.jsonl"
    rows = [{"prompt": "fast", "max_tokens": 4}] * 5 + [{"prompt": "http500", "max_tokens": 4}]
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, plots = tmp_path / "result.json", tmp_path / "plots"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pdserve.cli", "bench", "--base-url", f"http://127.0.0.1:{port}",
             "--dataset-name", "trace", "--dataset-path", str(trace), "--request-rate", "20",
             "--slo", "ttft_ms=1000", "tpot_ms=200", "--output", str(out), "--plot", str(plots),
             "--disable-tqdm", "--num-warmups", "0"],
            capture_output=True, text=True, timeout=60)
    finally:
        stop()
    assert proc.returncode == 0, proc.stderr
    assert "Failed requests:                         1" in proc.stdout
    assert "engine exploded" in proc.stdout  # the failure's message is shown, not hidden
    d = json.loads(out.read_text())
    assert d["completed"] == 5 and d["failed"] == 1 and d["model_id"] == "fake-model"
    assert d["good_requests"] == 5 and d["request_goodput"] == pytest.approx(5 / d["duration"])
    for key in ("mean_ttft_ms", "p99_itl_ms", "median_tpot_ms", "ttfts", "itls", "input_lens", "output_lens"):
        assert key in d
    assert len(d["requests"]) == 6 and d["errors"].count("") == 5
    assert d["output_lens"][:5] == [4] * 5
    for name in ("ttft_cdf.png", "itl_cdf.png", "itl_over_time.png", "throughput_over_time.png"):
        assert (plots / name).stat().st_size > 1000


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_compare_starts_each_deployment_in_turn_and_leaves_no_orphans(tmp_path):
    pid_file = tmp_path / "pids"
    # the fake server stands in for `pdserve up`; A also starts a child, as up starts workers,
    # and does not stop it on SIGTERM: compare must still leave nothing behind
    launcher = [sys.executable, os.path.join(HERE, "bench_fake_server.py")]
    deployments = [("A", f"--spawn-child --pid-file {pid_file}"), ("B", "")]
    reqs = [BenchRequest([{"role": "user", "content": k}], 1, 4) for k in ("fast", "slow_first", "stall") * 2]
    results = run_deployments(deployments, reqs, lambda url, rate: RunConfig(url, request_rate=rate, progress=False,
                                                                            num_warmups=0),
                              [10.0, 20.0], {"ttft_ms": 200, "tpot_ms": 50}, str(tmp_path), ready_timeout=30,
                              launcher=launcher)
    server_pid, child_pid = map(int, pid_file.read_text().split())
    deadline = time.time() + 60   # a hang guard; the loop ends as soon as both are gone
    while (_alive(server_pid) or _alive(child_pid)) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(server_pid) and not _alive(child_pid)
    assert set(results) == {"A", "B"} and set(results["A"]) == {"10", "20"}
    for by_rate in results.values():
        for v in by_rate.values():
            s = v["summary"]
            assert s["completed"] == 6 and s["good_requests"] == 2  # only the two "fast" requests
    md = write_report(results, str(tmp_path / "report"), {"ttft_ms": 200, "tpot_ms": 50})
    assert "| rate 10 req/s | A | B |" in md and "| p99 TTFT (ms) |" in md
    for name in ("rate10_ttft_cdf.png", "rate20_itl_cdf.png", "request_goodput_vs_rate.png",
                 "p99_ttft_ms_vs_rate.png"):
        assert (tmp_path / "report" / name).is_file(), name
    assert json.loads((tmp_path / "report" / "compare.json").read_text())["B"]["20"]["completed"] == 6
