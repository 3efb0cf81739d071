// Parallel loop used by the CPU kernels, declared without torch headers.
//
// The extension implements it with at::parallel_for (csrc/bindings.cpp), so the kernels share
// PyTorch's thread pool and honour torch.set_num_threads; the native CMake build implements it
// with std::thread (csrc/tests/parallel_native.cpp).
#pragma once

#include <cstdint>
#include <functional>

namespace cram {

// Calls fn(begin, end) on disjoint sub-ranges covering [0, n), each of at least `grain` items
// (except the last), possibly on several threads.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace cram
