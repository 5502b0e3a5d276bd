// Prefill attention straight from the paged KV cache: a step's prompt chunks, each query row
// attending causally to its sequence's keys (the cached prefix and the chunk's own, which the
// caller has written into the cache already). Flash-attention style: a tile of query rows walks
// the keys a chunk of KC at a time with a running max and sum, so the scores never leave the
// cache of the core and no copy of K or V is gathered. The query heads that share a KV head are
// tiled together (grouped-query attention reads each key once for all of them).
#include "common.h"
#include <atomic>
#include <climits>

namespace {

// Tile shapes, measured on a 2-core AVX2 host (one 2,000-token prompt, 9 / 3 heads of 64, one
// thread, CPU time): 24 lanes x 32 keys 50 GFLOP/s; 32 x 32 43; 48 x 32 40; 64 x 64 40; 24 x 16 45
constexpr int MV = 3;                   // vectors of (query row, head) lanes per tile
constexpr int MT = MV * VW;             // ... lanes
constexpr int KC = 32;                  // keys per chunk of the running softmax
constexpr int JB = std::min(8, (REGS - 4) / MV);   // keys whose scores are accumulated together
constexpr int DB = std::min(8, (REGS - 4) / MV);   // head dims whose outputs are accumulated together
static_assert(MT % VW == 0 && KC % JB == 0, "tile shapes");

struct Item {
  int64_t seq, kv_head, row0, rows, keys;   // keys: how many this tile reads (its last row's)
};

// One tile: query rows [row0, row0 + rows) of a sequence, the G heads of KV head kh, as MT lanes
// (lane m: row m / G, head m % G; lanes past rows * G are padding). Everything runs across the
// lanes: scores S^T [key][lane], running max / sum per lane, output O^T [d][lane], so each key
// and value element is broadcast from the cache where it lies (no transposed or gathered copy).
// DC: the head size when compiled (0: Drt).
template <typename T, typename C, int DC>
void attend_tile(const Item& it, const T* q, const C* cache, const int64_t* tab, int64_t q_start,
                 int64_t first_pos, T* out, int64_t H, int64_t KVH, int64_t Drt, int64_t bs,
                 int64_t q_row, int64_t q_head, int64_t v_off, float scale, std::vector<float>& buf) {
  const int64_t D = DC > 0 ? DC : Drt, G = H / KVH, tok = KVH * D, kh = it.kv_head, M = it.rows * G;
  const int bs_log2 = __builtin_ctzll(bs);   // bs is a power of two
  buf.resize(2 * D * MT + KC * MT);
  float* Qt = buf.data();   // [D][MT] pre-scaled queries
  float* Ot = Qt + D * MT;  // [D][MT] unnormalised output
  float* St = Ot + D * MT;  // [KC][MT] scores, then weights
  std::fill(Qt, St, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    const T* src = q + (q_start + it.row0 + m / G) * q_row + (kh * G + m % G) * q_head;
    for (int64_t d = 0; d < D; ++d) Qt[d * MT + m] = static_cast<float>(src[d]) * scale;
  }
  vf mx[MV], l[MV];
  vi rowpos[MV];   // each lane's position; padding lanes see every key (their zero queries score 0)
  for (int v = 0; v < MV; ++v) {
    mx[v] = vsplat(-INFINITY);
    l[v] = vf{};
    for (int u = 0; u < VW; ++u) {
      const int64_t m = v * VW + u;
      rowpos[v][u] = m < M ? static_cast<int32_t>(first_pos + it.row0 + m / G) : INT32_MAX;
    }
  }
  const C* krow[KC];
  const C* vrow[KC];
  for (int64_t t0 = 0; t0 < it.keys; t0 += KC) {
    const int64_t kc = std::min<int64_t>(KC, it.keys - t0);
    for (int64_t j = 0; j < KC; ++j) {   // padding keys read key 0 and are masked below
      const int64_t t = j < kc ? t0 + j : 0, slot = (tab[t >> bs_log2] << bs_log2) | (t & (bs - 1));
      krow[j] = cache + slot * tok + kh * D;
      vrow[j] = cache + v_off + slot * tok + kh * D;
    }
    for (int64_t j0 = 0; j0 < KC; j0 += JB) {   // scores: JB keys x MT lanes
      vf acc[JB][MV] = {};
      for (int64_t d = 0; d < D; ++d) {
        const float* qd = Qt + d * MT;
        for (int j = 0; j < JB; ++j) {
          const float k = static_cast<float>(krow[j0 + j][d]);
          for (int v = 0; v < MV; ++v) acc[j][v] += k * vload(qd + v * VW);
        }
      }
      for (int j = 0; j < JB; ++j)
        for (int v = 0; v < MV; ++v) vstore(St + (j0 + j) * MT + v * VW, acc[j][v]);
    }
    vf corr[MV];
    for (int v = 0; v < MV; ++v) {   // causal mask, running max and sum; scores become weights
      vf cmax = vsplat(-INFINITY);
      for (int64_t j = 0; j < KC; ++j) {
        const vf s = vload(St + j * MT + v * VW);
        const vi seen = rowpos[v] >= static_cast<int32_t>(t0 + j);
        const vf sm = j < kc ? (seen ? s : vsplat(-INFINITY)) : vsplat(-INFINITY);
        vstore(St + j * MT + v * VW, sm);
        cmax = cmax > sm ? cmax : sm;
      }
      const vf mnew = mx[v] > cmax ? mx[v] : cmax;   // finite: every lane saw key 0 in chunk 0
      corr[v] = vexp_nonpos(mx[v] - mnew);
      vf sum = vf{};
      for (int64_t j = 0; j < KC; ++j) {
        const vf sm = vload(St + j * MT + v * VW);
        const vf p = sm == vsplat(-INFINITY) ? vf{} : vexp_nonpos(sm - mnew);
        vstore(St + j * MT + v * VW, p);
        sum += p;
      }
      l[v] = l[v] * corr[v] + sum;
      mx[v] = mnew;
    }
    for (int64_t d0 = 0; d0 < D; d0 += DB) {   // weighted values: DB dims x MT lanes
      vf acc[DB][MV];
      for (int b = 0; b < DB; ++b)
        for (int v = 0; v < MV; ++v) acc[b][v] = vload(Ot + (d0 + b) * MT + v * VW) * corr[v];
      for (int64_t j = 0; j < kc; ++j) {
        const C* vr = vrow[j] + d0;
        const float* pj = St + j * MT;
        for (int b = 0; b < DB; ++b) {
          const float x = static_cast<float>(vr[b]);
          for (int v = 0; v < MV; ++v) acc[b][v] += x * vload(pj + v * VW);
        }
      }
      for (int b = 0; b < DB; ++b)
        for (int v = 0; v < MV; ++v) vstore(Ot + (d0 + b) * MT + v * VW, acc[b][v]);
    }
  }
  float inv[MT];
  for (int v = 0; v < MV; ++v) vstore(inv + v * VW, 1.f / l[v]);
  for (int64_t m = 0; m < M; ++m) {
    T* dst = out + (q_start + it.row0 + m / G) * H * D + (kh * G + m % G) * D;
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(Ot[d * MT + m] * inv[m]);
  }
}

}  // namespace

// q [T, H, D] (last dim contiguous): the prompt chunks' queries, sequence after sequence;
// cache [2, blocks, bs, KVH, D] of one layer, contiguous, already holding the chunks' K and V (of
// q's dtype or, under float q, bfloat16 or half: with_cache_type);
// tables [S, W] int64; q_starts, q_lens, ctx_lens [S] int64: a sequence's first row in q, its
// query rows, and its tokens in the cache after this step (the queries are the last q_lens).
at::Tensor paged_prefill(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& tables,
                         const at::Tensor& q_starts, const at::Tensor& q_lens, const at::Tensor& ctx_lens,
                         double scale) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "q must be [T, H, D] with a contiguous last dim");
  TORCH_CHECK(cache.dim() == 5 && cache.is_contiguous(), "cache must be a contiguous [2, N, bs, KVH, D]");
  auto tab = tables.to(at::kLong).contiguous();
  auto st = q_starts.to(at::kLong).contiguous(), ql = q_lens.to(at::kLong).contiguous(),
       cl = ctx_lens.to(at::kLong).contiguous();
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), bs = cache.size(2), KVH = cache.size(3);
  const int64_t S = st.numel(), W = tab.size(1);
  TORCH_CHECK(cache.size(4) == D && H % KVH == 0 && D <= 512 && D % 16 == 0, "head shapes do not match "
              "(the head size must be a multiple of 16)");
  TORCH_CHECK(tab.dim() == 2 && tab.size(0) == S && ql.numel() == S && cl.numel() == S, "tables/lens do not match");
  const int64_t* stp = st.data_ptr<int64_t>();
  const int64_t* qlp = ql.data_ptr<int64_t>();
  const int64_t* clp = cl.data_ptr<int64_t>();
  const int64_t G = H / KVH, rows = MT / std::max<int64_t>(G, 1);   // a tile's query rows
  TORCH_CHECK(G <= MT, "more than ", MT, " query heads per KV head");
  TORCH_CHECK(bs > 0 && (bs & (bs - 1)) == 0, "the block size must be a power of two");
  std::vector<Item> items;
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(qlp[s] >= 1 && clp[s] >= qlp[s] && stp[s] >= 0 && stp[s] + qlp[s] <= T &&
                (clp[s] + bs - 1) / bs <= W, "sequence ", s, " does not fit q or its table");
    const int64_t first = clp[s] - qlp[s];
    for (int64_t r0 = 0; r0 < qlp[s]; r0 += rows)
      for (int64_t kh = 0; kh < KVH; ++kh) {
        const int64_t n = std::min(rows, qlp[s] - r0);
        items.push_back({s, kh, r0, n, first + r0 + n});
      }
  }
  // the dearest tiles first, handed out one at a time: the threads end together
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
    return a.rows * a.keys > b.rows * b.keys;
  });
  auto out = at::empty({T, H, D}, q.options());
  const int64_t v_off = cache.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_prefill", [&] {
    with_cache_type<scalar_t>(cache.scalar_type(), [&](auto ct) {
      using C = std::remove_const_t<std::remove_pointer_t<decltype(ct)>>;
      auto run = [&](auto dc) {
        constexpr int DC = decltype(dc)::value;
        const scalar_t* qp = q.data_ptr<scalar_t>();
        const C* cp = static_cast<const C*>(cache.data_ptr());
        scalar_t* op = out.data_ptr<scalar_t>();
        const int64_t* tp = tab.data_ptr<int64_t>();
        std::atomic<int64_t> next{0};
        const int64_t n = static_cast<int64_t>(items.size());
        at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), n), 1, [&](int64_t, int64_t) {
          std::vector<float> buf;
          for (int64_t i = next++; i < n; i = next++) {
            const Item& it = items[i];
            attend_tile<scalar_t, C, DC>(it, qp, cp, tp + it.seq * W, stp[it.seq], clp[it.seq] - qlp[it.seq], op,
                                         H, KVH, D, bs, q.stride(0), q.stride(1), v_off, static_cast<float>(scale), buf);
          }
        });
      };
      if (D == 64) run(std::integral_constant<int, 64>());
      else if (D == 128) run(std::integral_constant<int, 128>());
      else run(std::integral_constant<int, 0>());
    });
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(pdserve_cpu, m) {
  m.def("paged_prefill(Tensor q, Tensor cache, Tensor tables, Tensor q_starts, Tensor q_lens, "
        "Tensor ctx_lens, float scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(pdserve_cpu, CPU, m) { m.impl("paged_prefill", &paged_prefill); }
