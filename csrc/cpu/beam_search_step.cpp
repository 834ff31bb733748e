// CPU kernel of one beam-search step (contract: include/pydl/beam_search_step.h).
//
// One read of the logits. Work items are (row r = b*K + k, vocabulary block), spread over OpenMP
// threads (dynamic schedule; B*K rows are cut into blocks when they would leave threads idle, so
// B = 1 uses every thread). An item walks its block in chunks of kChunk elements (in L1):
//   pass 1, per group of kGroup elements: the group max (vectorized; bfloat16 widened into an L1
//     scratch chunk on the way); only when it beats the item's threshold (the n-th best logit kept
//     so far, -inf while fewer than n are kept) is the group scanned element by element and its
//     better elements pushed into the item's min-heap of n (logit, v) candidates: for most of V
//     one compare per group rejects it;
//   pass 2: the online softmax statistics: the running max m (rescaling the running sum once per
//     chunk when it grows) and sum += e^(x - m) (vectorized exp, vec_math.h).
// Candidates are ranked by (logit desc, v asc); banned ids are never candidates (they still count
// in the sum); a NaN logit is ranked as -inf (its row's statistics are NaN: every score is NaN).
// Then per batch row b: the blocks' statistics of each row combine to (M, lse = log(sum)), every
// candidate becomes score = ((logit - M) - lse) + beam_score (float32; float64 for float64: the
// same expression on every backend, torch's log_softmax form), and the n best by (score desc, flat
// index k*V + v asc; NaN above +inf) are written out.
//
// Exactness of the tie rule. Within a row the score is a non-decreasing function of the logit, so
// every element whose score beats the final n-th score s* is a candidate of its block. Only
// elements *equal* to s* can be missing: below a full block's worst candidate whose score rounds
// to s* (distinct logits collapsing to one float32 score, e.g. beam scores of -1e9), or banned /
// -inf when s* = -inf (or fewer than n candidates exist). In exactly those cases the batch row is
// rescanned in flat order for the lowest-index elements scoring s* (a second read, rare).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_utils.h"
#include "pydl/beam_search_step.h"

namespace pydl {
namespace {

using cpu::acc_t;
using cpu::to_acc;

constexpr int64_t kChunk = 1024;      // elements per statistics update (4 KiB of float in L1)
constexpr int64_t kGroup = 64;        // elements per threshold test
constexpr int64_t kMinBlock = 16384;  // shortest vocabulary block worth a work item of its own

PYDL_INLINE float exp_acc(float x) { return vmath::exp(x); }
PYDL_INLINE double exp_acc(double x) { return std::exp(x); }

// e^x for x <= 0 (x - the running max), the sum's hot loop: vmath::exp less its overflow clamp and
// with one Taylor degree less (exp_in_range<6>: e^r error < 1.3e-7 relative for |r| <= ln2 / 2: the
// sum, which is >= 1, and so lse, keep an error below 2e-7, under one ulp of a typical lse). Below
// -87 the argument is clamped (e^-87 = 1.6e-38 is added instead of 0: nothing next to a sum >= 1);
// NaN passes (the comparison is false for it).
PYDL_INLINE float exp_nonpos(float x) { return vmath::exp_in_range<6>(x < -87.0f ? -87.0f : x); }
PYDL_INLINE double exp_nonpos(double x) { return std::exp(x); }

template <typename A>
struct Cand {
  A key;      // the logit (-inf for NaN)
  int64_t v;  // token id
};

// Heap order: the root is the worst candidate (lowest logit, then highest id).
template <typename A>
PYDL_INLINE bool worse(const Cand<A>& a, const Cand<A>& b) {
  return a.key < b.key || (a.key == b.key && a.v > b.v);
}

template <typename A>
PYDL_INLINE void sift_down(Cand<A>* h, int64_t cnt, int64_t i) {
  for (;;) {
    int64_t c = 2 * i + 1;
    if (c >= cnt) return;
    if (c + 1 < cnt && worse(h[c + 1], h[c])) ++c;
    if (!worse(h[c], h[i])) return;
    std::swap(h[c], h[i]);
    i = c;
  }
}

template <typename A>
PYDL_INLINE void heap_push(Cand<A>* h, int64_t& cnt, Cand<A> c) {
  int64_t i = cnt++;
  h[i] = c;
  while (i > 0) {
    const int64_t p = (i - 1) / 2;
    if (!worse(h[i], h[p])) return;
    std::swap(h[i], h[p]);
    i = p;
  }
}

// One work item's result: online softmax statistics and its candidates (heap[0..count)).
template <typename A>
struct ItemOut {
  A m, s;
  int64_t count;
};

// Scans x[v0, v1) of one row (scratch: kChunk accumulation-type elements).
template <typename T>
PYDL_INLINE void scan_block(const T* x, int64_t v0, int64_t v1, int64_t n, const uint8_t* banned,
                            acc_t<T>* scratch, Cand<acc_t<T>>* heap, ItemOut<acc_t<T>>* out) {
  using A = acc_t<T>;
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  A m = kNegInf, s = 0, thr = kNegInf;
  int64_t cnt = 0;
  bool nan_seen = false;
  for (int64_t c0 = v0; c0 < v1; c0 += kChunk) {
    const int64_t len = std::min(kChunk, v1 - c0);
    const A* xs;
    if constexpr (std::is_same_v<T, A>) {
      xs = x + c0;
    } else {
      xs = scratch;
    }
    A cm = kNegInf;
    for (int64_t g0 = 0; g0 < len; g0 += kGroup) {
      const int64_t g1 = std::min(len, g0 + kGroup);
      A gm = kNegInf;
      if constexpr (std::is_same_v<T, A>) {
#pragma omp simd reduction(max : gm)
        for (int64_t i = g0; i < g1; ++i) gm = xs[i] > gm ? xs[i] : gm;
      } else {
        const T* src = x + c0;
#pragma omp simd reduction(max : gm)
        for (int64_t i = g0; i < g1; ++i) {
          const A w = to_acc(src[i]);
          scratch[i] = w;
          gm = w > gm ? w : gm;
        }
      }
      cm = gm > cm ? gm : cm;
      if (cnt < n || gm > thr) {  // rare once the heap is full: most groups stop at the compare
        for (int64_t i = g0; i < g1; ++i) {
          const A xv = xs[i];
          const int64_t v = c0 + i;
          if (cnt == n && !(xv > thr)) continue;
          if (banned != nullptr && ((banned[v >> 3] >> (v & 7)) & 1)) continue;
          const Cand<A> cand{xv == xv ? xv : kNegInf, v};
          if (cnt < n) {
            heap_push(heap, cnt, cand);
          } else {
            heap[0] = cand;  // v is larger than every kept id: better only by a larger logit
            sift_down(heap, cnt, 0);
          }
          if (cnt == n) thr = heap[0].key;
        }
      }
    }
    if (cm > m) {
      s *= exp_acc(m - cm);  // m = -inf: s is 0 and stays 0
      m = cm;
    }
    if (m == kNegInf) {  // only -inf (or NaN) so far: nothing to add, but a NaN must propagate
      for (int64_t i = 0; i < len; ++i) nan_seen |= xs[i] != xs[i];
    } else {
      const A mm = m;
      A sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < len; ++i) sum += exp_nonpos(xs[i] - mm);  // NaN x: NaN sum
      s += sum;
    }
  }
  out->m = m;
  out->s = nan_seen ? std::numeric_limits<A>::quiet_NaN() : s;
  out->count = cnt;
}

#define PYDL_BEAM_SCAN(T, suffix)                                                              \
  PYDL_ISA_DISPATCH(scan_block_##suffix,                                                     \
                    (const T* x, int64_t v0, int64_t v1, int64_t n, const uint8_t* banned,   \
                     acc_t<T>* scratch, Cand<acc_t<T>>* heap, ItemOut<acc_t<T>>* out),       \
                    (x, v0, v1, n, banned, scratch, heap, out),                              \
                    scan_block<T>(x, v0, v1, n, banned, scratch, heap, out))

PYDL_BEAM_SCAN(float, f32)
PYDL_BEAM_SCAN(double, f64)
PYDL_BEAM_SCAN(bf16_t, bf16)
#undef PYDL_BEAM_SCAN

template <typename T>
struct Scan;
template <>
struct Scan<float> {
  static constexpr auto fn = &scan_block_f32;
};
template <>
struct Scan<double> {
  static constexpr auto fn = &scan_block_f64;
};
template <>
struct Scan<bf16_t> {
  static constexpr auto fn = &scan_block_bf16;
};

// Scores: NaN ranks above everything (torch.topk's order), then by value, then by lower index.
template <typename A>
struct Scored {
  A score;
  int64_t flat;
};
template <typename A>
PYDL_INLINE bool better(const Scored<A>& a, const Scored<A>& b) {
  const bool an = a.score != a.score, bn = b.score != b.score;
  if (an || bn) return an && bn ? a.flat < b.flat : an;
  return a.score > b.score || (a.score == b.score && a.flat < b.flat);
}
template <typename A>
PYDL_INLINE bool same(A a, A b) {
  return a == b || (a != a && b != b);
}

// The row's statistics from its blocks' (m, s): M = max m (NaN propagates), S = sum s e^(m - M).
template <typename A>
void combine_stats(const ItemOut<A>* items, int64_t nblk, A& M, A& lse) {
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  A mx = kNegInf;
  bool nan = false;
  for (int64_t j = 0; j < nblk; ++j) {
    nan |= items[j].m != items[j].m || items[j].s != items[j].s;
    mx = items[j].m > mx ? items[j].m : mx;
  }
  A S = 0;
  if (mx != kNegInf) {
    for (int64_t j = 0; j < nblk; ++j) {
      if (items[j].m != kNegInf) S += items[j].s * exp_acc(items[j].m - mx);
    }
  }
  if (nan) mx = std::numeric_limits<A>::quiet_NaN();
  M = mx;
  lse = std::log(S);  // all -inf: log(0) = -inf, and (x - M) is NaN: NaN scores, as torch
}

template <typename T>
void run(const BeamSearchStepArgs& a, int num_threads, const std::vector<uint8_t>& banned_bits) {
  using A = acc_t<T>;
  const int64_t B = a.beam_scores.sizes[0], K = a.beam_scores.sizes[1], V = a.logits.sizes[1];
  const int64_t n = a.out_scores.sizes[1], rows = B * K, ld = a.logits.strides[0];
  const T* logits = a.logits.ptr<const T>();
  const A* beam = a.beam_scores.ptr<const A>();
  const uint8_t* banned = banned_bits.empty() ? nullptr : banned_bits.data();

  const int threads = cpu::choose_num_threads(num_threads, rows * std::max<int64_t>(1, V / kMinBlock), rows * V);
  int64_t nblk = 1;
  if (threads > 1 && rows < 4 * threads) {
    nblk = std::min((4 * threads + rows - 1) / rows, std::max<int64_t>(1, V / kMinBlock));
  }
  const int64_t blk = (V + nblk - 1) / nblk;
  const int64_t blen = (blk + kChunk - 1) / kChunk * kChunk;
  nblk = (V + blen - 1) / blen;
  const int64_t items = rows * nblk;
  const int64_t hn = std::min(n, blen);  // candidates an item can hold
  std::vector<Cand<A>> heaps(static_cast<size_t>(items * hn));
  std::vector<ItemOut<A>> outs(static_cast<size_t>(items));
  const auto scan = Scan<T>::fn;

#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<A> scratch(std::is_same_v<T, A> ? 0 : kChunk);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < items; ++i) {
      const int64_t r = i / nblk, j = i % nblk;
      const int64_t v0 = j * blen, v1 = std::min(V, v0 + blen);
      scan(logits + r * ld, v0, v1, hn, banned, scratch.data(), heaps.data() + i * hn, outs.data() + i);
    }
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      constexpr A kNegInf = -std::numeric_limits<A>::infinity();
      std::vector<A> M(K), lse(K);
      std::vector<Scored<A>> cands;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t r = b * K + k;
        combine_stats(outs.data() + r * nblk, nblk, M[k], lse[k]);
        const A bs = beam[r];
        for (int64_t j = 0; j < nblk; ++j) {
          const int64_t it = r * nblk + j;
          const Cand<A>* h = heaps.data() + it * hn;
          for (int64_t c = 0; c < outs[it].count; ++c) {
            cands.push_back({((h[c].key - M[k]) - lse[k]) + bs, k * V + h[c].v});
          }
        }
      }
      const int64_t have = static_cast<int64_t>(cands.size());
      const int64_t keep = std::min(n, have);
      std::partial_sort(cands.begin(), cands.begin() + keep, cands.end(), better<A>);
      cands.resize(static_cast<size_t>(keep));
      // Boundary ties (see the top): can an element scoring s* be missing from the candidates?
      const A star = keep == n ? cands[n - 1].score : kNegInf;
      bool rescan = keep < n || star == kNegInf;
      for (int64_t k = 0; k < K && !rescan; ++k) {
        const int64_t r = b * K + k;
        for (int64_t j = 0; j < nblk && !rescan; ++j) {
          const int64_t it = r * nblk + j;
          const int64_t v0 = j * blen, v1 = std::min(V, v0 + blen);
          if (outs[it].count < std::min(hn, v1 - v0)) continue;  // every element was a candidate
          if (outs[it].count == v1 - v0) continue;
          const Cand<A>& worst = heaps[static_cast<size_t>(it * hn)];  // the heap's root
          rescan = same<A>(((worst.key - M[k]) - lse[k]) + beam[r], star);
        }
      }
      if (rescan) {
        int64_t g = 0;  // keep the candidates strictly better than s*, fill up in flat order
        while (g < keep && !same<A>(cands[g].score, star)) ++g;
        cands.resize(static_cast<size_t>(g));
        for (int64_t k = 0; k < K && g < n; ++k) {
          const int64_t r = b * K + k;
          const T* x = logits + r * ld;
          for (int64_t v = 0; v < V && g < n; ++v) {
            const bool ban = banned != nullptr && ((banned[v >> 3] >> (v & 7)) & 1);
            const A sc = ban ? kNegInf : ((to_acc(x[v]) - M[k]) - lse[k]) + beam[r];
            if (same<A>(sc, star)) {
              cands.push_back({sc, k * V + v});
              ++g;
            }
          }
        }
      }
      A* os = a.out_scores.ptr<A>() + b * n;
      int64_t* ot = a.out_tokens.ptr<int64_t>() + b * n;
      int64_t* ob = a.out_beams.ptr<int64_t>() + b * n;
      for (int64_t i = 0; i < n; ++i) {
        os[i] = cands[i].score;
        ot[i] = cands[i].flat % V;
        ob[i] = cands[i].flat / V;
      }
    }
  }
}

}  // namespace

void beam_search_step_cpu(const BeamSearchStepArgs& a, int num_threads) {
  const char* op = "beam_search_step_cpu";
  validate_beam_search_step(a, op);
  const DType dt = a.logits.dtype;
  PYDL_CHECK(dt == DType::kFloat32 || dt == DType::kBFloat16 || dt == DType::kFloat64, op,
             ": the CPU kernel supports float32, bfloat16 and float64 logits, got ", dtype_name(dt));
  const int64_t V = a.logits.sizes[1];
  std::vector<uint8_t> bits;
  if (a.banned.defined && a.banned.sizes[0] > 0) {
    bits.assign(static_cast<size_t>((V + 7) / 8), 0);
    const int64_t* ids = a.banned.ptr<const int64_t>();
    for (int64_t i = 0; i < a.banned.sizes[0]; ++i) {
      const int64_t v = ids[i];
      PYDL_CHECK(v >= 0 && v < V, op, ": banned token id ", v, " (banned[", i, "]) is outside [0, ", V, ")");
      bits[static_cast<size_t>(v >> 3)] |= static_cast<uint8_t>(1u << (v & 7));
    }
  }
  if (a.beam_scores.sizes[0] == 0) return;
  PYDL_DISPATCH_FLOATING(dt, op, [&] { run<scalar_t>(a, num_threads, bits); });
}

}  // namespace pydl
