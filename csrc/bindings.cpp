// The one pybind11 module, pydl._C. It exposes torch-free entry points: tensors arrive as
// TensorView (pointer, dtype code, sizes, strides) built by pydl/_native.py. The GIL is released
// around every kernel. std::invalid_argument becomes ValueError, std::runtime_error RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "pydl/beam_search_step.h"
#include "pydl/decode_attention.h"
#include "pydl/depthwise_conv2d.h"
#include "pydl/layer_norm.h"
#include "pydl/tensor_view.h"

#ifndef PYDL_VERSION
#error "PYDL_VERSION must be defined by the build"
#endif

namespace py = pybind11;
using pydl::TensorView;

namespace {

// The row-wise entry points take each tensor as a data pointer (0 = absent) plus, for (M, N)
// row tensors, its row stride: Python has already reduced every tensor to (M, N) rows with a
// unit last stride, and building one pybind11 object per tensor would cost more than a small
// kernel (see docs/architecture.md, "Where the microseconds go"). The views are assembled here
// and validated by validate_layer_norm_fwd/bwd like any other caller's.
using pydl::matrix_view;
using pydl::vector_view;

int32_t stats_dtype(int32_t dtype) {
  return dtype == static_cast<int32_t>(pydl::DType::kFloat64) ? dtype
                                                              : static_cast<int32_t>(pydl::DType::kFloat32);
}

pydl::LayerNormFwdArgs fwd_args(int64_t M, int64_t N, int32_t dtype, uintptr_t x, int64_t x_ld,
                                uintptr_t residual, int64_t residual_ld, int32_t param_dtype,
                                uintptr_t weight, uintptr_t bias, uintptr_t y, uintptr_t h,
                                uintptr_t mean, uintptr_t rstd, double eps, int act, int norm) {
  pydl::LayerNormFwdArgs a;
  a.x = matrix_view(x, dtype, M, N, x_ld);
  a.residual = matrix_view(residual, dtype, M, N, residual_ld);
  a.weight = vector_view(weight, param_dtype, N);
  a.bias = vector_view(bias, param_dtype, N);
  a.y = matrix_view(y, dtype, M, N, N);
  a.h = matrix_view(h, dtype, M, N, N);
  a.mean = vector_view(mean, stats_dtype(dtype), M);
  a.rstd = vector_view(rstd, stats_dtype(dtype), M);
  a.eps = eps;
  a.act = static_cast<pydl::Activation>(act);
  a.norm = static_cast<pydl::Norm>(norm);
  return a;
}

pydl::LayerNormBwdArgs bwd_args(int64_t M, int64_t N, int32_t dtype, uintptr_t dy, int64_t dy_ld,
                                uintptr_t dh, int64_t dh_ld, uintptr_t x, int64_t x_ld,
                                int32_t param_dtype, uintptr_t weight, uintptr_t bias,
                                uintptr_t mean, uintptr_t rstd, uintptr_t dx, uintptr_t dweight,
                                uintptr_t dbias, int act, int norm) {
  pydl::LayerNormBwdArgs a;
  a.dy = matrix_view(dy, dtype, M, N, dy_ld);
  a.dh = matrix_view(dh, dtype, M, N, dh_ld);
  a.x = matrix_view(x, dtype, M, N, x_ld);
  a.weight = vector_view(weight, param_dtype, N);
  a.bias = vector_view(bias, param_dtype, N);
  a.mean = vector_view(mean, stats_dtype(dtype), M);
  a.rstd = vector_view(rstd, stats_dtype(dtype), M);
  a.dx = matrix_view(dx, dtype, M, N, N);
  a.dweight = vector_view(dweight, param_dtype, N);
  a.dbias = vector_view(dbias, param_dtype, N);
  a.act = static_cast<pydl::Activation>(act);
  a.norm = static_cast<pydl::Norm>(norm);
  return a;
}

// Decode attention: q (B, H, E) and out (B, H, Ev) with batch / head strides, the caches
// (B, Hkv, L, E|Ev) with batch / head / position strides (unit last strides), lengths (B,).
pydl::DecodeAttentionArgs decode_args(int64_t B, int64_t H, int64_t Hkv, int64_t L, int64_t E,
                                      int64_t Ev, int32_t dtype, uintptr_t q, int64_t q_sb,
                                      int64_t q_sh, uintptr_t k, int64_t k_sb, int64_t k_sh,
                                      int64_t k_sl, uintptr_t v, int64_t v_sb, int64_t v_sh,
                                      int64_t v_sl, uintptr_t lens, int32_t lens_dtype,
                                      uintptr_t out, int64_t out_sb, int64_t out_sh,
                                      double scale) {
  pydl::DecodeAttentionArgs a;
  a.q = pydl::make_view(q, dtype, {B, H, E}, {q_sb, q_sh, 1});
  a.k_cache = pydl::make_view(k, dtype, {B, Hkv, L, E}, {k_sb, k_sh, k_sl, 1});
  a.v_cache = pydl::make_view(v, dtype, {B, Hkv, L, Ev}, {v_sb, v_sh, v_sl, 1});
  a.cache_seqlens = pydl::make_view(lens, lens_dtype, {B}, {1});
  a.out = pydl::make_view(out, dtype, {B, H, Ev}, {out_sb, out_sh, 1});
  a.scale = scale;
  return a;
}

// Depthwise conv: x / y / dy / dx as logical (N, C, H, W) views dense in `layout` (their strides
// follow from the sizes), weight / dweight (Cout, KH, KW) and bias / dbias (Cout,) contiguous.
TensorView nchw_view(uintptr_t data, int32_t dtype, int64_t N, int64_t C, int64_t H, int64_t W,
                     int32_t layout) {
  if (data == 0) return TensorView{};
  if (layout == static_cast<int32_t>(pydl::Layout::kNHWC)) {
    return pydl::make_view(data, dtype, {N, C, H, W}, {H * W * C, 1, W * C, C});
  }
  return pydl::make_view(data, dtype, {N, C, H, W}, {C * H * W, H * W, W, 1});
}

TensorView filter_view(uintptr_t data, int32_t dtype, int64_t Cout, int64_t KH, int64_t KW) {
  if (data == 0) return TensorView{};
  return pydl::make_view(data, dtype, {Cout, KH, KW}, {KH * KW, KW, 1});
}

pydl::Conv2dGeometry geometry(int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
                              int64_t dw) {
  pydl::Conv2dGeometry g;
  g.stride_h = sh; g.stride_w = sw; g.pad_h = ph; g.pad_w = pw; g.dil_h = dh; g.dil_w = dw;
  return g;
}

pydl::Layout layout_of(int32_t layout) {
  if (layout != 0 && layout != 1) throw std::invalid_argument("depthwise_conv2d: bad layout code");
  return static_cast<pydl::Layout>(layout);
}

pydl::DepthwiseConv2dFwdArgs dw_fwd_args(int64_t N, int64_t C, int64_t H, int64_t W, int64_t Cout,
                                         int64_t KH, int64_t KW, int64_t Ho, int64_t Wo,
                                         int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                                         int64_t dh, int64_t dw, int32_t layout, int32_t dtype,
                                         uintptr_t x, uintptr_t weight, uintptr_t bias,
                                         uintptr_t y) {
  pydl::DepthwiseConv2dFwdArgs a;
  a.layout = layout_of(layout);
  a.x = nchw_view(x, dtype, N, C, H, W, layout);
  a.weight = filter_view(weight, dtype, Cout, KH, KW);
  a.bias = bias ? pydl::vector_view(bias, dtype, Cout) : TensorView{};
  a.y = nchw_view(y, dtype, N, Cout, Ho, Wo, layout);
  a.g = geometry(sh, sw, ph, pw, dh, dw);
  return a;
}

pydl::DepthwiseConv2dBwdArgs dw_bwd_args(int64_t N, int64_t C, int64_t H, int64_t W, int64_t Cout,
                                         int64_t KH, int64_t KW, int64_t Ho, int64_t Wo,
                                         int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                                         int64_t dh, int64_t dw, int32_t layout, int32_t dtype,
                                         uintptr_t dy, uintptr_t x, uintptr_t weight,
                                         uintptr_t dx, uintptr_t dweight, uintptr_t dbias) {
  pydl::DepthwiseConv2dBwdArgs a;
  a.layout = layout_of(layout);
  a.dy = nchw_view(dy, dtype, N, Cout, Ho, Wo, layout);
  a.x = nchw_view(x, dtype, N, C, H, W, layout);
  a.weight = filter_view(weight, dtype, Cout, KH, KW);
  a.dx = nchw_view(dx, dtype, N, C, H, W, layout);
  a.dweight = filter_view(dweight, dtype, Cout, KH, KW);
  a.dbias = dbias ? pydl::vector_view(dbias, dtype, Cout) : TensorView{};
  a.g = geometry(sh, sw, ph, pw, dh, dw);
  return a;
}

// Beam search step: logits (B*K, V) with a row stride, the rest contiguous.
pydl::BeamSearchStepArgs beam_args(int64_t B, int64_t K, int64_t V, int64_t n, int32_t dtype,
                                   uintptr_t logits, int64_t logits_ld, int32_t score_dtype,
                                   uintptr_t beam_scores, uintptr_t banned, int64_t num_banned,
                                   uintptr_t out_scores, uintptr_t out_tokens,
                                   uintptr_t out_beams) {
  const auto i64 = static_cast<int32_t>(pydl::DType::kInt64);
  pydl::BeamSearchStepArgs a;
  a.logits = matrix_view(logits, dtype, B * K, V, logits_ld);
  a.beam_scores = matrix_view(beam_scores, score_dtype, B, K, K);
  a.banned = banned ? vector_view(banned, i64, num_banned) : TensorView{};
  a.out_scores = matrix_view(out_scores, score_dtype, B, n, n);
  a.out_tokens = matrix_view(out_tokens, i64, B, n, n);
  a.out_beams = matrix_view(out_beams, i64, B, n, n);
  return a;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pydl native core (torch-free CPU and CUDA kernels)";
  m.attr("__version__") = PYDL_VERSION;
#ifdef PYDL_WITH_CUDA
  m.attr("cuda_built") = true;
  m.attr("cuda_archs") = PYDL_CUDA_ARCHS_STR;
#else
  m.attr("cuda_built") = false;
  m.attr("cuda_archs") = "";
#endif

  py::class_<TensorView>(m, "TensorView")
      .def(py::init(&pydl::make_view), py::arg("data"), py::arg("dtype"), py::arg("sizes"),
           py::arg("strides"))
      .def_property_readonly("shape", [](const TensorView& v) {
        return std::vector<int64_t>(v.sizes, v.sizes + v.ndim);
      })
      .def("__repr__", [](const TensorView& v) {
        return "TensorView(" + std::string(pydl::dtype_name(v.dtype)) + ", " + v.shape_str() + ")";
      });

  using namespace py::literals;
  auto gil = py::call_guard<py::gil_scoped_release>();

#define PYDL_LN_FWD_ARGS                                                                       \
  int64_t M, int64_t N, int32_t dtype, uintptr_t x, int64_t x_ld, uintptr_t residual,          \
      int64_t residual_ld, int32_t param_dtype, uintptr_t weight, uintptr_t bias, uintptr_t y,  \
      uintptr_t h, uintptr_t mean, uintptr_t rstd, double eps, int act, int norm
#define PYDL_LN_FWD_PASS M, N, dtype, x, x_ld, residual, residual_ld, param_dtype, weight, bias, y, h, mean, rstd, eps, act, norm
#define PYDL_LN_FWD_NAMES                                                                      \
  "M"_a, "N"_a, "dtype"_a, "x"_a, "x_ld"_a, "residual"_a, "residual_ld"_a, "param_dtype"_a,     \
      "weight"_a, "bias"_a, "y"_a, "h"_a, "mean"_a, "rstd"_a, "eps"_a, "act"_a, "norm"_a
#define PYDL_LN_BWD_ARGS                                                                       \
  int64_t M, int64_t N, int32_t dtype, uintptr_t dy, int64_t dy_ld, uintptr_t dh, int64_t dh_ld, \
      uintptr_t x, int64_t x_ld, int32_t param_dtype, uintptr_t weight, uintptr_t bias,         \
      uintptr_t mean, uintptr_t rstd, uintptr_t dx, uintptr_t dweight, uintptr_t dbias, int act, \
      int norm
#define PYDL_LN_BWD_PASS M, N, dtype, dy, dy_ld, dh, dh_ld, x, x_ld, param_dtype, weight, bias, mean, rstd, dx, dweight, dbias, act, norm
#define PYDL_LN_BWD_NAMES                                                                      \
  "M"_a, "N"_a, "dtype"_a, "dy"_a, "dy_ld"_a, "dh"_a, "dh_ld"_a, "x"_a, "x_ld"_a,               \
      "param_dtype"_a, "weight"_a, "bias"_a, "mean"_a, "rstd"_a, "dx"_a, "dweight"_a, "dbias"_a, \
      "act"_a, "norm"_a

  m.def(
      "layer_norm_fwd_cpu",
      [](PYDL_LN_FWD_ARGS, int num_threads) {
        pydl::layer_norm_fwd_cpu(fwd_args(PYDL_LN_FWD_PASS), num_threads);
      },
      PYDL_LN_FWD_NAMES, "num_threads"_a, gil);
  m.def(
      "layer_norm_bwd_cpu",
      [](PYDL_LN_BWD_ARGS, int num_threads) {
        pydl::layer_norm_bwd_cpu(bwd_args(PYDL_LN_BWD_PASS), num_threads);
      },
      PYDL_LN_BWD_NAMES, "num_threads"_a, gil);

#define PYDL_DECODE_ARGS                                                                       \
  int64_t B, int64_t H, int64_t Hkv, int64_t L, int64_t E, int64_t Ev, int32_t dtype,          \
      uintptr_t q, int64_t q_sb, int64_t q_sh, uintptr_t k, int64_t k_sb, int64_t k_sh,          \
      int64_t k_sl, uintptr_t v, int64_t v_sb, int64_t v_sh, int64_t v_sl, uintptr_t lens,       \
      int32_t lens_dtype, uintptr_t out, int64_t out_sb, int64_t out_sh, double scale
#define PYDL_DECODE_PASS B, H, Hkv, L, E, Ev, dtype, q, q_sb, q_sh, k, k_sb, k_sh, k_sl, v, v_sb, v_sh, v_sl, lens, lens_dtype, out, out_sb, out_sh, scale
#define PYDL_DECODE_NAMES                                                                      \
  "B"_a, "H"_a, "Hkv"_a, "L"_a, "E"_a, "Ev"_a, "dtype"_a, "q"_a, "q_sb"_a, "q_sh"_a, "k"_a,     \
      "k_sb"_a, "k_sh"_a, "k_sl"_a, "v"_a, "v_sb"_a, "v_sh"_a, "v_sl"_a, "lens"_a,              \
      "lens_dtype"_a, "out"_a, "out_sb"_a, "out_sh"_a, "scale"_a

  m.def(
      "decode_attention_cpu",
      [](PYDL_DECODE_ARGS, int num_threads) {
        pydl::decode_attention_cpu(decode_args(PYDL_DECODE_PASS), num_threads);
      },
      PYDL_DECODE_NAMES, "num_threads"_a, gil);

#define PYDL_DW_GEOM_ARGS                                                                      \
  int64_t N, int64_t C, int64_t H, int64_t W, int64_t Cout, int64_t KH, int64_t KW, int64_t Ho, \
      int64_t Wo, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,        \
      int32_t layout, int32_t dtype
#define PYDL_DW_GEOM_PASS N, C, H, W, Cout, KH, KW, Ho, Wo, sh, sw, ph, pw, dh, dw, layout, dtype
#define PYDL_DW_GEOM_NAMES                                                                     \
  "N"_a, "C"_a, "H"_a, "W"_a, "Cout"_a, "KH"_a, "KW"_a, "Ho"_a, "Wo"_a, "sh"_a, "sw"_a, "ph"_a,  \
      "pw"_a, "dh"_a, "dw"_a, "layout"_a, "dtype"_a
#define PYDL_DW_FWD_ARGS PYDL_DW_GEOM_ARGS, uintptr_t x, uintptr_t weight, uintptr_t bias, uintptr_t y
#define PYDL_DW_FWD_PASS PYDL_DW_GEOM_PASS, x, weight, bias, y
#define PYDL_DW_FWD_NAMES PYDL_DW_GEOM_NAMES, "x"_a, "weight"_a, "bias"_a, "y"_a
#define PYDL_DW_BWD_ARGS                                                                       \
  PYDL_DW_GEOM_ARGS, uintptr_t dy, uintptr_t x, uintptr_t weight, uintptr_t dx, uintptr_t dweight, \
      uintptr_t dbias
#define PYDL_DW_BWD_PASS PYDL_DW_GEOM_PASS, dy, x, weight, dx, dweight, dbias
#define PYDL_DW_BWD_NAMES                                                                      \
  PYDL_DW_GEOM_NAMES, "dy"_a, "x"_a, "weight"_a, "dx"_a, "dweight"_a, "dbias"_a

  m.def(
      "depthwise_conv2d_fwd_cpu",
      [](PYDL_DW_FWD_ARGS, int num_threads) {
        pydl::depthwise_conv2d_fwd_cpu(dw_fwd_args(PYDL_DW_FWD_PASS), num_threads);
      },
      PYDL_DW_FWD_NAMES, "num_threads"_a, gil);
  m.def(
      "depthwise_conv2d_bwd_cpu",
      [](PYDL_DW_BWD_ARGS, int num_threads) {
        pydl::depthwise_conv2d_bwd_cpu(dw_bwd_args(PYDL_DW_BWD_PASS), num_threads);
      },
      PYDL_DW_BWD_NAMES, "num_threads"_a, gil);

#define PYDL_BEAM_ARGS                                                                         \
  int64_t B, int64_t K, int64_t V, int64_t n, int32_t dtype, uintptr_t logits, int64_t logits_ld, \
      int32_t score_dtype, uintptr_t beam_scores, uintptr_t banned, int64_t num_banned,          \
      uintptr_t out_scores, uintptr_t out_tokens, uintptr_t out_beams
#define PYDL_BEAM_PASS B, K, V, n, dtype, logits, logits_ld, score_dtype, beam_scores, banned, num_banned, out_scores, out_tokens, out_beams
#define PYDL_BEAM_NAMES                                                                        \
  "B"_a, "K"_a, "V"_a, "n"_a, "dtype"_a, "logits"_a, "logits_ld"_a, "score_dtype"_a,            \
      "beam_scores"_a, "banned"_a, "num_banned"_a, "out_scores"_a, "out_tokens"_a, "out_beams"_a

  m.def(
      "beam_search_step_cpu",
      [](PYDL_BEAM_ARGS, int num_threads) {
        pydl::beam_search_step_cpu(beam_args(PYDL_BEAM_PASS), num_threads);
      },
      PYDL_BEAM_NAMES, "num_threads"_a, gil);

#ifdef PYDL_WITH_CUDA
  m.def(
      "layer_norm_fwd_cuda",
      [](PYDL_LN_FWD_ARGS, uintptr_t stream) {
        pydl::layer_norm_fwd_cuda(fwd_args(PYDL_LN_FWD_PASS), reinterpret_cast<void*>(stream));
      },
      PYDL_LN_FWD_NAMES, "stream"_a, gil);
  m.def(
      "layer_norm_bwd_cuda",
      [](PYDL_LN_BWD_ARGS, uintptr_t workspace, int64_t workspace_rows, uintptr_t stream) {
        auto a = bwd_args(PYDL_LN_BWD_PASS);
        a.workspace = matrix_view(workspace, static_cast<int32_t>(pydl::DType::kFloat32),
                                  workspace_rows, 2 * N, 2 * N);
        pydl::layer_norm_bwd_cuda(a, reinterpret_cast<void*>(stream));
      },
      PYDL_LN_BWD_NAMES, "workspace"_a, "workspace_rows"_a, "stream"_a, gil);
  m.def("layer_norm_bwd_cuda_num_partials", &pydl::layer_norm_bwd_cuda_num_partials, "M"_a,
        "N"_a, gil);
  m.def(
      "decode_attention_cuda",
      [](PYDL_DECODE_ARGS, uintptr_t workspace, uintptr_t stream) {
        pydl::decode_attention_cuda(decode_args(PYDL_DECODE_PASS),
                                    reinterpret_cast<void*>(workspace),
                                    reinterpret_cast<void*>(stream));
      },
      PYDL_DECODE_NAMES, "workspace"_a, "stream"_a, gil);
  m.def("decode_attention_cuda_workspace_floats", &pydl::decode_attention_cuda_workspace_floats,
        "B"_a, "H"_a, "Hkv"_a, "L"_a, "Ev"_a, gil);
  m.def(
      "depthwise_conv2d_fwd_cuda",
      [](PYDL_DW_FWD_ARGS, uintptr_t stream) {
        pydl::depthwise_conv2d_fwd_cuda(dw_fwd_args(PYDL_DW_FWD_PASS), reinterpret_cast<void*>(stream));
      },
      PYDL_DW_FWD_NAMES, "stream"_a, gil);
  m.def(
      "depthwise_conv2d_bwd_cuda_workspace_floats",
      [](PYDL_DW_BWD_ARGS) {
        return pydl::depthwise_conv2d_bwd_cuda_workspace_floats(dw_bwd_args(PYDL_DW_BWD_PASS));
      },
      PYDL_DW_BWD_NAMES, gil);
  m.def(
      "depthwise_conv2d_bwd_cuda",
      [](PYDL_DW_BWD_ARGS, uintptr_t workspace, uintptr_t stream) {
        pydl::depthwise_conv2d_bwd_cuda(dw_bwd_args(PYDL_DW_BWD_PASS), reinterpret_cast<void*>(workspace),
                                        reinterpret_cast<void*>(stream));
      },
      PYDL_DW_BWD_NAMES, "workspace"_a, "stream"_a, gil);
  m.def(
      "beam_search_step_cuda_workspace_bytes",
      [](PYDL_BEAM_ARGS) { return pydl::beam_search_step_cuda_workspace_bytes(beam_args(PYDL_BEAM_PASS)); },
      PYDL_BEAM_NAMES, gil);
  m.def(
      "beam_search_step_cuda",
      [](PYDL_BEAM_ARGS, uintptr_t workspace, uintptr_t stream) {
        pydl::beam_search_step_cuda(beam_args(PYDL_BEAM_PASS), reinterpret_cast<void*>(workspace),
                                    reinterpret_cast<void*>(stream));
      },
      PYDL_BEAM_NAMES, "workspace"_a, "stream"_a, gil);
#endif
}
