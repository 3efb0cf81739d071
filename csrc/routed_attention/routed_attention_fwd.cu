// Routed attention forward on CUDA.
//
//   1. compact_routed_rows: the routed positions of each (batch, head), ascending.
//   2. clear_unrouted_rows: rows not routed get out = 0, lse = -inf (no other work).
//   3. attention over the compacted rows only, one of two kernels:
//      - flash_fwd_kernel (fp16 / bf16, head_dim 64 or 128, 16-byte aligned rows): a
//        FlashAttention-2-style tile of 64 routed rows (16 per warp) against key blocks of 64,
//        Q K^T and P V on tensor cores (mma.sync m16n8k16, float accumulators), online softmax
//        in registers, K/V double-buffered through cp.async. Under causal masking a tile stops
//        at the key block holding its last row's position, and masks only the blocks that
//        straddle a row's position, the sequence end or a key_mask. plan_tiles lists the tiles
//        of all (batch, head) pairs; with few tiles (sparse routing) each one's key blocks are
//        split over several blocks and the last of them to finish combines their partial rows
//        (merge_key_splits; scheduling: routed_attention_common.cuh).
//      - simt_fwd_kernel (every other case: fp32, fp64, other head dims up to 256, unaligned
//        rows): one warp per routed row, one key per lane for the scores, plain FMAs. fp32 uses
//        this path on purpose: tensor cores would compute in tf32 and miss fp32 accuracy.
// Both write lse = log Σ exp(s) in the accumulation type, and are deterministic: every output
// element is computed by one thread in a fixed order (the merge sums the splits in order).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>

#include "routed_attention_tiles.cuh"

namespace cram {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Rows that are not routed
// ---------------------------------------------------------------------------------------------

// out = 0 and lse = -inf for the rows not routed. One thread per 16-byte chunk of a row (a warp
// clears 512 contiguous bytes: 4 rows of 64 bf16) when every row is whole, 16-byte aligned
// chunks; one thread per element otherwise. (Zero has the same bits in every element type.)
constexpr int kClearThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kClearThreads)
clear_unrouted_rows_kernel(const RoutedAttentionParams p, bool wide) {
  using acc_t = typename AccType<scalar_t>::type;
  const int units_per_row = wide ? p.head_dim * static_cast<int>(sizeof(scalar_t)) / 16 : p.head_dim;
  const int64_t unit = static_cast<int64_t>(blockIdx.x) * kClearThreads + threadIdx.x;
  const int i = static_cast<int>(unit / units_per_row), u = static_cast<int>(unit % units_per_row);
  const int b = blockIdx.y / p.heads, h = blockIdx.y % p.heads;
  if (i >= p.seqlen_q) return;
  if (p.route[b * p.route_batch_stride + h * p.route_head_stride + i * p.route_row_stride]) return;
  scalar_t* out_row = static_cast<scalar_t*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride +
                      i * p.out_row_stride;
  if (wide) reinterpret_cast<uint4*>(out_row)[u] = make_uint4(0u, 0u, 0u, 0u);
  else out_row[u] = from_acc<scalar_t>(acc_t(0));
  if (u == 0) static_cast<acc_t*>(p.lse)[static_cast<int64_t>(blockIdx.y) * p.seqlen_q + i] = -INFINITY;
}

template <typename scalar_t>
void clear_unrouted_rows(const RoutedAttentionParams& p, cudaStream_t stream) {
  constexpr int64_t kChunk = 16 / sizeof(scalar_t);  // elements per 16 bytes
  const bool wide = reinterpret_cast<uintptr_t>(p.out) % 16 == 0 && p.head_dim % kChunk == 0 &&
                    p.out_batch_stride % kChunk == 0 && p.out_head_stride % kChunk == 0 &&
                    p.out_row_stride % kChunk == 0;
  const int64_t units = static_cast<int64_t>(p.seqlen_q) * (wide ? p.head_dim / kChunk : p.head_dim);
  const dim3 grid(static_cast<unsigned>((units + kClearThreads - 1) / kClearThreads), p.batch * p.heads);
  clear_unrouted_rows_kernel<scalar_t><<<grid, kClearThreads, 0, stream>>>(p, wide);
  CRAM_CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------------
// Tensor-core path
// ---------------------------------------------------------------------------------------------

// Combines the key splits of list tile `list_index`: out = Σ_s exp(lse_s - lse) out_s with
// lse = log Σ_s exp(lse_s), one warp per row. Run by the last of the tile's split blocks, after
// every split's partial rows are visible (see the end of flash_fwd_kernel); the partial rows are
// read through L2 (__ldcg), never a stale L1 line.
template <typename scalar_t>
__device__ void merge_key_splits(const RoutedAttentionParams& p, const RoutedRows& rows, int list_index,
                                 int splits, int n_warps) {
  const int lane = threadIdx.x % 32;
  const ListTile tile = list_tile(rows, p.batch * p.heads, list_index);
  const int bh = tile.bh, b = bh / p.heads, h = bh % p.heads;
  const int n_rows = min(kTileRows, rows.count[bh] - tile.row0);
  const int64_t first_partial = static_cast<int64_t>(list_index) * splits;
  for (int row = threadIdx.x / 32; row < n_rows; row += n_warps) {
    const int pos = rows.positions[static_cast<int64_t>(bh) * p.seqlen_q + tile.row0 + row];
    const float split_lse = lane < splits ? __ldcg(rows.partial_lse + (first_partial + lane) * kTileRows + row) : -INFINITY;
    const float max_lse = warp_max(split_lse);
    // Splits whose keys this row cannot see have lse = -inf and weight 0; if all do, output 0.
    // A NaN split (NaN in what the row sees) gives a NaN weight: out and lse NaN, as on the CPU.
    const float shift = max_lse == -INFINITY ? 0.f : max_lse;
    const float weight = expf(split_lse - shift);
    const float weight_sum = warp_sum(weight);
    const float inv = weight_sum == 0.f ? 0.f : 1.f / weight_sum;
    scalar_t* out_row = static_cast<scalar_t*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride +
                        pos * p.out_row_stride;
    for (int c = lane; c < p.head_dim; c += 32) {
      float acc = 0.f;
      for (int s = 0; s < splits; ++s)
        acc += __shfl_sync(0xffffffffu, weight, s) *
               __ldcg(rows.partial_out + ((first_partial + s) * kTileRows + row) * p.head_dim + c);
      out_row[c] = from_acc<scalar_t>(acc * inv);
    }
    if (lane == 0)
      static_cast<float*>(p.lse)[static_cast<int64_t>(bh) * p.seqlen_q + pos] =
          weight_sum == 0.f ? -INFINITY : shift + logf(weight_sum);
  }
}

template <int kHeadDim> struct FlashFwdTile {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockM = 16 * kWarps;  // routed rows per tile, 16 per warp
  static constexpr int kBlockN = 64;           // keys per block
  static constexpr int kSmemElems = (kBlockM + 4 * kBlockN) * kHeadDim;  // Q, K x2, V x2
  static constexpr int kSmemBytes = kSmemElems * 2;
};

template <typename scalar_t, int kHeadDim>
__global__ void __launch_bounds__(FlashFwdTile<kHeadDim>::kThreads)
flash_fwd_kernel(const RoutedAttentionParams p, const RoutedRows rows) {
  using Tile = FlashFwdTile<kHeadDim>;
  constexpr int kBlockM = Tile::kBlockM, kBlockN = Tile::kBlockN, kThreads = Tile::kThreads;
  constexpr int kKSteps = kHeadDim / 16;   // k-steps of Q K^T
  constexpr int kKeyTiles = kBlockN / 8;   // n-tiles of S
  constexpr int kDimTiles = kHeadDim / 8;  // n-tiles of O

  static_assert(kBlockM == kTileRows, "tiles of the scheduling list (routed_attention_common.cuh)");
  // Block -> (list tile, key split); the grid's surplus blocks leave at once.
  const int n_tiles = rows.plan[0], splits = rows.plan[1];
  if (static_cast<int>(blockIdx.x) >= n_tiles * splits) return;
  const int list_index = blockIdx.x / splits, split = blockIdx.x % splits;
  const ListTile tile = list_tile(rows, p.batch * p.heads, list_index);
  const int bh = tile.bh, row0 = tile.row0, b = bh / p.heads, h = bh % p.heads;
  const int hk = h / (p.heads / p.kv_heads);
  const int count = rows.count[bh];
  const int* positions = rows.positions + static_cast<int64_t>(bh) * p.seqlen_q + row0;
  const int n_rows = min(kBlockM, count - row0);
  const int first_pos = positions[0], last_pos = positions[n_rows - 1];

  extern __shared__ __align__(16) unsigned char smem_raw[];
  scalar_t* q_tile = reinterpret_cast<scalar_t*>(smem_raw);
  scalar_t* k_tiles = q_tile + kBlockM * kHeadDim;        // two buffers
  scalar_t* v_tiles = k_tiles + 2 * kBlockN * kHeadDim;   // two buffers

  const scalar_t* q = static_cast<const scalar_t*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  const scalar_t* k = static_cast<const scalar_t*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const scalar_t* v = static_cast<const scalar_t*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;

  int n_blocks = (p.seqlen_k + kBlockN - 1) / kBlockN;
  if (p.is_causal) n_blocks = min(n_blocks, last_pos / kBlockN + 1);
  // This block's share of the tile's key blocks (all of them without a split).
  const int block_begin = split * n_blocks / splits, block_end = (split + 1) * n_blocks / splits;

  load_tile_async<kHeadDim, kBlockM, kThreads>(q_tile, q, p.q_row_stride, n_rows,
                                               [&](int r) { return positions[r]; });
  auto load_kv = [&](int block, int buffer) {
    const int key0 = block * kBlockN;
    const int n_keys = min(kBlockN, static_cast<int>(p.seqlen_k) - key0);
    load_tile_async<kHeadDim, kBlockN, kThreads>(k_tiles + buffer * kBlockN * kHeadDim,
                                                 k + key0 * p.k_row_stride, p.k_row_stride, n_keys,
                                                 [](int r) { return r; });
    load_tile_async<kHeadDim, kBlockN, kThreads>(v_tiles + buffer * kBlockN * kHeadDim,
                                                 v + key0 * p.v_row_stride, p.v_row_stride, n_keys,
                                                 [](int r) { return r; });
  };
  if (block_begin < block_end) load_kv(block_begin, 0);
  cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int quad_row = lane / 4, quad_col = (lane % 4) * 2;
  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;
  uint32_t q_frag[kKSteps][4];
  float o[kDimTiles][4];
#pragma unroll
  for (int t = 0; t < kDimTiles; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // rows quad_row and quad_row + 8, log2 units
  float row_sum[2] = {0.f, 0.f};              // this thread's share of the exp sums
  // The positions of this thread's two rows. Rows past the tile's end (zero Q) take its last
  // position: they compute harmless values that are never stored, and widen no key range.
  const int row_pos[2] = {positions[min(warp * 16 + quad_row, n_rows - 1)],
                          positions[min(warp * 16 + quad_row + 8, n_rows - 1)]};

  for (int block = block_begin; block < block_end; ++block) {
    const int buffer = (block - block_begin) & 1;
    if (block + 1 < block_end) {
      load_kv(block + 1, buffer ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (block == block_begin) {
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks)
        ldmatrix_x4<false>(q_frag[ks], q_tile + swizzled<kHeadDim>(warp * 16 + lane % 16, ks * 2 + lane / 16));
    }
    const scalar_t* k_tile = k_tiles + buffer * kBlockN * kHeadDim;
    const scalar_t* v_tile = v_tiles + buffer * kBlockN * kHeadDim;

    // S = Q K^T for this warp's 16 rows and the block's 64 keys.
    float s[kKeyTiles][4];
#pragma unroll
    for (int t = 0; t < kKeyTiles; ++t) s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.f;
#pragma unroll
    for (int pair = 0; pair < kKeyTiles / 2; ++pair) {
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) {
        uint32_t kf[4];
        ldmatrix_x4<false>(kf, k_tile + swizzled<kHeadDim>(pair * 16 + lane % 8 + (lane / 16) * 8,
                                                           ks * 2 + (lane / 8) % 2));
        mma_16816<scalar_t>(s[2 * pair], q_frag[ks], kf[0], kf[1]);
        mma_16816<scalar_t>(s[2 * pair + 1], q_frag[ks], kf[2], kf[3]);
      }
    }

    // Scale to log2 units; mask where some key of the block may be invisible to some row.
    const int key0 = block * kBlockN;
    const bool needs_mask = key0 + kBlockN > p.seqlen_k || p.key_mask != nullptr ||
                            (p.is_causal && key0 + kBlockN - 1 > first_pos);
#pragma unroll
    for (int t = 0; t < kKeyTiles; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[t][e] * scale_log2;
        if (needs_mask) {
          const int key = key0 + t * 8 + quad_col + (e & 1);
          if (key >= p.seqlen_k || !key_visible(p, b, row_pos[e / 2], key)) x = -INFINITY;
        }
        s[t][e] = x;
      }
    }

    // Online softmax: new running max per row (reduced over the quad holding the row), rescale.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float block_max = -INFINITY;
#pragma unroll
      for (int t = 0; t < kKeyTiles; ++t) block_max = fmaxf(block_max, fmaxf(s[t][2 * r], s[t][2 * r + 1]));
      block_max = fmaxf(block_max, __shfl_xor_sync(0xffffffffu, block_max, 1));
      block_max = fmaxf(block_max, __shfl_xor_sync(0xffffffffu, block_max, 2));
      const float new_max = fmaxf(row_max[r], block_max);
      // A row with no visible key so far keeps max -inf; subtracting 0 then keeps exp2 at 0
      // instead of producing NaN from (-inf) - (-inf).
      const float shift = new_max == -INFINITY ? 0.f : new_max;
      const float rescale = exp2f(row_max[r] - shift);
      row_max[r] = new_max;
      row_sum[r] *= rescale;
#pragma unroll
      for (int t = 0; t < kDimTiles; ++t) {
        o[t][2 * r] *= rescale;
        o[t][2 * r + 1] *= rescale;
      }
#pragma unroll
      for (int t = 0; t < kKeyTiles; ++t) {
        s[t][2 * r] = exp2f(s[t][2 * r] - shift);
        s[t][2 * r + 1] = exp2f(s[t][2 * r + 1] - shift);
        row_sum[r] += s[t][2 * r] + s[t][2 * r + 1];
      }
    }

    // O += P V: the S accumulators of key tiles 2j, 2j+1 are exactly the A fragment of k-step j.
#pragma unroll
    for (int kstep = 0; kstep < kBlockN / 16; ++kstep) {
      const uint32_t pf[4] = {pack2<scalar_t>(s[2 * kstep][0], s[2 * kstep][1]),
                              pack2<scalar_t>(s[2 * kstep][2], s[2 * kstep][3]),
                              pack2<scalar_t>(s[2 * kstep + 1][0], s[2 * kstep + 1][1]),
                              pack2<scalar_t>(s[2 * kstep + 1][2], s[2 * kstep + 1][3])};
#pragma unroll
      for (int pair = 0; pair < kDimTiles / 2; ++pair) {
        uint32_t vf[4];
        ldmatrix_x4<true>(vf, v_tile + swizzled<kHeadDim>(kstep * 16 + lane % 8 + ((lane / 8) % 2) * 8,
                                                          pair * 2 + lane / 16));
        mma_16816<scalar_t>(o[2 * pair], pf, vf[0], vf[1]);
        mma_16816<scalar_t>(o[2 * pair + 1], pf, vf[2], vf[3]);
      }
    }
    __syncthreads();  // this buffer is refilled by the next iteration's prefetch
  }
  cp_async_wait<0>();  // without key blocks (seqlen_k = 0, or a split with none) Q is in flight

  // Normalise; scatter the rows back to their positions, or, for a split tile, store this
  // split's rows (output and lse) for merge_key_splits.
  float* lse = static_cast<float*>(p.lse) + static_cast<int64_t>(bh) * p.seqlen_q;
  scalar_t* out = static_cast<scalar_t*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride;
  const int64_t partial = static_cast<int64_t>(list_index) * splits + split;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = row_sum[r];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int row = warp * 16 + quad_row + 8 * r;
    if (row >= n_rows) continue;
    // No visible key: output 0 and lse -inf. A NaN sum stays NaN in both, as on the CPU.
    const float inv = sum == 0.f ? 0.f : 1.f / sum;
    const float row_lse = sum == 0.f ? -INFINITY : row_max[r] * kLn2 + logf(sum);
    if (splits == 1) {
      const int pos = positions[row];
      scalar_t* out_row = out + pos * p.out_row_stride;
#pragma unroll
      for (int t = 0; t < kDimTiles; ++t)
        *reinterpret_cast<uint32_t*>(out_row + t * 8 + quad_col) =
            pack2<scalar_t>(o[t][2 * r] * inv, o[t][2 * r + 1] * inv);
      if (lane % 4 == 0) lse[pos] = row_lse;
    } else {
      float* out_row = rows.partial_out + (partial * kBlockM + row) * kHeadDim;
#pragma unroll
      for (int t = 0; t < kDimTiles; ++t)
        *reinterpret_cast<float2*>(out_row + t * 8 + quad_col) =
            make_float2(o[t][2 * r] * inv, o[t][2 * r + 1] * inv);
      if (lane % 4 == 0) rows.partial_lse[partial * kBlockM + row] = row_lse;
    }
  }
  if (splits == 1) return;
  // The last split of the tile to finish merges all of them. Each block makes its partial rows
  // visible device-wide before it is counted (the threadFenceReduction pattern).
  __shared__ bool last_split;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last_split = atomicAdd(rows.splits_done + list_index, 1) == splits - 1;
  __syncthreads();
  if (last_split) {
    __threadfence();
    merge_key_splits<scalar_t>(p, rows, list_index, splits, Tile::kWarps);
  }
}

template <typename scalar_t, int kHeadDim>
void launch_flash_fwd(const RoutedAttentionParams& p, const RoutedRows& rows, cudaStream_t stream) {
  using Tile = FlashFwdTile<kHeadDim>;
  auto kernel = flash_fwd_kernel<scalar_t, kHeadDim>;
  static std::atomic<uint64_t> smem_configured{0};
  allow_dynamic_smem(kernel, Tile::kSmemBytes, smem_configured);
  plan_tiles(p, rows, stream);
  // Enough blocks for every tile when all rows are routed, and for the most (tile, split) pairs
  // a plan can make; which of them work is decided on the device.
  const int64_t max_tiles = static_cast<int64_t>(p.batch) * p.heads * ((p.seqlen_q + kTileRows - 1) / kTileRows);
  const int64_t blocks = std::max<int64_t>(max_tiles, rows.partial_tiles);
  if (blocks > int64_t{0x7fffffff})
    throw std::invalid_argument("routed_attention (CUDA): too many query tiles for one grid");
  kernel<<<static_cast<unsigned>(blocks), Tile::kThreads, Tile::kSmemBytes, stream>>>(p, rows);
  CRAM_CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------------
// SIMT path
// ---------------------------------------------------------------------------------------------

constexpr int kSimtWarps = 4;
constexpr int kDimsPerLane = kAttentionMaxHeadDim / 32;

template <typename scalar_t>
__global__ void __launch_bounds__(kSimtWarps * 32)
simt_fwd_kernel(const RoutedAttentionParams p, const RoutedRows rows) {
  using acc_t = typename AccType<scalar_t>::type;
  __shared__ acc_t q_scaled[kSimtWarps][kAttentionMaxHeadDim];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads;
  const int hk = h / (p.heads / p.kv_heads);
  const int slot = blockIdx.x * kSimtWarps + warp;
  if (slot >= rows.count[bh]) return;  // no block-wide barrier below
  const int pos = rows.positions[static_cast<int64_t>(bh) * p.seqlen_q + slot];
  const int d = p.head_dim;
  const scalar_t* q_row = static_cast<const scalar_t*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + pos * p.q_row_stride;
  const scalar_t* k = static_cast<const scalar_t*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const scalar_t* v = static_cast<const scalar_t*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;
  for (int c = lane; c < d; c += 32) q_scaled[warp][c] = to_acc(q_row[c]) * static_cast<acc_t>(p.scale);
  __syncwarp();

  const int n_keys = p.is_causal ? min(static_cast<int>(p.seqlen_k), pos + 1) : static_cast<int>(p.seqlen_k);
  acc_t o[kDimsPerLane];
#pragma unroll
  for (int i = 0; i < kDimsPerLane; ++i) o[i] = 0;
  acc_t running_max = -INFINITY, running_sum = 0;
  for (int key0 = 0; key0 < n_keys; key0 += 32) {
    // Scores: lane j takes key key0 + j.
    const int key = key0 + lane;
    const bool visible = key < n_keys && key_visible(p, b, pos, key);
    acc_t score = -INFINITY;
    if (visible) {
      const scalar_t* k_row = k + key * p.k_row_stride;
      score = 0;
      for (int c = 0; c < d; ++c) score += q_scaled[warp][c] * to_acc(k_row[c]);
    }
    const unsigned visible_keys = __ballot_sync(0xffffffffu, visible);
    if (visible_keys == 0u) continue;  // no visible key here (warp-uniform)
    // max() drops NaN, so NaN scores can leave the max at -inf: shift by 0 there, as the
    // tensor-core path does, and the NaN reaches the output (as on the CPU) instead of the
    // row counting as one that sees no key.
    const acc_t new_max = max(running_max, warp_max(score));
    const acc_t shift = new_max == -INFINITY ? acc_t(0) : new_max;
    const acc_t rescale = exp_acc(running_max - shift);
    const acc_t prob = exp_acc(score - shift);
    running_sum = running_sum * rescale + warp_sum(prob);
    running_max = new_max;
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) o[i] *= rescale;
    // O += Σ_j p_j v_j: lane c accumulates output dims c, c + 32, ...; v rows read coalesced.
    const int keys_here = min(32, n_keys - key0);
    for (int j = 0; j < keys_here; ++j) {
      const acc_t pj = __shfl_sync(0xffffffffu, prob, j);
      // Hidden keys only: a visible key whose weight underflows to 0 still multiplies its value
      // row (0 · inf is NaN there, as on the CPU and in the reference).
      if (!((visible_keys >> j) & 1u)) continue;
      const scalar_t* v_row = v + (key0 + j) * p.v_row_stride;
#pragma unroll
      for (int i = 0; i < kDimsPerLane; ++i)
        if (lane + 32 * i < d) o[i] += pj * to_acc(v_row[lane + 32 * i]);
    }
  }

  // No visible key: output 0 and lse -inf. A NaN sum stays NaN in both, as on the CPU.
  const acc_t inv = running_sum == acc_t(0) ? acc_t(0) : acc_t(1) / running_sum;
  scalar_t* out_row = static_cast<scalar_t*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride + pos * p.out_row_stride;
#pragma unroll
  for (int i = 0; i < kDimsPerLane; ++i)
    if (lane + 32 * i < d) out_row[lane + 32 * i] = from_acc<scalar_t>(o[i] * inv);
  if (lane == 0)
    static_cast<acc_t*>(p.lse)[static_cast<int64_t>(bh) * p.seqlen_q + pos] =
        running_sum == acc_t(0) ? acc_t(-INFINITY) : running_max + log(running_sum);
}

}  // namespace
}  // namespace cuda

// Per call, after the binding layer's allocations (out, lse and the workspace, from PyTorch's
// caching allocator: no cudaMalloc in steady state): 3 launches on the SIMT path (compaction,
// clearing, attention) and 4 on the tensor-core path (plus the tile plan, which also zeroes the
// split counters); no host synchronisation, no other allocation, and host-side queries (SM count,
// shared memory attribute) only on a device's first call.
void routed_attention_fwd_cuda(const RoutedAttentionParams& params, void* workspace, void* stream) {
  using namespace cuda;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  check_attention_launch(params, "routed_attention (CUDA)");
  const RoutedRows rows = routed_rows(params, workspace);
  compact_routed_rows(params, rows, s);
  CRAM_CUDA_DTYPE_SWITCH(params.dtype, "routed_attention (CUDA)", [&] {
    clear_unrouted_rows<scalar_t>(params, s);
    if constexpr (std::is_same_v<scalar_t, __half> || std::is_same_v<scalar_t, __nv_bfloat16>) {
      if (rows_are_16_byte_aligned<scalar_t>(params)) {
        if (params.head_dim == 64) return launch_flash_fwd<scalar_t, 64>(params, rows, s);
        if (params.head_dim == 128) return launch_flash_fwd<scalar_t, 128>(params, rows, s);
      }
    }
    const dim3 grid((params.seqlen_q + kSimtWarps - 1) / kSimtWarps, params.batch * params.heads);
    simt_fwd_kernel<scalar_t><<<grid, kSimtWarps * 32, 0, s>>>(params, rows);
    CRAM_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace cram
