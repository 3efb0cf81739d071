// The warp-level matrix instructions of csrc/common/mma_sm80.cuh (cp.async, ldmatrix, mma.sync
// m16n8k16) for the SIMT emulator, with the fragment layouts of the PTX ISA ("Matrix Fragments for
// mma.m16n8k16", "ldmatrix"). cp.async copies at once, so its commit and wait are no-ops.
// Alignment rules are checked: 16 bytes for cp.async's two addresses and ldmatrix's row addresses.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "simt.h"

namespace cram {
namespace cuda {

inline void check_aligned_16(const void* p, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) simt::fail("%s address %p is not 16-byte aligned", what, p);
}

inline void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
  check_aligned_16(smem_dst, "cp.async shared");
  if (valid) {
    check_aligned_16(gmem_src, "cp.async global");
    std::memcpy(smem_dst, gmem_src, 16);
  } else {
    std::memset(smem_dst, 0, 16);
  }
}
inline void cp_async_commit() {}
template <int N> inline void cp_async_wait() {}

// Lane l supplies the address of row l % 8 of matrix l / 8; lane l receives, of matrix j, row
// l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 (transposed: column l / 4 of those two rows).
template <bool kTrans> inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  check_aligned_16(smem_row, "ldmatrix row");
  const int lane = simt::lane_id();
  simt::warp_exchange(simt::WarpOp::kLdmatrix, simt::kFullMask, &smem_row, sizeof(smem_row),
                      [&](const simt::Warp& w, uint32_t live) {
                        if (live != simt::kFullMask) simt::fail("ldmatrix in a warp with exited lanes");
                        auto element = [&](int matrix, int row, int col) {
                          const uint16_t* row_ptr;
                          std::memcpy(&row_ptr, w.slot[matrix * 8 + row], sizeof(row_ptr));
                          return static_cast<uint32_t>(row_ptr[col]);
                        };
                        for (int j = 0; j < 4; ++j) {
                          if constexpr (kTrans) {
                            r[j] = element(j, 2 * (lane % 4), lane / 4) | element(j, 2 * (lane % 4) + 1, lane / 4) << 16;
                          } else {
                            r[j] = element(j, lane / 4, 2 * (lane % 4)) | element(j, lane / 4, 2 * (lane % 4) + 1) << 16;
                          }
                        }
                      });
}

template <typename T> inline float half_to_float(uint32_t bits16) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(__half{static_cast<uint16_t>(bits16)});
  else return __bfloat162float(__nv_bfloat16{static_cast<uint16_t>(bits16)});
}

// d += a * b for one 16x8x16 tile. Lane l (g = l / 4, c = l % 4) holds A's rows {g, g + 8} x
// columns {2c, 2c + 1} + {0, 8} in a[0..3] (a[1] the lower rows, a[2] the right columns), B's
// rows {2c, 2c + 1} + {0, 8} of column g in b0, b1, and C's rows {g, g + 8} x columns {2c, 2c + 1}.
template <typename T> inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "mma_16816: fp16 or bf16 operands");
  const uint32_t mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
  const int lane = simt::lane_id(), g = lane / 4, c = lane % 4;
  simt::warp_exchange(simt::WarpOp::kMma, simt::kFullMask, mine, sizeof(mine), [&](const simt::Warp& w, uint32_t live) {
    if (live != simt::kFullMask) simt::fail("mma in a warp with exited lanes");
    auto reg = [&](int l, int i) {
      uint32_t v;
      std::memcpy(&v, w.slot[l] + 4 * i, sizeof(v));
      return v;
    };
    auto A = [&](int row, int k) {
      const uint32_t v = reg((row % 8) * 4 + (k % 8) / 2, (row >= 8) + 2 * (k >= 8));
      return half_to_float<T>(k % 2 ? v >> 16 : v & 0xffffu);
    };
    auto B = [&](int k, int n) {
      const uint32_t v = reg(n * 4 + (k % 8) / 2, 4 + (k >= 8));
      return half_to_float<T>(k % 2 ? v >> 16 : v & 0xffffu);
    };
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i / 2), col = 2 * c + i % 2;
      float sum = 0;
      for (int k = 0; k < 16; ++k) sum += A(row, k) * B(k, col);
      d[i] += sum;
    }
  });
}

}  // namespace cuda
}  // namespace cram
