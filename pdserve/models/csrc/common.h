// Shared by the pdserve_cpu ops: pdserve/models/cpu_kernels.py builds every .cpp here into one library.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cstring>
#include <type_traits>
#include <vector>

// e^r for |r| <= ln2 / 2 by its Taylor series to r^7 (relative error < 1e-8 before float
// rounding); V: float or a vector of floats, the same arithmetic either way
template <typename V>
static inline V exp_taylor(V r) {
  V p = r * (1.f / 5040) + 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  return p * r + 1.f;
}

// e^x for x <= 0 (softmax after the max is taken off): x = k ln2 + r, e^r by exp_taylor; plain
// arithmetic, so the compiler vectorizes the loop it sits in (std::exp it would call once per element)
static inline float exp_nonpos(float x) {
  x = std::max(x, -87.f);
  const float k = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - k * 0.693145751953125f - k * 1.428606765330187e-06f;
  const float p = exp_taylor(r);
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// ---- vectors: GCC/Clang vector extensions, lowered to what -march=native has ----------------
// floats per vector register
#if defined(__AVX512F__)
constexpr int VW = 16, REGS = 32;
#else
constexpr int VW = 8, REGS = 16;   // AVX2 (narrower targets: the compiler splits the vectors)
#endif
typedef float vf __attribute__((vector_size(VW * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(VW * sizeof(int32_t))));
typedef uint32_t vu __attribute__((vector_size(VW * sizeof(uint32_t))));
typedef uint16_t vh __attribute__((vector_size(VW * sizeof(uint16_t))));
static inline vf vload(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
// VW bfloat16 values widened to floats (a bfloat16 is a float's upper 16 bits)
static inline vf vload(const c10::BFloat16* p) {
  vh h;
  std::memcpy(&h, p, sizeof h);
  return (vf)(__builtin_convertvector(h, vu) << 16);
}
static inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
// VW floats rounded to bfloat16 as c10::BFloat16(float) rounds them: to nearest, ties to even; NaN
// stays a NaN
static inline void vstore(c10::BFloat16* p, vf v) {
  const vu bits = (vu)v, nan = (vu)(v != v);
  const vu r = ((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16 & ~nan) | (0x7fc0u & nan);
  const vh h = __builtin_convertvector(r, vh);
  std::memcpy(p, &h, sizeof h);
}
static inline vf vsplat(float x) { return vf{} + x; }
// *p in every lane, loaded as a broadcast (vsplat of a loaded float costs an add and a shuffle)
static inline vf vbcast(const float* p) {
#if defined(__AVX512F__)
  return (vf)_mm512_set1_ps(*p);
#elif defined(__AVX2__)
  return (vf)_mm256_broadcast_ss(p);
#else
  return vsplat(*p);
#endif
}
// the sum of a vector's lanes
static inline float vsum(vf v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(v);
#elif defined(__AVX2__)
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
#else
  float r = 0.f;
  for (int j = 0; j < VW; ++j) r += v[j];
  return r;
#endif
}

// element types that vload widens to floats
template <typename T>
constexpr bool vector_type = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>;

// The attention kernels' KV cache element type beside their queries' T: T itself or, under float
// queries, a 16-bit cache (--kv-cache-dtype); f gets a null pointer of that type.
template <typename T, typename F>
static inline void with_cache_type(at::ScalarType cache, F&& f) {
  constexpr at::ScalarType qt = c10::CppTypeToScalarType<T>::value;
  if (cache == qt) return f(static_cast<const T*>(nullptr));
  if constexpr (std::is_same_v<T, float>) {
    if (cache == at::kBFloat16) return f(static_cast<const c10::BFloat16*>(nullptr));
    if (cache == at::kHalf) return f(static_cast<const c10::Half*>(nullptr));
  }
  TORCH_CHECK(false, "a ", cache, " KV cache under ", qt, " queries: the cache must be of the queries' dtype "
              "or, under float queries, BFloat16 or Half");
}

// e^x for x in [-87, 0] on a vector: exp_nonpos's formula, k rounded by the 1.5 * 2^23 trick
static inline vf vexp_nonpos(vf x) {
  const vf lo = vsplat(-87.f), magic = vsplat(12582912.f);
  x = x < lo ? lo : x;
  const vf t = x * 1.44269504088896341f + magic;
  const vf k = t - magic;
  const vf r = x - k * 0.693145751953125f - k * 1.428606765330187e-06f;
  const vf p = exp_taylor(r);
  const vi bits = ((vi)t - (vi)magic + 127) << 23;
  return p * (vf)bits;
}
