"""Per-request CSV rows and the run summary (TTFT, TPOT, ITL, throughput, goodput).

Terms as `vllm bench serve` defines them: TTFT = arrival to first token; ITL = every gap
between consecutive tokens; TPOT = (E2E - TTFT) / (output tokens - 1); goodput = completed
requests per second that meet every SLO (DistServe). CSV times are integer nanoseconds, the
unit of LLMServingSim's traces.
"""
from __future__ import annotations

import csv
import math
from array import array

import numpy as np

_EMPTY = np.empty(0)

CSV_COLUMNS = ["instance_id", "prefill_instance", "request_id", "session_id", "input", "output",
               "arrival", "end_time", "latency", "queuing_delay", "TTFT", "TPOT", "kv_bytes", "kv_time",
               "error", "ITL"]


def _ns(x: float) -> int:
    return int(round(x * 1e9))


class Collector:
    """Receives each finished request once, writes its CSV row, keeps what the summary needs."""

    def __init__(self, csv_path: str | None = None, slo: dict[str, float] | None = None):
        self.slo = slo or {}
        self.ttft, self.tpot, self.e2e, self.queue, self.itl = (array("d") for _ in range(5))
        self.n_in = self.n_out = self.failed = self.good = 0
        self.first_arrival, self.last_end, self.first_end = math.inf, 0.0, math.inf
        self._file = open(csv_path, "w", newline="") if csv_path else None
        self._csv = csv.writer(self._file) if self._file else None
        if self._csv:
            self._csv.writerow(CSV_COLUMNS)

    def add(self, rec) -> None:
        self.first_arrival = min(self.first_arrival, rec.arrival)
        self.last_end = max(self.last_end, rec.end)
        self.first_end = min(self.first_end, rec.end)
        if rec.error:
            self.failed += 1
            if self._csv:
                self._csv.writerow([rec.instance, rec.prefill_instance, rec.request_id, rec.session.session_id or "",
                                    rec.input_toks, 0, _ns(rec.arrival), _ns(rec.end), "", "", "", "", "", "",
                                    rec.error, "[]"])
            return
        times = rec.token_times
        ttft = times[0] - rec.arrival
        e2e = times[-1] - rec.arrival
        n = len(times)
        tpot = (times[-1] - times[0]) / (n - 1) if n > 1 else math.nan
        gaps = np.diff(times) if n > 1 else _EMPTY
        queue = (rec.first_scheduled - rec.arrival) if rec.first_scheduled >= 0 else 0.0
        self.ttft.append(ttft)
        self.e2e.append(e2e)
        self.queue.append(queue)
        if n > 1:
            self.tpot.append(tpot)
        self.itl.frombytes(gaps.tobytes())
        self.n_in += rec.input_toks
        self.n_out += n
        if self._meets(ttft, tpot, e2e):
            self.good += 1
        if self._csv:
            kv_time = _ns(rec.kv_done - rec.kv_start) if rec.kv_done >= 0 else ""
            self._csv.writerow([rec.instance, rec.prefill_instance, rec.request_id, rec.session.session_id or "",
                                rec.input_toks, n, _ns(rec.arrival), _ns(rec.end), _ns(e2e), _ns(queue),
                                _ns(ttft), _ns(tpot) if n > 1 else "", rec.kv_bytes or "", kv_time, "",
                                "[" + ",".join(map(str, np.rint(gaps * 1e9).astype(np.int64).tolist())) + "]"])

    def _meets(self, ttft: float, tpot: float, e2e: float) -> bool:
        s = self.slo
        return (ttft * 1e3 <= s.get("ttft_ms", math.inf)
                and (math.isnan(tpot) or tpot * 1e3 <= s.get("tpot_ms", math.inf))
                and e2e * 1e3 <= s.get("e2e_ms", math.inf))

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None

    def summary(self) -> dict:
        done = len(self.ttft)
        dur = max(self.last_end - self.first_arrival, 1e-12) if done else 0.0
        out = {"completed": done, "failed": self.failed, "duration_s": dur,
               "request_throughput": done / dur if dur else 0.0,
               "input_throughput": self.n_in / dur if dur else 0.0,
               "output_throughput": self.n_out / dur if dur else 0.0,
               "total_input_tokens": self.n_in, "total_output_tokens": self.n_out,
               # departures per second: equals the arrival rate while the cluster keeps up,
               # and its capacity when it does not (the planner's test for "sustained")
               "completion_rate": (done - 1) / (self.last_end - self.first_end)
               if done > 1 and self.last_end > self.first_end else 0.0}
        for name in ("ttft", "tpot", "itl", "e2e", "queue"):
            a = np.frombuffer(getattr(self, name), dtype=np.float64) * 1e3
            out[f"{name}_ms"] = ({"mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
                                  "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99))}
                                 if a.size else {"mean": math.nan, "p50": math.nan, "p90": math.nan, "p99": math.nan})
        if self.slo:
            out["slo"] = dict(self.slo)
            out["goodput"] = self.good / dur if dur else 0.0
            out["slo_attainment"] = self.good / done if done else 0.0
        return out


def format_summary(s: dict) -> str:
    lines = [f"{'completed requests':<28}{s['completed']:>12}",
             f"{'failed requests':<28}{s['failed']:>12}",
             f"{'simulated duration (s)':<28}{s['duration_s']:>12.2f}",
             f"{'request throughput (req/s)':<28}{s['request_throughput']:>12.2f}",
             f"{'input throughput (tok/s)':<28}{s['input_throughput']:>12.1f}",
             f"{'output throughput (tok/s)':<28}{s['output_throughput']:>12.1f}"]
    if "goodput" in s:
        slo = " ".join(f"{k}={v:g}" for k, v in s["slo"].items())
        lines.append(f"{'goodput (req/s)':<28}{s['goodput']:>12.2f}   ({slo}; attained by "
                     f"{s['slo_attainment']:.1%})")
    lines.append(f"{'':<14}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}")
    for name, label in (("ttft", "TTFT ms"), ("tpot", "TPOT ms"), ("itl", "ITL ms"), ("e2e", "E2E ms"),
                        ("queue", "queue ms")):
        m = s[f"{name}_ms"]
        lines.append(f"{label:<14}" + "".join(f"{m[k]:>10.2f}" for k in ("mean", "p50", "p90", "p99")))
    return "\n".join(lines)
