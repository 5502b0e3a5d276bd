// The elementwise ops around the linears, each in one pass: silu(gate) * up, the rotary embedding.
#include "common.h"

// x [T, 2I]: each row the gate's I values, then the up projection's (the merged gate/up linear's
// output); returns silu(gate) * up [T, I] in one pass, sigmoid from e^-|g| (no overflow either side)
at::Tensor silu_and_mul(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) % 2 == 0, "x must be [T, 2I] with contiguous rows");
  const int64_t T = x.size(0), I = x.size(1) / 2, row = x.stride(0);
  auto out = at::empty({T, I}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, std::max<int64_t>(1, 32768 / std::max<int64_t>(I, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* g = src + t * row;
        const scalar_t* u = g + I;
        scalar_t* o = dst + t * I;
        _Pragma("omp simd")   // (a #pragma cannot sit inside the dispatch macro)
        for (int64_t i = 0; i < I; ++i) {
          const float gf = static_cast<float>(g[i]);
          const float e = exp_nonpos(-std::fabs(gf));
          const float sig = gf >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
          o[i] = static_cast<scalar_t>(gf * sig * static_cast<float>(u[i]));
        }
      }
    });
  });
  return out;
}

// neox-style rotary embedding: x [T, heads, D] (rows and heads strided, as views of the merged qkv
// output), cos/sin [T, D] laid out as RotaryEmbedding's tables (cos twice; -sin, sin): out[d] =
// x[d] cos[d] + x[d +- D/2] sin[d], into a contiguous [T, heads, D]
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0, "x must be [T, heads, D], D even and contiguous");
  const int64_t T = x.size(0), NH = x.size(1), D = x.size(2), h = D / 2;
  auto c = cos.reshape({T, D}).to(at::kFloat).contiguous();
  auto sn = sin.reshape({T, D}).to(at::kFloat).contiguous();
  auto out = at::empty({T, NH, D}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rope", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const float* cp = c.data_ptr<float>();
    const float* sp = sn.data_ptr<float>();
    at::parallel_for(0, T * NH, std::max<int64_t>(1, 16384 / D), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t t = i / NH;
        const scalar_t* a = src + t * x.stride(0) + (i % NH) * x.stride(1);
        scalar_t* o = dst + i * D;
        const float* ct = cp + t * D;
        const float* st = sp + t * D;
        _Pragma("omp simd")
        for (int64_t d = 0; d < h; ++d)
          o[d] = static_cast<scalar_t>(static_cast<float>(a[d]) * ct[d] + static_cast<float>(a[d + h]) * st[d]);
        _Pragma("omp simd")
        for (int64_t d = h; d < D; ++d)
          o[d] = static_cast<scalar_t>(static_cast<float>(a[d]) * ct[d] + static_cast<float>(a[d - h]) * st[d]);
      }
    });
  });
  return out;
}


TORCH_LIBRARY_FRAGMENT(pdserve_cpu, m) {
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
}
TORCH_LIBRARY_IMPL(pdserve_cpu, CPU, m) {
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rope", &rope);
}
