"""Traces (flat and agentic), `pdserve sim gen`, the CSV and the summary's goodput."""
from __future__ import annotations

import csv
import json
import statistics

import pytest

from pdserve.cli import main as cli_main
from pdserve.sim.cluster_config import parse_cluster_config
from pdserve.config import EngineConfig
from pdserve.sim.runner import simulate
from pdserve.sim.simulator import ClusterSim
from pdserve.sim.trace import Session, TraceRequest, read_trace, write_trace

KV_QWEN3_06B = 114_688   # DESIGN.md


def cluster(pd: bool, link_bw=32):
    inst = {"model_name": "Qwen/Qwen3-0.6B", "hardware": "L40S", "tp_size": 1}
    insts = [dict(inst, pd_type="prefill"), dict(inst, pd_type="decode")] if pd else [dict(inst, pd_type=None)]
    return parse_cluster_config({"num_nodes": 1, "link_bw": link_bw, "link_latency": 0,
                                 "nodes": [{"num_instances": len(insts), "instances": insts}]})


def test_trace_round_trip(tmp_path):
    s = [Session(0.5, [TraceRequest(10, 3, list(range(10)))]),
         Session(1.25, [TraceRequest(100, 7, tool_duration=0.2), TraceRequest(140, 5)], "task-0")]
    write_trace(tmp_path / "t.jsonl", s)
    lines = [json.loads(l) for l in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert lines[0] == {"input_toks": 10, "output_toks": 3, "input_tok_ids": list(range(10)), "arrival_time_ns": 500000000}
    assert lines[1]["sub_requests"][0]["tool_duration_ns"] == 200000000
    back = read_trace(tmp_path / "t.jsonl")
    assert back[1].session_id == "task-0" and back[1].requests[0].tool_duration == pytest.approx(0.2)
    assert back[0].requests[0].input_tok_ids == list(range(10))


def test_agentic_session_waits_for_previous_call_and_its_tool():
    sessions = [Session(0.0, [TraceRequest(300, 20, tool_duration=0.5), TraceRequest(400, 10, tool_duration=1.0),
                              TraceRequest(500, 5)], "s0"),
                Session(0.1, [TraceRequest(200, 8)])]
    sim = ClusterSim(cluster(False))
    recs = []
    sim.run(sessions, recs.append)
    calls = sorted((r for r in recs if r.session.session_id == "s0"), key=lambda r: r.index)
    assert len(calls) == 3
    assert calls[1].arrival == pytest.approx(calls[0].end + 0.5)
    assert calls[2].arrival == pytest.approx(calls[1].end + 1.0)
    assert [len(c.token_times) for c in calls] == [20, 10, 5]


def test_later_session_calls_reuse_the_conversation_prefix():
    """Without token ids in the trace, a session's calls still share their prompt prefix, so
    with prefix caching the decode instance pulls only the new part of a later call."""
    sessions = [Session(0.0, [TraceRequest(320, 4, tool_duration=0.1), TraceRequest(480, 4)], "s")]
    sim = ClusterSim(cluster(True), EngineConfig(enable_prefix_caching=True))
    recs = []
    sim.run(sessions, recs.append)
    first, second = sorted(recs, key=lambda r: r.index)
    assert first.kv_bytes == 320 * KV_QWEN3_06B
    assert second.kv_bytes == (480 - 320) * KV_QWEN3_06B


def test_sim_gen_writes_the_asked_distribution(tmp_path):
    out = tmp_path / "g.jsonl"
    assert cli_main(["sim", "gen", "--output", str(out), "--num-requests", "3000", "--rate", "20",
                     "--input-len", "400", "--output-len", "50", "--seed", "2"]) == 0
    s = read_trace(out)
    assert len(s) == 3000
    gaps = [b.arrival - a.arrival for a, b in zip(s, s[1:])]
    assert statistics.mean(gaps) == pytest.approx(1 / 20, rel=0.1)
    assert statistics.pstdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, abs=0.1)   # Poisson
    assert statistics.mean(r.requests[0].input_toks for r in s) == pytest.approx(400, rel=0.1)
    bursty = tmp_path / "b.jsonl"
    cli_main(["sim", "gen", "--output", str(bursty), "--num-requests", "3000", "--rate", "20", "--burstiness", "0.25"])
    b = read_trace(bursty)
    bg = [y.arrival - x.arrival for x, y in zip(b, b[1:])]
    assert statistics.pstdev(bg) / statistics.mean(bg) > 1.6   # gamma shape 0.25: CV 2


def test_sim_gen_sessions_and_shared_prefixes(tmp_path):
    out = tmp_path / "a.jsonl"
    cli_main(["sim", "gen", "--output", str(out), "--num-requests", "5", "--session-len", "3",
              "--prefix-groups", "2", "--prefix-len", "64", "--input-len", "100"])
    s = read_trace(out)
    assert all(len(x.requests) == 3 and x.session_id for x in s)
    for x in s:
        a, b = x.requests[0].input_tok_ids, x.requests[1].input_tok_ids
        assert b[:len(a)] == a   # the next call carries the conversation so far
    assert len({tuple(x.requests[0].input_tok_ids[:64]) for x in s}) <= 2


def test_csv_rows_and_goodput(tmp_path):
    trace = [Session(i * 0.002, [TraceRequest(200 + 40 * (i % 7), 12 + i % 5)]) for i in range(60)]
    simulate(cluster(True), trace, csv_path=str(tmp_path / "first.csv"))
    first = list(csv.DictReader(open(tmp_path / "first.csv")))
    # SLOs at the medians of a first run, so that they split the workload
    slo = {"ttft_ms": statistics.median(int(r["TTFT"]) for r in first) / 1e6,
           "tpot_ms": statistics.median(int(r["TPOT"]) for r in first) / 1e6}
    summary, _ = simulate(cluster(True), trace, csv_path=str(tmp_path / "o.csv"), slo=slo)
    rows = list(csv.DictReader(open(tmp_path / "o.csv")))
    assert len(rows) == 60 and summary["completed"] == 60
    good = 0
    for r in rows:
        itl = json.loads(r["ITL"])
        assert len(itl) == int(r["output"]) - 1
        # the columns agree with each other: TTFT + every gap = end-to-end latency (ns, rounded)
        assert abs(int(r["TTFT"]) + sum(itl) - int(r["latency"])) <= len(itl) + 1
        assert int(r["arrival"]) + int(r["latency"]) == pytest.approx(int(r["end_time"]), abs=2)
        good += int(r["TTFT"]) <= slo["ttft_ms"] * 1e6 + 1 and int(r["TPOT"]) <= slo["tpot_ms"] * 1e6 + 1
    assert 0 < good < 60, "the SLOs should split this workload"
    assert summary["slo_attainment"] == pytest.approx(good / 60, abs=1 / 60)
    span = max(int(r["end_time"]) for r in rows) / 1e9
    assert summary["request_goodput"] == pytest.approx(good / span, rel=0.05, abs=1 / span)
