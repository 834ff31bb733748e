// CPU forward of the depthwise 2-D convolution (contract: include/pydl/depthwise_conv2d.h; the
// building blocks and the scratch layouts: depthwise_conv2d_common.h; backward:
// depthwise_conv2d_bwd.cpp).
//
// NCHW: work items are the N*Cout output planes (OpenMP, static split). Per plane, bands of output
//   rows (the whole plane when its scratch fits in L2): the band's input rows are copied, zero-
//   padded and widened to float, into scratch[row][phase][col]; then each pair of output rows x
//   4 vectors of columns keeps 8 accumulators in registers and runs the KH*KW taps (one weight
//   broadcast per tap for all 8, one unaligned load + FMA per accumulator; narrower column blocks
//   take more rows at a time); bias is the
//   accumulators' start. float32 rows of whole vectors are written straight into y; others are
//   computed over whole vectors into a float buffer and the valid columns stored (rounded for
//   bfloat16).
// NHWC (channels_last): work items are (n, band of output rows, block of CB output channels);
//   the band's input pixels of the block are copied, padded, widened (and repeated m times for a
//   multiplier m > 1) into scratch[row][col][lane]; per output row, 8 consecutive pixels x one
//   vector of channels accumulate in registers, with one weight-vector load per tap for all 8.
//   float32 blocks of a full CB write y directly; others go through a float buffer.
#include <algorithm>
#include <vector>

#include "depthwise_conv2d_common.h"

namespace pydl {
namespace {

using namespace dwconv;

template <typename T>
struct FwdCtx {
  using A = acc_t<T>;
  const DepthwiseConv2dFwdArgs* a;
  Geo g;
  const A* w;  // NCHW: (Cout, KH*KW); NHWC: (blocks, KH*KW, CB)
  const A* b;  // NCHW: (Cout,); NHWC: (blocks, CB); nullptr without bias
  int64_t bh;  // output rows per band
  // NCHW
  int64_t nvec, qpad, L;
  // NHWC
  int64_t cols, nbands;
  PixBlocks blocks;
};

template <typename T>
PYDL_INLINE void fwd_nchw_items(const FwdCtx<T>& c, int64_t i0, int64_t i1, acc_t<T>* scratch) {
  using A = acc_t<T>;
  const Geo& g = c.g;
  const int64_t KK = g.KH * g.KW, rs = g.sw * c.L;
  int64_t joff[kDepthwiseMaxKernel];
  for (int64_t j = 0; j < g.KW; ++j) joff[j] = ((j * g.dw) % g.sw) * c.L + (j * g.dw) / g.sw;
  A* xs = scratch;
  A* out = xs + band_in_rows(c.bh, g.sh, g.KH, g.dh) * rs;
  const T* x = c.a->x.template ptr<const T>();
  T* y = c.a->y.template ptr<T>();
  for (int64_t item = i0; item < i1; ++item) {
    const int64_t n = item / g.Cout, o = item % g.Cout, ci = o / g.m;
    const T* src = x + (n * g.C + ci) * g.H * g.W;
    T* dst = y + item * g.Ho * g.Wo;
    for (int64_t p0 = 0; p0 < g.Ho; p0 += c.bh) {
      const int64_t P = std::min(c.bh, g.Ho - p0);
      fill_plane(src, g.H, g.W, p0 * g.sh - g.ph, band_in_rows(P, g.sh, g.KH, g.dh), 1, -g.pw, 1,
                 g.sw, c.L, xs);
      if constexpr (std::is_same_v<T, A>) {
        if (c.qpad == g.Wo) {  // whole vectors: straight into y
          corr_plane<A>(xs, rs, g.sh, g.dh, g.KH, g.KW, joff, c.w + o * KK, dst + p0 * g.Wo, g.Wo,
                        P, c.nvec, c.b ? 2 : 0, c.b ? c.b[o] : A(0));
          continue;
        }
      }
      corr_plane<A>(xs, rs, g.sh, g.dh, g.KH, g.KW, joff, c.w + o * KK, out, c.qpad, P, c.nvec,
                    c.b ? 2 : 0, c.b ? c.b[o] : A(0));
      for (int64_t p = 0; p < P; ++p) {
        T* d = dst + (p0 + p) * g.Wo;
        const A* s = out + p * c.qpad;
#pragma omp simd
        for (int64_t q = 0; q < g.Wo; ++q) d[q] = from_acc<T>(s[q]);
      }
    }
  }
}

template <typename T>
PYDL_INLINE void fwd_nhwc_items(const FwdCtx<T>& c, int64_t i0, int64_t i1, acc_t<T>* scratch) {
  using A = acc_t<T>;
  const Geo& g = c.g;
  const PixBlocks& bl = c.blocks;
  const int64_t KK = g.KH * g.KW, CB = bl.CB;
  A* xs = scratch;
  A* buf = xs + band_in_rows(c.bh, g.sh, g.KH, g.dh) * c.cols * CB;
  const T* x = c.a->x.template ptr<const T>();
  T* y = c.a->y.template ptr<T>();
  for (int64_t item = i0; item < i1; ++item) {
    const int64_t blk = item % bl.count, band = (item / bl.count) % c.nbands;
    const int64_t n = item / (bl.count * c.nbands);
    const int64_t p0 = band * c.bh, P = std::min(c.bh, g.Ho - p0);
    const int64_t oc0 = bl.out_begin(g, blk), nreal = bl.out_real(g, blk);
    fill_pixels(x + n * g.H * g.W * g.C, g.H, g.W, g.C, p0 * g.sh - g.ph,
                band_in_rows(P, g.sh, g.KH, g.dh), 1, -g.pw, c.cols, 1, CB, blk * bl.cbi, nreal,
                g.m, xs);
    T* ydst = y + ((n * g.Ho + p0) * g.Wo) * g.Cout + oc0;
    const A* wt = c.w + blk * KK * CB;
    const A* bt = c.b ? c.b + blk * CB : nullptr;
    if constexpr (std::is_same_v<T, A>) {
      if (nreal == CB) {  // straight into y
        corr_pix<A>(xs, c.cols, CB, g.sh, g.sw, g.dh, g.dw, g.KH, g.KW, wt, ydst, g.Cout,
                    g.Wo * g.Cout, P, g.Wo, bt ? 2 : 0, bt);
        continue;
      }
    }
    corr_pix<A>(xs, c.cols, CB, g.sh, g.sw, g.dh, g.dw, g.KH, g.KW, wt, buf, CB, g.Wo * CB, P,
                g.Wo, bt ? 2 : 0, bt);
    for (int64_t pq = 0; pq < P * g.Wo; ++pq) {
      T* d = ydst + pq * g.Cout;
      const A* s = buf + pq * CB;
      for (int64_t l = 0; l < nreal; ++l) d[l] = from_acc<T>(s[l]);
    }
  }
}

#define PYDL_DW_FWD_KERNELS(T, suffix)                                                           \
  PYDL_ISA_DISPATCH(fwd_nchw_##suffix,                                                          \
                    (const FwdCtx<T>& c, int64_t i0, int64_t i1, acc_t<T>* s), (c, i0, i1, s),  \
                    fwd_nchw_items<T>(c, i0, i1, s))                                            \
  PYDL_ISA_DISPATCH(fwd_nhwc_##suffix,                                                          \
                    (const FwdCtx<T>& c, int64_t i0, int64_t i1, acc_t<T>* s), (c, i0, i1, s),  \
                    fwd_nhwc_items<T>(c, i0, i1, s))                                            \
  void fwd_items(const FwdCtx<T>& c, int64_t i0, int64_t i1, acc_t<T>* s) {                      \
    if (c.a->layout == Layout::kNHWC) fwd_nhwc_##suffix(c, i0, i1, s);                           \
    else fwd_nchw_##suffix(c, i0, i1, s);                                                        \
  }

PYDL_DW_FWD_KERNELS(float, f32)
PYDL_DW_FWD_KERNELS(double, f64)
PYDL_DW_FWD_KERNELS(bf16_t, bf16)
#undef PYDL_DW_FWD_KERNELS

template <typename T>
void fwd_impl(const DepthwiseConv2dFwdArgs& a, int num_threads) {
  using A = acc_t<T>;
  constexpr int VW = Vec<A>::W;
  const Geo g = geo_of(a.x, a.y, a.weight, a.g);
  if (g.N == 0 || g.Ho == 0 || g.Wo == 0) return;
  const int64_t KK = g.KH * g.KW;
  const T* w = a.weight.ptr<const T>();
  const T* b = a.bias.defined ? a.bias.ptr<const T>() : nullptr;
  FwdCtx<T> c{&a, g, nullptr, nullptr, 1, 0, 0, 0, 0, 0, PixBlocks(g, VW)};
  std::vector<A> wbuf, bbuf;
  int64_t items, scratch;
  if (a.layout == Layout::kNCHW) {
    c.nvec = ceil_div(g.Wo, VW);
    c.qpad = c.nvec * VW;
    c.L = c.qpad + ((g.KW - 1) * g.dw) / g.sw;
    c.bh = band_rows(g.Ho, g.sh, g.KH, g.dh, g.sw * c.L, c.qpad, sizeof(A));
    wbuf.resize(g.Cout * KK);
    for (int64_t k = 0; k < g.Cout * KK; ++k) wbuf[k] = to_acc(w[k]);
    if (b) {
      bbuf.resize(g.Cout);
      for (int64_t o = 0; o < g.Cout; ++o) bbuf[o] = to_acc(b[o]);
    }
    items = g.N * g.Cout;
    scratch = band_in_rows(c.bh, g.sh, g.KH, g.dh) * g.sw * c.L + c.bh * c.qpad;
  } else {
    const PixBlocks& bl = c.blocks;
    c.cols = (g.Wo - 1) * g.sw + (g.KW - 1) * g.dw + 1;
    c.bh = band_rows(g.Ho, g.sh, g.KH, g.dh, c.cols * bl.CB, g.Wo * bl.CB, sizeof(A));
    c.nbands = ceil_div(g.Ho, c.bh);
    wbuf.assign(bl.count * KK * bl.CB, A(0));
    if (b) bbuf.assign(bl.count * bl.CB, A(0));
    for (int64_t blk = 0; blk < bl.count; ++blk) {
      const int64_t oc0 = bl.out_begin(g, blk), nreal = bl.out_real(g, blk);
      for (int64_t l = 0; l < nreal; ++l) {
        for (int64_t k = 0; k < KK; ++k) wbuf[(blk * KK + k) * bl.CB + l] = to_acc(w[(oc0 + l) * KK + k]);
        if (b) bbuf[blk * bl.CB + l] = to_acc(b[oc0 + l]);
      }
    }
    items = g.N * c.nbands * bl.count;
    scratch = band_in_rows(c.bh, g.sh, g.KH, g.dh) * c.cols * bl.CB + c.bh * g.Wo * bl.CB;
  }
  c.w = wbuf.data();
  c.b = b ? bbuf.data() : nullptr;
  const int64_t work = a.y.numel() * std::max<int64_t>(1, KK / 4);
  const int threads = cpu::choose_num_threads(num_threads, items, work);
  cpu::advise_huge_pages(a.y);
  cpu::parallel_rows(threads, items, [&](int, int64_t i0, int64_t i1) {
    Scratch<A> s;
    fwd_items(c, i0, i1, s.get(static_cast<size_t>(scratch) + VW));
  });
}

}  // namespace

void depthwise_conv2d_fwd_cpu(const DepthwiseConv2dFwdArgs& a, int num_threads) {
  static constexpr const char* kOp = "depthwise_conv2d_fwd_cpu";
  validate_depthwise_conv2d_fwd(a, kOp);
  require_cpu_dtype(a.x.dtype, kOp);
  PYDL_DISPATCH_FLOATING(a.x.dtype, kOp, [&] { fwd_impl<scalar_t>(a, num_threads); });
}

}  // namespace pydl
