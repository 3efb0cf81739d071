// Routed attention backward on CUDA.
//
//   1. compact_routed_rows, as in the forward (the same ascending list).
//   2. row_dot_kernel: δ_i = rowsum(dout_i * out_i) per routed row, into the workspace.
//   3. bwd_kernel, parallel over (key block, batch, kv head). A block holds kBwdKeys keys and
//      their K, V rows in shared memory and walks, for every query head of its kv head (GQA),
//      the compacted rows that can see the block: under causal masking the rows with position
//      >= the block's first key, a suffix of the ascending list found by binary search. Per
//      visited row i and key j: p = exp(scale q_i k_j - lse_i), dp = dout_i v_j,
//      ds = p (dp - δ_i); then dV_j += p dout_i, dK_j += scale ds q_i (registers, stored once at
//      the end: deterministic) and dQ_i += scale ds k_j (one atomicAdd per element per block
//      into the zeroed accumulation buffer: dq's summation order varies between runs).
// All dtypes run this SIMT kernel (float / double arithmetic, 16-bit inputs widened on load).
#include <cmath>

#include "routed_attention_common.cuh"

namespace cram {
namespace cuda {
namespace {

constexpr int kBwdWarps = 4;    // query rows visited at once, one per warp
constexpr int kBwdKeys = 16;    // keys per block: lanes 0-15 score them, lanes 16-31 take dout v
constexpr int kMaxHeadDim = 256;
// The block's 128 threads own the dK/dV accumulators of (key, dim) pairs: key = thread / 8,
// dims thread % 8 + 8 i.
constexpr int kThreadsPerKey = kBwdWarps * 32 / kBwdKeys;
constexpr int kAccPerThread = kMaxHeadDim / kThreadsPerKey;

template <typename acc_t> __device__ __forceinline__ acc_t warp_sum(acc_t x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kBwdWarps * 32)
row_dot_kernel(const RoutedAttentionBwdParams p, const RoutedRows rows) {
  using acc_t = typename AccType<scalar_t>::type;
  const int bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads, lane = threadIdx.x % 32;
  const int slot = blockIdx.x * kBwdWarps + threadIdx.x / 32;
  if (slot >= rows.count[bh]) return;
  const long row_index = static_cast<long>(bh) * p.seqlen_q + slot;
  const int pos = rows.positions[row_index];
  const scalar_t* dout = static_cast<const scalar_t*>(p.dout) + b * p.dout_batch_stride + h * p.dout_head_stride + pos * p.dout_row_stride;
  const scalar_t* out = static_cast<const scalar_t*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride + pos * p.out_row_stride;
  acc_t dot = 0;
  for (int c = lane; c < p.head_dim; c += 32) dot += to_acc(dout[c]) * to_acc(out[c]);
  dot = warp_sum(dot);
  if (lane == 0) static_cast<acc_t*>(rows.row_dot)[row_index] = dot;
}

// Shared memory of bwd_kernel, in acc_t elements, for head dimension d. K and V rows are padded
// to d + 1 so that the 16 lanes reading one column of 16 different keys hit distinct banks.
struct BwdSmem {
  int d;
  __host__ __device__ int kv_stride() const { return d + 1; }
  __host__ __device__ int k_offset() const { return 0; }
  __host__ __device__ int v_offset() const { return kBwdKeys * kv_stride(); }
  __host__ __device__ int q_offset() const { return 2 * kBwdKeys * kv_stride(); }      // [warp][d]
  __host__ __device__ int dout_offset() const { return q_offset() + kBwdWarps * d; }   // [warp][d]
  __host__ __device__ int p_offset() const { return dout_offset() + kBwdWarps * d; }   // [warp][key]
  __host__ __device__ int ds_offset() const { return p_offset() + kBwdWarps * kBwdKeys; }
  __host__ __device__ int elems() const { return ds_offset() + kBwdWarps * kBwdKeys; }
};

template <typename scalar_t>
__global__ void __launch_bounds__(kBwdWarps * 32)
bwd_kernel(const RoutedAttentionBwdParams p, const RoutedRows rows) {
  using acc_t = typename AccType<scalar_t>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  const int d = p.head_dim;
  const BwdSmem layout{d};
  acc_t* k_tile = smem + layout.k_offset();
  acc_t* v_tile = smem + layout.v_offset();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  acc_t* q_row = smem + layout.q_offset() + warp * d;
  acc_t* dout_row = smem + layout.dout_offset() + warp * d;
  acc_t* probs = smem + layout.p_offset();
  acc_t* dscores = smem + layout.ds_offset();

  const int key0 = blockIdx.x * kBwdKeys;
  const int b = blockIdx.y / p.kv_heads, hk = blockIdx.y % p.kv_heads;
  const int group = p.heads / p.kv_heads;
  const acc_t scale = p.scale;

  const scalar_t* k = static_cast<const scalar_t*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const scalar_t* v = static_cast<const scalar_t*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;
  for (int idx = threadIdx.x; idx < kBwdKeys * d; idx += blockDim.x) {
    const int j = idx / d, c = idx % d, key = key0 + j;
    k_tile[j * layout.kv_stride() + c] = key < p.seqlen_k ? to_acc(k[key * p.k_row_stride + c]) : acc_t(0);
    v_tile[j * layout.kv_stride() + c] = key < p.seqlen_k ? to_acc(v[key * p.v_row_stride + c]) : acc_t(0);
  }

  const int my_key = threadIdx.x / kThreadsPerKey, my_dim0 = threadIdx.x % kThreadsPerKey;
  acc_t dk[kAccPerThread], dv[kAccPerThread];
#pragma unroll
  for (int i = 0; i < kAccPerThread; ++i) dk[i] = dv[i] = 0;

  for (int h = hk * group; h < (hk + 1) * group; ++h) {
    const int bh = b * p.heads + h;
    const int count = rows.count[bh];
    const int* positions = rows.positions + static_cast<long>(bh) * p.seqlen_q;
    const acc_t* row_dot = static_cast<const acc_t*>(rows.row_dot) + static_cast<long>(bh) * p.seqlen_q;
    const acc_t* lse = static_cast<const acc_t*>(p.lse) + static_cast<long>(bh) * p.seqlen_q;
    const scalar_t* q = static_cast<const scalar_t*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
    const scalar_t* dout = static_cast<const scalar_t*>(p.dout) + b * p.dout_batch_stride + h * p.dout_head_stride;
    acc_t* dq = static_cast<acc_t*>(p.dq) + static_cast<long>(bh) * p.seqlen_q * d;
    const int first_slot = p.is_causal ? lower_bound(positions, count, key0) : 0;

    for (int slot0 = first_slot; slot0 < count; slot0 += kBwdWarps) {
      // Each warp takes one routed row: scores and dout v against the block's keys.
      const int slot = slot0 + warp;
      const bool has_row = slot < count;
      const int pos = has_row ? positions[slot] : 0;
      __syncthreads();  // the previous rows' q, dout, p, ds have been consumed; K, V are loaded
      if (has_row) {
        for (int c = lane; c < d; c += 32) {
          q_row[c] = to_acc(q[pos * p.q_row_stride + c]);
          dout_row[c] = to_acc(dout[pos * p.dout_row_stride + c]);
        }
      }
      __syncwarp();
      const int j = lane % kBwdKeys, key = key0 + j;
      const bool visible = has_row && key < p.seqlen_k && key_visible(p, b, pos, key);
      acc_t dot = 0;  // lanes < 16: q k_j; lanes >= 16: dout v_j
      if (visible) {
        const acc_t* a = lane < kBwdKeys ? q_row : dout_row;
        const acc_t* kv = (lane < kBwdKeys ? k_tile : v_tile) + j * layout.kv_stride();
        for (int c = 0; c < d; ++c) dot += a[c] * kv[c];
      }
      const acc_t dp = __shfl_down_sync(0xffffffffu, dot, kBwdKeys);
      if (lane < kBwdKeys) {
        // A visible key makes the row's lse finite, so exp never sees (-inf) - (-inf).
        const acc_t prob = visible ? exp_acc(scale * dot - lse[pos]) : acc_t(0);
        probs[warp * kBwdKeys + j] = prob;
        dscores[warp * kBwdKeys + j] = has_row ? prob * (dp - row_dot[slot]) : acc_t(0);
      }
      __syncwarp();
      // dQ_i += scale Σ_j ds_ij k_j for this warp's row.
      if (has_row) {
        for (int c = lane; c < d; c += 32) {
          acc_t acc = 0;
#pragma unroll
          for (int jj = 0; jj < kBwdKeys; ++jj) acc += dscores[warp * kBwdKeys + jj] * k_tile[jj * layout.kv_stride() + c];
          if (acc != acc_t(0)) atomicAdd(dq + static_cast<long>(pos) * d + c, scale * acc);
        }
      }
      __syncthreads();
      // dV_j += Σ_rows p_ij dout_i, dK_j += Σ_rows ds_ij q_i, for this thread's (key, dims).
#pragma unroll
      for (int w = 0; w < kBwdWarps; ++w) {
        if (slot0 + w >= count) break;
        const acc_t pw = probs[w * kBwdKeys + my_key], dsw = dscores[w * kBwdKeys + my_key];
        const acc_t* qw = smem + layout.q_offset() + w * d;
        const acc_t* dow = smem + layout.dout_offset() + w * d;
#pragma unroll
        for (int i = 0; i < kAccPerThread; ++i) {
          const int c = my_dim0 + kThreadsPerKey * i;
          if (c < d) {
            dv[i] += pw * dow[c];
            dk[i] += dsw * qw[c];
          }
        }
      }
    }
  }

  const int key = key0 + my_key;
  if (key >= p.seqlen_k) return;
  const long kv_row = (static_cast<long>(b) * p.kv_heads + hk) * p.seqlen_k + key;
  acc_t* dk_row = static_cast<acc_t*>(p.dk) + kv_row * d;
  acc_t* dv_row = static_cast<acc_t*>(p.dv) + kv_row * d;
#pragma unroll
  for (int i = 0; i < kAccPerThread; ++i) {
    const int c = my_dim0 + kThreadsPerKey * i;
    if (c < d) {
      dk_row[c] = scale * dk[i];
      dv_row[c] = dv[i];
    }
  }
}

}  // namespace
}  // namespace cuda

void routed_attention_bwd_cuda(const RoutedAttentionBwdParams& params, void* workspace, void* stream) {
  using namespace cuda;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (static_cast<long>(params.batch) * params.heads > 65535)
    throw std::invalid_argument("routed_attention backward (CUDA): batch * heads must be at most 65535");
  if (params.head_dim > kMaxHeadDim)
    throw std::invalid_argument("routed_attention backward (CUDA): head_dim must be at most 256");
  const RoutedRows rows = routed_rows(params, workspace);
  compact_routed_rows(params, rows, s);
  CRAM_CUDA_DTYPE_SWITCH(params.dtype, "routed_attention backward (CUDA)", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const dim3 dot_grid((params.seqlen_q + kBwdWarps - 1) / kBwdWarps, params.batch * params.heads);
    row_dot_kernel<scalar_t><<<dot_grid, kBwdWarps * 32, 0, s>>>(params, rows);
    CRAM_CUDA_CHECK_LAUNCH();
    const int smem_bytes = BwdSmem{params.head_dim}.elems() * static_cast<int>(sizeof(acc_t));
    CRAM_CUDA_CHECK(cudaFuncSetAttribute(bwd_kernel<scalar_t>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
    const dim3 grid((params.seqlen_k + kBwdKeys - 1) / kBwdKeys, params.batch * params.kv_heads);
    bwd_kernel<scalar_t><<<grid, kBwdWarps * 32, smem_bytes, s>>>(params, rows);
    CRAM_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace cram
