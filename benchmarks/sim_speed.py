"""How fast `pdserve sim` runs: 100,000 requests on a 32-instance cluster, on one core.

    python benchmarks/sim_speed.py [--requests 100000] [--rate 400] [--colocated] [--profile-top 15]

The cluster is 12 prefill + 20 decode Llama-3.1-8B instances on H100 (analytical model); the
trace is Poisson with ~512-token prompts and ~128-token outputs (lognormal). Reports CPU time
(the fair figure on a shared machine) and wall time, and with --profile-top the hottest functions
under cProfile (which slows the run down about 2x).
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time

from pdserve.sim.cluster_config import parse_cluster_config
from pdserve.config import EngineConfig
from pdserve.sim.runner import simulate
from pdserve.sim.tracegen import GenConfig, generate


def cluster(colocated: bool) -> dict:
    inst = {"model_name": "meta-llama/Llama-3.1-8B", "hardware": "H100", "tp_size": 1}
    roles = [None] * 32 if colocated else ["prefill"] * 12 + ["decode"] * 20
    return {"num_nodes": 4, "link_bw": 50, "link_latency": 10000,
            "nodes": [{"num_instances": 8, "instances": [dict(inst, pd_type=r) for r in roles[i * 8:(i + 1) * 8]]}
                      for i in range(4)]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--rate", type=float, default=400.0)
    ap.add_argument("--colocated", action="store_true")
    ap.add_argument("--csv", default=None, help="also write the per-request CSV")
    ap.add_argument("--profile-top", type=int, default=0)
    args = ap.parse_args()
    sessions = generate(GenConfig(num_requests=args.requests, rate=args.rate, input_len=512, output_len=128, seed=1))
    engine = EngineConfig(max_num_seqs=256, max_num_batched_tokens=4096)
    cfg = parse_cluster_config(cluster(args.colocated))
    prof = cProfile.Profile() if args.profile_top else None
    if prof:
        prof.enable()
    summary, sim = simulate(cfg, sessions, engine, csv_path=args.csv, progress=True)
    if prof:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile_top)
    steps = sum(i.num_steps for i in sim.instances)
    print(f"{summary['completed']} requests, {summary['total_output_tokens']} output tokens, {steps} engine steps "
          f"on {len(sim.instances)} instances, {summary['duration']:.0f} s simulated")
    print(f"CPU {summary['cpu_s']:.1f} s, wall {summary['wall_s']:.1f} s: "
          f"{summary['completed'] / summary['cpu_s']:.0f} requests/s, "
          f"{summary['total_output_tokens'] / summary['cpu_s'] / 1e3:.0f}k tokens/s, "
          f"{summary['cpu_s'] / steps * 1e6:.1f} us/step (CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
