// float32 linears from a weight packed once into panels of output columns (see cpu_kernels.py):
// y[M, N] = x[M, K] W^T (+ bias), W kept as [P = ceil(N / NR)][K][NR], zero past N.
#include "common.h"

constexpr int NV = 3, NR = NV * VW;       // a panel: NV vectors of output columns
constexpr int MR = REGS >= 32 ? 8 : 4;    // rows per tile: MR * NV accumulators + NV weights + 1 in registers
constexpr int64_t MB = 96;                // rows per block: their inputs stay in this core's cache across the panels
// k per block: a panel's block (27 KB) stays in L1 across a row block's tiles, which then leave the
// core's line fill buffers to the fetch of the next block (576, a block in L2: 32 rows 5%, 64 rows 4% slower)
constexpr int64_t KB = 144;

at::Tensor pack_linear(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "pack_linear: w must be [N, K] float32");
  const int64_t N = w.size(0), K = w.size(1), P = (N + NR - 1) / NR;
  auto padded = at::zeros({P * NR, K}, w.options());
  padded.narrow(0, 0, N).copy_(w);
  return padded.view({P, NR, K}).transpose(1, 2).contiguous();
}

// a share of the next weight block, fetched towards this core's cache while a tile runs: `lines`
// cache lines from `at`, `per_k` of them each k step
struct Prefetch {
  const char* at;
  int64_t lines;
  int per_k;
};

// acc[MR rows][NR columns] over k in [k0, k1) of one panel, added to c (first: from zero), while
// fetching pf's share of the weight block after this one: a row block's tiles share the fetch out,
// so the weights stream from memory at an even pace instead of in a burst at the block's first tile
template <int R>
static inline void tile(const float* x, int64_t ldx, const float* w, int64_t k0, int64_t k1, float* c, int64_t ldc,
                        bool first, Prefetch pf) {
  vf acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) acc[r][j] = first ? vsplat(0.f) : vload(c + r * ldc + j * VW);
  for (int64_t k = k0; k < k1; ++k) {
    const float* wk = w + k * NR;
    if (pf.lines > 0) {
      for (int j = 0; j < pf.per_k; ++j) __builtin_prefetch(pf.at + 64 * j, 0, 2);
      pf.at += 64 * pf.per_k;
      pf.lines -= pf.per_k;
    }
    vf wv[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) wv[j] = vload(wk + j * VW);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const vf xv = vbcast(x + r * ldx + k);
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[r][j] += xv * wv[j];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) vstore(c + r * ldc + j * VW, acc[r][j]);
}

template <int R>
static void tile_rows(int rows, const float* x, int64_t ldx, const float* w, int64_t k0, int64_t k1, float* c,
                      int64_t ldc, bool first, Prefetch pf) {
  if constexpr (R > 1) {
    if (rows < R) return tile_rows<R - 1>(rows, x, ldx, w, k0, k1, c, ldc, first, pf);
  }
  tile<R>(x, ldx, w, k0, k1, c, ldc, first, pf);
}

// one panel's columns for rows [m0, m1) into c (ldc apart), k block after k block; `next`: the
// weight block to fetch meanwhile once this panel's last block runs (the next panel this thread takes)
static void panel(const float* X, int64_t ldx, int64_t m0, int64_t m1, int64_t K, const float* w, const float* next,
                  float* c, int64_t ldc) {
  const int64_t tiles = (m1 - m0 + MR - 1) / MR;
  for (int64_t k0 = 0; k0 < K; k0 += KB) {
    const int64_t k1 = std::min(K, k0 + KB);
    // the next block (of this panel or the next; as long as this one), a share per tile
    const int64_t lines = (k1 - k0) * NR * (int64_t)sizeof(float) / 64, share = (lines + tiles - 1) / tiles;
    const int per_k = (int)((share + (k1 - k0) - 1) / (k1 - k0));
    const char* nb = reinterpret_cast<const char*>(k1 < K ? w + k1 * NR : next);
    for (int64_t m = m0, t = 0; m < m1; m += MR, ++t)
      tile_rows<MR>((int)std::min<int64_t>(MR, m1 - m), X + m * ldx, ldx, w, k0, k1, c + (m - m0) * ldc, ldc, k0 == 0,
                    Prefetch{nb + 64 * t * share, std::min(share, lines - t * share), per_k});
  }
}

// the threads take panels; each goes through the rows a block at a time, and within a block through
// its panels: the block's inputs stay in this core's cache while the panels stream past
static void linear_tiled(const float* X, int64_t ldx, int64_t M, int64_t K, const float* W, int64_t P, float* Y,
                         int64_t N) {
  at::parallel_for(0, P, 1, [&](int64_t pb, int64_t pe) {
    std::vector<float> tail;   // the last panel's outputs when N is not a multiple of NR
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
      const int64_t m1 = std::min(M, m0 + MB);
      for (int64_t p = pb; p < pe; ++p) {
        const int64_t n0 = p * NR, cols = std::min<int64_t>(NR, N - n0);
        float* c = Y + m0 * N + n0;
        int64_t ldc = N;
        if (cols < NR) {
          tail.assign((m1 - m0) * NR, 0.f);
          c = tail.data();
          ldc = NR;
        }
        panel(X, ldx, m0, m1, K, W + p * K * NR, W + (p + 1) * K * NR, c, ldc);
        if (cols < NR)
          for (int64_t m = m0; m < m1; ++m) std::memcpy(Y + m * N + n0, c + (m - m0) * ldc, cols * sizeof(float));
      }
    }
  });
}

// the gated MLP's first half in one op: silu(x Wg^T + bg) * (x Wu^T + bu) [M, I] from the merged
// gate/up weight's panels (gate's I columns, then up's; I a multiple of NR, so panel p's gate
// columns pair with panel p + I / NR's up columns). A pair's two tiles go to a small buffer in this
// core's cache and only the product reaches memory: no [M, 2I] output written and read back.
static void linear_silu_tiled(const float* X, int64_t ldx, int64_t M, int64_t K, const float* W, int64_t I,
                              const float* bias, float* Y) {
  const int64_t PI = I / NR;
  at::parallel_for(0, PI, 1, [&](int64_t pb, int64_t pe) {
    std::vector<float> gu(2 * MB * NR);
    float *g = gu.data(), *u = g + MB * NR;
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
      const int64_t m1 = std::min(M, m0 + MB);
      for (int64_t p = pb; p < pe; ++p) {
        const float* wg = W + p * K * NR;
        const float* wu = W + (p + PI) * K * NR;
        panel(X, ldx, m0, m1, K, wg, wu, g, NR);
        panel(X, ldx, m0, m1, K, wu, wg + K * NR, u, NR);
        const vf one = vsplat(1.f), zero = vsplat(0.f);
        for (int64_t m = m0; m < m1; ++m)
#pragma GCC unroll 8
          for (int j = 0; j < NV; ++j) {
            vf gv = vload(g + (m - m0) * NR + j * VW), uv = vload(u + (m - m0) * NR + j * VW);
            if (bias) {
              gv += vload(bias + p * NR + j * VW);
              uv += vload(bias + I + p * NR + j * VW);
            }
            const vf e = vexp_nonpos(gv < zero ? gv : -gv);   // as silu_and_mul (elementwise.cpp)
            vstore(Y + m * I + p * NR + j * VW, gv * (gv >= zero ? one / (one + e) : e / (one + e)) * uv);
          }
      }
    }
  });
}

static void check_packed(const at::Tensor& x, const at::Tensor& packed, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.scalar_type() == at::kFloat,
              "linear: x must be [M, K] float32 with contiguous rows");
  TORCH_CHECK(packed.dim() == 3 && packed.is_contiguous() && packed.size(1) == x.size(1) && packed.size(2) == NR &&
                  packed.size(0) * NR >= N && (packed.size(0) - 1) * NR < N,
              "linear: the packed weight does not match x or N");
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, int64_t N, const c10::optional<at::Tensor>& bias) {
  check_packed(x, packed, N);
  const int64_t M = x.size(0), K = x.size(1), P = packed.size(0);
  auto y = at::empty({M, N}, x.options());
  linear_tiled(x.data_ptr<float>(), x.stride(0), M, K, packed.data_ptr<float>(), P, y.data_ptr<float>(), N);
  if (bias && bias->defined()) y.add_(*bias);
  return y;
}

// x [M, K]; packed: pack_linear of the merged [2I, K] gate/up weight; bias [2I] or none
at::Tensor linear_silu_mul(const at::Tensor& x, const at::Tensor& packed, int64_t I,
                           const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(I > 0 && I % NR == 0, "linear_silu_mul: I must be a multiple of ", NR);
  check_packed(x, packed, 2 * I);
  const bool b = bias && bias->defined();
  TORCH_CHECK(!b || (bias->numel() == 2 * I && bias->is_contiguous() && bias->scalar_type() == at::kFloat),
              "linear_silu_mul: bias must be [2I] float32");
  const int64_t M = x.size(0), K = x.size(1);
  auto y = at::empty({M, I}, x.options());
  linear_silu_tiled(x.data_ptr<float>(), x.stride(0), M, K, packed.data_ptr<float>(), I,
                    b ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>());
  return y;
}

TORCH_LIBRARY_FRAGMENT(pdserve_cpu, m) {
  m.def("pack_linear(Tensor w) -> Tensor");
  m.def("linear(Tensor x, Tensor packed, int n, Tensor? bias) -> Tensor");
  m.def("linear_silu_mul(Tensor x, Tensor packed, int i, Tensor? bias) -> Tensor");
}
TORCH_LIBRARY_IMPL(pdserve_cpu, CPU, m) {
  m.impl("pack_linear", &pack_linear);
  m.impl("linear", &linear);
  m.impl("linear_silu_mul", &linear_silu_mul);
}
