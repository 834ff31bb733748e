// Argument checks for the native core. Failures throw std::invalid_argument (pybind11 maps it to
// ValueError) or std::runtime_error (RuntimeError). Never assert, exit or print.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

#include "pydl/tensor_view.h"

namespace pydl {

template <typename... Parts>
std::string str_cat(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  return os.str();
}

#define PYDL_CHECK(cond, ...)                                                 \
  do {                                                                        \
    if (!(cond)) throw std::invalid_argument(::pydl::str_cat(__VA_ARGS__));   \
  } while (0)

inline void require_defined(const TensorView& t, const char* op, const char* name) {
  PYDL_CHECK(t.defined, op, ": ", name, " is required");
  PYDL_CHECK(t.data != nullptr || t.numel() == 0, op, ": ", name, " has a null data pointer");
}

inline void require_rank(const TensorView& t, int ndim, const char* op, const char* name) {
  PYDL_CHECK(t.ndim == ndim, op, ": ", name, " must have ", ndim, " dims, got shape ",
             t.shape_str());
}

inline void require_dtype(const TensorView& t, DType dtype, const char* op, const char* name) {
  PYDL_CHECK(t.dtype == dtype, op, ": ", name, " must have dtype ", dtype_name(dtype), ", got ",
             dtype_name(t.dtype));
}

inline void require_contiguous(const TensorView& t, const char* op, const char* name) {
  int64_t expected = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    if (t.sizes[d] != 1) {
      PYDL_CHECK(t.strides[d] == expected, op, ": ", name, " must be contiguous");
    }
    expected *= t.sizes[d];
  }
}

// 2-D with unit stride along the last dim. Rows may be strided (a column slice) or even
// overlap (an expanded input, row stride 0): kernels only read inputs. Outputs are additionally
// checked with require_contiguous.
inline void require_row_major_2d(const TensorView& t, const char* op, const char* name) {
  require_rank(t, 2, op, name);
  PYDL_CHECK(t.sizes[1] <= 1 || t.strides[1] == 1, op, ": ", name,
             " must have unit stride along its last dim");
  PYDL_CHECK(t.strides[0] >= 0, op, ": ", name, " has a negative row stride");
}

inline void require_same_shape(const TensorView& a, const TensorView& b, const char* op,
                               const char* name_a, const char* name_b) {
  bool same = a.ndim == b.ndim;
  for (int i = 0; same && i < a.ndim; ++i) same = a.sizes[i] == b.sizes[i];
  PYDL_CHECK(same, op, ": ", name_b, " shape ", b.shape_str(), " must equal ", name_a, " shape ",
             a.shape_str());
}

}  // namespace pydl
