r"""lightly's other contrastive losses, drop-in and fused: DCL and DCLW (Yeh et al. 2022),
DirectCLR (Jing et al. 2022), MACL (Huang et al. 2023), DetCon-S and DetCon-B (Hénaff et al.
2021), KoLeo (Sablayrolles et al. 2019, as used by DINOv2), and the supervised contrastive
``SupConLoss`` (Khosla et al. 2020) that lightly's tracker proposes. Formulas (the tests' oracle):
the "Contrastive extensions" section of :mod:`fastssl.reference`.

**One fused primitive.** Every loss here but KoLeo is a sum of per-row terms

.. math:: \ell_k = w_k\big(\mathrm{lse}_k - \mathrm{pos}_k\big), \qquad
          \mathrm{lse}_k = \log\sum_{m\notin E_k} e^{S_{km}}, \quad S = Z_r Z_c^\top/\tau,

over unit-norm rows :math:`Z_r` and columns :math:`Z_c`, where the *excluded* set :math:`E_k`
holds a few columns per row (itself; DCL also its positive; DetCon the same image's regions
with the row's mask id) and :math:`\mathrm{pos}_k` is a positive term that needs no N×N
matrix (one dot product for DCL and MACL, class sums for SupCon, an M×M block per image for
DetCon). Only the log-sum-exps touch the 2N×2N similarity matrix, and they are computed here
in row chunks of at most ``_MAX_CHUNK_ELEMENTS`` logits (one exception: logits that fit in
``_SINGLE_CHUNK_ELEMENTS`` form a single chunk that the backward reuses instead of recomputing),
so memory is O(N·d + chunk), never O(N²). The positive terms and the normalization go through
ordinary autograd, which costs O(N·d).

**Backward of the log-sum-exps** (FlashAttention's recipe: one float per row kept, logits
recomputed). With :math:`g_k = \partial L/\partial\mathrm{lse}_k` and
:math:`p_{km} = e^{S_{km} - \mathrm{lse}_k}` (0 on :math:`E_k`),
:math:`\partial L/\partial Z_r = \frac1\tau G Z_c` and :math:`\partial L/\partial Z_c =
\frac1\tau G^\top Z_r` with :math:`G_{km} = g_k p_{km}` (``_RowLSE``: DetCon-B, whose predictions
and targets differ). When the rows are the columns and the exclusion is symmetric
(:math:`m\in E_k \Leftrightarrow k\in E_m`), :math:`S` is symmetric and

.. math:: \frac{\partial L}{\partial z_k} = \frac1\tau\sum_{m\notin E_k}
          \big(g_k e^{S_{km}-\mathrm{lse}_k} + g_m e^{S_{km}-\mathrm{lse}_m}\big) z_m,

so one recomputed chunk of rows gives whole rows of the gradient: no column pass, no
accumulation (``_SymmetricRowLSE``: DCL, DCLW, SupCon, MACL, DetCon-S). Wherever
``_exp_factorizable`` allows, both exponentials come from one :math:`P = e^{S - b}` taken
against a constant :math:`b \ge 1/|\tau|`, and the backward is a single product of P with
:math:`[Z, \alpha\odot Z]` (see ``_SymmetricRowLSE``).

**Distributed** (``gather_distributed=True``): the loss equals the single-process loss on the
concatenation of every rank's batch, and each rank's input gradient is ``world_size ×`` its slice
of the single-process gradient. Each rank scores its own rows against the gathered columns. In
the symmetric case the columns are gathered without a gradient and the backward gathers the
per-row :math:`g` and the log-sum-exps (2·W·n floats), because the formula above already is
the gradient of the global sum for the local rows. DetCon-B gathers its targets with
:func:`fastssl.distributed.gather`, whose backward sums the column gradients over ranks.
The reported value is the mean over ranks (:func:`fastssl.distributed.global_mean`).

**Backends.** ``"torch"`` is the path above; ``"reference"`` the textbook formula;
``"triton"`` currently runs the torch path too (these losses have no Triton kernel yet: they are
meant to become flags of the NT-Xent kernels), so ``backend="auto"`` is the torch path on every
device. DirectCLR is NT-Xent on a column slice and uses :func:`fastssl.ntxent.ntxent_loss`,
Triton kernel included.

Precision: float16/bfloat16 inputs are normalized and contracted in float32 (float64 inputs in
float64); losses come back as 0-d float32 tensors, gradients in the input dtype.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastssl import distributed, reference
from fastssl._backend import check_backend_name, outside_autocast, resolve_backend
from fastssl._checks import (
    BatchShapeError,
    check_distributed_available,
    check_finite,
    check_int,
    check_nonzero,
    check_pair,
    check_positive,
    check_probability,
    check_tensor,
    check_real,
)
from fastssl.ntxent import NTXentLoss, ntxent_loss

# Logits held by one row chunk when the matrix is chunked (16 MiB in float32; the backward holds
# two such buffers). Larger chunks gain nothing on CPU or GPU: the products stay large.
_MAX_CHUNK_ELEMENTS = 1 << 22
# Up to this many logits (64 MiB in float32) the whole matrix is one chunk, kept for the
# backward: one matrix product fewer for the batch sizes where the product dominates.
_SINGLE_CHUNK_ELEMENTS = 1 << 24

# F.normalize's clamp.
_NORM_EPS = 1e-12

WeightFn = Callable[[Tensor, Tensor], Tensor]


def _acc_dtype(*tensors: Tensor) -> torch.dtype:
    """float32 accumulation, float64 for float64 inputs."""
    out = torch.float32
    for x in tensors:
        out = torch.promote_types(out, x.dtype)
    return out


def _rows_per_chunk(n_rows: int, n_cols: int, chunk_rows: Optional[int]) -> int:
    if chunk_rows is not None:
        return max(1, int(chunk_rows))
    if n_rows * n_cols <= _SINGLE_CHUNK_ELEMENTS:
        return max(n_rows, 1)
    return max(1, _MAX_CHUNK_ELEMENTS // max(n_cols, 1))


def _normalize(x: Tensor, acc: torch.dtype) -> Tensor:
    """Rows of ``x`` scaled to unit L2 norm in ``acc`` (differentiable; F.normalize's clamp)."""
    return F.normalize(x.to(acc), dim=-1, eps=_NORM_EPS)


def _exp_factorizable(inv_temp_bound: float, n_cols: int) -> bool:
    r"""Whether the exponentials may be taken against the constant :math:`b` = ``inv_temp_bound``
    :math:`\ge 1/|	au| \ge |S_{km}|` (unit vectors) instead of a row maximum.

    Then :math:`P = e^{S-b} \in [e^{-2b}, 1]`, a row sum lies in :math:`[e^{-2b}, C]` and
    :math:`g\,e^{b-\mathrm{lse}} \le g\,e^{2b}`: all normal float32 numbers while
    :math:`2b + \log C < 80`. Otherwise (:math:`|	au|` below about 0.03, or a temperature nothing
    bounds) the log-sum-exps take row maxima and the symmetric backward two exponentials."""
    return 2.0 * inv_temp_bound + math.log(max(n_cols, 2)) < 80.0


# --------------------------------------------------------------------------------------------
# The fused primitive: chunked row log-sum-exps with a hand-written backward
# --------------------------------------------------------------------------------------------


class _SymmetricRowLSE(torch.autograd.Function):
    r"""``lse_k = log Σ_{m ∉ E_k} exp(S_km)`` for the rows ``z`` (R, d) against columns that
    contain them: ``z`` itself (``z_cols`` None), or every rank's rows gathered, this rank's at
    ``col_offset``. Requires a symmetric exclusion; ``excluded`` (R, E) holds global column
    indices (repeats allowed). A row whose every column is excluded gets ``-inf`` and no gradient.
    ``inv_temp`` is a float or a 0-d tensor; ``inv_temp_bound`` bounds :math:`1/|	au|` (``inf``
    when nothing does).

    Returns lse (R,). Backward: the symmetric formula of the module docstring. Where
    :func:`_exp_factorizable` allows, every exponential is taken against the constant
    :math:`b \ge 1/|	au| \ge |S_{km}|` instead of a row maximum: :math:`P_{km} = e^{S_{km} - b}`
    (0 on the excluded entries), :math:`s_k = \sum_m P_{km}`, :math:`\mathrm{lse}_k = b + \log s_k`.
    Then :math:`e^{S_{km}-\mathrm{lse}_k} = P_{km}/s_k` and :math:`e^{S_{km}-\mathrm{lse}_m} =
    P_{km}/s_m` (S is symmetric), so with :math:`lpha = g/s`

    .. math:: \sum_m P_{km}(lpha_k + lpha_m) z_m = lpha_k (PZ)_k + (P(lpha\odot Z))_k,

    one product of the kept (or recomputed) P with the (C, 2d) matrix :math:`[Z, lpha\odot Z]`
    and no elementwise pass over the logits.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        z: Tensor,
        z_cols: Optional[Tensor],
        excluded: Tensor,
        inv_temp: Union[float, Tensor],
        inv_temp_bound: float,
        col_offset: int,
        use_dist: bool,
        chunk_rows: Optional[int],
    ) -> Tensor:
        cols = z if z_cols is None else z_cols
        n_rows, n_cols = z.shape[0], cols.shape[0]
        chunk = _rows_per_chunk(n_rows, n_cols, chunk_rows)
        factored = _exp_factorizable(inv_temp_bound, n_cols)
        # Rows pre-scaled by 1/τ: the product gives the logits without another pass over them.
        scaled_rows = z * inv_temp
        lse_parts = []
        logits = None
        for start in range(0, n_rows, chunk):
            stop = min(n_rows, start + chunk)
            logits = scaled_rows[start:stop] @ cols.T
            if factored:
                # P = e^{S - b}: no row maximum needed, and above e^{-2b}, a normal float32.
                logits.sub_(inv_temp_bound).exp_().scatter_(1, excluded[start:stop], 0.0)
                lse_parts.append(logits.sum(dim=1).log_().add_(inv_temp_bound))
            else:
                logits.scatter_(1, excluded[start:stop], float("-inf"))
                lse_parts.append(torch.logsumexp(logits, dim=1))
        lse = torch.cat(lse_parts)
        # One chunk: kept for the backward (its P, or its logits for two exponentials).
        single_chunk = logits if chunk >= n_rows else None
        lse_cols = distributed.gather_no_grad(lse) if use_dist else lse
        temp_tensor = inv_temp if isinstance(inv_temp, Tensor) else None
        ctx.save_for_backward(z, z_cols, excluded, lse, lse_cols, single_chunk, temp_tensor)
        ctx.meta = (None if temp_tensor is not None else inv_temp, inv_temp_bound, factored, use_dist, chunk)
        return lse

    @staticmethod
    def backward(ctx, grad_lse: Tensor):  # type: ignore[override]
        z, z_cols, excluded, lse, lse_cols, single_chunk, temp_tensor = ctx.saved_tensors
        inv_temp_float, bound, factored, use_dist, chunk = ctx.meta
        inv_temp = temp_tensor if temp_tensor is not None else inv_temp_float
        cols = z if z_cols is None else z_cols
        n_rows, d = z.shape
        grad_lse = grad_lse.to(z.dtype).contiguous()
        # The column rows' g_m live on their own ranks: gather them (one float per row).
        grad_cols = distributed.gather_no_grad(grad_lse) if use_dist else grad_lse
        scaled_rows = z * inv_temp if single_chunk is None else None
        parts = []
        if factored:

            def alpha(g: Tensor, row_lse: Tensor) -> Tensor:
                # g/s = g e^{b - lse}; 0 for a row with no column (lse = -inf, P = 0 throughout).
                return torch.where(row_lse == float("-inf"), torch.zeros_like(g), g * (bound - row_lse).exp())

            alpha_rows = alpha(grad_lse, lse)
            cols_pair = torch.cat([cols, alpha(grad_cols, lse_cols)[:, None] * cols], dim=1)
            for start in range(0, n_rows, chunk):
                stop = min(n_rows, start + chunk)
                if single_chunk is not None:
                    probs = single_chunk
                else:
                    probs = (scaled_rows[start:stop] @ cols.T).sub_(bound).exp_()
                    probs.scatter_(1, excluded[start:stop], 0.0)
                both = probs @ cols_pair
                parts.append(both[:, d:].addcmul_(alpha_rows[start:stop, None], both[:, :d]))
        else:
            for start in range(0, n_rows, chunk):
                stop = min(n_rows, start + chunk)
                rows_lse = lse[start:stop, None]
                logits = single_chunk if single_chunk is not None else scaled_rows[start:stop] @ cols.T
                weights = logits - rows_lse
                # g_m e^{S-lse_m} = g_m e^{(S-lse_k) + lse_k - lse_m}
                other = (weights + rows_lse).sub_(lse_cols[None, :]).exp_().mul_(grad_cols[None, :])
                weights.exp_().mul_(grad_lse[start:stop, None]).add_(other)
                del other
                # Excluded entries (NaN or inf where a row's lse is -inf) carry no gradient.
                weights.scatter_(1, excluded[start:stop], 0.0)
                parts.append(weights @ cols)
        grad_z = torch.cat(parts).mul_(inv_temp)
        return grad_z, None, None, None, None, None, None, None


class _RowLSE(torch.autograd.Function):
    r"""``lse_k = log Σ_{m ∉ E_k} exp(S_km)`` for rows ``z_rows`` (R, d) against different columns
    ``z_cols`` (C, d); gradients for both (DetCon-B's predictions against its targets). With
    :math:`G = \mathrm{diag}(g) E`, :math:`E_{km} = e^{S_{km} - \mathrm{lse}_k}`, both gradients
    are products with E and a row scaling: :math:`G Z_c = g\odot(E Z_c)` and
    :math:`G^\top Z_r = E^\top(g\odot Z_r)`. The exponentials are taken against the constant
    ``inv_temp_bound`` where :func:`_exp_factorizable` allows, else against row maxima."""

    @staticmethod
    def forward(ctx, z_rows: Tensor, z_cols: Tensor, excluded: Tensor, inv_temp: float, inv_temp_bound: float,  # type: ignore[override]
                chunk_rows: Optional[int]) -> Tensor:
        n_rows, n_cols = z_rows.shape[0], z_cols.shape[0]
        chunk = _rows_per_chunk(n_rows, n_cols, chunk_rows)
        constant_shift = _exp_factorizable(inv_temp_bound, n_cols)
        scaled_rows = z_rows * inv_temp
        lse_parts, shift_parts = [], []
        exponentials = None
        for start in range(0, n_rows, chunk):
            stop = min(n_rows, start + chunk)
            exponentials = scaled_rows[start:stop] @ z_cols.T
            if constant_shift:
                exponentials.sub_(inv_temp_bound).exp_().scatter_(1, excluded[start:stop], 0.0)
                lse_parts.append(exponentials.sum(dim=1).log_().add_(inv_temp_bound))
                shift_parts.append(torch.full_like(lse_parts[-1], inv_temp_bound))
            else:
                exponentials.scatter_(1, excluded[start:stop], float("-inf"))
                row_max = exponentials.amax(dim=1, keepdim=True)
                # A row whose every column is excluded keeps exp(-inf) = 0 and lse = -inf.
                row_max = torch.where(row_max == float("-inf"), torch.zeros_like(row_max), row_max)
                lse_parts.append(exponentials.sub_(row_max).exp_().sum(dim=1).log_().add_(row_max[:, 0]))
                shift_parts.append(row_max[:, 0])
        lse = torch.cat(lse_parts)
        # One chunk: its exponentials e^{S - shift_k} are kept for the backward.
        single_chunk = exponentials if chunk >= n_rows else None
        shifts = torch.cat(shift_parts) if single_chunk is not None else None
        ctx.save_for_backward(z_rows, z_cols, excluded, lse, single_chunk, shifts)
        ctx.meta = (inv_temp, chunk)
        return lse

    @staticmethod
    def backward(ctx, grad_lse: Tensor):  # type: ignore[override]
        z_rows, z_cols, excluded, lse, single_chunk, shifts = ctx.saved_tensors
        inv_temp, chunk = ctx.meta
        grad_lse = grad_lse.to(z_rows.dtype)
        scaled_rows = z_rows * inv_temp if single_chunk is None else None
        grad_rows = []
        grad_cols = torch.zeros_like(z_cols)
        for start in range(0, z_rows.shape[0], chunk):
            stop = min(z_rows.shape[0], start + chunk)
            g = grad_lse[start:stop]
            if single_chunk is not None:
                # E = e^{S - shift_k} · e^{shift_k - lse_k}; rows with lse = -inf are all zeros.
                probs, row_lse = single_chunk, lse[start:stop]
                g = torch.where(row_lse == float("-inf"), torch.zeros_like(g), g * (shifts - row_lse).exp())
            else:
                probs = (scaled_rows[start:stop] @ z_cols.T).sub_(lse[start:stop, None]).exp_()
                probs.scatter_(1, excluded[start:stop], 0.0)
            grad_rows.append(g[:, None] * (probs @ z_cols))
            grad_cols.addmm_(probs.T, g[:, None] * z_rows[start:stop])
        return torch.cat(grad_rows).mul_(inv_temp), grad_cols.mul_(inv_temp), None, None, None, None


def _columns(z: Tensor, use_dist: bool) -> Tuple[Optional[Tensor], int]:
    """Columns of the symmetric primitive: every rank's rows (gathered without a gradient) and
    the index of this rank's first row among them; ``(None, 0)`` for a single process."""
    if not use_dist:
        return None, 0
    return distributed.gather_no_grad(z.detach()), distributed.rank() * z.shape[0]


def _two_view_pairs(n: int, col_offset: int, device: torch.device) -> Tuple[Tensor, Tensor]:
    """For rows ``[view 0; view 1]`` of n samples: each row's own column and its positive's."""
    rows = torch.arange(2 * n, device=device)
    self_cols = rows + col_offset
    positive_cols = torch.where(rows < n, rows + n, rows - n) + col_offset
    return self_cols, positive_cols


def _use_dist(gather_distributed: bool) -> bool:
    return bool(gather_distributed) and distributed.is_distributed()


def _reported(loss: Tensor, gather_distributed: bool) -> Tensor:
    loss = loss.float()
    return distributed.global_mean(loss) if gather_distributed else loss


# --------------------------------------------------------------------------------------------
# DCL / DCLW
# --------------------------------------------------------------------------------------------


def negative_mises_fisher_weights(out0: Tensor, out1: Tensor, sigma: float = 0.5) -> Tensor:
    r"""DCLW's weights (Yeh et al. 2022, Eq. 7), as ``lightly.loss.dcl_loss``'s function of the
    same name: :math:`w_i = 2 - N\,\mathrm{softmax}_i(\langle o^{(0)}_i, o^{(1)}_i\rangle/\sigma)`
    over the batch, detached (a constant of the loss).

    Args:
        out0, out1: (N, d), used as given (DCL passes normalized embeddings).
        sigma: scale of the similarities.
    Returns:
        (N,) weights in the inputs' dtype, without gradient.

    Example::

        >>> z0, z1 = F.normalize(torch.randn(8, 4), dim=1), F.normalize(torch.randn(8, 4), dim=1)
        >>> negative_mises_fisher_weights(z0, z1).shape
        torch.Size([8])
    """
    return reference.negative_mises_fisher_weights(out0, out1, sigma).detach()


def _dcl_torch(
    out0: Tensor, out1: Tensor, temperature: float, weight_fn: Optional[WeightFn], use_dist: bool,
    chunk_rows: Optional[int] = None,
) -> Tensor:
    n = out0.shape[0]
    acc = _acc_dtype(out0, out1)
    z = _normalize(torch.cat([out0, out1]), acc)
    z_cols, col_offset = _columns(z, use_dist)
    self_cols, positive_cols = _two_view_pairs(n, col_offset, z.device)
    # DCL's denominator leaves out the row itself and its positive.
    excluded = torch.stack([self_cols, positive_cols], dim=1)
    inv_temp = 1.0 / temperature
    lse = _SymmetricRowLSE.apply(z, z_cols, excluded, inv_temp, abs(inv_temp), col_offset, use_dist, chunk_rows)
    z0, z1 = z[:n], z[n:]
    positive = (z0 * z1).sum(dim=1) * inv_temp
    if weight_fn is None:
        positive_terms = torch.cat([positive, positive])
    else:
        # The weights see the whole (gathered) batch, as the single-process loss would.
        w0, w1 = z0, z1
        if use_dist:
            w0, w1 = distributed.gather(z0), distributed.gather(z1)
        weights0, weights1 = weight_fn(w0, w1), weight_fn(w1, w0)
        if use_dist:
            start = distributed.rank() * n
            # This rank's rows of per-sample weights (a scalar weight broadcasts as it is).
            weights0, weights1 = (
                w[start : start + n] if isinstance(w, Tensor) and w.dim() > 0 else w for w in (weights0, weights1)
            )
        positive_terms = torch.cat([weights0 * positive, weights1 * positive])
    return (lse - positive_terms).mean()


def _check_dcl_batch(name: str, x: Tensor, gather_distributed: bool) -> None:
    world = distributed.world_size() if _use_dist(gather_distributed) else 1
    if x.shape[0] * world < 2:
        raise BatchShapeError(
            f"{name} needs at least 2 samples in the (gathered) batch: with one sample DCL has no "
            f"negative left in its denominator; got shape {tuple(x.shape)}"
        )


def _check_weight_fn(weight_fn: object) -> None:
    if weight_fn is not None and not callable(weight_fn):
        raise TypeError(f"weight_fn must be None or a callable (out0, out1) -> (N,) weights, got {type(weight_fn).__name__}")


@outside_autocast
def dcl_loss(
    out0: Tensor,
    out1: Tensor,
    temperature: float = 0.1,
    weight_fn: Optional[WeightFn] = None,
    *,
    gather_distributed: bool = False,
    backend: str = "auto",
) -> Tensor:
    r"""Decoupled contrastive loss (Yeh et al. 2022, Eq. 6): NT-Xent without the positive in
    the denominator, averaged over both views (see :func:`fastssl.reference.dcl_loss`).

    Args:
        out0, out1: (N, d) projections of the two views; N ≥ 2 over the (gathered) batch.
        temperature: any non-zero finite number.
        weight_fn: optional ``(ẑ_a, ẑ_b) -> (N,)`` weights of the positive terms, called (as
            lightly does) with the normalized views in both orders; under ``gather_distributed``
            it sees the gathered batch.
        gather_distributed: negatives from every rank (the loss of the concatenated batch).
        backend: ``"auto" | "triton" | "torch" | "reference"`` (``"triton"`` runs the torch
            path: no kernel yet).
    Returns:
        0-d float32 loss.

    Example::

        >>> a, b = torch.randn(8, 16), torch.randn(8, 16)
        >>> dcl_loss(a, b, temperature=0.1)
        tensor(...)
    """
    check_pair("out0", out0, "out1", out1)
    temperature = check_nonzero("temperature", temperature)
    _check_weight_fn(weight_fn)
    check_distributed_available("gather_distributed", gather_distributed)
    _check_dcl_batch("out0", out0, gather_distributed)
    impl = resolve_backend(backend, out0, has_triton_kernel=False)
    if impl == "reference":
        if gather_distributed:
            out0, out1 = distributed.gather(out0), distributed.gather(out1)
        return reference.dcl_loss(out0, out1, temperature, weight_fn).float()
    return _reported(_dcl_torch(out0, out1, temperature, weight_fn, _use_dist(gather_distributed)), gather_distributed)


@outside_autocast
def dclw_loss(
    out0: Tensor,
    out1: Tensor,
    temperature: float = 0.1,
    sigma: float = 0.5,
    *,
    gather_distributed: bool = False,
    backend: str = "auto",
) -> Tensor:
    r"""DCL with the von Mises–Fisher weights of :func:`negative_mises_fisher_weights` (DCLW,
    Yeh et al. 2022). Under ``gather_distributed`` the weights' softmax runs over the gathered
    batch (the single-process loss of the concatenation).

    Args:
        out0, out1: (N, d); temperature, sigma: non-zero finite numbers.
    Returns:
        0-d float32 loss.

    Example::

        >>> dclw_loss(torch.randn(8, 16), torch.randn(8, 16), temperature=0.1, sigma=0.5)
        tensor(...)
    """
    sigma = check_nonzero("sigma", sigma)
    return dcl_loss(
        out0, out1, temperature, functools.partial(negative_mises_fisher_weights, sigma=sigma),
        gather_distributed=gather_distributed, backend=backend,
    )


class DCLLoss(nn.Module):
    """Drop-in for ``lightly.loss.DCLLoss``: decoupled contrastive learning (Yeh et al. 2022).

    Args:
        temperature: scale of the logits (non-zero).
        weight_fn: optional ``(out0, out1) -> (N,)`` weights of the positive terms.
        gather_distributed: negatives from all ranks (the loss of the concatenated batch; each
            rank's gradient is ``world_size ×`` its slice of that loss's gradient).
        backend: ``"auto" | "triton" | "torch" | "reference"``; ``"triton"`` runs the torch path
            until the NT-Xent kernels get DCL's flag.

    Forward ``(out0, out1)``, each (N, d), returns a 0-d float32 loss.

    Example::

        >>> loss_fn = DCLLoss(temperature=0.1)
        >>> loss = loss_fn(torch.randn(8, 128), torch.randn(8, 128))
        >>> loss.shape
        torch.Size([])
    """

    def __init__(
        self,
        temperature: float = 0.1,
        weight_fn: Optional[WeightFn] = None,
        gather_distributed: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.temperature = check_nonzero("temperature", temperature)
        _check_weight_fn(weight_fn)
        self.weight_fn = weight_fn
        check_distributed_available("gather_distributed", gather_distributed)
        self.gather_distributed = gather_distributed
        self.backend = check_backend_name(backend)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        """Decoupled contrastive loss of two views (DCLW too: its weights come from ``weight_fn``).

        Args:
            out0: (N, D) embeddings of the first view.
            out1: (N, D) embeddings of the second view; row i is the positive of ``out0[i]``.

        Returns:
            0-d float32 loss, the mean of both views' terms.
        """
        return dcl_loss(
            out0, out1, self.temperature, self.weight_fn,
            gather_distributed=self.gather_distributed, backend=self.backend,
        )


class DCLWLoss(DCLLoss):
    """Drop-in for ``lightly.loss.DCLWLoss``: DCL weighted by
    :func:`negative_mises_fisher_weights` (Yeh et al. 2022).

    Args:
        temperature: scale of the logits; sigma: scale of the weights' similarities.
        gather_distributed, backend: as :class:`DCLLoss`.

    Example::

        >>> loss_fn = DCLWLoss(temperature=0.1, sigma=0.5)
        >>> loss = loss_fn(torch.randn(8, 128), torch.randn(8, 128))
    """

    def __init__(
        self,
        temperature: float = 0.1,
        sigma: float = 0.5,
        gather_distributed: bool = False,
        backend: str = "auto",
    ) -> None:
        self.sigma = check_nonzero("sigma", sigma)
        super().__init__(
            temperature=temperature,
            weight_fn=functools.partial(negative_mises_fisher_weights, sigma=self.sigma),
            gather_distributed=gather_distributed,
            backend=backend,
        )


# --------------------------------------------------------------------------------------------
# DirectCLR
# --------------------------------------------------------------------------------------------


def _directclr_slice(x: Tensor, name: str, loss_dim: int) -> Tensor:
    check_tensor(name, x, ndim=None)
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape (batch_size, ...) with at least 2 dimensions, got {tuple(x.shape)}")
    return x.flatten(start_dim=1)[:, :loss_dim]


@outside_autocast
def directclr_loss(
    out0: Tensor,
    out1: Tensor,
    loss_dim: int = 64,
    temperature: float = 0.5,
    *,
    gather_distributed: bool = False,
    backend: str = "auto",
) -> Tensor:
    """DirectCLR (Jing et al. 2022): NT-Xent on the first ``loss_dim`` features of the flattened
    representations (a strided view: no copy), with NT-Xent's backends, Triton included.

    Args:
        out0, out1: (N, ...) representations, flattened to (N, D); all D used when D < loss_dim.
    Returns:
        0-d float32 loss.

    Example::

        >>> directclr_loss(torch.randn(8, 512), torch.randn(8, 512), loss_dim=64)
        tensor(...)
    """
    loss_dim = check_int("loss_dim", loss_dim, minimum=1)
    a, b = _directclr_slice(out0, "out0", loss_dim), _directclr_slice(out1, "out1", loss_dim)
    return ntxent_loss(a, b, temperature, gather_distributed=gather_distributed, backend=backend)


class DirectCLRLoss(NTXentLoss):
    """Drop-in for ``lightly.loss.DirectCLRLoss``: :class:`fastssl.NTXentLoss` on the first
    ``loss_dim`` features of the flattened representations (Jing et al. 2022), a subclass of it as
    in lightly, memory bank included (the bank stores the sliced keys, so its ``dim`` is
    ``loss_dim``).

    Args:
        loss_dim: number of leading features the loss sees.
        temperature, memory_bank_size, gather_distributed, backend: as :class:`fastssl.NTXentLoss`.

    Example::

        >>> loss_fn = DirectCLRLoss(loss_dim=64)
        >>> loss = loss_fn(torch.randn(8, 512), torch.randn(8, 512))
    """

    def __init__(
        self,
        loss_dim: int = 64,
        temperature: float = 0.5,
        memory_bank_size: Union[int, Sequence[int]] = 0,
        gather_distributed: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            temperature=temperature,
            memory_bank_size=memory_bank_size,
            gather_distributed=gather_distributed,
            backend=backend,
        )
        self.loss_dim = check_int("loss_dim", loss_dim, minimum=1)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        """NT-Xent on the first ``loss_dim`` features of the flattened embeddings.

        Args:
            out0: (N, ...) outputs of the first view, flattened to (N, D) with D >= 1.
            out1: (N, ...) outputs of the second view, same shape.

        Returns:
            0-d float32 loss.
        """
        return super().forward(
            _directclr_slice(out0, "out0", self.loss_dim), _directclr_slice(out1, "out1", self.loss_dim)
        )


# --------------------------------------------------------------------------------------------
# MACL
# --------------------------------------------------------------------------------------------


def _macl_torch(z0: Tensor, z1: Tensor, temperature: float, alpha: float, A_0: float, eps: float,
                chunk_rows: Optional[int] = None) -> Tensor:
    n = z0.shape[0]
    acc = _acc_dtype(z0, z1)
    z = _normalize(torch.cat([z0, z1]), acc)
    self_cols, positive_cols = _two_view_pairs(n, 0, z.device)
    positive_cosine = (z[:n] * z[n:]).sum(dim=1)
    # A: the mean positive cosine, detached; the temperature stays a device tensor (no host sync).
    alignment = positive_cosine.detach().mean()
    inv_temp = 1.0 / (temperature * (1 + alpha * (alignment - A_0)))
    # A ∈ [-1, 1] bounds the temperature factor below by 1 - α(1 + A_0) (when that is > 0).
    lowest_factor = 1.0 - alpha * (1.0 + A_0)
    inv_temp_bound = 1.0 / (temperature * lowest_factor) if lowest_factor > 0 else math.inf
    # With δ_k = LSE over the negatives (DCL's denominator) minus the positive logit,
    # -log P_k = softplus(δ_k) and 1 - P_k = sigmoid(δ_k): both keep full relative precision when
    # P_k ≈ 1, where log_softmax rounds log P to 0 or to a few ulps of the logits and the weight
    # V_k = 1/(1 - P_k + ε) (up to 1/ε) amplifies that rounding. N = 1: no negative, δ = -inf, 0.
    negative_lse = _SymmetricRowLSE.apply(
        z, None, torch.stack([self_cols, positive_cols], dim=1), inv_temp, inv_temp_bound, 0, False, chunk_rows
    )
    delta = negative_lse - torch.cat([positive_cosine, positive_cosine]) * inv_temp
    reweight = 1.0 / (torch.sigmoid(delta.detach()) + eps)
    return (reweight * F.softplus(delta)).mean()


def _check_macl_hyperparameters(temperature: object, alpha: object, A_0: object) -> Tuple[float, float, float]:
    temperature = check_finite("temperature", temperature)
    if temperature < 1e-8:
        raise ValueError(f"Illegal initial temperature: temperature must be >= 1e-8, got {temperature}")
    if not 0.0 <= check_finite("alpha", alpha) <= 1.0:
        raise ValueError(f"alpha must be in the range [0, 1], got {alpha}")
    if not 0.0 <= check_finite("A_0", A_0) <= 1.0:
        raise ValueError(f"A_0 must be in the range [0, 1], got {A_0}")
    return temperature, float(alpha), float(A_0)  # type: ignore[arg-type]


@outside_autocast
def macl_loss(
    z0: Tensor,
    z1: Tensor,
    temperature: float = 0.1,
    alpha: float = 0.5,
    A_0: float = 0.0,
    *,
    eps: float = 1e-8,
    backend: str = "auto",
) -> Tensor:
    r"""Model-aware contrastive loss (Huang et al. 2023): NT-Xent rows at the temperature
    :math:`\tau(1 + \alpha(A - A_0))`, A the mean positive cosine (detached, kept on the device),
    each row reweighted by the detached :math:`1/(1 - P_k + \epsilon)` (see
    :func:`fastssl.reference.macl_loss`).

    Args:
        z0, z1: (N, d) embeddings of the two views.
        temperature: base temperature (≥ 1e-8); alpha, A_0: in [0, 1].
    Returns:
        0-d float32 loss.

    Example::

        >>> macl_loss(torch.randn(8, 32), torch.randn(8, 32))
        tensor(...)
    """
    check_pair("z0", z0, "z1", z1)
    temperature, alpha, A_0 = _check_macl_hyperparameters(temperature, alpha, A_0)
    eps = check_positive("eps", eps, allow_zero=True)
    impl = resolve_backend(backend, z0, has_triton_kernel=False)
    if impl == "reference":
        return reference.macl_loss(z0, z1, temperature, alpha, A_0, eps).float()
    return _macl_torch(z0, z1, temperature, alpha, A_0, eps).float()


class MACLLoss(nn.Module):
    """Drop-in for ``lightly.loss.MACLLoss``: model-aware contrastive learning (Huang et al. 2023).

    Args:
        temperature: base temperature, ≥ 1e-8.
        alpha: how strongly the temperature follows the alignment, in [0, 1].
        A_0: alignment threshold, in [0, 1].
        backend: ``"auto" | "triton" | "torch" | "reference"`` (``"triton"`` runs the torch path).

    Forward ``(z0, z1)``, each (N, d); returns a 0-d float32 loss. Raises ``ValueError`` for
    out-of-range hyperparameters, as lightly.

    Example::

        >>> loss_fn = MACLLoss()
        >>> loss = loss_fn(torch.randn(8, 128), torch.randn(8, 128))
    """

    def __init__(self, temperature: float = 0.1, alpha: float = 0.5, A_0: float = 0.0, backend: str = "auto") -> None:
        super().__init__()
        self.temperature, self.alpha, self.A_0 = _check_macl_hyperparameters(temperature, alpha, A_0)
        self.eps = 1e-8
        self.backend = check_backend_name(backend)

    def forward(self, z0: Tensor, z1: Tensor) -> Tensor:
        """Model-aware contrastive loss of two views.

        Args:
            z0: (N, D) embeddings of the first view.
            z1: (N, D) embeddings of the second view; row i is the positive of ``z0[i]``.

        Returns:
            0-d float32 loss (temperature adapted from the detached mean positive alignment).
        """
        return macl_loss(z0, z1, self.temperature, self.alpha, self.A_0, eps=self.eps, backend=self.backend)


# --------------------------------------------------------------------------------------------
# SupCon
# --------------------------------------------------------------------------------------------


def _group_ids(labels: Tensor) -> Tensor:
    """Labels (M,) of any dtype → class ids in [0, M) with equal ids for equal labels.

    Sort-based, with no data-dependent shape (``torch.unique`` would synchronize with the
    device to size its output)."""
    sorted_labels, order = torch.sort(labels, stable=True)
    starts_group = torch.ones_like(sorted_labels, dtype=torch.bool)
    starts_group[1:] = sorted_labels[1:] != sorted_labels[:-1]
    ids_sorted = torch.cumsum(starts_group.long(), dim=0) - 1
    return torch.empty_like(ids_sorted).scatter_(0, order, ids_sorted)


def _supcon_torch(
    out0: Tensor, out1: Tensor, labels: Optional[Tensor], temperature: float, rescale: bool,
    use_dist: bool, chunk_rows: Optional[int] = None,
) -> Tensor:
    n = out0.shape[0]
    acc = _acc_dtype(out0, out1)
    z = _normalize(torch.cat([out0, out1]), acc)
    z_cols, col_offset = _columns(z, use_dist)
    if labels is None:
        # Every sample its own class: NT-Xent. Ids are global under gather.
        labels = torch.arange(n, device=z.device) + (distributed.rank() * n if use_dist else 0)
    row_labels = torch.cat([labels, labels])
    all_labels = distributed.gather_no_grad(row_labels) if use_dist else row_labels
    self_cols, _ = _two_view_pairs(n, col_offset, z.device)
    inv_temp = 1.0 / temperature
    # Khosla et al.'s L_out denominator is NT-Xent's: every row but the anchor.
    lse = _SymmetricRowLSE.apply(
        z, z_cols, self_cols[:, None], inv_temp, abs(inv_temp), col_offset, use_dist, chunk_rows
    )

    # Positive term through class sums: Σ_{p∈P(k)} z_k·z_p = z_k·(S_{y_k} - z_k), S_c the sum of
    # every row (all ranks) of class c; |P(k)| = count(y_k) - 1 ≥ 1 (the other view).
    columns = (z if z_cols is None else z_cols).detach()
    ids = _group_ids(all_labels)
    class_sums = torch.zeros_like(columns).index_add_(0, ids, columns)
    class_counts = torch.zeros(columns.shape[0], dtype=acc, device=z.device).index_add_(
        0, ids, torch.ones(columns.shape[0], dtype=acc, device=z.device)
    )
    own_ids = ids[col_offset : col_offset + 2 * n]
    z_detached = z.detach()
    positive_sum = class_sums[own_ids] - z_detached
    n_positive = class_counts[own_ids] - 1
    # Value z_k·P_k, gradient 2·P_k: row k's own term and, by symmetry of the pairs and the equal
    # |P| within a class, the terms of its positives (which may live on other ranks).
    positive = (2 * (z * positive_sum).sum(dim=1) - (z_detached * positive_sum).sum(dim=1)) / n_positive
    loss = (lse - positive * inv_temp).mean()
    return loss * temperature if rescale else loss


def _check_labels(labels: object, n: int, device: torch.device) -> Optional[Tensor]:
    if labels is None:
        return None
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be None or a tensor of shape ({n},), got {type(labels).__name__}")
    if labels.is_complex():
        raise TypeError(f"labels must be real (integer class ids), got dtype {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must have shape (batch_size,) = ({n},), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels must be on the device of out0 ({device}), got {labels.device}")
    return labels.detach()


@outside_autocast
def supcon_loss(
    out0: Tensor,
    out1: Tensor,
    labels: Optional[Tensor] = None,
    temperature: float = 0.5,
    rescale: bool = True,
    *,
    gather_distributed: bool = False,
    backend: str = "auto",
) -> Tensor:
    r"""Supervised contrastive loss :math:`\mathcal{L}^{sup}_{out}` (Khosla et al. 2020, Eq. 2)
    over two views (see :func:`fastssl.reference.supcon_loss`): each of the 2N rows has as
    positives every other row of its class, and NT-Xent's denominator.

    Args:
        out0, out1: (N, d) projections of the two views.
        labels: (N,) class of each sample (any real dtype; equal values, equal class); ``None``
            makes every sample its own class (NT-Xent, times ``temperature`` when ``rescale``).
        temperature: non-zero finite number.
        rescale: multiply the loss by ``temperature`` (lightly's proposal; the paper's code scales
            by τ/τ_base).
        gather_distributed: negatives and positives from every rank (labels gathered too).
    Returns:
        0-d float32 loss.

    Example::

        >>> a, b = torch.randn(8, 16), torch.randn(8, 16)
        >>> supcon_loss(a, b, torch.tensor([0, 1, 0, 1, 2, 2, 3, 3]))
        tensor(...)
    """
    check_pair("out0", out0, "out1", out1)
    labels = _check_labels(labels, out0.shape[0], out0.device)
    temperature = check_nonzero("temperature", temperature)
    check_distributed_available("gather_distributed", gather_distributed)
    impl = resolve_backend(backend, out0, has_triton_kernel=False)
    if impl == "reference":
        if gather_distributed:
            out0, out1 = distributed.gather(out0), distributed.gather(out1)
            if labels is None:
                labels = torch.arange(out0.shape[0], device=out0.device)
            else:
                labels = distributed.gather_no_grad(labels)
        return reference.supcon_loss(out0, out1, labels, temperature, bool(rescale)).float()
    loss = _supcon_torch(out0, out1, labels, temperature, bool(rescale), _use_dist(gather_distributed))
    return _reported(loss, gather_distributed)


class SupConLoss(nn.Module):
    """Supervised contrastive loss (Khosla et al. 2020, :math:`\\mathcal{L}^{sup}_{out}`) with the
    API proposed for lightly (lightly-ai/lightly pull request 1877: ``SupConLoss(temperature=0.5,
    gather_distributed=False, rescale=True)``, ``forward(out0, out1, labels=None)``); not in
    lightly 1.6.0.

    Args:
        temperature: scale of the logits (non-zero).
        gather_distributed: negatives and positives from every rank (the loss of the
            concatenated batch, labels included).
        rescale: multiply the loss by ``temperature``.
        backend: ``"auto" | "triton" | "torch" | "reference"`` (``"triton"`` runs the torch path).

    Forward ``(out0, out1, labels=None)``: two (N, d) views and (N,) class labels; returns a 0-d
    float32 loss. Without labels it equals ``temperature × NTXentLoss`` (or NT-Xent itself with
    ``rescale=False``).

    Example::

        >>> loss_fn = SupConLoss(temperature=0.1)
        >>> labels = torch.randint(0, 4, (8,))
        >>> loss = loss_fn(torch.randn(8, 128), torch.randn(8, 128), labels)
    """

    def __init__(
        self,
        temperature: float = 0.5,
        gather_distributed: bool = False,
        rescale: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.temperature = check_nonzero("temperature", temperature)
        check_distributed_available("gather_distributed", gather_distributed)
        self.gather_distributed = gather_distributed
        self.rescale = rescale
        self.eps = 1e-8
        self.backend = check_backend_name(backend)

    def forward(self, out0: Tensor, out1: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """Supervised contrastive loss of two views.

        Args:
            out0: (N, D) embeddings of the first view.
            out1: (N, D) embeddings of the second view.
            labels: (N,) integer class labels; samples with the same label are positives. None:
                only the other view of the same sample is a positive (NT-Xent).

        Returns:
            0-d float32 loss.
        """
        return supcon_loss(
            out0, out1, labels, self.temperature, self.rescale,
            gather_distributed=self.gather_distributed, backend=self.backend,
        )


# --------------------------------------------------------------------------------------------
# DetCon-S / DetCon-B
# --------------------------------------------------------------------------------------------


def _detcon_structure(mask_view0: Tensor, mask_view1: Tensor, col_offset: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """From the (B, M) mask ids: the excluded columns of every row (2BM, M), the positive
    indicator of each image's cross-view M×M block per view (2, B, M, M), the positive counts
    (2BM,) and the row weights (2BM,).

    Rows are [view 0's regions; view 1's], image-major; columns are this rank's
    [targets of view 0; targets of view 1] at ``col_offset`` among the gathered columns."""
    b, m = mask_view0.shape
    device = mask_view0.device
    masks = torch.stack([mask_view0, mask_view1])  # (2, B, M)
    same_view = masks[:, :, :, None] == masks[:, :, None, :]  # (2, B, M, M)
    cross_view = masks[:, :, :, None] == masks.flip(0)[:, :, None, :]
    # Row (v, b, i) leaves out its own view's regions j of image b with mask id m_bi (i included);
    # the other j are replaced by i, a repeated index that excludes nothing new.
    j = torch.arange(m, device=device)
    own_region = torch.where(same_view, j[None, None, None, :], j[None, None, :, None])
    block_start = (torch.arange(2, device=device)[:, None] * b + torch.arange(b, device=device)[None, :]) * m
    excluded = (col_offset + block_start[:, :, None, None] + own_region).reshape(2 * b * m, m)
    n_positive = cross_view.sum(dim=3).reshape(-1)
    # Weight [#pos > 0] / #{j : m_bj = m_bi} (its own view), as DetCon's reference code.
    area = same_view.sum(dim=3).reshape(-1)
    weights = (n_positive > 0).float() / area.float()
    return excluded, cross_view, n_positive, weights


def _detcon_torch(
    pred_view0: Tensor, pred_view1: Tensor, target_view0: Tensor, target_view1: Tensor,
    mask_view0: Tensor, mask_view1: Tensor, temperature: float, use_dist: bool, chunk_rows: Optional[int] = None,
) -> Tensor:
    b, m, d = pred_view0.shape
    symmetric = pred_view0 is target_view0 and pred_view1 is target_view1
    acc = _acc_dtype(pred_view0, pred_view1, target_view0, target_view1)
    preds = _normalize(torch.cat([pred_view0.reshape(b * m, d), pred_view1.reshape(b * m, d)]), acc)
    targets = preds if symmetric else _normalize(
        torch.cat([target_view0.reshape(b * m, d), target_view1.reshape(b * m, d)]), acc
    )
    col_offset = distributed.rank() * 2 * b * m if use_dist else 0
    excluded, cross_view, n_positive, weights = _detcon_structure(mask_view0, mask_view1, col_offset)
    inv_temp = 1.0 / temperature
    if symmetric:
        # DetCon-S: predictions are the targets and the exclusion is symmetric.
        z_cols, _ = _columns(preds, use_dist)
        lse = _SymmetricRowLSE.apply(
            preds, z_cols, excluded, inv_temp, abs(inv_temp), col_offset, use_dist, chunk_rows
        )
    else:
        z_cols = distributed.gather(targets) if use_dist else targets
        lse = _RowLSE.apply(preds, z_cols, excluded, inv_temp, abs(inv_temp), chunk_rows)
    # Positives: the same image's regions of the other view with the same mask id (M×M blocks).
    p = preds.reshape(2, b, m, d)
    t_other = targets.reshape(2, b, m, d).flip(0)
    block_logits = torch.einsum("vbik,vbjk->vbij", p, t_other) * inv_temp
    positive = (block_logits * cross_view.to(acc)).sum(dim=3).reshape(-1) / n_positive.clamp_min(1).to(acc)
    # Each view's loss is the mean over its B·M rows; the two views add up.
    return (weights.to(acc) * (lse - positive)).sum() / (b * m)


def _check_detcon_inputs(features: Sequence[Tuple[str, object]], masks: Sequence[Tuple[str, object]]) -> None:
    first_name, first = features[0]
    for name, x in features:
        check_tensor(name, x, ndim=None)
        assert isinstance(x, Tensor)
        if x.dim() != 3:
            raise ValueError(f"{name} must have shape (batch_size, num_masks, dim), got {tuple(x.shape)}")
        if x.shape != first.shape:  # type: ignore[union-attr]
            raise BatchShapeError(f"{name} and {first_name} must have the same shape, got {tuple(x.shape)} and {tuple(first.shape)}")  # type: ignore[union-attr]
        if x.device != first.device:  # type: ignore[union-attr]
            raise ValueError(f"{name} must be on the device of {first_name}")
    b, m = first.shape[:2]  # type: ignore[union-attr]
    for name, mask in masks:
        if not isinstance(mask, Tensor):
            raise TypeError(f"{name} must be a tensor of mask ids, got {type(mask).__name__}")
        if mask.is_floating_point() or mask.is_complex():
            raise TypeError(f"{name} must hold integer mask ids, got dtype {mask.dtype}")
        if tuple(mask.shape) != (b, m):
            raise ValueError(f"{name} must have shape (batch_size, num_masks) = ({b}, {m}), got {tuple(mask.shape)}")
        if mask.device != first.device:  # type: ignore[union-attr]
            raise ValueError(f"{name} must be on the device of {first_name}")


@outside_autocast
def detcon_b_loss(
    pred_view0: Tensor,
    pred_view1: Tensor,
    target_view0: Tensor,
    target_view1: Tensor,
    mask_view0: Tensor,
    mask_view1: Tensor,
    temperature: float = 0.1,
    *,
    gather_distributed: bool = True,
    backend: str = "auto",
) -> Tensor:
    r"""DetCon-B (Hénaff et al. 2021): multi-positive contrast of mask-pooled regions, predictions
    against targets of both views (see :func:`fastssl.reference.detcon_b_loss`).

    Args:
        pred_view0, pred_view1, target_view0, target_view1: (B, M, d) mask-pooled features.
        mask_view0, mask_view1: (B, M) integer mask ids of the pooled regions.
        temperature: non-zero finite number.
        gather_distributed: targets from every rank (on by default, as lightly).
    Returns:
        0-d float32 loss. With the same tensors as predictions and targets it is DetCon-S, and
        the symmetric backward is used.

    Example::

        >>> p0, p1, t0, t1 = (torch.randn(4, 8, 32) for _ in range(4))
        >>> m0, m1 = torch.randint(0, 5, (4, 8)), torch.randint(0, 5, (4, 8))
        >>> detcon_b_loss(p0, p1, t0, t1, m0, m1)
        tensor(...)
    """
    _check_detcon_inputs(
        [("pred_view0", pred_view0), ("pred_view1", pred_view1), ("target_view0", target_view0), ("target_view1", target_view1)],
        [("mask_view0", mask_view0), ("mask_view1", mask_view1)],
    )
    temperature = check_nonzero("temperature", temperature)
    check_distributed_available("gather_distributed", gather_distributed)
    impl = resolve_backend(backend, pred_view0, has_triton_kernel=False)
    if impl == "reference":
        if gather_distributed and distributed.is_distributed():
            symmetric = pred_view0 is target_view0 and pred_view1 is target_view1
            pred_view0, pred_view1 = distributed.gather(pred_view0), distributed.gather(pred_view1)
            if symmetric:
                target_view0, target_view1 = pred_view0, pred_view1
            else:
                target_view0, target_view1 = distributed.gather(target_view0), distributed.gather(target_view1)
            mask_view0, mask_view1 = distributed.gather_no_grad(mask_view0), distributed.gather_no_grad(mask_view1)
        loss = reference.detcon_b_loss(pred_view0, pred_view1, target_view0, target_view1, mask_view0, mask_view1, temperature)
        return loss.float()
    loss = _detcon_torch(
        pred_view0, pred_view1, target_view0, target_view1, mask_view0, mask_view1, temperature,
        _use_dist(gather_distributed),
    )
    return _reported(loss, gather_distributed)


def detcon_s_loss(
    view0: Tensor,
    view1: Tensor,
    mask_view0: Tensor,
    mask_view1: Tensor,
    temperature: float = 0.1,
    *,
    gather_distributed: bool = True,
    backend: str = "auto",
) -> Tensor:
    """DetCon-S (Hénaff et al. 2021): :func:`detcon_b_loss` with predictions = targets.

    Args:
        view0, view1: (B, M, d) mask-pooled features; mask_view0, mask_view1: (B, M) mask ids.
    Returns:
        0-d float32 loss.

    Example::

        >>> v0, v1 = torch.randn(4, 8, 32), torch.randn(4, 8, 32)
        >>> detcon_s_loss(v0, v1, torch.randint(0, 5, (4, 8)), torch.randint(0, 5, (4, 8)))
        tensor(...)
    """
    return detcon_b_loss(
        view0, view1, view0, view1, mask_view0, mask_view1, temperature,
        gather_distributed=gather_distributed, backend=backend,
    )


class DetConBLoss(nn.Module):
    """Drop-in for ``lightly.loss.DetConBLoss`` (Hénaff et al. 2021): BYOL-style predictions
    against targets, regions under the same mask id of the same image are positives.

    Args:
        temperature: scale of the logits, ``|temperature| >= 1e-8``.
        gather_distributed: targets from every rank; **on by default**, as lightly (a no-op
            outside a process group).
        backend: ``"auto" | "triton" | "torch" | "reference"`` (``"triton"`` runs the torch path).

    Forward ``(pred_view0, pred_view1, target_view0, target_view1, mask_view0, mask_view1)``:
    (B, M, d) features and (B, M) integer mask ids; returns a 0-d float32 loss.

    Example::

        >>> loss_fn = DetConBLoss()
        >>> p0, p1, t0, t1 = (torch.randn(4, 8, 32) for _ in range(4))
        >>> loss = loss_fn(p0, p1, t0, t1, torch.randint(0, 5, (4, 8)), torch.randint(0, 5, (4, 8)))
    """

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = True, backend: str = "auto") -> None:
        super().__init__()
        self.eps = 1e-8
        self.temperature = check_nonzero("temperature", temperature)
        check_distributed_available("gather_distributed", gather_distributed)
        self.gather_distributed = gather_distributed
        self.backend = check_backend_name(backend)

    def forward(
        self,
        pred_view0: Tensor,
        pred_view1: Tensor,
        target_view0: Tensor,
        target_view1: Tensor,
        mask_view0: Tensor,
        mask_view1: Tensor,
    ) -> Tensor:
        """DetCon-B: contrast of mask-pooled region features across views and images.

        Args:
            pred_view0, pred_view1: (B, M, D) mask-pooled outputs of the prediction branch.
            target_view0, target_view1: (B, M, D) mask-pooled outputs of the target branch.
            mask_view0, mask_view1: (B, M) integer mask ids; regions of the same image with the
                same id are positives.

        Returns:
            0-d float32 loss.
        """
        return detcon_b_loss(
            pred_view0, pred_view1, target_view0, target_view1, mask_view0, mask_view1, self.temperature,
            gather_distributed=self.gather_distributed, backend=self.backend,
        )


class DetConSLoss(nn.Module):
    """Drop-in for ``lightly.loss.DetConSLoss`` (Hénaff et al. 2021): SimCLR-style DetCon, a
    :class:`DetConBLoss` (kept as ``self.detconbloss``, as lightly) with predictions = targets.

    Args:
        temperature, gather_distributed (default True), backend: as :class:`DetConBLoss`.

    Forward ``(view0, view1, mask_view0, mask_view1)``: (B, M, d) features, (B, M) mask ids.

    Example::

        >>> loss_fn = DetConSLoss()
        >>> v0, v1 = torch.randn(4, 8, 32), torch.randn(4, 8, 32)
        >>> loss = loss_fn(v0, v1, torch.randint(0, 5, (4, 8)), torch.randint(0, 5, (4, 8)))
    """

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = True, backend: str = "auto") -> None:
        super().__init__()
        self.detconbloss = DetConBLoss(temperature=temperature, gather_distributed=gather_distributed, backend=backend)

    def forward(self, view0: Tensor, view1: Tensor, mask_view0: Tensor, mask_view1: Tensor) -> Tensor:
        """DetCon-S: DetCon-B with the predictions equal to the targets.

        Args:
            view0, view1: (B, M, D) mask-pooled outputs of the two views.
            mask_view0, mask_view1: (B, M) integer mask ids.

        Returns:
            0-d float32 loss.
        """
        return self.detconbloss(view0, view1, view0, view1, mask_view0, mask_view1)


# --------------------------------------------------------------------------------------------
# KoLeo
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def _nearest_neighbors(x_hat: Tensor, chunk_rows: Optional[int] = None) -> Tensor:
    """Index of each row's most cosine-similar other row, in row chunks (O(N·chunk) memory).
    Self-similarity is set to -2, below any cosine, as DINOv2's code does."""
    n = x_hat.shape[0]
    chunk = _rows_per_chunk(n, n, chunk_rows)
    parts = []
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        cosine = x_hat[start:stop] @ x_hat.T
        rows = torch.arange(start, stop, device=x_hat.device)
        cosine.scatter_(1, rows[:, None], -2.0)
        parts.append(cosine.argmax(dim=1))
    return torch.cat(parts)


def _koleo_torch(x: Tensor, p: float, eps: float, chunk_rows: Optional[int] = None) -> Tensor:
    x_hat = F.normalize(x.to(_acc_dtype(x)), p=2, dim=-1, eps=eps)
    neighbor = _nearest_neighbors(x_hat, chunk_rows)
    # ‖x̂_i - x̂_n(i) + ε‖_p + ε: finite with a finite gradient for duplicate rows.
    distance = F.pairwise_distance(x_hat, x_hat[neighbor], p=p, eps=eps)
    return -(distance + eps).log().mean()


def _check_norm_degree(p: object) -> float:
    """A norm degree for ``F.pairwise_distance``: a real number > 0 (``inf`` allowed), Python or
    NumPy (``numpy.float32``, ``numpy.int64``, ... as lightly takes them); bool rejected."""
    p = check_real("p", p)
    if not p > 0:  # NaN fails this too
        raise ValueError(f"p must be > 0, got {p}")
    return p


@outside_autocast
def koleo_loss(x: Tensor, p: float = 2, eps: float = 1e-8, *, backend: str = "auto") -> Tensor:
    r"""KoLeo entropy regularizer (Sablayrolles et al. 2019; DINOv2): minus the mean log distance
    of each L2-normalized row to its nearest other row (see :func:`fastssl.reference.koleo_loss`).
    The neighbor search runs in row chunks without gradient; only the N distances are
    differentiated. Finite for duplicate rows (ε inside and outside the distance, as lightly).

    Args:
        x: (N, d) features.
        p: norm degree of the distance; eps: lightly's ε (normalization clamp and offsets).
    Returns:
        0-d float32 loss.

    Example::

        >>> koleo_loss(torch.randn(64, 384))
        tensor(...)
    """
    check_tensor("x", x)
    p = _check_norm_degree(p)
    eps = check_positive("eps", eps, allow_zero=True)
    impl = resolve_backend(backend, x, has_triton_kernel=False)
    if impl == "reference":
        return reference.koleo_loss(x, p, eps).float()
    return _koleo_torch(x, p, eps).float()


class KoLeoLoss(nn.Module):
    """Drop-in for ``lightly.loss.KoLeoLoss``: the Kozachenko–Leonenko regularizer of DINOv2
    (Sablayrolles et al. 2019).

    Args:
        p: norm degree of the nearest-neighbour distance.
        eps: normalization clamp and distance offset (keeps duplicate rows finite).
        backend: ``"auto" | "triton" | "torch" | "reference"`` (``"triton"`` runs the torch path).

    Forward ``(x)``, (N, d); returns a 0-d float32 loss.

    Example::

        >>> loss_fn = KoLeoLoss()
        >>> loss = loss_fn(torch.randn(64, 384))
    """

    def __init__(self, p: float = 2, eps: float = 1e-8, backend: str = "auto") -> None:
        super().__init__()
        self.p = _check_norm_degree(p)
        self.eps = check_positive("eps", eps, allow_zero=True)
        # lightly keeps the distance module as an attribute; kept for attribute compatibility.
        self.pairwise_distance = nn.PairwiseDistance(p=self.p, eps=self.eps)
        self.backend = check_backend_name(backend)

    def forward(self, x: Tensor) -> Tensor:
        """KoLeo regularizer: minus the mean log distance to the nearest neighbour.

        Args:
            x: (N, D) embeddings (L2-normalized inside).

        Returns:
            0-d float32 loss, finite for duplicate rows.
        """
        return koleo_loss(x, self.p, self.eps, backend=self.backend)
