"""CPU ops as a small C++ library built on first use (the sources: csrc/, one op family per
file, compiled as one unit): decode and prefill attention straight from the paged KV cache; the
float32 linears from packed weights; the gated MLP's silu(gate) * up, the rotary embedding,
the residual add with the RMSNorm after it, and the step's K and V into the cache, each in one pass.

The torch backend gathers each decode row's KV blocks into a padded copy and then runs SDPA on
it: per step that copies every row's whole context, for every layer, and pads it to the
group's widest row. The decode kernel reads each row's K and V where they lie in the cache,
once, up to the row's own length: no copy, no padding. Measured on this project's 2-core AVX-512
host (one thread, batch 16 x 200 tokens, 9 heads / 3 KV heads of 64, a 30-layer cache): 2,419 us
per call as first written, 404 us then; what did it: a head size known when compiled (64, 128) so
the accumulators stay in registers, the next block of the table prefetched while one is read,
e^x by a polynomial the compiler vectorizes instead of a std::exp call per score. Later, for
float and bfloat16 caches, a kv head's query heads take each cached token's K and V in vector
registers together (one load per token for all of them, dots summed in vectors): one thread,
64 rows x 175 tokens, 30 layers, 43.9 -> 29.7 ms (two threads 21.3 -> 17 ms, near this host's
memory speed).

The prefill kernel (csrc/prefill_attention.cpp) attends every prompt chunk of a step in one
call, flash-attention style, reading a cached prefix in place where SDPA needs it gathered.
Measured on a 2-core AVX2 host, one thread, CPU time, against paged_attention's SDPA path: a
2,000-token prompt 0.97x, 8 prompts of 155 tokens 1.36x, the 64 prompts of
benchmarks/engine_vs_vllm_cpu.py 1.05x, 512 tokens after 1,500 cached 1.11x, 4 chunks of 256
after 300-700 cached 1.23x.

The float32 linears (csrc/linear.cpp) run from a weight packed once into panels of 3 vectors of
output columns: a tile of 8 rows (4 on AVX2) x one panel sums in registers, the threads take
panels, a block of rows goes past all of a thread's panels while it stays in cache, and while a
block's tiles run they fetch the next weight block between them (without any fetch the first tile
waited on memory: 8 rows 111 GFLOP/s, 168 with it). Measured on a 2-core AVX-512 host, 2 threads,
the model's four layer shapes 30 times over plus its lm_head, GFLOP/s against oneDNN's packed
linear: 8 rows 168 / 105, 64 rows 338 / 275, 128 rows 374 / 338, 1,024 rows (no lm_head) 397-423
/ 412-423; the 64-request workload of benchmarks/engine_vs_vllm_cpu.py: decode steps 9.2-9.3 ->
8.1 s, prefill steps as fast. Later, on another host of the same kind: the fetch shared out over a
block's tiles instead of all at its first (64 rows 55.6 -> 48.8 ms over the shapes above, 16 rows
22.2 -> 19.8); then, timed as the model runs them (its 30 layers' linears in layer order, so the
weights come from memory, not cache), k blocks of 144 (a panel's block in L1) instead of 576: 64
rows 55.4 -> 53.1 ms a step, 32 rows 35.2 -> 33.8; workload decode steps 8.05 -> 7.2-7.3 s. The
gated MLP's first half (linear_silu_mul) takes silu(gate) * up from the gate and up panels' tiles
in cache, so the [T, 2I] product is never written: workload prefill steps 6.9-7.1 -> 6.8 s. Where
the library does not build, oneDNN's packed linear serves.

A float32 weight that a GGUF's 4- or 8-bit blocks spell exactly (the default model's) is kept as
those codes instead (models/weight_codes.py): each k block of a panel is widened to floats in a
buffer in L1 and the same tiles run over it, so the outputs are the float panels' bit for bit
while a decode step reads 0.75-1.25 bytes a weight instead of 4. The model's linears in layer
order, 2 threads: 1 row 19.4 -> 5.9 ms, 8 rows 22.2 -> 9.9, 32 rows 32.5 -> 25.4, 64 rows 52.3 ->
47.1, 1,024 rows 562 -> 572 (a coded row block is as many rows as fit half of L2, up to 480: at
96 rows the widening made a 1,024-token step 5% slower); workload decode steps 6.98 -> 5.78 s,
prefill steps as fast (6.85 s). From 16 rows on, where the CPU has AMX-BF16, a coded linear runs
on the bfloat16 tiles (csrc/linear_amx.h: exact products of the codes and three bfloat16 parts
of each input, float32 sums, then per group the scale and offset in vectors). One 1,024 x 576 x
3,072 linear: FMA tiles 9.5 ms, AMX 7.1 ms with one C tile for all three column tiles, 5.8 ms
with one a column tile, each stored to its own buffer (the vectors of one overlap the next one's
products; the products alone take ~3.1 ms, the per-group vectors ~2.6); the model's linears in
layer order, 2 threads: 16 rows 15.2 -> 12.7 ms, 32 rows 25.4 -> 19.2, 64 rows 47.1 -> 35.0,
1,024 rows 572 -> 439 (8 rows: the AMX tile's 16 rows cost more than the FMA tiles' 8); workload
prefill steps 6.95 -> 5.37 s, decode 5.89 -> 5.38 s.

The library is built with the system's C++ compiler (the one torch.compile's CPU backend needs
too) into the pdserve cache, keyed by the sources, torch version and CPU; where no compiler
works, or with PDSERVE_CPU_KERNELS=0, attention falls back to the torch backend, which gives
the same results.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading

import torch

CSRC = os.path.join(os.path.dirname(__file__), "csrc")   # the C++ sources, one op family per file


def sources() -> list[str]:
    return sorted(os.path.join(CSRC, f) for f in os.listdir(CSRC) if f.endswith((".cpp", ".h")))


def _source_key() -> str:
    h = hashlib.sha256()
    for path in sources():
        with open(path, "rb") as f:
            h.update(os.path.basename(path).encode() + b"\0" + f.read() + b"\0")
    return h.hexdigest()

_lock = threading.Lock()
_state: dict = {}


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _build(path: str) -> None:
    """Compile the sources as one translation unit (torch's headers are parsed once, not per file)."""
    from torch.utils.cpp_extension import include_paths
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    tmp = f"{path}.{os.getpid()}.tmp"
    unit = tmp + ".cpp"
    with open(unit, "w") as f:
        f.writelines(f'#include "{s}"\n' for s in sources() if s.endswith(".cpp"))
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [os.environ.get("CXX", "c++"), "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17",
           f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{CSRC}", *[f"-I{p}" for p in include_paths()], unit, "-o", tmp,
           f"-L{torch_lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}"]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(tmp, path)   # atomic: a concurrent builder's result is as good as ours
    finally:
        for p in (unit, tmp):
            if os.path.exists(p):
                os.unlink(p)


def paged_decode_op():
    """torch.ops.pdserve_cpu.paged_decode, built and loaded once per process; None when disabled
    or when it cannot be built here (the reason is printed once)."""
    return torch.ops.pdserve_cpu.paged_decode if _library() else None


def paged_prefill_op():
    """torch.ops.pdserve_cpu.paged_prefill (None as paged_decode_op)."""
    return torch.ops.pdserve_cpu.paged_prefill if _library() else None


def add_rms_norm_op():
    """torch.ops.pdserve_cpu.add_rms_norm (None as paged_decode_op)."""
    return torch.ops.pdserve_cpu.add_rms_norm if _library() else None


def silu_and_mul_op():
    """torch.ops.pdserve_cpu.silu_and_mul (None as paged_decode_op)."""
    return torch.ops.pdserve_cpu.silu_and_mul if _library() else None


def write_kv_op():
    """torch.ops.pdserve_cpu.write_kv (None as paged_decode_op)."""
    return torch.ops.pdserve_cpu.write_kv if _library() else None


def rope_op():
    """torch.ops.pdserve_cpu.rope (None as paged_decode_op)."""
    return torch.ops.pdserve_cpu.rope if _library() else None


def linear_op():
    """torch.ops.pdserve_cpu.linear, float32 from pack_linear's panels (None as paged_decode_op)."""
    return torch.ops.pdserve_cpu.linear if _library() else None


def _library() -> bool:
    """Whether the library is loaded (built first if this source, torch and CPU have no build yet)."""
    if "op" in _state:   # every layer asks, every step: no lock once decided
        return _state["op"]
    with _lock:
        if "op" not in _state:   # set once the answer is final: a caller meanwhile waits on the lock
            _state["op"] = _load()
        return _state["op"]


def _load() -> bool:
    if os.environ.get("PDSERVE_CPU_KERNELS", "1") == "0":
        return False
    from pdserve.models.loader import cache_root
    key = hashlib.sha256("\0".join((_source_key(), torch.__version__, _cpu_id())).encode()).hexdigest()[:16]
    path = str(cache_root() / "kernels" / f"pdserve_cpu-{key}.so")
    try:
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            _build(path)
        torch.ops.load_library(path)
        return True
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        print(f"pdserve: CPU kernels unavailable, using torch's ops: {detail.strip()[-500:]}", file=sys.stderr)
        return False
