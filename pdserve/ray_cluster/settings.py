"""The Ray part of a deployment file: what `pdserve up` would refuse, split off before the
deployment itself is read by pdserve.launch.config (same flags, same file).

    ray:                             # all optional
      namespace: pdserve
      max_restarts: -1               # Ray restarts a dead worker actor (-1: always)
      max_task_retries: -1
      scheduling_strategy: SPREAD    # SPREAD: P and D over the nodes; DEFAULT: pack
      drain_timeout: 600             # seconds a removed worker may take to finish its requests
    prefill:
      count: 1
      ray_resources: {prefill_node: 1}   # custom node resources steer a role onto its nodes
      ray_num_cpus: 1
      ray_num_gpus: 1                # default: tensor_parallel_size when the cluster has GPUs, else 0
    decode:
      count: 1
      autoscale: {min: 1, max: 3, metric: waiting, target: 4, up_after_s: 10, down_after_s: 60}
                                     # see pdserve/ray_cluster/autoscale.py; metric: waiting|running|kv_usage
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field

from pdserve.launch.config import Deployment, load_deployment
from pdserve.ray_cluster.autoscale import Rule, parse_rule

ROLE_KEYS = {"ray_resources": "resources", "ray_num_cpus": "num_cpus", "ray_num_gpus": "num_gpus"}
TOP_KEYS = {"namespace", "max_restarts", "max_task_retries", "scheduling_strategy", "drain_timeout"}
STRATEGIES = ("SPREAD", "DEFAULT")


@dataclass
class RolePlacement:
    resources: dict = field(default_factory=dict)
    num_cpus: float = 1.0
    num_gpus: float | None = None    # None: decided from the cluster's resources
    autoscale: Rule | None = None


@dataclass
class RaySettings:
    namespace: str = "pdserve"
    max_restarts: int = -1
    max_task_retries: int = -1
    scheduling_strategy: str = "SPREAD"
    drain_timeout: float = 600.0
    roles: dict[str, RolePlacement] = field(default_factory=lambda: {r: RolePlacement() for r in
                                                                      ("prefill", "decode", "both")})


def split(data: dict) -> tuple[dict, RaySettings]:
    """(the deployment file without its Ray keys, the Ray settings)."""
    data = copy.deepcopy(data)
    s = RaySettings()
    top = data.pop("ray", None) or {}
    unknown = sorted(set(top) - TOP_KEYS)
    if unknown:
        raise ValueError(f"ray: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(TOP_KEYS))}")
    for k, v in top.items():
        setattr(s, k, type(getattr(s, k))(v))
    if s.scheduling_strategy not in STRATEGIES:
        raise ValueError(f"ray.scheduling_strategy: one of {', '.join(STRATEGIES)}, got {s.scheduling_strategy!r}")
    for role, key in (("prefill", "prefill"), ("decode", "decode"), ("both", "colocated")):
        pool = data.get(key)
        if not isinstance(pool, dict):
            continue
        for k, attr in ROLE_KEYS.items():
            if k in pool:
                v = pool.pop(k)
                if k == "ray_resources" and not (isinstance(v, dict) and all(
                        isinstance(x, (int, float)) for x in v.values())):
                    raise ValueError(f"{key}.ray_resources: a mapping of resource name to amount")
                setattr(s.roles[role], attr, v if k == "ray_resources" else float(v))
        if "autoscale" in pool:
            s.roles[role].autoscale = parse_rule(pool.pop("autoscale"), f"{key}.autoscale")
    return data, s


def read_any(path: str) -> dict:
    with open(path) as f:
        text = f.read()
    if path.endswith(".json"):
        return json.loads(text)
    import yaml
    return yaml.safe_load(text) or {}


@contextmanager
def _no_local_gpus():
    """Ray hands out the GPUs: keep load_deployment from placing workers on the driver's."""
    old = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES")
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = old


def load(args: argparse.Namespace) -> tuple[Deployment, RaySettings]:
    """launch.config.load_deployment on the file less its Ray keys, plus the Ray settings."""
    if not getattr(args, "config", None):
        with _no_local_gpus():
            return load_deployment(args), RaySettings()
    data = read_any(args.config)
    if not isinstance(data, dict):
        raise ValueError(f"{args.config}: expected a mapping at the top level")
    plain, settings = split(data)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(plain, f)
    try:
        with _no_local_gpus():
            dep = load_deployment(argparse.Namespace(**{**vars(args), "config": f.name}))
    finally:
        os.unlink(f.name)
    for role, key in (("prefill", "prefill"), ("decode", "decode"), ("both", "colocated")):
        rule, n = settings.roles[role].autoscale, sum(w.role == role for w in dep.workers)
        if rule and not rule.min <= n <= rule.max:
            raise ValueError(f"{key}.autoscale: starts with {n} worker(s), outside min {rule.min}, max {rule.max}")
    return dep, settings
