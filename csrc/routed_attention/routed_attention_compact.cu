// Row compaction for routed attention (layout: routed_attention_common.cuh), and the workspace
// size the binding layer allocates for it.
//
// One block per (batch, head) walks the route flags in tiles of one flag per thread and appends
// the routed positions with a block-wide prefix sum (warp ballots, then the warps' counts), so
// the list comes out ascending and the same on every run.
#include "routed_attention_common.cuh"

namespace cram {
namespace cuda {
namespace {

constexpr int kCompactThreads = 256;

__global__ void __launch_bounds__(kCompactThreads)
compact_routed_rows_kernel(const RoutedAttentionParams p, const RoutedRows rows) {
  constexpr int kWarps = kCompactThreads / 32;
  __shared__ int warp_counts[kWarps];
  const int b = blockIdx.x / p.heads, h = blockIdx.x % p.heads;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint8_t* route = p.route + b * p.route_batch_stride + h * p.route_head_stride;
  int* positions = rows.positions + static_cast<long>(blockIdx.x) * p.seqlen_q;
  int written = 0;  // routed rows found in earlier tiles (the same in every thread)
  for (int tile = 0; tile < p.seqlen_q; tile += kCompactThreads) {
    const int i = tile + threadIdx.x;
    const bool routed = i < p.seqlen_q && route[i * p.route_row_stride] != 0;
    const unsigned ballot = __ballot_sync(0xffffffffu, routed);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int before = written + __popc(ballot & ((1u << lane) - 1u));
    int tile_count = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      before += w < warp ? warp_counts[w] : 0;
      tile_count += warp_counts[w];
    }
    if (routed) positions[before] = i;
    written += tile_count;
    __syncthreads();  // warp_counts is rewritten by the next tile
  }
  if (threadIdx.x == 0) rows.count[blockIdx.x] = written;
}

}  // namespace

void compact_routed_rows(const RoutedAttentionParams& p, const RoutedRows& rows, cudaStream_t stream) {
  compact_routed_rows_kernel<<<p.batch * p.heads, kCompactThreads, 0, stream>>>(p, rows);
  CRAM_CUDA_CHECK_LAUNCH();
}

}  // namespace cuda

long routed_attention_cuda_workspace_bytes(const RoutedAttentionParams& p) {
  const long bh = static_cast<long>(p.batch) * p.heads;
  return cuda::align_up(bh * sizeof(int)) + cuda::align_up(bh * p.seqlen_q * sizeof(int)) +
         cuda::align_up(bh * p.seqlen_q * cuda::acc_bytes(p.dtype));
}

}  // namespace cram
