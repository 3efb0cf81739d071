// The fused CRAM forward's routing stage on CUDA (see cram_forward.h for the math).
//
// Two launches on the caller's stream, no host synchronisation:
//   * route_tokens_kernel: one warp per token. The lanes stride over the working-memory row for
//     its norm and over the router's hidden units, each lane keeping its partial sums of the
//     `paths` outputs; warp shuffles reduce them and lane 0 prices, takes the argmin and stores.
//   * compact_rows_kernel: one block walks the path codes in tiles of kCompactThreads tokens and
//     appends the episodic and the semantic rows after block-wide exclusive prefix sums, so the
//     lists come out ascending (the order the CPU kernel writes) and the counts stay on the
//     device for the stages that follow.
#include "../common/cuda_dtype.cuh"
#include "../common/warp_reduce.cuh"
#include "cram_forward.h"

namespace cram {
namespace cuda {
namespace {

constexpr int kTokensPerBlock = 8;  // warps per block of route_tokens_kernel
constexpr int kCompactThreads = 1024;
constexpr int kCompactWarps = kCompactThreads / 32;

template <typename scalar_t>
__device__ __forceinline__ typename AccType<scalar_t>::type rounded(typename AccType<scalar_t>::type x) {
  return to_acc(from_acc<scalar_t>(x));
}

template <typename scalar_t>
__global__ void __launch_bounds__(kTokensPerBlock * 32)
route_tokens_kernel(const CramRouterParams p) {
  using acc_t = typename AccType<scalar_t>::type;
  const int lane = threadIdx.x % 32;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * kTokensPerBlock + threadIdx.x / 32;
  if (token >= p.batch * p.seqlen) return;
  const int64_t b = token / p.seqlen, t = token % p.seqlen, H = p.hidden, P = p.n_paths;
  const auto* working_out = static_cast<const scalar_t*>(p.working_out) +
                            b * p.working_out_batch_stride + t * p.working_out_row_stride;
  const auto* hidden_x = static_cast<const acc_t*>(p.hidden_x) + b * p.hidden_x_batch_stride +
                         t * p.hidden_x_row_stride;
  const auto* w_state = static_cast<const scalar_t*>(p.w_state);
  const auto* w_out = static_cast<const scalar_t*>(p.w_out);

  acc_t sum_sq = 0;
  for (int64_t c = lane; c < p.d_model; c += 32) {
    const acc_t v = to_acc(working_out[c]);
    sum_sq += v * v;
  }
  sum_sq = warp_sum(sum_sq);
  // Each feature rounded to the tensors' dtype, as the unfused router concatenates them.
  const acc_t q = p.q_hat ? to_acc(static_cast<const scalar_t*>(p.q_hat)[token]) : acc_t(0);
  const acc_t log_gap =
      rounded<scalar_t>(log1p_acc(to_acc(static_cast<const scalar_t*>(p.gap)[token])));
  const acc_t state_norm =
      rounded<scalar_t>(sqrt(sum_sq) / sqrt(static_cast<acc_t>(p.d_model)));

  acc_t partial[kRouterMaxPaths] = {0, 0, 0};
  for (int64_t j = lane; j < H; j += 32) {
    acc_t h = hidden_x[j] + to_acc(w_state[j]) * log_gap +
              to_acc(w_state[H + j]) * state_norm + to_acc(w_state[2 * H + j]) * q;
    h = h < acc_t(0) ? acc_t(0) : h;  // NaN passes, as in F.relu (a max instruction would drop it)
#pragma unroll
    for (int path = 0; path < kRouterMaxPaths; ++path)
      if (path < P) partial[path] += to_acc(w_out[path * H + j]) * h;
  }
#pragma unroll
  for (int path = 0; path < kRouterMaxPaths; ++path) partial[path] = warp_sum(partial[path]);
  if (lane != 0) return;

  const acc_t episodic_price = rounded<scalar_t>(static_cast<acc_t>(p.episodic_price));
  const acc_t semantic_price = static_cast<acc_t>(-p.semantic_reward);  // times q̂, rounded once (below)
  auto* predicted = static_cast<scalar_t*>(p.predicted) + token * P;
  auto* scores = static_cast<scalar_t*>(p.scores) + token * P;
  int64_t best = 0;
  acc_t best_score = 0;
#pragma unroll
  for (int path = 0; path < kRouterMaxPaths; ++path) {
    if (path >= P) break;
    const scalar_t stored =
        from_acc<scalar_t>(partial[path] + to_acc(static_cast<const scalar_t*>(p.b_out)[path]));
    acc_t price = 0;
    if (path == kPathEpisodic) price = episodic_price;
    if (path == kPathSemantic) price = rounded<scalar_t>(semantic_price * q);
    const acc_t score = rounded<scalar_t>(to_acc(stored) + price);
    predicted[path] = stored;
    scores[path] = from_acc<scalar_t>(score);
    // argmin's convention: the first minimum, a NaN counting as the minimum.
    if (path == 0 || (isnan(score) ? !isnan(best_score) : score < best_score)) {
      best = path;
      best_score = score;
    }
  }
  const int64_t forced = p.forced_path ? p.forced_path[token] : -1;
  const int64_t chosen = forced >= 0 && forced < P ? forced : best;
  p.path[token] = chosen;
  p.route[token] = chosen == kPathEpisodic;
}

__global__ void __launch_bounds__(kCompactThreads) compact_rows_kernel(const CramRouterParams p) {
  __shared__ int warp_totals[kCompactWarps];
  const int64_t n_tokens = p.batch * p.seqlen;
  int64_t n_episodic = 0, n_semantic = 0;  // rows found in earlier tiles (same in every thread)
  for (int64_t start = 0; start < n_tokens; start += kCompactThreads) {
    const int64_t token = start + threadIdx.x;
    const int64_t path = token < n_tokens ? p.path[token] : -1;
    int total;
    const int episodic_before = block_exclusive_sum<kCompactWarps>(path == kPathEpisodic, warp_totals, total);
    if (path == kPathEpisodic) p.episodic_rows[n_episodic + episodic_before] = token;
    n_episodic += total;
    const int semantic_before = block_exclusive_sum<kCompactWarps>(path == kPathSemantic, warp_totals, total);
    if (path == kPathSemantic) p.semantic_rows[n_semantic + semantic_before] = token;
    n_semantic += total;
  }
  if (threadIdx.x == 0) {
    *p.episodic_count = n_episodic;
    *p.semantic_count = n_semantic;
  }
}

}  // namespace
}  // namespace cuda

void cram_router_cuda(const CramRouterParams& params, void* stream) {
  const int64_t n_tokens = params.batch * params.seqlen;
  auto s = static_cast<cudaStream_t>(stream);
  const unsigned blocks = static_cast<unsigned>((n_tokens + cuda::kTokensPerBlock - 1) / cuda::kTokensPerBlock);
  CRAM_CUDA_DTYPE_SWITCH(params.dtype, "cram_router_cuda", [&] {
    cuda::route_tokens_kernel<scalar_t><<<blocks, cuda::kTokensPerBlock * 32, 0, s>>>(params);
  });
  CRAM_CUDA_CHECK_LAUNCH();
  cuda::compact_rows_kernel<<<1, cuda::kCompactThreads, 0, s>>>(params);
  CRAM_CUDA_CHECK_LAUNCH();
}

}  // namespace cram
