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
// has one dtype.
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

}  // namespace cram
