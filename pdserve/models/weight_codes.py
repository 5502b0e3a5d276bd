"""Float32 weights kept as the small integer codes they were made from, when they were.

A model dequantized from a GGUF file (the default model: SmolLM2-135M's Q4_1 linears and Q8_0
embedding) holds float32 values that each group of 32 along a row's inputs spells as
`code * scale + offset`, codes of 4 or 8 bits. The linears of a decode step are bound by the
bytes of their weights (540 MB of float32 a step for the default model), so the CPU kernels keep
such a weight as its codes, a scale and an offset per group (0.75 or 1.25 bytes a weight instead
of 4) and widen each block to floats in the core's cache (csrc/linear.cpp): the same float32
values through the same FMA tiles in the same order, so every output is bit for bit the float
panels' one (below AMX_ROWS rows, or with $PDSERVE_CPU_AMX=0; AMX below).

Groups of GGUF's Q4_0 / Q4_1 (4-bit codes) and Q5_0 / Q5_1 / Q8_0 (kept as 8-bit codes) are
found, each group by its own format. A weight is kept as codes only when the kernels' own
widening (`unpack_codes`) gives back every one of its float32 values, bit for bit but for a
zero's sign (a symmetric format's zero code times a negative scale is -0.0 where the codes give
+0.0; a sum that starts from +0.0 over finite inputs comes out the same with either, so the
outputs are still bit for bit); anything else (a float32 checkpoint, a K-quant's 6-bit
sub-scales, a tensor-parallel shard that splits a group) stays in float panels.
$PDSERVE_CPU_CODES=0 keeps every weight in float panels (for measurements).

From AMX_ROWS rows on, where the CPU has AMX-BF16 and Linux grants the tiles, a coded linear runs
on the bfloat16 tiles instead (csrc/linear_amx.h): a code is exact in bfloat16 and an input the
exact sum of three bfloat16 parts, so each product is exact and only the float32 sums round:
float32's accuracy (bfloat16 parts below 2^-126 flush to zero), not the FMA tiles' exact order.
$PDSERVE_CPU_AMX=0 keeps the FMA tiles.
"""
from __future__ import annotations

import os

import torch

GROUP = 32       # inputs per scale and offset (GGUF's block size; csrc/linear.cpp's G)
ROWS = 4096      # rows searched at a time (bounds the temporaries on a 49,152-row lm_head)
AMX_ROWS = 16    # rows from which the AMX tiles beat the FMA tiles (measured: see cpu_kernels.py)


def codes_enabled() -> bool:
    return os.environ.get("PDSERVE_CPU_CODES", "1") != "0"


def amx_rows() -> int:
    """The coded linears' amx_rows argument: AMX_ROWS, or 0 (never) with $PDSERVE_CPU_AMX=0."""
    return 0 if os.environ.get("PDSERVE_CPU_AMX", "1") == "0" else AMX_ROWS


def find_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
    """(codes, scale, offset, bits) in csrc/linear.cpp's panels if w [N, K] float32 is exactly
    codes * scale + offset per group of GROUP inputs with codes of 4 (tried first) or 8 bits;
    else None."""
    from pdserve.models.cpu_kernels import linear_op
    if w.dim() != 2 or w.dtype != torch.float32 or w.shape[1] % GROUP or w.numel() == 0 or linear_op() is None:
        return None
    for bits in (4, 8):
        found = _spell(w, bits)
        if found is None:
            continue
        packed = torch.ops.pdserve_cpu.pack_codes(*found, bits)
        back = torch.ops.pdserve_cpu.unpack_codes(*packed, bits, w.shape[0])
        if torch.equal(back, w):   # every value (a zero's sign aside: see the module's docstring)
            return (*packed, bits)
    return None


def _steps(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """Candidate steps per group, half-precision as GGUF stores its scales: the group's range over
    the top code (Q4_1, Q5_1: the least value has code 0, the greatest the top one) and its
    largest magnitude over half the codes (Q4_0, Q5_0, Q8_0: symmetric codes, d * (q - 8) and
    the like, whose largest magnitude is 8 d, 16 d or 127 d)."""
    amax = torch.maximum(hi.abs(), lo.abs())
    if bits == 4:
        return [(hi - lo) / 15, amax / 8]
    return [amax / 127, (hi - lo) / 31, amax / 16]


def _spell(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Codes, scales and offsets [N, K], [N, K / GROUP] x 2 that may spell w, or None where some
    group cannot be spelled: the offset is the group's least value (its code 0), the step the
    first of _steps' candidates that gives back each of the group's values. The caller checks the
    result bit for bit with the kernels' own widening."""
    top = (1 << bits) - 1
    tiny = torch.finfo(torch.float32).tiny
    codes, scales, offsets = [], [], []
    for start in range(0, w.shape[0], ROWS):
        g = w[start:start + ROWS].reshape(-1, w.shape[1] // GROUP, GROUP)
        if not torch.isfinite(g).all():
            return None
        lo, hi = g.amin(-1), g.amax(-1)
        done = torch.zeros_like(lo, dtype=torch.bool)
        q_best, step_best = torch.zeros_like(g), torch.zeros_like(lo)
        for step in _steps(lo, hi, bits):
            step = step.half().float()
            q = ((g - lo[..., None]) / step.clamp_min(tiny)[..., None]).round_()
            # q * step is exact for a GGUF's steps, so this is the kernels' fused multiply-add
            back = q * step[..., None] + lo[..., None]
            fits = torch.isfinite(step) & (q <= top).all(-1) & (back == g).all(-1) & ~done
            if fits.all():   # every group by this candidate (the usual case): no copying
                q_best, step_best, done = q, step, fits
                break
            q_best[fits], step_best[fits] = q[fits], step[fits]
            done |= fits
            if done.all():
                break
        if not done.all():   # a checkpoint that is not codes is turned down on its first rows
            return None
        codes.append(q_best.to(torch.uint8).reshape(g.shape[0], -1))
        scales.append(step_best)
        offsets.append(lo)
    return torch.cat(codes), torch.cat(scales), torch.cat(offsets)
