// The one pybind11 module, pydl._C. It exposes torch-free entry points: tensors arrive as
// TensorView (pointer, dtype code, sizes, strides) built by pydl/_native.py. The GIL is released
// around every kernel. std::invalid_argument becomes ValueError, std::runtime_error RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>

#include "pydl/layer_norm.h"
#include "pydl/tensor_view.h"

#ifndef PYDL_VERSION
#error "PYDL_VERSION must be defined by the build"
#endif

namespace py = pybind11;
using pydl::TensorView;
using OptView = std::optional<TensorView>;

namespace {

TensorView opt(const OptView& v) { return v ? *v : TensorView{}; }

pydl::LayerNormFwdArgs fwd_args(const TensorView& x, const OptView& residual, const OptView& weight,
                                const OptView& bias, const TensorView& y, const OptView& h,
                                const TensorView& mean, const TensorView& rstd, double eps,
                                int act) {
  pydl::LayerNormFwdArgs a;
  a.x = x;
  a.residual = opt(residual);
  a.weight = opt(weight);
  a.bias = opt(bias);
  a.y = y;
  a.h = opt(h);
  a.mean = mean;
  a.rstd = rstd;
  a.eps = eps;
  a.act = static_cast<pydl::Activation>(act);
  return a;
}

pydl::LayerNormBwdArgs bwd_args(const TensorView& dy, const OptView& dh, const TensorView& x,
                                const OptView& weight, const OptView& bias, const TensorView& mean,
                                const TensorView& rstd, const TensorView& dx,
                                const OptView& dweight, const OptView& dbias,
                                const OptView& workspace, int act) {
  pydl::LayerNormBwdArgs a;
  a.dy = dy;
  a.dh = opt(dh);
  a.x = x;
  a.weight = opt(weight);
  a.bias = opt(bias);
  a.mean = mean;
  a.rstd = rstd;
  a.dx = dx;
  a.dweight = opt(dweight);
  a.dbias = opt(dbias);
  a.workspace = opt(workspace);
  a.act = static_cast<pydl::Activation>(act);
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

  m.def(
      "layer_norm_fwd_cpu",
      [](const TensorView& x, const OptView& residual, const OptView& weight, const OptView& bias,
         const TensorView& y, const OptView& h, const TensorView& mean, const TensorView& rstd,
         double eps, int act, int num_threads) {
        pydl::layer_norm_fwd_cpu(fwd_args(x, residual, weight, bias, y, h, mean, rstd, eps, act),
                                 num_threads);
      },
      "x"_a, "residual"_a, "weight"_a, "bias"_a, "y"_a, "h"_a, "mean"_a, "rstd"_a, "eps"_a,
      "act"_a, "num_threads"_a, gil);
  m.def(
      "layer_norm_bwd_cpu",
      [](const TensorView& dy, const OptView& dh, const TensorView& x, const OptView& weight,
         const OptView& bias, const TensorView& mean, const TensorView& rstd,
         const TensorView& dx, const OptView& dweight, const OptView& dbias, int act,
         int num_threads) {
        pydl::layer_norm_bwd_cpu(
            bwd_args(dy, dh, x, weight, bias, mean, rstd, dx, dweight, dbias, std::nullopt, act),
            num_threads);
      },
      "dy"_a, "dh"_a, "x"_a, "weight"_a, "bias"_a, "mean"_a, "rstd"_a, "dx"_a, "dweight"_a,
      "dbias"_a, "act"_a, "num_threads"_a, gil);

#ifdef PYDL_WITH_CUDA
  m.def(
      "layer_norm_fwd_cuda",
      [](const TensorView& x, const OptView& residual, const OptView& weight, const OptView& bias,
         const TensorView& y, const OptView& h, const TensorView& mean, const TensorView& rstd,
         double eps, int act, uintptr_t stream) {
        pydl::layer_norm_fwd_cuda(fwd_args(x, residual, weight, bias, y, h, mean, rstd, eps, act),
                                  reinterpret_cast<void*>(stream));
      },
      "x"_a, "residual"_a, "weight"_a, "bias"_a, "y"_a, "h"_a, "mean"_a, "rstd"_a, "eps"_a,
      "act"_a, "stream"_a, gil);
  m.def(
      "layer_norm_bwd_cuda",
      [](const TensorView& dy, const OptView& dh, const TensorView& x, const OptView& weight,
         const OptView& bias, const TensorView& mean, const TensorView& rstd,
         const TensorView& dx, const OptView& dweight, const OptView& dbias,
         const OptView& workspace, int act, uintptr_t stream) {
        pydl::layer_norm_bwd_cuda(
            bwd_args(dy, dh, x, weight, bias, mean, rstd, dx, dweight, dbias, workspace, act),
            reinterpret_cast<void*>(stream));
      },
      "dy"_a, "dh"_a, "x"_a, "weight"_a, "bias"_a, "mean"_a, "rstd"_a, "dx"_a, "dweight"_a,
      "dbias"_a, "workspace"_a, "act"_a, "stream"_a, gil);
  m.def("layer_norm_bwd_cuda_num_partials", &pydl::layer_norm_bwd_cuda_num_partials, "M"_a,
        "N"_a, gil);
#endif
}
