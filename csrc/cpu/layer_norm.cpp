// CPU kernels of the fused LayerNorm family (contract: include/pydl/layer_norm.h).
//
// Forward, per row (OpenMP over rows): load the row (adding the residual and rounding it to the
// storage type, as torch does) into a float scratch row that stays in L1, two-pass mean and
// variance from that scratch, then one fused affine + activation + store pass. So each element
// is read once from memory and written once (twice with the residual's h).
// Backward, in blocks of 4 rows: per row one pass forms the two row sums (recomputing xhat and
// the activation's input), then one pass over the block writes dx and adds the block's weight/
// bias gradients into per-thread partial rows (reduced in a fixed order: deterministic).
// Outputs of 4 MiB and more get the transparent-huge-page hint first (cpu_utils.h).
// The row loops are compiled per ISA level (cpu_utils.h) and vectorize through `omp simd`.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu_utils.h"
#include "pydl/layer_norm.h"

namespace pydl {
namespace {

using cpu::acc_t;
using cpu::from_acc;
using cpu::to_acc;

// Row sums add SIMD lanes within blocks of this many elements, then the blocks in double (the
// forward statistics: SumVec below; the backward's two row sums: `omp simd` reductions).
constexpr int64_t kSumBlock = 512;

template <int ACT, typename A>
PYDL_INLINE A activation(A z) {
  if constexpr (ACT == static_cast<int>(Activation::kGelu)) return vmath::gelu(z);
  else if constexpr (ACT == static_cast<int>(Activation::kGeluTanh)) return vmath::gelu_tanh(z);
  else return z;
}

template <int ACT, typename A>
PYDL_INLINE A activation_grad(A z) {
  if constexpr (ACT == static_cast<int>(Activation::kGelu)) return vmath::gelu_grad(z);
  else if constexpr (ACT == static_cast<int>(Activation::kGeluTanh)) return vmath::gelu_tanh_grad(z);
  else return A(1);
}

// Weight and bias as accumulation-type rows; absent ones become 1 / 0. Parameters stored in
// the accumulation type (float32 ones, including a bfloat16 x's mixed-precision float32
// parameters) are used in place (no per-call copy); others are converted once per call.
// Validated: the parameters' dtype is T's or float32.
template <typename T>
struct Affine {
  using A = acc_t<T>;
  static constexpr DType kAccDType = std::is_same_v<A, double> ? DType::kFloat64 : DType::kFloat32;
  std::vector<A> storage;  // the converted or default rows, only where needed
  const A* weight = nullptr;
  const A* bias = nullptr;
  Affine(const TensorView& w, const TensorView& b, int64_t n) {
    const bool copy_w = !(w.defined && w.dtype == kAccDType);
    const bool copy_b = !(b.defined && b.dtype == kAccDType);
    storage.resize(static_cast<size_t>((copy_w ? n : 0) + (copy_b ? n : 0)));
    A* next = storage.data();
    weight = copy_w ? fill(w, n, A(1), next) : w.ptr<const A>();
    if (copy_w) next += n;
    bias = copy_b ? fill(b, n, A(0), next) : b.ptr<const A>();
  }

 private:
  // out[j] = t[j] in A (t stored as T: the in-place case covers float32), or `neutral`.
  static const A* fill(const TensorView& t, int64_t n, A neutral, A* out) {
    for (int64_t j = 0; j < n; ++j) out[j] = t.defined ? to_acc(t.ptr<const T>()[j]) : neutral;
    return out;
  }
};

// Writes a reduced parameter gradient row (n,) into `out`, stored as T or float32.
template <typename T>
void store_param_grad(const TensorView& out, int64_t j, acc_t<T> v) {
  if (out.dtype == DType::kFloat32) out.ptr<float>()[j] = static_cast<float>(v);
  else out.ptr<T>()[j] = from_acc<T>(v);
}

// ---- Forward row statistics ---------------------------------------------------------------------
//
// The statistic is the corrected two-pass mean and (biased) variance:
//   pass 1:  mean0 = sum_j x_j / n
//   pass 2:  s = sum_j (x_j - mean0),  sq = sum_j (x_j - mean0)^2
//   mean = mean0 + s/n,  var = sq/n - (s/n)^2
// * Constant rows (x_j = c) normalize to exactly 0: pass 1 may round, but mean0 is then within a
//   few ulps of c, so every x_j - mean0 is the same exact value -e (Sterbenz), s/n = -e(1 + d)
//   with |d| ~ 1e-5, and mean = mean0 + s/n = c - e*d rounds to c itself. (var is then ~0 and
//   rstd finite, so y = (c - c) * rstd * w + b = b.)
// * |mean| >> std, and single outliers: the squares are of deviations from mean0, never of the
//   raw values, so there is no cancellation of large squares; pass 1's rounding error (the
//   outlier's ulp, ~1e-3 for 1e4, spread over n) is measured by s and folded back into the mean.
//   A single pass shifted by one element (e.g. x_0) is not accurate: with x_0 = 1e4 an outlier
//   the shifted squares are ~1e8 each and their rounding swamps var.
// Accuracy of the sums: 32 float lanes (16 double), each adding kSumBlock / 32 = 16 elements per
// block; the lanes are added pairwise and the blocks in double.
//
// Speed: the sums use GCC/Clang vector types (32 bytes: one AVX2 register) with four
// accumulators per sum, so consecutive vector adds are independent and the loop runs at load/FMA
// throughput instead of one add latency (3-4 cycles) per vector; the lane total is a short
// register shuffle tree. An `omp simd reduction` has one accumulator, and GCC adds its lanes one
// after another through memory in the epilogue: for N = 192 that epilogue (twice per row) cost
// more than the loop. The elements past the last whole group of 4 vectors (none at the usual
// model sizes) go to a scalar tail sum. The row stays in L1 between the passes.
template <typename A>
struct SumVec {
  typedef A V __attribute__((vector_size(32)));
  typedef A Half __attribute__((vector_size(16)));
  static constexpr int kWidth = 32 / static_cast<int>(sizeof(A));  // lanes per vector
  static constexpr int kGroup = 4 * kWidth;                         // elements per loop step
  static_assert(kSumBlock % kGroup == 0, "blocks hold whole groups");

  // By reference, not by value: a vector argument or return value of a function compiled for
  // the baseline ISA draws GCC's -Wpsabi note (the calls are inlined either way).
  static PYDL_INLINE void load(V& v, const A* p) { std::memcpy(&v, p, sizeof(V)); }
  static PYDL_INLINE A total(const V& v) {  // pairwise: (0+4 + 2+6) + (1+5 + 3+7) for floats
    Half lo, hi;
    std::memcpy(&lo, &v, sizeof(Half));
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(Half), sizeof(Half));
    const Half q = lo + hi;
    if constexpr (kWidth == 8) return (q[0] + q[2]) + (q[1] + q[3]);
    else return q[0] + q[1];
  }
};

// Pass 1: sum_j src[j].
template <typename A>
PYDL_INLINE double row_sum(const A* src, int64_t n) {
  using S = SumVec<A>;
  using V = typename S::V;
  constexpr int kW = S::kWidth;
  double sum = 0;
  for (int64_t j0 = 0; j0 < n; j0 += kSumBlock) {
    const int64_t j1 = std::min(n, j0 + kSumBlock);
    V a0 = {}, a1 = {}, a2 = {}, a3 = {};
    int64_t j = j0;
    for (; j + S::kGroup <= j1; j += S::kGroup) {
      V v0, v1, v2, v3;
      S::load(v0, src + j);
      S::load(v1, src + j + kW);
      S::load(v2, src + j + 2 * kW);
      S::load(v3, src + j + 3 * kW);
      a0 += v0;
      a1 += v1;
      a2 += v2;
      a3 += v3;
    }
    A tail = 0;
    for (; j < j1; ++j) tail += src[j];
    const V acc = (a0 + a1) + (a2 + a3);
    sum += static_cast<double>(S::total(acc)) + static_cast<double>(tail);
  }
  return sum;
}

// Pass 2: s = sum_j (src[j] - mean0), sq = sum_j (src[j] - mean0)^2.
template <typename A>
PYDL_INLINE void row_deviation_sums(const A* src, int64_t n, A mean0, double& s, double& sq) {
  using S = SumVec<A>;
  using V = typename S::V;
  constexpr int kW = S::kWidth;
  s = 0;
  sq = 0;
  for (int64_t j0 = 0; j0 < n; j0 += kSumBlock) {
    const int64_t j1 = std::min(n, j0 + kSumBlock);
    V s0 = {}, s1 = {}, s2 = {}, s3 = {}, q0 = {}, q1 = {}, q2 = {}, q3 = {};
    int64_t j = j0;
    for (; j + S::kGroup <= j1; j += S::kGroup) {
      V d0, d1, d2, d3;
      S::load(d0, src + j);
      S::load(d1, src + j + kW);
      S::load(d2, src + j + 2 * kW);
      S::load(d3, src + j + 3 * kW);
      d0 -= mean0;
      d1 -= mean0;
      d2 -= mean0;
      d3 -= mean0;
      s0 += d0;
      s1 += d1;
      s2 += d2;
      s3 += d3;
      q0 += d0 * d0;
      q1 += d1 * d1;
      q2 += d2 * d2;
      q3 += d3 * d3;
    }
    A tail_s = 0, tail_sq = 0;
    for (; j < j1; ++j) {
      const A d = src[j] - mean0;
      tail_s += d;
      tail_sq += d * d;
    }
    const V vs = (s0 + s1) + (s2 + s3), vq = (q0 + q1) + (q2 + q3);
    s += static_cast<double>(S::total(vs)) + static_cast<double>(tail_s);
    sq += static_cast<double>(S::total(vq)) + static_cast<double>(tail_sq);
  }
}

template <typename T, int ACT>
PYDL_INLINE void fwd_rows(const LayerNormFwdArgs& a, const acc_t<T>* w, const acc_t<T>* b,
                          int64_t r0, int64_t r1, acc_t<T>* row) {
  using A = acc_t<T>;
  const int64_t n = a.x.sizes[1];
  const double inv_n = 1.0 / static_cast<double>(n);
  const bool rms = a.norm == Norm::kRms;  // then mean = 0 (and no bias: b is all zeros)
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = a.x.ptr<const T>() + r * a.x.strides[0];
    if (a.residual.defined) {
      const T* res = a.residual.ptr<const T>() + r * a.residual.strides[0];
      T* h = a.h.ptr<T>() + r * n;
      // h is rounded to T as torch rounds x + residual; no named T temporary in the loop (a
      // struct-typed SIMD-private variable keeps GCC from vectorizing it for bfloat16). For
      // bfloat16 the rounding is done once and its bits both stored and widened (rounding the
      // widened value a second time for the store doubled the loop's cost).
      if constexpr (std::is_same_v<T, bf16_t>) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
          const uint16_t bits = from_acc<T>(to_acc(x[j]) + to_acc(res[j])).bits;
          h[j].bits = bits;
          row[j] = vmath::bits_to_float(static_cast<int32_t>(static_cast<uint32_t>(bits) << 16));
        }
      } else {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
          const A hj = to_acc(x[j]) + to_acc(res[j]);
          h[j] = hj;
          row[j] = hj;
        }
      }
    } else if constexpr (!std::is_same_v<T, A>) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) row[j] = to_acc(x[j]);
    }
    // The statistics and output passes read `src`: the input itself when it is already in the
    // accumulation type (no residual), else the converted scratch row.
    const A* src = row;
    if constexpr (std::is_same_v<T, A>) {
      if (!a.residual.defined) src = x;
    }
    A mean, rstd;
    if (rms) {  // RMSNorm: no mean; the square sum of the row itself (blocked like pass 2)
      double s, sq;
      row_deviation_sums(src, n, A(0), s, sq);
      mean = A(0);
      rstd = A(1) / std::sqrt(static_cast<A>(sq * inv_n) + static_cast<A>(a.eps));
    } else {
      const A mean0 = static_cast<A>(row_sum(src, n) * inv_n);
      double s, sq;
      row_deviation_sums(src, n, mean0, s, sq);
      const double shift = s * inv_n;
      mean = static_cast<A>(static_cast<double>(mean0) + shift);
      const A var = static_cast<A>(sq * inv_n - shift * shift);
      rstd = A(1) / std::sqrt((var < A(0) ? A(0) : var) + static_cast<A>(a.eps));
    }
    if (a.mean.defined) {
      a.mean.ptr<A>()[r] = mean;
      a.rstd.ptr<A>()[r] = rstd;
    }
    T* y = a.y.ptr<T>() + r * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      y[j] = from_acc<T>(activation<ACT>((src[j] - mean) * rstd * w[j] + b[j]));
    }
  }
}

// Backward of a block of R rows (R = kBwdBlockRows, or 1 for the last rows of a thread's range
// and for long rows). Per row, one pass forms the two row sums
//   c1 = mean_j(g * w) (0 for RMSNorm),  c2 = mean_j(g * w * xhat),  g = dy * act'(xhat * w + b)
// (with the activation, g is kept in the scratch rows so act' is evaluated once). Then one pass
// over j serves all R rows: it writes dx = rstd * (g * w - c1 - xhat * c2) (+ dh) and adds the
// rows' g * xhat and g into the thread's dweight/dbias partial rows, so the partials are read
// and written once per block instead of once per row. xhat is recomputed from x, which the
// sums pass has just brought into L1/L2.
template <typename T, int ACT, int R, bool HAS_DH>
PYDL_INLINE void bwd_block(const LayerNormBwdArgs& a, const acc_t<T>* w, const acc_t<T>* b,
                           int64_t r0, acc_t<T>* g_scratch, acc_t<T>* dw, acc_t<T>* db) {
  using A = acc_t<T>;
  constexpr bool kHasAct = ACT != static_cast<int>(Activation::kNone);
  const int64_t n = a.x.sizes[1];
  const T* x[R];
  const T* dy[R];
  const T* dh[R];
  T* dx[R];
  A* g[R];
  A mean[R], rstd[R], c1[R], c2[R];
  for (int i = 0; i < R; ++i) {
    const int64_t r = r0 + i;
    x[i] = a.x.ptr<const T>() + r * a.x.strides[0];
    dy[i] = a.dy.ptr<const T>() + r * a.dy.strides[0];
    dh[i] = HAS_DH ? a.dh.ptr<const T>() + r * a.dh.strides[0] : nullptr;
    dx[i] = a.dx.ptr<T>() + r * n;
    g[i] = g_scratch + i * n;
    mean[i] = a.mean.ptr<const A>()[r];
    rstd[i] = a.rstd.ptr<const A>()[r];
    double s1 = 0, s2 = 0;  // blocked like the forward sums
    for (int64_t j0 = 0; j0 < n; j0 += kSumBlock) {
      const int64_t j1 = std::min(n, j0 + kSumBlock);
      A part1 = 0, part2 = 0;
#pragma omp simd reduction(+ : part1, part2)
      for (int64_t j = j0; j < j1; ++j) {
        const A xh = (to_acc(x[i][j]) - mean[i]) * rstd[i];
        A gj = to_acc(dy[i][j]);
        if constexpr (kHasAct) {
          gj *= activation_grad<ACT>(xh * w[j] + b[j]);
          g[i][j] = gj;
        }
        const A dxh = gj * w[j];
        part1 += dxh;
        part2 += dxh * xh;
      }
      s1 += part1;
      s2 += part2;
    }
    // RMSNorm: xhat = x * rstd (the saved mean is 0) and no mean term in dx.
    c1[i] = a.norm == Norm::kRms ? A(0) : static_cast<A>(s1 / static_cast<double>(n));
    c2[i] = static_cast<A>(s2 / static_cast<double>(n));
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const A wj = w[j];
    A dwj = dw[j], dbj = db[j];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const A xh = (to_acc(x[i][j]) - mean[i]) * rstd[i];
      A gj;
      if constexpr (kHasAct) gj = g[i][j];
      else gj = to_acc(dy[i][j]);
      dwj += gj * xh;
      dbj += gj;
      A v = rstd[i] * (gj * wj - c1[i] - xh * c2[i]);
      if constexpr (HAS_DH) v += to_acc(dh[i][j]);
      dx[i][j] = from_acc<T>(v);
    }
    dw[j] = dwj;
    db[j] = dbj;
  }
}

// Rows per backward block, and the longest row blocked (R rows of x and dy stay in L2).
constexpr int kBwdBlockRows = 4;
constexpr int64_t kBwdBlockMaxN = 8192;

// Scratch per thread: g rows (kBwdBlockRows * n, activation only); partial dw, db rows (n each).
template <typename T, int ACT, bool HAS_DH>
PYDL_INLINE void bwd_rows(const LayerNormBwdArgs& a, const acc_t<T>* w, const acc_t<T>* b,
                          int64_t r0, int64_t r1, acc_t<T>* g, acc_t<T>* dw, acc_t<T>* db) {
  int64_t r = r0;
  if (a.x.sizes[1] <= kBwdBlockMaxN) {
    for (; r + kBwdBlockRows <= r1; r += kBwdBlockRows) {
      bwd_block<T, ACT, kBwdBlockRows, HAS_DH>(a, w, b, r, g, dw, db);
    }
  }
  for (; r < r1; ++r) bwd_block<T, ACT, 1, HAS_DH>(a, w, b, r, g, dw, db);
}

template <typename T>
PYDL_INLINE void fwd_rows_any(const LayerNormFwdArgs& a, const acc_t<T>* w, const acc_t<T>* b,
                              int64_t r0, int64_t r1, acc_t<T>* row) {
  switch (a.act) {
    case Activation::kGelu: return fwd_rows<T, 1>(a, w, b, r0, r1, row);
    case Activation::kGeluTanh: return fwd_rows<T, 2>(a, w, b, r0, r1, row);
    default: return fwd_rows<T, 0>(a, w, b, r0, r1, row);
  }
}

template <typename T, int ACT>
PYDL_INLINE void bwd_rows_act(const LayerNormBwdArgs& a, const acc_t<T>* w, const acc_t<T>* b,
                              int64_t r0, int64_t r1, acc_t<T>* g, acc_t<T>* dw, acc_t<T>* db) {
  if (a.dh.defined) return bwd_rows<T, ACT, true>(a, w, b, r0, r1, g, dw, db);
  return bwd_rows<T, ACT, false>(a, w, b, r0, r1, g, dw, db);
}

template <typename T>
PYDL_INLINE void bwd_rows_any(const LayerNormBwdArgs& a, const acc_t<T>* w, const acc_t<T>* b,
                              int64_t r0, int64_t r1, acc_t<T>* g, acc_t<T>* dw, acc_t<T>* db) {
  switch (a.act) {
    case Activation::kGelu: return bwd_rows_act<T, 1>(a, w, b, r0, r1, g, dw, db);
    case Activation::kGeluTanh: return bwd_rows_act<T, 2>(a, w, b, r0, r1, g, dw, db);
    default: return bwd_rows_act<T, 0>(a, w, b, r0, r1, g, dw, db);
  }
}

// One entry per storage type and ISA level (cpu_utils.h); the templates above are
// always_inline, so each level's body is compiled for that level's instructions.
template <typename T>
struct RowKernels;  // RowKernels<T>::fwd / ::bwd run the best ISA level for storage type T

#define PYDL_LN_ROW_KERNELS(T, suffix)                                                        \
  PYDL_ISA_DISPATCH(fwd_rows_##suffix,                                                       \
                    (const LayerNormFwdArgs& a, const acc_t<T>* w, const acc_t<T>* b,        \
                     int64_t r0, int64_t r1, acc_t<T>* row),                                 \
                    (a, w, b, r0, r1, row), fwd_rows_any<T>(a, w, b, r0, r1, row))           \
  PYDL_ISA_DISPATCH(bwd_rows_##suffix,                                                       \
                    (const LayerNormBwdArgs& a, const acc_t<T>* w, const acc_t<T>* b,        \
                     int64_t r0, int64_t r1, acc_t<T>* g, acc_t<T>* dw, acc_t<T>* db),       \
                    (a, w, b, r0, r1, g, dw, db),                                            \
                    bwd_rows_any<T>(a, w, b, r0, r1, g, dw, db))                             \
  template <>                                                                                \
  struct RowKernels<T> {                                                                     \
    static constexpr auto fwd = &fwd_rows_##suffix;                                          \
    static constexpr auto bwd = &bwd_rows_##suffix;                                          \
  };

PYDL_LN_ROW_KERNELS(float, f32)
PYDL_LN_ROW_KERNELS(double, f64)
PYDL_LN_ROW_KERNELS(bf16_t, bf16)
#undef PYDL_LN_ROW_KERNELS

void require_cpu_dtype(DType t, const char* op) {
  PYDL_CHECK(t == DType::kFloat32 || t == DType::kBFloat16 || t == DType::kFloat64, op,
             ": the CPU kernel supports float32, bfloat16 and float64, got ", dtype_name(t));
}

template <typename T>
void fwd_impl(const LayerNormFwdArgs& a, int num_threads) {
  using A = acc_t<T>;
  const int64_t m = a.x.sizes[0], n = a.x.sizes[1];
  if (m == 0) return;
  const Affine<T> affine(a.weight, a.bias, n);
  using k = RowKernels<T>;
  const int threads = cpu::choose_num_threads(num_threads, m, m * n);
  cpu::advise_huge_pages(a.y);
  cpu::advise_huge_pages(a.h);
  // The float scratch row is needed for bfloat16 and for h = x + residual; float32 without a
  // residual reads x directly and allocates nothing.
  const bool scratch = !std::is_same_v<T, A> || a.residual.defined;
  cpu::parallel_rows(threads, m, [&](int, int64_t r0, int64_t r1) {
    std::vector<A> row(scratch ? static_cast<size_t>(n) : 0);
    k::fwd(a, affine.weight, affine.bias, r0, r1, row.data());
  });
}

template <typename T>
void bwd_impl(const LayerNormBwdArgs& a, int num_threads) {
  using A = acc_t<T>;
  const int64_t m = a.x.sizes[0], n = a.x.sizes[1];
  const Affine<T> affine(a.weight, a.bias, n);
  using k = RowKernels<T>;
  const int threads = cpu::choose_num_threads(num_threads, std::max<int64_t>(m, 1), m * n);
  // partial[t] = [dw (n) | db (n)] of thread t; summed in thread order below.
  std::vector<A> partial(static_cast<size_t>(threads) * 2 * n, A(0));
  if (m > 0) {
    cpu::advise_huge_pages(a.dx);
    cpu::parallel_rows(threads, m, [&](int tid, int64_t r0, int64_t r1) {
      std::vector<A> g(a.act == Activation::kNone ? 0 : kBwdBlockRows * n);
      A* dw = partial.data() + static_cast<size_t>(tid) * 2 * n;
      k::bwd(a, affine.weight, affine.bias, r0, r1, g.data(), dw, dw + n);
    });
  }
  for (int part = 0; part < 2; ++part) {
    const TensorView& out = part == 0 ? a.dweight : a.dbias;
    if (!out.defined) continue;
    for (int64_t j = 0; j < n; ++j) {
      A total = 0;
      for (int t = 0; t < threads; ++t) total += partial[(static_cast<size_t>(t) * 2 + part) * n + j];
      store_param_grad<T>(out, j, total);
    }
  }
}

}  // namespace

void layer_norm_fwd_cpu(const LayerNormFwdArgs& a, int num_threads) {
  static constexpr const char* kOp = "layer_norm_fwd_cpu";
  validate_layer_norm_fwd(a, kOp);
  require_cpu_dtype(a.x.dtype, kOp);
  PYDL_DISPATCH_FLOATING(a.x.dtype, kOp, [&] { fwd_impl<scalar_t>(a, num_threads); });
}

void layer_norm_bwd_cpu(const LayerNormBwdArgs& a, int num_threads) {
  static constexpr const char* kOp = "layer_norm_bwd_cpu";
  validate_layer_norm_bwd(a, kOp);
  require_cpu_dtype(a.x.dtype, kOp);
  PYDL_DISPATCH_FLOATING(a.x.dtype, kOp, [&] { bwd_impl<scalar_t>(a, num_threads); });
}

}  // namespace pydl
