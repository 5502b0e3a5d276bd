"""One simulated serving instance: pdserve's own Scheduler and BlockManager, a step-time model,
and the memory arithmetic that sizes its KV cache. No copy of the engine's logic lives here."""
from __future__ import annotations

import logging

from pdserve.config import SIM_FIELDS, EngineConfig
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.scheduler import Scheduler, SchedulerConfig
from pdserve.sim.cluster_config import InstanceSpec
from pdserve.sim.hardware import get_hardware
from pdserve.sim.models import ModelShape, base_name, dtype_bytes, get_model
from pdserve.sim.perf import AnalyticalPerf, ProfilePerf

log = logging.getLogger("pdserve.sim")


class SimInstance:
    def __init__(self, spec: InstanceSpec, engine: EngineConfig, profile: dict | None = None):
        """engine: the run-wide settings (`pdserve serve`'s defaults unless the flags say otherwise),
        which the cluster config may override per instance."""
        self.spec = spec
        self.name = spec.name
        self.role = spec.role
        o = {**{k: getattr(engine, k) for k in SIM_FIELDS}, **spec.overrides}
        self.model: ModelShape = get_model(spec.model_name)
        db = dtype_bytes(o["dtype"])
        kv_db = db if o["kv_cache_dtype"] == "auto" else dtype_bytes(o["kv_cache_dtype"])
        self.kv_bytes_per_token = self.model.kv_bytes_per_token(kv_db)
        self.kv_bytes_per_block = self.kv_bytes_per_token * o["block_size"]
        self.weight_bytes = self.model.weight_bytes(db)
        budget = spec.mem_size * spec.tp_size * spec.mem_util - self.weight_bytes
        num_blocks = int(budget // self.kv_bytes_per_block)
        if num_blocks < 1:
            raise ValueError(
                f"instance {spec.name}: {spec.model_name} needs {self.weight_bytes / 1e9:.1f} GB of weights, "
                f"more than {spec.mem_util:.0%} of {spec.tp_size} x {spec.mem_size / 1e9:.0f} GB leaves room for")
        self.bm = BlockManager(num_blocks, o["block_size"], o["enable_prefix_caching"])
        max_len = o["max_model_len"] or self.model.max_position_embeddings
        self.sched = Scheduler(SchedulerConfig(**{**o, "max_model_len": max_len, "role": self.role,
                                                  "max_num_seqs": o["max_num_seqs"] or 1 << 30}), self.bm)
        self.max_model_len = max_len
        if profile is not None:
            self.perf = ProfilePerf(profile)
            if profile.get("tp_size", 1) != spec.tp_size or (
                    profile.get("model") and base_name(profile["model"]) != base_name(spec.model_name)):
                log.warning("instance %s (%s, tp_size %d) uses a profile of %s with tp_size %s: its step times "
                            "may not apply", spec.name, spec.model_name, spec.tp_size, profile.get("model"),
                            profile.get("tp_size", 1))
        else:
            self.perf = AnalyticalPerf(self.model, get_hardware(spec.hardware), spec.tp_size, db, spec.mem_bw,
                                       kv_dtype_bytes=kv_db)
        self.step_time = self.perf.step_time
        # state of the step in flight
        self.busy = False
        self.out = None
        self.producers: list = []
        self.step_start = 0.0
        self.link_free = 0.0        # when this instance's incoming KV link is next idle
        # counters for the periodic log
        self.prompt_tokens = 0
        self.gen_tokens = 0
        self.last_p = 0             # sequences prefilling in the latest step
        self.last_d = 0             # sequences decoding in the latest step
        self.num_steps = 0
        self.busy_time = 0.0

    @property
    def mem_used(self) -> float:
        """Bytes in use on the instance: weights plus referenced KV blocks."""
        return self.weight_bytes + self.bm.num_used_blocks * self.kv_bytes_per_block
