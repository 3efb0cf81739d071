// Routed attention against a key/value cache on CUDA (routed_attention.h,
// RoutedAttentionKVCacheParams).
//
// Two launches on the caller's stream (one without new entries): the new keys and values are copied
// into the caches, then one block per (batch, head, new row) attends. An unrouted row's block
// writes zeros and leaves without reading a key. A routed row's kWarps warps split the visible keys
// round-robin; a warp holds the query and its output accumulator spread over its lanes (head_dim /
// 32 elements per lane), computes a score with one warp reduction per key and keeps its own online
// softmax (running max and sum); the warps' partial results are merged through shared memory at the
// end. One block per row suits decoding batches; a single long sequence would also want the keys of
// a row split across blocks (FlashDecoding's split-K), which this kernel does not do yet.
#include <cstdint>

#include "../common/cuda_dtype.cuh"
#include "../common/warp_reduce.cuh"
#include "routed_attention.h"

namespace cram {
namespace cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kPerLane = kAttentionMaxHeadDim / 32;  // head-dim elements held by one lane
constexpr int kAppendThreads = 128;

template <typename scalar_t>
__global__ void __launch_bounds__(kAppendThreads)
append_new_entries_kernel(const RoutedAttentionKVCacheParams p) {
  const int64_t item = blockIdx.x, i = item % p.seqlen_new, bh = item / p.seqlen_new;
  const int64_t b = bh / p.kv_heads, h = bh % p.kv_heads;
  const int64_t slot = static_cast<int64_t>(p.cache_seqlens[b]) + i;
  if (slot < 0 || slot >= p.capacity) return;  // a full cache: the binding layer's assertion fails
  const scalar_t* k = static_cast<const scalar_t*>(p.k_new) + b * p.k_new_batch_stride + h * p.k_new_head_stride +
                      i * p.k_new_row_stride;
  const scalar_t* v = static_cast<const scalar_t*>(p.v_new) + b * p.v_new_batch_stride + h * p.v_new_head_stride +
                      i * p.v_new_row_stride;
  scalar_t* k_dst = static_cast<scalar_t*>(p.k_cache) + b * p.k_cache_batch_stride + h * p.k_cache_head_stride +
                    slot * p.k_cache_row_stride;
  scalar_t* v_dst = static_cast<scalar_t*>(p.v_cache) + b * p.v_cache_batch_stride + h * p.v_cache_head_stride +
                    slot * p.v_cache_row_stride;
  for (int64_t c = threadIdx.x; c < p.head_dim; c += blockDim.x) {
    k_dst[c] = k[c];
    v_dst[c] = v[c];
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kWarps * 32)
kvcache_attention_kernel(const RoutedAttentionKVCacheParams p) {
  using acc_t = typename AccType<scalar_t>::type;
  __shared__ acc_t warp_max_s[kWarps], warp_sum_s[kWarps];
  __shared__ acc_t warp_out[kWarps][kAttentionMaxHeadDim];
  const int64_t b = blockIdx.y, h = blockIdx.x / p.seqlen_new, i = blockIdx.x % p.seqlen_new;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t d = p.head_dim;
  scalar_t* out = static_cast<scalar_t*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride + i * p.out_row_stride;
  if (!p.route[b * p.route_batch_stride + h * p.route_head_stride + i * p.route_row_stride]) {
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) out[c] = from_acc<scalar_t>(acc_t(0));
    return;
  }
  const int64_t kvh = h / (p.heads / p.kv_heads);
  const scalar_t* q_row = static_cast<const scalar_t*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + i * p.q_row_stride;
  const scalar_t* keys = static_cast<const scalar_t*>(p.k_cache) + b * p.k_cache_batch_stride + kvh * p.k_cache_head_stride;
  const scalar_t* values = static_cast<const scalar_t*>(p.v_cache) + b * p.v_cache_batch_stride + kvh * p.v_cache_head_stride;
  const uint8_t* key_mask = p.key_mask ? p.key_mask + b * p.key_mask_batch_stride : nullptr;
  const acc_t scale = static_cast<acc_t>(p.scale), minus_inf = -INFINITY;

  acc_t q[kPerLane], o[kPerLane];
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const int64_t c = lane + 32 * k;
    q[k] = c < d ? to_acc(q_row[c]) * scale : acc_t(0);
    o[k] = acc_t(0);
  }
  // Causal, aligned to the end: row i sees the keys up to its own position among the last n_new.
  const int64_t keys_total = static_cast<int64_t>(p.cache_seqlens[b]) + (p.k_new ? p.seqlen_new : 0);
  const int64_t key_end = min(keys_total - p.seqlen_new + i + 1, p.capacity);
  acc_t running_max = minus_inf, running_sum = 0;
  for (int64_t j = warp; j < key_end; j += kWarps) {
    if (key_mask && !key_mask[j]) continue;  // the same for every lane: no divergence
    const scalar_t* k_row = keys + j * p.k_cache_row_stride;
    acc_t s = 0;
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int64_t c = lane + 32 * k;
      if (c < d) s += q[k] * to_acc(k_row[c]);
    }
    s = warp_sum(s);
    const acc_t new_max = max(running_max, s);
    // While every score so far is -inf (a key of -inf elements), shift by 0: -inf - -inf is NaN.
    const acc_t shift = new_max == minus_inf ? acc_t(0) : new_max;
    const acc_t rescale = exp_acc(running_max - shift), weight = exp_acc(s - shift);
    running_sum = running_sum * rescale + weight;
    const scalar_t* v_row = values + j * p.v_cache_row_stride;
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int64_t c = lane + 32 * k;
      o[k] = o[k] * rescale + (c < d ? weight * to_acc(v_row[c]) : acc_t(0));
    }
    running_max = new_max;
  }

  // Merge the warps: rescale each to the block's max, then sum.
  if (lane == 0) warp_max_s[warp] = running_max;
  __syncthreads();
  acc_t block_max = minus_inf;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) block_max = max(block_max, warp_max_s[w]);
  const acc_t factor = running_max == minus_inf ? acc_t(0) : exp_acc(running_max - block_max);
  if (lane == 0) warp_sum_s[warp] = running_sum * factor;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const int64_t c = lane + 32 * k;
    if (c < d) warp_out[warp][c] = o[k] * factor;
  }
  __syncthreads();
  acc_t total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += warp_sum_s[w];
  const acc_t inv_total = total == acc_t(0) ? acc_t(0) : acc_t(1) / total;  // no visible key: 0
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    acc_t sum = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += warp_out[w][c];
    out[c] = from_acc<scalar_t>(sum * inv_total);
  }
}

}  // namespace
}  // namespace cuda

void routed_attention_kvcache_cuda(const RoutedAttentionKVCacheParams& params, void* stream) {
  using namespace cuda;
  const char* op = "routed_attention_with_kvcache (CUDA)";
  if (params.batch > 65535)
    throw std::invalid_argument(std::string(op) + ": batch must be at most 65535 (grid y), got " +
                                std::to_string(params.batch));
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  CRAM_CUDA_DTYPE_SWITCH(params.dtype, op, [&] {
    if (params.k_new) {
      const int64_t rows = params.batch * params.kv_heads * params.seqlen_new;
      append_new_entries_kernel<scalar_t><<<static_cast<unsigned>(rows), kAppendThreads, 0, cuda_stream>>>(params);
      CRAM_CUDA_CHECK_LAUNCH();
    }
    const dim3 grid(static_cast<unsigned>(params.heads * params.seqlen_new), static_cast<unsigned>(params.batch));
    kvcache_attention_kernel<scalar_t><<<grid, kWarps * 32, 0, cuda_stream>>>(params);
    CRAM_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace cram
