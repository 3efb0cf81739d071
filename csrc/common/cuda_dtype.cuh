// CUDA side of the element types: cram::DType -> native CUDA types, conversions to and from the
// accumulation type, and the error check used by every launcher.
//
// Kernels are templated on the storage type `scalar_t` (float, double, __half, __nv_bfloat16)
// and compute in `acc_t` = AccType<scalar_t>::type (double for double, float otherwise).
// No torch header: errors are reported as std::runtime_error, which the binding layer turns
// into a Python RuntimeError.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "dtype.h"

namespace cram {

template <> struct AccType<__half> { using type = float; };
template <> struct AccType<__nv_bfloat16> { using type = float; };

namespace cuda {

// Widening load conversions (storage -> accumulation type).
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

// Narrowing store conversions (round to nearest even).
template <typename T> __device__ __forceinline__ T from_acc(float x);
template <typename T> __device__ __forceinline__ T from_acc(double x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <> __device__ __forceinline__ float from_acc<float>(double x) { return static_cast<float>(x); }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// exp / log in the accumulation type: the fast single-precision intrinsics for float (the
// kernels are built with --use_fast_math), full precision for double.
__device__ __forceinline__ float exp_acc(float x) { return __expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log1p_acc(float x) { return log1pf(x); }
__device__ __forceinline__ double log1p_acc(double x) { return log1p(x); }

// softplus(x) = log(1 + e^x), switching to x where e^x would overflow the sum's precision
// (the same threshold as torch.nn.functional.softplus).
template <typename acc_t> __device__ __forceinline__ acc_t softplus(acc_t x) {
  return x > acc_t(20) ? x : log1p_acc(exp_acc(x));
}
template <typename acc_t> __device__ __forceinline__ acc_t sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + exp_acc(-x));
}

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* what, const char* file,
                                          int line) {
  throw std::runtime_error(std::string("CUDA error: ") + cudaGetErrorString(err) + " (" + what +
                           ") at " + file + ":" + std::to_string(line));
}

}  // namespace cuda
}  // namespace cram

// Checks a CUDA runtime call; throws std::runtime_error naming the call, file and line.
#define CRAM_CUDA_CHECK(EXPR)                                                          \
  do {                                                                                 \
    const cudaError_t cram_cuda_err_ = (EXPR);                                         \
    if (cram_cuda_err_ != cudaSuccess)                                                 \
      ::cram::cuda::throw_cuda_error(cram_cuda_err_, #EXPR, __FILE__, __LINE__);       \
  } while (0)

// After a kernel launch: reports launch-configuration errors at the launch site.
#define CRAM_CUDA_CHECK_LAUNCH() CRAM_CUDA_CHECK(cudaGetLastError())

// Expands BODY with `scalar_t` bound to the CUDA storage type of DTYPE.
#define CRAM_CUDA_DTYPE_SWITCH(DTYPE, NAME, ...)                                                 \
  [&] {                                                                                          \
    switch (DTYPE) {                                                                             \
      case ::cram::DType::kFloat32: { using scalar_t = float; return __VA_ARGS__(); }            \
      case ::cram::DType::kFloat64: { using scalar_t = double; return __VA_ARGS__(); }           \
      case ::cram::DType::kFloat16: { using scalar_t = __half; return __VA_ARGS__(); }           \
      case ::cram::DType::kBFloat16: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); }   \
    }                                                                                            \
    throw std::invalid_argument(std::string(NAME) + ": unsupported dtype");                      \
  }()
