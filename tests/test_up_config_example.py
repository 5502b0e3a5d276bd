"""The example deployment file in the repository is one `pdserve up` accepts, as the README says."""
from __future__ import annotations

import argparse
from pathlib import Path

from pdserve.launch import cluster as launch
from pdserve.launch.config import load_deployment

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "deploy.yaml"


def test_example_deploy_yaml_loads():
    p = argparse.ArgumentParser()
    launch.add_arguments(p)
    dep = load_deployment(p.parse_args(["--config", str(EXAMPLE)]))
    assert [w.role for w in dep.workers] == ["prefill", "decode"]
    assert (dep.port, dep.policy, dep.local_prefill_max_tokens) == (8000, "prefix_aware", 32)
    prefill, decode = dep.workers
    assert prefill.engine == {"kv_cache_memory": "512MiB", "max_model_len": 2048, "max_num_batched_tokens": 2048}
    assert decode.engine == {"kv_cache_memory": "512MiB", "max_model_len": 2048, "max_num_seqs": 64}
