// Decode attention: one query token per (batch row, head) against a KV cache, for token-by-token
// generation (see pydl/ops/decode_attention.py for the public semantics).
//
//   out[b, h, :] = sum_{j < len_b} softmax_j(scale * q[b, h, :] . k[b, h / G, j, :]) v[b, h / G, j, :]
//
// with G = H / Hkv query heads per KV head (GQA; G = 1: multi-head), len_b = cache_seqlens[b].
// Positions j >= len_b are never read (they may hold garbage or NaN); len_b == 0 gives 0.
// Math in float32 (float64 for float64 inputs on CPU): an online softmax over the cache.
//
// Shapes and strides (in elements; the last dim of every tensor has unit stride):
//   q             : (B, H, E)          any batch / head strides
//   k_cache       : (B, Hkv, L, E)     any batch / head / position strides (slices of a larger cache)
//   v_cache       : (B, Hkv, L, Ev)    idem
//   cache_seqlens : (B,)               int32 or int64 (DType::kInt32 / kInt64, codes 4 / 5 of
//                                      dtype.h), contiguous, each in [0, L]
//   out           : (B, H, Ev)         any batch / head strides (Python passes a contiguous tensor)
// Dtypes: q, k_cache, v_cache and out share one dtype. CPU: float32, bfloat16, float64.
// CUDA: float32, float16, bfloat16.
#pragma once

#include <cstdint>

#include "pydl/check.h"
#include "pydl/tensor_view.h"

namespace pydl {

struct DecodeAttentionArgs {
  TensorView q;              // (B, H, E)
  TensorView k_cache;        // (B, Hkv, L, E)
  TensorView v_cache;        // (B, Hkv, L, Ev)
  TensorView cache_seqlens;  // (B,) int32 / int64
  TensorView out;            // out (B, H, Ev)
  double scale = 1.0;        // multiplies q . k
};

// Validates ranks, shapes (H % Hkv == 0, matching B / E / L / Ev), dtypes, unit last strides and
// presence. Throws std::invalid_argument naming the argument. Does not read cache_seqlens.
void validate_decode_attention(const DecodeAttentionArgs& a, const char* op);

// CPU kernel (csrc/cpu/decode_attention.cpp). Throws std::invalid_argument when a length is
// outside [0, L] (the CPU kernel reads cache_seqlens on the host).
void decode_attention_cpu(const DecodeAttentionArgs& a, int num_threads);

// CUDA kernels (csrc/cuda/decode_attention.cu): split-K flash decoding. `workspace` is float32
// scratch of decode_attention_cuda_workspace_floats(...) elements (0: none needed); `stream` is a
// cudaStream_t; the caller has made the tensors' device current. cache_seqlens is read on the
// device only: a length outside [0, L] is clamped to it (documented; Python's debug mode checks).
int64_t decode_attention_cuda_workspace_floats(int64_t B, int64_t H, int64_t Hkv, int64_t L,
                                               int64_t Ev);
void decode_attention_cuda(const DecodeAttentionArgs& a, void* workspace, void* stream);

}  // namespace pydl
