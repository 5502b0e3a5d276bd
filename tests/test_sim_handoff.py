"""The real P->D path's costs beyond engine steps, as the simulator models them: the measured
fixed costs a profile carries (`pd_overhead`), and no wait for the prefill worker's next step."""
from __future__ import annotations

import pytest

from pdserve.sim.simulator import ClusterSim
from pdserve.sim.trace import Session, TraceRequest
from tests.test_sim_pd import pd_config

LINK_LATENCY_S = 20e-6   # pd_config's default, 20000 ns


def profile(pd_overhead=None) -> dict:
    prof = {"model": "meta-llama/Llama-3.1-8B", "tp_size": 1,
            "prefill": [{"tokens": 16, "time_s": 0.01}, {"tokens": 2048, "time_s": 1.0}],
            "decode": [{"batch": b, "context": c, "time_s": 0.02 * b} for b in (1, 2) for c in (64, 2048)]}
    if pd_overhead is not None:
        prof["pd_overhead"] = pd_overhead
    return prof


def run(sessions, prof):
    sim = ClusterSim(pd_config(), profile=prof)
    recs = []
    sim.run(sessions, recs.append)
    return {r.request_id: r for r in recs}


def test_measured_pd_overhead_delays_first_token_and_handoff():
    one = [Session(0.0, [TraceRequest(500, 4)])]
    base = run(one, profile())["r0"]
    cost = run(one, profile({"prefill_s": 0.05, "handoff_s": 0.2}))["r0"]
    # the first token reaches the client prefill_s later; the router calls D only then
    assert cost.token_times[0] - base.token_times[0] == pytest.approx(0.05, abs=1e-9)
    # the hand-off's floor latency is the measured one, which replaces the smaller link latency
    assert cost.token_times[1] - base.token_times[1] == pytest.approx(0.05 + 0.2 - LINK_LATENCY_S, abs=1e-9)
    assert cost.end - base.end == pytest.approx(0.05 + 0.2 - LINK_LATENCY_S, abs=1e-9)


def test_link_latency_larger_than_measured_handoff_still_applies():
    one = [Session(0.0, [TraceRequest(500, 4)])]
    base = run(one, profile())["r0"]
    cost = run(one, profile({"prefill_s": 0.0, "handoff_s": LINK_LATENCY_S / 2}))["r0"]
    assert cost.token_times == pytest.approx(base.token_times, abs=1e-12)


def test_prefill_export_and_pull_do_not_wait_for_the_step_started_meanwhile():
    """A second prompt waits while the first is computed; P starts it as the first ends. The
    first's token and hand-off go out at once, while P computes the second."""
    alone = run([Session(0.0, [TraceRequest(1000, 4)])], profile())["r0"]
    step = alone.token_times[0]
    both = run([Session(0.0, [TraceRequest(1000, 4)]), Session(1e-6, [TraceRequest(1000, 4)])], profile())
    assert both["r0"].token_times[0] == pytest.approx(step, rel=1e-9)
    assert both["r1"].token_times[0] == pytest.approx(2 * step, rel=1e-9)
    assert both["r0"].kv_start == pytest.approx(step, rel=1e-9)
    assert both["r0"].token_times[1:] == pytest.approx(alone.token_times[1:], rel=1e-9)


def test_pd_calibration_uses_the_profiles_own_prefill_points():
    from pdserve.profile.pd_calibration import pd_lengths
    prof = {"prefill": [{"tokens": n, "time_s": 0.1} for n in (16, 64, 256, 512, 1024)]}
    assert pd_lengths(prof) == [64, 256, 512]
    assert pd_lengths({"prefill": [{"tokens": 16, "time_s": 0.1}]}) == [16]


def test_an_instance_profile_overrides_the_run_wide_one(tmp_path):
    """A decode instance measured slower (its own PROFILE.json in the cluster config, a path
    relative to the config file) decodes slower; the prefill instance keeps the run-wide profile."""
    import json
    from pdserve.sim.cluster_config import load_cluster_config
    slow = profile()
    slow["decode"] = [dict(d, time_s=d["time_s"] * 3) for d in slow["decode"]]
    (tmp_path / "slow_decode.json").write_text(json.dumps(slow))
    cfg = json.loads(json.dumps(pd_config().to_json()))
    cfg["nodes"][0]["instances"][1]["profile"] = "slow_decode.json"
    (tmp_path / "cluster.json").write_text(json.dumps(cfg))
    cluster = load_cluster_config(tmp_path / "cluster.json")
    assert cluster.instances[1].profile == str(tmp_path / "slow_decode.json") and cluster.to_json()["nodes"][0][
        "instances"][1]["profile"] == str(tmp_path / "slow_decode.json")
    one = [Session(0.0, [TraceRequest(500, 6)])]
    base = run(one, profile())["r0"]
    sim = ClusterSim(cluster, profile=profile())
    recs = []
    sim.run(one, recs.append)
    mixed = recs[0]
    assert mixed.token_times[0] == pytest.approx(base.token_times[0], rel=1e-9)   # prefill: run-wide profile
    gaps = lambda r: [b - a for a, b in zip(r.token_times[1:], r.token_times[2:])]   # noqa: E731
    assert gaps(mixed) == pytest.approx([3 * g for g in gaps(base)], rel=1e-6)


def test_a_bad_instance_profile_is_a_clear_error():
    from pdserve.sim.cluster_config import parse_cluster_config
    cfg = pd_config().to_json()
    cfg["nodes"][0]["instances"][0]["profile"] = 42
    with pytest.raises(ValueError, match="profile must be a path"):
        parse_cluster_config(cfg)
