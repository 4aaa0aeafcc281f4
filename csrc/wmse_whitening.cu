// W-MSE whitening of all sub-batches in one launch: one thread block per sub-batch.
//
// Block s gathers its w rows X = x[index[s, :]] (w x d) and computes, in fp32,
//
//   mean      m = 1/w Σ_r X_r
//   cov       Σ = X_cᵀ X_c / (w - 1),            X_c = X - 1 mᵀ
//   factor    (1 - eps) Σ + eps I = L Lᵀ         (right-looking Cholesky)
//   inverse   W = L⁻¹                            (right-looking forward substitution on I)
//   output    Z = X_c Wᵀ                         (whitened: Zᵀ Z / (w - 1) = I when eps = 0)
//
// and writes Z, W (the whitening matrix, which the backward needs: it is computed in batched
// PyTorch from W and Z by fastssl.kernels.wmse_cuda), m and Σ (for the running statistics).
// W = L⁻¹ is formed explicitly, as lightly does (`solve_triangular(L, I)`), because it turns
// the whitening and the backward into plain products.
//
// Where the factor lives. A d x d fp32 factor is 256 KB at d = 256, more than the 227 KB of
// shared memory an H100 block can have, so the launcher keeps it in shared memory (row pitch
// ≡ 1 mod 32, so that column walks hit distinct banks) when d·pitch·4 bytes fit — d <= 224 on
// an H100 (pitch 225) — and otherwise factors it in place in the block's slice of the W output (global
// memory; 256 KB per block stays in L2). The code is the same; only the pointer and the pitch
// differ.
//
// Covariance and whitening are 64 x 64-tiled products (256 threads, 4 x 4 outputs each,
// reduction chunks of 16 staged in shared memory); the covariance computes only the tiles on
// and below the diagonal, the whitening only the reduction range where W is non-zero.
//
// Cost per sub-batch (FMA = 2 FLOP):  mean w·d;  covariance w·d(d+1);  Cholesky d³/3;
// inverse d³/3;  whitening w·d(d+1).  Total ≈ 2·w·d² + 2/3·d³.  Bytes (minimum): read the
// w·d rows (4 B) and w int64 indices, write Z (w·d), W and Σ (2·d²) and m (d).
// DESIGN's shape, d = 128, w = 256, 4 sub-batches x 2 views (S = 8 blocks):
//   FLOPs  8 · (2·256·128² + 2/3·128³) ≈ 78 MFLOP  -> 1.3 µs at 60 TFLOP/s (fp32, all SMs)
//   bytes  8 · (2·256·128 + 2·128²) · 4 ≈ 3.1 MB     -> 1.0 µs at 3 TB/s
// so the machine-wide roofline floor is ≈ 1.3 µs. Eight blocks occupy 8 of 132 SMs, so the
// per-SM floor is what binds: 9.8 MFLOP per block at 60/132 TFLOP/s ≈ 22 µs, plus the
// ≈ 5·d = 640 dependent barrier steps of the factorization and inversion (≈ 0.05-0.1 µs
// each): the prediction is 50-100 µs for the forward, against lightly's loop of 8 x (≈ 8
// launches + a cuSOLVER factorization + a host synchronization), ≈ 1 ms.
//
// The file compiles with nvcc, and as C++ under FASTSSL_HOST_EMULATION (host_emulation.h),
// which runs the kernel's blocks on the CPU with one fiber per CUDA thread for the tests.

#ifndef FASTSSL_HOST_EMULATION
#include <cuda_runtime.h>
#endif

#include <cstddef>
#include <cstdint>

#include "wmse_whitening.h"

#ifndef FASTSSL_DYNAMIC_SHARED
#define FASTSSL_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif

namespace fastssl_wmse {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 64;            // output tile edge of the tiled products
constexpr int kChunk = 16;           // reduction chunk staged in shared memory
constexpr int kTilePitch = kTile + 1;
constexpr int kMicro = kTile / 16;   // 16 x 16 threads, kMicro x kMicro outputs each

// Row pitch of a shared-memory factor: ≡ 1 (mod 32), so that a[i * pitch + j] for consecutive
// i (a column walk) falls in consecutive banks.
__host__ __device__ inline int shared_factor_pitch(int d) { return ((d + 31) / 32) * 32 + 1; }

// Dynamic shared memory, in floats: two staged chunks, the mean and a column buffer, and the
// factor when it lives there.
__host__ __device__ inline size_t shared_floats(int d, bool factor_in_shared) {
  size_t n = 2 * static_cast<size_t>(kChunk) * kTilePitch + 2 * static_cast<size_t>(d);
  if (factor_in_shared) n += static_cast<size_t>(d) * shared_factor_pitch(d);
  return n;
}

// acc[i][j] = Σ_{k < k_end} A(ty + 16 i, k) · B(tx + 16 j, k) for the 64 x 64 tile, with
// load_a(m, k) / load_b(n, k) returning 0 outside the operand. kKFast* picks the staging
// order so that consecutive threads read consecutive addresses of the operand in memory
// (k-fast for row-major operands indexed (m, k), m-fast for those indexed (k, m)).
template <bool kKFastA, bool kKFastB, typename LoadA, typename LoadB>
__device__ __forceinline__ void tile_product(float (&acc)[kMicro][kMicro], int k_end, const LoadA& load_a,
                                             const LoadB& load_b, float* tile_a, float* tile_b) {
  const int tx = threadIdx.x % 16;
  const int ty = threadIdx.x / 16;
  for (int i = 0; i < kMicro; ++i)
    for (int j = 0; j < kMicro; ++j) acc[i][j] = 0.f;
  for (int k0 = 0; k0 < k_end; k0 += kChunk) {
    for (int e = threadIdx.x; e < kChunk * kTile; e += kThreads) {
      const int ka = kKFastA ? e % kChunk : e / kTile;
      const int ma = kKFastA ? e / kChunk : e % kTile;
      tile_a[ka * kTilePitch + ma] = (k0 + ka < k_end) ? load_a(ma, k0 + ka) : 0.f;
      const int kb = kKFastB ? e % kChunk : e / kTile;
      const int nb = kKFastB ? e / kChunk : e % kTile;
      tile_b[kb * kTilePitch + nb] = (k0 + kb < k_end) ? load_b(nb, k0 + kb) : 0.f;
    }
    __syncthreads();
#pragma unroll 4
    for (int kk = 0; kk < kChunk; ++kk) {
      float av[kMicro], bv[kMicro];
      for (int i = 0; i < kMicro; ++i) av[i] = tile_a[kk * kTilePitch + ty + 16 * i];
      for (int j = 0; j < kMicro; ++j) bv[j] = tile_b[kk * kTilePitch + tx + 16 * j];
      for (int i = 0; i < kMicro; ++i)
        for (int j = 0; j < kMicro; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }
}

__global__ void __launch_bounds__(kThreads) whiten_kernel(const Params p) {
  FASTSSL_DYNAMIC_SHARED(float, pool);
  __shared__ int status;  // 0, or the 1-based index of the first non-positive pivot

  const int d = p.d;
  const int w = p.w;
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int tx = tid % 16;
  const int ty = tid / 16;
  const int64_t s = blockIdx.x;
  const int64_t dd = static_cast<int64_t>(d) * d;
  const int64_t* rows = p.index + s * w;

  float* tile_a = pool;
  float* tile_b = tile_a + kChunk * kTilePitch;
  float* mean = tile_b + kChunk * kTilePitch;
  float* column = mean + d;
  float* a;  // the factor, then its inverse (lower triangle; the upper one is never read)
  int lda;
  if (p.factor_in_shared) {
    a = column + d;
    lda = shared_factor_pitch(d);
  } else {
    a = p.w_inv + s * dd;
    lda = d;
  }
  auto x_at = [&](int r, int c) -> float { return p.x[rows[r] * p.x_row_stride + c * p.x_col_stride]; };

  // ---- mean (four partial sums: shorter dependency chains, smaller rounding error) ----
  if (tid == 0) status = 0;
  for (int c = tid; c < d; c += kThreads) {
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
    int r = 0;
    for (; r + 3 < w; r += 4) {
      s0 += x_at(r, c);
      s1 += x_at(r + 1, c);
      s2 += x_at(r + 2, c);
      s3 += x_at(r + 3, c);
    }
    for (; r < w; ++r) s0 += x_at(r, c);
    const float m = ((s0 + s1) + (s2 + s3)) / static_cast<float>(w);
    mean[c] = m;
    p.mean[s * d + c] = m;
  }
  __syncthreads();

  // ---- covariance, tiles on and below the diagonal; shrunk copy into the factor ----
  const float denom = static_cast<float>(w - 1);
  for (int b0 = 0; b0 < d; b0 += kTile) {
    for (int a0 = b0; a0 < d; a0 += kTile) {
      float acc[kMicro][kMicro];
      tile_product<false, false>(
          acc, w,
          [&](int m, int k) { const int c = a0 + m; return c < d ? x_at(k, c) - mean[c] : 0.f; },
          [&](int n, int k) { const int c = b0 + n; return c < d ? x_at(k, c) - mean[c] : 0.f; },
          tile_a, tile_b);
      for (int i = 0; i < kMicro; ++i) {
        const int row = a0 + ty + 16 * i;
        for (int j = 0; j < kMicro; ++j) {
          const int col = b0 + tx + 16 * j;
          if (row < d && col <= row) {
            const float c = acc[i][j] / denom;
            a[row * lda + col] = p.one_minus_eps * c + (row == col ? p.eps : 0.f);
            p.cov[s * dd + static_cast<int64_t>(row) * d + col] = c;
            p.cov[s * dd + static_cast<int64_t>(col) * d + row] = c;
          }
        }
      }
    }
  }
  __syncthreads();

  // ---- Cholesky, right-looking: pivot, scale the column, rank-1 update of the trailing part ----
  for (int j = 0; j < d; ++j) {
    if (tid == 0) {
      const float pivot = a[j * lda + j];
      if (!(pivot > 0.f)) status = j + 1;  // also catches NaN
      a[j * lda + j] = sqrtf(pivot);
    }
    __syncthreads();
    if (status != 0) break;  // the same shared value for every thread: a uniform exit
    const float diag = a[j * lda + j];
    for (int i = j + 1 + tid; i < d; i += kThreads) a[i * lda + j] /= diag;
    __syncthreads();
    for (int i = j + 1 + warp; i < d; i += kWarps) {
      const float l_ij = a[i * lda + j];
      for (int k = j + 1 + lane; k <= i; k += 32) a[i * lda + k] -= l_ij * a[k * lda + j];
    }
    __syncthreads();
  }

  if (status != 0) {
    // Not positive-definite (or a non-finite input): every output of the block is NaN and
    // info says which pivot failed; the host turns that into an error (or NaN propagation).
    const float nan = nanf("");
    for (int64_t e = tid; e < static_cast<int64_t>(w) * d; e += kThreads) p.z[s * w * d + e] = nan;
    for (int64_t e = tid; e < dd; e += kThreads) p.w_inv[s * dd + e] = nan;
    if (tid == 0) p.info[s] = status;
    return;
  }

  // ---- W = L⁻¹ in place. Solving L W = I row by row, right-looking: at step i row i of the
  // remaining right-hand side is divided by L_ii (it becomes W's row i) and subtracted, times
  // L_ri, from every row r > i. Slot (r, c) holds L_rc until step c consumes it, then the
  // right-hand side R_rc, then W_rc. ----
  for (int i = 0; i < d; ++i) {
    const float pivot = a[i * lda + i];  // read by all before thread 0 rewrites it below
    for (int r = i + 1 + tid; r < d; r += kThreads) column[r] = a[r * lda + i];
    for (int c = tid; c < i; c += kThreads) a[i * lda + c] /= pivot;
    __syncthreads();
    const float inv_pivot = 1.f / pivot;
    for (int r = i + 1 + warp; r < d; r += kWarps) {
      const float l_ri = column[r];
      for (int c = lane; c < i; c += 32) a[r * lda + c] -= l_ri * a[i * lda + c];
      if (lane == 0) a[r * lda + i] = -l_ri * inv_pivot;  // R_ri was 0, W_ii = 1 / L_ii
    }
    if (tid == 0) a[i * lda + i] = inv_pivot;
    __syncthreads();
  }

  // ---- Z = X_c Wᵀ: Z[r][c] = Σ_{k <= c} X_c[r][k] W[c][k] ----
  for (int r0 = 0; r0 < w; r0 += kTile) {
    for (int c0 = 0; c0 < d; c0 += kTile) {
      const int k_end = (c0 + kTile < d) ? c0 + kTile : d;
      float acc[kMicro][kMicro];
      tile_product<true, true>(
          acc, k_end,
          [&](int m, int k) { const int r = r0 + m; return r < w ? x_at(r, k) - mean[k] : 0.f; },
          [&](int n, int k) { const int c = c0 + n; return (c < d && k <= c) ? a[c * lda + k] : 0.f; },
          tile_a, tile_b);
      for (int i = 0; i < kMicro; ++i) {
        const int r = r0 + ty + 16 * i;
        for (int j = 0; j < kMicro; ++j) {
          const int c = c0 + tx + 16 * j;
          if (r < w && c < d) p.z[(s * w + r) * d + c] = acc[i][j];
        }
      }
    }
  }

  // ---- W out: the lower triangle (copied from shared memory, or already in place), zeros above ----
  for (int64_t e = tid; e < dd; e += kThreads) {
    const int row = static_cast<int>(e / d);
    const int col = static_cast<int>(e % d);
    if (col > row) {
      p.w_inv[s * dd + e] = 0.f;
    } else if (p.factor_in_shared) {
      p.w_inv[s * dd + e] = a[row * lda + col];
    }
  }
  if (tid == 0) p.info[s] = 0;
}

#ifndef FASTSSL_HOST_EMULATION

const char* launch_whiten(const Params& params, bool allow_shared_factor, void* stream) {
  if (params.num_blocks == 0) return nullptr;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  int max_shared = 0;
  err = cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return cudaGetErrorString(err);

  Params p = params;
  // Margin for the static `status` word and alignment.
  const size_t static_margin = 64;
  size_t bytes = shared_floats(p.d, true) * sizeof(float);
  p.factor_in_shared = allow_shared_factor && bytes + static_margin <= static_cast<size_t>(max_shared);
  if (!p.factor_in_shared) bytes = shared_floats(p.d, false) * sizeof(float);
  if (bytes > 48 * 1024) {
    err = cudaFuncSetAttribute(whiten_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    if (err != cudaSuccess) return cudaGetErrorString(err);
  }
  whiten_kernel<<<static_cast<unsigned>(p.num_blocks), kThreads, bytes, static_cast<cudaStream_t>(stream)>>>(p);
  err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

#endif  // FASTSSL_HOST_EMULATION

}  // namespace fastssl_wmse
