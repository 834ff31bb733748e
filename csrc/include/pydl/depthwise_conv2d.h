// Depthwise 2-D convolution: F.conv2d(x, weight, bias, stride, padding, dilation, groups=C) with a
// channel multiplier m >= 1 (see pydl/ops/depthwise_conv2d.py for the public semantics).
//
//   y[n, o, p, q] = bias[o] + sum_{i < KH, j < KW} w[o, i, j] * x[n, o / m, p*sh - ph + i*dh, q*sw - pw + j*dw]
//
// for o < C*m, with x read as 0 outside [0, H) x [0, W). ph / pw are the top / left paddings; the
// bottom / right paddings are implied by the output size (Ho, Wo), so asymmetric ("same" with an
// even kernel) padding needs nothing more. Math in float32 (float64 for float64 tensors).
//
// Layout: x, y, dy and dx are viewed in logical (N, C, H, W) order and are all dense in ONE memory
// layout: Layout::kNCHW (strides (C*H*W, H*W, W, 1)) or Layout::kNHWC, torch's channels_last
// (strides (H*W*C, 1, W*C, C)). The views carry those strides (Python computes them from the sizes;
// validation checks them). weight / dweight are (C*m, KH, KW) contiguous, bias / dbias (C*m,).
// Kernel sizes 1..31 each; stride >= 1; dilation >= 1; padding >= 0 (ph < dh*(KH-1)+1 is not
// required: an output row that sees only padding is bias only).
//
// Dtypes: every tensor has the same dtype. CPU: float32, bfloat16, float64. CUDA: float32, float16,
// bfloat16. Gradients of weight / bias are accumulated in float32 (float64) and written once,
// deterministically: no float atomics touch a result.
#pragma once

#include <cstdint>

#include "pydl/check.h"
#include "pydl/tensor_view.h"

namespace pydl {

enum class Layout : int32_t { kNCHW = 0, kNHWC = 1 };

constexpr int64_t kDepthwiseMaxKernel = 31;

struct Conv2dGeometry {
  int64_t stride_h = 1, stride_w = 1;
  int64_t pad_h = 0, pad_w = 0;  // top / left
  int64_t dil_h = 1, dil_w = 1;
};

struct DepthwiseConv2dFwdArgs {
  TensorView x;       // (N, C, H, W)        dense in `layout`
  TensorView weight;  // (C*m, KH, KW)       contiguous
  TensorView bias;    // (C*m,) or undefined
  TensorView y;       // out (N, C*m, Ho, Wo) dense in `layout`
  Conv2dGeometry g;
  Layout layout = Layout::kNCHW;
};

struct DepthwiseConv2dBwdArgs {
  TensorView dy;       // (N, C*m, Ho, Wo)   dense in `layout`
  TensorView x;        // (N, C, H, W)       dense in `layout`; read only for dweight (may be
                       //                    undefined when dweight is)
  TensorView weight;   // (C*m, KH, KW)      contiguous; read only for dx (always defined: it
                       //                    gives KH / KW / m)
  TensorView dx;       // out (N, C, H, W) or undefined
  TensorView dweight;  // out (C*m, KH, KW) or undefined
  TensorView dbias;    // out (C*m,) or undefined
  Conv2dGeometry g;
  Layout layout = Layout::kNCHW;
};

// Validate ranks and shapes (N, C*m = a multiple of C, kernels 1..31; any Ho, Wo >= 0 is
// consistent: the bottom / right padding is implied), dtypes, layout strides,
// geometry. Throw std::invalid_argument naming the argument.
void validate_depthwise_conv2d_fwd(const DepthwiseConv2dFwdArgs& a, const char* op);
void validate_depthwise_conv2d_bwd(const DepthwiseConv2dBwdArgs& a, const char* op);

// CPU kernels (csrc/cpu/depthwise_conv2d.cpp), OpenMP over batch x channel blocks.
void depthwise_conv2d_fwd_cpu(const DepthwiseConv2dFwdArgs& a, int num_threads);
void depthwise_conv2d_bwd_cpu(const DepthwiseConv2dBwdArgs& a, int num_threads);

// CUDA kernels (csrc/cuda/depthwise_conv2d_*.cu). `stream` is a cudaStream_t; the caller made the
// tensors' device current. The backward's weight / bias gradient reduces per-block partials in a
// float32 `workspace` of depthwise_conv2d_bwd_cuda_workspace_floats(a) elements (0: none needed).
void depthwise_conv2d_fwd_cuda(const DepthwiseConv2dFwdArgs& a, void* stream);
int64_t depthwise_conv2d_bwd_cuda_workspace_floats(const DepthwiseConv2dBwdArgs& a);
void depthwise_conv2d_bwd_cuda(const DepthwiseConv2dBwdArgs& a, void* workspace, void* stream);

}  // namespace pydl
