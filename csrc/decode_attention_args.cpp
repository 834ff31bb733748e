// Argument validation shared by the CPU and CUDA decode-attention kernels (see
// pydl/decode_attention.h). Does not read cache_seqlens (on CUDA it lives on the device).
#include "pydl/decode_attention.h"

namespace pydl {
namespace {

bool is_float_dtype(DType t) {
  return t == DType::kFloat32 || t == DType::kFloat16 || t == DType::kBFloat16 ||
         t == DType::kFloat64;
}

// Rank `ndim`, unit stride along the last dim (when it has more than one element), no negative
// strides (views of a cache only ever step forward).
void check_strided(const TensorView& t, int ndim, const char* op, const char* name) {
  require_defined(t, op, name);
  require_rank(t, ndim, op, name);
  PYDL_CHECK(t.sizes[ndim - 1] <= 1 || t.strides[ndim - 1] == 1, op, ": ", name,
             " must have unit stride along its last dim");
  for (int d = 0; d < ndim; ++d) {
    PYDL_CHECK(t.strides[d] >= 0, op, ": ", name, " has a negative stride along dim ", d);
  }
}

void check_size(const TensorView& t, int dim, int64_t want, const char* op, const char* name,
                const char* what) {
  PYDL_CHECK(t.sizes[dim] == want, op, ": ", name, " shape ", t.shape_str(), " must have ", what,
             " = ", want, " along dim ", dim);
}

}  // namespace

void validate_decode_attention(const DecodeAttentionArgs& a, const char* op) {
  check_strided(a.q, 3, op, "q");
  check_strided(a.k_cache, 4, op, "k_cache");
  check_strided(a.v_cache, 4, op, "v_cache");
  check_strided(a.out, 3, op, "out");
  const int64_t B = a.q.sizes[0], H = a.q.sizes[1], E = a.q.sizes[2];
  const int64_t Hkv = a.k_cache.sizes[1], L = a.k_cache.sizes[2], Ev = a.v_cache.sizes[3];
  PYDL_CHECK(is_float_dtype(a.q.dtype), op, ": q must be a floating-point tensor, got ",
             dtype_name(a.q.dtype));
  require_dtype(a.k_cache, a.q.dtype, op, "k_cache");
  require_dtype(a.v_cache, a.q.dtype, op, "v_cache");
  require_dtype(a.out, a.q.dtype, op, "out");
  PYDL_CHECK(E >= 1 && Ev >= 1, op, ": head dims must be >= 1, got E = ", E, ", Ev = ", Ev);
  PYDL_CHECK(Hkv >= 1 && H % Hkv == 0, op, ": q's heads (", H,
             ") must be a multiple of k_cache's heads (", Hkv, ")");
  check_size(a.k_cache, 0, B, op, "k_cache", "batch");
  check_size(a.k_cache, 3, E, op, "k_cache", "head dim E");
  check_size(a.v_cache, 0, B, op, "v_cache", "batch");
  check_size(a.v_cache, 1, Hkv, op, "v_cache", "k_cache's heads");
  check_size(a.v_cache, 2, L, op, "v_cache", "k_cache's length");
  check_size(a.out, 0, B, op, "out", "batch");
  check_size(a.out, 1, H, op, "out", "q's heads");
  check_size(a.out, 2, Ev, op, "out", "v_cache's head dim");
  require_defined(a.cache_seqlens, op, "cache_seqlens");
  require_rank(a.cache_seqlens, 1, op, "cache_seqlens");
  PYDL_CHECK(a.cache_seqlens.sizes[0] == B, op, ": cache_seqlens must have shape (", B,
             ",), got ", a.cache_seqlens.shape_str());
  PYDL_CHECK(a.cache_seqlens.dtype == DType::kInt32 || a.cache_seqlens.dtype == DType::kInt64,
             op, ": cache_seqlens must have dtype int32 or int64, got ",
             dtype_name(a.cache_seqlens.dtype));
  require_contiguous(a.cache_seqlens, op, "cache_seqlens");
  PYDL_CHECK(a.scale == a.scale && a.scale - a.scale == 0.0, op, ": scale must be finite, got ",
             a.scale);
}

}  // namespace pydl
