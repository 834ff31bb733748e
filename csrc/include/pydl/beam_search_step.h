// One beam-search step: the best continuations of every beam over the whole vocabulary, from one
// read of the logits (see pydl/ops/beam_search_step.py for the public semantics).
//
//   s[b, k, v] = log_softmax(logits[b*K + k, :])[v] + beam_scores[b, k]      (math in float32;
//                                                                             float64 for float64)
//   s[b, k, v] = -inf for v in `banned` (the normalizer still counts them: Hugging Face masks after
//                                        log_softmax, e.g. EOS before min_new_tokens)
//   (out_scores[b], flat) = topk(s[b].reshape(K*V), n)  sorted descending
//   out_tokens[b, i] = flat[i] % V,  out_beams[b, i] = flat[i] / V
//
// Ties (equal scores) are broken by the lower flat index k*V + v first, so the result is
// deterministic and equal on every backend (torch.topk does not promise an order for ties).
// NaN logits: a row holding NaN gives NaN scores for all of its entries, which rank above +inf
// (torch.topk's order); documented, not a use case.
//
// Shapes (in elements):
//   logits      : (B*K, V)  unit last stride, any row stride >= V; float32, float16, bfloat16
//                           (CPU: float32, bfloat16, float64)
//   beam_scores : (B, K)    contiguous, float32 (float64 with float64 logits)
//   banned      : (nb,)     contiguous int64 token ids in [0, V), or undefined (none)
//   out_scores  : (B, n)    contiguous, beam_scores' dtype
//   out_tokens  : (B, n)    contiguous int64
//   out_beams   : (B, n)    contiguous int64
// Limits: 1 <= K <= kBeamSearchMaxBeams, 1 <= n <= min(K*V, kBeamSearchMaxCandidates), V >= 1.
#pragma once

#include <cstdint>

#include "pydl/check.h"
#include "pydl/tensor_view.h"

namespace pydl {

constexpr int64_t kBeamSearchMaxBeams = 64;
constexpr int64_t kBeamSearchMaxCandidates = 256;

struct BeamSearchStepArgs {
  TensorView logits;       // (B*K, V)
  TensorView beam_scores;  // (B, K)
  TensorView banned;       // (nb,) int64 or undefined
  TensorView out_scores;   // out (B, n)
  TensorView out_tokens;   // out (B, n) int64
  TensorView out_beams;    // out (B, n) int64
};

// Validates ranks, shapes, dtypes, strides and the limits above; throws std::invalid_argument
// naming the argument. Does not read `banned` (on CUDA it lives on the device).
void validate_beam_search_step(const BeamSearchStepArgs& a, const char* op);

// CPU kernel (csrc/cpu/beam_search_step.cpp): OpenMP over batch x vocabulary blocks. Throws
// std::invalid_argument for a banned id outside [0, V).
void beam_search_step_cpu(const BeamSearchStepArgs& a, int num_threads);

// CUDA kernels (csrc/cuda/beam_search_step.cu): per-block online max / sum and partial top-n, then
// a merge. `workspace` is scratch of beam_search_step_cuda_workspace_bytes(a) bytes (0: none);
// `stream` is a cudaStream_t. Banned ids outside [0, V) are ignored on CUDA (no host read).
int64_t beam_search_step_cuda_workspace_bytes(const BeamSearchStepArgs& a);
void beam_search_step_cuda(const BeamSearchStepArgs& a, void* workspace, void* stream);

}  // namespace pydl
