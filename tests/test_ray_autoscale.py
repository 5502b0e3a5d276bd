"""A decode autoscaling rule on a real Ray cluster (test_ray_cluster's raylets): a burst of
streamed requests queues on the one decode worker (max_num_seqs 1) so the rule adds one; once
the burst is over it drains and removes it again; no request dropped, nothing left running."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading

import pytest

from test_ray_cluster import ENGINE, cluster, load, ray, status, wait_for  # noqa: F401  (cluster: a fixture)

from pdserve.procs import pdserve_command

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

CONFIG = """
ray: {drain_timeout: 300}
local_prefill_max_tokens: 0
prefill: {count: 1, ray_resources: {prefill_node: 1}}
decode:
  count: 1
  ray_resources: {decode_node: 1}
  engine: {max_num_seqs: 1}
  autoscale: {min: 1, max: 2, metric: waiting, target: 0.5, up_after_s: 1, down_after_s: 2}
"""


def test_decode_rule_adds_a_worker_under_a_burst_and_removes_it_after(cluster, tmp_path):
    c, _ = cluster
    cfg = tmp_path / "deploy.yaml"
    cfg.write_text(CONFIG)
    proc = subprocess.Popen(pdserve_command("up", "--ray", c.address, "--config", cfg, "--port", "0",
                                            "--log-dir", tmp_path, "--startup-timeout", "600", *ENGINE),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    threading.Thread(target=lambda: [lines.append(l) for l in proc.stdout], daemon=True).start()
    results, done, threads = [], threading.Event(), []
    try:
        wait_for(lambda: any(l.startswith("Ctrl+C") for l in lines) or proc.poll() is not None, "up", 600)
        assert proc.poll() is None, "".join(lines)
        router = re.search(r"pdserve is up: (\S+)/v1", "".join(lines)).group(1)
        actors = lambda: sorted(i["ray_actor"] for i in status(router)["decode_instances"])  # noqa: E731
        assert actors() == ["pdserve-decode-0"]
        threads, _ = load(router, 4, results, done, tokens=32)
        wait_for(lambda: actors() == ["pdserve-decode-0", "pdserve-decode-1"]
                 and all(i["healthy"] for i in status(router)["decode_instances"]), "a decode worker added",
                 lines=lines)
        assert any(re.search(r"autoscale decode 1 -> 2 \(mean waiting .* > target 0.5", l) for l in lines), lines
        done.set()
        for t in threads:
            t.join(300)
        wait_for(lambda: any("removed pdserve-decode-1" in l for l in lines), "the added worker removed "
                 "after the burst", lines=lines)
        assert actors() == ["pdserve-decode-0"]
        assert any("autoscale decode 2 -> 1" in l for l in lines), lines
        with pytest.raises(ValueError):
            ray.get_actor("pdserve-decode-1", namespace="pdserve")
    finally:
        done.set()
        for t in threads:
            t.join(300)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(120)
        print("".join(lines))
    assert not any(t.is_alive() for t in threads), "a request hung"
    assert results and all(r[0] == "ok" for r in results), [r for r in results if r[0] != "ok"]
    assert not [n for n in ray.util.list_named_actors(all_namespaces=True) if "pdserve" in str(n)]
