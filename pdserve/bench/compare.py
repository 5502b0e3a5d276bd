"""`pdserve bench compare`: the same workload against two local deployments, side by side."""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Callable

from pdserve.bench.deploy import UpProcess
from pdserve.bench.metrics import summarize
from pdserve.bench.runner import RunConfig, run as run_workload

# rows of the side-by-side table: (label, summary key, format)
ROWS = [("completed / failed", None, None), ("request throughput (req/s)", "request_throughput", "{:.2f}"),
        ("output throughput (tok/s)", "output_throughput", "{:.1f}"),
        ("mean TTFT (ms)", "mean_ttft_ms", "{:.0f}"), ("p50 TTFT (ms)", "median_ttft_ms", "{:.0f}"),
        ("p99 TTFT (ms)", "p99_ttft_ms", "{:.0f}"), ("mean TPOT (ms)", "mean_tpot_ms", "{:.1f}"),
        ("p50 ITL (ms)", "median_itl_ms", "{:.1f}"), ("p99 ITL (ms)", "p99_itl_ms", "{:.1f}"),
        ("p99 E2E (ms)", "p99_e2el_ms", "{:.0f}"), ("goodput (req/s)", "request_goodput", "{:.2f}"),
        ("SLO attainment", "slo_attainment", "{:.0%}")]


def rate_label(rate: float | None) -> str:
    return "inf" if rate is None or math.isinf(rate) else f"{rate:g}"


def run_deployments(deployments: list[tuple], requests: list | Callable[[float | None], list], cfg_for: Callable[[str, float | None], RunConfig],
                    rates: list[float | None], slo: dict, out_dir: str, ready_timeout: float = 300.0,
                    on_ready: Callable[[str, UpProcess], None] | None = None,
                    after_run: Callable[[str, str, UpProcess], None] | None = None,
                    launcher: list[str] | None = None) -> dict:
    """results[label][rate_label] = {"summary": ..., "records": [...]}; one deployment up at a time.

    `deployments`: (label, pdserve arguments[, extra environment]) each. `requests` may be a
    function of the rate: a deployment keeps its prefix cache from one rate to the next, so
    each rate needs prompts of its own (the same ones for every deployment)."""
    results: dict = {}
    for label, spec, *env in deployments:
        print(f"== {label}: pdserve {spec}", file=sys.stderr)
        log = os.path.join(out_dir, f"{_slug(label)}.log")
        with UpProcess(spec, log, ready_timeout, launcher=launcher, env=env[0] if env else None) as dep:
            if on_ready:
                on_ready(label, dep)
            for rate in rates:
                print(f"   rate {rate_label(rate)} req/s", file=sys.stderr)
                reqs = requests(rate) if callable(requests) else requests
                records, duration, _ = run_workload(reqs, cfg_for(dep.url, rate))
                summary = summarize(records, duration, slo)
                results.setdefault(label, {})[rate_label(rate)] = {"summary": summary, "records": records}
                if after_run:  # e.g. read the router's /status while the deployment is up
                    after_run(label, rate_label(rate), dep)
    return results


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s).strip("_") or "run"


def _cell(s: dict, key, fmt) -> str:
    if key is None:
        return f"{s['completed']} / {s['failed']}"
    return fmt.format(s[key]) if key in s else "-"


def markdown_table(results: dict, rate: str) -> str:
    labels = [lb for lb in results if rate in results[lb]]
    lines = [f"| rate {rate} req/s | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for name, key, fmt in ROWS:
        if key and not any(key in results[lb][rate]["summary"] for lb in labels):
            continue
        lines.append(f"| {name} | " + " | ".join(_cell(results[lb][rate]["summary"], key, fmt) for lb in labels) + " |")
    errors = {lb: results[lb][rate]["summary"]["error_counts"] for lb in labels}
    for lb, errs in errors.items():
        for msg, n in errs.items():
            lines.append(f"\n{lb}: {n} failed: `{msg[:200]}`")
    return "\n".join(lines)


def write_report(results: dict, out_dir: str, slo: dict, title: str = "pdserve bench compare") -> str:
    """compare.md, compare.json (summaries) and overlaid plots; returns the markdown."""
    from pdserve.bench import plots
    os.makedirs(out_dir, exist_ok=True)
    rates = list(next(iter(results.values())).keys())
    md = [f"# {title}", "", "Latency terms as `vllm bench serve`: TTFT = sent to first streamed token; "
          "ITL = every gap between streamed tokens; TPOT = (E2E - TTFT) / (output tokens - 1); "
          "goodput = completed requests/s meeting every SLO"
          + (f" ({', '.join(f'{k}={v:g}' for k, v in slo.items())})." if slo else " (no --slo given).")]
    for rate in rates:
        md += ["", markdown_table(results, rate)]
        runs = {lb: results[lb][rate]["records"] for lb in results if rate in results[lb]}
        pngs = plots.plot_runs(runs, out_dir, prefix=f"rate{rate}_", slo=slo)
        md += [""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in pngs[:2]]
    if len(rates) > 1:
        md += ["", "## Against request rate", ""]
        for key, ylabel in (("request_goodput", "goodput (req/s)"), ("p99_ttft_ms", "p99 TTFT (ms)"),
                            ("p99_itl_ms", "p99 ITL (ms)")):
            series = {lb: {float(r): results[lb][r]["summary"].get(key, 0.0) for r in results[lb] if r != "inf"}
                      for lb in results}
            if key == "request_goodput" and not slo:
                continue
            p = plots.metric_vs_rate(series, ylabel, os.path.join(out_dir, f"{key}_vs_rate.png"), f"{ylabel} vs rate")
            md.append(f"![{os.path.basename(p)}]({os.path.basename(p)})")
    text = "\n".join(md) + "\n"
    with open(os.path.join(out_dir, "compare.md"), "w") as f:
        f.write(text)
    summaries = {lb: {r: v["summary"] for r, v in by.items()} for lb, by in results.items()}
    with open(os.path.join(out_dir, "compare.json"), "w") as f:
        json.dump(summaries, f, indent=1)
    return text


def cost_message(workloads: dict, n_deployments: int) -> str:
    """What a compare run will send, and the least time it takes: each rate's schedule spans
    about n/rate seconds; start-up and a server slower than the rate come on top."""
    n = sum(len(w) for w in workloads.values()) * n_deployments
    tokens = sum(r.output_len for w in workloads.values() for r in w) * n_deployments
    paced = [len(w) / rate for rate, w in workloads.items() if rate and rate != float("inf")]
    least = sum(paced) * n_deployments
    rates = ", ".join(rate_label(r) for r in workloads)
    msg = (f"pdserve bench compare: {n} requests ({n_deployments} deployments x {len(workloads)} rate(s) [{rates}] "
           f"x {' / '.join(str(len(w)) for w in workloads.values())} prompts), up to {tokens} output tokens")
    if paced:
        msg += f"; sending alone takes at least {least / 60:.1f} min at these rates"
    return (msg + ", plus each deployment's start-up; a server slower than a rate (a CPU often is) takes longer. "
            "Fewer: --num-prompts, fewer --sweep-rate values.")


def save_records(results: dict, out_dir: str) -> None:
    recs = {lb: {r: [x.to_json() for x in v["records"]] for r, v in by.items()} for lb, by in results.items()}
    with open(os.path.join(out_dir, "compare_requests.json"), "w") as f:
        json.dump(recs, f)

