// Pieces shared by the routed-attention CUDA kernels: the workspace layout and the row
// compaction that lets the attention kernels visit routed query rows only.
//
// Compaction writes, per (batch, head), the original positions of the routed rows in ascending
// order and their count. Attention kernels then tile the compacted list: a tile of routed rows
// covers positions [first, last], so under causal masking it needs keys [0, last] only, and a key
// block [j0, j1) is seen by exactly the rows whose position is >= j0 (a suffix of the list).
#pragma once

#include <atomic>
#include <cstdint>

#include "../common/cuda_dtype.cuh"
#include "../common/warp_reduce.cuh"
#include "routed_attention.h"

namespace cram {
namespace cuda {

// Scheduling of the tensor-core forward (routed_attention_fwd.cu). Its tiles of kTileRows routed
// rows, over all (batch, head) pairs, form one list, so the grid's first blocks are the real
// work whatever the route fraction. When the list is shorter than kTilesPerSm per multiprocessor
// (sparse routing: few tiles, each walking up to all keys), each tile's key blocks are split
// over up to kMaxKeySplits blocks, which write normalised partial outputs and their lse; the
// last of a tile's splits to finish combines them (no merge kernel, so nothing is launched for
// the splits when there are none). The partial buffers hold kPartialTilesPerSm per
// multiprocessor.
constexpr int kTileRows = 64;
constexpr int kMaxKeySplits = 8;
constexpr int kTilesPerSm = 2;
constexpr int kPartialTilesPerSm = 3;  // >= kTilesPerSm * 1.5: see plan_tiles_kernel

// Views into the workspace of routed_attention_cuda_workspace_bytes(params) bytes.
struct RoutedRows {
  int* count;         // (batch * heads): routed rows per (batch, head)
  int* positions;     // (batch * heads, seqlen_q): their positions, ascending; the rest unused
  void* row_dot;      // (batch * heads, seqlen_q), accumulation type: the backward's
                      // rowsum(dout * out) per compacted row
  int* tile_offset;   // (batch * heads + 1): list index of each pair's first tile; last: total
  int* plan;          // [0]: tiles in the list, [1]: key splits per tile
  int* splits_done;   // (partial tiles): per list tile, its splits finished so far; zeroed by
                      // plan_tiles_kernel, counted by the forward (the last split merges)
  float* partial_lse; // (partial tiles, kTileRows): lse of each split's rows, natural log
  float* partial_out; // (partial tiles, kTileRows, head_dim): each split's normalised rows
  int partial_tiles;  // capacity of the partial buffers, in (tile, split) pairs
};

constexpr int64_t kWorkspaceAlign = 256;
inline int64_t align_up(int64_t bytes) { return (bytes + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign; }

inline int64_t acc_bytes(DType t) { return t == DType::kFloat64 ? 8 : 4; }

// Whether the tensor-core forward may run (the other condition, 16-byte aligned rows, is
// checked at launch; unaligned inputs leave the partial buffers unused).
inline bool tensor_core_shape(const RoutedAttentionParams& p) {
  return (p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16) &&
         (p.head_dim == 64 || p.head_dim == 128);
}

// Host state kept once per device and process (the SM count, kernel attributes), in tables
// indexed by device id.
constexpr int kMaxDevices = 64;

inline int current_device() {
  int device = 0;
  CRAM_CUDA_CHECK(cudaGetDevice(&device));
  if (device >= kMaxDevices)
    throw std::invalid_argument("routed_attention (CUDA): device ids must be below " + std::to_string(kMaxDevices));
  return device;
}

// The multiprocessor count of the current device, queried once per device.
inline int multiprocessor_count() {
  static std::atomic<int> cached[kMaxDevices] = {};
  const int device = current_device();
  int sms = cached[device].load(std::memory_order_relaxed);
  if (sms == 0) {
    CRAM_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    cached[device].store(sms, std::memory_order_relaxed);
  }
  return sms;
}

// Raises `kernel`'s dynamic shared memory limit to `bytes` once per device (the attribute is a
// per-device setting); `configured` is the kernel's own flag set, one bit per device. Setting it
// twice from racing threads is harmless.
template <typename Kernel>
inline void allow_dynamic_smem(Kernel kernel, int bytes, std::atomic<uint64_t>& configured) {
  const uint64_t device_bit = uint64_t(1) << current_device();
  if (configured.load(std::memory_order_acquire) & device_bit) return;
  CRAM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  configured.fetch_or(device_bit, std::memory_order_release);
}

inline int partial_tile_capacity(const RoutedAttentionParams& p) {
  return tensor_core_shape(p) ? kPartialTilesPerSm * multiprocessor_count() : 0;
}

// Lays the views out over `workspace`; with workspace null, returns the byte count in `bytes`.
inline RoutedRows routed_rows(const RoutedAttentionParams& p, void* workspace, int64_t* bytes = nullptr) {
  const int64_t bh = static_cast<int64_t>(p.batch) * p.heads;
  RoutedRows r;
  r.partial_tiles = partial_tile_capacity(p);
  char* base = static_cast<char*>(workspace);
  int64_t offset = 0;
  auto take = [&](int64_t n) {
    char* at = base ? base + offset : nullptr;
    offset += align_up(n);
    return at;
  };
  r.count = reinterpret_cast<int*>(take(bh * sizeof(int)));
  r.positions = reinterpret_cast<int*>(take(bh * p.seqlen_q * sizeof(int)));
  r.row_dot = take(bh * p.seqlen_q * acc_bytes(p.dtype));
  r.tile_offset = reinterpret_cast<int*>(take((bh + 1) * sizeof(int)));
  r.plan = reinterpret_cast<int*>(take(2 * sizeof(int)));
  r.splits_done = reinterpret_cast<int*>(take(static_cast<int64_t>(r.partial_tiles) * sizeof(int)));
  r.partial_lse = reinterpret_cast<float*>(take(static_cast<int64_t>(r.partial_tiles) * kTileRows * sizeof(float)));
  r.partial_out = reinterpret_cast<float*>(
      take(static_cast<int64_t>(r.partial_tiles) * kTileRows * p.head_dim * sizeof(float)));
  if (bytes) *bytes = offset;
  return r;
}

// Where list tile `tile` lives: its (batch * heads) index and its first compacted row. Within a
// pair the list runs from the last tile to the first: under causal masking later rows see more
// keys, so the longest tiles start first.
struct ListTile {
  int bh, row0;
};
__device__ __forceinline__ ListTile list_tile(const RoutedRows& rows, int n_pairs, int tile) {
  int lo = 0, hi = n_pairs;  // the last pair whose first tile is <= tile
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (rows.tile_offset[mid] <= tile) lo = mid;
    else hi = mid;
  }
  const int tiles_here = rows.tile_offset[lo + 1] - rows.tile_offset[lo];
  return {lo, (tiles_here - 1 - (tile - rows.tile_offset[lo])) * kTileRows};
}

// The launch limits of these kernels (one grid row per (batch, head)), checked before launching
// (head_dim <= kAttentionMaxHeadDim is checked by the binding layer).
inline void check_attention_launch(const RoutedAttentionParams& p, const char* op) {
  if (static_cast<int64_t>(p.batch) * p.heads > 65535)
    throw std::invalid_argument(std::string(op) + ": batch * heads must be at most 65535, got " +
                                std::to_string(static_cast<int64_t>(p.batch) * p.heads));
}

// Fills rows.count and rows.positions from params.route (kernel in routed_attention_compact.cu).
void compact_routed_rows(const RoutedAttentionParams& p, const RoutedRows& rows, cudaStream_t stream);

// Fills rows.tile_offset and rows.plan from rows.count (routed_attention_compact.cu).
void plan_tiles(const RoutedAttentionParams& p, const RoutedRows& rows, cudaStream_t stream);

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
