// CUDA weight-gradient reduction of the fused LayerNorm family: the backward kernels
// (layer_norm_bwd.cu) leave one float32 partial row [dw (N) | db (N)] per block in the workspace;
// ln_reduce_partials sums those rows per column (coalesced, fixed order: deterministic run to
// run) and writes dweight / dbias in the parameters' dtype (P: float32, float16 or bfloat16; a
// 16-bit x with float32 parameters gets float32 gradients). This file also sizes the workspace.
#include "layer_norm_common.cuh"  // first: it includes cuda_utils.cuh

namespace pydl {
namespace ln_cuda {
namespace {

constexpr int kReduceCols = 32;  // ln_reduce_partials: columns per block (one warp)
constexpr int kReduceRows = 32;  // ... and warps splitting the partial rows

// dweight[j] = sum_p ws[p, j], dbias[j] = sum_p ws[p, n + j], p < num_partials, fixed order.
// blockDim.x == kReduceCols * kReduceRows; dynamic smem kReduceRows * (kReduceCols + 1) floats.
template <typename P>
__global__ void __launch_bounds__(kReduceCols * kReduceRows)
    ln_reduce_partials(const float* __restrict__ ws, int64_t num_partials, int n,
                       P* __restrict__ dweight, P* __restrict__ dbias) {
  float* tile = cuda::dynamic_smem<float>();  // [kReduceRows][kReduceCols + 1]
  const int lane = static_cast<int>(threadIdx.x) % kReduceCols;
  const int part = static_cast<int>(threadIdx.x) / kReduceCols;
  const int64_t width = 2 * static_cast<int64_t>(n);
  for (int64_t col0 = static_cast<int64_t>(blockIdx.x) * kReduceCols; col0 < width;
       col0 += static_cast<int64_t>(gridDim.x) * kReduceCols) {
    const int64_t col = col0 + lane;
    float total = 0.0f;
    if (col < width) {
#pragma unroll 8
      for (int64_t p = part; p < num_partials; p += kReduceRows) total += ws[p * width + col];
    }
    tile[part * (kReduceCols + 1) + lane] = total;
    __syncthreads();
    if (part == 0 && col < width) {
      float sum = tile[lane];
      for (int j = 1; j < kReduceRows; ++j) sum += tile[j * (kReduceCols + 1) + lane];
      if (col < n) {
        if (dweight != nullptr) dweight[col] = from_float<P>(sum);
      } else if (dbias != nullptr) {
        dbias[col - n] = from_float<P>(sum);
      }
    }
    __syncthreads();  // the tile is rewritten by the next column block
  }
}

}  // namespace

void reduce_param_grads(const LayerNormBwdArgs& a, const float* ws, int64_t partials,
                        cudaStream_t stream, const char* op) {
  const int64_t n = a.x.size(1);
  const DType param = layer_norm_param_dtype(a.weight, a.bias, a.x.dtype);
  if (partials == 0) {  // no rows: the sums are zeros
    for (const TensorView* g : {&a.dweight, &a.dbias}) {
      if (g->defined) PYDL_CUDA_CHECK(cudaMemsetAsync(g->data, 0, n * dtype_size(param), stream));
    }
    return;
  }
  dispatch_cuda_dtype(param, op, [&](auto tag) {
    using P = decltype(tag);
    const int64_t tiles = ceil_div(2 * n, kReduceCols);
    cuda::launch(ln_reduce_partials<P>, tiles, kReduceCols * kReduceRows,
                 kReduceRows * (kReduceCols + 1) * sizeof(float), stream, op, ws, partials,
                 static_cast<int>(n), mptr<P>(a.dweight), mptr<P>(a.dbias));
  });
}

}  // namespace ln_cuda

int64_t layer_norm_bwd_cuda_num_partials(int64_t M, int64_t N) {
  // Upper bound of the backward grid (one wave of resident blocks): blocks of ~512 threads
  // (64 registers each) up to N = 4096, ~N / 8 threads up to 8192, 1024 threads beyond.
  const int64_t per_sm = std::clamp<int64_t>(16384 / std::max<int64_t>(N, 1), 2, 4);
  const int64_t p = static_cast<int64_t>(ln_cuda::sm_count(ln_cuda::current_device())) * per_sm;
  return std::max<int64_t>(1, std::min(std::max<int64_t>(M, 1), p));
}

}  // namespace pydl
