// Argument validation shared by the CPU and CUDA beam-search step kernels (see
// pydl/beam_search_step.h).
#include "pydl/beam_search_step.h"

namespace pydl {
namespace {

void check_matrix(const TensorView& t, int64_t rows, int64_t cols, DType dtype, const char* op,
                  const char* name) {
  require_defined(t, op, name);
  require_rank(t, 2, op, name);
  PYDL_CHECK(t.sizes[0] == rows && t.sizes[1] == cols, op, ": ", name, " must have shape (", rows,
             ", ", cols, "), got ", t.shape_str());
  require_dtype(t, dtype, op, name);
  require_contiguous(t, op, name);
}

}  // namespace

void validate_beam_search_step(const BeamSearchStepArgs& a, const char* op) {
  require_defined(a.logits, op, "logits");
  require_row_major_2d(a.logits, op, "logits");
  const DType dt = a.logits.dtype;
  PYDL_CHECK(dt == DType::kFloat32 || dt == DType::kFloat16 || dt == DType::kBFloat16 ||
                 dt == DType::kFloat64,
             op, ": logits must be a floating-point tensor, got ", dtype_name(dt));
  require_defined(a.beam_scores, op, "beam_scores");
  require_rank(a.beam_scores, 2, op, "beam_scores");
  const int64_t B = a.beam_scores.sizes[0], K = a.beam_scores.sizes[1], V = a.logits.sizes[1];
  PYDL_CHECK(K >= 1 && K <= kBeamSearchMaxBeams, op, ": the number of beams must be in [1, ",
             kBeamSearchMaxBeams, "], got ", K);
  PYDL_CHECK(B >= 0 && a.logits.sizes[0] == B * K, op, ": logits must have B*K = ", B * K,
             " rows (beam_scores is ", a.beam_scores.shape_str(), "), got ", a.logits.shape_str());
  PYDL_CHECK(V >= 1, op, ": logits must have a vocabulary of at least 1, got ", a.logits.shape_str());
  PYDL_CHECK(a.logits.sizes[0] <= 1 || a.logits.strides[0] >= V, op,
             ": logits rows must not overlap (row stride ", a.logits.strides[0], " < V = ", V, ")");
  const DType score_dt = dt == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32;
  check_matrix(a.beam_scores, B, K, score_dt, op, "beam_scores");
  require_defined(a.out_scores, op, "out_scores");
  require_rank(a.out_scores, 2, op, "out_scores");
  const int64_t n = a.out_scores.sizes[1];
  PYDL_CHECK(n >= 1 && n <= K * V && n <= kBeamSearchMaxCandidates, op,
             ": num_candidates must be in [1, min(K*V = ", K * V, ", ", kBeamSearchMaxCandidates,
             ")], got ", n);
  check_matrix(a.out_scores, B, n, score_dt, op, "out_scores");
  check_matrix(a.out_tokens, B, n, DType::kInt64, op, "out_tokens");
  check_matrix(a.out_beams, B, n, DType::kInt64, op, "out_beams");
  if (a.banned.defined) {
    require_rank(a.banned, 1, op, "banned");
    require_dtype(a.banned, DType::kInt64, op, "banned");
    require_contiguous(a.banned, op, "banned");
  }
}

}  // namespace pydl
