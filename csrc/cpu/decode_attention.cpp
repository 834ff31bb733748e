// CPU kernel of decode attention (contract: include/pydl/decode_attention.h).
//
// Work items are (batch row b, KV head, split of b's valid prefix), spread over OpenMP threads
// with a dynamic schedule (rows of different lengths cost differently). One item serves the
// G = H / Hkv queries of its KV head from one read of each cache row: positions are taken in
// blocks of kBlock; per block, each K row is loaded (bfloat16 widened to float in registers) and
// dotted with the G scaled queries, the block's scores update each query's
// online softmax (running max m, running sum l, rescaling the accumulator once per block), and
// each V row is loaded once and added into the G accumulators (32-byte vectors over the head dim).
// Math in float32 (float64 for float64). Positions at or past a row's length are never touched.
// bfloat16 with G > 1: each block's rows are widened to float once, into scratch rows that the G
// queries read.
//
// Splits: when B * Hkv items would leave threads idle, each row's prefix is cut into `nsplit`
// equal parts whose (m, l, acc) partials go to a scratch buffer and are combined per (b, h):
//   out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s,  M = max_s m_s.
// A row of length 0 (or whose splits are all empty) gives 0.
// The per-item loops are compiled per ISA level (cpu_utils.h).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_utils.h"
#include "pydl/decode_attention.h"

namespace pydl {
namespace {

using cpu::acc_t;
using cpu::from_acc;
using cpu::to_acc;

constexpr int64_t kBlock = 128;     // positions per softmax block (scores stay in L1)
constexpr int64_t kMinSplit = 256;  // shortest split worth a work item of its own

PYDL_INLINE float exp_acc(float x) { return vmath::exp(x); }
PYDL_INLINE double exp_acc(double x) { return std::exp(x); }

// The per-position loops use explicit 32-byte vectors (cpu::Vec): GCC compiled the earlier
// `omp simd reduction` forms to scalar code (one lane at a time), which held one core to ~2/3 of
// its streaming read rate. W = lanes per vector (8 floats, 4 doubles); E and Ev need not be
// multiples of W (scalar tails).

// out[r] = x · y_r for the 4 cache rows y0..y3 (stored as T, widened in registers): four
// independent vector accumulators, then one lane sum each.
template <typename T>
PYDL_INLINE void dot4(const acc_t<T>* x, const T* y0, const T* y1, const T* y2, const T* y3,
                      int64_t n, acc_t<T>* out) {
  using A = acc_t<T>;
  using VT = cpu::Vec<A>;
  typename VT::V a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int64_t e = 0;
  for (; e + VT::W <= n; e += VT::W) {
    const typename VT::V xe = VT::load(x + e);
    a0 += xe * cpu::load_widened(y0 + e);
    a1 += xe * cpu::load_widened(y1 + e);
    a2 += xe * cpu::load_widened(y2 + e);
    a3 += xe * cpu::load_widened(y3 + e);
  }
  A s0, s1, s2, s3;
  if constexpr (VT::W == 8) {  // the four lane sums at once: 6 shuffles and 4 adds, not 4 x 7 adds
    typedef int32_t Mask __attribute__((vector_size(32)));
    using V = typename VT::V;
    const V p01 = __builtin_shuffle(a0, a1, Mask{0, 8, 1, 9, 4, 12, 5, 13}) +
                  __builtin_shuffle(a0, a1, Mask{2, 10, 3, 11, 6, 14, 7, 15});
    const V p23 = __builtin_shuffle(a2, a3, Mask{0, 8, 1, 9, 4, 12, 5, 13}) +
                  __builtin_shuffle(a2, a3, Mask{2, 10, 3, 11, 6, 14, 7, 15});
    const V q = __builtin_shuffle(p01, p23, Mask{0, 1, 8, 9, 4, 5, 12, 13}) +
                __builtin_shuffle(p01, p23, Mask{2, 3, 10, 11, 6, 7, 14, 15});
    s0 = q[0] + q[4];  // q = (row 0, 1, 2, 3 of lanes 0-3, then of lanes 4-7)
    s1 = q[1] + q[5];
    s2 = q[2] + q[6];
    s3 = q[3] + q[7];
  } else {
    s0 = VT::sum(a0), s1 = VT::sum(a1), s2 = VT::sum(a2), s3 = VT::sum(a3);
  }
  for (; e < n; ++e) {
    s0 += x[e] * to_acc(y0[e]);
    s1 += x[e] * to_acc(y1[e]);
    s2 += x[e] * to_acc(y2[e]);
    s3 += x[e] * to_acc(y3[e]);
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
}

template <typename T>
PYDL_INLINE acc_t<T> dot1(const acc_t<T>* x, const T* y, int64_t n) {
  using VT = cpu::Vec<acc_t<T>>;
  typename VT::V a = {};
  int64_t e = 0;
  for (; e + VT::W <= n; e += VT::W) a += VT::load(x + e) * cpu::load_widened(y + e);
  acc_t<T> s = VT::sum(a);
  for (; e < n; ++e) s += x[e] * to_acc(y[e]);
  return s;
}

// acc[e] += w[0] y0[e] + ... + w[3] y3[e]: one load and store of acc per 4 cache rows.
template <typename T>
PYDL_INLINE void axpy4(acc_t<T>* acc, const acc_t<T>* w, const T* y0, const T* y1, const T* y2,
                       const T* y3, int64_t n) {
  using VT = cpu::Vec<acc_t<T>>;
  const typename VT::V w0 = VT::splat(w[0]), w1 = VT::splat(w[1]), w2 = VT::splat(w[2]),
                       w3 = VT::splat(w[3]);
  int64_t e = 0;
  for (; e + VT::W <= n; e += VT::W) {
    const typename VT::V sum = (w0 * cpu::load_widened(y0 + e) + w1 * cpu::load_widened(y1 + e)) +
                               (w2 * cpu::load_widened(y2 + e) + w3 * cpu::load_widened(y3 + e));
    VT::store(acc + e, VT::load(acc + e) + sum);
  }
  for (; e < n; ++e) {
    acc[e] += (w[0] * to_acc(y0[e]) + w[1] * to_acc(y1[e])) + (w[2] * to_acc(y2[e]) + w[3] * to_acc(y3[e]));
  }
}

template <typename T>
PYDL_INLINE void axpy1(acc_t<T>* acc, acc_t<T> w, const T* y, int64_t n) {
  using VT = cpu::Vec<acc_t<T>>;
  const typename VT::V wv = VT::splat(w);
  int64_t e = 0;
  for (; e + VT::W <= n; e += VT::W) VT::store(acc + e, VT::load(acc + e) + wv * cpu::load_widened(y + e));
  for (; e < n; ++e) acc[e] += w * to_acc(y[e]);
}

// Software prefetch of rows [r0, r1) of a cache (row stride `stride` elements, `row_bytes` bytes
// each) into L1: the K pass of a block fetches that block's V rows and the V pass the next
// block's K rows, so each stream's loads are issued half a block before use and the core
// computes while they arrive. A prefetch never faults and changes no result. Whether it pays
// depends on the work per cache row (measured, 2-core EPYC VM, fp32, each case interleaved with
// the other in one process): with G > 1 queries per row, bfloat16 rows (widened in registers)
// or a runtime head dim it does (E = 64, G = 8: 16.1 vs 12.6 GB/s; bfloat16 E = 64, G = 1:
// 16.2 vs 13.1 GB/s; E = 128, G = 1: 19.6 vs 16.3 GB/s); for float32, G = 1 at the
// compile-time head dim 64, whose loop is short enough for the hardware prefetchers to keep up,
// it costs (21.5 vs 25.4 GB/s, where a plain two-thread sum of the same bytes read 23 GB/s).
template <typename T>
PYDL_INLINE void prefetch_rows(const T* base, int64_t stride, int64_t r0, int64_t r1, int64_t row_bytes) {
  for (int64_t r = r0; r < r1; ++r) {
    const char* row = reinterpret_cast<const char*>(base + r * stride);
    for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(row + b, 0, 3);
  }
}

// max(init, p[0..n)) with `>` (a NaN score never becomes the max; its weight is NaN later).
template <typename A>
PYDL_INLINE A block_max(const A* p, int64_t n, A init) {
  using VT = cpu::Vec<A>;
  typename VT::V mv = VT::splat(init);
  int64_t t = 0;
  for (; t + VT::W <= n; t += VT::W) {
    const typename VT::V x = VT::load(p + t);
    mv = x > mv ? x : mv;
  }
  A r = init;
  for (int l = 0; l < VT::W; ++l) r = mv[l] > r ? mv[l] : r;
  for (; t < n; ++t) r = p[t] > r ? p[t] : r;
  return r;
}

template <typename A>
PYDL_INLINE A block_sum(const A* p, int64_t n) {
  using VT = cpu::Vec<A>;
  typename VT::V a = {};
  int64_t t = 0;
  for (; t + VT::W <= n; t += VT::W) a += VT::load(p + t);
  A r = VT::sum(a);
  for (; t < n; ++t) r += p[t];
  return r;
}

// Scratch of one work item, in accumulation-type elements: (G, E) scaled queries, (G, kBlock)
// scores, the item's own (m, l, acc) (G * (Ev + 2)), then, for widened blocks (see split_pass),
// the block's K rows (kBlock, E) and V rows (kBlock, Ev) in the accumulation type.
inline int64_t widened_rows_offset(int64_t G, int64_t E, int64_t Ev) {
  return G * E + G * kBlock + G * (Ev + 2);
}
inline int64_t scratch_size(int64_t G, int64_t E, int64_t Ev, bool widen) {
  return widened_rows_offset(G, E, Ev) + (widen ? kBlock * (E + Ev) : 0);
}

// Whether a work item of G queries per KV head widens its blocks' rows once (split_pass).
template <typename T>
constexpr bool widens_rows(int64_t G) {
  return !std::is_same_v<T, acc_t<T>> && G > 1;
}

// Rows [0, n) of `src` (row stride `stride`, storage type T) as (n, d) contiguous rows of the
// accumulation type.
template <typename T>
PYDL_INLINE void widen_rows(const T* src, int64_t stride, int64_t n, int64_t d, acc_t<T>* dst) {
  using VT = cpu::Vec<acc_t<T>>;
  for (int64_t r = 0; r < n; ++r) {
    const T* row = src + r * stride;
    acc_t<T>* out = dst + r * d;
    int64_t e = 0;
    for (; e + VT::W <= d; e += VT::W) VT::store(out + e, cpu::load_widened(row + e));
    for (; e < d; ++e) out[e] = to_acc(row[e]);
  }
}

// Rows to prefetch while a block is read (prefetch_rows): with rows t..t+3 of the block, rows
// first + t .. first + t + 3 (clipped to `end`) of `base`; none when base is null.
template <typename T>
struct PrefetchPlan {
  const T* base = nullptr;
  int64_t stride = 0, first = 0, end = 0, row_bytes = 0;
  PYDL_INLINE void at(int64_t t) const {
    if (base == nullptr) return;
    prefetch_rows(base, stride, std::min(end, first + t), std::min(end, first + t + 4), row_bytes);
  }
};

// Scores p[g * kBlock + t] = qs_g . k_t of the block's n rows k_t = k0 + t * ks (stored as R), for
// the G queries, 4 rows at a time, prefetching along (`pf`).
template <typename R, typename A, typename P>
PYDL_INLINE void block_scores(const A* qs, const R* k0, int64_t ks, int64_t n, int64_t G, int64_t E,
                              A* p, const P& pf) {
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) {
    pf.at(t);
    const R* kt = k0 + t * ks;
    for (int64_t g = 0; g < G; ++g) {
      dot4<R>(qs + g * E, kt, kt + ks, kt + 2 * ks, kt + 3 * ks, E, p + g * kBlock + t);
    }
  }
  for (; t < n; ++t) {
    for (int64_t g = 0; g < G; ++g) p[g * kBlock + t] = dot1<R>(qs + g * E, k0 + t * ks, E);
  }
}

// acc[g * Ev + e] += sum_t p[g * kBlock + t] v_t[e] over the block's n rows v_t = v0 + t * vs
// (stored as R), 4 rows at a time, prefetching along (`pf`).
template <typename R, typename A, typename P>
PYDL_INLINE void block_accumulate(A* acc, const A* p, const R* v0, int64_t vs, int64_t n, int64_t G,
                                  int64_t Ev, const P& pf) {
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) {
    pf.at(t);
    const R* vt = v0 + t * vs;
    for (int64_t g = 0; g < G; ++g) {
      axpy4<R>(acc + g * Ev, p + g * kBlock + t, vt, vt + vs, vt + 2 * vs, vt + 3 * vs, Ev);
    }
  }
  for (; t < n; ++t) {
    for (int64_t g = 0; g < G; ++g) axpy1<R>(acc + g * Ev, p[g * kBlock + t], v0 + t * vs, Ev);
  }
}

// The online softmax of the G queries of KV head `kvh` of row b over positions [j0, j1).
// Results: m[g] (running max, -inf if nothing was seen), l[g] (sum of e^(s - m)), acc[g * Ev + e]
// (sum of e^(s - m) v). `scratch` holds the scaled queries and the block's scores.
// kHeadDim: E = Ev known at compile time (the row loops then have constant trip counts and no
// tails: 25% less time per cache row when the rows are in L2), or 0: read from the arguments.
template <typename T, int kHeadDim>
PYDL_INLINE void split_pass(const DecodeAttentionArgs& a, int64_t b, int64_t kvh, int64_t j0,
                            int64_t j1, int64_t G, acc_t<T>* scratch, acc_t<T>* m, acc_t<T>* l,
                            acc_t<T>* acc) {
  using A = acc_t<T>;
  const int64_t E = kHeadDim ? kHeadDim : a.q.sizes[2];
  const int64_t Ev = kHeadDim ? kHeadDim : a.v_cache.sizes[3];
  // Software prefetch except for the cheapest row loop (see prefetch_rows).
  const bool prefetch = !(kHeadDim != 0 && G == 1 && std::is_same_v<T, A>);
  // bfloat16 with G > 1 queries per KV head: each block's rows are widened once into float rows
  // that the G queries then read (widening in registers for every query is G times the work).
  const bool widen = widens_rows<T>(G);
  A* qs = scratch;         // (G, E) scaled queries
  A* p = qs + G * E;       // (G, kBlock) scores, then probabilities
  // (kBlock, E) widened K rows, then (kBlock, Ev) V rows: only allocated when widening.
  A* kw = widen ? scratch + widened_rows_offset(G, E, Ev) : nullptr;
  A* vw = widen ? kw + kBlock * E : nullptr;
  const A scale = static_cast<A>(a.scale);
  for (int64_t g = 0; g < G; ++g) {
    const T* qg = a.q.ptr<const T>() + b * a.q.strides[0] + (kvh * G + g) * a.q.strides[1];
    A* dst = qs + g * E;
#pragma omp simd
    for (int64_t e = 0; e < E; ++e) dst[e] = to_acc(qg[e]) * scale;
    m[g] = -std::numeric_limits<A>::infinity();
    l[g] = 0;
    A* ag = acc + g * Ev;
#pragma omp simd
    for (int64_t e = 0; e < Ev; ++e) ag[e] = 0;
  }
  const T* kb = a.k_cache.ptr<const T>() + b * a.k_cache.strides[0] + kvh * a.k_cache.strides[1];
  const T* vb = a.v_cache.ptr<const T>() + b * a.v_cache.strides[0] + kvh * a.v_cache.strides[1];
  const int64_t ks = a.k_cache.strides[2], vs = a.v_cache.strides[2];
  const int64_t k_bytes = E * static_cast<int64_t>(sizeof(T)), v_bytes = Ev * static_cast<int64_t>(sizeof(T));
  for (int64_t jb = j0; jb < j1; jb += kBlock) {
    const int64_t n = std::min(kBlock, j1 - jb);
    // scores: one read of each K row for all G queries
    const PrefetchPlan<T> none;
    if (widen) {
      widen_rows(kb + jb * ks, ks, n, E, kw);
      widen_rows(vb + jb * vs, vs, n, Ev, vw);
      block_scores(qs, kw, E, n, G, E, p, none);
    } else {  // the K pass prefetches this block's V rows
      const PrefetchPlan<T> v_rows{prefetch ? vb : nullptr, vs, jb, j1, v_bytes};
      block_scores(qs, kb + jb * ks, ks, n, G, E, p, v_rows);
    }
    for (int64_t g = 0; g < G; ++g) {  // online softmax update, once per block
      A* pg = p + g * kBlock;
      const A bm = block_max(pg, n, m[g]);
      if (bm == -std::numeric_limits<A>::infinity()) {  // every score -inf: weights 0
        for (int64_t t = 0; t < n; ++t) pg[t] = 0;
        continue;
      }
#pragma omp simd
      for (int64_t t = 0; t < n; ++t) pg[t] = exp_acc(pg[t] - bm);
      const A sum = block_sum(pg, n);
      const A alpha = exp_acc(m[g] - bm);  // 0 for the first block (m = -inf)
      l[g] = l[g] * alpha + sum;
      m[g] = bm;
      if (alpha != A(1)) {
        A* ag = acc + g * Ev;
#pragma omp simd
        for (int64_t e = 0; e < Ev; ++e) ag[e] *= alpha;
      }
    }
    // accumulation: one read of each V row for all G queries
    if (widen) {
      block_accumulate(acc, p, vw, Ev, n, G, Ev, none);
    } else {  // the V pass prefetches the next block's K rows
      const PrefetchPlan<T> k_rows{prefetch ? kb : nullptr, ks, jb + kBlock, j1, k_bytes};
      block_accumulate(acc, p, vb + jb * vs, vs, n, G, Ev, k_rows);
    }
  }
}

// One entry per storage type, head dim specialization and ISA level (cpu_utils.h).
#define PYDL_DECODE_SPLIT_PASS(T, D, suffix)                                                   \
  PYDL_ISA_DISPATCH(split_pass_##suffix,                                                     \
                    (const DecodeAttentionArgs& a, int64_t b, int64_t kvh, int64_t j0,       \
                     int64_t j1, int64_t G, acc_t<T>* scratch, acc_t<T>* m, acc_t<T>* l,     \
                     acc_t<T>* acc),                                                         \
                    (a, b, kvh, j0, j1, G, scratch, m, l, acc),                              \
                    (split_pass<T, D>)(a, b, kvh, j0, j1, G, scratch, m, l, acc))

PYDL_DECODE_SPLIT_PASS(float, 0, f32)
PYDL_DECODE_SPLIT_PASS(float, 64, f32_d64)
PYDL_DECODE_SPLIT_PASS(double, 0, f64)
PYDL_DECODE_SPLIT_PASS(bf16_t, 0, bf16)
PYDL_DECODE_SPLIT_PASS(bf16_t, 64, bf16_d64)
#undef PYDL_DECODE_SPLIT_PASS

// The pass for these head dims: the E = Ev = 64 specialization where there is one.
template <typename T>
auto choose_split_pass(int64_t E, int64_t Ev) {
  const bool d64 = E == 64 && Ev == 64;
  if constexpr (std::is_same_v<T, float>) return d64 ? &split_pass_f32_d64 : &split_pass_f32;
  else if constexpr (std::is_same_v<T, bf16_t>) return d64 ? &split_pass_bf16_d64 : &split_pass_bf16;
  else return &split_pass_f64;
}

// out[b, h, :] = acc / l (0 where l == 0: nothing valid was seen).
template <typename T>
void store_out(const DecodeAttentionArgs& a, int64_t b, int64_t h, const acc_t<T>* acc,
               acc_t<T> l) {
  using A = acc_t<T>;
  const int64_t Ev = a.v_cache.sizes[3];
  T* o = a.out.ptr<T>() + b * a.out.strides[0] + h * a.out.strides[1];
  const A inv = l == A(0) ? A(0) : A(1) / l;  // NaN passes through
#pragma omp simd
  for (int64_t e = 0; e < Ev; ++e) o[e] = from_acc<T>(acc[e] * inv);
}

// The valid lengths, read on the host and checked against [0, L].
std::vector<int64_t> read_lengths(const DecodeAttentionArgs& a, const char* op) {
  const int64_t B = a.q.sizes[0], L = a.k_cache.sizes[2];
  std::vector<int64_t> lens(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t v = a.cache_seqlens.dtype == DType::kInt32
                          ? static_cast<int64_t>(a.cache_seqlens.ptr<const int32_t>()[b])
                          : a.cache_seqlens.ptr<const int64_t>()[b];
    PYDL_CHECK(v >= 0 && v <= L, op, ": cache_seqlens[", b, "] = ", v, " is outside [0, ", L,
               "] (k_cache holds ", L, " positions)");
    lens[static_cast<size_t>(b)] = v;
  }
  return lens;
}

// Splits per (b, KV head): enough work items for ~4 per thread, none shorter than kMinSplit.
int64_t choose_splits(int threads, int64_t rows, int64_t L) {
  if (threads <= 1 || rows <= 0) return 1;
  const int64_t want = (4 * static_cast<int64_t>(threads) + rows - 1) / rows;
  return std::max<int64_t>(1, std::min(want, L / kMinSplit));
}

template <typename T>
void run(const DecodeAttentionArgs& a, const std::vector<int64_t>& lens, int num_threads) {
  using A = acc_t<T>;
  const int64_t B = a.q.sizes[0], H = a.q.sizes[1], E = a.q.sizes[2];
  const int64_t Hkv = a.k_cache.sizes[1], L = a.k_cache.sizes[2], Ev = a.v_cache.sizes[3];
  const int64_t G = H / Hkv, rows = B * Hkv;
  int64_t total = 0;
  for (int64_t len : lens) total += len;
  const int threads = cpu::choose_num_threads(num_threads, rows * L, total * Hkv * (E + Ev));
  const int64_t nsplit = choose_splits(threads, rows, L);
  const int64_t items = rows * nsplit;
  const int64_t part = G * (Ev + 2);  // one item's partial: m[G], l[G], acc[G * Ev]
  std::vector<A> partials(static_cast<size_t>(nsplit > 1 ? items * part : 0));
  const auto pass = choose_split_pass<T>(E, Ev);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<A> scratch(static_cast<size_t>(scratch_size(G, E, Ev, widens_rows<T>(G))));
    A* const work = scratch.data();
    A* const own = work + G * E + G * kBlock;  // m, l, acc when unsplit (see scratch_size)
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < items; ++i) {
      const int64_t r = i / nsplit, s = i % nsplit, b = r / Hkv, kvh = r % Hkv;
      const int64_t len = lens[static_cast<size_t>(b)];
      const int64_t chunk = (len + nsplit - 1) / nsplit;
      const int64_t j0 = std::min(len, s * chunk), j1 = std::min(len, j0 + chunk);
      A* dst = nsplit > 1 ? partials.data() + i * part : own;
      A *m = dst, *l = dst + G, *acc = dst + 2 * G;
      pass(a, b, kvh, j0, j1, G, work, m, l, acc);
      if (nsplit == 1) {
        for (int64_t g = 0; g < G; ++g) store_out<T>(a, b, kvh * G + g, acc + g * Ev, l[g]);
      }
    }
    if (nsplit > 1) {
      A* comb = own + 2 * G;  // (Ev) combined accumulator
#pragma omp for schedule(static)
      for (int64_t bh = 0; bh < B * H; ++bh) {
        const int64_t b = bh / H, h = bh % H, kvh = h / G, g = h % G;
        const A* first = partials.data() + (b * Hkv + kvh) * nsplit * part;
        // Empty splits have m = -inf; NaN partials (NaN inputs) are kept so that they propagate.
        constexpr A kNegInf = -std::numeric_limits<A>::infinity();
        A M = kNegInf;
        for (int64_t s = 0; s < nsplit; ++s) {
          const A ms = first[s * part + g];
          M = ms > M ? ms : M;
        }
        if (M == kNegInf) M = 0;  // no finite max: all splits empty (or NaN)
        for (int64_t e = 0; e < Ev; ++e) comb[e] = 0;
        A lsum = 0;
        for (int64_t s = 0; s < nsplit; ++s) {
          const A* ps = first + s * part;
          if (ps[g] == kNegInf) continue;  // an empty split
          const A w = exp_acc(ps[g] - M);
          lsum += w * ps[G + g];
          const A* acc = ps + 2 * G + g * Ev;
#pragma omp simd
          for (int64_t e = 0; e < Ev; ++e) comb[e] += w * acc[e];
        }
        store_out<T>(a, b, h, comb, lsum);
      }
    }
  }
}

void require_cpu_dtype(DType t, const char* op) {
  PYDL_CHECK(t == DType::kFloat32 || t == DType::kBFloat16 || t == DType::kFloat64, op,
             ": the CPU kernel supports float32, bfloat16 and float64, got ", dtype_name(t));
}

}  // namespace

void decode_attention_cpu(const DecodeAttentionArgs& a, int num_threads) {
  const char* op = "decode_attention_cpu";
  validate_decode_attention(a, op);
  require_cpu_dtype(a.q.dtype, op);
  const std::vector<int64_t> lens = read_lengths(a, op);
  if (a.q.sizes[0] == 0 || a.q.sizes[1] == 0) return;
  PYDL_DISPATCH_FLOATING(a.q.dtype, op, [&] { run<scalar_t>(a, lens, num_threads); });
}

}  // namespace pydl
