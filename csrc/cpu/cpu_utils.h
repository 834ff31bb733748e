// Shared helpers for the CPU kernels: storage <-> accumulation conversions, the per-ISA clone
// attribute, and OpenMP row partitioning with a caller-chosen thread count.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __linux__
#include <sys/mman.h>
#endif

#include "pydl/dtype.h"
#include "pydl/tensor_view.h"
#include "vec_math.h"

// Row kernels are compiled once per instruction-set level and chosen at run time (the package
// is built for baseline x86-64, so without this the kernels would never use AVX). Dispatch is
// explicit: GCC's target_clones("arch=...") matches CPU *models* and would send e.g. AMD Zen 4
// to the baseline version. PYDL_SINGLE_ISA_LEVEL (the sanitizer build, which is compiled with
// -march=native for the machine that runs it) compiles each body once.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(PYDL_SINGLE_ISA_LEVEL)
#define PYDL_HAVE_ISA_LEVELS 1
#define PYDL_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,bmi2,f16c")))
#define PYDL_TARGET_AVX2 __attribute__((target("avx2,fma,bmi2,f16c")))
#else
#define PYDL_HAVE_ISA_LEVELS 0
#endif

namespace pydl {
namespace cpu {

enum class IsaLevel { kBaseline, kAvx2, kAvx512 };

inline IsaLevel isa_level() {
#if PYDL_HAVE_ISA_LEVELS
  static const IsaLevel level = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("fma")) {
      return IsaLevel::kAvx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return IsaLevel::kAvx2;
    return IsaLevel::kBaseline;
  }();
  return level;
#else
  return IsaLevel::kBaseline;
#endif
}

// Defines `name` for each ISA level from one body and a dispatcher `name(args...)` that calls
// the best one this CPU runs. Usage: PYDL_ISA_DISPATCH(name, (params), (args), body-call).
#if PYDL_HAVE_ISA_LEVELS
#define PYDL_ISA_DISPATCH(name, params, args, body)                      \
  PYDL_TARGET_AVX512 void name##_avx512 params { body; }                 \
  PYDL_TARGET_AVX2 void name##_avx2 params { body; }                     \
  void name##_baseline params { body; }                                  \
  void name params {                                                     \
    switch (::pydl::cpu::isa_level()) {                                  \
      case ::pydl::cpu::IsaLevel::kAvx512: return name##_avx512 args;    \
      case ::pydl::cpu::IsaLevel::kAvx2: return name##_avx2 args;        \
      default: return name##_baseline args;                              \
    }                                                                    \
  }
#else
#define PYDL_ISA_DISPATCH(name, params, args, body) \
  void name params { body; }
#endif

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
    // Round to nearest even; a NaN becomes its top half with the quiet bit set. The NaN is
    // replaced *before* the rounding by its quieted bits with the low half cleared, which the
    // rounding leaves alone (no carry out of the low half), so one 32-bit select serves both
    // cases (a select after the rounding made GCC widen both 16-bit candidates first). Same
    // bits as the select-after form for all 2^32 inputs (checked exhaustively). `v != v` needs
    // NaNs honoured: never build with -ffinite-math-only / -ffast-math.
    const uint32_t u = static_cast<uint32_t>(vmath::float_to_bits(v));
    const uint32_t quiet = (u | 0x00400000u) & 0xffff0000u;
    const uint32_t w = v != v ? quiet : u;
    return bf16_t{static_cast<uint16_t>((w + 0x7fffu + ((w >> 16) & 1u)) >> 16)};
  } else {
    return v;
  }
}

// One 32-byte vector of the accumulation type A (8 floats or 4 doubles: one AVX2 register) as a
// GCC/Clang vector type, for the loops GCC does not vectorize well by itself (an `omp simd`
// reduction keeps one accumulator and adds its lanes one by one). Vector values are passed
// only between always_inline helpers, so the ABI note GCC gives for them is irrelevant.
#pragma GCC diagnostic ignored "-Wpsabi"
template <typename A>
struct Vec {
  typedef A V __attribute__((vector_size(32)));
  using I = std::conditional_t<sizeof(A) == 4, int32_t, int64_t>;
  typedef I VI __attribute__((vector_size(32)));
  static constexpr int W = 32 / static_cast<int>(sizeof(A));
  static PYDL_INLINE V load(const A* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static PYDL_INLINE void store(A* p, const V& v) { std::memcpy(p, &v, sizeof(V)); }
  // One broadcast instruction. A lane-by-lane build (or an initializer list) inlined into a
  // function compiled for a higher ISA level was built by eight inserts: GCC lowers the
  // construction before inlining. A shuffle of lane 0 is lowered after it.
  static PYDL_INLINE V splat(A s) {
    V v = {};
    v[0] = s;
    return __builtin_shuffle(v, VI{});
  }
  static PYDL_INLINE A sum(const V& v) {  // fixed order
    A s = 0;
    for (int l = 0; l < W; ++l) s += v[l];
    return s;
  }
  // Lanes < n kept, the others zeroed (bitwise, so NaN * 0 products are dropped too).
  static PYDL_INLINE V keep_first(const V& v, int n) {
    VI mask;
    for (int l = 0; l < W; ++l) mask[l] = l < n ? I(-1) : I(0);
    VI bits;
    std::memcpy(&bits, &v, sizeof(V));
    bits &= mask;
    V out;
    std::memcpy(&out, &bits, sizeof(V));
    return out;
  }
};

// W consecutive elements of storage type T at p as one Vec<acc_t<T>>: bfloat16 widened in
// registers (a bfloat16 is the top half of a float).
template <typename T>
PYDL_INLINE typename Vec<acc_t<T>>::V load_widened(const T* p) {
  using V = typename Vec<acc_t<T>>::V;
  if constexpr (std::is_same_v<T, bf16_t>) {
    typedef uint16_t Half16 __attribute__((vector_size(16)));
    typedef uint32_t Bits8 __attribute__((vector_size(32)));
    Half16 h;
    std::memcpy(&h, p, sizeof(h));
    const Bits8 bits = __builtin_convertvector(h, Bits8) << 16;
    V v;
    std::memcpy(&v, &bits, sizeof(v));
    return v;
  } else {
    return Vec<acc_t<T>>::load(p);
  }
}

// Below this many elements per call a single thread is faster than waking a team.
constexpr int64_t kMinElementsPerThread = 1 << 15;

inline int choose_num_threads(int requested, int64_t rows, int64_t elements) {
  int64_t by_work = std::max<int64_t>(1, elements / kMinElementsPerThread);
  int64_t n = std::min<int64_t>({static_cast<int64_t>(std::max(requested, 1)), rows, by_work});
  return static_cast<int>(std::max<int64_t>(n, 1));
}

// Outputs at least this large get the transparent-huge-page hint below.
constexpr int64_t kHugePageAdviceBytes = int64_t{4} << 20;

// A freshly allocated multi-MiB output usually comes straight from mmap (glibc serves every
// block over 32 MiB that way, and torch's CPU allocator is plain malloc), so the kernel's first
// write faults it in one 4 KiB page at a time: for a 32 MiB output that is 8192 faults, which
// costs several times the kernel itself. Asking for transparent huge pages on the output's
// whole 2 MiB pages before the first write makes that 16 faults. The hint covers only memory
// the kernel is about to overwrite entirely, changes no data and is ignored where THP is off
// (errors are deliberately ignored too: it is advice). Measured on the dev machine:
// torch.empty(8192, 1024).fill_(1) takes 12.5 ms without the hint and 3.4 ms with it.
// PYDL_CPU_HUGE_PAGES=0 in the environment turns the hint off.
inline void advise_huge_pages(const TensorView& out) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool enabled = [] {
    const char* v = std::getenv("PYDL_CPU_HUGE_PAGES");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  if (!enabled || !out.defined || out.data == nullptr) return;
  const int64_t bytes = out.numel() * dtype_size(out.dtype);
  if (bytes < kHugePageAdviceBytes) return;
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(out.data);
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)out;
#endif
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
