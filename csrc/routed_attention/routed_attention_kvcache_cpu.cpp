// Routed attention against a key/value cache on the CPU (routed_attention.h,
// RoutedAttentionKVCacheParams): append the new keys and values, then attend for the routed new
// rows only.
//
// Decoding has one or a few query rows per (batch, head) and a long cache, so a work item is one
// routed row, which streams its visible keys once in blocks of kKeyBlock with an online softmax
// (running max and sum, the output rescaled per block). Scores are dot products along head_dim
// (SIMD vectors and a lane sum); P·V adds weighted value rows, which vectorises along head_dim.
// Unrouted rows are zeroed and read no key.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "../common/cpu_math.h"
#include "../common/parallel.h"
#include "routed_attention.h"

namespace cram {
namespace {

constexpr int64_t kKeyBlock = 64;

template <typename scalar_t>
void append_new_entries(const RoutedAttentionKVCacheParams& p) {
  const size_t row_bytes = p.head_dim * sizeof(scalar_t);
  parallel_for(p.batch * p.kv_heads * p.seqlen_new, 256, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item % p.seqlen_new, bh = item / p.seqlen_new;
      const int64_t b = bh / p.kv_heads, h = bh % p.kv_heads;
      const int64_t slot = int64_t(p.cache_seqlens[b]) + i;
      if (slot < 0 || slot >= p.capacity) continue;
      std::memcpy(static_cast<scalar_t*>(p.k_cache) + b * p.k_cache_batch_stride + h * p.k_cache_head_stride +
                      slot * p.k_cache_row_stride,
                  static_cast<const scalar_t*>(p.k_new) + b * p.k_new_batch_stride + h * p.k_new_head_stride +
                      i * p.k_new_row_stride,
                  row_bytes);
      std::memcpy(static_cast<scalar_t*>(p.v_cache) + b * p.v_cache_batch_stride + h * p.v_cache_head_stride +
                      slot * p.v_cache_row_stride,
                  static_cast<const scalar_t*>(p.v_new) + b * p.v_new_batch_stride + h * p.v_new_head_stride +
                      i * p.v_new_row_stride,
                  row_bytes);
    }
  });
}

template <typename scalar_t>
void attend(const RoutedAttentionKVCacheParams& p) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t d = p.head_dim, group = p.heads / p.kv_heads;
  const acc_t minus_inf = -std::numeric_limits<acc_t>::infinity();
  struct Scratch {
    std::vector<acc_t> q, out, scores;
  };
  parallel_for_dynamic(
      p.batch * p.heads * p.seqlen_new,
      [&] { return Scratch{std::vector<acc_t>(d), std::vector<acc_t>(d), std::vector<acc_t>(kKeyBlock)}; },
      [&](int64_t item, Scratch& s) {
        const int64_t i = item % p.seqlen_new, bh = item / p.seqlen_new;
        const int64_t b = bh / p.heads, h = bh % p.heads, kvh = h / group;
        scalar_t* out = static_cast<scalar_t*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride +
                        i * p.out_row_stride;
        if (!p.route[b * p.route_batch_stride + h * p.route_head_stride + i * p.route_row_stride]) {
          std::memset(static_cast<void*>(out), 0, d * sizeof(scalar_t));
          return;
        }
        const scalar_t* q = static_cast<const scalar_t*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
                            i * p.q_row_stride;
        for (int64_t c = 0; c < d; ++c) {
          s.q[c] = acc_t(to_float(q[c])) * acc_t(p.scale);
          s.out[c] = 0;
        }
        const scalar_t* keys = static_cast<const scalar_t*>(p.k_cache) + b * p.k_cache_batch_stride +
                               kvh * p.k_cache_head_stride;
        const scalar_t* values = static_cast<const scalar_t*>(p.v_cache) + b * p.v_cache_batch_stride +
                                 kvh * p.v_cache_head_stride;
        const uint8_t* key_mask = p.key_mask ? p.key_mask + b * p.key_mask_batch_stride : nullptr;
        // Causal, aligned to the end (FlashAttention's rule): row i sees the keys up to its own
        // position among the last n_new, which are the new entries when they were appended.
        const int64_t keys_total = int64_t(p.cache_seqlens[b]) + (p.k_new ? p.seqlen_new : 0);
        const int64_t key_end = std::min(keys_total - p.seqlen_new + i + 1, p.capacity);
        acc_t running_max = minus_inf, running_sum = 0;
        for (int64_t j0 = 0; j0 < key_end; j0 += kKeyBlock) {
          const int64_t n = std::min(kKeyBlock, key_end - j0);
          acc_t block_max = running_max;
          for (int64_t j = 0; j < n; ++j) {
            const int64_t slot = j0 + j;
            s.scores[j] = key_mask && !key_mask[slot] ? minus_inf : dot<acc_t>(s.q.data(), keys + slot * p.k_cache_row_stride, d);
            block_max = std::max(block_max, s.scores[j]);
          }
          // Nothing finite seen yet: shift by 0 (-inf - -inf is NaN), and still visit the block, so
          // that a NaN score among its keys reaches the row as it does in the reference.
          const acc_t shift = block_max == minus_inf ? acc_t(0) : block_max;
          const acc_t rescale = exp_approx(running_max - shift);
          running_sum *= rescale;
          for (int64_t c = 0; c < d; ++c) s.out[c] *= rescale;
          for (int64_t j = 0; j < n; ++j) {
            if (s.scores[j] == minus_inf) continue;
            const acc_t weight = exp_approx(s.scores[j] - shift);
            running_sum += weight;
            const scalar_t* v = values + (j0 + j) * p.v_cache_row_stride;
            for (int64_t c = 0; c < d; ++c) s.out[c] += weight * acc_t(to_float(v[c]));
          }
          running_max = block_max;
        }
        const acc_t inv_sum = running_sum == 0 ? acc_t(0) : acc_t(1) / running_sum;  // no visible key: 0
        for (int64_t c = 0; c < d; ++c) out[c] = from_float<scalar_t>(s.out[c] * inv_sum);
      });
}

template <typename scalar_t>
void kvcache_attention(const RoutedAttentionKVCacheParams& p) {
  if (p.k_new) append_new_entries<scalar_t>(p);
  attend<scalar_t>(p);
}

}  // namespace

void routed_attention_kvcache_cpu(const RoutedAttentionKVCacheParams& params) {
  CRAM_DTYPE_SWITCH(params.dtype, "routed_attention_kvcache_cpu", [&] { kvcache_attention<scalar_t>(params); });
}

}  // namespace cram
