// A non-owning view of a strided tensor: what the native core receives instead of a torch
// tensor. Python (pydl/_native.py) builds it from a torch.Tensor; memory stays owned by torch.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "pydl/dtype.h"

namespace pydl {

constexpr int kMaxDims = 8;

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kFloat32;
  int32_t ndim = 0;
  int64_t sizes[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};  // in elements, like torch

  // False for an absent optional argument (Python passed None). A defined view of a
  // zero-element tensor may carry a null pointer, so presence is not `data != nullptr`.
  bool defined = false;

  int64_t size(int d) const { return sizes[d < 0 ? d + ndim : d]; }
  int64_t stride(int d) const { return strides[d < 0 ? d + ndim : d]; }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= sizes[i];
    return n;
  }
  template <typename T>
  T* ptr() const { return static_cast<T*>(data); }

  std::string shape_str() const {
    std::string s = "(";
    for (int i = 0; i < ndim; ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
    return s + (ndim == 1 ? ",)" : ")");
  }
};

// Builds a view; throws std::invalid_argument on a bad rank or dtype code.
TensorView make_view(uintptr_t data, int32_t dtype_code, const std::vector<int64_t>& sizes,
                     const std::vector<int64_t>& strides);

// The compact forms the row-wise bindings use: (rows, cols) with unit column stride and
// `row_stride` between rows, or a contiguous (n,) vector. `data == 0` means "absent" (an
// undefined view, what Python's None is for an optional argument); the callers never pass
// zero-element tensors. Throws std::invalid_argument on a bad dtype code or negative size.
TensorView matrix_view(uintptr_t data, int32_t dtype_code, int64_t rows, int64_t cols,
                       int64_t row_stride);
TensorView vector_view(uintptr_t data, int32_t dtype_code, int64_t n);

}  // namespace pydl
