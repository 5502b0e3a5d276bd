"""Per-request CSV rows and the run summary: the summary of `pdserve bench` (pdserve.bench.metrics:
same terms, same keys), of simulated requests, plus the queueing delay and the completion rate.
CSV times are integer nanoseconds, the unit of LLMServingSim's traces.
"""
from __future__ import annotations

import csv
import math
from array import array

import numpy as np

from pdserve.bench.metrics import _stats, error_counts, latency_summary, meets
from pdserve.bench.report import format_summary as _format_bench

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
        self.n_in = self.n_out = self.good = 0
        self.errors: list[str] = []
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
            self.errors.append(rec.error)
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
        if self.slo and meets(self.slo, ttft, tpot if n > 1 else None, gaps.max() if n > 1 else None, e2e):
            self.good += 1
        if self._csv:
            kv_time = _ns(rec.kv_done - rec.kv_start) if rec.kv_done >= 0 else ""
            self._csv.writerow([rec.instance, rec.prefill_instance, rec.request_id, rec.session.session_id or "",
                                rec.input_toks, n, _ns(rec.arrival), _ns(rec.end), _ns(e2e), _ns(queue),
                                _ns(ttft), _ns(tpot) if n > 1 else "", rec.kv_bytes or "", kv_time, "",
                                "[" + ",".join(map(str, np.rint(gaps * 1e9).astype(np.int64).tolist())) + "]"])

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None

    def summary(self) -> dict:
        done = len(self.ttft)
        arrays = [np.frombuffer(getattr(self, name), dtype=np.float64) for name in ("ttft", "tpot", "itl", "e2e")]
        out = latency_summary(self.last_end - self.first_arrival if done else 0.0, done, len(self.errors),
                              self.n_in, self.n_out, *arrays, slo=self.slo, good=self.good)
        out.update(_stats("queue", np.frombuffer(self.queue, dtype=np.float64), (50, 90, 99)))
        out["error_counts"] = error_counts(self.errors)
        # departures per second: equals the arrival rate while the cluster keeps up,
        # and its capacity when it does not (the planner's test for "sustained")
        out["completion_rate"] = ((done - 1) / (self.last_end - self.first_end)
                                  if done > 1 and self.last_end > self.first_end else 0.0)
        return out


def format_summary(s: dict) -> str:
    return _format_bench(s, "Simulation Result", duration_label="Simulated duration (s):", extra={
        "Mean queueing delay (ms):": f"{s['mean_queue_ms']:.2f}", "P90 queueing delay (ms):": f"{s['p90_queue_ms']:.2f}",
        "Completion rate (req/s):": f"{s['completion_rate']:.2f}"})
