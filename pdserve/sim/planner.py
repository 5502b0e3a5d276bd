"""`pdserve plan`: which prefill:decode counts and tp_size per role serve a workload best (DistServe-style).

For every candidate unit (P prefill instances of p_tp devices each + D decode instances of d_tp
devices each, or K colocated instances of tp devices) the simulator finds the highest arrival
rate at which at least `attainment` of the requests meet every SLO, by scaling the trace's
arrival times and bisecting. Candidates are ranked by that rate per device; the best unit is
replicated to fill the devices, written as a cluster config and as a `pdserve up --config` file
(each pool at its role's tensor_parallel_size), and goodput is plotted against the ratio.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, replace

from pdserve.config import SIM_FIELDS, EngineConfig
from pdserve.sim.cluster_config import ClusterConfig, InstanceSpec, load_cluster_config
from pdserve.sim.hardware import get_hardware
from pdserve.sim.models import dtype_bytes, get_model
from pdserve.sim.trace import Session, read_trace, time_scaled

log = logging.getLogger("pdserve.sim")


@dataclass(frozen=True)
class Candidate:
    n_prefill: int      # 0: colocated
    p_tp: int           # tensor-parallel size of each prefill instance (colocated: = d_tp)
    n_decode: int       # decode instances, or colocated instances when n_prefill == 0
    d_tp: int           # tensor-parallel size of each decode (or colocated) instance

    @property
    def devices(self) -> int:
        return self.n_prefill * self.p_tp + self.n_decode * self.d_tp

    @property
    def label(self) -> str:
        if self.n_prefill == 0:
            return f"colocated x{self.n_decode} tp{self.d_tp}"
        return f"{self.n_prefill}P tp{self.p_tp} : {self.n_decode}D tp{self.d_tp}"


@dataclass
class PlanResult:
    cand: Candidate
    rate: float                 # highest arrival rate meeting the SLO attainment (req/s)
    summary: dict | None        # the simulation at that rate

    @property
    def per_device(self) -> float:
        return self.rate / self.cand.devices


def candidates(max_devices: int, tp_sizes: list[int], colocated: bool = True) -> list[Candidate]:
    """Every unit of at most max_devices: P prefill instances of p_tp and D decode instances of
    d_tp devices, for each (p_tp, d_tp) pair of tp_sizes, and one colocated instance per tp.
    A unit that is k copies of a smaller one (2P:2D of 1P:1D) is left out: the plan replicates
    its best unit to fill the devices, so the smaller one stands for it."""
    out = []
    for p_tp in tp_sizes:
        for d_tp in tp_sizes:
            out += [Candidate(p, p_tp, d, d_tp) for p in range(1, max_devices // p_tp + 1)
                    for d in range(1, (max_devices - p * p_tp) // d_tp + 1) if math.gcd(p, d) == 1]
    if colocated:   # colocated scales linearly: one instance says it
        out += [Candidate(0, tp, 1, tp) for tp in tp_sizes if tp <= max_devices]
    return out


def build_cluster(template: InstanceSpec, cand: Candidate, link_bw: float, link_latency: float,
                  replicas: int = 1, tp_profiles: dict[int, str] | None = None) -> ClusterConfig:
    """tp_profiles: PROFILE.json per tp_size; an instance of that size carries it as its own."""
    roles = (["prefill"] * cand.n_prefill + ["decode"] * cand.n_decode) if cand.n_prefill else ["both"] * cand.n_decode
    insts = []
    for i, role in enumerate(roles * replicas):
        tp = cand.p_tp if role == "prefill" else cand.d_tp
        insts.append(replace(template, name=f"{role[0]}{i}", role=role, tp_size=tp,
                             profile=(tp_profiles or {}).get(tp, template.profile)))
    return ClusterConfig(1, link_bw, link_latency, insts)


def evaluate(cluster: ClusterConfig, sessions: list[Session], slo: dict, engine: EngineConfig,
             profile: dict | None, routing: str) -> tuple[float, dict]:
    from pdserve.sim.runner import simulate
    summary, _ = simulate(cluster, sessions, engine, routing=routing, profile=profile, slo=slo)
    return summary.get("slo_attainment", 0.0), summary


def max_rate(cluster: ClusterConfig, sessions: list[Session], slo: dict, attainment: float,
             engine: EngineConfig, profile: dict | None, routing: str, steps: int = 6) -> tuple[float, dict | None]:
    """Highest rate (req/s) whose SLO attainment is at least `attainment`.

    A finite trace sent fast enough is one burst that may still meet a loose SLO, so a rate
    counts only while the cluster keeps up with it: requests must also leave at (nearly) the
    rate they arrive."""
    span = max(sessions[-1].arrival - sessions[0].arrival, 1e-9)
    base = len(sessions) / span
    best: tuple[float, dict | None] = (0.0, None)

    def ok(rate: float) -> bool:
        nonlocal best
        att, summary = evaluate(cluster, time_scaled(sessions, rate / base), slo, engine, profile, routing)
        good = att >= attainment and summary["completion_rate"] >= 0.9 * rate
        if good and rate > best[0]:
            best = (rate, summary)
        return good

    lo, hi, r = 0.0, math.inf, base
    for _ in range(12):   # bracket: double up or halve down
        if ok(r):
            lo, r = r, r * 2
            if hi < math.inf:
                break
        else:
            hi, r = r, r / 2
            if lo > 0:
                break
        if lo > 0 and hi < math.inf:
            break
    if lo == 0 or hi == math.inf:
        return best
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return best


def plan(template: InstanceSpec, devices: int, sessions: list[Session], slo: dict, attainment: float = 0.9,
         tp_sizes: list[int] | None = None, max_unit: int = 8, link_bw: float = 16e9, link_latency: float = 20e-6,
         engine: EngineConfig | None = None, profile: dict | None = None, routing: str = "round_robin",
         progress: bool = True, tp_profiles: dict[int, str] | None = None) -> list[PlanResult]:
    """tp_profiles: measured PROFILE.json per tp_size (`pdserve profile -tp N`); given, only those
    sizes are searched, each instance simulated with its size's profile."""
    engine = engine or EngineConfig()
    model = get_model(template.model_name)
    hw = get_hardware(template.hardware)
    tp_sizes = [t for t in (tp_sizes or [1, 2, 4, 8]) if t <= devices and model.num_heads % t == 0
                and model.num_kv_heads % t == 0 or t == 1]
    weights = model.weight_bytes(dtype_bytes(engine.dtype))
    fits = [t for t in tp_sizes if template.mem_size * t * template.mem_util > weights * 1.05]
    if not fits:
        raise ValueError(f"{template.model_name} does not fit on up to {max(tp_sizes)} x {hw.name}")
    if tp_profiles:
        fits = [t for t in fits if t in tp_profiles]
        if not fits:
            raise ValueError(f"no profile of a tp_size searched and fitting: profiles of {sorted(tp_profiles)}")
    cands = [c for c in candidates(min(devices, max_unit), fits) if c.devices <= devices]
    from tqdm import tqdm
    results = []
    n_req = sum(len(s.requests) for s in sessions)
    if progress and n_req > 200:
        print(f"pdserve plan: {len(cands)} configurations, each simulated at about 10 request rates with {n_req} "
              f"requests; the time grows with --num-requests (200 is enough for a first try)", file=sys.stderr)
    t0 = time.perf_counter()
    for cand in (bar := tqdm(cands, desc="planning", unit="config", disable=not progress)):
        cluster = build_cluster(template, cand, link_bw, link_latency, tp_profiles=tp_profiles)
        rate, summary = max_rate(cluster, sessions, slo, attainment, engine, profile, routing)
        results.append(PlanResult(cand, rate, summary))
        if progress and len(results) == 1:
            hint = cost_hint(time.perf_counter() - t0, len(cands), n_req)
            if hint:
                bar.write(hint)
    results.sort(key=lambda r: (-r.per_device, r.cand.devices))
    return results


def cost_hint(first_s: float, n_configs: int, n_requests: int, small: int = 200) -> str | None:
    """What the whole search will cost, measured on its first configuration, when that is more
    than a minute: the simulator's time grows with the requests per simulation."""
    total = first_s * n_configs
    if total < 60:
        return None
    msg = (f"pdserve plan: the first of {n_configs} configurations took {first_s:.0f}s with {n_requests} "
           f"requests per simulation: about {total / 60:.0f} min in all on this machine.")
    if n_requests > small:
        msg += f" For a first try use fewer requests: --num-requests {small} (about {total * small / n_requests / 60:.1f} min)."
    return msg


def format_table(results: list[PlanResult], slo: dict, attainment: float) -> str:
    head = (f"{'rank':>4}  {'config':<22}{'devices':>8}{'max rate':>10}{'per device':>12}"
            f"{'TTFT p90':>10}{'TPOT p90':>10}   (req/s meeting {' '.join(f'{k}={v:g}' for k, v in slo.items())}"
            f" for {attainment:.0%} of requests)")
    lines = [head]
    for i, r in enumerate(results, 1):
        s = r.summary
        ttft = f"{s['p90_ttft_ms']:.1f}" if s else "-"
        tpot = f"{s['p90_tpot_ms']:.1f}" if s else "-"
        lines.append(f"{i:>4}  {r.cand.label:<22}{r.cand.devices:>8}{r.rate:>10.2f}{r.per_device:>12.3f}"
                     f"{ttft:>10}{tpot:>10}")
    return "\n".join(lines)


def up_config(model_name: str, cand: Candidate, replicas: int, engine: EngineConfig) -> str:
    """A `pdserve up --config` YAML for the chosen deployment, each pool at its role's TP."""
    eng = {k: getattr(engine, k) for k in SIM_FIELDS if k != "dtype" and getattr(engine, k) is not None}
    lines = ["# written by `pdserve plan`", f"# plan: {cand.label} x{replicas}",
             f"model: {json.dumps(model_name)}", "policy: round_robin", f"engine: {json.dumps(eng)}"]
    pools = ([("prefill", cand.n_prefill, cand.p_tp), ("decode", cand.n_decode, cand.d_tp)] if cand.n_prefill
             else [("colocated", cand.n_decode, cand.d_tp)])
    for key, n, tp in pools:
        lines.append(f"{key}: {json.dumps({'count': n * replicas, 'engine': {'tensor_parallel_size': tp}})}")
    return "\n".join(lines) + "\n"


def plot(results: list[PlanResult], path: str, title: str) -> None:
    """Goodput per device against the P:D ratio: one line per (prefill TP, decode TP) pair,
    solid where both roles share a TP; each colocated TP a gray line labelled at its right end."""
    from pdserve.sim.plots import _pyplot
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter
    fig, ax = plt.subplots(figsize=(9, 4.5))
    pairs = sorted({(r.cand.p_tp, r.cand.d_tp) for r in results if r.cand.n_prefill})
    for k, (p_tp, d_tp) in enumerate(pairs):
        best = {}
        for r in results:   # several (P, D) share a ratio: keep the best of each
            if r.cand.n_prefill and (r.cand.p_tp, r.cand.d_tp) == (p_tp, d_tp):
                x = r.cand.n_prefill / r.cand.n_decode
                best[x] = max(r.per_device, best.get(x, 0.0))
        xs = sorted(best)
        ax.plot(xs, [best[x] for x in xs], "o-" if p_tp == d_tp else "s:", color=f"C{k % 10}",
                label=f"P tp{p_tp} : D tp{d_tp}")
    for r in results:
        if not r.cand.n_prefill:
            ax.axhline(r.per_device, linestyle="--", linewidth=1, color="gray")
            ax.annotate(f"colocated tp{r.cand.d_tp}", (1, r.per_device), xycoords=("axes fraction", "data"),
                        xytext=(-4, 2), textcoords="offset points", ha="right", fontsize=7, color="dimgray")
    ax.set(xscale="log", xlabel="prefill : decode instances (ratio)", ylabel="goodput per device (req/s)",
           title=title)
    ticks = [2.0 ** k for k in range(-6, 7)]   # P:D as 1:4 .. 4:1, not 10^-1 (log minor labels overlap)
    ax.set_xticks(ticks, [f"1:{round(1 / t)}" if t < 1 else f"{round(t)}:1" for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    if pairs:
        xs = [r.cand.n_prefill / r.cand.n_decode for r in results if r.cand.n_prefill]
        ax.set_xlim(min(xs) / 1.3, max(xs) * 1.3)
    ax.grid(alpha=0.3)
    if pairs:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), title="disaggregated",
                  title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- command line -----------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    from pdserve.sim.cli_sim import add_engine_sim_args
    p.add_argument("--cluster-config", default=None, help="template: model, hardware, memory, link from its "
                   "first instance; devices = the sum of its tp_size")
    p.add_argument("--devices", type=int, default=None,
                   help="devices to divide among instances (default: the sum of --cluster-config's tp_size)")
    p.add_argument("--hardware", default="H100", help="device kind, without --cluster-config")
    p.add_argument("--model", default="meta-llama/Llama-3.1-8B", help="model, without --cluster-config")
    p.add_argument("--link-bw", type=float, default=None, help="GB/s (default: the config's, else 50)")
    p.add_argument("--link-latency", type=float, default=None, help="ns (default: the config's, else 10000)")
    p.add_argument("--dataset", required=True, help="request trace (JSONL; `pdserve sim gen` writes one)")
    p.add_argument("--num-requests", type=int, default=1000,
                   help="trace lines used per simulation; the search's time grows with it (try 200 first)")
    p.add_argument("--slo", nargs="+", required=True, help="ttft_ms=... tpot_ms=... [itl_ms=... e2el_ms=...]")
    p.add_argument("--attainment", type=float, default=0.9, help="share of requests that must meet every SLO")
    p.add_argument("--tp-sizes", type=int, nargs="*", default=None,
                   help="tensor-parallel sizes to search, per role: prefill and decode each take any of them "
                        "that fits the model (default: those of 1 2 4 8 that divide the model's heads); a unit "
                        "of P prefill at tp p and D decode at tp d uses P*p + D*d <= --max-unit devices, and k "
                        "copies of a smaller unit (2P:2D) are not searched apart from it")
    p.add_argument("--max-unit", type=int, default=8, help="most devices in one searched unit (the best is "
                   "replicated to fill --devices)")
    p.add_argument("--tp-profiles", nargs="+", default=None, metavar="PROFILE",
                   help="PROFILE.json files of `pdserve profile -tp N`, one per N: only their tp sizes are "
                        "searched, each instance simulated with its size's (e.g. a -tp 1 and a -tp 2 profile)")
    p.add_argument("--output-dir", default="plan", help="the plan's report, cluster config, up file and plot")
    add_engine_sim_args(p)


def _template(args) -> tuple[InstanceSpec, int, float, float]:
    if args.cluster_config:
        c = load_cluster_config(args.cluster_config)
        devices = args.devices or sum(i.tp_size for i in c.instances)
        return replace(c.instances[0], overrides={}), devices, c.link_bw, c.link_latency
    if not args.devices:
        raise ValueError("give --cluster-config or --devices N (with --hardware and --model)")
    hw = get_hardware(args.hardware)
    get_model(args.model)
    spec = InstanceSpec("t", args.model, hw.name, "both", 1, hw.mem_size, hw.mem_bw)
    return spec, args.devices, 50e9, 10e-6


def run(args: argparse.Namespace) -> int:
    import os
    from pdserve.bench.metrics import parse_slo
    from pdserve.sim.cli_sim import engine_defaults
    from pdserve.sim.perf import load_profile
    slo = parse_slo(args.slo)
    template, devices, link_bw, link_latency = _template(args)
    link_bw = args.link_bw * 1e9 if args.link_bw else link_bw
    link_latency = args.link_latency * 1e-9 if args.link_latency is not None else link_latency
    sessions = read_trace(args.dataset, args.num_requests)
    engine = engine_defaults(args)
    profile = load_profile(args.profile) if args.profile else None
    tp_profiles = {int(load_profile(path).get("tp_size", 1)): os.path.abspath(path) for path in args.tp_profiles or []}
    from tqdm.contrib.logging import logging_redirect_tqdm
    with logging_redirect_tqdm():   # warnings above the progress bar, not through it
        results = plan(template, devices, sessions, slo, args.attainment, args.tp_sizes, args.max_unit, link_bw,
                       link_latency, engine, profile, args.routing, tp_profiles=tp_profiles)
    print(format_table(results, slo, args.attainment))
    best = results[0]
    if best.rate <= 0:
        print("no configuration meets the SLOs at any rate searched")
        return 1
    os.makedirs(args.output_dir, exist_ok=True)
    replicas = max(1, devices // best.cand.devices)
    cluster = build_cluster(template, best.cand, link_bw, link_latency, replicas, tp_profiles)
    paths = {k: os.path.join(args.output_dir, k) for k in ("cluster.json", "up.yaml", "goodput_vs_ratio.png",
                                                              "plan.json")}
    with open(paths["cluster.json"], "w") as f:
        json.dump(cluster.to_json(), f, indent=2)
    with open(paths["up.yaml"], "w") as f:
        f.write(up_config(template.model_name, best.cand, replicas, engine))
    with open(paths["plan.json"], "w") as f:
        json.dump([{"config": r.cand.label, "n_prefill": r.cand.n_prefill, "n_decode": r.cand.n_decode,
                    "p_tp": r.cand.p_tp, "d_tp": r.cand.d_tp, "devices": r.cand.devices, "max_rate": r.rate,
                    "per_device": r.per_device, "summary": r.summary} for r in results], f, indent=1)
    plot(results, paths["goodput_vs_ratio.png"], f"{template.model_name} on {template.hardware}, "
         f"{' '.join(f'{k}={v:g}' for k, v in slo.items())}")
    print(f"\nbest: {best.cand.label} x{replicas} on {best.cand.devices * replicas} of {devices} devices, "
          f"{best.rate * replicas:.2f} req/s in all")
    for k, v in paths.items():
        print(f"  {k:<22} {v}")
    return 0
