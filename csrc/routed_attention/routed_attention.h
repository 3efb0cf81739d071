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

void routed_attention_fwd_cpu(const RoutedAttentionParams& params);
void routed_attention_bwd_cpu(const RoutedAttentionBwdParams& params);

// CUDA launchers; `stream` is a cudaStream_t. `workspace` is device memory of
// routed_attention_cuda_workspace_bytes(params) bytes for the row compaction.
int64_t routed_attention_cuda_workspace_bytes(const RoutedAttentionParams& params);
void routed_attention_fwd_cuda(const RoutedAttentionParams& params, void* workspace, void* stream);
void routed_attention_bwd_cuda(const RoutedAttentionBwdParams& params, void* workspace, void* stream);

}  // namespace cram
