// Pieces shared by the selective-scan forward and backward kernels.
//
// Work decomposition: one warp per (batch, channel); a block holds kScanWarps channels of one
// batch entry and one B/C group, so the backward can reduce dB, dC and ddt_scale over the
// block's channels before its single atomic per element. A warp walks the sequence in chunks of
// kScanChunk = 32 lanes x kScanItems consecutive steps held in registers. Inside a chunk the
// recurrence h_t = a_t h_{t-1} + b_t is an associative scan over affine maps (a, b); across
// chunks the state is carried in shared memory. The chunk is the checkpoint interval of
// chunk_states (kScanCheckpointChunk), which is what lets the backward restart every chunk from
// its checkpoint.
#pragma once

#include <cstdint>

#include "../common/cuda_dtype.cuh"
#include "../common/warp_reduce.cuh"
#include "selective_scan.h"

namespace cram {
namespace cuda {

constexpr int kScanItems = 8;                     // consecutive steps per lane: 16-byte bf16 loads
constexpr int kScanChunk = 32 * kScanItems;       // steps per warp iteration
constexpr int kScanWarps = 4;                     // channels per block
static_assert(kScanChunk == kScanCheckpointChunk, "a warp iteration must cover one checkpoint chunk");

// Where a block's warp works: channel d of batch b, inside group g. `valid` is false for the
// spare warps of a group whose channel count is not a multiple of kScanWarps: they take part in
// block-wide reductions with zero contributions but read and write nothing of their own.
struct ScanChannel {
  int b, g, d;
  bool valid;
};

__device__ __forceinline__ ScanChannel scan_channel(const SelectiveScanParams& p) {
  const int channels_per_group = p.dim / p.n_groups;
  const int blocks_per_group = (channels_per_group + kScanWarps - 1) / kScanWarps;
  const int g = blockIdx.x / blocks_per_group;
  const int c = (blockIdx.x % blocks_per_group) * kScanWarps + threadIdx.x / 32;
  ScanChannel ch;
  ch.b = blockIdx.y;
  ch.g = g;
  ch.valid = c < channels_per_group;
  ch.d = g * channels_per_group + (ch.valid ? c : 0);
  return ch;
}

// The launch limits of these kernels, checked before any launch.
// (N <= kScanMaxDState is checked by the binding layer.)
inline void check_scan_launch(const SelectiveScanParams& p, const char* op) {
  if (p.batch > 65535)
    throw std::invalid_argument(std::string(op) + ": batch must be at most 65535 (grid y), got " +
                                std::to_string(p.batch));
}

inline dim3 scan_grid(const SelectiveScanParams& p) {
  const int channels_per_group = p.dim / p.n_groups;
  const int blocks_per_group = (channels_per_group + kScanWarps - 1) / kScanWarps;
  return dim3(p.n_groups * blocks_per_group, p.batch);
}

// The affine map h -> a h + b. compose(outer, inner) applies inner first.
template <typename acc_t> struct Affine {
  acc_t a, b;
};
template <typename acc_t>
__device__ __forceinline__ Affine<acc_t> compose(Affine<acc_t> outer, Affine<acc_t> inner) {
  return {outer.a * inner.a, outer.b + outer.a * inner.b};
}

// Warp-wide exclusive scan of each lane's affine map. kForward: lane 0 comes first in time
// (the state recurrence); otherwise lane 31 comes first (the adjoint recurrence of the backward,
// which runs backwards in time). Returns, for this lane, the composition of the maps of all lanes
// before it (identity for the first), and in `total` the composition over the whole warp.
template <bool kForward, typename acc_t>
__device__ __forceinline__ Affine<acc_t> warp_exclusive_scan(Affine<acc_t> v, Affine<acc_t>& total) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    Affine<acc_t> earlier;
    earlier.a = kForward ? __shfl_up_sync(0xffffffffu, v.a, offset) : __shfl_down_sync(0xffffffffu, v.a, offset);
    earlier.b = kForward ? __shfl_up_sync(0xffffffffu, v.b, offset) : __shfl_down_sync(0xffffffffu, v.b, offset);
    if (kForward ? lane >= offset : lane + offset < 32) v = compose(v, earlier);
  }
  const int last = kForward ? 31 : 0;
  total.a = __shfl_sync(0xffffffffu, v.a, last);
  total.b = __shfl_sync(0xffffffffu, v.b, last);
  Affine<acc_t> exclusive;
  exclusive.a = kForward ? __shfl_up_sync(0xffffffffu, v.a, 1) : __shfl_down_sync(0xffffffffu, v.a, 1);
  exclusive.b = kForward ? __shfl_up_sync(0xffffffffu, v.b, 1) : __shfl_down_sync(0xffffffffu, v.b, 1);
  if (lane == (kForward ? 0 : 31)) exclusive = {acc_t(1), acc_t(0)};
  return exclusive;
}

// Loads this lane's kScanItems consecutive steps [t0, t0 + kScanItems) of a row whose L stride
// is 1, widened to acc_t; steps at or past L read as `fill`. Full, 16-byte aligned runs are read
// with vector loads (the test is t0 <= L - kScanItems: t0 + kScanItems overflows int for L
// within kScanItems of 2^31).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_items(const scalar_t* row, int t0, int L, acc_t fill,
                                           acc_t (&out)[kScanItems]) {
  constexpr int kBytes = kScanItems * sizeof(scalar_t);
  static_assert(kBytes % 16 == 0, "a lane's run must be whole 16-byte vectors");
  const scalar_t* src = row + t0;
  if (t0 <= L - kScanItems && reinterpret_cast<uintptr_t>(src) % 16 == 0) {
    scalar_t vals[kScanItems];
#pragma unroll
    for (int v = 0; v < kBytes / 16; ++v)
      reinterpret_cast<uint4*>(vals)[v] = __ldg(reinterpret_cast<const uint4*>(src) + v);
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) out[i] = to_acc(vals[i]);
  } else {
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) out[i] = t0 + i < L ? to_acc(src[i]) : fill;
  }
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_items(scalar_t* row, int t0, int L,
                                            const acc_t (&in)[kScanItems]) {
  constexpr int kBytes = kScanItems * sizeof(scalar_t);
  scalar_t* dst = row + t0;
  if (t0 <= L - kScanItems && reinterpret_cast<uintptr_t>(dst) % 16 == 0) {
    scalar_t vals[kScanItems];
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) vals[i] = from_acc<scalar_t>(in[i]);
#pragma unroll
    for (int v = 0; v < kBytes / 16; ++v)
      reinterpret_cast<uint4*>(dst)[v] = reinterpret_cast<const uint4*>(vals)[v];
  } else {
#pragma unroll
    for (int i = 0; i < kScanItems; ++i)
      if (t0 + i < L) dst[i] = from_acc<scalar_t>(in[i]);
  }
}

// The discretisation step of this lane's items: Δ = softplus(delta + bias) · dt_scale, and 0
// past the end of the sequence, which makes those steps the identity map (a = 1, b = 0).
// Also returns the pre-softplus argument x and the softplus output sp, which the backward needs.
template <typename acc_t>
__device__ __forceinline__ void discretisation_step(const SelectiveScanParams& p, int b, int d,
                                                    int t0, const acc_t (&delta)[kScanItems],
                                                    acc_t (&x)[kScanItems], acc_t (&sp)[kScanItems],
                                                    acc_t (&dt_scale)[kScanItems],
                                                    acc_t (&step)[kScanItems]) {
  const acc_t bias = p.delta_bias ? static_cast<const acc_t*>(p.delta_bias)[d] : acc_t(0);
  if (p.dt_scale)
    load_items(static_cast<const acc_t*>(p.dt_scale) + static_cast<int64_t>(b) * p.seqlen, t0, p.seqlen,
               acc_t(1), dt_scale);
#pragma unroll
  for (int i = 0; i < kScanItems; ++i) {
    if (!p.dt_scale) dt_scale[i] = acc_t(1);
    x[i] = delta[i] + bias;
    sp[i] = p.delta_softplus ? softplus(x[i]) : x[i];
    step[i] = t0 + i < p.seqlen ? sp[i] * dt_scale[i] : acc_t(0);
  }
}

}  // namespace cuda
}  // namespace cram
