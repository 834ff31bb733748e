// Emulated-execution tests of csrc/cuda/decode_attention.cu against a float64 reference: lengths
// 0, 1, 17, L and mixed (plus out-of-range lengths, clamped), NaN in every cache position at or
// past a row's length, GQA 1..16, strided / misaligned caches (vector and scalar paths), all
// three dtypes, one split (no workspace) and several (partials + combine), int32 / int64 lengths,
// and cases whose positions past the lengths sit on unreadable pages (a read there is a SIGSEGV).
// The emulated device has 2 SMs: a split is taken when B * Hkv * ceil(G / 8) < 8 and L > 256.
#include "emu_test.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <vector>

#include "pydl/decode_attention.h"

using namespace pydl;
using emu::ff;
using emu::tf;
using emu::view;

namespace {

std::mt19937 rng(4321);
float rnd() { std::normal_distribution<float> d(0.0f, 1.0f); return d(rng); }

// Page-aligned bytes (mmap) with a misalignment (in bytes), filled with 0xAB; protect() makes a
// range of pages unreadable (a kernel touching it dies with SIGSEGV).
struct Raw {
  unsigned char* base = nullptr;
  size_t size = 0;
  void* p = nullptr;
  Raw(int64_t nbytes, int64_t mis_bytes) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    size = (static_cast<size_t>(nbytes) + 128 + page - 1) / page * page;
    base = static_cast<unsigned char*>(mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (base == MAP_FAILED) { std::perror("mmap"); std::abort(); }
    std::memset(base, 0xAB, size);
    p = base + mis_bytes;
  }
  Raw(const Raw&) = delete;
  ~Raw() { munmap(base, size); }
  void protect(int64_t first_byte, int64_t end_byte) {  // page-aligned offsets from base
    if (end_byte > first_byte && mprotect(base + first_byte, end_byte - first_byte, PROT_NONE) != 0) { std::perror("mprotect"); std::abort(); }
  }
};

struct Case {
  int64_t B = 1, Hkv = 1, G = 1, L = 64, E = 64, Ev = 64;
  std::vector<int64_t> lens;  // per row (cycled); may be < 0 or > L (clamped by the kernel)
  int64_t pad_l = 0;          // extra elements between cache positions (row stride E + pad_l)
  int64_t extra_l = 0;        // allocated positions beyond L (the cache is a slice of a longer one)
  int mis = 0;                // cache misalignment in elements (scalar path when != 0 mod VEC)
  bool lens64 = false;
  double scale = 0.0;         // 0: 1 / sqrt(E)
  int want_splits = 0;        // 1: expect no workspace, > 1: expect one; 0: don't care
  bool guard = false;         // one page per cache position; the positions past each row's length
                              // (and the unused head) unreadable: proof they are never read
};

template <typename T>
void run(const Case& c, const char* label) {
  const int64_t B = c.B, Hkv = c.Hkv, H = c.Hkv * c.G, L = c.L, E = c.E, Ev = c.Ev;
  char nm[320];
  std::snprintf(nm, sizeof nm, "decode %s %s B=%ld Hkv=%ld G=%ld L=%ld E=%ld Ev=%ld pad=%ld mis=%d lens64=%d", label,
                emu::tname<T>(), (long)B, (long)Hkv, (long)c.G, (long)L, (long)E, (long)Ev, (long)c.pad_l, c.mis, c.lens64);
  emu::trace(nm);
  emu::Report rep{nm};
  const DType dt = emu::dtype_of<T>();
  const int64_t La = L + c.extra_l;
  // caches (B, Hkv, L, E) as slices of (B, Hkv + 1, La, E + pad) buffers; q (B, H, E) strided by heads
  const int64_t page_elems = static_cast<int64_t>(sysconf(_SC_PAGESIZE)) / static_cast<int64_t>(sizeof(T));
  const int64_t ks_l = c.guard ? page_elems : E + c.pad_l, ks_h = La * ks_l, ks_b = (Hkv + 1) * ks_h;
  const int64_t vs_l = c.guard ? page_elems : Ev + c.pad_l, vs_h = La * vs_l, vs_b = (Hkv + 1) * vs_h;
  Raw kraw(std::max<int64_t>(B * ks_b, 1) * sizeof(T), c.mis * sizeof(T));
  Raw vraw(std::max<int64_t>(B * vs_b, 1) * sizeof(T), c.mis * sizeof(T));
  const int64_t qs_h = E + 3, qs_b = H * qs_h + 5;
  Raw qraw(std::max<int64_t>(B * qs_b, 1) * sizeof(T), sizeof(T));
  const int64_t os_h = Ev + 2, os_b = H * os_h + 1;  // gaps between out rows: must stay untouched
  Raw oraw(std::max<int64_t>(B * os_b, 1) * sizeof(T), 0);
  T* k = static_cast<T*>(kraw.p);
  T* v = static_cast<T*>(vraw.p);
  T* q = static_cast<T*>(qraw.p);
  T* out = static_cast<T*>(oraw.p);

  std::vector<int64_t> len(B), eff(B);
  for (int64_t b = 0; b < B; ++b) {
    len[b] = c.lens.empty() ? L : c.lens[b % c.lens.size()];
    eff[b] = std::min(std::max<int64_t>(len[b], 0), L);
  }
  const T nan = ff<T>(std::nanf(""));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hkv + 1; ++h)
      for (int64_t j = 0; j < La; ++j) {
        const bool valid = h < Hkv && j < eff[b];
        for (int64_t e = 0; e < ks_l; ++e) k[b * ks_b + h * ks_h + j * ks_l + e] = valid && e < E ? ff<T>(rnd()) : nan;
        for (int64_t e = 0; e < vs_l; ++e) v[b * vs_b + h * vs_h + j * vs_l + e] = valid && e < Ev ? ff<T>(rnd()) : nan;
      }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t e = 0; e < E; ++e) q[b * qs_b + h * qs_h + e] = ff<T>(2.0f * rnd());
  if (c.guard) {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < Hkv + 1; ++h) {
        const int64_t from = h < Hkv ? eff[b] : 0;
        kraw.protect((b * ks_b + h * ks_h + from * ks_l) * sizeof(T), (b * ks_b + (h + 1) * ks_h) * sizeof(T));
        vraw.protect((b * vs_b + h * vs_h + from * vs_l) * sizeof(T), (b * vs_b + (h + 1) * vs_h) * sizeof(T));
      }
  }
  std::vector<int32_t> len32(B + 1);
  std::vector<int64_t> len64(B + 1);
  for (int64_t b = 0; b < B; ++b) { len32[b] = static_cast<int32_t>(len[b]); len64[b] = len[b]; }

  DecodeAttentionArgs a;
  a.q = view(q, dt, {B, H, E}, {qs_b, qs_h, 1});
  a.k_cache = view(k, dt, {B, Hkv, L, E}, {ks_b, ks_h, ks_l, 1});
  a.v_cache = view(v, dt, {B, Hkv, L, Ev}, {vs_b, vs_h, vs_l, 1});
  a.cache_seqlens = c.lens64 ? view(len64.data(), DType::kInt64, {B}, {1}) : view(len32.data(), DType::kInt32, {B}, {1});
  a.out = view(out, dt, {B, H, Ev}, {os_b, os_h, 1});
  a.scale = c.scale != 0.0 ? c.scale : 1.0 / std::sqrt(static_cast<double>(E));

  const int64_t ws_floats = decode_attention_cuda_workspace_floats(B, H, Hkv, L, Ev);
  std::vector<float> ws(ws_floats + 64, std::nanf(""));
  if (c.want_splits == 1) rep.check(ws_floats == 0, "expected one split (no workspace), got " + std::to_string(ws_floats), 0);
  if (c.want_splits > 1) rep.check(ws_floats > 0, "expected several splits (a workspace)", 0);
  const long launches0 = pydl_emulation::g_launches.load();
  decode_attention_cuda(a, ws_floats > 0 ? ws.data() : nullptr, nullptr);
  const long launches = pydl_emulation::g_launches.load() - launches0;
  if (B * H > 0) rep.check(launches == (ws_floats > 0 ? 2 : 1), "launch count " + std::to_string(launches), 0);
  for (int64_t i = ws_floats; i < ws_floats + 64; ++i) rep.check(std::isnan(ws[i]), "workspace written past its size", 0);

  const double rtol = std::is_same_v<T, float> ? 2e-5 : std::is_same_v<T, __half> ? 2e-3 : 1.6e-2;
  const double atol = std::is_same_v<T, float> ? 2e-6 : std::is_same_v<T, __half> ? 2e-4 : 2e-3;
  std::vector<double> s;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t kh = h / c.G, n = eff[b];
      s.assign(n, 0.0);
      double mx = -INFINITY;
      for (int64_t j = 0; j < n; ++j) {
        double d = 0;
        for (int64_t e = 0; e < E; ++e) d += (double)tf(q[b * qs_b + h * qs_h + e]) * tf(k[b * ks_b + kh * ks_h + j * ks_l + e]);
        s[j] = d * a.scale;
        mx = std::max(mx, s[j]);
      }
      double den = 0;
      for (int64_t j = 0; j < n; ++j) { s[j] = std::exp(s[j] - mx); den += s[j]; }
      for (int64_t e = 0; e < Ev; ++e) {
        double ref = 0;
        for (int64_t j = 0; j < n; ++j) ref += s[j] * tf(v[b * vs_b + kh * vs_h + j * vs_l + e]);
        ref = n > 0 ? ref / den : 0.0;
        const double got = tf(out[b * os_b + h * os_h + e]);
        rep.check(emu::close(got, ref, atol, rtol) && !std::isnan(got),
                  "out b=" + std::to_string(b) + " h=" + std::to_string(h) + " e=" + std::to_string(e) + " len=" +
                      std::to_string(len[b]) + " got " + std::to_string(got) + " ref " + std::to_string(ref),
                  std::fabs(got - ref));
      }
      // the gap after this row of out is untouched
      for (int64_t e = Ev; e < os_h; ++e) {
        const unsigned char* pb = reinterpret_cast<const unsigned char*>(out + b * os_b + h * os_h + e);
        rep.check(pb[0] == 0xAB && pb[sizeof(T) - 1] == 0xAB, "out written in a gap", 0);
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
  // Lengths 0, 1, 17, L in one batch; B * Hkv = 4 < 8: split (L = 300: 2 splits, the second empty
  // for the short rows); GQA 1, 2, 4, 8.
  for (int64_t G : {1, 2, 4, 8}) {
    c = Case{};
    c.B = 4; c.G = G; c.L = 300; c.E = 64; c.Ev = 64; c.lens = {0, 1, 17, 300}; c.want_splits = 2;
    run3(c, "mixed lengths, split");
  }
  // One split: B * Hkv = 8, and L <= 256.
  c = Case{}; c.B = 4; c.Hkv = 2; c.G = 4; c.L = 300; c.E = 128; c.Ev = 128; c.lens = {300, 17, 0, 299}; c.want_splits = 1;
  run3(c, "one split");
  c = Case{}; c.B = 1; c.Hkv = 1; c.G = 8; c.L = 256; c.E = 128; c.Ev = 128; c.lens = {200}; c.want_splits = 1;
  run3(c, "one split, short cache");
  // Several splits (L = 1000, B * Hkv = 2: 4 splits), strided caches (a slice of a longer cache,
  // padded rows keeping 16-byte alignment), int64 lengths, lengths past L and negative (clamped).
  c = Case{}; c.B = 2; c.Hkv = 1; c.G = 2; c.L = 1000; c.E = 64; c.Ev = 64; c.lens = {1000, 643}; c.pad_l = 8; c.extra_l = 7;
  c.lens64 = true; c.want_splits = 4;
  run3(c, "many splits, strided");
  c = Case{}; c.B = 3; c.G = 1; c.L = 400; c.E = 32; c.Ev = 32; c.lens = {405, -3, 129}; c.want_splits = 2;
  run3(c, "clamped lengths");
  // Scalar path: misaligned caches, odd row strides, odd E; Ev != E.
  c = Case{}; c.B = 2; c.G = 4; c.L = 300; c.E = 64; c.Ev = 64; c.lens = {300, 17}; c.mis = 1; c.want_splits = 2;
  run3(c, "misaligned: scalar");
  c = Case{}; c.B = 2; c.Hkv = 4; c.G = 2; c.L = 90; c.E = 40; c.Ev = 40; c.lens = {90, 1}; c.pad_l = 1; c.want_splits = 1;
  run3(c, "odd row stride: scalar");
  c = Case{}; c.B = 1; c.G = 3; c.L = 150; c.E = 7; c.Ev = 5; c.lens = {150};
  run3(c, "odd E, G = 3");
  c = Case{}; c.B = 2; c.G = 2; c.L = 280; c.E = 64; c.Ev = 32; c.lens = {280, 100}; c.scale = 0.37; c.want_splits = 2;
  run3(c, "Ev != E, scale");
  // More than 8 query heads per KV head: two head groups.
  c = Case{}; c.B = 1; c.Hkv = 1; c.G = 16; c.L = 200; c.E = 64; c.Ev = 64; c.lens = {177};
  run3(c, "G = 16");
  // Long value rows: ITEMS = 2 (fp32, vector: 150 chunks), 4 (bf16, vector: 375 chunks, two heads
  // per block) and the scalar path near its limit (Ev = 509 <= 512).
  c = Case{}; c.B = 1; c.G = 2; c.L = 40; c.E = 16; c.Ev = 600; c.lens = {33};
  run<float>(c, "long Ev");
  c = Case{}; c.B = 1; c.G = 2; c.L = 40; c.E = 16; c.Ev = 3000; c.lens = {40};
  run<__nv_bfloat16>(c, "long Ev");
  c = Case{}; c.B = 1; c.G = 1; c.L = 40; c.E = 16; c.Ev = 509; c.lens = {40};
  run<__half>(c, "long Ev scalar");
  // Empty: L = 0 (every length 0 -> zeros), B = 0 (nothing to do).
  c = Case{}; c.B = 2; c.G = 2; c.L = 0; c.E = 16; c.Ev = 16; c.lens = {0, 5};
  run3(c, "L = 0");
  c = Case{}; c.B = 0; c.G = 2; c.L = 16; c.E = 16; c.Ev = 16;
  run<float>(c, "B = 0");
  // Never reads past a row's length: those positions' pages are unreadable (vector and scalar paths).
  c = Case{}; c.B = 3; c.Hkv = 2; c.G = 4; c.L = 300; c.E = 64; c.Ev = 64; c.lens = {0, 17, 257}; c.guard = true; c.want_splits = 2;
  run3(c, "guarded pages");
  c.mis = 1; c.G = 8;
  run3(c, "guarded pages, scalar");
  c = Case{}; c.B = 8; c.Hkv = 1; c.G = 2; c.L = 200; c.E = 40; c.Ev = 24; c.lens = {1, 199, 128, 129, 0, 200, 5, 64}; c.guard = true; c.want_splits = 1;
  run3(c, "guarded pages, one split");
  if (!quick) {
    c = Case{}; c.B = 1; c.Hkv = 2; c.G = 8; c.L = 2100; c.E = 128; c.Ev = 128; c.lens = {2100}; c.want_splits = 4;
    run3(c, "long cache");
    c = Case{}; c.B = 2; c.Hkv = 1; c.G = 8; c.L = 1500; c.E = 256; c.Ev = 256; c.lens = {1499, 1}; c.extra_l = 3;
    run3(c, "E = 256");
  }
  return emu::summary();
}
