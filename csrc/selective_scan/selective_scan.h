// Selective scan (Mamba's S6 form with a per-token time-gap multiplier): parameters and entry
// points shared by the CPU and CUDA kernels. No torch header: the binding layer
// (csrc/bindings.cpp) fills these structs from tensors after checking them.
//
//   Δ_t = softplus(delta_t + delta_bias) · dt_scale_t       (softplus only if delta_softplus)
//   h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t                (h in float32, float64 for float64)
//   y_t = C_t · h_t + D u_t,    out_t = y_t · silu(z_t)      (D, z optional)
//
// Layout: u, delta, z, out: (batch, dim, L); B, C: (batch, groups, N, L); the L dimension is
// contiguous (stride 1) in every sequence tensor, the other strides are free. A: (dim, N),
// D, delta_bias: (dim,), dt_scale: (batch, L), all contiguous, in the accumulation type.
#pragma once

#include <cstdint>

#include "../common/dtype.h"

namespace cram {

// Limits shared by the binding layer (which checks them) and every kernel (which sizes by them).
constexpr int kScanMaxDState = 256;  // largest state size N
// The forward checkpoints the state at the end of every chunk of this many steps; the backward
// recomputes the states inside a chunk from its checkpoint instead of keeping all L of them.
// It is also the CUDA kernels' chunk: 32 lanes x 8 consecutive steps per warp iteration.
constexpr int kScanCheckpointChunk = 256;

// Number of checkpoints (chunk_states.size(2)) of a sequence of `seqlen` steps: at least 1.
constexpr int64_t scan_checkpoint_count(int64_t seqlen) {
  return seqlen > kScanCheckpointChunk ? (seqlen + kScanCheckpointChunk - 1) / kScanCheckpointChunk : 1;
}

struct SelectiveScanParams {
  // u, delta, B, C, z, out, dout, du, ddelta, dz. Everything else (A, D, delta_bias, dt_scale,
  // chunk_states and the shared gradients) is in the accumulation type: float64 for float64
  // inputs, float32 otherwise.
  DType input_type;
  int64_t batch, dim, seqlen, dstate, n_groups;
  int64_t n_chunks;  // scan_checkpoint_count(seqlen)
  bool delta_softplus;

  // Strides in elements (the L stride is 1).
  int64_t u_batch_stride, u_d_stride;
  int64_t delta_batch_stride, delta_d_stride;
  int64_t B_batch_stride, B_group_stride, B_dstate_stride;
  int64_t C_batch_stride, C_group_stride, C_dstate_stride;
  int64_t z_batch_stride, z_d_stride;
  int64_t out_batch_stride, out_d_stride;

  const void* u;
  const void* delta;
  const void* A;
  const void* B;
  const void* C;
  const void* D;           // nullable
  const void* z;           // nullable
  const void* delta_bias;  // nullable
  const void* dt_scale;    // nullable
  void* out;
  // (batch, dim, n_chunks, dstate), contiguous, accumulation type: the state after each chunk.
  // The last chunk's entry is the final state; the backward restarts from these checkpoints.
  void* chunk_states;
  // (batch, dim, dstate), contiguous, accumulation type: the state before step 0 (chunked
  // prefill, streaming); null starts from 0.
  const void* initial_state = nullptr;  // nullable
};

struct SelectiveScanBwdParams : SelectiveScanParams {
  int64_t dout_batch_stride, dout_d_stride;
  int64_t du_batch_stride, du_d_stride;
  int64_t ddelta_batch_stride, ddelta_d_stride;
  int64_t dz_batch_stride, dz_d_stride;
  int64_t dB_batch_stride, dB_group_stride, dB_dstate_stride;
  int64_t dC_batch_stride, dC_group_stride, dC_dstate_stride;

  const void* dout;
  void* du;
  void* ddelta;
  void* dz;           // nullable (null when z is)
  // Gradients of quantities shared across channels or tokens (dA, dB, dC, dD, ddelta_bias,
  // ddt_scale) are in the accumulation type (float32, float64 for float64 inputs) and arrive
  // zeroed, so a kernel may accumulate partial sums into them. The binding layer casts dB/dC.
  void* dA;
  void* dB;
  void* dC;
  void* dD;           // nullable
  void* ddelta_bias;  // nullable
  void* ddt_scale;    // nullable
  // dL/d(initial_state), (batch, dim, dstate), contiguous, accumulation type: the adjoint state
  // before step 0. Written (not accumulated); null when initial_state is.
  void* dinitial_state = nullptr;  // nullable
};

// One step of the scan for streaming (Mamba's selective_state_update): per batch element and
// channel, with the same math as one position of the scan,
//   Δ = softplus(dt + dt_bias) · dt_scale,  state = exp(Δ A) ⊙ state + Δ B x,
//   y = C · state + D x,  out = y · silu(z).
// Layout: state (batch, dim, dstate) in the accumulation type, updated in place; x, dt, z, out
// (batch, dim); B, C (batch, groups, dstate); the last dimension of each is contiguous, the other
// strides are free. A (dim, dstate), D, dt_bias (dim,), dt_scale (batch,): contiguous,
// accumulation type.
struct SelectiveStateUpdateParams {
  DType input_type;  // x, dt, B, C, z, out
  int64_t batch, dim, dstate, n_groups;
  bool dt_softplus;

  int64_t state_batch_stride, state_d_stride;
  int64_t x_batch_stride, dt_batch_stride, z_batch_stride, out_batch_stride;
  int64_t B_batch_stride, B_group_stride;
  int64_t C_batch_stride, C_group_stride;

  void* state;
  const void* x;
  const void* dt;
  const void* A;
  const void* B;
  const void* C;
  const void* D;         // nullable
  const void* z;         // nullable
  const void* dt_bias;   // nullable
  const void* dt_scale;  // nullable
  void* out;
};

void selective_scan_fwd_cpu(const SelectiveScanParams& params);
void selective_scan_bwd_cpu(const SelectiveScanBwdParams& params);

// CUDA launchers; `stream` is a cudaStream_t.
void selective_scan_fwd_cuda(const SelectiveScanParams& params, void* stream);
void selective_scan_bwd_cuda(const SelectiveScanBwdParams& params, void* stream);

void selective_state_update_cpu(const SelectiveStateUpdateParams& params);
void selective_state_update_cuda(const SelectiveStateUpdateParams& params, void* stream);

}  // namespace cram
