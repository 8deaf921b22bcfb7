// CPU emulation of the small CUDA subset the Tri kernels use, so their real source runs in CPU tests.
//
// Test-only (tests/kernel_emulator.py builds csrc/kernels/*.cu with g++ against this directory, whose
// cuda_runtime.h / cuda_runtime_api.h / cuda_bf16.h / cuda_fp16.h shadow the toolkit's). A launch
// runs one OS thread per CUDA thread of a block and walks the grid's blocks in order; __syncthreads
// and warp shuffles are real barriers among those threads, __shared__ is a static (blocks do not
// overlap). bf16 / fp16 are bit-exact storage types with round-to-nearest-even conversion. What it
// cannot show: timing, coalescing, occupancy, and faults that only real device memory would raise.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <math.h>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

typedef void* cudaStream_t;
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
};
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated error"; }

// ------------------------------------------------------------------ 16-bit float storage types --------
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return {static_cast<uint16_t>(u >> 16)};
}
inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.bits, 2);
  return static_cast<float>(v);
}
inline __half __float2half_rn(float f) {
  const _Float16 v = static_cast<_Float16>(f);
  __half h;
  std::memcpy(&h.bits, &v, 2);
  return h;
}

// ------------------------------------------------------------------ device math ------------------------
inline float __expf(float x) { return std::exp(x); }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}

// ------------------------------------------------------------------ block / warp synchronisation ------
namespace emu {

struct Block {
  explicit Block(unsigned threads) : bar(threads) {
    for (unsigned w = 0; w < threads / 32; ++w) warps.emplace_back(std::make_unique<Warp>());
  }
  struct Warp {
    std::barrier<> bar{32};
    float slots[32];
  };
  std::barrier<> bar;
  std::vector<std::unique_ptr<Warp>> warps;
};

inline thread_local Block* current = nullptr;

inline float shfl_xor(float v, int mask) {
  Block::Warp& w = *current->warps[threadIdx.x / 32];
  const unsigned lane = threadIdx.x % 32;
  w.slots[lane] = v;
  w.bar.arrive_and_wait();
  const float r = w.slots[lane ^ static_cast<unsigned>(mask)];
  w.bar.arrive_and_wait();
  return r;
}

// Runs kernel() for every block of the grid with block.x threads; blocks run one after another.
template <typename F>
cudaError_t launch(dim3 grid, dim3 block, size_t /*shared_bytes*/, cudaStream_t /*stream*/, F&& kernel) {
  if (block.x == 0 || block.x % 32 != 0 || block.y != 1 || block.z != 1 || grid.y != 1 || grid.z != 1)
    return cudaErrorInvalidConfiguration;  // the emulator supports 1-D grids of whole warps only
  Block blk(block.x);
  std::vector<std::thread> threads;
  threads.reserve(block.x);
  for (unsigned t = 0; t < block.x; ++t) {
    threads.emplace_back([&, t] {
      current = &blk;
      threadIdx = dim3(t);
      blockDim = block;
      gridDim = grid;
      for (unsigned b = 0; b < grid.x; ++b) {
        blockIdx = dim3(b);
        kernel();                 // a thread may return early; it still meets the others below
        blk.bar.arrive_and_wait();  // block b is done before block b + 1 reuses __shared__ statics
      }
    });
  }
  for (auto& th : threads) th.join();
  return cudaSuccess;
}

}  // namespace emu

inline void __syncthreads() { emu::current->bar.arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned /*mask*/, float v, int lane_mask) { return emu::shfl_xor(v, lane_mask); }
