// Argument validation shared by the CPU and CUDA depthwise-conv kernels (see
// pydl/depthwise_conv2d.h).
#include "pydl/depthwise_conv2d.h"

namespace pydl {
namespace {

bool is_float_dtype(DType t) {
  return t == DType::kFloat32 || t == DType::kFloat16 || t == DType::kBFloat16 ||
         t == DType::kFloat64;
}

// (N, C, H, W) dense in `layout` (strides of size-1 dims are not looked at).
void check_image(const TensorView& t, Layout layout, const char* op, const char* name) {
  require_defined(t, op, name);
  require_rank(t, 4, op, name);
  const int64_t C = t.sizes[1], H = t.sizes[2], W = t.sizes[3];
  const int64_t want[4] = {C * H * W, layout == Layout::kNHWC ? 1 : H * W,
                           layout == Layout::kNHWC ? W * C : W, layout == Layout::kNHWC ? C : 1};
  for (int d = 0; d < 4; ++d) {
    PYDL_CHECK(t.sizes[d] <= 1 || t.strides[d] == want[d], op, ": ", name, " must be dense in ",
               layout == Layout::kNHWC ? "channels_last" : "NCHW", " layout (stride ", t.strides[d],
               " along dim ", d, ", expected ", want[d], ")");
    PYDL_CHECK(t.sizes[d] >= 0, op, ": ", name, " has a negative size");
  }
}

void check_filter(const TensorView& t, int64_t Cout, int64_t KH, int64_t KW, const char* op,
                  const char* name) {
  require_rank(t, 3, op, name);
  require_contiguous(t, op, name);
  PYDL_CHECK(t.sizes[0] == Cout && t.sizes[1] == KH && t.sizes[2] == KW, op, ": ", name,
             " must have shape (", Cout, ", ", KH, ", ", KW, "), got ", t.shape_str());
}

void check_vector(const TensorView& t, int64_t n, const char* op, const char* name) {
  require_rank(t, 1, op, name);
  PYDL_CHECK(t.sizes[0] == n, op, ": ", name, " must have shape (", n, ",), got ", t.shape_str());
  PYDL_CHECK(n <= 1 || t.strides[0] == 1, op, ": ", name, " must be contiguous");
}

void check_geometry(const Conv2dGeometry& g, int64_t KH, int64_t KW, const char* op) {
  PYDL_CHECK(g.stride_h >= 1 && g.stride_w >= 1, op, ": stride must be >= 1, got (", g.stride_h,
             ", ", g.stride_w, ")");
  PYDL_CHECK(g.dil_h >= 1 && g.dil_w >= 1, op, ": dilation must be >= 1, got (", g.dil_h, ", ",
             g.dil_w, ")");
  PYDL_CHECK(g.pad_h >= 0 && g.pad_w >= 0, op, ": padding must be >= 0, got (", g.pad_h, ", ",
             g.pad_w, ")");
  PYDL_CHECK(KH >= 1 && KH <= kDepthwiseMaxKernel && KW >= 1 && KW <= kDepthwiseMaxKernel, op,
             ": kernel size must be in [1, ", kDepthwiseMaxKernel, "] along each dim, got (", KH,
             ", ", KW, ")");
}

}  // namespace

void validate_depthwise_conv2d_fwd(const DepthwiseConv2dFwdArgs& a, const char* op) {
  check_image(a.x, a.layout, op, "x");
  require_defined(a.weight, op, "weight");
  PYDL_CHECK(a.weight.ndim == 3, op, ": weight must be (C*m, KH, KW), got shape ",
             a.weight.shape_str());
  const int64_t N = a.x.sizes[0], C = a.x.sizes[1];
  const int64_t Cout = a.weight.sizes[0], KH = a.weight.sizes[1], KW = a.weight.sizes[2];
  PYDL_CHECK(C >= 1 && Cout >= C && Cout % C == 0, op, ": weight's output channels (", Cout,
             ") must be a positive multiple of x's channels (", C, ")");
  check_filter(a.weight, Cout, KH, KW, op, "weight");
  check_geometry(a.g, KH, KW, op);
  PYDL_CHECK(is_float_dtype(a.x.dtype), op, ": x must be a floating-point tensor, got ",
             dtype_name(a.x.dtype));
  require_dtype(a.weight, a.x.dtype, op, "weight");
  if (a.bias.defined) {
    require_dtype(a.bias, a.x.dtype, op, "bias");
    check_vector(a.bias, Cout, op, "bias");
  }
  check_image(a.y, a.layout, op, "y");
  require_dtype(a.y, a.x.dtype, op, "y");
  PYDL_CHECK(a.y.sizes[0] == N && a.y.sizes[1] == Cout, op, ": y must have shape (", N, ", ",
             Cout, ", Ho, Wo), got ", a.y.shape_str());
}

void validate_depthwise_conv2d_bwd(const DepthwiseConv2dBwdArgs& a, const char* op) {
  check_image(a.dy, a.layout, op, "dy");
  require_defined(a.weight, op, "weight");
  PYDL_CHECK(a.weight.ndim == 3, op, ": weight must be (C*m, KH, KW), got shape ",
             a.weight.shape_str());
  PYDL_CHECK(a.dx.defined || a.dweight.defined || a.dbias.defined, op,
             ": nothing to compute (dx, dweight and dbias are all absent)");
  const TensorView& img = a.dx.defined ? a.dx : a.x;  // gives C, H, W
  PYDL_CHECK(img.defined, op, ": x is required to compute dweight");
  check_image(img, a.layout, op, a.dx.defined ? "dx" : "x");
  const int64_t N = a.dy.sizes[0], Cout = a.dy.sizes[1], C = img.sizes[1];
  const int64_t KH = a.weight.sizes[1], KW = a.weight.sizes[2];
  PYDL_CHECK(C >= 1 && Cout >= C && Cout % C == 0, op, ": dy's channels (", Cout,
             ") must be a positive multiple of x's channels (", C, ")");
  PYDL_CHECK(img.sizes[0] == N, op, ": dy's batch (", N, ") must equal x's (", img.sizes[0], ")");
  check_filter(a.weight, Cout, KH, KW, op, "weight");
  check_geometry(a.g, KH, KW, op);
  const DType dt = a.dy.dtype;
  PYDL_CHECK(is_float_dtype(dt), op, ": dy must be a floating-point tensor, got ", dtype_name(dt));
  require_dtype(a.weight, dt, op, "weight");
  if (a.dx.defined) require_dtype(a.dx, dt, op, "dx");
  if (a.dweight.defined) {
    PYDL_CHECK(a.x.defined, op, ": x is required to compute dweight");
    check_image(a.x, a.layout, op, "x");
    require_same_shape(img, a.x, op, "dx", "x");
    require_dtype(a.x, dt, op, "x");
    require_dtype(a.dweight, dt, op, "dweight");
    check_filter(a.dweight, Cout, KH, KW, op, "dweight");
  }
  if (a.dbias.defined) {
    require_dtype(a.dbias, dt, op, "dbias");
    check_vector(a.dbias, Cout, op, "dbias");
  }
}

}  // namespace pydl
