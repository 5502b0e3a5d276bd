"""What long commands say before (or while) they run: cost estimates, and log lines that keep
clear of the progress bar."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from pdserve.bench.compare import cost_message
from pdserve.bench.workloads import BenchRequest
from pdserve.sim.planner import cost_hint

CONFIG = os.path.join(os.path.dirname(__file__), "..", "pdserve", "sim", "configs", "single_node_pd_instance.json")


def reqs(n: int, out: int = 8) -> list[BenchRequest]:
    return [BenchRequest([{"role": "user", "content": "x"}], 1, out) for _ in range(n)]


def test_compare_says_what_it_will_send_and_the_least_time():
    msg = cost_message({0.5: reqs(10), 2.0: reqs(20)}, n_deployments=2)
    assert "60 requests" in msg and "2 deployments x 2 rate(s)" in msg
    assert "up to 480 output tokens" in msg                  # 60 x 8
    assert "at least 1.0 min" in msg                          # (10/0.5 + 20/2) s x 2 deployments = 60 s
    assert "--num-prompts" in msg
    unpaced = cost_message({None: reqs(5)}, 2)                 # all at once: no floor to give
    assert "10 requests" in unpaced and "at least" not in unpaced


def test_plan_hint_only_when_it_costs_minutes():
    assert cost_hint(first_s=2.0, n_configs=10, n_requests=1000) is None
    hint = cost_hint(first_s=30.0, n_configs=10, n_requests=1000)
    assert "about 5 min" in hint and "--num-requests 200" in hint and "about 1.0 min" in hint
    assert "--num-requests" not in cost_hint(first_s=30.0, n_configs=10, n_requests=150)


@pytest.mark.slow  # starts a process
def test_sim_warnings_do_not_run_into_the_progress_bar(tmp_path):
    trace, profile = tmp_path / "t.jsonl", tmp_path / "p.json"
    run = [sys.executable, "-m", "pdserve.cli"]
    subprocess.run(run + ["sim", "gen", "--output", str(trace), "--num-requests", "50"], check=True,
                   capture_output=True)
    # a profile of another model: the simulator warns while building instances, the bar already drawn
    profile.write_text(json.dumps({"model": "someone/else", "prefill": [{"tokens": 16, "time_s": 0.01},
                                                                         {"tokens": 1024, "time_s": 0.2}],
                                   "decode": [{"batch": b, "context": c, "time_s": 0.01 + 0.001 * b}
                                              for b in (1, 64) for c in (64, 4096)]}))
    out = subprocess.run(run + ["sim", "--cluster-config", CONFIG, "--dataset", str(trace), "--profile",
                                str(profile), "--log-interval", "0"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    err = out.stderr
    assert "simulating" in err
    i = err.index("may not apply")
    line_start = max(err.rfind("\n", 0, i), err.rfind("\r", 0, i)) + 1
    # the warning's line holds the warning alone (the bar is cleared first), not the bar's text before it
    assert re.fullmatch(r"[\d\- :,]*WARNING pdserve[\w.]*: instance .*", err[line_start:i]), err[line_start:i + 20]
