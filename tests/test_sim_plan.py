"""`pdserve plan`: the search ranks by simulated goodput per device and writes usable files."""
from __future__ import annotations

import argparse
import json

import pytest

from pdserve.cli import main as cli_main
from pdserve.sim.cluster_config import InstanceSpec, load_cluster_config
from pdserve.sim.hardware import get_hardware
from pdserve.sim.planner import build_cluster, candidates, evaluate, plan
from pdserve.config import EngineConfig
from pdserve.sim.trace import time_scaled
from pdserve.sim.tracegen import GenConfig, generate

pytestmark = pytest.mark.slow  # each plan simulates many candidate clusters: seconds to tens of seconds

SLO = {"ttft_ms": 300.0, "tpot_ms": 30.0}


def template():
    hw = get_hardware("L40S")
    return InstanceSpec("t", "Qwen/Qwen3-0.6B", hw.name, "both", 1, hw.mem_size, hw.mem_bw)


def trace(n=150):
    return generate(GenConfig(num_requests=n, rate=20, input_len=1500, output_len=64, seed=4))


def test_candidates_respect_the_device_budget():
    cands = candidates(4, [1, 2])
    tuples = {(c.n_prefill, c.p_tp, c.n_decode, c.d_tp) for c in cands}
    assert all(c.n_prefill * c.p_tp + c.n_decode * c.d_tp == c.devices <= 4 for c in cands)
    assert tuples >= {(1, 1, 1, 1), (3, 1, 1, 1), (1, 1, 3, 1), (1, 2, 1, 2), (0, 1, 1, 1), (0, 2, 1, 2)}
    # TP per role: a TP=2 prefill beside TP=1 decodes, and the other way round
    assert {(1, 2, 1, 1), (1, 2, 2, 1), (1, 1, 1, 2), (2, 1, 1, 2)} <= tuples
    assert (1, 2, 3, 1) not in tuples and (2, 2, 1, 1) not in tuples   # 5 and 6 devices
    assert (2, 1, 2, 1) not in tuples   # 2 copies of 1P:1D, which stands for it
    assert {c.label for c in cands} >= {"1P tp2 : 2D tp1", "colocated x1 tp2"}
    assert len(tuples) == len(cands)


def test_cluster_and_up_file_carry_each_roles_tp(tmp_path):
    from pdserve.sim.planner import Candidate, up_config
    cand = Candidate(1, 2, 3, 1)
    c = build_cluster(template(), cand, 16e9, 20e-6, replicas=2)
    assert [(i.role, i.tp_size) for i in c.instances] == [("prefill", 2), ("decode", 1), ("decode", 1),
                                                         ("decode", 1)] * 2
    assert cand.devices == 5 and sum(i.tp_size for i in c.instances) == 10
    (tmp_path / "up.yaml").write_text(up_config("Qwen/Qwen3-0.6B", cand, 2, EngineConfig()))
    launch_config = pytest.importorskip("pdserve.launch.config")
    dep = launch_config.load_deployment(argparse.Namespace(config=str(tmp_path / "up.yaml")))
    tps = [(w.role, w.engine["tensor_parallel_size"]) for w in dep.workers]
    assert tps == [("prefill", 2)] * 2 + [("decode", 1)] * 6
    colo = Candidate(0, 4, 1, 4)
    (tmp_path / "colo.yaml").write_text(up_config("Qwen/Qwen3-0.6B", colo, 2, EngineConfig()))
    dep = launch_config.load_deployment(argparse.Namespace(config=str(tmp_path / "colo.yaml")))
    assert [(w.role, w.engine["tensor_parallel_size"]) for w in dep.workers] == [("both", 4)] * 2


def test_plan_finds_the_highest_rate_meeting_the_slo():
    sessions = trace()
    results = plan(template(), 3, sessions, SLO, 0.9, tp_sizes=[1], progress=False)
    per_dev = [r.per_device for r in results]
    assert per_dev == sorted(per_dev, reverse=True)
    best = results[0]
    assert best.rate > 0
    # re-simulate the winner: at its rate it meets the SLOs and keeps up with arrivals (requests
    # leave as fast as they come); at 1.3x the rate one of the two fails
    cluster = build_cluster(template(), best.cand, 16e9, 20e-6)
    base = len(sessions) / (sessions[-1].arrival - sessions[0].arrival)

    def holds(rate):
        att, s = evaluate(cluster, time_scaled(sessions, rate / base), SLO, EngineConfig(), None, "round_robin")
        return att >= 0.9 and s["completion_rate"] >= 0.9 * rate

    assert holds(best.rate)
    assert not holds(1.3 * best.rate)


@pytest.mark.parametrize("input_len,output_len,more", [(3000, 4, "prefill"), (100, 400, "decode")])
def test_plan_gives_more_instances_to_the_bottleneck_phase(input_len, output_len, more):
    sessions = generate(GenConfig(num_requests=200, rate=20, input_len=input_len, output_len=output_len,
                                  len_dist="fixed", seed=5))
    slo = {"ttft_ms": 1000.0, "tpot_ms": 100.0}
    # a fast link, so that the hand-off is not what limits the long-prompt case
    results = plan(template(), 3, sessions, slo, 0.9, tp_sizes=[1], link_bw=400e9, progress=False)
    best = next(r for r in results if r.cand.n_prefill)    # best disaggregated unit
    if more == "prefill":
        assert best.cand.n_prefill > best.cand.n_decode
    else:
        assert best.cand.n_decode > best.cand.n_prefill


def test_plan_gives_a_compute_bound_prefill_more_tp_than_its_decode():
    """Long prompts under a TTFT SLO that one H100 cannot prefill in (5000 tokens of an 8B
    model: about 130 ms) but two can; few output tokens, far inside the TPOT SLO on one. Only
    TP=2 prefill instances meet the SLO, and the unit that spends no second device on each
    decode instance serves the most per device."""
    hw = get_hardware("H100")
    spec = InstanceSpec("t", "meta-llama/Llama-3.1-8B", hw.name, "both", 1, hw.mem_size, hw.mem_bw)
    sessions = generate(GenConfig(num_requests=100, rate=20, input_len=5000, output_len=32, len_dist="fixed", seed=5))
    results = plan(spec, 4, sessions, {"ttft_ms": 100.0, "tpot_ms": 50.0}, 0.9, tp_sizes=[1, 2], link_bw=400e9,
                   progress=False)
    disagg = [r for r in results if r.cand.n_prefill]
    assert {(r.cand.p_tp, r.cand.d_tp) for r in disagg} == {(1, 1), (1, 2), (2, 1), (2, 2)}
    assert all(r.rate == 0 for r in disagg if r.cand.p_tp == 1)   # TP=1 prefill misses the TTFT SLO
    best = disagg[0]
    assert (best.cand.n_prefill, best.cand.p_tp, best.cand.n_decode, best.cand.d_tp) == (1, 2, 1, 1)
    assert best.rate > 0 and best.per_device > max(r.per_device for r in disagg if r.cand.p_tp == r.cand.d_tp)


def test_plan_cli_writes_cluster_config_up_file_and_plot(tmp_path):
    from pdserve.sim.trace import write_trace
    write_trace(tmp_path / "t.jsonl", trace(100))
    out = tmp_path / "plan"
    rc = cli_main(["plan", "--devices", "2", "--hardware", "L40S", "--model", "Qwen/Qwen3-0.6B",
                   "--dataset", str(tmp_path / "t.jsonl"), "--slo", "ttft_ms=300", "tpot_ms=30",
                   "--tp-sizes", "1", "--output-dir", str(out)])
    assert rc == 0
    c = load_cluster_config(out / "cluster.json")
    assert sum(i.tp_size for i in c.instances) <= 2
    ranked = json.loads((out / "plan.json").read_text())
    assert ranked[0]["per_device"] == max(r["per_device"] for r in ranked)
    assert (out / "goodput_vs_ratio.png").read_bytes()[:4] == b"\x89PNG"
    up = (out / "up.yaml").read_text()
    launch_config = pytest.importorskip("pdserve.launch.config")
    dep = launch_config.load_deployment(argparse.Namespace(config=str(out / "up.yaml")))
    roles = sorted((w.role, w.engine["tensor_parallel_size"]) for w in dep.workers)
    assert roles == sorted((i.role, i.tp_size) for i in c.instances)
    assert {"p_tp", "d_tp"} <= set(ranked[0]) and "Qwen/Qwen3-0.6B" in up
