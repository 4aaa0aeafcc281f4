r"""Barlow Twins and VICReg: functional API, optimized PyTorch path and the drop-in modules.
The Triton kernels live in :mod:`fastssl.kernels.decorrelation`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastssl import distributed, reference
from fastssl._backend import check_backend_name, resolve_backend
from fastssl._checks import check_distributed_available, check_finite, check_pair, check_positive

PATHS = ("auto", "gram", "cross")

# --------------------------------------------------------------------------------------------
# Optimized PyTorch path
# --------------------------------------------------------------------------------------------


def _barlow_twins_torch(z_a: Tensor, z_b: Tensor, lambda_param: float, path: str) -> Tensor:
    # Placeholder until the Gram-identity path lands: the reference in float32.
    acc = torch.promote_types(z_a.dtype, torch.float32)
    return reference.barlow_twins_loss(z_a.to(acc), z_b.to(acc), lambda_param).float()


def _vicreg_torch(
    z_a: Tensor, z_b: Tensor, lambda_param: float, mu_param: float, nu_param: float, eps: float, path: str
) -> Tensor:
    acc = torch.promote_types(z_a.dtype, torch.float32)
    return reference.vicreg_loss(z_a.to(acc), z_b.to(acc), lambda_param, mu_param, nu_param, eps).float()


# --------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------


def _check_path(path: str) -> str:
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    return path


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
        gather_distributed: batch statistics and C over the global batch (DESIGN §3).
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
        return reference.barlow_twins_loss(z_a, z_b, lambda_param).float()
    if impl == "triton":
        from fastssl.kernels.decorrelation import barlow_twins_loss_triton

        return barlow_twins_loss_triton(z_a, z_b, lambda_param, path=path)
    return _barlow_twins_torch(z_a, z_b, lambda_param, path)


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
        z_a, z_b: (N, d) projections of two views, N >= 2.
        lambda_param, mu_param, nu_param: weights of invariance, variance and covariance.
        eps: added to the variance under the square root.
        gather_distributed: all three terms over the global batch (DESIGN §3).
        path: as for :func:`barlow_twins_loss`.
    Returns:
        0-d float32 loss.
    """
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
        return reference.vicreg_loss(z_a, z_b, lambda_param, mu_param, nu_param, eps).float()
    if impl == "triton":
        from fastssl.kernels.decorrelation import vicreg_loss_triton

        return vicreg_loss_triton(z_a, z_b, lambda_param, mu_param, nu_param, eps, path=path)
    return _vicreg_torch(z_a, z_b, lambda_param, mu_param, nu_param, eps, path)


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
