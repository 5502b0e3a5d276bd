"""`pdserve bench` (one endpoint) and `pdserve bench compare` (two local deployments)."""
from __future__ import annotations

import argparse
import os
import sys

from pdserve.bench.metrics import parse_slo, summarize
from pdserve.bench.runner import RunConfig, run as run_workload
from pdserve.bench.text import PromptText, load_tokenizer
from pdserve.bench import workloads


def add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("mode", nargs="?", default="run", choices=["run", "compare"],
                   help="run: benchmark --base-url; compare: start --a and --b in turn and compare them")
    p.add_argument("--base-url", default=None, help="server to benchmark, e.g. http://127.0.0.1:8000")
    p.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"],
                   help="API the requests go to")
    p.add_argument("--model", default=None, help="model name in requests (default: the first of /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="sent as a Bearer token (default: $OPENAI_API_KEY, else none)")
    w = p.add_argument_group("workload")
    w.add_argument("--dataset-name", "--workload", dest="dataset_name", default="random",
                   choices=["random", "sharegpt", "prefix", "trace"],
                   help="random lengths, ShareGPT conversations, multi-turn shared prefixes, or a JSONL trace")
    w.add_argument("--dataset-path", default=None, help="ShareGPT JSON file or JSONL trace")
    w.add_argument("--num-prompts", type=int, default=100, help="requests to send")
    w.add_argument("--random-input-len", type=int, default=256, help="random workload: prompt tokens")
    w.add_argument("--random-output-len", type=int, default=64,
                   help="random workload: max_tokens (also for trace rows without one)")
    w.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len*(1-r), len*(1+r)]")
    w.add_argument("--sharegpt-output-len", type=int, default=None,
                   help="max_tokens of ShareGPT requests (default: the length of the recorded reply)")
    w.add_argument("--prefix-len", type=int, default=512, help="prefix workload: shared system prompt tokens")
    w.add_argument("--prefix-num-prefixes", type=int, default=4, help="prefix workload: distinct conversations' prefixes")
    w.add_argument("--prefix-suffix-len", type=int, default=32, help="tokens of each user turn")
    w.add_argument("--prefix-turns", type=int, default=3, help="turns per conversation")
    w.add_argument("--prefix-output-len", type=int, default=32, help="prefix workload: max_tokens per turn")
    w.add_argument("--trace-time-scale", type=float, default=1.0, help="multiply a trace's arrival times")
    w.add_argument("--tokenizer", default=None, help="local tokenizer.json or model directory (exact lengths)")
    w.add_argument("--seed", type=int, default=0, help="seed of prompts, lengths and arrival times")
    a = p.add_argument_group("load")
    a.add_argument("--request-rate", type=float, default=None,
                   help="requests/s (default inf, or a trace's own arrival times)")
    a.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps; 1 = Poisson")
    a.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight (default: no limit)")
    a.add_argument("--ignore-eos", action="store_true", help="ask the server to generate all max_tokens")
    a.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of the requests")
    a.add_argument("--num-warmups", type=int, default=1, help="untimed requests sent first")
    a.add_argument("--request-timeout", type=float, default=600.0, help="seconds one request may take")
    o = p.add_argument_group("output")
    o.add_argument("--slo", "--goodput", dest="slo", nargs="+", default=None,
                   help="SLOs for goodput, e.g. ttft_ms=500 tpot_ms=50 [itl_ms=.. e2el_ms=..]")
    o.add_argument("--metric-percentiles", default="50,90,99", help="comma-separated percentiles reported")
    o.add_argument("--output", "--result-file", dest="output", default=None, help="write result JSON here")
    o.add_argument("--plot", default=None, metavar="DIR", help="write PNG plots here")
    o.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    c = p.add_argument_group("compare")
    c.add_argument("--a", dest="deploy_a", default="up --prefill 1 --decode 1",
                   help="first deployment: `pdserve` arguments, started with --port <free>")
    c.add_argument("--b", dest="deploy_b", default="up --colocated 1", help="second deployment, as --a")
    c.add_argument("--label-a", default=None, help="name of the first deployment in the report (default: --a)")
    c.add_argument("--label-b", default=None, help="name of the second deployment in the report (default: --b)")
    c.add_argument("--sweep-rate", default=None, help="comma-separated request rates, e.g. 1,2,4; random and prefix workloads get new prompts "
                   "at each rate (seed+i) so no rate finds the last one's prompts cached")
    c.add_argument("--out-dir", default="bench-compare", help="compare: report, JSON and plots go here")
    c.add_argument("--ready-timeout", type=float, default=300.0, help="seconds a deployment may take to come up")


def build_workload(args, seed: int | None = None) -> list:
    seed = args.seed if seed is None else seed
    tok = load_tokenizer(args.tokenizer, args.model)
    text = PromptText(tok, seed)
    name, n = args.dataset_name, args.num_prompts
    if name == "random":
        return workloads.random_workload(n, args.random_input_len, args.random_output_len,
                                         args.random_range_ratio, text, seed)
    if name == "prefix":
        return workloads.prefix_workload(n, args.prefix_len, args.prefix_num_prefixes, args.prefix_suffix_len,
                                         args.prefix_turns, args.prefix_output_len, text, seed)
    if not args.dataset_path:
        raise ValueError(f"--dataset-name {name} needs --dataset-path")
    if name == "sharegpt":
        return workloads.sharegpt_workload(args.dataset_path, n, text, seed, args.sharegpt_output_len)
    return workloads.trace_workload(args.dataset_path, n, text, args.random_output_len, args.trace_time_scale)


def run_config(args, base_url: str, rate: float | None) -> RunConfig:
    return RunConfig(base_url=base_url, endpoint=args.endpoint, model=args.model, request_rate=rate,
                     burstiness=args.burstiness, max_concurrency=args.max_concurrency, seed=args.seed,
                     ignore_eos=args.ignore_eos, temperature=args.temperature, timeout_s=args.request_timeout,
                     api_key=args.api_key, num_warmups=args.num_warmups, progress=not args.disable_tqdm)


def percentiles(args) -> tuple[float, ...]:
    return tuple(float(x) for x in args.metric_percentiles.split(",") if x.strip())


def run(args) -> int:
    slo = parse_slo(args.slo)
    if args.mode == "compare":
        return run_compare(args, slo)
    if not args.base_url:
        raise ValueError("--base-url is required (or use `pdserve bench compare`)")
    from pdserve.bench.report import format_summary, result_json, write_json
    requests = build_workload(args)
    records, duration, model = run_workload(requests, run_config(args, args.base_url, args.request_rate))
    summary = summarize(records, duration, slo, percentiles(args))
    print(format_summary(summary))
    meta = {"model_id": model, "base_url": args.base_url, "endpoint": args.endpoint,
            "dataset_name": args.dataset_name, "request_rate": args.request_rate or "inf",
            "burstiness": args.burstiness, "max_concurrency": args.max_concurrency, "seed": args.seed}
    if args.output:
        write_json(args.output, result_json(summary, records, meta))
        print(f"result written to {args.output}", file=sys.stderr)
    if args.plot:
        from pdserve.bench.plots import plot_runs
        for path in plot_runs({args.base_url: records}, args.plot, slo=slo):
            print(f"plot: {path}", file=sys.stderr)
    return 0 if summary["completed"] else 1


def run_compare(args, slo: dict) -> int:
    """`pdserve bench compare`: the same workloads against each deployment in turn (bench.compare)."""
    from pdserve.bench import compare
    rates = ([float(x) for x in args.sweep_rate.split(",")] if args.sweep_rate else [args.request_rate])
    deployments = [(args.label_a or args.deploy_a, args.deploy_a), (args.label_b or args.deploy_b, args.deploy_b)]
    workloads = {rate: build_workload(args, seed=args.seed + i) for i, rate in enumerate(rates)}
    print(compare.cost_message(workloads, len(deployments)), file=sys.stderr)
    os.makedirs(args.out_dir, exist_ok=True)
    results = compare.run_deployments(deployments, workloads.__getitem__,
                                      lambda url, rate: run_config(args, url, rate),
                                      rates, slo, args.out_dir, args.ready_timeout)
    print(compare.write_report(results, args.out_dir, slo))
    compare.save_records(results, args.out_dir)
    print(f"report: {os.path.join(args.out_dir, 'compare.md')}", file=sys.stderr)
    failed = sum(v["summary"]["failed"] for by in results.values() for v in by.values())
    return 1 if failed else 0
