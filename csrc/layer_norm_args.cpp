// Argument validation shared by the CPU and CUDA LayerNorm kernels (see pydl/layer_norm.h).
#include "pydl/layer_norm.h"

namespace pydl {
namespace {

DType stats_dtype_for(DType x) { return x == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32; }

void check_vector(const TensorView& t, int64_t n, DType dtype, const char* op, const char* name) {
  require_defined(t, op, name);
  require_rank(t, 1, op, name);
  PYDL_CHECK(t.sizes[0] == n, op, ": ", name, " must have shape (", n, ",), got ", t.shape_str());
  require_dtype(t, dtype, op, name);
  require_contiguous(t, op, name);
}

void check_matrix_input(const TensorView& t, const TensorView& like, const char* op,
                        const char* name, const char* like_name) {
  require_defined(t, op, name);
  require_row_major_2d(t, op, name);
  require_same_shape(like, t, op, like_name, name);
  require_dtype(t, like.dtype, op, name);
}

void check_matrix_output(const TensorView& t, const TensorView& like, const char* op,
                         const char* name, const char* like_name) {
  check_matrix_input(t, like, op, name, like_name);
  require_contiguous(t, op, name);
}

// weight and bias (each optional): (N,), contiguous, of one dtype, which is x's or float32 for a
// float16 / bfloat16 x (mixed precision). Returns that dtype (layer_norm_param_dtype).
DType check_params(const TensorView& weight, const TensorView& bias, DType x, int64_t n,
                   const char* op) {
  const DType param = layer_norm_param_dtype(weight, bias, x);
  const bool mixed_ok = param == DType::kFloat32 && (x == DType::kFloat16 || x == DType::kBFloat16);
  PYDL_CHECK(param == x || mixed_ok, op, ": ", weight.defined ? "weight" : "bias", " dtype ",
             dtype_name(param), " must be x's dtype ", dtype_name(x),
             " (or float32 for a float16 / bfloat16 x)");
  if (weight.defined && bias.defined) {
    PYDL_CHECK(bias.dtype == weight.dtype, op, ": bias dtype ", dtype_name(bias.dtype),
               " must match weight dtype ", dtype_name(weight.dtype));
  }
  if (weight.defined) check_vector(weight, n, param, op, "weight");
  if (bias.defined) check_vector(bias, n, param, op, "bias");
  return param;
}

void check_activation(Activation act, const char* op) {
  auto code = static_cast<int32_t>(act);
  PYDL_CHECK(code >= 0 && code <= 2, op, ": unknown activation code ", code);
}

void check_norm(Norm norm, const TensorView& bias, const char* op) {
  auto code = static_cast<int32_t>(norm);
  PYDL_CHECK(code == 0 || code == 1, op, ": unknown norm code ", code,
             " (0 layer_norm, 1 rms_norm)");
  PYDL_CHECK(norm != Norm::kRms || !bias.defined, op, ": rms_norm has no bias");
}

}  // namespace

DType layer_norm_param_dtype(const TensorView& weight, const TensorView& bias, DType x) {
  return weight.defined ? weight.dtype : bias.defined ? bias.dtype : x;
}

void validate_layer_norm_fwd(const LayerNormFwdArgs& a, const char* op) {
  require_defined(a.x, op, "x");
  require_row_major_2d(a.x, op, "x");
  const int64_t M = a.x.sizes[0], N = a.x.sizes[1];
  PYDL_CHECK(N >= 1, op, ": the normalized dim must be non-empty");
  PYDL_CHECK(a.eps >= 0.0, op, ": eps must be >= 0, got ", a.eps);
  check_activation(a.act, op);
  check_norm(a.norm, a.bias, op);
  if (a.residual.defined) {
    check_matrix_input(a.residual, a.x, op, "residual", "x");
    check_matrix_output(a.h, a.x, op, "h", "x");
  } else {
    PYDL_CHECK(!a.h.defined, op, ": h is an output of the residual variant only");
  }
  check_params(a.weight, a.bias, a.x.dtype, N, op);
  check_matrix_output(a.y, a.x, op, "y", "x");
  PYDL_CHECK(a.mean.defined == a.rstd.defined, op, ": mean and rstd are given together or not at all");
  if (a.mean.defined) {
    check_vector(a.mean, M, stats_dtype_for(a.x.dtype), op, "mean");
    check_vector(a.rstd, M, stats_dtype_for(a.x.dtype), op, "rstd");
  }
}

void validate_layer_norm_bwd(const LayerNormBwdArgs& a, const char* op) {
  require_defined(a.x, op, "x");
  require_row_major_2d(a.x, op, "x");
  const int64_t M = a.x.sizes[0], N = a.x.sizes[1];
  PYDL_CHECK(N >= 1, op, ": the normalized dim must be non-empty");
  check_activation(a.act, op);
  check_norm(a.norm, a.bias, op);
  check_matrix_input(a.dy, a.x, op, "dy", "x");
  if (a.dh.defined) check_matrix_input(a.dh, a.x, op, "dh", "x");
  const DType param = check_params(a.weight, a.bias, a.x.dtype, N, op);
  check_vector(a.mean, M, stats_dtype_for(a.x.dtype), op, "mean");
  check_vector(a.rstd, M, stats_dtype_for(a.x.dtype), op, "rstd");
  check_matrix_output(a.dx, a.x, op, "dx", "x");
  if (a.dweight.defined) {
    PYDL_CHECK(a.weight.defined, op, ": dweight requested without weight");
    check_vector(a.dweight, N, param, op, "dweight");
  }
  if (a.dbias.defined) {
    PYDL_CHECK(a.bias.defined, op, ": dbias requested without bias");
    check_vector(a.dbias, N, param, op, "dbias");
  }
}

}  // namespace pydl
