"""The terminal summary and the result JSON (keys as vLLM's `bench serve --save-result`)."""
from __future__ import annotations

import json
from datetime import datetime

from pdserve.bench.metrics import RequestRecord

METRICS = (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
           ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency"))


def format_summary(s: dict, title: str = "Serving Benchmark Result", duration_label: str = "Benchmark duration (s):",
                   extra: dict[str, str] | None = None) -> str:
    """vLLM's table; `extra` rows (label -> value) go in a section of their own before the end."""
    w = 50
    lines = [f"{' ' + title + ' ':=^{w}}"]

    def row(label, value, fmt="{:<40} {:<10}"):
        lines.append(fmt.format(label, value))

    row("Successful requests:", s["completed"])
    row("Failed requests:", s["failed"])
    row(duration_label, f"{s['duration']:.2f}")
    row("Total input tokens:", s["total_input_tokens"])
    row("Total generated tokens:", s["total_output_tokens"])
    row("Request throughput (req/s):", f"{s['request_throughput']:.2f}")
    if "request_goodput" in s:
        row("SLOs (all must hold):", " ".join(f"{k}={v:g}" for k, v in s["slo"].items()))
        row("Request goodput (req/s):", f"{s['request_goodput']:.2f}")
        row("SLO attainment:", f"{100 * s['slo_attainment']:.1f}% ({s['good_requests']}/{s['num_prompts']})")
    row("Input token throughput (tok/s):", f"{s['input_throughput']:.2f}")
    row("Output token throughput (tok/s):", f"{s['output_throughput']:.2f}")
    row("Total token throughput (tok/s):", f"{s['total_token_throughput']:.2f}")
    pcts = sorted((k.split("_")[0] for k in s if k.startswith("p") and k.endswith("_ttft_ms")
                   and k != "p50_ttft_ms"), key=lambda p: float(p[1:]))  # p50 is the median row
    for key, name in METRICS:
        lines.append(f"{' ' + name + ' ':-^{w}}")
        row(f"Mean {key.upper()} (ms):", f"{s[f'mean_{key}_ms']:.2f}")
        row(f"Median {key.upper()} (ms):", f"{s[f'median_{key}_ms']:.2f}")
        for p in pcts:
            row(f"{p.upper()} {key.upper()} (ms):", f"{s[f'{p}_{key}_ms']:.2f}")
    if extra:
        lines.append(f"{' ' + title.split()[0] + ' ':-^{w}}")
        for label, value in extra.items():
            row(label, value)
    if s["error_counts"]:
        lines.append(f"{' Failures ':-^{w}}")
        for msg, n in s["error_counts"].items():
            lines.append(f"{n:>5} x {msg[:200]}")
    lines.append("=" * w)
    return "\n".join(lines)


def result_json(summary: dict, records: list[RequestRecord], meta: dict) -> dict:
    """Flat summary plus vLLM's per-request lists, plus one full record per request."""
    out = {"date": datetime.now().strftime("%Y%m%d-%H%M%S"), "backend": "openai", **meta, **summary}
    out.update(
        input_lens=[r.prompt_len for r in records],
        output_lens=[r.output_tokens for r in records],
        ttfts=[r.ttft if r.success else None for r in records],
        itls=[r.itl for r in records],
        generated_texts=[r.text for r in records],
        errors=[r.error for r in records],
        requests=[r.to_json() for r in records],
    )
    return out


def write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
