// Host emulation of the subset of the CUDA runtime / device model used by pydl kernels.
// Each CUDA thread is an OS thread; blocks run one after another; __syncthreads and warp
// shuffles are real barriers (with a deadlock timeout). Test-only.
#pragma once
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>
#include <functional>
#include <ucontext.h>

#define PYDL_CUDA_HOST_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint3 { unsigned x = 0, y = 0, z = 0; };
struct uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };

inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
inline const char* cudaGetErrorString(cudaError_t) { return "emulated error"; }
struct CUstream_st;
typedef CUstream_st* cudaStream_t;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace pydl_emulation {
inline int g_sm_count = 2;
inline int g_blocks_per_sm = 2;
inline size_t g_smem_optin = 227 * 1024;
inline std::atomic<long> g_launches{0};
inline std::vector<std::pair<const void*, int>> g_smem_attr;
}  // namespace pydl_emulation

inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMultiProcessorCount ? pydl_emulation::g_sm_count
                                           : static_cast<int>(pydl_emulation::g_smem_optin);
  return cudaSuccess;
}
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, const void*, int, size_t) {
  *n = pydl_emulation::g_blocks_per_sm;
  return cudaSuccess;
}
inline cudaError_t cudaFuncSetAttribute(const void* f, cudaFuncAttribute, int v) {
  pydl_emulation::g_smem_attr.push_back({f, v});
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  std::memset(p, v, n);
  return cudaSuccess;
}

namespace pydl_emulation {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "EMULATOR FAILURE: %s (block %u thread %u)\n", what, blockIdx.x, threadIdx.x);
  std::fflush(stderr);
  std::abort();
}

// Cooperative fibers: every CUDA thread of a block is a ucontext fiber on this OS thread; a
// fiber runs until it waits at a barrier (block or warp) or ends, then the next one runs.
struct Fiber {
  ucontext_t ctx;
  int state = 0;  // 0 runnable, 1 waits block barrier, 2 waits warp barrier, 3 done
  uint64_t wait_gen = 0;
  unsigned tid = 0;
};
struct Block {
  std::vector<Fiber> fibers;
  ucontext_t sched;
  int block_arrived = 0, block_expected = 0;
  uint64_t block_gen = 0;
  std::vector<int> warp_arrived;
  std::vector<uint64_t> warp_gen;
  std::vector<float> slots;
  std::vector<uint64_t> slots64;  // integer shuffles and ballots
  int current = -1;
  std::function<void()> body;
};
inline Block* g_block = nullptr;
constexpr size_t kFiberStack = 64 * 1024;
inline char* fiber_stack(int t) {  // a pool reused by every block, never zeroed
  static char* pool = static_cast<char*>(std::malloc(1024 * kFiberStack));
  return pool + static_cast<size_t>(t) * kFiberStack;
}
inline int g_schedule = 0;  // 0: forward, 1: alternate forward / reverse, 2: random
inline unsigned g_seed = 1;

inline void block_wait() {
  Block* b = g_block;
  Fiber& f = b->fibers[b->current];
  const uint64_t gen = b->block_gen;
  if (++b->block_arrived == b->block_expected) {
    b->block_arrived = 0;
    ++b->block_gen;
    return;
  }
  f.state = 1;
  f.wait_gen = gen;
  swapcontext(&f.ctx, &b->sched);
}
inline void warp_wait() {
  Block* b = g_block;
  Fiber& f = b->fibers[b->current];
  const int w = f.tid / 32;
  const uint64_t gen = b->warp_gen[w];
  if (++b->warp_arrived[w] == 32) {
    b->warp_arrived[w] = 0;
    ++b->warp_gen[w];
    return;
  }
  f.state = 2;
  f.wait_gen = gen;
  swapcontext(&f.ctx, &b->sched);
}
inline float exchange(float v, int src_lane) {
  Block* b = g_block;
  const int warp = threadIdx.x / 32;
  b->slots[threadIdx.x] = v;
  warp_wait();
  const float r = b->slots[warp * 32 + src_lane];
  warp_wait();
  return r;
}
// Any 1..8-byte trivially copyable value, moved as raw bits (integer shuffles).
template <typename T>
inline T exchange_bits(T v, int src_lane) {
  static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
  Block* b = g_block;
  const int warp = threadIdx.x / 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  b->slots64[threadIdx.x] = bits;
  warp_wait();
  bits = b->slots64[warp * 32 + src_lane];
  warp_wait();
  T r;
  std::memcpy(&r, &bits, sizeof(T));
  return r;
}
inline void fiber_entry() {
  g_block->body();
  g_block->fibers[g_block->current].state = 3;
}

// Shared memory: the harness points these at the kernels' extern buffer (blocks run one after
// another). Poisoned with NaN bytes before every block.
inline unsigned char* g_smem = nullptr;
inline size_t g_smem_size = 0;

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), long long grid, int block, size_t smem, Args&&... args) {
  if (block % 32 != 0) fail("block size not a multiple of 32");
  if (smem > 48 * 1024) {
    bool ok = false;
    for (auto& p : g_smem_attr) if (p.first == reinterpret_cast<const void*>(kernel) && static_cast<size_t>(p.second) >= smem) ok = true;
    if (!ok) fail("dynamic smem > 48 KB without cudaFuncSetAttribute");
  }
  if (smem > g_smem_optin) fail("dynamic smem above the opt-in limit");
  if (smem > g_smem_size) fail("smem larger than the emulated buffer");
  ++g_launches;
  for (long long bx = 0; bx < grid; ++bx) {
    std::memset(g_smem, 0xff, g_smem_size);
    Block blk;
    blk.block_expected = block;
    blk.warp_arrived.assign(block / 32, 0);
    blk.warp_gen.assign(block / 32, 0);
    blk.slots.assign(block, 0.0f);
    blk.slots64.assign(block, 0);
    blk.fibers.resize(block);
    blk.body = [&] { kernel(args...); };
    g_block = &blk;
    blockIdx.x = static_cast<unsigned>(bx);
    blockDim = dim3(block);
    gridDim = dim3(static_cast<unsigned>(grid));
    for (int t = 0; t < block; ++t) {
      Fiber& f = blk.fibers[t];
      f.tid = t;
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = fiber_stack(t);
      f.ctx.uc_stack.ss_size = kFiberStack;
      f.ctx.uc_link = &blk.sched;
      makecontext(&f.ctx, fiber_entry, 0);
    }
    // Schedules: 0: warp-greedy, warps in order (each warp runs until all its lanes wait at a
    // __syncthreads or end: maximal skew between warps); 1: warp-greedy, alternating forward /
    // reverse warp order; 2: warp-greedy, random warp order; 3: one step per fiber per pass.
    const int nwarps = block / 32;
    std::vector<int> order(nwarps);
    auto runnable = [&](int t) {
      const Fiber& f = blk.fibers[t];
      if (f.state == 3) return false;
      if (f.state == 1 && blk.block_gen == f.wait_gen) return false;
      if (f.state == 2 && blk.warp_gen[t / 32] == f.wait_gen) return false;
      return true;
    };
    auto run = [&](int t) {
      Fiber& f = blk.fibers[t];
      f.state = 0;
      blk.current = t;
      threadIdx.x = t;
      swapcontext(&blk.sched, &f.ctx);
    };
    for (int pass = 0;; ++pass) {
      for (int w = 0; w < nwarps; ++w) order[w] = w;
      if ((g_schedule == 1 && pass % 2) ) std::reverse(order.begin(), order.end());
      if (g_schedule == 2) {
        for (int w = nwarps - 1; w > 0; --w) { g_seed = g_seed * 1103515245u + 12345u; std::swap(order[w], order[(g_seed >> 8) % (w + 1)]); }
      }
      bool all_done = true, progress = false;
      for (int w : order) {
        for (bool again = true; again;) {
          again = false;
          for (int l = 0; l < 32; ++l) {
            const int t = w * 32 + l;
            if (blk.fibers[t].state != 3) all_done = false;
            if (!runnable(t)) continue;
            run(t);
            progress = true;
            if (g_schedule != 3) again = true;
          }
        }
      }
      if (all_done) break;
      if (!progress) {
        int b1 = 0, b2 = 0, d = 0;
        for (auto& f : blk.fibers) { b1 += f.state == 1; b2 += f.state == 2; d += f.state == 3; }
        std::fprintf(stderr, "deadlock: %d at __syncthreads, %d at shuffles, %d exited\n", b1, b2, d);
        fail("deadlock (divergent barrier or shuffle)");
      }
    }
    for (size_t i = smem; i < g_smem_size; ++i) {
      if (g_smem[i] != 0xff) fail("shared memory written beyond the launch's dynamic size");
    }
    g_block = nullptr;
  }
}
}  // namespace pydl_emulation

inline void __syncthreads() { pydl_emulation::block_wait(); }
inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask, int width = 32) {
  if (mask != 0xffffffffu || width != 32) pydl_emulation::fail("unexpected shuffle mask/width");
  return pydl_emulation::exchange(v, (threadIdx.x % 32) ^ lane_mask);
}
inline float __shfl_down_sync(unsigned mask, float v, int delta, int width = 32) {
  if (mask != 0xffffffffu || width != 32) pydl_emulation::fail("unexpected shuffle mask/width");
  const int lane = threadIdx.x % 32;
  const int src = lane + delta < 32 ? lane + delta : lane;
  return pydl_emulation::exchange(v, src);
}
inline float __frsqrt_rn(float x) { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(x))); }
// Integer shuffles (32- and 64-bit), ballot, popc and (shared / global) atomicAdd: fibers are
// cooperative, so an atomic is a plain read-modify-write.
#define PYDL_EMU_INT_SHFL(T)                                                                   \
  inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {              \
    if (mask != 0xffffffffu || width != 32) pydl_emulation::fail("unexpected shuffle mask/width"); \
    return pydl_emulation::exchange_bits(v, (threadIdx.x % 32) ^ lane_mask);                \
  }                                                                                          \
  inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {                   \
    if (mask != 0xffffffffu || width != 32) pydl_emulation::fail("unexpected shuffle mask/width"); \
    return pydl_emulation::exchange_bits(v, src_lane & 31);                                  \
  }
PYDL_EMU_INT_SHFL(int)
PYDL_EMU_INT_SHFL(unsigned)
PYDL_EMU_INT_SHFL(long long)
PYDL_EMU_INT_SHFL(unsigned long long)
#undef PYDL_EMU_INT_SHFL
inline unsigned __ballot_sync(unsigned mask, int pred) {
  if (mask != 0xffffffffu) pydl_emulation::fail("unexpected ballot mask");
  pydl_emulation::Block* b = pydl_emulation::g_block;
  const int warp = threadIdx.x / 32;
  b->slots64[threadIdx.x] = pred ? 1u : 0u;
  pydl_emulation::warp_wait();
  unsigned r = 0;
  for (int l = 0; l < 32; ++l) r |= (b->slots64[warp * 32 + l] ? 1u : 0u) << l;
  pydl_emulation::warp_wait();
  return r;
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int atomicAdd(int* p, int v) { const int old = *p; *p = old + v; return old; }
inline unsigned atomicAdd(unsigned* p, unsigned v) { const unsigned old = *p; *p = old + v; return old; }
