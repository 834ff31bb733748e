// CUDA depthwise conv2d backward (contract: include/pydl/depthwise_conv2d.h).
//
// dx: a gather, no atomics: run_conv_pass (depthwise_conv2d_fwd.cu) with in = dy, out = dx, the
//   m output channels of each input channel summed (R = m), the filter flipped and
//   off = pad - (K - 1) * dil. Stride 1 (down = 1) is a correlation with the flipped filter and
//   takes the fast forward kernels (channels_last vectorized when m = 1; NCHW tiled); stride > 1
//   takes the direct kernel (taps whose (h + pad - i * dil) is not a multiple of the stride skip).
//
// dweight / dbias, deterministic in two launches:
//   dw_wgrad_partial<T, VEC, TK>: block (channel chunk, tap segment, pixel slice). The N * Ho
//     output rows are cut into NS slices (NS from the shapes and the SM count only: about
//     2 * 8 * SMs blocks, each slice >= 2048 output pixels, NS <= 1024 and the workspace <= 16M
//     floats). A thread owns VEC adjacent output channels (channels_last: VEC = 16 bytes when
//     m = 1, C a multiple of VEC and dy / x 16-byte aligned, else 1; NCHW: 1) and the TK taps of
//     its segment (TK * VEC = 32 fp32 accumulators; TK = 8 for VEC = 1), plus the bias sum;
//     it walks the slice's pixels with a stride of G pixel groups:
//       channels_last: tc channel vectors (adjacent threads: adjacent channels, coalesced) x G;
//       NCHW: one channel per block, G = 256 (adjacent threads: adjacent columns, coalesced).
//     The G groups are then summed per (tap, channel) in shared memory in a fixed order (parts of
//     every P-th group, then the P parts; 3 barriers) and written to ws[(slice * Cout + o) * (T + 1) + tap] (tap T: the bias). T = KH * KW when
//     dweight is requested, else 0 (x is then never read).
//   dw_wgrad_reduce<T>: one thread per (o, tap): the NS partials summed in slice order, written
//     once in the tensor dtype. No float atomics anywhere: bitwise reproducible.
#include "depthwise_conv2d_common.cuh"  // first: it includes cuda_utils.cuh

#include <string>

namespace pydl {
namespace {

using cuda::ceil_div;
using cuda::from_float;
using cuda::to_float;
using dwconv::fdiv;
using dwconv::kThreads;

constexpr int64_t kMinSlicePixels = 2048;  // output pixels per slice at least
constexpr int64_t kMaxSlices = 1024;
constexpr int64_t kMaxWorkspaceFloats = int64_t{1} << 24;
constexpr int kMaxWgradTc = 32;  // channel vectors per block (G >= 8 pixel groups)

struct WgradParams {
  const void* dy;
  const void* x;
  float* ws;
  int64_t N, C, H, W, Cout, Ho, Wo, m;
  int KH, KW, Tw;  // Tw: taps computed (KH * KW, or 0 when dweight is not requested)
  int want_b;
  int64_t sh, sw, ph, pw, dh, dw;
  int64_t x_sn, x_sc, x_sh, x_sw, d_sn, d_sc, d_sh, d_sw;  // strides (dense layouts)
  int tc, G;        // channel vectors x pixel groups per block
  int nseg;         // tap segments
  int64_t ncb, NS;  // channel chunks, pixel slices
  int64_t rows;     // N * Ho
  int64_t base, extra;  // rows / NS, rows % NS
  dwconv::FastDiv f_m, f_ho, f_wo, f_ncb, f_nseg;
};

constexpr int kFar = -(1 << 30);  // an offset that puts any pixel outside the image

__device__ __forceinline__ int clamp_offset(int64_t v) {
  return static_cast<int>(v < kFar ? kFar : v > (1 << 30) ? (1 << 30) : v);
}

template <typename T, int VEC, int TK>
__global__ void __launch_bounds__(kThreads, 2) dw_wgrad_partial(const WgradParams p) {
  float* red = cuda::dynamic_smem<float>();  // [G][(TK + 1) * tc * VEC], then [P][...]
  const int tid = static_cast<int>(threadIdx.x);
  const int lc = tid % p.tc, g = tid / p.tc;
  const int tcv = p.tc * VEC;
  const bool active = g < p.G;
  const T* dy = static_cast<const T*>(p.dy);
  const T* x = static_cast<const T*>(p.x);
  const int64_t blocks = p.ncb * p.nseg * p.NS;

  for (int64_t blk = blockIdx.x; blk < blocks; blk += gridDim.x) {
    const int64_t rest = fdiv(blk, p.f_ncb), cb = blk - rest * p.ncb;
    const int64_t s = fdiv(rest, p.f_nseg);
    const int seg = static_cast<int>(rest - s * p.nseg);
    const int64_t o0 = cb * tcv + static_cast<int64_t>(lc) * VEC;
    const bool cok = active && o0 < p.Cout;
    const int64_t ci = fdiv(o0, p.f_m);
    // The segment's taps as input offsets: row hb + di[t], column wb + dj[t] (int32, clamped: an
    // offset that large is outside the image anyway; a tap past Tw gets one that always is).
    int di[TK], dj[TK];
#pragma unroll
    for (int t = 0; t < TK; ++t) {
      const int k = seg * TK + t;
      const int i = k / p.KW, j = k - i * p.KW;
      di[t] = k < p.Tw ? clamp_offset(i * p.dh - p.ph) : kFar;
      dj[t] = clamp_offset(j * p.dw - p.pw);
    }
    float acc[TK][VEC], accb[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      accb[k] = 0.0f;
#pragma unroll
      for (int t = 0; t < TK; ++t) acc[t][k] = 0.0f;
    }
    // slice s: rows [s * base + min(s, extra), ...) with base = rows / NS, extra = rows % NS
    const int64_t r0 = s * p.base + (s < p.extra ? s : p.extra);
    const int64_t r1 = r0 + p.base + (s < p.extra ? 1 : 0);
    if (cok && r1 > r0) {
      const int64_t g_rows = fdiv(g, p.f_wo);
      int64_t row = r0 + g_rows, q = g - g_rows * p.Wo;
      int64_t cur = -1, n = 0, ho = 0;
      const T* dyb = dy;
      const T* xb = x;
      while (row < r1) {
        if (row != cur) {
          cur = row;
          n = fdiv(row, p.f_ho);
          ho = row - n * p.Ho;
          dyb = dy + n * p.d_sn + o0 * p.d_sc + ho * p.d_sh;
          if (x != nullptr) xb = x + n * p.x_sn + ci * p.x_sc;
        }
        float dv[VEC];
        cuda::load_floats<T, VEC>(dyb + q * p.d_sw, dv);
#pragma unroll
        for (int k = 0; k < VEC; ++k) accb[k] += dv[k];
        const int64_t hb = ho * p.sh, wb = q * p.sw;
#pragma unroll
        for (int t = 0; t < TK; ++t) {
          const int64_t hi = hb + di[t], wi = wb + dj[t];
          if (hi >= 0 && hi < p.H && wi >= 0 && wi < p.W) {
            float xv[VEC];
            cuda::load_floats<T, VEC>(xb + hi * p.x_sh + wi * p.x_sw, xv);
#pragma unroll
            for (int k = 0; k < VEC; ++k) acc[t][k] = fmaf(dv[k], xv[k], acc[t][k]);
          }
        }
        q += p.G;
        if (q >= p.Wo) {
          const int64_t wrap = fdiv(q, p.f_wo);
          row += wrap;
          q -= wrap * p.Wo;
        }
      }
    }
    // Sum the G groups per column (tap t <= TK (TK: the bias), channel): every thread stores its
    // columns, then parts of P groups each are summed (group order), then the P parts (in order).
    const int NC = (TK + 1) * tcv;
    const int P = kThreads / NC > 1 ? kThreads / NC : 1;
    float* part = red + p.G * NC;
    __syncthreads();  // the previous block's sums are read
    if (active) {
#pragma unroll
      for (int t = 0; t <= TK; ++t)
#pragma unroll
        for (int e = 0; e < VEC; ++e) red[g * NC + t * tcv + lc * VEC + e] = t < TK ? acc[t < TK ? t : 0][e] : accb[e];
    }
    __syncthreads();
    for (int idx = tid; idx < NC * P; idx += static_cast<int>(blockDim.x)) {
      const int u = idx / NC, col = idx - u * NC;
      float sum = 0.0f;
      for (int gg = u; gg < p.G; gg += P) sum += red[gg * NC + col];
      part[u * NC + col] = sum;
    }
    __syncthreads();
    float* wsrow = p.ws + (s * p.Cout) * (p.Tw + 1);
    for (int col = tid; col < NC; col += static_cast<int>(blockDim.x)) {
      const int t = col / tcv, ch = col - t * tcv;
      const int64_t o = cb * tcv + ch;
      const int k = t < TK ? seg * TK + t : p.Tw;  // tap, or the bias slot
      const bool want = t < TK ? k < p.Tw : (p.want_b && seg == 0);
      if (!want || o >= p.Cout) continue;
      float sum = 0.0f;
      for (int u = 0; u < P; ++u) sum += part[u * NC + col];
      wsrow[o * (p.Tw + 1) + k] = sum;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) dw_wgrad_reduce(const float* __restrict__ ws,
                                                            T* __restrict__ dweight,
                                                            T* __restrict__ dbias, int64_t Cout,
                                                            int Tw, int64_t NS,
                                                            const dwconv::FastDiv f_per) {
  const int64_t per = Tw + 1, total = Cout * per;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += step) {
    const int64_t o = fdiv(e, f_per);
    const int k = static_cast<int>(e - o * per);
    T* dst = k < Tw ? (dweight != nullptr ? dweight + o * Tw + k : nullptr)
                    : (dbias != nullptr ? dbias + o : nullptr);
    if (dst == nullptr) continue;
    float sum = 0.0f;
    for (int64_t s = 0; s < NS; ++s) sum += ws[s * total + e];
    *dst = from_float<T>(sum);
  }
}

// ---- host side ----------------------------------------------------------------------------------

struct Wshape {
  int64_t Cout, rows, Wo;
  int Tw;
};

Wshape wgrad_shape(const DepthwiseConv2dBwdArgs& a) {
  const int64_t KT = a.weight.sizes[1] * a.weight.sizes[2];
  return Wshape{a.dy.sizes[1], a.dy.sizes[0] * a.dy.sizes[2], a.dy.sizes[3],
                a.dweight.defined ? static_cast<int>(KT) : 0};
}

// Pixel slices: a function of the shapes, the layout and the SM count only (not of the dtype or
// the pointers), so that the workspace size is known before the data.
int64_t choose_slices(const Wshape& w, Layout layout) {
  const int64_t segs = ceil_div(std::max(w.Tw, 1), 16);
  const int64_t units = (layout == Layout::kNHWC ? ceil_div(w.Cout, 256) : w.Cout) * segs;
  int64_t ns = ceil_div(2 * dwconv::target_blocks(), units);
  ns = std::min(ns, std::max<int64_t>(1, w.rows * w.Wo / kMinSlicePixels));
  ns = std::min(ns, kMaxSlices);
  ns = std::min(ns, std::max<int64_t>(1, kMaxWorkspaceFloats / (w.Cout * (w.Tw + 1))));
  ns = std::min(ns, std::max<int64_t>(w.rows, 1));
  return std::max<int64_t>(ns, 1);
}

template <typename T, int VEC>
void launch_wgrad(WgradParams p, cudaStream_t stream, const char* op) {
  constexpr int TK = VEC == 1 ? 8 : 32 / VEC;
  p.nseg = p.Tw > 0 ? static_cast<int>(ceil_div(p.Tw, TK)) : 1;
  p.f_nseg = dwconv::FastDiv(p.nseg);
  const int64_t blocks = p.ncb * p.nseg * p.NS;
  const int64_t grid = std::min<int64_t>(blocks, 64 * dwconv::target_blocks());
  const int nc = (TK + 1) * p.tc * VEC;
  const size_t smem = (static_cast<size_t>(p.G) + std::max(1, kThreads / nc)) * nc * sizeof(float);
  cuda::launch(dw_wgrad_partial<T, VEC, TK>, grid, kThreads, smem, stream, op, p);
}

void set_strides(const TensorView& t, Layout layout, int64_t& sn, int64_t& sc, int64_t& sh, int64_t& sw) {
  const int64_t C = t.sizes[1], H = t.sizes[2], W = t.sizes[3];
  sn = C * H * W;
  sc = layout == Layout::kNHWC ? 1 : H * W;
  sh = layout == Layout::kNHWC ? W * C : W;
  sw = layout == Layout::kNHWC ? C : 1;
}

}  // namespace

int64_t depthwise_conv2d_bwd_cuda_workspace_floats(const DepthwiseConv2dBwdArgs& a) {
  if (!a.dweight.defined && !a.dbias.defined) return 0;
  const Wshape w = wgrad_shape(a);
  return choose_slices(w, a.layout) * w.Cout * (w.Tw + 1);
}

void depthwise_conv2d_bwd_cuda(const DepthwiseConv2dBwdArgs& a, void* workspace, void* stream_ptr) {
  const char* op = "depthwise_conv2d_bwd_cuda";
  validate_depthwise_conv2d_bwd(a, op);
  cuda::require_cuda_dtype(a.dy.dtype, op);
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  const DType dt = a.dy.dtype;
  const TensorView& img = a.dx.defined ? a.dx : a.x;
  const int64_t N = a.dy.sizes[0], Cout = a.dy.sizes[1], Ho = a.dy.sizes[2], Wo = a.dy.sizes[3];
  const int64_t C = img.sizes[1], H = img.sizes[2], W = img.sizes[3], m = Cout / C;
  const int KH = static_cast<int>(a.weight.sizes[1]), KW = static_cast<int>(a.weight.sizes[2]);

  if (a.dx.defined) {
    dwconv::ConvPass p;
    p.in = a.dy.data;
    p.wt = a.weight.data;
    p.out = a.dx.data;
    p.N = N;
    p.Cin = Cout;
    p.Hi = Ho;
    p.Wi = Wo;
    p.Cout = C;
    p.Ho = H;
    p.Wo = W;
    p.KH = KH;
    p.KW = KW;
    p.up_h = p.up_w = 1;
    p.down_h = a.g.stride_h;
    p.down_w = a.g.stride_w;
    p.dil_h = a.g.dil_h;
    p.dil_w = a.g.dil_w;
    p.off_h = a.g.pad_h - (KH - 1) * a.g.dil_h;
    p.off_w = a.g.pad_w - (KW - 1) * a.g.dil_w;
    p.flip = 1;
    p.R = static_cast<int>(m);
    p.D = 1;
    p.layout = a.layout;
    dwconv::run_conv_pass(p, dt, stream, op);
  }

  if (!a.dweight.defined && !a.dbias.defined) return;
  const Wshape w = wgrad_shape(a);
  const int64_t NS = choose_slices(w, a.layout);
  PYDL_CHECK(workspace != nullptr, op, ": a workspace of ", NS * w.Cout * (w.Tw + 1),
             " floats is required (depthwise_conv2d_bwd_cuda_workspace_floats)");
  WgradParams p{};
  p.dy = a.dy.data;
  p.x = a.dweight.defined ? a.x.data : nullptr;
  p.ws = static_cast<float*>(workspace);
  p.N = N;
  p.C = C;
  p.H = H;
  p.W = W;
  p.Cout = Cout;
  p.Ho = Ho;
  p.Wo = Wo;
  p.m = m;
  p.KH = KH;
  p.KW = KW;
  p.Tw = w.Tw;
  p.want_b = a.dbias.defined ? 1 : 0;
  p.sh = a.g.stride_h;
  p.sw = a.g.stride_w;
  p.ph = a.g.pad_h;
  p.pw = a.g.pad_w;
  p.dh = a.g.dil_h;
  p.dw = a.g.dil_w;
  set_strides(a.dy, a.layout, p.d_sn, p.d_sc, p.d_sh, p.d_sw);
  if (a.dweight.defined) {
    set_strides(a.x, a.layout, p.x_sn, p.x_sc, p.x_sh, p.x_sw);
  } else {  // never read; the strides of an image of dx's shape
    const int64_t HW = H * W;
    p.x_sn = C * HW;
    p.x_sc = a.layout == Layout::kNHWC ? 1 : HW;
    p.x_sh = a.layout == Layout::kNHWC ? W * C : W;
    p.x_sw = a.layout == Layout::kNHWC ? C : 1;
  }
  p.NS = NS;
  p.rows = w.rows;
  p.base = w.rows / NS;
  p.extra = w.rows % NS;
  PYDL_CHECK(N * Cout * Ho * Wo < dwconv::kMaxIndex && N * C * H * W < dwconv::kMaxIndex, op,
             ": tensors too large for the CUDA kernel");
  p.f_m = dwconv::FastDiv(m);
  p.f_ho = dwconv::FastDiv(Ho);
  p.f_wo = dwconv::FastDiv(Wo);

  cuda::dispatch_cuda_dtype(dt, op, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = cuda::kVec16<T>;
    const bool nhwc = a.layout == Layout::kNHWC;
    const bool vec = nhwc && m == 1 && C % kVec == 0 && cuda::aligned16(a.dy) &&
                     (!a.dweight.defined || cuda::aligned16(a.x));
    const int VEC = vec ? kVec : 1;
    if (nhwc) {
      const int64_t cv = ceil_div(Cout, VEC);
      p.ncb = ceil_div(cv, kMaxWgradTc);
      p.tc = static_cast<int>(ceil_div(cv, p.ncb));
    } else {
      p.ncb = Cout;
      p.tc = 1;
    }
    p.G = kThreads / p.tc;
    p.f_ncb = dwconv::FastDiv(p.ncb);
    if (vec) {
      launch_wgrad<T, kVec>(p, stream, op);
    } else {
      launch_wgrad<T, 1>(p, stream, op);
    }
    const int64_t total = w.Cout * (w.Tw + 1);
    const int64_t grid = std::min<int64_t>(ceil_div(total, kThreads), 8 * dwconv::target_blocks());
    cuda::launch(dw_wgrad_reduce<T>, grid, kThreads, 0, stream, op, static_cast<const float*>(p.ws),
                 a.dweight.defined ? static_cast<T*>(a.dweight.data) : static_cast<T*>(nullptr),
                 a.dbias.defined ? static_cast<T*>(a.dbias.data) : static_cast<T*>(nullptr), w.Cout,
                 w.Tw, NS, dwconv::FastDiv(w.Tw + 1));
  });
}

}  // namespace pydl
