// Fused LayerNorm family: y = act(LN(x [+ residual]) * weight + bias), normalized over the last
// dim, and its backward. One set of entry points serves layer_norm, layer_norm_gelu and
// add_layer_norm, and (norm = Norm::kRms) rms_norm and add_rms_norm (see pydl/ops/layer_norm.py
// for the public semantics).
//
// Norm::kLayer: xhat = (x - mean) * rstd, rstd = 1 / sqrt(biased var + eps).
// Norm::kRms:   xhat = x * rstd,          rstd = 1 / sqrt(mean_j(x_j^2) + eps) (torch's
//               F.rms_norm); no mean subtraction and no bias (a bias is invalid_argument). The
//               forward writes 0 to the mean row (when the statistics are requested); the
//               backward takes that row like LayerNorm's (the CUDA kernels do not read it):
//               g = dy * act'(xhat * w), dxhat = g * w,
//               dx = rstd * (dxhat - xhat * mean_j(dxhat * xhat)) (+ dh), dw = sum_rows g * xhat.
//
// Shapes (M rows, N = normalized size):
//   x, residual, dy, dh : (M, N), unit stride along N, any row stride >= N
//   y, h, dx            : (M, N), contiguous outputs
//   weight, bias, dweight, dbias : (N,), contiguous, one dtype ("the parameters' dtype"): x's,
//                         or float32 when x is float16 / bfloat16 (torch's mixed precision: y,
//                         h, dx in x's dtype, dweight / dbias in the parameters' float32)
//   mean, rstd          : (M,), float32 (float64 when x is float64), contiguous; optional
//                         outputs of the forward (absent: not written), inputs of the backward
#pragma once

#include <cstdint>

#include "pydl/check.h"
#include "pydl/tensor_view.h"

namespace pydl {

enum class Activation : int32_t {
  kNone = 0,
  kGelu = 1,      // 0.5 * z * (1 + erf(z / sqrt(2)))
  kGeluTanh = 2,  // 0.5 * z * (1 + tanh(sqrt(2/pi) * (z + 0.044715 z^3)))
};

// Which normalization the kernels compute (see the top of this file).
enum class Norm : int32_t {
  kLayer = 0,  // LayerNorm: mean subtraction and variance
  kRms = 1,    // RMSNorm: root mean square, no mean subtraction, no bias
};

struct LayerNormFwdArgs {
  TensorView x;         // (M, N)
  TensorView residual;  // optional (M, N): the input is h = x + residual
  TensorView weight;    // optional (N,)
  TensorView bias;      // optional (N,)
  TensorView y;         // out (M, N)
  TensorView h;         // out (M, N), required iff residual is given: x + residual, rounded to dtype
  TensorView mean;      // optional out (M,): the backward's statistics (inference skips them);
                        // Norm::kRms writes 0
  TensorView rstd;      // optional out (M,)  1 / sqrt(var + eps), biased variance; with mean
                        // (Norm::kRms: 1 / sqrt(mean(x^2) + eps))
  double eps = 1e-5;
  Activation act = Activation::kNone;
  Norm norm = Norm::kLayer;  // kRms: RMSNorm (bias must be absent)
};

struct LayerNormBwdArgs {
  TensorView dy;       // (M, N) gradient of y
  TensorView dh;       // optional (M, N) gradient of h (add_layer_norm's second output)
  TensorView x;        // (M, N) the normalized input: x, or h for add_layer_norm
  TensorView weight;   // optional (N,)
  TensorView bias;     // optional (N,) (needed to recompute the activation's input)
  TensorView mean;     // (M,) from the forward (Norm::kRms: its zeros; the CUDA kernels never read it)
  TensorView rstd;     // (M,) from the forward
  TensorView dx;       // out (M, N): dL/dx (also dL/dresidual for add_layer_norm)
  TensorView dweight;  // optional out (N,)
  TensorView dbias;    // optional out (N,)
  // CUDA only: float32 (P, 2 * N) scratch for per-block weight/bias gradient partials, P from
  // layer_norm_bwd_cuda_num_partials(). Required when dweight or dbias is requested.
  TensorView workspace;
  Activation act = Activation::kNone;
  Norm norm = Norm::kLayer;  // must match the forward's; kRms: bias and dbias must be absent
};

// The parameters' dtype of a call: weight's, else bias's, else (no parameters) x's.
DType layer_norm_param_dtype(const TensorView& weight, const TensorView& bias, DType x);

// Validates every view (ranks, shapes, dtypes, strides, presence), the activation and norm codes
// and that Norm::kRms has no bias. Throws invalid_argument.
void validate_layer_norm_fwd(const LayerNormFwdArgs& a, const char* op);
void validate_layer_norm_bwd(const LayerNormBwdArgs& a, const char* op);

// CPU kernels (csrc/cpu/layer_norm.cpp): float32, bfloat16 (parameters bfloat16 or float32),
// float64.
void layer_norm_fwd_cpu(const LayerNormFwdArgs& a, int num_threads);
void layer_norm_bwd_cpu(const LayerNormBwdArgs& a, int num_threads);

// CUDA kernels (csrc/cuda/layer_norm_{fwd,bwd,dweight}.cu): float32, float16, bfloat16 (16-bit x
// with parameters of x's dtype or float32). `stream` is a cudaStream_t; the caller has made the
// tensors' device current.
void layer_norm_fwd_cuda(const LayerNormFwdArgs& a, void* stream);
void layer_norm_bwd_cuda(const LayerNormBwdArgs& a, void* stream);
// Rows P of the backward workspace for an (M, N) problem on the current device (>= 1).
int64_t layer_norm_bwd_cuda_num_partials(int64_t M, int64_t N);

}  // namespace pydl
