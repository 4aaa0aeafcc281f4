r"""NT-Xent (SimCLR), InfoNCE with a memory bank (MoCo) and the uniformity metric: functional API,
optimized PyTorch path and the drop-in :class:`NTXentLoss` module. The Triton kernels live in
:mod:`fastssl.kernels.ntxent`.

The optimized PyTorch path never forms the 2N×2N similarity matrix. Rows are processed in
chunks of at most ``_MAX_CHUNK_ELEMENTS`` logits; the forward keeps one log-sum-exp per row and
the backward recomputes each chunk's logits from the normalized embeddings and that stored
log-sum-exp (FlashAttention's recipe), so memory is O(N·d + chunk·N). When all logits fit in
one chunk, the forward's chunk is kept for the backward instead (same bound, one product less).

Which algorithm runs is decided per call from the shape and the temperature (the rule, on every
device; no host read of a tensor's value):

* |τ| ≥ about 0.03 (``_fixed_shift``: 2/|τ| + log C < 80) and a Python τ: exponentials against
  the constant 1/|τ| (unit rows bound every logit), no row maximum; the backward is one product
  of E = e^{S - 1/|τ|} with [Z, e^{-lo}⊙Z] -- two products in all when the chunk is kept (as
  lightly's autograd), three when recomputed, and no elementwise pass over the logits in the
  backward. This is the CPU default's fast path (SimCLR's τ = 0.1-0.5).
* smaller |τ|, or a tensor τ: row maxima, and each log-sum-exp kept as the pair (row maximum,
  log of the rest), so that every exponent of the backward is formed from S directly (one
  float32 rounding of lse at |S| ~ 1e4 would move every probability by ~1e-3).
* InfoNCE: the bank's rows are used as given (nothing bounds them): row maxima; the bank's
  term of the gradient is computed in the forward (the upstream gradient is a scalar), so the
  backward needs neither the bank nor the logits, and the module skips its snapshot of the bank.
* The memory bank's ring buffer writes the batch's rows only on the CPU (the pointer is read on
  the host there), the whole bank in tensor operations elsewhere (no host sync, CUDA graphs,
  torch.compile).

Backward algebra. For one NT-Xent row k, :math:`\partial\ell_k/\partial S_{km} = p_{km} -
[m = p(k)]` with :math:`p_{km} = e^{S_{km} - \mathrm{lse}_k}` over :math:`m \ne k`. With
:math:`S = ZZ^\top/\tau` symmetric and :math:`G = \partial L/\partial S`,

.. math:: \frac{\partial L}{\partial Z} = \frac{1}{\tau}(G + G^\top) Z, \qquad
          (G + G^\top)_{km} = \frac{1}{2N}\big(e^{S_{km}-\mathrm{lse}_k} + e^{S_{km}-\mathrm{lse}_m}
          - 2\,[m = p(k)]\big),

because the positive relation is an involution (:math:`p(p(k)) = k`). One recomputed chunk of
S therefore gives whole rows of the gradient: no column pass, no atomics, deterministic. The
normalization's backward is :math:`dx = (dz - \hat z(\hat z\cdot dz))/\|x\|`.

Distributed. Rank r holds 2n_r of the 2N = Σ 2n_r rows (any per-rank sizes: DDP without
``drop_last`` gives a short last batch). Its rows are scored against the gathered columns (the
rank-major concatenation of every rank's ``[view 0; view 1]`` block, this rank's starting at
2Σ_{q<r} n_q, so each positive stays inside its rank's block); the per-row log-sum-exps are
gathered too (2N floats). The formula above then gives, for the local rows, the gradient of the
*global* loss with the factor 1/(2n_r) instead of 1/(2N); :func:`fastssl.distributed.global_mean`
weighs the rank's loss by its 2n_r rows, which reports the global mean and multiplies that
gradient by W·n_r/N: exactly W × the single-process gradient, with no communication in the
backward.

A learnable temperature (a tensor τ, e.g. an ``nn.Parameter``) gets its gradient from the
gradient of the normalized embeddings, by homogeneity: the logits are ẑ_k·ẑ_m/τ, so scaling
every ẑ by c is scaling τ by 1/c², and :math:`\partial L/\partial\tau = -\frac{1}{2\tau}
\sum_k \hat z_k\cdot\partial L/\partial\hat z_k` (InfoNCE, where only the queries' ẑ
enter every logit once: :math:`-\frac{1}{\tau}\sum_i \hat q_i\cdot\partial L/\partial\hat q_i`).
The row sums :math:`\hat z_k\cdot\partial L/\partial\hat z_k` are the normalization backward's
projections, already computed: the temperature costs one reduction. Distributed, each rank's
sum over its rows is W × its share, so DDP's average over ranks is the global gradient.

Norms never square the raw inputs: each row is first multiplied by 2^-k, 2^k at least its
largest magnitude (exact), so float32 rows near 1e19 (whose squares overflow) or 1e-19 (whose
squares underflow) normalize as in float64.
"""

from __future__ import annotations

import math
import operator
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastssl import distributed, reference
from fastssl._backend import (
    check_backend_name,
    guard_triton_backward,
    outside_autocast,
    resolve_backend,
    run_reference,
    triton_with_fallback,
)
from fastssl._checks import (
    check_distributed_available,
    check_finite,
    check_int,
    check_pair,
    check_tensor,
)
from fastssl._checks import check_module_temperature, check_temperature

# A temperature: a number, or a one-element tensor (learnable, e.g. an ``nn.Parameter``).
Temperature = Union[float, Tensor]

# Logits held at once by one chunk of the PyTorch path (64 MiB in float32). The backward holds
# two such buffers.
_MAX_CHUNK_ELEMENTS = 1 << 24

# F.normalize's clamp: x / max(‖x‖, eps).
_NORM_EPS = 1e-12


def _acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32 accumulation, float64 for float64 inputs."""
    out = torch.float32
    for dtype in dtypes:
        out = torch.promote_types(out, dtype)
    return out


def _rows_per_chunk(n_cols: int, chunk_rows: Optional[int]) -> int:
    if chunk_rows is not None:
        return max(1, int(chunk_rows))
    return max(1, _MAX_CHUNK_ELEMENTS // max(n_cols, 1))


# --------------------------------------------------------------------------------------------
# Optimized PyTorch path: building blocks
# --------------------------------------------------------------------------------------------


def _normalize_forward(x: Tensor, acc: torch.dtype) -> Tuple[Tensor, Tensor]:
    """Rows of ``x`` (M, d) → (ẑ (M, d) in ``acc``, ‖x‖ (M,) in ``acc``), as F.normalize.

    Computed on y = 2^-k x with 2^k at least the row's largest magnitude (exact scaling): ẑ =
    y / max(‖y‖, 2^-k ε) is F.normalize's value wherever float64 would represent it, also where
    the squares of x overflow (|x| ≳ 1e19 in float32) or underflow (|x| ≲ 1e-19)."""
    x = x.to(acc)
    inverse_scale = reference.inverse_power_of_two_scale(x, 1)  # (M, 1)
    y = x * inverse_scale
    scaled_norms = torch.linalg.vector_norm(y, dim=1, keepdim=True)
    z_hat = y / torch.maximum(scaled_norms, inverse_scale * _NORM_EPS)
    return z_hat, (scaled_norms / inverse_scale).squeeze(1)


def _unit_rows(x: Tensor, norms: Tensor) -> Tensor:
    """ẑ recomputed in the backward from x and the stored ‖x‖ (F.normalize's clamp)."""
    return x / norms.clamp_min(_NORM_EPS)[:, None]


def _normalize_backward(z_hat: Tensor, norms: Tensor, grad_z_hat: Tensor) -> Tuple[Tensor, Tensor]:
    r""":math:`dx = (dz - \hat z(\hat z\cdot dz))/\|x\|`; below the clamp ``x/eps`` is linear.

    Returns (dx, the projections ẑ·dz per row): their sum gives a tensor temperature's gradient
    (module doc)."""
    projection = (z_hat * grad_z_hat).sum(dim=1)
    active = torch.where(norms >= _NORM_EPS, projection, torch.zeros_like(projection))
    return (grad_z_hat - z_hat * active[:, None]) / norms.clamp_min(_NORM_EPS)[:, None], projection


def _inverse_temperature(temperature: Temperature, acc: torch.dtype) -> Union[float, Tensor]:
    """1/τ: a Python float, or for a tensor temperature a 0-d tensor in ``acc``, detached (the
    autograd functions return τ's gradient themselves) and on its device (no host read)."""
    if isinstance(temperature, Tensor):
        return temperature.detach().to(acc).reshape(()).reciprocal()
    return 1.0 / temperature


def _temperature_gradient(
    temperature: Tensor, inv_temp: Tensor, projection_sum: Tensor, homogeneity: int
) -> Tensor:
    r""":math:`\partial L/\partial\tau = -\frac{1}{h\tau}\sum \hat z\cdot\partial L/\partial\hat z`
    for logits of degree h in the normalized rows (module doc), in τ's dtype and shape."""
    grad = projection_sum * (inv_temp * (-1.0 / homogeneity))
    return grad.to(temperature.dtype).reshape(temperature.shape)


def _pair_columns(
    start: int, stop: int, n_local: int, col_offset: int, device: torch.device
) -> Tuple[Tensor, Tensor]:
    """Column of each row's self-similarity and of its positive, for rows ``start:stop``.

    Rows are ``[view 0; view 1]`` of ``n_local`` samples each; columns are the rank-major
    concatenation of every rank's rows, this rank's starting at ``col_offset``.
    """
    rows = torch.arange(start, stop, device=device)
    self_cols = rows + col_offset
    pos_cols = torch.where(rows < n_local, rows + n_local, rows - n_local) + col_offset
    return self_cols, pos_cols


def _fixed_shift(inv_temp: Union[float, Tensor], n_cols: int) -> Optional[float]:
    """The constant c = 1/|τ| the exponentials may be taken against instead of row maxima.

    Unit rows give logits in [-c, c], so P = e^{S - c} lies in [e^{-2c}, 1] and a row sum in
    [e^{-2c}, C]: normal float32 numbers, and their reciprocals too, while 2c + log C < 80.
    Beyond that (|τ| below about 0.03), or for a tensor temperature (its value is not read: that
    would wait for the device), None: row maxima."""
    if isinstance(inv_temp, Tensor):
        return None
    bound = abs(inv_temp)
    return bound if 2.0 * bound + math.log(max(n_cols, 2)) < 80.0 else None


def _logits(rows: Tensor, cols: Tensor, inv_temp: Union[float, Tensor], shift: Optional[float]) -> Tensor:
    """``rows·colsᵀ/τ``. With the fixed shift (|S| <= 40) the rows are pre-scaled by 1/τ, which
    saves a pass over the logits. Without it the product is scaled after: S stays exactly
    symmetric where rows and columns are the same vectors (the backward takes the columns'
    exponentials from row k's entries), which scaling the rows first would break by
    ~1e-7·|S| -- 1e-3 at |τ| = 1e-4."""
    if shift is not None:
        return (rows * inv_temp) @ cols.T
    return (rows @ cols.T).mul_(inv_temp)


def _pair_lse_forward(
    z_rows: Tensor,
    z_cols: Tensor,
    inv_temp: Union[float, Tensor],
    n_local: int,
    col_offset: int,
    with_positive: bool,
    chunk_rows: Optional[int],
    keep: bool = False,
) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    r"""Per-row log-sum-exp of ``S = z_rows z_colsᵀ · inv_temp`` over all columns but self, as a
    pair (hi, lo) with :math:`\mathrm{lse}_k = hi_k + lo_k`.

    With a fixed shift c (:func:`_fixed_shift`): hi = c, :math:`lo_k = \log\sum_{m\ne k}
    e^{S_{km}-c}`, and the chunk kept is :math:`E = e^{S-c}` (self entries 0). Otherwise hi is
    the row maximum and the chunk kept is S itself (self entries -inf). Keeping lse as a
    pair keeps the exponents of the backward exact where they matter: at |τ| = 1e-4 the logits
    are ~1e4, and a float32 lse carries ~1e-3 of rounding into every probability.

    Returns (hi (R,), lo (R,), the positives' :math:`S_{k,p(k)} - hi_k` (R,) or None, the
    chunk when all rows form one and ``keep``, else None). Memory: one chunk of logits."""
    n_rows, n_cols = z_rows.shape[0], z_cols.shape[0]
    chunk = _rows_per_chunk(n_cols, chunk_rows)
    shift = _fixed_shift(inv_temp, n_cols)
    hi_parts, lo_parts, pos_parts = [], [], []
    logits = None
    for start in range(0, n_rows, chunk):
        stop = min(n_rows, start + chunk)
        logits = _logits(z_rows[start:stop], z_cols, inv_temp, shift)
        self_cols, pos_cols = _pair_columns(start, stop, n_local, col_offset, z_rows.device)
        if shift is not None:
            logits.sub_(shift)
            if with_positive:
                pos_parts.append(logits.gather(1, pos_cols[:, None]).squeeze(1))
            logits.exp_().scatter_(1, self_cols[:, None], 0.0)
            lo_parts.append(logits.sum(dim=1).log_())
        else:
            logits.scatter_(1, self_cols[:, None], float("-inf"))
            row_max = logits.amax(dim=1)
            hi_parts.append(row_max)
            if with_positive:
                pos_parts.append(logits.gather(1, pos_cols[:, None]).squeeze(1).sub_(row_max))
            # S itself stays (the kept chunk): the backward takes every exponent from S directly.
            lo_parts.append((logits - row_max[:, None]).exp_().sum(dim=1).log_())
    lo = torch.cat(lo_parts)
    hi = torch.cat(hi_parts) if shift is None else torch.full_like(lo, shift)
    positives = torch.cat(pos_parts) if with_positive else None
    kept = logits if keep and chunk >= n_rows else None
    return hi, lo, positives, kept


def _pair_lse_backward(
    z_rows: Tensor,
    z_cols: Tensor,
    lse_rows: Tuple[Tensor, Tensor],
    lse_cols: Tuple[Tensor, Tensor],
    inv_temp: Union[float, Tensor],
    n_local: int,
    col_offset: int,
    with_positive: bool,
    chunk_rows: Optional[int],
    kept: Optional[Tensor] = None,
) -> Tensor:
    r""":math:`\sum_{m\ne k} (e^{S_{km}-\mathrm{lse}_k} + e^{S_{km}-\mathrm{lse}_m}) z_m - 2 z_{p(k)}`
    per row k (the positive term only ``with_positive``), unscaled. See the module doc.

    ``lse_rows``/``lse_cols``: (hi, lo) pairs of :func:`_pair_lse_forward` for the rows and the
    columns; ``kept``: its chunk (no recomputation). With the fixed shift c, S symmetric gives
    :math:`e^{S_{km}-\mathrm{lse}_k} = E_{km}e^{-lo_k}` and :math:`e^{S_{km}-\mathrm{lse}_m} =
    E_{km}e^{-lo_m}`, so the sum is :math:`e^{-lo_k}(EZ)_k + (E(e^{-lo}\odot Z))_k`: one product
    of E with the (C, 2d) matrix :math:`[Z, e^{-lo}\odot Z]`, no exponential and no elementwise
    pass over the logits when E is kept. Otherwise two exponentials per logit, each exponent
    taken from S (or S - hi_k) and the (hi, lo) pairs directly."""
    n_rows, n_cols = z_rows.shape[0], z_cols.shape[0]
    d = z_rows.shape[1]
    chunk = n_rows if kept is not None else _rows_per_chunk(n_cols, chunk_rows)
    shift = _fixed_shift(inv_temp, n_cols)
    hi_rows, lo_rows = lse_rows
    hi_cols, lo_cols = lse_cols
    if shift is not None:
        row_weight = torch.exp(-lo_rows)
        operand = torch.cat([z_cols, z_cols * torch.exp(-lo_cols)[:, None]], dim=1)
    parts = []
    for start in range(0, n_rows, chunk):
        stop = min(n_rows, start + chunk)
        self_cols, _ = _pair_columns(start, stop, n_local, col_offset, z_rows.device)
        if shift is not None:
            if kept is not None:
                probabilities = kept
            else:
                probabilities = _logits(z_rows[start:stop], z_cols, inv_temp, shift).sub_(shift).exp_()
                probabilities.scatter_(1, self_cols[:, None], 0.0)
            product = probabilities @ operand
            parts.append(torch.addcmul(product[:, d:], product[:, :d], row_weight[start:stop, None]))
            continue
        # Each exponent straight from S: (S - hi) - lo, exact where the term matters.
        logits = kept if kept is not None else _logits(z_rows[start:stop], z_cols, inv_temp, shift)
        weights = (logits - hi_cols[None, :]).sub_(lo_cols[None, :]).exp_()
        row_exponent = logits - hi_rows[start:stop, None] if kept is not None else logits.sub_(hi_rows[start:stop, None])
        weights.add_(row_exponent.sub_(lo_rows[start:stop, None]).exp_())
        del row_exponent
        weights.scatter_(1, self_cols[:, None], 0.0)
        parts.append(weights @ z_cols)
    grad = torch.cat(parts)
    if with_positive:
        _, pos_cols = _pair_columns(0, n_rows, n_local, col_offset, z_rows.device)
        grad.sub_(2.0 * z_cols[pos_cols])
    return grad


# --------------------------------------------------------------------------------------------
# Optimized PyTorch path: NT-Xent
# --------------------------------------------------------------------------------------------


class _NTXentTorch(torch.autograd.Function):
    """NT-Xent, row-chunked, with the hand-written backward of the module doc. ``temperature``
    is a float, or a tensor whose gradient the backward returns; ``rank_rows`` every rank's
    sample count in a distributed run (None: single process)."""

    @staticmethod
    def forward(ctx, out0: Tensor, out1: Tensor, temperature: Temperature, rank_rows: Optional[List[int]],  # type: ignore[override]
                chunk_rows: Optional[int]) -> Tensor:
        acc = _acc_dtype(out0.dtype, out1.dtype)
        n_local = out0.shape[0]
        z_rows, norms = _normalize_forward(torch.cat([out0.to(acc), out1.to(acc)]), acc)
        inv_temp = _inverse_temperature(temperature, acc)
        if rank_rows is not None:
            block_rows = [2 * rows for rows in rank_rows]  # each rank's [view 0; view 1] block
            z_cols = distributed.gather_no_grad(z_rows, block_rows)
            col_offset = distributed.rank_row_offset(2 * n_local, sizes=block_rows)
        else:
            z_cols, col_offset = z_rows, 0
        hi, lo, positives, kept = _pair_lse_forward(z_rows, z_cols, inv_temp, n_local, col_offset, True, chunk_rows,
                                                    keep=any(ctx.needs_input_grad))
        assert positives is not None
        if rank_rows is not None:
            hi_cols, lo_cols = distributed.gather_no_grad(torch.stack([hi, lo], dim=1), block_rows).unbind(dim=1)
        else:
            hi_cols, lo_cols = hi, lo
        ctx.save_for_backward(out0, out1, norms, hi, lo, hi_cols, lo_cols, z_cols if rank_rows is not None else None,
                              kept, temperature if isinstance(temperature, Tensor) else None)
        ctx.meta = (inv_temp, n_local, col_offset, chunk_rows, rank_rows is not None)
        # ℓ_k = lse_k - S_k,p(k) = lo_k - (S_k,p(k) - hi_k): no large intermediate.
        return (lo - positives).mean().float()

    @staticmethod
    def backward(ctx, grad_loss: Tensor):  # type: ignore[override]
        out0, out1, norms, hi, lo, hi_cols, lo_cols, saved_cols, kept, temperature = ctx.saved_tensors
        inv_temp, n_local, col_offset, chunk_rows, use_dist = ctx.meta
        acc = norms.dtype
        z_rows = _unit_rows(torch.cat([out0.to(acc), out1.to(acc)]), norms)
        z_cols = saved_cols if use_dist else z_rows
        grad_z = _pair_lse_backward(z_rows, z_cols, (hi, lo), (hi_cols, lo_cols), inv_temp, n_local, col_offset, True,
                                    chunk_rows, kept=kept)
        # 1/(2n): the row count of this rank (module doc: W × the global gradient when distributed).
        grad_z = grad_z * (grad_loss.to(acc) * (inv_temp / (2 * n_local)))
        grad_x, projection = _normalize_backward(z_rows, norms, grad_z)
        grad_temperature = None
        if temperature is not None and ctx.needs_input_grad[2]:
            grad_temperature = _temperature_gradient(temperature, inv_temp, projection.sum(), homogeneity=2)
        return grad_x[:n_local].to(out0.dtype), grad_x[n_local:].to(out1.dtype), grad_temperature, None, None


def _rank_rows(gather_distributed: bool, rows: int, device: torch.device) -> Optional[List[int]]:
    """Every rank's row count in a distributed run (one small all-gather), else None."""
    if gather_distributed and distributed.is_distributed():
        return distributed.gather_sizes(rows, device)
    return None


def _ntxent_torch(
    out0: Tensor, out1: Tensor, temperature: Temperature, gather_distributed: bool, chunk_rows: Optional[int] = None
) -> Tensor:
    rank_rows = _rank_rows(gather_distributed, out0.shape[0], out0.device)
    loss = _NTXentTorch.apply(out0, out1, temperature, rank_rows, chunk_rows)
    # Weighted by this rank's 2n rows: the global mean, and W × the global gradient (module doc).
    return distributed.global_mean(loss, 2 * out0.shape[0]) if gather_distributed else loss


# --------------------------------------------------------------------------------------------
# Optimized PyTorch path: InfoNCE with a bank
# --------------------------------------------------------------------------------------------


class _InfoNCETorch(torch.autograd.Function):
    r"""Queries against [own key, bank rows], row-chunked.

    With :math:`p_{i0} = e^{s_{i0} - \mathrm{lse}_i}` the positive's probability and
    :math:`P_{ij} = e^{\hat q_i\cdot b_j/\tau - \mathrm{lse}_i}`:
    :math:`d\hat q_i = \frac{1}{N\tau}((p_{i0}-1)\hat k_i + \sum_j P_{ij} b_j)`,
    :math:`d\hat k_i = \frac{1}{N\tau}(p_{i0}-1)\hat q_i`; the bank gets no gradient.

    Per query, hi is the largest logit (bank rows are used as given, so nothing bounds them in
    advance), :math:`E = e^{S - hi}` and :math:`s = e^{s_{i0} - hi} + \sum_j E_{ij}`: lse = hi +
    log s and :math:`P = E/s`. The upstream gradient is a scalar, so when a gradient is wanted
    the forward computes the bank's term :math:`\sum_j P_{ij} b_j` right away, chunk by chunk
    (Liger-Kernel's gradient-in-the-forward): two products against the bank in all, as lightly's
    autograd does, the logits never kept (memory O(N·d + chunk)), and the backward needs
    neither the bank nor a recomputation -- so the module may update its bank in place before
    the backward runs (no snapshot copy).
    """

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, negatives: Tensor, temperature: Temperature,  # type: ignore[override]
                chunk_rows: Optional[int]) -> Tensor:
        acc = _acc_dtype(query.dtype, key.dtype)
        q_hat, q_norms = _normalize_forward(query, acc)
        k_hat, k_norms = _normalize_forward(key, acc)
        bank = negatives.to(acc)
        inv_temp = _inverse_temperature(temperature, acc)
        positives = (q_hat * k_hat).sum(dim=1) * inv_temp
        n_queries = q_hat.shape[0]
        chunk = _rows_per_chunk(bank.shape[0] + 1, chunk_rows)
        with_gradient = any(ctx.needs_input_grad)
        scaled_queries = q_hat * inv_temp  # the product then gives the logits directly
        hi_parts, sum_parts, bank_parts = [], [], []
        for start in range(0, n_queries, chunk):
            stop = min(n_queries, start + chunk)
            exps = scaled_queries[start:stop] @ bank.T
            hi = torch.maximum(exps.amax(dim=1), positives[start:stop])
            exps.sub_(hi[:, None]).exp_()
            sums = exps.sum(dim=1).add_((positives[start:stop] - hi).exp_())
            hi_parts.append(hi)
            sum_parts.append(sums)
            if with_gradient:
                bank_parts.append((exps @ bank).div_(sums[:, None]))  # Σ_j P_ij b_j
            del exps
        hi, sums = torch.cat(hi_parts), torch.cat(sum_parts)
        from_bank = torch.cat(bank_parts) if with_gradient else None
        ctx.save_for_backward(query, key, q_norms, k_norms, hi, sums, from_bank,
                              temperature if isinstance(temperature, Tensor) else None)
        ctx.meta = inv_temp
        # ℓ_i = lse_i - s_i0 = log s_i - (s_i0 - hi_i).
        return (sums.log() - (positives - hi)).mean().float()

    @staticmethod
    def backward(ctx, grad_loss: Tensor):  # type: ignore[override]
        query, key, q_norms, k_norms, hi, sums, from_bank, temperature = ctx.saved_tensors
        inv_temp = ctx.meta
        acc = q_norms.dtype
        q_hat = _unit_rows(query.to(acc), q_norms)
        k_hat = _unit_rows(key.to(acc), k_norms)
        positive_weight = ((q_hat * k_hat).sum(dim=1) * inv_temp - hi).exp_().div_(sums).sub_(1.0)
        scale = grad_loss.to(acc) * (inv_temp / q_hat.shape[0])
        grad_q = torch.addcmul(from_bank, positive_weight[:, None], k_hat).mul_(scale)
        grad_k = positive_weight[:, None] * q_hat * scale
        grad_query, projection = _normalize_backward(q_hat, q_norms, grad_q)
        grad_key, _ = _normalize_backward(k_hat, k_norms, grad_k)
        grad_temperature = None
        if temperature is not None and ctx.needs_input_grad[3]:
            grad_temperature = _temperature_gradient(temperature, inv_temp, projection.sum(), homogeneity=1)
        return grad_query.to(query.dtype), grad_key.to(key.dtype), None, grad_temperature, None


def _infonce_torch(
    query: Tensor, key: Tensor, negatives: Tensor, temperature: Temperature, chunk_rows: Optional[int] = None
) -> Tensor:
    return _InfoNCETorch.apply(query, key, negatives, temperature, chunk_rows)


# --------------------------------------------------------------------------------------------
# Optimized PyTorch path: uniformity
# --------------------------------------------------------------------------------------------


class _UniformityTorch(torch.autograd.Function):
    r"""Uniformity through the pair machinery: :math:`-t\|\hat z_i-\hat z_j\|^2 = S'_{ij} - 2t` with
    :math:`S'_{ij} = 2t\,\hat z_i\cdot\hat z_j + b_i + b_j`, :math:`b_i = t(1 - \|\hat z_i\|^2)`: 0 for
    unit rows, nonzero only for rows below F.normalize's clamp (zero rows, |x| ~ 1e-19), which
    stay shorter than 1. The biases enter as two extra features, rows
    :math:`[\hat z_i, b_i/2t, 1]` against columns :math:`[\hat z_j, 1, b_j/2t]`, so S' is still a
    symmetric product. :math:`U = \mathrm{LSE}_{i\ne j} S'_{ij} - 2t - \log n(n-1)` and, with
    :math:`w_{ij} = e^{S'_{ij}-T}` (T the global LSE, a (hi, lo) pair as the rows'),
    :math:`\partial U/\partial\hat z_i = 4t\sum_{j\ne i} w_{ij}(\hat z_j - \hat z_i)`: the pair backward
    with every log-sum-exp set to T, minus the radial term (which the normalization's backward
    removes anyway from unit rows)."""

    @staticmethod
    def forward(ctx, z: Tensor, t: float, chunk_rows: Optional[int]) -> Tensor:  # type: ignore[override]
        acc = _acc_dtype(z.dtype)
        n, d = z.shape
        z_hat, norms = _normalize_forward(z, acc)
        rows, cols = _biased_rows(z_hat, norms)
        # Kept only with the fixed shift: E = e^{S - c} serves the global form as it is (every
        # row's hi is c), while a row-maximum chunk would need re-shifting.
        keep = ctx.needs_input_grad[0] and _fixed_shift(2.0 * t, n) is not None
        hi, lo, _, kept = _pair_lse_forward(rows, cols, 2.0 * t, n, 0, False, chunk_rows, keep=keep)
        total_hi = hi.max()
        total_lo = torch.logsumexp((hi - total_hi) + lo, dim=0)
        ctx.save_for_backward(z, norms, hi, lo, total_hi, total_lo, kept)
        ctx.meta = (t, chunk_rows)
        return ((total_hi - 2.0 * t) + total_lo - math.log(n * (n - 1))).float()

    @staticmethod
    def backward(ctx, grad_loss: Tensor):  # type: ignore[override]
        z, norms, hi, lo, total_hi, total_lo, kept = ctx.saved_tensors
        t, chunk_rows = ctx.meta
        acc = norms.dtype
        n, d = z.shape
        z_hat = _unit_rows(z.to(acc), norms)
        rows, cols = _biased_rows(z_hat, norms)
        total = (total_hi.expand(n), total_lo.expand(n))
        pair_sum = _pair_lse_backward(rows, cols, total, total, 2.0 * t, n, 0, False, chunk_rows, kept=kept)[:, :d]
        # Σ_j w_ij = e^{lse_i - T}: the radial term of the textbook gradient.
        row_mass = ((hi - total_hi) + (lo - total_lo)).exp_()
        grad_z = torch.addcmul(pair_sum, z_hat, row_mass[:, None], value=-2.0)
        grad_z = grad_z * (grad_loss.to(acc) * (2.0 * t))
        return _normalize_backward(z_hat, norms, grad_z)[0].to(z.dtype), None, None


def _biased_rows(z_hat: Tensor, norms: Tensor) -> Tuple[Tensor, Tensor]:
    """Rows [ẑ, b/2t, 1] and columns [ẑ, 1, b/2t] with b/2t = (1 - ‖ẑ‖²)/2 for rows below the
    clamp, 0 for the others (unit by definition: the textbook value, not a rounding of it)."""
    half_bias = torch.where(norms < _NORM_EPS, 0.5 * (1.0 - (z_hat * z_hat).sum(dim=1)), torch.zeros_like(norms))
    ones = torch.ones_like(half_bias)
    return (torch.cat([z_hat, half_bias[:, None], ones[:, None]], dim=1),
            torch.cat([z_hat, ones[:, None], half_bias[:, None]], dim=1))


def _uniformity_torch(z: Tensor, t: float, chunk_rows: Optional[int] = None) -> Tensor:
    return _UniformityTorch.apply(z, t, chunk_rows)


# --------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------


def _kernels():
    """The Triton module, imported on first use (``import fastssl`` needs no Triton), its custom
    ops' backward guarded: under ``"auto"`` a backward kernel that fails to compile or launch
    gives the torch path's gradient (recomputed from the op's inputs) after one warning, as the
    forward does (:func:`fastssl._backend.guard_triton_backward`)."""
    from fastssl.kernels import ntxent as kernels

    def tau(temperature: Optional[Tensor], inv_temp: float) -> Temperature:
        return temperature if temperature is not None else 1.0 / inv_temp

    # The torch path's loss from each op's inputs (same schema order): the op's loss is this
    # rank's mean over the gathered columns in a distributed run, as _NTXentTorch's.
    guard_triton_backward(
        kernels._ntxent_op, "ntxent", kernels._ntxent_setup, kernels._ntxent_gradient,
        lambda out0, out1, temperature, inv_temp, rank_rows, config: _NTXentTorch.apply(
            out0, out1, tau(temperature, inv_temp), list(rank_rows) or None, None),
    )  # fmt: skip
    guard_triton_backward(
        kernels._infonce_op, "infonce", kernels._infonce_setup, kernels._infonce_gradient,
        lambda query, key, negatives, temperature, inv_temp, config: _InfoNCETorch.apply(
            query, key, negatives, tau(temperature, inv_temp), None),
    )  # fmt: skip
    guard_triton_backward(
        kernels._uniformity_op, "uniformity", kernels._uniformity_setup, kernels._uniformity_gradient,
        lambda z, t, config: _uniformity_torch(z, t),
    )  # fmt: skip
    return kernels


def _triton_dtype_ok(*tensors: Tensor) -> bool:
    """The kernels take float32/float16/bfloat16; float64 (inputs or bank) runs on the PyTorch
    path, which accumulates it in float64."""
    return all(x.dtype != torch.float64 for x in tensors)


@outside_autocast
def ntxent_loss(
    out0: Tensor,
    out1: Tensor,
    temperature: Temperature = 0.5,
    *,
    gather_distributed: bool = False,
    backend: str = "auto",
) -> Tensor:
    r"""NT-Xent over the 2N embeddings of two views (Chen et al. 2020, eq. 1; see
    :func:`fastssl.reference.ntxent_loss`).

    Args:
        out0, out1: (N, d) projections of the two views (any float dtype).
        temperature: any non-zero finite number (negative too, as lightly allows), or a
            one-element tensor (a learnable ``nn.Parameter``), which gets its gradient.
        gather_distributed: negatives from every rank; ranks may hold different N (the loss is
            the single-process loss on the concatenation, each rank's gradient W × its slice).
        backend: ``"auto" | "triton" | "torch" | "reference"``.
    Returns:
        0-d float32 loss.

    Example::

        tau = torch.nn.Parameter(torch.tensor(0.2))
        loss = ntxent_loss(torch.randn(8, 16, requires_grad=True), torch.randn(8, 16), tau)
        loss.backward()  # gradients for the first view and for tau
    """
    check_pair("out0", out0, "out1", out1)
    temperature = check_temperature("temperature", temperature)
    check_distributed_available("gather_distributed", gather_distributed)
    impl = resolve_backend(backend, out0)
    if impl == "reference":
        if gather_distributed and distributed.is_distributed():
            sizes = distributed.gather_sizes(out0.shape[0], out0.device)
            out0, out1 = distributed.gather(out0, sizes), distributed.gather(out1, sizes)
        return run_reference(reference.ntxent_loss, out0, out1, temperature)
    if impl == "triton" and _triton_dtype_ok(out0, out1):
        # A kernel that cannot compile or launch here falls back to the torch path under "auto".
        return triton_with_fallback(
            "ntxent",
            backend,
            lambda: _kernels().ntxent_loss_triton(out0, out1, temperature, gather_distributed=gather_distributed),
            lambda: _ntxent_torch(out0, out1, temperature, gather_distributed),
        )
    return _ntxent_torch(out0, out1, temperature, gather_distributed)


def _infonce_implementation(backend: str, query: Tensor, key: Tensor, negatives: Tensor) -> str:
    """Which InfoNCE implementation runs: ``"reference" | "triton" | "torch"``."""
    impl = resolve_backend(backend, query)
    if impl == "triton" and not _triton_dtype_ok(query, key, negatives):
        return "torch"
    return impl


@outside_autocast
def infonce_loss(
    query: Tensor,
    key: Tensor,
    negatives: Tensor,
    temperature: Temperature = 0.5,
    *,
    gather_distributed: bool = False,
    backend: str = "auto",
) -> Tensor:
    r"""InfoNCE of queries against their keys and a bank of negatives (MoCo, He et al. 2020, eq. 1).

    Args:
        query, key: (N, d), L2-normalized inside.
        negatives: (K, d) bank, used as given (no normalization, no gradient), any float dtype.
        temperature: a non-zero number, or a one-element tensor (learnable, with gradient).
        gather_distributed: report the mean over all ranks' queries, weighted by each rank's N
            (gradients: W × the slice of the single-process gradient).
    Returns:
        0-d float32 loss.

    Example::

        bank = torch.nn.functional.normalize(torch.randn(64, 16), dim=1)
        loss = infonce_loss(torch.randn(8, 16, requires_grad=True), torch.randn(8, 16), bank, 0.2)
        loss.backward()
    """
    check_pair("query", query, "key", key)
    check_tensor("negatives", negatives)
    if negatives.shape[1] != query.shape[1]:
        raise ValueError(
            f"negatives must have shape (K, {query.shape[1]}) to match query, got {tuple(negatives.shape)}"
        )
    if negatives.device != query.device:
        raise ValueError(f"negatives must be on the device of query ({query.device}), got {negatives.device}")
    temperature = check_temperature("temperature", temperature)
    check_distributed_available("gather_distributed", gather_distributed)
    impl = _infonce_implementation(backend, query, key, negatives)
    if negatives.requires_grad:  # no gradient to the bank; detached only when needed (an operator)
        negatives = negatives.detach()
    if impl == "reference":
        loss = run_reference(reference.infonce_loss, query, key, negatives, temperature)
    elif impl == "triton":
        loss = triton_with_fallback(
            "infonce",
            backend,
            lambda: _kernels().infonce_loss_triton(query, key, negatives, temperature),
            lambda: _infonce_torch(query, key, negatives, temperature),
        )
    else:
        loss = _infonce_torch(query, key, negatives, temperature)
    # Each rank's loss is the mean over its own N queries: weighted by N (module doc).
    return distributed.global_mean(loss, query.shape[0]) if gather_distributed else loss


@outside_autocast
def uniformity_loss(z: Tensor, t: float = 2.0, *, backend: str = "auto") -> Tensor:
    r"""Uniformity (Wang & Isola): :math:`\log\frac{1}{n(n-1)}\sum_{i\ne j} e^{-t\|\hat z_i-\hat z_j\|^2}`.

    Computed as a log-sum-exp of :math:`2t\,\hat z_i\cdot\hat z_j` over row chunks (the NT-Xent
    machinery), so memory is O(N·d), and differentiable on every backend but the reference's
    single-sample case. 0 at full collapse; NaN for a single sample (no pair).

    Args:
        z: (N, d) embeddings, L2-normalized inside.
        t: kernel scale (Wang & Isola use 2).
        backend: ``"auto" | "triton" | "torch" | "reference"``.
    Returns:
        0-d float32 value.

    Example::

        z = torch.randn(32, 16, requires_grad=True)
        uniformity_loss(z).backward()
    """
    check_tensor("z", z)
    t = check_finite("t", t)
    impl = resolve_backend(backend, z)
    if z.shape[0] < 2:
        return torch.full((), float("nan"), dtype=torch.float32, device=z.device)
    if impl == "reference":
        return run_reference(reference.uniformity, z, t)
    if impl == "triton" and _triton_dtype_ok(z):
        return triton_with_fallback(
            "uniformity", backend, lambda: _kernels().uniformity_triton(z, t), lambda: _uniformity_torch(z, t)
        )
    return _uniformity_torch(z, t)


# --------------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------------


def _is_integer_scalar(value: object) -> bool:
    """A Python or NumPy integer scalar (anything ``operator.index`` takes: ``np.int64(16384)``
    as lightly accepts it), not a bool (Python's or NumPy's) and not a sequence."""
    if isinstance(value, bool) or type(value).__name__ in ("bool_", "bool"):
        return False
    try:
        operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return False
    return True


def _parse_bank_size(memory_bank_size: Union[int, Sequence[int]]) -> Tuple[int, Optional[int]]:
    """``size`` or ``(size, dim)`` -- each a Python or NumPy integer (not a bool) -- as Python ints."""
    if isinstance(memory_bank_size, bool) or type(memory_bank_size).__name__ in ("bool_", "bool"):
        raise TypeError("memory_bank_size must be an int or a (size, dim) pair, got bool")
    if _is_integer_scalar(memory_bank_size):
        return check_int("memory_bank_size", memory_bank_size), None
    try:
        size, dim = memory_bank_size  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ValueError(
            f"memory_bank_size must be an int or a (size, dim) pair, got {memory_bank_size!r}"
        ) from None
    size = check_int("memory_bank_size[0]", size)
    dim = check_int("memory_bank_size[1]", dim, minimum=1)
    return size, dim


def _pointer_readable_on_host(device: torch.device) -> bool:
    """Whether the ring buffer may read its pointer as a Python int: on the CPU (no device to
    wait for) and outside torch.compile tracing (a graph break)."""
    return device.type == "cpu" and not torch.compiler.is_compiling()


class MemoryBank(nn.Module):
    """Ring buffer of normalized keys, the negatives of MoCo's InfoNCE (lightly's
    ``MemoryBankModule``: same buffer names, same initial draws, same update rule).

    Buffers: ``bank`` (size, dim), allocated on the first batch when ``dim`` is not given, and
    ``bank_ptr`` (1,), the next row to write. Neither is persistent (as lightly).
    """

    bank: Tensor
    bank_ptr: Tensor

    def __init__(self, size: int, dim: Optional[int] = None, gather_distributed: bool = False) -> None:
        super().__init__()
        self.size = size
        self.gather_distributed = gather_distributed
        self.register_buffer("bank", torch.empty(0), persistent=False)
        self.register_buffer("bank_ptr", torch.zeros(1, dtype=torch.long), persistent=False)
        if size > 0 and dim is not None:
            self.allocate(dim, torch.device("cpu"))

    @torch.no_grad()
    def allocate(self, dim: int, device: torch.device) -> None:
        # Same draws as lightly's MemoryBankModule, so a seeded run gives the same bank.
        self.bank = F.normalize(torch.randn(self.size, dim), dim=-1).to(device)
        self.bank_ptr = torch.zeros(1, dtype=torch.long, device=device)

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write ``keys`` (B, dim) at the pointer, lightly's ring buffer: a batch that reaches the
        end fills it and the pointer wraps to 0 (the part that does not fit is dropped). With
        ``gather_distributed`` the keys of every rank, in rank order (any per-rank B: the
        gathered batch, and so the pointer, is the same on every rank)."""
        if self.gather_distributed:
            keys = distributed.gather_no_grad(keys)
        size, batch = self.size, keys.shape[0]
        if _pointer_readable_on_host(self.bank.device):
            # The pointer is read without waiting for a device: write the batch's rows only (the
            # tensor form below touches the whole bank).
            start = int(self.bank_ptr[0])
            stop = min(size, start + batch)
            self.bank[start:stop] = keys[: stop - start].to(self.bank.dtype)
            self.bank_ptr[0] = 0 if start + batch >= size else stop
            return
        # Tensor ops only (no int(ptr) host sync): the step compiles without a graph break and
        # is captured in a CUDA graph; it touches the whole bank once, as the snapshot in
        # forward already does.
        ptr = self.bank_ptr[0]
        offset = torch.arange(size, device=self.bank.device) - ptr
        in_batch = (offset >= 0) & (offset < batch)
        incoming = keys.to(self.bank.dtype)[offset.clamp(0, batch - 1)]
        self.bank.copy_(torch.where(in_batch[:, None], incoming, self.bank))
        self.bank_ptr.copy_(torch.where(ptr + batch >= size, torch.zeros_like(ptr), ptr + batch).reshape(1))


class NTXentLoss(nn.Module):
    """Drop-in for ``lightly.loss.NTXentLoss``: SimCLR's NT-Xent, or MoCo's InfoNCE with a bank.

    Args:
        temperature: scale of the logits; any ``|temperature| >= 1e-8``, or a one-element tensor:
            an ``nn.Parameter`` is registered as the module's parameter and trained, as lightly
            does (its value is checked once, here).
        memory_bank_size: 0 (SimCLR), ``(size, dim)`` (MoCo, as lightly), or an int ``size``
            whose feature dimension is taken from the first batch.
        gather_distributed: negatives from all ranks; with a bank, the bank is filled with
            the keys of all ranks.
        backend: ``"auto" | "triton" | "torch" | "reference"`` (env ``FASTSSL_BACKEND``).

    Forward ``(out0, out1)``, each (N, d). With a bank, ``out0`` are the queries and ``out1``
    the keys; the bank (normalized keys of earlier batches, ``self.memory_bank.bank`` as in
    lightly, also reachable as ``self.bank``) provides the negatives and is updated with
    ``out1`` whenever ``out0`` requires a gradient (lightly's rule, which keeps the bank fixed
    during evaluation). Returns a 0-d float32 loss. With ``gather_distributed`` ranks may hold
    different batch sizes.

    Example::

        criterion = NTXentLoss(temperature=nn.Parameter(torch.tensor(0.5)))
        loss = criterion(torch.randn(8, 16, requires_grad=True), torch.randn(8, 16))
        loss.backward()  # criterion.temperature.grad is set
    """

    def __init__(
        self,
        temperature: Temperature = 0.5,
        memory_bank_size: Union[int, Sequence[int]] = 0,
        gather_distributed: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        # An nn.Parameter assigned here is registered (nn.Module.__setattr__), as in lightly.
        self.temperature = check_module_temperature("temperature", temperature)
        check_distributed_available("gather_distributed", gather_distributed)
        self.gather_distributed = gather_distributed
        self.backend = check_backend_name(backend)
        self.memory_bank_size, bank_dim = _parse_bank_size(memory_bank_size)
        self.memory_bank = MemoryBank(self.memory_bank_size, bank_dim, gather_distributed)

    @property
    def bank(self) -> Tensor:
        return self.memory_bank.bank

    @property
    def bank_ptr(self) -> Tensor:
        return self.memory_bank.bank_ptr

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        if self.memory_bank_size == 0:
            return ntxent_loss(
                out0,
                out1,
                self.temperature,
                gather_distributed=self.gather_distributed,
                backend=self.backend,
            )
        check_pair("out0", out0, "out1", out1)
        bank = self.memory_bank
        if bank.bank.numel() == 0:
            bank.allocate(out0.shape[1], out0.device)
        if bank.bank.shape[1] != out0.shape[1]:
            raise ValueError(
                f"out0 has {out0.shape[1]} features but the memory bank stores {bank.bank.shape[1]}"
            )
        if bank.bank.device != out0.device:
            bank.to(out0.device)
        update = out0.requires_grad
        if _infonce_implementation(self.backend, out0, out1, bank.bank) == "torch":
            # The torch path keeps nothing of the bank for its backward: the loss reads the live
            # buffer, then the enqueue writes into it (no snapshot copy).
            loss = self._infonce(out0, out1, bank.bank)
            if update:
                bank.enqueue(F.normalize(out1.detach(), dim=1))
            return loss
        # The other paths keep the bank for their backward, so they get a snapshot: the enqueue
        # below writes into the buffer in place.
        negatives = bank.bank.clone()
        if update:
            # As lightly: the keys are normalized in their own dtype, then stored in the bank's.
            bank.enqueue(F.normalize(out1.detach(), dim=1))
        return self._infonce(out0, out1, negatives)

    def _infonce(self, out0: Tensor, out1: Tensor, negatives: Tensor) -> Tensor:
        return infonce_loss(
            out0,
            out1,
            negatives,
            self.temperature,
            gather_distributed=self.gather_distributed,
            backend=self.backend,
        )
