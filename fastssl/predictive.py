r"""Predictive (non-contrastive) losses: SimSiam's negative cosine similarity, BYOL's normalized
MSE, and Jha et al.'s simplified center-penalty objective (Jha et al. 2024, Sec. 3.1).

These are O(N·d) elementwise reductions that PyTorch already runs at memory bandwidth, so they
have no Triton kernel, and no optimized path beyond the formula itself: every backend evaluates
the formula of :mod:`fastssl.reference` under the reference backend's dtype rule
(:func:`fastssl._backend.run_reference`: float32 for half inputs, the promoted dtype of views of
different dtypes, gradients in each input's dtype). The formulas scale each vector by a power of
two before its norm, so float32 inputs of any finite magnitude (1e-19 or 1e36) give the
float64 value.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastssl import distributed, reference
from fastssl._backend import check_backend_name, outside_autocast, resolve_backend, run_reference
from fastssl._checks import (
    check_dim,
    check_distributed_available,
    check_finite,
    check_pair,
    check_positive,
)


@outside_autocast
def negative_cosine_similarity(
    x0: Tensor, x1: Tensor, dim: int = 1, eps: float = 1e-8, *, backend: str = "auto"
) -> Tensor:
    r"""SimSiam's loss :math:`-\mathrm{mean}\cos(x_0, x_1)` along ``dim``. Detach the target yourself.

    Args:
        x0, x1: tensors of broadcastable shapes on one device, e.g. (N, d) predictions and
            (N, d) targets.
        dim: the dimension (of the broadcast shape) the cosine is taken along.
        eps: lower bound on each vector's norm, as ``F.cosine_similarity``.
        backend: ``"auto" | "triton" | "torch" | "reference"`` (all run the same formula).
    Returns:
        0-d float32 loss.

    Example::

        p, z = predictor(projector(x0)), projector(x1)
        loss = negative_cosine_similarity(p, z.detach())
    """
    if not isinstance(x0, Tensor) or not isinstance(x1, Tensor):
        raise TypeError("x0 and x1 must be torch.Tensors")
    if not x0.is_floating_point() or not x1.is_floating_point():
        raise TypeError(f"x0 and x1 must be floating-point tensors, got {x0.dtype} and {x1.dtype}")
    if x0.device != x1.device:
        raise ValueError(f"x0 and x1 must be on the same device, got {x0.device} and {x1.device}")
    try:
        shape = torch.broadcast_shapes(x0.shape, x1.shape)
    except RuntimeError:
        raise ValueError(
            f"x0 and x1 must have broadcastable shapes, got {tuple(x0.shape)} and {tuple(x1.shape)}"
        ) from None
    if len(shape) == 0 or 0 in shape:
        raise ValueError(f"x0 and x1 broadcast to the empty shape {tuple(shape)}")
    dim = check_dim("dim", dim, len(shape))
    eps = check_positive("eps", eps, allow_zero=True)
    resolve_backend(backend, x0, has_triton_kernel=False)
    return run_reference(reference.negative_cosine_similarity, x0, x1, dim=dim, eps=eps)


@outside_autocast
def byol_loss(prediction: Tensor, target: Tensor, *, backend: str = "auto") -> Tensor:
    r"""BYOL's :math:`\mathrm{mean}_b\,(2 - 2\cos(p_b, z_b))` for (N, d) inputs. Detach the target yourself.

    Example::

        loss = byol_loss(online_predictor(online(x0)), target_network(x1).detach())
    """
    check_pair("prediction", prediction, "target", target)
    resolve_backend(backend, prediction, has_triton_kernel=False)
    return run_reference(reference.byol_loss, prediction, target)


@outside_autocast
def center_penalty_loss(
    z_a: Tensor,
    z_b: Tensor,
    lambda_param: float = -1.0,
    *,
    gather_distributed: bool = False,
    backend: str = "auto",
) -> Tensor:
    r"""Jha et al.'s simplified objective :math:`0.5\,(L_{inv} - \lambda_L\|s\|)`, eq. (32) of Jha et al. 2024.

    :math:`L_{inv} = \mathrm{mean}_b\|\hat z_a - \hat z_b\|^2` on L2-normalized rows and
    :math:`s` the center vector (mean normalized embedding over both views). The paper's
    :math:`\lambda_L = -1` penalizes the center vector's magnitude.

    Args:
        z_a, z_b: (N, d) projections of two views.
        gather_distributed: use the global batch's center vector (and mean invariance).
    Returns:
        0-d float32 loss.

    Example::

        loss = center_penalty_loss(projector(backbone(x0)), projector(backbone(x1)))
    """
    check_pair("z_a", z_a, "z_b", z_b)
    lambda_param = check_finite("lambda_param", lambda_param)
    check_distributed_available("gather_distributed", gather_distributed)
    resolve_backend(backend, z_a, has_triton_kernel=False)
    if gather_distributed:
        z_a, z_b = distributed.gather(z_a), distributed.gather(z_b)
    return run_reference(reference.center_penalty_loss, z_a, z_b, lambda_param)


class NegativeCosineSimilarity(nn.Module):
    """Drop-in for ``lightly.loss.NegativeCosineSimilarity``: ``-cos(x0, x1).mean()``.

    Args:
        dim: dimension along which the cosine is taken.
        eps: lower bound on each vector's norm.
        backend: ``"auto" | "triton" | "torch" | "reference"`` (all run the same O(N·d) code).

    Forward ``(x0, x1)``: broadcastable tensors on one device, e.g. (N, d); returns a 0-d float32
    loss.

    Example::

        criterion = NegativeCosineSimilarity()
        loss = 0.5 * (criterion(p0, z1.detach()) + criterion(p1, z0.detach()))  # SimSiam
    """

    def __init__(self, dim: int = 1, eps: float = 1e-8, backend: str = "auto") -> None:
        super().__init__()
        self.dim = check_dim("dim", dim)
        self.eps = check_positive("eps", eps, allow_zero=True)
        self.backend = check_backend_name(backend)

    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:
        """Minus the mean cosine similarity of ``x0`` and ``x1`` along ``dim``.

        Args:
            x0: (N, D) (or any shape with the compared axis at ``dim``), e.g. SimSiam's predictions.
            x1: same shape as ``x0``; detach it yourself when it is the target.

        Returns:
            0-d float32 loss in [-1, 1].
        """
        return negative_cosine_similarity(x0, x1, self.dim, self.eps, backend=self.backend)


class CenterPenaltyLoss(nn.Module):
    r"""The simplified SSL objective of Jha et al.: invariance plus a center-vector penalty.

    ``loss = 0.5 * (mean‖ẑ_a − ẑ_b‖² − lambda_param · ‖s‖)`` with ``s`` the mean normalized
    embedding; ``lambda_param=-1`` (the paper's value) penalizes ``‖s‖``.

    Args:
        lambda_param: the Lagrange multiplier :math:`\lambda_L`.
        gather_distributed: center vector over the global batch.
        backend: accepted for symmetry; every backend runs the same O(N·d) code.

    Forward ``(z_a, z_b)``, each (N, d); returns a 0-d float32 loss.

    Example::

        criterion = CenterPenaltyLoss(lambda_param=-1.0)
        loss = criterion(projector(backbone(x0)), projector(backbone(x1)))
    """

    def __init__(
        self, lambda_param: float = -1.0, gather_distributed: bool = False, backend: str = "auto"
    ) -> None:
        super().__init__()
        self.lambda_param = check_finite("lambda_param", lambda_param)
        check_distributed_available("gather_distributed", gather_distributed)
        self.gather_distributed = gather_distributed
        self.backend = check_backend_name(backend)

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        """Jha et al.'s objective: invariance plus ``lambda_param`` x the center-vector norm.

        Args:
            z_a: (N, D) embeddings of the first view.
            z_b: (N, D) embeddings of the second view.

        Returns:
            0-d float32 loss.
        """
        return center_penalty_loss(
            z_a, z_b, self.lambda_param, gather_distributed=self.gather_distributed, backend=self.backend
        )

