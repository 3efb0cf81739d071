// Selective scan forward on CUDA (decomposition: selective_scan_common.cuh).
//
// Per chunk a warp loads u, delta (and z) once, fuses softplus and dt_scale into the step Δ, then
// for each state index n builds the per-step maps (exp(Δ A_n), Δ B_n u), scans them across the
// warp starting from the state carried from the previous chunk (the initial state, 0 unless
// given, before the first), and accumulates y += C_n h. The state after the chunk is both the
// next chunk's carry and the checkpoint in chunk_states.
#include "selective_scan_common.cuh"

namespace cram {
namespace cuda {
namespace {

template <typename scalar_t>
__global__ void __launch_bounds__(kScanWarps * 32)
selective_scan_fwd_kernel(const SelectiveScanParams p) {
  using acc_t = typename AccType<scalar_t>::type;
  // The state of each warp's channel at the end of the previous chunk, one entry per n.
  __shared__ acc_t carried_state[kScanWarps][kScanMaxDState];

  const ScanChannel ch = scan_channel(p);
  if (!ch.valid) return;  // no block-wide synchronisation below: spare warps may leave
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int L = p.seqlen, N = p.dstate;
  const scalar_t* u_row = static_cast<const scalar_t*>(p.u) + ch.b * p.u_batch_stride + ch.d * p.u_d_stride;
  const scalar_t* delta_row = static_cast<const scalar_t*>(p.delta) + ch.b * p.delta_batch_stride + ch.d * p.delta_d_stride;
  const scalar_t* z_row = p.z ? static_cast<const scalar_t*>(p.z) + ch.b * p.z_batch_stride + ch.d * p.z_d_stride : nullptr;
  const scalar_t* B_rows = static_cast<const scalar_t*>(p.B) + ch.b * p.B_batch_stride + ch.g * p.B_group_stride;
  const scalar_t* C_rows = static_cast<const scalar_t*>(p.C) + ch.b * p.C_batch_stride + ch.g * p.C_group_stride;
  scalar_t* out_row = static_cast<scalar_t*>(p.out) + ch.b * p.out_batch_stride + ch.d * p.out_d_stride;
  const acc_t* A_row = static_cast<const acc_t*>(p.A) + static_cast<int64_t>(ch.d) * N;
  acc_t* states = static_cast<acc_t*>(p.chunk_states) + (static_cast<int64_t>(ch.b) * p.dim + ch.d) * p.n_chunks * N;
  const acc_t D = p.D ? static_cast<const acc_t*>(p.D)[ch.d] : acc_t(0);

  const acc_t* initial_state = p.initial_state
      ? static_cast<const acc_t*>(p.initial_state) + (static_cast<int64_t>(ch.b) * p.dim + ch.d) * N
      : nullptr;
  for (int n = lane; n < N; n += 32) carried_state[warp][n] = initial_state ? initial_state[n] : acc_t(0);
  __syncwarp();

  for (int chunk = 0; chunk < p.n_chunks; ++chunk) {
    const int t0 = chunk * kScanChunk + lane * kScanItems;
    acc_t u[kScanItems], delta[kScanItems], x[kScanItems], sp[kScanItems], dt_scale[kScanItems],
        step[kScanItems], y[kScanItems];
    load_items(u_row, t0, L, acc_t(0), u);
    load_items(delta_row, t0, L, acc_t(0), delta);
    discretisation_step(p, ch.b, ch.d, t0, delta, x, sp, dt_scale, step);
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) y[i] = p.D ? D * u[i] : acc_t(0);  // no 0 · inf without D

    // B and C of state n + 1 are loaded while state n is scanned, to keep loads in flight.
    acc_t Bn[kScanItems], Cn[kScanItems], B_next[kScanItems], C_next[kScanItems];
    load_items(B_rows, t0, L, acc_t(0), B_next);
    load_items(C_rows, t0, L, acc_t(0), C_next);
    for (int n = 0; n < N; ++n) {
#pragma unroll
      for (int i = 0; i < kScanItems; ++i) {
        Bn[i] = B_next[i];
        Cn[i] = C_next[i];
      }
      if (n + 1 < N) {
        load_items(B_rows + (n + 1) * p.B_dstate_stride, t0, L, acc_t(0), B_next);
        load_items(C_rows + (n + 1) * p.C_dstate_stride, t0, L, acc_t(0), C_next);
      }
      const acc_t A = A_row[n];
      Affine<acc_t> step_map[kScanItems];
      Affine<acc_t> lane_map = {acc_t(1), acc_t(0)};
#pragma unroll
      for (int i = 0; i < kScanItems; ++i) {
        // Steps past L are the identity (not exp(0 · A): with A = -inf that is NaN).
        step_map[i] = t0 + i < L ? Affine<acc_t>{exp_acc(step[i] * A), step[i] * u[i] * Bn[i]}
                                 : Affine<acc_t>{acc_t(1), acc_t(0)};
        lane_map = compose(step_map[i], lane_map);
      }
      Affine<acc_t> chunk_map;
      const Affine<acc_t> before = warp_exclusive_scan<true>(lane_map, chunk_map);
      const acc_t carry = carried_state[warp][n];
      acc_t h = before.a * carry + before.b;
#pragma unroll
      for (int i = 0; i < kScanItems; ++i) {
        h = step_map[i].a * h + step_map[i].b;
        y[i] += Cn[i] * h;
      }
      const acc_t chunk_end_state = chunk_map.a * carry + chunk_map.b;
      __syncwarp();  // every lane has read the carry before lane 0 replaces it
      if (lane == 0) {
        carried_state[warp][n] = chunk_end_state;
        states[static_cast<int64_t>(chunk) * N + n] = chunk_end_state;
      }
      __syncwarp();
    }

    if (z_row) {
      acc_t z[kScanItems];
      load_items(z_row, t0, L, acc_t(0), z);
#pragma unroll
      for (int i = 0; i < kScanItems; ++i) y[i] *= z[i] * sigmoid(z[i]);
    }
    store_items(out_row, t0, L, y);
  }
}

}  // namespace
}  // namespace cuda

void selective_scan_fwd_cuda(const SelectiveScanParams& params, void* stream) {
  using namespace cuda;
  check_scan_launch(params, "selective_scan (CUDA)");
  CRAM_CUDA_DTYPE_SWITCH(params.input_type, "selective_scan (CUDA)", [&] {
    selective_scan_fwd_kernel<scalar_t><<<scan_grid(params), kScanWarps * 32, 0,
                                          static_cast<cudaStream_t>(stream)>>>(params);
    CRAM_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace cram
