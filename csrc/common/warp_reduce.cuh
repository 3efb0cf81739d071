// Warp-wide reductions (all 32 lanes take part and receive the result), and a block-wide scan.
#pragma once

namespace cram {
namespace cuda {

template <typename T> __device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

template <typename T> __device__ __forceinline__ T warp_max(T x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x = max(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// Block-wide exclusive prefix sum of `value` over a block of kWarps full warps: within each warp
// by shuffles, then across the warps through `warp_totals` (kWarps shared ints). Returns the sum
// over lower threads and sets `block_total`. Every thread must call it; it ends with a barrier,
// so the next call may reuse `warp_totals`.
template <int kWarps>
__device__ __forceinline__ int block_exclusive_sum(int value, int* warp_totals, int& block_total) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int inclusive = value;
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const int before = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += before;
  }
  if (lane == 31) warp_totals[warp] = inclusive;
  __syncthreads();
  int exclusive = inclusive - value;
  block_total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    exclusive += w < warp ? warp_totals[w] : 0;
    block_total += warp_totals[w];
  }
  __syncthreads();
  return exclusive;
}

}  // namespace cuda
}  // namespace cram
