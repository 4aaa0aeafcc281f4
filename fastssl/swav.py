r"""SwAV: Sinkhorn-Knopp codes and the swapped-prediction loss over multi-crop; functional API,
optimized PyTorch path and the drop-in :class:`SwaVLoss`. The Triton kernels live in
:mod:`fastssl.kernels.sinkhorn`.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from fastssl import distributed, reference
from fastssl.distributed import all_reduce_logsumexp
from fastssl._backend import (
    check_backend_name,
    guard_triton_backward,
    outside_autocast,
    resolve_backend,
    run_reference,
    triton_with_fallback,
)
from fastssl._checks import (  # check_*temperature: also importable from here, as before
    check_distributed_available,
    check_int,
    check_module_temperature,
    check_nonzero,
    check_positive,
    check_temperature,
    check_tensor,
    check_tensor_list,
)

# --------------------------------------------------------------------------------------------
# Optimized PyTorch path
# --------------------------------------------------------------------------------------------
#
# Sinkhorn-Knopp. SwAV's code (and lightly's) iterates on Q = exp(S/ε)ᵀ ∈ R^{K×B}: normalize Q
# to sum 1; then `iterations` times divide every row (prototype k) by its sum over the batch and
# every column (sample b) by its sum over the prototypes and by B; finally multiply by B and
# transpose. With L = S/ε (B×K) every iterate has the form log Q[b, k] = L[b, k] − a_k − c_b,
# and the two normalizations only replace one potential each:
#
#   rows:    a_k ← LSE_b(L[b, k] − c_b)     (the previous a_k is constant over b and drops out)
#   columns: c_b ← LSE_k(L[b, k] − a_k) + log B
#
# The initial division by the global sum is a constant that the first row normalization removes,
# so c starts at 0, and the final codes are Q[b, :]·B = softmax_k(L[b, :] − a). Without
# iterations the codes are B·exp(L − LSE_{b,k} L).
#
# The first row normalization is done exactly, a = LSE_b(L) with max shifts (no overflow for any
# finite scores and ε, where lightly's exp(S/ε) is inf beyond S/ε ≈ 88 in float32; see
# _sinkhorn_log_domain for the in-place form). Its result E = softmax_k(L − a) -- the codes after
# one iteration -- is well scaled: every row sums to 1 and every column to at least 1/K (each
# exp(L[b, k] − a_k) ≤ 1 and each column of exp(L − a) sums to 1). The remaining iterations are
# the classic Sinkhorn scalings
# of that fixed matrix, u = 1/(E v) and v = 1/(Eᵀ u) (Cuturi 2013, Alg. 1), two matrix-vector
# products per iteration instead of two log-sum-exp sweeps with an exponential per element; the
# codes are E diag(v) with every row normalized. v is rescaled to max 1 after each update (the
# normalized codes do not depend on its scale), so the scalings stay far inside the float range
# for any iteration count SwAV uses.
#
# Distributed (codes over the global batch): the sums over samples -- the first potential a, the
# column products Eᵀu and, without iterations, the global sum -- are reduced over all ranks
# (a log-sum-exp across ranks, then plain sums); the sample scalings are rank-local, and B is the
# global number of rows, whatever each rank holds.


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.no_grad()
def _sinkhorn_log_domain(logits: Tensor, iterations: int, rows_out: int, gather_distributed: bool) -> Tensor:
    """Sinkhorn codes from ``logits = scores / ε`` (the algorithm above).

    Args:
        logits: (H, N, K) float32/float64; H independent problems (one per high-resolution crop).
            Overwritten (the algorithm runs in place in this buffer).
        rows_out: codes are returned for the first ``rows_out`` of the N samples (the batch
            without its queue).
        gather_distributed: marginals over all ranks' samples (any per-rank N).
    Returns:
        (H, rows_out, K) codes, each row summing to 1 when ``iterations >= 1``.
    """
    distributed_on = gather_distributed and distributed.is_distributed()
    n_samples = logits.shape[1]
    if iterations == 0:
        log_total = torch.logsumexp(logits.flatten(1), dim=1)  # (H,)
        if distributed_on:
            log_total = all_reduce_logsumexp(log_total)
            # The global row count, summed on the device (no host read).
            n_global = distributed.all_reduce_sum_(torch.full((), n_samples, dtype=logits.dtype, device=logits.device))
            log_scale = torch.log(n_global) - log_total
        else:
            log_scale = math.log(n_samples) - log_total
        return torch.exp(logits[:, :rows_out] + log_scale[:, None, None])
    # First row normalization, exactly, in place (no fresh (H, N, K) buffer: on CPU every large
    # allocation is paid again in page faults). With column maxima m_k and, after them, row
    # maxima d_b, X = exp(L − m − d) has a 1 in every row; the column sums of exp(L − m) are
    # Σ_b X[b, k] e^{d_b} (a matrix-vector product, ≥ 1: the column's maximum row adds 1), and
    # E' = X / colsum is the codes after one iteration up to a factor per row (≥ 1/N per row
    # maximum: no row underflows, whatever the scores' range). Rows are normalized by the sample
    # scalings below (u starts at 1/rowsum E'), which absorb those factors.
    column_max = logits.amax(dim=1, keepdim=True)  # (H, 1, K)
    if distributed_on:
        torch.distributed.all_reduce(column_max, op=torch.distributed.ReduceOp.MAX)
    kernel = logits.sub_(column_max)
    row_max = kernel.amax(dim=2, keepdim=True)  # d ≤ 0, (H, N, 1)
    kernel.sub_(row_max).exp_()
    column = torch.bmm(torch.exp(row_max).transpose(1, 2), kernel)  # (H, 1, K)
    if distributed_on:
        distributed.all_reduce_sum_(column)
    kernel.mul_(column.reciprocal_())  # E'
    # Entries below 2**-100 (float32; 2**-996 in float64) are flushed to 0: negligible beside
    # each row's maximum (≥ 1/N), but subnormal (or made so by the scalings), and CPU products
    # with subnormals take a slow path (10-20x slower matrix-vector products).
    torch.nn.functional.threshold(kernel, torch.finfo(kernel.dtype).tiny * 2.0**26, 0.0, inplace=True)
    sample_scale = kernel.sum(dim=2, keepdim=True).reciprocal_()  # u, (H, N, 1)
    prototype_scale: Optional[Tensor] = None  # v, (H, 1, K)
    for it in range(1, iterations):
        column = torch.bmm(sample_scale.transpose(1, 2), kernel)
        if distributed_on:
            distributed.all_reduce_sum_(column)
        prototype_scale = column.reciprocal_()
        prototype_scale = prototype_scale / prototype_scale.amax(dim=2, keepdim=True)
        if it + 1 < iterations:
            sample_scale = torch.bmm(kernel, prototype_scale.transpose(1, 2)).reciprocal_()
    codes = kernel[:, :rows_out]
    if prototype_scale is not None:
        codes.mul_(prototype_scale)
    return codes.div_(codes.sum(dim=2, keepdim=True))


@torch.no_grad()
def _sinkhorn_torch(scores: Tensor, iterations: int, epsilon: float, gather_distributed: bool) -> Tensor:
    logits = scores.detach().to(_compute_dtype(scores)) / epsilon
    codes = _sinkhorn_log_domain(logits[None], iterations, scores.shape[0], gather_distributed)[0]
    return codes.float()


@torch.no_grad()
def _swav_codes(
    high: Sequence[Tensor], queue: Optional[Sequence[Tensor]], iterations: int, epsilon: float,
    gather_distributed: bool, dtype: torch.dtype,
) -> Tensor:  # fmt: skip
    """(H, B, K) codes of the high-resolution crops in ``dtype`` (queues appended for Sinkhorn
    only): one batched problem, or one per crop when the queues differ in length."""
    batch = high[0].shape[0]
    if queue is None:
        problems = [h.detach() for h in high]
    else:
        problems = [torch.cat([h.detach(), q.detach().to(h.dtype)]) for h, q in zip(high, queue)]
    if len({p.shape[0] for p in problems}) > 1:
        return torch.cat(
            [_sinkhorn_log_domain(p.to(dtype)[None] / epsilon, iterations, batch, gather_distributed) for p in problems]
        )
    # L = S/ε written straight into the stacked (H, N, K) buffer: one pass, one allocation.
    logits = torch.empty((len(problems),) + tuple(problems[0].shape), dtype=dtype, device=problems[0].device)
    for i, p in enumerate(problems):
        torch.mul(p if p.dtype == dtype else p.to(dtype), 1.0 / epsilon, out=logits[i])
    return _sinkhorn_log_domain(logits, iterations, batch, gather_distributed)


class _SwappedPredictionFunction(torch.autograd.Function):
    """The swapped-prediction loss given the codes, its gradients computed in the forward.

    Inputs ``(temperature, codes, n_high, normalizer, unit_row_sums, *crops)``: temperature a
    float or a one-element tensor; codes (H, B, K) in the compute dtype, no gradient; the V crops
    (B, K). With x_v = s_v/τ, p_v = softmax(x_v) and targets T_v = Σ_{i<H} q_i − [v < H] q_v,

        L = −1/M Σ_v ⟨T_v, log p_v⟩,   M = H (V−1) B,
        ∂L/∂s_v = (w_v p_v − T_v)/(τ M),   w_v = Σ_k T_v[b, k] (H − [v < H] for normalized codes),
        ∂L/∂τ = −1/τ Σ_v ⟨∂L/∂x_v, x_v⟩ = −1/(τ M) Σ_v ⟨w_v p_v − T_v, x_v⟩.

    Per crop: one scaled copy, its row maxima, one exponential, two dot products for the loss and
    three in-place passes for the gradient, with two (B, K) allocations -- no autograd graph over
    (V, B, K) intermediates (whose select-backward zero fills cost more than the loss itself on
    CPU).
    """

    @staticmethod
    def forward(ctx, temperature, codes, n_high, normalizer, unit_row_sums, *crops):  # type: ignore[override]
        dtype = codes.dtype
        temperature_is_tensor = isinstance(temperature, Tensor)
        need_crop_grad = ctx.needs_input_grad[5:]
        need_temperature_grad = temperature_is_tensor and ctx.needs_input_grad[0]
        if temperature_is_tensor:
            inv_temperature = temperature.detach().to(dtype).reshape(()).reciprocal()
            grad_scale = inv_temperature / normalizer
        else:
            inv_temperature = 1.0 / temperature
            grad_scale = inv_temperature / normalizer
        # Targets T_v = Σ_{i<H, i≠v} q_i: with two high-resolution crops (SwAV's setting) each
        # high crop's target is the other's codes, taken as they are.
        all_codes = codes.sum(dim=0) if n_high != 2 or len(crops) > 2 else None
        total = codes.new_zeros(())
        temperature_grad = codes.new_zeros(())
        grads: List[Optional[Tensor]] = []
        for v, crop in enumerate(crops):
            if v >= n_high:
                target = all_codes
            elif n_high == 2:
                target = codes[1 - v]
            else:
                target = all_codes - codes[v]
            # Row-max shifted logits y = x − max_k x (in place), e = exp(y), S = Σ_k e: then
            # log p = y − log S and p = e/S, one exponential per element. ⟨T, log p⟩ =
            # ⟨T, y⟩ − Σ_b w_b log S_b adds terms of one sign (y ≤ 0, log S ≥ 0): no cancellation,
            # whatever common offset the scores carry.
            shifted = crop.detach().to(dtype) * inv_temperature
            row_max = shifted.amax(dim=1, keepdim=True)
            shifted.sub_(row_max)
            grad = torch.exp(shifted)  # e; becomes the gradient in place
            log_sum = grad.sum(dim=1, keepdim=True).log_()
            if unit_row_sums:
                matches = n_high - 1 if v < n_high else n_high
                weight_log_sum = log_sum.sum() * matches
            else:
                weights = target.sum(dim=1, keepdim=True)
                weight_log_sum = torch.dot(weights.reshape(-1), log_sum.reshape(-1))
            total = total + torch.dot(target.reshape(-1), shifted.reshape(-1)) - weight_log_sum
            if not (need_crop_grad[v] or need_temperature_grad):
                grads.append(None)
                continue
            # M τ ∂L/∂s_v = w p − T = (w/S) e − T.
            grad.mul_((matches * torch.exp(-log_sum)) if unit_row_sums else weights * torch.exp(-log_sum))
            grad.sub_(target)
            if need_temperature_grad:
                # ⟨g, x⟩ = ⟨g, y⟩ + Σ_b max_b Σ_k g[b, k] (x = y + max, restored exactly).
                dot = torch.dot(grad.reshape(-1), shifted.reshape(-1))
                dot = dot + torch.dot(grad.sum(dim=1), row_max.reshape(-1))
                temperature_grad = temperature_grad - dot * (inv_temperature / normalizer)
            grads.append(grad.mul_(grad_scale).to(crop.dtype) if need_crop_grad[v] else None)
        ctx.save_for_backward(*[g for g in grads if g is not None])
        ctx.has_grad = [g is not None for g in grads]
        ctx.temperature_grad = temperature_grad if need_temperature_grad else None
        ctx.temperature_meta = (temperature.shape, temperature.dtype) if temperature_is_tensor else None
        return (-total / normalizer).float()

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        saved = iter(ctx.saved_tensors)
        crop_grads = []
        for has in ctx.has_grad:
            if has:
                g = next(saved)
                crop_grads.append(g * grad_loss.to(g.dtype))
            else:
                crop_grads.append(None)
        temperature_grad = None
        if ctx.temperature_grad is not None:
            shape, dtype = ctx.temperature_meta
            temperature_grad = (ctx.temperature_grad * grad_loss).to(dtype).reshape(shape)
        return (temperature_grad, None, None, None, None, *crop_grads)


def _swav_torch(
    high: Sequence[Tensor],
    low: Sequence[Tensor],
    queue: Optional[Sequence[Tensor]],
    temperature: Union[float, Tensor],
    iterations: int,
    epsilon: float,
    gather_distributed: bool,
) -> Tensor:
    """Swapped prediction with all crops batched: one Sinkhorn for the H high-resolution crops,
    then :class:`_SwappedPredictionFunction` over the V crops.

    Regrouped by prediction crop v, the sum over pairs (i, v≠i) of lightly's loop is

        L = −1/(H (V−1) B) Σ_v Σ_{b,k} (Σ_{i<H, i≠v} q_i)[b, k] · log p_v[b, k]:

    the target of crop v is the sum of all codes minus its own. Each term is a non-negative
    weight times a log-probability, so no large terms cancel.
    """
    local_loss = _swav_local_torch(list(high) + list(low), queue, len(high), temperature, iterations, epsilon,
                                   gather_distributed)
    batch = high[0].shape[0]
    # Distributed contract: the loss is the mean over this rank's samples (codes carry no gradient); report
    # the row-weighted mean over ranks, with this rank's gradient scaled to W × its slice of the
    # single-process gradient.
    if gather_distributed:
        return distributed.global_mean(local_loss, batch)
    return local_loss


def _swav_local_torch(
    crops: Sequence[Tensor],
    queue: Optional[Sequence[Tensor]],
    n_high: int,
    temperature: Union[float, Tensor],
    iterations: int,
    epsilon: float,
    gather_distributed: bool,
) -> Tensor:
    """This rank's loss on the torch path (codes of the first ``n_high`` crops, over the global
    batch with ``gather_distributed``): what the Triton custom op returns, from its inputs."""
    high = crops[:n_high]
    batch = high[0].shape[0]
    codes = _swav_codes(high, queue, iterations, epsilon, gather_distributed, _compute_dtype(high[0]))
    normalizer = n_high * (len(crops) - 1) * batch
    return _SwappedPredictionFunction.apply(temperature, codes, n_high, normalizer, iterations > 0, *crops)


def _swav_op_torch_loss(crops, queue, n_high, temperature, temperature_tensor, iterations, epsilon,
                        gather_distributed, compute_grad, compute_temperature_grad) -> Tensor:  # fmt: skip
    """The torch path's loss as a function of ``fastssl::swav``'s inputs (its backward's fallback)."""
    tau = temperature if temperature_tensor is None else temperature_tensor
    return _swav_local_torch(crops, queue, n_high, tau, iterations, epsilon, gather_distributed)


def _swav_kernels():
    """The Triton kernels' module, the SwAV custom op's backward guarded: under ``"auto"`` a
    backward kernel that fails gives the torch path's gradient after one warning
    (:func:`fastssl._backend.guard_triton_backward`)."""
    from fastssl.kernels import sinkhorn as kernels

    guard_triton_backward(kernels._swav_op, "swav", kernels._swav_setup, kernels._swav_gradient, _swav_op_torch_loss)
    return kernels


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
        if gather_distributed and distributed.is_distributed():
            # The textbook formula on the global batch; this rank's rows of its codes.
            sizes = distributed.gather_sizes(scores.shape[0], scores.device)
            start = distributed.rank_row_offset(scores.shape[0], sizes=sizes)
            codes = run_reference(reference.sinkhorn, distributed.gather_no_grad(scores.detach(), sizes), iterations, epsilon)
            return codes[start : start + scores.shape[0]]
        return run_reference(reference.sinkhorn, scores, iterations, epsilon)
    if impl == "triton":

        def run_triton() -> Tensor:
            from fastssl.kernels.sinkhorn import sinkhorn_triton

            return sinkhorn_triton(scores, iterations, epsilon, gather_distributed=gather_distributed)

        return triton_with_fallback(
            "sinkhorn", backend, run_triton, lambda: _sinkhorn_torch(scores, iterations, epsilon, gather_distributed)
        )
    return _sinkhorn_torch(scores, iterations, epsilon, gather_distributed)


def _check_queue(queue_outputs: object, n_high: int, n_proto: int, keep_empty: bool) -> Optional[List[Tensor]]:
    """The queue as a list of H (Q_i, K) tensors, or None when absent or empty: lightly accepts
    (0, K) tensors (an empty queue, e.g. before it is filled), which add nothing to Sinkhorn.
    ``keep_empty``: empty queues are kept (every rank of a distributed Sinkhorn takes the same
    path, whatever its own queue holds)."""
    if queue_outputs is None:
        return None
    if isinstance(queue_outputs, Tensor) or not isinstance(queue_outputs, Sequence):
        raise TypeError(f"queue_outputs must be a list of tensors, got {type(queue_outputs).__name__}")
    if len(queue_outputs) != n_high:
        raise ValueError(
            f"queue_outputs must hold one tensor per high-resolution crop ({n_high}), got {len(queue_outputs)}"
        )
    queue = []
    for i, q in enumerate(queue_outputs):
        name = f"queue_outputs[{i}]"
        if isinstance(q, Tensor) and q.dim() == 2 and q.shape[0] == 0:
            check_tensor(name, q.new_empty((1, max(q.shape[1], 1))))  # dtype check only
        else:
            check_tensor(name, q)
        if q.shape[1] != n_proto:
            raise ValueError(f"{name} has {q.shape[1]} prototypes, expected {n_proto}")
        queue.append(q)
    if keep_empty and len({q.shape[0] for q in queue}) > 1:
        raise ValueError(
            "queue_outputs of different lengths are not supported with sinkhorn_gather_distributed=True, "
            f"got {[q.shape[0] for q in queue]} rows"
        )
    if not keep_empty and all(q.shape[0] == 0 for q in queue):
        return None
    return queue


def _swav_reference(
    high: Sequence[Tensor],
    low: Sequence[Tensor],
    queue: Optional[Sequence[Tensor]],
    temperature: Union[float, Tensor],
    iterations: int,
    epsilon: float,
    gather_distributed: bool,
) -> Tensor:
    """The textbook formula (:func:`fastssl.reference.swav_loss`) under the reference backend's
    dtype rule; with ``gather_distributed`` in a process group, on the concatenation of every
    rank's crops and queues (:func:`fastssl.distributed.gather`: the global codes, the global
    loss, and W × this rank's slice of the global gradient)."""
    if gather_distributed and distributed.is_distributed():
        sizes = distributed.gather_sizes(high[0].shape[0], high[0].device)
        high = [distributed.gather(h, sizes) for h in high]
        low = [distributed.gather(v, sizes) for v in low]
        if queue is not None:
            queue = [distributed.gather_no_grad(q.detach()) for q in queue]
    return run_reference(reference.swav_loss, list(high), list(low), queue, temperature, iterations, epsilon)


@outside_autocast
def swav_loss(
    high_resolution_outputs: Sequence[Tensor],
    low_resolution_outputs: Sequence[Tensor] = (),
    queue_outputs: Optional[Sequence[Tensor]] = None,
    temperature: Union[float, Tensor] = 0.1,
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
            appended for Sinkhorn only (Q = 0 allowed).
        temperature: a number, or a one-element tensor (a learnable ``nn.Parameter`` gets its
            gradient on every backend).
        sinkhorn_gather_distributed: codes over the global batch (any per-rank batch sizes);
            the loss is the global mean over all ranks' samples.
    Returns:
        0-d float32 loss.

    Example::

        crops = [model(view) for view in views]  # 2 high + N low resolution, (B, K) each
        loss = swav_loss(crops[:2], crops[2:])
        loss.backward()
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
    queue = _check_queue(queue_outputs, len(high), k, keep_empty=sinkhorn_gather_distributed)
    temperature = check_temperature("temperature", temperature)
    check_int("sinkhorn_iterations", sinkhorn_iterations, minimum=0)
    sinkhorn_epsilon = check_positive("sinkhorn_epsilon", sinkhorn_epsilon)
    check_distributed_available("sinkhorn_gather_distributed", sinkhorn_gather_distributed)
    impl = resolve_backend(backend, high[0])
    args = (high, low, queue, temperature, sinkhorn_iterations, sinkhorn_epsilon, sinkhorn_gather_distributed)
    if impl == "reference":
        return _swav_reference(*args)

    def run_torch() -> Tensor:
        return _swav_torch(*args)

    # Queues of different lengths make problems of different sizes: the kernels batch equal ones.
    if impl == "triton" and (queue is None or len({q.shape[0] for q in queue}) == 1):

        def run_triton() -> Tensor:
            return _swav_kernels().swav_loss_triton(*args)

        return triton_with_fallback("swav", backend, run_triton, run_torch)
    return run_torch()


# --------------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------------


class SwaVLoss(nn.Module):
    """Drop-in for ``lightly.loss.SwaVLoss`` (Caron et al. 2020, Sec. 3.1: swapped prediction of
    Sinkhorn-Knopp codes over multi-crop).

    Args:
        temperature: softmax temperature of the predictions; a number, or a one-element tensor.
            An ``nn.Parameter`` is registered (as lightly's attribute assignment registers it)
            and trained: it gets its gradient on every backend.
        sinkhorn_iterations: Sinkhorn-Knopp iterations.
        sinkhorn_epsilon: entropic regularization (scores are divided by it).
        sinkhorn_gather_distributed: Sinkhorn marginals over the global batch (ranks may hold
            different batch sizes); the loss is then the mean over all ranks' samples.
        backend: ``"auto" | "triton" | "torch" | "reference"`` (env ``FASTSSL_BACKEND``).

    Forward ``(high_resolution_outputs, low_resolution_outputs, queue_outputs=None)``: lists of
    (B, K) prototype scores (queue tensors (Q, K), Q = 0 allowed); returns a 0-d float32 loss.

    Example::

        criterion = SwaVLoss(temperature=nn.Parameter(torch.tensor(0.1)))
        loss = criterion([s_high0, s_high1], [s_low0, s_low1])  # (B, K) scores each
        loss.backward()  # gradients for the scores and criterion.temperature
    """

    def __init__(
        self,
        temperature: Union[float, Tensor] = 0.1,
        sinkhorn_iterations: int = 3,
        sinkhorn_epsilon: float = 0.05,
        sinkhorn_gather_distributed: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.temperature = check_module_temperature("temperature", temperature)
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
