"""What `pdserve up` deploys, from a YAML/JSON file and/or flags (flags win).

    model: null                    # default model
    port: 8000
    policy: round_robin
    local_prefill_max_tokens: 0
    kv_transport: auto
    engine: {kv_cache_memory: 512MiB}            # every worker
    prefill:                                     # or just `prefill: 2`
      count: 1
      engine: {max_num_batched_tokens: 4096}     # seed 002's "prefill instance tuning"
      cpus: ["0"]                                # one entry per worker: "0", "2-3" or [2, 3]
    decode:
      count: 1
      engine: {max_num_seqs: 128}                # "decode instance tuning"
      cpus: ["1"]
    colocated: 0                                 # K `both` workers instead of the two pools
    pin_cpus: null                 # null: CPU workers get their own cores; true: all workers; false: none
    max_restarts: 5                # a worker or router that exits is restarted (with backoff) this often
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
from dataclasses import dataclass, field, fields

from pdserve.config import EngineConfig
from pdserve.cpu_threads import cgroup_cpu_limit, cores_for_threads, parse_cpu_list

log = logging.getLogger("pdserve.up")

ENGINE_KEYS = {f.name for f in fields(EngineConfig)} - {"model", "role"}
TOP_KEYS = {"model", "host", "port", "policy", "local_prefill_max_tokens", "kv_transport", "api_key", "engine",
            "prefill", "decode", "colocated", "pin_cpus", "health_interval", "router_args", "max_restarts"}


@dataclass
class WorkerSpec:
    role: str                        # prefill | decode | both
    engine: dict = field(default_factory=dict)
    cpus: list[int] | None = None
    gpu: str | None = None           # CUDA_VISIBLE_DEVICES for this worker (None: leave as is)
    restart_engine: dict = field(default_factory=dict)   # engine options that differ when restarted


@dataclass
class Deployment:
    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    policy: str = "round_robin"
    local_prefill_max_tokens: int = 0
    kv_transport: str = "auto"
    api_key: str | None = None
    health_interval: float = 2.0
    router_args: list[str] = field(default_factory=list)
    max_restarts: int = 5
    workers: list[WorkerSpec] = field(default_factory=list)
    sequential_start: bool = False   # workers sharing a GPU must size their KV one after another


def parse_cpus(v) -> list[int]:
    """'0-2,5' or [0, 1] or 3 -> [0, 1, 2, 5]."""
    if isinstance(v, int):
        return [v]
    if isinstance(v, list):
        return [int(x) for x in v]
    return parse_cpu_list(v)


def _check_engine(opts: dict, where: str) -> dict:
    unknown = sorted(set(opts) - ENGINE_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown engine option(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(ENGINE_KEYS))}")
    return dict(opts)


def read_file(path: str) -> dict:
    with open(path) as f:
        text = f.read()
    if path.endswith(".json"):
        data = json.loads(text)
    else:
        import yaml
        data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(TOP_KEYS))}")
    return data


def _pool(v, role: str) -> tuple[int, dict, list | None]:
    if v is None:
        return 0, {}, None
    if isinstance(v, int):
        return v, {}, None
    extra = sorted(set(v) - {"count", "engine", "cpus"})
    if extra:
        raise ValueError(f"{role}: unknown key(s) {', '.join(extra)} (count, engine, cpus)")
    cpus = v.get("cpus")
    return int(v.get("count", 1)), _check_engine(v.get("engine") or {}, f"{role}.engine"), cpus


def cli_engine_overrides(args: argparse.Namespace) -> dict:
    """Engine flags the user actually gave on the command line (not argparse defaults)."""
    from pdserve.cli.args import add_engine_args
    p = argparse.ArgumentParser()
    add_engine_args(p, exclude=("role",))
    defaults = vars(p.parse_args([]))
    return {k: getattr(args, k) for k in ENGINE_KEYS if hasattr(args, k) and getattr(args, k) != defaults.get(k)}


def load_deployment(args: argparse.Namespace) -> Deployment:
    data = read_file(args.config) if getattr(args, "config", None) else {}
    dep = Deployment()
    for k in ("model", "host", "port", "policy", "local_prefill_max_tokens", "kv_transport", "api_key",
              "health_interval", "router_args", "max_restarts"):
        if data.get(k) is not None:
            setattr(dep, k, data[k])
        if getattr(args, k, None) is not None:
            setattr(dep, k, getattr(args, k))
    common = _check_engine(data.get("engine") or {}, "engine")
    common.update(cli_engine_overrides(args))
    pools = {r: _pool(data.get(k), r) for r, k in (("prefill", "prefill"), ("decode", "decode"), ("both", "colocated"))}
    for flag, role in (("prefill", "prefill"), ("decode", "decode"), ("colocated", "both")):
        if getattr(args, flag, None) is not None:
            pools[role] = (getattr(args, flag), pools[role][1], pools[role][2])
    if pools["both"][0] > 0 and getattr(args, "colocated", None) is not None:
        pools["prefill"] = pools["decode"] = (0, {}, None)   # --colocated K: instead of the pools
    elif not data and getattr(args, "colocated", None) is None:
        for r in ("prefill", "decode"):  # plain `pdserve up`: one of each unless told otherwise
            if getattr(args, r, None) is None:
                pools[r] = (1, {}, None)
    for flag, role in (("prefill_tp", "prefill"), ("decode_tp", "decode")):
        if getattr(args, flag, None) is not None:   # --prefill-tp / --decode-tp: over -tp and the file
            pools[role][1]["tensor_parallel_size"] = getattr(args, flag)
    for role in ("prefill", "decode", "both"):
        n, eng, cpus = pools[role]
        if n < 0:
            raise ValueError(f"{role}: count must be >= 0")
        if cpus is not None and len(cpus) not in (1, n):
            raise ValueError(f"{role}.cpus: give one entry per worker ({n}) or one for all")
        for i in range(n):
            c = None if cpus is None else parse_cpus(cpus[i if len(cpus) == n else 0])
            dep.workers.append(WorkerSpec(role, {**common, **eng}, c))
    if not any(w.role in ("decode", "both") for w in dep.workers):
        raise ValueError("nothing can decode: give --decode M (M >= 1) or --colocated K")
    if dep.max_restarts < 0:
        raise ValueError("max_restarts must be >= 0")
    dep.sequential_start = place_on_gpus(dep.workers, gpu_ids())
    pin = getattr(args, "pin_cpus", None)
    pin = data.get("pin_cpus") if pin is None else pin
    if pin is None:   # default: each CPU worker its own cores (torch threads follow its affinity)
        pin_evenly([w for w in dep.workers if w.gpu is None and w.engine.get("device", "auto") != "cuda"],
                   explicit=dep.workers)
    elif pin:
        pin_evenly(dep.workers)
    return dep


def gpu_ids() -> list[str]:
    """The GPUs this process may use, without importing torch: CUDA_VISIBLE_DEVICES, else nvidia-smi."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(l for l in out.splitlines() if l.startswith("GPU "))]


def place_on_gpus(workers: list[WorkerSpec], gpus: list[str]) -> bool:
    """One GPU per worker while there are enough; workers that must share a GPU split its memory.

    A worker sizes its KV cache as `utilization x total - memory in use on the device`, which
    counts the other workers' memory too. So sharers get cumulative utilizations (0.45, 0.9
    for two) and start one after another: each then takes an equal share. Returns whether the
    workers must start one after another. Workers the user sized (kv_cache_memory,
    gpu_memory_utilization) or put on a device (cpu, cuda:N) are left alone.
    """
    if not gpus:
        return False
    placed = [w for w in workers if w.engine.get("device", "auto") in ("auto", "cuda")]
    nxt = 0
    for w in placed:   # a tensor-parallel worker takes as many consecutive GPUs (rank r on its r-th)
        tp = max(1, int(w.engine.get("tensor_parallel_size", 1)))
        if tp > len(gpus):
            raise ValueError(f"{w.role}: tensor_parallel_size {tp} needs {tp} GPUs; {len(gpus)} visible")
        if nxt + tp > len(gpus):
            nxt = 0
        w.gpu = ",".join(gpus[nxt:nxt + tp])
        nxt = (nxt + tp) % len(gpus)
    sequential = False
    for g in gpus:
        group = [w for w in placed if g in w.gpu.split(",")]
        if len(group) < 2 or any("kv_cache_memory" in w.engine or "gpu_memory_utilization" in w.engine
                                 for w in group):
            continue
        sequential = True
        for k, w in enumerate(group):
            w.engine["gpu_memory_utilization"] = round(0.9 * (k + 1) / len(group), 3)
            # restarted while the others hold their shares: the whole remainder is its share
            w.restart_engine["gpu_memory_utilization"] = 0.9
    return sequential


def pin_evenly(workers: list[WorkerSpec], explicit: list[WorkerSpec] | None = None) -> None:
    """Give each worker without explicit cpus an equal, disjoint share of this process's cores,
    leaving alone the cores other workers (of `explicit`, default `workers`) were given
    explicitly (while any remain)."""
    todo = [w for w in workers if w.cpus is None]
    taken = {c for w in (workers if explicit is None else explicit) if w.cpus for c in w.cpus}
    mine = sorted(os.sched_getaffinity(0))
    # a cgroup quota is shared by all the workers: hand out only as many cores as it pays for
    mine = mine[:cores_for_threads(mine, cgroup_cpu_limit())]
    cores = [c for c in mine if c not in taken] or mine
    if not todo:
        return
    if len(todo) > len(cores):
        log.warning("%d workers on %d cores: some share a core", len(todo), len(cores))
        for i, w in enumerate(todo):
            w.cpus = [cores[i % len(cores)]]
        return
    # a tensor-parallel worker's share grows with its ranks (each rank then takes its part of it)
    weights = [max(1, int(w.engine.get("tensor_parallel_size", 1))) for w in todo]
    if sum(weights) > len(cores):
        weights = [1] * len(todo)
    per, extra = divmod(len(cores), sum(weights))   # the first `extra` ranks' workers get one core more
    start = slot = 0
    for w, k in zip(todo, weights):
        n = per * k + max(0, min(extra, slot + k) - slot)
        w.cpus, start, slot = cores[start:start + n], start + n, slot + k