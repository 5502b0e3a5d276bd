"""`pdserve profile` measures the real engine, and `pdserve sim --profile` runs on the result."""
from __future__ import annotations

import json

import pytest

from pdserve.cli import main as cli_main
from pdserve.sim.perf import ProfilePerf


@pytest.mark.slow
def test_profile_the_default_model_then_simulate_with_it(tmp_path):
    prof = tmp_path / "PROFILE.json"
    assert cli_main(["profile", "--device", "cpu", "--kv-cache-memory", "64MiB", "--max-model-len", "512",
                     "--prefill-tokens", "8", "64", "--decode-batches", "1", "3", "--decode-contexts", "16", "48",
                     "--mixed-tokens", "24", "--mixed-batches", "2", "--repeats", "1", "--passes", "1", "--output", str(prof)]) == 0
    data = json.loads(prof.read_text())
    assert data["model"].endswith("SmolLM2-135M-Instruct") and data["device"] == "cpu"
    assert [p["tokens"] for p in data["prefill"]] == [8, 64]
    assert {(d["batch"], d["context"]) for d in data["decode"]} == {(1, 16), (3, 16), (1, 48), (3, 48)}
    assert [(m["tokens"], m["batch"]) for m in data["mixed"]] == [(24, 2)] and data["mixed"][0]["context"] > 0
    assert all(p["time_s"] > 0 for p in data["prefill"] + data["decode"] + data["mixed"])
    perf = ProfilePerf(data)
    assert perf.step_time(8, 36, 8, 0, 0, 1) == pytest.approx(data["prefill"][0]["time_s"])
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"num_nodes": 1, "link_bw": 4, "link_latency": 0, "nodes": [{"num_instances": 1,
        "instances": [{"model_name": "HuggingFaceTB/SmolLM2-135M-Instruct", "hardware": "CPU", "pd_type": None,
                       "tp_size": 1, "npu_mem": {"mem_size": 2}}]}]}))
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"input_toks": 40, "output_toks": 4, "arrival_time_ns": i * 10**8}) + "\n"
                             for i in range(5)))
    out = tmp_path / "s.json"
    assert cli_main(["sim", "--cluster-config", str(cfg), "--dataset", str(trace), "--profile", str(prof),
                     "--dtype", "float32", "--quiet", "--summary-json", str(out)]) == 0
    s = json.loads(out.read_text())
    assert s["completed"] == 5
    # a lone request's TTFT cannot be shorter than the measured prefill of its 40 tokens
    assert s["p50_ttft_ms"] / 1e3 >= min(p["time_s"] for p in data["prefill"])


@pytest.mark.slow
def test_serve_calibration_streams_from_a_real_worker():
    """--serve-calibration starts one worker on 127.0.0.1, streams from it and fits a line
    through (batch, served step - engine step)."""
    from pdserve.profile.serve_calibration import calibrate
    cal = calibrate(["--device", "cpu", "--kv-cache-memory", "64MiB", "--max-model-len", "256"], [1, 3], 24,
                    lambda b, c: 0.0, vocab=49152, max_tokens=12)
    served = {p["batch"]: p["served_step_s"] for p in cal["points"]}
    assert set(served) == {1, 3} and all(0 < t < 30 for t in served.values())
    slope = (served[3] - served[1]) / 2
    if slope >= 0 and served[1] - slope >= 0:   # nothing clamped: the line goes through both points
        assert cal["per_seq_s"] == pytest.approx(slope)
        assert cal["per_step_s"] + cal["per_seq_s"] == pytest.approx(served[1])
    assert cal["per_step_s"] >= 0 and cal["per_seq_s"] >= 0
