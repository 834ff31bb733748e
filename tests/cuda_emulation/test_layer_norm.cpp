// Emulated-execution tests of csrc/cuda/layer_norm_{fwd,bwd,dweight}.cu against a float64 reference.
#include "emu_test.h"

#include <functional>
#include <stdexcept>
#include <vector>

#include "pydl/layer_norm.h"

using namespace pydl;
using emu::close;
using emu::dtype_of;
using emu::ff;
using emu::g_checks;
using emu::g_fail;
using emu::Report;
using emu::tf;
using emu::tname;

// A buffer with a chosen misalignment (in elements) and row stride.
template <typename T>
struct Buf {
  std::vector<unsigned char> raw;
  T* p = nullptr;
  int64_t rows = 0, cols = 0, rs = 0;
  Buf() = default;
  Buf(int64_t r, int64_t c, int64_t row_stride, int misalign) : rows(r), cols(c), rs(row_stride) {
    const int64_t elems = (r > 0 ? (r - 1) * row_stride + c : 0) + 8;
    raw.assign(elems * sizeof(T) + 64, 0xAB);
    uintptr_t base = (reinterpret_cast<uintptr_t>(raw.data()) + 31) & ~uintptr_t(31);
    p = reinterpret_cast<T*>(base) + misalign;
  }
  T& at(int64_t r, int64_t c) { return p[r * rs + c]; }
  TensorView view2() const {
    TensorView v; v.data = p; v.dtype = dtype_of<T>(); v.ndim = 2; v.sizes[0] = rows; v.sizes[1] = cols;
    v.strides[0] = rs; v.strides[1] = 1; v.defined = true; return v;
  }
  TensorView view1() const {
    TensorView v; v.data = p; v.dtype = dtype_of<T>(); v.ndim = 1; v.sizes[0] = cols;
    v.strides[0] = 1; v.defined = true; return v;
  }
};
TensorView fview1(float* p, int64_t n) {
  TensorView v; v.data = p; v.dtype = DType::kFloat32; v.ndim = 1; v.sizes[0] = n; v.strides[0] = 1;
  v.defined = true; return v;
}

double act_ref(double z, int act) {
  if (act == 1) return 0.5 * z * (1 + std::erf(z / std::sqrt(2.0)));
  if (act == 2) return 0.5 * z * (1 + std::tanh(std::sqrt(2 / M_PI) * (z + 0.044715 * z * z * z)));
  return z;
}
double actg_ref(double z, int act) {
  if (act == 1) return 0.5 * (1 + std::erf(z / std::sqrt(2.0))) + z * std::exp(-0.5 * z * z) / std::sqrt(2 * M_PI);
  if (act == 2) {
    const double k = std::sqrt(2 / M_PI), t = std::tanh(k * (z + 0.044715 * z * z * z));
    return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * k * (1 + 3 * 0.044715 * z * z);
  }
  return 1;
}

// " params=f32" for mixed-precision parameters (P = float with a 16-bit T), else "".
template <typename T, typename P> const char* param_suffix() { return std::is_same_v<T, P> ? "" : " params=f32"; }

template <typename T> double out_rtol() { return std::is_same_v<T, float> ? 2e-5 : std::is_same_v<T, __half> ? 2e-3 : 1.6e-2; }

std::mt19937 rng(1234);
// x ~ N(g_x_mean, g_x_sd) in test_fwd; sd 0 gives constant rows.
static float g_x_mean = 0.3f, g_x_sd = 1.5f;
// RMSNorm (Norm::kRms) instead of LayerNorm in test_fwd / test_bwd (callers pass no bias).
static bool g_rms = false;
float rnd(float mean = 0.0f, float sd = 1.0f) {
  if (sd == 0.0f) return mean; std::normal_distribution<float> d(mean, sd); return d(rng); }

// P: the parameters' storage type (T, or float: mixed precision).
template <typename T, typename P = T>
void test_fwd(int64_t M, int64_t N, bool res, bool hw, bool hb, int act, int pad, int mis, int out_mis = 0) {
  char nm[256];
  std::snprintf(nm, sizeof nm, "%s %s%s M=%ld N=%ld res=%d w=%d b=%d act=%d pad=%d mis=%d omis=%d", g_rms ? "rms fwd" : "fwd", tname<T>(), param_suffix<T, P>(), (long)M, (long)N, res, hw, hb, act, pad, mis, out_mis);
  if (g_rms) hb = false;
  Report rep{nm};
  emu::trace(nm);
  Buf<T> x(M, N, N + pad, mis), r(M, N, N + 2 * pad, mis), y(M, N, N, out_mis), h(M, N, N, out_mis);
  Buf<P> w(1, N, N, 0), b(1, N, N, 0);
  for (int64_t i = 0; i < M; ++i) for (int64_t j = 0; j < N; ++j) { x.at(i, j) = ff<T>(rnd(g_x_mean, g_x_sd)); r.at(i, j) = ff<T>(rnd()); }
  for (int64_t j = 0; j < N; ++j) { w.at(0, j) = ff<P>(rnd(1.0f, 0.5f)); b.at(0, j) = ff<P>(rnd(0.0f, 0.5f)); }
  std::vector<float> mean(M + 1, -7.f), rstd(M + 1, -7.f);
  LayerNormFwdArgs a;
  a.x = x.view2();
  if (res) { a.residual = r.view2(); a.h = h.view2(); }
  if (hw) a.weight = w.view1();
  if (hb) a.bias = b.view1();
  a.y = y.view2();
  a.mean = fview1(mean.data(), M);
  a.rstd = fview1(rstd.data(), M);
  a.eps = 1e-5;
  a.act = static_cast<Activation>(act);
  a.norm = g_rms ? Norm::kRms : Norm::kLayer;
  layer_norm_fwd_cuda(a, nullptr);
  for (int64_t i = 0; i < M; ++i) {
    std::vector<double> hv(N);
    for (int64_t j = 0; j < N; ++j) {
      float v = tf(x.at(i, j));
      if (res) {
        T hr = ff<T>(v + tf(r.at(i, j)));
        rep.check(std::memcmp(&hr, &h.at(i, j), sizeof(T)) == 0, "h row " + std::to_string(i) + " col " + std::to_string(j), 0);
        v = tf(hr);
      }
      hv[j] = v;
    }
    double mu = 0; for (double v : hv) mu += v; mu /= N;
    double var = 0; for (double v : hv) var += (v - mu) * (v - mu); var /= N;
    if (g_rms) {  // xhat = h * rstd, rstd = 1 / sqrt(mean(h^2) + eps); the mean row is 0
      mu = 0; var = 0; for (double v : hv) var += v * v; var /= N;
      rep.check(mean[i] == 0.0f, "rms mean row " + std::to_string(i) + " not 0: " + std::to_string(mean[i]), 0);
    }
    const double rs = 1 / std::sqrt(var + 1e-5);
    rep.check(close(mean[i], mu, 1e-6, 1e-5), "mean row " + std::to_string(i) + " got " + std::to_string(mean[i]) + " ref " + std::to_string(mu), std::fabs(mean[i] - mu));
    rep.check(close(rstd[i], rs, 0, 1e-5), "rstd row " + std::to_string(i) + " got " + std::to_string(rstd[i]) + " ref " + std::to_string(rs), std::fabs(rstd[i] - rs) / rs);
    for (int64_t j = 0; j < N; ++j) {
      const double z = (hv[j] - mu) * rs * (hw ? tf(w.at(0, j)) : 1.0) + (hb ? tf(b.at(0, j)) : 0.0);
      const double ref = act_ref(z, act), got = tf(y.at(i, j));
      rep.check(close(got, ref, 1e-5 + out_rtol<T>() * 0.1, out_rtol<T>()), "y row " + std::to_string(i) + " col " + std::to_string(j) + " got " + std::to_string(got) + " ref " + std::to_string(ref), std::fabs(got - ref));
    }
  }
  rep.check(mean[M] == -7.f && rstd[M] == -7.f, "stats written past M", 0);
  // y's padding (the 8 extra elements) untouched
  for (int e = 0; e < 8; ++e) {
    const unsigned char* pb = reinterpret_cast<const unsigned char*>(y.p + (M > 0 ? (M - 1) * N + N : 0) + e);
    rep.check(pb[0] == 0xAB, "y written past its end", 0);
  }
  rep.done();
}

template <typename T, typename P = T>
void test_bwd(int64_t M, int64_t N, bool hdh, bool hw, bool hb, bool want_dw, bool want_db, int act, int pad, int mis, int64_t ws_rows = -1) {
  char nm[256];
  std::snprintf(nm, sizeof nm, "%s %s%s M=%ld N=%ld dh=%d w=%d b=%d dw=%d db=%d act=%d pad=%d mis=%d ws=%ld", g_rms ? "rms bwd" : "bwd", tname<T>(), param_suffix<T, P>(), (long)M, (long)N, hdh, hw, hb, want_dw, want_db, act, pad, mis, (long)ws_rows);
  if (g_rms) { hb = false; want_db = false; }  // RMSNorm has no bias
  Report rep{nm};
  emu::trace(nm);
  Buf<T> x(M, N, N + pad, mis), dy(M, N, N + 3 * pad, mis), dh(M, N, N + pad, mis), dx(M, N, N, 0);
  Buf<P> w(1, N, N, 0), b(1, N, N, 0), dw(1, N, N, 0), db(1, N, N, 0);
  for (int64_t i = 0; i < M; ++i) for (int64_t j = 0; j < N; ++j) { x.at(i, j) = ff<T>(rnd(0.2f, 1.3f)); dy.at(i, j) = ff<T>(rnd()); dh.at(i, j) = ff<T>(rnd()); }
  for (int64_t j = 0; j < N; ++j) { w.at(0, j) = ff<P>(rnd(1.0f, 0.5f)); b.at(0, j) = ff<P>(rnd(0.0f, 0.5f)); }
  std::vector<float> mean(M + 1), rstd(M + 1);
  for (int64_t i = 0; i < M; ++i) {
    double mu = 0; for (int64_t j = 0; j < N; ++j) mu += tf(x.at(i, j)); mu /= N;
    double var = 0; for (int64_t j = 0; j < N; ++j) var += (tf(x.at(i, j)) - mu) * (tf(x.at(i, j)) - mu); var /= N;
    if (g_rms) { mu = 0; var = 0; for (int64_t j = 0; j < N; ++j) var += (double)tf(x.at(i, j)) * tf(x.at(i, j)); var /= N; }
    mean[i] = static_cast<float>(mu); rstd[i] = static_cast<float>(1 / std::sqrt(var + 1e-5));
  }
  // RMS: the mean row (0 from the forward) is never read: pass garbage.
  if (g_rms) for (int64_t i = 0; i < M; ++i) mean[i] = 123.0f;
  const int64_t parts = ws_rows > 0 ? ws_rows : layer_norm_bwd_cuda_num_partials(M, N);
  std::vector<float> ws(parts * 2 * N + 16, std::nanf(""));
  LayerNormBwdArgs a;
  a.dy = dy.view2(); if (hdh) a.dh = dh.view2(); a.x = x.view2();
  if (hw) a.weight = w.view1();
  if (hb) a.bias = b.view1();
  a.mean = fview1(mean.data(), M);
  a.rstd = fview1(rstd.data(), M);
  a.dx = dx.view2();
  if (want_dw) a.dweight = dw.view1();
  if (want_db) a.dbias = db.view1();
  if (want_dw || want_db) { a.workspace.data = ws.data(); a.workspace.dtype = DType::kFloat32; a.workspace.ndim = 2; a.workspace.sizes[0] = parts; a.workspace.sizes[1] = 2 * N; a.workspace.strides[0] = 2 * N; a.workspace.strides[1] = 1; a.workspace.defined = true; }
  a.act = static_cast<Activation>(act);
  a.norm = g_rms ? Norm::kRms : Norm::kLayer;
  for (int64_t j = 0; j < N; ++j) { dw.at(0, j) = ff<P>(12345.f); db.at(0, j) = ff<P>(12345.f); }
  layer_norm_bwd_cuda(a, nullptr);
  std::vector<double> rdw(N, 0), rdb(N, 0), absw(N, 0);
  for (int64_t i = 0; i < M; ++i) {
    std::vector<double> xh(N), g(N), dxh(N);
    double c1 = 0, c2 = 0;
    for (int64_t j = 0; j < N; ++j) {
      xh[j] = ((double)tf(x.at(i, j)) - (g_rms ? 0.0 : mean[i])) * rstd[i];
      const double wj = hw ? tf(w.at(0, j)) : 1.0, bj = hb ? tf(b.at(0, j)) : 0.0;
      g[j] = tf(dy.at(i, j)) * actg_ref(xh[j] * wj + bj, act);
      dxh[j] = g[j] * wj;
      c1 += dxh[j]; c2 += dxh[j] * xh[j];
      rdw[j] += g[j] * xh[j]; rdb[j] += g[j]; absw[j] += std::fabs(g[j] * xh[j]) + std::fabs(g[j]) + (act ? 0.3 * std::fabs(tf(dy.at(i, j))) * (1 + std::fabs(xh[j])) : 0.0);  // fp32 act' error ~1e-6 abs
    }
    c1 /= N; c2 /= N;
    if (g_rms) c1 = 0;
    double scale = 0;
    for (int64_t j = 0; j < N; ++j) scale = std::max(scale, std::fabs(rstd[i] * dxh[j]));
    for (int64_t j = 0; j < N; ++j) {
      double ref = rstd[i] * (dxh[j] - c1 - xh[j] * c2) + (hdh ? tf(dh.at(i, j)) : 0.0);
      const double got = tf(dx.at(i, j));
      rep.check(close(got, ref, 1e-5 * scale + out_rtol<T>() * 0.2, out_rtol<T>()), "dx row " + std::to_string(i) + " col " + std::to_string(j) + " got " + std::to_string(got) + " ref " + std::to_string(ref), std::fabs(got - ref));
    }
  }
  for (int64_t j = 0; j < N; ++j) {
    if (want_dw) { const double got = tf(dw.at(0, j)); rep.check(close(got, rdw[j], 1e-5 * absw[j] + 1e-6, out_rtol<P>()), "dw col " + std::to_string(j) + " got " + std::to_string(got) + " ref " + std::to_string(rdw[j]), std::fabs(got - rdw[j])); }
    else rep.check(tf(dw.at(0, j)) == tf(ff<P>(12345.f)), "dw written", 0);
    if (want_db) { const double got = tf(db.at(0, j)); rep.check(close(got, rdb[j], 1e-5 * absw[j] + 1e-6, out_rtol<P>()), "db col " + std::to_string(j) + " got " + std::to_string(got) + " ref " + std::to_string(rdb[j]), std::fabs(got - rdb[j])); }
    else rep.check(tf(db.at(0, j)) == tf(ff<P>(12345.f)), "db written", 0);
  }
  for (int e = 0; e < 16; ++e) rep.check(std::isnan(ws[parts * 2 * N + e]), "workspace written past its rows", 0);
  // Determinism: run again, compare bits.
  std::vector<unsigned char> dx1(dx.raw), dw1(dw.raw), db1(db.raw);
  layer_norm_bwd_cuda(a, nullptr);
  rep.check(dx1 == dx.raw && dw1 == dw.raw && db1 == db.raw, "not deterministic", 0);
  rep.done();
}

// RMSNorm argument checks: a bias, an unknown norm code -> invalid_argument naming the problem.
void test_rms_validation() {
  Report rep{"rms validation"};
  Buf<float> x(2, 8, 8, 0), y(2, 8, 8, 0), w(1, 8, 8, 0), b(1, 8, 8, 0), dx(2, 8, 8, 0);
  std::vector<float> mean(2), rstd(2, 1.0f);
  auto expect = [&](const std::function<void()>& f, const char* what, const char* needle) {
    std::string msg = "no exception";
    try { f(); } catch (const std::invalid_argument& e) { msg = e.what(); } catch (const std::exception& e) { msg = std::string("wrong type: ") + e.what(); }
    rep.check(msg.find(needle) != std::string::npos, std::string(what) + ": " + msg, 0);
  };
  auto fwd = [&](Norm norm, bool bias) {
    LayerNormFwdArgs a; a.x = x.view2(); a.y = y.view2(); a.weight = w.view1();
    if (bias) a.bias = b.view1();
    a.mean = fview1(mean.data(), 2); a.rstd = fview1(rstd.data(), 2); a.norm = norm;
    layer_norm_fwd_cuda(a, nullptr);
  };
  auto bwd = [&](Norm norm, bool bias) {
    LayerNormBwdArgs a; a.dy = x.view2(); a.x = x.view2(); a.dx = dx.view2(); a.weight = w.view1();
    if (bias) a.bias = b.view1();
    a.mean = fview1(mean.data(), 2); a.rstd = fview1(rstd.data(), 2); a.norm = norm;
    layer_norm_bwd_cuda(a, nullptr);
  };
  expect([&] { fwd(Norm::kRms, true); }, "fwd rms + bias", "rms_norm has no bias");
  expect([&] { bwd(Norm::kRms, true); }, "bwd rms + bias", "rms_norm has no bias");
  expect([&] { fwd(static_cast<Norm>(2), false); }, "fwd norm 2", "unknown norm code 2");
  expect([&] { bwd(static_cast<Norm>(-1), false); }, "bwd norm -1", "unknown norm code -1");
  expect([&] { LayerNormBwdArgs a; a.dy = x.view2(); a.x = x.view2(); a.dx = dx.view2(); a.rstd = fview1(rstd.data(), 2); a.norm = Norm::kRms; layer_norm_bwd_cuda(a, nullptr); },
         "bwd rms without mean", "mean is required");
  rep.done();
}

// RMSNorm through the same kernels: every kernel (cached / uncached forward, rows / uncached
// backward), both VEC paths, with and without residual / dh / weight, grid-stride loops over
// row groups wider than a warp (the forward's single reduction alternates its slots).
void run_rms(bool quick) {
  test_rms_validation();
  g_rms = true;
  auto fwd_all = [&](int64_t M, int64_t N, int act, int pad, int mis) {
    test_fwd<float>(M, N, true, true, false, act, pad, mis);
    test_fwd<__nv_bfloat16>(M, N, false, true, false, act, pad, mis);
    test_fwd<__half>(M, N, true, false, false, act, pad, mis);
    test_fwd<__nv_bfloat16>(M, N, true, true, false, act, pad, mis);
  };
  auto bwd_all = [&](int64_t M, int64_t N, int act, int pad, int mis) {
    test_bwd<float>(M, N, true, true, false, true, false, act, pad, mis);
    test_bwd<__nv_bfloat16>(M, N, false, true, false, true, false, act, pad, mis);
    test_bwd<__half>(M, N, true, true, false, false, false, act, pad, mis);
    test_bwd<__nv_bfloat16>(M, N, true, false, false, false, false, act, pad, mis);
    test_bwd<float>(M - 1, N, false, false, false, false, false, act, pad, mis);
  };
  for (int64_t N : {1, 7, 8, 97, 384, 1000, 1024, 1025, 2048}) {
    fwd_all(5, N, N % 3, N % 2 ? 8 : 0, 0);
    fwd_all(6, N, 2, 3, 1);  // odd row stride, misaligned: scalar path
    bwd_all(7, N, (N + 1) % 3, N % 2 ? 0 : 8, 0);
    bwd_all(6, N, 1, 3, 1);
  }
  // grid-stride loops: more row groups than one pass of the emulated grid, TPR > 32
  test_fwd<__nv_bfloat16>(20, 2048, true, true, false, 0, 0, 0);
  test_fwd<float>(20, 2048, false, true, false, 2, 0, 0);
  test_fwd<float>(37, 64, true, true, false, 0, 0, 0);
  test_bwd<__nv_bfloat16>(40, 2048, true, true, false, true, false, 0, 0, 0);
  test_bwd<float>(33, 1000, true, true, false, true, false, 1, 0, 0, 2);
  // long rows: ln_fwd_uncached (vector N > 32768, scalar N > 8192), ln_bwd_uncached (vector
  // N > 8192 with dw in shared memory up to 16384 and in the workspace beyond; scalar N > 4096)
  test_fwd<float>(5, 32776, true, true, false, 1, 0, 0);
  test_fwd<__nv_bfloat16>(2, 32776, false, true, false, 0, 0, 0);
  test_fwd<__half>(2, 8193, true, true, false, 2, 0, 0);
  test_fwd<__nv_bfloat16>(3, 9000, false, false, false, 0, 0, 1);
  test_bwd<__nv_bfloat16>(3, 8200, true, true, false, true, false, 0, 0, 0);
  test_bwd<float>(2, 16392, false, true, false, true, false, 2, 0, 0);
  test_bwd<__half>(3, 4097, true, true, false, true, false, 1, 0, 0);
  test_bwd<float>(2, 5000, false, false, false, false, false, 0, 1, 1);
  if (!quick) {
    for (int64_t N : {4096, 8192, 12288, 16384, 24576, 32768}) { fwd_all(3, N, N % 3, 0, 0); fwd_all(3, N, 1, 1, 0); }
    for (int64_t N : {4104, 8192, 12288, 16392, 40000}) { bwd_all(3, N, N % 3, 0, 0); bwd_all(3, N, 2, 5, 3); }
    test_fwd<__nv_bfloat16>(2, 65544, true, true, false, 1, 0, 0);
    test_bwd<__nv_bfloat16>(2, 65544, true, true, false, true, false, 1, 0, 0);
  }
  g_rms = false;
}

// The parameters' dtype (mixed precision: float32 weight / bias / dweight / dbias with a 16-bit
// x; anything else but x's own dtype is invalid_argument naming the argument).
void test_param_dtype_validation() {
  Report rep{"param dtype validation"};
  Buf<__nv_bfloat16> x(2, 8, 8, 0), y(2, 8, 8, 0), dx(2, 8, 8, 0), wb(1, 8, 8, 0);
  Buf<__half> xh(2, 8, 8, 0), yh(2, 8, 8, 0);
  Buf<float> xf(2, 8, 8, 0), yf(2, 8, 8, 0), w(1, 8, 8, 0), b(1, 8, 8, 0), dw(1, 8, 8, 0);
  Buf<__half> wh(1, 8, 8, 0);
  std::vector<float> mean(2), rstd(2, 1.0f);
  auto expect = [&](const std::function<void()>& f, const char* what, const char* needle) {
    std::string msg = "no exception";
    try { f(); } catch (const std::invalid_argument& e) { msg = e.what(); } catch (const std::exception& e) { msg = std::string("wrong type: ") + e.what(); }
    rep.check(msg.find(needle) != std::string::npos, std::string(what) + ": " + msg, 0);
  };
  auto fwd = [&](const TensorView& xv, const TensorView& yv, const TensorView& wv, const TensorView& bv) {
    LayerNormFwdArgs a; a.x = xv; a.y = yv; a.weight = wv; a.bias = bv;
    a.mean = fview1(mean.data(), 2); a.rstd = fview1(rstd.data(), 2);
    layer_norm_fwd_cuda(a, nullptr);
  };
  expect([&] { fwd(xh.view2(), yh.view2(), wb.view1(), TensorView{}); }, "fp16 x, bf16 weight",
         "weight dtype bfloat16 must be x's dtype float16");
  expect([&] { fwd(xf.view2(), yf.view2(), TensorView{}, wh.view1()); }, "fp32 x, fp16 bias",
         "bias dtype float16 must be x's dtype float32");
  expect([&] { fwd(x.view2(), y.view2(), w.view1(), wb.view1()); }, "fp32 weight, bf16 bias",
         "bias dtype bfloat16 must match weight dtype float32");
  expect([&] {
    LayerNormBwdArgs a; a.dy = x.view2(); a.x = x.view2(); a.dx = dx.view2(); a.weight = w.view1();
    a.mean = fview1(mean.data(), 2); a.rstd = fview1(rstd.data(), 2); a.dweight = wb.view1();
    layer_norm_bwd_cuda(a, nullptr);
  }, "bf16 dweight of an fp32 weight", "dweight must have dtype float32");
  rep.done();
}

// Mixed precision: float32 parameters with a float16 / bfloat16 x, through every kernel (cached
// forward per E, both VEC paths, uncached forward with / without h, backward rows / uncached with
// dw in registers, shared memory and the workspace), both norms, weight only / bias only.
void run_mixed(bool quick) {
  test_param_dtype_validation();
  for (int rms = 0; rms < 2; ++rms) {
    g_rms = rms == 1;
    for (int64_t N : {8, 97, 384, 1024, 1025, 2048}) {
      test_fwd<__nv_bfloat16, float>(5, N, true, true, true, N % 3, N % 2 ? 8 : 0, 0);
      test_fwd<__half, float>(6, N, false, true, true, 1, 3, 1);  // misaligned: scalar path
      test_fwd<__half, float>(5, N, true, false, true, 2, 0, 0);  // bias only (LN)
      test_bwd<__nv_bfloat16, float>(7, N, true, true, true, true, true, (N + 1) % 3, 0, 0);
      test_bwd<__half, float>(6, N, false, true, true, true, true, 2, 3, 1);
      test_bwd<__nv_bfloat16, float>(5, N, true, false, true, false, true, 1, 0, 0);
    }
    test_fwd<__nv_bfloat16, float>(20, 2048, true, true, true, 0, 0, 0);  // grid-stride loops
    test_bwd<__half, float>(40, 768, true, true, true, true, true, 1, 0, 0);
    // long rows: ln_fwd_uncached (vector, and scalar with h), ln_bwd_uncached (dw in shared
    // memory, in the workspace; scalar)
    test_fwd<__nv_bfloat16, float>(5, 32776, true, true, true, 1, 0, 0);
    test_fwd<__half, float>(2, 32776, false, true, true, 0, 0, 0);
    test_fwd<__half, float>(3, 8193, true, true, true, 2, 0, 0);
    test_bwd<__nv_bfloat16, float>(3, 8200, true, true, true, true, true, 0, 0, 0);
    test_bwd<__half, float>(2, 16392, false, true, true, true, true, 2, 0, 0);
    test_bwd<__nv_bfloat16, float>(3, 4097, true, true, true, true, true, 1, 0, 0);
    test_bwd<__half, float>(2, 5000, false, true, false, true, false, 0, 1, 1);
    test_bwd<__nv_bfloat16, float>(0, 64, false, true, true, true, true, 0, 0, 0, 1);  // M = 0 -> zeros
    if (!quick) {
      for (int64_t N : {4096, 8192, 16384, 24576}) {
        test_fwd<__nv_bfloat16, float>(3, N, true, true, true, N % 3, 0, 0);
        test_bwd<__half, float>(3, N, true, true, true, true, true, 1, 1, 0);
      }
      test_fwd<__nv_bfloat16, float>(2, 65544, true, true, true, 1, 0, 0);
      test_bwd<__nv_bfloat16, float>(2, 65544, true, true, true, true, true, 1, 0, 0);
    }
  }
  g_rms = false;
}

int main(int argc, char** argv) {
  const std::string which = emu::init(argc, argv);
  const bool quick = which == "quick";
  auto fwd_all = [&](int64_t M, int64_t N, int act, int pad, int mis) {
    test_fwd<float>(M, N, true, true, true, act, pad, mis);
    test_fwd<__nv_bfloat16>(M, N, false, true, true, act, pad, mis);
    test_fwd<__half>(M, N, true, false, true, act, pad, mis);
    test_fwd<__nv_bfloat16>(M, N, true, true, false, act, pad, mis);
  };
  auto bwd_all = [&](int64_t M, int64_t N, int act, int pad, int mis) {
    test_bwd<float>(M, N, true, true, true, true, true, act, pad, mis);
    test_bwd<__nv_bfloat16>(M, N, false, true, true, true, true, act, pad, mis);
    test_bwd<__half>(M, N, true, true, false, true, false, act, pad, mis);
    test_bwd<__nv_bfloat16>(M, N, true, false, true, false, true, act, pad, mis);
    test_bwd<float>(M, N, false, false, false, false, false, act, pad, mis);
  };
  if (which == "fwd" || which == "all" || quick) {
    for (int64_t N : {1, 7, 8, 16, 97, 384, 768, 1000, 1023, 1024, 1025, 1500, 2048}) {
      for (int act = 0; act < 3; ++act) fwd_all(5, N, act, act == 1 ? 8 : 0, 0);
      fwd_all(6, N, 2, 3, 1);  // odd row stride, misaligned: scalar path
    }
    if (!quick) {
      for (int64_t N : {4096, 5120, 8192, 8200, 12288, 16384, 24576, 32768}) { fwd_all(3, N, N % 3, 0, 0); fwd_all(3, N, 1, 1, 0); }
      for (int64_t N : {32776, 40000, 65536}) { fwd_all(2, N, 1, 0, 0); fwd_all(2, N, 2, 5, 3); }
      test_fwd<__nv_bfloat16>(9, 1024, true, true, true, 1, 0, 0, 1);  // misaligned outputs
      test_fwd<float>(37, 64, true, true, true, 0, 0, 0);               // many rows per block
      test_fwd<__nv_bfloat16>(300, 8, true, true, true, 2, 0, 0);       // tpr 1, many rows
      test_fwd<float>(300, 3, true, true, true, 2, 1, 0);               // scalar, tpr 1
    }
  }
  if (which == "fwd" || which == "all" || quick) {
    // add_layer_norm on the long-row kernel (ln_fwd_uncached), whose pass 2 re-reads h written by
    // its pass 1: the vector path (N > 32768) and the scalar path (N > 8192: odd N, misaligned
    // rows); M = 5 > the emulated grid (4 blocks) walks the row loop.
    test_fwd<float>(5, 32776, true, true, true, 1, 0, 0);
    test_fwd<__nv_bfloat16>(2, 32776, true, true, true, 2, 0, 0);
    test_fwd<__half>(2, 32776, true, false, true, 0, 0, 0);
    test_fwd<float>(2, 8193, true, true, true, 2, 0, 0);
    test_fwd<__nv_bfloat16>(5, 8193, true, true, false, 1, 3, 0);
    test_fwd<__half>(2, 9000, true, true, true, 0, 0, 1);  // even N, misaligned: scalar
  }
  if (which == "fwd" || which == "bwd" || which == "all" || quick) {
    // Rows longer than 65536 (no size limit): the vector path (N % 8 == 0) and the scalar path.
    test_fwd<__nv_bfloat16>(2, 65544, true, true, true, 1, 0, 0);
    test_fwd<float>(2, 70001, true, true, true, 0, 0, 0);
    test_bwd<__nv_bfloat16>(2, 65544, true, true, true, true, true, 1, 0, 0);
    test_bwd<float>(3, 70001, true, true, true, true, true, 0, 0, 0);
  }
  if (which == "fwd" || which == "all" || quick) {  // constant rows must normalize to exactly 0
    g_x_mean = 1000.1f;
    g_x_sd = 0.0f;
    for (int64_t N : {97, 1024, 1025, 40000}) {
      test_fwd<float>(3, N, false, true, true, 0, 0, 0);
      test_fwd<__nv_bfloat16>(3, N, false, true, true, 1, 0, 0);
    }
    g_x_mean = 0.3f;
    g_x_sd = 1.5f;
  }
  if (which == "bwd" || which == "all" || quick) {
    for (int64_t N : {1, 7, 8, 16, 97, 384, 768, 1000, 1023, 1024, 1025, 1500, 2048}) {
      for (int act = 0; act < 3; ++act) bwd_all(7, N, act, act == 2 ? 8 : 0, 0);
      bwd_all(6, N, 1, 3, 1);
    }
    if (!quick) {
      for (int64_t N : {4096, 4104, 5120, 8192, 8200, 12288, 16384}) { bwd_all(3, N, N % 3, 0, 0); bwd_all(3, N, 1, 1, 0); }
      for (int64_t N : {16392, 24576, 40000, 65536}) { bwd_all(2, N, 1, 0, 0); bwd_all(3, N, 2, 5, 3); }
      test_bwd<float>(40, 64, true, true, true, true, true, 0, 0, 0, 1);     // one partial row
      test_bwd<float>(40, 64, true, true, true, true, true, 1, 0, 0, 3);     // three partial rows
      test_bwd<__nv_bfloat16>(301, 8, true, true, true, true, true, 2, 0, 0); // tpr 1, many groups
      test_bwd<float>(301, 3, true, true, true, true, true, 2, 1, 0);         // scalar, tpr 1
      test_bwd<float>(33, 1000, true, true, true, true, true, 1, 0, 0, 2);
      test_bwd<__nv_bfloat16>(0, 64, false, true, true, true, true, 0, 0, 0, 1);  // M = 0 -> zeros
    }
  }
  if (which == "rms" || which == "all" || quick) run_rms(which != "all");  // "rms": the quick RMS set
  if (which == "mixed" || which == "all" || quick) run_mixed(which != "all");  // "mixed": the quick set
  return emu::summary();
}
