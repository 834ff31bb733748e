// CUDA kernels of the fused LayerNorm family (contract: include/pydl/layer_norm.h):
//   forward   y = act(LN(x [+ residual]) * w + b), mean, rstd [, h = x + residual]
//   backward  dx (+ dh), dweight, dbias
// Storage float32 / float16 / bfloat16; every computation in float32.
//
// RMSNorm (Norm::kRms) is the same kernels with the compile-time flag RMS: the forward's
// statistics pass sums x^2 only (one row reduction instead of the mean and the deviations),
// rstd = rsqrt(sumsq / N + eps), mean written as 0, xhat = x * rstd; the backward skips the
// mean (never read) and reduces one row sum, c2 = mean(dxhat * xhat), instead of two (c1 = 0),
// and accumulates no dbias (RMSNorm has no bias). Every kernel below is instantiated for both.
//
// Layout. A row (N elements) is split into "chunks" of VEC elements: VEC = 16 bytes / sizeof(T)
// when N % VEC == 0 and every pointer and row stride allows 16-byte accesses (checked on the host
// at each call), else VEC = 1. A row is owned by a "row group" of TPR consecutive threads
// (TPR = a power of two <= 32, or a multiple of 32: whole warps); thread t of the group owns
// chunks c = i * TPR + t, i < ITEMS, so a warp's accesses are coalesced and each thread holds its
// ITEMS * VEC values in registers (compile-time indices only). A block holds RPB row groups and
// walks rows with a grid-stride loop (grid <= one wave of resident blocks; 1-D grid, int64
// offsets). Row sums: shuffle butterfly inside the warp, then one shared-memory slot per warp and
// a fixed-order sum (results are deterministic and identical in every thread of the group).
//
// Configs chosen by N (choose_fwd_cfg, choose_bwd_cfg and the launchers):
//   forward, N <= 32768 (16-byte vectors): ln_fwd_cached, E = ITEMS * VEC in {8, 16, 24, 32}
//     elements per thread, the (TPR, E) that leaves the fewest idle slots, ties to the larger E
//     (fewer threads per row: fewer reduction steps, more loads in flight per thread):
//     N = 384 bf16 -> E 24, 16 lanes per row; 768 -> E 24, a warp; 1024 -> E 32, a warp;
//     2048 -> 64 threads; 4096 -> 128; 16384 -> 512; 32768 -> 1024. x read once, y (h) written
//     once. Blocks of >= 128 threads (128 / TPR rows).
//   forward, scalar path (VEC = 1: odd N, misaligned views), N <= 8192: ln_fwd_cached with E = 8
//     (a scalar load takes a register per element; larger E spills).
//   forward, longer rows: ln_fwd_uncached, 512 threads per row; pass 1 reads the row (writes h)
//     and keeps Welford (count, mean, M2) per thread, merged with Chan's formula (warp tree,
//     then the warps in a fixed order); pass 2 re-reads the row (L2) and writes y (x may use the
//     read-only path, h only coherent loads: pass 1 wrote it).
//   backward, N <= 8192 (vectors) / 4096 (scalar): ln_bwd_rows, E = 8 (scalar 4): xhat and
//     dxhat = g * w stay in registers between the row sum and the dx pass. Blocks of ~512
//     threads (512 / TPR rows) so that one wave is only 2..4 blocks per SM.
//   backward, longer rows: ln_bwd_uncached, 1024 threads per row, chunk loops; x and dy are read
//     twice (the second time from L1 / L2).
//   dweight / dbias: a block accumulates g * xhat and g per column over all its rows (the thread
//     -> column map never changes): in registers (ln_bwd_rows, vectors), in shared memory
//     (scalar ln_bwd_rows; ln_bwd_uncached up to N = 16384), or straight in the block's own
//     workspace row (ln_bwd_uncached beyond; each column belongs to one thread: no atomics). Row
//     groups are merged in shared memory in group order; each block writes its partial row
//     workspace[block] = [dw (N) | db (N)]. ln_reduce_partials sums the `grid` partial rows per
//     column (coalesced, fixed order) and writes dweight / dbias. Deterministic run to run.
//
// Floor (bytes moved / bandwidth), bf16, M x N: forward 4MN bytes (read x, write y; 8MN with
// the residual: + read residual, write h), backward 6MN (read x, dy, write dx; 8MN with dh) plus
// the partials (P x 2N x 4 bytes written and read back, P ~ 2..4 x SMs: L2-resident for small
// N). H100 (~3.35 TB/s), M = 16384, N = 1024: forward 67 MB -> ~20 us, backward 101 MB -> ~30 us.
#include "cuda_utils.cuh"  // first: binds the CUDA storage types for PYDL_DISPATCH_FLOATING

#include <algorithm>
#include <atomic>
#include <cmath>
#include <initializer_list>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "pydl/layer_norm.h"

namespace pydl {
namespace {

using cuda::f32x2;
using cuda::from_float;
using cuda::group_sum;
using cuda::load_floats;
using cuda::store_floats;
using cuda::to_float;
using cuda::Vec;

constexpr int kActNone = static_cast<int>(Activation::kNone);
constexpr int kActGelu = static_cast<int>(Activation::kGelu);
constexpr int kActGeluTanh = static_cast<int>(Activation::kGeluTanh);

constexpr int kMaxThreads = 1024;          // cached kernels: block = RPB * TPR <= 1024
constexpr int kFwdBlockTarget = 128;       // forward: rows per block = 128 / TPR for small rows
constexpr int kBwdBlockTarget = 512;       // backward: 512 / TPR (fewer blocks: fewer partials)
constexpr int kFwdUncachedThreads = 512;   // one row per block for N beyond the register path
constexpr int kFwdCachedMaxN = 32 * 1024;  // 1024 threads x 32 elements
constexpr int kBwdVecE = 8;                // ln_bwd_rows: elements per thread, vector loads
constexpr int kBwdScalarE = 4;             // ... scalar loads (a register each)
constexpr int kBwdSmemAccMaxN = 16 * 1024;  // ln_bwd_uncached: dw / db in smem up to 128 KB
constexpr int kBwdUncachedThreads = 1024;
constexpr int kReduceCols = 32;            // ln_reduce_partials: columns per block (one warp)
constexpr int kReduceRows = 32;            // ... and warps splitting the partial rows
constexpr int kRedSlots = 32;              // one reduction slot per warp (<= 32 warps)

// ---- activations --------------------------------------------------------------------------------

constexpr float kSqrt1_2 = 0.70710678118654752440f;      // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;   // 1 / sqrt(2 pi)
constexpr float kSqrt2OverPi = 0.79788456080286535588f;  // sqrt(2 / pi)
constexpr float kGeluCoef = 0.044715f;

template <int ACT>
__device__ __forceinline__ float act_fwd(float z) {
  if constexpr (ACT == kActGelu) {
    return 0.5f * z * (1.0f + erff(z * kSqrt1_2));
  } else if constexpr (ACT == kActGeluTanh) {
    const float inner = kSqrt2OverPi * (z + kGeluCoef * z * z * z);
    return 0.5f * z * (1.0f + tanhf(inner));
  } else {
    return z;
  }
}

// d act / dz, written as torch's GeluBackward kernels compute it.
template <int ACT>
__device__ __forceinline__ float act_grad(float z) {
  if constexpr (ACT == kActGelu) {
    const float cdf = 0.5f * (1.0f + erff(z * kSqrt1_2));
    const float pdf = expf(-0.5f * z * z) * kInvSqrt2Pi;
    return cdf + z * pdf;
  } else if constexpr (ACT == kActGeluTanh) {
    const float z2 = z * z;
    const float t = tanhf(kSqrt2OverPi * (z + kGeluCoef * z2 * z));
    const float left = 0.5f * z;
    const float left_d = 0.5f * (1.0f + t);
    const float tanh_d = 1.0f - t * t;
    const float inner_d = kSqrt2OverPi * (1.0f + 3.0f * kGeluCoef * z2);
    return left_d + left * tanh_d * inner_d;
  } else {
    return 1.0f;
  }
}

// Calls f(std::integral_constant<int, ACT>{}) for the runtime activation code, so the branch is
// taken once per row (or chunk) and the loops inside f are compiled per activation.
template <typename F>
__device__ __forceinline__ void with_activation(int act, F&& f) {
  switch (act) {
    case kActGelu: f(std::integral_constant<int, kActGelu>{}); break;
    case kActGeluTanh: f(std::integral_constant<int, kActGeluTanh>{}); break;
    default: f(std::integral_constant<int, kActNone>{}); break;
  }
}

// ---- kernel arguments -----------------------------------------------------------------------

struct RowShape {
  int64_t m;        // rows
  int64_t x_rs;     // row strides (elements) of x, residual / dy, h / dh, y / dx
  int64_t a_rs;
  int64_t b_rs;
  int64_t o_rs;
  int n;            // row length
  int tpr;          // threads per row group
  int rpb;          // row groups per block (blockDim.x == tpr * rpb)
  int act;          // Activation code
  float eps;
  float inv_n;      // 1 / n (a multiply in the kernels: IEEE division would be a call there)
};

// Loads chunk `c` of a weight / bias vector, or the neutral value when the vector is absent.
template <typename T, int VEC>
__device__ __forceinline__ void load_param(const T* p, int c, float neutral, float (&out)[VEC]) {
  if (p != nullptr) {
    load_floats<T, VEC>(p + static_cast<int64_t>(c) * VEC, out);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = neutral;
  }
}

// ---- forward: row cached in registers ---------------------------------------------------------

// Chunk c of y = act((v - mean) * rstd * w + b) (RMS: act(v * rstd * w), no bias); v holds the
// chunk's inputs (overwritten).
template <typename T, int VEC, int ACT, bool RMS>
__device__ __forceinline__ void fwd_store_chunk(float (&v)[VEC], int c, float mean, float rstd,
                                                const T* __restrict__ w, const T* __restrict__ b,
                                                T* __restrict__ yr) {
  float wv[VEC], bv[VEC];
  load_param<T, VEC>(w, c, 1.0f, wv);
  if constexpr (RMS) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = act_fwd<ACT>(v[k] * rstd * wv[k]);
  } else {
    load_param<T, VEC>(b, c, 0.0f, bv);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = act_fwd<ACT>((v[k] - mean) * rstd * wv[k] + bv[k]);
  }
  store_floats<T, VEC>(yr + static_cast<int64_t>(c) * VEC, v);
}

// Shapes: x, res (m, n) row strides x_rs, a_rs; h (m, n) row stride b_rs; y (m, n) row stride
// o_rs; w, b (n,); mean, rstd (m,). Dynamic smem: 3 * kRedSlots floats.
// RMS: one reduction per row (sum of squares), through two slot sets alternating by row parity.
template <typename T, int VEC, int ITEMS, bool RMS>
__global__ void __launch_bounds__(kMaxThreads, 1)
    ln_fwd_cached(const T* __restrict__ x, const T* __restrict__ res, const T* __restrict__ w,
                  const T* __restrict__ b, T* __restrict__ y, T* __restrict__ h,
                  float* __restrict__ mean_out, float* __restrict__ rstd_out, const RowShape s) {
  float* red = cuda::dynamic_smem<float>();  // [kRedSlots] mean, then [kRedSlots] f32x2 deviations
  const int tpr = s.tpr;
  const int group = static_cast<int>(threadIdx.x) / tpr;
  const int t = static_cast<int>(threadIdx.x) - group * tpr;
  const int nchunks = s.n / VEC;
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * s.rpb;

  // Block-uniform loop (row groups past m still take part in the reductions).
  int parity = 0;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * s.rpb; base < s.m;
       base += row_step, parity ^= 1) {
    const int64_t row = base + group;
    const bool valid = row < s.m;
    // The row cache holds the storage type: x, or h already rounded to T, is exact in T (half
    // the registers of float for 16-bit types; converted again where used).
    Vec<T, VEC> v[ITEMS];
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int c = i * tpr + t;
      if (valid && c < nchunks) {
        const int64_t col = static_cast<int64_t>(c) * VEC;
        v[i] = cuda::load_vec<T, VEC>(x + row * s.x_rs + col);
        if (res != nullptr) {
          const Vec<T, VEC> r = cuda::load_vec<T, VEC>(res + row * s.a_rs + col);
#pragma unroll
          for (int k = 0; k < VEC; ++k) {  // torch rounds x + residual to T
            v[i].v[k] = from_float<T>(to_float(v[i].v[k]) + to_float(r.v[k]));
          }
          cuda::store_vec<T, VEC>(h + row * s.b_rs + col, v[i]);
        }
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float xv = to_float(v[i].v[k]);
          sum += RMS ? xv * xv : xv;  // RMS: the sum of squares
        }
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[i].v[k] = from_float<T>(0.0f);
      }
    }
    float mean, rstd;
    if constexpr (RMS) {
      // One reduction per row: the slots alternate by row parity (a fast warp's next row must
      // not overwrite a slot another warp is still reading; LN's two sets do that by order).
      const float ms = group_sum(sum, tpr, red + parity * kRedSlots) * s.inv_n;
      mean = 0.0f;
      rstd = __frsqrt_rn(ms + s.eps);  // correctly rounded 1 / sqrt
    } else {
      const float mean0 = group_sum(sum, tpr, red) * s.inv_n;

      // Corrected two-pass: the deviations' sum folds the first mean's rounding error back in,
      // so constant rows normalize to exactly 0 and |mean| >> std keeps its accuracy.
      f32x2 dev = {0.0f, 0.0f};  // sum(d), sum(d * d), d = x - mean0
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int c = i * tpr + t;
        if (valid && c < nchunks) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const float d = to_float(v[i].v[k]) - mean0;
            dev.x += d;
            dev.y += d * d;
          }
        }
      }
      dev = group_sum(dev, tpr, reinterpret_cast<f32x2*>(red + kRedSlots));
      const float shift = dev.x * s.inv_n;
      mean = mean0 + shift;
      const float var_raw = dev.y * s.inv_n - shift * shift;
      const float var = var_raw < 0.0f ? 0.0f : var_raw;  // keeps NaN
      rstd = __frsqrt_rn(var + s.eps);  // correctly rounded 1 / sqrt
    }
    if (valid && t == 0 && mean_out != nullptr) {  // the statistics are optional (inference)
      mean_out[row] = mean;
      rstd_out[row] = rstd;
    }

    T* yr = y + (valid ? row : 0) * s.o_rs;
    with_activation(s.act, [&](auto act) {
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int c = i * tpr + t;
        if (valid && c < nchunks) {
          float o[VEC];
#pragma unroll
          for (int k = 0; k < VEC; ++k) o[k] = to_float(v[i].v[k]);
          fwd_store_chunk<T, VEC, decltype(act)::value, RMS>(o, c, mean, rstd, w, b, yr);
        }
      }
    });
    // Next iteration (LN): `red` is written again only after the variance barrier of this one,
    // which every thread passes after reading the mean slots; the variance slots are rewritten
    // only after the next mean barrier. RMS: slot set `parity` is rewritten two rows later,
    // after the next row's barrier, which every thread passes after reading this row's slots.
    // No extra barrier needed.
  }
}

// ---- forward: long rows (N > 32768), two passes ---------------------------------------------

// Chan et al.: merge (nb, mb, qb) into (na, ma, qa); counts are exact in float (<= 2^24).
__device__ __forceinline__ void chan_merge(float& na, float& ma, float& qa, float nb, float mb,
                                           float qb) {
  const float n = na + nb;
  if (n > 0.0f) {
    const float d = mb - ma;
    const float fb = nb / n;
    ma = ma + d * fb;
    qa = qa + qb + d * d * na * fb;
    na = n;
  }
}

// One row per block, blockDim.x == kFwdUncachedThreads; U chunks per thread per pass-1 step.
// RES: res and h are given (pass 1 writes h = x + res, pass 2 re-reads h); it fixes pass 2's
// source at compile time (see there).
// Registers (64: 2 blocks of 512 threads per SM) are tight. Pass 1 strides by the compile-time
// thread count, so a tile's U chunks are one address plus immediate offsets (with blockDim.x the
// scalar kernels, U = 16, spill); pass 1 still tests res at run time and pass 2 strides by
// blockDim.x: the forms with which no instantiation spills on sm_80 and sm_90a (nvcc 13.0;
// scripts/check_cuda_compile.sh reports spills).
// RMS: pass 1 sums x^2 per thread (no Welford), the warps' sums are added in a fixed order.
// Dynamic smem: 3 * kRedSlots + 2 floats.
template <typename T, int VEC, int U, bool RES, bool RMS>
__global__ void __launch_bounds__(kFwdUncachedThreads, 2)
    ln_fwd_uncached(const T* __restrict__ x, const T* __restrict__ res, const T* __restrict__ w,
                    const T* __restrict__ b, T* __restrict__ y, T* __restrict__ h,
                    float* __restrict__ mean_out, float* __restrict__ rstd_out, const RowShape s) {
  float* sm_n = cuda::dynamic_smem<float>();
  float* sm_mean = sm_n + kRedSlots;
  float* sm_m2 = sm_mean + kRedSlots;
  float* sm_stats = sm_m2 + kRedSlots;  // [mean, rstd] of the current row
  const int t = static_cast<int>(threadIdx.x);
  constexpr int tpr = kFwdUncachedThreads;  // == blockDim.x
  const int lane = t & 31, warp = t >> 5;
  const int nchunks = s.n / VEC;

  for (int64_t row = blockIdx.x; row < s.m; row += gridDim.x) {
    const T* xr = x + row * s.x_rs;
    const T* rr = res != nullptr ? res + row * s.a_rs : nullptr;
    T* hr = res != nullptr ? h + row * s.b_rs : nullptr;

    // Pass 1: per-thread Welford over tiles of U chunks (two-pass inside a tile), merged (Chan);
    // RMS: the sum of squares (ss).
    float cnt = 0.0f, mu = 0.0f, m2 = 0.0f, ss = 0.0f;
    for (int c0 = t; c0 < nchunks; c0 += tpr * U) {
      float v[U][VEC];
      float tn = 0.0f, ts = 0.0f;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = c0 + u * tpr;
        if (c < nchunks) {
          const int64_t col = static_cast<int64_t>(c) * VEC;
          load_floats<T, VEC>(xr + col, v[u]);
          if (rr != nullptr) {  // a run-time test even when RES: see the registers note
            float r[VEC];
            load_floats<T, VEC>(rr + col, r);
            Vec<T, VEC> hv;
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              hv.v[k] = from_float<T>(v[u][k] + r[k]);
              v[u][k] = to_float(hv.v[k]);
            }
            cuda::store_vec<T, VEC>(hr + col, hv);
          }
          tn += static_cast<float>(VEC);
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            if constexpr (RMS) {
              ss += v[u][k] * v[u][k];
            } else {
              ts += v[u][k];
            }
          }
        }
      }
      if constexpr (RMS) continue;
      const float tm0 = ts / tn;  // tn >= VEC: chunk c0 < nchunks
      float td = 0.0f, tq = 0.0f;  // corrected two-pass, as in ln_fwd_cached
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (c0 + u * tpr < nchunks) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const float d = v[u][k] - tm0;
            td += d;
            tq += d * d;
          }
        }
      }
      const float tq_c = tq - td * td / tn;
      chan_merge(cnt, mu, m2, tn, tm0 + td / tn, tq_c < 0.0f ? 0.0f : tq_c);
    }
    // Warp tree to lane 0 (lanes >= 32 - offset merge garbage nobody reads), then warp 0..W-1
    // merged in order by thread 0.
    for (int offset = 16; offset > 0; offset >>= 1) {
      if constexpr (RMS) {
        ss += __shfl_down_sync(0xffffffffu, ss, offset);
      } else {
        const float nb = __shfl_down_sync(0xffffffffu, cnt, offset);
        const float mb = __shfl_down_sync(0xffffffffu, mu, offset);
        const float qb = __shfl_down_sync(0xffffffffu, m2, offset);
        chan_merge(cnt, mu, m2, nb, mb, qb);
      }
    }
    if (lane == 0) {
      if constexpr (RMS) {
        sm_n[warp] = ss;
      } else {
        sm_n[warp] = cnt;
        sm_mean[warp] = mu;
        sm_m2[warp] = m2;
      }
    }
    __syncthreads();
    if (t == 0) {
      float m_a, rstd;
      if constexpr (RMS) {
        float ss_a = sm_n[0];
        for (int j = 1; j < (tpr >> 5); ++j) ss_a += sm_n[j];
        m_a = 0.0f;
        rstd = __frsqrt_rn(ss_a * s.inv_n + s.eps);
      } else {
        float n_a = sm_n[0], q_a = sm_m2[0];
        m_a = sm_mean[0];
        for (int j = 1; j < (tpr >> 5); ++j) {
          chan_merge(n_a, m_a, q_a, sm_n[j], sm_mean[j], sm_m2[j]);
        }
        rstd = __frsqrt_rn(q_a * s.inv_n + s.eps);
      }
      sm_stats[0] = m_a;
      sm_stats[1] = rstd;
      if (mean_out != nullptr) {  // the statistics are optional (inference)
        mean_out[row] = m_a;
        rstd_out[row] = rstd;
      }
    }
    __syncthreads();
    const float mean = sm_stats[0];
    const float rstd = sm_stats[1];
    // (sm_* are rewritten next row only after its first barrier, which every thread passes after
    // reading sm_stats here.)

    // Pass 2: re-read this thread's own chunks (h when it was written: same thread, same
    // addresses) and write y. The source is fixed at compile time (RES), never a runtime
    // `res ? h : x`: h, written above by this kernel, must be re-read with coherent loads, while
    // x may take the read-only path (ld.global.nc) its const __restrict__ allows; through one
    // pointer that may be either, nvcc read h with ld.global.nc too (undefined behaviour that no
    // test or sanitizer sees). scripts/check_cuda_compile.sh checks the PTX for such loads.
    const T* src;
    if constexpr (RES) {
      src = hr;
    } else {
      src = xr;
    }
    T* yr = y + row * s.o_rs;
    const int stride = static_cast<int>(blockDim.x);  // == tpr, at run time: the registers note
    with_activation(s.act, [&](auto act) {
#pragma unroll 4
      for (int c = t; c < nchunks; c += stride) {
        float v[VEC];
        load_floats<T, VEC>(src + static_cast<int64_t>(c) * VEC, v);
        fwd_store_chunk<T, VEC, decltype(act)::value, RMS>(v, c, mean, rstd, w, b, yr);
      }
    });
  }
}

// ---- backward ---------------------------------------------------------------------------------

// In place: xv (x) -> xhat, gv (dy) -> g = dy * act'(xhat * w + b).
template <int VEC, int ACT>
__device__ __forceinline__ void bwd_xhat_g(float (&xv)[VEC], float (&gv)[VEC],
                                           const float (&wv)[VEC], const float (&bv)[VEC],
                                           float mean, float rstd) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    xv[k] = (xv[k] - mean) * rstd;
    if constexpr (ACT != kActNone) gv[k] *= act_grad<ACT>(xv[k] * wv[k] + bv[k]);
  }
}

// Loads chunk c of x, dy, w, b and turns it into xhat, g; returns w in wv.
template <typename T, int VEC>
__device__ __forceinline__ void bwd_load_chunk(const T* __restrict__ xr, const T* __restrict__ dyr,
                                               const T* __restrict__ w, const T* __restrict__ b,
                                               int c, int act, float mean, float rstd,
                                               float (&xv)[VEC], float (&gv)[VEC],
                                               float (&wv)[VEC]) {
  const int64_t col = static_cast<int64_t>(c) * VEC;
  load_floats<T, VEC>(xr + col, xv);
  load_floats<T, VEC>(dyr + col, gv);
  load_param<T, VEC>(w, c, 1.0f, wv);
  float bv[VEC];
  if (act != kActNone) {
    load_param<T, VEC>(b, c, 0.0f, bv);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) bv[k] = 0.0f;
  }
  with_activation(act, [&](auto a) {
    bwd_xhat_g<VEC, decltype(a)::value>(xv, gv, wv, bv, mean, rstd);
  });
}

// dx = rstd * (dxhat - c1 - xhat * c2) (+ dh) for one chunk.
template <typename T, int VEC>
__device__ __forceinline__ void bwd_store_dx(const float (&xh)[VEC], const float (&dxh)[VEC],
                                             float rstd, float c1, float c2,
                                             const T* __restrict__ dhr, T* __restrict__ dxr,
                                             int c) {
  const int64_t col = static_cast<int64_t>(c) * VEC;
  float o[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) o[k] = rstd * (dxh[k] - c1 - xh[k] * c2);
  if (dhr != nullptr) {
    float d[VEC];
    load_floats<T, VEC>(dhr + col, d);
#pragma unroll
    for (int k = 0; k < VEC; ++k) o[k] += d[k];
  }
  store_floats<T, VEC>(dxr + col, o);
}

// Per-block dweight / dbias accumulators in shared memory: one region per row group, laid out
// [part (dw, db)][k < VEC][chunk] so that a warp's accesses for a fixed k hit consecutive words
// (no bank conflicts). Element (part, column c * VEC + k) of group g:
// (Shared-memory indices: < 2^16, int is enough.)
__device__ __forceinline__ int acc_index(int g, int part, int k, int c, int n, int nchunks) {
  return (g * 2 + part) * n + k * nchunks + c;
}

// workspace row of this block = sum over the block's `groups` regions, in group order.
// Every thread of the block calls it (one barrier).
template <int VEC>
__device__ __forceinline__ void write_partial_row(const float* acc, int groups, int n,
                                                  float* __restrict__ wsr) {
  __syncthreads();
  const int nchunks = n / VEC;
  for (int o = static_cast<int>(threadIdx.x); o < 2 * n; o += static_cast<int>(blockDim.x)) {
    const int part = o < n ? 0 : 1;
    const int col = o - part * n;
    const int c = col / VEC, k = col - (col / VEC) * VEC;
    float total = acc[acc_index(0, part, k, c, n, nchunks)];
    for (int g = 1; g < groups; ++g) total += acc[acc_index(g, part, k, c, n, nchunks)];
    wsr[o] = total;
  }
}

// Rows up to 1024 * ITEMS * VEC, TPR threads per row, xhat and dxhat = g * w kept in registers
// between the row sum and the dx pass.
// Shapes: x (m, n) row stride x_rs; dy a_rs; dh b_rs; dx o_rs; w, b (n,); mean, rstd (m,);
// ws (gridDim.x, 2n) or null when neither dweight nor dbias is wanted.
// ACC_SMEM: the per-column dweight / dbias sums live in shared memory (else in registers, and
// shared memory only merges the row groups at the end).
// RMS: mean_in is not read (xhat = x * rstd), one row sum (c2), no dbias sums.
// Dynamic smem: 2 * kRedSlots f32x2, then (when ws and (ACC_SMEM or rpb > 1)) rpb * 2n floats.
template <typename T, int VEC, int ITEMS, bool ACC_SMEM, bool RMS>
__global__ void __launch_bounds__(kMaxThreads, 1)
    ln_bwd_rows(const T* __restrict__ dy, const T* __restrict__ dh, const T* __restrict__ x,
                const T* __restrict__ w, const T* __restrict__ b,
                const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                T* __restrict__ dx, float* __restrict__ ws, const RowShape s) {
  f32x2* red = cuda::dynamic_smem<f32x2>();  // [2][kRedSlots], ping-pong by row parity
  float* acc = reinterpret_cast<float*>(red + 2 * kRedSlots);  // [rpb][2][VEC][nchunks]
  const int tpr = s.tpr;
  const int group = static_cast<int>(threadIdx.x) / tpr;
  const int t = static_cast<int>(threadIdx.x) - group * tpr;
  const int nchunks = s.n / VEC;
  const bool partials = ws != nullptr;
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * s.rpb;

  float acc_w[ITEMS][VEC], acc_b[ITEMS][VEC];  // this thread's columns (when !ACC_SMEM)
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int c = i * tpr + t;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      acc_w[i][k] = acc_b[i][k] = 0.0f;
      if (ACC_SMEM && partials && c < nchunks) {
        acc[acc_index(group, 0, k, c, s.n, nchunks)] = 0.0f;
        acc[acc_index(group, 1, k, c, s.n, nchunks)] = 0.0f;
      }
    }
  }

  int parity = 0;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * s.rpb; base < s.m;
       base += row_step, parity ^= 1) {
    const int64_t row = base + group;
    const bool valid = row < s.m;
    const int64_t r = valid ? row : 0;
    const float mean = (RMS || !valid) ? 0.0f : mean_in[r];
    const float rstd = valid ? rstd_in[r] : 0.0f;
    const T* xr = x + r * s.x_rs;
    const T* dyr = dy + r * s.a_rs;

    float xh[ITEMS][VEC], dxh[ITEMS][VEC];
    f32x2 sums = {0.0f, 0.0f};  // sum(dxhat), sum(dxhat * xhat)
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int c = i * tpr + t;
      if (valid && c < nchunks) {
        float wv[VEC];
        bwd_load_chunk<T, VEC>(xr, dyr, w, b, c, s.act, mean, rstd, xh[i], dxh[i], wv);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float g = dxh[i][k];
          if (partials) {
            if constexpr (ACC_SMEM) {
              acc[acc_index(group, 0, k, c, s.n, nchunks)] += g * xh[i][k];
              if constexpr (!RMS) acc[acc_index(group, 1, k, c, s.n, nchunks)] += g;
            } else {
              acc_w[i][k] += g * xh[i][k];
              if constexpr (!RMS) acc_b[i][k] += g;
            }
          }
          dxh[i][k] = g * wv[k];
          sums.x += dxh[i][k];
          sums.y += dxh[i][k] * xh[i][k];
        }
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) xh[i][k] = dxh[i][k] = 0.0f;
      }
    }
    float c1, c2;
    if constexpr (RMS) {  // one row sum (sums.x is dead code)
      c1 = 0.0f;
      c2 = group_sum(sums.y, tpr, reinterpret_cast<float*>(red + parity * kRedSlots)) * s.inv_n;
    } else {
      sums = group_sum(sums, tpr, red + parity * kRedSlots);
      c1 = sums.x * s.inv_n;
      c2 = sums.y * s.inv_n;
    }

    const T* dhr = dh != nullptr ? dh + r * s.b_rs : nullptr;
    T* dxr = dx + r * s.o_rs;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int c = i * tpr + t;
      if (valid && c < nchunks) bwd_store_dx<T, VEC>(xh[i], dxh[i], rstd, c1, c2, dhr, dxr, c);
    }
  }

  if (!partials) return;  // block-uniform
  float* wsr = ws + static_cast<int64_t>(blockIdx.x) * 2 * s.n;
  if constexpr (!ACC_SMEM) {
    // put(c, k, dw, db) for each column c * VEC + k this thread summed in registers.
    auto each_column = [&](auto&& put) {
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int c = i * tpr + t;
        if (c < nchunks) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) put(c, k, acc_w[i][k], acc_b[i][k]);
        }
      }
    };
    if (s.rpb == 1) {  // one group: this thread's columns are final
      each_column([&](int c, int k, float dw, float db) {
        wsr[c * VEC + k] = dw;
        wsr[s.n + c * VEC + k] = db;
      });
      return;
    }
    each_column([&](int c, int k, float dw, float db) {
      acc[acc_index(group, 0, k, c, s.n, nchunks)] = dw;
      acc[acc_index(group, 1, k, c, s.n, nchunks)] = db;
    });
  }
  write_partial_row<VEC>(acc, s.rpb, s.n, wsr);
}

// Long rows: one row per block, chunk loops; the row sum pass and the dx pass both read x and dy
// (the second time from L1 / L2). dweight / dbias sums: ACC_SMEM: in shared memory (2n floats,
// for n up to kBwdSmemAccMaxN), copied to the block's workspace row at the end; else straight
// in the block's workspace row (global read-modify-write: each column belongs to one thread, so
// no races, no atomics).
// RMS: as in ln_bwd_rows.
// Dynamic smem: 2 * kRedSlots f32x2, then (ACC_SMEM and ws) 2n floats.
template <typename T, int VEC, bool ACC_SMEM, bool RMS>
__global__ void __launch_bounds__(kMaxThreads, 1)
    ln_bwd_uncached(const T* __restrict__ dy, const T* __restrict__ dh, const T* __restrict__ x,
                    const T* __restrict__ w, const T* __restrict__ b,
                    const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                    T* __restrict__ dx, float* __restrict__ ws, const RowShape s) {
  f32x2* red = cuda::dynamic_smem<f32x2>();
  float* sacc = reinterpret_cast<float*>(red + 2 * kRedSlots);  // [2][VEC][nchunks]
  const int t = static_cast<int>(threadIdx.x);
  const int tpr = static_cast<int>(blockDim.x);
  const int nchunks = s.n / VEC;
  float* wsr = ws != nullptr ? ws + static_cast<int64_t>(blockIdx.x) * 2 * s.n : nullptr;
  // Accumulator of (part, column c * VEC + k); only thread c % tpr touches it.
  auto acc_at = [&](int part, int c, int k) -> float& {
    if constexpr (ACC_SMEM) return sacc[acc_index(0, part, k, c, s.n, nchunks)];
    else return wsr[part * s.n + c * VEC + k];
  };
  if (wsr != nullptr) {
    for (int c = t; c < nchunks; c += tpr) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc_at(0, c, k) = acc_at(1, c, k) = 0.0f;
    }
  }

  int parity = 0;
  for (int64_t row = blockIdx.x; row < s.m; row += gridDim.x, parity ^= 1) {
    const float mean = RMS ? 0.0f : mean_in[row];
    const float rstd = rstd_in[row];
    const T* xr = x + row * s.x_rs;
    const T* dyr = dy + row * s.a_rs;
    f32x2 sums = {0.0f, 0.0f};
    for (int c = t; c < nchunks; c += tpr) {
      float xv[VEC], gv[VEC], wv[VEC];
      bwd_load_chunk<T, VEC>(xr, dyr, w, b, c, s.act, mean, rstd, xv, gv, wv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float d = gv[k] * wv[k];
        sums.x += d;
        sums.y += d * xv[k];
      }
      if (wsr != nullptr) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          acc_at(0, c, k) += gv[k] * xv[k];
          if constexpr (!RMS) acc_at(1, c, k) += gv[k];
        }
      }
    }
    float c1, c2;
    if constexpr (RMS) {  // one row sum (sums.x is dead code)
      c1 = 0.0f;
      c2 = cuda::block_sum(sums.y, reinterpret_cast<float*>(red + parity * kRedSlots)) * s.inv_n;
    } else {
      sums = cuda::block_sum(sums, red + parity * kRedSlots);
      c1 = sums.x * s.inv_n;
      c2 = sums.y * s.inv_n;
    }
    const T* dhr = dh != nullptr ? dh + row * s.b_rs : nullptr;
    T* dxr = dx + row * s.o_rs;
    for (int c = t; c < nchunks; c += tpr) {
      float xv[VEC], gv[VEC], wv[VEC];
      bwd_load_chunk<T, VEC>(xr, dyr, w, b, c, s.act, mean, rstd, xv, gv, wv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) gv[k] *= wv[k];
      bwd_store_dx<T, VEC>(xv, gv, rstd, c1, c2, dhr, dxr, c);
    }
  }
  if constexpr (ACC_SMEM) {
    if (wsr != nullptr) {  // this thread's own columns: no barrier needed
      for (int c = t; c < nchunks; c += tpr) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          wsr[c * VEC + k] = acc_at(0, c, k);
          wsr[s.n + c * VEC + k] = acc_at(1, c, k);
        }
      }
    }
  }
}

// dweight[j] = sum_p ws[p, j], dbias[j] = sum_p ws[p, n + j], p < num_partials, fixed order.
// blockDim.x == kReduceCols * kReduceRows; dynamic smem kReduceRows * (kReduceCols + 1) floats.
template <typename T>
__global__ void __launch_bounds__(kReduceCols * kReduceRows)
    ln_reduce_partials(const float* __restrict__ ws, int64_t num_partials, int n,
                       T* __restrict__ dweight, T* __restrict__ dbias) {
  float* tile = cuda::dynamic_smem<float>();  // [kReduceRows][kReduceCols + 1]
  const int lane = static_cast<int>(threadIdx.x) % kReduceCols;
  const int part = static_cast<int>(threadIdx.x) / kReduceCols;
  const int64_t width = 2 * static_cast<int64_t>(n);
  for (int64_t col0 = static_cast<int64_t>(blockIdx.x) * kReduceCols; col0 < width;
       col0 += static_cast<int64_t>(gridDim.x) * kReduceCols) {
    const int64_t col = col0 + lane;
    float total = 0.0f;
    if (col < width) {
#pragma unroll 8
      for (int64_t p = part; p < num_partials; p += kReduceRows) total += ws[p * width + col];
    }
    tile[part * (kReduceCols + 1) + lane] = total;
    __syncthreads();
    if (part == 0 && col < width) {
      float sum = tile[lane];
      for (int j = 1; j < kReduceRows; ++j) sum += tile[j * (kReduceCols + 1) + lane];
      if (col < n) {
        if (dweight != nullptr) dweight[col] = from_float<T>(sum);
      } else if (dbias != nullptr) {
        dbias[col - n] = from_float<T>(sum);
      }
    }
    __syncthreads();  // the tile is rewritten by the next column block
  }
}

// ---- host side --------------------------------------------------------------------------------

int current_device() {
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

int sm_count(int dev) { return device_attribute<cudaDevAttrMultiProcessorCount>(dev, 1); }

int max_smem_optin(int dev) {
  return device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(dev, 48 * 1024);
}

// Resident blocks per SM of `kernel` at this block size and dynamic smem (>= 1), cached.
int blocks_per_sm(int dev, const void* kernel, int block, size_t smem) {
  static std::mutex mu;
  static std::map<std::tuple<int, const void*, int, size_t>, int> cache;
  const auto key = std::make_tuple(dev, kernel, block, smem);
  {
    std::lock_guard<std::mutex> lock(mu);
    const auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  int n = 0;
  PYDL_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, block, smem));
  n = std::max(n, 1);
  std::lock_guard<std::mutex> lock(mu);
  cache[key] = n;
  return n;
}

// Dynamic shared memory above the default 48 KB must be opted into, per kernel and device.
void allow_smem(int dev, const void* kernel, size_t smem) {
  if (smem <= 48 * 1024) return;
  static std::mutex mu;
  static std::map<std::pair<int, const void*>, size_t> allowed;
  std::lock_guard<std::mutex> lock(mu);
  size_t& cur = allowed[std::make_pair(dev, kernel)];
  if (cur >= smem) return;
  PYDL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(smem)));
  cur = smem;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Threads per row group for `units` units of work per row: a power of two up to 32, then whole
// warps.
int round_tpr(int64_t units) {
  if (units <= 32) {
    int p = 1;
    while (p < units) p <<= 1;
    return p;
  }
  return static_cast<int>(ceil_div(units, 32) * 32);
}

struct RowCfg {
  int e = 0;    // elements per thread (ITEMS * VEC); 0: no cached config fits
  int tpr = 0;
  int rpb = 0;
};

// Forward: among E in {8, 16, 24, 32} (TPR <= 1024), the best use of the row group's slots
// (chunks / (TPR * ITEMS)); within 1% of the best, the largest E (fewer threads per row: fewer
// reduction steps, more loads in flight per thread).
RowCfg choose_fwd_cfg(int64_t n, int vec) {
  const int64_t nchunks = n / vec;
  double best = 0.0;
  RowCfg out;
  for (int pass = 0; pass < 2; ++pass) {
    for (int e = 8; e <= (vec > 1 ? 32 : 8); e += 8) {
      const int items = e / vec;
      const int tpr = round_tpr(ceil_div(nchunks, items));
      if (tpr > kMaxThreads) continue;
      const double use = static_cast<double>(nchunks) / (static_cast<double>(tpr) * items);
      if (pass == 0) {
        best = std::max(best, use);
      } else if (use >= best - 0.01) {
        out.e = e;
        out.tpr = tpr;
      }
    }
  }
  if (out.e > 0) out.rpb = std::max(1, kFwdBlockTarget / out.tpr);
  return out;
}

RowCfg choose_bwd_cfg(int64_t n, int vec, int e) {
  RowCfg out;
  out.e = e;
  out.tpr = round_tpr(ceil_div(n / vec, e / vec));
  out.rpb = std::max(1, kBwdBlockTarget / out.tpr);
  return out;
}

bool aligned16(const TensorView& t) {
  return !t.defined || (reinterpret_cast<uintptr_t>(t.data) & 15u) == 0;
}
bool rows_aligned(const TensorView& t, int64_t m, int vec) {
  return !t.defined || m <= 1 || t.stride(0) % vec == 0;
}
int64_t row_stride(const TensorView& t) { return t.defined ? t.stride(0) : 0; }

// Sizes, row strides and activation of one launch: `x` the normalized input, `a`/`b` the second
// and third (M, N) operands (residual/h forward, dy/dh backward), `o` the (M, N) output.
RowShape row_shape(const TensorView& x, const TensorView& a, const TensorView& b,
                   const TensorView& o, Activation act) {
  RowShape s{};
  s.m = x.size(0);
  s.n = static_cast<int>(x.size(1));
  s.inv_n = 1.0f / static_cast<float>(s.n);
  s.x_rs = row_stride(x);
  s.a_rs = row_stride(a);
  s.b_rs = row_stride(b);
  s.o_rs = row_stride(o);
  s.act = static_cast<int>(act);
  return s;
}

// 16-byte accesses are legal when N is a multiple of `vec` and every base pointer and every
// (M, N) row stride keeps that alignment (undefined optional views pass).
bool vectorizable(int vec, const RowShape& s, std::initializer_list<const TensorView*> matrices,
                  std::initializer_list<const TensorView*> vectors) {
  if (s.n % vec != 0) return false;
  for (const TensorView* t : matrices) {
    if (!aligned16(*t) || !rows_aligned(*t, s.m, vec)) return false;
  }
  for (const TensorView* t : vectors) {
    if (!aligned16(*t)) return false;
  }
  return true;
}

template <typename T>
const T* cptr(const TensorView& t) {
  return t.defined ? static_cast<const T*>(t.data) : nullptr;
}
template <typename T>
T* mptr(const TensorView& t) {
  return t.defined ? static_cast<T*>(t.data) : nullptr;
}

template <typename T>
using FwdKernel = void (*)(const T*, const T*, const T*, const T*, T*, T*, float*, float*,
                           RowShape);
template <typename T>
using BwdKernel = void (*)(const T*, const T*, const T*, const T*, const T*, const float*,
                           const float*, T*, float*, RowShape);

template <typename T, int VEC, bool RMS>
FwdKernel<T> fwd_cached_kernel(int e) {
  if constexpr (VEC == 1) {
    return ln_fwd_cached<T, 1, 8, RMS>;
  } else {
    switch (e) {
      case 8: return ln_fwd_cached<T, VEC, 8 / VEC, RMS>;
      case 16: return ln_fwd_cached<T, VEC, 16 / VEC, RMS>;
      case 24: return ln_fwd_cached<T, VEC, 24 / VEC, RMS>;
      default: return ln_fwd_cached<T, VEC, 32 / VEC, RMS>;
    }
  }
}

template <typename T, int VEC, bool RMS>
void fwd_launch(const LayerNormFwdArgs& a, RowShape s, cudaStream_t stream) {
  static constexpr const char* kOp = "layer_norm_fwd_cuda";
  const int dev = current_device();
  FwdKernel<T> kernel;
  int block;
  int64_t rows_per_block;
  size_t smem;
  // Scalar loads take a register per element: the scalar kernel caches E = 8 per thread only.
  const int max_cached = VEC > 1 ? kFwdCachedMaxN : kMaxThreads * 8;
  const RowCfg cfg = s.n <= max_cached ? choose_fwd_cfg(s.n, VEC) : RowCfg{};
  if (cfg.e > 0) {
    kernel = fwd_cached_kernel<T, VEC, RMS>(cfg.e);
    s.tpr = cfg.tpr;
    s.rpb = cfg.rpb;
    block = cfg.tpr * cfg.rpb;
    rows_per_block = cfg.rpb;
    smem = 3 * kRedSlots * sizeof(float);
  } else {
    constexpr int kU = std::max(1, 16 / VEC);
    kernel = a.residual.defined ? ln_fwd_uncached<T, VEC, kU, true, RMS>
                                : ln_fwd_uncached<T, VEC, kU, false, RMS>;
    s.tpr = block = kFwdUncachedThreads;
    s.rpb = 1;
    rows_per_block = 1;
    smem = (3 * kRedSlots + 2) * sizeof(float);
  }
  const int64_t wave =
      static_cast<int64_t>(sm_count(dev)) *
      blocks_per_sm(dev, reinterpret_cast<const void*>(kernel), block, smem);
  const int64_t grid = std::min(ceil_div(s.m, rows_per_block), wave);
  cuda::launch(kernel, grid, block, smem, stream, kOp, cptr<T>(a.x), cptr<T>(a.residual),
               cptr<T>(a.weight), cptr<T>(a.bias), mptr<T>(a.y), mptr<T>(a.h),
               mptr<float>(a.mean), mptr<float>(a.rstd), s);
}

template <typename T>
void fwd_impl(const LayerNormFwdArgs& a, cudaStream_t stream) {
  constexpr int V = cuda::kVec16<T>;
  RowShape s = row_shape(a.x, a.residual, a.h, a.y, a.act);
  s.eps = static_cast<float>(a.eps);
  const bool vec = vectorizable(V, s, {&a.x, &a.residual, &a.h, &a.y}, {&a.weight, &a.bias});
  const bool rms = a.norm == Norm::kRms;
  if (vec) {
    rms ? fwd_launch<T, V, true>(a, s, stream) : fwd_launch<T, V, false>(a, s, stream);
  } else {
    rms ? fwd_launch<T, 1, true>(a, s, stream) : fwd_launch<T, 1, false>(a, s, stream);
  }
}

template <typename T, int VEC, bool RMS>
void bwd_launch(const LayerNormBwdArgs& a, RowShape s, int64_t ws_rows, cudaStream_t stream) {
  static constexpr const char* kOp = "layer_norm_bwd_cuda";
  const int dev = current_device();
  const bool partials = ws_rows > 0;
  BwdKernel<T> kernel;
  int block;
  int64_t rows_per_block;
  size_t smem = 2 * kRedSlots * sizeof(f32x2);
  // Scalar loads take a register per element: that kernel keeps E = 4 per thread and dw / db in
  // shared memory (so it covers rows up to 4096).
  constexpr bool kAccSmem = VEC == 1;
  constexpr int kE = VEC == 1 ? kBwdScalarE : kBwdVecE;
  if (s.n <= kMaxThreads * kE) {
    kernel = ln_bwd_rows<T, VEC, kE / VEC, kAccSmem, RMS>;
    const RowCfg cfg = choose_bwd_cfg(s.n, VEC, kE);
    s.tpr = cfg.tpr;
    s.rpb = cfg.rpb;
    block = cfg.tpr * cfg.rpb;
    rows_per_block = cfg.rpb;
    if (partials && (kAccSmem || cfg.rpb > 1)) {
      smem += static_cast<size_t>(cfg.rpb) * 2 * s.n * sizeof(float);
    }
  } else {
    const size_t acc_bytes = 2 * static_cast<size_t>(s.n) * sizeof(float);
    const bool acc_smem = partials && s.n <= kBwdSmemAccMaxN &&
                          smem + acc_bytes <= static_cast<size_t>(max_smem_optin(dev));
    kernel = acc_smem ? ln_bwd_uncached<T, VEC, true, RMS> : ln_bwd_uncached<T, VEC, false, RMS>;
    if (acc_smem) smem += acc_bytes;
    s.tpr = block = kBwdUncachedThreads;
    s.rpb = 1;
    rows_per_block = 1;
  }
  allow_smem(dev, reinterpret_cast<const void*>(kernel), smem);
  const int64_t wave =
      static_cast<int64_t>(sm_count(dev)) *
      blocks_per_sm(dev, reinterpret_cast<const void*>(kernel), block, smem);
  int64_t grid = std::min(ceil_div(s.m, rows_per_block), wave);
  if (partials) grid = std::min(grid, ws_rows);  // exactly `grid` partial rows, all reduced below
  float* ws = partials ? mptr<float>(a.workspace) : nullptr;
  cuda::launch(kernel, grid, block, smem, stream, kOp, cptr<T>(a.dy), cptr<T>(a.dh), cptr<T>(a.x),
               cptr<T>(a.weight), cptr<T>(a.bias), cptr<float>(a.mean), cptr<float>(a.rstd),
               mptr<T>(a.dx), ws, s);
  if (partials) {
    const int64_t tiles = ceil_div(2 * static_cast<int64_t>(s.n), kReduceCols);
    cuda::launch(ln_reduce_partials<T>, tiles, kReduceCols * kReduceRows,
                 kReduceRows * (kReduceCols + 1) * sizeof(float), stream, kOp,
                 static_cast<const float*>(ws), grid, s.n, mptr<T>(a.dweight), mptr<T>(a.dbias));
  }
}

template <typename T>
void bwd_impl(const LayerNormBwdArgs& a, int64_t ws_rows, cudaStream_t stream) {
  constexpr int V = cuda::kVec16<T>;
  const RowShape s = row_shape(a.x, a.dy, a.dh, a.dx, a.act);
  const bool vec = vectorizable(V, s, {&a.dy, &a.dh, &a.x, &a.dx}, {&a.weight, &a.bias});
  const bool rms = a.norm == Norm::kRms;
  if (vec) {
    rms ? bwd_launch<T, V, true>(a, s, ws_rows, stream) : bwd_launch<T, V, false>(a, s, ws_rows, stream);
  } else {
    rms ? bwd_launch<T, 1, true>(a, s, ws_rows, stream) : bwd_launch<T, 1, false>(a, s, ws_rows, stream);
  }
}

void require_cuda_dtype(DType t, const char* op) {
  PYDL_CHECK(t == DType::kFloat32 || t == DType::kFloat16 || t == DType::kBFloat16, op,
             ": the CUDA kernel supports float32, float16 and bfloat16, got ", dtype_name(t));
}

// f(T{}) for the storage type T of `t` (float, __half or bf16), after require_cuda_dtype: the
// kernels are never instantiated for double.
template <typename F>
void dispatch_cuda_dtype(DType t, const char* op, F&& f) {
  PYDL_DISPATCH_FLOATING(t, op, [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) f(scalar_t{});
  });
}

}  // namespace

void layer_norm_fwd_cuda(const LayerNormFwdArgs& a, void* stream) {
  static constexpr const char* kOp = "layer_norm_fwd_cuda";
  validate_layer_norm_fwd(a, kOp);
  require_cuda_dtype(a.x.dtype, kOp);
  if (a.x.size(0) == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  dispatch_cuda_dtype(a.x.dtype, kOp, [&](auto tag) { fwd_impl<decltype(tag)>(a, s); });
}

void layer_norm_bwd_cuda(const LayerNormBwdArgs& a, void* stream) {
  static constexpr const char* kOp = "layer_norm_bwd_cuda";
  validate_layer_norm_bwd(a, kOp);
  require_cuda_dtype(a.x.dtype, kOp);
  const int64_t m = a.x.size(0), n = a.x.size(1);
  const bool partials = a.dweight.defined || a.dbias.defined;
  int64_t ws_rows = 0;
  if (partials && m > 0) {
    const TensorView& ws = a.workspace;
    require_defined(ws, kOp, "workspace");
    require_rank(ws, 2, kOp, "workspace");
    require_dtype(ws, DType::kFloat32, kOp, "workspace");
    require_contiguous(ws, kOp, "workspace");
    PYDL_CHECK(ws.size(0) >= 1 && ws.size(1) == 2 * n, kOp, ": workspace must have shape (P, ",
               2 * n, ") with P >= 1 (layer_norm_bwd_cuda_num_partials), got ", ws.shape_str());
    ws_rows = ws.size(0);
  }
  const auto s = static_cast<cudaStream_t>(stream);
  if (m == 0) {  // empty batch: the parameter gradients are zeros
    for (const TensorView* g : {&a.dweight, &a.dbias}) {
      if (g->defined) PYDL_CUDA_CHECK(cudaMemsetAsync(g->data, 0, n * dtype_size(a.x.dtype), s));
    }
    return;
  }
  dispatch_cuda_dtype(a.x.dtype, kOp, [&](auto tag) { bwd_impl<decltype(tag)>(a, ws_rows, s); });
}

int64_t layer_norm_bwd_cuda_num_partials(int64_t M, int64_t N) {
  // Upper bound of the backward grid (one wave of resident blocks): blocks of ~512 threads
  // (64 registers each) up to N = 4096, ~N / 8 threads up to 8192, 1024 threads beyond.
  const int64_t per_sm = std::clamp<int64_t>(16384 / std::max<int64_t>(N, 1), 2, 4);
  const int64_t p = static_cast<int64_t>(sm_count(current_device())) * per_sm;
  return std::max<int64_t>(1, std::min(std::max<int64_t>(M, 1), p));
}

}  // namespace pydl
