// Pieces shared by the routed-attention CUDA kernels: the workspace layout and the row
// compaction that lets the attention kernels visit routed query rows only.
//
// Compaction writes, per (batch, head), the original positions of the routed rows in ascending
// order and their count. Attention kernels then tile the compacted list: a tile of routed rows
// covers positions [first, last], so under causal masking it needs keys [0, last] only, and a key
// block [j0, j1) is seen by exactly the rows whose position is >= j0 (a suffix of the list).
#pragma once

#include <cstdint>

#include "../common/cuda_dtype.cuh"
#include "../common/warp_reduce.cuh"
#include "routed_attention.h"

namespace cram {
namespace cuda {

// Views into the workspace of routed_attention_cuda_workspace_bytes(params) bytes.
struct RoutedRows {
  int* count;      // (batch * heads): routed rows per (batch, head)
  int* positions;  // (batch * heads, seqlen_q): their positions, ascending; the rest unused
  void* row_dot;   // (batch * heads, seqlen_q), accumulation type: the backward's
                   // rowsum(dout * out) per compacted row
};

constexpr int kMaxHeadDim = 256;  // the binding layer's limit

constexpr long kWorkspaceAlign = 256;
inline long align_up(long bytes) { return (bytes + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign; }

inline long acc_bytes(DType t) { return t == DType::kFloat64 ? 8 : 4; }

inline RoutedRows routed_rows(const RoutedAttentionParams& p, void* workspace) {
  const long bh = static_cast<long>(p.batch) * p.heads;
  char* base = static_cast<char*>(workspace);
  RoutedRows r;
  r.count = reinterpret_cast<int*>(base);
  base += align_up(bh * sizeof(int));
  r.positions = reinterpret_cast<int*>(base);
  base += align_up(bh * p.seqlen_q * sizeof(int));
  r.row_dot = base;
  return r;
}

// The launch limits of these kernels (one grid row per (batch, head)), checked before launching.
inline void check_attention_launch(const RoutedAttentionParams& p, const char* op) {
  if (static_cast<long>(p.batch) * p.heads > 65535)
    throw std::invalid_argument(std::string(op) + ": batch * heads must be at most 65535, got " +
                                std::to_string(static_cast<long>(p.batch) * p.heads));
  if (p.head_dim > kMaxHeadDim)
    throw std::invalid_argument(std::string(op) + ": head_dim must be at most " +
                                std::to_string(kMaxHeadDim) + ", got " + std::to_string(p.head_dim));
}

// Fills rows.count and rows.positions from params.route (kernel in routed_attention_compact.cu).
void compact_routed_rows(const RoutedAttentionParams& p, const RoutedRows& rows, cudaStream_t stream);

// Index of the first entry >= value in the ascending positions[0, n) (n if none).
__device__ __forceinline__ int lower_bound(const int* positions, int n, int value) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (positions[mid] < value) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// Whether query row `pos` of batch `b` may attend to key `j` (j < seqlen_k assumed).
__device__ __forceinline__ bool key_visible(const RoutedAttentionParams& p, int b, int pos, int j) {
  return (!p.is_causal || j <= pos) && (!p.key_mask || p.key_mask[b * p.key_mask_batch_stride + j]);
}

}  // namespace cuda
}  // namespace cram
