// CUDA depthwise conv2d: the forward, and the conv-pass kernels the input gradient reuses
// (contract: include/pydl/depthwise_conv2d.h; the pass: depthwise_conv2d_common.cuh).
//
// run_conv_pass picks, as a function of the shapes, layout, dtype and pointer alignment only:
//   channels_last, down = 1: dw_nhwc<T, VEC, WIN>. A thread owns VEC adjacent output channels
//     (VEC = 16 bytes: 4 fp32 / 8 fp16 / bf16 when R = D = 1 (m = 1), Cin and Cout are multiples
//     of VEC and in / out are 16-byte aligned; else VEC = 1, "scalar") and kPW = 4 adjacent output
//     columns of one output row: fp32 accumulators acc[kPW][VEC]. Adjacent threads own adjacent
//     channel vectors (coalesced 16-byte accesses). WIN (column stride 1, column dilation 1): the
//     input columns of a kernel row are read once into a kPW-slot register window rotating by
//     one slot per tap (kPW + KW - 1 loads per kernel row instead of kPW * KW); otherwise every
//     (output, tap) reads its input (L1 serves the overlap). The block (256 threads) is tc channel
//     vectors x tp pixel groups, tc = ceil(CV / ceil(CV / 64)) for CV channel vectors; the
//     filter of its tc * VEC channels sits in shared memory in the storage type, transposed to
//     [tap][channel] (one 16-byte load per tap for VEC channels), staged rs kernel rows at a time
//     (rs = all of them when they fit 32 KB: then once per block). Grid: ncb channel chunks x up
//     to 2 * 8 * SMs / ncb blocks each, a grid-stride loop over the pixel groups.
//   NCHW, down = 1: dw_nchw_tiled<T, WIN>. A block computes a tile of ty output rows x tx * kPW
//     output columns of one (n, o) plane; the input tile with its halo ((ty - 1) * up + span rows
//     by (tx * kPW - 1) * up + span columns) and the plane's filter are staged in shared memory
//     as float; each thread computes kPW adjacent outputs of one row (WIN as above, from shared
//     memory). tx = min(ceil(Wo / 4), 8, ...), ty = min(Ho, 256 / tx); halved (ty first) until
//     the tile fits 48 KB, else the direct kernel. Small planes get small blocks (a multiple of 32).
//   anything else (down > 1: the input gradient at stride > 1; an NCHW span too large for a
//     tile): dw_direct<T>, one thread per output element, taps read through L1.
// Index math in int64 (shared-memory offsets in int). fp32 accumulation.
#include "depthwise_conv2d_common.cuh"  // first: it includes cuda_utils.cuh

#include <string>

namespace pydl {
namespace dwconv {
namespace {

using cuda::ceil_div;
using cuda::from_float;
using cuda::to_float;

constexpr size_t kWeightSmem = 32 * 1024;  // filter staging budget of dw_nhwc
constexpr size_t kTileSmem = 48 * 1024;    // input tile + filter of dw_nchw_tiled
constexpr int kMaxTc = 64;                 // channel vectors per dw_nhwc block

// 0 <= v < n with one unsigned compare.
__device__ __forceinline__ bool inside(int64_t v, int64_t n) {
  return static_cast<uint64_t>(v) < static_cast<uint64_t>(n);
}

// ---- channels_last --------------------------------------------------------------------------

struct NhwcCfg {
  int tc, tp;       // channel vectors x pixel groups per block (tc * tp <= kThreads)
  int rs;           // kernel rows per filter stage
  int64_t ncb;      // channel chunks (grid = ncb * gpc)
  int64_t wq;       // ceil(Wo / kPW): pixel groups per output row
  int64_t groups;   // N * Ho * wq
  int64_t tiles;    // ceil(groups / tp)
  int64_t gpc;      // blocks per channel chunk
  FastDiv f_wq, f_ho;
};

// Stages the filter rows [i0, i0 + rsn) of the block's tc * VEC output channels (weight channel
// o * R + r) into ws[(ii * KW + j) * tcv + ch], flipped taps when p.flip; 0 past Cout.
template <typename T>
__device__ __forceinline__ void stage_filter(const ConvPass& p, T* ws, int64_t ch0, int tcv, int r,
                                             int i0, int rsn) {
  const T* wt = static_cast<const T*>(p.wt);
  const int KT = p.KH * p.KW;
  const int n = rsn * p.KW * tcv;
  for (int idx = static_cast<int>(threadIdx.x); idx < n; idx += static_cast<int>(blockDim.x)) {
    const int tl = idx / tcv, ch = idx - tl * tcv;
    const int ii = tl / p.KW, j = tl - ii * p.KW, i = i0 + ii;
    const int64_t o = ch0 + ch;
    T v = from_float<T>(0.0f);
    if (o < p.Cout) {
      const int tap = p.flip ? (p.KH - 1 - i) * p.KW + (p.KW - 1 - j) : i * p.KW + j;
      v = wt[(o * p.R + r) * KT + tap];
    }
    ws[idx] = v;
  }
}

template <typename T, int VEC, bool WIN>
__global__ void __launch_bounds__(kThreads, 2) dw_nhwc(const ConvPass p, const NhwcCfg c) {
  T* ws = cuda::dynamic_smem<T>();  // [rs * KW][tc * VEC]
  const int tid = static_cast<int>(threadIdx.x);
  const int lc = tid % c.tc, lp = tid / c.tc;
  const int tcv = c.tc * VEC;
  const int64_t cb = static_cast<unsigned>(blockIdx.x) % static_cast<unsigned>(c.ncb);
  const int64_t o0 = cb * tcv + static_cast<int64_t>(lc) * VEC;  // the thread's first channel
  const bool cok = lp < c.tp && o0 < p.Cout;
  const T* in = static_cast<const T*>(p.in);
  T* out = static_cast<T*>(p.out);

  float bias[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) bias[k] = 0.0f;
  if (p.bias != nullptr && cok) {
    const T* b = static_cast<const T*>(p.bias) + o0;
#pragma unroll
    for (int k = 0; k < VEC; ++k) bias[k] = to_float(b[k]);
  }
  const bool once = c.rs >= p.KH && p.R == 1;  // the whole filter staged once per block
  if (once) {
    stage_filter<T>(p, ws, cb * tcv, tcv, 0, 0, p.KH);
    __syncthreads();
  }

  const int64_t ci1 = fdiv(o0, p.fD);  // the input channel when R = 1
  for (int64_t tile = static_cast<unsigned>(blockIdx.x) / static_cast<unsigned>(c.ncb); tile < c.tiles;
       tile += c.gpc) {
    const int64_t g = tile * c.tp + lp;
    const bool ok = cok && g < c.groups;
    const int64_t rest = fdiv(g, c.f_wq), wq = g - rest * c.wq;
    const int64_t n = fdiv(rest, c.f_ho), ho = rest - n * p.Ho;
    const int64_t wo0 = wq * kPW;
    float acc[kPW][VEC];
#pragma unroll
    for (int t = 0; t < kPW; ++t)
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[t][k] = 0.0f;

    for (int r = 0; r < p.R; ++r) {
      const int64_t ci = p.R == 1 ? ci1 : fdiv(o0 * p.R + r, p.fD);
      for (int i0 = 0; i0 < p.KH; i0 += c.rs) {
        const int rsn = p.KH - i0 < c.rs ? p.KH - i0 : c.rs;
        if (!once) {
          __syncthreads();  // the previous stage is consumed
          stage_filter<T>(p, ws, cb * tcv, tcv, r, i0, rsn);
          __syncthreads();
        }
        if (!ok) continue;
        for (int ii = 0; ii < rsn; ++ii) {
          const int64_t hi = ho * p.up_h + p.off_h + static_cast<int64_t>(i0 + ii) * p.dil_h;
          if (!inside(hi, p.Hi)) continue;
          const T* row = in + (n * p.Hi + hi) * p.Wi * p.Cin + ci;  // + column * Cin
          const T* wrow = ws + ii * p.KW * tcv + lc * VEC;           // + tap * tcv
          if constexpr (WIN) {
            const int64_t c0 = wo0 + p.off_w;  // column of output wo0's tap 0
            float xv[kPW][VEC];                // slot s: column c0 + j + t with (j + t) % kPW == s
#pragma unroll
            for (int t = 0; t < kPW; ++t) {
              load_or_zero<T, VEC>(row + (c0 + t) * p.Cin, inside(c0 + t, p.Wi), xv[t]);
            }
            for (int j0 = 0; j0 < p.KW; j0 += kPW) {
#pragma unroll
              for (int jj = 0; jj < kPW; ++jj) {
                const int j = j0 + jj;
                if (j < p.KW) {
                  float wv[VEC];
                  cuda::load_floats<T, VEC>(wrow + j * tcv, wv);
#pragma unroll
                  for (int t = 0; t < kPW; ++t)
#pragma unroll
                    for (int k = 0; k < VEC; ++k)
                      acc[t][k] = fmaf(wv[k], xv[(jj + t) % kPW][k], acc[t][k]);
                  if (j + 1 < p.KW) {  // column c0 + j leaves the window, c0 + j + kPW enters
                    const int64_t col = c0 + j + kPW;
                    load_or_zero<T, VEC>(row + col * p.Cin, inside(col, p.Wi), xv[jj]);
                  }
                }
              }
            }
          } else {
            for (int j = 0; j < p.KW; ++j) {
              float wv[VEC];
              cuda::load_floats<T, VEC>(wrow + j * tcv, wv);
              const int64_t cj = wo0 * p.up_w + p.off_w + static_cast<int64_t>(j) * p.dil_w;
#pragma unroll
              for (int t = 0; t < kPW; ++t) {
                const int64_t col = cj + t * p.up_w;
                if (inside(col, p.Wi)) {
                  float xv[VEC];
                  cuda::load_floats<T, VEC>(row + col * p.Cin, xv);
#pragma unroll
                  for (int k = 0; k < VEC; ++k) acc[t][k] = fmaf(wv[k], xv[k], acc[t][k]);
                }
              }
            }
          }
        }
      }
    }
    if (ok) {
      T* orow = out + (n * p.Ho + ho) * p.Wo * p.Cout + o0;
#pragma unroll
      for (int t = 0; t < kPW; ++t) {
        if (wo0 + t < p.Wo) {
          float v[VEC];
#pragma unroll
          for (int k = 0; k < VEC; ++k) v[k] = acc[t][k] + bias[k];
          cuda::store_floats<T, VEC>(orow + (wo0 + t) * p.Cout, v);
        }
      }
    }
  }
}

// ---- NCHW: shared-memory tiles ----------------------------------------------------------------

struct TileCfg {
  int tx, ty;               // threads per tile row (kPW columns each) x tile rows
  int IH, IW;               // input tile (with halo)
  int64_t tiles_h, tiles_w, tiles;
  FastDiv f_tw, f_th, f_cout;
};

template <typename T, bool WIN>
__global__ void __launch_bounds__(kThreads, 4) dw_nchw_tiled(const ConvPass p, const TileCfg c) {
  float* xs = cuda::dynamic_smem<float>();  // [IH][IW]
  float* wsm = xs + c.IH * c.IW;            // [KH][KW] (flipped when p.flip)
  const int tid = static_cast<int>(threadIdx.x);
  const int lx = tid % c.tx, ly = tid / c.tx;
  const bool active = ly < c.ty;
  const int nx = c.IH * c.IW, KT = p.KH * p.KW;
  const T* in = static_cast<const T*>(p.in);
  const T* wt = static_cast<const T*>(p.wt);
  T* out = static_cast<T*>(p.out);

  for (int64_t tile = blockIdx.x; tile < c.tiles; tile += gridDim.x) {
    const int64_t rest = fdiv(tile, c.f_tw), tw = tile - rest * c.tiles_w;
    const int64_t plane = fdiv(rest, c.f_th), th = rest - plane * c.tiles_h;
    const int64_t n = fdiv(plane, c.f_cout), o = plane - n * p.Cout;
    const int64_t h0 = th * c.ty, w0 = tw * c.tx * kPW;
    const int64_t ih0 = h0 * p.up_h + p.off_h, iw0 = w0 * p.up_w + p.off_w;
    const int64_t ho = h0 + ly, wo0 = w0 + static_cast<int64_t>(lx) * kPW;
    float acc[kPW];
#pragma unroll
    for (int t = 0; t < kPW; ++t) acc[t] = 0.0f;

    for (int r = 0; r < p.R; ++r) {
      const int64_t wc = o * p.R + r, ci = fdiv(wc, p.fD);
      const T* plane_in = in + (n * p.Cin + ci) * p.Hi * p.Wi;
      __syncthreads();  // the previous tile / plane is consumed
      for (int idx = tid; idx < nx; idx += static_cast<int>(blockDim.x)) {
        const int rr = idx / c.IW, cc = idx - rr * c.IW;
        const int64_t hi = ih0 + rr, wi = iw0 + cc;
        xs[idx] = inside(hi, p.Hi) && inside(wi, p.Wi) ? to_float(plane_in[hi * p.Wi + wi]) : 0.0f;
      }
      for (int idx = tid; idx < KT; idx += static_cast<int>(blockDim.x)) {
        wsm[idx] = to_float(wt[wc * KT + (p.flip ? KT - 1 - idx : idx)]);
      }
      __syncthreads();
      if (!active) continue;
      for (int i = 0; i < p.KH; ++i) {
        const float* xrow = xs + (ly * static_cast<int>(p.up_h) + i * static_cast<int>(p.dil_h)) * c.IW;
        const float* wrow = wsm + i * p.KW;
        if constexpr (WIN) {
          const float* x0 = xrow + lx * kPW;
          float xv[kPW];
#pragma unroll
          for (int t = 0; t < kPW; ++t) xv[t] = x0[t];
          for (int j0 = 0; j0 < p.KW; j0 += kPW) {
#pragma unroll
            for (int jj = 0; jj < kPW; ++jj) {
              const int j = j0 + jj;
              if (j < p.KW) {
                const float w = wrow[j];
#pragma unroll
                for (int t = 0; t < kPW; ++t) acc[t] = fmaf(w, xv[(jj + t) % kPW], acc[t]);
                if (j + 1 < p.KW) xv[jj] = x0[j + kPW];
              }
            }
          }
        } else {
          const int uw = static_cast<int>(p.up_w), dw = static_cast<int>(p.dil_w);
          for (int j = 0; j < p.KW; ++j) {
            const float w = wrow[j];
#pragma unroll
            for (int t = 0; t < kPW; ++t) acc[t] = fmaf(w, xrow[(lx * kPW + t) * uw + j * dw], acc[t]);
          }
        }
      }
    }
    if (active && ho < p.Ho) {
      const float b = p.bias != nullptr ? to_float(static_cast<const T*>(p.bias)[o]) : 0.0f;
      T* orow = out + ((n * p.Cout + o) * p.Ho + ho) * p.Wo;
#pragma unroll
      for (int t = 0; t < kPW; ++t) {
        if (wo0 + t < p.Wo) orow[wo0 + t] = from_float<T>(acc[t] + b);
      }
    }
  }
}

// ---- direct: any pass (down > 1 included), one thread per output element ------------------------

struct DirectCfg {
  FastDiv f_c, f_w, f_h, f_dh, f_dw;  // Cout, Wo, Ho, down_h, down_w
};

template <typename T>
__global__ void __launch_bounds__(kThreads) dw_direct(const ConvPass p, const DirectCfg c) {
  const T* in = static_cast<const T*>(p.in);
  const T* wt = static_cast<const T*>(p.wt);
  T* out = static_cast<T*>(p.out);
  const int64_t total = p.N * p.Cout * p.Ho * p.Wo;
  const int KT = p.KH * p.KW;
  const bool nhwc = p.layout == Layout::kNHWC;
  const int64_t s_c = nhwc ? 1 : p.Hi * p.Wi, s_h = nhwc ? p.Wi * p.Cin : p.Wi, s_w = nhwc ? p.Cin : 1;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += step) {
    int64_t n, o, h, w;  // idx is the output's offset in its (dense) layout
    if (nhwc) {
      const int64_t r1 = fdiv(idx, c.f_c), r2 = fdiv(r1, c.f_w);
      o = idx - r1 * p.Cout;
      w = r1 - r2 * p.Wo;
      n = fdiv(r2, c.f_h);
      h = r2 - n * p.Ho;
    } else {
      const int64_t r1 = fdiv(idx, c.f_w), r2 = fdiv(r1, c.f_h);
      w = idx - r1 * p.Wo;
      h = r1 - r2 * p.Ho;
      n = fdiv(r2, c.f_c);
      o = r2 - n * p.Cout;
    }
    float acc = 0.0f;
    for (int r = 0; r < p.R; ++r) {
      const int64_t wc = o * p.R + r, ci = fdiv(wc, p.fD);
      const T* base = in + n * p.Cin * p.Hi * p.Wi + ci * s_c;
      const T* wk = wt + wc * KT;
      for (int i = 0; i < p.KH; ++i) {
        const int64_t nh = h * p.up_h + p.off_h + i * p.dil_h;
        if (nh < 0) continue;
        const int64_t hi = fdiv(nh, c.f_dh);
        if (hi * p.down_h != nh || hi >= p.Hi) continue;
        const T* row = base + hi * s_h;
        for (int j = 0; j < p.KW; ++j) {
          const int64_t nw = w * p.up_w + p.off_w + j * p.dil_w;
          if (nw < 0) continue;
          const int64_t wi = fdiv(nw, c.f_dw);
          if (wi * p.down_w != nw || wi >= p.Wi) continue;
          const int tap = p.flip ? KT - 1 - (i * p.KW + j) : i * p.KW + j;
          acc = fmaf(to_float(wk[tap]), to_float(row[wi * s_w]), acc);
        }
      }
    }
    if (p.bias != nullptr) acc += to_float(static_cast<const T*>(p.bias)[o]);
    out[idx] = from_float<T>(acc);
  }
}

// ---- host side ----------------------------------------------------------------------------------

template <typename T>
void launch_direct(const ConvPass& p, cudaStream_t stream, const char* op) {
  const int64_t total = p.N * p.Cout * p.Ho * p.Wo;
  const int64_t grid = std::min<int64_t>(ceil_div(total, kThreads), 32 * target_blocks());
  const DirectCfg c{FastDiv(p.Cout), FastDiv(p.Wo), FastDiv(p.Ho), FastDiv(p.down_h), FastDiv(p.down_w)};
  cuda::launch(dw_direct<T>, grid, kThreads, 0, stream, op, p, c);
}

template <typename T, int VEC>
void launch_nhwc(const ConvPass& p, cudaStream_t stream, const char* op) {
  const int64_t cv = ceil_div(p.Cout, VEC);
  NhwcCfg c{};
  c.ncb = ceil_div(cv, kMaxTc);
  c.tc = static_cast<int>(ceil_div(cv, c.ncb));
  c.tp = kThreads / c.tc;
  const size_t row_bytes = static_cast<size_t>(p.KW) * c.tc * VEC * sizeof(T);
  c.rs = static_cast<int>(std::max<size_t>(1, std::min<size_t>(p.KH, kWeightSmem / row_bytes)));
  c.wq = ceil_div(p.Wo, kPW);
  c.groups = p.N * p.Ho * c.wq;
  c.tiles = ceil_div(c.groups, c.tp);
  c.f_wq = FastDiv(c.wq);
  c.f_ho = FastDiv(p.Ho);
  c.gpc = std::min<int64_t>(c.tiles, std::max<int64_t>(1, ceil_div(2 * target_blocks(), c.ncb)));
  const size_t smem = row_bytes * c.rs;
  const bool win = p.up_w == 1 && p.dil_w == 1;
  const int64_t grid = c.ncb * c.gpc;
  if (win) {
    cuda::launch(dw_nhwc<T, VEC, true>, grid, kThreads, smem, stream, op, p, c);
  } else {
    cuda::launch(dw_nhwc<T, VEC, false>, grid, kThreads, smem, stream, op, p, c);
  }
}

size_t tile_smem(const ConvPass& p, const TileCfg& c) {
  return (static_cast<size_t>(c.IH) * c.IW + static_cast<size_t>(p.KH) * p.KW) * sizeof(float);
}

// The NCHW tile for the pass, or false when even the smallest tile's span exceeds kTileSmem.
bool choose_tile(const ConvPass& p, TileCfg& c) {
  const int64_t wq = ceil_div(p.Wo, kPW);
  int64_t tx = std::min<int64_t>(wq, 8);
  int64_t ty = std::min<int64_t>(p.Ho, kThreads / tx);
  if (ty < kThreads / tx) tx = std::min<int64_t>(wq, kThreads / std::max<int64_t>(ty, 1));  // short planes: wider
  ty = std::max<int64_t>(1, std::min<int64_t>(ty, kThreads / tx));
  auto fill = [&] {
    const int64_t ih = (ty - 1) * p.up_h + (p.KH - 1) * p.dil_h + 1;
    const int64_t iw = (tx * kPW - 1) * p.up_w + (p.KW - 1) * p.dil_w + 1;
    if (ih * iw > (int64_t{1} << 24)) return false;
    c.tx = static_cast<int>(tx);
    c.ty = static_cast<int>(ty);
    c.IH = static_cast<int>(ih);
    c.IW = static_cast<int>(iw);
    return tile_smem(p, c) <= kTileSmem;
  };
  while (!fill()) {
    if (ty > 1) {
      ty = (ty + 1) / 2;
    } else if (tx > 1) {
      tx = (tx + 1) / 2;
    } else {
      return false;
    }
  }
  c.tiles_h = ceil_div(p.Ho, c.ty);
  c.tiles_w = ceil_div(p.Wo, static_cast<int64_t>(c.tx) * kPW);
  c.tiles = p.N * p.Cout * c.tiles_h * c.tiles_w;
  c.f_tw = FastDiv(c.tiles_w);
  c.f_th = FastDiv(c.tiles_h);
  c.f_cout = FastDiv(p.Cout);
  return true;
}

template <typename T>
void run_typed(const ConvPass& p, cudaStream_t stream, const char* op) {
  if (p.down_h != 1 || p.down_w != 1) return launch_direct<T>(p, stream, op);
  if (p.layout == Layout::kNHWC) {
    constexpr int kVec = cuda::kVec16<T>;
    const bool vec = p.R == 1 && p.D == 1 && p.Cin % kVec == 0 && p.Cout % kVec == 0 &&
                     (reinterpret_cast<uintptr_t>(p.in) & 15u) == 0 &&
                     (reinterpret_cast<uintptr_t>(p.out) & 15u) == 0;
    if (vec) return launch_nhwc<T, kVec>(p, stream, op);
    return launch_nhwc<T, 1>(p, stream, op);
  }
  TileCfg c{};
  if (!choose_tile(p, c)) return launch_direct<T>(p, stream, op);
  const int block = static_cast<int>(ceil_div(static_cast<int64_t>(c.tx) * c.ty, 32) * 32);
  const int64_t grid = std::min<int64_t>(c.tiles, 32 * target_blocks());
  const size_t smem = tile_smem(p, c);
  if (p.up_w == 1 && p.dil_w == 1) {
    cuda::launch(dw_nchw_tiled<T, true>, grid, block, smem, stream, op, p, c);
  } else {
    cuda::launch(dw_nchw_tiled<T, false>, grid, block, smem, stream, op, p, c);
  }
}

}  // namespace

void run_conv_pass(const ConvPass& pass, DType dtype, cudaStream_t stream, const char* op) {
  if (pass.N == 0 || pass.Cout == 0 || pass.Ho == 0 || pass.Wo == 0) return;
  PYDL_CHECK(pass.N * pass.Cout * pass.Ho * pass.Wo < kMaxIndex &&
                 pass.N * pass.Cin * pass.Hi * pass.Wi < kMaxIndex,
             op, ": tensors too large for the CUDA kernel");
  ConvPass p = pass;
  p.fD = FastDiv(p.D);
  cuda::dispatch_cuda_dtype(dtype, op, [&](auto tag) { run_typed<decltype(tag)>(p, stream, op); });
}

}  // namespace dwconv

void depthwise_conv2d_fwd_cuda(const DepthwiseConv2dFwdArgs& a, void* stream) {
  const char* op = "depthwise_conv2d_fwd_cuda";
  validate_depthwise_conv2d_fwd(a, op);
  cuda::require_cuda_dtype(a.x.dtype, op);
  dwconv::ConvPass p;
  p.in = a.x.data;
  p.wt = a.weight.data;
  p.bias = a.bias.defined ? a.bias.data : nullptr;
  p.out = a.y.data;
  p.N = a.x.sizes[0];
  p.Cin = a.x.sizes[1];
  p.Hi = a.x.sizes[2];
  p.Wi = a.x.sizes[3];
  p.Cout = a.weight.sizes[0];
  p.Ho = a.y.sizes[2];
  p.Wo = a.y.sizes[3];
  p.KH = static_cast<int>(a.weight.sizes[1]);
  p.KW = static_cast<int>(a.weight.sizes[2]);
  p.up_h = a.g.stride_h;
  p.up_w = a.g.stride_w;
  p.off_h = -a.g.pad_h;
  p.off_w = -a.g.pad_w;
  p.dil_h = a.g.dil_h;
  p.dil_w = a.g.dil_w;
  p.R = 1;
  p.D = p.Cout / p.Cin;
  p.layout = a.layout;
  dwconv::run_conv_pass(p, a.x.dtype, static_cast<cudaStream_t>(stream), op);
}

}  // namespace pydl
