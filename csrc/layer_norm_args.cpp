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
  if (a.weight.defined) check_vector(a.weight, N, a.x.dtype, op, "weight");
  if (a.bias.defined) check_vector(a.bias, N, a.x.dtype, op, "bias");
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
  if (a.weight.defined) check_vector(a.weight, N, a.x.dtype, op, "weight");
  if (a.bias.defined) check_vector(a.bias, N, a.x.dtype, op, "bias");
  check_vector(a.mean, M, stats_dtype_for(a.x.dtype), op, "mean");
  check_vector(a.rstd, M, stats_dtype_for(a.x.dtype), op, "rstd");
  check_matrix_output(a.dx, a.x, op, "dx", "x");
  if (a.dweight.defined) {
    PYDL_CHECK(a.weight.defined, op, ": dweight requested without weight");
    check_vector(a.dweight, N, a.x.dtype, op, "dweight");
  }
  if (a.dbias.defined) {
    PYDL_CHECK(a.bias.defined, op, ": dbias requested without bias");
    check_vector(a.dbias, N, a.x.dtype, op, "dbias");
  }
}

}  // namespace pydl
