"""Cluster configs in LLMServingSim's JSON shape (seed 003), read into dataclasses.

Units as LLMServingSim: link_bw and mem_bw in GB/s, link_latency and mem_latency in ns,
mem_size in GB. Unknown or unmodelled fields are ignored with a warning; a missing required
field is an error that names where it is missing. A node or instance list with one entry and a
larger count is replicated, so a 32-instance cluster is a short file.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from pdserve.config import SIM_FIELDS
from pdserve.sim.hardware import get_hardware

log = logging.getLogger("pdserve.sim")

PD_TYPES = {"prefill": "prefill", "decode": "decode", None: "both", "both": "both", "null": "both"}
_TOP = {"num_nodes", "link_bw", "link_latency", "nodes"}
_NODE = {"num_instances", "cpu_mem", "instances"}
# an instance may override the simulated engine settings (SIM_FIELDS: EngineConfig's names)
_INSTANCE = {"model_name", "hardware", "npu_mem", "pd_type", "tp_size", "num_npus", "name", "profile",
             *SIM_FIELDS}
_MEM = {"mem_size", "mem_bw", "mem_latency", "mem_util"}


@dataclass
class InstanceSpec:
    name: str
    model_name: str
    hardware: str
    role: str                     # both | prefill | decode (pdserve's names for pd_type)
    tp_size: int = 1
    mem_size: float = 0.0         # bytes per device
    mem_bw: float = 0.0           # bytes/s per device
    mem_util: float = 0.9         # fraction of memory for weights + KV, as --gpu-memory-utilization
    overrides: dict = field(default_factory=dict)   # SIM_FIELDS given for this instance
    profile: str | None = None    # this instance's PROFILE.json (pdserve's field), over `--profile`

    @property
    def pd_type(self) -> str | None:
        return None if self.role == "both" else self.role


@dataclass
class ClusterConfig:
    num_nodes: int
    link_bw: float                # bytes/s between instances (KV hand-off)
    link_latency: float           # seconds
    instances: list[InstanceSpec]

    @property
    def disaggregated(self) -> bool:
        return any(i.role != "both" for i in self.instances)

    def to_json(self) -> dict:
        """Back to LLMServingSim's shape (one node holding every instance)."""
        insts = []
        for i in self.instances:
            d = {"model_name": i.model_name, "hardware": i.hardware,
                 "npu_mem": {"mem_size": i.mem_size / 1e9, "mem_bw": i.mem_bw / 1e9, "mem_latency": 0},
                 "pd_type": i.pd_type, "tp_size": i.tp_size}
            d.update(i.overrides)
            if i.profile:
                d["profile"] = i.profile
            insts.append(d)
        return {"num_nodes": 1, "link_bw": self.link_bw / 1e9, "link_latency": self.link_latency * 1e9,
                "nodes": [{"num_instances": len(insts), "instances": insts}]}


def _need(d: dict, key: str, where: str):
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
    if key not in d:
        raise ValueError(f"{where}: missing required field {key!r}")
    return d[key]


def _warn_unknown(d: dict, known: set, where: str) -> None:
    for k in d:
        if k not in known:
            log.warning("%s: field %r is not modelled by pdserve sim; ignored", where, k)


def _replicate(items: list, count: int, where: str, what: str) -> list:
    if len(items) == count:
        return items
    if len(items) == 1 and count > 1:
        return items * count
    raise ValueError(f"{where}: {what} says {count} but {len(items)} are listed")


def _instance(d: dict, where: str, name: str) -> InstanceSpec:
    _warn_unknown(d, _INSTANCE, where)
    model = _need(d, "model_name", where)
    hw_name = _need(d, "hardware", where)
    pd = _need(d, "pd_type", where)
    if pd not in PD_TYPES:
        raise ValueError(f"{where}: pd_type must be \"prefill\", \"decode\" or null, got {pd!r}")
    if "tp_size" not in d and "num_npus" not in d:
        raise ValueError(f"{where}: give tp_size (or num_npus)")
    tp = int(d.get("tp_size") or d["num_npus"])
    if tp < 1:
        raise ValueError(f"{where}: tp_size must be at least 1, got {tp}")
    hw = get_hardware(hw_name)
    mem = d.get("npu_mem") or {}
    _warn_unknown(mem, _MEM, where + ".npu_mem")
    util = float(mem.get("mem_util", 0.9))
    if not 0 < util <= 1:
        raise ValueError(f"{where}.npu_mem: mem_util must be in (0, 1], got {util}")
    spec = InstanceSpec(d.get("name", name), model, hw.name, PD_TYPES[pd], tp,
                        mem_size=float(mem["mem_size"]) * 1e9 if "mem_size" in mem else hw.mem_size,
                        mem_bw=float(mem["mem_bw"]) * 1e9 if "mem_bw" in mem else hw.mem_bw,
                        mem_util=util, overrides={k: d[k] for k in SIM_FIELDS if k in d},
                        profile=d.get("profile"))
    if spec.profile is not None and not isinstance(spec.profile, str):
        raise ValueError(f"{where}: profile must be a path to a PROFILE.json, got {spec.profile!r}")
    return spec


def parse_cluster_config(data: dict) -> ClusterConfig:
    where = "cluster config"
    _warn_unknown(data, _TOP, where)
    num_nodes = int(_need(data, "num_nodes", where))
    link_bw = float(_need(data, "link_bw", where))
    link_latency = float(_need(data, "link_latency", where))
    nodes = _replicate(list(_need(data, "nodes", where)), num_nodes, where, "num_nodes")
    instances = []
    for n, node in enumerate(nodes):
        nw = f"nodes[{n}]"
        _warn_unknown(node, _NODE, nw)
        count = int(_need(node, "num_instances", nw))
        insts = _replicate(list(_need(node, "instances", nw)), count, nw, "num_instances")
        for i, d in enumerate(insts):
            instances.append(_instance(d, f"{nw}.instances[{i}]", f"n{n}i{i}"))
    if not instances:
        raise ValueError(f"{where}: no instances")
    names = [i.name for i in instances]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: instance names must be unique")
    roles = {i.role for i in instances}
    if roles & {"prefill", "decode"} and not {"prefill", "decode"} <= roles:
        raise ValueError(f"{where}: a disaggregated cluster needs at least one prefill and one decode "
                         f"instance (got roles {sorted(roles)})")
    if "both" in roles and len(roles) > 1:
        raise ValueError(f"{where}: mixing pd_type null with prefill/decode instances is not supported")
    if link_bw <= 0:
        raise ValueError(f"{where}: link_bw must be positive (GB/s), got {link_bw}")
    return ClusterConfig(num_nodes, link_bw * 1e9, link_latency * 1e-9, instances)


def load_cluster_config(path: str | Path) -> ClusterConfig:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e
    cfg = parse_cluster_config(data)
    for spec in cfg.instances:   # an instance's profile path is relative to the config file
        if spec.profile and not Path(spec.profile).is_absolute():
            spec.profile = str(Path(path).parent / spec.profile)
    return cfg
