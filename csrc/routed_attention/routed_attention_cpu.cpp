// Routed attention on the CPU: FlashAttention-style forward and backward over the routed rows.
//
// Per (batch, head) the routed query rows are compacted into a list of positions, and the list is
// cut into tiles of one SIMD vector's worth of rows (16 in float, 8 in double with AVX-512). A
// tile is kept transposed, one vector per head-dim column with a lane per query row, so that
//   * scores come out as one vector per key (key rows of K are broadcast, never transposed),
//   * the online softmax statistics (running max, running sum) are per-lane vectors: no
//     horizontal reductions anywhere,
//   * P·V accumulates into the transposed output tile, broadcasting V's rows.
// A tile visits only the key blocks its rows can see (causal: up to its last row's position), so
// a causal row costs about its position and unrouted rows cost only their zeros (written with
// streaming stores: at sparse routing they are most of the output). Tiles of a head are
// processed in small groups that share each key/value block, and workers pull groups, longest
// first, from a shared counter (causal tiles differ widely in cost). The forward requests the next
// key/value block from memory a few rows per scores step while the first tiles compute on the
// current one.
//
// Within a group the forward takes its tiles two at a time wherever both see the same keys of a
// block (everywhere but where the first one's keys end), so every broadcast key or value element
// feeds two FMAs, one per tile: a scores step is 2 tiles x 6 keys and a P·V step 2 tiles x 6
// head-dim columns, 12 accumulators plus the 2 tile vectors and a broadcast in the 16 AVX2
// registers. A tile left without a partner (and every tile of the backward) runs 1 x 8 steps.
// The softmax weights use exp_nonpositive, an exp for arguments <= 0 at about half the cost.
//
// With a key_mask that keeps at most kAttentionSparseKeysShare of the keys (an episodic buffer
// of written entries keeps a few percent), the forward and the dQ walk visit only the kept keys:
// they count key *slots*, each block of 64 slots gathered into a buffer, so a causal row costs
// about the kept keys before it rather than its position. The dK/dV pass walks every key block.
//
// The backward recomputes P from the saved lse. dQ runs over tile groups like the forward; dK and
// dV run over (batch, kv head, key block), each block collecting the contributions of every
// routed row (of every query head sharing the kv head) that sees it, so no two workers write the
// same gradient row.
//
// Arithmetic is in the accumulation type: float for float/half/bfloat16 storage (16-bit key and
// value blocks are widened into a scratch buffer), double for double. The vectors are GCC/Clang
// vector extensions sized to the widest unit the target has, so one generic code path serves
// every element type and instruction set.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "../common/cpu_math.h"
#include "../common/parallel.h"
#include "routed_attention.h"

namespace cram {
namespace {

// ---------------------------------------------------------------------------------------------
// Micro-kernels. A "tile" holds one query row per lane; `tile_t[c]` is column c of the tile.
// ---------------------------------------------------------------------------------------------

// Rows of a key or value block, in the accumulation type, with a unit stride along head_dim.
template <typename T>
struct RowsView {
  const T* data;
  int64_t stride;
  const T* row(int j) const { return data + j * stride; }
};

constexpr int kCacheLineBytes = 64;

// Rows [0, n) of the next key and value block, as stored, requested from memory a scores step at
// a time while the first tiles to visit the current block compute on it. At sparse routing a
// head's keys and values are read once per call, mostly from memory; spread over the work the
// requests overlap it without stalling on the cache's miss buffers, which the whole block asked
// for at once (512 lines) did. n = 0: nothing to request.
struct RowsAhead {
  const char* keys = nullptr;
  const char* values = nullptr;
  int64_t key_stride = 0, value_stride = 0;  // bytes
  int n = 0, row_bytes = 0;
};

// Requests rows j0, ..., j0 + kRows - 1 (those below ahead.n) of the block ahead. A free
// function forced inline into the steps: GCC 12 deleted the same loop as a member function.
template <int kRows>
CRAM_INLINE void request_rows_ahead(const RowsAhead& ahead, int j0) {
  for (int r = 0; r < kRows; ++r) {
    if (j0 + r >= ahead.n) break;
    const char* key = ahead.keys + (j0 + r) * ahead.key_stride;
    const char* value = ahead.values + (j0 + r) * ahead.value_stride;
    for (int byte = 0; byte < ahead.row_bytes; byte += kCacheLineBytes) {
      __builtin_prefetch(key + byte, 0, 2);
      __builtin_prefetch(value + byte, 0, 2);
    }
  }
}

// Steps of one tile: key rows per scores step, head-dim columns per P·V step (both divide the
// 64-key blocks and d = 64, so no remainder step, whose few accumulators run latency-bound:
// 1 x 12 steps with a tail of 4 made the backward about 5% slower).
constexpr int kRowsPerStep = 8;
constexpr int kColumnsPerStep = kVectorRegisters / 2;
// Accumulator vectors of a step of several tiles: with the tile vectors of the step and a
// broadcast they fill the vector registers (2 tiles x 6 on AVX2).
constexpr int kSharedStepAccumulators = kVectorRegisters - 4;
constexpr int kTailStep = 4;                           // keys or columns per step of a remainder
constexpr int kOuterRows = 4;                          // key rows per dK/dV step
constexpr int kOuterVectors = kVectorRegisters / 8;    // head-dim vectors per dK/dV step

// Scores of keys [j0, j0 + kRows) against kTiles tiles; key rows past n repeat row n - 1 and
// their scores are dropped. Each broadcast key element feeds kTiles FMAs. Requests the same rows
// of the block ahead.
template <int kTiles, int kRows, typename T>
void scores_step(RowsView<T> rows, int j0, int n, const Vec<T>* tiles_t, int d, Vec<T>* out, int out_stride,
                 const RowsAhead& ahead) {
  request_rows_ahead<kRows>(ahead, j0);
  const T* row[kRows];
  for (int r = 0; r < kRows; ++r) row[r] = rows.row(std::min(j0 + r, n - 1));
  Vec<T> acc[kTiles][kRows] = {};
  for (int c = 0; c < d; ++c) {
    Vec<T> column[kTiles];
    for (int t = 0; t < kTiles; ++t) column[t] = tiles_t[t * d + c];
    for (int r = 0; r < kRows; ++r) {
      const T key = row[r][c];
      for (int t = 0; t < kTiles; ++t) acc[t][r] += key * column[t];
    }
  }
  for (int t = 0; t < kTiles; ++t)
    for (int r = 0; r < kRows && j0 + r < n; ++r) out[t * out_stride + j0 + r] = acc[t][r];
}

// out[t · out_stride + j] = Σ_c rows[j][c] · tile t's column c, for j < n and kTiles tiles
// stored one after the other (d columns each): the scores of n keys against every lane.
template <int kTiles, typename T>
void rows_dot_tiles(RowsView<T> rows, int n, const Vec<T>* tiles_t, int d, Vec<T>* out, int out_stride,
                    const RowsAhead& ahead = {}) {
  constexpr int kRows = kTiles == 1 ? kRowsPerStep : kSharedStepAccumulators / kTiles;
  int j0 = 0;
  for (; j0 + kRows <= n; j0 += kRows) scores_step<kTiles, kRows>(rows, j0, n, tiles_t, d, out, out_stride, ahead);
  for (; j0 < n; j0 += kTailStep) scores_step<kTiles, kTailStep>(rows, j0, n, tiles_t, d, out, out_stride, ahead);
  for (; j0 < ahead.n; j0 += kTailStep) request_rows_ahead<kTailStep>(ahead, j0);  // past this block's n
}

template <int kTiles, int kColumns, typename T>
void accumulate_column_block(RowsView<T> rows, int n, const Vec<T>* weights, int weights_stride, int c0, int d,
                             Vec<T>* tiles_t) {
  Vec<T> acc[kTiles][kColumns];
  for (int t = 0; t < kTiles; ++t)
    for (int k = 0; k < kColumns; ++k) acc[t][k] = tiles_t[t * d + c0 + k];
  for (int j = 0; j < n; ++j) {
    Vec<T> w[kTiles];
    for (int t = 0; t < kTiles; ++t) w[t] = weights[t * weights_stride + j];
    const T* row = rows.row(j) + c0;
    for (int k = 0; k < kColumns; ++k) {
      const T value = row[k];
      for (int t = 0; t < kTiles; ++t) acc[t][k] += value * w[t];
    }
  }
  for (int t = 0; t < kTiles; ++t)
    for (int k = 0; k < kColumns; ++k) tiles_t[t * d + c0 + k] = acc[t][k];
}

// tile t's column c += Σ_j rows[j][c] · weights[t · weights_stride + j] for c < d, kTiles tiles
// stored one after the other: P·V (or dS·K) into transposed tiles.
template <int kTiles, typename T>
void accumulate_weighted_rows(RowsView<T> rows, int n, const Vec<T>* weights, int weights_stride, int d,
                              Vec<T>* tiles_t) {
  constexpr int kColumns = kTiles == 1 ? kColumnsPerStep : kSharedStepAccumulators / kTiles;
  int c = 0;
  for (; c + kColumns <= d; c += kColumns)
    accumulate_column_block<kTiles, kColumns>(rows, n, weights, weights_stride, c, d, tiles_t);
  for (; c + kTailStep <= d; c += kTailStep)
    accumulate_column_block<kTiles, kTailStep>(rows, n, weights, weights_stride, c, d, tiles_t);
  for (; c < d; ++c) accumulate_column_block<kTiles, 1>(rows, n, weights, weights_stride, c, d, tiles_t);
}

template <typename T, int kRows, int kVectors>
void accumulate_outer_block(const Vec<T>* weights, int j0, const Vec<T>* tile_rows, int vecs, int v0,
                            Vec<T>* out) {
  Vec<T> acc[kRows][kVectors];
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < kVectors; ++v) acc[r][v] = out[(j0 + r) * vecs + v0 + v];
  for (int lane = 0; lane < Simd<T>::lanes; ++lane) {
    const Vec<T>* tile_row = tile_rows + lane * vecs + v0;
    for (int r = 0; r < kRows; ++r) {
      const T w = weights[j0 + r][lane];
      for (int v = 0; v < kVectors; ++v) acc[r][v] += w * tile_row[v];
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < kVectors; ++v) out[(j0 + r) * vecs + v0 + v] = acc[r][v];
}

template <typename T, int kRows>
void accumulate_outer_rows(const Vec<T>* weights, int j0, const Vec<T>* tile_rows, int vecs, Vec<T>* out) {
  int v = 0;
  for (; v + kOuterVectors <= vecs; v += kOuterVectors)
    accumulate_outer_block<T, kRows, kOuterVectors>(weights, j0, tile_rows, vecs, v, out);
  for (; v < vecs; ++v) accumulate_outer_block<T, kRows, 1>(weights, j0, tile_rows, vecs, v, out);
}

// out[j] += Σ_lane weights[j][lane] · tile_rows[lane] for j < n, rows of `vecs` vectors:
// the per-key reductions over query rows of the backward (dV += Pᵀ dO, dK += dSᵀ Q).
template <typename T>
void accumulate_outer(const Vec<T>* weights, int n, const Vec<T>* tile_rows, int vecs, Vec<T>* out) {
  int j = 0;
  for (; j + kOuterRows <= n; j += kOuterRows) accumulate_outer_rows<T, kOuterRows>(weights, j, tile_rows, vecs, out);
  for (; j < n; ++j) accumulate_outer_rows<T, 1>(weights, j, tile_rows, vecs, out);
}

// ---------------------------------------------------------------------------------------------
// Problem layout: routed rows, tiles, tensor addressing
// ---------------------------------------------------------------------------------------------

constexpr int kKeyBlock = 64;

// A tile: up to one vector's worth of consecutive routed rows of one (batch, head).
struct Tile {
  int32_t bh;     // batch * heads + head
  int32_t first;  // index of its first row in the routed-row list
  int32_t count;
};

// Zeroes `bytes` bytes at `p` with non-temporal stores where the target has them: the zeros of
// unrouted rows are most of a sparse call's output, and streaming them skips reading every line
// into the cache first (about 2.5x faster than memset on 8 MB). Call streaming_stores_done()
// before the memory is handed to another thread.
inline void zero_bytes_streaming(void* p, size_t bytes) {
#if defined(__SSE2__)
  char* first = static_cast<char*>(p);
  char* const end = first + bytes;
  char* aligned = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(first) + 15) & ~uintptr_t(15));
  if (aligned > end) aligned = end;
  std::memset(first, 0, aligned - first);
  for (; aligned + 16 <= end; aligned += 16) _mm_stream_si128(reinterpret_cast<__m128i*>(aligned), _mm_setzero_si128());
  std::memset(aligned, 0, end - aligned);
#else
  std::memset(p, 0, bytes);
#endif
}

inline void streaming_stores_done() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

template <typename acc_t, typename scalar_t> inline acc_t load_acc(scalar_t x) {
  return static_cast<acc_t>(to_float(x));
}

template <typename scalar_t>
class Problem {
 public:
  using acc_t = typename AccType<scalar_t>::type;
  static constexpr int kLanes = Simd<acc_t>::lanes;

  explicit Problem(const RoutedAttentionParams& p) : p_(p), group_(p.heads / p.kv_heads) {
    compact_routed_rows();
    compact_keys();
  }

  const RoutedAttentionParams& params() const { return p_; }
  int head_dim() const { return p_.head_dim; }
  const std::vector<Tile>& tiles() const { return tiles_; }
  // Tiles of one (batch, head) are contiguous: [tile_begin[bh], tile_begin[bh + 1]).
  int tile_begin(int bh) const { return tile_begin_[bh]; }
  int32_t position(int index) const { return positions_[index]; }
  int32_t last_position(const Tile& t) const { return positions_[t.first + t.count - 1]; }
  int batch_of(int bh) const { return bh / p_.heads; }
  int head_of(int bh) const { return bh % p_.heads; }

  // With a sparse key_mask the forward and dQ walks visit only the keys that exist: they count
  // keys in *slots*, slot s of batch b being key key_slots(b)[s]. Otherwise slot = key.
  const int32_t* key_slots(int b) const { return slot_mode_ ? key_slots_.data() + slot_begin_[b] : nullptr; }
  // Number of slots [0, end) some row of the tile can see.
  int key_end(const Tile& t) const {
    if (!slot_mode_)
      return p_.is_causal ? std::min<int>(last_position(t) + 1, p_.seqlen_k) : static_cast<int>(p_.seqlen_k);
    const int b = batch_of(t.bh);
    const int32_t* first = key_slots(b);
    const int32_t* last = key_slots_.data() + slot_begin_[b + 1];
    return static_cast<int>((p_.is_causal ? std::upper_bound(first, last, last_position(t)) : last) - first);
  }
  // First tile of `bh` with a row that sees key j.
  int first_tile_seeing(int bh, int j) const {
    if (!p_.is_causal) return tile_begin_[bh];
    const auto begin = tiles_.begin() + tile_begin_[bh], end = tiles_.begin() + tile_begin_[bh + 1];
    return static_cast<int>(
        std::partition_point(begin, end, [&](const Tile& t) { return last_position(t) < j; }) - tiles_.begin());
  }

  const scalar_t* q_row(int bh, int i) const {
    return static_cast<const scalar_t*>(p_.q) + batch_of(bh) * p_.q_batch_stride +
           head_of(bh) * p_.q_head_stride + i * p_.q_row_stride;
  }
  scalar_t* out_row(int bh, int i) const {
    return static_cast<scalar_t*>(p_.out) + batch_of(bh) * p_.out_batch_stride +
           head_of(bh) * p_.out_head_stride + i * p_.out_row_stride;
  }
  acc_t* lse(int bh) const { return static_cast<acc_t*>(p_.lse) + static_cast<int64_t>(bh) * p_.seqlen_q; }
  int kv_head(int bh) const { return head_of(bh) / group_; }
  int group_size() const { return group_; }
  const scalar_t* k_row(int b, int kvh, int j) const {
    return static_cast<const scalar_t*>(p_.k) + b * p_.k_batch_stride + kvh * p_.k_head_stride + j * p_.k_row_stride;
  }
  const scalar_t* v_row(int b, int kvh, int j) const {
    return static_cast<const scalar_t*>(p_.v) + b * p_.v_batch_stride + kvh * p_.v_head_stride + j * p_.v_row_stride;
  }
  const uint8_t* key_mask(int b) const { return p_.key_mask ? p_.key_mask + b * p_.key_mask_batch_stride : nullptr; }
  bool routed(int bh, int i) const {
    return p_.route[batch_of(bh) * p_.route_batch_stride + head_of(bh) * p_.route_head_stride +
                    i * p_.route_row_stride] != 0;
  }

  // Writes 0 (and lse = -inf) for every row of `bh` that is not routed, a run of consecutive
  // rows at a time (one memset when the rows are contiguous: most of the output at low routing).
  void zero_unrouted_rows(int bh) const {
    const bool contiguous_rows = p_.out_row_stride == p_.head_dim;
    const size_t row_bytes = p_.head_dim * sizeof(scalar_t);
    for (int begin = 0; begin < p_.seqlen_q;) {
      if (routed(bh, begin)) {
        ++begin;
        continue;
      }
      int end = begin + 1;
      while (end < p_.seqlen_q && !routed(bh, end)) ++end;
      if (contiguous_rows) {
        zero_bytes_streaming(out_row(bh, begin), (end - begin) * row_bytes);
      } else {
        for (int i = begin; i < end; ++i) zero_bytes_streaming(out_row(bh, i), row_bytes);
      }
      std::fill(lse(bh) + begin, lse(bh) + end, -std::numeric_limits<acc_t>::infinity());
      begin = end;
    }
    streaming_stores_done();
  }

 private:
  void compact_routed_rows() {
    const int n_bh = p_.batch * p_.heads;
    tile_begin_.assign(1, 0);
    for (int bh = 0; bh < n_bh; ++bh) {
      const int first = static_cast<int>(positions_.size());
      for (int i = 0; i < p_.seqlen_q; ++i)
        if (routed(bh, i)) positions_.push_back(i);
      const int last = static_cast<int>(positions_.size());
      // Full tiles, except the first: a causal tile costs as much as its last row, so the
      // partly filled tile goes where rows are cheapest.
      const int partial = (last - first) % kLanes;
      if (partial) tiles_.push_back({bh, first, partial});
      for (int t = first + partial; t < last; t += kLanes) tiles_.push_back({bh, t, kLanes});
      tile_begin_.push_back(static_cast<int>(tiles_.size()));
    }
  }

  // The slot mode: the keys key_mask keeps, per batch, when they are at most
  // kAttentionSparseKeysShare of all keys.
  void compact_keys() {
    if (!p_.key_mask || p_.seqlen_k == 0) return;
    int64_t kept = 0;
    for (int b = 0; b < p_.batch; ++b)
      for (int j = 0; j < p_.seqlen_k; ++j) kept += key_mask(b)[j] != 0;
    if (!attention_reads_only_kept_keys(kept, p_.batch * p_.seqlen_k)) return;
    slot_mode_ = true;
    slot_begin_.assign(1, 0);
    key_slots_.reserve(kept + 1);  // never empty storage: key_slots() points into it
    for (int b = 0; b < p_.batch; ++b) {
      for (int j = 0; j < p_.seqlen_k; ++j)
        if (key_mask(b)[j]) key_slots_.push_back(j);
      slot_begin_.push_back(static_cast<int>(key_slots_.size()));
    }
  }

  const RoutedAttentionParams& p_;
  const int group_;
  bool slot_mode_ = false;
  std::vector<int32_t> key_slots_;  // kept keys of every batch, in order (slot mode only)
  std::vector<int> slot_begin_;     // (batch + 1) offsets into key_slots_
  std::vector<int32_t> positions_;  // routed rows of every (batch, head), in order
  std::vector<Tile> tiles_;
  std::vector<int> tile_begin_;     // (batch * heads + 1) offsets into tiles_
};

// Rows [j0, j0 + n) of a key or value head in the accumulation type: the tensor itself when it
// already is, else widened into `buffer`.
template <typename acc_t, typename scalar_t>
RowsView<acc_t> rows_as_acc(const scalar_t* first, int64_t stride, int n, int d, std::vector<acc_t>& buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return {first, stride};
  } else {
    for (int j = 0; j < n; ++j)
      for (int c = 0; c < d; ++c) buffer[j * d + c] = to_float(first[j * stride + c]);
    return {buffer.data(), d};
  }
}

// Rows slots[0], ..., slots[n - 1] of a key or value head, gathered into `buffer` in the
// accumulation type.
template <typename acc_t, typename scalar_t>
RowsView<acc_t> gather_rows_as_acc(const scalar_t* head, int64_t stride, const int32_t* slots, int n, int d,
                                   std::vector<acc_t>& buffer) {
  for (int j = 0; j < n; ++j) {
    const scalar_t* row = head + slots[j] * stride;
    for (int c = 0; c < d; ++c) buffer[j * d + c] = to_float(row[c]);
  }
  return {buffer.data(), d};
}

// Lane positions of a tile as a vector; padding lanes repeat the last row, so they never widen
// the keys a tile visits.
template <typename scalar_t, typename acc_t = typename AccType<scalar_t>::type>
Vec<acc_t> lane_positions(const Problem<scalar_t>& pb, const Tile& t) {
  Vec<acc_t> pos{};
  for (int lane = 0; lane < Simd<acc_t>::lanes; ++lane)
    pos[lane] = static_cast<acc_t>(pb.position(t.first + std::min(lane, t.count - 1)));
  return pos;
}

// Sets to `hidden` (-inf for scores) the entries of keys [j0, j0 + n) that a lane cannot see:
// keys after its position (causal) and keys absent from key_mask. With `slots` (the walk's slot
// mode) j0 and n count slots, whose keys all exist.
template <typename scalar_t, typename acc_t = typename AccType<scalar_t>::type>
void mask_scores(const Problem<scalar_t>& pb, const Tile& t, Vec<acc_t> positions, const int32_t* slots, int j0,
                 int n, Vec<acc_t>* scores, acc_t hidden = -std::numeric_limits<acc_t>::infinity()) {
  const uint8_t* key_mask = slots ? nullptr : pb.key_mask(pb.batch_of(t.bh));
  const int first_row = pb.position(t.first);
  const bool causal = pb.params().is_causal;
  auto key_of = [&](int j) { return slots ? slots[j0 + j] : j0 + j; };
  if (!key_mask && (!causal || key_of(n - 1) <= first_row)) return;
  const Vec<acc_t> fill = splat(hidden);
  for (int j = 0; j < n; ++j) {
    const int key = key_of(j);
    if (key_mask && !key_mask[key]) {
      scores[j] = fill;
    } else if (causal && key > first_row) {
      scores[j] = positions < splat(static_cast<acc_t>(key)) ? fill : scores[j];
    }
  }
}

// Gathers column c of the tile's rows of `row(i)`, times `factor`, into tile_t[c]; padding lanes
// are 0.
template <typename scalar_t, typename acc_t, typename RowOf>
void gather_transposed(const Problem<scalar_t>& pb, const Tile& t, RowOf row, acc_t factor, Vec<acc_t>* tile_t) {
  const int d = pb.head_dim();
  for (int c = 0; c < d; ++c) tile_t[c] = Vec<acc_t>{};
  for (int lane = 0; lane < t.count; ++lane) {
    const scalar_t* src = row(pb.position(t.first + lane));
    for (int c = 0; c < d; ++c) tile_t[c][lane] = load_acc<acc_t>(src[c]) * factor;
  }
}

// Consecutive tiles of one (batch, head), processed together so that each key/value block is
// read from memory once for all of them instead of once per tile (a head's keys and values
// outgrow the L2 cache at a few thousand positions).
struct TileGroup {
  int first_tile, count;
  int64_t cost;  // visible keys summed over the tiles
};

constexpr int kTilesPerGroup = 16;
constexpr int kTilesPerStep = 2;  // tiles of a group that share each scores and P·V step

// Groups of up to `tiles_per_group` tiles, as even in size as a head's tile count allows, most
// work first. Even sizes matter for sparse routes: 9 tiles as 8 + 1 would leave the head's last
// (longest) tile alone, streaming every key and value from memory for a single tile.
template <typename scalar_t>
std::vector<TileGroup> tile_groups_longest_first(const Problem<scalar_t>& pb, int tiles_per_group) {
  std::vector<TileGroup> groups;
  const int n_bh = pb.params().batch * pb.params().heads;
  for (int bh = 0; bh < n_bh; ++bh) {
    const int first = pb.tile_begin(bh), n_tiles = pb.tile_begin(bh + 1) - first;
    const int n_groups = (n_tiles + tiles_per_group - 1) / tiles_per_group;
    for (int k = 0, t = first; k < n_groups; ++k) {
      TileGroup g{t, n_tiles / n_groups + (k < n_tiles % n_groups ? 1 : 0), 0};
      for (int i = 0; i < g.count; ++i) g.cost += pb.key_end(pb.tiles()[t + i]);
      groups.push_back(g);
      t += g.count;
    }
  }
  std::stable_sort(groups.begin(), groups.end(),
                   [](const TileGroup& a, const TileGroup& b) { return a.cost > b.cost; });
  return groups;
}

// Keys [0, end) some tile of the group can see.
template <typename scalar_t>
int group_key_end(const Problem<scalar_t>& pb, const TileGroup& g) {
  int end = 0;
  for (int i = 0; i < g.count; ++i) end = std::max(end, pb.key_end(pb.tiles()[g.first_tile + i]));
  return end;
}

// The walk the forward and the dQ backward share: every block of keys some tile of the group can
// see, its keys and values widened once for the whole group, then visit(i, count, keys, values,
// j0, n, ahead) for runs of up to kMaxTilesPerVisit consecutive tiles i, ..., i + count - 1 of
// the group that all see the same n > 0 keys of the block starting at key j0 (a run ends where a
// tile's keys end inside the block: tiles are in position order, so n only grows along the
// group). The first visit of a block gets the next block's rows to request, the others none.
template <int kMaxTilesPerVisit, typename scalar_t, typename acc_t, typename Visit>
void for_each_visible_key_block(const Problem<scalar_t>& pb, const TileGroup& g, std::vector<acc_t>& k_buffer,
                                std::vector<acc_t>& v_buffer, Visit visit) {
  const RoutedAttentionParams& p = pb.params();
  const Tile* tiles = &pb.tiles()[g.first_tile];
  const int d = pb.head_dim(), b = pb.batch_of(tiles[0].bh), kvh = pb.kv_head(tiles[0].bh);
  const int key_end = group_key_end(pb, g);
  const int32_t* slots = pb.key_slots(b);
  auto keys_seen = [&](int i, int j0, int block) { return std::min(block, pb.key_end(tiles[i]) - j0); };
  for (int j0 = 0; j0 < key_end; j0 += kKeyBlock) {
    const int block = std::min(kKeyBlock, key_end - j0);
    RowsAhead ahead;  // in slot mode the gather is the one pass over the block's rows
    if (!slots && j0 + kKeyBlock < key_end) {
      ahead = {reinterpret_cast<const char*>(pb.k_row(b, kvh, j0 + kKeyBlock)),
               reinterpret_cast<const char*>(pb.v_row(b, kvh, j0 + kKeyBlock)),
               static_cast<int64_t>(p.k_row_stride * sizeof(scalar_t)),
               static_cast<int64_t>(p.v_row_stride * sizeof(scalar_t)),
               std::min(kKeyBlock, key_end - j0 - kKeyBlock), static_cast<int>(d * sizeof(scalar_t))};
    }
    const auto keys = slots ? gather_rows_as_acc(pb.k_row(b, kvh, 0), p.k_row_stride, slots + j0, block, d, k_buffer)
                            : rows_as_acc(pb.k_row(b, kvh, j0), p.k_row_stride, block, d, k_buffer);
    const auto values = slots ? gather_rows_as_acc(pb.v_row(b, kvh, 0), p.v_row_stride, slots + j0, block, d, v_buffer)
                              : rows_as_acc(pb.v_row(b, kvh, j0), p.v_row_stride, block, d, v_buffer);
    int i = 0;
    while (i < g.count && keys_seen(i, j0, block) <= 0) ++i;
    while (i < g.count) {
      const int n = keys_seen(i, j0, block);
      int count = 1;
      while (count < kMaxTilesPerVisit && i + count < g.count && keys_seen(i + count, j0, block) == n) ++count;
      visit(i, count, keys, values, j0, n, ahead);
      ahead.n = 0;
      i += count;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

// Online-softmax state of one tile: transposed query (pre-scaled) and output, running max/sum.
template <typename acc_t>
struct ForwardTileState {
  Vec<acc_t>* q_t;
  Vec<acc_t>* out_t;
  Vec<acc_t> running_max, running_sum, positions;
};

template <typename acc_t>
struct ForwardScratch {
  explicit ForwardScratch(int d)
      : q_t(kTilesPerGroup * d), out_t(kTilesPerGroup * d), tiles(kTilesPerGroup), scores(kTilesPerStep * kKeyBlock),
        k_buffer(kKeyBlock * d), v_buffer(kKeyBlock * d) {
    for (int i = 0; i < kTilesPerGroup; ++i) {
      tiles[i].q_t = &q_t[i * d];
      tiles[i].out_t = &out_t[i * d];
    }
  }
  std::vector<Vec<acc_t>> q_t, out_t;
  std::vector<ForwardTileState<acc_t>> tiles;
  std::vector<Vec<acc_t>> scores;  // [kTilesPerStep][kKeyBlock]
  std::vector<acc_t> k_buffer, v_buffer;
};

// Online softmax over one key block: updates the running max and sum, rescales the
// output tile, and turns the block's scores into unnormalised probabilities.
template <typename acc_t>
void softmax_update(Vec<acc_t>* scores, int n, ForwardTileState<acc_t>& state, int d) {
  Vec<acc_t> block_max = state.running_max;
  for (int j = 0; j < n; ++j) block_max = max_vec<acc_t>(block_max, scores[j]);
  // A lane that has seen only masked keys keeps max -inf; subtract 0 there to avoid -inf - -inf.
  const Vec<acc_t> minus_inf = splat(-std::numeric_limits<acc_t>::infinity());
  const Vec<acc_t> shift = block_max == minus_inf ? Vec<acc_t>{} : block_max;
  const Vec<acc_t> rescale = exp_nonpositive(state.running_max - shift);
  Vec<acc_t> block_sum{};
  for (int j = 0; j < n; ++j) {
    scores[j] = exp_nonpositive(scores[j] - shift);
    block_sum += scores[j];
  }
  state.running_sum = state.running_sum * rescale + block_sum;
  state.running_max = block_max;
  for (int c = 0; c < d; ++c) state.out_t[c] *= rescale;
}

template <typename scalar_t, typename acc_t = typename AccType<scalar_t>::type>
void start_tile(const Problem<scalar_t>& pb, const Tile& t, ForwardTileState<acc_t>& state) {
  const acc_t scale = static_cast<acc_t>(pb.params().scale);
  gather_transposed(pb, t, [&](int i) { return pb.q_row(t.bh, i); }, scale, state.q_t);
  for (int c = 0; c < pb.head_dim(); ++c) state.out_t[c] = Vec<acc_t>{};
  state.running_max = splat(-std::numeric_limits<acc_t>::infinity());
  state.running_sum = Vec<acc_t>{};
  state.positions = lane_positions(pb, t);
}

template <typename scalar_t, typename acc_t = typename AccType<scalar_t>::type>
void finish_tile(const Problem<scalar_t>& pb, const Tile& t, const ForwardTileState<acc_t>& state) {
  acc_t* lse = pb.lse(t.bh);
  for (int lane = 0; lane < t.count; ++lane) {
    const int i = pb.position(t.first + lane);
    const acc_t sum = state.running_sum[lane];
    const acc_t inv_sum = sum == 0 ? acc_t(0) : acc_t(1) / sum;  // no visible key: output 0
    scalar_t* out = pb.out_row(t.bh, i);
    for (int c = 0; c < pb.head_dim(); ++c) out[c] = from_float<scalar_t>(state.out_t[c][lane] * inv_sum);
    lse[i] = sum == 0 ? -std::numeric_limits<acc_t>::infinity()
                      : static_cast<acc_t>(state.running_max[lane] + std::log(sum));
  }
}

// One key block against kTiles consecutive tiles of a group that see the same n keys of it.
template <int kTiles, typename scalar_t, typename acc_t = typename AccType<scalar_t>::type>
void forward_step(const Problem<scalar_t>& pb, const Tile* tiles, ForwardTileState<acc_t>* states,
                  RowsView<acc_t> keys, RowsView<acc_t> values, int j0, int n, const RowsAhead& ahead,
                  Vec<acc_t>* scores) {
  const int d = pb.head_dim();
  // The tiles' q_t and out_t columns lie one tile after the other (ForwardScratch).
  rows_dot_tiles<kTiles>(keys, n, states[0].q_t, d, scores, kKeyBlock, ahead);
  for (int t = 0; t < kTiles; ++t) {
    mask_scores(pb, tiles[t], states[t].positions, pb.key_slots(pb.batch_of(tiles[t].bh)), j0, n,
                scores + t * kKeyBlock);
    softmax_update(scores + t * kKeyBlock, n, states[t], d);
  }
  accumulate_weighted_rows<kTiles>(values, n, scores, kKeyBlock, d, states[0].out_t);
}

template <typename scalar_t, typename acc_t = typename AccType<scalar_t>::type>
void forward_group(const Problem<scalar_t>& pb, const TileGroup& g, ForwardScratch<acc_t>& s) {
  const Tile* tiles = &pb.tiles()[g.first_tile];
  for (int i = 0; i < g.count; ++i) start_tile(pb, tiles[i], s.tiles[i]);
  for_each_visible_key_block<kTilesPerStep>(pb, g, s.k_buffer, s.v_buffer,
                                            [&](int i, int count, const auto& keys, const auto& values, int j0, int n,
                                                const RowsAhead& ahead) {
    if (count == kTilesPerStep) {
      forward_step<kTilesPerStep>(pb, tiles + i, &s.tiles[i], keys, values, j0, n, ahead, s.scores.data());
    } else {
      forward_step<1>(pb, tiles + i, &s.tiles[i], keys, values, j0, n, ahead, s.scores.data());
    }
  });
  for (int i = 0; i < g.count; ++i) finish_tile(pb, tiles[i], s.tiles[i]);
}

template <typename scalar_t>
void forward(const RoutedAttentionParams& params) {
  using acc_t = typename AccType<scalar_t>::type;
  const Problem<scalar_t> pb(params);
  const std::vector<TileGroup> groups = tile_groups_longest_first(pb, kTilesPerGroup);
  // One parallel region: the groups, then the cheap zeroing of each (batch, head) to fill the gaps.
  const int64_t n_groups = static_cast<int64_t>(groups.size());
  parallel_for_dynamic(
      n_groups + params.batch * params.heads, [&] { return ForwardScratch<acc_t>(params.head_dim); },
      [&](int64_t item, ForwardScratch<acc_t>& s) {
        if (item < n_groups) forward_group(pb, groups[item], s);
        else pb.zero_unrouted_rows(static_cast<int>(item - n_groups));
      });
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// Everything the backward needs of one tile, gathered once and shared by both passes. `V` is
// Vec<acc_t> while the operands are gathered and `const Vec<acc_t>` afterwards.
template <typename V>
struct TileOperandsOf {
  V* q_t;           // [d] columns of Q · scale
  V* dout_t;        // [d] columns of dO
  V* q_rows;        // [lanes][vecs] rows of Q, zero padded to whole vectors
  V* dout_rows;     // [lanes][vecs] rows of dO
  V* lse;           // +inf where P must be 0 (no visible key, padding lane)
  V* dout_dot_out;  // rowsum(dO ⊙ O)
  V* positions;
};
template <typename acc_t> using TileOperands = TileOperandsOf<const Vec<acc_t>>;

template <typename scalar_t>
class BackwardOperands {
 public:
  using acc_t = typename AccType<scalar_t>::type;
  static constexpr int kLanes = Simd<acc_t>::lanes;

  BackwardOperands(const Problem<scalar_t>& pb, const RoutedAttentionBwdParams& p)
      : d_(p.head_dim), vecs_((p.head_dim + kLanes - 1) / kLanes),
        per_tile_(2 * d_ + 2 * kLanes * vecs_ + 3), storage_(pb.tiles().size() * per_tile_) {
    parallel_for(static_cast<int64_t>(pb.tiles().size()), 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) gather(pb, p, pb.tiles()[t], operands(storage_.data(), t));
    });
  }

  TileOperands<acc_t> tile(int64_t t) const { return operands(storage_.data(), t); }
  int vecs() const { return vecs_; }
 private:
  template <typename V>
  TileOperandsOf<V> operands(V* storage, int64_t t) const {
    V* base = storage + t * per_tile_;
    V* rows = base + 2 * d_;
    V* stats = rows + 2 * kLanes * vecs_;
    return {base, base + d_, rows, rows + kLanes * vecs_, stats, stats + 1, stats + 2};
  }

  void gather(const Problem<scalar_t>& pb, const RoutedAttentionBwdParams& p, const Tile& t,
              const TileOperandsOf<Vec<acc_t>>& op) const {
    const int b = pb.batch_of(t.bh), h = pb.head_of(t.bh);
    auto dout_row = [&](int i) {
      return static_cast<const scalar_t*>(p.dout) + b * p.dout_batch_stride + h * p.dout_head_stride +
             i * p.dout_row_stride;
    };
    auto q_row = [&](int i) { return pb.q_row(t.bh, i); };
    gather_transposed(pb, t, q_row, static_cast<acc_t>(p.scale), op.q_t);
    gather_transposed(pb, t, dout_row, acc_t(1), op.dout_t);
    *op.positions = lane_positions(pb, t);
    *op.lse = splat(std::numeric_limits<acc_t>::infinity());
    *op.dout_dot_out = Vec<acc_t>{};
    for (int v = 0; v < kLanes * vecs_; ++v) op.q_rows[v] = op.dout_rows[v] = Vec<acc_t>{};
    const acc_t* lse = pb.lse(t.bh);
    for (int lane = 0; lane < t.count; ++lane) {
      const int i = pb.position(t.first + lane);
      const scalar_t* q = q_row(i);
      const scalar_t* dout = dout_row(i);
      const scalar_t* out = pb.out_row(t.bh, i);
      acc_t dot = 0;
      for (int c = 0; c < d_; ++c) {
        const acc_t dout_c = load_acc<acc_t>(dout[c]);
        op.q_rows[lane * vecs_ + c / kLanes][c % kLanes] = load_acc<acc_t>(q[c]);
        op.dout_rows[lane * vecs_ + c / kLanes][c % kLanes] = dout_c;
        dot += dout_c * load_acc<acc_t>(out[c]);
      }
      (*op.dout_dot_out)[lane] = dot;
      if (lse[i] != -std::numeric_limits<acc_t>::infinity()) (*op.lse)[lane] = lse[i];
    }
  }

  const int d_, vecs_;
  const int64_t per_tile_;
  std::vector<Vec<acc_t>> storage_;
};

template <typename acc_t>
struct BackwardScratch {
  explicit BackwardScratch(int d, int vecs)
      : grad_t(kTilesPerGroup * d), probs(kKeyBlock), dprobs(kKeyBlock), dk_block(kKeyBlock * vecs),
        dv_block(kKeyBlock * vecs), k_buffer(kKeyBlock * d), v_buffer(kKeyBlock * d) {}
  std::vector<Vec<acc_t>> grad_t;  // transposed dQ of each tile of a group
  std::vector<Vec<acc_t>> probs, dprobs, dk_block, dv_block;
  std::vector<acc_t> k_buffer, v_buffer;
};

// P and dS of one tile against keys [j0, j0 + n): P = exp(S − lse),
// dS = P ⊙ (dO Vᵀ − rowsum(dO ⊙ O)). dS overwrites dprobs. Both are set, not multiplied, to 0
// where a lane cannot see the key and on padding lanes: the reference's gradients there are 0
// even when the key or value row holds Inf or NaN (0 · inf would be NaN).
template <typename scalar_t, typename acc_t = typename AccType<scalar_t>::type>
void probabilities_and_score_grads(const Problem<scalar_t>& pb, const Tile& t, const TileOperands<acc_t>& op,
                                   RowsView<acc_t> keys, RowsView<acc_t> values, const int32_t* slots, int j0,
                                   int n, BackwardScratch<acc_t>& s) {
  const int d = pb.head_dim();
  rows_dot_tiles<1>(keys, n, op.q_t, d, s.probs.data(), kKeyBlock);
  mask_scores(pb, t, *op.positions, slots, j0, n, s.probs.data());
  for (int j = 0; j < n; ++j) s.probs[j] = exp_approx(s.probs[j] - *op.lse);
  rows_dot_tiles<1>(values, n, op.dout_t, d, s.dprobs.data(), kKeyBlock);
  for (int j = 0; j < n; ++j) s.dprobs[j] = s.probs[j] * (s.dprobs[j] - *op.dout_dot_out);
  mask_scores(pb, t, *op.positions, slots, j0, n, s.dprobs.data(), acc_t(0));
  if (t.count < Simd<acc_t>::lanes) {
    Vec<acc_t> lane{};
    for (int i = 0; i < Simd<acc_t>::lanes; ++i) lane[i] = static_cast<acc_t>(i);
    const auto padding = lane >= splat(static_cast<acc_t>(t.count));
    for (int j = 0; j < n; ++j) {
      s.probs[j] = padding ? Vec<acc_t>{} : s.probs[j];
      s.dprobs[j] = padding ? Vec<acc_t>{} : s.dprobs[j];
    }
  }
}

// dQ of a group of tiles: Σ over visible key blocks of scale · dS K, each key/value block read
// once for the group.
template <typename scalar_t, typename acc_t = typename AccType<scalar_t>::type>
void backward_dq_group(const Problem<scalar_t>& pb, const BackwardOperands<scalar_t>& ops,
                       const RoutedAttentionBwdParams& p, const TileGroup& g, BackwardScratch<acc_t>& s) {
  const Tile* tiles = &pb.tiles()[g.first_tile];
  const int d = p.head_dim;
  std::fill(s.grad_t.begin(), s.grad_t.end(), Vec<acc_t>{});
  for_each_visible_key_block<1>(pb, g, s.k_buffer, s.v_buffer,
                                [&](int i, int, const auto& keys, const auto& values, int j0, int n,
                                    const RowsAhead&) {
    // No requests ahead: with them the backward was about 5% slower (L=1024, half the rows
    // routed, keys and values in cache), the extra loads costing more than they hid.
    probabilities_and_score_grads(pb, tiles[i], ops.tile(g.first_tile + i), keys, values,
                                  pb.key_slots(pb.batch_of(tiles[i].bh)), j0, n, s);
    accumulate_weighted_rows<1>(keys, n, s.dprobs.data(), kKeyBlock, d, &s.grad_t[i * d]);
  });
  for (int i = 0; i < g.count; ++i) {
    const Tile& t = tiles[i];
    acc_t* dq = static_cast<acc_t*>(p.dq) + static_cast<int64_t>(t.bh) * p.seqlen_q * d;
    for (int lane = 0; lane < t.count; ++lane) {
      acc_t* row = dq + static_cast<int64_t>(pb.position(t.first + lane)) * d;
      for (int c = 0; c < d; ++c) row[c] = static_cast<acc_t>(p.scale) * s.grad_t[i * d + c][lane];
    }
  }
}

// dK and dV of one key block of one (batch, kv head), from every routed row of the heads that
// share it that can see the block: each key block has one owner, so no write races.
template <typename scalar_t, typename acc_t = typename AccType<scalar_t>::type>
void backward_dkdv_block(const Problem<scalar_t>& pb, const BackwardOperands<scalar_t>& ops,
                         const RoutedAttentionBwdParams& p, int b, int kvh, int j0, BackwardScratch<acc_t>& s) {
  const int d = p.head_dim, vecs = ops.vecs();
  const int n = std::min<int>(kKeyBlock, p.seqlen_k - j0);
  const auto keys = rows_as_acc(pb.k_row(b, kvh, j0), p.k_row_stride, n, d, s.k_buffer);
  const auto values = rows_as_acc(pb.v_row(b, kvh, j0), p.v_row_stride, n, d, s.v_buffer);
  std::fill(s.dk_block.begin(), s.dk_block.end(), Vec<acc_t>{});
  std::fill(s.dv_block.begin(), s.dv_block.end(), Vec<acc_t>{});
  for (int h = kvh * pb.group_size(); h < (kvh + 1) * pb.group_size(); ++h) {
    const int bh = b * p.heads + h;
    for (int ti = pb.first_tile_seeing(bh, j0); ti < pb.tile_begin(bh + 1); ++ti) {
      const TileOperands<acc_t> op = ops.tile(ti);
      probabilities_and_score_grads(pb, pb.tiles()[ti], op, keys, values, nullptr, j0, n, s);
      accumulate_outer<acc_t>(s.probs.data(), n, op.dout_rows, vecs, s.dv_block.data());
      accumulate_outer<acc_t>(s.dprobs.data(), n, op.q_rows, vecs, s.dk_block.data());
    }
  }
  const int64_t offset = ((static_cast<int64_t>(b) * p.kv_heads + kvh) * p.seqlen_k + j0) * d;
  acc_t* dk = static_cast<acc_t*>(p.dk) + offset;
  acc_t* dv = static_cast<acc_t*>(p.dv) + offset;
  for (int j = 0; j < n; ++j)
    for (int c = 0; c < d; ++c) {
      dk[j * d + c] = static_cast<acc_t>(p.scale) * s.dk_block[j * vecs + c / Simd<acc_t>::lanes][c % Simd<acc_t>::lanes];
      dv[j * d + c] = s.dv_block[j * vecs + c / Simd<acc_t>::lanes][c % Simd<acc_t>::lanes];
    }
}

template <typename scalar_t>
void backward(const RoutedAttentionBwdParams& params) {
  using acc_t = typename AccType<scalar_t>::type;
  const Problem<scalar_t> pb(params);
  if (pb.tiles().empty()) return;  // nothing routed: all gradients stay zero
  const BackwardOperands<scalar_t> ops(pb, params);
  auto make_scratch = [&] { return BackwardScratch<acc_t>(params.head_dim, ops.vecs()); };

  const std::vector<TileGroup> groups = tile_groups_longest_first(pb, kTilesPerGroup);
  parallel_for_dynamic(static_cast<int64_t>(groups.size()), make_scratch, [&](int64_t item, BackwardScratch<acc_t>& s) {
    backward_dq_group(pb, ops, params, groups[item], s);
  });

  // Key blocks in order of the work they get: with a causal mask, early blocks are seen by most rows.
  const int blocks = (params.seqlen_k + kKeyBlock - 1) / kKeyBlock;
  const int64_t n_items = static_cast<int64_t>(params.batch) * params.kv_heads * blocks;
  parallel_for_dynamic(n_items, make_scratch, [&](int64_t item, BackwardScratch<acc_t>& s) {
    const int block = static_cast<int>(item / (params.batch * params.kv_heads));
    const int bkv = static_cast<int>(item % (params.batch * params.kv_heads));
    backward_dkdv_block(pb, ops, params, bkv / params.kv_heads, bkv % params.kv_heads, block * kKeyBlock, s);
  });
}

}  // namespace

void routed_attention_fwd_cpu(const RoutedAttentionParams& params) {
  CRAM_DTYPE_SWITCH(params.dtype, "routed_attention_fwd_cpu", [&] { forward<scalar_t>(params); });
}

void routed_attention_bwd_cpu(const RoutedAttentionBwdParams& params) {
  CRAM_DTYPE_SWITCH(params.dtype, "routed_attention_bwd_cpu", [&] { backward<scalar_t>(params); });
}

}  // namespace cram
