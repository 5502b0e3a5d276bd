// The elementwise ops around the linears, each in one pass: silu(gate) * up, the rotary embedding,
// the residual add with the RMSNorm after it, this step's K and V into the cache.
#include "common.h"

// silu(g) * u over one row, sigmoid from e^-|g| (no overflow either side); float rows in vectors
// (the scalar loop did not vectorize on AVX2: 14 cycles an element)
template <typename T>
static void silu_row(const T* g, const T* u, T* o, int64_t n, int64_t i = 0) {
  for (; i < n; ++i) {
    const float gf = static_cast<float>(g[i]);
    const float e = exp_nonpos(-std::fabs(gf));
    const float sig = gf >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
    o[i] = static_cast<T>(gf * sig * static_cast<float>(u[i]));
  }
}

// float and bfloat16 rows in vectors (bfloat16 widened to float and rounded back, as the scalar loop)
template <typename T>
static void silu_row_vec(const T* g, const T* u, T* o, int64_t n) {
  const vf one = vsplat(1.f), zero = vsplat(0.f);
  int64_t i = 0;
  for (; i + VW <= n; i += VW) {
    const vf gv = vload(g + i), e = vexp_nonpos(gv < zero ? gv : -gv);
    vstore(o + i, gv * (gv >= zero ? one / (one + e) : e / (one + e)) * vload(u + i));
  }
  silu_row<T>(g, u, o, n, i);
}
static void silu_row(const float* g, const float* u, float* o, int64_t n) { silu_row_vec(g, u, o, n); }
static void silu_row(const c10::BFloat16* g, const c10::BFloat16* u, c10::BFloat16* o, int64_t n) {
  silu_row_vec(g, u, o, n);
}

// x [T, 2I]: each row the gate's I values, then the up projection's (the merged gate/up linear's
// output); returns silu(gate) * up [T, I] in one pass
at::Tensor silu_and_mul(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) % 2 == 0, "x must be [T, 2I] with contiguous rows");
  const int64_t T = x.size(0), I = x.size(1) / 2, row = x.stride(0);
  auto out = at::empty({T, I}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, std::max<int64_t>(1, 32768 / std::max<int64_t>(I, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) silu_row(src + t * row, src + t * row + I, dst + t * I, I);
    });
  });
  return out;
}

// one head of rope: o[d] = a[d] cos[d] + a[d +- h] sin[d]; float and bfloat16 in whole vectors
// per half (the scalar loops do not vectorize for bfloat16)
template <typename T>
static void rope_head(const T* a, T* o, const float* ct, const float* st, int64_t D) {
  const int64_t h = D / 2;
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
    if (h % VW == 0) {
      for (int64_t d = 0; d < h; d += VW) {
        const vf lo = vload(a + d), hi = vload(a + d + h);
        vstore(o + d, lo * vload(ct + d) + hi * vload(st + d));
        vstore(o + d + h, hi * vload(ct + d + h) + lo * vload(st + d + h));
      }
      return;
    }
  }
  _Pragma("omp simd")
  for (int64_t d = 0; d < h; ++d)
    o[d] = static_cast<T>(static_cast<float>(a[d]) * ct[d] + static_cast<float>(a[d + h]) * st[d]);
  _Pragma("omp simd")
  for (int64_t d = h; d < D; ++d)
    o[d] = static_cast<T>(static_cast<float>(a[d]) * ct[d] + static_cast<float>(a[d - h]) * st[d]);
}

// neox-style rotary embedding: x [T, heads, D] (rows and heads strided, as views of the merged qkv
// output), cos/sin [T, D] laid out as RotaryEmbedding's tables (cos twice; -sin, sin): out[d] =
// x[d] cos[d] + x[d +- D/2] sin[d], into a contiguous [T, heads, D]
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0, "x must be [T, heads, D], D even and contiguous");
  const int64_t T = x.size(0), NH = x.size(1), D = x.size(2);
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
        rope_head(src + t * x.stride(0) + (i % NH) * x.stride(1), dst + i * D, cp + t * D, sp + t * D, D);
      }
    });
  });
  return out;
}

// one row of add_rms_norm: s = a + d (d null: s is a, not written), o = rms_norm(s) * w
template <typename T>
static void add_rms_norm_row(const T* a, const T* d, T* s, T* o, const float* w, int64_t n, float eps) {
  float sq = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    const T v = d ? static_cast<T>(static_cast<float>(a[i]) + static_cast<float>(d[i])) : a[i];
    if (d) s[i] = v;
    sq += static_cast<float>(v) * static_cast<float>(v);
  }
  const T* src = d ? s : a;
  const float r = 1.f / std::sqrt(sq / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) o[i] = static_cast<T>(static_cast<float>(src[i]) * r * w[i]);
}

// float and bfloat16 rows of whole vectors (a bfloat16 sum is rounded when stored, and normed as stored)
template <typename T>
static void add_rms_norm_row_vec(const T* a, const T* d, T* s, T* o, const float* w, int64_t n, float eps) {
  if (n % VW != 0) return add_rms_norm_row<T>(a, d, s, o, w, n, eps);
  vf acc = vsplat(0.f);
  for (int64_t i = 0; i < n; i += VW) {
    vf v = vload(a + i);
    if (d) {
      vstore(s + i, v + vload(d + i));
      v = vload(s + i);
    }
    acc += v * v;
  }
  const T* src = d ? s : a;
  const vf r = vsplat(1.f / std::sqrt(vsum(acc) / static_cast<float>(n) + eps));
  for (int64_t i = 0; i < n; i += VW) vstore(o + i, vload(src + i) * r * vload(w + i));
}
static void add_rms_norm_row(const float* a, const float* d, float* s, float* o, const float* w, int64_t n,
                             float eps) {
  add_rms_norm_row_vec(a, d, s, o, w, n, eps);
}
static void add_rms_norm_row(const c10::BFloat16* a, const c10::BFloat16* d, c10::BFloat16* s, c10::BFloat16* o,
                             const float* w, int64_t n, float eps) {
  add_rms_norm_row_vec(a, d, s, o, w, n, eps);
}

// The residual stream's add and the RMSNorm after it in one pass over each row: x [T, H] (rows
// contiguous), delta [T, H] or none, weight [H]. Returns (s = x + delta, or x itself without
// delta; rms_norm(s) * weight), s rounded to x's dtype before it is normed (as x + delta would be)
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& delta,
                                                const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [T, H] with contiguous rows");
  const int64_t T = x.size(0), H = x.size(1);
  const bool add = delta.has_value() && delta->defined();
  if (add)
    TORCH_CHECK(delta->sizes() == x.sizes() && delta->stride(1) == 1 && delta->scalar_type() == x.scalar_type(),
                "delta must be shaped and typed as x, rows contiguous");
  auto w = weight.to(at::kFloat).contiguous();
  TORCH_CHECK(w.numel() == H, "weight must have H elements");
  auto sum = add ? at::empty({T, H}, x.options()) : x;
  auto out = at::empty({T, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* dp = add ? delta->data_ptr<scalar_t>() : nullptr;
    scalar_t* sp = sum.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const float* wp = w.data_ptr<float>();
    const int64_t xs = x.stride(0), ds = add ? delta->stride(0) : 0, ss = sum.stride(0);
    at::parallel_for(0, T, std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        add_rms_norm_row(xp + t * xs, add ? dp + t * ds : nullptr, sp + t * ss, op + t * H, wp, H,
                         static_cast<float>(eps));
    });
  });
  return {sum, out};
}

// this step's K and V into their cache slots: cache [2, blocks, bs, KVH, D] of one layer,
// contiguous; k, v [T, KVH, D] (last dim contiguous; rows and heads strided, as views of the
// merged qkv output); slots [T] int64, block * bs + offset. One op for what two index_puts did.
void write_kv(at::Tensor& cache, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots) {
  TORCH_CHECK(cache.dim() == 5 && cache.is_contiguous() && cache.size(0) == 2, "cache must be a contiguous [2, N, bs, KVH, D]");
  const int64_t KVH = cache.size(3), D = cache.size(4), n = cache.size(1) * cache.size(2), T = slots.numel();
  for (const at::Tensor* x : {&k, &v})
    TORCH_CHECK(x->dim() == 3 && x->size(0) == T && x->size(1) == KVH && x->size(2) == D && x->stride(2) == 1 &&
                    x->scalar_type() == cache.scalar_type(), "k and v must be [T, KVH, D] of the cache's dtype");
  auto sl = slots.to(at::kLong).contiguous();
  const int64_t* sp = sl.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(sp[t] >= 0 && sp[t] < n, "slot ", sp[t], " is outside the cache");
  const int64_t bytes = D * cache.element_size(), half = cache.stride(0) * cache.element_size();
  char* base = static_cast<char*>(cache.data_ptr());
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < KVH; ++h) {
      char* dst = base + (sp[t] * KVH + h) * bytes;
      std::memcpy(dst, static_cast<const char*>(k.data_ptr()) + (t * k.stride(0) + h * k.stride(1)) * k.element_size(), bytes);
      std::memcpy(dst + half, static_cast<const char*>(v.data_ptr()) + (t * v.stride(0) + h * v.stride(1)) * v.element_size(), bytes);
    }
}

TORCH_LIBRARY_FRAGMENT(pdserve_cpu, m) {
  m.def("write_kv(Tensor(a!) cache, Tensor k, Tensor v, Tensor slots) -> ()");
  m.def("add_rms_norm(Tensor x, Tensor? delta, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
}
TORCH_LIBRARY_IMPL(pdserve_cpu, CPU, m) {
  m.impl("write_kv", &write_kv);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rope", &rope);
  m.impl("add_rms_norm", &add_rms_norm);
}
