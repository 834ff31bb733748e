#include "pydl/tensor_view.h"

#include "pydl/check.h"

namespace pydl {

TensorView make_view(uintptr_t data, int32_t dtype_code, const std::vector<int64_t>& sizes,
                     const std::vector<int64_t>& strides) {
  PYDL_CHECK(is_valid_dtype_code(dtype_code), "TensorView: unknown dtype code ", dtype_code);
  PYDL_CHECK(sizes.size() == strides.size(), "TensorView: ", sizes.size(), " sizes but ",
             strides.size(), " strides");
  PYDL_CHECK(sizes.size() <= static_cast<size_t>(kMaxDims), "TensorView: at most ", kMaxDims,
             " dims are supported, got ", sizes.size());
  TensorView v;
  v.data = reinterpret_cast<void*>(data);
  v.dtype = static_cast<DType>(dtype_code);
  v.ndim = static_cast<int32_t>(sizes.size());
  v.defined = true;
  for (int i = 0; i < v.ndim; ++i) {
    PYDL_CHECK(sizes[i] >= 0, "TensorView: negative size ", sizes[i]);
    v.sizes[i] = sizes[i];
    v.strides[i] = strides[i];
  }
  PYDL_CHECK(v.data != nullptr || v.numel() == 0, "TensorView: null data pointer for a non-empty tensor");
  return v;
}

TensorView matrix_view(uintptr_t data, int32_t dtype_code, int64_t rows, int64_t cols,
                       int64_t row_stride) {
  if (data == 0) return TensorView{};
  return make_view(data, dtype_code, {rows, cols}, {row_stride, 1});
}

TensorView vector_view(uintptr_t data, int32_t dtype_code, int64_t n) {
  if (data == 0) return TensorView{};
  return make_view(data, dtype_code, {n}, {1});
}

}  // namespace pydl
