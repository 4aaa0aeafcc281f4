r"""SwAV: Sinkhorn-Knopp codes and the swapped-prediction loss over multi-crop; functional API,
optimized PyTorch path and the drop-in :class:`SwaVLoss`. The Triton kernels live in
:mod:`fastssl.kernels.sinkhorn`.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn

from fastssl import distributed, reference
from fastssl.distributed import all_reduce_logsumexp
from fastssl._backend import check_backend_name, outside_autocast, resolve_backend, triton_with_fallback
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
#
# Sinkhorn-Knopp in the log domain. SwAV's code (and lightly's) iterates on
# Q = exp(S/ε)ᵀ ∈ R^{K×B}: normalize Q to sum 1; then `iterations` times divide every row
# (prototype k) by its sum over the batch and every column (sample b) by its sum over the
# prototypes and by B; finally multiply by B and transpose. With L = S/ε (B×K) every iterate has
# the form log Q[b, k] = L[b, k] − a_k − c_b, and the two normalizations only replace one
# potential each:
#
#   rows:    a_k ← LSE_b(L[b, k] − c_b)     (the previous a_k is constant over b and drops out)
#   columns: c_b ← LSE_k(L[b, k] − a_k) + log B
#
# The initial division by the global sum is a constant that the first row normalization removes,
# so c starts at 0, and the final codes are Q[b, :]·B = softmax_k(L[b, :] − a). Each LSE shifts
# by its running maximum, so no exp overflows and no row or column sum underflows to zero for
# any finite scores and ε (lightly's exp(S/ε) is inf beyond S/ε ≈ 88 in float32). Without
# iterations the codes are B·exp(L − LSE_{b,k} L), which the same arithmetic gives.
#
# Distributed (codes over the global batch): the sums over samples -- the prototype potentials
# a and, without iterations, the global sum -- are log-sum-exps over all ranks' rows, combined
# by an all-reduced maximum and an all-reduced sum of shifted exponentials; the sample potentials
# are rank-local and B is the global batch size.


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.no_grad()
def _sinkhorn_log_domain(logits: Tensor, iterations: int, rows_out: int, gather_distributed: bool) -> Tensor:
    """Sinkhorn codes from ``logits = scores / ε``.

    Args:
        logits: (H, N, K) float32/float64; H independent problems (one per high-resolution crop).
        rows_out: codes are returned for the first ``rows_out`` of the N samples (the batch
            without its queue).
        gather_distributed: marginals over all ranks' samples.
    Returns:
        (H, rows_out, K) codes, each row summing to 1 when ``iterations >= 1``.
    """
    distributed_on = gather_distributed and distributed.is_distributed()
    reduce = all_reduce_logsumexp if distributed_on else (lambda t: t)
    if iterations == 0:
        n_global = logits.shape[1] * (distributed.world_size() if distributed_on else 1)
        log_total = reduce(torch.logsumexp(logits.flatten(1), dim=1))  # (H,)
        log_scale = math.log(n_global) - log_total
        return torch.exp(logits[:, :rows_out] + log_scale[:, None, None])
    sample_potential = torch.zeros_like(logits[:, :, :1])  # c, (H, N, 1)
    prototype_potential = sample_potential  # a, (H, 1, K); assigned by the first iteration
    for it in range(iterations):
        prototype_potential = reduce(torch.logsumexp(logits - sample_potential, dim=1, keepdim=True))
        if it + 1 < iterations:
            sample_potential = torch.logsumexp(logits - prototype_potential, dim=2, keepdim=True)
    return torch.softmax(logits[:, :rows_out] - prototype_potential, dim=2)


@torch.no_grad()
def _sinkhorn_torch(scores: Tensor, iterations: int, epsilon: float, gather_distributed: bool) -> Tensor:
    logits = scores.detach().to(_compute_dtype(scores)) / epsilon
    codes = _sinkhorn_log_domain(logits[None], iterations, scores.shape[0], gather_distributed)[0]
    return codes.float()


def _swav_torch(
    high: Sequence[Tensor],
    low: Sequence[Tensor],
    queue: Optional[Sequence[Tensor]],
    temperature: float,
    iterations: int,
    epsilon: float,
    gather_distributed: bool,
) -> Tensor:
    """Swapped prediction with all crops batched: one Sinkhorn for the H high-resolution crops,
    one log-softmax for the V crops.

    With q_i the codes of crop i < H and log p_v = log_softmax(s_v/τ),

        L = −1/(H (V−1) B) Σ_v Σ_{b,k} (Σ_{i<H, i≠v} q_i)[b, k] · log p_v[b, k],

    the sum over pairs (i, v≠i) regrouped by prediction crop v: the target of crop v is the sum
    of all codes minus its own. Each term is a non-negative weight times a log-probability, so no
    large terms cancel. Autograd gives ∂L/∂s_v = ((Σ_k t_v) p_v − t_v)/(τ H (V−1) B).
    """
    n_high = len(high)
    crops = list(high) + list(low)
    n_crops = len(crops)
    batch = high[0].shape[0]
    compute_dtype = _compute_dtype(high[0])
    with torch.no_grad():
        if queue is None:
            sinkhorn_scores = torch.stack([h.detach() for h in high])
        else:
            sinkhorn_scores = torch.stack([torch.cat([h.detach(), q.detach()]) for h, q in zip(high, queue)])
        codes = _sinkhorn_log_domain(
            sinkhorn_scores.to(compute_dtype) / epsilon, iterations, batch, gather_distributed
        )
        all_codes = codes.sum(dim=0)
    log_probs = torch.log_softmax(torch.stack(crops).to(compute_dtype) / temperature, dim=2)
    total = log_probs.new_zeros(())
    for v in range(n_crops):
        target = all_codes - codes[v] if v < n_high else all_codes
        total = total + (target * log_probs[v]).sum()
    local_loss = (-total / (n_high * (n_crops - 1) * batch)).float()
    # DESIGN §3: the loss is the mean over this rank's samples (codes carry no gradient); report
    # the mean over ranks, keeping this rank's gradient (world_size × the single-process slice).
    if gather_distributed:
        return distributed.global_mean(local_loss)
    return local_loss


# --------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------


@outside_autocast
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

        def run_triton() -> Tensor:
            from fastssl.kernels.sinkhorn import sinkhorn_triton

            return sinkhorn_triton(scores, iterations, epsilon, gather_distributed=gather_distributed)

        return triton_with_fallback(
            "sinkhorn", backend, run_triton, lambda: _sinkhorn_torch(scores, iterations, epsilon, gather_distributed)
        )
    return _sinkhorn_torch(scores, iterations, epsilon, gather_distributed)


@outside_autocast
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
    def run_torch() -> Tensor:
        return _swav_torch(
            high, low, queue_outputs, temperature, sinkhorn_iterations, sinkhorn_epsilon, sinkhorn_gather_distributed
        )

    if impl == "triton":

        def run_triton() -> Tensor:
            from fastssl.kernels.sinkhorn import swav_loss_triton

            return swav_loss_triton(
                high, low, queue_outputs, temperature, sinkhorn_iterations, sinkhorn_epsilon,
                gather_distributed=sinkhorn_gather_distributed,
            )  # fmt: skip

        return triton_with_fallback("swav", backend, run_triton, run_torch)
    return run_torch()


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
