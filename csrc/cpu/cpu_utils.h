// Shared helpers for the CPU kernels: storage <-> accumulation conversions, the per-ISA clone
// attribute, and OpenMP row partitioning with a caller-chosen thread count.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "pydl/dtype.h"
#include "vec_math.h"

// Compiles the marked function once per instruction set and picks one at load time (ifunc).
// Kernels are built for the baseline x86-64 ISA, so without this they would never use AVX.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) && \
    !defined(PYDL_NO_CLONES)
#define PYDL_CPU_CLONES __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define PYDL_CPU_CLONES
#endif

namespace pydl {
namespace cpu {

// Accumulation type: float for the 16/32-bit types, double for double.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

PYDL_INLINE float to_acc(float v) { return v; }
PYDL_INLINE double to_acc(double v) { return v; }
PYDL_INLINE float to_acc(bf16_t v) {
  return vmath::bits_to_float(static_cast<int32_t>(static_cast<uint32_t>(v.bits) << 16));
}

template <typename T>
PYDL_INLINE T from_acc(acc_t<T> v) {
  if constexpr (std::is_same_v<T, bf16_t>) {
    // Round to nearest even; quiet NaNs keep a mantissa bit.
    uint32_t u = static_cast<uint32_t>(vmath::float_to_bits(v));
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = (u >> 16) | 0x40u;
    return bf16_t{static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded)};
  } else {
    return v;
  }
}

// Below this many elements per call a single thread is faster than waking a team.
constexpr int64_t kMinElementsPerThread = 1 << 15;

inline int choose_num_threads(int requested, int64_t rows, int64_t elements) {
  int64_t by_work = std::max<int64_t>(1, elements / kMinElementsPerThread);
  int64_t n = std::min<int64_t>({static_cast<int64_t>(std::max(requested, 1)), rows, by_work});
  return static_cast<int>(std::max<int64_t>(n, 1));
}

// Calls fn(thread_index, row_begin, row_end) on `threads` threads with a static, deterministic
// split of [0, rows). Thread indices are < threads.
template <typename Fn>
void parallel_rows(int threads, int64_t rows, Fn&& fn) {
#ifdef _OPENMP
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    {
      const int team = omp_get_num_threads();
      const int tid = omp_get_thread_num();
      const int64_t chunk = (rows + team - 1) / team;
      const int64_t begin = std::min<int64_t>(rows, tid * chunk);
      const int64_t end = std::min<int64_t>(rows, begin + chunk);
      if (begin < end) fn(tid, begin, end);
    }
    return;
  }
#endif
  fn(0, int64_t{0}, rows);
}

}  // namespace cpu
}  // namespace pydl
