// float32 linears from a weight packed once into panels of output columns (see cpu_kernels.py):
// y[M, N] = x[M, K] W^T (+ bias), W kept as [P = ceil(N / NR)][K][NR], zero past N; or kept as
// codes (weight_codes.py): W[n, k] = code * scale + offset with one scale and offset per G = 32
// k of a column, codes of 4 or 8 bits, widened to floats block by block in this core's cache.
#include "common.h"

constexpr int NV = 3, NR = NV * VW;       // a panel: NV vectors of output columns
constexpr int MR = REGS >= 32 ? 8 : 4;    // rows per tile: MR * NV accumulators + NV weights + 1 in registers
constexpr int64_t MB = 96;                // rows per block: their inputs stay in this core's cache across the panels
// k per block: a panel's block (27 KB) stays in L1 across a row block's tiles, which then leave the
// core's line fill buffers to the fetch of the next block (576, a block in L2: 32 rows 5%, 64 rows 4% slower)
constexpr int64_t KB = 144;

// t [N, C] (a weight's rows, or its codes, scales or offsets) as panels [P = ceil(N / NR)][C][NR],
// zero past N
static at::Tensor to_panels(const at::Tensor& t) {
  const int64_t N = t.size(0), C = t.size(1), P = (N + NR - 1) / NR;
  auto padded = at::zeros({P * NR, C}, t.options());
  padded.narrow(0, 0, N).copy_(t);
  return padded.view({P, NR, C}).transpose(1, 2).contiguous();
}

at::Tensor pack_linear(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "pack_linear: w must be [N, K] float32");
  return to_panels(w);
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

// ---- coded weights: [P][K * BITS / 8][NR] bytes (4 bits: k even in the low nibble, k + 1 in the
// high), scale and offset [P][K / G][NR] floats; a panel's k block is widened into a buffer in L1
// and the float tiles run over it: the same sums in the same order as over the float panels
constexpr int64_t G = 32;
// VW bytes widened to int32 lanes (GCC scalarizes __builtin_convertvector of a byte vector)
static inline vi vcodes(const uint8_t* p) {
#if defined(__AVX512F__)
  return (vi)_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#elif defined(__AVX2__)
  return (vi)_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
#else
  vi q;
  for (int j = 0; j < VW; ++j) q[j] = p[j];
  return q;
#endif
}

static inline vf vfma(vf a, vf b, vf c) {
#if defined(__AVX512F__)
  return (vf)_mm512_fmadd_ps(a, b, c);
#elif defined(__FMA__)
  return (vf)_mm256_fmadd_ps(a, b, c);
#else
  return a * b + c;
#endif
}

// rows [k0, k1) of a coded panel as floats at buf (row k at buf + (k - k0) * NR), fetching the
// codes and scales one block further on meanwhile (the next block, or the next panel's first)
template <int BITS>
static void widen(const uint8_t* codes, const float* scale, const float* offset, int64_t k0, int64_t k1, float* buf) {
  constexpr int per = 8 / BITS;   // k per byte
  const int64_t ahead = KB / per * NR;
  for (int64_t k = k0; k < k1; k += per) {
    const uint8_t* b = codes + k / per * NR;
    const float *s = scale + k / G * NR, *o = offset + k / G * NR;
    __builtin_prefetch(b + ahead, 0, 2);
    if (k % G == 0) {
      for (int64_t l = 0; l < NR * (int64_t)sizeof(float); l += 64) {
        __builtin_prefetch(reinterpret_cast<const char*>(s + KB / G * NR) + l, 0, 2);
        __builtin_prefetch(reinterpret_cast<const char*>(o + KB / G * NR) + l, 0, 2);
      }
    }
    float* row = buf + (k - k0) * NR;
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) {
      const vi q = vcodes(b + j * VW);
      const vf sv = vload(s + j * VW), ov = vload(o + j * VW);
      if constexpr (BITS == 8) {
        vstore(row + j * VW, vfma(__builtin_convertvector(q, vf), sv, ov));
      } else {
        vstore(row + j * VW, vfma(__builtin_convertvector(q & 15, vf), sv, ov));
        vstore(row + NR + j * VW, vfma(__builtin_convertvector(q >> 4, vf), sv, ov));
      }
    }
  }
}

// panel() over a coded panel: each k block widened into buf (KB * NR floats), then the tiles
template <int BITS>
static void coded_panel(const float* X, int64_t ldx, int64_t m0, int64_t m1, int64_t K, const uint8_t* codes,
                        const float* scale, const float* offset, float* c, int64_t ldc, float* buf) {
  for (int64_t k0 = 0; k0 < K; k0 += KB) {
    const int64_t k1 = std::min(K, k0 + KB);
    widen<BITS>(codes, scale, offset, k0, k1, buf);
    for (int64_t m = m0; m < m1; m += MR)
      tile_rows<MR>((int)std::min<int64_t>(MR, m1 - m), X + m * ldx + k0, ldx, buf, 0, k1 - k0, c + (m - m0) * ldc,
                    ldc, k0 == 0, Prefetch{nullptr, 0, 0});
  }
}

// where a linear's weights come from: pack_linear's float panels ...
struct FloatPanels {
  const float* W;
  int64_t K;
  static constexpr int64_t buffer = 0;
  int64_t block_rows() const { return MB; }
  // panel p's columns for rows [m0, m1) into c; panel `next` is fetched meanwhile
  void run(const float* X, int64_t ldx, int64_t m0, int64_t m1, int64_t p, int64_t next, float* c, int64_t ldc,
           float*) const {
    panel(X, ldx, m0, m1, K, W + p * K * NR, W + next * K * NR, c, ldc);
  }
};

// ... or codes (the next panel's codes come by widen's fetch, which runs on into it)
template <int BITS>
struct CodedPanels {
  const uint8_t* codes;
  const float *scale, *offset;
  int64_t K;
  static constexpr int64_t buffer = KB * NR;
  // panel p's codes, scales and offsets
  const uint8_t* codes_of(int64_t p) const { return codes + p * (K * BITS / 8) * NR; }
  const float* scale_of(int64_t p) const { return scale + p * (K / G) * NR; }
  const float* offset_of(int64_t p) const { return offset + p * (K / G) * NR; }
  // rows per block: a block's k blocks are widened once for its rows, so more rows than MB where
  // they fit in half this core's L2 (widening for 96 rows made a 1,024-token step 5% slower)
  int64_t block_rows() const { return std::max<int64_t>(MB, std::min<int64_t>(480, (1 << 20) / (K * 4) / MR * MR)); }
  void run(const float* X, int64_t ldx, int64_t m0, int64_t m1, int64_t p, int64_t, float* c, int64_t ldc,
           float* buf) const {
    coded_panel<BITS>(X, ldx, m0, m1, K, codes_of(p), scale_of(p), offset_of(p), c, ldc, buf);
  }
};

// the threads take panels; each goes through the rows a block at a time, and within a block through
// its panels: the block's inputs stay in this core's cache while the panels stream past
template <typename Src>
static void linear_tiled(const float* X, int64_t ldx, int64_t M, const Src& src, int64_t P, float* Y, int64_t N) {
  at::parallel_for(0, P, 1, [&](int64_t pb, int64_t pe) {
    std::vector<float> tail;   // the last panel's outputs when N is not a multiple of NR
    std::vector<float> buf(Src::buffer);
    const int64_t mb = src.block_rows();
    for (int64_t m0 = 0; m0 < M; m0 += mb) {
      const int64_t m1 = std::min(M, m0 + mb);
      for (int64_t p = pb; p < pe; ++p) {
        const int64_t n0 = p * NR, cols = std::min<int64_t>(NR, N - n0);
        float* c = Y + m0 * N + n0;
        int64_t ldc = N;
        if (cols < NR) {
          tail.assign((m1 - m0) * NR, 0.f);
          c = tail.data();
          ldc = NR;
        }
        src.run(X, ldx, m0, m1, p, p + 1, c, ldc, buf.data());
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
template <typename Src>
static void linear_silu_tiled(const float* X, int64_t ldx, int64_t M, const Src& src, int64_t I, const float* bias,
                              float* Y) {
  const int64_t PI = I / NR;
  at::parallel_for(0, PI, 1, [&](int64_t pb, int64_t pe) {
    const int64_t mb = src.block_rows();
    std::vector<float> gu(2 * mb * NR);
    std::vector<float> buf(Src::buffer);
    float *g = gu.data(), *u = g + mb * NR;
    for (int64_t m0 = 0; m0 < M; m0 += mb) {
      const int64_t m1 = std::min(M, m0 + mb);
      for (int64_t p = pb; p < pe; ++p) {
        src.run(X, ldx, m0, m1, p, p + PI, g, NR, buf.data());
        src.run(X, ldx, m0, m1, p + PI, p + 1, u, NR, buf.data());
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

#include "linear_amx.h"

static void check_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.scalar_type() == at::kFloat,
              "linear: x must be [M, K] float32 with contiguous rows");
}

static void check_packed(const at::Tensor& x, const at::Tensor& packed, int64_t N) {
  check_rows(x);
  TORCH_CHECK(packed.dim() == 3 && packed.is_contiguous() && packed.size(1) == x.size(1) && packed.size(2) == NR &&
                  packed.size(0) * NR >= N && (packed.size(0) - 1) * NR < N,
              "linear: the packed weight does not match x or N");
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, int64_t N, const c10::optional<at::Tensor>& bias) {
  check_packed(x, packed, N);
  const int64_t M = x.size(0), K = x.size(1), P = packed.size(0);
  auto y = at::empty({M, N}, x.options());
  linear_tiled(x.data_ptr<float>(), x.stride(0), M, FloatPanels{packed.data_ptr<float>(), K}, P, y.data_ptr<float>(),
               N);
  if (bias && bias->defined()) y.add_(*bias);
  return y;
}

static void check_bias(const c10::optional<at::Tensor>& bias, int64_t n, const char* op) {
  TORCH_CHECK(!bias || !bias->defined() ||
                  (bias->numel() == n && bias->is_contiguous() && bias->scalar_type() == at::kFloat),
              op, ": bias must be [", n, "] float32");
}

// x [M, K]; packed: pack_linear of the merged [2I, K] gate/up weight; bias [2I] or none
at::Tensor linear_silu_mul(const at::Tensor& x, const at::Tensor& packed, int64_t I,
                           const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(I > 0 && I % NR == 0, "linear_silu_mul: I must be a multiple of ", NR);
  check_packed(x, packed, 2 * I);
  check_bias(bias, 2 * I, "linear_silu_mul");
  const bool b = bias && bias->defined();
  const int64_t M = x.size(0), K = x.size(1);
  auto y = at::empty({M, I}, x.options());
  linear_silu_tiled(x.data_ptr<float>(), x.stride(0), M, FloatPanels{packed.data_ptr<float>(), K}, I,
                    b ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>());
  return y;
}

// ---- coded weights ------------------------------------------------------------------------------
// q [N, K] uint8 codes (below 2^bits), scale and offset [N, K / G] float32 -> (codes, scale, offset)
// in panels, zero past N
std::tuple<at::Tensor, at::Tensor, at::Tensor> pack_codes(const at::Tensor& q, const at::Tensor& scale,
                                                         const at::Tensor& offset, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "pack_codes: bits must be 4 or 8");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte && q.size(1) % G == 0 && q.size(1) > 0,
              "pack_codes: q must be [N, K] uint8 with K a multiple of ", G);
  const int64_t N = q.size(0), K = q.size(1);
  for (const auto* t : {&scale, &offset})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == N && t->size(1) == K / G && t->scalar_type() == at::kFloat,
                "pack_codes: scale and offset must be [N, K / ", G, "] float32");
  TORCH_CHECK(bits == 8 || q.lt(16).all().item<bool>(), "pack_codes: a 4-bit code above 15");
  at::Tensor c = to_panels(q);
  if (bits == 4) c = c.slice(1, 0, K, 2).bitwise_or(c.slice(1, 1, K, 2).bitwise_left_shift(4)).contiguous();
  return {c, to_panels(scale), to_panels(offset)};
}

static void check_codes(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& offset, int64_t bits,
                        int64_t K, int64_t N) {
  TORCH_CHECK(bits == 4 || bits == 8, "linear: bits must be 4 or 8");
  TORCH_CHECK(K % G == 0 && codes.dim() == 3 && codes.is_contiguous() && codes.scalar_type() == at::kByte &&
                  codes.size(1) == K * bits / 8 && codes.size(2) == NR && codes.size(0) * NR >= N &&
                  (codes.size(0) - 1) * NR < N,
              "linear: the coded weight does not match x or N");
  for (const auto* t : {&scale, &offset})
    TORCH_CHECK(t->dim() == 3 && t->is_contiguous() && t->scalar_type() == at::kFloat && t->size(0) == codes.size(0) &&
                    t->size(1) == K / G && t->size(2) == NR,
                "linear: the coded weight's scale or offset does not match its codes");
}

template <typename F>
static void with_bits(int64_t bits, F&& f) {
  if (bits == 4) return f(std::integral_constant<int, 4>{});
  f(std::integral_constant<int, 8>{});
}

// run(src) with the coded weight as a weight source: AMX's from amx_rows rows on where this build
// and process have it (linear_amx.h), else the FMA tiles'
template <typename Run>
static void with_coded_panels(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                              const at::Tensor& offset, int64_t bits, int64_t amx_rows, Run&& run) {
  with_bits(bits, [&](auto b) {
    constexpr int B = decltype(b)::value;
    const CodedPanels<B> coded{codes.data_ptr<uint8_t>(), scale.data_ptr<float>(), offset.data_ptr<float>(),
                               x.size(1)};
    if (!with_amx(x, coded, amx_rows, run)) run(coded);
  });
}

// amx_rows: from this many rows on, the AMX tiles where this build and process have them
// (linear_amx.h: float32's accuracy, not the FMA tiles' exact order); 0: never
at::Tensor linear_codes(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                        const at::Tensor& offset, int64_t bits, int64_t N, const c10::optional<at::Tensor>& bias,
                        int64_t amx_rows) {
  check_rows(x);
  const int64_t M = x.size(0), K = x.size(1), P = codes.size(0);
  check_codes(codes, scale, offset, bits, K, N);
  auto y = at::empty({M, N}, x.options());
  with_coded_panels(x, codes, scale, offset, bits, amx_rows, [&](const auto& src) {
    linear_tiled(x.data_ptr<float>(), x.stride(0), M, src, P, y.data_ptr<float>(), N);
  });
  if (bias && bias->defined()) y.add_(*bias);
  return y;
}

at::Tensor linear_silu_mul_codes(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                                 const at::Tensor& offset, int64_t bits, int64_t I,
                                 const c10::optional<at::Tensor>& bias, int64_t amx_rows) {
  TORCH_CHECK(I > 0 && I % NR == 0, "linear_silu_mul: I must be a multiple of ", NR);
  check_rows(x);
  const int64_t M = x.size(0), K = x.size(1);
  check_codes(codes, scale, offset, bits, K, 2 * I);
  check_bias(bias, 2 * I, "linear_silu_mul");
  const bool b = bias && bias->defined();
  auto y = at::empty({M, I}, x.options());
  with_coded_panels(x, codes, scale, offset, bits, amx_rows, [&](const auto& src) {
    linear_silu_tiled(x.data_ptr<float>(), x.stride(0), M, src, I, b ? bias->data_ptr<float>() : nullptr,
                      y.data_ptr<float>());
  });
  return y;
}

// whether this build and process run the coded linears' many rows on AMX
bool amx_coded_linears() { return amx_ready(); }

// the floats a coded weight stands for, [N, K], by the kernels' own widening (what weight_codes.py
// checks a weight against, bit for bit, before it keeps the codes)
at::Tensor unpack_codes(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& offset, int64_t bits,
                        int64_t N) {
  TORCH_CHECK(codes.dim() == 3, "unpack_codes: codes must be [P, K * bits / 8, NR]");
  const int64_t K = codes.size(1) * 8 / bits, P = codes.size(0);
  check_codes(codes, scale, offset, bits, K, N);
  auto w = at::empty({P, K, NR}, scale.options());
  with_bits(bits, [&](auto b) {
    constexpr int B = decltype(b)::value;
    const CodedPanels<B> coded{codes.data_ptr<uint8_t>(), scale.data_ptr<float>(), offset.data_ptr<float>(), K};
    at::parallel_for(0, P, 1, [&](int64_t pb, int64_t pe) {
      for (int64_t p = pb; p < pe; ++p)
        for (int64_t k0 = 0; k0 < K; k0 += KB)
          widen<B>(coded.codes_of(p), coded.scale_of(p), coded.offset_of(p), k0, std::min(K, k0 + KB),
                   w.data_ptr<float>() + (p * K + k0) * NR);
    });
  });
  return w.transpose(1, 2).reshape({P * NR, K}).narrow(0, 0, N).contiguous();
}

TORCH_LIBRARY_FRAGMENT(pdserve_cpu, m) {
  m.def("pack_linear(Tensor w) -> Tensor");
  m.def("linear(Tensor x, Tensor packed, int n, Tensor? bias) -> Tensor");
  m.def("linear_silu_mul(Tensor x, Tensor packed, int i, Tensor? bias) -> Tensor");
  m.def("pack_codes(Tensor q, Tensor scale, Tensor offset, int bits) -> (Tensor, Tensor, Tensor)");
  m.def("unpack_codes(Tensor codes, Tensor scale, Tensor offset, int bits, int n) -> Tensor");
  m.def("linear_codes(Tensor x, Tensor codes, Tensor scale, Tensor offset, int bits, int n, Tensor? bias, "
        "int amx_rows=0) -> Tensor");
  m.def("linear_silu_mul_codes(Tensor x, Tensor codes, Tensor scale, Tensor offset, int bits, int i, Tensor? bias, "
        "int amx_rows=0) -> Tensor");
  m.def("amx_coded_linears() -> bool", &amx_coded_linears);
}
TORCH_LIBRARY_IMPL(pdserve_cpu, CPU, m) {
  m.impl("pack_linear", &pack_linear);
  m.impl("linear", &linear);
  m.impl("linear_silu_mul", &linear_silu_mul);
  m.impl("pack_codes", &pack_codes);
  m.impl("unpack_codes", &unpack_codes);
  m.impl("linear_codes", &linear_codes);
  m.impl("linear_silu_mul_codes", &linear_silu_mul_codes);
}
