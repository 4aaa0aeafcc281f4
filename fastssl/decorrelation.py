r"""Barlow Twins and VICReg: functional API, optimized PyTorch path, the choice between it and
the Triton kernels (:mod:`fastssl.kernels.decorrelation`, imported only when they run), and the
drop-in modules.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from fastssl import distributed, reference
from fastssl._backend import (
    check_backend_name,
    outside_autocast,
    resolve_backend,
    guard_triton_backward,
    run_reference,
    triton_requested_explicitly,
    triton_with_fallback,
)
from fastssl._checks import (
    BatchShapeError,
    check_distributed_available,
    check_finite,
    check_pair,
    check_positive,
)

PATHS = ("auto", "gram", "cross")
# Batch-norm epsilon of Barlow Twins (lightly and the original code: BatchNorm1d defaults).
BATCH_NORM_EPS = 1e-5

# --------------------------------------------------------------------------------------------
# Optimized PyTorch path
# --------------------------------------------------------------------------------------------
#
# Both losses are functions of a d×d matrix (Barlow Twins: C = ÂᵀB̂/N of the standardized views;
# VICReg: K = XᵀX/(N-1) of each centered view) through its diagonal and its squared Frobenius
# norm only. Since ‖AᵀB‖²_F = tr(AᵀB BᵀA) = ⟨AAᵀ, BBᵀ⟩_F, the norm can come from the two N×N
# Gram matrices instead ("gram", O(N²d)), and the diagonal from column sums in O(Nd); the
# d×d matrix is then never formed. "cross" forms it (O(Nd²)) and is cheaper when N >= d.
#
# FLOP counts of this path (forward + backward, 2 flops per multiply-add):
#   Barlow Twins  gram: 2 Grams + 2 (N×N)·(N×d) products = 8N²d;  cross: ÂᵀB̂ + 2 products = 6Nd²
#   VICReg        gram: per view XXᵀ + G·X = 4N²d;                cross: XᵀX + X·K = 4Nd²
# VICReg's gram path is the cheaper one exactly when N < d. Barlow Twins' would be so for
# N < 0.75·d; for 0.75·d <= N < d "auto" still takes the gram path (at most 4/3 of the cross
# FLOPs) because a d×d allocation when N < d is what the Gram identity is there to avoid.


def _use_gram(n: int, d: int, path: str) -> bool:
    """The Gram (N×N) side when asked for, or under ``"auto"`` when the batch is the smaller side."""
    if path == "gram":
        return True
    if path == "cross":
        return False
    return n < d


def _accumulation_dtype(z_a: Tensor, z_b: Tensor) -> torch.dtype:
    """float32 for float32 and half inputs, float64 when either view is float64."""
    return torch.promote_types(torch.promote_types(z_a.dtype, z_b.dtype), torch.float32)


def _squared_norm(m: Tensor) -> Tensor:
    """‖m‖²_F as one dot product (no temporary of m's size)."""
    flat = m.reshape(-1)
    return torch.dot(flat, flat)


def _standardize(z: Tensor, acc: torch.dtype, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Batch-norm without affine parameters of ``z`` (N, d) in ``acc``: returns the standardized
    (N, d) view, the column mean and ``1/sqrt(biased var + eps)`` (both (d,)).

    The variance of float32 columns beyond ~1.8e19 overflows float32 although the loss, invariant
    to the columns' scale, is finite. The rule per device:

    * CPU: PyTorch's CPU reductions accumulate float32 in float64, so the standard deviation
      (not its square) of any finite column is representable: one ``std_mean`` pass, and
      ``1/sqrt(std² + eps)`` on the (d,) vector in float64. No extra pass over the data.
    * CUDA (float32 accumulation): the statistics are taken of ``y = 2^-k z`` per column, 2^k at
      least the column's largest magnitude when that exceeds 1 (exact: a power of two), and
      mapped back: mean = 2^k·mean_y, 1/σ = 2^-k/sqrt(var_y + eps·4^-k). Two more passes, at
      memory bandwidth.
    """
    z = z.to(acc)
    if _reductions_accumulate_in_float64(z.device):
        std, mean = torch.std_mean(z, dim=0, correction=0)
        wide = torch.promote_types(acc, torch.float64)
        inv_std = torch.rsqrt(std.to(wide).square() + eps).to(acc)
    else:
        inverse_scale = reference.inverse_power_of_two_scale(z, 0, at_most_one=True).squeeze(0)
        var, mean = torch.var_mean(z * inverse_scale, dim=0, correction=0)
        # clamped at the smallest normal number: a constant column beyond 2^75 would give rsqrt(0)
        scaled_var = (var + eps * inverse_scale * inverse_scale).clamp_min(torch.finfo(acc).tiny)
        inv_std = torch.rsqrt(scaled_var) * inverse_scale
        mean = mean / inverse_scale
    return _centered_scaled(z, mean, inv_std), mean, inv_std


def _reductions_accumulate_in_float64(device: torch.device) -> bool:
    """Whether PyTorch's float32 reductions on ``device`` accumulate in float64 (CPU: yes)."""
    return device.type == "cpu"


def _centered_scaled(z: Tensor, mean: Tensor, inv_std: Tensor) -> Tensor:
    """``(z − mean)·inv_std`` in one pass over (N, d): ``z·inv_std + (−mean·inv_std)``."""
    return torch.addcmul(-mean * inv_std, z, inv_std)


class _BarlowTwinsFunction(torch.autograd.Function):
    r"""Barlow Twins with a hand-written backward.

    With Â, B̂ the standardized views, C = ÂᵀB̂/N and
    :math:`L = \sum_i (1-C_{ii})^2 + \lambda\sum_{i\ne j}C_{ij}^2`, the gradient with respect to C
    is :math:`\Gamma = 2\lambda C + \mathrm{diag}(g)`, :math:`g_i = 2((1-\lambda)C_{ii} - 1)`, so

    .. math:: \partial L/\partial\hat A = \hat B\Gamma^\top/N
              = \tfrac{2\lambda}{N^2}(\hat B\hat B^\top)\hat A + \hat B\,\mathrm{diag}(g)/N

    and symmetrically for B̂ with ÂÂᵀ. The batch-norm backward then gives
    :math:`\partial L/\partial z = r\,(\delta - \bar\delta - \hat A\,\overline{\delta\hat A})` per
    column, with r the inverse standard deviation and bars the batch means. Saved for the
    backward: the inputs, (d,) statistics and either the two N×N Grams or the off-diagonal part
    of C (d×d, only on the cross path, where d <= N); Â and B̂ are recomputed.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, z_a: Tensor, z_b: Tensor, lambda_param: float, use_gram: bool
    ) -> Tensor:
        n, d = z_a.shape
        acc = _accumulation_dtype(z_a, z_b)
        a, mean_a, inv_std_a = _standardize(z_a, acc, BATCH_NORM_EPS)
        b, mean_b, inv_std_b = _standardize(z_b, acc, BATCH_NORM_EPS)
        if use_gram:
            gram_a, gram_b = a @ a.T, b @ b.T
            c_diag = torch.linalg.vecdot(a, b, dim=0) / n
            # ‖C‖² − Σ C_ii²: C has rank <= N, so the off-diagonal part is at least
            # (Σ C_ii)²/N − Σ C_ii², which keeps the subtraction well conditioned for N well below d.
            off_diag = torch.dot(gram_a.reshape(-1), gram_b.reshape(-1)) / (n * n) - _squared_norm(c_diag)
            off_diag = off_diag.clamp_min(0)  # a sum of squares; rounding must not make it negative
            ctx.save_for_backward(z_a, z_b, mean_a, inv_std_a, mean_b, inv_std_b, c_diag, gram_a, gram_b)
        else:
            c = a.T @ b / n
            c_diag = c.diagonal().clone()
            # Zeroing the diagonal in place gives the off-diagonal sum without cancellation
            # (C ≈ I when training has converged) and is the matrix the backward needs.
            c.diagonal().zero_()
            off_diag = _squared_norm(c)
            ctx.save_for_backward(z_a, z_b, mean_a, inv_std_a, mean_b, inv_std_b, c_diag, c)
        ctx.lambda_param, ctx.use_gram = lambda_param, use_gram
        return (_squared_norm(1 - c_diag) + lambda_param * off_diag).float()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor):  # type: ignore[override]
        z_a, z_b, mean_a, inv_std_a, mean_b, inv_std_b, c_diag = ctx.saved_tensors[:7]
        lam = ctx.lambda_param
        n = z_a.shape[0]
        acc = mean_a.dtype
        a = _centered_scaled(z_a.to(acc), mean_a, inv_std_a)
        b = _centered_scaled(z_b.to(acc), mean_b, inv_std_b)
        if ctx.use_gram:
            gram_a, gram_b = ctx.saved_tensors[7:]
            g = 2 * ((1 - lam) * c_diag - 1)
            d_a = torch.addmm(b * (g / n), gram_b, a, alpha=2 * lam / (n * n))
            d_b = torch.addmm(a * (g / n), gram_a, b, alpha=2 * lam / (n * n))
        else:
            (c_off,) = ctx.saved_tensors[7:]
            dl_dc = c_off * (2 * lam)
            dl_dc.diagonal().copy_(2 * (c_diag - 1))
            d_a = b @ dl_dc.T / n
            d_b = a @ dl_dc / n
        scale = grad_loss.to(acc)
        grad_a = _batch_norm_backward(d_a, a, inv_std_a) * scale
        grad_b = _batch_norm_backward(d_b, b, inv_std_b) * scale
        return grad_a.to(z_a.dtype), grad_b.to(z_b.dtype), None, None


def _batch_norm_backward(d_hat: Tensor, hat: Tensor, inv_std: Tensor) -> Tensor:
    r"""Gradient through ``hat = (z - mean) * inv_std`` (biased variance): per column
    :math:`r(\delta - \bar\delta - \hat z\,\overline{\delta\hat z})`."""
    return (d_hat - d_hat.mean(dim=0) - hat * (d_hat * hat).mean(dim=0)) * inv_std


def _barlow_twins_torch(z_a: Tensor, z_b: Tensor, lambda_param: float, path: str) -> Tensor:
    n, d = z_a.shape
    return _BarlowTwinsFunction.apply(z_a, z_b, lambda_param, _use_gram(n, d, path))


class _VICRegFunction(torch.autograd.Function):
    r"""VICReg with a hand-written backward.

    Per view, with X the centered view, v the unbiased column variances, σ = sqrt(v + eps) and
    K = XᵀX/(N-1) (so diag K = v):

    * invariance :math:`\frac{1}{Nd}\|Z_a-Z_b\|^2`, gradient :math:`\pm\frac{2}{Nd}(Z_a-Z_b)`;
    * variance :math:`\frac1d\sum_j\max(0, 1-\sigma_j)`, gradient :math:`-\frac{X_{bj}}{d(N-1)\sigma_j}`
      where the hinge is active (σ_j < 1);
    * covariance :math:`\frac1d\sum_{i\ne j}K_{ij}^2 = \frac1d(\|XX^\top\|^2/(N-1)^2 - \sum_j v_j^2)`,
      gradient :math:`\frac{4}{d(N-1)}XK_{\mathrm{off}} = \frac{4}{d(N-1)}(XX^\top X/(N-1) - X\,\mathrm{diag}(v))`.

    Every column of X sums to zero, so the centering adds nothing to the last two gradients
    beyond rounding; it is applied anyway (one column mean). Saved: the inputs, (d,) statistics
    and the two N×N Grams (gram path) or the two off-diagonal K (cross path, d <= N).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        z_a: Tensor,
        z_b: Tensor,
        lambda_param: float,
        mu_param: float,
        nu_param: float,
        eps: float,
        use_gram: bool,
    ) -> Tensor:
        n, d = z_a.shape
        acc = _accumulation_dtype(z_a, z_b)
        za, zb = z_a.to(acc), z_b.to(acc)
        invariance = _squared_norm(za - zb) / (n * d)
        saved = [z_a, z_b]
        variance = za.new_zeros(())
        covariance = za.new_zeros(())
        for z in (za, zb):
            mean = z.mean(dim=0)
            x = z - mean
            var = (x * x).sum(dim=0) / (n - 1)
            std = torch.sqrt(var + eps)
            variance = variance + torch.relu(1 - std).mean()
            if use_gram:
                gram = x @ x.T
                # rank(K) <= N keeps this difference well conditioned for N well below d
                off = (_squared_norm(gram) / ((n - 1) ** 2) - _squared_norm(var)).clamp_min(0)
                saved += [mean, var, std, gram]
            else:
                k = x.T @ x / (n - 1)
                k.diagonal().zero_()
                off = _squared_norm(k)
                saved += [mean, var, std, k]
            covariance = covariance + off / d
        ctx.save_for_backward(*saved)
        ctx.hyper = (lambda_param, mu_param, nu_param, use_gram)
        loss = lambda_param * invariance + mu_param * 0.5 * variance + nu_param * covariance
        return loss.float()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor):  # type: ignore[override]
        z_a, z_b = ctx.saved_tensors[:2]
        lam, mu, nu, use_gram = ctx.hyper
        n, d = z_a.shape
        acc = ctx.saved_tensors[2].dtype
        za, zb = z_a.to(acc), z_b.to(acc)
        scale = grad_loss.to(acc)
        d_inv = (za - zb) * (2 * lam / (n * d))
        grads = []
        for view, z in enumerate((za, zb)):
            mean, var, std, m = ctx.saved_tensors[2 + 4 * view : 6 + 4 * view]
            x = z - mean
            # ½μ · hinge'(σ) · ∂σ/∂x, with the hinge's gradient 0 at σ = 1 (as relu's)
            hinge = torch.where(std < 1, -0.5 * mu / (d * (n - 1)) / std, torch.zeros_like(std))
            d_x = x * hinge
            cov_coef = 4 * nu / (d * (n - 1))
            if use_gram:
                d_x = d_x + torch.addmm(x * (-cov_coef * var), m, x, alpha=cov_coef / (n - 1))
            else:
                d_x = torch.addmm(d_x, x, m, alpha=cov_coef)
            d_z = d_x - d_x.mean(dim=0)
            d_z = d_z + d_inv if view == 0 else d_z - d_inv
            grads.append((d_z * scale).to((z_a, z_b)[view].dtype))
        return grads[0], grads[1], None, None, None, None, None


def _vicreg_torch(
    z_a: Tensor, z_b: Tensor, lambda_param: float, mu_param: float, nu_param: float, eps: float, path: str
) -> Tensor:
    n, d = z_a.shape
    return _VICRegFunction.apply(z_a, z_b, lambda_param, mu_param, nu_param, eps, _use_gram(n, d, path))


# --------------------------------------------------------------------------------------------
# Which implementation runs: the Triton kernels or the torch path (cuBLAS)
# --------------------------------------------------------------------------------------------
#
# A cost model of both, forward + backward, in the units of an H100/H200 (2 flops per
# multiply-add; rates as measured or derated from the data sheet):
#
#   torch path: every product in float32 (half inputs are upcast to accumulate), through
#     cuBLAS SGEMM at ~50 TFLOP/s (TF32 tensor cores at ~300 when allow_tf32), FLOPs
#     gram 8N²d (two full Grams, two (N×N)·(N×d) products), cross 6Nd² (Barlow Twins) or
#     8Nd² (VICReg: two d×d), plus ~40 eager launches at ~5 µs each (statistics, casts,
#     reductions, the batch-norm backward).
#   Triton path: gram forward 2N²d (two symmetric Grams, upper tiles) × 3 for half inputs
#     (hi·hi + lo·hi + hi·lo), backward 4N²d (×2 when 2N > d: the Gram's lo part); cross
#     forward 2Nd² × 3, backward 4Nd². Half inputs on tensor cores at ~40 % of 790 TFLOP/s
#     (64×64 tiles, short K loops), float32 IEEE products on the FMA pipe at ~25 TFLOP/s
#     (TF32: ~150), plus 6 launches at ~4 µs.
#
# The rule: under "auto" the Triton path runs unless the model predicts the torch path faster.
# With these constants that happens for float32 inputs once the products dominate the
# launches: at N = 2048, d = 8192 float32 the torch path's 275 GFLOP of SGEMM (5.5 ms) beats
# 206 GFLOP on the FMA pipe (8.3 ms); half inputs stay on Triton at every shape (N = 2048,
# d = 8192 bf16: 1.1 ms against 5.7 ms) and so does float32 at N = 256, d = 8192 (0.15 ms
# against 0.29 ms: launch-bound). An explicit backend="triton" always runs the kernels.
_TORCH_FP32_RATE, _TORCH_TF32_RATE = 50e12, 300e12
_TRITON_HALF_RATE, _TRITON_FP32_RATE, _TRITON_TF32_RATE = 0.4 * 790e12, 25e12, 150e12
_TORCH_LAUNCHES, _TRITON_LAUNCHES = 40, 6
_TORCH_LAUNCH_S, _TRITON_LAUNCH_S = 5e-6, 4e-6


def predicted_seconds(n: int, d: int, dtype: torch.dtype, use_gram: bool, vicreg: bool, tf32: bool = False):
    """(torch path, Triton path) forward + backward seconds on an H100/H200 by the cost model
    above; ``tf32``: ``torch.backends.cuda.matmul.allow_tf32``."""
    half = dtype in (torch.float16, torch.bfloat16)
    if use_gram:
        torch_flops = 8 * n * n * d
        triton_flops = 2 * n * n * d * (3 if half else 1) + 4 * n * n * d * (2 if half and 2 * n > d else 1)
    else:
        torch_flops = (8 if vicreg else 6) * n * d * d
        triton_flops = 2 * n * d * d * (3 if half else 1) + 4 * n * d * d
    torch_rate = _TORCH_TF32_RATE if tf32 else _TORCH_FP32_RATE
    triton_rate = _TRITON_HALF_RATE if half else (_TRITON_TF32_RATE if tf32 else _TRITON_FP32_RATE)
    torch_seconds = torch_flops / torch_rate + _TORCH_LAUNCHES * _TORCH_LAUNCH_S
    triton_seconds = triton_flops / triton_rate + _TRITON_LAUNCHES * _TRITON_LAUNCH_S
    return torch_seconds, triton_seconds


def _triton_runs(z_a: Tensor, z_b: Tensor, backend: str, path: str, vicreg: bool) -> bool:
    """Whether the resolved "triton" backend runs the kernels: float64 (either view) always
    takes the torch path, which accumulates in float64; under "auto" the cost model decides."""
    dtype = torch.promote_types(z_a.dtype, z_b.dtype)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    if triton_requested_explicitly(backend) or not z_a.is_cuda:
        return True
    n, d = z_a.shape
    return auto_prefers_triton(n, d, dtype, _use_gram(n, d, path), vicreg, torch.backends.cuda.matmul.allow_tf32)


def auto_prefers_triton(n: int, d: int, dtype: torch.dtype, use_gram: bool, vicreg: bool, tf32: bool = False) -> bool:
    """The rule of ``auto`` on CUDA: the Triton kernels unless the cost model predicts the torch
    path faster (see :func:`predicted_seconds`)."""
    torch_seconds, triton_seconds = predicted_seconds(n, d, dtype, use_gram, vicreg, tf32)
    return triton_seconds <= torch_seconds


# --------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------


def _kernels():
    """The Triton kernels' module, its custom ops' backward guarded: under ``"auto"`` a backward
    kernel that fails to compile or launch gives the torch path's gradient (recomputed from the
    op's inputs) after one warning, as the forward does (:func:`fastssl._backend.guard_triton_backward`)."""
    from fastssl.kernels import decorrelation as kernels

    guard_triton_backward(
        kernels._barlow_twins_op, "barlow_twins", kernels._barlow_twins_setup, kernels._barlow_twins_gradient,
        lambda z_a, z_b, lambda_param, bn_eps, use_gram, keep: _barlow_twins_torch(
            z_a, z_b, lambda_param, "gram" if use_gram else "cross"),
    )  # fmt: skip
    guard_triton_backward(
        kernels._vicreg_op, "vicreg", kernels._vicreg_setup, kernels._vicreg_gradient,
        lambda z_a, z_b, lambda_param, mu_param, nu_param, eps, use_gram, keep: _vicreg_torch(
            z_a, z_b, lambda_param, mu_param, nu_param, eps, "gram" if use_gram else "cross"),
    )  # fmt: skip
    return kernels


def _check_path(path: str) -> str:
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    return path


@outside_autocast
def barlow_twins_loss(
    z_a: Tensor,
    z_b: Tensor,
    lambda_param: float = 5e-3,
    *,
    gather_distributed: bool = False,
    backend: str = "auto",
    path: str = "auto",
) -> Tensor:
    r"""Barlow Twins loss (see :func:`fastssl.reference.barlow_twins_loss`).

    Args:
        z_a, z_b: (N, d) projections of two views, N >= 2.
        lambda_param: weight of the off-diagonal (redundancy) term.
        gather_distributed: batch statistics and C over the global batch (see :mod:`fastssl.distributed`).
        backend: ``"auto" | "triton" | "torch" | "reference"``.
        path: ``"gram"`` (N×N Gram matrices, O(N²d)), ``"cross"`` (d×d tiles, O(Nd²)) or
            ``"auto"`` (the cheaper by FLOP count). Ignored by the reference.
    Returns:
        0-d float32 loss.
    """
    check_pair("z_a", z_a, "z_b", z_b, min_rows=2)
    lambda_param = check_finite("lambda_param", lambda_param)
    check_distributed_available("gather_distributed", gather_distributed)
    _check_path(path)
    impl = resolve_backend(backend, z_a)
    if gather_distributed:
        z_a, z_b = distributed.gather(z_a), distributed.gather(z_b)
    if impl == "reference":
        return run_reference(reference.barlow_twins_loss, z_a, z_b, lambda_param)
    if impl == "triton" and _triton_runs(z_a, z_b, backend, path, vicreg=False):
        n, d = z_a.shape

        def run_triton() -> Tensor:
            use_gram = _use_gram(n, d, path)
            return _kernels().barlow_twins_loss_triton(z_a, z_b, lambda_param, use_gram=use_gram, bn_eps=BATCH_NORM_EPS)

        return triton_with_fallback(
            "barlow_twins", backend, run_triton, lambda: _barlow_twins_torch(z_a, z_b, lambda_param, path)
        )
    return _barlow_twins_torch(z_a, z_b, lambda_param, path)


@outside_autocast
def vicreg_loss(
    z_a: Tensor,
    z_b: Tensor,
    lambda_param: float = 25.0,
    mu_param: float = 25.0,
    nu_param: float = 1.0,
    eps: float = 1e-4,
    *,
    gather_distributed: bool = False,
    backend: str = "auto",
    path: str = "auto",
) -> Tensor:
    r"""VICReg loss (see :func:`fastssl.reference.vicreg_loss`).

    Args:
        z_a, z_b: (N, d) projections of two views, N >= 2; or (N, ..., d) as lightly accepts
            (VICRegL's local features): the loss is then the mean over the middle positions of
            the (N, d) loss at each position, which is lightly's formula term by term.
        lambda_param, mu_param, nu_param: weights of invariance, variance and covariance.
        eps: added to the variance under the square root.
        gather_distributed: all three terms over the global batch (see :mod:`fastssl.distributed`).
        path: as for :func:`barlow_twins_loss`.
    Returns:
        0-d float32 loss.
    """
    if isinstance(z_a, Tensor) and isinstance(z_b, Tensor) and max(z_a.dim(), z_b.dim()) > 2:
        if z_a.shape != z_b.shape:
            raise BatchShapeError(
                "z_a and z_b must have the same shape, (batch_size, dim) or (batch_size, ..., dim), "
                f"got {tuple(z_a.shape)} and {tuple(z_b.shape)}"
            )
        # Invariance (a mean over all entries), variance (a mean over positions and features) and
        # covariance (a mean over positions) are all position means of the 2-D terms.
        if z_a.numel() == 0:
            raise ValueError(f"z_a and z_b are empty (shape {tuple(z_a.shape)})")
        per_position = zip(
            z_a.reshape(z_a.shape[0], -1, z_a.shape[-1]).unbind(1),
            z_b.reshape(z_b.shape[0], -1, z_b.shape[-1]).unbind(1),
        )
        losses = [
            vicreg_loss(a, b, lambda_param, mu_param, nu_param, eps,
                        gather_distributed=gather_distributed, backend=backend, path=path)
            for a, b in per_position
        ]  # fmt: skip
        return torch.stack(losses).mean()
    check_pair("z_a", z_a, "z_b", z_b, min_rows=2)
    lambda_param = check_finite("lambda_param", lambda_param)
    mu_param = check_finite("mu_param", mu_param)
    nu_param = check_finite("nu_param", nu_param)
    eps = check_positive("eps", eps, allow_zero=True)
    check_distributed_available("gather_distributed", gather_distributed)
    _check_path(path)
    impl = resolve_backend(backend, z_a)
    if gather_distributed:
        z_a, z_b = distributed.gather(z_a), distributed.gather(z_b)
    if impl == "reference":
        return run_reference(reference.vicreg_loss, z_a, z_b, lambda_param, mu_param, nu_param, eps)
    hyper = (lambda_param, mu_param, nu_param, eps)
    if impl == "triton" and _triton_runs(z_a, z_b, backend, path, vicreg=True):
        n, d = z_a.shape

        def run_triton() -> Tensor:
            return _kernels().vicreg_loss_triton(z_a, z_b, *hyper, use_gram=_use_gram(n, d, path))

        return triton_with_fallback("vicreg", backend, run_triton, lambda: _vicreg_torch(z_a, z_b, *hyper, path))
    return _vicreg_torch(z_a, z_b, *hyper, path)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class BarlowTwinsLoss(nn.Module):
    """Drop-in for ``lightly.loss.BarlowTwinsLoss``.

    Args:
        lambda_param: weight of the redundancy-reduction (off-diagonal) term.
        gather_distributed: statistics and cross-correlation over the global batch.
        backend: ``"auto" | "triton" | "torch" | "reference"`` (env ``FASTSSL_BACKEND``).
        path: ``"auto" | "gram" | "cross"`` (see :func:`barlow_twins_loss`).

    Forward ``(z_a, z_b)``, each (N, d) with N >= 2; returns a 0-d float32 loss.
    """

    def __init__(
        self,
        lambda_param: float = 5e-3,
        gather_distributed: bool = False,
        backend: str = "auto",
        path: str = "auto",
    ) -> None:
        super().__init__()
        self.lambda_param = check_finite("lambda_param", lambda_param)
        check_distributed_available("gather_distributed", gather_distributed)
        self.gather_distributed = gather_distributed
        self.backend = check_backend_name(backend)
        self.path = _check_path(path)

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        """Barlow Twins loss of two views.

        Args:
            z_a: (N, D) embeddings of the first view, N >= 2.
            z_b: (N, D) embeddings of the second view.

        Returns:
            0-d float32 loss: sum of (1 - C_ii)^2 plus ``lambda_param`` x the off-diagonal squares of
            the cross-correlation C of the batch-normalized views.
        """
        return barlow_twins_loss(
            z_a,
            z_b,
            self.lambda_param,
            gather_distributed=self.gather_distributed,
            backend=self.backend,
            path=self.path,
        )


class VICRegLoss(nn.Module):
    """Drop-in for ``lightly.loss.VICRegLoss``.

    Args:
        lambda_param, mu_param, nu_param: weights of invariance, variance and covariance.
        gather_distributed: all terms over the global batch.
        eps: added to the variance under the square root.
        backend: ``"auto" | "triton" | "torch" | "reference"`` (env ``FASTSSL_BACKEND``).
        path: ``"auto" | "gram" | "cross"``.

    Forward ``(z_a, z_b)``, each (N, d) with N >= 2; returns a 0-d float32 loss.
    """

    def __init__(
        self,
        lambda_param: float = 25.0,
        mu_param: float = 25.0,
        nu_param: float = 1.0,
        gather_distributed: bool = False,
        eps: float = 1e-4,
        backend: str = "auto",
        path: str = "auto",
    ) -> None:
        super().__init__()
        self.lambda_param = check_finite("lambda_param", lambda_param)
        self.mu_param = check_finite("mu_param", mu_param)
        self.nu_param = check_finite("nu_param", nu_param)
        self.eps = check_positive("eps", eps, allow_zero=True)
        check_distributed_available("gather_distributed", gather_distributed)
        self.gather_distributed = gather_distributed
        self.backend = check_backend_name(backend)
        self.path = _check_path(path)

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        """VICReg loss of two views.

        Args:
            z_a: (N, ..., D) embeddings of the first view, N >= 2 (extra dimensions are positions:
                the loss is averaged over them).
            z_b: embeddings of the second view, same shape.

        Returns:
            0-d float32 loss: ``lambda_param`` x invariance + ``mu_param`` x variance +
            ``nu_param`` x covariance.
        """
        return vicreg_loss(
            z_a,
            z_b,
            self.lambda_param,
            self.mu_param,
            self.nu_param,
            self.eps,
            gather_distributed=self.gather_distributed,
            backend=self.backend,
            path=self.path,
        )
