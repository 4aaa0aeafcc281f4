// W-MSE (Ermolov et al. 2021, "Whitening for Self-Supervised Representation Learning"):
// Cholesky whitening of every sub-batch and the normalized MSE between views, forward and
// backward, in five launches (six when w_iter > 1), all deterministic (fixed reduction orders;
// the one atomic is a ticket counter, not an accumulation).
//
// Notation per sub-batch s (w rows X of x, d features): m = mean, X_c = X - 1 mᵀ,
// Σ = X_cᵀ X_c / (w - 1), (1-ε) Σ + ε I = L Lᵀ = L₁ D L₁ᵀ (L₁ unit lower, D diagonal),
// W = L⁻¹ = D^{-1/2} L₁⁻¹, Z = X_c Wᵀ.
//
// Forward
//   1. gram_kernel<0>   grid S x 2 x T (T lower 32 x 32 tiles of the d x d covariance, 2 halves
//                       of the w rows): each block computes its 64 column means over the w
//                       rows (two-pass: exact centering, no E[x²] - m² cancellation), then its
//                       tile of X_cᵀ X_c over its half of the rows (half 1 into W's buffer).
//   2. factor_kernel    grid S: the two halves added (the covariance written back); LDLᵀ elimination of the shrunk covariance with the inverse
//                       built in the same sweep (the row operations applied to [A | I]), one
//                       barrier per column; W = D^{-1/2} L₁⁻¹ written out.
//   3. whiten_kernel    grid (S / V) x ceil(w / 4): the 4 rows of one sub-batch position in
//                       all V views: Z = X_c Wᵀ, then (loss) row norms, cosines between views,
//                       the loss gradient G = ∂ℓ/∂Z (so the backward needs no loss pass), and
//                       the loss from per-block partial sums, added in block order by the last
//                       block to finish.
// Backward (g = upstream gradient, c = 2(1-ε)/(w-1), Gc, Zc the column-centered G and Z)
//   4. gram_kernel<1>   grid S x 2 x T (halves as in 1, added by 5 when it stages S'): column means of G and Z; S' = c · sym(-tril(Gcᵀ Zc)), the
//                       path through Σ: Lᵀ∂ℓ/∂L = -Gᵀ Z and Cholesky's backward (Murray 2016)
//                       gives ∂ℓ/∂Σ = Wᵀ S W, S = ½(P + tril(P,-1)ᵀ), P = tril(-Gᵀ Z).
//   5. row_gradient_kernel  grid S x ceil(w / 8): ∂ℓ/∂x_rows = g ((Gc + Zc S') W), written
//                       straight into the input-dtype gradient (each input row lies in exactly
//                       one sub-batch per iteration), or per iteration into (w_iter, N, d)
//   6. sum_iterations_kernel (w_iter > 1 only): the w_iter slices added in order.
//
// The file compiles with nvcc, and as C++ under FASTSSL_HOST_EMULATION (host_emulation.h),
// which runs every block on the CPU with one fiber per CUDA thread for the tests. The cost model
// and the predicted H200 times are in kernels/wmse_cuda.py's docstring.

#ifndef FASTSSL_HOST_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <climits>
#include <cstddef>
#include <cstdint>

#include "wmse_whitening.h"

#ifndef FASTSSL_DYNAMIC_SHARED
#define FASTSSL_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif

namespace fastssl_wmse {

#ifdef FASTSSL_HOST_EMULATION
using half_t = fastssl_emulation::Half;
using bf16_t = fastssl_emulation::BFloat16;
#else
using half_t = __half;
using bf16_t = __nv_bfloat16;
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(half_t v) { return __half2float(v); }
__device__ __forceinline__ float to_float(bf16_t v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ half_t from_float<half_t>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ bf16_t from_float<bf16_t>(float v) { return __float2bfloat16_rn(v); }
#endif

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kGramRows = 128;                // rows of x staged per step of the Gram kernel
constexpr int kGramPitch = kGramTile + 4;     // float4-aligned rows
constexpr int kKUnroll = 16;                  // reduction steps unrolled in the row kernels
constexpr float kNormalizeEps = 1e-12f;       // F.normalize's clamp of the norm

__host__ __device__ inline int imin(int a, int b) { return a < b ? a : b; }
__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__host__ __device__ inline int gram_tiles(int d) {
  const int edge = static_cast<int>(ceil_div(d, kGramTile));
  return edge * (edge + 1) / 2;
}
__host__ __device__ inline int row_tiles(int w) { return (w + kRowTile - 1) / kRowTile; }
__host__ __device__ inline int whiten_tiles(int w) { return (w + kWhitenRowTile - 1) / kWhitenRowTile; }
// Row norms and dot products between views of the whitening kernel's rows, one warp each.
__host__ __device__ inline int loss_tasks(int views) { return kWhitenRowTile * (views + views * (views - 1) / 2); }

// Rows of the d x d operand a row kernel stages at once: all of them for d <= 128 (one L2
// round trip per operand), 64 (66 KB) for larger d.
__host__ __device__ inline int chunk_rows(int d) { return d <= 128 ? (d + kKUnroll - 1) / kKUnroll * kKUnroll : 64; }

// Dynamic shared memory of the row kernels, in floats: the tile_rows rows k-major (padded to
// 128 * cols), a staged chunk of the d x d operand, and for the loss the rows of every view
// and the per-warp partial dot products.
__host__ __device__ inline size_t row_kernel_floats(int tile_rows, int cols, int d, int views, bool loss) {
  size_t n = static_cast<size_t>(128) * cols * tile_rows + static_cast<size_t>(chunk_rows(d)) * (128 * cols + 1);
  if (loss) n += static_cast<size_t>(views) * tile_rows * d + static_cast<size_t>(loss_tasks(views)) * 33;
  return n;
}

// Row r of sub-batch s in x (see Blocks in the header). 32-bit divisions (the launcher keeps S
// below 2^31): a 64-bit one is a slow subroutine call.
__device__ __forceinline__ int64_t block_row(const Blocks& b, int s, int r) {
  const int group = s / b.views;
  const int v = s - group * b.views;
  const int it = group / b.chunks;
  const int ch = group - it * b.chunks;
  return b.perms[it * b.perm_len + static_cast<int64_t>(ch) * b.w + r] + v * b.view_offset;
}

// ---------------------------------------------------------------------------------------------
// 1 and 4: lower tiles of a Gram matrix of column-centered operands over the w rows of a block
// ---------------------------------------------------------------------------------------------

struct GramArgs {
  Blocks blocks;
  const void* x;           // mode 0: both operands are the rows of x
  int64_t x_row_stride;
  int64_t x_col_stride;
  const float* a;          // mode 1: (S, w, d) dense operands (G and Z)
  const float* b;
  float* mean_a;           // (S, d) column means of A, written by the diagonal tiles
  float* mean_b;           // (S, d) column means of B (mode 1), or nullptr
  float* out;              // (S, d, d): scale * (A_cᵀ B_c) over the first half of the rows, on
                           // and below the diagonal, mirrored
  float* out_second;       // (S, d, d): the same over the second half (the consumer adds them)
  float scale_diagonal;
  float scale_off_diagonal;
};

// The w rows of a sub-batch are split in kGramHalves parts, one block each (so that the
// headline shape fills the 132 SMs); part h writes its partial Gram to out (h = 0) or
// out_second (h = 1), and the consumer adds out + out_second, in that order.
constexpr int kGramHalves = 2;
__host__ __device__ inline int gram_blocks_per_subbatch(int d) { return gram_tiles(d) * kGramHalves; }

// Block (s, half, tile): tile (ib, kb), ib >= kb, covers out[32 ib + i][32 kb + k]. Lane k owns
// column 32 kb + k of B and accumulates 32 outputs, one per column of A; each warp takes 16 of
// every 128 staged rows, and the 8 warps' partial tiles are added in warp order.
template <int kMode, typename T>
__global__ void __launch_bounds__(kThreads, 1) gram_kernel(const GramArgs g) {
  __shared__ __align__(16) float stage[2 * kGramRows * kGramPitch];
  __shared__ float partial[kWarps][2][kGramTile];
  __shared__ float column_mean[2][kGramTile];

  const Blocks& bl = g.blocks;
  const int d = bl.d;
  const int w = bl.w;
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int tiles = gram_tiles(d);
  const int s = static_cast<int>(blockIdx.x) / (tiles * kGramHalves);
  const int half = static_cast<int>(blockIdx.x) % (tiles * kGramHalves) / tiles;
  int t = static_cast<int>(blockIdx.x) % tiles;
  const int half_rows = (w + kGramHalves - 1) / kGramHalves;
  const int row_begin = half * half_rows;
  const int row_end = imin(w, row_begin + half_rows);
  int ib = 0;
  while (t > ib) {  // lower tiles in row-major order: (0,0), (1,0), (1,1), (2,0), ...
    t -= ib + 1;
    ++ib;
  }
  const int kb = t;
  const int col_a = ib * kGramTile + lane;
  const int col_b = kb * kGramTile + lane;

  auto load = [&](int operand, int r, int c) -> float {
    if constexpr (kMode == 0) {
      const T* x = static_cast<const T*>(g.x);
      return to_float(x[block_row(bl, s, r) * g.x_row_stride + static_cast<int64_t>(c) * g.x_col_stride]);
    } else {
      const float* m = operand == 0 ? g.a : g.b;
      return m[(s * w + r) * static_cast<int64_t>(d) + c];
    }
  };

  // ---- pass 1: column means (the same code for a column as A or as B operand, so every tile
  // centers a column with the same rounded mean) ----
  float sum_a = 0.f, sum_b = 0.f;
  for (int r = warp; r < w; r += kWarps) {
    if (col_a < d) sum_a += load(0, r, col_a);
    if (col_b < d) sum_b += load(1, r, col_b);
  }
  partial[warp][0][lane] = sum_a;
  partial[warp][1][lane] = sum_b;
  __syncthreads();
  if (tid < 2 * kGramTile) {
    const int operand = tid / kGramTile;
    const int l = tid % kGramTile;
    float total = 0.f;
    for (int k = 0; k < kWarps; ++k) total += partial[k][operand][l];
    const float m = total / static_cast<float>(w);
    column_mean[operand][l] = m;
    const int c = (operand == 0 ? ib : kb) * kGramTile + l;
    float* out_mean = operand == 0 ? g.mean_a : g.mean_b;
    if (half == 0 && ib == kb && c < d && out_mean != nullptr) out_mean[s * d + c] = m;
  }
  __syncthreads();

  // ---- pass 2: the centered product ----
  float acc[kGramTile];
#pragma unroll
  for (int i = 0; i < kGramTile; ++i) acc[i] = 0.f;
  float* stage_a = stage;
  float* stage_b = stage + kGramRows * kGramPitch;
  const float mean_a = column_mean[0][lane];
  const float mean_b = column_mean[1][lane];
  constexpr int kRowsPerWarp = kGramRows / kWarps;
  for (int r0 = row_begin; r0 < row_end; r0 += kGramRows) {
    for (int rr = warp; rr < kGramRows; rr += kWarps) {
      const int r = r0 + rr;
      stage_a[rr * kGramPitch + lane] = (r < row_end && col_a < d) ? load(0, r, col_a) - mean_a : 0.f;
      stage_b[rr * kGramPitch + lane] = (r < row_end && col_b < d) ? load(1, r, col_b) - mean_b : 0.f;
    }
    __syncthreads();
    const int rows_here = imin(kGramRows, row_end - r0);
    for (int rr = warp * kRowsPerWarp; rr < (warp + 1) * kRowsPerWarp && rr < rows_here; ++rr) {
      const float bv = stage_b[rr * kGramPitch + lane];
      const float4* a_row = reinterpret_cast<const float4*>(stage_a + rr * kGramPitch);
#pragma unroll
      for (int i4 = 0; i4 < kGramTile / 4; ++i4) {
        const float4 av = a_row[i4];  // the same address in every lane: a broadcast
        acc[4 * i4 + 0] = fmaf(av.x, bv, acc[4 * i4 + 0]);
        acc[4 * i4 + 1] = fmaf(av.y, bv, acc[4 * i4 + 1]);
        acc[4 * i4 + 2] = fmaf(av.z, bv, acc[4 * i4 + 2]);
        acc[4 * i4 + 3] = fmaf(av.w, bv, acc[4 * i4 + 3]);
      }
    }
    __syncthreads();
  }

  // ---- the 8 warps' tiles added in warp order (the staging buffers hold them now) ----
  float* per_warp = stage;  // kWarps x 32 x 32 <= 2 x kGramRows x kGramPitch floats
#pragma unroll
  for (int i = 0; i < kGramTile; ++i) per_warp[(warp * kGramTile + i) * kGramTile + lane] = acc[i];
  __syncthreads();
  const int64_t dd = static_cast<int64_t>(d) * d;
  for (int e = tid; e < kGramTile * kGramTile; e += kThreads) {
    const int i = e / kGramTile;
    const int k = e % kGramTile;
    const int ci = ib * kGramTile + i;
    const int ck = kb * kGramTile + k;
    if (ci >= d || ck >= d || (ib == kb && i < k)) continue;
    float total = 0.f;
    for (int wp = 0; wp < kWarps; ++wp) total += per_warp[(wp * kGramTile + i) * kGramTile + k];
    const float value = total * (ci == ck ? g.scale_diagonal : g.scale_off_diagonal);
    float* out = half == 0 ? g.out : g.out_second;
    out[s * dd + static_cast<int64_t>(ci) * d + ck] = value;
    out[s * dd + static_cast<int64_t>(ck) * d + ci] = value;
  }
}

// ---------------------------------------------------------------------------------------------
// 2: factorization and inverse in one sweep
// ---------------------------------------------------------------------------------------------

struct FactorArgs {
  float* cov;              // (S, d, d): in, the Gram of the first half of the rows; out, the covariance
  float* w_inv;            // (S, d, d): in, the Gram of the second half; out, W
  float* square;           // memory mode: (S, d, d) global scratch, unless in shared memory
  int square_in_shared;    // memory mode: the d x d square lives in dynamic shared memory
  int square_pitch;        // its row pitch in shared memory
  int* info;               // (S,)
  unsigned* counter;       // zeroed here for the loss kernel's ticket
  int d;
  float one_minus_eps;
  float eps;
};

// Row pitch of a shared-memory square: ≡ 16 (mod 32), so that the two rows a warp touches
// (ti, ti + 1, 16 consecutive columns each) fall in disjoint bank halves.
__host__ __device__ inline int square_pitch(int d) { return static_cast<int>(ceil_div(d, 32)) * 32 + 16; }

// One block per sub-batch; thread (ti, tk) = (tid / 16, tid % 16) owns the positions
// (r, c) = (ti + 16 p, tk + 16 q), p, q < kP, of a d x d square that holds the elimination of
// [A | I] for A = (1-ε) Σ + ε I:
//   * on and below the diagonal, A's Schur complements: at step j, for r >= c > j,
//       A[r][c] -= A[r][j] A[c][j] / A[j][j];
//     A[j][j] is then the pivot D_j, and the column below it is left as it was at step j;
//   * above the diagonal, M = L₁⁻¹ transposed: position (r, c), r < c, holds M[c][r]; the same
//     row operations on the identity give, for c > j, M[c][r] -= (A[c][j] / A[j][j]) M[j][r]
//     (r < j), and M[c][j] = -A[c][j] / A[j][j].
// Both are one rank-1 update of the square with the column j of the square itself (A[r][j]
// below the diagonal, M[j][r] above it): sq[r][c] -= a_r f_c with f_c = v_c / v_j for c > j
// (else 0), a_r = v_r on lower positions, and on upper positions v_r (r < j), 1 (r = j, which
// writes -f_c into the zero M[c][j]) or 0 (r > j). Column j + 1 is published to shared memory
// by its owners after their update; one barrier per column. kRegisters: the square lives in
// registers (d <= 16 kP <= 128); otherwise in shared or global memory (d <= 256, kP = 16).
template <int kP, bool kRegisters>
__global__ void __launch_bounds__(kThreads, 1) factor_kernel(const FactorArgs f) {
  FASTSSL_DYNAMIC_SHARED(float, pool);
  __shared__ float column[2][kMaxDim];
  __shared__ float inv_sqrt_pivot[kMaxDim];

  const int d = f.d;
  const int tid = threadIdx.x;
  const int ti = tid / 16;
  const int tk = tid % 16;
  const int s = blockIdx.x;
  const int64_t dd = static_cast<int64_t>(d) * d;
  float* cov = f.cov + s * dd;
  const float* cov_second = f.w_inv + s * dd;  // read here, overwritten with W after the sweep

  float reg[kRegisters ? kP : 1][kRegisters ? kP : 1];
  float* square = nullptr;
  int pitch = d;
  if constexpr (!kRegisters) {
    square = f.square_in_shared ? pool : f.square + s * dd;
    pitch = f.square_in_shared ? f.square_pitch : d;
  }
  // Memory mode stores only the d x d positions; register mode keeps the padding (zeros).
  auto inside = [&](int p, int q) { return kRegisters || (ti + 16 * p < d && tk + 16 * q < d); };
  auto at = [&](int p, int q) -> float& {
    if constexpr (kRegisters) {
      return reg[p][q];
    } else {
      return square[(ti + 16 * p) * pitch + tk + 16 * q];
    }
  };

  for (int i = tid; i < 2 * kMaxDim; i += kThreads) column[i / kMaxDim][i % kMaxDim] = 0.f;
#pragma unroll
  for (int p = 0; p < kP; ++p) {
#pragma unroll
    for (int q = 0; q < kP; ++q) {
      if (!inside(p, q)) continue;
      const int r = ti + 16 * p;
      const int c = tk + 16 * q;
      float value = 0.f;
      if (r < d && c < d) {
        // The two halves of the Gram kernel added in a fixed order; the sum is the covariance
        // returned to the caller (this thread is the only reader and writer of (r, c)).
        const int64_t e = static_cast<int64_t>(r) * d + c;
        const float sigma = cov[e] + cov_second[e];
        cov[e] = sigma;
        if (r >= c) value = f.one_minus_eps * sigma + (r == c ? f.eps : 0.f);
      }
      at(p, q) = value;
    }
  }
  if (s == 0 && tid == 0) *f.counter = 0u;
  __syncthreads();
  if (tk == 0) {  // column 0, by its owners
#pragma unroll
    for (int p = 0; p < kP; ++p) {
      const int r = ti + 16 * p;
      if (r < d) column[0][r] = at(p, 0);
    }
  }
  __syncthreads();

  int failed = 0;
  for (int j = 0; j < d; ++j) {
    const float* v = column[j & 1];
    const float pivot = v[j];
    if (!(pivot > 0.f)) {  // also NaN; the same shared value in every thread: a uniform exit
      failed = j + 1;
      break;
    }
    const float inv_pivot = 1.f / pivot;
    if constexpr (!kRegisters) {
      // The same update on a square in memory, the operands read from the column as needed.
      for (int q = 0; q < kP; ++q) {
        const int c = tk + 16 * q;
        if (c >= d) break;
        if (c <= j) continue;
        const float f_c = v[c] * inv_pivot;
        for (int p = 0; p < kP; ++p) {
          const int r = ti + 16 * p;
          if (r >= d) break;
          float a;
          if (r >= c || r < j) {
            a = v[r];
          } else if (r == j) {
            a = 1.f;
          } else {
            continue;
          }
          at(p, q) = fmaf(-a, f_c, at(p, q));
        }
      }
    } else {
      float lower_a[kP], upper_a[kP], f_c[kP];
#pragma unroll
      for (int p = 0; p < kP; ++p) {
        const int r = ti + 16 * p;
        lower_a[p] = v[r];
        upper_a[p] = r < j ? lower_a[p] : (r == j ? 1.f : 0.f);
      }
#pragma unroll
      for (int q = 0; q < kP; ++q) {
        const int c = tk + 16 * q;
        f_c[q] = c > j ? v[c] * inv_pivot : 0.f;
      }
#pragma unroll
      for (int q = 0; q < kP; ++q) {
        if (16 * q + 15 <= j) continue;  // f = 0 on the whole column block (uniform)
#pragma unroll
        for (int p = 0; p < kP; ++p) {
          if (!inside(p, q)) continue;
          if (p > q) {  // below the diagonal
            at(p, q) = fmaf(-lower_a[p], f_c[q], at(p, q));
          } else if (p < q) {  // above
            if (16 * p > j) continue;  // upper_a = 0 on the whole row block (uniform)
            at(p, q) = fmaf(-upper_a[p], f_c[q], at(p, q));
          } else {
            const float a = ti >= tk ? lower_a[p] : upper_a[p];
            at(p, q) = fmaf(-a, f_c[q], at(p, q));
          }
        }
      }
    }  // kRegisters
    const int next = j + 1;
    if (next < d && tk == (next & 15)) {
      const int q_next = next >> 4;
#pragma unroll
      for (int q = 0; q < kP; ++q) {
        if (q != q_next) continue;
#pragma unroll
        for (int p = 0; p < kP; ++p) {
          const int r = ti + 16 * p;
          if (r < d) column[next & 1][r] = at(p, q);
        }
      }
    }
    __syncthreads();
  }

  float* w_out = f.w_inv + s * dd;
  if (failed != 0) {
    // Not positive-definite (or a non-finite input): W is NaN, so are Z and the loss; info
    // says which pivot failed (the host turns it into an error, or NaN propagation).
    for (int64_t e = tid; e < dd; e += kThreads) w_out[e] = nanf("");
    if (tid == 0) f.info[s] = failed;
    return;
  }
  if (ti == tk) {
#pragma unroll
    for (int p = 0; p < kP; ++p) {
      const int r = ti + 16 * p;
      if (r < d) inv_sqrt_pivot[r] = 1.f / sqrtf(at(p, p));  // D_r, untouched since step r
    }
  }
  __syncthreads();
  // W = D^{-1/2} M: W[c][r] = M[c][r] / sqrt(D_c) from the upper position (r, c); zeros above W's
  // diagonal from the lower positions.
#pragma unroll
  for (int p = 0; p < kP; ++p) {
#pragma unroll
    for (int q = 0; q < kP; ++q) {
      const int r = ti + 16 * p;
      const int c = tk + 16 * q;
      if (r >= d || c >= d) continue;
      float value = 0.f;
      if (r < c) {
        value = at(p, q) * inv_sqrt_pivot[c];
      } else if (r == c) {
        value = inv_sqrt_pivot[r];
      }
      w_out[static_cast<int64_t>(c) * d + r] = value;
    }
  }
  if (tid == 0) f.info[s] = 0;
}

// ---------------------------------------------------------------------------------------------
// 3: whitening of 4 rows of every view, and the normalized MSE between the views
// ---------------------------------------------------------------------------------------------

// Pair index k (in the order (0,1), (0,2), ..., (1,2), ...) -> views (a, b), a < b.
__device__ __forceinline__ void pair_views(int k, int views, int& a, int& b) {
  a = 0;
  while (k >= views - 1 - a) {
    k -= views - 1 - a;
    ++a;
  }
  b = a + 1 + k;
}
__device__ __forceinline__ int pair_index(int a, int b, int views) {  // a < b
  return a * (2 * views - a - 1) / 2 + (b - a - 1);
}

// Thread t owns columns cc + 128 j (cc = t % 128, j < kCols) of rows 2 (t / 128) and + 1 of the
// tile; the 4 rows sit k-major in shared memory (one float2 broadcast per k), the operand is
// staged 16 k at a time (its lower triangle only: W[c][k] = 0 for k > c is not read).
template <typename T, int kCols, bool kLoss>
__global__ void __launch_bounds__(kThreads, 1) whiten_kernel(const ForwardParams p) {
  FASTSSL_DYNAMIC_SHARED(float, pool);
  __shared__ int is_last;

  const Blocks& bl = p.blocks;
  const int d = bl.d;
  const int w = bl.w;
  const int views = bl.views;
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int cc = tid % 128;
  const int rh = tid / 128;
  constexpr int kThreadRows = kWhitenRowTile / 2;  // two row halves of 128 threads
  static_assert(kThreadRows == 2, "one float2 of rows per k");
  constexpr int kColumns = 128 * kCols;
  constexpr int kPitch = kColumns + 1;
  const int d16 = static_cast<int>(ceil_div(d, kKUnroll)) * kKUnroll;
  const int chunk = chunk_rows(d);
  float* rows_k = pool;                           // [k][kWhitenRowTile], k < kColumns
  float* staged = rows_k + kColumns * kWhitenRowTile;   // [kk][kPitch], kk < chunk
  float* z_rows = staged + chunk * kPitch;        // [view][kWhitenRowTile][d]
  const int tasks = loss_tasks(views);
  float* part = z_rows + static_cast<int64_t>(views) * kWhitenRowTile * d;  // [task][32]
  float* result = part + tasks * 32;              // [task]

  const int tiles = whiten_tiles(w);
  const int group = static_cast<int>(blockIdx.x) / tiles;
  const int r0 = (static_cast<int>(blockIdx.x) % tiles) * kWhitenRowTile;
  const int warp_last_column = 32 * (warp % 4) + 31 + 128 * (kCols - 1);
  const T* x = static_cast<const T*>(p.x);

  for (int v = 0; v < views; ++v) {
    const int s = group * views + v;
    const float* mean = p.mean + static_cast<int64_t>(s) * d;
    const float* w_inv = p.w_inv + s * static_cast<int64_t>(d) * d;
    for (int e = tid; e < kWhitenRowTile * d16; e += kThreads) {
      const int r = e / d16;
      const int k = e % d16;
      float value = 0.f;
      if (r0 + r < w && k < d)
        value = to_float(x[block_row(bl, s, r0 + r) * p.x_row_stride + static_cast<int64_t>(k) * p.x_col_stride]) - mean[k];
      rows_k[k * kWhitenRowTile + r] = value;
    }
    float acc[kThreadRows][kCols];
#pragma unroll
    for (int i = 0; i < kThreadRows; ++i)
#pragma unroll
      for (int j = 0; j < kCols; ++j) acc[i][j] = 0.f;
    // (No barrier between the staging of the rows and of the first chunk: one round trip.)
    for (int k0 = 0; k0 < d; k0 += chunk) {
      for (int e = tid; e < chunk * d; e += kThreads) {  // W[c][k0 + kk], k-fast: coalesced
        const int c = e / chunk;
        const int kk = e % chunk;
        staged[kk * kPitch + c] = k0 + kk < d && k0 + kk <= c ? w_inv[static_cast<int64_t>(c) * d + k0 + kk] : 0.f;
      }
      __syncthreads();
      // W[c][k] = 0 for k > c: the steps past this warp's last column add nothing.
      const int k_end = imin(imin(chunk, d16 - k0), warp_last_column + 1 - k0);
      for (int k1 = 0; k1 < k_end; k1 += kKUnroll) {
#pragma unroll
        for (int u = 0; u < kKUnroll; ++u) {
          const int kk = k1 + u;
          const float2 a = *reinterpret_cast<const float2*>(rows_k + (k0 + kk) * kWhitenRowTile + kThreadRows * rh);
#pragma unroll
          for (int j = 0; j < kCols; ++j) {
            const float b = staged[kk * kPitch + cc + 128 * j];
            acc[0][j] = fmaf(a.x, b, acc[0][j]);
            acc[1][j] = fmaf(a.y, b, acc[1][j]);
          }
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < kThreadRows; ++i) {
      const int r = kThreadRows * rh + i;
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        const int c = cc + 128 * j;
        if (r0 + r >= w || c >= d) continue;
        p.z[(static_cast<int64_t>(s) * w + r0 + r) * d + c] = acc[i][j];
        if constexpr (kLoss) z_rows[(v * kWhitenRowTile + r) * d + c] = acc[i][j];
      }
    }
  }
  if constexpr (kLoss) {
    __syncthreads();
    // Squared norms (task k < 8 V: view k / 8) and dot products between views (pairs), one
    // warp per task, lane partial sums added in lane order.
    for (int t = warp; t < tasks; t += kWarps) {
      const int r = t % kWhitenRowTile;
      const int kind = t / kWhitenRowTile;
      int va = kind, vb = kind;
      if (kind >= views) pair_views(kind - views, views, va, vb);
      const float* za = z_rows + (va * kWhitenRowTile + r) * d;
      const float* zb = z_rows + (vb * kWhitenRowTile + r) * d;
      float sum = 0.f;
      if (r0 + r < w)
        for (int c = lane; c < d; c += 32) sum = fmaf(za[c], zb[c], sum);
      part[t * 32 + lane] = sum;
    }
    __syncthreads();
    for (int t = tid; t < tasks; t += kThreads) {
      float total = 0.f;
      for (int l = 0; l < 32; ++l) total += part[t * 32 + l];
      result[t] = total;
    }
    __syncthreads();
    auto norm = [&](int v, int r) { return sqrtf(result[v * kWhitenRowTile + r]); };
    auto cosine = [&](int a, int b, int r) {  // F.normalize: x / max(|x|, 1e-12)
      const float den = fmaxf(norm(a, r), kNormalizeEps) * fmaxf(norm(b, r), kNormalizeEps);
      return result[(views + pair_index(a, b, views)) * kWhitenRowTile + r] / den;
    };
    // ∂ℓ/∂z_v = -scale Σ_{u≠v} ∂cos(z_v, z_u)/∂z_v, with ∂cos/∂z_v = (ẑ_u - cos ẑ_v) / |z_v|
    // (or ẑ_u / 1e-12 where the norm is clamped).
    for (int v = 0; v < views; ++v) {
      const int s = group * views + v;
      for (int e = tid; e < kWhitenRowTile * d; e += kThreads) {
        const int r = e / d;
        const int c = e % d;
        if (r0 + r >= w) continue;
        const float n_v = norm(v, r);
        const float den_v = fmaxf(n_v, kNormalizeEps);
        const float zv_hat = z_rows[(v * kWhitenRowTile + r) * d + c] / den_v;
        float grad = 0.f;
        for (int u = 0; u < views; ++u) {
          if (u == v) continue;
          const float zu_hat = z_rows[(u * kWhitenRowTile + r) * d + c] / fmaxf(norm(u, r), kNormalizeEps);
          const float cos = v < u ? cosine(v, u, r) : cosine(u, v, r);
          grad += n_v > kNormalizeEps ? (zu_hat - cos * zv_hat) / n_v : zu_hat / kNormalizeEps;
        }
        p.grad_z[(static_cast<int64_t>(s) * w + r0 + r) * d + c] = -p.loss_scale * grad;
      }
    }
    if (tid == 0) {
      float block_sum = 0.f;
      for (int r = 0; r < kWhitenRowTile && r0 + r < w; ++r)
        for (int k = 0; k < views * (views - 1) / 2; ++k) {
          int a, b;
          pair_views(k, views, a, b);
          block_sum += cosine(a, b, r);
        }
      p.partials[blockIdx.x] = block_sum;
      __threadfence();  // the partial is visible before the ticket is taken
      is_last = atomicAdd(p.counter, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (is_last) {  // uniform: the last block adds the partials in block order
      const volatile float* partials = p.partials;
      float sum = 0.f;
      for (unsigned i = tid; i < gridDim.x; i += kThreads) sum += partials[i];
      part[tid] = sum;
      __syncthreads();
      for (int stride = kThreads / 2; stride > 0; stride /= 2) {
        if (tid < stride) part[tid] += part[tid + stride];
        __syncthreads();
      }
      if (tid == 0) {
        int failed = 0;
        for (int64_t b = 0; b < bl.num_blocks; ++b) failed |= p.info[b] != 0;
        *p.loss = failed ? nanf("") : 2.f - p.loss_scale * part[0];
        *p.counter = 0u;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 5, 6: row gradients
// ---------------------------------------------------------------------------------------------

// acc[i][j] += Σ_k rows_k[k][4 rh + i] · B[k][cc + 128 j] over k in [k_begin, d), B[k][c] = op[k * d + c]
// (+ op_second[k * d + c] when op_second is not null: the two halves of a Gram, added in that
// order) staged 16 k at a time (c-fast: coalesced). Chunks that end before `skip_below` are
// skipped (zero for this warp's columns).
template <int kCols>
__device__ __forceinline__ void rows_times_matrix(float (&acc)[4][kCols], const float* rows_k, float* staged,
                                                  const float* op, const float* op_second, int d,
                                                  int skip_below) {
  constexpr int kPitch = 128 * kCols + 1;
  const int cc = threadIdx.x % 128;
  const int rh = threadIdx.x / 128;
  const int chunk = chunk_rows(d);
  const int d16 = static_cast<int>(ceil_div(d, kKUnroll)) * kKUnroll;
  for (int k0 = 0; k0 < d; k0 += chunk) {
    for (int e = threadIdx.x; e < chunk * d; e += kThreads) {
      const int kk = e / d;
      const int c = e % d;
      float value = 0.f;
      if (k0 + kk < d) {
        const int64_t at = static_cast<int64_t>(k0 + kk) * d + c;
        value = op_second != nullptr ? op[at] + op_second[at] : op[at];
      }
      staged[kk * kPitch + c] = value;
    }
    __syncthreads();
    const int k_end = imin(chunk, d16 - k0);
    // Steps of 16 that end at or before `skip_below` add zeros to this warp's columns.
    for (int k1 = skip_below > k0 ? (skip_below - k0) / kKUnroll * kKUnroll : 0; k1 < k_end; k1 += kKUnroll) {
#pragma unroll
      for (int u = 0; u < kKUnroll; ++u) {
        const int kk = k1 + u;
        const float4 a = *reinterpret_cast<const float4*>(rows_k + (k0 + kk) * kRowTile + 4 * rh);
#pragma unroll
        for (int j = 0; j < kCols; ++j) {
          const float b = staged[kk * kPitch + cc + 128 * j];
          acc[0][j] = fmaf(a.x, b, acc[0][j]);
          acc[1][j] = fmaf(a.y, b, acc[1][j]);
          acc[2][j] = fmaf(a.z, b, acc[2][j]);
          acc[3][j] = fmaf(a.w, b, acc[3][j]);
        }
      }
    }
    __syncthreads();
  }
}

// Block (s, tile of 8 rows): H = Gc + Zc S' (Gc, Zc centered by the column means of kernel 4),
// then ∂ℓ/∂x = g H W, written to the rows' places in x's gradient.
template <typename T, int kCols>
__global__ void __launch_bounds__(kThreads, 1) row_gradient_kernel(const BackwardParams p) {
  FASTSSL_DYNAMIC_SHARED(float, pool);
  constexpr int kColumns = 128 * kCols;
  const Blocks& bl = p.blocks;
  const int d = bl.d;
  const int w = bl.w;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int cc = tid % 128;
  const int rh = tid / 128;
  const int d16 = static_cast<int>(ceil_div(d, kKUnroll)) * kKUnroll;
  float* rows_k = pool;
  float* staged = rows_k + kColumns * kRowTile;
  const int tiles = row_tiles(w);
  const int s = static_cast<int>(blockIdx.x) / tiles;
  const int r0 = (static_cast<int>(blockIdx.x) % tiles) * kRowTile;
  const int64_t dd = static_cast<int64_t>(d) * d;
  const float* z = p.z + static_cast<int64_t>(s) * w * d;
  const float* grad_z = p.grad_z + static_cast<int64_t>(s) * w * d;
  const float* z_mean = p.z_mean + s * d;
  const float* g_mean = p.g_mean + s * d;

  for (int e = tid; e < kRowTile * d16; e += kThreads) {
    const int r = e / d16;
    const int k = e % d16;
    rows_k[k * kRowTile + r] = (r0 + r < w && k < d) ? z[static_cast<int64_t>(r0 + r) * d + k] - z_mean[k] : 0.f;
  }
  float acc[4][kCols];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < kCols; ++j) acc[i][j] = 0.f;
  rows_times_matrix<kCols>(acc, rows_k, staged, p.sym + s * dd, p.sym_second + s * dd, d, 0);
  // H replaces Zc in shared memory (every thread is past its last read: the loop ends on a barrier).
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = 4 * rh + i;
#pragma unroll
    for (int j = 0; j < kCols; ++j) {
      const int c = cc + 128 * j;
      float h = 0.f;
      if (r0 + r < w && c < d) h = grad_z[static_cast<int64_t>(r0 + r) * d + c] - g_mean[c] + acc[i][j];
      rows_k[c * kRowTile + r] = h;
      acc[i][j] = 0.f;
    }
  }
  __syncthreads();
  // H W: W[k][c] = 0 for k < c, so chunks below this warp's first column add nothing.
  rows_times_matrix<kCols>(acc, rows_k, staged, p.w_inv + s * dd, nullptr, d, 32 * (warp % 4));
  const float scale = p.grad_scale != nullptr ? *p.grad_scale : 1.f;
  const int blocks_per_iteration = static_cast<int>(bl.num_blocks) / p.iterations;
  const int64_t iteration = s / blocks_per_iteration;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = 4 * rh + i;
    if (r0 + r >= w) continue;
    const int64_t row = block_row(bl, s, r0 + r);
#pragma unroll
    for (int j = 0; j < kCols; ++j) {
      const int c = cc + 128 * j;
      if (c >= d) continue;
      const float value = scale * acc[i][j];
      if (p.iterations == 1) {
        static_cast<T*>(p.grad_x)[row * d + c] = from_float<T>(value);
      } else {
        p.per_iteration[(iteration * p.rows + row) * d + c] = value;
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) sum_iterations_kernel(const BackwardParams p) {
  const int64_t n = p.rows * p.blocks.d;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    float total = 0.f;
    for (int it = 0; it < p.iterations; ++it) total += p.per_iteration[it * n + e];
    static_cast<T*>(p.grad_x)[e] = from_float<T>(total);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: workspace layout, launch plan
// ---------------------------------------------------------------------------------------------

ForwardLayout forward_layout(const Blocks& b, bool with_loss) {
  ForwardLayout l{};
  const int64_t rows = b.num_blocks * b.w * b.d;
  const int64_t squares = b.num_blocks * b.d * b.d;
  int64_t at = 0;
  l.z = at;
  at += rows;
  l.grad_z = at;
  at += with_loss ? rows : 0;
  l.w_inv = at;
  at += squares;
  l.square = at;
  at += b.d > 128 ? squares : 0;
  l.partials = at;
  at += with_loss ? (b.num_blocks / b.views) * whiten_tiles(b.w) : 0;
  l.info = at;
  at += b.num_blocks;
  l.counter = at;
  at += 1;
  l.total = at;
  return l;
}

BackwardLayout backward_layout(const Blocks& b, int iterations, int64_t rows) {
  BackwardLayout l{};
  int64_t at = 0;
  l.sym = at;
  at += b.num_blocks * b.d * b.d;
  l.sym_second = at;
  at += b.num_blocks * b.d * b.d;
  l.g_mean = at;
  at += b.num_blocks * b.d;
  l.z_mean = at;
  at += b.num_blocks * b.d;
  l.per_iteration = at;
  at += iterations > 1 ? iterations * rows * b.d : 0;
  l.total = at;
  return l;
}

namespace {

#ifdef FASTSSL_HOST_EMULATION
unsigned emulation_seed = 0;

int max_shared_bytes() { return 227 * 1024; }  // an H100/H200 block's opt-in maximum

template <typename Kernel, typename Args>
const char* run(Kernel kernel, int64_t grid, size_t shared_bytes, const Args& args, void*) {
  if (grid <= 0) return nullptr;
  if (fastssl_emulation::launch(static_cast<unsigned>(grid), kThreads, shared_bytes, emulation_seed++, kernel, args))
    return "a __syncthreads() was reached by some threads of a block and not by others";
  return nullptr;
}
#else
int max_shared_bytes() {
  int device = 0, bytes = 48 * 1024;
  if (cudaGetDevice(&device) == cudaSuccess)
    cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  return bytes;
}

template <typename Kernel, typename Args>
const char* run(Kernel kernel, int64_t grid, size_t shared_bytes, const Args& args, void* stream) {
  if (grid <= 0) return nullptr;
  if (grid > INT_MAX) return "grid too large";
  cudaError_t err = cudaSuccess;
  if (shared_bytes > 48 * 1024) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes));
    if (err != cudaSuccess) return cudaGetErrorString(err);
  }
  kernel<<<static_cast<unsigned>(grid), kThreads, shared_bytes, static_cast<cudaStream_t>(stream)>>>(args);
  err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}
#endif

template <typename T>
const char* launch_forward_typed(const ForwardParams& p, void* stream) {
  const Blocks& b = p.blocks;
  const int d = b.d;
  const int64_t s = b.num_blocks;

  GramArgs g{};
  g.blocks = b;
  g.x = p.x;
  g.x_row_stride = p.x_row_stride;
  g.x_col_stride = p.x_col_stride;
  g.mean_a = p.mean;
  g.out = p.cov;
  g.out_second = p.w_inv;  // the factor kernel reads it before it writes W there
  g.scale_diagonal = g.scale_off_diagonal = 1.f / static_cast<float>(b.w - 1);
  if (const char* e = run(gram_kernel<0, T>, s * gram_blocks_per_subbatch(d), 0, g, stream)) return e;

  FactorArgs f{};
  f.cov = p.cov;
  f.w_inv = p.w_inv;
  f.square = p.square;
  f.info = p.info;
  f.counter = p.counter;
  f.d = d;
  f.one_minus_eps = p.one_minus_eps;
  f.eps = p.eps;
  const char* e = nullptr;
  if (d <= 16) {
    e = run(factor_kernel<1, true>, s, 0, f, stream);
  } else if (d <= 32) {
    e = run(factor_kernel<2, true>, s, 0, f, stream);
  } else if (d <= 64) {
    e = run(factor_kernel<4, true>, s, 0, f, stream);
  } else if (d <= 128) {
    e = run(factor_kernel<8, true>, s, 0, f, stream);
  } else {
    f.square_pitch = square_pitch(d);
    const size_t bytes = static_cast<size_t>(d) * f.square_pitch * sizeof(float);
    const size_t static_bytes = 3 * kMaxDim * sizeof(float) + 64;
    f.square_in_shared = bytes + static_bytes <= static_cast<size_t>(max_shared_bytes());
    e = run(factor_kernel<16, false>, s, f.square_in_shared ? bytes : 0, f, stream);
  }
  if (e) return e;

  const int64_t grid = (s / b.views) * whiten_tiles(b.w);
  const int cols = d <= 128 ? 1 : 2;
  const size_t bytes = row_kernel_floats(kWhitenRowTile, cols, d, b.views, p.with_loss != 0) * sizeof(float);
  if (p.with_loss) {
    return cols == 1 ? run(whiten_kernel<T, 1, true>, grid, bytes, p, stream)
                     : run(whiten_kernel<T, 2, true>, grid, bytes, p, stream);
  }
  return cols == 1 ? run(whiten_kernel<T, 1, false>, grid, bytes, p, stream)
                   : run(whiten_kernel<T, 2, false>, grid, bytes, p, stream);
}

template <typename T>
const char* launch_backward_typed(const BackwardParams& p, void* stream) {
  const Blocks& b = p.blocks;
  const int d = b.d;
  const int64_t s = b.num_blocks;
  GramArgs g{};
  g.blocks = b;
  g.a = p.grad_z;
  g.b = p.z;
  g.mean_a = p.g_mean;
  g.mean_b = p.z_mean;
  g.out = p.sym;
  g.out_second = p.sym_second;
  // S' = c · S with S = ½(P + tril(P, -1)ᵀ), P = tril(-Gcᵀ Zc): S'_ik = -c/2 (Gcᵀ Zc)_{max(i,k), min(i,k)}
  // (the diagonal halved too).
  g.scale_diagonal = -0.5f * p.coupling;
  g.scale_off_diagonal = -0.5f * p.coupling;
  if (const char* e = run(gram_kernel<1, float>, s * gram_blocks_per_subbatch(d), 0, g, stream)) return e;

  const int64_t grid = s * row_tiles(b.w);
  const int cols = d <= 128 ? 1 : 2;
  const size_t bytes = row_kernel_floats(kRowTile, cols, d, 1, false) * sizeof(float);
  const char* e = cols == 1 ? run(row_gradient_kernel<T, 1>, grid, bytes, p, stream)
                            : run(row_gradient_kernel<T, 2>, grid, bytes, p, stream);
  if (e || p.iterations == 1) return e;
  const int64_t n = p.rows * d;
  const int64_t sum_grid = ceil_div(n, kThreads) < 132 * 8 ? ceil_div(n, kThreads) : 132 * 8;
  return run(sum_iterations_kernel<T>, sum_grid, 0, p, stream);
}

}  // namespace

const char* launch_forward(const ForwardParams& params, void* stream) {
  if (params.blocks.num_blocks == 0) return nullptr;
  switch (params.dtype) {
    case kFloat32: return launch_forward_typed<float>(params, stream);
    case kFloat16: return launch_forward_typed<half_t>(params, stream);
    case kBFloat16: return launch_forward_typed<bf16_t>(params, stream);
    default: return "unsupported input dtype";
  }
}

const char* launch_backward(const BackwardParams& params, void* stream) {
  if (params.blocks.num_blocks == 0) return nullptr;
  if (params.iterations < 1 || params.blocks.num_blocks % params.iterations != 0) return "bad iteration count";
  switch (params.dtype) {
    case kFloat32: return launch_backward_typed<float>(params, stream);
    case kFloat16: return launch_backward_typed<half_t>(params, stream);
    case kBFloat16: return launch_backward_typed<bf16_t>(params, stream);
    default: return "unsupported gradient dtype";
  }
}

}  // namespace fastssl_wmse
