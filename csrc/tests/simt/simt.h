// A SIMT emulator that runs the package's CUDA kernels on the CPU, so that the native tests can
// compare every CUDA launcher with its CPU twin on a machine without a GPU, under
// AddressSanitizer (out-of-bounds and use-after-free, as compute-sanitizer's memcheck),
// UndefinedBehaviorSanitizer, and ThreadSanitizer (shared-memory races, as racecheck). It provides only what csrc/**/*.cu use; translate_cuda.py turns
// their launches `k<<<grid, block, smem, stream>>>(args)` into `simt::launch(...)`, their
// `extern __shared__` arrays into the block's dynamic shared memory, and registers their other
// `__shared__` variables.
//
// Model:
// - The blocks of a grid run one after another, in a shuffled order, so a `__shared__` variable
//   (a static local here) belongs to the block that runs. Shared memory, static and dynamic, is
//   filled with 0xff bytes (NaN as floats) before each block: a read before any write shows.
// - The threads of a block run as OS threads (a pool reused across launches). __syncthreads is a
//   barrier over the block's threads that have not exited, as on sm_70 and later.
// - Warp-level operations (shuffles, ballot, __syncwarp, and ldmatrix / mma / cp.async in
//   warp_matrix.h) exchange values through a barrier over the warp's live lanes. Each checks that
//   all of them reach the same operation with a mask naming them all, that no lane reads a value
//   from an exited lane, and aborts with a message otherwise: on a GPU these are bugs too.
// - A block that runs longer than kWatchdogSeconds is reported as a deadlock (a barrier some
//   threads never reach) and aborts.
// - Launch limits are checked: at most 1024 threads a block, grid y / z at most 65535, dynamic
//   shared memory at most 48 KiB unless cudaFuncSetAttribute raised the kernel's limit, and never
//   above an H100's 227 KiB.
// - The multiprocessor count is SIMT_SM_COUNT from the environment (default 4): few SMs make
//   the attention kernels split key ranges, which exercises their merge.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <thread>
#include <type_traits>
#include <vector>

#include "common/dtype.h"

// ----------------------------------------------------------------------------------------------
// Keywords and vector types
// ----------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }

inline thread_local uint3 threadIdx{}, blockIdx{};
inline thread_local dim3 blockDim;

// ----------------------------------------------------------------------------------------------
// Runtime API
// ----------------------------------------------------------------------------------------------
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
typedef struct CUstream_st* cudaStream_t;

namespace simt {

constexpr int kWarpSize = 32;
constexpr int kMaxBlockThreads = 1024;
constexpr size_t kDefaultDynamicSmem = 48 * 1024;
constexpr size_t kMaxDynamicSmem = 227 * 1024;
constexpr int kWatchdogSeconds = 120;
constexpr uint32_t kFullMask = 0xffffffffu;

[[noreturn]] inline void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
[[noreturn]] inline void fail(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  std::fprintf(stderr, "simt: ");
  std::vfprintf(stderr, fmt, args);
  std::fprintf(stderr, " [block (%u, %u, %u), thread (%u, %u, %u)]\n", blockIdx.x, blockIdx.y, blockIdx.z,
               threadIdx.x, threadIdx.y, threadIdx.z);
  va_end(args);
  std::fflush(stderr);
  std::abort();
}

// Raised dynamic shared memory limits, by kernel address (cudaFuncSetAttribute).
inline std::mutex& attribute_mutex() {
  static std::mutex m;
  return m;
}
inline std::map<const void*, size_t>& dynamic_smem_limits() {
  static std::map<const void*, size_t> limits;
  return limits;
}

// One warp of the running block: its live lanes and the slots its lanes exchange values through.
struct Warp {
  explicit Warp(int lanes) : barrier(lanes), live(lanes == kWarpSize ? kFullMask : (1u << lanes) - 1) {}
  std::barrier<> barrier;
  std::atomic<uint32_t> live;
  int op[kWarpSize] = {};
  uint32_t mask[kWarpSize] = {};
  alignas(16) unsigned char slot[kWarpSize][32] = {};
};

struct Block {
  Block(int threads, size_t smem_bytes) : barrier(threads), dynamic_smem(smem_bytes + 128, 0xff) {
    for (int first = 0; first < threads; first += kWarpSize)
      warps.push_back(std::make_unique<Warp>(std::min(kWarpSize, threads - first)));
  }
  std::barrier<> barrier;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<unsigned char> dynamic_smem;
};

inline thread_local Block* this_block = nullptr;
inline thread_local int this_thread_rank = 0;  // linear index in the block

inline int lane_id() { return this_thread_rank % kWarpSize; }
inline Warp& this_warp() { return *this_block->warps[this_thread_rank / kWarpSize]; }

// The static `__shared__` variables met so far (translate_cuda.py registers each where it is
// declared); launch() fills them with 0xff bytes before every block, as dynamic shared memory.
// Thread 0 alone registers, so that the registry's lock orders nothing between a block's threads
// (ThreadSanitizer would take it for synchronisation and miss races).
inline std::mutex shared_regions_mutex;
inline std::map<void*, size_t> shared_regions;
template <typename T> void shared_region(T& variable) {
  if (this_thread_rank != 0) return;
  std::lock_guard<std::mutex> lock(shared_regions_mutex);
  shared_regions.emplace(static_cast<void*>(&variable), sizeof(T));
}

template <typename T> T* dynamic_shared() {
  auto address = reinterpret_cast<uintptr_t>(this_block->dynamic_smem.data());
  return reinterpret_cast<T*>((address + 127) & ~uintptr_t(127));
}

// Warp operations, tagged so that lanes at different operations are caught.
enum class WarpOp : int { kShfl = 1, kShflUp, kShflDown, kShflXor, kBallot, kSyncwarp, kLdmatrix, kMma };

// Every live lane publishes `bytes` of `mine` and its tag, waits for the others, then runs
// `read(warp, live)` while no lane can overwrite a slot, then waits again.
template <typename Read>
void warp_exchange(WarpOp op, uint32_t mask, const void* mine, size_t bytes, Read&& read) {
  Warp& w = this_warp();
  const int lane = lane_id();
  if (!(mask >> lane & 1u)) fail("a warp operation (%d) whose mask 0x%08x leaves out the calling lane %d",
                                 static_cast<int>(op), mask, lane);
  w.op[lane] = static_cast<int>(op);
  w.mask[lane] = mask;
  if (bytes) std::memcpy(w.slot[lane], mine, bytes);
  w.barrier.arrive_and_wait();
  const uint32_t live = w.live.load();
  if ((mask & live) != live)
    fail("warp operation %d with mask 0x%08x leaves out live lanes (live 0x%08x)", static_cast<int>(op), mask, live);
  for (int l = 0; l < kWarpSize; ++l)
    if ((live >> l & 1u) && (w.op[l] != static_cast<int>(op) || w.mask[l] != mask))
      fail("lanes of one warp at different warp operations: lane %d at %d (mask 0x%08x), lane %d at %d "
           "(mask 0x%08x)", lane, static_cast<int>(op), mask, l, w.op[l], w.mask[l]);
  read(static_cast<const Warp&>(w), live);
  w.barrier.arrive_and_wait();
}

template <typename T> T shuffle(WarpOp op, uint32_t mask, T value, int src_lane) {
  static_assert(sizeof(T) <= 32 && std::is_trivially_copyable_v<T>);
  T result = value;
  warp_exchange(op, mask, &value, sizeof(T), [&](const Warp& w, uint32_t live) {
    if (src_lane == lane_id()) return;
    if (!(live >> src_lane & 1u)) fail("a shuffle reads lane %d, which has exited", src_lane);
    std::memcpy(&result, w.slot[src_lane], sizeof(T));
  });
  return result;
}

// The thread pool that runs a block's threads; grows to the largest block launched.
class ThreadPool {
 public:
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    start_.notify_all();
    for (auto& t : workers_) t.join();
  }

  // Runs job(rank) on `threads` workers; returns when all have finished or aborts after the
  // watchdog's limit.
  void run(int threads, const std::function<void(int)>& job) {
    std::unique_lock<std::mutex> lock(mutex_);
    while (static_cast<int>(workers_.size()) < threads) {
      const int rank = static_cast<int>(workers_.size());
      workers_.emplace_back([this, rank] { work(rank); });
    }
    job_ = &job;
    active_ = threads;
    remaining_ = threads;
    ++generation_;
    start_.notify_all();
    if (!done_.wait_for(lock, std::chrono::seconds(kWatchdogSeconds), [this] { return remaining_ == 0; })) {
      std::fprintf(stderr, "simt: a block of %d threads did not finish in %d s: a deadlock (a barrier or warp "
                   "operation that some threads never reach)\n", threads, kWatchdogSeconds);
      std::abort();
    }
  }

 private:
  void work(int rank) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int)>* job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        start_.wait(lock, [&] { return stopping_ || generation_ != seen; });
        if (stopping_) return;
        seen = generation_;
        if (rank >= active_) continue;
        job = job_;
      }
      (*job)(rank);
      std::lock_guard<std::mutex> lock(mutex_);
      if (--remaining_ == 0) done_.notify_one();
    }
  }

  std::mutex mutex_;
  std::condition_variable start_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* job_ = nullptr;
  uint64_t generation_ = 0;
  int active_ = 0, remaining_ = 0;
  bool stopping_ = false;
};

inline ThreadPool& pool() {
  static ThreadPool p;
  return p;
}

// Kernel launches so far: tests check the launch counts the launchers document.
inline std::atomic<uint64_t> launch_count{0};

struct LaunchConfig {
  LaunchConfig(dim3 grid_, dim3 block_, size_t smem_ = 0, cudaStream_t = nullptr)
      : grid(grid_), block(block_), smem(smem_) {}
  dim3 grid, block;
  size_t smem;
};

template <typename Kernel, typename... Args>
void launch(const LaunchConfig& config, Kernel* kernel, Args... args) {
  const dim3 grid = config.grid, block = config.block;
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > kMaxBlockThreads)
    fail("launch with %llu threads a block (1 to %d allowed)", static_cast<unsigned long long>(threads),
         kMaxBlockThreads);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    fail("launch with grid (%u, %u, %u)", grid.x, grid.y, grid.z);
  size_t smem_limit = kDefaultDynamicSmem;
  {
    std::lock_guard<std::mutex> lock(attribute_mutex());
    auto it = dynamic_smem_limits().find(reinterpret_cast<const void*>(kernel));
    if (it != dynamic_smem_limits().end()) smem_limit = it->second;
  }
  if (config.smem > smem_limit)
    fail("launch with %zu bytes of dynamic shared memory above the kernel's limit of %zu (raise it with "
         "cudaFuncSetAttribute)", config.smem, smem_limit);
  // Blocks run in a shuffled order, seeded by the launch's number so that a run repeats: a
  // kernel that depends on the order of its blocks shows it.
  std::vector<uint3> blocks;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.push_back({x, y, z});
  std::shuffle(blocks.begin(), blocks.end(), std::mt19937_64(launch_count.fetch_add(1)));
  for (const uint3 index : blocks) {
    Block state(static_cast<int>(threads), config.smem);
    {
      std::lock_guard<std::mutex> lock(shared_regions_mutex);
      for (const auto& [address, bytes] : shared_regions) std::memset(address, 0xff, bytes);
    }
    const std::function<void(int)> job = [&](int rank) {
      this_block = &state;
      this_thread_rank = rank;
      blockIdx = index;
      blockDim = block;
      threadIdx = {rank % block.x, rank / block.x % block.y, rank / (block.x * block.y)};
      kernel(args...);
      // An exited thread no longer counts at barriers or in its warp.
      Warp& w = this_warp();
      w.live.fetch_and(~(1u << lane_id()));
      w.barrier.arrive_and_drop();
      state.barrier.arrive_and_drop();
    };
    pool().run(static_cast<int>(threads), job);
  }
}

inline int multiprocessor_count() {
  const char* env = std::getenv("SIMT_SM_COUNT");
  return env ? std::max(1, std::atoi(env)) : 4;
}

}  // namespace simt

inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t err) { return err == cudaSuccess ? "no error" : "invalid value"; }
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = simt::multiprocessor_count();
  return cudaSuccess;
}
template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) > simt::kMaxDynamicSmem)
    return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(simt::attribute_mutex());
  simt::dynamic_smem_limits()[reinterpret_cast<const void*>(kernel)] = static_cast<size_t>(value);
  return cudaSuccess;
}

// ----------------------------------------------------------------------------------------------
// Device functions
// ----------------------------------------------------------------------------------------------
inline void __syncthreads() { simt::this_block->barrier.arrive_and_wait(); }
inline void __syncwarp(uint32_t mask = simt::kFullMask) {
  simt::warp_exchange(simt::WarpOp::kSyncwarp, mask, nullptr, 0, [](const simt::Warp&, uint32_t) {});
}
// Blocks run one after another, so there is nothing to order between them; within a block the
// barriers order memory.
inline void __threadfence() {}

template <typename T> T __shfl_sync(uint32_t mask, T value, int src, int width = 32) {
  const int lane = simt::lane_id();
  return simt::shuffle(simt::WarpOp::kShfl, mask, value, (lane & ~(width - 1)) + (src & (width - 1)));
}
template <typename T> T __shfl_up_sync(uint32_t mask, T value, unsigned delta, int width = 32) {
  const int lane = simt::lane_id();
  const int src = (lane & (width - 1)) >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane;
  return simt::shuffle(simt::WarpOp::kShflUp, mask, value, src);
}
template <typename T> T __shfl_down_sync(uint32_t mask, T value, unsigned delta, int width = 32) {
  const int lane = simt::lane_id();
  const int src = (lane & (width - 1)) + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : lane;
  return simt::shuffle(simt::WarpOp::kShflDown, mask, value, src);
}
template <typename T> T __shfl_xor_sync(uint32_t mask, T value, int lane_mask, int width = 32) {
  const int lane = simt::lane_id();
  const int src = lane ^ lane_mask;
  return simt::shuffle(simt::WarpOp::kShflXor, mask, value, (src & ~(width - 1)) == (lane & ~(width - 1)) ? src : lane);
}
inline uint32_t __ballot_sync(uint32_t mask, int predicate) {
  uint32_t ballot = 0;
  const int mine = predicate != 0;
  simt::warp_exchange(simt::WarpOp::kBallot, mask, &mine, sizeof(mine), [&](const simt::Warp& w, uint32_t live) {
    for (int l = 0; l < simt::kWarpSize; ++l) {
      int p;
      std::memcpy(&p, w.slot[l], sizeof(p));
      if ((live >> l & 1u) && (mask >> l & 1u) && p) ballot |= 1u << l;
    }
  });
  return ballot;
}
inline int __popc(uint32_t x) { return __builtin_popcount(x); }

template <typename T> T atomicAdd(T* address, T value) { return std::atomic_ref<T>(*address).fetch_add(value); }
template <typename T> T __ldg(const T* p) { return *p; }
template <typename T> T __ldcg(const T* p) { return *p; }

using std::isnan;
inline float __expf(float x) { return std::exp(x); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
inline float min(float a, float b) { return std::fmin(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int64_t max(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }

// ----------------------------------------------------------------------------------------------
// 16-bit floating point (storage and round-to-nearest-even conversions)
// ----------------------------------------------------------------------------------------------
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
struct alignas(4) __half2 {
  __half x, y;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

// The CPU kernels' conversions (csrc/common/dtype.h): round to nearest even, as CUDA's _rn.
inline float __half2float(__half h) { return cram::to_float(cram::fp16_t{h.bits}); }
inline __half __float2half_rn(float x) { return {cram::from_float<cram::fp16_t>(x).bits}; }
inline float __bfloat162float(__nv_bfloat16 b) { return cram::to_float(cram::bf16_t{b.bits}); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return {cram::from_float<cram::bf16_t>(x).bits}; }
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
