"""Performance models against physics and published model sizes, not against their own code."""
from __future__ import annotations

import json

import pytest

from pdserve.sim.hardware import get_hardware
from pdserve.sim.models import get_model
from pdserve.sim.perf import AnalyticalPerf, ProfilePerf


def prefill(perf, n):
    return perf.step_time(n, n * (n + 1) // 2, n, 0, 0, 1)


def decode(perf, batch, ctx):
    return perf.step_time(0, 0, 0, batch, batch * ctx, batch)


@pytest.mark.parametrize("name,params", [("meta-llama/Llama-3.1-8B", 8.03e9), ("Qwen/Qwen3-0.6B", 0.596e9),
                                         ("HuggingFaceTB/SmolLM2-135M-Instruct", 134.5e6),
                                         ("meta-llama/Llama-3.1-70B", 70.6e9)])
def test_parameter_counts_match_published_sizes(name, params):
    assert get_model(name).num_params == pytest.approx(params, rel=0.02)


def test_kv_bytes_per_token_as_design_doc():
    assert get_model("Qwen/Qwen3-0.6B").kv_bytes_per_token(2) == 114_688
    assert get_model("meta-llama/Llama-3.1-8B").kv_bytes_per_token(2) == 131_072


def test_model_lookup_by_variant_name_and_local_dir(tmp_path):
    assert get_model("meta-llama/Llama-3.1-8B-Instruct").num_layers == 32
    (tmp_path / "config.json").write_text(json.dumps({
        "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 1000, "tie_word_embeddings": True}))
    m = get_model(str(tmp_path))
    assert (m.num_layers, m.head_dim, m.num_kv_heads) == (2, 16, 2)
    with pytest.raises(ValueError, match="unknown model"):
        get_model("nobody/NoSuchModel-3B")


def test_decode_is_memory_bound_prefill_compute_bound():
    m, hw = get_model("meta-llama/Llama-3.1-8B"), get_hardware("H100")
    perf = AnalyticalPerf(m, hw)
    weight_floor = 8.03e9 * 2 / 3.35e12          # read every weight once at peak bandwidth
    t1 = decode(perf, 1, 512)
    assert weight_floor < t1 < 3 * weight_floor
    assert decode(perf, 64, 512) < 1.5 * t1       # batching decode is nearly free
    flop_floor = 2 * 8.03e9 * 8192 / 989e12       # every token through every weight at peak FLOP/s
    t8k = prefill(perf, 8192)
    assert flop_floor < t8k < 3 * flop_floor
    assert 1.9 < t8k / prefill(perf, 4096) < 2.4  # linear plus a little quadratic attention


def test_tensor_parallel_and_hardware_scale_sensibly():
    m = get_model("meta-llama/Llama-3.1-8B")
    h100, h200, a100 = (get_hardware(n) for n in ("H100", "H200", "A100"))
    tp1, tp2 = AnalyticalPerf(m, h100, 1), AnalyticalPerf(m, h100, 2)
    assert 0.5 < prefill(tp2, 4096) / prefill(tp1, 4096) < 0.65
    assert decode(tp2, 8, 1024) < decode(tp1, 8, 1024)
    assert decode(AnalyticalPerf(m, h200), 8, 1024) < decode(tp1, 8, 1024)          # more bandwidth
    assert prefill(AnalyticalPerf(m, a100), 4096) > 2.5 * prefill(tp1, 4096)       # ~3x fewer FLOP/s
    # the config's npu_mem.mem_bw overrides the table
    slow = AnalyticalPerf(m, h100, mem_bw=h100.mem_bw / 2)
    assert decode(slow, 1, 128) > 1.7 * decode(tp1, 1, 128)


PROFILE = {"prefill": [{"tokens": 16, "time_s": 0.05}, {"tokens": 256, "time_s": 0.5}, {"tokens": 1024, "time_s": 2.0}],
           "decode": [{"batch": b, "context": c, "time_s": 0.04 + 0.01 * b + 0.00001 * b * c}
                      for b in (1, 4, 16) for c in (64, 512)]}


def test_profile_interpolates_between_measurements():
    p = ProfilePerf(PROFILE)
    assert prefill(p, 256) == pytest.approx(0.5)
    assert prefill(p, 640) == pytest.approx((0.5 + 2.0) / 2)
    assert decode(p, 4, 512) == pytest.approx(0.04 + 0.04 + 0.00001 * 4 * 512)
    # between grid points the measured (bilinear here) surface is reproduced exactly
    assert decode(p, 10, 288) == pytest.approx(0.04 + 0.1 + 0.00001 * 10 * 288, rel=0.05)
    # a mixed step costs the decode step plus the prefill's marginal cost beyond the fixed part
    intercept = 0.05 - (0.5 - 0.05) / (256 - 16) * 16
    mixed = p.step_time(256, 0, 256, 4, 4 * 512, 5)
    assert mixed == pytest.approx(decode(p, 4, 512) + 0.5 - intercept)


def test_measured_mixed_steps_set_what_prefill_and_decode_share():
    p = ProfilePerf(PROFILE)
    shared = 0.03   # the mixed steps below cost prefill + decode - 30 ms, give or take noise
    noise = [0.004, -0.002, 0.0, 0.05]
    pts = [(64, 4, 256), (256, 4, 256), (256, 16, 512), (1024, 1, 64)]
    mixed = [{"tokens": n, "batch": b, "context": c, "time_s": prefill(p, n) + decode(p, b, c) - shared + e}
             for (n, b, c), e in zip(pts, noise)]
    q = ProfilePerf({**PROFILE, "mixed": mixed})
    assert q.overlap == pytest.approx(shared - 0.002)   # the median, not thrown by the outlier
    assert q.step_time(128, 0, 128, 8, 8 * 300, 9) == pytest.approx(prefill(p, 128) + decode(p, 8, 300) - q.overlap)
    # without mixed points the prefill curve's intercept stands in
    assert p.overlap == pytest.approx(0.05 - (0.5 - 0.05) / (256 - 16) * 16)


def test_incomplete_profile_grid_is_an_error():
    bad = {"prefill": PROFILE["prefill"], "decode": PROFILE["decode"][:-1]}
    with pytest.raises(ValueError, match="incomplete"):
        ProfilePerf(bad)


def test_noisy_profile_is_made_monotone():
    noisy = {"prefill": [{"tokens": 16, "time_s": 0.3}, {"tokens": 64, "time_s": 0.2}, {"tokens": 256, "time_s": 0.8}],
             "decode": [{"batch": 1, "context": 64, "time_s": 0.10}, {"batch": 4, "context": 64, "time_s": 0.08},
                        {"batch": 1, "context": 512, "time_s": 0.09}, {"batch": 4, "context": 512, "time_s": 0.2}]}
    p = ProfilePerf(noisy)
    xs = [8, 16, 40, 64, 128, 256, 400]
    ts = [p.prefill_time(x) for x in xs]
    assert ts == sorted(ts)
    for b in (1, 2, 4):
        assert p.decode_time(b, 512) >= p.decode_time(b, 64)
    for c in (64, 300, 512):
        assert p.decode_time(4, c) >= p.decode_time(1, c)
    # a mixed step never costs less than its prefill alone
    assert p.step_time(40, 0, 40, 1, 64, 2) >= p.prefill_time(40)
