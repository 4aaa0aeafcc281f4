r"""Distributed primitives behind every ``gather_distributed=True``.

The contract (DESIGN §3): with W processes each holding a slice of the global batch,

* the loss each rank returns equals the single-process loss on the concatenation of all
  ranks' batches;
* each rank's input gradient equals ``W ×`` the matching slice of the single-process gradient,
  so that DDP's gradient averaging yields exactly the global gradient.

Two tools give that for every loss:

* :func:`gather` concatenates the ranks' tensors with a backward that *sums* the incoming
  gradients over ranks before taking this rank's slice. If every rank computes the same
  global loss ``L`` from the gathered tensor, rank k receives ``Σ_j ∂L/∂x_k = W ∂L/∂x_k``.
* :func:`global_mean` makes a rank-local loss ``L_k`` (e.g. the mean over this rank's rows only)
  *report* the global mean ``(1/W) Σ_j L_j`` while its gradient stays ``∂L_k/∂x``: the value
  is corrected by a detached all-reduced scalar. Since ``L = (1/W) Σ_j L_j``, the local
  gradient ``∂L_k/∂x`` (when the other ranks' terms reach x through :func:`gather`) is
  ``W ∂L/∂x``, the contract again.

All ranks must pass tensors of the same shape (equal per-rank batch sizes).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True inside an initialized process group with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward all-reduces (sums) the gradient and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rows = x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather(x: Tensor) -> Tensor:
    """Concatenate ``x`` (n, ...) from all ranks into (W·n, ...), differentiably.

    Outside a multi-process group it returns ``x`` itself.
    """
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from all ranks without a gradient (memory banks, queues)."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum_(x: Tensor) -> Tensor:
    """In-place sum over ranks of a tensor that carries no gradient (Sinkhorn's marginals)."""
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_logsumexp(log_sums: Tensor) -> Tensor:
    """Elementwise ``log Σ_ranks exp(log_sums)``: the log-sum-exp over every rank's terms, given
    each rank's own (any shape; a no-op outside a multi-process group). Sinkhorn's marginals over
    the global batch (Caron et al. 2020, Sec. 3.1) combine this way."""
    if not is_distributed():
        return log_sums
    shift = log_sums.detach().clone()
    dist.all_reduce(shift, op=dist.ReduceOp.MAX)
    # An all -inf entry (no mass anywhere) stays -inf instead of becoming exp(-inf + inf) = NaN.
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    shifted = torch.exp(log_sums - shift)
    all_reduce_sum_(shifted)
    return shift + torch.log(shifted)


def global_mean(local_loss: Tensor) -> Tensor:
    """Report the mean of ``local_loss`` over ranks, keeping the local gradient (see module doc)."""
    if not is_distributed():
        return local_loss
    with torch.no_grad():
        mean = local_loss.detach().clone()
        dist.all_reduce(mean, op=dist.ReduceOp.SUM)
        mean /= dist.get_world_size()
    return local_loss + (mean - local_loss.detach())


def rank_row_offset(local_rows: int, group_rank: Optional[int] = None) -> int:
    """Index of this rank's first row in the gathered tensor."""
    return (rank() if group_rank is None else group_rank) * local_rows
