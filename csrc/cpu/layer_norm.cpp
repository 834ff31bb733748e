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
#include <vector>

#include "cpu_utils.h"
#include "pydl/layer_norm.h"

namespace pydl {
namespace {

using cpu::acc_t;
using cpu::from_acc;
using cpu::to_acc;

// Row sums add SIMD lanes within blocks of this many elements, then the blocks in double.
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

// Weight and bias converted once per call to the accumulation type; absent ones become 1 / 0.
template <typename T>
struct Affine {
  std::vector<acc_t<T>> weight, bias;
  Affine(const TensorView& w, const TensorView& b, int64_t n) : weight(n, 1), bias(n, 0) {
    if (w.defined) for (int64_t j = 0; j < n; ++j) weight[j] = to_acc(w.ptr<const T>()[j]);
    if (b.defined) for (int64_t j = 0; j < n; ++j) bias[j] = to_acc(b.ptr<const T>()[j]);
  }
};

template <typename T, int ACT>
PYDL_INLINE void fwd_rows(const LayerNormFwdArgs& a, const acc_t<T>* w, const acc_t<T>* b,
                          int64_t r0, int64_t r1, acc_t<T>* row) {
  using A = acc_t<T>;
  const int64_t n = a.x.sizes[1];
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = a.x.ptr<const T>() + r * a.x.strides[0];
    if (a.residual.defined) {
      const T* res = a.residual.ptr<const T>() + r * a.residual.strides[0];
      T* h = a.h.ptr<T>() + r * n;
      // h is rounded to T as torch rounds x + residual; no named T temporary in the loop (a
      // struct-typed SIMD-private variable keeps GCC from vectorizing it for bfloat16).
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const A hj = to_acc(from_acc<T>(to_acc(x[j]) + to_acc(res[j])));
        h[j] = from_acc<T>(hj);  // exact: hj is representable in T
        row[j] = hj;
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
    // Corrected two-pass statistics: a first mean, then the deviations' sum s and squared sum
    // sq around it; mean = mean0 + s/n and var = sq/n - (s/n)^2 stay exact for constant rows
    // and accurate when |mean| >> std (the first mean's rounding error is folded back in).
    // Sums are blocked: SIMD lanes in A within a block, blocks added in double.
    double sum = 0;
    for (int64_t j0 = 0; j0 < n; j0 += kSumBlock) {
      const int64_t j1 = std::min(n, j0 + kSumBlock);
      A part = 0;
#pragma omp simd reduction(+ : part)
      for (int64_t j = j0; j < j1; ++j) part += src[j];
      sum += part;
    }
    const A mean0 = static_cast<A>(sum / static_cast<double>(n));
    double s = 0, sq = 0;
    for (int64_t j0 = 0; j0 < n; j0 += kSumBlock) {
      const int64_t j1 = std::min(n, j0 + kSumBlock);
      A part_s = 0, part_sq = 0;
#pragma omp simd reduction(+ : part_s, part_sq)
      for (int64_t j = j0; j < j1; ++j) {
        const A d = src[j] - mean0;
        part_s += d;
        part_sq += d * d;
      }
      s += part_s;
      sq += part_sq;
    }
    const double shift = s / static_cast<double>(n);
    const A mean = static_cast<A>(mean0 + shift);
    const A var = static_cast<A>(sq / static_cast<double>(n) - shift * shift);
    const A rstd = A(1) / std::sqrt((var < A(0) ? A(0) : var) + static_cast<A>(a.eps));
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
//   c1 = mean_j(g * w),  c2 = mean_j(g * w * xhat),  g = dy * act'(xhat * w + b)
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
    c1[i] = static_cast<A>(s1 / static_cast<double>(n));
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
  cpu::parallel_rows(threads, m, [&](int, int64_t r0, int64_t r1) {
    std::vector<A> row(n);
    k::fwd(a, affine.weight.data(), affine.bias.data(), r0, r1, row.data());
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
      k::bwd(a, affine.weight.data(), affine.bias.data(), r0, r1, g.data(), dw, dw + n);
    });
  }
  for (int part = 0; part < 2; ++part) {
    const TensorView& out = part == 0 ? a.dweight : a.dbias;
    if (!out.defined) continue;
    for (int64_t j = 0; j < n; ++j) {
      A total = 0;
      for (int t = 0; t < threads; ++t) total += partial[(static_cast<size_t>(t) * 2 + part) * n + j];
      out.ptr<T>()[j] = from_acc<T>(total);
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
