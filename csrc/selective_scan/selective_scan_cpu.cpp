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
#include <memory>
#include <type_traits>
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

// W consecutive elements of storage type T as one vector of acc_t, and back.
template <typename acc_t, typename T>
inline Vec<acc_t> load_widened(const T* src) {
  if constexpr (std::is_same_v<T, acc_t>) {
    return load_vec(src);
  } else {
    Vec<acc_t> v;
    for (int i = 0; i < Simd<acc_t>::lanes; ++i) v[i] = to_float(src[i]);
    return v;
  }
}
template <typename T, typename acc_t = typename AccType<T>::type>
inline void store_narrowed(T* dst, Vec<acc_t> v) {
  if constexpr (std::is_same_v<T, acc_t>) {
    store_vec(dst, v);
  } else {
    for (int i = 0; i < Simd<acc_t>::lanes; ++i) dst[i] = from_float<T>(v[i]);
  }
}

// One work item's channels: where its data lives and its per-channel parameters in lanes.
template <typename scalar_t, typename acc_t>
struct ScanBlock {
  static constexpr int W = Simd<acc_t>::lanes;
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

  // Loads steps [t0, t0 + len) of a (batch, dim, L) tensor as tile[t * kLanes + lane]; dead
  // lanes (past the block's width) read 0, so they contribute nothing to cross-channel sums.
  // Whole W x W blocks (W steps of W channels) are transposed in registers.
  template <typename T>
  void load(acc_t* tile, const void* base, int64_t batch_stride, int64_t d_stride, int t0, int len) const {
    const T* src = static_cast<const T*>(base) + b * batch_stride + d0 * d_stride + t0;
    int t = 0;
    if (width == kLanes)
      for (; t + W <= len; t += W)
        for (int c0 = 0; c0 < kLanes; c0 += W) {
          Vec<acc_t> rows[W];
          for (int i = 0; i < W; ++i) rows[i] = load_widened<acc_t>(src + (c0 + i) * d_stride + t);
          transpose_vecs<acc_t>(rows);
          for (int i = 0; i < W; ++i) store_vec(&tile[(t + i) * kLanes + c0], rows[i]);
        }
    for (int c = 0; c < kLanes; ++c)
      for (int s = t; s < len; ++s) tile[s * kLanes + c] = c < width ? acc_t(to_float(src[c * d_stride + s])) : acc_t(0);
  }

  // Stores tile[t * kLanes + lane] to steps [t0, t0 + len) of a (batch, dim, L) tensor.
  void store(scalar_t* base, int64_t batch_stride, int64_t d_stride, const acc_t* tile, int t0, int len) const {
    scalar_t* dst = base + b * batch_stride + d0 * d_stride + t0;
    int t = 0;
    if (width == kLanes)
      for (; t + W <= len; t += W)
        for (int c0 = 0; c0 < kLanes; c0 += W) {
          Vec<acc_t> rows[W];
          for (int i = 0; i < W; ++i) rows[i] = load_vec(&tile[(t + i) * kLanes + c0]);
          transpose_vecs<acc_t>(rows);
          for (int i = 0; i < W; ++i) store_narrowed(dst + (c0 + i) * d_stride + t, rows[i]);
        }
    for (int c = 0; c < width; ++c)
      for (int s = t; s < len; ++s) dst[c * d_stride + s] = from_float<scalar_t>(tile[s * kLanes + c]);
  }

  // Turns raw delta into its pre-softplus argument x = delta + bias (in place) and the step
  // Δ = softplus(x) · dt_scale (or x · dt_scale). With dt_scale the step before it is kept in
  // `unscaled` (the backward's dt_scale gradient reads it). Flat loops without branches inside,
  // so they vectorise.
  void steps(acc_t* x, acc_t* unscaled, acc_t* step, int t0, int len) const {
    for (int t = 0; t < len; ++t)
      for (int c = 0; c < kLanes; ++c) x[t * kLanes + c] += bias[c];
    const int n = len * kLanes;
    acc_t* before_scale = p.dt_scale ? unscaled : step;
    if (p.delta_softplus) {
      for (int i = 0; i < n; ++i) before_scale[i] = softplus(x[i]);
    } else {
      std::copy(x, x + n, before_scale);
    }
    if (p.dt_scale) {
      const acc_t* scale = static_cast<const acc_t*>(p.dt_scale) + int64_t(b) * p.seqlen + t0;
      for (int t = 0; t < len; ++t)
        for (int c = 0; c < kLanes; ++c) step[t * kLanes + c] = unscaled[t * kLanes + c] * scale[t];
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
  // The state after `chunk`; chunk -1 is the initial state (0 unless given).
  void restore_state(acc_t* h, int chunk) const {
    std::fill(h, h + p.dstate * kLanes, acc_t(0));
    if (chunk < 0) {
      if (!p.initial_state) return;
      const acc_t* src = static_cast<const acc_t*>(p.initial_state) + (int64_t(b) * p.dim + d0) * p.dstate;
      for (int c = 0; c < width; ++c)
        for (int n = 0; n < p.dstate; ++n) h[n * kLanes + c] = src[int64_t(c) * p.dstate + n];
      return;
    }
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
  std::vector<acc_t> u, x, unscaled_step, step, z, dout, y;
  explicit Tiles(int len)
      : u(len * kLanes), x(len * kLanes), unscaled_step(len * kLanes), step(len * kLanes), z(len * kLanes),
        dout(len * kLanes), y(len * kLanes) {}

  template <typename scalar_t>
  void load(const ScanBlock<scalar_t, acc_t>& sb, int t0, int len) {
    const SelectiveScanParams& p = sb.p;
    sb.template load<scalar_t>(u.data(), p.u, p.u_batch_stride, p.u_d_stride, t0, len);
    sb.template load<scalar_t>(x.data(), p.delta, p.delta_batch_stride, p.delta_d_stride, t0, len);
    if (p.z) sb.template load<scalar_t>(z.data(), p.z, p.z_batch_stride, p.z_d_stride, t0, len);
    sb.steps(x.data(), unscaled_step.data(), step.data(), t0, len);
  }
};

template <typename scalar_t>
void scan_fwd(const SelectiveScanParams& p) {
  using acc_t = typename AccType<scalar_t>::type;
  const ChannelBlocks blocks(p);
  const TimeMajorBC<scalar_t, acc_t> bc(p);
  // Work items cost the same, but the machine may be shared: workers take items as they go.
  struct Scratch {
    Tiles<acc_t> tile;
    std::vector<acc_t> h;
  };
  parallel_for_dynamic(
      int64_t(p.batch) * blocks.count(p), [&] { return Scratch{Tiles<acc_t>(kTimeTile), std::vector<acc_t>(p.dstate * kLanes)}; },
      [&](int64_t item, Scratch& scratch) {
        Tiles<acc_t>& tile = scratch.tile;
        std::vector<acc_t>& h = scratch.h;
        const ScanBlock<scalar_t, acc_t> sb(p, item, blocks);
        sb.restore_state(h.data(), -1);
        for (int t0 = 0; t0 < p.seqlen; t0 += kTimeTile) {
          const int len = std::min<int>(kTimeTile, p.seqlen - t0);
          tile.load(sb, t0, len);
          const acc_t* B = bc.B_at(sb.b, sb.group, t0);
          const acc_t* C = bc.C_at(sb.b, sb.group, t0);
          for (int t = 0; t < len; ++t) {
            scan_step(h.data(), sb.A.data(), &tile.step[t * kLanes], &tile.u[t * kLanes], &B[t * p.dstate],
                      &C[t * p.dstate], p.dstate, &tile.y[t * kLanes]);
            const int pos = t0 + t + 1;
            if (pos % kScanCheckpointChunk == 0 || pos == p.seqlen) sb.save_state(h.data(), (pos - 1) / kScanCheckpointChunk);
          }
          if (p.D)  // not 0 · u without D: an infinite u would make the output NaN
            for (int t = 0; t < len; ++t)
              for (int c = 0; c < kLanes; ++c) tile.y[t * kLanes + c] += sb.D[c] * tile.u[t * kLanes + c];
          if (p.z)
            for (int i = 0; i < len * kLanes; ++i) tile.y[i] *= tile.z[i] * sigmoid(tile.z[i]);
          sb.store(static_cast<scalar_t*>(p.out), p.out_batch_stride, p.out_d_stride, tile.y.data(), t0, len);
        }
      });
}

// Lane sums of one step's vectors, one per state n, written W at a time to out[0, N): W sums
// cost about what a single sequential lane sum does (lane_sums in cpu_math.h).
// With `accumulate` the sums are added to what out holds.
template <typename acc_t>
struct StateLaneSums {
  static constexpr int W = Simd<acc_t>::lanes;
  Vec<acc_t> pending[W];
  acc_t* out;
  bool accumulate;
  void add(int n, Vec<acc_t> v) {
    pending[n % W] = v;
    if (n % W != W - 1) return;
    acc_t* dst = out + n + 1 - W;
    const Vec<acc_t> sums = lane_sums<acc_t>(pending);
    store_vec(dst, accumulate ? load_vec(dst) + sums : sums);
  }
  void finish(int N) {
    for (int n = N - N % W; n < N; ++n) out[n] = (accumulate ? out[n] : acc_t(0)) + lane_sum<acc_t>(pending[n % W]);
  }
};

// Per-thread buffers of the backward for one chunk of up to `len` steps.
template <typename acc_t>
struct BackwardChunk {
  std::vector<acc_t> H, decay;  // [t][n][lane]: the state after step t, and exp(Δ_t A)
  std::vector<acc_t> dy;        // [t][lane]: dL/dy (through silu(z))
  std::vector<acc_t> du, ddelta, dz;  // [t][lane]: the chunk's input gradients
  std::vector<acc_t> h_start;   // [n][lane]: the state before the chunk (its checkpoint)
  std::vector<acc_t> g;         // [n][lane]: dL/dh, carried from the chunk after
  BackwardChunk(int len, int N)
      : H(int64_t(len) * N * kLanes), decay(H.size()), dy(len * kLanes), du(len * kLanes),
        ddelta(len * kLanes), dz(len * kLanes), h_start(N * kLanes), g(N * kLanes) {}
};

// Backward, chunk by chunk from the end, as Mamba's: one pass recomputes the chunk's states from
// its checkpoint (keeping every state and decay, so the reverse pass computes no decay), then the
// reverse pass carries g = dL/dh_t back through the chunk. The inner loops work on the kLanes
// channels of a work item as explicit vectors (the sequential float sums over channels that dB
// and dC need would keep an auto-vectorised loop scalar); those sums are fixed-order pairwise
// trees (StateLaneSums). Quantities shared
// across channel blocks (dA, dD, ddelta_bias across the batch; dB, dC, ddt_scale across the
// blocks of a group) go to partial buffers that are summed afterwards in a fixed order, so
// results are deterministic. A work item is kBackwardBlocksPerItem consecutive blocks of one
// (batch, group), taken in order and summing into one dB / dC / ddt_scale partial: one partial
// per block would be (batch · dim / kLanes) · L · N floats each for dB and dC (25 MB for a
// Mamba-130M layer at L = 2048), fresh memory the system must map on every call.
constexpr int kBackwardBlocksPerItem = 4;

template <typename scalar_t>
void scan_bwd(const SelectiveScanBwdParams& p) {
  using acc_t = typename AccType<scalar_t>::type;
  using V = Vec<acc_t>;
  constexpr int W = Simd<acc_t>::lanes, kVecs = kLanes / W;  // a block's channels in vectors
  static_assert(kLanes % W == 0, "a channel block holds whole vectors of channels");
  const ChannelBlocks blocks(p);
  const int n_blocks = blocks.count(p), N = p.dstate, L = p.seqlen;
  const int items_per_group = (blocks.per_group + kBackwardBlocksPerItem - 1) / kBackwardBlocksPerItem;
  const int64_t n_items = int64_t(p.batch) * p.n_groups * items_per_group;
  std::vector<acc_t> dA_part(int64_t(p.batch) * p.dim * N), dD_part(int64_t(p.batch) * p.dim),
      dbias_part(int64_t(p.batch) * p.dim);
  // [item][t][n] and [item][t]; an item's first block writes every element, so they are not
  // cleared first.
  const std::unique_ptr<acc_t[]> dB_part(new acc_t[n_items * L * N]), dC_part(new acc_t[n_items * L * N]),
      ddt_part(new acc_t[p.dt_scale ? n_items * L : 0]);

  const TimeMajorBC<scalar_t, acc_t> bc(p);
  const int len_max = std::min(kScanCheckpointChunk, L);
  struct Scratch {
    Tiles<acc_t> tile;
    BackwardChunk<acc_t> w;
    std::vector<acc_t> dA;
  };
  // One channel block: its chunks from the last, its per-channel partials; its dB, dC and
  // ddt_scale sums written to (accumulate: added to) the item's partials.
  auto backward_block = [&](int64_t block_item, bool accumulate, acc_t* dB, acc_t* dC, acc_t* ddt,
                            Scratch& scratch) {
    Tiles<acc_t>& tile = scratch.tile;
    BackwardChunk<acc_t>& w = scratch.w;
    std::vector<acc_t>& dA = scratch.dA;
    const ScanBlock<scalar_t, acc_t> sb(p, block_item, blocks);
    acc_t dD[kLanes] = {};
    V dbias[kVecs] = {};
    std::fill(dA.begin(), dA.end(), acc_t(0));
    std::fill(w.g.begin(), w.g.end(), acc_t(0));
    const acc_t* A = sb.A.data();
    for (int chunk = p.n_chunks - 1; chunk >= 0; --chunk) {
      const int t0 = chunk * kScanCheckpointChunk, len = std::min(kScanCheckpointChunk, L - t0);
      tile.load(sb, t0, len);
      sb.template load<scalar_t>(tile.dout.data(), p.dout, p.dout_batch_stride, p.dout_d_stride, t0, len);
      const acc_t* B = bc.B_at(sb.b, sb.group, t0);
      const acc_t* C = bc.C_at(sb.b, sb.group, t0);

      // dL/dy, where out = y · silu(z).
      if (p.z) {
        // Where silu(z) is 0 (z very negative), dout · z alone can overflow: dy is 0 there.
        for (int i = 0; i < len * kLanes; ++i) {
          const acc_t s = sigmoid(tile.z[i]);
          w.dy[i] = tile.z[i] * s == acc_t(0) ? acc_t(0) : tile.dout[i] * tile.z[i] * s;
        }
      } else {
        std::copy(tile.dout.begin(), tile.dout.begin() + len * kLanes, w.dy.begin());
      }

      // Recompute the chunk's states from its checkpoint; y (for dz) and dC on the way.
      sb.restore_state(w.h_start.data(), chunk - 1);
      for (int t = 0; t < len; ++t) {
        const acc_t* h_prev = t > 0 ? &w.H[int64_t(t - 1) * N * kLanes] : w.h_start.data();
        acc_t* h = &w.H[int64_t(t) * N * kLanes];
        acc_t* decay = &w.decay[int64_t(t) * N * kLanes];
        V step[kVecs], drive[kVecs], dy[kVecs], y[kVecs] = {};
        StateLaneSums<acc_t> dC_t{{}, &dC[int64_t(t0 + t) * N], accumulate};
        for (int k = 0; k < kVecs; ++k) {
          step[k] = load_vec(&tile.step[t * kLanes + k * W]);
          drive[k] = step[k] * load_vec(&tile.u[t * kLanes + k * W]);
          dy[k] = load_vec(&w.dy[t * kLanes + k * W]);
        }
        for (int n = 0; n < N; ++n) {
          const acc_t b = B[t * N + n], c_n = C[t * N + n];
          V dC_sum{};
          for (int k = 0; k < kVecs; ++k) {  // (k: the vectors of a work item's channels)
            const int o = n * kLanes + k * W;
            const V a = exp_approx(step[k] * load_vec(A + o));
            const V hn = a * load_vec(h_prev + o) + drive[k] * b;
            store_vec(decay + o, a);
            store_vec(h + o, hn);
            y[k] += hn * c_n;
            dC_sum += dy[k] * hn;
          }
          dC_t.add(n, dC_sum);
        }
        dC_t.finish(N);
        for (int k = 0; k < kVecs; ++k) store_vec(&tile.y[t * kLanes + k * W], y[k]);
      }
      if (p.z) {  // out = y · silu(z) with y = C·h + D u
        for (int t = 0; t < len; ++t)
          for (int c = 0; c < kLanes; ++c) {
            const int i = t * kLanes + c;
            const acc_t zi = tile.z[i], s = sigmoid(zi);
            const acc_t y = p.D ? tile.y[i] + sb.D[c] * tile.u[i] : tile.y[i];
            w.dz[i] = tile.dout[i] * y * s * (acc_t(1) + zi * (acc_t(1) - s));
          }
      }

      // The D u term: dD and the direct part of du.
      for (int t = 0; t < len; ++t)
        for (int c = 0; c < kLanes; ++c) {
          const int i = t * kLanes + c;
          dD[c] += w.dy[i] * tile.u[i];
          w.du[i] = w.dy[i] * sb.D[c];
        }

      // Reverse pass: g = dL/dh_t accumulates C_t dy_t and flows to h_{t-1} through the decay.
      const acc_t* scale = p.dt_scale ? static_cast<const acc_t*>(p.dt_scale) + int64_t(sb.b) * L + t0 : nullptr;
      for (int t = len - 1; t >= 0; --t) {
        const acc_t* h_prev = t > 0 ? &w.H[int64_t(t - 1) * N * kLanes] : w.h_start.data();
        const acc_t* decay = &w.decay[int64_t(t) * N * kLanes];
        V step[kVecs], u[kVecs], drive[kVecs], dy[kVecs], du[kVecs], dstep_v[kVecs] = {};
        StateLaneSums<acc_t> dB_t{{}, &dB[int64_t(t0 + t) * N], accumulate};
        for (int k = 0; k < kVecs; ++k) {
          const int i = t * kLanes + k * W;
          step[k] = load_vec(&tile.step[i]);
          u[k] = load_vec(&tile.u[i]);
          drive[k] = step[k] * u[k];
          dy[k] = load_vec(&w.dy[i]);
          du[k] = load_vec(&w.du[i]);
        }
        for (int n = 0; n < N; ++n) {
          const acc_t b = B[t * N + n], c_n = C[t * N + n];
          V dB_sum{};
          for (int k = 0; k < kVecs; ++k) {
            const int o = n * kLanes + k * W;
            const V a = load_vec(decay + o);
            const V g = load_vec(&w.g[o]) + c_n * dy[k];
            const V d_arg = g * load_vec(h_prev + o) * a;  // d/d(Δ A)
            const V gb = g * b;
            dstep_v[k] += d_arg * load_vec(A + o) + gb * u[k];
            store_vec(&dA[o], load_vec(&dA[o]) + d_arg * step[k]);
            du[k] += gb * step[k];
            dB_sum += g * drive[k];
            store_vec(&w.g[o], g * a);
          }
          dB_t.add(n, dB_sum);
        }
        dB_t.finish(N);
        // Δ = softplus(x) · scale: back through the scale and the softplus.
        const acc_t scale_t = scale ? scale[t] : acc_t(1);
        for (int k = 0; k < kVecs; ++k) {
          const int i = t * kLanes + k * W;
          const V x = load_vec(&tile.x[i]);
          V dx = dstep_v[k] * scale_t;
          if (p.delta_softplus) dx = x <= acc_t(20) ? dx * sigmoid(x) : dx;
          store_vec(&w.ddelta[i], dx);
          store_vec(&w.du[i], du[k]);
          dbias[k] += dx;
        }
        if (ddt) {
          V dscale_sum{};
          for (int k = 0; k < kVecs; ++k) dscale_sum += dstep_v[k] * load_vec(&tile.unscaled_step[t * kLanes + k * W]);
          ddt[t0 + t] = (accumulate ? ddt[t0 + t] : acc_t(0)) + lane_sum<acc_t>(dscale_sum);
        }
      }
      sb.store(static_cast<scalar_t*>(p.du), p.du_batch_stride, p.du_d_stride, w.du.data(), t0, len);
      sb.store(static_cast<scalar_t*>(p.ddelta), p.ddelta_batch_stride, p.ddelta_d_stride, w.ddelta.data(), t0, len);
      if (p.z) sb.store(static_cast<scalar_t*>(p.dz), p.dz_batch_stride, p.dz_d_stride, w.dz.data(), t0, len);
    }
    // After the first chunk's reverse pass g is dL/dh_{-1}: the initial state's gradient.
    if (p.dinitial_state) {
      acc_t* dst = static_cast<acc_t*>(p.dinitial_state) + (int64_t(sb.b) * p.dim + sb.d0) * N;
      for (int c = 0; c < sb.width; ++c)
        for (int n = 0; n < N; ++n) dst[int64_t(c) * N + n] = w.g[n * kLanes + c];
    }
    for (int c = 0; c < sb.width; ++c) {
      const int64_t row = int64_t(sb.b) * p.dim + sb.d0 + c;
      for (int n = 0; n < N; ++n) dA_part[row * N + n] = dA[n * kLanes + c];
      dD_part[row] = dD[c];
      dbias_part[row] = dbias[c / W][c % W];
    }
  };
  parallel_for_dynamic(
      n_items, [&] { return Scratch{Tiles<acc_t>(len_max), BackwardChunk<acc_t>(len_max, N), std::vector<acc_t>(N * kLanes)}; },
      [&](int64_t item, Scratch& scratch) {
        const int64_t b = item / (int64_t(p.n_groups) * items_per_group);
        const int group = int(item / items_per_group % p.n_groups);
        const int first = int(item % items_per_group) * kBackwardBlocksPerItem;
        const int end = std::min(first + kBackwardBlocksPerItem, blocks.per_group);
        acc_t* dB = &dB_part[item * L * N];
        acc_t* dC = &dC_part[item * L * N];
        acc_t* ddt = p.dt_scale ? &ddt_part[item * L] : nullptr;
        for (int block = first; block < end; ++block)
          backward_block(b * n_blocks + group * blocks.per_group + block, block > first, dB, dC, ddt, scratch);
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
  // dB, dC: the items of a (batch, group) summed into its first item's [t][n] buffer, then
  // transposed into the (N, L) layout.
  parallel_for(int64_t(p.batch) * p.n_groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bg = begin; bg < end; ++bg) {
      const int b = int(bg / p.n_groups), grp = int(bg % p.n_groups);
      const int64_t first = bg * items_per_group;
      auto reduce = [&](const std::unique_ptr<acc_t[]>& part, acc_t* dst, int64_t dstate_stride) {
        acc_t* sum = &part[first * L * N];
        for (int k = 1; k < items_per_group; ++k) {
          const acc_t* block = &part[(first + k) * L * N];
          for (int64_t i = 0; i < int64_t(L) * N; ++i) sum[i] += block[i];
        }
        for (int n = 0; n < N; ++n)
          for (int t = 0; t < L; ++t) dst[n * dstate_stride + t] += sum[int64_t(t) * N + n];
      };
      reduce(dB_part, static_cast<acc_t*>(p.dB) + b * p.dB_batch_stride + grp * p.dB_group_stride, p.dB_dstate_stride);
      reduce(dC_part, static_cast<acc_t*>(p.dC) + b * p.dC_batch_stride + grp * p.dC_group_stride, p.dC_dstate_stride);
    }
  });
  if (p.ddt_scale) {
    acc_t* ddt = static_cast<acc_t*>(p.ddt_scale);
    const int64_t items_per_batch = int64_t(p.n_groups) * items_per_group;
    for (int b = 0; b < p.batch; ++b)
      for (int64_t k = 0; k < items_per_batch; ++k)
        for (int t = 0; t < L; ++t) ddt[int64_t(b) * L + t] += ddt_part[(b * items_per_batch + k) * L + t];
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
