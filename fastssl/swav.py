r"""SwAV: Sinkhorn-Knopp codes and the swapped-prediction loss over multi-crop; functional API,
optimized PyTorch path and the drop-in :class:`SwaVLoss`. The Triton kernels live in
:mod:`fastssl.kernels.sinkhorn`.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn

from fastssl import reference
from fastssl._backend import check_backend_name, resolve_backend
from fastssl._checks import (
    check_distributed_available,
    check_int,
    check_nonzero,
    check_positive,
    check_tensor,
    check_tensor_list,
)

# --------------------------------------------------------------------------------------------
# Optimized PyTorch path
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def _sinkhorn_torch(scores: Tensor, iterations: int, epsilon: float, gather_distributed: bool) -> Tensor:
    # Placeholder until the log-domain path lands.
    return reference.sinkhorn(scores.float(), iterations, epsilon)


def _swav_torch(
    high: Sequence[Tensor],
    low: Sequence[Tensor],
    queue: Optional[Sequence[Tensor]],
    temperature: float,
    iterations: int,
    epsilon: float,
    gather_distributed: bool,
) -> Tensor:
    return reference.swav_loss(
        [h.float() for h in high], [v.float() for v in low],
        None if queue is None else [q.float() for q in queue], temperature, iterations, epsilon,
    ).float()


# --------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------


def sinkhorn(
    scores: Tensor,
    iterations: int = 3,
    epsilon: float = 0.05,
    *,
    gather_distributed: bool = False,
    backend: str = "auto",
) -> Tensor:
    r"""Sinkhorn-Knopp equipartition codes (see :func:`fastssl.reference.sinkhorn`), stable for
    any scores and ε (the optimized backends work in the log domain).

    Args:
        scores: (B, K) prototype scores; no gradient flows through the codes.
        gather_distributed: marginals summed over all ranks between iterations.
    Returns:
        (B, K) float32 codes, each row summing to 1.
    """
    check_tensor("scores", scores)
    check_int("iterations", iterations, minimum=0)
    epsilon = check_nonzero("epsilon", epsilon)
    check_positive("epsilon", epsilon)
    check_distributed_available("gather_distributed", gather_distributed)
    impl = resolve_backend(backend, scores)
    if impl == "reference":
        return reference.sinkhorn(scores, iterations, epsilon).float()
    if impl == "triton":
        from fastssl.kernels.sinkhorn import sinkhorn_triton

        return sinkhorn_triton(scores, iterations, epsilon, gather_distributed=gather_distributed)
    return _sinkhorn_torch(scores, iterations, epsilon, gather_distributed)


def swav_loss(
    high_resolution_outputs: Sequence[Tensor],
    low_resolution_outputs: Sequence[Tensor] = (),
    queue_outputs: Optional[Sequence[Tensor]] = None,
    temperature: float = 0.1,
    sinkhorn_iterations: int = 3,
    sinkhorn_epsilon: float = 0.05,
    *,
    sinkhorn_gather_distributed: bool = False,
    backend: str = "auto",
) -> Tensor:
    r"""SwAV's swapped-prediction loss (see :func:`fastssl.reference.swav_loss`).

    Args:
        high_resolution_outputs: list of H >= 1 tensors (B, K) of prototype scores.
        low_resolution_outputs: list of (B, K) tensors of the small crops.
        queue_outputs: optional list of H tensors (Q, K): scores of earlier batches,
            appended for Sinkhorn only.
    Returns:
        0-d float32 loss.
    """
    high = check_tensor_list("high_resolution_outputs", high_resolution_outputs, same_shape=True)
    low = check_tensor_list("low_resolution_outputs", low_resolution_outputs, min_len=0)
    k = high[0].shape[1]
    for i, v in enumerate(low):
        if v.shape != high[0].shape:
            raise ValueError(
                f"low_resolution_outputs[{i}] has shape {tuple(v.shape)}, expected {tuple(high[0].shape)}"
            )
    if len(high) + len(low) < 2:
        raise ValueError("SwAV needs at least two crops in all (high + low resolution)")
    if queue_outputs is not None:
        queue = check_tensor_list("queue_outputs", queue_outputs)
        if len(queue) != len(high):
            raise ValueError(
                f"queue_outputs must hold one tensor per high-resolution crop ({len(high)}), got {len(queue)}"
            )
        for i, q in enumerate(queue):
            if q.shape[1] != k:
                raise ValueError(f"queue_outputs[{i}] has {q.shape[1]} prototypes, expected {k}")
    temperature = check_nonzero("temperature", temperature)
    check_int("sinkhorn_iterations", sinkhorn_iterations, minimum=0)
    sinkhorn_epsilon = check_positive("sinkhorn_epsilon", sinkhorn_epsilon)
    check_distributed_available("sinkhorn_gather_distributed", sinkhorn_gather_distributed)
    impl = resolve_backend(backend, high[0])
    if impl == "reference":
        return reference.swav_loss(
            high, low, queue_outputs, temperature, sinkhorn_iterations, sinkhorn_epsilon
        ).float()
    if impl == "triton":
        from fastssl.kernels.sinkhorn import swav_loss_triton

        return swav_loss_triton(
            high, low, queue_outputs, temperature, sinkhorn_iterations, sinkhorn_epsilon,
            gather_distributed=sinkhorn_gather_distributed,
        )
    return _swav_torch(
        high, low, queue_outputs, temperature, sinkhorn_iterations, sinkhorn_epsilon, sinkhorn_gather_distributed
    )


# --------------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------------


class SwaVLoss(nn.Module):
    """Drop-in for ``lightly.loss.SwaVLoss``.

    Args:
        temperature: softmax temperature of the predictions.
        sinkhorn_iterations: Sinkhorn-Knopp iterations.
        sinkhorn_epsilon: entropic regularization (scores are divided by it).
        sinkhorn_gather_distributed: Sinkhorn marginals over the global batch.
        backend: ``"auto" | "triton" | "torch" | "reference"`` (env ``FASTSSL_BACKEND``).

    Forward ``(high_resolution_outputs, low_resolution_outputs, queue_outputs=None)``: lists of
    (B, K) prototype scores; returns a 0-d float32 loss.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        sinkhorn_iterations: int = 3,
        sinkhorn_epsilon: float = 0.05,
        sinkhorn_gather_distributed: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.temperature = check_nonzero("temperature", temperature)
        self.sinkhorn_iterations = check_int("sinkhorn_iterations", sinkhorn_iterations, minimum=0)
        self.sinkhorn_epsilon = check_positive("sinkhorn_epsilon", sinkhorn_epsilon)
        check_distributed_available("sinkhorn_gather_distributed", sinkhorn_gather_distributed)
        self.sinkhorn_gather_distributed = sinkhorn_gather_distributed
        self.backend = check_backend_name(backend)

    def forward(
        self,
        high_resolution_outputs: List[Tensor],
        low_resolution_outputs: List[Tensor],
        queue_outputs: Optional[List[Tensor]] = None,
    ) -> Tensor:
        return swav_loss(
            high_resolution_outputs,
            low_resolution_outputs,
            queue_outputs,
            self.temperature,
            self.sinkhorn_iterations,
            self.sinkhorn_epsilon,
            sinkhorn_gather_distributed=self.sinkhorn_gather_distributed,
            backend=self.backend,
        )
