// Routed attention backward on CUDA.
//
//   1. compact_routed_rows, as in the forward (the same ascending list).
//   2. row_dot_kernel: δ_i = rowsum(dout_i * out_i) per routed row, into the workspace.
//   3. A kernel parallel over (key block, batch, kv head). A block holds a block of keys with
//      their K, V rows in shared memory and walks, for every query head of its kv head (GQA),
//      the compacted rows that can see the block: under causal masking the rows with position
//      >= the block's first key, a suffix of the ascending list found by binary search. Per
//      visited row i and key j: p = exp(scale q_i k_j - lse_i), dp = dout_i v_j,
//      ds = p (dp - δ_i); dV_j += p dout_i and dK_j += scale ds q_i stay in registers and are
//      stored once at the end (deterministic); dQ_i += scale ds k_j goes by atomicAdd into the
//      zeroed accumulation buffer (one atomic per element per block; dq's summation order, and
//      so its last bits, vary between runs).
//      - flash_bwd_kernel (fp16 / bf16, head_dim 64 or 128, 16-byte aligned rows): 64 keys per
//        block (16 per warp) against tiles of 64 routed rows, the five products
//        S^T = K Q^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q, dQ = dS K on tensor cores.
//      - simt_bwd_kernel (every other case): 16 keys per block, rows four at a time, float or
//        double FMAs.
#include <atomic>
#include <cmath>
#include <cstdint>

#include "routed_attention_tiles.cuh"

namespace cram {
namespace cuda {
namespace {

constexpr int kBwdWarps = 4;    // query rows visited at once, one per warp
constexpr int kBwdKeys = 16;    // keys per block: lanes 0-15 score them, lanes 16-31 take dout v
// The block's 128 threads own the dK/dV accumulators of (key, dim) pairs: key = thread / 8,
// dims thread % 8 + 8 i.
constexpr int kThreadsPerKey = kBwdWarps * 32 / kBwdKeys;
constexpr int kAccPerThread = kAttentionMaxHeadDim / kThreadsPerKey;

template <typename scalar_t>
__global__ void __launch_bounds__(kBwdWarps * 32)
row_dot_kernel(const RoutedAttentionBwdParams p, const RoutedRows rows) {
  using acc_t = typename AccType<scalar_t>::type;
  const int bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads, lane = threadIdx.x % 32;
  const int slot = blockIdx.x * kBwdWarps + threadIdx.x / 32;
  if (slot >= rows.count[bh]) return;
  const int64_t row_index = static_cast<int64_t>(bh) * p.seqlen_q + slot;
  const int pos = rows.positions[row_index];
  const scalar_t* dout = static_cast<const scalar_t*>(p.dout) + b * p.dout_batch_stride + h * p.dout_head_stride + pos * p.dout_row_stride;
  const scalar_t* out = static_cast<const scalar_t*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride + pos * p.out_row_stride;
  acc_t dot = 0;
  for (int c = lane; c < p.head_dim; c += 32) dot += to_acc(dout[c]) * to_acc(out[c]);
  dot = warp_sum(dot);
  if (lane == 0) static_cast<acc_t*>(rows.row_dot)[row_index] = dot;
}

// ---------------------------------------------------------------------------------------------
// SIMT path
// ---------------------------------------------------------------------------------------------

// Shared memory of simt_bwd_kernel, in acc_t elements, for head dimension d. K and V rows are padded
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

// The double instantiation (correctness tests only) holds its 64 dK/dV accumulators in 128
// registers and spills 8-16 bytes; the float one (also used for 16-bit inputs) does not spill.
template <typename scalar_t>
__global__ void __launch_bounds__(kBwdWarps * 32)
simt_bwd_kernel(const RoutedAttentionBwdParams p, const RoutedRows rows) {
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

  // 32-bit sizes in the index arithmetic (the binding layer checks they fit).
  const int heads = p.heads, kv_heads = p.kv_heads, seqlen_q = p.seqlen_q, seqlen_k = p.seqlen_k;
  const int key0 = blockIdx.x * kBwdKeys;
  const int b = blockIdx.y / kv_heads, hk = blockIdx.y % kv_heads;
  const int group = heads / kv_heads;
  const acc_t scale = static_cast<acc_t>(p.scale);

  const scalar_t* k = static_cast<const scalar_t*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const scalar_t* v = static_cast<const scalar_t*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;
  for (int idx = threadIdx.x; idx < kBwdKeys * d; idx += blockDim.x) {
    const int j = idx / d, c = idx % d, key = key0 + j;
    k_tile[j * layout.kv_stride() + c] = key < seqlen_k ? to_acc(k[key * p.k_row_stride + c]) : acc_t(0);
    v_tile[j * layout.kv_stride() + c] = key < seqlen_k ? to_acc(v[key * p.v_row_stride + c]) : acc_t(0);
  }

  const int my_key = threadIdx.x / kThreadsPerKey, my_dim0 = threadIdx.x % kThreadsPerKey;
  acc_t dk[kAccPerThread], dv[kAccPerThread];
#pragma unroll
  for (int i = 0; i < kAccPerThread; ++i) dk[i] = dv[i] = 0;

  for (int h = hk * group; h < (hk + 1) * group; ++h) {
    const int bh = b * heads + h;
    const int count = rows.count[bh];
    const int* positions = rows.positions + static_cast<int64_t>(bh) * seqlen_q;
    const acc_t* row_dot = static_cast<const acc_t*>(rows.row_dot) + static_cast<int64_t>(bh) * seqlen_q;
    const acc_t* lse = static_cast<const acc_t*>(p.lse) + static_cast<int64_t>(bh) * seqlen_q;
    const scalar_t* q = static_cast<const scalar_t*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
    const scalar_t* dout = static_cast<const scalar_t*>(p.dout) + b * p.dout_batch_stride + h * p.dout_head_stride;
    acc_t* dq = static_cast<acc_t*>(p.dq) + static_cast<int64_t>(bh) * seqlen_q * d;
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
      const bool visible = has_row && key < seqlen_k && key_visible(p, b, pos, key);
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
          if (acc != acc_t(0)) atomicAdd(dq + static_cast<int64_t>(pos) * d + c, scale * acc);
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
  if (key >= seqlen_k) return;
  const int64_t kv_row = (static_cast<int64_t>(b) * kv_heads + hk) * seqlen_k + key;
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

// ---------------------------------------------------------------------------------------------
// Tensor-core path
// ---------------------------------------------------------------------------------------------

template <int kHeadDim> struct FlashBwdTile {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockN = 16 * kWarps;  // keys per block, 16 per warp
  static constexpr int kBlockM = 64;           // routed rows per tile
  // K, V, Q, dO tiles; dS^T (keys x rows); then lse (log2 units), δ, positions of the tile's rows.
  static constexpr int kTileElems = (2 * kBlockN + 2 * kBlockM) * kHeadDim + kBlockN * kBlockM;
  static constexpr int kSmemBytes = kTileElems * 2 + kBlockM * (2 * sizeof(float) + sizeof(int));
};

template <typename scalar_t, int kHeadDim>
__global__ void __launch_bounds__(FlashBwdTile<kHeadDim>::kThreads)
flash_bwd_kernel(const RoutedAttentionBwdParams p, const RoutedRows rows) {
  using Tile = FlashBwdTile<kHeadDim>;
  constexpr int kBlockM = Tile::kBlockM, kBlockN = Tile::kBlockN, kThreads = Tile::kThreads;
  constexpr int kKSteps = kHeadDim / 16;   // k-steps over the head dimension
  // Rows of the query tile per pass through the score fragments (see below). Registers
  // (ptxas, sm_80 and sm_90): head_dim 64 uses about 250; head_dim 128 holds 128 floats of
  // dK/dV accumulators alone, and takes its 16-row passes one at a time (not unrolled: unrolled,
  // the passes' fragments overlap and spill on sm_90). No spills (bench/GPU_NOTES.md).
  constexpr int kSubM = kHeadDim >= 128 ? 16 : 64;
  constexpr int kSubTiles = kSubM / 8;     // n-tiles of S^T per pass
  constexpr int kDimTiles = kHeadDim / 8;  // n-tiles of dK, dV, dQ

  extern __shared__ __align__(16) unsigned char smem_raw[];
  scalar_t* k_tile = reinterpret_cast<scalar_t*>(smem_raw);
  scalar_t* v_tile = k_tile + kBlockN * kHeadDim;
  scalar_t* q_tile = v_tile + kBlockN * kHeadDim;
  scalar_t* dout_tile = q_tile + kBlockM * kHeadDim;
  scalar_t* ds_tile = dout_tile + kBlockM * kHeadDim;  // dS^T: kBlockN keys x kBlockM rows
  float* lse_tile = reinterpret_cast<float*>(ds_tile + kBlockN * kBlockM);
  float* dot_tile = lse_tile + kBlockM;
  int* pos_tile = reinterpret_cast<int*>(dot_tile + kBlockM);

  // 32-bit sizes in the index arithmetic (the binding layer checks they fit).
  const int heads = p.heads, kv_heads = p.kv_heads, seqlen_q = p.seqlen_q, seqlen_k = p.seqlen_k;
  const int key0 = blockIdx.x * kBlockN;
  const int b = blockIdx.y / kv_heads, hk = blockIdx.y % kv_heads;
  const int group = heads / kv_heads;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int quad_row = lane / 4, quad_col = (lane % 4) * 2;
  const float scale = static_cast<float>(p.scale);  // float arithmetic, as the whole kernel
  const float scale_log2 = scale * kLog2e;
  const int n_keys = min(kBlockN, seqlen_k - key0);

  const scalar_t* k = static_cast<const scalar_t*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const scalar_t* v = static_cast<const scalar_t*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;
  load_tile_async<kHeadDim, kBlockN, kThreads>(k_tile, k + key0 * p.k_row_stride, p.k_row_stride,
                                               n_keys, [](int r) { return r; });
  load_tile_async<kHeadDim, kBlockN, kThreads>(v_tile, v + key0 * p.v_row_stride, p.v_row_stride,
                                               n_keys, [](int r) { return r; });
  cp_async_commit();

  // This thread's keys in the C fragments of S^T (rows quad_row and quad_row + 8 of the warp's 16).
  const int my_keys[2] = {key0 + warp * 16 + quad_row, key0 + warp * 16 + quad_row + 8};
  float dk[kDimTiles][4], dv[kDimTiles][4];
#pragma unroll
  for (int t = 0; t < kDimTiles; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[t][e] = dv[t][e] = 0.f;

  for (int h = hk * group; h < (hk + 1) * group; ++h) {
    const int bh = b * heads + h;
    const int count = rows.count[bh];
    const int* positions = rows.positions + static_cast<int64_t>(bh) * seqlen_q;
    const float* row_dot = static_cast<const float*>(rows.row_dot) + static_cast<int64_t>(bh) * seqlen_q;
    const float* lse = static_cast<const float*>(p.lse) + static_cast<int64_t>(bh) * seqlen_q;
    const scalar_t* q = static_cast<const scalar_t*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
    const scalar_t* dout = static_cast<const scalar_t*>(p.dout) + b * p.dout_batch_stride + h * p.dout_head_stride;
    float* dq = static_cast<float*>(p.dq) + static_cast<int64_t>(bh) * seqlen_q * kHeadDim;
    const int first_slot = p.is_causal ? lower_bound(positions, count, key0) : 0;

    for (int slot0 = first_slot; slot0 < count; slot0 += kBlockM) {
      const int n_rows = min(kBlockM, count - slot0);
      const int* tile_positions = positions + slot0;
      __syncthreads();  // the previous tile's Q, dO, dS^T, lse, δ are consumed
      load_tile_async<kHeadDim, kBlockM, kThreads>(q_tile, q, p.q_row_stride, n_rows,
                                                   [&](int r) { return tile_positions[r]; });
      load_tile_async<kHeadDim, kBlockM, kThreads>(dout_tile, dout, p.dout_row_stride, n_rows,
                                                   [&](int r) { return tile_positions[r]; });
      cp_async_commit();
      for (int r = threadIdx.x; r < kBlockM; r += kThreads) {
        const bool valid = r < n_rows;
        // Rows past the tile's end get lse = +inf, so their p is exactly 0.
        lse_tile[r] = valid ? lse[tile_positions[r]] * kLog2e : INFINITY;
        dot_tile[r] = valid ? row_dot[slot0 + r] : 0.f;
        pos_tile[r] = tile_positions[min(r, n_rows - 1)];
      }
      cp_async_wait<0>();
      __syncthreads();

      // The tile's rows are taken kSubM at a time through S^T, dP^T, dV and dK, which bounds the
      // registers the two score fragments hold next to the dK, dV accumulators.
      const bool needs_mask = key0 + kBlockN > seqlen_k || p.key_mask != nullptr ||
                              (p.is_causal && key0 + kBlockN - 1 > tile_positions[0]);
#pragma unroll 1
      for (int sub = 0; sub < kBlockM; sub += kSubM) {
        // S^T = K Q^T and dP^T = V dO^T: this warp's 16 keys x rows [sub, sub + kSubM).
        float st[kSubTiles][4], dpt[kSubTiles][4];
#pragma unroll
        for (int t = 0; t < kSubTiles; ++t)
#pragma unroll
          for (int e = 0; e < 4; ++e) st[t][e] = dpt[t][e] = 0.f;
#pragma unroll
        for (int ks = 0; ks < kKSteps; ++ks) {
          uint32_t kf[4], vf[4];
          ldmatrix_x4<false>(kf, k_tile + swizzled<kHeadDim>(warp * 16 + lane % 16, ks * 2 + lane / 16));
          ldmatrix_x4<false>(vf, v_tile + swizzled<kHeadDim>(warp * 16 + lane % 16, ks * 2 + lane / 16));
#pragma unroll
          for (int pair = 0; pair < kSubTiles / 2; ++pair) {
            const int row = sub + pair * 16 + lane % 8 + (lane / 16) * 8, chunk = ks * 2 + (lane / 8) % 2;
            uint32_t qf[4], of[4];
            ldmatrix_x4<false>(qf, q_tile + swizzled<kHeadDim>(row, chunk));
            ldmatrix_x4<false>(of, dout_tile + swizzled<kHeadDim>(row, chunk));
            mma_16816<scalar_t>(st[2 * pair], kf, qf[0], qf[1]);
            mma_16816<scalar_t>(st[2 * pair + 1], kf, qf[2], qf[3]);
            mma_16816<scalar_t>(dpt[2 * pair], vf, of[0], of[1]);
            mma_16816<scalar_t>(dpt[2 * pair + 1], vf, of[2], of[3]);
          }
        }

        // P^T = exp(scale S^T - lse) over visible (key, row) pairs; dS^T = P^T (dP^T - δ). Both
        // are set to 0, not multiplied by it, for hidden pairs and rows past the tile's end, whose
        // scores may be NaN (0 · inf): the reference's gradients there are 0.
#pragma unroll
        for (int t = 0; t < kSubTiles; ++t) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int row = sub + t * 8 + quad_col + (e & 1), key = my_keys[e / 2];
            bool visible = row < n_rows;
            if (visible && needs_mask) visible = key < seqlen_k && key_visible(p, b, pos_tile[row], key);
            const float prob = visible ? exp2f(st[t][e] * scale_log2 - lse_tile[row]) : 0.f;
            st[t][e] = prob;
            dpt[t][e] = visible ? prob * (dpt[t][e] - dot_tile[row]) : 0.f;
          }
        }

        // dV += P^T dO and dK += dS^T Q: the C fragments of row tiles 2j, 2j+1 are the A
        // fragment of k-step j; dS^T also goes to shared memory for dQ.
#pragma unroll
        for (int kstep = 0; kstep < kSubM / 16; ++kstep) {
          const uint32_t pf[4] = {pack2<scalar_t>(st[2 * kstep][0], st[2 * kstep][1]),
                                  pack2<scalar_t>(st[2 * kstep][2], st[2 * kstep][3]),
                                  pack2<scalar_t>(st[2 * kstep + 1][0], st[2 * kstep + 1][1]),
                                  pack2<scalar_t>(st[2 * kstep + 1][2], st[2 * kstep + 1][3])};
          const uint32_t dsf[4] = {pack2<scalar_t>(dpt[2 * kstep][0], dpt[2 * kstep][1]),
                                   pack2<scalar_t>(dpt[2 * kstep][2], dpt[2 * kstep][3]),
                                   pack2<scalar_t>(dpt[2 * kstep + 1][0], dpt[2 * kstep + 1][1]),
                                   pack2<scalar_t>(dpt[2 * kstep + 1][2], dpt[2 * kstep + 1][3])};
          // dS^T rows (keys) warp*16 + quad_row (+8), columns (rows) row0 + quad_col (+8).
          const int key_row = warp * 16 + quad_row, chunk0 = (sub + kstep * 16) / 8;
          *reinterpret_cast<uint32_t*>(ds_tile + swizzled<kBlockM>(key_row, chunk0) + quad_col) = dsf[0];
          *reinterpret_cast<uint32_t*>(ds_tile + swizzled<kBlockM>(key_row + 8, chunk0) + quad_col) = dsf[1];
          *reinterpret_cast<uint32_t*>(ds_tile + swizzled<kBlockM>(key_row, chunk0 + 1) + quad_col) = dsf[2];
          *reinterpret_cast<uint32_t*>(ds_tile + swizzled<kBlockM>(key_row + 8, chunk0 + 1) + quad_col) = dsf[3];
#pragma unroll
          for (int pair = 0; pair < kDimTiles / 2; ++pair) {
            const int row = sub + kstep * 16 + lane % 8 + ((lane / 8) % 2) * 8, chunk = pair * 2 + lane / 16;
            uint32_t of[4], qf[4];
            ldmatrix_x4<true>(of, dout_tile + swizzled<kHeadDim>(row, chunk));
            ldmatrix_x4<true>(qf, q_tile + swizzled<kHeadDim>(row, chunk));
            mma_16816<scalar_t>(dv[2 * pair], pf, of[0], of[1]);
            mma_16816<scalar_t>(dv[2 * pair + 1], pf, of[2], of[3]);
            mma_16816<scalar_t>(dk[2 * pair], dsf, qf[0], qf[1]);
            mma_16816<scalar_t>(dk[2 * pair + 1], dsf, qf[2], qf[3]);
          }
        }
      }
      __syncthreads();  // dS^T complete

      // dQ = scale dS K for rows warp*16 .. +15 of the tile: A = dS read transposed from dS^T.
      uint32_t dsa[kBlockN / 16][4];
#pragma unroll
      for (int j = 0; j < kBlockN / 16; ++j)
        ldmatrix_x4<true>(dsa[j], ds_tile + swizzled<kBlockM>(j * 16 + lane % 8 + (lane / 16) * 8,
                                                              warp * 2 + (lane / 8) % 2));
      const int my_rows[2] = {warp * 16 + quad_row, warp * 16 + quad_row + 8};
#pragma unroll
      for (int pair = 0; pair < kDimTiles / 2; ++pair) {
        float acc[2][4] = {};
#pragma unroll
        for (int j = 0; j < kBlockN / 16; ++j) {
          uint32_t kf[4];
          ldmatrix_x4<true>(kf, k_tile + swizzled<kHeadDim>(j * 16 + lane % 8 + ((lane / 8) % 2) * 8,
                                                            pair * 2 + lane / 16));
          mma_16816<scalar_t>(acc[0], dsa[j], kf[0], kf[1]);
          mma_16816<scalar_t>(acc[1], dsa[j], kf[2], kf[3]);
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          if (my_rows[r] >= n_rows) continue;
          float* dq_row = dq + static_cast<int64_t>(pos_tile[my_rows[r]]) * kHeadDim + pair * 16 + quad_col;
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            atomicAdd(dq_row + half * 8, scale * acc[half][2 * r]);
            atomicAdd(dq_row + half * 8 + 1, scale * acc[half][2 * r + 1]);
          }
        }
      }
    }
  }

  cp_async_wait<0>();  // without any visiting row the K, V copies are still in flight
  // dK, dV rows of this thread's keys: each key belongs to exactly this block, so plain stores.
  const int64_t kv_base = (static_cast<int64_t>(b) * kv_heads + hk) * seqlen_k;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (my_keys[r] >= seqlen_k) continue;
    float* dk_row = static_cast<float*>(p.dk) + (kv_base + my_keys[r]) * kHeadDim + quad_col;
    float* dv_row = static_cast<float*>(p.dv) + (kv_base + my_keys[r]) * kHeadDim + quad_col;
#pragma unroll
    for (int t = 0; t < kDimTiles; ++t) {
      *reinterpret_cast<float2*>(dk_row + t * 8) = make_float2(scale * dk[t][2 * r], scale * dk[t][2 * r + 1]);
      *reinterpret_cast<float2*>(dv_row + t * 8) = make_float2(dv[t][2 * r], dv[t][2 * r + 1]);
    }
  }
}

template <typename scalar_t, int kHeadDim>
void launch_flash_bwd(const RoutedAttentionBwdParams& p, const RoutedRows& rows, cudaStream_t stream) {
  using Tile = FlashBwdTile<kHeadDim>;
  auto kernel = flash_bwd_kernel<scalar_t, kHeadDim>;
  static std::atomic<uint64_t> smem_configured{0};
  allow_dynamic_smem(kernel, Tile::kSmemBytes, smem_configured);
  const dim3 grid((p.seqlen_k + Tile::kBlockN - 1) / Tile::kBlockN, p.batch * p.kv_heads);
  kernel<<<grid, Tile::kThreads, Tile::kSmemBytes, stream>>>(p, rows);
  CRAM_CUDA_CHECK_LAUNCH();
}

template <typename scalar_t>
void launch_simt_bwd(const RoutedAttentionBwdParams& p, const RoutedRows& rows, cudaStream_t stream) {
  using acc_t = typename AccType<scalar_t>::type;
  // The limit is raised once, to what the largest head dimension needs.
  static std::atomic<uint64_t> smem_configured{0};
  allow_dynamic_smem(simt_bwd_kernel<scalar_t>, BwdSmem{kAttentionMaxHeadDim}.elems() * static_cast<int>(sizeof(acc_t)),
                     smem_configured);
  const int smem_bytes = BwdSmem{static_cast<int>(p.head_dim)}.elems() * static_cast<int>(sizeof(acc_t));
  const dim3 grid((p.seqlen_k + kBwdKeys - 1) / kBwdKeys, p.batch * p.kv_heads);
  simt_bwd_kernel<scalar_t><<<grid, kBwdWarps * 32, smem_bytes, stream>>>(p, rows);
  CRAM_CUDA_CHECK_LAUNCH();
}

}  // namespace
}  // namespace cuda

// Per call, after the binding layer's allocations (dq, dk, dv zeroed in the accumulation type,
// and the workspace; for 16-bit inputs the binding layer's casts back add three more): 3
// launches (compaction, row dots, the dK/dV/dQ kernel), no host synchronisation, and host-side
// queries only on a device's first call.
void routed_attention_bwd_cuda(const RoutedAttentionBwdParams& params, void* workspace, void* stream) {
  using namespace cuda;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  check_attention_launch(params, "routed_attention backward (CUDA)");
  const RoutedRows rows = routed_rows(params, workspace);
  compact_routed_rows(params, rows, s);
  CRAM_CUDA_DTYPE_SWITCH(params.dtype, "routed_attention backward (CUDA)", [&] {
    const dim3 dot_grid((params.seqlen_q + kBwdWarps - 1) / kBwdWarps, params.batch * params.heads);
    row_dot_kernel<scalar_t><<<dot_grid, kBwdWarps * 32, 0, s>>>(params, rows);
    CRAM_CUDA_CHECK_LAUNCH();
    if constexpr (std::is_same_v<scalar_t, __half> || std::is_same_v<scalar_t, __nv_bfloat16>) {
      if (rows_are_16_byte_aligned<scalar_t>(params, params.dout, params.dout_batch_stride,
                                             params.dout_head_stride, params.dout_row_stride)) {
        if (params.head_dim == 64) return launch_flash_bwd<scalar_t, 64>(params, rows, s);
        if (params.head_dim == 128) return launch_flash_bwd<scalar_t, 128>(params, rows, s);
      }
    }
    launch_simt_bwd<scalar_t>(params, rows, s);
  });
}

}  // namespace cram
