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
    from pdserve.sim.pd_calibration import pd_lengths
    prof = {"prefill": [{"tokens": n, "time_s": 0.1} for n in (16, 64, 256, 512, 1024)]}
    assert pd_lengths(prof) == [64, 256, 512]
    assert pd_lengths({"prefill": [{"tokens": 16, "time_s": 0.1}]}) == [16]
