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


@pytest.mark.slow
def test_tp2_prefill_and_tp1_decode_profiles_simulate_a_mixed_tp_cluster(tmp_path, default_model_dir, caplog):
    """`pdserve profile -tp 2` runs the real ranks and records tp_size 2; a cluster whose TP=2
    prefill instance carries that profile and whose TP=1 decode instance carries a TP=1 one
    simulates without the simulator's tp_size-mismatch warning."""
    import logging
    from tiny_model import make_tiny_model
    model = make_tiny_model(tmp_path / "model", default_model_dir, heads=8, kv_heads=4, hidden=64, layers=2)
    grid = ["--prefill-tokens", "8", "32", "--decode-batches", "1", "2", "--decode-contexts", "16", "32",
            "--mixed-tokens", "--repeats", "1", "--passes", "1"]
    for tp in (2, 1):
        assert cli_main(["profile", model, "-tp", str(tp), "--device", "cpu", "--kv-cache-memory", "16MiB",
                         "--max-model-len", "256", *grid, "--output", str(tmp_path / f"tp{tp}.json")]) == 0
        data = json.loads((tmp_path / f"tp{tp}.json").read_text())
        assert data["tp_size"] == tp and data["model"] == model
        assert [p["tokens"] for p in data["prefill"]] == [8, 32] and len(data["decode"]) == 4
    inst = {"model_name": model, "hardware": "CPU", "npu_mem": {"mem_size": 1}}
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"num_nodes": 1, "link_bw": 4, "link_latency": 0, "nodes": [{"num_instances": 2,
        "instances": [{**inst, "pd_type": "prefill", "tp_size": 2, "profile": "tp2.json"},
                      {**inst, "pd_type": "decode", "tp_size": 1, "profile": "tp1.json"}]}]}))
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"input_toks": 24, "output_toks": 4, "arrival_time_ns": i * 10**8}) + "\n"
                             for i in range(5)))
    out = tmp_path / "s.json"
    with caplog.at_level(logging.WARNING, logger="pdserve.sim"):
        assert cli_main(["sim", "--cluster-config", str(cfg), "--dataset", str(trace), "--quiet",
                         "--summary-json", str(out)]) == 0
    assert not [r for r in caplog.records if "may not apply" in r.getMessage()]
    assert json.loads(out.read_text())["completed"] == 5
    # `pdserve plan --tp-profiles`: each searched TP simulated with its own measured profile
    caplog.clear()
    trace.write_text("".join(json.dumps({"input_toks": 24, "output_toks": 4, "arrival_time_ns": i * 10**8}) + "\n"
                             for i in range(60)))
    with caplog.at_level(logging.WARNING, logger="pdserve.sim"):
        assert cli_main(["plan", "--cluster-config", str(cfg), "--devices", "3", "--dataset", str(trace),
                         "--slo", "ttft_ms=5000", "tpot_ms=5000", "--tp-profiles", str(tmp_path / "tp1.json"),
                         str(tmp_path / "tp2.json"), "--output-dir", str(tmp_path / "plan")]) == 0
    assert not [r for r in caplog.records if "may not apply" in r.getMessage()]
    ranked = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert {(r["p_tp"], r["d_tp"]) for r in ranked if r["n_prefill"]} == {(1, 1), (1, 2), (2, 1)}
    assert all(r["max_rate"] > 0 for r in ranked)
    planned = json.loads((tmp_path / "plan" / "cluster.json").read_text())["nodes"][0]["instances"]
    assert {(i["tp_size"], i["profile"]) for i in planned} <= {(1, str(tmp_path / "tp1.json")),
                                                             (2, str(tmp_path / "tp2.json"))}
    # the check itself: the TP=1 profile on the TP=2 prefill instance is warned about
    cfg.write_text(cfg.read_text().replace("tp2.json", "tp1.json"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pdserve.sim"):
        assert cli_main(["sim", "--cluster-config", str(cfg), "--dataset", str(trace), "--quiet"]) == 0
    assert [r for r in caplog.records if "may not apply" in r.getMessage()]
