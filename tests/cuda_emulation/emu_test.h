// What every emulated-execution test program shares (one program per op, test_<op>.cpp, built by
// `make test-cuda-emulated` against the mock CUDA headers in mock/ with csrc/cuda/<op>*.cu and
// csrc/<op>_args.cpp). Include it from the program's single translation unit: it defines the
// kernels' dynamic shared memory buffer.
//
//   int main(int argc, char** argv) {
//     const std::string which = emu::init(argc, argv);   // "quick" (CI), "all", or a subset name
//     ... emu::Report rep{"case name"}; rep.check(ok, "what", err); rep.done(); ...
//     return emu::summary();
//   }
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "pydl/dtype.h"
#include "pydl/tensor_view.h"

// The storage of `extern __shared__` in cuda::dynamic_smem (blocks run one after another).
namespace pydl { namespace cuda { alignas(16) unsigned char pydl_dynamic_smem[256 * 1024]; } }

namespace emu {

inline int g_fail = 0, g_checks = 0;

// Storage type <-> float, names and dtype codes of the three CUDA storage types.
template <typename T> pydl::DType dtype_of();
template <> inline pydl::DType dtype_of<float>() { return pydl::DType::kFloat32; }
template <> inline pydl::DType dtype_of<__half>() { return pydl::DType::kFloat16; }
template <> inline pydl::DType dtype_of<__nv_bfloat16>() { return pydl::DType::kBFloat16; }
inline float tf(float v) { return v; }
inline float tf(__half v) { return __half2float(v); }
inline float tf(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> T ff(float v);
template <> inline float ff<float>(float v) { return v; }
template <> inline __half ff<__half>(float v) { return __float2half_rn(v); }
template <> inline __nv_bfloat16 ff<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <typename T> const char* tname();
template <> inline const char* tname<float>() { return "f32"; }
template <> inline const char* tname<__half>() { return "f16"; }
template <> inline const char* tname<__nv_bfloat16>() { return "bf16"; }

// Calls run.template operator()<T>() for the three storage types in turn (float, __half,
// __nv_bfloat16): emu::for_each_storage_type([&]<typename T>() { run<T>(c, label); });
template <typename Run> void for_each_storage_type(Run&& run) {
  run.template operator()<float>();
  run.template operator()<__half>();
  run.template operator()<__nv_bfloat16>();
}

// A defined TensorView of `data` (dtype dt) with these sizes and strides (in elements).
inline pydl::TensorView view(void* data, pydl::DType dt, std::vector<int64_t> sizes, std::vector<int64_t> strides) {
  pydl::TensorView v;
  v.data = data; v.dtype = dt; v.ndim = static_cast<int>(sizes.size()); v.defined = true;
  for (int i = 0; i < v.ndim; ++i) { v.sizes[i] = sizes[i]; v.strides[i] = strides[i]; }
  return v;
}

inline bool close(double got, double ref, double atol, double rtol) {
  if (std::isnan(ref)) return std::isnan(got);
  return std::fabs(got - ref) <= atol + rtol * std::fabs(ref);
}

// One test case: counts its checks, remembers the first failure and the worst error.
struct Report {
  std::string name; int bad = 0; double worst = 0; std::string first;
  void check(bool ok, const std::string& what, double err) {
    ++g_checks;
    if (!ok) { if (bad == 0) first = what; ++bad; }
    worst = std::max(worst, err);
  }
  void done() {
    if (bad) { ++g_fail; std::printf("FAIL %s: %d bad, first %s\n", name.c_str(), bad, first.c_str()); }
  }
};

// EMU_VERBOSE=1: one timestamped line per case on stderr.
inline void trace(const char* name) {
  if (!std::getenv("EMU_VERBOSE")) return;
  static const auto t0 = std::chrono::steady_clock::now();
  std::fprintf(stderr, "%.2f %s\n", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), name);
}

// Points the emulator at the shared-memory buffer, reads EMU_SCHEDULE; returns argv[1] or "all".
inline std::string init(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IONBF, 0);
  pydl_emulation::g_smem = pydl::cuda::pydl_dynamic_smem;
  pydl_emulation::g_smem_size = sizeof(pydl::cuda::pydl_dynamic_smem);
  if (const char* e = std::getenv("EMU_SCHEDULE")) pydl_emulation::g_schedule = std::atoi(e);
  return argc > 1 ? argv[1] : "all";
}

// The last line of every program; its exit status.
inline int summary() {
  std::printf("%d checks, %d failing tests, %ld launches\n", g_checks, g_fail, (long)pydl_emulation::g_launches.load());
  return g_fail ? 1 : 0;
}

}  // namespace emu
