r"""Distributed primitives behind every ``gather_distributed=True``.

The contract: with W processes each holding a slice of the global batch (any per-rank sizes),

* the loss each rank returns equals the single-process loss on the concatenation of all
  ranks' batches;
* each rank's input gradient equals ``W ×`` the matching slice of the single-process gradient,
  so that DDP's gradient averaging yields exactly the global gradient.

Two tools give that for every loss:

* :func:`gather` concatenates the ranks' tensors with a backward that *sums* the incoming
  gradients over ranks before taking this rank's slice. If every rank computes the same
  global loss ``L`` from the gathered tensor, rank k receives ``Σ_j ∂L/∂x_k = W ∂L/∂x_k``.
* :func:`global_mean` makes a rank-local loss ``L_k`` (the mean over this rank's ``n_k`` rows)
  *report* the global mean ``Σ_j n_j L_j / N`` (``N = Σ_j n_j``) and carry the gradient of
  ``(W n_k / N) L_k``. Since ``L = Σ_j n_j L_j / N``, that local gradient (with the other
  ranks' terms reaching x through :func:`gather`) is ``W ∂L/∂x``, the contract again. With
  equal sizes the factor is 1.

Ranks may hold different numbers of rows (DDP without ``drop_last`` gives a short last batch):
the gathers exchange the row counts first and pad to the largest, since ``all_gather`` needs
equal shapes.
"""

from __future__ import annotations

from typing import List, Optional

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


def gather_sizes(rows: int, device: torch.device) -> List[int]:
    """Every rank's row count (one tiny all-gather; the counts are read on the host)."""
    count = torch.tensor([rows], dtype=torch.int64, device=device)
    counts = [torch.empty_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    return [int(c) for c in torch.cat(counts).tolist()]


def _all_gather_padded(x: Tensor, sizes: List[int]) -> Tensor:
    """Concatenate every rank's ``x`` (``sizes[r]`` rows on rank r) along dim 0."""
    x = x.contiguous()
    largest = max(sizes)
    if all(size == largest for size in sizes):
        parts = [torch.empty_like(x) for _ in sizes]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=0)
    padded = x.new_zeros((largest,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)], dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward all-reduces (sums) the gradient and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: List[int]) -> Tensor:  # type: ignore[override]
        rank_ = dist.get_rank()
        ctx.start, ctx.stop = sum(sizes[:rank_]), sum(sizes[: rank_ + 1])
        return _all_gather_padded(x, sizes)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        # Every rank holds the gradient of the whole concatenation: same shape everywhere.
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.stop], None


def gather(x: Tensor, sizes: Optional[List[int]] = None) -> Tensor:
    """Concatenate ``x`` (n_rank, ...) from all ranks into (Σ n_rank, ...), differentiably.

    Args:
        x: this rank's rows; ranks may hold different numbers of rows.
        sizes: every rank's row count, when already known (see :func:`gather_sizes`).

    Outside a multi-process group it returns ``x`` itself.
    """
    if not is_distributed():
        return x
    if sizes is None:
        sizes = gather_sizes(x.shape[0], x.device)
    return _GatherWithGrad.apply(x, sizes)


@torch.no_grad()
def gather_no_grad(x: Tensor, sizes: Optional[List[int]] = None) -> Tensor:
    """Concatenate ``x`` from all ranks without a gradient (memory banks, queues, statistics)."""
    if not is_distributed():
        return x
    if sizes is None:
        sizes = gather_sizes(x.shape[0], x.device)
    return _all_gather_padded(x, sizes)


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


def global_mean(local_loss: Tensor, local_rows: Optional[int] = None) -> Tensor:
    """Report the row-weighted mean of ``local_loss`` over ranks, with the contract's gradient.

    Args:
        local_loss: this rank's loss, a mean over its ``local_rows`` rows.
        local_rows: the row count behind ``local_loss``; None weighs every rank equally (right
            when all ranks hold the same number of rows).

    Returns ``Σ_j n_j L_j / N`` in value, and the gradient of ``(W n_k / N) L_k`` (module doc).
    The weights stay on the device: no host sync.
    """
    if not is_distributed():
        return local_loss
    world = dist.get_world_size()
    with torch.no_grad():
        weight = torch.ones((), dtype=local_loss.dtype, device=local_loss.device)
        if local_rows is not None:
            weight = weight * local_rows
        packed = torch.stack([local_loss.detach() * weight, weight])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        mean = packed[0] / packed[1]
        scale = world * weight / packed[1]
    scaled = local_loss * scale
    return scaled + (mean - scaled.detach())


def rank_row_offset(local_rows: int, group_rank: Optional[int] = None, sizes: Optional[List[int]] = None) -> int:
    """Index of this rank's first row in the gathered tensor (``sizes`` for unequal ranks)."""
    rank_ = rank() if group_rank is None else group_rank
    if sizes is not None:
        return sum(sizes[:rank_])
    return rank_ * local_rows
