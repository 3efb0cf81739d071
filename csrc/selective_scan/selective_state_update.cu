// One selective-scan step on CUDA (selective_scan.h, SelectiveStateUpdateParams), the streaming
// counterpart of selective_scan_fwd.cu.
//
// One thread per (batch, channel): it reads the channel's state row, updates it in place and
// sums y = C · state in the order of n, as the scan does. A block covers kChannelsPerBlock
// consecutive channels of one batch entry, which share B and C (one group) in the common case;
// they are staged in shared memory once per block.
#include "../common/cuda_dtype.cuh"
#include "selective_scan.h"

namespace cram {
namespace cuda {
namespace {

constexpr int kChannelsPerBlock = 128;

template <typename scalar_t>
__global__ void __launch_bounds__(kChannelsPerBlock)
selective_state_update_kernel(const SelectiveStateUpdateParams p) {
  using acc_t = typename AccType<scalar_t>::type;
  __shared__ acc_t shared_B[kScanMaxDState], shared_C[kScanMaxDState];
  const int64_t b = blockIdx.y, N = p.dstate, group_size = p.dim / p.n_groups;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kChannelsPerBlock;
  const int64_t d = first + threadIdx.x;
  // The block's channels share a group unless it straddles a group boundary.
  const int64_t block_group = first / group_size;
  const bool shared_group = (min(first + kChannelsPerBlock, p.dim) - 1) / group_size == block_group;
  const scalar_t* B_base = static_cast<const scalar_t*>(p.B) + b * p.B_batch_stride;
  const scalar_t* C_base = static_cast<const scalar_t*>(p.C) + b * p.C_batch_stride;
  if (shared_group) {
    for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
      shared_B[n] = to_acc(B_base[block_group * p.B_group_stride + n]);
      shared_C[n] = to_acc(C_base[block_group * p.C_group_stride + n]);
    }
  }
  __syncthreads();
  if (d >= p.dim) return;
  const int64_t g = d / group_size;

  const acc_t u = to_acc(static_cast<const scalar_t*>(p.x)[b * p.x_batch_stride + d]);
  const acc_t x = to_acc(static_cast<const scalar_t*>(p.dt)[b * p.dt_batch_stride + d]) +
                  (p.dt_bias ? static_cast<const acc_t*>(p.dt_bias)[d] : acc_t(0));
  acc_t step = p.dt_softplus ? softplus(x) : x;
  if (p.dt_scale) step *= static_cast<const acc_t*>(p.dt_scale)[b];
  const acc_t drive = step * u;
  acc_t* h = static_cast<acc_t*>(p.state) + b * p.state_batch_stride + d * p.state_d_stride;
  const acc_t* A = static_cast<const acc_t*>(p.A) + d * N;
  acc_t y = 0;
  for (int64_t n = 0; n < N; ++n) {
    const acc_t Bn = shared_group ? shared_B[n] : to_acc(B_base[g * p.B_group_stride + n]);
    const acc_t Cn = shared_group ? shared_C[n] : to_acc(C_base[g * p.C_group_stride + n]);
    const acc_t hn = exp_acc(step * A[n]) * h[n] + drive * Bn;
    h[n] = hn;
    y += hn * Cn;
  }
  if (p.D) y += static_cast<const acc_t*>(p.D)[d] * u;
  if (p.z) {
    const acc_t z = to_acc(static_cast<const scalar_t*>(p.z)[b * p.z_batch_stride + d]);
    y *= z * sigmoid(z);
  }
  static_cast<scalar_t*>(p.out)[b * p.out_batch_stride + d] = from_acc<scalar_t>(y);
}

}  // namespace
}  // namespace cuda

void selective_state_update_cuda(const SelectiveStateUpdateParams& params, void* stream) {
  using namespace cuda;
  if (params.batch > 65535)
    throw std::invalid_argument("selective_state_update (CUDA): batch must be at most 65535 (grid y), got " +
                                std::to_string(params.batch));
  const dim3 grid(static_cast<unsigned>((params.dim + kChannelsPerBlock - 1) / kChannelsPerBlock),
                  static_cast<unsigned>(params.batch));
  CRAM_CUDA_DTYPE_SWITCH(params.input_type, "selective_state_update (CUDA)", [&] {
    selective_state_update_kernel<scalar_t><<<grid, kChannelsPerBlock, 0, static_cast<cudaStream_t>(stream)>>>(params);
    CRAM_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace cram
