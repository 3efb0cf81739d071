// Parallel loops used by the CPU kernels, declared without torch headers.
//
// The extension implements it with at::parallel_for (csrc/bindings.cpp), so the kernels share
// PyTorch's thread pool and honour torch.set_num_threads; the native CMake build implements it
// with std::thread (csrc/tests/parallel_native.cpp).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>

namespace cram {

// Calls fn(begin, end) on disjoint sub-ranges covering [0, n), each of at least `grain` items
// (except the last), possibly on several threads.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

// Calls work(item, scratch) for every item in [0, n_items), for items that differ a lot in cost
// (parallel_for splits a range statically): each worker takes the next item from a shared
// counter, so callers should order items longest first. Each worker makes its scratch once.
template <typename MakeScratch, typename Work>
void parallel_for_dynamic(int64_t n_items, MakeScratch make_scratch, Work work) {
  std::atomic<int64_t> next{0};
  parallel_for(n_items, 1, [&](int64_t, int64_t) {
    auto scratch = make_scratch();
    for (int64_t item = next++; item < n_items; item = next++) work(item, scratch);
  });
}

}  // namespace cram
