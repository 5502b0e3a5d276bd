"""`pdserve up` deployment descriptions: flags, YAML/JSON files, per-role engine options, CPU
pinning, and the command lines they turn into. No processes are started here."""
from __future__ import annotations

import argparse
import json

import pytest

from pdserve.launch import cluster as launch, config as launch_config
from pdserve.cli.args import add_engine_args
from pdserve.launch.config import WorkerSpec, load_deployment, parse_cpus, pin_evenly, place_on_gpus


@pytest.fixture(autouse=True)
def no_gpus(monkeypatch):
    """The same answers on any machine; GPU placement is tested with explicit GPU lists."""
    monkeypatch.setattr("pdserve.launch.config.gpu_ids", lambda: [])


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    launch.add_arguments(p)
    return p.parse_args(list(argv))


def roles(dep):
    return [w.role for w in dep.workers]


def test_defaults_and_counts():
    assert roles(load_deployment(parse())) == ["prefill", "decode"]
    dep = load_deployment(parse("--prefill", "2", "--decode", "3", "--kv-cache-memory", "128MiB"))
    assert roles(dep) == ["prefill"] * 2 + ["decode"] * 3
    assert all(w.engine == {"kv_cache_memory": "128MiB"} for w in dep.workers)   # only flags the user gave
    assert roles(load_deployment(parse("--colocated", "2"))) == ["both", "both"]
    with pytest.raises(ValueError, match="nothing can decode"):
        load_deployment(parse("--decode", "0"))


def test_yaml_per_role_tuning_and_flags_override(tmp_path):
    cfg = tmp_path / "d.yaml"
    cfg.write_text("""
port: 9100
policy: prefix_aware
local_prefill_max_tokens: 64
engine: {kv_cache_memory: 256MiB, max_num_seqs: 32}
prefill: {count: 1, engine: {max_num_batched_tokens: 4096}, cpus: ["0"]}
decode: {count: 2, engine: {max_num_seqs: 128, enable_prefix_caching: false}, cpus: ["1-2", [3]]}
""")
    dep = load_deployment(parse("--config", str(cfg), "--port", "9200", "--max-num-seqs", "8"))
    assert (dep.port, dep.policy, dep.local_prefill_max_tokens) == (9200, "prefix_aware", 64)
    p, d0, d1 = dep.workers
    assert p.engine == {"kv_cache_memory": "256MiB", "max_num_seqs": 8, "max_num_batched_tokens": 4096}
    # role options beat the file's common ones; a command-line flag beats the file's common ones
    assert d0.engine == {"kv_cache_memory": "256MiB", "max_num_seqs": 128, "enable_prefix_caching": False}
    assert (p.cpus, d0.cpus, d1.cpus) == ([0], [1, 2], [3])


def test_json_config_and_errors(tmp_path):
    good = tmp_path / "d.json"
    good.write_text(json.dumps({"prefill": 0, "decode": {"count": 1}, "colocated": 0}))
    assert roles(load_deployment(parse("--config", str(good)))) == ["decode"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"decode": {"count": 1, "engine": {"gpu_memory": 3}}}))
    with pytest.raises(ValueError, match="gpu_memory"):
        load_deployment(parse("--config", str(bad)))
    bad.write_text(json.dumps({"decoders": 2}))
    with pytest.raises(ValueError, match="decoders"):
        load_deployment(parse("--config", str(bad)))
    bad.write_text(json.dumps({"decode": {"count": 2, "cpus": ["0", "1", "2"]}}))
    with pytest.raises(ValueError, match="cpus"):
        load_deployment(parse("--config", str(bad)))


def test_cpu_pinning(monkeypatch):
    assert parse_cpus("0-2,5") == [0, 1, 2, 5] and parse_cpus(3) == [3] and parse_cpus([1, 2]) == [1, 2]
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr("pdserve.launch.config.cgroup_cpu_limit", lambda: None)
    dep = load_deployment(parse("--pin-cpus"))
    assert [w.cpus for w in dep.workers] == [[0, 1], [2, 3]]          # disjoint, even shares
    dep = load_deployment(parse("--pin-cpus", "--prefill", "3", "--decode", "3"))
    assert [w.cpus for w in dep.workers] == [[0], [1], [2], [3], [0], [1]]   # more workers than cores


def test_engine_flags_round_trip_through_the_engine_parser():
    opts = {"max_num_seqs": 8, "kv_cache_memory": "128MiB", "enable_prefix_caching": False,
            "enable_chunked_prefill": False, "enforce_eager": True, "block_size": 32}
    p = argparse.ArgumentParser()
    add_engine_args(p)
    got = vars(p.parse_args(launch.engine_flags(opts)))
    assert {k: got[k] for k in opts} == opts


def test_command_lines(tmp_path):
    dep = load_deployment(parse("--prefill", "1", "--decode", "2", "--api-key", "k", "--kv-transport", "tcp",
                                "--policy", "least_loaded", "--max-num-seqs", "4"))
    c = launch.Cluster(dep, str(tmp_path))
    c.workers = [launch.WorkerProcess(s, 9000 + i, "127.0.0.1") for i, s in enumerate(dep.workers)]
    w = " ".join(c.worker_cmd(c.workers[1]))
    assert "serve --role decode --host 127.0.0.1 --port 9001 --kv-transport tcp --max-num-seqs 4" in w
    assert "--api-key" not in w and c.key_env() == {"PDSERVE_API_KEY": "k"}   # not visible in `ps`
    r = c.router_cmd(8123)
    assert r[1:3] == ["-m", "pdserve.router.cli"]   # the router's own entry: no torch in that process
    s = " ".join(r)
    assert "--prefill 127.0.0.1:9000 --decode 127.0.0.1:9001 --decode 127.0.0.1:9002" in s
    assert "--policy least_loaded" in s and "--api-key" not in s and "--port 8123" in s
    # --colocated: `both` workers, all in the router's decode pool (each prefills locally)
    dep = load_deployment(parse("--colocated", "2"))
    c = launch.Cluster(dep, str(tmp_path))
    c.workers = [launch.WorkerProcess(s, 9000 + i, "127.0.0.1") for i, s in enumerate(dep.workers)]
    assert "serve --role both" in " ".join(c.worker_cmd(c.workers[0]))
    s = " ".join(c.router_cmd(8123))
    assert "--decode 127.0.0.1:9000 --decode 127.0.0.1:9001" in s and "--prefill" not in s


def test_cpu_workers_get_their_own_cores_by_default(tmp_path, monkeypatch):
    """On CPU each worker gets its own cores unless told otherwise; explicit settings win."""
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr("pdserve.launch.config.cgroup_cpu_limit", lambda: None)
    assert [w.cpus for w in load_deployment(parse()).workers] == [[0, 1], [2, 3]]
    assert [w.cpus for w in load_deployment(parse("--no-pin-cpus")).workers] == [None, None]
    cfg = tmp_path / "d.yaml"
    cfg.write_text("pin_cpus: false\nprefill: 1\ndecode: {count: 1, cpus: ['3']}\n")
    assert [w.cpus for w in load_deployment(parse("--config", str(cfg))).workers] == [None, [3]]
    cfg.write_text("prefill: 1\ndecode: {count: 1, cpus: ['3']}\n")        # the rest goes to the other
    assert [w.cpus for w in load_deployment(parse("--config", str(cfg))).workers] == [[0, 1, 2], [3]]
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2})
    assert [w.cpus for w in load_deployment(parse()).workers] == [[0, 1], [2]]   # no core left idle
    # a cgroup quota of 2 cores on 4: the workers share 2 cores' worth, one core each
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr("pdserve.launch.config.cgroup_cpu_limit", lambda: 2.0)
    assert [w.cpus for w in load_deployment(parse()).workers] == [[0], [1]]
    # workers on GPUs are not pinned by default (their CPU threads hardly matter), only when asked
    monkeypatch.setattr("pdserve.launch.config.gpu_ids", lambda: ["0", "1"])
    assert [w.cpus for w in load_deployment(parse()).workers] == [None, None]
    assert [w.cpus for w in load_deployment(parse("--pin-cpus")).workers] == [[0], [1]]


def test_pin_evenly_keeps_explicit_cpus(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr("pdserve.launch.config.cgroup_cpu_limit", lambda: None)
    ws = [WorkerSpec("prefill", cpus=[1]), WorkerSpec("decode")]
    pin_evenly(ws)
    assert [w.cpus for w in ws] == [[1], [0]]


def test_gpu_placement():
    ws = [WorkerSpec("prefill"), WorkerSpec("decode")]
    assert place_on_gpus(ws, ["0", "1"]) is False                    # one GPU each: nothing shared
    assert [w.gpu for w in ws] == ["0", "1"] and all("gpu_memory_utilization" not in w.engine for w in ws)
    ws = [WorkerSpec("prefill"), WorkerSpec("decode"), WorkerSpec("decode")]
    assert place_on_gpus(ws, ["3"]) is True                           # sharers start one by one
    # each sizes its KV as util x total - what is in use: cumulative shares give equal thirds
    assert [w.engine["gpu_memory_utilization"] for w in ws] == [0.3, 0.6, 0.9]
    # restarted while the other two hold their thirds: it may take all that is left
    c = launch.Cluster(launch_config.Deployment(workers=ws), "")
    w = launch.WorkerProcess(ws[0], 9000, "127.0.0.1", name="prefill0")
    assert " --gpu-memory-utilization 0.3" in " ".join(c.worker_cmd(w))
    assert " --gpu-memory-utilization 0.9" in " ".join(c.worker_cmd(w, restart=True))
    ws = [WorkerSpec("prefill", {"kv_cache_memory": "2GiB"}), WorkerSpec("decode", {"kv_cache_memory": "8GiB"}),
          WorkerSpec("decode", {"device": "cpu"})]
    assert place_on_gpus(ws, ["0"]) is False                          # sized by the user; cpu stays cpu
    assert [w.gpu for w in ws] == ["0", "0", None]
    assert place_on_gpus([WorkerSpec("decode")], []) is False
    tp = [WorkerSpec("prefill", {"tensor_parallel_size": 2}), WorkerSpec("decode")]
    assert place_on_gpus(tp, ["0", "1", "2"]) is False and [w.gpu for w in tp] == ["0,1", "2"]   # a GPU per rank
    with pytest.raises(ValueError, match="tensor_parallel_size 4 needs 4 GPUs"):
        place_on_gpus([WorkerSpec("decode", {"tensor_parallel_size": 4})], ["0", "1"])


def test_gpu_worker_env(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(launch, "Proc", lambda cmd, log_path, name, cpus=None, env=None: seen.update(env=env))
    dep = load_deployment(parse("--prefill", "0", "--decode", "1"))
    dep.workers[0].gpu = "2"
    monkeypatch.delenv("PDSERVE_KV_SECRET", raising=False)
    c = launch.Cluster(dep, str(tmp_path))
    c._spawn(launch.WorkerProcess(dep.workers[0], 9000, "127.0.0.1", name="decode0"))
    assert seen["env"] == {"CUDA_VISIBLE_DEVICES": "2", "PDSERVE_KV_SECRET": c.kv_secret}


def test_workers_of_one_deployment_share_a_kv_secret_in_their_environment(tmp_path, monkeypatch):
    """No API key to derive it from: one random secret per deployment, never on argv; with a
    key, the workers derive it from the key (which goes in the environment too)."""
    envs, cmds = [], []
    monkeypatch.setattr(launch, "Proc", lambda cmd, log_path, name, cpus=None, env=None: (envs.append(env),
                                                                                        cmds.append(cmd)))
    monkeypatch.delenv("PDSERVE_KV_SECRET", raising=False)
    dep = load_deployment(parse("--prefill", "1", "--decode", "1"))
    c = launch.Cluster(dep, str(tmp_path))
    for i, spec in enumerate(dep.workers):
        c._spawn(launch.WorkerProcess(spec, 9000 + i, "127.0.0.1", name=f"w{i}"))
    assert envs[0]["PDSERVE_KV_SECRET"] == envs[1]["PDSERVE_KV_SECRET"] == c.kv_secret
    assert len(c.kv_secret) == 32 and launch.Cluster(dep, str(tmp_path)).kv_secret != c.kv_secret
    assert not any(c.kv_secret in " ".join(cmd) for cmd in cmds)
    envs.clear()
    dep = load_deployment(parse("--prefill", "1", "--decode", "1", "--api-key", "k"))
    launch.Cluster(dep, str(tmp_path))._spawn(launch.WorkerProcess(dep.workers[0], 9000, "127.0.0.1", name="w0"))
    assert envs[0] == {"PDSERVE_API_KEY": "k"}
