// One selective-scan step on the CPU (selective_scan.h, SelectiveStateUpdateParams): the
// streaming counterpart of selective_scan_fwd_cpu.
//
// A work item is one (batch, channel) row of the state. Its update loop over the state runs
// without a reduction, so it vectorises; the readout y = C · state is then summed in the order
// of n, as the scan kernel sums it, so one step reproduces one position of the scan exactly.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "../common/cpu_math.h"
#include "../common/parallel.h"
#include "selective_scan.h"

namespace cram {
namespace {

template <typename scalar_t>
void state_update(const SelectiveStateUpdateParams& p) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t group_size = p.dim / p.n_groups, N = p.dstate;
  const acc_t* A = static_cast<const acc_t*>(p.A);
  const acc_t* D = static_cast<const acc_t*>(p.D);
  const acc_t* bias = static_cast<const acc_t*>(p.dt_bias);
  const acc_t* dt_scale = static_cast<const acc_t*>(p.dt_scale);
  parallel_for(p.batch * p.dim, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> Bn(N), Cn(N);
    int64_t loaded = -1;  // the (batch, group) whose B and C are in Bn, Cn
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / p.dim, d = row % p.dim, g = d / group_size;
      if (b * p.n_groups + g != loaded) {
        const scalar_t* Bp = static_cast<const scalar_t*>(p.B) + b * p.B_batch_stride + g * p.B_group_stride;
        const scalar_t* Cp = static_cast<const scalar_t*>(p.C) + b * p.C_batch_stride + g * p.C_group_stride;
        for (int64_t n = 0; n < N; ++n) {
          Bn[n] = to_float(Bp[n]);
          Cn[n] = to_float(Cp[n]);
        }
        loaded = b * p.n_groups + g;
      }
      const acc_t u = to_float(static_cast<const scalar_t*>(p.x)[b * p.x_batch_stride + d]);
      const acc_t x = acc_t(to_float(static_cast<const scalar_t*>(p.dt)[b * p.dt_batch_stride + d])) +
                      (bias ? bias[d] : acc_t(0));
      acc_t step = p.dt_softplus ? softplus(x) : x;
      if (dt_scale) step *= dt_scale[b];
      const acc_t drive = step * u;
      acc_t* __restrict__ h = static_cast<acc_t*>(p.state) + b * p.state_batch_stride + d * p.state_d_stride;
      const acc_t* __restrict__ An = A + d * N;
      for (int64_t n = 0; n < N; ++n) h[n] = exp_approx(step * An[n]) * h[n] + drive * Bn[n];
      acc_t y = 0;
      for (int64_t n = 0; n < N; ++n) y += h[n] * Cn[n];
      if (D) y += D[d] * u;
      if (p.z) {
        const acc_t z = to_float(static_cast<const scalar_t*>(p.z)[b * p.z_batch_stride + d]);
        y *= z * sigmoid(z);
      }
      static_cast<scalar_t*>(p.out)[b * p.out_batch_stride + d] = from_float<scalar_t>(y);
    }
  });
}

}  // namespace

void selective_state_update_cpu(const SelectiveStateUpdateParams& params) {
  CRAM_DTYPE_SWITCH(params.input_type, "selective_state_update_cpu", [&] { state_update<scalar_t>(params); });
}

}  // namespace cram
