// Runs fastssl's CUDA kernels on the host, for tests on machines without a GPU.
//
// Include this, define FASTSSL_HOST_EMULATION, then include the kernel's .cu file and call
// fastssl_emulation::launch(grid, threads, shared_bytes, seed, kernel, args...). Each block
// runs on its own, each of its threads as a fiber (ucontext) on one OS thread;
// __syncthreads() suspends the fiber until every thread of the block has reached it. Between
// two barriers the threads run one after another, in an order that changes from barrier to
// barrier (forward, reverse, seeded shuffles), so a missing barrier shows up as reads of
// values not yet written (dynamic shared memory starts as NaN). A barrier that some threads
// of a block reach while others have returned is reported, not deadlocked.
//
// Covered: threadIdx/blockIdx/blockDim/gridDim (x only), __syncthreads, static and dynamic
// __shared__ memory (__align__), the math functions of <cmath>, float2, float4, atomicAdd on unsigned
// and __threadfence (exact: blocks run one after another, so the last block to take a ticket is
// the last one launched), and the float16/bfloat16 storage types with CUDA's conversions
// (round to nearest even). Not covered: warp intrinsics, concurrency between blocks (a kernel
// that reads another block's results without a ticket is not checked).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cstring>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <numeric>
#include <random>
#include <vector>

#define FASTSSL_HOST_EMULATION 1

namespace fastssl_emulation {

// 16-bit storage types, bit-compatible with torch.float16 / torch.bfloat16.
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

inline float half_to_float(Half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exponent = (h.bits >> 10) & 0x1fu;
  const uint32_t mantissa = h.bits & 0x3ffu;
  if (exponent == 0x1f) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));  // inf / NaN
  if (exponent == 0) {  // zero / subnormal: mantissa * 2^-24
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline Half float_to_half(float f) {  // round to nearest even, as __float2half_rn
  const uint32_t bits = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  if (std::isnan(f)) return Half{static_cast<uint16_t>(sign | 0x7e00u)};
  const float magnitude = std::fabs(f);
  if (magnitude >= 65520.f) return Half{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to inf
  if (magnitude < 6.103515625e-05f) {  // subnormal: multiples of 2^-24, nearbyint rounds to even
    const float units = std::nearbyint(magnitude * 16777216.f);
    return Half{static_cast<uint16_t>(sign | static_cast<uint16_t>(units))};
  }
  const uint32_t m = float_to_bits(magnitude);
  uint32_t rounded = m + 0xfffu + ((m >> 13) & 1u);  // round the 13 dropped bits to even
  rounded >>= 13;
  return Half{static_cast<uint16_t>(sign | (rounded - (112u << 10)))};
}

inline float bf16_to_float(BFloat16 b) { return bits_to_float(static_cast<uint32_t>(b.bits) << 16); }

inline BFloat16 float_to_bf16(float f) {  // round to nearest even, as __float2bfloat16_rn
  const uint32_t bits = float_to_bits(f);
  if (std::isnan(f)) return BFloat16{static_cast<uint16_t>((bits >> 16) | 0x40u)};
  return BFloat16{static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16)};
}

struct Index3 {
  unsigned x = 0, y = 0, z = 0;
};

inline Index3 thread_idx, block_idx, block_dim, grid_dim;
inline std::vector<double> dynamic_shared;  // double: 8-byte alignment for any element type

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  bool finished = false;
};

inline ucontext_t scheduler;
inline std::vector<Fiber> fibers;
inline int current = -1;
inline std::function<void()> body;

inline void syncthreads() { swapcontext(&fibers[current].context, &scheduler); }

inline void fiber_main() {
  body();
  fibers[current].finished = true;  // then uc_link resumes the scheduler
}

// Returns 0, or 1 when the threads of a block disagreed about a barrier.
template <typename Kernel, typename... Args>
int launch(unsigned grid, unsigned threads, size_t shared_bytes, unsigned seed, Kernel kernel, Args... args) {
  constexpr size_t kStackBytes = 128 * 1024;
  grid_dim = {grid, 1, 1};
  block_dim = {threads, 1, 1};
  body = [&] { kernel(args...); };
  std::mt19937 rng(seed);
  fibers.resize(threads);
  std::vector<unsigned> order(threads);
  for (unsigned b = 0; b < grid; ++b) {
    block_idx = {b, 0, 0};
    dynamic_shared.assign((shared_bytes + sizeof(double) - 1) / sizeof(double), std::nan(""));
    float* as_float = reinterpret_cast<float*>(dynamic_shared.data());
    std::fill(as_float, as_float + dynamic_shared.size() * 2, std::nanf(""));
    for (Fiber& f : fibers) {
      f.stack.resize(kStackBytes);
      f.finished = false;
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack.data();
      f.context.uc_stack.ss_size = f.stack.size();
      f.context.uc_link = &scheduler;
      makecontext(&f.context, fiber_main, 0);
    }
    std::iota(order.begin(), order.end(), 0u);
    for (int epoch = 0;; ++epoch) {
      if (epoch % 3 == 1) {
        std::reverse(order.begin(), order.end());
      } else if (epoch % 3 == 2) {
        std::shuffle(order.begin(), order.end(), rng);
      }
      for (unsigned t : order) {
        if (fibers[t].finished) continue;
        current = static_cast<int>(t);
        thread_idx = {t, 0, 0};
        swapcontext(&scheduler, &fibers[t].context);
      }
      const auto done = std::count_if(fibers.begin(), fibers.end(), [](const Fiber& f) { return f.finished; });
      if (done == static_cast<long>(threads)) break;
      if (done != 0) return 1;  // some threads returned, the others wait at a barrier
    }
  }
  return 0;
}

}  // namespace fastssl_emulation

#define threadIdx fastssl_emulation::thread_idx
#define blockIdx fastssl_emulation::block_idx
#define blockDim fastssl_emulation::block_dim
#define gridDim fastssl_emulation::grid_dim
#define __syncthreads() fastssl_emulation::syncthreads()
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__

struct float2 {
  float x, y;
};
struct float4 {
  float x, y, z, w;
};

inline unsigned atomicAdd(unsigned* address, unsigned value) {
  const unsigned old = *address;
  *address = old + value;
  return old;
}
inline void __threadfence() {}

inline float to_float(float v) { return v; }
inline float to_float(fastssl_emulation::Half v) { return fastssl_emulation::half_to_float(v); }
inline float to_float(fastssl_emulation::BFloat16 v) { return fastssl_emulation::bf16_to_float(v); }
template <typename T>
T from_float(float v);
template <>
inline float from_float<float>(float v) { return v; }
template <>
inline fastssl_emulation::Half from_float<fastssl_emulation::Half>(float v) { return fastssl_emulation::float_to_half(v); }
template <>
inline fastssl_emulation::BFloat16 from_float<fastssl_emulation::BFloat16>(float v) {
  return fastssl_emulation::float_to_bf16(v);
}
#define FASTSSL_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(fastssl_emulation::dynamic_shared.data())
