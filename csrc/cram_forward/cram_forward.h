// The fused CRAM forward's routing stage: the router's per-token epilogue and the compaction of
// the rows each path runs on. Parameters and entry points shared by the CPU and CUDA kernels; no
// torch header. The other stages of the op (scan, GEMMs, routed attention) are sequenced by the
// binding layer (csrc/bindings.cpp, "Fused CRAM forward").
//
// For each token t of a (batch, L) grid, with the router's first Linear split as
// W1 = [W1_x | W1_state] (its x-part precomputed by a GEMM into hidden_x, bias included):
//   features_t = [log(1 + gap_t), ‖working_out_t‖ / √d_model, q̂_t]
//   predicted_t = W2 · ReLU(hidden_x_t + W1_state · features_t) + b2           (paths values)
//   scores_t = predicted_t + price_t,   price = [0, episodic_price, −semantic_reward · q̂_t]
//   path_t = forced_path_t if 0 <= forced_path_t < paths, else argmin_p scores_t[p] (first)
// then route_t = (path_t == episodic), and the flat indices b·L + t of the episodic rows and of
// the semantic rows are written in ascending order, with their counts.
//
// Layout: hidden_x: (batch, L, hidden), working_out: (batch, L, d_model), each with a unit stride
// along its last dimension and free batch and row strides; gap, q_hat, forced_path, route, path:
// (batch, L) contiguous; predicted, scores: (batch, L, paths) contiguous; w_state: (3, hidden)
// (W1_state transposed), w_out: (paths, hidden), b_out: (paths,) contiguous. Every float tensor
// has one dtype, but hidden_x, which is in the accumulation type (float32 for 16-bit inputs):
// rounded to 16 bits before the state features are added, a partial sum could overflow or round
// where the reference's one Linear over [x, features] does not.
#pragma once

#include <cstdint>

#include "../common/dtype.h"

namespace cram {

// Path indices, in the order of the router's predictions (cram_ext.models.router.Path).
constexpr int kPathWorking = 0;
constexpr int kPathEpisodic = 1;
constexpr int kPathSemantic = 2;
constexpr int kRouterMaxPaths = 3;

struct CramRouterParams {
  DType dtype;
  int64_t batch, seqlen, d_model, hidden, n_paths;  // n_paths: 2 (no semantic path) or 3
  double episodic_price, semantic_reward;

  int64_t hidden_x_batch_stride, hidden_x_row_stride;
  int64_t working_out_batch_stride, working_out_row_stride;

  const void* hidden_x;
  const void* working_out;
  const void* gap;
  const void* q_hat;              // nullable: q̂ = 0
  const void* w_state;
  const void* w_out;
  const void* b_out;
  const int64_t* forced_path;     // nullable: nothing forced
  void* predicted;
  void* scores;
  int64_t* path;
  uint8_t* route;                 // bool: path == episodic
  int64_t* episodic_rows;         // (batch·L,): the first episodic_count entries are written
  int64_t* episodic_count;        // one element
  int64_t* semantic_rows;         // (batch·L,): the first semantic_count entries are written
  int64_t* semantic_count;        // one element
};

void cram_router_cpu(const CramRouterParams& params);

// CUDA launcher; `stream` is a cudaStream_t. Never synchronises with the host: the counts stay in
// device memory.
void cram_router_cuda(const CramRouterParams& params, void* stream);

// ---------------------------------------------------------------------------------------------
// One decoding step of a CRAM layer on the CPU (the op cram_step)
// ---------------------------------------------------------------------------------------------
// cram_forward for one token per stream, from a scan state and a key/value cache:
//   xz = W_in·x,  x_dbl = W_x·u,  Δ = W_Δ·x_dbl[:R]      (u, z = the halves of xz)
//   y = selective_state_update(state, u, Δ, A, B, C, D, z, dt_bias, log(1 + gap))
//   out = W_out·y,  then the router above (L = 1) chooses each stream's path;
//   k, v = W_kv·x appended to the caches at cache_seqlens; the episodic streams' q = W_q·x
//   attend over slots [0, cache_seqlens] where key_mask allows (routed_attention_kvcache_cpu);
//   out += W_o·attention on the episodic streams, out += f_sem(x) on the semantic ones.
// Every intermediate is rounded to the element type where the composed op (separate GEMMs and
// kernels, as on a CUDA device) stores it, so both give the same results up to summation order.
// On the CPU, at decoding's batch sizes, the framework calls around those small products would
// cost more than the products: one kernel does the whole step, calling the scan-step, router
// and cached-attention kernels on its own buffers.
//
// Layout: every weight contiguous, in nn.Linear's (out_features, in_features) order; x (batch,
// d_model) and the outputs contiguous; state (batch, d_inner, N) with a unit stride along N;
// caches (batch, kv_heads, capacity, head_dim) with a unit stride along head_dim; key_mask
// (batch, capacity) with a unit stride along capacity. A, D, dt_bias and state are the
// accumulation type (float, double for double tensors); everything else is `dtype`.
struct CramStepParams {
  DType dtype;
  int64_t batch, d_model, d_inner, dt_rank, dstate, hidden, n_paths, heads, kv_heads, head_dim,
      capacity, rank;  // rank: the semantic adapter's (0 without a semantic path)
  double episodic_price, semantic_reward, scale;

  int64_t state_batch_stride, state_d_stride;
  int64_t cache_batch_stride, cache_head_stride, cache_row_stride;  // k_cache and v_cache alike
  int64_t key_mask_batch_stride;

  const void* x;
  const void* gap;
  const void* q_hat;              // nullable: q̂ = 0
  void* state;
  void* k_cache;
  void* v_cache;
  const int32_t* cache_seqlens;
  const uint8_t* key_mask;        // nullable: every slot up to the new entry
  const void *in_proj, *x_proj, *dt_proj, *A, *D, *dt_bias, *out_proj;
  const void *router_w1, *router_b1, *router_w2, *router_b2, *qkv, *attn_out;
  const void *semantic_down, *semantic_down_bias, *semantic_up, *semantic_up_bias;  // null: rank 0
  void* out;                      // (batch, d_model)
  int64_t* path;                  // (batch,)
  void* predicted;                // (batch, paths)
  void* scores;                   // (batch, paths)
  void* attention_out;            // (batch, d_model): 0 on the streams that did not attend
};

void cram_step_cpu(const CramStepParams& params);

}  // namespace cram
