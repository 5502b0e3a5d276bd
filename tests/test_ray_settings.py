"""The Ray keys of a deployment file are split off; the rest is read by launch.config exactly
as `pdserve up` reads it (same flags, same file), and what is wrong is refused by name."""
from __future__ import annotations

import argparse

import pytest

from pdserve.launch.cluster import add_arguments
from pdserve.launch.config import load_deployment
from pdserve.ray_cluster.settings import load


def args_for(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


PLAIN = """
local_prefill_max_tokens: 32
engine: {kv_cache_memory: 64MiB}
prefill: {count: 2, engine: {max_num_batched_tokens: 1024}}
decode: {count: 1, engine: {max_num_seqs: 8}}
"""
WITH_RAY = """
ray: {namespace: mine, max_restarts: 3, scheduling_strategy: DEFAULT}
local_prefill_max_tokens: 32
engine: {kv_cache_memory: 64MiB}
prefill: {count: 2, engine: {max_num_batched_tokens: 1024}, ray_resources: {prefill_node: 1}, ray_num_cpus: 2}
decode: {count: 1, engine: {max_num_seqs: 8}, ray_num_gpus: 0}
"""


def test_same_deployment_as_without_the_ray_keys(tmp_path):
    plain, ray_ = tmp_path / "plain.yaml", tmp_path / "ray.yaml"
    plain.write_text(PLAIN)
    ray_.write_text(WITH_RAY)
    want = load_deployment(args_for("--config", str(plain), "--decode", "3", "--ray", "auto"))
    dep, s = load(args_for("--config", str(ray_), "--decode", "3", "--ray", "auto"))
    assert [(w.role, w.engine) for w in dep.workers] == [(w.role, w.engine) for w in want.workers]
    assert dep.local_prefill_max_tokens == 32 and len(dep.workers) == 5
    assert (s.namespace, s.max_restarts, s.scheduling_strategy) == ("mine", 3, "DEFAULT")
    assert s.roles["prefill"].resources == {"prefill_node": 1} and s.roles["prefill"].num_cpus == 2.0
    assert s.roles["decode"].num_gpus == 0.0 and s.roles["decode"].num_gpus is not None
    assert s.roles["decode"].resources == {} and s.roles["decode"].num_cpus == 1.0


@pytest.mark.parametrize("text, word", [
    ("ray: {max_restart: 1}\ndecode: 1\n", "max_restart"),
    ("ray: {scheduling_strategy: STRICT_PACK}\ndecode: 1\n", "scheduling_strategy"),
    ("decode: {count: 1, ray_resources: [a]}\n", "ray_resources"),
    ("decode: {count: 1, ray_cpus: 1}\n", "ray_cpus"),   # a typo reaches launch.config, which names it
    ("decode: {count: 1, autoscale: {min: 1, max: 3, metric: waiting, target: 4, up_after: 1}}\n", "up_after"),
    ("decode: {count: 1, autoscale: {min: 1, max: 3, metric: queue, target: 4}}\n", "metric"),
    ("decode: {count: 1, autoscale: {min: 1, max: 3, metric: waiting}}\n", "target"),
    ("decode: {count: 1, autoscale: {min: 3, max: 2, metric: waiting, target: 4}}\n", "min"),
    ("decode: {count: 1, autoscale: {min: 1, max: 3, metric: waiting, target: 0}}\n", "target"),
    ("decode: {count: 1, autoscale: {min: 1, max: 3, metric: waiting, target: 4, down_after_s: -1}}\n",
     "down_after_s"),
    ("decode: {count: 1, autoscale: 3}\n", "decode.autoscale"),
    ("decode: {count: 5, autoscale: {min: 1, max: 3, metric: waiting, target: 4}}\n", "decode.autoscale"),
    ("colocated: {count: 1, autoscale: {min: 2, max: 3, metric: running, target: 4}}\n", "colocated.autoscale"),
])
def test_mistakes_refused_by_name(tmp_path, text, word):
    f = tmp_path / "d.yaml"
    f.write_text(text)
    with pytest.raises(ValueError, match=word):
        load(args_for("--config", str(f), "--ray", "auto"))


def test_autoscale_rule_per_role(tmp_path):
    f = tmp_path / "d.yaml"
    f.write_text("prefill: {count: 1, autoscale: {min: 1, max: 2, metric: kv_usage, target: 0.7}}\n"
                 "decode: {count: 2, autoscale: {min: 1, max: 4, metric: waiting, target: 4, up_after_s: 5,"
                 " down_after_s: 30}}\n")
    dep, s = load(args_for("--config", str(f), "--ray", "auto"))
    assert [w.role for w in dep.workers] == ["prefill", "decode", "decode"]
    p, d = s.roles["prefill"].autoscale, s.roles["decode"].autoscale
    assert (p.min, p.max, p.metric, p.target, p.up_after_s, p.down_after_s) == (1, 2, "kv_usage", 0.7, 10.0, 60.0)
    assert (d.min, d.max, d.metric, d.target, d.up_after_s, d.down_after_s) == (1, 4, "waiting", 4.0, 5.0, 30.0)
    assert s.roles["both"].autoscale is None
    # --decode on the command line is checked against the rule too
    with pytest.raises(ValueError, match="decode.autoscale"):
        load(args_for("--config", str(f), "--decode", "5", "--ray", "auto"))
