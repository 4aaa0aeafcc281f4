// W-MSE (Ermolov et al. 2021): Cholesky whitening of sub-batches and the normalized MSE
// between views, forward and backward. The launch interface shared by the CUDA source
// (wmse_whitening.cu), the PyTorch binding (wmse_whitening.cpp) and the host emulation used by
// the tests. Plain C++: no CUDA or PyTorch headers, so every side can include it.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fastssl_wmse {

// Largest feature dimension the kernels accept (the Python side uses cuSOLVER beyond it).
constexpr int kMaxDim = 256;
// Largest number of views of the fused loss (its per-row scratch holds every view's row).
constexpr int kMaxViews = 8;
// Rows of a sub-batch handled by one block of the row kernels (whitening, row gradients).
constexpr int kRowTile = 8;
// Rows of a sub-batch handled by one block of the whitening (and loss) kernel: fewer than
// kRowTile, so that the headline shape (8 sub-batches of 256 rows, 2 views) runs 256 blocks.
constexpr int kWhitenRowTile = 4;
// Edge of the covariance / Gram tiles (one block per lower tile, half of the rows and sub-batch).
constexpr int kGramTile = 32;

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Where the w rows of sub-batch s are. Sub-batches are ordered (iteration, chunk, view), as
// lightly's calls: s = ((it * chunks) + ch) * views + v, and row r of s is input row
//   perms[it * perm_len + ch * w + r] + v * view_offset.
// A plain (S, w) index table is the case views = 1, chunks = S, perm_len = S * w (one
// "permutation" row holding the whole table).
struct Blocks {
  const int64_t* perms;   // (iterations, perm_len) int64, contiguous
  int64_t perm_len;       // images per view (bs)
  int64_t view_offset;    // rows between two views in x (bs)
  int64_t num_blocks;     // S
  int chunks;             // sub-batches per view and iteration (bs / w)
  int views;              // V: consecutive sub-batches holding the same images
  int w;                  // rows per sub-batch, >= 2
  int d;                  // features, 1..kMaxDim
};

// Forward. Outputs are dense row-major float32 and fully written.
struct ForwardParams {
  Blocks blocks;
  const void* x;           // (N, d) input rows, dtype `dtype`, any strides (in elements)
  int dtype;
  int64_t x_row_stride;
  int64_t x_col_stride;
  float one_minus_eps;     // shrinkage: (1 - eps) * cov + eps * I
  float eps;
  int with_loss;           // 1: the normalized MSE between views and its gradient too
  float loss_scale;        // loss = 2 - loss_scale * (sum of the cosines)
  float* mean;             // (S, d) sub-batch means
  float* cov;              // (S, d, d) unshrunk covariances X_c^T X_c / (w - 1)
  float* z;                // (S, w, d) whitened rows X_c W^T (NaN for a block that failed)
  float* w_inv;            // (S, d, d) W = L^{-1} (lower triangular; NaN when the block failed)
  float* grad_z;           // (S, w, d) d loss / d z for a unit upstream gradient (with_loss)
  float* square;           // (S, d, d) factorization scratch when d > 128 (else unused)
  float* partials;         // (row blocks) per-block cosine sums (with_loss)
  float* loss;             // () the loss (with_loss); NaN when any block failed
  int* info;               // (S,) 0, or j + 1 when the j-th pivot was not positive (or NaN)
  unsigned* counter;       // (1) blocks of the loss kernel done (zeroed by the factor kernel)
};

// Backward: d loss / d x from the forward's Z, W and the loss gradient with respect to Z.
struct BackwardParams {
  Blocks blocks;
  const float* z;          // (S, w, d)
  const float* w_inv;      // (S, d, d)
  const float* grad_z;     // (S, w, d) G
  const float* grad_scale; // () upstream gradient multiplying G, or nullptr for 1
  float coupling;          // 2 (1 - eps) / (w - 1): the path through the covariance
  int iterations;          // w_iter: sub-batches [it * S / iterations, ...) cover every row once
  int64_t rows;            // N, rows of x and of grad_x
  int dtype;               // dtype of grad_x
  void* grad_x;            // (N, d) contiguous, dtype `dtype`
  float* sym;              // (S, d, d) scratch: c * sym(-tril(Gc^T Zc)) over the first half of the
                           // rows (see the .cu file)
  float* sym_second;       // (S, d, d) scratch: the same over the second half (added to sym)
  float* g_mean;           // (S, d) scratch: column means of G
  float* z_mean;           // (S, d) scratch: column means of Z
  float* per_iteration;    // (iterations, N, d) float32 scratch when iterations > 1
};

// Workspace sizes in floats (every scratch buffer of one call lives in one allocation).
struct ForwardLayout {
  int64_t z, grad_z, w_inv, square, partials, info, counter, total;
};
ForwardLayout forward_layout(const Blocks& blocks, bool with_loss);
struct BackwardLayout {
  int64_t sym, sym_second, g_mean, z_mean, per_iteration, total;
};
BackwardLayout backward_layout(const Blocks& blocks, int iterations, int64_t rows);

// Launch the forward (3 kernels) / backward (2, or 3 when iterations > 1) on `stream` (a
// cudaStream_t). Return nullptr on success, else an error string.
const char* launch_forward(const ForwardParams& params, void* stream);
const char* launch_backward(const BackwardParams& params, void* stream);

}  // namespace fastssl_wmse
