"""Cluster configs in LLMServingSim's shape: seed 003's file runs as written; errors are clear."""
from __future__ import annotations

import copy
import json
import logging

import pytest

from pdserve.sim.cluster_config import parse_cluster_config
from pdserve.sim.runner import simulate
from pdserve.sim.trace import Session, TraceRequest, read_trace

# seed 003, configs/cluster/single_node_pd_instance.json, verbatim
SEED_003 = """{
"num_nodes": 1,
"link_bw": 16,
"link_latency": 20000,
"nodes": [
{
"num_instances": 2,
"cpu_mem": {"mem_size": 512, "mem_bw": 256, "mem_latency": 0},
"instances": [
{
"model_name": "meta-llama/Llama-3.1-8B",
"hardware": "RTXPRO6000",
"npu_mem": {"mem_size": 96, "mem_bw": 1597, "mem_latency": 0},
"pd_type": "prefill",
"tp_size": 1
},
{
"model_name": "meta-llama/Llama-3.1-8B",
"hardware": "RTXPRO6000",
"npu_mem": {"mem_size": 96, "mem_bw": 1597, "mem_latency": 0},
"pd_type": "decode",
"tp_size": 1
}
]
}
]
}"""


def test_seed_003_config_runs_with_log_lines(tmp_path):
    cfg_path = tmp_path / "single_node_pd_instance.json"
    cfg_path.write_text(SEED_003)
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps({"input_toks": 300 + 10 * i, "output_toks": 40,
                                         "arrival_time_ns": i * 100_000_000}) + "\n" for i in range(30)))
    lines = []
    summary, sim = simulate(str(cfg_path), str(trace), log_interval=1.0, csv_path=str(tmp_path / "out.csv"),
                            on_log=lines.append)
    assert summary["completed"] == 30 and summary["failed"] == 0
    assert [i.role for i in sim.instances] == ["prefill", "decode"]
    assert lines and all(l.startswith("[INFO] ") for l in lines)
    for key in ("step=", " P=", " D=", "prompt_t=", "decode_t=", "npu_mem=["):
        assert key in lines[0]
    assert lines[0].count(" GB") == 2   # one memory figure per instance
    rows = (tmp_path / "out.csv").read_text().splitlines()
    assert len(rows) == 31 and rows[0].startswith("instance_id,")


def test_units_follow_llmservingsim():
    c = parse_cluster_config(json.loads(SEED_003))
    assert c.link_bw == 16e9 and c.link_latency == pytest.approx(20e-6)
    assert c.instances[0].mem_size == 96e9 and c.instances[0].mem_bw == 1597e9


def test_unknown_fields_warn(caplog):
    d = json.loads(SEED_003)
    d["nodes"][0]["instances"][0]["placement"] = {"default": {"weights": "npu"}}
    d["fancy_top_level"] = 1
    with caplog.at_level(logging.WARNING, logger="pdserve.sim"):
        parse_cluster_config(d)
    text = caplog.text
    assert "placement" in text and "fancy_top_level" in text and "instances[0]" in text


@pytest.mark.parametrize("path,field", [((), "link_bw"), (("nodes", 0), "num_instances"),
                                        (("nodes", 0, "instances", 1), "model_name"),
                                        (("nodes", 0, "instances", 0), "pd_type")])
def test_missing_required_field_is_a_clear_error(path, field):
    d = json.loads(SEED_003)
    target = d
    for p in path:
        target = target[p]
    del target[field]
    with pytest.raises(ValueError, match=field):
        parse_cluster_config(d)


def test_bad_values_are_errors():
    d = json.loads(SEED_003)
    d["nodes"][0]["instances"][0]["hardware"] = "NoSuchGPU"
    with pytest.raises(ValueError, match="NoSuchGPU"):
        parse_cluster_config(d)
    d = json.loads(SEED_003)
    d["nodes"][0]["instances"][1]["pd_type"] = "prefill"   # no decode instance left
    with pytest.raises(ValueError, match="decode"):
        parse_cluster_config(d)
    d = json.loads(SEED_003)
    d["nodes"][0]["num_instances"] = 3
    with pytest.raises(ValueError, match="num_instances"):
        parse_cluster_config(d)


def test_single_listed_instance_is_replicated():
    d = json.loads(SEED_003)
    inst = copy.deepcopy(d["nodes"][0]["instances"][0])
    inst["pd_type"] = None
    d["num_nodes"] = 2
    d["nodes"] = [{"num_instances": 4, "instances": [inst]}]
    c = parse_cluster_config(d)
    assert len(c.instances) == 8 and {i.role for i in c.instances} == {"both"}


def test_model_that_does_not_fit_is_an_error():
    d = json.loads(SEED_003)
    for inst in d["nodes"][0]["instances"]:
        inst["npu_mem"]["mem_size"] = 8   # 8 GB cannot hold Llama-3.1-8B's 16 GB of weights
    with pytest.raises(ValueError, match="weights"):
        simulate(parse_cluster_config(d), [Session(0.0, [TraceRequest(10, 2)])])


def test_trace_errors_name_the_line(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"input_toks": 5, "output_toks": 2, "arrival_time_ns": 0}\n{"input_toks": 5, "arrival_time_ns": 1}\n')
    with pytest.raises(ValueError, match=r"t.jsonl:2.*output_toks"):
        read_trace(p)
