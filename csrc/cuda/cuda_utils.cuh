// Shared helpers for pydl's CUDA kernels: error checks, launches, cached device queries, alignment
// and dtype dispatch on the host; 16-byte vector access, float conversions of the storage types,
// warp / block sum reductions on the device.
//
// Include this header FIRST in every .cu file (before any pydl/ header): it binds the dtype
// dispatch macro of pydl/dtype.h to the CUDA storage types __half and __nv_bfloat16.
#pragma once

#if defined(PYDL_BF16_T) && !defined(PYDL_CUDA_STORAGE_TYPES)
#error "include cuda/cuda_utils.cuh before any pydl/ header (PYDL_BF16_T is already bound)"
#endif
#define PYDL_CUDA_STORAGE_TYPES 1
#define PYDL_HALF_T __half
#define PYDL_BF16_T __nv_bfloat16

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "pydl/check.h"
#include "pydl/dtype.h"
#include "pydl/tensor_view.h"

// Throws std::runtime_error carrying cudaGetErrorString's text when a CUDA runtime call fails.
#define PYDL_CUDA_CHECK(expr)                                                                  \
  do {                                                                                         \
    const cudaError_t pydl_cuda_err_ = (expr);                                                 \
    if (pydl_cuda_err_ != cudaSuccess) {                                                       \
      throw std::runtime_error(std::string("CUDA error: ") + cudaGetErrorString(pydl_cuda_err_) + \
                               " (" #expr ") at " __FILE__ ":" + std::to_string(__LINE__));    \
    }                                                                                          \
  } while (0)

namespace pydl {
namespace cuda {

// ---- host side: launches and their checks -----------------------------------------------------

// Call right after every kernel launch: turns a launch error into std::runtime_error.
inline void check_last_launch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(op) + ": CUDA kernel launch failed: " +
                             cudaGetErrorString(err));
  }
}

// kernel<<<grid, block, smem, stream>>>(args...) followed by check_last_launch(op). A 1-D grid:
// kernels walk their work with grid-stride loops, so grid is only a parallelism choice.
template <typename... KernelArgs, typename... Args>
inline void launch(void (*kernel)(KernelArgs...), int64_t grid, int block, size_t smem_bytes,
                   cudaStream_t stream, const char* op, Args&&... args) {
  if (grid < 1 || grid > 0x7fffffffLL || block < 1 || block > 1024) {
    throw std::runtime_error(std::string(op) + ": bad launch configuration (grid " +
                             std::to_string(grid) + ", block " + std::to_string(block) + ")");
  }
#if defined(PYDL_CUDA_HOST_EMULATION)
  // Test builds only: a CPU emulator of the CUDA execution model runs the kernel.
  ::pydl_emulation::launch(kernel, grid, block, smem_bytes, std::forward<Args>(args)...);
  (void)stream;
#else
  kernel<<<dim3(static_cast<unsigned>(grid)), dim3(static_cast<unsigned>(block)), smem_bytes,
           stream>>>(std::forward<Args>(args)...);
#endif
  check_last_launch(op);
}

// ---- host side: device queries, alignment, dtypes ---------------------------------------

inline int current_device() {
  int dev = 0;
  PYDL_CUDA_CHECK(cudaGetDevice(&dev));
  return dev;
}

// cudaDeviceGetAttribute(ATTR) of device `dev`, raised to at least `floor`; cached per device.
template <cudaDeviceAttr ATTR>
int device_attribute(int dev, int floor) {
  constexpr int kCached = 64;
  static std::atomic<int> cache[kCached] = {};
  if (dev >= 0 && dev < kCached) {
    const int v = cache[dev].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int value = 0;
  PYDL_CUDA_CHECK(cudaDeviceGetAttribute(&value, ATTR, dev));
  value = std::max(value, floor);
  if (dev >= 0 && dev < kCached) cache[dev].store(value, std::memory_order_relaxed);
  return value;
}

inline int sm_count(int dev) { return device_attribute<cudaDevAttrMultiProcessorCount>(dev, 1); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The view's base pointer allows 16-byte accesses (an undefined optional view passes).
inline bool aligned16(const TensorView& t) {
  return !t.defined || (reinterpret_cast<uintptr_t>(t.data) & 15u) == 0;
}

inline void require_cuda_dtype(DType t, const char* op) {
  PYDL_CHECK(t == DType::kFloat32 || t == DType::kFloat16 || t == DType::kBFloat16, op,
             ": the CUDA kernel supports float32, float16 and bfloat16, got ", dtype_name(t));
}

// f(T{}) for the storage type T of `t` (float, __half or bf16), after require_cuda_dtype: the
// kernels are never instantiated for double.
template <typename F>
void dispatch_cuda_dtype(DType t, const char* op, F&& f) {
  require_cuda_dtype(t, op);
  PYDL_DISPATCH_FLOATING(t, op, [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) f(scalar_t{});
  });
}

// ---- device side: storage types <-> float -----------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round-to-nearest-even; NaN stays NaN, overflow gives +-inf (what torch's casts do).
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ---- device side: vector memory access --------------------------------------------------------

// VEC consecutive elements moved as one memory access of sizeof(T) * VEC bytes (16 for the full
// vector width; the struct is aligned to its own size, so VEC = 1 is a plain scalar access).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  static_assert(VEC >= 1 && (VEC & (VEC - 1)) == 0 && sizeof(T) * VEC <= 16,
                "Vec: VEC must be a power of two and the vector at most 16 bytes");
  T v[VEC];
};

// Elements per 16-byte vector for storage type T: 8 for half / bfloat16, 4 for float.
template <typename T>
constexpr int kVec16 = static_cast<int>(16 / sizeof(T));

namespace detail {
template <int BYTES> struct RawWord;
template <> struct RawWord<2> { using type = unsigned short; };
template <> struct RawWord<4> { using type = unsigned int; };
template <> struct RawWord<8> { using type = uint2; };
template <> struct RawWord<16> { using type = uint4; };
}  // namespace detail

// p must be aligned to sizeof(T) * VEC bytes. Goes through a plain integer word so that the
// compiler always emits one LDG/STG of the full width.
template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load_vec(const T* p) {
  using W = typename detail::RawWord<sizeof(T) * VEC>::type;
  const W w = *reinterpret_cast<const W*>(p);
  Vec<T, VEC> out;
  memcpy(&out, &w, sizeof(out));
  return out;
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, VEC>& v) {
  using W = typename detail::RawWord<sizeof(T) * VEC>::type;
  W w;
  memcpy(&w, &v, sizeof(w));
  *reinterpret_cast<W*>(p) = w;
}

template <typename T, int VEC>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[VEC]) {
  const Vec<T, VEC> v = load_vec<T, VEC>(p);
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = to_float(v.v[k]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[VEC]) {
  Vec<T, VEC> v;
#pragma unroll
  for (int k = 0; k < VEC; ++k) v.v[k] = from_float<T>(in[k]);
  store_vec<T, VEC>(p, v);
}

// ---- device side: reductions ----------------------------------------------------------------

// Two sums reduced together (one shuffle tree / one barrier for both).
struct f32x2 {
  float x, y;
};
__device__ __forceinline__ f32x2 operator+(f32x2 a, f32x2 b) { return {a.x + b.x, a.y + b.y}; }

__device__ __forceinline__ float shfl_xor(float v, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}
__device__ __forceinline__ f32x2 shfl_xor(f32x2 v, int lane_mask) {
  return {__shfl_xor_sync(0xffffffffu, v.x, lane_mask),
          __shfl_xor_sync(0xffffffffu, v.y, lane_mask)};
}

// Sum over aligned groups of `width` lanes (a power of two <= 32). Butterfly: every lane of a
// group ends with the same, bitwise identical value (a + b == b + a exactly). All 32 lanes of the
// warp must call it.
template <typename V>
__device__ __forceinline__ V warp_sum(V v, int width = 32) {
  for (int offset = width >> 1; offset > 0; offset >>= 1) v = v + shfl_xor(v, offset);
  return v;
}

// Sum over a "row group": `width` consecutive threads of the block, starting at a multiple of
// `width`; width is a power of two <= 32 or a multiple of 32 that divides blockDim.x. Every
// thread of the group gets the same bitwise value (fixed summation order: deterministic).
// width > 32 goes through `smem` (blockDim.x / 32 slots) and one __syncthreads(): then EVERY
// thread of the block must call it (never from a divergent branch), and the next call must use
// a different `smem` unless a barrier separates them (alternate two buffers: ping-pong).
template <typename V>
__device__ __forceinline__ V group_sum(V v, int width, V* smem) {
  if (width <= 32) return warp_sum(v, width);
  v = warp_sum(v);
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  if ((threadIdx.x & 31) == 0) smem[warp] = v;
  __syncthreads();
  const int warps_per_group = width >> 5;
  const int first = warp - warp % warps_per_group;
  V total = smem[first];
  for (int j = 1; j < warps_per_group; ++j) total = total + smem[first + j];
  return total;
}

// Sum over the whole block (blockDim.x a multiple of 32); same rules as group_sum.
template <typename V>
__device__ __forceinline__ V block_sum(V v, V* smem) {
  return group_sum(v, static_cast<int>(blockDim.x), smem);
}

// The kernel's dynamic shared memory (the launch's smem_bytes), 16-byte aligned. Kernels take all
// their shared memory from here and lay it out themselves.
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char pydl_dynamic_smem[];
  return reinterpret_cast<T*>(pydl_dynamic_smem);
}

}  // namespace cuda
}  // namespace pydl
