// cram::parallel_for for the native build: splits [0, n) over std::thread workers.
// (The Python extension uses at::parallel_for instead; see csrc/bindings.cpp.)
#include <algorithm>
#include <thread>
#include <vector>

#include "common/parallel.h"

namespace cram {

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  const int64_t hw = std::max(1u, std::thread::hardware_concurrency());
  const int64_t workers = std::max<int64_t>(1, std::min(hw, n / std::max<int64_t>(grain, 1)));
  if (workers == 1) return fn(0, n);
  std::vector<std::thread> threads;
  const int64_t per = (n + workers - 1) / workers;
  for (int64_t begin = 0; begin < n; begin += per)
    threads.emplace_back(fn, begin, std::min(n, begin + per));
  for (auto& t : threads) t.join();
}

}  // namespace cram
