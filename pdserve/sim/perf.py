"""Step-time models: how long one engine step takes for a given batch.

A step is summarised as (pt, pairs, pkv, nd, dctx, ns): prefill tokens computed, their
(query, key) attention pairs, KV tokens the prefill chunks read, decode sequences (one token
each), their total context, and rows sampled. Two models answer with seconds:

- Analytical: a roofline per step, max(FLOPs / compute, bytes / bandwidth), plus the
  tensor-parallel all-reduces and a fixed per-step overhead.
- Profile: interpolation in step times that `pdserve profile` measured on real hardware.
"""
from __future__ import annotations

import bisect
import itertools
import json
import logging
import statistics
from pathlib import Path

from pdserve.sim.hardware import Hardware
from pdserve.sim.models import ModelShape

log = logging.getLogger("pdserve.sim")

# Fractions of peak that serving kernels reach: large GEMMs get ~60% of tensor FLOP/s,
# streaming weights and KV gets ~75% of memory bandwidth (vLLM-class engines on H100/A100).
COMPUTE_EFF = 0.6
MEMORY_EFF = 0.75
ALLREDUCE_LATENCY = 8e-6   # seconds per all-reduce, NCCL small-message floor


class AnalyticalPerf:
    def __init__(self, model: ModelShape, hw: Hardware, tp_size: int = 1, dtype_bytes: int = 2,
                 mem_bw: float | None = None, kv_dtype_bytes: int | None = None):
        """dtype_bytes: the weights' and activations' element size; kv_dtype_bytes: the KV
        cache's (--kv-cache-dtype; default: the same)."""
        self.tp = tp_size
        self.flops = hw.flops * tp_size * COMPUTE_EFF
        self.bw = (mem_bw or hw.mem_bw) * tp_size * MEMORY_EFF
        self.overhead = hw.step_overhead
        self.model = model
        self.weights = model.weight_bytes(dtype_bytes)
        self.kv_tok = model.kv_bytes_per_token(kv_dtype_bytes or dtype_bytes)
        # two all-reduces per layer of tokens x hidden activations, ring: 2(tp-1)/tp of the data
        self.ar_bytes = 2 * model.num_layers * model.hidden_size * dtype_bytes * 2 * (tp_size - 1) / tp_size
        self.ar_fixed = 2 * model.num_layers * ALLREDUCE_LATENCY if tp_size > 1 else 0.0
        self.link = hw.tp_link_bw

    def step_time(self, pt: int, pairs: int, pkv: int, nd: int, dctx: int, ns: int) -> float:
        tokens = pt + nd
        flops = self.model.step_flops(tokens, pairs + dctx, ns)
        bytes_ = self.weights + self.kv_tok * (dctx + pkv + tokens)
        t = max(flops / self.flops, bytes_ / self.bw) + self.overhead
        if self.tp > 1:
            t += self.ar_fixed + tokens * self.ar_bytes / self.link
        return t


def _interp(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise linear; beyond the ends, extend the nearest segment's slope."""
    if len(xs) == 1:
        return ys[0]
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


class ProfilePerf:
    """Step times from PROFILE.json: prefill time by tokens, decode time by (batch, context).

    A mixed step (a prefill chunk beside decodes) costs the prefill plus the decode step less
    what the two share (`overlap`): fitted to the profile's measured mixed steps when it has
    them (the median of prefill + decode - mixed over its points), else the fixed per-step cost
    that the measured prefill curve's intercept gives. Measurements are made non-decreasing in
    tokens, batch and context before use, so that one noisy point cannot make more work look
    cheaper.
    """

    def __init__(self, profile: dict):
        pre = sorted((p["tokens"], p["time_s"]) for p in profile["prefill"])
        self.p_x = [float(x) for x, _ in pre]
        # more work never takes less time: a measurement below a smaller point's is noise
        self.p_y = list(itertools.accumulate((y for _, y in pre), max))
        self.p0 = max(0.0, _interp(self.p_x, self.p_y, 0.0))
        dec = profile["decode"]
        self.b_x = sorted({float(d["batch"]) for d in dec})
        self.c_x = sorted({float(d["context"]) for d in dec})
        grid = {(float(d["batch"]), float(d["context"])): d["time_s"] for d in dec}
        missing = [(b, c) for b in self.b_x for c in self.c_x if (b, c) not in grid]
        if missing:
            raise ValueError(f"profile decode grid is incomplete: no point for (batch, context) {missing[:3]}")
        # one row per batch size: time as a function of context, made non-decreasing in both
        rows = [list(itertools.accumulate((grid[(b, c)] for c in self.c_x), max)) for b in self.b_x]
        for i in range(1, len(rows)):
            rows[i] = [max(a, b) for a, b in zip(rows[i], rows[i - 1])]
        self.rows = rows
        mixed = profile.get("mixed") or []
        if mixed:
            shared = sorted(self.prefill_time(m["tokens"]) + self.decode_time(m["batch"], m["context"]) - m["time_s"]
                            for m in mixed)
            self.overlap = max(0.0, statistics.median(shared))
        else:
            self.overlap = self.p0
        self.meta = {k: profile.get(k) for k in ("model", "device", "dtype", "tp_size", "block_size")}
        # measured by `pdserve profile --serve-calibration`: HTTP/SSE work per step and per sequence
        serve = profile.get("serve_overhead") or {}
        self.serve_step = serve.get("per_step_s", 0.0)
        self.serve_seq = serve.get("per_seq_s", 0.0)

    def prefill_time(self, tokens: float) -> float:
        return max(self.p0, _interp(self.p_x, self.p_y, tokens))

    def decode_time(self, batch: float, context: float) -> float:
        col = [_interp(self.c_x, row, context) for row in self.rows]
        return max(0.0, _interp(self.b_x, col, batch))

    def step_time(self, pt: int, pairs: int, pkv: int, nd: int, dctx: int, ns: int) -> float:
        if nd == 0:
            t = self.prefill_time(pt)
        else:
            t = self.decode_time(nd, dctx / nd)
            if pt:   # a mixed step costs at least its prefill alone, and its decodes alone
                pre = self.prefill_time(pt)
                t = max(pre, t, t + pre - self.overlap)
        return t + self.serve_step + self.serve_seq * ns


def load_profile(path: str | Path) -> dict:
    data = json.loads(Path(path).read_text())
    for key in ("prefill", "decode"):
        if not data.get(key):
            raise ValueError(f"{path}: profile has no {key!r} measurements")
    return data
