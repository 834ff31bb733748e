// Internal to the CUDA kernels of the fused LayerNorm family (contract: include/pydl/layer_norm.h),
// which are split by pass:
//   layer_norm_fwd.cu      forward   y = act(LN(x [+ residual]) * w + b), mean, rstd [, h = x + residual]
//   layer_norm_bwd.cu      backward  dx (+ dh) and each block's dweight / dbias partial row
//   layer_norm_dweight.cu  weight-gradient reduction: the partial rows -> dweight / dbias
// This header holds what they share: activations, the launch shape, parameter loads, the host's
// device queries and alignment checks, and the dtype dispatch.
//
// Storage types: x-like tensors (x, residual, y, h, dy, dh, dx) are T = float32 / float16 /
// bfloat16; the parameters (weight, bias, dweight, dbias) are P = T, or float32 for a 16-bit T
// (torch's mixed precision). Only those pairs are instantiated (dispatch_types): 5 of the 9.
// Every computation is in float32.
//
// RMSNorm (Norm::kRms) is the same kernels with the compile-time flag RMS: the forward's
// statistics pass sums x^2 only (one row reduction instead of the mean and the deviations),
// rstd = rsqrt(sumsq / N + eps), mean written as 0, xhat = x * rstd; the backward skips the
// mean (never read) and reduces one row sum, c2 = mean(dxhat * xhat), instead of two (c1 = 0),
// and accumulates no dbias (RMSNorm has no bias). Every kernel is instantiated for both.
//
// Layout. A row (N elements) is split into "chunks" of VEC elements: VEC = 16 bytes / sizeof(T)
// when N % VEC == 0 and every pointer and row stride allows 16-byte accesses (checked on the host
// at each call), else VEC = 1 (a chunk of float32 parameters of a 16-bit T is then 32 bytes: two
// 16-byte loads). A row is owned by a "row group" of TPR consecutive threads (TPR = a power of
// two <= 32, or a multiple of 32: whole warps); thread t of the group owns chunks
// c = i * TPR + t, i < ITEMS, so a warp's accesses are coalesced and each thread holds its
// ITEMS * VEC values in registers (compile-time indices only). A block holds RPB row groups and
// walks rows with a grid-stride loop (grid <= one wave of resident blocks; 1-D grid, int64
// offsets). Row sums: shuffle butterfly inside the warp, then one shared-memory slot per warp and
// a fixed-order sum (results are deterministic and identical in every thread of the group).
#pragma once

#include "cuda_utils.cuh"  // first: binds the CUDA storage types for PYDL_DISPATCH_FLOATING

#include <algorithm>
#include <atomic>
#include <initializer_list>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "pydl/layer_norm.h"

namespace pydl {
namespace ln_cuda {

using cuda::f32x2;
using cuda::from_float;
using cuda::group_sum;
using cuda::load_floats;
using cuda::store_floats;
using cuda::to_float;
using cuda::Vec;

constexpr int kActNone = static_cast<int>(Activation::kNone);
constexpr int kActGelu = static_cast<int>(Activation::kGelu);
constexpr int kActGeluTanh = static_cast<int>(Activation::kGeluTanh);

constexpr int kMaxThreads = 1024;  // cached kernels: block = RPB * TPR <= 1024
constexpr int kRedSlots = 32;      // one reduction slot per warp (<= 32 warps)

// ---- activations --------------------------------------------------------------------------------

constexpr float kSqrt1_2 = 0.70710678118654752440f;      // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;   // 1 / sqrt(2 pi)
constexpr float kSqrt2OverPi = 0.79788456080286535588f;  // sqrt(2 / pi)
constexpr float kGeluCoef = 0.044715f;

template <int ACT>
__device__ __forceinline__ float act_fwd(float z) {
  if constexpr (ACT == kActGelu) {
    return 0.5f * z * (1.0f + erff(z * kSqrt1_2));
  } else if constexpr (ACT == kActGeluTanh) {
    const float inner = kSqrt2OverPi * (z + kGeluCoef * z * z * z);
    return 0.5f * z * (1.0f + tanhf(inner));
  } else {
    return z;
  }
}

// d act / dz, written as torch's GeluBackward kernels compute it.
template <int ACT>
__device__ __forceinline__ float act_grad(float z) {
  if constexpr (ACT == kActGelu) {
    const float cdf = 0.5f * (1.0f + erff(z * kSqrt1_2));
    const float pdf = expf(-0.5f * z * z) * kInvSqrt2Pi;
    return cdf + z * pdf;
  } else if constexpr (ACT == kActGeluTanh) {
    const float z2 = z * z;
    const float t = tanhf(kSqrt2OverPi * (z + kGeluCoef * z2 * z));
    const float left = 0.5f * z;
    const float left_d = 0.5f * (1.0f + t);
    const float tanh_d = 1.0f - t * t;
    const float inner_d = kSqrt2OverPi * (1.0f + 3.0f * kGeluCoef * z2);
    return left_d + left * tanh_d * inner_d;
  } else {
    return 1.0f;
  }
}

// Calls f(std::integral_constant<int, ACT>{}) for the runtime activation code, so the branch is
// taken once per row (or chunk) and the loops inside f are compiled per activation.
template <typename F>
__device__ __forceinline__ void with_activation(int act, F&& f) {
  switch (act) {
    case kActGelu: f(std::integral_constant<int, kActGelu>{}); break;
    case kActGeluTanh: f(std::integral_constant<int, kActGeluTanh>{}); break;
    default: f(std::integral_constant<int, kActNone>{}); break;
  }
}

// ---- kernel arguments -----------------------------------------------------------------------

struct RowShape {
  int64_t m;        // rows
  int64_t x_rs;     // row strides (elements) of x, residual / dy, h / dh, y / dx
  int64_t a_rs;
  int64_t b_rs;
  int64_t o_rs;
  int n;            // row length
  int tpr;          // threads per row group
  int rpb;          // row groups per block (blockDim.x == tpr * rpb)
  int act;          // Activation code
  float eps;
  float inv_n;      // 1 / n (a multiply in the kernels: IEEE division would be a call there)
};

// Loads chunk `c` (VEC elements) of a weight / bias vector of storage type P as floats, or the
// neutral value when the vector is absent. float32 parameters of a 16-bit x's 16-byte chunk are
// 32 bytes: two 16-byte loads.
template <typename P, int VEC>
__device__ __forceinline__ void load_param(const P* p, int c, float neutral, float (&out)[VEC]) {
  if (p != nullptr) {
    constexpr int kPiece = VEC < cuda::kVec16<P> ? VEC : cuda::kVec16<P>;
    const P* base = p + static_cast<int64_t>(c) * VEC;
#pragma unroll
    for (int k0 = 0; k0 < VEC; k0 += kPiece) {
      float piece[kPiece];
      load_floats<P, kPiece>(base + k0, piece);
#pragma unroll
      for (int k = 0; k < kPiece; ++k) out[k0 + k] = piece[k];
    }
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = neutral;
  }
}

// ---- host side: device queries ------------------------------------------------------------------

using cuda::current_device;
using cuda::device_attribute;
using cuda::sm_count;

inline int max_smem_optin(int dev) {
  return device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(dev, 48 * 1024);
}

// Resident blocks per SM of `kernel` at this block size and dynamic smem (>= 1), cached.
inline int blocks_per_sm(int dev, const void* kernel, int block, size_t smem) {
  static std::mutex mu;
  static std::map<std::tuple<int, const void*, int, size_t>, int> cache;
  const auto key = std::make_tuple(dev, kernel, block, smem);
  {
    std::lock_guard<std::mutex> lock(mu);
    const auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  int n = 0;
  PYDL_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, block, smem));
  n = std::max(n, 1);
  std::lock_guard<std::mutex> lock(mu);
  cache[key] = n;
  return n;
}

// Blocks of `kernel` resident on the whole device at once (the grid of a grid-stride launch).
inline int64_t one_wave(int dev, const void* kernel, int block, size_t smem) {
  return static_cast<int64_t>(sm_count(dev)) * blocks_per_sm(dev, kernel, block, smem);
}

// Dynamic shared memory above the default 48 KB must be opted into, per kernel and device.
inline void allow_smem(int dev, const void* kernel, size_t smem) {
  if (smem <= 48 * 1024) return;
  static std::mutex mu;
  static std::map<std::pair<int, const void*>, size_t> allowed;
  std::lock_guard<std::mutex> lock(mu);
  size_t& cur = allowed[std::make_pair(dev, kernel)];
  if (cur >= smem) return;
  PYDL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(smem)));
  cur = smem;
}

// ---- host side: launch shapes -------------------------------------------------------------------

using cuda::ceil_div;

// Threads per row group for `units` units of work per row: a power of two up to 32, then whole
// warps.
inline int round_tpr(int64_t units) {
  if (units <= 32) {
    int p = 1;
    while (p < units) p <<= 1;
    return p;
  }
  return static_cast<int>(ceil_div(units, 32) * 32);
}

struct RowCfg {
  int e = 0;    // elements per thread (ITEMS * VEC); 0: no cached config fits
  int tpr = 0;
  int rpb = 0;
};

using cuda::aligned16;
inline bool rows_aligned(const TensorView& t, int64_t m, int vec) {
  return !t.defined || m <= 1 || t.stride(0) % vec == 0;
}
inline int64_t row_stride(const TensorView& t) { return t.defined ? t.stride(0) : 0; }

// Sizes, row strides and activation of one launch: `x` the normalized input, `a`/`b` the second
// and third (M, N) operands (residual/h forward, dy/dh backward), `o` the (M, N) output.
inline RowShape row_shape(const TensorView& x, const TensorView& a, const TensorView& b,
                          const TensorView& o, Activation act) {
  RowShape s{};
  s.m = x.size(0);
  s.n = static_cast<int>(x.size(1));
  s.inv_n = 1.0f / static_cast<float>(s.n);
  s.x_rs = row_stride(x);
  s.a_rs = row_stride(a);
  s.b_rs = row_stride(b);
  s.o_rs = row_stride(o);
  s.act = static_cast<int>(act);
  return s;
}

// 16-byte accesses are legal when N is a multiple of `vec` and every base pointer and every
// (M, N) row stride keeps that alignment (undefined optional views pass). Parameter chunks
// (vec elements of 2 or 4 bytes) then start at multiples of 16 bytes too.
inline bool vectorizable(int vec, const RowShape& s,
                         std::initializer_list<const TensorView*> matrices,
                         std::initializer_list<const TensorView*> vectors) {
  if (s.n % vec != 0) return false;
  for (const TensorView* t : matrices) {
    if (!aligned16(*t) || !rows_aligned(*t, s.m, vec)) return false;
  }
  for (const TensorView* t : vectors) {
    if (!aligned16(*t)) return false;
  }
  return true;
}

template <typename T>
const T* cptr(const TensorView& t) {
  return t.defined ? static_cast<const T*>(t.data) : nullptr;
}
template <typename T>
T* mptr(const TensorView& t) {
  return t.defined ? static_cast<T*>(t.data) : nullptr;
}

// ---- host side: dtypes --------------------------------------------------------------------------

using cuda::dispatch_cuda_dtype;
using cuda::require_cuda_dtype;

// f(T{}, P{}) for x's storage type T and the parameters' storage type P: T itself, or float32
// (validated by validate_layer_norm_*: the only other dtype the parameters may have).
template <typename F>
void dispatch_types(DType x, DType param, const char* op, F&& f) {
  dispatch_cuda_dtype(x, op, [&](auto tag) {
    if (param == x) {
      f(tag, tag);
    } else {
      f(tag, float{});
    }
  });
}

// ---- the weight-gradient reduction (layer_norm_dweight.cu) --------------------------------------

// dweight / dbias (those requested in `a`) = the column sums of the backward's first `partials`
// rows of the float32 workspace ws (partials, 2N) = [dw | db] per row; zeros when partials == 0
// (no rows). Stored in the parameters' dtype.
void reduce_param_grads(const LayerNormBwdArgs& a, const float* ws, int64_t partials,
                        cudaStream_t stream, const char* op);

}  // namespace ln_cuda
}  // namespace pydl
