// The coded linears (linear.cpp) for many rows on AMX: codes are small integers, exact in bfloat16,
// and each float32 input is the exact sum of three bfloat16 parts (its top, middle and bottom 8
// significant bits), so x . w over a group of G inputs = d * sum(x q) + offset * sum(x) with
// sum(x q) = the three parts' bfloat16 tile products, each product exact and summed in float32:
// float32's accuracy (not the FMA tiles' exact order), at the bf16 tiles' speed. Included by
// linear.cpp after the coded panels; compiled where the compiler targets AMX-BF16 (the library is
// built -march=native) and used where Linux grants the process the tile state.
#pragma once
#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512F__)
#include <sys/syscall.h>
#include <unistd.h>

static bool amx_ready() {
  static const bool ok = [] {
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ok;
}

constexpr int64_t AMX_ROWS = 16;    // a tile's rows (and a B tile's k pairs: 2 * 16 = G)
constexpr int64_t AMX_MB = 128;     // rows per block: a group's B tiles are built once for these
static_assert(G == 32 && NR == 48, "the AMX tiles hold a group of 32 k and a panel of 3 x 16 columns");

// x [M, K] as three bfloat16 parts [3][Mp][K] (Mp: M rounded up to whole tiles, zero past M) and
// its sums per group [Mp][K / G], in float32
struct SplitRows {
  at::Tensor parts, sums;
  SplitRows(const float* X, int64_t ldx, int64_t M, int64_t K) {
    const int64_t Mp = (M + AMX_ROWS - 1) / AMX_ROWS * AMX_ROWS;
    parts = at::empty({3, Mp, K}, at::kShort);
    parts.narrow(1, M, Mp - M).zero_();
    sums = at::zeros({Mp, K / G}, at::kFloat);
    uint16_t* pt = reinterpret_cast<uint16_t*>(parts.data_ptr<int16_t>());
    float* sm = sums.data_ptr<float>();
    at::parallel_for(0, M, 16, [&](int64_t mb, int64_t me) {
      for (int64_t m = mb; m < me; ++m)
        for (int64_t g0 = 0; g0 < K; g0 += G) {
          vf sum = vsplat(0.f);
#pragma GCC unroll 4
          for (int64_t k0 = g0; k0 < g0 + G; k0 += VW) {
            const vf x = vload(X + m * ldx + k0);
            const vu top = (vu)x & 0xffff0000u;
            const vf r1 = x - (vf)top;
            const vu mid = (vu)r1 & 0xffff0000u;
            const vf r2 = r1 - (vf)mid;   // at most 8 significant bits left: exact in bfloat16
            const vu bits[3] = {top >> 16, mid >> 16, (vu)r2 >> 16};
            for (int i = 0; i < 3; ++i) {
              const vh h = __builtin_convertvector(bits[i], vh);
              std::memcpy(pt + (i * Mp + m) * K + k0, &h, sizeof h);
            }
            sum += x;
          }
          sm[m * (K / G) + g0 / G] = vsum(sum);
        }
    });
  }
};

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// one 16-row tile's columns J * 16.. over one group: C (tile 0) = the three parts' A (tiles 1-3)
// times B_J (tile 4 + J); then, in vectors, acc += C * d + the rows' group sums * offset. Tile 0
// serves the column tiles in turn, each result stored to a buffer of its own, so the vectors on
// one overlap the next one's products (one C tile each, all products first: 6.6 against 5.8 ms)
template <int J>
static inline void amx_columns(float* acc, float* cbuf, const float* sums, int64_t sums_ld, const float* d,
                               const float* o) {
#define PDSERVE_AMX_PARTS(B) _tile_dpbf16ps(0, 1, B); _tile_dpbf16ps(0, 2, B); _tile_dpbf16ps(0, 3, B)
  _tile_zero(0);
  if constexpr (J == 0) {
    PDSERVE_AMX_PARTS(4);
  } else if constexpr (J == 1) {
    PDSERVE_AMX_PARTS(5);
  } else {
    PDSERVE_AMX_PARTS(6);
  }
#undef PDSERVE_AMX_PARTS
  _tile_stored(0, cbuf, 64);
  const vf dv = vload(d + J * VW), ov = vload(o + J * VW);
#pragma GCC unroll 16
  for (int r = 0; r < AMX_ROWS; ++r) {
    float* a = acc + r * NR + J * VW;
    vstore(a, vfma(vload(cbuf + r * VW), dv, vfma(vbcast(sums + r * sums_ld), ov, vload(a))));
  }
}

// the coded panels on AMX, as CodedPanels (same codes, scale and offset), over rows split once
template <int BITS>
struct AmxCodedPanels {
  CodedPanels<BITS> coded;
  const SplitRows* split;
  static constexpr int64_t buffer = AMX_MB * NR + 2 * 3 * AMX_ROWS * VW;   // acc, 3 C tiles, 3 B tiles
  int64_t block_rows() const { return AMX_MB; }

  // B tile j of group g: row kp holds column c's codes for k = 2 kp, 2 kp + 1 as a bfloat16 pair
  void build_b(const uint8_t* pc, int64_t g, uint32_t* b) const {
    for (int64_t kp = 0; kp < AMX_ROWS; ++kp) {
      const int64_t k = g * G + 2 * kp;
#pragma GCC unroll 3
      for (int j = 0; j < NV; ++j) {
        vi lo, hi;
        if constexpr (BITS == 4) {
          const vi q = vcodes(pc + k / 2 * NR + j * VW);
          lo = q & 15;
          hi = q >> 4;
        } else {
          lo = vcodes(pc + k * NR + j * VW);
          hi = vcodes(pc + (k + 1) * NR + j * VW);
        }
        const vu pair = ((vu)__builtin_convertvector(lo, vf) >> 16) |
                        ((vu)__builtin_convertvector(hi, vf) & 0xffff0000u);
        std::memcpy(b + (j * AMX_ROWS + kp) * VW, &pair, sizeof pair);
      }
    }
  }

  void run(const float*, int64_t, int64_t m0, int64_t m1, int64_t p, int64_t, float* c, int64_t ldc,
           float* buf) const {
    const int64_t K = coded.K, groups = K / G, Mp = split->parts.size(1);
    const int64_t t1 = std::min(Mp, (m1 + AMX_ROWS - 1) / AMX_ROWS * AMX_ROWS);
    const uint8_t* pc = coded.codes_of(p);
    const float *ps = coded.scale_of(p), *po = coded.offset_of(p);
    const uint16_t* parts = reinterpret_cast<const uint16_t*>(split->parts.data_ptr<int16_t>());
    const float* sums = split->sums.data_ptr<float>();
    float *acc = buf, *cbuf = acc + AMX_MB * NR;   // then 3 C buffers, 3 B tiles
    uint32_t* b = reinterpret_cast<uint32_t*>(cbuf + 3 * AMX_ROWS * VW);
    std::fill(acc, acc + (t1 - m0) * NR, 0.f);
    TileConfig cfg;
    for (int t = 0; t < 7; ++t) {
      cfg.colsb[t] = 64;
      cfg.rows[t] = AMX_ROWS;
    }
    _tile_loadconfig(&cfg);
    for (int64_t g = 0; g < groups; ++g) {
      build_b(pc, g, b);
      _tile_loadd(4, b, 64);
      _tile_loadd(5, b + AMX_ROWS * VW, 64);
      _tile_loadd(6, b + 2 * AMX_ROWS * VW, 64);
      const float *d = ps + g * NR, *o = po + g * NR;
      for (int64_t t = m0; t < t1; t += AMX_ROWS) {
        const int64_t stride = K * (int64_t)sizeof(uint16_t);
        _tile_loadd(1, parts + t * K + g * G, stride);
        _tile_loadd(2, parts + (Mp + t) * K + g * G, stride);
        _tile_loadd(3, parts + (2 * Mp + t) * K + g * G, stride);
        float* a = acc + (t - m0) * NR;
        const float* s = sums + t * groups + g;
        amx_columns<0>(a, cbuf, s, groups, d, o);
        amx_columns<1>(a, cbuf + AMX_ROWS * VW, s, groups, d, o);
        amx_columns<2>(a, cbuf + 2 * AMX_ROWS * VW, s, groups, d, o);
      }
    }
    _tile_release();
    for (int64_t m = m0; m < m1; ++m) std::memcpy(c + (m - m0) * ldc, acc + (m - m0) * NR, NR * sizeof(float));
  }
};

// the coded linear on AMX where x has at least min_rows rows and the process may use the tiles;
// false: the caller runs the FMA tiles
template <int BITS, typename Run>
static bool with_amx(const at::Tensor& x, const CodedPanels<BITS>& coded, int64_t min_rows, Run&& run) {
  if (min_rows <= 0 || x.size(0) < min_rows || !amx_ready()) return false;
  const SplitRows split(x.data_ptr<float>(), x.stride(0), x.size(0), x.size(1));
  run(AmxCodedPanels<BITS>{coded, &split});
  return true;
}
#else
static bool amx_ready() { return false; }
template <int BITS, typename Run>
static bool with_amx(const at::Tensor&, const CodedPanels<BITS>&, int64_t, Run&&) {
  return false;
}
#endif
