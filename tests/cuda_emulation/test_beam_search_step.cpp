// Emulated-execution tests of csrc/cuda/beam_search_step.cu (beam_partial + beam_merge) against a
// float64 reference written here: all three dtypes, K 1..64, V 7 .. 50257, n up to 2K and 256,
// ties (equal logits: lower flat index first), banned ids, -inf logits, all -inf and NaN rows,
// beam scores of -1e9 (the first step: only beam 0 alive; with n > V the fp32 scores of the dead
// beams collapse to one value: the boundary-tie rescan), the vector and the scalar path
// (misaligned base / odd row stride), one vocabulary slice per row and several, the bisection of
// the survivor cut, B = 0. NaN fills every element between rows (a read past V poisons the row),
// guard bytes after each output and the workspace must stay untouched, and a second run must give
// bitwise the same outputs (determinism). The emulated device has 2 SMs: 8 blocks are aimed at.
#include "emu_test.h"

#include <cstdint>
#include <vector>

#include "pydl/beam_search_step.h"

using namespace pydl;
using emu::ff;
using emu::tf;
using emu::view;

namespace {

std::mt19937 rng(20240531);
float rnd() { std::normal_distribution<float> d(0.0f, 1.0f); return d(rng); }

enum class Fill { kRandn, kZeros, kSmallInts, kNegInfEvery3, kLowThread };

struct Case {
  int64_t B = 1, K = 4, V = 1000, n = 8;
  Fill fill = Fill::kRandn;
  float scale = 3.0f;
  bool first_step = false;      // beam_scores[b, k > 0] = -1e9
  float beam_offset = 0.0f;     // added to every beam score (-1e6: float32 scores collapse to ties)
  std::vector<int64_t> banned;  // may repeat; ids outside [0, V) are ignored on CUDA
  int64_t pad = 0;              // row stride V + pad
  int mis = 0;                  // base misalignment in elements (scalar path when != 0 mod VEC)
  int64_t inf_row = -1;         // this row all -inf (NaN scores)
  int64_t nan_row = -1;         // this row has one NaN (NaN scores)
};

// (score desc, flat asc), NaN first: the order of the contract.
bool before(double sa, int64_t fa, double sb, int64_t fb) {
  const bool an = std::isnan(sa), bn = std::isnan(sb);
  if (an || bn) return an && bn ? fa < fb : an;
  return sa > sb || (sa == sb && fa < fb);
}

template <typename T>
void run(const Case& c, const char* label) {
  const int64_t B = c.B, K = c.K, V = c.V, n = c.n, ld = V + c.pad, rows = B * K;
  char nm[320];
  std::snprintf(nm, sizeof nm, "beam %s %s B=%ld K=%ld V=%ld n=%ld pad=%ld mis=%d", label, emu::tname<T>(),
                (long)B, (long)K, (long)V, (long)n, (long)c.pad, c.mis);
  emu::trace(nm);
  emu::Report rep{nm};
  const DType dt = emu::dtype_of<T>();
  constexpr int64_t kVec = 16 / sizeof(T);
  std::vector<unsigned char> raw(static_cast<size_t>((std::max<int64_t>(rows, 1) * ld + 64) * sizeof(T) + 64), 0);
  const uintptr_t base = (reinterpret_cast<uintptr_t>(raw.data()) + 63) / 64 * 64;
  T* x = reinterpret_cast<T*>(base) + c.mis;
  const T nan = ff<T>(std::nanf(""));
  for (int64_t i = 0; i < std::max<int64_t>(rows, 1) * ld; ++i) x[i] = nan;  // row padding: NaN
  const bool vec_path = c.mis % kVec == 0 && (rows <= 1 || ld % kVec == 0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t v = 0; v < V; ++v) {
      float f = 0.0f;
      switch (c.fill) {
        case Fill::kRandn: f = c.scale * rnd(); break;
        case Fill::kZeros: f = 0.0f; break;
        case Fill::kSmallInts: f = static_cast<float>(static_cast<int>(rng() % 7) - 3); break;
        case Fill::kNegInfEvery3: f = v % 3 == 0 ? -INFINITY : c.scale * rnd(); break;
        case Fill::kLowThread: {  // thread 0 of every tile holds only -100: the survivor cut bisects
          const int64_t vec = vec_path ? kVec : 1;
          f = ((v % 4096) / vec) % 256 == 0 ? -100.0f : rnd();
          break;
        }
      }
      if (r == c.inf_row) f = -INFINITY;
      if (r == c.nan_row && v == V / 2) f = std::nanf("");
      x[r * ld + v] = ff<T>(f);
    }
  std::vector<float> beam(static_cast<size_t>(std::max<int64_t>(rows, 1)));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < K; ++k) beam[b * K + k] = c.beam_offset + (c.first_step ? (k == 0 ? 0.0f : -1e9f) : 2.0f * rnd());
  std::vector<int64_t> banned = c.banned;

  constexpr int kGuard = 16;
  std::vector<float> os(static_cast<size_t>(B * n + kGuard), 7.0f);
  std::vector<int64_t> ot(static_cast<size_t>(B * n + kGuard), 77), ob(static_cast<size_t>(B * n + kGuard), 77);
  BeamSearchStepArgs a;
  a.logits = view(x, dt, {rows, V}, {ld, 1});
  a.beam_scores = view(beam.data(), DType::kFloat32, {B, K}, {K, 1});
  if (!banned.empty()) a.banned = view(banned.data(), DType::kInt64, {static_cast<int64_t>(banned.size())}, {1});
  a.out_scores = view(os.data(), DType::kFloat32, {B, n}, {n, 1});
  a.out_tokens = view(ot.data(), DType::kInt64, {B, n}, {n, 1});
  a.out_beams = view(ob.data(), DType::kInt64, {B, n}, {n, 1});

  const int64_t ws_bytes = beam_search_step_cuda_workspace_bytes(a);
  std::vector<uint64_t> ws(static_cast<size_t>(ws_bytes / 8 + kGuard), 0xABABABABABABABABull);
  const long launches0 = pydl_emulation::g_launches.load();
  beam_search_step_cuda(a, ws.data(), nullptr);
  const long launches = pydl_emulation::g_launches.load() - launches0;
  rep.check(launches == (B > 0 ? 2 : 0), "launch count " + std::to_string(launches), 0);
  for (int64_t i = ws_bytes / 8; i < ws_bytes / 8 + kGuard; ++i) rep.check(ws[i] == 0xABABABABABABABABull, "workspace written past its size", 0);
  for (int64_t i = B * n; i < B * n + kGuard; ++i)
    rep.check(os[i] == 7.0f && ot[i] == 77 && ob[i] == 77, "output written past its end", 0);

  // Determinism: a second run gives the same bits.
  {
    std::vector<float> os2(os);
    std::vector<int64_t> ot2(ot), ob2(ob);
    a.out_scores.data = os2.data(); a.out_tokens.data = ot2.data(); a.out_beams.data = ob2.data();
    beam_search_step_cuda(a, ws.data(), nullptr);
    rep.check(std::memcmp(os.data(), os2.data(), os.size() * 4) == 0 && ot == ot2 && ob == ob2, "second run differs", 0);
  }

  // Reference: float64 scores (tolerances), and the kernel's own float32 expression for ties.
  std::vector<double> s64(static_cast<size_t>(K * V));
  std::vector<float> s32(static_cast<size_t>(K * V));
  std::vector<int64_t> order(static_cast<size_t>(K * V));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t r = b * K + k;
      double mx = -INFINITY;
      bool has_nan = false;
      for (int64_t v = 0; v < V; ++v) { const double f = tf(x[r * ld + v]); has_nan |= std::isnan(f); mx = std::max(mx, f); }
      double sum = 0;
      if (mx != -INFINITY) for (int64_t v = 0; v < V; ++v) sum += std::exp(tf(x[r * ld + v]) - mx);
      const double lse = std::log(sum);
      const float m32 = has_nan ? NAN : static_cast<float>(mx), l32 = static_cast<float>(lse);
      for (int64_t v = 0; v < V; ++v) {
        const double f = tf(x[r * ld + v]);
        const bool ban = std::find(banned.begin(), banned.end(), v) != banned.end();
        s64[k * V + v] = ban ? -INFINITY : has_nan ? NAN : (f - mx - lse) + beam[r];
        s32[k * V + v] = ban ? -INFINITY : ((static_cast<float>(f) - m32) - l32) + beam[r];
      }
    }
    for (int64_t i = 0; i < K * V; ++i) order[i] = i;
    std::partial_sort(order.begin(), order.begin() + n, order.end(),
                      [&](int64_t p, int64_t q) { return before(s32[p], p, s32[q], q); });
    for (int64_t i = 0; i < n; ++i) {
      const int64_t tok = ot[b * n + i], bm = ob[b * n + i], flat = bm * V + tok;
      const std::string at = " b=" + std::to_string(b) + " i=" + std::to_string(i);
      if (tok < 0 || tok >= V || bm < 0 || bm >= K) { rep.check(false, "token/beam out of range" + at, 0); continue; }
      const double got = os[b * n + i], ref = s64[flat];
      const bool ok_score = std::isnan(ref) ? std::isnan(got) : (got == ref || std::fabs(got - ref) <= 2e-6 + 2e-6 * std::fabs(ref));
      rep.check(ok_score, "score" + at + " flat=" + std::to_string(flat) + " got " + std::to_string(got) + " ref " + std::to_string(ref),
                std::isnan(ref) || std::isinf(ref) ? 0 : std::fabs(got - ref));
      const int64_t want = order[i];
      bool ok_idx = flat == want;
      if (!ok_idx) {  // only a near-tie (not an exact one) of the reference's float32 scores may swap
        const double p = s32[flat], q = s32[want];
        ok_idx = p != q && !std::isnan(p) && !std::isnan(q) && std::fabs(p - q) <= 2e-6 + 2e-6 * std::fabs(q);
      }
      rep.check(ok_idx, "index" + at + " got flat " + std::to_string(flat) + " (score " + std::to_string(s32[flat]) +
                ") want " + std::to_string(want) + " (score " + std::to_string(s32[want]) + ")", 0);
      if (i > 0) {
        const int64_t pf = ob[b * n + i - 1] * V + ot[b * n + i - 1];
        rep.check(before(os[b * n + i - 1], pf, got, flat) || (std::isnan(got) && std::isnan(os[b * n + i - 1]) && pf < flat),
                  "not sorted by (score desc, flat asc)" + at, 0);
      }
    }
  }
  rep.done();
}

void run3(const Case& c, const char* label) {  // every storage type
  emu::for_each_storage_type([&]<typename T>() { run<T>(c, label); });
}

}  // namespace

int main(int argc, char** argv) {
  const std::string which = emu::init(argc, argv);
  const bool quick = which != "all";
  Case c;
  // Small and odd vocabularies, K 1 / 4 / 12 / 64, n up to 2K and up to 256; one tile, the cut-free path.
  for (int64_t K : {1, 4, 12}) {
    c = Case{}; c.B = 2; c.K = K; c.V = 7; c.n = std::min<int64_t>(2 * K, K * 7);
    run3(c, "V=7");
    c = Case{}; c.B = 2; c.K = K; c.V = 1000; c.n = 2 * K;
    run3(c, "V=1000");
  }
  c = Case{}; c.B = 1; c.K = 64; c.V = 100; c.n = 128; run3(c, "K=64");
  c = Case{}; c.B = 1; c.K = 64; c.V = 301; c.n = 256; c.pad = 3; run<float>(c, "K=64 n=256 odd stride");
  c = Case{}; c.B = 2; c.K = 1; c.V = 2000; c.n = 256; run3(c, "n=256");
  // Several tiles per slice, several slices per row, the first-tile cut (V = 4097: a 1-element tile).
  c = Case{}; c.B = 1; c.K = 1; c.V = 20000; c.n = 8; run3(c, "slices");
  c = Case{}; c.B = 3; c.K = 2; c.V = 4097; c.n = 4; run3(c, "V=4097");
  c = Case{}; c.B = 1; c.K = 2; c.V = 9000; c.n = 200; c.scale = 0.5f; run3(c, "big n, slices");
  // The bisection of the survivor cut (one thread's elements all low), vector and scalar paths.
  c = Case{}; c.B = 1; c.K = 1; c.V = 8192; c.n = 256; c.fill = Fill::kLowThread; run3(c, "bisection");
  c.mis = 1; run3(c, "bisection scalar");
  // Ties: equal logits everywhere / small integers (many equal scores): lower flat index first.
  c = Case{}; c.B = 2; c.K = 4; c.V = 1000; c.n = 8; c.fill = Fill::kZeros; run3(c, "zeros");
  c = Case{}; c.B = 1; c.K = 3; c.V = 5000; c.n = 6; c.fill = Fill::kZeros; run<float>(c, "zeros, slices");
  c = Case{}; c.B = 2; c.K = 4; c.V = 3000; c.n = 100; c.fill = Fill::kSmallInts; run3(c, "int ties");
  c = Case{}; c.B = 1; c.K = 2; c.V = 9001; c.n = 256; c.fill = Fill::kSmallInts; c.banned = {3, 4, 5}; run3(c, "int ties, slices");
  // Banned ids (repeated, out of range ignored), -inf logits, an all -inf row, a NaN row.
  c = Case{}; c.B = 2; c.K = 4; c.V = 1000; c.n = 8; c.banned = {0, 17, 999, 17, -5, 1000, 123456};
  run3(c, "banned");
  c = Case{}; c.B = 1; c.K = 2; c.V = 5; c.n = 10; c.banned = {1, 3}; run3(c, "banned, n = K*V");
  c = Case{}; c.B = 2; c.K = 4; c.V = 1500; c.n = 8; c.fill = Fill::kNegInfEvery3; c.banned = {1, 2}; run3(c, "-inf logits");
  c = Case{}; c.B = 1; c.K = 3; c.V = 50; c.n = 6; c.inf_row = 0; run3(c, "all -inf row");
  c = Case{}; c.B = 1; c.K = 3; c.V = 50; c.n = 60; c.nan_row = 1; run3(c, "NaN row");
  // The first step: beam scores -1e9 but beam 0's; n > V makes the dead beams' collapsed scores tie.
  c = Case{}; c.B = 2; c.K = 4; c.V = 7; c.n = 8; c.first_step = true; run3(c, "first step, n > V");
  c = Case{}; c.B = 2; c.K = 4; c.V = 1000; c.n = 8; c.first_step = true; run3(c, "first step");
  // Distinct logits whose float32 scores collapse (ulp(1e6) = 1/16): full slice lists end in a tie
  // with the n-th score, so the batch row is rescanned for the lowest flat indices.
  c = Case{}; c.B = 2; c.K = 3; c.V = 1000; c.n = 8; c.scale = 0.05f; c.beam_offset = -1e6f; run3(c, "collapsed scores");
  c = Case{}; c.B = 1; c.K = 2; c.V = 9000; c.n = 16; c.scale = 0.05f; c.beam_offset = -1e6f; c.banned = {5};
  run3(c, "collapsed scores, slices");
  // Scalar path: misaligned base, odd row stride.
  c = Case{}; c.B = 2; c.K = 4; c.V = 1003; c.n = 8; c.mis = 1; run3(c, "misaligned");
  c = Case{}; c.B = 2; c.K = 3; c.V = 640; c.n = 6; c.pad = 1; run3(c, "odd row stride");
  // A GPT-2 vocabulary (once per dtype in "all"), B = 0.
  c = Case{}; c.B = 1; c.K = 4; c.V = 50257; c.n = 8; run<float>(c, "V=50257");
  if (!quick) { run<__half>(c, "V=50257"); run<__nv_bfloat16>(c, "V=50257"); }
  c = Case{}; c.B = 0; c.K = 4; c.V = 100; c.n = 8; run<float>(c, "B = 0");
  if (!quick) {
    c = Case{}; c.B = 1; c.K = 64; c.V = 4100; c.n = 256; run3(c, "K=64 n=256 slices");
    c = Case{}; c.B = 4; c.K = 8; c.V = 32000; c.n = 16; c.fill = Fill::kNegInfEvery3; run3(c, "large, -inf");
  }
  return emu::summary();
}
