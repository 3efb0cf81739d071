// Selective scan on the CPU: forward and backward (see selective_scan.h for the math).
//
// Vectorised across channels, not across the state: a work item is one batch element and a
// block of kLanes consecutive channels of one group. Those channels share B_t and C_t, so the
// inner loop is `for lane: h[n][lane] = a * h[n][lane] + Δu[lane] * B[t][n]` with B broadcast,
// which the compiler turns into SIMD without any horizontal reduction. Sequence data is moved
// through small transposed tiles ([time][lane]) so every inner loop reads contiguous memory.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../common/cpu_math.h"
#include "../common/parallel.h"
#include "selective_scan.h"

namespace cram {
namespace {

constexpr int kLanes = 16;     // channels per work item (one AVX-512 register of floats)
constexpr int kTimeTile = 64;  // steps per transposed tile

// Channel blocks: kLanes channels of one group (fewer at a group's end).
struct ChannelBlocks {
  int per_group, group_size;
  ChannelBlocks(const SelectiveScanParams& p)
      : per_group((p.dim / p.n_groups + kLanes - 1) / kLanes), group_size(p.dim / p.n_groups) {}
  int count(const SelectiveScanParams& p) const { return per_group * p.n_groups; }
  int group(int block) const { return block / per_group; }
  int first_channel(int block) const { return group(block) * group_size + (block % per_group) * kLanes; }
  int width(int block) const { return std::min(kLanes, group_size - (block % per_group) * kLanes); }
};

// One work item's channels: where its data lives and its per-channel parameters in lanes.
template <typename scalar_t, typename acc_t>
struct ScanBlock {
  const SelectiveScanParams& p;
  int b, d0, width, group;
  std::vector<acc_t> A;  // A[n][lane]
  acc_t D[kLanes], bias[kLanes];

  ScanBlock(const SelectiveScanParams& params, int64_t item, const ChannelBlocks& blocks)
      : p(params), b(int(item / blocks.count(params))), A(params.dstate * kLanes) {
    const int block = int(item % blocks.count(params));
    d0 = blocks.first_channel(block);
    width = blocks.width(block);
    group = blocks.group(block);
    const acc_t* Ap = static_cast<const acc_t*>(p.A);
    const acc_t* Dp = static_cast<const acc_t*>(p.D);
    const acc_t* bp = static_cast<const acc_t*>(p.delta_bias);
    for (int c = 0; c < kLanes; ++c) {
      const bool live = c < width;
      for (int n = 0; n < p.dstate; ++n) A[n * kLanes + c] = live ? Ap[(d0 + c) * p.dstate + n] : acc_t(0);
      D[c] = live && Dp ? Dp[d0 + c] : acc_t(0);
      bias[c] = live && bp ? bp[d0 + c] : acc_t(0);
    }
  }

  // Loads steps [t0, t0 + T) of a (batch, dim, L) tensor as tile[t * kLanes + lane]; dead lanes
  // (past the block's width) read 0, so they contribute nothing to cross-channel sums.
  template <typename T>
  void load(acc_t* tile, const void* base, int64_t batch_stride, int64_t d_stride, int t0, int len) const {
    for (int c = 0; c < kLanes; ++c) {
      if (c >= width) {
        for (int t = 0; t < len; ++t) tile[t * kLanes + c] = acc_t(0);
        continue;
      }
      const T* src = static_cast<const T*>(base) + b * batch_stride + (d0 + c) * d_stride + t0;
      for (int t = 0; t < len; ++t) tile[t * kLanes + c] = to_float(src[t]);
    }
  }

  // Stores tile[t * kLanes + lane] to steps [t0, t0 + len) of a (batch, dim, L) tensor.
  void store(scalar_t* base, int64_t batch_stride, int64_t d_stride, const acc_t* tile, int t0, int len) const {
    for (int c = 0; c < width; ++c) {
      scalar_t* dst = base + b * batch_stride + (d0 + c) * d_stride + t0;
      for (int t = 0; t < len; ++t) dst[t] = from_float<scalar_t>(tile[t * kLanes + c]);
    }
  }

  // Turns raw delta into its pre-softplus argument x = delta + bias (in place) and the step
  // Δ = softplus(x) · dt_scale. Flat loops without branches inside, so they vectorise.
  void steps(acc_t* x, acc_t* step, int t0, int len) const {
    for (int t = 0; t < len; ++t)
      for (int c = 0; c < kLanes; ++c) x[t * kLanes + c] += bias[c];
    const int n = len * kLanes;
    if (p.delta_softplus) {
      for (int i = 0; i < n; ++i) step[i] = softplus(x[i]);
    } else {
      std::copy(x, x + n, step);
    }
    if (p.dt_scale) {
      const acc_t* scale = static_cast<const acc_t*>(p.dt_scale) + int64_t(b) * p.seqlen + t0;
      for (int t = 0; t < len; ++t)
        for (int c = 0; c < kLanes; ++c) step[t * kLanes + c] *= scale[t];
    }
  }

  acc_t* checkpoint(int chunk) const {
    return static_cast<acc_t*>(p.chunk_states) + ((int64_t(b) * p.dim + d0) * p.n_chunks + chunk) * p.dstate;
  }
  void save_state(const acc_t* h, int chunk) const {
    acc_t* dst = checkpoint(chunk);
    for (int c = 0; c < width; ++c)
      for (int n = 0; n < p.dstate; ++n) dst[int64_t(c) * p.n_chunks * p.dstate + n] = h[n * kLanes + c];
  }
  void restore_state(acc_t* h, int chunk) const {
    std::fill(h, h + p.dstate * kLanes, acc_t(0));
    if (chunk < 0) return;
    const acc_t* src = checkpoint(chunk);
    for (int c = 0; c < width; ++c)
      for (int n = 0; n < p.dstate; ++n) h[n * kLanes + c] = src[int64_t(c) * p.n_chunks * p.dstate + n];
  }
};

// Advances the state one step, h = exp(Δ A) ⊙ h + Δ u B_t, and returns y = C_t · h per lane.
template <typename acc_t>
inline void scan_step(acc_t* __restrict__ h, const acc_t* __restrict__ A, const acc_t* __restrict__ step,
                      const acc_t* __restrict__ u, const acc_t* __restrict__ Bt,
                      const acc_t* __restrict__ Ct, int N, acc_t* __restrict__ y) {
  acc_t drive[kLanes];
  for (int c = 0; c < kLanes; ++c) {
    drive[c] = step[c] * u[c];
    y[c] = acc_t(0);
  }
  for (int n = 0; n < N; ++n) {
    acc_t* __restrict__ hn = h + n * kLanes;
    const acc_t* __restrict__ An = A + n * kLanes;
    const acc_t b = Bt[n], c_n = Ct[n];
    for (int c = 0; c < kLanes; ++c) {
      hn[c] = exp_approx(step[c] * An[c]) * hn[c] + drive[c] * b;
      y[c] += hn[c] * c_n;
    }
  }
}

// B and C in time-major order, (batch, groups, L, N) in the accumulation type: all channel
// blocks of a group read the same B_t and C_t, so they are transposed once, not per block.
template <typename scalar_t, typename acc_t>
struct TimeMajorBC {
  int L, N, groups;
  std::vector<acc_t> B, C;

  explicit TimeMajorBC(const SelectiveScanParams& p)
      : L(p.seqlen), N(p.dstate), groups(p.n_groups),
        B(int64_t(p.batch) * p.n_groups * p.seqlen * p.dstate), C(B.size()) {
    parallel_for(int64_t(p.batch) * p.n_groups, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bg = begin; bg < end; ++bg) {
        const int64_t b = bg / groups, g = bg % groups;
        transpose(&B[bg * L * N], static_cast<const scalar_t*>(p.B) + b * p.B_batch_stride + g * p.B_group_stride,
                  p.B_dstate_stride);
        transpose(&C[bg * L * N], static_cast<const scalar_t*>(p.C) + b * p.C_batch_stride + g * p.C_group_stride,
                  p.C_dstate_stride);
      }
    });
  }
  void transpose(acc_t* dst, const scalar_t* src, int64_t dstate_stride) const {
    for (int n = 0; n < N; ++n)
      for (int t = 0; t < L; ++t) dst[int64_t(t) * N + n] = to_float(src[n * dstate_stride + t]);
  }
  // B_t (or C_t) of steps t0, t0 + 1, ... as [t][n].
  const acc_t* B_at(int b, int g, int t0) const { return &B[((int64_t(b) * groups + g) * L + t0) * N]; }
  const acc_t* C_at(int b, int g, int t0) const { return &C[((int64_t(b) * groups + g) * L + t0) * N]; }
};

// Per-thread buffers for one chunk of up to `len` steps.
template <typename acc_t>
struct Tiles {
  std::vector<acc_t> u, x, step, z, dout, y;
  explicit Tiles(int len)
      : u(len * kLanes), x(len * kLanes), step(len * kLanes), z(len * kLanes), dout(len * kLanes),
        y(len * kLanes) {}

  template <typename scalar_t>
  void load(const ScanBlock<scalar_t, acc_t>& sb, int t0, int len) {
    const SelectiveScanParams& p = sb.p;
    sb.template load<scalar_t>(u.data(), p.u, p.u_batch_stride, p.u_d_stride, t0, len);
    sb.template load<scalar_t>(x.data(), p.delta, p.delta_batch_stride, p.delta_d_stride, t0, len);
    if (p.z) sb.template load<scalar_t>(z.data(), p.z, p.z_batch_stride, p.z_d_stride, t0, len);
    sb.steps(x.data(), step.data(), t0, len);
  }
};

template <typename scalar_t>
void scan_fwd(const SelectiveScanParams& p) {
  using acc_t = typename AccType<scalar_t>::type;
  const ChannelBlocks blocks(p);
  const TimeMajorBC<scalar_t, acc_t> bc(p);
  parallel_for(int64_t(p.batch) * blocks.count(p), 1, [&](int64_t begin, int64_t end) {
    Tiles<acc_t> tile(kTimeTile);
    std::vector<acc_t> h(p.dstate * kLanes);
    for (int64_t item = begin; item < end; ++item) {
      const ScanBlock<scalar_t, acc_t> sb(p, item, blocks);
      sb.restore_state(h.data(), -1);
      for (int t0 = 0; t0 < p.seqlen; t0 += kTimeTile) {
        const int len = std::min(kTimeTile, p.seqlen - t0);
        tile.load(sb, t0, len);
        const acc_t* B = bc.B_at(sb.b, sb.group, t0);
        const acc_t* C = bc.C_at(sb.b, sb.group, t0);
        for (int t = 0; t < len; ++t) {
          scan_step(h.data(), sb.A.data(), &tile.step[t * kLanes], &tile.u[t * kLanes], &B[t * p.dstate],
                    &C[t * p.dstate], p.dstate, &tile.y[t * kLanes]);
          const int pos = t0 + t + 1;
          if (pos % kScanCheckpointChunk == 0 || pos == p.seqlen) sb.save_state(h.data(), (pos - 1) / kScanCheckpointChunk);
        }
        for (int t = 0; t < len; ++t)
          for (int c = 0; c < kLanes; ++c) tile.y[t * kLanes + c] += sb.D[c] * tile.u[t * kLanes + c];
        if (p.z)
          for (int i = 0; i < len * kLanes; ++i) tile.y[i] *= tile.z[i] * sigmoid(tile.z[i]);
        sb.store(static_cast<scalar_t*>(p.out), p.out_batch_stride, p.out_d_stride, tile.y.data(), t0, len);
      }
    }
  });
}

// Backward, chunk by chunk from the end: recompute the chunk's states from its checkpoint,
// then walk it in reverse carrying g = dL/dh_t. Quantities shared across work items (dA, dD,
// ddelta_bias across the batch; dB, dC, ddt_scale across channel blocks) go to per-item partial
// buffers that are summed afterwards in a fixed order, so results are deterministic.
template <typename scalar_t>
void scan_bwd(const SelectiveScanBwdParams& p) {
  using acc_t = typename AccType<scalar_t>::type;
  const ChannelBlocks blocks(p);
  const int n_blocks = blocks.count(p), N = p.dstate, L = p.seqlen;
  const int64_t n_items = int64_t(p.batch) * n_blocks;
  std::vector<acc_t> dA_part(int64_t(p.batch) * p.dim * N), dD_part(int64_t(p.batch) * p.dim),
      dbias_part(int64_t(p.batch) * p.dim);
  std::vector<acc_t> dB_part(n_items * N * L), dC_part(n_items * N * L);
  std::vector<acc_t> ddt_part(p.dt_scale ? n_items * L : 0);

  const TimeMajorBC<scalar_t, acc_t> bc(p);
  parallel_for(n_items, 1, [&](int64_t begin, int64_t end) {
    const int len_max = std::min(kScanCheckpointChunk, L);
    Tiles<acc_t> tile(len_max);
    std::vector<acc_t> H(int64_t(len_max) * N * kLanes), h_start(N * kLanes), g(N * kLanes);
    std::vector<acc_t> du(len_max * kLanes), dx(len_max * kLanes), dz(len_max * kLanes);
    for (int64_t item = begin; item < end; ++item) {
      const ScanBlock<scalar_t, acc_t> sb(p, item, blocks);
      acc_t dA[kScanMaxDState * kLanes] = {}, dD[kLanes] = {}, dbias[kLanes] = {};
      acc_t* dB = &dB_part[item * N * L];
      acc_t* dC = &dC_part[item * N * L];
      acc_t* ddt = p.dt_scale ? &ddt_part[item * L] : nullptr;
      std::fill(g.begin(), g.end(), acc_t(0));
      for (int chunk = p.n_chunks - 1; chunk >= 0; --chunk) {
        const int t0 = chunk * kScanCheckpointChunk, len = std::min(kScanCheckpointChunk, L - t0);
        tile.load(sb, t0, len);
        sb.template load<scalar_t>(tile.dout.data(), p.dout, p.dout_batch_stride, p.dout_d_stride, t0, len);
        sb.restore_state(h_start.data(), chunk - 1);
        std::copy(h_start.begin(), h_start.end(), H.begin());
        const acc_t* B = bc.B_at(sb.b, sb.group, t0);
        const acc_t* C = bc.C_at(sb.b, sb.group, t0);
        for (int t = 0; t < len; ++t) {
          acc_t y[kLanes];
          acc_t* Ht = &H[int64_t(t) * N * kLanes];
          if (t > 0) std::copy(Ht - N * kLanes, Ht, Ht);
          scan_step(Ht, sb.A.data(), &tile.step[t * kLanes], &tile.u[t * kLanes], &B[t * N], &C[t * N], N, y);
        }
        for (int t = len - 1; t >= 0; --t) {
          const acc_t* Ht = &H[int64_t(t) * N * kLanes];
          const acc_t* Hprev = t > 0 ? Ht - N * kLanes : h_start.data();
          const acc_t* Bt = &B[t * N];
          const acc_t* Ct = &C[t * N];
          const acc_t* u = &tile.u[t * kLanes];
          const acc_t* step = &tile.step[t * kLanes];
          acc_t dy[kLanes], dstep[kLanes] = {}, dut[kLanes];
          for (int c = 0; c < kLanes; ++c) {
            dy[c] = tile.dout[t * kLanes + c];
            if (p.z) {  // out = y · silu(z): recompute y = C·h + D u for dz
              const acc_t zc = tile.z[t * kLanes + c], s = sigmoid(zc);
              acc_t y = sb.D[c] * u[c];
              for (int n = 0; n < N; ++n) y += Ct[n] * Ht[n * kLanes + c];
              dz[t * kLanes + c] = dy[c] * y * s * (acc_t(1) + zc * (acc_t(1) - s));
              dy[c] *= zc * s;
            }
            dD[c] += dy[c] * u[c];
            dut[c] = dy[c] * sb.D[c];
          }
          for (int n = 0; n < N; ++n) {
            acc_t* gn = &g[n * kLanes];
            const acc_t* An = &sb.A[n * kLanes];
            acc_t dC_sum = 0, dB_sum = 0;
            for (int c = 0; c < kLanes; ++c) {
              gn[c] += Ct[n] * dy[c];
              dC_sum += dy[c] * Ht[n * kLanes + c];
              const acc_t decay = exp_approx(step[c] * An[c]);
              const acc_t d_arg = gn[c] * Hprev[n * kLanes + c] * decay;  // d/d(Δ A)
              dstep[c] += d_arg * An[c] + gn[c] * Bt[n] * u[c];
              dA[n * kLanes + c] += d_arg * step[c];
              dut[c] += gn[c] * Bt[n] * step[c];
              dB_sum += gn[c] * step[c] * u[c];
              gn[c] *= decay;
            }
            dC[int64_t(n) * L + t0 + t] = dC_sum;
            dB[int64_t(n) * L + t0 + t] = dB_sum;
          }
          // Δ = softplus(x) · scale: back through the scale and the softplus.
          const acc_t scale = p.dt_scale ? static_cast<const acc_t*>(p.dt_scale)[int64_t(sb.b) * L + t0 + t] : acc_t(1);
          acc_t dscale = 0;
          for (int c = 0; c < kLanes; ++c) {
            const acc_t x = tile.x[t * kLanes + c];
            const bool soft = p.delta_softplus && x <= acc_t(20);
            dscale += dstep[c] * (p.delta_softplus ? softplus(x) : x);
            const acc_t dxc = dstep[c] * scale * (soft ? sigmoid(x) : acc_t(1));
            dx[t * kLanes + c] = dxc;
            dbias[c] += dxc;
            du[t * kLanes + c] = dut[c];
          }
          if (ddt) ddt[t0 + t] = dscale;
        }
        sb.store(static_cast<scalar_t*>(p.du), p.du_batch_stride, p.du_d_stride, du.data(), t0, len);
        sb.store(static_cast<scalar_t*>(p.ddelta), p.ddelta_batch_stride, p.ddelta_d_stride, dx.data(), t0, len);
        if (p.z) sb.store(static_cast<scalar_t*>(p.dz), p.dz_batch_stride, p.dz_d_stride, dz.data(), t0, len);
      }
      for (int c = 0; c < sb.width; ++c) {
        const int64_t row = int64_t(sb.b) * p.dim + sb.d0 + c;
        for (int n = 0; n < N; ++n) dA_part[row * N + n] = dA[n * kLanes + c];
        dD_part[row] = dD[c];
        dbias_part[row] = dbias[c];
      }
    }
  });

  // Fixed-order reductions of the partial sums.
  acc_t* dA = static_cast<acc_t*>(p.dA);
  for (int b = 0; b < p.batch; ++b)
    for (int64_t i = 0; i < int64_t(p.dim) * N; ++i) dA[i] += dA_part[b * int64_t(p.dim) * N + i];
  for (int b = 0; b < p.batch; ++b)
    for (int d = 0; d < p.dim; ++d) {
      if (p.dD) static_cast<acc_t*>(p.dD)[d] += dD_part[int64_t(b) * p.dim + d];
      if (p.ddelta_bias) static_cast<acc_t*>(p.ddelta_bias)[d] += dbias_part[int64_t(b) * p.dim + d];
    }
  parallel_for(int64_t(p.batch) * p.n_groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bg = begin; bg < end; ++bg) {
      const int b = int(bg / p.n_groups), grp = int(bg % p.n_groups);
      acc_t* dB = static_cast<acc_t*>(p.dB) + b * p.dB_batch_stride + grp * p.dB_group_stride;
      acc_t* dC = static_cast<acc_t*>(p.dC) + b * p.dC_batch_stride + grp * p.dC_group_stride;
      for (int k = 0; k < blocks.per_group; ++k) {
        const int64_t item = int64_t(b) * n_blocks + grp * blocks.per_group + k;
        for (int n = 0; n < N; ++n)
          for (int t = 0; t < L; ++t) {
            dB[n * p.dB_dstate_stride + t] += dB_part[(item * N + n) * L + t];
            dC[n * p.dC_dstate_stride + t] += dC_part[(item * N + n) * L + t];
          }
      }
    }
  });
  if (p.ddt_scale) {
    acc_t* ddt = static_cast<acc_t*>(p.ddt_scale);
    for (int b = 0; b < p.batch; ++b)
      for (int k = 0; k < n_blocks; ++k)
        for (int t = 0; t < L; ++t) ddt[int64_t(b) * L + t] += ddt_part[(int64_t(b) * n_blocks + k) * L + t];
  }
}

}  // namespace

void selective_scan_fwd_cpu(const SelectiveScanParams& params) {
  CRAM_DTYPE_SWITCH(params.input_type, "selective_scan_fwd_cpu", [&] { scan_fwd<scalar_t>(params); });
}

void selective_scan_bwd_cpu(const SelectiveScanBwdParams& params) {
  CRAM_DTYPE_SWITCH(params.input_type, "selective_scan_bwd_cpu", [&] { scan_bwd<scalar_t>(params); });
}

}  // namespace cram
