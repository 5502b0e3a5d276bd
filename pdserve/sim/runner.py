"""One simulation run from files: config + trace -> summary (+ CSV), with a progress bar."""
from __future__ import annotations

from pdserve.config import EngineConfig
from pdserve.sim.cluster_config import ClusterConfig, load_cluster_config
from pdserve.sim.metrics import Collector
from pdserve.sim.perf import load_profile
from pdserve.sim.simulator import ClusterSim, SimOptions
from pdserve.sim.trace import Session, read_trace


def simulate(cluster: str | ClusterConfig, trace: str | list[Session], engine: EngineConfig | None = None, *,
             routing: str = "round_robin", profile: str | dict | None = None, csv_path: str | None = None,
             log_interval: float = 0.0, slo: dict | None = None, limit: int | None = None,
             local_prefill_max_tokens: int = 0, on_log=None, progress: bool = False):
    """Returns (summary dict, the ClusterSim after the run)."""
    if not isinstance(cluster, ClusterConfig):
        cluster = load_cluster_config(cluster)
    sessions = read_trace(trace, limit) if isinstance(trace, str) else trace
    if isinstance(profile, str):
        profile = load_profile(profile)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(len(s.requests) for s in sessions), unit="req", desc="simulating",
                   mininterval=0.5)
        on_log = on_log or tqdm.write   # log lines above the bar, not through it
    sim = ClusterSim(cluster, engine, SimOptions(routing, local_prefill_max_tokens, log_interval), profile,
                     on_log=on_log)
    col = Collector(csv_path, slo)
    sim.collector = col   # the plots read its per-request arrays
    try:
        wall = sim.run(sessions, col.add, bar.update if bar else None)
    finally:
        col.close()
        if bar:
            bar.close()
    summary = col.summary()
    n = summary["completed"] + summary["failed"]
    summary.update(wall_s=wall, cpu_s=sim.cpu_s, sim_speed_rps=n / sim.cpu_s if sim.cpu_s else 0.0,
                   instances={i.name: {"role": i.role, "steps": i.num_steps, "busy_s": i.busy_time,
                                       "num_blocks": i.bm.num_blocks,
                                       "preemptions": i.sched.num_preemptions}
                              for i in sim.instances})
    return summary, sim
