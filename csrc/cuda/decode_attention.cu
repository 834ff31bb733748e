// Decode attention on CUDA: split-K "flash decoding" (contract: include/pydl/decode_attention.h).
//
// Work split. One thread block per (batch row b, KV head, head group, split): the cache rows
// [split * split_len, (split + 1) * split_len) of that KV head, clipped to the row's length (read
// on the device, clamped to [0, L]), serve all GB query heads of the head group (GB = the G = H /
// Hkv query heads of the KV head, up to 8 per block: K and V are read once per head group). The
// split count comes from L, the work units B * Hkv * ceil(G / 8) and the SM count (cached): small
// batches are split along L until about kBlocksPerSm blocks per SM exist, each split reading at
// least kMinSplitLen positions. One split: the block normalizes and writes `out` itself (no
// workspace). Several: each block writes its unnormalized partial output and its (max, sum)
// softmax statistics to the float32 workspace, and decode_combine merges the splits of each
// (b, h) by their statistics.
//
// A block (kThreads = 128) walks its positions in tiles of kTile = 128, three phases per tile:
//   1. scores: groups of TPP threads (a power of two <= 32) per position; each thread loads its
//      VEC-element chunks of the key row (16-byte loads on the vector path), dots them with the
//      GB scaled queries held in shared memory (fp32), a transposed shuffle butterfly sums the
//      group (log2 GB halving steps, then plain steps: GB - 1 + log2(TPP / GB) shuffles instead of
//      GB * log2(TPP)) -> s[g][j] in shared memory (-inf past the row's length: never read);
//   2. online softmax: warp w updates heads g = w, w + 4: tile max, running max m, p = exp2(s - m)
//      written back, running sum l, rescale factor alpha (scores carry scale * log2(e));
//   3. values: groups of TPPV threads per position, each thread owning ITEMS chunks of Ev for all
//      GB heads (fp32 accumulators in registers: GB * ITEMS * VEC <= 64), acc = acc * alpha + p v.
// The position groups' accumulators are then summed through shared memory (fixed order).
// Vector path (VEC = 16 bytes / element) when E and Ev are multiples of VEC and the caches' base
// pointers and batch / head / position strides keep 16-byte alignment (checked on the host);
// else VEC = 1. q and out are read / written element by element (tiny next to the cache).
// Index math in int64. Limits: Ev <= 512 * VEC; E up to what fits 48 KB of shared memory (~11k).
#include "cuda_utils.cuh"  // first: binds the CUDA storage types

#include <cmath>
#include <string>

#include "pydl/decode_attention.h"

namespace pydl {
namespace {

using cuda::ceil_div;
using cuda::from_float;
using cuda::load_floats;
using cuda::to_float;

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 128;         // positions per step (a multiple of kThreads / TPP)
constexpr int64_t kMinSplitLen = 256;  // a split reads at least this many positions
constexpr int64_t kMaxSplits = 64;
constexpr int64_t kBlocksPerSm = 4;    // split until about this many blocks per SM exist
constexpr int kMaxHeadsPerBlock = 8;
constexpr int kAccFloats = 64;     // accumulator registers per thread: GB * ITEMS * VEC
constexpr int kMaxItems = 4;       // Ev chunks per thread (Ev <= kThreads * kMaxItems * VEC)
constexpr size_t kSmemLimit = 48 * 1024;
constexpr float kLog2e = 1.4426950408889634f;

struct DecodeParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  const void* lens;
  int lens64;  // cache_seqlens is int64 (else int32)
  int64_t q_sb, q_sh, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl, o_sb, o_sh;
  int64_t L;
  int H, Hkv, G, head_groups, E, Ev;
  int splits;
  int64_t split_len;  // positions per split, a multiple of kTile
  float scale_log2;   // scale * log2(e): softmax in base 2
  int tpp;            // threads per position, keys (power of two <= 32)
  int tppv;           // threads per position, values (power of two <= kThreads)
  float* ws_o;        // (B, H, splits, Ev) unnormalized partial outputs; null: one split
  float* ws_ml;       // (B, H, splits, 2) running max (base 2) and sum
};

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, cuda::shfl_xor(v, offset));
  return v;
}

// Sums v[0..N) (N a power of two) over each aligned group of `width` lanes (a power of two <= 32)
// with a transposed butterfly: at each of the first log2(N) steps a lane keeps one half of its
// live values and sends the other half to its partner (N/2 + N/4 + ... shuffles instead of N per
// step), then plain butterfly steps. On return the lane holds the group sums of heads
// first .. first + live - 1 in v[0 .. live); live = 0 for the lanes duplicating another's values
// (one lane writes each head). All 32 lanes of the warp must call it (shuffles).
template <int N>
__device__ __forceinline__ void group_sum_transposed(float (&v)[N], int width, int lane,
                                                     int& first, int& live) {
  int n = N, offset = width >> 1;
  first = 0;
#pragma unroll
  for (int half = N / 2; half >= 1; half /= 2) {
    if (offset > 0) {  // warp-uniform
      const bool upper = (lane & offset) != 0;
#pragma unroll
      for (int i = 0; i < half; ++i) {
        const float send = upper ? v[i] : v[i + half];
        const float keep = upper ? v[i + half] : v[i];
        v[i] = keep + cuda::shfl_xor(send, offset);
      }
      if (upper) first += half;
      n = half;
      offset >>= 1;
    }
  }
  const int dup_mask = offset > 0 ? 2 * offset - 1 : 0;  // lanes that will hold the same sum
  for (; offset > 0; offset >>= 1) v[0] += cuda::shfl_xor(v[0], offset);
  live = (lane & dup_mask) == 0 ? n : 0;
}

__device__ __forceinline__ int64_t row_length(const DecodeParams& p, int64_t b) {
  const int64_t n = p.lens64 ? static_cast<const int64_t*>(p.lens)[b]
                             : static_cast<int64_t>(static_cast<const int32_t*>(p.lens)[b]);
  return n < 0 ? 0 : (n > p.L ? p.L : n);
}

// Shared memory (floats): ml [GB][4] (m, l, alpha) | q [GB][E] | s [GB][kTile]; after the last
// tile the accumulator reduction [kThreads / TPPV][GB][Ev] reuses the space from q on.
template <typename T, int VEC, int GB, int ITEMS>
__global__ void __launch_bounds__(kThreads) decode_split(DecodeParams p) {
  float* ml = cuda::dynamic_smem<float>();
  float* qs = ml + GB * 4;
  float* ss = qs + GB * p.E;
  const int tid = static_cast<int>(threadIdx.x);

  int64_t blk = blockIdx.x;
  const int split = static_cast<int>(blk % p.splits);
  blk /= p.splits;
  const int hg = static_cast<int>(blk % p.head_groups);
  blk /= p.head_groups;
  const int hkv = static_cast<int>(blk % p.Hkv);
  const int64_t b = blk / p.Hkv;
  const int h0 = hkv * p.G + hg * GB;               // first query head of the block
  const int ng = p.G - hg * GB < GB ? p.G - hg * GB : GB;            // its query heads (the rest compute zeros)
  const int64_t len = row_length(p, b);
  const int64_t start = static_cast<int64_t>(split) * p.split_len;
  const int64_t end = start + p.split_len < len ? start + p.split_len : len;

  const T* q = static_cast<const T*>(p.q) + b * p.q_sb + static_cast<int64_t>(h0) * p.q_sh;
  for (int i = tid; i < GB * p.E; i += kThreads) {
    const int g = i / p.E;
    qs[i] = g < ng ? to_float(q[g * p.q_sh + (i - g * p.E)]) * p.scale_log2 : 0.0f;
  }
  if (tid < GB) {
    ml[tid * 4 + 0] = -INFINITY;
    ml[tid * 4 + 1] = 0.0f;
    ml[tid * 4 + 2] = 0.0f;
  }
  __syncthreads();

  const T* kbase = static_cast<const T*>(p.k) + b * p.k_sb + hkv * p.k_sh;
  const T* vbase = static_cast<const T*>(p.v) + b * p.v_sb + hkv * p.v_sh;
  const int ce = p.E / VEC, cv = p.Ev / VEC;
  const int lane_k = tid % p.tpp, npg = kThreads / p.tpp;
  const int lane_v = tid % p.tppv, pgv = tid / p.tppv, npgv = kThreads / p.tppv;
  const int warp = tid / 32, lane = tid % 32;

  float acc[GB][ITEMS][VEC];
#pragma unroll
  for (int g = 0; g < GB; ++g)
#pragma unroll
    for (int i = 0; i < ITEMS; ++i)
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[g][i][e] = 0.0f;

  for (int64_t t0 = start; t0 < end; t0 += kTile) {
    // 1. scores s[g][jj] (every lane of a warp runs the same number of iterations: shuffles)
    for (int jj = tid / p.tpp; jj < kTile; jj += npg) {
      const int64_t j = t0 + jj;
      float part[GB];
#pragma unroll
      for (int g = 0; g < GB; ++g) part[g] = 0.0f;
      if (j < end) {
        const T* krow = kbase + j * p.k_sl;
#pragma unroll 2
        for (int c = lane_k; c < ce; c += p.tpp) {
          float kv[VEC];
          load_floats<T, VEC>(krow + static_cast<int64_t>(c) * VEC, kv);
#pragma unroll
          for (int g = 0; g < GB; ++g) {
            const float* qg = qs + g * p.E + c * VEC;
#pragma unroll
            for (int e = 0; e < VEC; ++e) part[g] = fmaf(qg[e], kv[e], part[g]);
          }
        }
      }
      int first = 0, live = 0;
      group_sum_transposed<GB>(part, p.tpp, lane_k, first, live);
      if (live > 0) {
#pragma unroll
        for (int i = 0; i < GB; ++i) {
          if (i < live) ss[(first + i) * kTile + jj] = j < end ? part[i] : -INFINITY;
        }
      }
    }
    __syncthreads();
    // 2. online softmax, one warp per head
    for (int g = warp; g < GB; g += kWarps) {
      float sv[kTile / 32];
      float mx = -INFINITY;
#pragma unroll
      for (int i = 0; i < kTile / 32; ++i) {
        sv[i] = ss[g * kTile + lane + 32 * i];
        mx = fmaxf(mx, sv[i]);
      }
      mx = warp_max(mx);
      const float m_old = ml[g * 4 + 0];
      const float m_new = fmaxf(m_old, mx);
      float sum = 0.0f;
#pragma unroll
      for (int i = 0; i < kTile / 32; ++i) {
        const float e = exp2f(sv[i] - m_new);
        ss[g * kTile + lane + 32 * i] = e;
        sum += e;
      }
      sum = cuda::warp_sum(sum);
      if (lane == 0) {
        const float alpha = exp2f(m_old - m_new);  // 0 on the first tile (m_old = -inf)
        ml[g * 4 + 0] = m_new;
        ml[g * 4 + 1] = ml[g * 4 + 1] * alpha + sum;
        ml[g * 4 + 2] = alpha;
      }
    }
    __syncthreads();
    // 3. acc = acc * alpha + sum_j p[g][j] v[j]
#pragma unroll
    for (int g = 0; g < GB; ++g) {
      const float alpha = ml[g * 4 + 2];
#pragma unroll
      for (int i = 0; i < ITEMS; ++i)
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[g][i][e] *= alpha;
    }
    for (int jj = pgv; jj < kTile; jj += npgv) {
      const int64_t j = t0 + jj;
      if (j >= end) break;
      const T* vrow = vbase + j * p.v_sl;
      float pj[GB];
#pragma unroll
      for (int g = 0; g < GB; ++g) pj[g] = ss[g * kTile + jj];
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int c = lane_v + i * p.tppv;
        if (c < cv) {
          float vv[VEC];
          load_floats<T, VEC>(vrow + static_cast<int64_t>(c) * VEC, vv);
#pragma unroll
          for (int g = 0; g < GB; ++g)
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[g][i][e] = fmaf(pj[g], vv[e], acc[g][i][e]);
        }
      }
    }
    __syncthreads();
  }

  // Sum the position groups' accumulators (the loop ended with a barrier: q / s are free).
  float* red = qs;
#pragma unroll
  for (int g = 0; g < GB; ++g)
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int c = lane_v + i * p.tppv;
      if (c < cv) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) red[(pgv * GB + g) * p.Ev + c * VEC + e] = acc[g][i][e];
      }
    }
  __syncthreads();
  const int64_t bh0 = b * p.H + h0;  // (b, h0) row of the workspace
  for (int idx = tid; idx < ng * p.Ev; idx += kThreads) {
    const int g = idx / p.Ev, e = idx - g * p.Ev;
    float o = 0.0f;
    for (int pg = 0; pg < npgv; ++pg) o += red[(pg * GB + g) * p.Ev + e];
    if (p.ws_o == nullptr) {
      const float l = ml[g * 4 + 1];
      T* out = static_cast<T*>(p.out) + b * p.o_sb + static_cast<int64_t>(h0 + g) * p.o_sh;
      out[e] = from_float<T>(l == 0.0f ? 0.0f : o / l);  // length 0: 0
    } else {
      p.ws_o[((bh0 + g) * p.splits + split) * p.Ev + e] = o;
    }
  }
  if (p.ws_o != nullptr && tid < ng) {
    float* st = p.ws_ml + ((bh0 + tid) * p.splits + split) * 2;
    st[0] = ml[tid * 4 + 0];
    st[1] = ml[tid * 4 + 1];
  }
}

// One block per (b, h): out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s over the splits
// that saw a position (l_s != 0; the others' partial outputs are never read). No split: 0.
template <typename T>
__global__ void __launch_bounds__(kThreads) decode_combine(const float* __restrict__ ws_o,
                                                           const float* __restrict__ ws_ml,
                                                           T* __restrict__ out, int H, int Ev,
                                                           int splits, int64_t o_sb, int64_t o_sh) {
  const int64_t row = blockIdx.x;  // b * H + h
  const int64_t b = row / H, h = row - b * H;
  const float* st = ws_ml + row * splits * 2;
  float mx = -INFINITY;
  for (int s = 0; s < splits; ++s) {
    if (st[2 * s + 1] != 0.0f) mx = fmaxf(mx, st[2 * s]);
  }
  float den = 0.0f;
  for (int s = 0; s < splits; ++s) {
    const float l = st[2 * s + 1];
    if (l != 0.0f) den += l * exp2f(st[2 * s] - mx);
  }
  const float inv = den == 0.0f ? 0.0f : 1.0f / den;
  const float* o = ws_o + row * splits * Ev;
  T* dst = out + b * o_sb + h * o_sh;
  for (int e = static_cast<int>(threadIdx.x); e < Ev; e += static_cast<int>(blockDim.x)) {
    float num = 0.0f;
    for (int s = 0; s < splits; ++s) {
      if (st[2 * s + 1] != 0.0f) num += o[static_cast<int64_t>(s) * Ev + e] * exp2f(st[2 * s] - mx);
    }
    dst[e] = from_float<T>(num * inv);
  }
}

// ---- host side ----------------------------------------------------------------------------------

int pow2_ceil(int64_t n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

struct Split {
  int splits;
  int64_t len;  // positions per split
};

// From L, the work units B * Hkv * ceil(G / 8) and the SM count only (the workspace size must not
// depend on the dtype or the layout).
Split choose_split(int64_t B, int64_t H, int64_t Hkv, int64_t L) {
  const int64_t units = B * Hkv * ceil_div(H / Hkv, kMaxHeadsPerBlock);
  const int64_t target = kBlocksPerSm * cuda::sm_count(cuda::current_device());
  int64_t s = 1;
  if (units < target && L > kMinSplitLen) {
    s = std::min({ceil_div(target, units), ceil_div(L, kMinSplitLen), kMaxSplits});
  }
  const int64_t len = std::max<int64_t>(kTile, ceil_div(ceil_div(std::max<int64_t>(L, 1), s), kTile) * kTile);
  return Split{static_cast<int>(ceil_div(std::max<int64_t>(L, 1), len)), len};
}

template <typename T, int VEC, int GB, int ITEMS>
void launch_split(const DecodeParams& p, int64_t grid, size_t smem, cudaStream_t stream,
                  const char* op) {
  if constexpr (GB * ITEMS * VEC <= kAccFloats) {
    cuda::launch(decode_split<T, VEC, GB, ITEMS>, grid, kThreads, smem, stream, op, p);
  } else {
    throw std::logic_error(std::string(op) + ": no kernel for this configuration");
  }
}

template <typename T, int VEC, int GB>
void launch_items(int items, const DecodeParams& p, int64_t grid, size_t smem,
                  cudaStream_t stream, const char* op) {
  if constexpr (VEC == 1) {  // the scalar path: ITEMS = 4 only (one kernel per head count)
    launch_split<T, VEC, GB, kMaxItems>(p, grid, smem, stream, op);
  } else {
    switch (items) {
      case 1: return launch_split<T, VEC, GB, 1>(p, grid, smem, stream, op);
      case 2: return launch_split<T, VEC, GB, 2>(p, grid, smem, stream, op);
      default: return launch_split<T, VEC, GB, kMaxItems>(p, grid, smem, stream, op);
    }
  }
}

template <typename T, int VEC>
void launch_vec(int gb, int items, const DecodeParams& p, int64_t grid, size_t smem,
                cudaStream_t stream, const char* op) {
  switch (gb) {
    case 1: return launch_items<T, VEC, 1>(items, p, grid, smem, stream, op);
    case 2: return launch_items<T, VEC, 2>(items, p, grid, smem, stream, op);
    case 4: return launch_items<T, VEC, 4>(items, p, grid, smem, stream, op);
    default: return launch_items<T, VEC, 8>(items, p, grid, smem, stream, op);
  }
}

bool strides_multiple_of(const TensorView& t, int vec) {
  for (int d = 0; d + 1 < t.ndim; ++d) {
    if (t.sizes[d] > 1 && t.strides[d] % vec != 0) return false;
  }
  return true;
}

size_t smem_bytes(int gb, int64_t E, int64_t Ev, int tppv) {
  const int64_t loop = static_cast<int64_t>(gb) * (E + kTile);
  const int64_t reduce = static_cast<int64_t>(kThreads / tppv) * gb * Ev;
  return static_cast<size_t>(4 * (gb * 4 + std::max(loop, reduce)));
}

}  // namespace

int64_t decode_attention_cuda_workspace_floats(int64_t B, int64_t H, int64_t Hkv, int64_t L,
                                               int64_t Ev) {
  if (B <= 0 || H <= 0 || Hkv <= 0) return 0;
  const Split sp = choose_split(B, H, Hkv, L);
  return sp.splits > 1 ? B * H * sp.splits * (Ev + 2) : 0;
}

void decode_attention_cuda(const DecodeAttentionArgs& a, void* workspace, void* stream_ptr) {
  const char* op = "decode_attention_cuda";
  validate_decode_attention(a, op);
  cuda::require_cuda_dtype(a.q.dtype, op);
  const int64_t B = a.q.size(0), H = a.q.size(1), E = a.q.size(2);
  const int64_t Hkv = a.k_cache.size(1), L = a.k_cache.size(2), Ev = a.v_cache.size(3);
  if (B == 0 || H == 0) return;
  PYDL_CHECK(B * H * Ev < (int64_t{1} << 40) && H <= 0x7fffffff && E <= 0x7fffffff, op,
             ": sizes too large");
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  const Split sp = choose_split(B, H, Hkv, L);
  PYDL_CHECK(sp.splits == 1 || workspace != nullptr, op, ": a workspace of ",
             decode_attention_cuda_workspace_floats(B, H, Hkv, L, Ev),
             " floats is required (decode_attention_cuda_workspace_floats)");
  const int G = static_cast<int>(H / Hkv);

  cuda::dispatch_cuda_dtype(a.q.dtype, op, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = cuda::kVec16<T>;
    const bool vec = E % kVec == 0 && Ev % kVec == 0 && cuda::aligned16(a.k_cache) &&
                     cuda::aligned16(a.v_cache) && strides_multiple_of(a.k_cache, kVec) &&
                     strides_multiple_of(a.v_cache, kVec);
    const int VEC = vec ? kVec : 1;
    const int64_t cv = Ev / VEC;
    int items = cv <= kThreads ? 1 : cv <= 2 * kThreads ? 2 : kMaxItems;
    if (VEC == 1) items = kMaxItems;
    PYDL_CHECK(cv <= static_cast<int64_t>(kThreads) * kMaxItems, op, ": v_cache's head dim ", Ev,
               " is above the CUDA kernel's limit of ", kThreads * kMaxItems * VEC,
               vec ? "" : " (unaligned or odd-sized caches: scalar path)");
    int gb = std::min<int>(pow2_ceil(std::min(G, kMaxHeadsPerBlock)), kAccFloats / (items * VEC));
    const int tppv = pow2_ceil(ceil_div(cv, items));
    while (gb > 1 && smem_bytes(gb, E, Ev, tppv) > kSmemLimit) gb >>= 1;
    const size_t smem = smem_bytes(gb, E, Ev, tppv);
    PYDL_CHECK(smem <= kSmemLimit, op, ": head dim E = ", E, " is above the CUDA kernel's limit");

    DecodeParams p{};
    p.q = a.q.data;
    p.k = a.k_cache.data;
    p.v = a.v_cache.data;
    p.out = a.out.data;
    p.lens = a.cache_seqlens.data;
    p.lens64 = a.cache_seqlens.dtype == DType::kInt64;
    p.q_sb = a.q.stride(0);
    p.q_sh = a.q.stride(1);
    p.k_sb = a.k_cache.stride(0);
    p.k_sh = a.k_cache.stride(1);
    p.k_sl = a.k_cache.stride(2);
    p.v_sb = a.v_cache.stride(0);
    p.v_sh = a.v_cache.stride(1);
    p.v_sl = a.v_cache.stride(2);
    p.o_sb = a.out.stride(0);
    p.o_sh = a.out.stride(1);
    p.L = L;
    p.H = static_cast<int>(H);
    p.Hkv = static_cast<int>(Hkv);
    p.G = G;
    p.head_groups = static_cast<int>(ceil_div(G, gb));
    p.E = static_cast<int>(E);
    p.Ev = static_cast<int>(Ev);
    p.splits = sp.splits;
    p.split_len = sp.len;
    p.scale_log2 = static_cast<float>(a.scale) * kLog2e;
    p.tpp = pow2_ceil(std::min<int64_t>(E / VEC, 32));
    p.tppv = tppv;
    if (sp.splits > 1) {
      p.ws_o = static_cast<float*>(workspace);
      p.ws_ml = p.ws_o + B * H * sp.splits * Ev;
    }
    const int64_t grid = B * Hkv * p.head_groups * sp.splits;
    if (vec) {
      launch_vec<T, kVec>(gb, items, p, grid, smem, stream, op);
    } else {
      launch_vec<T, 1>(gb, items, p, grid, smem, stream, op);
    }
    if (sp.splits > 1) {
      const int block = static_cast<int>(std::min<int64_t>(kThreads, ceil_div(Ev, 32) * 32));
      cuda::launch(decode_combine<T>, B * H, block, 0, stream, op, p.ws_o, p.ws_ml,
                   static_cast<T*>(a.out.data), p.H, p.Ev, sp.splits, p.o_sb, p.o_sh);
    }
  });
}

}  // namespace pydl
