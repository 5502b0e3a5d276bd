// Decode attention straight from the paged KV cache: one query token per row (see cpu_kernels.py).
#include "common.h"

// softmax over a row's own context, unnormalised: scores s[0, n) become e^(s - max); returns
// 1 / their sum
static inline float softmax_weights(float* s, int64_t n) {
  float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
  for (int64_t t = 0; t < n; ++t) mx = std::max(mx, s[t]);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < n; ++t) {
    const float e = exp_nonpos(s[t] - mx);
    s[t] = e;
    sum += e;
  }
  return 1.f / sum;
}

// one row's attention over its KV heads [h0, h1); DC > 0: the head size, known when compiled
// (every loop over it unrolls and its accumulators stay in registers), 0: the runtime D
template <typename T, typename C, int DC>
static void attend_row(const T* q, const C* cache, const int64_t* tab, int64_t n, T* out,
                       int64_t H, int64_t KVH, int64_t Drt, int64_t bs, int64_t q_head, int64_t v_off,
                       float scale, int64_t h0, int64_t h1, std::vector<float>& s) {
  const int64_t D = DC > 0 ? DC : Drt, G = H / KVH, tok = KVH * D;
  s.resize(G * n);
  for (int64_t kh = h0; kh < h1; ++kh) {
    for (int64_t g = 0; g < G; ++g) {
      const T* qh = q + (kh * G + g) * q_head;
      float qf[DC > 0 ? DC : 512];
      for (int64_t d = 0; d < D; ++d) qf[d] = static_cast<float>(qh[d]) * scale;
      float* sg = s.data() + g * n;
      for (int64_t t0 = 0; t0 < n; t0 += bs) {   // scores, block after block of the row's table
        const C* kb = cache + tab[t0 / bs] * bs * tok + kh * D;
        const C* kn = t0 + bs < n ? cache + tab[t0 / bs + 1] * bs * tok + kh * D : nullptr;
        const int64_t m = std::min(bs, n - t0);
        for (int64_t u = 0; u < m; ++u) {
          const C* k = kb + u * tok;
          if (kn != nullptr && g == 0)   // the next block lies anywhere: ask for it a block ahead
            for (int64_t d = 0; d < D; d += 64 / sizeof(C)) __builtin_prefetch(kn + u * tok + d);
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) dot += qf[d] * static_cast<float>(k[d]);
          sg[t0 + u] = dot;
        }
      }
      const float inv = softmax_weights(sg, n);
      float acc[DC > 0 ? DC : 512] = {};
      for (int64_t t0 = 0; t0 < n; t0 += bs) {
        const C* vb = cache + v_off + tab[t0 / bs] * bs * tok + kh * D;
        const C* vn = t0 + bs < n ? cache + v_off + tab[t0 / bs + 1] * bs * tok + kh * D : nullptr;
        const int64_t m = std::min(bs, n - t0);
        for (int64_t u = 0; u < m; ++u) {
          const C* v = vb + u * tok;
          if (vn != nullptr && g == 0)
            for (int64_t d = 0; d < D; d += 64 / sizeof(C)) __builtin_prefetch(vn + u * tok + d);
          const float p = sg[t0 + u];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) acc[d] += p * static_cast<float>(v[d]);
        }
      }
      T* o = out + (kh * G + g) * D;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[d] * inv);
    }
  }
}

// float or bfloat16 K/V of head size DC (a multiple of the vector width): GB query heads of one
// kv head at a time, their queries and outputs held in vector registers while the kv head's K,
// then V, go by once; per token the K slice is loaded once for all GB heads (attend_row above
// reloads it per head and reduces each dot with scalar code: 2x slower on one thread, 1.3x on two).
template <typename T, typename C, int DC, int GB>
static void attend_group(const T* const* qh, const C* cache, const int64_t* tab, int64_t n,
                         T* const* oh, int64_t bs, int64_t tok, int64_t off, int64_t v_off,
                         float scale, int64_t prefetch, float* s) {
  constexpr int NV = DC / VW;
  vf qv[GB][NV];
  for (int g = 0; g < GB; ++g)
    for (int i = 0; i < NV; ++i) qv[g][i] = vload(qh[g] + i * VW) * scale;
  for (int64_t t0 = 0; t0 < n; t0 += bs) {   // scores
    const C* kb = cache + tab[t0 / bs] * bs * tok + off;
    const C* kn = prefetch && t0 + bs < n ? cache + tab[t0 / bs + 1] * bs * tok + off : nullptr;
    const int64_t m = std::min(bs, n - t0);
    for (int64_t u = 0; u < m; ++u) {
      const C* k = kb + u * tok;
      if (kn != nullptr)   // the next block lies anywhere: ask for it a block ahead
        for (int64_t d = 0; d < prefetch; d += 64 / sizeof(C)) __builtin_prefetch(kn + u * tok + d);
      vf kv[NV];
      for (int i = 0; i < NV; ++i) kv[i] = vload(k + i * VW);
      for (int g = 0; g < GB; ++g) {
        vf a = qv[g][0] * kv[0];
        for (int i = 1; i < NV; ++i) a += qv[g][i] * kv[i];
        s[g * n + t0 + u] = vsum(a);
      }
    }
  }
  float inv[GB];
  for (int g = 0; g < GB; ++g) inv[g] = softmax_weights(s + g * n, n);
  vf acc[GB][NV] = {};
  for (int64_t t0 = 0; t0 < n; t0 += bs) {   // values
    const C* vb = cache + v_off + tab[t0 / bs] * bs * tok + off;
    const C* vn = prefetch && t0 + bs < n ? cache + v_off + tab[t0 / bs + 1] * bs * tok + off : nullptr;
    const int64_t m = std::min(bs, n - t0);
    for (int64_t u = 0; u < m; ++u) {
      const C* v = vb + u * tok;
      if (vn != nullptr)
        for (int64_t d = 0; d < prefetch; d += 64 / sizeof(C)) __builtin_prefetch(vn + u * tok + d);
      vf vv[NV];
      for (int i = 0; i < NV; ++i) vv[i] = vload(v + i * VW);
      for (int g = 0; g < GB; ++g) {
        const vf p = vsplat(s[g * n + t0 + u]);
        for (int i = 0; i < NV; ++i) acc[g][i] += p * vv[i];
      }
    }
  }
  for (int g = 0; g < GB; ++g)
    for (int i = 0; i < NV; ++i) {
      if constexpr (std::is_same_v<T, float>) {
        vstore(oh[g] + i * VW, acc[g][i] * inv[g]);
      } else {
        const vf o = acc[g][i] * inv[g];
        for (int j = 0; j < VW; ++j) oh[g][i * VW + j] = static_cast<T>(o[j]);
      }
    }
}

// attend_row's vector path (float or bfloat16, DC % VW == 0): a kv head's query heads, 4 at a time
template <typename T, typename C, int DC>
static void attend_row_vec(const T* q, const C* cache, const int64_t* tab, int64_t n, T* out,
                           int64_t H, int64_t KVH, int64_t bs, int64_t q_head, int64_t v_off, float scale,
                           int64_t h0, int64_t h1, std::vector<float>& s) {
  const int64_t G = H / KVH, tok = KVH * DC;
  s.resize(std::min<int64_t>(G, 4) * n);
  for (int64_t kh = h0; kh < h1; ++kh) {
    for (int64_t g0 = 0; g0 < G; g0 += 4) {
      const T* qh[4];
      T* oh[4];
      const int64_t gb = std::min<int64_t>(4, G - g0);
      for (int64_t g = 0; g < gb; ++g) {
        qh[g] = q + (kh * G + g0 + g) * q_head;
        oh[g] = out + (kh * G + g0 + g) * DC;
      }
      const int64_t pf = g0 == 0 ? DC : 0;   // later passes over the same kv head find it in cache
      switch (gb) {
        case 1: attend_group<T, C, DC, 1>(qh, cache, tab, n, oh, bs, tok, kh * DC, v_off, scale, pf, s.data()); break;
        case 2: attend_group<T, C, DC, 2>(qh, cache, tab, n, oh, bs, tok, kh * DC, v_off, scale, pf, s.data()); break;
        case 3: attend_group<T, C, DC, 3>(qh, cache, tab, n, oh, bs, tok, kh * DC, v_off, scale, pf, s.data()); break;
        default: attend_group<T, C, DC, 4>(qh, cache, tab, n, oh, bs, tok, kh * DC, v_off, scale, pf, s.data());
      }
    }
  }
}

template <typename T, typename C, int DC>
static void decode(const T* q, const C* cache, const int64_t* tables, const int64_t* lens, T* out,
                   int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t bs, int64_t W,
                   int64_t q_row, int64_t q_head, int64_t v_off, float scale) {
  // a work item is a row's KV heads [h0, h1): whole rows, unless there are fewer rows than threads
  const int64_t P = B >= at::get_num_threads() ? 1 : KVH;
  at::parallel_for(0, B * P, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / P, h0 = (i % P) * (KVH / P);
      if constexpr (vector_type<T> && vector_type<C> && DC > 0 && DC % VW == 0)
        attend_row_vec<T, C, DC>(q + b * q_row, cache, tables + b * W, lens[b], out + b * H * D, H, KVH, bs,
                              q_head, v_off, scale, h0, h0 + KVH / P, s);
      else
        attend_row<T, C, DC>(q + b * q_row, cache, tables + b * W, lens[b], out + b * H * D, H, KVH, D, bs,
                          q_head, v_off, scale, h0, h0 + KVH / P, s);
    }
  });
}

// q [B, H, D] (last dim contiguous); cache [2, blocks, bs, KVH, D] of one layer, contiguous;
// tables [B, W] int64 (a row's first ceil(len / bs) entries are read); lens [B] int64. The cache
// is of q's dtype or, under float q, bfloat16 or half (with_cache_type).
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& tables,
                        const at::Tensor& lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "q must be [B, H, D] with a contiguous last dim");
  TORCH_CHECK(cache.dim() == 5 && cache.is_contiguous(), "cache must be a contiguous [2, N, bs, KVH, D]");
  auto t = tables.to(at::kLong).contiguous();
  auto l = lens.to(at::kLong).contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t bs = cache.size(2), KVH = cache.size(3);
  TORCH_CHECK(cache.size(4) == D && H % KVH == 0 && D <= 512, "head shapes do not match");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B && l.numel() == B, "tables/lens do not match q");
  auto out = at::empty({B, H, D}, q.options());
  const int64_t v_off = cache.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    with_cache_type<scalar_t>(cache.scalar_type(), [&](auto ct) {
      using C = std::remove_const_t<std::remove_pointer_t<decltype(ct)>>;
      auto run = [&](auto dc) {
        decode<scalar_t, C, decltype(dc)::value>(q.data_ptr<scalar_t>(), static_cast<const C*>(cache.data_ptr()),
            t.data_ptr<int64_t>(), l.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), B, H, KVH, D, bs,
            t.size(1), q.stride(0), q.stride(1), v_off, static_cast<float>(scale));
      };
      if (D == 64) run(std::integral_constant<int, 64>());
      else if (D == 128) run(std::integral_constant<int, 128>());
      else run(std::integral_constant<int, 0>());
    });
  });
  return out;
}


TORCH_LIBRARY_FRAGMENT(pdserve_cpu, m) {
  m.def("paged_decode(Tensor q, Tensor cache, Tensor tables, Tensor lens, float scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(pdserve_cpu, CPU, m) { m.impl("paged_decode", &paged_decode); }
