r"""TiCo, FroSSL, MMCR, EMP-SSL and patch kernel alignment: functional API, optimized PyTorch path
and the drop-in modules for lightly's ``TiCoLoss``, ``FroSSLLoss``, ``MMCRLoss``, ``EMPSSLLoss``
and ``PatchKernelAlignmentLoss``.

Each loss is a function of small matrices built from the embeddings: a Gram or covariance matrix
(TiCo, FroSSL, EMP-SSL), the singular values of a few short-and-wide matrices (MMCR), or the
inner products of two token kernels (patch kernel alignment). The torch path forms each on the
smaller side and writes its gradient in closed form:

* ``‖ZᵀZ‖_F = ‖ZZᵀ‖_F`` and, by Sylvester's determinant identity,
  ``logdet(I_d + c ZᵀZ) = logdet(I_N + c ZZᵀ)``: FroSSL and EMP-SSL never form a d×d matrix
  when N < d (nor an N×N one when d < N).
* ``⟨K_s, K_t⟩_F = ‖S̃ᵀT̃‖²_F`` for the centered token kernels ``K = X̃X̃ᵀ``: patch kernel
  alignment works on d×d matrices when d < N tokens.
* ``‖X‖_* = Σ sqrt(eig(XXᵀ))`` on the smaller side, in float64, with the gradient
  ``(XXᵀ)^(-1/2) X``: MMCR needs no singular vectors (lightly computes full SVDs).
* EMP-SSL's log-determinant comes from one batched Cholesky factorization of all views.

Gradients with respect to a matrix product are applied with the "value plus zero-valued
gradient carrier" pattern: ``f.detach() + (G.detach() * (x - x.detach())).sum()`` has the value
``f`` and the gradient ``G`` with respect to ``x``, so autograd handles the cheap elementwise
parts (normalization, centering) while the expensive products are never differentiated.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from fastssl import distributed, reference
from fastssl._backend import check_backend_name, outside_autocast, resolve_backend
from fastssl._checks import (
    BatchShapeError,
    check_distributed_available,
    check_finite,
    check_int,
    check_pair,
    check_positive,
    check_tensor,
    check_tensor_list,
)

# Clamp of the HSIC terms under the square root in patch kernel alignment (lightly's value).
CKA_EPS = 1e-6


def _accumulation_dtype(*tensors: Tensor) -> torch.dtype:
    """float32 for float32 and half inputs, float64 when any input is float64."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


class _NormalizeRows(torch.autograd.Function):
    r"""``F.normalize(x, dim=-1, eps=eps)``, ``y = x / max(‖x‖, ε)``, with its gradient in closed
    form: ``(g − y (y·g)) / ‖x‖`` where ``‖x‖ ≥ ε`` and ``g / ε`` below (three passes over x;
    autograd through the norm, clamp and division takes about eight, the larger part of TiCo's
    and EMP-SSL's time on a CPU at their benchmark shapes)."""

    @staticmethod
    def forward(ctx, x: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        denominator = norm.clamp_min(eps)
        y = x / denominator
        ctx.save_for_backward(y, denominator, norm >= eps)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        y, denominator, unclamped = ctx.saved_tensors
        radial = torch.linalg.vecdot(y, grad, dim=-1).unsqueeze(-1) * unclamped
        return torch.addcmul(grad, y, radial, value=-1.0).div_(denominator), None


def _normalize_rows(x: Tensor, eps: float = 1e-12) -> Tensor:
    """``F.normalize(x, dim=-1, eps=eps)`` with a closed-form backward (:class:`_NormalizeRows`)."""
    return _NormalizeRows.apply(x, eps)


def _with_gradient(value: Tensor, gradient: Tensor, x: Tensor) -> Tensor:
    """A tensor equal to ``value`` whose gradient with respect to ``x`` is ``gradient``
    (``(gradient * (x - x.detach())).sum()`` is zero in value but carries the gradient)."""
    return value.detach() + (gradient.detach() * (x - x.detach())).sum()


# --------------------------------------------------------------------------------------------
# TiCo
# --------------------------------------------------------------------------------------------


def _tico_torch(
    z_a: Tensor, z_b: Tensor, covariance: Optional[Tensor], beta: float, rho: float, update_covariance: bool
) -> Tuple[Tensor, Optional[Tensor]]:
    r"""TiCo with C a constant in the contrast term, so its gradient is :math:`2\rho/N\,\hat Z_aC`.

    ``Y = Ẑ_a C`` is all the contrast needs (value ``ρ/N Σ Y∘Ẑ_a``, gradient ``2ρ/N·Y``). When the
    new running covariance is wanted (the module's d×d state) Y comes from it (2 N·d² products);
    otherwise the batch part uses the Gram identity ``Ẑ(ẐᵀẐ) = (ẐẐᵀ)Ẑ`` when N < d.
    """
    n, d = z_a.shape
    acc = _accumulation_dtype(z_a, z_b)
    za = _normalize_rows(z_a.to(acc))
    zb = _normalize_rows(z_b.to(acc))
    invariance = 1 - (za * zb).sum() / n
    zd = za.detach()
    old = None if covariance is None else covariance.to(device=zd.device, dtype=acc)
    new_covariance = None
    if update_covariance or n >= d:
        base = torch.zeros(d, d, device=zd.device, dtype=acc) if old is None else beta * old
        new_covariance = torch.addmm(base, zd.T, zd, alpha=(1 - beta) / n)
        y = zd @ new_covariance
    else:
        y = (zd @ zd.T) @ zd * ((1 - beta) / n)
        if old is not None:
            y = torch.addmm(y, zd, old, alpha=beta)
    contrast = _with_gradient((y * zd).sum() * (rho / n), y * (2 * rho / n), za)
    loss = (invariance + contrast).float()
    return loss, (new_covariance if update_covariance else None)


@outside_autocast
def tico_loss(
    z_a: Tensor,
    z_b: Tensor,
    covariance: Optional[Tensor] = None,
    beta: float = 0.9,
    rho: float = 8.0,
    *,
    update_covariance: bool = True,
    gather_distributed: bool = False,
    backend: str = "auto",
) -> Tuple[Tensor, Optional[Tensor]]:
    r"""TiCo loss (Zhu et al. 2022; see :func:`fastssl.reference.tico_loss`).

    Args:
        z_a, z_b: (N, d) embeddings of two views, N >= 2.
        covariance: the running covariance (d, d) of the previous steps, or ``None`` (zeros).
        beta: EMA coefficient of the running covariance.
        rho: weight of the covariance-contrast term.
        update_covariance: also return the new running covariance.
        gather_distributed: the loss and the covariance over the global batch.
        backend: ``"auto" | "triton" | "torch" | "reference"`` (no Triton kernel: torch).
    Returns:
        ``(loss, new_covariance)``: a 0-d float32 loss and the (d, d) running covariance in the
        accumulation dtype (float32, float64 for float64 inputs), or ``None`` when
        ``update_covariance`` is False.

    Example::

        >>> loss, c = tico_loss(torch.randn(8, 32), torch.randn(8, 32))
        >>> loss, c = tico_loss(torch.randn(8, 32), torch.randn(8, 32), c)
    """
    check_pair("z_a", z_a, "z_b", z_b, min_rows=2)
    beta = check_finite("beta", beta)
    rho = check_finite("rho", rho)
    check_distributed_available("gather_distributed", gather_distributed)
    if covariance is not None:
        check_tensor("covariance", covariance, ndim=2)
        if covariance.shape != (z_a.shape[1], z_a.shape[1]):
            raise ValueError(
                f"covariance must have shape {(z_a.shape[1], z_a.shape[1])} (dim, dim), got "
                f"{tuple(covariance.shape)}"
            )
    impl = resolve_backend(backend, z_a, has_triton_kernel=False)
    if gather_distributed:
        z_a, z_b = distributed.gather(z_a), distributed.gather(z_b)
    if impl == "reference":
        acc = _accumulation_dtype(z_a, z_b)
        old = None if covariance is None else covariance.to(acc)
        loss, new = reference.tico_loss(z_a.to(acc), z_b.to(acc), old, beta, rho)
        return loss.float(), (new if update_covariance else None)
    return _tico_torch(z_a, z_b, covariance, beta, rho, update_covariance)


class TiCoLoss(nn.Module):
    """Drop-in for ``lightly.loss.TiCoLoss`` (Zhu et al. 2022, "TiCo: Transformation Invariance
    and Covariance Contrast").

    ``1 - mean cos(z_a, z_b) + rho * mean_i ẑ_aᵢᵀ C ẑ_aᵢ`` with ``C`` the running covariance of
    the normalized ``z_a``: ``C <- beta C + (1 - beta) ẐᵀẐ/N`` on every call with
    ``update_covariance_matrix=True``. ``C`` is kept, as lightly keeps it, in the plain attribute
    ``self.C`` (``None`` until the first update; float32 here, the input dtype in lightly).

    Args:
        beta: EMA coefficient of the covariance.
        rho: weight of the covariance-contrast term.
        gather_distributed: loss and covariance over the global batch (gradients as :mod:`fastssl.distributed` describes).
        backend: ``"auto" | "triton" | "torch" | "reference"`` (env ``FASTSSL_BACKEND``).

    Forward ``(z_a, z_b, update_covariance_matrix=True)``, each (N, d) with N >= 2; returns a
    0-d float32 loss.

    Example::

        >>> loss_fn = TiCoLoss()
        >>> loss = loss_fn(torch.randn(8, 32), torch.randn(8, 32))
        >>> loss_fn.C.shape
        torch.Size([32, 32])
    """

    def __init__(
        self, beta: float = 0.9, rho: float = 8.0, gather_distributed: bool = False, backend: str = "auto"
    ) -> None:
        super().__init__()
        check_distributed_available("gather_distributed", gather_distributed)
        self.beta = check_finite("beta", beta)
        self.rho = check_finite("rho", rho)
        self.C: Optional[Tensor] = None
        self.gather_distributed = gather_distributed
        self.backend = check_backend_name(backend)

    def forward(self, z_a: Tensor, z_b: Tensor, update_covariance_matrix: bool = True) -> Tensor:
        """TiCo loss of two views; updates the running covariance ``C`` when asked.

        Args:
            z_a: (N, D) embeddings of the online branch, N >= 2.
            z_b: (N, D) embeddings of the momentum branch.
            update_covariance_matrix: update ``C`` with this batch (EMA with ``beta``).

        Returns:
            0-d float32 loss.
        """
        loss, covariance = tico_loss(
            z_a,
            z_b,
            self.C,
            self.beta,
            self.rho,
            update_covariance=update_covariance_matrix,
            gather_distributed=self.gather_distributed,
            backend=self.backend,
        )
        if update_covariance_matrix:
            self.C = covariance.detach()
        return loss


# --------------------------------------------------------------------------------------------
# FroSSL
# --------------------------------------------------------------------------------------------


class _FroSSLFunction(torch.autograd.Function):
    r"""FroSSL of the stacked views Z (V, N, d) with a hand-written backward.

    With :math:`\hat Z` the column-normalized views (column norms r, clamped at 1e-12 as
    ``F.normalize``), G the Gram matrix on the smaller side and :math:`\bar Z` the mean view,

    .. math:: L = \sum_v \big(\log\|G_v\|_F^2 - 2\log\mathrm{tr}\,G_v\big)
              + w\,\frac{V}{N}\sum_v\|\hat Z_v - \bar Z\|^2

    The trace ``Σ_j ‖ẑ_j‖²`` counts the non-zero columns (each has unit norm): a constant, as
    lightly's ``.item()`` makes it, here without a host synchronization. The gradient with
    respect to :math:`\hat Z_v` is :math:`4G_v\hat Z_v/\|G_v\|^2` (N×N side; :math:`4\hat Z_vG_v/\|G_v\|^2`
    on the d×d side) plus :math:`2w\frac VN(\hat Z_v - \bar Z)` (the mean's own contribution sums
    to zero over the views), and through the normalization, per column,
    :math:`(g - \hat z\,(\hat z\cdot g))/r`.
    """

    @staticmethod
    def forward(ctx, z: Tensor, invariance_weight: float) -> Tensor:  # type: ignore[override]
        n_views, n, d = z.shape
        norms = torch.linalg.vector_norm(z, dim=1, keepdim=True).clamp_min(1e-12)
        zn = z / norms
        trace = zn.square().sum(dim=(1, 2))
        gram = zn.mT @ zn if n > d else zn @ zn.mT
        squared_norm = gram.square().sum(dim=(1, 2))
        mean_view = zn.mean(dim=0)
        deviation = zn - mean_view
        loss = (torch.log(squared_norm) - 2 * torch.log(trace)).sum()
        loss = loss + invariance_weight * (n_views / n) * deviation.square().sum()
        ctx.save_for_backward(zn, norms, gram, squared_norm, deviation)
        ctx.invariance_weight = invariance_weight
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor):  # type: ignore[override]
        zn, norms, gram, squared_norm, deviation = ctx.saved_tensors
        n_views, n, d = zn.shape
        direction = zn @ gram if n > d else gram @ zn
        grad_zn = torch.add(
            direction * (4 / squared_norm)[:, None, None],
            deviation,
            alpha=2 * ctx.invariance_weight * n_views / n,
        )
        # through ẑ = z / r per column: (g - ẑ (ẑ·g)) / r
        grad_z = (grad_zn - zn * (zn * grad_zn).sum(dim=1, keepdim=True)) / norms
        return grad_z * grad_loss, None


def _frossl_torch(z_views: Sequence[Tensor], invariance_weight: float) -> Tensor:
    acc = _accumulation_dtype(*z_views)
    z = torch.stack([v.to(acc) for v in z_views])  # (V, N, d); gradients back in each view's dtype
    return _FroSSLFunction.apply(z, invariance_weight).float()


@outside_autocast
def frossl_loss(z_views: Sequence[Tensor], invariance_weight: float = 1.0, *, backend: str = "auto") -> Tensor:
    r"""FroSSL loss (Skean et al. 2024; see :func:`fastssl.reference.frossl_loss`).

    Args:
        z_views: V >= 2 tensors (N, d) of the same shape, one per view.
        invariance_weight: weight of the invariance term.
        backend: ``"auto" | "triton" | "torch" | "reference"`` (no Triton kernel: torch).
    Returns:
        0-d float32 loss.

    Example::

        >>> loss = frossl_loss([torch.randn(8, 32), torch.randn(8, 32)])
    """
    if isinstance(z_views, (list, tuple)) and len(z_views) < 2:
        raise ValueError(f"z_views must contain at least two views but found {len(z_views)}.")
    z_views = check_tensor_list("z_views", z_views, min_len=2, same_shape=True)
    invariance_weight = check_finite("invariance_weight", invariance_weight)
    impl = resolve_backend(backend, z_views[0], has_triton_kernel=False)
    if impl == "reference":
        acc = _accumulation_dtype(*z_views)
        return reference.frossl_loss([z.to(acc) for z in z_views], invariance_weight).float()
    return _frossl_torch(z_views, invariance_weight)


class FroSSLLoss(nn.Module):
    """Drop-in for ``lightly.loss.FroSSLLoss`` (Skean et al. 2024, "FroSSL: Frobenius Norm
    Minimization for Self-Supervised Learning").

    Per view, the log squared Frobenius norm of the trace-normalized covariance of the
    column-normalized embeddings (on the smaller of the N×N and d×d sides), plus
    ``invariance_weight`` times V·d·MSE to the mean view.

    Args:
        invariance_weight: weight of the invariance term.
        backend: ``"auto" | "triton" | "torch" | "reference"``.

    Forward ``(z_views)``: a list of V >= 2 tensors (N, d); returns a 0-d float32 loss.

    Example::

        >>> loss_fn = FroSSLLoss()
        >>> loss = loss_fn([torch.randn(8, 32), torch.randn(8, 32)])
    """

    def __init__(self, invariance_weight: float = 1.0, backend: str = "auto") -> None:
        super().__init__()
        self.invariance_weight = check_finite("invariance_weight", invariance_weight)
        self.backend = check_backend_name(backend)

    def forward(self, z_views: List[Tensor]) -> Tensor:
        """FroSSL loss of two or more views.

        Args:
            z_views: list of V >= 2 tensors (N, D), one per view.

        Returns:
            0-d float32 loss: the views' log Frobenius norms plus the invariance term.
        """
        return frossl_loss(z_views, self.invariance_weight, backend=self.backend)


# --------------------------------------------------------------------------------------------
# MMCR: nuclear norms from the eigenvalues of the smaller Gram matrix
# --------------------------------------------------------------------------------------------


class _NuclearNorm(torch.autograd.Function):
    r"""``‖X‖_*`` over the last two dimensions of X (..., m, n).

    The singular values are the square roots of the eigenvalues of the smaller Gram matrix
    (``XXᵀ`` when m <= n), formed and decomposed in float64 so that squaring the condition number
    costs no float32 accuracy. ``eigh`` of a symmetric matrix has no convergence failure of the
    kind SVD drivers report on ill-conditioned input (lightly #1599). The gradient is
    ``Σ_i u_i v_iᵀ = (XXᵀ)^(-1/2) X = W diag(1/σ) Wᵀ X``; singular values below NumPy's
    float32 matrix-rank tolerance ``σ_max · max(m, n) · eps`` get none (the minimum-norm
    subgradient: rank-deficient inputs give finite gradients). Non-finite input gives NaN.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        m, n = x.shape[-2:]
        x64 = x.detach().to(torch.float64)
        wide = m <= n
        gram = x64 @ x64.mT if wide else x64.mT @ x64
        finite = torch.isfinite(gram).all(dim=-1).all(dim=-1)
        gram = torch.where(finite[..., None, None], gram, torch.zeros_like(gram))
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)
        sigma = eigenvalues.clamp_min(0).sqrt()
        value = torch.where(finite, sigma.sum(dim=-1), torch.full_like(sigma[..., 0], math.nan))
        ctx.save_for_backward(x, eigenvectors, sigma)
        ctx.wide = wide
        return value.to(_accumulation_dtype(x))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_value: Tensor):  # type: ignore[override]
        x, eigenvectors, sigma = ctx.saved_tensors
        tolerance = sigma.amax(dim=-1, keepdim=True) * (max(x.shape[-2:]) * torch.finfo(torch.float32).eps)
        inverse = torch.where(sigma > tolerance, 1 / sigma.clamp_min(1e-300), torch.zeros_like(sigma))
        inverse_sqrt = (eigenvectors * inverse[..., None, :]) @ eigenvectors.mT
        x64 = x.to(torch.float64)
        grad = inverse_sqrt @ x64 if ctx.wide else x64 @ inverse_sqrt
        return (grad * grad_value.to(torch.float64)[..., None, None]).to(x.dtype)


def nuclear_norm(x: Tensor) -> Tensor:
    """``‖X‖_*`` over the last two dimensions (float32, float64 for float64 input), batched."""
    return _NuclearNorm.apply(x)


def _mmcr_torch(online: Tensor, momentum: Tensor, lmda: float) -> Tensor:
    acc = _accumulation_dtype(online, momentum)
    z = torch.cat([online.to(acc), momentum.to(acc)], dim=1)  # (B, 2k, d)
    centroids = z.mean(dim=1)
    per_sample = nuclear_norm(z).sum() if lmda != 0 else z.new_zeros(())
    return (-nuclear_norm(centroids) + lmda * per_sample / online.shape[0]).float()


@outside_autocast
def mmcr_loss(online: Tensor, momentum: Tensor, lmda: float = 5e-3, *, backend: str = "auto") -> Tensor:
    r"""MMCR loss (Yerxa et al. 2023; see :func:`fastssl.reference.mmcr_loss`).

    Args:
        online, momentum: (B, k, d) embeddings of k views of B samples from the online and the
            momentum network.
        lmda: weight of the per-sample nuclear norms, >= 0.
        backend: ``"auto" | "triton" | "torch" | "reference"`` (no Triton kernel: torch).
    Returns:
        0-d float32 loss.

    Example::

        >>> loss = mmcr_loss(torch.randn(4, 2, 16), torch.randn(4, 2, 16))
    """
    check_tensor("online", online, ndim=3)
    check_tensor("momentum", momentum, ndim=3)
    if online.shape != momentum.shape:
        raise BatchShapeError(
            f"online and momentum need to have the same shape, got {tuple(online.shape)} and "
            f"{tuple(momentum.shape)}"
        )
    lmda = check_positive("lmda", lmda, allow_zero=True)
    impl = resolve_backend(backend, online, has_triton_kernel=False)
    if impl == "reference":
        acc = _accumulation_dtype(online, momentum)
        return reference.mmcr_loss(online.to(acc), momentum.to(acc), lmda).float()
    return _mmcr_torch(online, momentum, lmda)


class MMCRLoss(nn.Module):
    """Drop-in for ``lightly.loss.MMCRLoss`` (Yerxa et al. 2023, "Efficient Coding of Natural
    Images using Maximum Manifold Capacity Representations").

    ``-‖C‖_* + lmda/B · Σ_b ‖Z_b‖_*`` with C (B, d) the centroids of each sample's 2k views and
    Z_b (2k, d) its views. Singular values come from float64 eigenvalues of the smaller Gram
    matrix (no singular vectors, no SVD convergence failures; see :func:`nuclear_norm`).

    Args:
        lmda: weight of the per-sample term, >= 0.
        backend: ``"auto" | "triton" | "torch" | "reference"``.

    Forward ``(online, momentum)``, each (B, k, d); returns a 0-d float32 loss.

    Example::

        >>> loss_fn = MMCRLoss()
        >>> loss = loss_fn(torch.randn(4, 2, 16), torch.randn(4, 2, 16))
    """

    def __init__(self, lmda: float = 5e-3, backend: str = "auto") -> None:
        super().__init__()
        if check_finite("lmda", lmda) < 0:
            raise ValueError("lmda must be greater than or equal to 0")
        self.lmda = float(lmda)
        self.backend = check_backend_name(backend)

    def forward(self, online: Tensor, momentum: Tensor) -> Tensor:
        """MMCR loss: nuclear norm of the centroid matrix, with the per-sample penalty.

        Args:
            online: (N, k, D) online outputs, k augmented views per sample.
            momentum: (N, k, D) momentum-branch outputs, same shape.

        Returns:
            0-d float32 loss.
        """
        return mmcr_loss(online, momentum, self.lmda, backend=self.backend)


# --------------------------------------------------------------------------------------------
# EMP-SSL: total coding rate by batched Cholesky on the smaller side
# --------------------------------------------------------------------------------------------


class _CodingRateLogDet(torch.autograd.Function):
    r"""``logdet(I_d + c Z_vᵀZ_v)`` for every view v of Z (V, N, d), as (V,).

    By Sylvester's identity this equals ``logdet(I_N + c Z_vZ_vᵀ)``; the smaller side is
    factored, ``M = LLᵀ``, and ``logdet M = 2 Σ log L_ii``. M >= I for c > 0, so the Cholesky
    factorization cannot fail on finite input (no jitter needed); non-finite input gives NaN.
    Gradient: ``2c Z (I + cZᵀZ)^-1 = 2c (I + cZZᵀ)^-1 Z``, one triangular solve pair.
    """

    @staticmethod
    def forward(ctx, z: Tensor, c: float) -> Tensor:  # type: ignore[override]
        _, n, d = z.shape
        batch_side = n < d
        m = z @ z.mT if batch_side else z.mT @ z
        m = m * c
        m.diagonal(dim1=-2, dim2=-1).add_(1)
        factor, info = torch.linalg.cholesky_ex(m)
        logdet = 2 * factor.diagonal(dim1=-2, dim2=-1).log().sum(dim=-1)
        logdet = torch.where(info == 0, logdet, torch.full_like(logdet, math.nan))
        ctx.save_for_backward(z, factor)
        ctx.c, ctx.batch_side = c, batch_side
        return logdet

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logdet: Tensor):  # type: ignore[override]
        z, factor = ctx.saved_tensors
        if ctx.batch_side:
            solved = torch.cholesky_solve(z, factor)
        else:
            solved = torch.cholesky_solve(z.mT, factor).mT
        return solved * (2 * ctx.c * grad_logdet)[:, None, None], None


_COSINE_EPS = 1e-8  # F.cosine_similarity's default


def _emp_ssl_torch(z_views: Sequence[Tensor], tcr_eps: float, inv_coef: float) -> Tensor:
    acc = _accumulation_dtype(*z_views)
    z = torch.stack([v.to(acc) for v in z_views])
    views, n, d = z.shape
    coding_rate = 0.5 * _CodingRateLogDet.apply(z, d / (n * tcr_eps)).mean()
    # Σ_v Σ_i cos(z_vi, z̄_i) = Σ_i ẑ̄_i · Σ_v ẑ_vi (cosine_similarity's ε on each norm, as
    # F.normalize's): one dot per sample instead of V broadcast cosines, whose backward is about
    # 3x slower on a CPU.
    z_hat = _normalize_rows(z, eps=_COSINE_EPS)
    mean_hat = _normalize_rows(z.mean(dim=0), eps=_COSINE_EPS)
    invariance = -torch.linalg.vecdot(z_hat.sum(dim=0), mean_hat).sum() / (views * n)
    return (coding_rate + inv_coef * invariance).float()


@outside_autocast
def emp_ssl_loss(
    z_views: Sequence[Tensor], tcr_eps: float = 0.2, inv_coef: float = 200.0, *, backend: str = "auto"
) -> Tensor:
    r"""EMP-SSL loss (Tong et al. 2023; see :func:`fastssl.reference.emp_ssl_loss`).

    Args:
        z_views: V >= 1 tensors (N, d) of the same shape, one per view (patch).
        tcr_eps: ε of the total coding rate (unsquared, as the authors' code), > 0.
        inv_coef: weight of the invariance term.
        backend: ``"auto" | "triton" | "torch" | "reference"`` (no Triton kernel: torch).
    Returns:
        0-d float32 loss.

    Example::

        >>> loss = emp_ssl_loss([torch.randn(8, 32) for _ in range(4)])
    """
    z_views = check_tensor_list("z_views", z_views, min_len=1, same_shape=True)
    tcr_eps = check_positive("tcr_eps", tcr_eps)
    inv_coef = check_finite("inv_coef", inv_coef)
    impl = resolve_backend(backend, z_views[0], has_triton_kernel=False)
    if impl == "reference":
        acc = _accumulation_dtype(*z_views)
        return reference.emp_ssl_loss([z.to(acc) for z in z_views], tcr_eps, inv_coef).float()
    return _emp_ssl_torch(z_views, tcr_eps, inv_coef)


class EMPSSLLoss(nn.Module):
    """Drop-in for ``lightly.loss.EMPSSLLoss`` (Tong et al. 2023, "EMP-SSL: Towards
    Self-Supervised Learning in One Training Epoch").

    ``½ mean_v logdet(I + d/(N ε) Z_vᵀZ_v) - inv_coef · mean cos(z_v, mean view)``; every view's
    log-determinant from one batched Cholesky factorization on the smaller side (N×N when N < d).

    Args:
        tcr_eps: ε of the total coding rate (unsquared), > 0.
        inv_coef: weight of the invariance term.
        backend: ``"auto" | "triton" | "torch" | "reference"``.

    Forward ``(z_views)``: a list of V tensors (N, d); returns a 0-d float32 loss.

    Example::

        >>> loss_fn = EMPSSLLoss()
        >>> loss = loss_fn([torch.randn(8, 32) for _ in range(4)])
    """

    def __init__(self, tcr_eps: float = 0.2, inv_coef: float = 200.0, backend: str = "auto") -> None:
        super().__init__()
        self.tcr_eps = check_positive("tcr_eps", tcr_eps)
        self.inv_coef = check_finite("inv_coef", inv_coef)
        self.backend = check_backend_name(backend)

    def forward(self, z_views: List[Tensor]) -> Tensor:
        """EMP-SSL loss: total coding rate of each view plus invariance to the mean view.

        Args:
            z_views: list of V >= 2 tensors (N, D) of patch embeddings, one per view.

        Returns:
            0-d float32 loss.
        """
        return emp_ssl_loss(z_views, self.tcr_eps, self.inv_coef, backend=self.backend)


# --------------------------------------------------------------------------------------------
# Patch kernel alignment (linear CKA of token kernels)
# --------------------------------------------------------------------------------------------


class _FeatureSideInnerProducts(torch.autograd.Function):
    r"""Per image, ``(⟨K_s, K_t⟩_F, ‖K_s‖²_F, ‖K_t‖²_F)`` of the centered kernels ``K = X̃X̃ᵀ``,
    given the centered features S̃, T̃ (B, N, d) with d < N: the Gram identity in reverse, on
    d×d matrices, ``⟨K_s, K_t⟩ = ‖S̃ᵀT̃‖²``, ``‖K_s‖² = ‖S̃ᵀS̃‖²``, with the gradients
    ``2 T̃ (S̃ᵀT̃)ᵀ`` and ``4 S̃ (S̃ᵀS̃)``. T̃ gets no gradient."""

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor):  # type: ignore[override]
        st, ss, tt = s.mT @ t, s.mT @ s, t.mT @ t
        ctx.save_for_backward(s, t, st, ss)
        products = (st.square().sum(dim=(1, 2)), ss.square().sum(dim=(1, 2)), tt.square().sum(dim=(1, 2)))
        ctx.mark_non_differentiable(products[2])
        return products

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_st: Tensor, grad_ss: Tensor, _grad_tt: Tensor):  # type: ignore[override]
        s, t, st, ss = ctx.saved_tensors
        grad = torch.baddbmm(s @ (ss * (4 * grad_ss)[:, None, None]), t, st.mT * (2 * grad_st)[:, None, None])
        return grad, None


class _TokenSideInnerProducts(torch.autograd.Function):
    r"""The same inner products from the N×N kernels (N <= d), double-centered over the valid
    tokens as lightly does it: ``K̃ = Q K Q`` with ``Q = diag(w) - wwᵀ/n`` the (idempotent)
    centering on the n valid tokens. Since ``⟨Q K_s Q, K̃_t⟩ = ⟨K_s, K̃_t⟩``, the gradients with
    respect to the raw student features S are ``2 K̃_t S`` and ``4 K̃_s S``: only O(N²) work
    beyond the two kernels and one product."""

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor, weights: Tensor):  # type: ignore[override]
        k_s, k_t = _double_center(s @ s.mT, weights), _double_center(t @ t.mT, weights)
        ctx.save_for_backward(s, k_s, k_t)
        products = ((k_s * k_t).sum(dim=(1, 2)), k_s.square().sum(dim=(1, 2)), k_t.square().sum(dim=(1, 2)))
        ctx.mark_non_differentiable(products[2])
        return products

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_st: Tensor, grad_ss: Tensor, _grad_tt: Tensor):  # type: ignore[override]
        s, k_s, k_t = ctx.saved_tensors
        kernel = k_t * (2 * grad_st)[:, None, None] + k_s * (4 * grad_ss)[:, None, None]
        return kernel @ s, None, None


def _double_center(kernel: Tensor, weights: Tensor) -> Tensor:
    """``(K - row means - column means + total mean) ∘ wwᵀ`` over the valid tokens (B, N, N)."""
    count = weights.sum(dim=-1).clamp(min=1.0)[:, None]
    row_mean = (kernel @ weights[..., None])[..., 0] / count  # K is symmetric: column means too
    total = (row_mean * weights).sum(dim=-1, keepdim=True) / count
    centered = kernel - row_mean[:, :, None] - row_mean[:, None, :] + total[:, :, None]
    return centered * weights[:, :, None] * weights[:, None, :]


def _prepare_dense_features(
    student: Tensor, teacher: Tensor, mask: Optional[Tensor], max_tokens: Optional[int]
) -> Tuple[Tensor, Tensor, Tensor]:
    """Detach the teacher, turn ``mask`` (True = ignore) into validity weights and, when
    ``N > max_tokens``, draw ``max_tokens`` tokens per image preferring valid ones -- with the
    same random draws as lightly (``torch.rand`` scores, invalid ones set to +inf, lowest kept)."""
    teacher = teacher.detach()
    batch_size, n_tokens, _ = student.shape
    if mask is None:
        valid = student.new_ones(batch_size, n_tokens)
    else:
        valid = (~mask).to(device=student.device, dtype=student.dtype)
    if max_tokens is not None and n_tokens > max_tokens:
        scores = torch.rand(batch_size, n_tokens, device=student.device).masked_fill(valid == 0, math.inf)
        indices = scores.topk(max_tokens, dim=1, largest=False).indices
        student = torch.gather(student, 1, indices[..., None].expand(-1, -1, student.shape[-1]))
        teacher = torch.gather(teacher, 1, indices[..., None].expand(-1, -1, teacher.shape[-1]))
        valid = torch.gather(valid, 1, indices)
    return student, teacher, valid


def _patch_kernel_alignment_torch(student: Tensor, teacher: Tensor, valid: Tensor) -> Tensor:
    r"""When d < N, double centering of ``K = XXᵀ`` over the valid tokens equals ``X̃X̃ᵀ`` with
    ``X̃ = (X - mean over valid tokens) ∘ valid``: the features are centered and the kernels'
    inner products taken on the d×d side. Otherwise the N×N kernels are formed and centered."""
    acc = _accumulation_dtype(student, teacher)
    weights = valid.to(acc)
    if student.shape[-1] < student.shape[-2]:
        count = weights.sum(dim=1, keepdim=True).clamp(min=1.0)[..., None]

        def center(x: Tensor) -> Tensor:
            x = x.to(acc)
            return (x - (x * weights[..., None]).sum(dim=1, keepdim=True) / count) * weights[..., None]

        hsic_st, hsic_ss, hsic_tt = _FeatureSideInnerProducts.apply(center(student), center(teacher))
    else:
        hsic_st, hsic_ss, hsic_tt = _TokenSideInnerProducts.apply(student.to(acc), teacher.to(acc), weights)
    cka = hsic_st / (hsic_ss.clamp_min(CKA_EPS).sqrt() * hsic_tt.clamp_min(CKA_EPS).sqrt())
    valid_image = (weights.sum(dim=-1) >= 2).to(acc)
    # Images with fewer than two valid tokens are left out; none left gives 0 (no host sync).
    return (((1 - cka) * valid_image).sum() / valid_image.sum().clamp(min=1.0)).float()


def _check_dense(student: object, teacher: object, mask: object) -> None:
    """lightly's checks of dense features (ValueError), plus fastssl's dtype checks."""
    for name, x in (("student_features", student), ("teacher_features", teacher)):
        check_tensor(name, x, ndim=None)
        assert isinstance(x, Tensor)
        if x.dim() != 3:
            raise ValueError(f"{name} must have shape (B, N, D) but has shape {tuple(x.shape)}.")
    assert isinstance(student, Tensor) and isinstance(teacher, Tensor)
    if student.shape != teacher.shape:
        raise ValueError(
            f"student_features and teacher_features must have the same shape but have "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}."
        )
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.shape != student.shape[:2]:
            raise ValueError(f"mask must have shape {tuple(student.shape[:2])} but has shape {tuple(mask.shape)}.")
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must have dtype torch.bool but has dtype {mask.dtype}.")


def _check_max_tokens(max_tokens: Optional[int]) -> Optional[int]:
    if max_tokens is None:
        return None
    max_tokens = check_int("max_tokens", max_tokens, minimum=-(2**62))
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2 or None but is {max_tokens}.")
    return max_tokens


@outside_autocast
def patch_kernel_alignment_loss(
    student_features: Tensor,
    teacher_features: Tensor,
    mask: Optional[Tensor] = None,
    max_tokens: Optional[int] = None,
    *,
    backend: str = "auto",
) -> Tensor:
    r"""Patch kernel alignment loss (PaKa 2025; see :func:`fastssl.reference.patch_kernel_alignment_loss`).

    Args:
        student_features: (B, N, d) dense student features.
        teacher_features: (B, N, d) dense teacher features (detached).
        mask: optional (B, N) bool, True marks a token to ignore.
        max_tokens: if set and N > max_tokens, that many tokens per image are drawn at random
            (preferring valid ones), as lightly does.
        backend: ``"auto" | "triton" | "torch" | "reference"`` (no Triton kernel: torch).
    Returns:
        0-d float32 loss: mean of ``1 - CKA`` over the images with at least two valid tokens.

    Example::

        >>> s, t = torch.randn(2, 16, 8), torch.randn(2, 16, 8)
        >>> loss = patch_kernel_alignment_loss(s, t)
    """
    _check_dense(student_features, teacher_features, mask)
    max_tokens = _check_max_tokens(max_tokens)
    impl = resolve_backend(backend, student_features, has_triton_kernel=False)
    student, teacher, valid = _prepare_dense_features(student_features, teacher_features, mask, max_tokens)
    if impl == "reference":
        acc = _accumulation_dtype(student, teacher)
        return reference.patch_kernel_alignment_loss(student.to(acc), teacher.to(acc), valid.to(acc)).float()
    return _patch_kernel_alignment_torch(student, teacher, valid)


class PatchKernelAlignmentLoss(nn.Module):
    """Drop-in for ``lightly.loss.PatchKernelAlignmentLoss`` (PaKa, "Patch-Level Kernel
    Alignment for Dense Self-Supervised Learning", 2025).

    Per image, ``1 - CKA`` between the double-centered linear kernels of the student's and the
    (detached) teacher's tokens, averaged over images with at least two valid tokens. The
    kernels' inner products are formed on the d×d side when d < N (``⟨K_s, K_t⟩ = ‖S̃ᵀT̃‖²``).

    Args:
        max_tokens: if not None and N > max_tokens, subsample that many tokens per image.
        backend: ``"auto" | "triton" | "torch" | "reference"``.

    Forward ``(student_features, teacher_features, mask=None)``: (B, N, d), (B, N, d) and an
    optional (B, N) bool mask (True = ignore); returns a 0-d float32 loss.

    Example::

        >>> loss_fn = PatchKernelAlignmentLoss()
        >>> loss = loss_fn(student_features=torch.randn(2, 16, 8), teacher_features=torch.randn(2, 16, 8))
    """

    def __init__(self, max_tokens: Optional[int] = None, backend: str = "auto") -> None:
        super().__init__()
        self.max_tokens = _check_max_tokens(max_tokens)
        self.backend = check_backend_name(backend)

    def forward(self, student_features: Tensor, teacher_features: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """1 - linear CKA between the student's and the teacher's token kernels, per image.

        Args:
            student_features: (B, N, D) dense student features.
            teacher_features: (B, N, D) dense teacher features (no gradient flows to them).
            mask: optional (B, N) boolean tensor, True for tokens to ignore.

        Returns:
            0-d float32 loss: the mean over images with at least two valid tokens (a
            differentiable zero when none has).
        """
        return patch_kernel_alignment_loss(
            student_features, teacher_features, mask, self.max_tokens, backend=self.backend
        )
