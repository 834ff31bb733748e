// CUDA forward of the fused LayerNorm family: y = act(LN(x [+ residual]) * w + b), mean, rstd
// [, h = x + residual] (layout, storage types and RMSNorm: layer_norm_common.cuh).
//
// Configs chosen by N (choose_fwd_cfg and fwd_launch):
//   N <= 32768 (16-byte vectors): ln_fwd_cached, E = ITEMS * VEC in {8, 16, 24, 32} elements per
//     thread, the (TPR, E) that leaves the fewest idle slots, ties to the larger E (fewer threads
//     per row: fewer reduction steps, more loads in flight per thread):
//     N = 384 bf16 -> E 24, 16 lanes per row; 768 -> E 24, a warp; 1024 -> E 32, a warp;
//     2048 -> 64 threads; 4096 -> 128; 16384 -> 512; 32768 -> 1024. x read once, y (h) written
//     once. Blocks of >= 128 threads (128 / TPR rows).
//   scalar path (VEC = 1: odd N, misaligned views), N <= 8192: ln_fwd_cached with E = 8 (a scalar
//     load takes a register per element; larger E spills).
//   longer rows: ln_fwd_uncached, 512 threads per row; pass 1 reads the row (writes h) and keeps
//     Welford (count, mean, M2) per thread, merged with Chan's formula (warp tree, then the warps
//     in a fixed order); pass 2 re-reads the row (L2) and writes y (x may use the read-only path,
//     h only coherent loads: pass 1 wrote it).
//
// Floor (bytes moved / bandwidth), bf16, M x N: 4MN bytes (read x, write y; 8MN with the
// residual: + read residual, write h). H100 (~3.35 TB/s), M = 16384, N = 1024: 67 MB -> ~20 us.
#include "layer_norm_common.cuh"  // first: it includes cuda_utils.cuh

namespace pydl {
namespace ln_cuda {
namespace {

constexpr int kFwdBlockTarget = 128;       // rows per block = 128 / TPR for small rows
constexpr int kFwdUncachedThreads = 512;   // one row per block for N beyond the register path
constexpr int kFwdCachedMaxN = 32 * 1024;  // 1024 threads x 32 elements

// Chunk c of y = act((v - mean) * rstd * w + b) (RMS: act(v * rstd * w), no bias); v holds the
// chunk's inputs (overwritten).
template <typename T, typename P, int VEC, int ACT, bool RMS>
__device__ __forceinline__ void fwd_store_chunk(float (&v)[VEC], int c, float mean, float rstd,
                                                const P* __restrict__ w, const P* __restrict__ b,
                                                T* __restrict__ yr) {
  float wv[VEC], bv[VEC];
  load_param<P, VEC>(w, c, 1.0f, wv);
  if constexpr (RMS) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = act_fwd<ACT>(v[k] * rstd * wv[k]);
  } else {
    load_param<P, VEC>(b, c, 0.0f, bv);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = act_fwd<ACT>((v[k] - mean) * rstd * wv[k] + bv[k]);
  }
  store_floats<T, VEC>(yr + static_cast<int64_t>(c) * VEC, v);
}

// ---- row cached in registers ------------------------------------------------------------------

// Shapes: x, res (m, n) row strides x_rs, a_rs; h (m, n) row stride b_rs; y (m, n) row stride
// o_rs; w, b (n,); mean, rstd (m,). Dynamic smem: 3 * kRedSlots floats.
// RMS: one reduction per row (sum of squares), through two slot sets alternating by row parity.
template <typename T, typename P, int VEC, int ITEMS, bool RMS>
__global__ void __launch_bounds__(kMaxThreads, 1)
    ln_fwd_cached(const T* __restrict__ x, const T* __restrict__ res, const P* __restrict__ w,
                  const P* __restrict__ b, T* __restrict__ y, T* __restrict__ h,
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
          fwd_store_chunk<T, P, VEC, decltype(act)::value, RMS>(o, c, mean, rstd, w, b, yr);
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

// ---- long rows (N > 32768), two passes --------------------------------------------------------

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
template <typename T, typename P, int VEC, int U, bool RES, bool RMS>
__global__ void __launch_bounds__(kFwdUncachedThreads, 2)
    ln_fwd_uncached(const T* __restrict__ x, const T* __restrict__ res, const P* __restrict__ w,
                    const P* __restrict__ b, T* __restrict__ y, T* __restrict__ h,
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
        fwd_store_chunk<T, P, VEC, decltype(act)::value, RMS>(v, c, mean, rstd, w, b, yr);
      }
    });
  }
}

// ---- host side --------------------------------------------------------------------------------

// Among E in {8, 16, 24, 32} (TPR <= 1024), the best use of the row group's slots
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

template <typename T, typename P>
using FwdKernel = void (*)(const T*, const T*, const P*, const P*, T*, T*, float*, float*,
                           RowShape);

template <typename T, typename P, int VEC, bool RMS>
FwdKernel<T, P> fwd_cached_kernel(int e) {
  if constexpr (VEC == 1) {
    return ln_fwd_cached<T, P, 1, 8, RMS>;
  } else {
    switch (e) {
      case 8: return ln_fwd_cached<T, P, VEC, 8 / VEC, RMS>;
      case 16: return ln_fwd_cached<T, P, VEC, 16 / VEC, RMS>;
      case 24: return ln_fwd_cached<T, P, VEC, 24 / VEC, RMS>;
      default: return ln_fwd_cached<T, P, VEC, 32 / VEC, RMS>;
    }
  }
}

template <typename T, typename P, int VEC, bool RMS>
void fwd_launch(const LayerNormFwdArgs& a, RowShape s, cudaStream_t stream) {
  static constexpr const char* kOp = "layer_norm_fwd_cuda";
  const int dev = current_device();
  FwdKernel<T, P> kernel;
  int block;
  int64_t rows_per_block;
  size_t smem;
  // Scalar loads take a register per element: the scalar kernel caches E = 8 per thread only.
  const int max_cached = VEC > 1 ? kFwdCachedMaxN : kMaxThreads * 8;
  const RowCfg cfg = s.n <= max_cached ? choose_fwd_cfg(s.n, VEC) : RowCfg{};
  if (cfg.e > 0) {
    kernel = fwd_cached_kernel<T, P, VEC, RMS>(cfg.e);
    s.tpr = cfg.tpr;
    s.rpb = cfg.rpb;
    block = cfg.tpr * cfg.rpb;
    rows_per_block = cfg.rpb;
    smem = 3 * kRedSlots * sizeof(float);
  } else {
    constexpr int kU = std::max(1, 16 / VEC);
    kernel = a.residual.defined ? ln_fwd_uncached<T, P, VEC, kU, true, RMS>
                                : ln_fwd_uncached<T, P, VEC, kU, false, RMS>;
    s.tpr = block = kFwdUncachedThreads;
    s.rpb = 1;
    rows_per_block = 1;
    smem = (3 * kRedSlots + 2) * sizeof(float);
  }
  const int64_t grid = std::min(ceil_div(s.m, rows_per_block),
                                one_wave(dev, reinterpret_cast<const void*>(kernel), block, smem));
  cuda::launch(kernel, grid, block, smem, stream, kOp, cptr<T>(a.x), cptr<T>(a.residual),
               cptr<P>(a.weight), cptr<P>(a.bias), mptr<T>(a.y), mptr<T>(a.h),
               mptr<float>(a.mean), mptr<float>(a.rstd), s);
}

template <typename T, typename P>
void fwd_impl(const LayerNormFwdArgs& a, cudaStream_t stream) {
  constexpr int V = cuda::kVec16<T>;
  RowShape s = row_shape(a.x, a.residual, a.h, a.y, a.act);
  s.eps = static_cast<float>(a.eps);
  const bool vec = vectorizable(V, s, {&a.x, &a.residual, &a.h, &a.y}, {&a.weight, &a.bias});
  const bool rms = a.norm == Norm::kRms;
  if (vec) {
    rms ? fwd_launch<T, P, V, true>(a, s, stream) : fwd_launch<T, P, V, false>(a, s, stream);
  } else {
    rms ? fwd_launch<T, P, 1, true>(a, s, stream) : fwd_launch<T, P, 1, false>(a, s, stream);
  }
}

}  // namespace
}  // namespace ln_cuda

void layer_norm_fwd_cuda(const LayerNormFwdArgs& a, void* stream) {
  static constexpr const char* kOp = "layer_norm_fwd_cuda";
  validate_layer_norm_fwd(a, kOp);
  ln_cuda::require_cuda_dtype(a.x.dtype, kOp);
  if (a.x.size(0) == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  const DType param = layer_norm_param_dtype(a.weight, a.bias, a.x.dtype);
  ln_cuda::dispatch_types(a.x.dtype, param, kOp, [&](auto t, auto p) {
    ln_cuda::fwd_impl<decltype(t), decltype(p)>(a, s);
  });
}

}  // namespace pydl
