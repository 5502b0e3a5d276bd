"""`pdserve sim`: run a trace through a simulated cluster; `pdserve sim gen`: write a trace."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from pdserve.config import SIM_FIELDS, EngineConfig
from pdserve.sim.tracegen import GenConfig


def add_engine_sim_args(p: argparse.ArgumentParser) -> None:
    """Engine settings the simulated instances share (a cluster config may override them)."""
    from pdserve.cli.args import add_engine_args
    g = add_engine_args(p, model_positional=False, only=SIM_FIELDS, title="simulated engine (defaults as `pdserve serve`)")
    g.add_argument("--profile", default=None, help="PROFILE.json from `pdserve profile` (else analytical); an instance's own "
                   "\"profile\" field in the cluster config (a path relative to it) wins")
    g.add_argument("--routing", default="round_robin", help="round_robin | least_loaded | prefix_aware")
    g.add_argument("--local-prefill-max-tokens", type=int, default=0,
                   help="prefill on the decode instance when the uncached prompt is at most this")


def add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    sub = p.add_subparsers(dest="sim_command")
    g = sub.add_parser("gen", help="write a synthetic trace (LLMServingSim JSONL)",
                       description="write a synthetic trace (LLMServingSim JSONL)", formatter_class=p.formatter_class)
    g.add_argument("--output", required=True, help="JSONL file to write")
    for f in fields(GenConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            g.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            g.add_argument(flag, type=float if f.type == "float" else (int if f.type == "int" else str),
                           default=f.default, help=f.metadata["help"])
    p.add_argument("--cluster-config", help="cluster config JSON in LLMServingSim's shape")
    p.add_argument("--dataset", help="request trace (JSONL; `pdserve sim gen` writes one)")
    p.add_argument("--output", default=None, help="CSV with one row per request")
    p.add_argument("--log-interval", type=float, default=1.0, help="seconds of simulated time; 0: no log")
    p.add_argument("--num-requests", type=int, default=None, help="only the first N trace lines")
    p.add_argument("--slo", nargs="*", default=None, help="ttft_ms=... tpot_ms=... [itl_ms=... e2el_ms=...]")
    p.add_argument("--summary-json", default=None, help="write the summary as JSON here")
    p.add_argument("--plot", default=None, help="PNG: KV memory per instance over time and latency CDFs")
    p.add_argument("--quiet", action="store_true", help="no periodic log lines")
    add_engine_sim_args(p)


def engine_defaults(args) -> EngineConfig:
    """The simulated engine's settings: EngineConfig's, less what the flags changed."""
    return EngineConfig(**{k: getattr(args, k) for k in SIM_FIELDS})


def run(args: argparse.Namespace) -> int:
    if args.sim_command == "gen":
        return _gen(args)
    if not args.cluster_config or not args.dataset:
        raise ValueError("give --cluster-config and --dataset (or `pdserve sim gen` to write a trace)")
    from tqdm.contrib.logging import logging_redirect_tqdm

    from pdserve.bench.metrics import parse_slo
    from pdserve.sim.runner import simulate
    from pdserve.sim.metrics import format_summary
    with logging_redirect_tqdm():   # warnings go above the progress bar (tqdm.write), not through it
        summary, sim = simulate(args.cluster_config, args.dataset, engine_defaults(args), routing=args.routing,
                                profile=args.profile, csv_path=args.output, log_interval=args.log_interval,
                                slo=parse_slo(args.slo), limit=args.num_requests,
                                local_prefill_max_tokens=args.local_prefill_max_tokens,
                                on_log=None if not args.quiet else (lambda line: None), progress=True)
    print(format_summary(summary))
    print(f"simulated {summary['completed'] + summary['failed']} requests in {summary['cpu_s']:.2f}s CPU, "
          f"{summary['wall_s']:.2f}s wall ({summary['sim_speed_rps']:.0f} requests per CPU second)")
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(summary, f, indent=2)
    if args.plot:
        from pdserve.sim.plots import plot_run
        plot_run(sim, summary, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def _gen(args) -> int:
    from pdserve.sim.trace import write_trace
    from pdserve.sim.tracegen import generate
    cfg = GenConfig(**{f.name: getattr(args, f.name) for f in fields(GenConfig)})
    sessions = generate(cfg)
    write_trace(args.output, sessions)
    n = sum(len(s.requests) for s in sessions)
    print(f"wrote {len(sessions)} {'sessions' if cfg.session_len > 1 else 'requests'} ({n} calls) to {args.output}",
          file=sys.stderr)
    return 0
