// PyTorch binding of the W-MSE whitening kernel (wmse_whitening.cu): checks the tensors,
// allocates the outputs and launches. The caller (fastssl/kernels/wmse_cuda.py) makes the
// input's device current and passes its current stream as an integer handle, so this file
// needs no CUDA headers (it compiles against any PyTorch build).
#include <torch/extension.h>

#include <limits>
#include <vector>

#include "wmse_whitening.h"

namespace {

// x: (N, d) float32 CUDA (any strides); index: (S, w) int64 CUDA, contiguous, entries in
// [0, N) (the caller builds it from permutations); stream: the cudaStream_t to launch on, on
// the current device. Returns {z (S, w, d), w_inv (S, d, d),
// mean (S, d), cov (S, d, d), info (S,) int32}.
std::vector<at::Tensor> whiten_forward(const at::Tensor& x, const at::Tensor& index, double eps,
                                       int64_t stream, bool allow_shared_factor) {
  TORCH_CHECK(x.is_cuda() && index.is_cuda(), "wmse whitening: x and index must be CUDA tensors");
  TORCH_CHECK(x.device() == index.device(), "wmse whitening: x and index must be on the same device");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "wmse whitening: x must be (N, d) float32, got ",
              x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(index.dim() == 2 && index.scalar_type() == at::kLong && index.is_contiguous(),
              "wmse whitening: index must be a contiguous (S, w) int64 tensor");
  const int64_t d = x.size(1);
  const int64_t num_blocks = index.size(0);
  const int64_t w = index.size(1);
  TORCH_CHECK(d >= 1 && d <= fastssl_wmse::kMaxDim, "wmse whitening: d must be in [1, ", fastssl_wmse::kMaxDim,
              "], got ", d);
  TORCH_CHECK(w >= 2 && w <= std::numeric_limits<int>::max(), "wmse whitening: need 2 or more rows per sub-batch");
  TORCH_CHECK(num_blocks <= std::numeric_limits<int>::max(), "wmse whitening: too many sub-batches for one grid");

  const auto options = x.options();
  at::Tensor z = at::empty({num_blocks, w, d}, options);
  at::Tensor w_inv = at::empty({num_blocks, d, d}, options);
  at::Tensor mean = at::empty({num_blocks, d}, options);
  at::Tensor cov = at::empty({num_blocks, d, d}, options);
  at::Tensor info = at::empty({num_blocks}, options.dtype(at::kInt));

  fastssl_wmse::Params params{};
  params.x = x.data_ptr<float>();
  params.x_row_stride = x.stride(0);
  params.x_col_stride = x.stride(1);
  params.index = index.data_ptr<int64_t>();
  params.num_blocks = num_blocks;
  params.w = static_cast<int>(w);
  params.d = static_cast<int>(d);
  params.one_minus_eps = static_cast<float>(1.0 - eps);
  params.eps = static_cast<float>(eps);
  params.z = z.data_ptr<float>();
  params.w_inv = w_inv.data_ptr<float>();
  params.mean = mean.data_ptr<float>();
  params.cov = cov.data_ptr<float>();
  params.info = info.data_ptr<int>();
  const char* error = fastssl_wmse::launch_whiten(params, allow_shared_factor, reinterpret_cast<void*>(stream));
  TORCH_CHECK(error == nullptr, "wmse whitening kernel launch failed: ", error);
  return {z, w_inv, mean, cov, info};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("whiten_forward", &whiten_forward, "W-MSE sub-batch Cholesky whitening (CUDA)", pybind11::arg("x"),
        pybind11::arg("index"), pybind11::arg("eps"), pybind11::arg("stream"),
        pybind11::arg("allow_shared_factor") = true);
}
