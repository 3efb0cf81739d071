// Row compaction for routed attention (layout: routed_attention_common.cuh), and the workspace
// size the binding layer allocates for it.
//
// One block per (batch, head) walks the route flags in tiles of kFlagsPerThread consecutive
// flags per thread (all loaded before use, so a long sequence costs a few round trips to memory,
// not one per 256 rows) and appends the routed positions after a block-wide exclusive prefix sum
// of the threads' counts. The list comes out ascending and the same on every run.
#include "routed_attention_common.cuh"

namespace cram {
namespace cuda {
namespace {

constexpr int kCompactThreads = 256;
constexpr int kFlagsPerThread = 16;
constexpr int kCompactTile = kCompactThreads * kFlagsPerThread;
constexpr int kCompactWarps = kCompactThreads / 32;

__global__ void __launch_bounds__(kCompactThreads)
compact_routed_rows_kernel(const RoutedAttentionParams p, const RoutedRows rows) {
  __shared__ int warp_totals[kCompactWarps];
  const int b = blockIdx.x / p.heads, h = blockIdx.x % p.heads;
  const uint8_t* route = p.route + b * p.route_batch_stride + h * p.route_head_stride;
  int* positions = rows.positions + static_cast<int64_t>(blockIdx.x) * p.seqlen_q;
  int written = 0;  // routed rows found in earlier tiles (the same in every thread)
  for (int tile = 0; tile < p.seqlen_q; tile += kCompactTile) {
    const int first = tile + threadIdx.x * kFlagsPerThread;
    unsigned flags = 0;  // bit i: row first + i is routed
#pragma unroll
    for (int i = 0; i < kFlagsPerThread; ++i)
      if (first + i < p.seqlen_q && route[(first + i) * p.route_row_stride]) flags |= 1u << i;
    int tile_total;
    int slot = written + block_exclusive_sum<kCompactWarps>(__popc(flags), warp_totals, tile_total);
#pragma unroll
    for (int i = 0; i < kFlagsPerThread; ++i)
      if (flags & (1u << i)) positions[slot++] = first + i;
    written += tile_total;
  }
  if (threadIdx.x == 0) rows.count[blockIdx.x] = written;
}

// One block: tile_offset = exclusive prefix sum of the pairs' tile counts, then the plan, and
// the split counters zeroed. The key
// split S is 1 unless the tiles are fewer than half of `target_tiles` (kTilesPerSm per
// multiprocessor); then S = ceil(target / tiles), at most kMaxKeySplits, so tiles * S stays
// under tiles + target <= 1.5 target, within the partial buffers (and is cut back if not).
__global__ void __launch_bounds__(kCompactThreads)
plan_tiles_kernel(const RoutedAttentionParams p, const RoutedRows rows, int target_tiles) {
  __shared__ int warp_totals[kCompactWarps];
  const int n_pairs = p.batch * p.heads;
  int total = 0;  // tiles of earlier pairs (the same in every thread)
  for (int base = 0; base < n_pairs; base += kCompactThreads) {
    const int pair = base + threadIdx.x;
    const int tiles = pair < n_pairs ? (rows.count[pair] + kTileRows - 1) / kTileRows : 0;
    int chunk_total;
    const int first = total + block_exclusive_sum<kCompactWarps>(tiles, warp_totals, chunk_total);
    if (pair < n_pairs) rows.tile_offset[pair] = first;
    total += chunk_total;
  }
  // The forward's split counters start at zero on every call (the workspace is not cleared).
  for (int i = threadIdx.x; i < rows.partial_tiles; i += kCompactThreads) rows.splits_done[i] = 0;
  if (threadIdx.x == 0) {
    rows.tile_offset[n_pairs] = total;
    int splits = 1;
    if (total > 0 && 2 * total < target_tiles)
      splits = min(kMaxKeySplits, (target_tiles + total - 1) / total);
    while (splits > 1 && total * splits > rows.partial_tiles) --splits;
    rows.plan[0] = total;
    rows.plan[1] = splits;
  }
}

}  // namespace

void plan_tiles(const RoutedAttentionParams& p, const RoutedRows& rows, cudaStream_t stream) {
  plan_tiles_kernel<<<1, kCompactThreads, 0, stream>>>(p, rows, kTilesPerSm * multiprocessor_count());
  CRAM_CUDA_CHECK_LAUNCH();
}

void compact_routed_rows(const RoutedAttentionParams& p, const RoutedRows& rows, cudaStream_t stream) {
  compact_routed_rows_kernel<<<p.batch * p.heads, kCompactThreads, 0, stream>>>(p, rows);
  CRAM_CUDA_CHECK_LAUNCH();
}

}  // namespace cuda

int64_t routed_attention_cuda_workspace_bytes(const RoutedAttentionParams& p) {
  int64_t bytes = 0;
  cuda::routed_rows(p, nullptr, &bytes);
  return bytes;
}

}  // namespace cram
