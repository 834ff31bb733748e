// CPU kernel of decode attention (contract: include/pydl/decode_attention.h).
//
// Work items are (batch row b, KV head, split of b's valid prefix), spread over OpenMP threads
// with a dynamic schedule (rows of different lengths cost differently). One item serves the
// G = H / Hkv queries of its KV head from one read of each cache row: positions are taken in
// blocks of kBlock; per block, each K row is loaded (bfloat16 widened to float in registers, into
// an L1 scratch row) and dotted with the G scaled queries, the block's scores update each query's
// online softmax (running max m, running sum l, rescaling the accumulator once per block), and
// each V row is loaded once and added into the G accumulators (`omp simd` over the head dim).
// Math in float32 (float64 for float64). Positions at or past a row's length are never touched.
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

constexpr int64_t kBlock = 64;      // positions per softmax block (scores stay in L1)
constexpr int64_t kMinSplit = 256;  // shortest split worth a work item of its own

PYDL_INLINE float exp_acc(float x) { return vmath::exp(x); }
PYDL_INLINE double exp_acc(double x) { return std::exp(x); }

// Dot products of the query x (accumulation type) with 4 cache rows y0..y3 (stored as T, widened
// in registers): four independent reductions keep the FMA pipes busy instead of one add chain
// (scalar accumulators: GCC does not vectorize an array-section reduction).
template <typename T>
PYDL_INLINE void dot4(const acc_t<T>* x, const T* y0, const T* y1, const T* y2, const T* y3,
                      int64_t n, acc_t<T>* out) {
  using A = acc_t<T>;
  A s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t e = 0; e < n; ++e) {
    const A xe = x[e];
    s0 += xe * to_acc(y0[e]);
    s1 += xe * to_acc(y1[e]);
    s2 += xe * to_acc(y2[e]);
    s3 += xe * to_acc(y3[e]);
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
}

template <typename T>
PYDL_INLINE acc_t<T> dot1(const acc_t<T>* x, const T* y, int64_t n) {
  acc_t<T> s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t e = 0; e < n; ++e) s += x[e] * to_acc(y[e]);
  return s;
}

// acc[e] += w[0] y0[e] + ... + w[3] y3[e]: one load and store of acc per 4 cache rows.
template <typename T>
PYDL_INLINE void axpy4(acc_t<T>* acc, const acc_t<T>* w, const T* y0, const T* y1, const T* y2,
                       const T* y3, int64_t n) {
  const acc_t<T> w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) {
    acc[e] += (w0 * to_acc(y0[e]) + w1 * to_acc(y1[e])) + (w2 * to_acc(y2[e]) + w3 * to_acc(y3[e]));
  }
}

template <typename T>
PYDL_INLINE void axpy1(acc_t<T>* acc, acc_t<T> w, const T* y, int64_t n) {
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) acc[e] += w * to_acc(y[e]);
}

// Scratch of one work item, in accumulation-type elements.
inline int64_t scratch_size(int64_t G, int64_t E, int64_t Ev) {
  return G * E + G * kBlock + G * (Ev + 2);
}

// The online softmax of the G queries of KV head `kvh` of row b over positions [j0, j1).
// Results: m[g] (running max, -inf if nothing was seen), l[g] (sum of e^(s - m)), acc[g * Ev + e]
// (sum of e^(s - m) v). `scratch` holds the scaled queries and the block's scores.
template <typename T>
PYDL_INLINE void split_pass(const DecodeAttentionArgs& a, int64_t b, int64_t kvh, int64_t j0,
                            int64_t j1, int64_t G, acc_t<T>* scratch, acc_t<T>* m, acc_t<T>* l,
                            acc_t<T>* acc) {
  using A = acc_t<T>;
  const int64_t E = a.q.sizes[2], Ev = a.v_cache.sizes[3];
  A* qs = scratch;         // (G, E) scaled queries
  A* p = qs + G * E;       // (G, kBlock) scores, then probabilities
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
  for (int64_t jb = j0; jb < j1; jb += kBlock) {
    const int64_t n = std::min(kBlock, j1 - jb);
    int64_t t = 0;  // scores: one read of each K row for all G queries, 4 rows at a time
    for (; t + 4 <= n; t += 4) {
      const T* k0 = kb + (jb + t) * ks;
      for (int64_t g = 0; g < G; ++g) {
        dot4<T>(qs + g * E, k0, k0 + ks, k0 + 2 * ks, k0 + 3 * ks, E, p + g * kBlock + t);
      }
    }
    for (; t < n; ++t) {
      const T* k0 = kb + (jb + t) * ks;
      for (int64_t g = 0; g < G; ++g) p[g * kBlock + t] = dot1<T>(qs + g * E, k0, E);
    }
    for (int64_t g = 0; g < G; ++g) {  // online softmax update, once per block
      A* pg = p + g * kBlock;
      A bm = m[g];
#pragma omp simd reduction(max : bm)
      for (int64_t t = 0; t < n; ++t) bm = pg[t] > bm ? pg[t] : bm;
      if (bm == -std::numeric_limits<A>::infinity()) {  // every score -inf: weights 0
        for (int64_t t = 0; t < n; ++t) pg[t] = 0;
        continue;
      }
      A sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t t = 0; t < n; ++t) {
        pg[t] = exp_acc(pg[t] - bm);
        sum += pg[t];
      }
      const A alpha = exp_acc(m[g] - bm);  // 0 for the first block (m = -inf)
      l[g] = l[g] * alpha + sum;
      m[g] = bm;
      if (alpha != A(1)) {
        A* ag = acc + g * Ev;
#pragma omp simd
        for (int64_t e = 0; e < Ev; ++e) ag[e] *= alpha;
      }
    }
    t = 0;  // accumulation: one read of each V row for all G queries, 4 rows at a time
    for (; t + 4 <= n; t += 4) {
      const T* v0 = vb + (jb + t) * vs;
      for (int64_t g = 0; g < G; ++g) {
        axpy4<T>(acc + g * Ev, p + g * kBlock + t, v0, v0 + vs, v0 + 2 * vs, v0 + 3 * vs, Ev);
      }
    }
    for (; t < n; ++t) {
      const T* v0 = vb + (jb + t) * vs;
      for (int64_t g = 0; g < G; ++g) axpy1<T>(acc + g * Ev, p[g * kBlock + t], v0, Ev);
    }
  }
}

#define PYDL_DECODE_SPLIT_PASS(T, suffix)                                                      \
  PYDL_ISA_DISPATCH(split_pass_##suffix,                                                     \
                    (const DecodeAttentionArgs& a, int64_t b, int64_t kvh, int64_t j0,       \
                     int64_t j1, int64_t G, acc_t<T>* scratch, acc_t<T>* m, acc_t<T>* l,     \
                     acc_t<T>* acc),                                                         \
                    (a, b, kvh, j0, j1, G, scratch, m, l, acc),                              \
                    split_pass<T>(a, b, kvh, j0, j1, G, scratch, m, l, acc))

PYDL_DECODE_SPLIT_PASS(float, f32)
PYDL_DECODE_SPLIT_PASS(double, f64)
PYDL_DECODE_SPLIT_PASS(bf16_t, bf16)
#undef PYDL_DECODE_SPLIT_PASS

template <typename T>
struct SplitPass;
template <>
struct SplitPass<float> {
  static constexpr auto fn = &split_pass_f32;
};
template <>
struct SplitPass<double> {
  static constexpr auto fn = &split_pass_f64;
};
template <>
struct SplitPass<bf16_t> {
  static constexpr auto fn = &split_pass_bf16;
};

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
  const auto pass = SplitPass<T>::fn;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<A> scratch(static_cast<size_t>(scratch_size(G, E, Ev)));
    A* const work = scratch.data();
    A* const own = work + G * E + G * kBlock;  // m, l, acc when unsplit
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
