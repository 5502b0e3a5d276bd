"""Building blocks shared by the decoder families: RMSNorm, rotary embedding, gated MLP, and the
merged linear that runs several projections of one input as one matmul."""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from pdserve.models.weight_codes import amx_rows


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _cpu_rows(x):
            return _add_rms_norm_op()(x, None, self.weight, self.eps)[1]
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream's step: (s = x + delta, norm(s)); one pass on CPU where the C++ library
    builds (models/cpu_kernels.py), else torch's ops (the same numbers up to rounding)."""
    if _cpu_rows(x) and _cpu_rows(delta):
        return _add_rms_norm_op()(x, delta, norm.weight, norm.eps)
    s = x + delta
    return s, norm(s)


def _cpu_rows(x: torch.Tensor) -> bool:
    """A CPU [T, H] tensor with contiguous rows, and the C++ ops here."""
    return x.device.type == "cpu" and x.dim() == 2 and x.stride(-1) == 1 and _add_rms_norm_op() is not None


def _add_rms_norm_op():
    from pdserve.models.cpu_kernels import add_rms_norm_op
    return add_rms_norm_op()


class Linear(nn.Linear):
    """nn.Linear that can run from a packed copy of its weight on CPU (pack_for_cpu): float32 in
    the panels of pdserve's own kernel (models/cpu_kernels.py) where that library builds, as the
    codes it was dequantized from where it was (models/weight_codes.py), else in oneDNN's blocked
    layout."""
    packed: torch.Tensor | None = None
    panels: torch.Tensor | None = None
    codes: tuple | None = None    # (codes, scale, offset, bits) of weight_codes.find_codes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.panels is not None or self.codes is not None:
            rows = x.reshape(-1, x.shape[-1])
            rows = rows if rows.stride(-1) == 1 else rows.contiguous()
            if self.codes is not None:
                y = torch.ops.pdserve_cpu.linear_codes(rows, *self.codes, self.out_features, self.bias, amx_rows())
            else:
                y = torch.ops.pdserve_cpu.linear(rows, self.panels, self.out_features, self.bias)
            return y.view(*x.shape[:-1], self.out_features)
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    @property
    def panel_width(self) -> int | None:
        """Output columns per panel of pdserve's kernel, when this weight is in its panels."""
        held = self.codes[0] if self.codes is not None else self.panels
        return None if held is None else held.shape[2]

    def pack_for_cpu(self, batch_hint: int = 64, keep_weight: bool = False) -> None:
        """Reorder the weight once: the matmul no longer re-packs it on every call. The plain
        weight is dropped (never two copies) unless another module shares it (a tied lm_head:
        the embedding keeps it anyway)."""
        from pdserve.models.cpu_kernels import linear_op
        from pdserve.models.weight_codes import codes_enabled, find_codes
        w = self.weight.detach()
        if w.dtype == torch.float32 and linear_op() is not None:
            self.codes = find_codes(w) if codes_enabled() else None
            if self.codes is None:
                self.panels = torch.ops.pdserve_cpu.pack_linear(w)
        else:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w, batch_hint)
        if not keep_weight:
            self.weight = None


def pack_linears_for_cpu(model: nn.Module) -> int:
    """Pack every Linear of model (after its weights are loaded); returns how many."""
    if not torch.backends.mkldnn.is_available():
        return 0
    mods = [m for m in model.modules() if isinstance(m, Linear)]
    if mods and not _packable(mods[0].weight.dtype):
        return 0
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    for m in mods:
        m.pack_for_cpu(keep_weight=uses.get(id(m.weight), 0) > 1)
    return len(mods)


def _packable(dtype: torch.dtype) -> bool:
    """oneDNN packs 16-bit weights only on CPUs with native 16-bit support (AVX512-BF16/FP16 or
    AVX-NE-CONVERT); elsewhere (an AVX2-only host) those run unpacked."""
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if dtype == torch.float16:
        return torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return True


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dimension (q/k/v, gate/up):
    one matmul and one pass over the input instead of several. The checkpoint keeps them as
    separate tensors; `shards` names them (siblings of this module) and `sizes` their output
    rows, so the loader copies each into its slice of the merged weight."""

    def __init__(self, in_features: int, shards: dict[str, int], bias: bool):
        super().__init__(in_features, sum(shards.values()), bias=bias)
        self.shards = dict(shards)

    def shard_slice(self, name: str) -> slice:
        start = 0
        for n, size in self.shards.items():
            if n == name:
                return slice(start, start + size)
            start += size
        raise KeyError(name)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return y.split(list(self.shards.values()), dim=-1)


class GatedMLP(nn.Module):
    """gate/up column-parallel, down row-parallel: `tp` (a TPGroup) sums the ranks' partial
    outputs (none: one rank); `intermediate` is this rank's share."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False, tp=None):
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden, {"gate_proj": intermediate, "up_proj": intermediate}, bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu, inter = self.gate_up_proj, self.gate_up_proj.out_features // 2
        nr = gu.panel_width
        if nr is not None and inter % nr == 0 and x.dim() == 2 and x.stride(-1) == 1:
            # pdserve's panels (float32 on CPU): silu(gate) * up out of the matmul's own tiles
            if gu.codes is not None:
                h = torch.ops.pdserve_cpu.linear_silu_mul_codes(x, *gu.codes, inter, gu.bias, amx_rows())
            else:
                h = torch.ops.pdserve_cpu.linear_silu_mul(x, gu.panels, inter, gu.bias)
        else:
            h = silu_and_mul(gu(x))
        y = self.down_proj(h)
        return self.tp.all_reduce(y) if self.tp is not None else y


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of the merged gate/up output [T, 2I]: one pass on CPU where the C++
    library builds (models/cpu_kernels.py), else torch's two ops."""
    if gate_up.device.type == "cpu" and gate_up.dim() == 2:
        from pdserve.models.cpu_kernels import silu_and_mul_op
        op = silu_and_mul_op()
        if op is not None:
            return op(gate_up)
    gate, up = gate_up.chunk(2, -1)
    return F.silu(gate) * up


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies, with the rope scalings Llama-family checkpoints use."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv.float()
    if kind == "linear":
        return (inv / scaling["factor"]).float()
    if kind == "llama3":
        factor = scaling["factor"]
        lo, hi = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = ((old_len / wavelen) - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_len / lo, inv / factor, inv)
        mid = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
        return torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled).float()
    raise ValueError(f"unsupported rope scaling type {kind!r} (supported: default, linear, llama3)")


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding (rotate halves). The tables hold cos twice and (-sin, sin) per
    position, so a rotation is x * cos + roll(x, half) * sin: one fused multiply-add instead of
    chunk, four products and a concatenation. Looked up once per step for all layers."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None):
        super().__init__()
        inv = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv)
        self.register_buffer("cos", torch.cat((freqs.cos(), freqs.cos()), -1), persistent=False)
        self.register_buffer("sin", torch.cat((-freqs.sin(), freqs.sin()), -1), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin rows [T, 1, head_dim] for the step's positions (broadcast over heads)."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; q and k heads may come in one tensor (they share positions).
    One pass on CPU where the C++ library builds (models/cpu_kernels.py)."""
    if x.device.type == "cpu" and x.dim() == 3 and x.stride(-1) == 1:
        from pdserve.models.cpu_kernels import rope_op
        op = rope_op()
        if op is not None:
            return op(x, cos, sin)
    xf = x.float()
    return torch.addcmul(xf * cos, xf.roll(x.shape[-1] // 2, -1), sin).to(x.dtype)
