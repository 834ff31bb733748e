// Emulated-execution tests of csrc/cuda/depthwise_conv2d_{fwd,bwd}.cu against a float64 reference:
// y, dx, dweight and dbias in both layouts (NCHW / channels_last) and all three dtypes, kernels 1,
// 3, 7, 13, 31, even and non-square kernels, stride 2, dilation 2 (and a span too large for an NCHW
// tile: the direct kernel), asymmetric padding, padding larger than the kernel span, multiplier
// 2 / 3, batch 1 and 3, odd sizes, C not a multiple of the vector width and misaligned pointers
// (scalar paths), several channel chunks / filter stages / grid-stride tiles / pixel slices, empty
// batch / empty output / empty input, partial gradient requests (dx only, dweight only, dbias
// only), no writes past any output or the workspace (guard regions), and dweight / dbias bitwise
// equal over two runs.
#include "emu_test.h"

#include <cstdint>
#include <vector>

#include "pydl/depthwise_conv2d.h"

using namespace pydl;
using emu::ff;
using emu::tf;
using emu::view;

namespace {

std::mt19937 rng(2024);
float rnd() { std::uniform_real_distribution<float> d(-1.0f, 1.0f); return d(rng); }

constexpr int64_t kGuard = 64;  // guard elements before and after every buffer

// A device buffer stand-in: n elements of T between two guard regions filled with 0xAB bytes,
// misaligned by `mis` elements (the region before the data grows by mis).
template <typename T>
struct Buf {
  std::vector<unsigned char> raw;
  int64_t n = 0, mis = 0;
  Buf(int64_t n_, int64_t mis_ = 0) : raw((n_ + 2 * kGuard + mis_) * sizeof(T) + 16, 0xAB), n(n_), mis(mis_) {}
  T* data() {  // 16-byte aligned base + guard (a multiple of 16 bytes) + mis elements
    uintptr_t b = reinterpret_cast<uintptr_t>(raw.data());
    b = (b + 15) & ~uintptr_t{15};
    return reinterpret_cast<T*>(b) + kGuard + mis;
  }
  bool guards_intact() {
    const unsigned char* d = reinterpret_cast<const unsigned char*>(data());
    for (int64_t i = 1; i <= kGuard * static_cast<int64_t>(sizeof(T)); ++i) if (d[-i] != 0xAB) return false;
    const unsigned char* e = reinterpret_cast<const unsigned char*>(data() + n);
    for (int64_t i = 0; i < kGuard * static_cast<int64_t>(sizeof(T)); ++i) if (e[i] != 0xAB) return false;
    return true;
  }
};

struct Case {
  int64_t N = 1, C = 8, m = 1, H = 7, W = 7;
  int KH = 3, KW = 3;
  int64_t sh = 1, sw = 1, ph = 1, pw = 1, pb = -1, pr = -1, dh = 1, dw = 1;  // pb / pr: bottom / right (-1: = top / left)
  int mis = 0;          // misalignment (elements) of x, y, dy, dx
  bool bias = true;
  int grads = 7;        // bit 0: dx, 1: dweight, 2: dbias
};

struct Img {  // (N, C, H, W) in a layout: element offset
  int64_t N, C, H, W; bool nhwc;
  int64_t at(int64_t n, int64_t c, int64_t h, int64_t w) const {
    return nhwc ? ((n * H + h) * W + w) * C + c : ((n * C + c) * H + h) * W + w;
  }
  int64_t numel() const { return N * C * H * W; }
  std::vector<int64_t> strides() const {
    return nhwc ? std::vector<int64_t>{H * W * C, 1, W * C, C} : std::vector<int64_t>{C * H * W, H * W, W, 1};
  }
};

template <typename T>
double tol_of(double ref, double absum) {
  const double store = std::is_same_v<T, float> ? 2e-7 : std::is_same_v<T, __half> ? 1e-3 : 8e-3;
  return 1e-6 + 2e-6 * absum + store * std::fabs(ref);
}

template <typename T>
void run(const Case& c, bool nhwc, const char* label) {
  const DType dt = emu::dtype_of<T>();
  const int64_t N = c.N, C = c.C, Co = c.C * c.m, H = c.H, W = c.W, KH = c.KH, KW = c.KW;
  const int64_t pb = c.pb < 0 ? c.ph : c.pb, pr = c.pr < 0 ? c.pw : c.pr;
  const int64_t Ho = std::max<int64_t>(0, (H + c.ph + pb - c.dh * (KH - 1) - 1) / c.sh + 1);
  const int64_t Wo = std::max<int64_t>(0, (W + c.pw + pr - c.dw * (KW - 1) - 1) / c.sw + 1);
  char nm[400];
  std::snprintf(nm, sizeof nm, "dwconv %s %s %s N=%ld C=%ld m=%ld %ldx%ld k=%dx%d s=%ld,%ld p=%ld,%ld,%ld,%ld d=%ld,%ld mis=%d grads=%d",
                label, emu::tname<T>(), nhwc ? "NHWC" : "NCHW", (long)N, (long)C, (long)c.m, (long)H, (long)W, c.KH, c.KW,
                (long)c.sh, (long)c.sw, (long)c.ph, (long)pb, (long)c.pw, (long)pr, (long)c.dh, (long)c.dw, c.mis, c.grads);
  emu::trace(nm);
  emu::Report rep{nm};
  const Img xi{N, C, H, W, nhwc}, yi{N, Co, Ho, Wo, nhwc};
  Buf<T> x(xi.numel(), c.mis), y(yi.numel(), c.mis), dy(yi.numel(), c.mis), dx(xi.numel(), c.mis);
  Buf<T> wt(Co * KH * KW), b(Co), dwt(Co * KH * KW), db(Co), dwt2(Co * KH * KW), db2(Co);
  for (int64_t i = 0; i < xi.numel(); ++i) x.data()[i] = ff<T>(rnd());
  for (int64_t i = 0; i < yi.numel(); ++i) dy.data()[i] = ff<T>(rnd());
  for (int64_t i = 0; i < Co * KH * KW; ++i) wt.data()[i] = ff<T>(rnd());
  for (int64_t i = 0; i < Co; ++i) b.data()[i] = ff<T>(rnd());

  Conv2dGeometry g;
  g.stride_h = c.sh; g.stride_w = c.sw; g.pad_h = c.ph; g.pad_w = c.pw; g.dil_h = c.dh; g.dil_w = c.dw;
  const Layout layout = nhwc ? Layout::kNHWC : Layout::kNCHW;
  auto X = [&](int64_t n, int64_t ch, int64_t h, int64_t w) -> double {
    return h < 0 || h >= H || w < 0 || w >= W ? 0.0 : (double)tf(x.data()[xi.at(n, ch, h, w)]);
  };
  auto WT = [&](int64_t o, int64_t i, int64_t j) { return (double)tf(wt.data()[(o * KH + i) * KW + j]); };
  auto DY = [&](int64_t n, int64_t o, int64_t p, int64_t q) { return (double)tf(dy.data()[yi.at(n, o, p, q)]); };

  // ---- forward
  DepthwiseConv2dFwdArgs fa;
  fa.x = view(x.data(), dt, {N, C, H, W}, xi.strides());
  fa.weight = view(wt.data(), dt, {Co, KH, KW}, {KH * KW, KW, 1});
  if (c.bias) fa.bias = view(b.data(), dt, {Co}, {1});
  fa.y = view(y.data(), dt, {N, Co, Ho, Wo}, yi.strides());
  fa.g = g;
  fa.layout = layout;
  depthwise_conv2d_fwd_cuda(fa, nullptr);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t o = 0; o < Co; ++o)
      for (int64_t p = 0; p < Ho; ++p)
        for (int64_t q = 0; q < Wo; ++q) {
          double ref = c.bias ? (double)tf(b.data()[o]) : 0.0, ab = std::fabs(ref);
          for (int64_t i = 0; i < KH; ++i)
            for (int64_t j = 0; j < KW; ++j) {
              const double t = WT(o, i, j) * X(n, o / c.m, p * c.sh - c.ph + i * c.dh, q * c.sw - c.pw + j * c.dw);
              ref += t; ab += std::fabs(t);
            }
          const double got = tf(y.data()[yi.at(n, o, p, q)]);
          rep.check(std::fabs(got - ref) <= tol_of<T>(ref, ab),
                    "y n=" + std::to_string(n) + " o=" + std::to_string(o) + " p=" + std::to_string(p) + " q=" +
                        std::to_string(q) + " got " + std::to_string(got) + " ref " + std::to_string(ref),
                    std::fabs(got - ref));
        }
  rep.check(y.guards_intact(), "y written outside its extent", 0);

  // ---- backward (twice: dweight / dbias must be bitwise equal)
  const bool want_dx = c.grads & 1, want_dw = c.grads & 2, want_db = c.grads & 4;
  DepthwiseConv2dBwdArgs ba;
  ba.dy = view(dy.data(), dt, {N, Co, Ho, Wo}, yi.strides());
  ba.x = view(x.data(), dt, {N, C, H, W}, xi.strides());
  if (!want_dw && want_dx) ba.x = TensorView{};  // x is only needed for dweight (else for its shape)
  ba.weight = fa.weight;
  if (want_dx) ba.dx = view(dx.data(), dt, {N, C, H, W}, xi.strides());
  ba.g = g;
  ba.layout = layout;
  for (int run = 0; run < 2; ++run) {
    ba.dweight = want_dw ? view((run ? dwt2 : dwt).data(), dt, {Co, KH, KW}, {KH * KW, KW, 1}) : TensorView{};
    ba.dbias = want_db ? view((run ? db2 : db).data(), dt, {Co}, {1}) : TensorView{};
    const int64_t wsf = depthwise_conv2d_bwd_cuda_workspace_floats(ba);
    if (!want_dw && !want_db) rep.check(wsf == 0, "workspace without dweight / dbias", 0);
    std::vector<float> ws(wsf + kGuard, std::nanf(""));
    depthwise_conv2d_bwd_cuda(ba, wsf > 0 ? ws.data() : nullptr, nullptr);
    for (int64_t i = wsf; i < wsf + kGuard; ++i) rep.check(std::isnan(ws[i]), "workspace written past its size", 0);
  }
  if (want_dx) {
    for (int64_t n = 0; n < N; ++n)
      for (int64_t ch = 0; ch < C; ++ch)
        for (int64_t h = 0; h < H; ++h)
          for (int64_t w = 0; w < W; ++w) {
            double ref = 0, ab = 0;
            for (int64_t r = 0; r < c.m; ++r) {
              const int64_t o = ch * c.m + r;
              for (int64_t i = 0; i < KH; ++i) {
                const int64_t hn = h + c.ph - i * c.dh;
                if (hn < 0 || hn % c.sh || hn / c.sh >= Ho) continue;
                for (int64_t j = 0; j < KW; ++j) {
                  const int64_t wn = w + c.pw - j * c.dw;
                  if (wn < 0 || wn % c.sw || wn / c.sw >= Wo) continue;
                  const double t = DY(n, o, hn / c.sh, wn / c.sw) * WT(o, i, j);
                  ref += t; ab += std::fabs(t);
                }
              }
            }
            const double got = tf(dx.data()[xi.at(n, ch, h, w)]);
            rep.check(std::fabs(got - ref) <= tol_of<T>(ref, ab),
                      "dx n=" + std::to_string(n) + " c=" + std::to_string(ch) + " h=" + std::to_string(h) + " w=" +
                          std::to_string(w) + " got " + std::to_string(got) + " ref " + std::to_string(ref),
                      std::fabs(got - ref));
          }
    rep.check(dx.guards_intact(), "dx written outside its extent", 0);
  }
  if (want_dw || want_db) {
    for (int64_t o = 0; o < Co; ++o) {
      if (want_db) {
        double ref = 0, ab = 0;
        for (int64_t n = 0; n < N; ++n)
          for (int64_t p = 0; p < Ho; ++p)
            for (int64_t q = 0; q < Wo; ++q) { ref += DY(n, o, p, q); ab += std::fabs(DY(n, o, p, q)); }
        const double got = tf(db.data()[o]);
        rep.check(std::fabs(got - ref) <= tol_of<T>(ref, ab),
                  "dbias o=" + std::to_string(o) + " got " + std::to_string(got) + " ref " + std::to_string(ref), std::fabs(got - ref));
        rep.check(std::memcmp(&db.data()[o], &db2.data()[o], sizeof(T)) == 0, "dbias differs between two runs", 0);
      }
      if (!want_dw) continue;
      for (int64_t i = 0; i < KH; ++i)
        for (int64_t j = 0; j < KW; ++j) {
          double ref = 0, ab = 0;
          for (int64_t n = 0; n < N; ++n)
            for (int64_t p = 0; p < Ho; ++p)
              for (int64_t q = 0; q < Wo; ++q) {
                const double t = DY(n, o, p, q) * X(n, o / c.m, p * c.sh - c.ph + i * c.dh, q * c.sw - c.pw + j * c.dw);
                ref += t; ab += std::fabs(t);
              }
          const int64_t k = (o * KH + i) * KW + j;
          const double got = tf(dwt.data()[k]);
          rep.check(std::fabs(got - ref) <= tol_of<T>(ref, ab),
                    "dweight o=" + std::to_string(o) + " i=" + std::to_string(i) + " j=" + std::to_string(j) + " got " +
                        std::to_string(got) + " ref " + std::to_string(ref),
                    std::fabs(got - ref));
          rep.check(std::memcmp(&dwt.data()[k], &dwt2.data()[k], sizeof(T)) == 0, "dweight differs between two runs", 0);
        }
    }
    rep.check(dwt.guards_intact() && db.guards_intact() && dwt2.guards_intact() && db2.guards_intact(),
              "dweight / dbias written outside their extent", 0);
  }
  rep.check(x.guards_intact() && dy.guards_intact() && wt.guards_intact(), "an input buffer was written", 0);
  rep.done();
}

void run_all(const Case& c, const char* label, bool f32 = true, bool f16 = true, bool b16 = true) {
  for (bool nhwc : {true, false}) {
    if (f32) run<float>(c, nhwc, label);
    if (f16) run<__half>(c, nhwc, label);
    if (b16) run<__nv_bfloat16>(c, nhwc, label);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const std::string which = emu::init(argc, argv);
  const bool quick = which != "all";
  Case c;
  // Kernels 1, 3, 7 (stride 1: the windowed fast kernels, dx through the flipped filter).
  c = Case{}; c.N = 1; c.C = 8; c.H = 7; c.W = 7; c.KH = c.KW = 3; c.ph = c.pw = 1;
  run_all(c, "k3");
  c = Case{}; c.N = 3; c.C = 16; c.H = 13; c.W = 13; c.KH = c.KW = 7; c.ph = c.pw = 3;
  run_all(c, "k7 batch 3");
  c = Case{}; c.N = 2; c.C = 24; c.H = 5; c.W = 9; c.KH = c.KW = 1; c.ph = c.pw = 0; c.bias = false;
  run_all(c, "k1 no bias");
  // Stride 2 (dx: the direct gather), dilation 2, both together with a multiplier.
  c = Case{}; c.N = 2; c.C = 8; c.H = 13; c.W = 13; c.sh = c.sw = 2;
  run_all(c, "stride 2");
  c = Case{}; c.N = 1; c.C = 8; c.H = 9; c.W = 33; c.ph = c.pw = 2; c.dh = c.dw = 2;
  run_all(c, "dilation 2");
  c = Case{}; c.N = 3; c.C = 3; c.m = 3; c.H = 11; c.W = 7; c.KH = 3; c.KW = 5; c.sh = 2; c.sw = 1; c.dh = 1; c.dw = 2;
  c.ph = 1; c.pb = 2; c.pw = 3; c.pr = 0;
  run_all(c, "stride 2x1 dil 1x2 m=3 asymmetric");
  // Even / non-square kernels, asymmetric ("same"-like) padding, padding beyond the span.
  c = Case{}; c.N = 1; c.C = 8; c.H = 7; c.W = 13; c.KH = 2; c.KW = 4; c.ph = 0; c.pb = 1; c.pw = 1; c.pr = 2;
  run_all(c, "k2x4 asymmetric");
  c = Case{}; c.N = 1; c.C = 8; c.H = 5; c.W = 6; c.KH = c.KW = 3; c.ph = c.pw = 4;
  run_all(c, "pad 4 > span 3");
  c = Case{}; c.N = 2; c.C = 8; c.H = 8; c.W = 8; c.KH = 4; c.KW = 4; c.ph = 1; c.pb = 2; c.pw = 2; c.pr = 1; c.sh = c.sw = 2;
  run_all(c, "k4 stride 2 asymmetric");
  // Multiplier 2 (scalar paths; dx sums the two output channels of each input channel).
  c = Case{}; c.N = 2; c.C = 5; c.m = 2; c.H = 7; c.W = 7;
  run_all(c, "m=2");
  // C not a multiple of the vector width (6: scalar everywhere; 12: fp32 vector, 16-bit scalar).
  c = Case{}; c.N = 1; c.C = 6; c.H = 7; c.W = 13; c.KH = c.KW = 5; c.ph = c.pw = 2;
  run_all(c, "C=6");
  c = Case{}; c.N = 1; c.C = 12; c.H = 6; c.W = 7; c.KH = c.KW = 3;
  run_all(c, "C=12");
  // Misaligned x / y / dy / dx (scalar path with an aligned-size C).
  c = Case{}; c.N = 2; c.C = 16; c.H = 7; c.W = 9; c.KH = c.KW = 3; c.mis = 1;
  run_all(c, "misaligned");
  // Big kernels on tiny images: 13x13, 31x31 (NCHW tile 62 wide), and a 31x31 dilation-4 span
  // too large for an NCHW tile (the direct kernel).
  c = Case{}; c.N = 1; c.C = 8; c.H = 9; c.W = 9; c.KH = c.KW = 13; c.ph = c.pw = 6;
  run_all(c, "k13");
  c = Case{}; c.N = 1; c.C = 4; c.H = 6; c.W = 5; c.KH = c.KW = 31; c.ph = c.pw = 15;
  run_all(c, "k31", true, false, true);
  c = Case{}; c.N = 1; c.C = 2; c.H = 4; c.W = 5; c.KH = c.KW = 31; c.ph = c.pw = 60; c.dh = c.dw = 4;
  run_all(c, "k31 dil 4 (direct)", true, false, true);
  // Many channels: several channel chunks (fwd: > 64 vectors per chunk; wgrad: > 32) and filter
  // staged in several passes (13 rows x 44 fp32 vectors > 32 KB).
  c = Case{}; c.N = 1; c.C = 264; c.H = 3; c.W = 5; c.KH = c.KW = 3;
  run_all(c, "C=264");
  c = Case{}; c.N = 1; c.C = 520; c.H = 4; c.W = 6; c.KH = c.KW = 13; c.ph = c.pw = 6; c.grads = 3;
  run<float>(c, true, "C=520 k13 staged");
  // Grid-stride loops (more tiles than blocks) and several pixel slices in the weight gradient.
  c = Case{}; c.N = 4; c.C = 64; c.H = 33; c.W = 33; c.KH = c.KW = 3;
  run_all(c, "N=4 C=64 33x33", true, false, !quick);
  c = Case{}; c.N = 5; c.C = 16; c.H = 29; c.W = 29; c.KH = c.KW = 3;  // 145 rows in 2 slices: uneven
  run_all(c, "N=5 29x29 uneven slices", true, false, false);
  // Partial requests: dx only, dweight only, dbias only.
  for (int grads : {1, 2, 4}) {
    c = Case{}; c.N = 2; c.C = 8; c.H = 7; c.W = 7; c.grads = grads;
    run_all(c, "partial grads", true, grads == 2, grads != 2);
  }
  // Empty: batch 0, output 0 x W (kernel taller than the padded input), input 0 x 0 (outputs are
  // bias only, gradients zero).
  c = Case{}; c.N = 0; c.C = 8; c.H = 7; c.W = 7;
  run_all(c, "N=0");
  c = Case{}; c.N = 2; c.C = 8; c.H = 2; c.W = 7; c.KH = 5; c.KW = 3; c.ph = 1; c.pw = 1;
  run_all(c, "Ho=0");
  c = Case{}; c.N = 2; c.C = 8; c.H = 0; c.W = 0; c.KH = 3; c.KW = 3; c.ph = 2; c.pw = 2;
  run_all(c, "H=W=0");
  if (!quick) {
    c = Case{}; c.N = 3; c.C = 96; c.H = 14; c.W = 14; c.KH = c.KW = 7; c.ph = c.pw = 3;
    run_all(c, "ConvNeXt-like");
    c = Case{}; c.N = 1; c.C = 16; c.H = 33; c.W = 33; c.KH = c.KW = 31; c.ph = c.pw = 15;
    run_all(c, "k31 33x33");
  }
  return emu::summary();
}
