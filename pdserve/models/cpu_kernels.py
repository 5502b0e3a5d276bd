"""CPU decode attention straight from the paged KV cache, as a small C++ op built on first use.

The torch backend gathers each decode row's KV blocks into a padded copy and then runs SDPA on
it: per step that copies every row's whole context, for every layer, and pads it to the
group's widest row. This kernel reads each row's K and V where they lie in the cache, once, up
to the row's own length: no copy, no padding. It is built with the system's C++ compiler (the
one torch.compile's CPU backend needs too) into the pdserve cache, keyed by the source, torch
version and CPU; where no compiler works, or with PDSERVE_CPU_KERNELS=0, attention falls back
to the torch backend, which gives the same results.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading

import torch

SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <vector>

template <typename T>
static void decode(const T* q, const T* cache, const int64_t* tables, const int64_t* lens, T* out,
                   int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t bs, int64_t W,
                   int64_t q_row, int64_t q_head, int64_t v_off, float scale) {
  const int64_t G = H / KVH;   // query heads per KV head (grouped-query attention)
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), s;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / KVH, kh = i % KVH, n = lens[b];
      const int64_t* tab = tables + b * W;
      s.resize(G * n);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d)
          qf[g * D + d] = static_cast<float>(q[b * q_row + (kh * G + g) * q_head + d]) * scale;
      for (int64_t t = 0; t < n; ++t) {   // scores: each key once, for all G heads that share it
        const T* k = cache + ((tab[t / bs] * bs + t % bs) * KVH + kh) * D;
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qf.data() + g * D;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) dot += qg[d] * static_cast<float>(k[d]);
          s[g * n + t] = dot;
        }
      }
      for (int64_t g = 0; g < G; ++g) {   // softmax over the row's own context
        float* sg = s.data() + g * n;
        const float m = *std::max_element(sg, sg + n);
        float sum = 0.f;
        for (int64_t t = 0; t < n; ++t) sum += (sg[t] = std::exp(sg[t] - m));
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < n; ++t) sg[t] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < n; ++t) {
        const T* v = cache + v_off + ((tab[t / bs] * bs + t % bs) * KVH + kh) * D;
        for (int64_t g = 0; g < G; ++g) {
          const float p = s[g * n + t];
          float* ag = acc.data() + g * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) ag[d] += p * static_cast<float>(v[d]);
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d)
          out[(b * H + kh * G + g) * D + d] = static_cast<T>(acc[g * D + d]);
    }
  });
}

// q [B, H, D] (last dim contiguous); cache [2, blocks, bs, KVH, D] of one layer, contiguous;
// tables [B, W] int64 (a row's first ceil(len / bs) entries are read); lens [B] int64.
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& tables,
                        const at::Tensor& lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "q must be [B, H, D] with a contiguous last dim");
  TORCH_CHECK(cache.dim() == 5 && cache.is_contiguous(), "cache must be a contiguous [2, N, bs, KVH, D]");
  TORCH_CHECK(q.scalar_type() == cache.scalar_type(), "q and cache dtypes differ");
  auto t = tables.to(at::kLong).contiguous();
  auto l = lens.to(at::kLong).contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t bs = cache.size(2), KVH = cache.size(3);
  TORCH_CHECK(cache.size(4) == D && H % KVH == 0, "head shapes do not match");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B && l.numel() == B, "tables/lens do not match q");
  auto out = at::empty({B, H, D}, q.options());
  const int64_t v_off = cache.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    decode<scalar_t>(q.data_ptr<scalar_t>(), cache.data_ptr<scalar_t>(), t.data_ptr<int64_t>(),
                     l.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), B, H, KVH, D, bs, t.size(1),
                     q.stride(0), q.stride(1), v_off, static_cast<float>(scale));
  });
  return out;
}

TORCH_LIBRARY(pdserve_cpu, m) {
  m.def("paged_decode(Tensor q, Tensor cache, Tensor tables, Tensor lens, float scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(pdserve_cpu, CPU, m) { m.impl("paged_decode", &paged_decode); }
"""

_lock = threading.Lock()
_state: dict = {}


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _build(path: str) -> None:
    from torch.utils.cpp_extension import include_paths
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    tmp = f"{path}.{os.getpid()}.tmp"
    src = tmp + ".cpp"
    with open(src, "w") as f:
        f.write(SOURCE)
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [os.environ.get("CXX", "c++"), "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17",
           f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *[f"-I{p}" for p in include_paths()], src, "-o", tmp,
           f"-L{torch_lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}"]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(tmp, path)   # atomic: a concurrent builder's result is as good as ours
    finally:
        for p in (src, tmp):
            if os.path.exists(p):
                os.unlink(p)


def paged_decode_op():
    """torch.ops.pdserve_cpu.paged_decode, built and loaded once per process; None when disabled
    or when it cannot be built here (the reason is printed once)."""
    with _lock:
        if "op" in _state:
            return _state["op"]
        _state["op"] = None
        if os.environ.get("PDSERVE_CPU_KERNELS", "1") == "0":
            return None
        from pdserve.models.loader import cache_root
        key = hashlib.sha256("\0".join((SOURCE, torch.__version__, _cpu_id())).encode()).hexdigest()[:16]
        path = str(cache_root() / "kernels" / f"paged_decode-{key}.so")
        try:
            if not os.path.exists(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                _build(path)
            torch.ops.load_library(path)
            _state["op"] = torch.ops.pdserve_cpu.paged_decode
        except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            print(f"pdserve: CPU decode attention kernel unavailable, using the torch backend: "
                  f"{detail.strip()[-500:]}", file=sys.stderr)
        return _state["op"]
