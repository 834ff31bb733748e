// Element types understood by the native core, and the one dispatch macro every kernel uses.
//
// The dtype codes are part of the Python <-> C++ contract: pydl/_native.py maps torch dtypes to
// these integers. Never renumber them.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace pydl {

enum class DType : int32_t {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
  kFloat64 = 3,
  // Index types (e.g. decode attention's cache_seqlens); no kernel computes in them.
  kInt32 = 4,
  kInt64 = 5,
};

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat64: return "float64";
    case DType::kInt32: return "int32";
    case DType::kInt64: return "int64";
  }
  return "unknown";
}

inline bool is_valid_dtype_code(int32_t code) { return code >= 0 && code <= 5; }

inline int64_t dtype_size(DType t) {
  switch (t) {
    case DType::kFloat32: return 4;
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
    case DType::kFloat64: return 8;
    case DType::kInt32: return 4;
    case DType::kInt64: return 8;
  }
  return 0;
}

// Host-side bfloat16 storage type for the CPU kernels (conversions: csrc/cpu/cpu_utils.h).
// CUDA code uses __nv_bfloat16 instead.
struct bf16_t {
  uint16_t bits;
};

}  // namespace pydl

// PYDL_DISPATCH_FLOATING(dtype, "op", [&] { use scalar_t; })
// Calls the lambda with `scalar_t` bound to the storage type of `dtype`. Which dtypes a kernel
// accepts is decided by the caller (check.h's require_dtype); this macro only binds the type.
// CUDA sources define PYDL_HALF_T / PYDL_BF16_T before including this header to use the CUDA
// types; CPU sources get bf16_t and no float16.
#ifndef PYDL_BF16_T
#define PYDL_BF16_T ::pydl::bf16_t
#endif

#define PYDL_DISPATCH_CASE(code, type, ...) \
  case code: {                              \
    using scalar_t = type;                  \
    return __VA_ARGS__();                   \
  }

#ifdef PYDL_HALF_T
#define PYDL_DISPATCH_HALF_CASE(...) PYDL_DISPATCH_CASE(::pydl::DType::kFloat16, PYDL_HALF_T, __VA_ARGS__)
#else
#define PYDL_DISPATCH_HALF_CASE(...)
#endif

#define PYDL_DISPATCH_FLOATING(dtype, op_name, ...)                                      \
  [&] {                                                                                  \
    switch (dtype) {                                                                     \
      PYDL_DISPATCH_CASE(::pydl::DType::kFloat32, float, __VA_ARGS__)                    \
      PYDL_DISPATCH_CASE(::pydl::DType::kBFloat16, PYDL_BF16_T, __VA_ARGS__)             \
      PYDL_DISPATCH_HALF_CASE(__VA_ARGS__)                                               \
      PYDL_DISPATCH_CASE(::pydl::DType::kFloat64, double, __VA_ARGS__)                   \
      default:                                                                           \
        throw std::invalid_argument(std::string(op_name) + ": unsupported dtype " +     \
                                    ::pydl::dtype_name(dtype));                          \
    }                                                                                    \
  }()
