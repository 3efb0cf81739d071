// Routed attention: causal softmax attention evaluated only for the query rows a router selected.
// Parameters and entry points shared by the CPU and CUDA kernels; no torch header.
//
// For each (batch b, head h) and each query row i with route[b, h, i]:
//   s_j = scale · q_i · k_j  over visible keys j (j <= i when causal; key_mask[b, j] when given)
//   out_i = Σ_j softmax(s)_j v_j,   lse_i = log Σ_j exp(s_j)
// Rows not routed are written as 0 (lse = -inf) and cost nothing else; a routed row with no
// visible key is 0 with lse = -inf. Key/value head of query head h: h / (heads / kv_heads).
//
// Layout: q, out: (batch, heads, Lq, d); k, v: (batch, kv_heads, Lk, d); d contiguous, other
// strides free. route: bool (uint8) with free strides (head stride 0 broadcasts a per-batch
// route). key_mask: bool (batch, Lk). lse: (batch, heads, Lq), contiguous, in the accumulation
// type (float64 for float64 inputs, float32 otherwise) so the backward is exact in float64.
#pragma once

#include <cstdint>

#include "../common/dtype.h"

namespace cram {

// The largest head dimension, checked by the binding layer; the kernels size buffers by it.
constexpr int kAttentionMaxHeadDim = 256;

// With a key_mask that keeps at most this share of the keys (of batch · seqlen_k), the CPU
// forward visits only the kept keys: it never reads the other key and value rows, so a CPU
// caller may leave them unwritten. (Above it, gathering the kept rows would cost more than the
// masked scores it saves.)
constexpr double kAttentionSparseKeysShare = 0.5;
inline bool attention_reads_only_kept_keys(int64_t kept, int64_t keys) {
  return kept <= kAttentionSparseKeysShare * keys;
}

struct RoutedAttentionParams {
  DType dtype;  // q, k, v, out (and dout, dq, dk, dv)
  int64_t batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim;
  double scale;  // kernels use it in their accumulation type
  bool is_causal;

  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  int64_t out_batch_stride, out_head_stride, out_row_stride;
  int64_t route_batch_stride, route_head_stride, route_row_stride;
  int64_t key_mask_batch_stride;

  const void* q;
  const void* k;
  const void* v;
  const uint8_t* route;
  const uint8_t* key_mask;  // nullable
  void* out;
  void* lse;  // (batch, heads, seqlen_q), accumulation type
};

struct RoutedAttentionBwdParams : RoutedAttentionParams {
  int64_t dout_batch_stride, dout_head_stride, dout_row_stride;
  // dq, dk, dv are contiguous, have q's, k's and v's shapes, are in the accumulation type and
  // arrive zeroed, so a kernel may accumulate into them; the binding layer casts them back.
  const void* dout;
  void* dq;
  void* dk;
  void* dv;
};

// Routed attention against a key/value cache (decoding; FlashAttention's flash_attn_with_kvcache
// convention, in our head-major layout). For each batch b with L = cache_seqlens[b]:
//   1. the n_new new keys and values (when given) are written to cache slots [L, L + n_new);
//   2. each routed new query row i (at position L + i) attends over slots j <= L + i (the cache
//      and the new entries up to itself) with key_mask[b, j] when given, as RoutedAttentionParams.
//      Without new entries the rows are the last n_new positions of the cache: row i sees slots
//      j < L - n_new + i + 1 (FlashAttention's causal alignment to the end).
// Rows not routed are written as 0 and read no key. Forward only (inference).
//
// Layout: q, out: (batch, heads, n_new, d); k_cache, v_cache: (batch, kv_heads, capacity, d);
// k_new, v_new: (batch, kv_heads, n_new, d); d contiguous, other strides free. route: bool with
// free strides; key_mask: bool (batch, capacity); cache_seqlens: int32 (batch,), with
// cache_seqlens[b] + n_new <= capacity (checked by the caller: an entry past it is skipped).
struct RoutedAttentionKVCacheParams {
  DType dtype;  // q, caches, new keys/values, out
  int64_t batch, heads, kv_heads, seqlen_new, capacity, head_dim;
  double scale;

  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_cache_batch_stride, k_cache_head_stride, k_cache_row_stride;
  int64_t v_cache_batch_stride, v_cache_head_stride, v_cache_row_stride;
  int64_t k_new_batch_stride, k_new_head_stride, k_new_row_stride;
  int64_t v_new_batch_stride, v_new_head_stride, v_new_row_stride;
  int64_t out_batch_stride, out_head_stride, out_row_stride;
  int64_t route_batch_stride, route_head_stride, route_row_stride;
  int64_t key_mask_batch_stride;

  const void* q;
  void* k_cache;
  void* v_cache;
  const void* k_new;  // nullable (nothing appended; then v_new is null too)
  const void* v_new;
  const int32_t* cache_seqlens;
  const uint8_t* route;
  const uint8_t* key_mask;  // nullable
  void* out;
};

void routed_attention_fwd_cpu(const RoutedAttentionParams& params);
void routed_attention_bwd_cpu(const RoutedAttentionBwdParams& params);

// CUDA launchers; `stream` is a cudaStream_t. `workspace` is device memory of
// routed_attention_cuda_workspace_bytes(params) bytes for the row compaction.
int64_t routed_attention_cuda_workspace_bytes(const RoutedAttentionParams& params);
void routed_attention_fwd_cuda(const RoutedAttentionParams& params, void* workspace, void* stream);
void routed_attention_bwd_cuda(const RoutedAttentionBwdParams& params, void* workspace, void* stream);

void routed_attention_kvcache_cpu(const RoutedAttentionKVCacheParams& params);
void routed_attention_kvcache_cuda(const RoutedAttentionKVCacheParams& params, void* stream);

}  // namespace cram
