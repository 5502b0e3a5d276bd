"""EngineConfig is the one definition of engine settings: every command's engine flags and the
simulator's defaults come from its fields (issue 13)."""
from __future__ import annotations

import argparse
from dataclasses import fields

import pytest

from pdserve.cli import build_parser
from pdserve.config import SIM_FIELDS, EngineConfig

ENV = ("PDSERVE_KV_LEASE", "PDSERVE_STEP_TRACE", "PDSERVE_TP_STEP_TIMEOUT")


@pytest.fixture(autouse=True)
def _no_env_defaults(monkeypatch):
    for k in ENV:
        monkeypatch.delenv(k, raising=False)


def command(name: str) -> argparse.ArgumentParser:
    p = build_parser(name)
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def dests(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """dest -> action of every flag and positional."""
    return {a.dest: a for a in p._actions}


ALL = [f.name for f in fields(EngineConfig)]


@pytest.mark.parametrize("name, missing", [("serve", set()), ("up", {"role"}),
                                           ("generate", {"role", "kv_lease_duration"}),
                                           ("chat", {"role", "kv_lease_duration"}),
                                           ("profile", {"role", "kv_lease_duration"})])
def test_every_engine_field_has_a_flag(name, missing):
    have = dests(command(name))
    assert [k for k in ALL if k not in have] == sorted(missing, key=ALL.index)
    for k in set(ALL) - missing - {"model"}:
        assert have[k].option_strings[0] == "--" + k.replace("_", "-"), k
        assert have[k].help, k


def test_up_gives_the_role_per_pool():
    have = dests(command("up"))
    assert {"prefill", "decode", "colocated"} <= set(have)


@pytest.mark.parametrize("name", ["serve", "up", "generate", "chat", "profile", "sim", "plan"])
def test_flag_defaults_are_engine_config_defaults(name):
    p = command(name)
    required = {"plan": ["--dataset", "x", "--slo", "ttft_ms=1"]}.get(name, [])
    got = vars(p.parse_args(required))
    want = EngineConfig()
    for k in ALL:
        if k in got and not (name in ("sim", "plan") and k not in SIM_FIELDS):
            assert got[k] == getattr(want, k), (name, k)


@pytest.mark.parametrize("name", ["sim", "plan"])
def test_sim_and_plan_have_every_simulated_engine_flag(name):
    have = dests(command(name))
    assert set(SIM_FIELDS) <= set(have)
    assert {"enable_prefix_caching", "enable_chunked_prefill", "max_num_seqs", "block_size"} <= set(SIM_FIELDS)


def test_sim_defaults_equal_engine_config():
    """What `pdserve sim` simulates without flags is what `pdserve serve` runs without flags."""
    from pdserve.sim.cli_sim import engine_defaults
    from pdserve.sim.cluster_config import parse_cluster_config
    from pdserve.sim.simulator import ClusterSim
    args = command("sim").parse_args([])
    assert engine_defaults(args) == EngineConfig()
    cfg = parse_cluster_config({"num_nodes": 1, "link_bw": 16, "link_latency": 1000, "nodes": [{
        "num_instances": 1, "instances": [{"model_name": "meta-llama/Llama-3.1-8B", "hardware": "H100",
                                           "pd_type": None, "tp_size": 1}]}]})
    inst = ClusterSim(cfg).instances[0]
    want = EngineConfig()
    assert inst.bm.enable_prefix_caching is want.enable_prefix_caching
    assert inst.bm.block_size == want.block_size
    sc = inst.sched.config
    assert (sc.max_num_seqs, sc.max_num_batched_tokens, sc.enable_chunked_prefill) == \
        (want.max_num_seqs, want.max_num_batched_tokens, want.enable_chunked_prefill)


def test_sim_flags_reach_the_simulated_engine():
    from pdserve.sim.cli_sim import engine_defaults
    args = command("sim").parse_args(["--no-enable-prefix-caching", "--max-num-seqs", "7", "--dtype", "float32"])
    eng = engine_defaults(args)
    assert (eng.enable_prefix_caching, eng.max_num_seqs, eng.dtype) == (False, 7, "float32")


def test_serve_flags_make_the_engine_config():
    from pdserve.cli.args import engine_config_from_args
    args = command("serve").parse_args(["m", "--role", "prefill", "--kv-lease", "5", "--no-enable-prefix-caching",
                                        "--enforce-eager", "--kv-cache-memory", "64MiB"])
    ec = engine_config_from_args(args)
    assert ec == EngineConfig(model="m", role="prefill", kv_lease_duration=5.0, enable_prefix_caching=False,
                              enforce_eager=True, kv_cache_memory=64 << 20)


def test_env_sets_a_flag_default(monkeypatch):
    monkeypatch.setenv("PDSERVE_KV_LEASE", "2.5")
    assert command("serve").parse_args([]).kv_lease_duration == 2.5


def test_up_passes_every_engine_option_to_serve_as_a_flag():
    """An `engine:` option of `pdserve up` becomes a `pdserve serve` flag that gives it back."""
    from pdserve.cli.args import engine_config_from_args
    from pdserve.launch.cluster import engine_flags
    from pdserve.launch.config import ENGINE_KEYS
    opts = {"device": "cpu", "dtype": "float32", "kv_cache_dtype": "bfloat16", "block_size": 8, "max_model_len": 512, "max_num_seqs": 3,
            "max_num_batched_tokens": 99, "enable_chunked_prefill": False, "enable_prefix_caching": False,
            "kv_cache_memory": 1 << 20, "gpu_memory_utilization": 0.5, "seed": 4, "enforce_eager": True,
            "kv_lease_duration": 1.5, "served_model_name": "x", "step_trace": "/tmp/t.jsonl",
            "tensor_parallel_size": 2, "tp_step_timeout": 7.5, "step_parts": 2}
    assert set(opts) == ENGINE_KEYS
    ec = engine_config_from_args(command("serve").parse_args(engine_flags(opts)))
    assert {k: getattr(ec, k) for k in opts} == opts


def test_scheduler_config_is_the_engine_config_resolved():
    from pdserve.engine.scheduler import SchedulerConfig
    ec = EngineConfig(max_num_seqs=5, role="decode", enable_chunked_prefill=False, max_num_batched_tokens=4096)
    sc = SchedulerConfig.of(ec, 2048)
    assert isinstance(sc, EngineConfig) and sc.max_model_len == 2048
    assert {k: getattr(sc, k) for k in ALL if k != "max_model_len"} == \
        {k: getattr(ec, k) for k in ALL if k != "max_model_len"}
    with pytest.raises(ValueError):
        SchedulerConfig.of(EngineConfig(enable_chunked_prefill=False, max_num_batched_tokens=100), 2048)
