// CUDA backward of the fused LayerNorm family: dx (+ dh), and the per-block dweight / dbias
// partial rows that layer_norm_dweight.cu reduces (layout, storage types and RMSNorm:
// layer_norm_common.cuh).
//
// Configs chosen by N (bwd_launch):
//   N <= 8192 (vectors) / 4096 (scalar): ln_bwd_rows, E = 8 (scalar 4): xhat and dxhat = g * w
//     stay in registers between the row sum and the dx pass. Blocks of ~512 threads (512 / TPR
//     rows) so that one wave is only 2..4 blocks per SM.
//   longer rows: ln_bwd_uncached, 1024 threads per row, chunk loops; x and dy are read twice (the
//     second time from L1 / L2).
//   dweight / dbias: a block accumulates g * xhat and g per column over all its rows (the thread
//     -> column map never changes): in registers (ln_bwd_rows, vectors), in shared memory
//     (scalar ln_bwd_rows; ln_bwd_uncached up to N = 16384), or straight in the block's own
//     workspace row (ln_bwd_uncached beyond; each column belongs to one thread: no atomics). Row
//     groups are merged in shared memory in group order; each block writes its partial row
//     workspace[block] = [dw (N) | db (N)], then reduce_param_grads sums them. Deterministic run
//     to run.
//
// Floor (bytes moved / bandwidth), bf16, M x N: 6MN (read x, dy, write dx; 8MN with dh) plus the
// partials (P x 2N x 4 bytes written and read back, P ~ 2..4 x SMs: L2-resident for small N).
// H100 (~3.35 TB/s), M = 16384, N = 1024: 101 MB -> ~30 us.
#include "layer_norm_common.cuh"  // first: it includes cuda_utils.cuh

namespace pydl {
namespace ln_cuda {
namespace {

constexpr int kBwdBlockTarget = 512;        // rows per block = 512 / TPR (fewer blocks: fewer partials)
constexpr int kBwdVecE = 8;                 // ln_bwd_rows: elements per thread, vector loads
constexpr int kBwdScalarE = 4;              // ... scalar loads (a register each)
constexpr int kBwdSmemAccMaxN = 16 * 1024;  // ln_bwd_uncached: dw / db in smem up to 128 KB
constexpr int kBwdUncachedThreads = 1024;

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
template <typename T, typename P, int VEC>
__device__ __forceinline__ void bwd_load_chunk(const T* __restrict__ xr, const T* __restrict__ dyr,
                                               const P* __restrict__ w, const P* __restrict__ b,
                                               int c, int act, float mean, float rstd,
                                               float (&xv)[VEC], float (&gv)[VEC],
                                               float (&wv)[VEC]) {
  const int64_t col = static_cast<int64_t>(c) * VEC;
  load_floats<T, VEC>(xr + col, xv);
  load_floats<T, VEC>(dyr + col, gv);
  load_param<P, VEC>(w, c, 1.0f, wv);
  float bv[VEC];
  if (act != kActNone) {
    load_param<P, VEC>(b, c, 0.0f, bv);
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
template <typename T, typename P, int VEC, int ITEMS, bool ACC_SMEM, bool RMS>
__global__ void __launch_bounds__(kMaxThreads, 1)
    ln_bwd_rows(const T* __restrict__ dy, const T* __restrict__ dh, const T* __restrict__ x,
                const P* __restrict__ w, const P* __restrict__ b,
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
        bwd_load_chunk<T, P, VEC>(xr, dyr, w, b, c, s.act, mean, rstd, xh[i], dxh[i], wv);
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
template <typename T, typename P, int VEC, bool ACC_SMEM, bool RMS>
__global__ void __launch_bounds__(kMaxThreads, 1)
    ln_bwd_uncached(const T* __restrict__ dy, const T* __restrict__ dh, const T* __restrict__ x,
                    const P* __restrict__ w, const P* __restrict__ b,
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
      bwd_load_chunk<T, P, VEC>(xr, dyr, w, b, c, s.act, mean, rstd, xv, gv, wv);
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
      bwd_load_chunk<T, P, VEC>(xr, dyr, w, b, c, s.act, mean, rstd, xv, gv, wv);
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

// ---- host side --------------------------------------------------------------------------------

RowCfg choose_bwd_cfg(int64_t n, int vec, int e) {
  RowCfg out;
  out.e = e;
  out.tpr = round_tpr(ceil_div(n / vec, e / vec));
  out.rpb = std::max(1, kBwdBlockTarget / out.tpr);
  return out;
}

template <typename T, typename P>
using BwdKernel = void (*)(const T*, const T*, const T*, const P*, const P*, const float*,
                           const float*, T*, float*, RowShape);

template <typename T, typename P, int VEC, bool RMS>
void bwd_launch(const LayerNormBwdArgs& a, RowShape s, int64_t ws_rows, cudaStream_t stream) {
  static constexpr const char* kOp = "layer_norm_bwd_cuda";
  const int dev = current_device();
  const bool partials = ws_rows > 0;
  BwdKernel<T, P> kernel;
  int block;
  int64_t rows_per_block;
  size_t smem = 2 * kRedSlots * sizeof(f32x2);
  // Scalar loads take a register per element: that kernel keeps E = 4 per thread and dw / db in
  // shared memory (so it covers rows up to 4096).
  constexpr bool kAccSmem = VEC == 1;
  constexpr int kE = VEC == 1 ? kBwdScalarE : kBwdVecE;
  if (s.n <= kMaxThreads * kE) {
    kernel = ln_bwd_rows<T, P, VEC, kE / VEC, kAccSmem, RMS>;
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
    kernel = acc_smem ? ln_bwd_uncached<T, P, VEC, true, RMS> : ln_bwd_uncached<T, P, VEC, false, RMS>;
    if (acc_smem) smem += acc_bytes;
    s.tpr = block = kBwdUncachedThreads;
    s.rpb = 1;
    rows_per_block = 1;
  }
  allow_smem(dev, reinterpret_cast<const void*>(kernel), smem);
  int64_t grid = std::min(ceil_div(s.m, rows_per_block),
                          one_wave(dev, reinterpret_cast<const void*>(kernel), block, smem));
  if (partials) grid = std::min(grid, ws_rows);  // exactly `grid` partial rows, all reduced below
  float* ws = partials ? mptr<float>(a.workspace) : nullptr;
  cuda::launch(kernel, grid, block, smem, stream, kOp, cptr<T>(a.dy), cptr<T>(a.dh), cptr<T>(a.x),
               cptr<P>(a.weight), cptr<P>(a.bias), cptr<float>(a.mean), cptr<float>(a.rstd),
               mptr<T>(a.dx), ws, s);
  if (partials) reduce_param_grads(a, ws, grid, stream, kOp);
}

template <typename T, typename P>
void bwd_impl(const LayerNormBwdArgs& a, int64_t ws_rows, cudaStream_t stream) {
  constexpr int V = cuda::kVec16<T>;
  const RowShape s = row_shape(a.x, a.dy, a.dh, a.dx, a.act);
  const bool vec = vectorizable(V, s, {&a.dy, &a.dh, &a.x, &a.dx}, {&a.weight, &a.bias});
  const bool rms = a.norm == Norm::kRms;
  if (vec) {
    rms ? bwd_launch<T, P, V, true>(a, s, ws_rows, stream)
        : bwd_launch<T, P, V, false>(a, s, ws_rows, stream);
  } else {
    rms ? bwd_launch<T, P, 1, true>(a, s, ws_rows, stream)
        : bwd_launch<T, P, 1, false>(a, s, ws_rows, stream);
  }
}

}  // namespace
}  // namespace ln_cuda

void layer_norm_bwd_cuda(const LayerNormBwdArgs& a, void* stream) {
  static constexpr const char* kOp = "layer_norm_bwd_cuda";
  validate_layer_norm_bwd(a, kOp);
  ln_cuda::require_cuda_dtype(a.x.dtype, kOp);
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
    if (partials) ln_cuda::reduce_param_grads(a, nullptr, 0, s, kOp);
    return;
  }
  const DType param = layer_norm_param_dtype(a.weight, a.bias, a.x.dtype);
  ln_cuda::dispatch_types(a.x.dtype, param, kOp, [&](auto t, auto p) {
    ln_cuda::bwd_impl<decltype(t), decltype(p)>(a, ws_rows, s);
  });
}

}  // namespace pydl
