// What the depthwise-conv CUDA files share (contract: include/pydl/depthwise_conv2d.h).
//
// One "conv pass" describes both the forward and the input gradient: an output image
// out (N, Cout, Ho, Wo) computed from an input image in (N, Cin, Hi, Wi), both dense in `layout`:
//
//   out[n, o, h, w] = bias[o] + sum_{r < R} sum_{i < KH, j < KW} wt[o*R + r, tap(i, j)] *
//                     in[n, (o*R + r) / D, (h*up_h + off_h + i*dil_h) / down_h, (w*...) / down_w]
//
// where a row (column) term counts only when the numerator is divisible by down and the
// quotient is inside the input, and tap(i, j) = i*KW + j, or (KH-1-i)*KW + (KW-1-j) when `flip`.
//   forward:        in = x,  out = y,  R = 1, D = m, up = stride, off = -pad, down = 1, no flip;
//   dx (gather):    in = dy, out = dx, R = m, D = 1, up = 1, down = stride, flip,
//                   off = pad - (K-1)*dil  (i' = K-1-i turns h + pad - i*dil into h + off + i'*dil).
// With down = 1 (every forward; dx at stride 1) the fast kernels of depthwise_conv2d_fwd.cu run
// (channels_last: vectorized over C; NCHW: shared-memory tiles); else a direct gather kernel.
#pragma once

#include "cuda_utils.cuh"  // first: binds the CUDA storage types

#include "pydl/depthwise_conv2d.h"

namespace pydl {
namespace dwconv {

// Division by a divisor fixed at launch without the int64 division subroutine (whose call makes
// ptxas save registers to the stack): q = trunc(a * (1 / d)) corrected by one step. Exact for
// 0 <= a < 2^52 (the launchers refuse larger index spaces).
struct FastDiv {
  int64_t d = 1;
  double inv = 1.0;
  FastDiv() = default;
  explicit FastDiv(int64_t divisor) : d(divisor < 1 ? 1 : divisor), inv(1.0 / static_cast<double>(d)) {}
};

constexpr int64_t kMaxIndex = int64_t{1} << 50;  // index spaces above this are refused

__device__ __forceinline__ int64_t fdiv(int64_t a, const FastDiv& f) {
  int64_t q = static_cast<int64_t>(static_cast<double>(a) * f.inv);
  const int64_t r = a - q * f.d;
  if (r < 0) {
    --q;
  } else if (r >= f.d) {
    ++q;
  }
  return q;
}

struct ConvPass {
  const void* in = nullptr;
  const void* wt = nullptr;    // (Cout*R, KH, KW) contiguous
  const void* bias = nullptr;  // (Cout,) or null
  void* out = nullptr;
  int64_t N = 0, Cin = 0, Hi = 0, Wi = 0, Cout = 0, Ho = 0, Wo = 0;
  int KH = 1, KW = 1;
  int64_t up_h = 1, up_w = 1, down_h = 1, down_w = 1, off_h = 0, off_w = 0, dil_h = 1, dil_w = 1;
  int R = 1;        // input channels summed per output channel
  int64_t D = 1;    // input channel = (o*R + r) / D
  int flip = 0;
  Layout layout = Layout::kNCHW;
  FastDiv fD;  // set by run_conv_pass
};

// Runs one conv pass on `stream` (defined in depthwise_conv2d_fwd.cu; the backward calls it for
// dx). `dtype` is the storage type of every tensor. Nothing is launched for an empty output.
void run_conv_pass(const ConvPass& p, DType dtype, cudaStream_t stream, const char* op);

constexpr int kThreads = 256;  // block size of the fixed-size kernels
constexpr int kPW = 4;         // adjacent output columns per thread (fast forward kernels)

// Blocks wanted in flight per SM when a kernel walks its work with a grid-stride loop.
constexpr int64_t kBlocksPerSm = 8;

inline int64_t target_blocks() {
  return kBlocksPerSm * cuda::sm_count(cuda::current_device());
}

// Accumulate / convert VEC storage elements at p (16-byte aligned when VEC > 1).
template <typename T, int VEC>
__device__ __forceinline__ void load_or_zero(const T* p, bool ok, float (&v)[VEC]) {
  if (ok) {
    cuda::load_floats<T, VEC>(p, v);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = 0.0f;
  }
}

}  // namespace dwconv
}  // namespace pydl
