// One beam-search step on CUDA (contract: include/pydl/beam_search_step.h): one read of the logits.
//
// Kernel 1, beam_partial<T, VEC>: one block (kThreads = 256) per (row r = b*K + k, vocabulary slice
// j); a slice is a whole number of tiles of kTile = 4096 elements, and the slice count per row comes
// from the SM count (about kBlocksPerSm blocks per SM) capped so that a batch row's merge sees at
// most kMaxMergeCands candidates. Per tile each thread loads kItems = 16 elements (16-byte loads
// when the logits' base and row stride keep 16-byte alignment, else scalar; the row's tail scalar)
// into registers and updates
//   - its online softmax statistics (running max m, sum of e^(x - m)): merged over the block at the
//     end (fixed shuffle / shared-memory order) into the slice's (m, s);
//   - the block's top n by (logit desc, v asc), as unique 64-bit keys (order-preserving bits of the
//     logit << 32 | ~v; NaN ranks as -inf, banned ids are key 0 = never chosen), kept sorted in
//     shared memory. A tile's survivors are the keys above the current n-th key theta; when more
//     than the buffer holds survive (the first tile), they are first cut at a lower bound of the
//     tile's n-th key (per warp the ceil(n/8)-th largest thread maximum, min over the warps; then,
//     rarely, a bisection of the key space); the survivors are appended and a bitonic sort keeps
//     the n best.
//   Output to the workspace: the slice's (m, s) and its n keys (0-padded).
// Kernel 2, beam_merge<T>: one block per batch row b. Row statistics: M = max m, S = sum s e^(m -
// M), lse = log S (NaN propagates). Every candidate becomes score = ((logit - M) - lse) + beam
// (float32: the expression every backend uses) and key (order bits of the score << 32 | ~(k*V +
// v)), NaN above +inf; the same tile / survivor / sort machinery selects the n best. Boundary ties:
// an element scoring exactly the n-th score s* can be missing only below a full slice list whose
// worst entry scores s*, or (banned / -inf) when s* = -inf; then the batch row's logits are scanned
// in flat order for the lowest-index elements scoring s* (ballots; rare). Deterministic: keys are
// unique, every reduction has a fixed order (atomics only place survivors before a sort).
// Index math in int64 (flat indices in 32 bits: K*V < 2^32). Banned ids outside [0, V) are ignored.
#include "cuda_utils.cuh"  // first: binds the CUDA storage types

#include <cmath>
#include <string>

#include "pydl/beam_search_step.h"

namespace pydl {
namespace {

using cuda::ceil_div;
using cuda::to_float;
typedef unsigned long long u64;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 16;                     // elements per thread per tile
constexpr int kTile = kThreads * kItems;       // 4096
constexpr int kSlots = 2048;                   // shared sort buffer: the top n + survivors
constexpr int64_t kMaxMergeCands = 32768;      // K * slices * n per batch row (launcher's cap)
constexpr int64_t kBlocksPerSm = 4;
constexpr float kLog2e = 1.4426950408889634f;

struct Params {
  const void* logits;
  int64_t ld;
  int64_t V;
  int K, n, nblk, nb;
  int64_t slice;          // elements per block (a multiple of kTile)
  const float* beam;      // (B, K)
  const int64_t* banned;  // (nb,)
  u64* ws_keys;           // (B*K, nblk, n)
  float* ws_stats;        // (B*K, nblk, 2): m, s
  float* out_scores;
  int64_t* out_tokens;
  int64_t* out_beams;
};

// ---- keys -------------------------------------------------------------------------------------

// Order-preserving bits of f: -0 as +0; NaN above +inf (nan_high) or as -inf.
__device__ __forceinline__ uint32_t ord_of(float f, bool nan_high) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if (f != f) u = nan_high ? 0x7fc00000u : 0xff800000u;
  if (f == 0.0f) u = 0;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float float_of(uint32_t o) {
  const uint32_t u = (o & 0x80000000u) ? (o & 0x7fffffffu) : ~o;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
__device__ __forceinline__ u64 make_key(uint32_t ord, uint32_t idx) {
  return (static_cast<u64>(ord) << 32) | static_cast<u64>(0xffffffffu - idx);
}
__device__ __forceinline__ uint32_t key_index(u64 key) {
  return 0xffffffffu - static_cast<uint32_t>(key & 0xffffffffu);
}

// ---- block reductions (every thread calls them; `red` is kWarps slots; two barriers) -----------

__device__ __forceinline__ int block_sum(int v, int* red) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  int t = 0;
  for (int w = 0; w < kWarps; ++w) t += red[w];
  return t;
}
template <bool MAX>
__device__ __forceinline__ u64 warp_ext(u64 v) {
  for (int o = 16; o > 0; o >>= 1) {
    const u64 w = __shfl_xor_sync(0xffffffffu, v, o);
    v = MAX ? (w > v ? w : v) : (w < v ? w : v);
  }
  return v;
}
template <bool MAX>
__device__ __forceinline__ u64 block_ext(u64 v, u64* red) {
  v = warp_ext<MAX>(v);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  u64 t = red[0];
  for (int w = 1; w < kWarps; ++w) t = MAX ? (red[w] > t ? red[w] : t) : (red[w] < t ? red[w] : t);
  return t;
}

// (m, s) statistics: m = max (NaN sticky), s = sum e^(x - m); -inf max: s = 0.
__device__ __forceinline__ void stats_combine(float& m, float& s, float m2, float s2) {
  if (m != m || m2 != m2) {
    m = s = NAN;
    return;
  }
  const float M = m2 > m ? m2 : m;
  if (M == -INFINITY) {
    s = 0.0f;
    return;
  }
  const float a = m == -INFINITY ? 0.0f : s * exp2f((m - M) * kLog2e);
  const float b = m2 == -INFINITY ? 0.0f : s2 * exp2f((m2 - M) * kLog2e);
  m = M;
  s = a + b;
}

// ---- block top-n of unique 64-bit keys ------------------------------------------------------

struct Smem {
  u64* buf;  // [kSlots]: buf[0, n) the current top n, sorted descending, 0-padded
  u64* ured;
  int* ired;
  int* count;
};
__device__ __forceinline__ Smem smem_layout() {
  u64* buf = cuda::dynamic_smem<u64>();
  int* ired = reinterpret_cast<int*>(buf + kSlots + kWarps);
  return Smem{buf, buf + kSlots, ired, ired + kWarps};
}
constexpr size_t kSmemBytes = (kSlots + kWarps) * sizeof(u64) + (kWarps + 4) * sizeof(int);

__device__ __forceinline__ int count_above(const u64 (&key)[kItems], u64 lo) {
  int c = 0;
#pragma unroll
  for (int i = 0; i < kItems; ++i) c += key[i] > lo ? 1 : 0;
  return c;
}

// Descending bitonic sort of buf[0, P), P a power of two <= kSlots.
__device__ __forceinline__ void bitonic_desc(u64* buf, int P) {
  for (int size = 2; size <= P; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = static_cast<int>(threadIdx.x); i < P / 2; i += kThreads) {
        const int lo = 2 * i - (i & (stride - 1)), hi = lo + stride;
        const bool desc = (lo & size) == 0;
        const u64 a = buf[lo], b = buf[hi];
        if ((a < b) == desc) {
          buf[lo] = b;
          buf[hi] = a;
        }
      }
      __syncthreads();
    }
  }
}

// Merges one tile's keys (0 = none) into the block's top n (buf[0, n)). Every thread calls it.
__device__ void select_tile(const u64 (&key)[kItems], int n, const Smem& sm) {
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31;
  const int cap = kSlots - n;
  u64 lo = sm.buf[n - 1];  // theta: the current n-th key (0 while fewer than n)
  int mine = count_above(key, lo);
  int total = block_sum(mine, sm.ired);
  if (total > cap) {
    // Lower bound of the tile's n-th key: >= ceil(n/8) thread maxima per warp lie at or above the
    // warp's ceil(n/8)-th largest thread maximum, so >= n keys lie at or above the min over warps.
    u64 tmax = 0;
#pragma unroll
    for (int i = 0; i < kItems; ++i) tmax = key[i] > tmax ? key[i] : tmax;
    const int kth = (n + kWarps - 1) / kWarps;
    u64 w = tmax;
    if (kth == 1) {
      w = warp_ext<true>(tmax);
    } else {  // bitonic sort of the warp's 32 maxima, descending over the lanes
      for (int size = 2; size <= 32; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
          const u64 o = __shfl_xor_sync(0xffffffffu, w, stride);
          const bool keep_max = ((lane & size) == 0) == ((lane & stride) == 0);
          w = keep_max ? (o > w ? o : w) : (o < w ? o : w);
        }
      }
      w = __shfl_sync(0xffffffffu, w, kth - 1);
    }
    const u64 tau = block_ext<false>(w, sm.ured);
    if (tau > lo + 1) lo = tau - 1;  // survivors: key >= tau (and > theta)
    mine = count_above(key, lo);
    total = block_sum(mine, sm.ired);
    if (total > cap) {  // rare: bisect (lo, hi] for n <= count(> t) <= cap (keys are unique)
      u64 hi = block_ext<true>(tmax, sm.ured);
      for (;;) {
        const u64 mid = lo + (hi - lo) / 2;
        const int c = block_sum(count_above(key, mid), sm.ired);
        if (c > cap) {
          lo = mid;
        } else if (c < n) {
          hi = mid;
        } else {
          lo = mid;
          total = c;
          break;
        }
      }
      mine = count_above(key, lo);
    }
  }
  if (total == 0) return;  // uniform
  if (tid == 0) *sm.count = 0;
  __syncthreads();
  int off = n + atomicAdd(sm.count, mine);  // placement only: the sort below fixes the order
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    if (key[i] > lo) sm.buf[off++] = key[i];
  }
  int P = 1;
  while (P < n + total) P <<= 1;
  for (int i = n + total + tid; i < P; i += kThreads) sm.buf[i] = 0;
  __syncthreads();
  bitonic_desc(sm.buf, P);
}

// ---- kernel 1: per-slice statistics and top n -------------------------------------------------

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) beam_partial(Params p) {
  const Smem sm = smem_layout();
  unsigned char* ban = reinterpret_cast<unsigned char*>(sm.count + 4);  // [kTile] banned marks
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t item = blockIdx.x, row = item / p.nblk;
  const int64_t v0 = (item - row * p.nblk) * p.slice;
  const int64_t v1 = v0 + p.slice < p.V ? v0 + p.slice : p.V;
  const T* x = static_cast<const T*>(p.logits) + row * p.ld;
  for (int i = tid; i < p.n; i += kThreads) sm.buf[i] = 0;
  __syncthreads();
  float m = -INFINITY, s = 0.0f;
  for (int64_t t0 = v0; t0 < v1; t0 += kTile) {
    float xv[kItems];
#pragma unroll
    for (int c = 0; c < kItems / VEC; ++c) {
      const int64_t e0 = t0 + static_cast<int64_t>(c * kThreads + tid) * VEC;
      if (VEC > 1 && e0 + VEC <= v1) {
        float f[VEC];
        cuda::load_floats<T, VEC>(x + e0, f);
#pragma unroll
        for (int e = 0; e < VEC; ++e) xv[c * VEC + e] = f[e];
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) xv[c * VEC + e] = e0 + e < v1 ? to_float(x[e0 + e]) : -INFINITY;
      }
    }
    float tmax = -INFINITY;  // NaN sticky
#pragma unroll
    for (int i = 0; i < kItems; ++i) tmax = (xv[i] > tmax || xv[i] != xv[i]) ? xv[i] : tmax;
    if (m == m) {
      if (tmax != tmax) {
        m = NAN;
      } else if (tmax > m) {
        s = m == -INFINITY ? 0.0f : s * exp2f((m - tmax) * kLog2e);
        m = tmax;
      }
      if (m == m && m != -INFINITY) {
#pragma unroll
        for (int i = 0; i < kItems; ++i) s += exp2f((xv[i] - m) * kLog2e);
      }
    }
    if (p.nb > 0) {  // uniform: mark the tile's banned ids
      for (int i = tid; i < kTile; i += kThreads) ban[i] = 0;
      __syncthreads();
      for (int i = tid; i < p.nb; i += kThreads) {
        const int64_t v = p.banned[i];
        if (v >= t0 && v < t0 + kTile && v < v1) ban[v - t0] = 1;
      }
      __syncthreads();
    }
    u64 key[kItems];
#pragma unroll
    for (int c = 0; c < kItems / VEC; ++c) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const int local = (c * kThreads + tid) * VEC + e;
        const int64_t v = t0 + local;
        const bool ok = v < v1 && !(p.nb > 0 && ban[local]);
        key[c * VEC + e] = ok ? make_key(ord_of(xv[c * VEC + e], false), static_cast<uint32_t>(v)) : 0;
      }
    }
    select_tile(key, p.n, sm);
  }
  // The slice's statistics: butterfly over the warp (commutative combine: every lane equal), then
  // the warps in order.
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    stats_combine(m, s, m2, s2);
  }
  float* red = reinterpret_cast<float*>(sm.ured);  // free: block_ext is not called any more
  __syncthreads();
  if ((tid & 31) == 0) {
    red[2 * (tid >> 5)] = m;
    red[2 * (tid >> 5) + 1] = s;
  }
  __syncthreads();
  if (tid == 0) {
    float M = red[0], S = red[1];
    for (int w = 1; w < kWarps; ++w) stats_combine(M, S, red[2 * w], red[2 * w + 1]);
    p.ws_stats[2 * item] = M;
    p.ws_stats[2 * item + 1] = S;
  }
  for (int i = tid; i < p.n; i += kThreads) p.ws_keys[item * p.n + i] = sm.buf[i];
}

// ---- kernel 2: per batch row, statistics merge, scores, top n, boundary ties -------------------

template <typename T>
__global__ void __launch_bounds__(kThreads) beam_merge(Params p) {
  const Smem sm = smem_layout();
  float* rowM = reinterpret_cast<float*>(sm.count + 4);  // [K] row max, [K] lse, [K] beam score
  float* rowL = rowM + kBeamSearchMaxBeams;
  float* rowB = rowL + kBeamSearchMaxBeams;
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int64_t b = blockIdx.x;
  const int K = p.K, n = p.n, nblk = p.nblk;
  if (tid < K) {
    const int64_t r = b * K + tid;
    float M = p.ws_stats[2 * r * nblk], S = p.ws_stats[2 * r * nblk + 1];
    for (int j = 1; j < nblk; ++j) stats_combine(M, S, p.ws_stats[2 * (r * nblk + j)], p.ws_stats[2 * (r * nblk + j) + 1]);
    rowM[tid] = M;
    rowL[tid] = logf(S);  // S = 0 (all -inf): -inf, and x - M is NaN: NaN scores, as torch
    rowB[tid] = p.beam[r];
  }
  for (int i = tid; i < n; i += kThreads) sm.buf[i] = 0;
  __syncthreads();
  const u64* cand = p.ws_keys + b * K * nblk * n;
  const int64_t total = static_cast<int64_t>(K) * nblk * n, per_row = static_cast<int64_t>(nblk) * n;
  for (int64_t c0 = 0; c0 < total; c0 += kTile) {
    u64 key[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t c = c0 + i * kThreads + tid;
      const u64 lk = c < total ? cand[c] : 0;
      key[i] = 0;
      if (lk != 0) {
        const int k = static_cast<int>(c / per_row);
        const float sc = ((float_of(static_cast<uint32_t>(lk >> 32)) - rowM[k]) - rowL[k]) + rowB[k];
        key[i] = make_key(ord_of(sc, true), static_cast<uint32_t>(k * p.V + key_index(lk)));
      }
    }
    select_tile(key, n, sm);
  }
  __syncthreads();
  // Boundary ties: is an element scoring s* possibly missing from the candidates?
  const uint32_t ninf = ord_of(-INFINITY, true);
  const u64 last = sm.buf[n - 1];
  const uint32_t star = last != 0 ? static_cast<uint32_t>(last >> 32) : ninf;
  int flag = star == ninf ? 1 : 0;
  for (int i = tid; i < K * nblk; i += kThreads) {
    const u64 wk = cand[static_cast<int64_t>(i) * n + n - 1];  // a full list's worst entry
    if (wk != 0) {
      const int k = i / nblk;
      const float sc = ((float_of(static_cast<uint32_t>(wk >> 32)) - rowM[k]) - rowL[k]) + rowB[k];
      flag |= ord_of(sc, true) == star ? 1 : 0;
    }
  }
  if (block_sum(flag, sm.ired) > 0) {
    int better = 0;  // keep the entries strictly above s*; fill up in flat order
    for (int i = tid; i < n; i += kThreads) better += static_cast<uint32_t>(sm.buf[i] >> 32) > star ? 1 : 0;
    int filled = block_sum(better, sm.ired);
    const int64_t KV = static_cast<int64_t>(K) * p.V;
    for (int64_t f0 = 0; f0 < KV && filled < n; f0 += kThreads) {
      const int64_t f = f0 + tid;
      bool match = false;
      if (f < KV) {
        const int k = static_cast<int>(f / p.V);
        const int64_t v = f - k * p.V;
        const float xf = to_float(static_cast<const T*>(p.logits)[(b * K + k) * p.ld + v]);
        match = ord_of(((xf - rowM[k]) - rowL[k]) + rowB[k], true) == star;
        if (p.nb > 0 && (match || star == ninf)) {  // a banned id scores -inf
          bool ban = false;
          for (int i = 0; i < p.nb && !ban; ++i) ban = p.banned[i] == v;
          if (ban) match = star == ninf;
        }
      }
      const unsigned bal = __ballot_sync(0xffffffffu, match ? 1 : 0);
      __syncthreads();
      if (lane == 0) sm.ired[warp] = __popc(bal);
      __syncthreads();
      int before = 0, chunk = 0;
      for (int w = 0; w < kWarps; ++w) {
        before += w < warp ? sm.ired[w] : 0;
        chunk += sm.ired[w];
      }
      const int pos = filled + before + __popc(bal & ((1u << lane) - 1u));
      if (match && pos < n) sm.buf[pos] = make_key(star, static_cast<uint32_t>(f));
      filled += chunk;
    }
  }
  __syncthreads();
  for (int i = tid; i < n; i += kThreads) {
    const u64 key = sm.buf[i];
    const uint32_t f = key_index(key);
    p.out_scores[b * n + i] = key != 0 ? float_of(static_cast<uint32_t>(key >> 32)) : -INFINITY;
    p.out_tokens[b * n + i] = key != 0 ? static_cast<int64_t>(f % p.V) : 0;
    p.out_beams[b * n + i] = key != 0 ? static_cast<int64_t>(f / p.V) : 0;
  }
}

// ---- host side ----------------------------------------------------------------------------------

struct Plan {
  int64_t nblk, slice;
};

// From the sizes and the SM count only (the workspace size must not depend on dtype or layout).
Plan plan(int64_t B, int64_t K, int64_t V, int64_t n) {
  const int64_t rows = std::max<int64_t>(B * K, 1);
  const int64_t target = kBlocksPerSm * cuda::sm_count(cuda::current_device());
  int64_t nblk = std::min(ceil_div(target, rows), ceil_div(V, kTile));
  nblk = std::max<int64_t>(1, std::min(nblk, kMaxMergeCands / (K * n)));
  const int64_t slice = ceil_div(ceil_div(V, nblk), kTile) * kTile;
  return Plan{ceil_div(V, slice), slice};
}

int64_t workspace_bytes(int64_t B, int64_t K, int64_t n, const Plan& pl) {
  return B * K * pl.nblk * (n * static_cast<int64_t>(sizeof(u64)) + 2 * static_cast<int64_t>(sizeof(float)));
}

template <typename T, int VEC>
void launch_partial(const Params& p, int64_t grid, cudaStream_t stream, const char* op) {
  cuda::launch(beam_partial<T, VEC>, grid, kThreads, kSmemBytes + kTile, stream, op, p);
}

}  // namespace

int64_t beam_search_step_cuda_workspace_bytes(const BeamSearchStepArgs& a) {
  validate_beam_search_step(a, "beam_search_step_cuda_workspace_bytes");
  const int64_t B = a.beam_scores.sizes[0], K = a.beam_scores.sizes[1], V = a.logits.sizes[1];
  const int64_t n = a.out_scores.sizes[1];
  if (B == 0) return 0;
  return workspace_bytes(B, K, n, plan(B, K, V, n));
}

void beam_search_step_cuda(const BeamSearchStepArgs& a, void* workspace, void* stream_ptr) {
  const char* op = "beam_search_step_cuda";
  validate_beam_search_step(a, op);
  cuda::require_cuda_dtype(a.logits.dtype, op);
  const int64_t B = a.beam_scores.sizes[0], K = a.beam_scores.sizes[1], V = a.logits.sizes[1];
  const int64_t n = a.out_scores.sizes[1];
  if (B == 0) return;
  PYDL_CHECK(K * V < (int64_t{1} << 32) - 1, op, ": K * V = ", K * V,
             " is above the CUDA kernel's limit of 2^32 - 2 (flat indices are 32-bit)");
  const Plan pl = plan(B, K, V, n);
  PYDL_CHECK(workspace != nullptr, op, ": a workspace of ", workspace_bytes(B, K, n, pl),
             " bytes is required (beam_search_step_cuda_workspace_bytes)");
  PYDL_CHECK((reinterpret_cast<uintptr_t>(workspace) & 7u) == 0, op, ": the workspace must be 8-byte aligned");
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  Params p{};
  p.logits = a.logits.data;
  p.ld = B * K > 1 ? a.logits.strides[0] : V;
  p.V = V;
  p.K = static_cast<int>(K);
  p.n = static_cast<int>(n);
  p.nblk = static_cast<int>(pl.nblk);
  p.slice = pl.slice;
  p.beam = a.beam_scores.ptr<const float>();
  p.nb = a.banned.defined ? static_cast<int>(std::min<int64_t>(a.banned.sizes[0], 0x7fffffff)) : 0;
  p.banned = p.nb > 0 ? a.banned.ptr<const int64_t>() : nullptr;
  p.ws_keys = static_cast<u64*>(workspace);
  p.ws_stats = reinterpret_cast<float*>(p.ws_keys + B * K * pl.nblk * n);
  p.out_scores = a.out_scores.ptr<float>();
  p.out_tokens = a.out_tokens.ptr<int64_t>();
  p.out_beams = a.out_beams.ptr<int64_t>();
  cuda::dispatch_cuda_dtype(a.logits.dtype, op, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = cuda::kVec16<T>;
    const bool vec = cuda::aligned16(a.logits) && p.ld % kVec == 0;
    if (vec) {
      launch_partial<T, kVec>(p, B * K * pl.nblk, stream, op);
    } else {
      launch_partial<T, 1>(p, B * K * pl.nblk, stream, op);
    }
    cuda::launch(beam_merge<T>, B, kThreads, kSmemBytes + 3 * kBeamSearchMaxBeams * sizeof(float), stream, op, p);
  });
}

}  // namespace pydl
