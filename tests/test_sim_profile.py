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
                     "--repeats", "1", "--passes", "1", "--output", str(prof)]) == 0
    data = json.loads(prof.read_text())
    assert data["model"].endswith("SmolLM2-135M-Instruct") and data["device"] == "cpu"
    assert [p["tokens"] for p in data["prefill"]] == [8, 64]
    assert {(d["batch"], d["context"]) for d in data["decode"]} == {(1, 16), (3, 16), (1, 48), (3, 48)}
    assert all(p["time_s"] > 0 for p in data["prefill"] + data["decode"])
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
    assert s["ttft_ms"]["p50"] / 1e3 >= min(p["time_s"] for p in data["prefill"])
