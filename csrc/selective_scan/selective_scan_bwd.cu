// Selective scan backward on CUDA (decomposition: selective_scan_common.cuh).
//
// Chunks are visited last to first. For each chunk and state index n, a warp
//   1. recomputes the states h_t inside the chunk from the forward's checkpoint (the state after
//      the previous chunk), with the same forward scan as the forward kernel;
//   2. runs the adjoint recurrence g_t = dy_t C_t + exp(Δ_{t+1} A) g_{t+1} (g = dL/dh_t) as a
//      reverse scan, carrying exp(Δ_s A) g_s of the next chunk's first step s across chunks;
//   3. accumulates the per-step gradients: du, dΔ in registers; dA and dD per warp; dB, dC and
//      ddt_scale summed over the block's channels in shared memory, then one coalesced atomic
//      per element per block (those tensors are shared by all channels of a group / batch).
// Memory holds no state beyond the checkpoints: the recomputation costs one more forward scan.
#include "selective_scan_common.cuh"

namespace cram {
namespace cuda {
namespace {

// Shared-memory row of one warp's per-step values, padded to 9 words per lane so that lanes
// writing their item i at the same time hit distinct banks.
constexpr int kPaddedChunk = 32 * (kScanItems + 1);
__device__ __forceinline__ int padded_index(int lane, int item) { return lane * (kScanItems + 1) + item; }

// Sums `values[array][warp][...]` over the block's warps and adds the chunk's steps
// [t_begin, L) of the result to dst0 (array 0) and dst1 (array 1, when kArrays is 2), rows with
// unit stride along L: one atomic per step per block, consecutive steps on consecutive threads.
// Must be called by every thread of the block.
template <int kArrays, typename acc_t>
__device__ __forceinline__ void block_reduce_add(acc_t (*values)[kScanWarps][kPaddedChunk],
                                                 acc_t* dst0, acc_t* dst1, int t_begin, int L) {
  __syncthreads();
  for (int k = threadIdx.x; k < kArrays * kScanChunk; k += kScanWarps * 32) {
    const int array = k / kScanChunk, step = k % kScanChunk;
    const int idx = padded_index(step / kScanItems, step % kScanItems);
    acc_t sum = 0;
#pragma unroll
    for (int w = 0; w < kScanWarps; ++w) sum += values[array][w][idx];
    if (t_begin + step < L) atomicAdd((array == 0 ? dst0 : dst1) + t_begin + step, sum);
  }
  __syncthreads();
}

// Registers (ptxas): 168 per thread on sm_90, 202-213 on sm_80, for float/half/bfloat16 inputs,
// no spills.
// The double instantiation (correctness tests only) needs twice the registers for the same
// per-lane arrays and spills a few hundred bytes to local memory; that is accepted there.
template <typename scalar_t>
__global__ void __launch_bounds__(kScanWarps * 32)
selective_scan_bwd_kernel(const SelectiveScanBwdParams p) {
  using acc_t = typename AccType<scalar_t>::type;
  // Per warp and n: exp(Δ_s A_n) g_s at the first step s of the chunk visited last (the adjoint
  // flowing into the current chunk from the future), and the running dA partial sum.
  __shared__ acc_t carried_adjoint[kScanWarps][kScanMaxDState];
  __shared__ acc_t dA_partial[kScanWarps][kScanMaxDState];
  // Per-step contributions of each warp, reduced over the block: dB and dC, then ddt_scale.
  __shared__ acc_t step_grads[2][kScanWarps][kPaddedChunk];

  const ScanChannel ch = scan_channel(p);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int L = p.seqlen, N = p.dstate;
  const scalar_t* u_row = static_cast<const scalar_t*>(p.u) + ch.b * p.u_batch_stride + ch.d * p.u_d_stride;
  const scalar_t* delta_row = static_cast<const scalar_t*>(p.delta) + ch.b * p.delta_batch_stride + ch.d * p.delta_d_stride;
  const scalar_t* z_row = p.z ? static_cast<const scalar_t*>(p.z) + ch.b * p.z_batch_stride + ch.d * p.z_d_stride : nullptr;
  const scalar_t* dout_row = static_cast<const scalar_t*>(p.dout) + ch.b * p.dout_batch_stride + ch.d * p.dout_d_stride;
  const scalar_t* B_rows = static_cast<const scalar_t*>(p.B) + ch.b * p.B_batch_stride + ch.g * p.B_group_stride;
  const scalar_t* C_rows = static_cast<const scalar_t*>(p.C) + ch.b * p.C_batch_stride + ch.g * p.C_group_stride;
  const acc_t* A_row = static_cast<const acc_t*>(p.A) + static_cast<int64_t>(ch.d) * N;
  const acc_t* states = static_cast<const acc_t*>(p.chunk_states) + (static_cast<int64_t>(ch.b) * p.dim + ch.d) * p.n_chunks * N;
  acc_t* dB_rows = static_cast<acc_t*>(p.dB) + ch.b * p.dB_batch_stride + ch.g * p.dB_group_stride;
  acc_t* dC_rows = static_cast<acc_t*>(p.dC) + ch.b * p.dC_batch_stride + ch.g * p.dC_group_stride;
  const acc_t D = p.D ? static_cast<const acc_t*>(p.D)[ch.d] : acc_t(0);
  const int64_t state_offset = (static_cast<int64_t>(ch.b) * p.dim + ch.d) * N;
  const acc_t* initial_state = p.initial_state ? static_cast<const acc_t*>(p.initial_state) + state_offset : nullptr;

  for (int n = lane; n < N; n += 32) {
    carried_adjoint[warp][n] = acc_t(0);
    dA_partial[warp][n] = acc_t(0);
  }
  __syncwarp();
  acc_t dD_partial = 0, ddelta_bias_partial = 0;

  for (int chunk = p.n_chunks - 1; chunk >= 0; --chunk) {
    const int chunk_begin = chunk * kScanChunk;
    const int t0 = chunk_begin + lane * kScanItems;
    acc_t u[kScanItems], delta[kScanItems], x[kScanItems], sp[kScanItems], dt_scale[kScanItems],
        step[kScanItems], dy[kScanItems], y[kScanItems], du[kScanItems], dstep[kScanItems];
    load_items(u_row, t0, L, acc_t(0), u);
    load_items(delta_row, t0, L, acc_t(0), delta);
    discretisation_step(p, ch.b, ch.d, t0, delta, x, sp, dt_scale, step);
    // Spare warps see dout = 0 and add exact zeros to the block reductions (below).
    if (ch.valid) load_items(dout_row, t0, L, acc_t(0), dy);
    else for (int i = 0; i < kScanItems; ++i) dy[i] = acc_t(0);
    acc_t z[kScanItems];
    if (z_row) {
      load_items(z_row, t0, L, acc_t(0), z);
#pragma unroll
      for (int i = 0; i < kScanItems; ++i) dy[i] *= z[i] * sigmoid(z[i]);  // through out = y silu(z)
    }
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) {
      y[i] = p.D ? D * u[i] : acc_t(0);  // no 0 · inf without D
      du[i] = D * dy[i];
      dstep[i] = acc_t(0);
    }

    for (int n = 0; n < N; ++n) {
      acc_t Bn[kScanItems], Cn[kScanItems];
      load_items(B_rows + n * p.B_dstate_stride, t0, L, acc_t(0), Bn);
      load_items(C_rows + n * p.C_dstate_stride, t0, L, acc_t(0), Cn);
      const acc_t A = A_row[n];

      // 1. States inside the chunk, from the checkpoint after the previous chunk.
      Affine<acc_t> step_map[kScanItems];
      Affine<acc_t> lane_map = {acc_t(1), acc_t(0)};
#pragma unroll
      for (int i = 0; i < kScanItems; ++i) {
        // Steps past L are the identity (not exp(0 · A): with A = -inf that is NaN).
        step_map[i] = t0 + i < L ? Affine<acc_t>{exp_acc(step[i] * A), step[i] * u[i] * Bn[i]}
                                 : Affine<acc_t>{acc_t(1), acc_t(0)};
        lane_map = compose(step_map[i], lane_map);
      }
      Affine<acc_t> unused_total;
      const Affine<acc_t> before = warp_exclusive_scan<true>(lane_map, unused_total);
      const acc_t checkpoint = chunk > 0 ? states[static_cast<int64_t>(chunk - 1) * N + n]
                               : (initial_state ? initial_state[n] : acc_t(0));
      acc_t h_prev[kScanItems], h[kScanItems];
      acc_t state = before.a * checkpoint + before.b;
#pragma unroll
      for (int i = 0; i < kScanItems; ++i) {
        h_prev[i] = state;
        state = step_map[i].a * state + step_map[i].b;
        h[i] = state;
        y[i] += Cn[i] * state;
      }

      // 2. Adjoint: g_t = dy_t C_t + a_{t+1} g_{t+1}, as maps g_{t+1} -> g_t applied last step
      //    first. The chunk's last step takes the carried a_s g_s as is (multiplier 1).
      const acc_t next_lane_a = __shfl_down_sync(0xffffffffu, step_map[0].a, 1);
      Affine<acc_t> adjoint_map[kScanItems];
      Affine<acc_t> lane_adjoint = {acc_t(1), acc_t(0)};
#pragma unroll
      for (int i = kScanItems - 1; i >= 0; --i) {
        const acc_t a_next = i + 1 < kScanItems ? step_map[i + 1].a : (lane < 31 ? next_lane_a : acc_t(1));
        adjoint_map[i] = {a_next, dy[i] * Cn[i]};
        lane_adjoint = compose(adjoint_map[i], lane_adjoint);
      }
      Affine<acc_t> chunk_adjoint;
      const Affine<acc_t> after = warp_exclusive_scan<false>(lane_adjoint, chunk_adjoint);
      const acc_t carry = carried_adjoint[warp][n];
      acc_t g = after.a * carry + after.b;
      acc_t dA_lane = 0;
      acc_t(&dB_steps)[kPaddedChunk] = step_grads[0][warp];
      acc_t(&dC_steps)[kPaddedChunk] = step_grads[1][warp];
#pragma unroll
      for (int i = kScanItems - 1; i >= 0; --i) {
        g = adjoint_map[i].a * g + adjoint_map[i].b;  // now g_t for item i
        // 3. h_t = a_t h_{t-1} + Δ_t B_t u_t with a_t = exp(Δ_t A).
        const acc_t g_a_hprev = g * step_map[i].a * h_prev[i];
        dstep[i] += g_a_hprev * A + g * Bn[i] * u[i];
        // A spare warp's g and dy are 0 but its u and h may be infinite (0 · inf is NaN): it
        // adds exact zeros to the shared dB, dC, as the CPU twin's padding lanes. (Past L, g is 0
        // and h_prev the last state: were that state infinite, dA would be NaN here where the
        // CPU's is finite; guarding every item costs about 20 registers, a third of the
        // occupancy, for a state that has already overflowed.)
        dA_lane += g_a_hprev * step[i];
        du[i] += g * step[i] * Bn[i];
        dB_steps[padded_index(lane, i)] = ch.valid ? g * step[i] * u[i] : acc_t(0);
        dC_steps[padded_index(lane, i)] = ch.valid ? dy[i] * h[i] : acc_t(0);
      }
      const acc_t g_first = __shfl_sync(0xffffffffu, step_map[0].a, 0) *
                            (chunk_adjoint.a * carry + chunk_adjoint.b);
      dA_lane = warp_sum(dA_lane);
      __syncwarp();  // every lane has read the carry before lane 0 replaces it
      if (lane == 0) {
        carried_adjoint[warp][n] = g_first;
        dA_partial[warp][n] += dA_lane;
      }
      __syncwarp();
      block_reduce_add<2>(step_grads, dB_rows + n * p.dB_dstate_stride,
                          dC_rows + n * p.dC_dstate_stride, chunk_begin, L);
    }

    // Through Δ = sp · dt_scale and sp = softplus(x), x = delta + delta_bias.
    acc_t ddelta[kScanItems];
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) {
      const bool in_range = t0 + i < L;
      // softplus is x above 20 (cuda_dtype.cuh): its derivative there is 1, not sigmoid(x).
      const bool through_sigmoid = p.delta_softplus && x[i] <= acc_t(20);
      ddelta[i] = in_range ? dstep[i] * dt_scale[i] * (through_sigmoid ? sigmoid(x[i]) : acc_t(1)) : acc_t(0);
      ddelta_bias_partial += ddelta[i];
      dD_partial += dy[i] * u[i];
      if (p.ddt_scale) step_grads[0][warp][padded_index(lane, i)] = in_range && ch.valid ? dstep[i] * sp[i] : acc_t(0);
    }
    if (p.ddt_scale) {
      block_reduce_add<1>(step_grads, static_cast<acc_t*>(p.ddt_scale) + static_cast<int64_t>(ch.b) * L,
                          static_cast<acc_t*>(nullptr), chunk_begin, L);
    }
    if (ch.valid) {
      store_items(static_cast<scalar_t*>(p.du) + ch.b * p.du_batch_stride + ch.d * p.du_d_stride, t0, L, du);
      store_items(static_cast<scalar_t*>(p.ddelta) + ch.b * p.ddelta_batch_stride + ch.d * p.ddelta_d_stride, t0, L, ddelta);
      if (z_row) {
        // out = y silu(z): dz = dout y silu'(z), silu'(z) = σ(z) (1 + z (1 - σ(z))).
        acc_t dout[kScanItems], dz[kScanItems];
        load_items(dout_row, t0, L, acc_t(0), dout);
#pragma unroll
        for (int i = 0; i < kScanItems; ++i) {
          const acc_t s = sigmoid(z[i]);
          dz[i] = dout[i] * y[i] * s * (acc_t(1) + z[i] * (acc_t(1) - s));
        }
        store_items(static_cast<scalar_t*>(p.dz) + ch.b * p.dz_batch_stride + ch.d * p.dz_d_stride, t0, L, dz);
      }
    }
  }

  if (!ch.valid) return;  // past the last block-wide barrier
  __syncwarp();
  // After the first chunk the carried adjoint is dL/dh_{-1}: the initial state's gradient.
  if (p.dinitial_state)
    for (int n = lane; n < N; n += 32) static_cast<acc_t*>(p.dinitial_state)[state_offset + n] = carried_adjoint[warp][n];
  for (int n = lane; n < N; n += 32) atomicAdd(static_cast<acc_t*>(p.dA) + static_cast<int64_t>(ch.d) * N + n, dA_partial[warp][n]);
  dD_partial = warp_sum(dD_partial);
  ddelta_bias_partial = warp_sum(ddelta_bias_partial);
  if (lane == 0 && p.dD) atomicAdd(static_cast<acc_t*>(p.dD) + ch.d, dD_partial);
  if (lane == 0 && p.ddelta_bias) atomicAdd(static_cast<acc_t*>(p.ddelta_bias) + ch.d, ddelta_bias_partial);
}

}  // namespace
}  // namespace cuda

void selective_scan_bwd_cuda(const SelectiveScanBwdParams& params, void* stream) {
  using namespace cuda;
  check_scan_launch(params, "selective_scan backward (CUDA)");
  CRAM_CUDA_DTYPE_SWITCH(params.input_type, "selective_scan backward (CUDA)", [&] {
    selective_scan_bwd_kernel<scalar_t><<<scan_grid(params), kScanWarps * 32, 0,
                                          static_cast<cudaStream_t>(stream)>>>(params);
    CRAM_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace cram
