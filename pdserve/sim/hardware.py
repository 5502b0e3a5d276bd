"""Accelerator table for the analytical performance model.

Numbers are vendor spec sheets (dense 16-bit tensor FLOP/s, no sparsity; HBM/GDDR bandwidth;
memory size) and the per-device interconnect bandwidth that tensor-parallel all-reduces use.
They are peaks: the performance model applies efficiency factors, and `pdserve profile`
replaces all of this with measurements where they exist.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hardware:
    name: str
    flops: float          # dense fp16/bf16 FLOP/s (fp32 for CPU)
    mem_bw: float         # bytes/s
    mem_size: float       # bytes
    tp_link_bw: float     # bytes/s per device for TP collectives (NVLink, xGMI, or PCIe)
    step_overhead: float  # seconds per engine step not spent in kernels (scheduling, launch)


G, T = 1e9, 1e12
GiB = 1 << 30

HARDWARE = {h.name: h for h in (
    Hardware("H100", 989 * T, 3350 * G, 80 * GiB, 450 * G, 1.0e-3),
    Hardware("H200", 989 * T, 4800 * G, 141 * GiB, 450 * G, 1.0e-3),
    Hardware("B200", 2250 * T, 8000 * G, 180 * GiB, 900 * G, 1.0e-3),
    Hardware("A100", 312 * T, 2039 * G, 80 * GiB, 300 * G, 1.5e-3),
    Hardware("A100-40GB", 312 * T, 1555 * G, 40 * GiB, 300 * G, 1.5e-3),
    Hardware("L40S", 362 * T, 864 * G, 48 * GiB, 32 * G, 1.5e-3),
    Hardware("A6000", 155 * T, 768 * G, 48 * GiB, 32 * G, 1.5e-3),
    Hardware("RTX4090", 165 * T, 1008 * G, 24 * GiB, 32 * G, 1.5e-3),
    Hardware("RTXPRO6000", 504 * T, 1597 * G, 96 * GiB, 64 * G, 1.5e-3),
    Hardware("MI300X", 1307 * T, 5300 * G, 192 * GiB, 448 * G, 1.5e-3),
    # a generic server CPU socket running fp32 PyTorch; only a rough guide, profile instead
    Hardware("CPU", 1.0 * T, 100 * G, 512 * GiB, 50 * G, 5.0e-3),
)}

_ALIASES = {"H100-SXM": "H100", "H100SXM": "H100", "A100-80GB": "A100", "A100SXM": "A100",
            "RTX-PRO-6000": "RTXPRO6000", "RTXPRO6000-BLACKWELL": "RTXPRO6000", "MI300": "MI300X"}


def get_hardware(name: str) -> Hardware:
    key = name.upper().replace(" ", "").replace("_", "-")
    key = _ALIASES.get(key, key)
    for h in HARDWARE.values():
        if h.name.upper() == key:
            return h
    raise ValueError(f"unknown hardware {name!r}; known: {', '.join(HARDWARE)}")
