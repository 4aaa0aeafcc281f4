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
// __shared__ memory, the math functions of <cmath>. Not covered: warp intrinsics, atomics,
// concurrency between blocks.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <numeric>
#include <random>
#include <vector>

#define FASTSSL_HOST_EMULATION 1

namespace fastssl_emulation {

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
#define __launch_bounds__(threads)
#define __shared__ static
#define FASTSSL_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(fastssl_emulation::dynamic_shared.data())
