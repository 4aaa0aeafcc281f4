// W-MSE sub-batch whitening: the launch interface shared by the CUDA source
// (wmse_whitening.cu), the PyTorch binding (wmse_whitening.cpp) and the host emulation used by
// the tests. Plain C++: no CUDA or PyTorch headers, so every side can include it.
#pragma once

#include <cstdint>

namespace fastssl_wmse {

// Largest feature dimension the kernel accepts (the Python side uses cuSOLVER beyond it).
constexpr int kMaxDim = 256;

// One launch whitens S = num_blocks sub-batches; block s reads the w rows index[s, :] of x.
// All outputs are dense, row-major float32 and fully written (NaN for a block whose
// covariance could not be factored).
struct Params {
  const float* x;          // (N, d) input rows, any strides (in elements)
  int64_t x_row_stride;
  int64_t x_col_stride;
  const int64_t* index;    // (S, w) rows of x, each in [0, N)
  int64_t num_blocks;      // S
  int w;                   // rows per sub-batch, >= 2
  int d;                   // features, 1..kMaxDim
  float one_minus_eps;     // shrinkage: (1 - eps) * cov + eps * I
  float eps;
  float* z;                // (S, w, d) whitened rows  X_c L^{-T}
  float* w_inv;            // (S, d, d) whitening matrices L^{-1} (lower triangular, zero above)
  float* mean;             // (S, d) sub-batch means
  float* cov;              // (S, d, d) unshrunk covariances X_c^T X_c / (w - 1)
  int* info;               // (S,) 0, or j + 1 when the j-th pivot was not positive (or NaN)
  int factor_in_shared;    // set by the launcher: 1 = factor in shared memory, 0 = in w_inv
};

// Launches the kernel on `stream` (a cudaStream_t). The factor lives in shared memory when it
// fits (d <= 224 on an H100) and `allow_shared_factor`; otherwise it is factored in place in
// w_inv (global memory, L2-resident). Returns nullptr on success, else CUDA's error string.
const char* launch_whiten(const Params& params, bool allow_shared_factor, void* stream);

}  // namespace fastssl_wmse
