// CPU kernels of the fused LayerNorm family (contract: include/pydl/layer_norm.h).
//
// Forward, per row (OpenMP over rows): load the row (adding the residual and rounding it to the
// storage type, as torch does) into a float scratch row that stays in L1, two-pass mean and
// variance from that scratch, then one fused affine + activation + store pass. So each element
// is read once from memory and written once (twice with the residual's h).
// Backward, per row: recompute xhat and the activation's input, fuse the weight/bias gradient
// accumulation (per-thread partial rows, reduced in a fixed order: deterministic) with the two
// row sums, then one pass that writes dx.
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
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        T hj = from_acc<T>(to_acc(x[j]) + to_acc(res[j]));
        h[j] = hj;
        row[j] = to_acc(hj);
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
    a.mean.ptr<A>()[r] = mean;
    a.rstd.ptr<A>()[r] = rstd;
    T* y = a.y.ptr<T>() + r * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      y[j] = from_acc<T>(activation<ACT>((src[j] - mean) * rstd * w[j] + b[j]));
    }
  }
}

// Scratch per thread: xhat and g rows (2n); partial weight/bias gradient rows dw, db (n each).
template <typename T, int ACT>
PYDL_INLINE void bwd_rows(const LayerNormBwdArgs& a, const acc_t<T>* w, const acc_t<T>* b,
                          int64_t r0, int64_t r1, acc_t<T>* scratch, acc_t<T>* dw, acc_t<T>* db) {
  using A = acc_t<T>;
  const int64_t n = a.x.sizes[1];
  A* xhat = scratch;
  A* g = scratch + n;
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = a.x.ptr<const T>() + r * a.x.strides[0];
    const T* dy = a.dy.ptr<const T>() + r * a.dy.strides[0];
    const A mean = a.mean.ptr<const A>()[r];
    const A rstd = a.rstd.ptr<const A>()[r];
    double s1 = 0, s2 = 0;  // blocked like the forward sums
    for (int64_t j0 = 0; j0 < n; j0 += kSumBlock) {
      const int64_t j1 = std::min(n, j0 + kSumBlock);
      A part1 = 0, part2 = 0;
#pragma omp simd reduction(+ : part1, part2)
      for (int64_t j = j0; j < j1; ++j) {
        const A xh = (to_acc(x[j]) - mean) * rstd;
        A gj = to_acc(dy[j]);
        if constexpr (ACT != static_cast<int>(Activation::kNone)) {
          gj *= activation_grad<ACT>(xh * w[j] + b[j]);
        }
        xhat[j] = xh;
        g[j] = gj;
        dw[j] += gj * xh;
        db[j] += gj;
        const A dxh = gj * w[j];
        part1 += dxh;
        part2 += dxh * xh;
      }
      s1 += part1;
      s2 += part2;
    }
    const A c1 = static_cast<A>(s1 / static_cast<double>(n));
    const A c2 = static_cast<A>(s2 / static_cast<double>(n));
    T* dx = a.dx.ptr<T>() + r * n;
    if (a.dh.defined) {
      const T* dh = a.dh.ptr<const T>() + r * a.dh.strides[0];
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        dx[j] = from_acc<T>(rstd * (g[j] * w[j] - c1 - xhat[j] * c2) + to_acc(dh[j]));
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) dx[j] = from_acc<T>(rstd * (g[j] * w[j] - c1 - xhat[j] * c2));
    }
  }
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

template <typename T>
PYDL_INLINE void bwd_rows_any(const LayerNormBwdArgs& a, const acc_t<T>* w, const acc_t<T>* b,
                              int64_t r0, int64_t r1, acc_t<T>* scratch, acc_t<T>* dw,
                              acc_t<T>* db) {
  switch (a.act) {
    case Activation::kGelu: return bwd_rows<T, 1>(a, w, b, r0, r1, scratch, dw, db);
    case Activation::kGeluTanh: return bwd_rows<T, 2>(a, w, b, r0, r1, scratch, dw, db);
    default: return bwd_rows<T, 0>(a, w, b, r0, r1, scratch, dw, db);
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
                     int64_t r0, int64_t r1, acc_t<T>* scratch, acc_t<T>* dw, acc_t<T>* db), \
                    (a, w, b, r0, r1, scratch, dw, db),                                      \
                    bwd_rows_any<T>(a, w, b, r0, r1, scratch, dw, db))                       \
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
    cpu::parallel_rows(threads, m, [&](int tid, int64_t r0, int64_t r1) {
      std::vector<A> scratch(2 * n);
      A* dw = partial.data() + static_cast<size_t>(tid) * 2 * n;
      k::bwd(a, affine.weight.data(), affine.bias.data(), r0, r1, scratch.data(), dw, dw + n);
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
