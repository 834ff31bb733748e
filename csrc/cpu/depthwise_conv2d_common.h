// Building blocks shared by the depthwise-conv CPU kernels (depthwise_conv2d.cpp: forward,
// depthwise_conv2d_bwd.cpp: backward). Contract: include/pydl/depthwise_conv2d.h.
//
// Every pass works on zero-padded float (double for float64) copies of bands of rows, built in a
// per-thread scratch that stays in L1/L2: the padding, the bfloat16 widening, the column phases of
// a horizontal stride and the zero-upsampling of a strided dy (for dx) are all done once, in the
// copy, so the inner loops have no bounds checks and one code path for every dtype.
//   NCHW:  scratch[row][phase][col] of one channel plane; vectors run along the output columns
//          (a horizontal stride sw splits each row into sw phases, so output q and kernel column
//          j read phase (j*dw) % sw at column q + (j*dw) / sw: contiguous).
//   NHWC:  scratch[row][col][lane] of a block of CB output channels; vectors run along the
//          channels (a multiplier m > 1 repeats input channel c in lanes c*m .. c*m + m - 1).
// Inner loops use GCC vector types (32 bytes); always_inline, so each ISA level's caller
// (PYDL_ISA_DISPATCH) compiles them for its own instructions.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_utils.h"
#include "pydl/depthwise_conv2d.h"

namespace pydl {
namespace dwconv {

using cpu::acc_t;
using cpu::from_acc;
using cpu::to_acc;

using cpu::Vec;

// Per-thread scratch, kept across calls (OpenMP's threads persist), so a call neither allocates
// nor zeroes nor page-faults it: every pass writes each scratch element before reading it.
// Requests over kKeepScratchBytes (very wide images) get a buffer of their own instead.
constexpr size_t kKeepScratchBytes = size_t{4} << 20;

template <typename A>
struct Scratch {
  std::vector<A> own;
  A* get(size_t n) {
    if (n * sizeof(A) > kKeepScratchBytes) {
      own.resize(n);
      return own.data();
    }
    static thread_local std::vector<A> kept;
    if (kept.size() < n) kept.resize(n);
    return kept.data();
  }
};

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Problem sizes, from the validated views.
struct Geo {
  int64_t N, C, H, W, Cout, m, KH, KW, Ho, Wo, sh, sw, ph, pw, dh, dw;
};

// Per-thread scratch budget (elements of A are sized from it): a band of rows fits in L2.
constexpr int64_t kScratchBytes = 256 << 10;

// ---- NCHW ---------------------------------------------------------------------------------------

// dst[r][s][l] (r < rows, s < phases, l < L) = v(R0 + r, C0 + l*phases + s), where the virtual
// image v(R, Q) = src[R/uh][Q/uw] when R, Q >= 0, R % uh == Q % uw == 0 and R/uh < H, Q/uw < W,
// else 0 (uh = uw = 1: plain zero padding; > 1: dy zero-upsampled by the stride, for dx).
template <typename T, typename A>
PYDL_INLINE void fill_plane(const T* src, int64_t H, int64_t W, int64_t R0, int64_t rows,
                            int64_t uh, int64_t C0, int64_t uw, int64_t phases, int64_t L,
                            A* dst) {
  const int64_t rs = phases * L;
  for (int64_t r = 0; r < rows; ++r) {
    A* d = dst + r * rs;
    const int64_t R = R0 + r;
    if (R < 0 || R % uh != 0 || R / uh >= H) {
      std::fill(d, d + rs, A(0));
      continue;
    }
    const T* s = src + (R / uh) * W;
    if (phases == 1 && uw == 1) {
      const int64_t lo = std::min(L, std::max<int64_t>(0, -C0));
      const int64_t hi = std::max(lo, std::min(L, W - C0));
      std::fill(d, d + lo, A(0));
      const T* sp = s + C0;
#pragma omp simd
      for (int64_t l = lo; l < hi; ++l) d[l] = to_acc(sp[l]);
      std::fill(d + hi, d + L, A(0));
    } else {
      for (int64_t ph = 0; ph < phases; ++ph) {
        A* dp = d + ph * L;
        for (int64_t l = 0; l < L; ++l) {
          const int64_t Q = C0 + l * phases + ph;
          dp[l] = (Q >= 0 && Q % uw == 0 && Q / uw < W) ? to_acc(s[Q / uw]) : A(0);
        }
      }
    }
  }
}

// out[p][q] (+)= sum_{i<KH, j<KW} w[i*KW + j] * xs[(p*sh + i*dh)*rs + joff[j] + q], for the R
// rows p0.. and U vectors of columns from q0. init: 0 zero, 1 accumulate into out, 2 start at b.
template <typename A, int R, int U>
PYDL_INLINE void corr_plane_block(const A* xs, int64_t rs, int64_t sh, int64_t dh, int64_t KH,
                                  int64_t KW, const int64_t* joff, const A* w, A* out, int64_t os,
                                  int64_t p0, int64_t q0, int init, A b) {
  using VT = Vec<A>;
  using V = typename VT::V;
  constexpr int W = VT::W;
  V acc[R][U];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < U; ++u)
      acc[r][u] = init == 1 ? VT::load(out + (p0 + r) * os + q0 + u * W) : VT::splat(init == 2 ? b : A(0));
  for (int64_t i = 0; i < KH; ++i) {
    const A* xr[R];
    for (int r = 0; r < R; ++r) xr[r] = xs + ((p0 + r) * sh + i * dh) * rs + q0;
    const A* wi = w + i * KW;
    for (int64_t j = 0; j < KW; ++j) {
      const V wv = VT::splat(wi[j]);
      const int64_t o = joff[j];
      for (int r = 0; r < R; ++r)
        for (int u = 0; u < U; ++u) acc[r][u] += wv * VT::load(xr[r] + o + u * W);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < U; ++u) VT::store(out + (p0 + r) * os + q0 + u * W, acc[r][u]);
}

// Rows p < P of the U column vectors from q0: R rows at a time, the last rows one by one.
template <typename A, int U, int R>
PYDL_INLINE void corr_plane_cols(const A* xs, int64_t rs, int64_t sh, int64_t dh, int64_t KH,
                                 int64_t KW, const int64_t* joff, const A* w, A* out, int64_t os,
                                 int64_t P, int64_t q0, int init, A b) {
  int64_t p = 0;
  for (; p + R <= P; p += R)
    corr_plane_block<A, R, U>(xs, rs, sh, dh, KH, KW, joff, w, out, os, p, q0, init, b);
  for (; p < P; ++p) corr_plane_block<A, 1, U>(xs, rs, sh, dh, KH, KW, joff, w, out, os, p, q0, init, b);
}

// out[p][q] for p < P and q < nvec * W (see corr_plane_block). Column blocks of 4 vectors (the
// last one 1..3), each with as many rows at a time (2, 3, 4, 8) as give 8+ accumulators: enough
// independent FMA chains to hide the FMA latency; one weight broadcast serves them all.
template <typename A>
PYDL_INLINE void corr_plane(const A* xs, int64_t rs, int64_t sh, int64_t dh, int64_t KH,
                            int64_t KW, const int64_t* joff, const A* w, A* out, int64_t os,
                            int64_t P, int64_t nvec, int init, A b) {
  constexpr int W = Vec<A>::W;
  int64_t v = 0;
  for (; v + 4 <= nvec; v += 4)
    corr_plane_cols<A, 4, 2>(xs, rs, sh, dh, KH, KW, joff, w, out, os, P, v * W, init, b);
  switch (nvec - v) {
    case 3: corr_plane_cols<A, 3, 3>(xs, rs, sh, dh, KH, KW, joff, w, out, os, P, v * W, init, b); break;
    case 2: corr_plane_cols<A, 2, 4>(xs, rs, sh, dh, KH, KW, joff, w, out, os, P, v * W, init, b); break;
    case 1: corr_plane_cols<A, 1, 8>(xs, rs, sh, dh, KH, KW, joff, w, out, os, P, v * W, init, b); break;
    default: break;
  }
}

// ---- NHWC ---------------------------------------------------------------------------------------

// dst[r][col][lane] (r < rows, col < cols, lane < CB) = v(R0 + r, C0 + col, lane), the virtual
// image of fill_plane with pixels src + (R/uh * W + Q/uw) * pix_stride; lane < nreal reads channel
// cs + lane / rep, the other lanes are 0.
template <typename T, typename A>
PYDL_INLINE void fill_pixels(const T* src, int64_t H, int64_t W, int64_t pix_stride, int64_t R0,
                             int64_t rows, int64_t uh, int64_t C0, int64_t cols, int64_t uw,
                             int64_t CB, int64_t cs, int64_t nreal, int64_t rep, A* dst) {
  constexpr int VW = Vec<A>::W;
  for (int64_t r = 0; r < rows; ++r) {
    A* d = dst + r * cols * CB;
    const int64_t R = R0 + r;
    if (R < 0 || R % uh != 0 || R / uh >= H) {
      std::fill(d, d + cols * CB, A(0));
      continue;
    }
    const T* srow = src + (R / uh) * W * pix_stride + cs;
    if (uw == 1 && rep == 1 && nreal == CB) {  // the common case: whole vectors per pixel
      const int64_t lo = std::min(cols, std::max<int64_t>(0, -C0));
      const int64_t hi = std::max(lo, std::min(cols, W - C0));
      std::fill(d, d + lo * CB, A(0));
      for (int64_t col = lo; col < hi; ++col) {
        const T* s = srow + (C0 + col) * pix_stride;
        A* dp = d + col * CB;
        for (int64_t l = 0; l < CB; l += VW) {
#pragma GCC unroll 8
          for (int e = 0; e < VW; ++e) dp[l + e] = to_acc(s[l + e]);
        }
      }
      std::fill(d + hi * CB, d + cols * CB, A(0));
      continue;
    }
    for (int64_t col = 0; col < cols; ++col) {
      A* dp = d + col * CB;
      const int64_t Q = C0 + col;
      if (Q < 0 || Q % uw != 0 || Q / uw >= W) {
        for (int64_t l = 0; l < CB; ++l) dp[l] = A(0);
        continue;
      }
      const T* s = srow + (Q / uw) * pix_stride;
      if (rep == 1) {
#pragma omp simd
        for (int64_t l = 0; l < nreal; ++l) dp[l] = to_acc(s[l]);
      } else {
        for (int64_t l = 0; l < nreal; ++l) dp[l] = to_acc(s[l / rep]);
      }
      for (int64_t l = nreal; l < CB; ++l) dp[l] = A(0);
    }
  }
}

// out[p][q][lane of vector v] (+)= sum_{i,j} wt[(i*KW + j)*CB + lane]
//                                     * xs[((p*sh + i*dh)*cols + q*sw + j*dw)*CB + lane]
// for QB consecutive q from q0 in row p; out pixel stride oq, row stride orow. init as above, b
// the bias vector of the block (lanes of vector v).
template <typename A, int QB>
PYDL_INLINE void corr_pix_block(const A* xs, int64_t cols, int64_t CB, int64_t sh, int64_t sw,
                                int64_t dh, int64_t dw, int64_t KH, int64_t KW, const A* wt,
                                A* out, int64_t oq, int64_t orow, int64_t p, int64_t q0,
                                int64_t v, int init, const A* b) {
  using VT = Vec<A>;
  using V = typename VT::V;
  constexpr int W = VT::W;
  const int64_t lane0 = v * W;
  V acc[QB];
  for (int t = 0; t < QB; ++t) {
    A* o = out + p * orow + (q0 + t) * oq + lane0;
    acc[t] = init == 1 ? VT::load(o) : init == 2 ? VT::load(b + lane0) : V{};
  }
  const int64_t qstep = sw * CB, jstep = dw * CB;
  for (int64_t i = 0; i < KH; ++i) {
    const A* xr = xs + ((p * sh + i * dh) * cols + q0 * sw) * CB + lane0;
    const A* wi = wt + i * KW * CB + lane0;
    for (int64_t j = 0; j < KW; ++j) {
      const V wv = VT::load(wi + j * CB);
      const A* xj = xr + j * jstep;
      for (int t = 0; t < QB; ++t) acc[t] += wv * VT::load(xj + t * qstep);
    }
  }
  for (int t = 0; t < QB; ++t) VT::store(out + p * orow + (q0 + t) * oq + lane0, acc[t]);
}

// All P rows x Q columns x CB lanes (CB a multiple of the vector width).
template <typename A>
PYDL_INLINE void corr_pix(const A* xs, int64_t cols, int64_t CB, int64_t sh, int64_t sw,
                          int64_t dh, int64_t dw, int64_t KH, int64_t KW, const A* wt, A* out,
                          int64_t oq, int64_t orow, int64_t P, int64_t Q, int init, const A* b) {
  constexpr int W = Vec<A>::W;
  for (int64_t p = 0; p < P; ++p) {
    for (int64_t v = 0; v < CB / W; ++v) {
      int64_t q = 0;
      for (; q + 8 <= Q; q += 8)
        corr_pix_block<A, 8>(xs, cols, CB, sh, sw, dh, dw, KH, KW, wt, out, oq, orow, p, q, v, init, b);
      if (q + 4 <= Q) {
        corr_pix_block<A, 4>(xs, cols, CB, sh, sw, dh, dw, KH, KW, wt, out, oq, orow, p, q, v, init, b);
        q += 4;
      }
      if (q + 2 <= Q) {
        corr_pix_block<A, 2>(xs, cols, CB, sh, sw, dh, dw, KH, KW, wt, out, oq, orow, p, q, v, init, b);
        q += 2;
      }
      if (q < Q) corr_pix_block<A, 1>(xs, cols, CB, sh, sw, dh, dw, KH, KW, wt, out, oq, orow, p, q, v, init, b);
    }
  }
}

// NHWC channel blocks: block b covers input channels [b*cbi, ...) and output channels
// [b*cbi*m, ...), CB lanes (a multiple of the vector width; lanes past Cout are padding).
struct PixBlocks {
  int64_t cbi, CB, count;
  PixBlocks(const Geo& g, int lanes_per_vec) {
    const int64_t target = 4 * lanes_per_vec;  // 32 floats: two cache lines per pixel
    cbi = std::max<int64_t>(1, target / g.m);
    cbi = std::min(cbi, g.C);
    CB = round_up(cbi * g.m, lanes_per_vec);
    count = ceil_div(g.C, cbi);
  }
  int64_t out_begin(const Geo& g, int64_t b) const { return b * cbi * g.m; }
  int64_t out_real(const Geo& g, int64_t b) const {
    return std::min(g.Cout, (b + 1) * cbi * g.m) - b * cbi * g.m;
  }
};

// Rows of a band of P output rows read from the padded input: (P - 1) * stride + extent.
inline int64_t band_in_rows(int64_t P, int64_t s, int64_t k, int64_t d) {
  return (P - 1) * s + (k - 1) * d + 1;
}

// The most output rows per band whose scratch (input band of `in_row` elements per row plus an
// output band of `out_row` per row) fits the budget; at least 1, at most P.
inline int64_t band_rows(int64_t P, int64_t s, int64_t k, int64_t d, int64_t in_row,
                         int64_t out_row, int64_t elem) {
  int64_t b = P;
  while (b > 1 && (band_in_rows(b, s, k, d) * in_row + b * out_row) * elem > kScratchBytes) {
    b = std::max<int64_t>(1, b / 2);
  }
  return std::max<int64_t>(b, 1);
}

inline Geo geo_of(const TensorView& x_like, const TensorView& y_like, const TensorView& weight,
                  const Conv2dGeometry& gm) {
  Geo g;
  g.N = x_like.sizes[0];
  g.C = x_like.sizes[1];
  g.H = x_like.sizes[2];
  g.W = x_like.sizes[3];
  g.Cout = weight.sizes[0];
  g.m = g.Cout / g.C;
  g.KH = weight.sizes[1];
  g.KW = weight.sizes[2];
  g.Ho = y_like.sizes[2];
  g.Wo = y_like.sizes[3];
  g.sh = gm.stride_h;
  g.sw = gm.stride_w;
  g.ph = gm.pad_h;
  g.pw = gm.pad_w;
  g.dh = gm.dil_h;
  g.dw = gm.dil_w;
  return g;
}

inline void require_cpu_dtype(DType t, const char* op) {
  PYDL_CHECK(t == DType::kFloat32 || t == DType::kBFloat16 || t == DType::kFloat64, op,
             ": the CPU kernel supports float32, bfloat16 and float64, got ", dtype_name(t));
}

}  // namespace dwconv
}  // namespace pydl
