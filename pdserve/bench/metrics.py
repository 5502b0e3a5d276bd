"""Per-request records and the summary, with latency terms as `vllm bench serve` defines them.
The one summary (keys as vLLM's `bench serve --save-result`) of measured (pdserve bench) and
simulated (pdserve sim) requests: `latency_summary`, `meets` and `parse_slo` serve both.

TTFT: request sent -> first streamed chunk carrying text. ITL: every gap between such
chunks. TPOT: (E2E - TTFT) / (output tokens - 1), only for requests with more than one
output token. Goodput (DistServe): requests per second that complete and meet every SLO
given; an ITL SLO applies to each of the request's gaps.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

SLO_KEYS = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")


@dataclass
class RequestRecord:
    index: int
    prompt_len: int              # server usage when given, else the workload's estimate
    max_tokens: int
    start: float = 0.0           # seconds since the benchmark started
    ttft: float = 0.0            # seconds
    itl: list[float] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)  # seconds since the benchmark started
    e2el: float = 0.0
    output_tokens: int = 0       # usage.completion_tokens, else the number of text chunks
    success: bool = False
    error: str = ""
    status: int = 0
    text: str = ""

    @property
    def tpot(self) -> float | None:
        if not self.success or self.output_tokens <= 1:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)

    def to_json(self) -> dict:
        d = asdict(self)
        d["tpot"] = self.tpot
        return d


def parse_slo(items: list[str] | None) -> dict[str, float]:
    """`ttft_ms=500 tpot_ms=50` (or vLLM's `ttft:500 tpot:50`) -> {"ttft_ms": 500.0, ...}."""
    slo = {}
    for item in items or []:
        for part in item.replace(",", " ").split():
            key, sep, val = part.replace(":", "=").partition("=")
            key = key if key.endswith("_ms") else key + "_ms"
            key = {"e2e_ms": "e2el_ms"}.get(key, key)
            if not sep or key not in SLO_KEYS:
                raise ValueError(f"bad SLO {part!r}: use {', '.join(k + '=MS' for k in SLO_KEYS)}")
            slo[key] = float(val)
            if slo[key] <= 0:
                raise ValueError(f"SLO {part!r} must be positive")
    return slo


def meets(slo: dict[str, float], ttft: float, tpot: float | None, max_itl: float | None, e2el: float) -> bool:
    """Whether a completed request's latencies (seconds; tpot and max_itl None for one output
    token) meet every SLO given."""
    inf = float("inf")
    return (ttft * 1e3 <= slo.get("ttft_ms", inf)
            and (tpot is None or tpot * 1e3 <= slo.get("tpot_ms", inf))
            and (max_itl is None or max_itl * 1e3 <= slo.get("itl_ms", inf))
            and e2el * 1e3 <= slo.get("e2el_ms", inf))


def meets_slo(r: RequestRecord, slo: dict[str, float]) -> bool:
    return r.success and meets(slo, r.ttft, r.tpot, max(r.itl) if r.itl else None, r.e2el)


def _stats(name: str, values_s, percentiles: tuple[float, ...]) -> dict:
    a = np.asarray(values_s, dtype=float) * 1e3 if len(values_s) else np.zeros(1)
    out = {f"mean_{name}_ms": float(a.mean()), f"median_{name}_ms": float(np.median(a)),
           f"std_{name}_ms": float(a.std())}
    for p in percentiles:
        out[f"p{p:g}_{name}_ms"] = float(np.percentile(a, p))
    return out


def latency_summary(duration: float, completed: int, failed: int, n_in: int, n_out: int, ttft, tpot, itl, e2el,
                    slo: dict[str, float] | None = None, good: int = 0,
                    percentiles: tuple[float, ...] = (50, 90, 99)) -> dict:
    """The summary from totals and per-request latencies in seconds (ttft, tpot, e2el: one per
    completed request, tpot only where defined; itl: every gap). good: requests meeting `slo`."""
    duration = max(duration, 1e-9)
    total = completed + failed
    s = {
        "duration": duration, "completed": completed, "failed": failed, "num_prompts": total,
        "total_input_tokens": n_in, "total_output_tokens": n_out,
        "request_throughput": completed / duration,
        "input_throughput": n_in / duration, "output_throughput": n_out / duration,
        "total_token_throughput": (n_in + n_out) / duration,
    }
    if slo:
        s.update(slo=slo, good_requests=good, request_goodput=good / duration, slo_attainment=good / max(1, total))
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2el)):
        s.update(_stats(name, values, percentiles))
    return s


def summarize(records: list[RequestRecord], duration: float, slo: dict[str, float] | None = None,
              percentiles: tuple[float, ...] = (50, 90, 99)) -> dict:
    ok = [r for r in records if r.success]
    failed = [r for r in records if not r.success]
    s = latency_summary(duration, len(ok), len(failed), sum(r.prompt_len for r in ok), sum(r.output_tokens for r in ok),
                        [r.ttft for r in ok], [r.tpot for r in ok if r.tpot is not None],
                        [g for r in ok for g in r.itl], [r.e2el for r in ok], slo,
                        sum(meets_slo(r, slo) for r in records) if slo else 0, percentiles)
    s["max_output_tokens_per_s"] = _peak_tokens_per_s(ok)
    s["error_counts"] = error_counts(r.error for r in failed)
    return s


def _peak_tokens_per_s(ok: list[RequestRecord]) -> float:
    """The busiest one-second window of streamed chunks (vLLM reports the same peak)."""
    times = [t for r in ok for t in r.chunk_times]
    if not times:
        return 0.0
    return float(np.bincount(np.floor(np.asarray(times)).astype(int)).max())


def error_counts(errors) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in errors:
        counts[e or "unknown error"] = counts.get(e or "unknown error", 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def throughput_series(records: list[RequestRecord], bin_s: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bin starts, output chunks/s, completed requests/s) over the run."""
    ok = [r for r in records if r.success]
    times = np.asarray([t for r in ok for t in r.chunk_times])
    ends = np.asarray([r.start + r.e2el for r in ok])
    if not len(times):
        return np.zeros(0), np.zeros(0), np.zeros(0)
    nbins = int(np.ceil(max(times.max(), ends.max()) / bin_s)) + 1
    edges = np.arange(nbins + 1) * bin_s
    tok, _ = np.histogram(times, edges)
    req, _ = np.histogram(ends, edges)
    return edges[:-1], tok / bin_s, req / bin_s
