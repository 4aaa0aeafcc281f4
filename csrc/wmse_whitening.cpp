// PyTorch binding of the W-MSE kernels (wmse_whitening.cu): checks the tensors, allocates the
// outputs and one workspace per call, and launches. The caller (kernels/wmse_cuda.py) makes the
// input's device current and passes its current stream as an integer handle, so this file needs
// no CUDA headers (it compiles against any PyTorch build).
//
// Allocations per call (the only tensor ops here): forward 4 (loss, means, covariances, one
// float32 workspace holding Z, G, W and the scratch), backward 2 (the gradient, one workspace).
#include <torch/extension.h>

#include <limits>
#include <optional>
#include <vector>

#include "wmse_whitening.h"

namespace {

int dtype_code(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return fastssl_wmse::kFloat32;
    case at::kHalf: return fastssl_wmse::kFloat16;
    case at::kBFloat16: return fastssl_wmse::kBFloat16;
    default: TORCH_CHECK(false, "wmse: x must be float32, float16 or bfloat16, got ", type);
  }
  return -1;
}

// perms: (iterations, bs) int64 CUDA, contiguous; entries of each row a permutation of range(bs)
// (or, with views = 1, any rows of x: then it is an index table, see Blocks in the header).
fastssl_wmse::Blocks make_blocks(const at::Tensor& x, const at::Tensor& perms, int64_t views, int64_t w) {
  TORCH_CHECK(x.is_cuda() && perms.is_cuda() && x.device() == perms.device(),
              "wmse: x and perms must be CUDA tensors on the same device");
  TORCH_CHECK(x.dim() == 2, "wmse: x must be (N, d), got ", x.sizes());
  TORCH_CHECK(perms.dim() == 2 && perms.scalar_type() == at::kLong && perms.is_contiguous(),
              "wmse: perms must be a contiguous (iterations, bs) int64 tensor");
  const int64_t d = x.size(1);
  const int64_t bs = perms.size(1);
  TORCH_CHECK(d >= 1 && d <= fastssl_wmse::kMaxDim, "wmse: d must be in [1, ", fastssl_wmse::kMaxDim, "], got ", d);
  TORCH_CHECK(w >= 2 && bs % w == 0, "wmse: w_size (", w, ") must be >= 2 and divide the ", bs, " images per view");
  TORCH_CHECK(views >= 1 && views * bs <= x.size(0), "wmse: ", views, " views of ", bs, " rows exceed x's ", x.size(0));
  const int64_t blocks = perms.size(0) * (bs / w) * views;
  TORCH_CHECK(blocks < std::numeric_limits<int>::max() / fastssl_wmse::kRowTile, "wmse: too many sub-batches");
  fastssl_wmse::Blocks b{};
  b.perms = perms.data_ptr<int64_t>();
  b.perm_len = bs;
  b.view_offset = bs;
  b.num_blocks = blocks;
  b.chunks = static_cast<int>(bs / w);
  b.views = static_cast<int>(views);
  b.w = static_cast<int>(w);
  b.d = static_cast<int>(d);
  return b;
}

// Returns {loss (), means (S, d), covariances (S, d, d), workspace (float32, see
// forward_layout)}. With with_loss, views >= 2 and loss = 2 - loss_scale * Σ cos.
std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& perms, int64_t views, int64_t w, double eps,
                                bool with_loss, double loss_scale, int64_t stream) {
  const fastssl_wmse::Blocks b = make_blocks(x, perms, views, w);
  TORCH_CHECK(!with_loss || (views >= 2 && views <= fastssl_wmse::kMaxViews), "wmse: the fused loss needs 2 to ",
              fastssl_wmse::kMaxViews, " views, got ", views);
  const auto options = x.options().dtype(at::kFloat);
  const fastssl_wmse::ForwardLayout layout = fastssl_wmse::forward_layout(b, with_loss);
  at::Tensor loss = at::empty({}, options);
  at::Tensor mean = at::empty({b.num_blocks, b.d}, options);
  at::Tensor cov = at::empty({b.num_blocks, b.d, b.d}, options);
  at::Tensor workspace = at::empty({layout.total}, options);
  float* base = workspace.data_ptr<float>();

  fastssl_wmse::ForwardParams p{};
  p.blocks = b;
  p.x = x.data_ptr();
  p.dtype = dtype_code(x.scalar_type());
  p.x_row_stride = x.stride(0);
  p.x_col_stride = x.stride(1);
  p.one_minus_eps = static_cast<float>(1.0 - eps);
  p.eps = static_cast<float>(eps);
  p.with_loss = with_loss ? 1 : 0;
  p.loss_scale = static_cast<float>(loss_scale);
  p.mean = mean.data_ptr<float>();
  p.cov = cov.data_ptr<float>();
  p.z = base + layout.z;
  p.w_inv = base + layout.w_inv;
  p.grad_z = base + layout.grad_z;
  p.square = base + layout.square;
  p.partials = base + layout.partials;
  p.loss = loss.data_ptr<float>();
  p.info = reinterpret_cast<int*>(base + layout.info);
  p.counter = reinterpret_cast<unsigned*>(base + layout.counter);
  const char* error = fastssl_wmse::launch_forward(p, reinterpret_cast<void*>(stream));
  TORCH_CHECK(error == nullptr, "wmse forward kernel launch failed: ", error);
  return {loss, mean, cov, workspace};
}

// d loss / d x (N, d) in x's dtype. grad_loss: () float32 upstream gradient of the fused loss
// (G is then the workspace's); otherwise grad_z (S, w, d) float32 contiguous is G itself.
at::Tensor backward(const std::optional<at::Tensor>& grad_loss, const std::optional<at::Tensor>& grad_z,
                    const at::Tensor& workspace, const at::Tensor& x, const at::Tensor& perms, int64_t views, int64_t w,
                    double eps, int64_t iterations, int64_t stream) {
  const fastssl_wmse::Blocks b = make_blocks(x, perms, views, w);
  TORCH_CHECK(grad_loss.has_value() != grad_z.has_value(), "wmse backward: pass exactly one of grad_loss, grad_z");
  const bool with_loss = grad_loss.has_value();
  const fastssl_wmse::ForwardLayout forward = fastssl_wmse::forward_layout(b, with_loss);
  TORCH_CHECK(workspace.is_cuda() && workspace.scalar_type() == at::kFloat && workspace.is_contiguous() &&
                  workspace.numel() == forward.total,
              "wmse backward: the workspace does not match the forward's");
  TORCH_CHECK(iterations >= 1 && b.num_blocks % iterations == 0 && b.num_blocks * b.w == iterations * x.size(0),
              "wmse backward: every iteration's sub-batches must cover each row of x once");
  const int64_t rows = x.size(0);
  const fastssl_wmse::BackwardLayout layout = fastssl_wmse::backward_layout(b, static_cast<int>(iterations), rows);
  const auto options = x.options().dtype(at::kFloat);
  at::Tensor grad_x = at::empty({rows, b.d}, x.options());
  at::Tensor scratch = at::empty({layout.total}, options);
  float* base = scratch.data_ptr<float>();
  const float* forward_base = workspace.data_ptr<float>();

  fastssl_wmse::BackwardParams p{};
  p.blocks = b;
  p.z = forward_base + forward.z;
  p.w_inv = forward_base + forward.w_inv;
  if (with_loss) {
    const at::Tensor& g = *grad_loss;
    TORCH_CHECK(g.is_cuda() && g.scalar_type() == at::kFloat && g.numel() == 1, "wmse backward: grad_loss must be a float32 scalar");
    p.grad_z = forward_base + forward.grad_z;
    p.grad_scale = g.data_ptr<float>();
  } else {
    const at::Tensor& g = *grad_z;
    TORCH_CHECK(g.is_cuda() && g.scalar_type() == at::kFloat && g.is_contiguous() &&
                    g.numel() == b.num_blocks * b.w * b.d,
                "wmse backward: grad_z must be a contiguous float32 (S, w, d) tensor");
    p.grad_z = g.data_ptr<float>();
    p.grad_scale = nullptr;
  }
  p.coupling = static_cast<float>(2.0 * (1.0 - eps) / (w - 1));
  p.iterations = static_cast<int>(iterations);
  p.rows = rows;
  p.dtype = dtype_code(x.scalar_type());
  p.grad_x = grad_x.data_ptr();
  p.sym = base + layout.sym;
  p.sym_second = base + layout.sym_second;
  p.g_mean = base + layout.g_mean;
  p.z_mean = base + layout.z_mean;
  p.per_iteration = base + layout.per_iteration;
  const char* error = fastssl_wmse::launch_backward(p, reinterpret_cast<void*>(stream));
  TORCH_CHECK(error == nullptr, "wmse backward kernel launch failed: ", error);
  return grad_x;
}

// Offsets (in floats) of the forward workspace's parts: {z, grad_z, w_inv, info, total}.
std::vector<int64_t> forward_offsets(int64_t blocks, int64_t views, int64_t w, int64_t d, bool with_loss) {
  fastssl_wmse::Blocks b{};
  b.num_blocks = blocks;
  b.views = static_cast<int>(views);
  b.w = static_cast<int>(w);
  b.d = static_cast<int>(d);
  const fastssl_wmse::ForwardLayout l = fastssl_wmse::forward_layout(b, with_loss);
  return {l.z, l.grad_z, l.w_inv, l.info, l.total};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "W-MSE Cholesky whitening (and fused normalized MSE), CUDA", pybind11::arg("x"),
        pybind11::arg("perms"), pybind11::arg("views"), pybind11::arg("w"), pybind11::arg("eps"),
        pybind11::arg("with_loss"), pybind11::arg("loss_scale"), pybind11::arg("stream"));
  m.def("backward", &backward, "W-MSE backward, CUDA", pybind11::arg("grad_loss"), pybind11::arg("grad_z"),
        pybind11::arg("workspace"), pybind11::arg("x"), pybind11::arg("perms"), pybind11::arg("views"),
        pybind11::arg("w"), pybind11::arg("eps"), pybind11::arg("iterations"), pybind11::arg("stream"));
  m.def("forward_offsets", &forward_offsets, "offsets of the forward workspace's parts", pybind11::arg("blocks"),
        pybind11::arg("views"), pybind11::arg("w"), pybind11::arg("d"), pybind11::arg("with_loss"));
}
