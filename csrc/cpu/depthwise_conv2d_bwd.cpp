// CPU backward of the depthwise 2-D convolution: dx, dweight, dbias (contract:
// include/pydl/depthwise_conv2d.h; building blocks: depthwise_conv2d_common.h).
//
// Work items are (input channel c [NCHW] or channel block [NHWC], chunk of the batch); each item
// loops over its images in order and does everything of those channels:
//   dweight / dbias: per band of dy rows, the input band is copied padded (as in the forward) and
//     dy's band widened; per pair of kernel rows and group of up to 7 kernel columns (or one row
//     of 8), one vector accumulator per tap sweeps the band: one dy load serves up to 14 taps. The sums of an
//     item go to its own partial row, and the partials are added in chunk order at the end. The
//     chunking depends only on (N, channels), never on the thread count: the result is
//     bit-identical for every num_threads.
//   dx: a gather, race-free (each item owns its dx planes): dx is the stride-1 correlation of dy
//     zero-upsampled by the stride and padded by (k-1)*d - pad, with the flipped kernel; the
//     forward's correlation kernels run it on a scratch band of that virtual image. With a
//     multiplier m, NCHW adds the m output planes' correlations into a float buffer; NHWC
//     correlates in output-channel space and adds each group of m lanes on the store.
// Strided dx correlates the zeros of the upsampled dy too (sh*sw times the FMAs of stride 1).
#include <algorithm>
#include <cstring>
#include <vector>

#include "depthwise_conv2d_common.h"

namespace pydl {
namespace {

using namespace dwconv;

template <typename T>
struct BwdCtx {
  using A = acc_t<T>;
  const DepthwiseConv2dBwdArgs* a;
  Geo g;
  bool need_dw, need_db, need_dx;
  int64_t chunk, nchunks;  // images per item, chunks of the batch
  const A* wf;             // flipped weights: NCHW (Cout, KK); NHWC (blocks, KK, CB)
  A* pw;                   // dweight partials: NCHW (nchunks, Cout, KK); NHWC (nchunks, blocks, KK, CB)
  A* pb;                   // dbias partials:   NCHW (nchunks, Cout);     NHWC (nchunks, blocks, CB)
  int64_t bw, bx;          // band rows: of dy (dweight), of dx
  // NCHW: column vectors / padded widths of dy's and dx's rows, scratch row lengths
  int64_t nvec, qpad, L, nvecx, qpadx, Lx;
  // NHWC: scratch columns of the x band and of the upsampled-dy band
  int64_t cols, colsx;
  PixBlocks blocks;
};

// dwp[ii*KW + jj] += sum_{p<P, q<Wo} dys[p*ds + q] * xs[(p*sh + (i + ii)*dh)*rs + joff[jj] + q]
// for ii < IB kernel rows and jj < JB kernel columns: IB*JB accumulators, one dy load for all.
template <typename A, int IB, int JB>
PYDL_INLINE void dw_plane_block(const A* xs, int64_t rs, int64_t sh, int64_t dh, int64_t i,
                                const int64_t* joff, const A* dys, int64_t ds, int64_t P,
                                int64_t Wo, A* dwp, int64_t KW) {
  using VT = Vec<A>;
  using V = typename VT::V;
  constexpr int W = VT::W;
  const int64_t nfull = Wo / W;
  const int tail = static_cast<int>(Wo - nfull * W);
  V acc[IB][JB];
  for (int r = 0; r < IB; ++r)
    for (int t = 0; t < JB; ++t) acc[r][t] = V{};
  for (int64_t p = 0; p < P; ++p) {
    const A* xr[IB];
    for (int r = 0; r < IB; ++r) xr[r] = xs + (p * sh + (i + r) * dh) * rs;
    const A* dr = dys + p * ds;
    for (int64_t v = 0; v < nfull; ++v) {
      const V d = VT::load(dr + v * W);
      for (int r = 0; r < IB; ++r)
        for (int t = 0; t < JB; ++t) acc[r][t] += d * VT::load(xr[r] + joff[t] + v * W);
    }
    if (tail) {  // lanes past Wo: dy is 0 there, but x may not be finite
      const V d = VT::load(dr + nfull * W);
      for (int r = 0; r < IB; ++r)
        for (int t = 0; t < JB; ++t)
          acc[r][t] += VT::keep_first(d * VT::load(xr[r] + joff[t] + nfull * W), tail);
    }
  }
  for (int r = 0; r < IB; ++r)
    for (int t = 0; t < JB; ++t) dwp[r * KW + t] += VT::sum(acc[r][t]);
}

// dwp[((i + ii)*KW + j0 + jj)*CB + lanes of v] += sum_{p<P, q<Wo} dys[(p*Wo + q)*CB + lanes]
//     * xs[((p*sh + (i + ii)*dh)*cols + q*sw + (j0 + jj)*dw)*CB + lanes], ii < IB, jj < JB.
template <typename A, int IB, int JB>
PYDL_INLINE void dw_pix_block(const A* xs, int64_t cols, int64_t CB, int64_t sh, int64_t sw,
                              int64_t dh, int64_t dw, int64_t KW, int64_t i, int64_t j0,
                              int64_t v, const A* dys, int64_t P, int64_t Wo, A* dwp) {
  using VT = Vec<A>;
  using V = typename VT::V;
  constexpr int W = VT::W;
  const int64_t lane0 = v * W, jstep = dw * CB, qstep = sw * CB;
  V acc[IB][JB];
  for (int r = 0; r < IB; ++r)
    for (int t = 0; t < JB; ++t) acc[r][t] = V{};
  for (int64_t p = 0; p < P; ++p) {
    const A* xr[IB];
    for (int r = 0; r < IB; ++r) xr[r] = xs + ((p * sh + (i + r) * dh) * cols + j0 * dw) * CB + lane0;
    const A* dr = dys + p * Wo * CB + lane0;
    for (int64_t q = 0; q < Wo; ++q) {
      const V d = VT::load(dr + q * CB);
      for (int r = 0; r < IB; ++r) {
        const A* xq = xr[r] + q * qstep;
        for (int t = 0; t < JB; ++t) acc[r][t] += d * VT::load(xq + t * jstep);
      }
    }
  }
  for (int r = 0; r < IB; ++r) {
    for (int t = 0; t < JB; ++t) {
      A* o = dwp + ((i + r) * KW + j0 + t) * CB + lane0;
      VT::store(o, VT::load(o) + acc[r][t]);
    }
  }
}

// CALL(IB, JB) for jb = 1..8 columns: two kernel rows at a time (i + 1 < i_end) for jb <= 7
// (up to 14 accumulators), else one.
#define PYDL_DW_JB_SWITCH(two, jb, CALL)          \
  if (two) {                                      \
    switch (jb) {                                 \
      case 7: CALL(2, 7); break;                  \
      case 6: CALL(2, 6); break;                  \
      case 5: CALL(2, 5); break;                  \
      case 4: CALL(2, 4); break;                  \
      case 3: CALL(2, 3); break;                  \
      case 2: CALL(2, 2); break;                  \
      default: CALL(2, 1); break;                 \
    }                                             \
  } else {                                        \
    switch (jb) {                                 \
      case 8: CALL(1, 8); break;                  \
      case 7: CALL(1, 7); break;                  \
      case 6: CALL(1, 6); break;                  \
      case 5: CALL(1, 5); break;                  \
      case 4: CALL(1, 4); break;                  \
      case 3: CALL(1, 3); break;                  \
      case 2: CALL(1, 2); break;                  \
      default: CALL(1, 1); break;                 \
    }                                             \
  }

template <typename T>
PYDL_INLINE void bwd_nchw_items(const BwdCtx<T>& c, int64_t i0, int64_t i1, acc_t<T>* scratch) {
  using A = acc_t<T>;
  using VT = Vec<A>;
  constexpr int VW = VT::W;
  const Geo& g = c.g;
  const DepthwiseConv2dBwdArgs& a = *c.a;
  const int64_t KK = g.KH * g.KW, rs = g.sw * c.L;
  int64_t joff[kDepthwiseMaxKernel], joffx[kDepthwiseMaxKernel];
  for (int64_t j = 0; j < g.KW; ++j) {
    joff[j] = ((j * g.dw) % g.sw) * c.L + (j * g.dw) / g.sw;
    joffx[j] = j * g.dw;
  }
  // Scratch: [x band | dy band] for dweight, then [upsampled dy band | dx band].
  A* xs = scratch;
  A* dys = xs + (c.need_dw ? band_in_rows(c.bw, g.sh, g.KH, g.dh) * rs : 0);
  A* ups = dys + ((c.need_dw || c.need_db) ? c.bw * c.qpad : 0);
  A* outx = ups + band_in_rows(c.bx, 1, g.KH, g.dh) * c.Lx;
  const T* dy = a.dy.template ptr<const T>();
  for (int64_t item = i0; item < i1; ++item) {
    const int64_t ci = item / c.nchunks, chunk = item % c.nchunks;
    const int64_t n0 = chunk * c.chunk, n1 = std::min(g.N, n0 + c.chunk);
    A* pw = c.pw ? c.pw + (chunk * g.Cout + ci * g.m) * KK : nullptr;
    A* pb = c.pb ? c.pb + chunk * g.Cout + ci * g.m : nullptr;
    for (int64_t n = n0; n < n1; ++n) {
      if (c.need_dw || c.need_db) {
        const T* xsrc = c.need_dw ? a.x.template ptr<const T>() + (n * g.C + ci) * g.H * g.W : nullptr;
        for (int64_t p0 = 0; p0 < g.Ho; p0 += c.bw) {
          const int64_t P = std::min(c.bw, g.Ho - p0);
          if (c.need_dw)
            fill_plane(xsrc, g.H, g.W, p0 * g.sh - g.ph, band_in_rows(P, g.sh, g.KH, g.dh), 1,
                       -g.pw, 1, g.sw, c.L, xs);
          for (int64_t k = 0; k < g.m; ++k) {
            const int64_t o = ci * g.m + k;
            fill_plane(dy + (n * g.Cout + o) * g.Ho * g.Wo, g.Ho, g.Wo, p0, P, 1, 0, 1, 1, c.qpad,
                       dys);
            if (c.need_db) {
              typename VT::V s = {};
              for (int64_t e = 0; e < P * c.qpad; e += VW) s += VT::load(dys + e);
              pb[k] += VT::sum(s);
            }
            if (!c.need_dw) continue;
            for (int64_t i = 0; i < g.KH;) {
              const int64_t jb = g.KW <= 7 ? g.KW : 8;
              const bool two = jb <= 7 && i + 1 < g.KH;
              for (int64_t j0 = 0; j0 < g.KW; j0 += jb) {
                A* dwp = pw + k * KK + i * g.KW + j0;
#define PYDL_DW_CALL(IB, JB) \
  dw_plane_block<A, IB, JB>(xs, rs, g.sh, g.dh, i, joff + j0, dys, c.qpad, P, g.Wo, dwp, g.KW)
                PYDL_DW_JB_SWITCH(two, std::min<int64_t>(jb, g.KW - j0), PYDL_DW_CALL)
#undef PYDL_DW_CALL
              }
              i += two ? 2 : 1;
            }
          }
        }
      }
      if (c.need_dx) {
        T* dx = a.dx.template ptr<T>() + (n * g.C + ci) * g.H * g.W;
        for (int64_t h0 = 0; h0 < g.H; h0 += c.bx) {
          const int64_t P = std::min(c.bx, g.H - h0);
          // float32 rows of whole vectors accumulate straight in dx, others in a float buffer.
          bool direct = false;
          if constexpr (std::is_same_v<T, A>) direct = c.qpadx == g.W;
          A* acc = outx;
          int64_t acc_stride = c.qpadx;
          if constexpr (std::is_same_v<T, A>) {
            if (direct) {
              acc = dx + h0 * g.W;
              acc_stride = g.W;
            }
          }
          for (int64_t k = 0; k < g.m; ++k) {
            const int64_t o = ci * g.m + k;
            fill_plane(dy + (n * g.Cout + o) * g.Ho * g.Wo, g.Ho, g.Wo,
                       h0 + g.ph - (g.KH - 1) * g.dh, band_in_rows(P, 1, g.KH, g.dh), g.sh,
                       g.pw - (g.KW - 1) * g.dw, g.sw, 1, c.Lx, ups);
            corr_plane<A>(ups, c.Lx, 1, g.dh, g.KH, g.KW, joffx, c.wf + o * KK, acc, acc_stride, P,
                          c.nvecx, k == 0 ? 0 : 1, A(0));
          }
          if (direct) continue;
          for (int64_t h = 0; h < P; ++h) {
            T* d = dx + (h0 + h) * g.W;
            const A* s = outx + h * c.qpadx;
#pragma omp simd
            for (int64_t q = 0; q < g.W; ++q) d[q] = from_acc<T>(s[q]);
          }
        }
      }
    }
  }
}

template <typename T>
PYDL_INLINE void bwd_nhwc_items(const BwdCtx<T>& c, int64_t i0, int64_t i1, acc_t<T>* scratch) {
  using A = acc_t<T>;
  using VT = Vec<A>;
  constexpr int VW = VT::W;
  const Geo& g = c.g;
  const DepthwiseConv2dBwdArgs& a = *c.a;
  const PixBlocks& bl = c.blocks;
  const int64_t KK = g.KH * g.KW, CB = bl.CB;
  A* xs = scratch;
  A* dys = xs + (c.need_dw ? band_in_rows(c.bw, g.sh, g.KH, g.dh) * c.cols * CB : 0);
  A* ups = dys + ((c.need_dw || c.need_db) ? c.bw * g.Wo * CB : 0);
  A* outx = ups + band_in_rows(c.bx, 1, g.KH, g.dh) * c.colsx * CB;
  const T* dy = a.dy.template ptr<const T>();
  for (int64_t item = i0; item < i1; ++item) {
    const int64_t blk = item / c.nchunks, chunk = item % c.nchunks;
    const int64_t n0 = chunk * c.chunk, n1 = std::min(g.N, n0 + c.chunk);
    const int64_t oc0 = bl.out_begin(g, blk), nreal = bl.out_real(g, blk);
    const int64_t ic0 = blk * bl.cbi;
    A* pw = c.pw ? c.pw + (chunk * bl.count + blk) * KK * CB : nullptr;
    A* pb = c.pb ? c.pb + (chunk * bl.count + blk) * CB : nullptr;
    for (int64_t n = n0; n < n1; ++n) {
      const T* dyn = dy + n * g.Ho * g.Wo * g.Cout;
      if (c.need_dw || c.need_db) {
        for (int64_t p0 = 0; p0 < g.Ho; p0 += c.bw) {
          const int64_t P = std::min(c.bw, g.Ho - p0);
          fill_pixels(dyn, g.Ho, g.Wo, g.Cout, p0, P, 1, 0, g.Wo, 1, CB, oc0, nreal, 1, dys);
          if (c.need_db) {
            for (int64_t v = 0; v < CB / VW; ++v) {
              typename VT::V s = {};
              for (int64_t e = 0; e < P * g.Wo; ++e) s += VT::load(dys + e * CB + v * VW);
              VT::store(pb + v * VW, VT::load(pb + v * VW) + s);
            }
          }
          if (!c.need_dw) continue;
          fill_pixels(a.x.template ptr<const T>() + n * g.H * g.W * g.C, g.H, g.W, g.C,
                      p0 * g.sh - g.ph, band_in_rows(P, g.sh, g.KH, g.dh), 1, -g.pw, c.cols, 1,
                      CB, ic0, nreal, g.m, xs);
          for (int64_t v = 0; v < CB / VW; ++v) {
            for (int64_t i = 0; i < g.KH;) {
              const int64_t jb = g.KW <= 7 ? g.KW : 8;
              const bool two = jb <= 7 && i + 1 < g.KH;
              for (int64_t j0 = 0; j0 < g.KW; j0 += jb) {
#define PYDL_DW_CALL(IB, JB) \
  dw_pix_block<A, IB, JB>(xs, c.cols, CB, g.sh, g.sw, g.dh, g.dw, g.KW, i, j0, v, dys, P, g.Wo, pw)
                PYDL_DW_JB_SWITCH(two, std::min<int64_t>(jb, g.KW - j0), PYDL_DW_CALL)
#undef PYDL_DW_CALL
              }
              i += two ? 2 : 1;
            }
          }
        }
      }
      if (c.need_dx) {
        T* dxn = a.dx.template ptr<T>() + n * g.H * g.W * g.C;
        const A* wf = c.wf + blk * KK * CB;
        const int64_t creal = nreal / g.m;  // input channels of the block
        for (int64_t h0 = 0; h0 < g.H; h0 += c.bx) {
          const int64_t P = std::min(c.bx, g.H - h0);
          fill_pixels(dyn, g.Ho, g.Wo, g.Cout, h0 + g.ph - (g.KH - 1) * g.dh,
                      band_in_rows(P, 1, g.KH, g.dh), g.sh, g.pw - (g.KW - 1) * g.dw, c.colsx,
                      g.sw, CB, oc0, nreal, 1, ups);
          T* d0 = dxn + (h0 * g.W) * g.C + ic0;
          if constexpr (std::is_same_v<T, A>) {
            if (g.m == 1 && nreal == CB) {  // straight into dx
              corr_pix<A>(ups, c.colsx, CB, 1, 1, g.dh, g.dw, g.KH, g.KW, wf, d0, g.C, g.W * g.C,
                          P, g.W, 0, nullptr);
              continue;
            }
          }
          corr_pix<A>(ups, c.colsx, CB, 1, 1, g.dh, g.dw, g.KH, g.KW, wf, outx, CB, g.W * CB, P,
                      g.W, 0, nullptr);
          for (int64_t hw = 0; hw < P * g.W; ++hw) {
            T* d = d0 + hw * g.C;
            const A* s = outx + hw * CB;
            if (g.m == 1) {
              for (int64_t l = 0; l < creal; ++l) d[l] = from_acc<T>(s[l]);
            } else {
              for (int64_t l = 0; l < creal; ++l) {
                A t = 0;
                for (int64_t k = 0; k < g.m; ++k) t += s[l * g.m + k];
                d[l] = from_acc<T>(t);
              }
            }
          }
        }
      }
    }
  }
}

#define PYDL_DW_BWD_KERNELS(T, suffix)                                                           \
  PYDL_ISA_DISPATCH(bwd_nchw_##suffix,                                                          \
                    (const BwdCtx<T>& c, int64_t i0, int64_t i1, acc_t<T>* s), (c, i0, i1, s),  \
                    bwd_nchw_items<T>(c, i0, i1, s))                                            \
  PYDL_ISA_DISPATCH(bwd_nhwc_##suffix,                                                          \
                    (const BwdCtx<T>& c, int64_t i0, int64_t i1, acc_t<T>* s), (c, i0, i1, s),  \
                    bwd_nhwc_items<T>(c, i0, i1, s))                                            \
  void bwd_items(const BwdCtx<T>& c, int64_t i0, int64_t i1, acc_t<T>* s) {                      \
    if (c.a->layout == Layout::kNHWC) bwd_nhwc_##suffix(c, i0, i1, s);                           \
    else bwd_nchw_##suffix(c, i0, i1, s);                                                        \
  }

PYDL_DW_BWD_KERNELS(float, f32)
PYDL_DW_BWD_KERNELS(double, f64)
PYDL_DW_BWD_KERNELS(bf16_t, bf16)
#undef PYDL_DW_BWD_KERNELS

// Items per pass that keep the threads busy and the partials small; the batch chunking is a
// function of (N, channel items) only, so the reduction order never depends on the threads.
constexpr int64_t kTargetItems = 64;

template <typename T>
void bwd_impl(const DepthwiseConv2dBwdArgs& a, int num_threads) {
  using A = acc_t<T>;
  constexpr int VW = Vec<A>::W;
  const TensorView& img = a.dx.defined ? a.dx : a.x;
  const Geo g = geo_of(img, a.dy, a.weight, a.g);
  const int64_t KK = g.KH * g.KW;
  const bool nhwc = a.layout == Layout::kNHWC;
  const bool empty_dy = g.N == 0 || g.Ho == 0 || g.Wo == 0;
  BwdCtx<T> c{&a, g, a.dweight.defined && !empty_dy, a.dbias.defined && !empty_dy,
              a.dx.defined && a.dx.numel() > 0, 1, 1, nullptr, nullptr, nullptr, 1, 1,
              0, 0, 0, 0, 0, 0, 0, 0, PixBlocks(g, VW)};
  if (empty_dy) {  // every gradient is 0
    if (c.need_dx) std::memset(a.dx.data, 0, a.dx.numel() * dtype_size(a.dx.dtype));
    c.need_dx = false;
  }
  const PixBlocks& bl = c.blocks;
  const int64_t citems = nhwc ? bl.count : g.C;
  const bool reduce = c.need_dw || c.need_db;
  if (reduce) {
    c.nchunks = std::min(g.N, std::max<int64_t>(1, ceil_div(kTargetItems, citems)));
    c.chunk = ceil_div(g.N, c.nchunks);
    c.nchunks = ceil_div(g.N, c.chunk);
  } else {
    c.nchunks = std::max<int64_t>(g.N, 1);
    c.chunk = 1;
  }
  // Weights flipped for dx (and laid out per channel block for NHWC).
  const T* w = a.weight.ptr<const T>();
  std::vector<A> wf, pw, pb;
  int64_t scratch = 0;
  if (!nhwc) {
    c.nvec = ceil_div(g.Wo, VW);
    c.qpad = c.nvec * VW;
    c.L = c.qpad + ((g.KW - 1) * g.dw) / g.sw;
    c.nvecx = ceil_div(g.W, VW);
    c.qpadx = c.nvecx * VW;
    c.Lx = c.qpadx + (g.KW - 1) * g.dw;
    if (reduce) c.bw = band_rows(g.Ho, g.sh, g.KH, g.dh, c.need_dw ? g.sw * c.L : 0, c.qpad, sizeof(A));
    if (c.need_dx) c.bx = band_rows(g.H, 1, g.KH, g.dh, c.Lx, c.qpadx, sizeof(A));
    if (c.need_dw) scratch += band_in_rows(c.bw, g.sh, g.KH, g.dh) * g.sw * c.L;
    if (reduce) scratch += c.bw * c.qpad;
    if (c.need_dx) {
      scratch += band_in_rows(c.bx, 1, g.KH, g.dh) * c.Lx + c.bx * c.qpadx;
      wf.resize(g.Cout * KK);
      for (int64_t o = 0; o < g.Cout; ++o)
        for (int64_t k = 0; k < KK; ++k) wf[o * KK + k] = to_acc(w[o * KK + KK - 1 - k]);
    }
    if (c.need_dw) pw.assign(c.nchunks * g.Cout * KK, A(0));
    if (c.need_db) pb.assign(c.nchunks * g.Cout, A(0));
  } else {
    const int64_t CB = bl.CB;
    c.cols = (g.Wo - 1) * g.sw + (g.KW - 1) * g.dw + 1;
    c.colsx = g.W + (g.KW - 1) * g.dw;
    if (reduce) c.bw = band_rows(g.Ho, g.sh, g.KH, g.dh, c.need_dw ? c.cols * CB : 0, g.Wo * CB, sizeof(A));
    if (c.need_dx) c.bx = band_rows(g.H, 1, g.KH, g.dh, c.colsx * CB, g.W * CB, sizeof(A));
    if (c.need_dw) scratch += band_in_rows(c.bw, g.sh, g.KH, g.dh) * c.cols * CB;
    if (reduce) scratch += c.bw * g.Wo * CB;
    if (c.need_dx) {
      scratch += band_in_rows(c.bx, 1, g.KH, g.dh) * c.colsx * CB + c.bx * g.W * CB;
      wf.assign(bl.count * KK * CB, A(0));
      for (int64_t blk = 0; blk < bl.count; ++blk) {
        const int64_t oc0 = bl.out_begin(g, blk), nreal = bl.out_real(g, blk);
        for (int64_t l = 0; l < nreal; ++l)
          for (int64_t k = 0; k < KK; ++k)
            wf[(blk * KK + k) * CB + l] = to_acc(w[(oc0 + l) * KK + KK - 1 - k]);
      }
    }
    if (c.need_dw) pw.assign(c.nchunks * bl.count * KK * CB, A(0));
    if (c.need_db) pb.assign(c.nchunks * bl.count * CB, A(0));
  }
  c.wf = wf.empty() ? nullptr : wf.data();
  c.pw = pw.empty() ? nullptr : pw.data();
  c.pb = pb.empty() ? nullptr : pb.data();
  if (c.need_dx || reduce) {
    const int64_t items = citems * c.nchunks;
    const int64_t work = (a.dy.numel() * ((reduce ? 1 : 0) + (c.need_dx ? 1 : 0))) *
                         std::max<int64_t>(1, KK / 4);
    const int threads = cpu::choose_num_threads(num_threads, items, work);
    if (c.need_dx) cpu::advise_huge_pages(a.dx);
    cpu::parallel_rows(threads, items, [&](int, int64_t i0, int64_t i1) {
      Scratch<A> s;
      bwd_items(c, i0, i1, s.get(static_cast<size_t>(scratch) + VW));
    });
  }
  // Partials -> dweight (Cout, KK) / dbias (Cout,), chunks added in order.
  if (a.dweight.defined) {
    T* dwt = a.dweight.ptr<T>();
    for (int64_t o = 0; o < g.Cout; ++o) {
      for (int64_t k = 0; k < KK; ++k) {
        A t = 0;
        if (c.need_dw) {
          for (int64_t ch = 0; ch < c.nchunks; ++ch) {
            if (!nhwc) {
              t += pw[(ch * g.Cout + o) * KK + k];
            } else {
              const int64_t blk = o / (bl.cbi * g.m), l = o - blk * bl.cbi * g.m;
              t += pw[((ch * bl.count + blk) * KK + k) * bl.CB + l];
            }
          }
        }
        dwt[o * KK + k] = from_acc<T>(t);
      }
    }
  }
  if (a.dbias.defined) {
    T* dbt = a.dbias.ptr<T>();
    for (int64_t o = 0; o < g.Cout; ++o) {
      A t = 0;
      if (c.need_db) {
        for (int64_t ch = 0; ch < c.nchunks; ++ch) {
          if (!nhwc) {
            t += pb[ch * g.Cout + o];
          } else {
            const int64_t blk = o / (bl.cbi * g.m), l = o - blk * bl.cbi * g.m;
            t += pb[(ch * bl.count + blk) * bl.CB + l];
          }
        }
      }
      dbt[o] = from_acc<T>(t);
    }
  }
}

}  // namespace

void depthwise_conv2d_bwd_cpu(const DepthwiseConv2dBwdArgs& a, int num_threads) {
  static constexpr const char* kOp = "depthwise_conv2d_bwd_cpu";
  validate_depthwise_conv2d_bwd(a, kOp);
  require_cpu_dtype(a.dy.dtype, kOp);
  PYDL_DISPATCH_FLOATING(a.dy.dtype, kOp, [&] { bwd_impl<scalar_t>(a, num_threads); });
}

}  // namespace pydl
