// Shared-memory tiles of the tensor-core attention kernels (fp16 / bf16, head_dim 64 or 128).
//
// A tile is kRows rows of kCols 16-bit elements, row-major, its 16-byte chunks XOR-swizzled
// (chunk c of row r stored at chunk c ^ (r % 8)) so that the 8 row addresses one ldmatrix
// matrix reads, and the 16-byte cp.async writes of 8 consecutive chunks, fall in distinct banks.
#pragma once

#include <cstdint>

#include "../common/mma_sm80.cuh"
#include "routed_attention_common.cuh"

namespace cram {
namespace cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Element offset of chunk `chunk` (8 elements) of row `row` in a swizzled tile of kCols columns.
template <int kCols> __device__ __forceinline__ int swizzled(int row, int chunk) {
  static_assert(kCols % 64 == 0, "the swizzle needs at least 8 chunks per row");
  return row * kCols + ((chunk ^ (row & 7)) * 8);
}

// Issues the cp.async copies of a kRows x kCols tile whose row r is read from
// src + row_index(r) * row_stride; rows r >= n_valid are zero-filled.
template <int kCols, int kRows, int kThreads, typename scalar_t, typename RowIndex>
__device__ __forceinline__ void load_tile_async(scalar_t* tile, const scalar_t* src, int64_t row_stride,
                                                int n_valid, RowIndex row_index) {
  constexpr int kChunks = kCols / 8;
  for (int idx = threadIdx.x; idx < kRows * kChunks; idx += kThreads) {
    const int r = idx / kChunks, c = idx % kChunks;
    const bool valid = r < n_valid;
    const scalar_t* from = valid ? src + row_index(r) * row_stride + c * 8 : src;
    cp_async_16(tile + swizzled<kCols>(r, c), from, valid);
  }
}

// Whether the tensor-core kernels can read these tensors: every q/k/v row (and dout row, when
// given) 16-byte aligned for cp.async, and out rows aligned for 4-byte element pairs.
template <typename scalar_t>
bool rows_are_16_byte_aligned(const RoutedAttentionParams& p, const void* dout = nullptr,
                              int64_t dout_batch_stride = 0, int64_t dout_head_stride = 0,
                              int64_t dout_row_stride = 0) {
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  constexpr int64_t kVec = 16 / sizeof(scalar_t);
  const int64_t strides[] = {p.q_batch_stride, p.q_head_stride, p.q_row_stride,
                          p.k_batch_stride, p.k_head_stride, p.k_row_stride,
                          p.v_batch_stride, p.v_head_stride, p.v_row_stride,
                          dout_batch_stride, dout_head_stride, dout_row_stride};
  for (int64_t s : strides)
    if (s % kVec != 0) return false;
  const bool out_pairs = reinterpret_cast<uintptr_t>(p.out) % 4 == 0 && p.out_batch_stride % 2 == 0 &&
                         p.out_head_stride % 2 == 0 && p.out_row_stride % 2 == 0;
  return aligned(p.q) && aligned(p.k) && aligned(p.v) && (!dout || aligned(dout)) && out_pairs;
}

}  // namespace cuda
}  // namespace cram
