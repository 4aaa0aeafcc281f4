r"""NT-Xent (SimCLR), InfoNCE with a memory bank (MoCo) and the uniformity metric: functional API,
optimized PyTorch path and the drop-in :class:`NTXentLoss` module. The Triton kernels live in
:mod:`fastssl.kernels.ntxent`.

The optimized PyTorch path never forms the 2N×2N similarity matrix. Rows are processed in
chunks of at most ``_MAX_CHUNK_ELEMENTS`` logits; the forward keeps one log-sum-exp per row and
the backward recomputes each chunk's logits from the normalized embeddings and that stored
log-sum-exp (FlashAttention's recipe), so memory is O(N·d + chunk·N). When all logits fit in
one chunk, the forward's chunk is kept for the backward instead (same bound, one product less).

Backward algebra. For one NT-Xent row k, :math:`\partial\ell_k/\partial S_{km} = p_{km} -
[m = p(k)]` with :math:`p_{km} = e^{S_{km} - \mathrm{lse}_k}` over :math:`m \ne k`. With
:math:`S = ZZ^\top/\tau` symmetric and :math:`G = \partial L/\partial S`,

.. math:: \frac{\partial L}{\partial Z} = \frac{1}{\tau}(G + G^\top) Z, \qquad
          (G + G^\top)_{km} = \frac{1}{2N}\big(e^{S_{km}-\mathrm{lse}_k} + e^{S_{km}-\mathrm{lse}_m}
          - 2\,[m = p(k)]\big),

because the positive relation is an involution (:math:`p(p(k)) = k`). One recomputed chunk of
S therefore gives whole rows of the gradient: no column pass, no atomics, deterministic. The
normalization's backward is :math:`dx = (dz - \hat z(\hat z\cdot dz))/\|x\|`.

Distributed (DESIGN §3). Each rank holds 2n of the 2Wn rows. Its rows are scored against the
gathered columns; the per-row log-sum-exps are gathered too (2Wn floats). The formula above
then gives, for the local rows, the gradient of the *global* loss with the factor 1/(2n)
instead of 1/(2Wn): exactly W × the single-process gradient, with no communication in the
backward. The reported value is the global mean (:func:`fastssl.distributed.global_mean`).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastssl import distributed, reference
from fastssl._backend import check_backend_name, outside_autocast, resolve_backend, triton_with_fallback
from fastssl._checks import (
    check_distributed_available,
    check_finite,
    check_int,
    check_nonzero,
    check_pair,
    check_tensor,
)

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
    """Rows of ``x`` (M, d) → (ẑ (M, d) in ``acc``, ‖x‖ (M,) in ``acc``), as F.normalize."""
    x = x.to(acc)
    norms = torch.linalg.vector_norm(x, dim=1)
    return x / norms.clamp_min(_NORM_EPS)[:, None], norms


def _normalize_backward(z_hat: Tensor, norms: Tensor, grad_z_hat: Tensor) -> Tensor:
    r""":math:`dx = (dz - \hat z(\hat z\cdot dz))/\|x\|`; below the clamp ``x/eps`` is linear."""
    projection = (z_hat * grad_z_hat).sum(dim=1)
    projection = torch.where(norms >= _NORM_EPS, projection, torch.zeros_like(projection))
    return (grad_z_hat - z_hat * projection[:, None]) / norms.clamp_min(_NORM_EPS)[:, None]


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


def _pair_lse_forward(
    z_rows: Tensor,
    z_cols: Tensor,
    inv_temp: float,
    n_local: int,
    col_offset: int,
    with_positive: bool,
    chunk_rows: Optional[int],
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Per-row log-sum-exp of ``S = z_rows z_colsᵀ · inv_temp`` over all columns but self.

    Returns (lse (R,), positive logits (R,) or None, the self-masked logits (R, C) when they
    form a single chunk, else None). Memory: one chunk of logits at a time; a single chunk is
    returned so that the backward can reuse it instead of recomputing it, within the same bound.
    """
    n_rows = z_rows.shape[0]
    chunk = _rows_per_chunk(z_cols.shape[0], chunk_rows)
    lse_parts, pos_parts = [], []
    logits = None
    for start in range(0, n_rows, chunk):
        stop = min(n_rows, start + chunk)
        logits = (z_rows[start:stop] @ z_cols.T).mul_(inv_temp)
        self_cols, pos_cols = _pair_columns(start, stop, n_local, col_offset, z_rows.device)
        if with_positive:
            pos_parts.append(logits.gather(1, pos_cols[:, None]).squeeze(1))
        logits.scatter_(1, self_cols[:, None], float("-inf"))
        lse_parts.append(torch.logsumexp(logits, dim=1))
    positives = torch.cat(pos_parts) if with_positive else None
    single_chunk = logits if chunk >= n_rows else None
    return torch.cat(lse_parts), positives, single_chunk


def _exp_factorizable(inv_temp: float, n_cols: int) -> bool:
    """Whether e^{S_km - lse_m} may be computed as e^{S_km - lse_k}·e^{lse_k - c}·e^{c - lse_m}.

    Every logit lies in ±1/|τ|, every lse in ±1/|τ| + [0, log C]: with c = log(C-1) no factor
    exceeds e^{1/|τ| + log C}, and e^{S - lse_k} stays above e^{-(2/|τ| + log C)}, far from
    float32's underflow while that bound is below 80."""
    return 2.0 * abs(inv_temp) + math.log(max(n_cols, 2)) < 80.0


def _pair_lse_backward(
    z_rows: Tensor,
    z_cols: Tensor,
    lse_rows: Tensor,
    lse_cols: Tensor,
    inv_temp: float,
    n_local: int,
    col_offset: int,
    with_positive: bool,
    chunk_rows: Optional[int],
    saved_logits: Optional[Tensor] = None,
) -> Tensor:
    r""":math:`\sum_m (e^{S_{km}-\mathrm{lse}_k} + e^{S_{km}-\mathrm{lse}_m}) z_m - 2 z_{p(k)}` per row k
    (self excluded; the positive term only ``with_positive``), unscaled. See the module doc.

    ``saved_logits``: the forward's single chunk of self-masked logits (no recomputation).
    The second exponential is a product of row and column scalars where that is exact
    (:func:`_exp_factorizable`): one exponential per logit instead of two."""
    n_rows, n_cols = z_rows.shape[0], z_cols.shape[0]
    chunk = n_rows if saved_logits is not None else _rows_per_chunk(n_cols, chunk_rows)
    factored = _exp_factorizable(inv_temp, n_cols)
    shift = math.log(max(n_cols - 1, 1))
    col_factor = (shift - lse_cols).exp() if factored else None
    parts = []
    for start in range(0, n_rows, chunk):
        stop = min(n_rows, start + chunk)
        if saved_logits is not None:
            weights = saved_logits - lse_rows[start:stop, None]
        else:
            weights = (z_rows[start:stop] @ z_cols.T).mul_(inv_temp).sub_(lse_rows[start:stop, None])
        if factored:
            # e^{S-lse_k}·(1 + e^{lse_k - c}·e^{c - lse_m})
            weights.exp_()
            weights.mul_(torch.outer((lse_rows[start:stop] - shift).exp(), col_factor).add_(1.0))
        else:
            # e^{S-lse_m} = e^{(S-lse_k) + lse_k - lse_m}
            other = weights.clone().add_(lse_rows[start:stop, None]).sub_(lse_cols[None, :]).exp_()
            weights.exp_().add_(other)
            del other
        self_cols, pos_cols = _pair_columns(start, stop, n_local, col_offset, z_rows.device)
        weights.scatter_(1, self_cols[:, None], 0.0)
        if with_positive:
            weights.scatter_add_(1, pos_cols[:, None], torch.full_like(pos_cols[:, None], -2, dtype=weights.dtype))
        parts.append(weights @ z_cols)
    return torch.cat(parts)


# --------------------------------------------------------------------------------------------
# Optimized PyTorch path: NT-Xent
# --------------------------------------------------------------------------------------------


class _NTXentTorch(torch.autograd.Function):
    """NT-Xent, row-chunked, with the hand-written backward of the module doc."""

    @staticmethod
    def forward(ctx, out0: Tensor, out1: Tensor, temperature: float, gather_distributed: bool, chunk_rows: Optional[int]) -> Tensor:  # type: ignore[override]
        acc = _acc_dtype(out0.dtype, out1.dtype)
        n_local = out0.shape[0]
        z_rows, norms = _normalize_forward(torch.cat([out0.to(acc), out1.to(acc)]), acc)
        inv_temp = 1.0 / temperature
        use_dist = gather_distributed and distributed.is_distributed()
        if use_dist:
            z_cols = distributed.gather_no_grad(z_rows)
            col_offset = distributed.rank() * 2 * n_local
        else:
            z_cols, col_offset = z_rows, 0
        lse, positives, logits = _pair_lse_forward(z_rows, z_cols, inv_temp, n_local, col_offset, True, chunk_rows)
        assert positives is not None
        lse_cols = distributed.gather_no_grad(lse) if use_dist else lse
        ctx.save_for_backward(out0, out1, norms, lse, lse_cols, z_cols if use_dist else None, logits)
        ctx.meta = (inv_temp, n_local, col_offset, chunk_rows, use_dist)
        return (lse - positives).mean().float()

    @staticmethod
    def backward(ctx, grad_loss: Tensor):  # type: ignore[override]
        out0, out1, norms, lse, lse_cols, saved_cols, logits = ctx.saved_tensors
        inv_temp, n_local, col_offset, chunk_rows, use_dist = ctx.meta
        acc = norms.dtype
        x = torch.cat([out0.to(acc), out1.to(acc)])
        z_rows = x / norms.clamp_min(_NORM_EPS)[:, None]
        z_cols = saved_cols if use_dist else z_rows
        grad_z = _pair_lse_backward(z_rows, z_cols, lse, lse_cols, inv_temp, n_local, col_offset, True, chunk_rows,
                                    saved_logits=logits)
        # 1/(2n): the row count of this rank, which makes the distributed gradient W × the global one.
        grad_z = grad_z * (grad_loss.to(acc) * (inv_temp / (2 * n_local)))
        grad_x = _normalize_backward(z_rows, norms, grad_z)
        return grad_x[:n_local].to(out0.dtype), grad_x[n_local:].to(out1.dtype), None, None, None


def _ntxent_torch(
    out0: Tensor, out1: Tensor, temperature: float, gather_distributed: bool, chunk_rows: Optional[int] = None
) -> Tensor:
    loss = _NTXentTorch.apply(out0, out1, temperature, gather_distributed, chunk_rows)
    return distributed.global_mean(loss) if gather_distributed else loss


# --------------------------------------------------------------------------------------------
# Optimized PyTorch path: InfoNCE with a bank
# --------------------------------------------------------------------------------------------


class _InfoNCETorch(torch.autograd.Function):
    r"""Queries against [own key, bank rows], row-chunked.

    With :math:`p_{i0} = e^{s_{i0} - \mathrm{lse}_i}` the positive's probability and
    :math:`P_{ij} = e^{\hat q_i\cdot b_j/\tau - \mathrm{lse}_i}`:
    :math:`d\hat q_i = \frac{1}{N\tau}((p_{i0}-1)\hat k_i + \sum_j P_{ij} b_j)`,
    :math:`d\hat k_i = \frac{1}{N\tau}(p_{i0}-1)\hat q_i`; the bank gets no gradient.
    """

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, negatives: Tensor, temperature: float, chunk_rows: Optional[int]) -> Tensor:  # type: ignore[override]
        acc = _acc_dtype(query.dtype, key.dtype)
        q_hat, q_norms = _normalize_forward(query, acc)
        k_hat, k_norms = _normalize_forward(key, acc)
        bank = negatives.to(acc)
        inv_temp = 1.0 / temperature
        positives = (q_hat * k_hat).sum(dim=1) * inv_temp
        chunk = _rows_per_chunk(bank.shape[0] + 1, chunk_rows)
        lse_parts = []
        for start in range(0, q_hat.shape[0], chunk):
            logits = (q_hat[start : start + chunk] @ bank.T).mul_(inv_temp)
            lse_parts.append(torch.logaddexp(positives[start : start + chunk], torch.logsumexp(logits, dim=1)))
        lse = torch.cat(lse_parts)
        ctx.save_for_backward(query, key, negatives, q_norms, k_norms, lse)
        ctx.meta = (inv_temp, chunk)
        return (lse - positives).mean().float()

    @staticmethod
    def backward(ctx, grad_loss: Tensor):  # type: ignore[override]
        query, key, negatives, q_norms, k_norms, lse = ctx.saved_tensors
        inv_temp, chunk = ctx.meta
        acc = q_norms.dtype
        q_hat = query.to(acc) / q_norms.clamp_min(_NORM_EPS)[:, None]
        k_hat = key.to(acc) / k_norms.clamp_min(_NORM_EPS)[:, None]
        bank = negatives.to(acc)
        positive_weight = ((q_hat * k_hat).sum(dim=1) * inv_temp - lse).exp() - 1
        parts = []
        for start in range(0, q_hat.shape[0], chunk):
            logits = (q_hat[start : start + chunk] @ bank.T).mul_(inv_temp)
            parts.append(logits.sub_(lse[start : start + chunk, None]).exp_() @ bank)
        scale = grad_loss.to(acc) * (inv_temp / q_hat.shape[0])
        grad_q = (torch.cat(parts) + positive_weight[:, None] * k_hat) * scale
        grad_k = positive_weight[:, None] * q_hat * scale
        return (
            _normalize_backward(q_hat, q_norms, grad_q).to(query.dtype),
            _normalize_backward(k_hat, k_norms, grad_k).to(key.dtype),
            None,
            None,
            None,
        )


def _infonce_torch(query: Tensor, key: Tensor, negatives: Tensor, temperature: float, chunk_rows: Optional[int] = None) -> Tensor:
    return _InfoNCETorch.apply(query, key, negatives, temperature, chunk_rows)


# --------------------------------------------------------------------------------------------
# Optimized PyTorch path: uniformity
# --------------------------------------------------------------------------------------------


class _UniformityTorch(torch.autograd.Function):
    r"""Uniformity through the pair machinery: with :math:`S_{ij} = 2t\,\hat z_i\cdot\hat z_j`,
    :math:`-t\|\hat z_i-\hat z_j\|^2 = S_{ij} - 2t`, so
    :math:`U = \mathrm{LSE}_{i\ne j} S_{ij} - 2t - \log n(n-1)` and
    :math:`\partial U/\partial\hat z_i = 2t\sum_{j\ne i} 2e^{S_{ij}-T}\hat z_j` (T the global LSE)."""

    @staticmethod
    def forward(ctx, z: Tensor, t: float, chunk_rows: Optional[int]) -> Tensor:  # type: ignore[override]
        acc = _acc_dtype(z.dtype)
        n = z.shape[0]
        z_hat, norms = _normalize_forward(z, acc)
        row_lse, _, _ = _pair_lse_forward(z_hat, z_hat, 2.0 * t, n, 0, False, chunk_rows)
        total_lse = torch.logsumexp(row_lse, dim=0)
        ctx.save_for_backward(z, norms, total_lse)
        ctx.meta = (t, chunk_rows)
        return (total_lse - 2.0 * t - math.log(n * (n - 1))).float()

    @staticmethod
    def backward(ctx, grad_loss: Tensor):  # type: ignore[override]
        z, norms, total_lse = ctx.saved_tensors
        t, chunk_rows = ctx.meta
        acc = norms.dtype
        n = z.shape[0]
        z_hat = z.to(acc) / norms.clamp_min(_NORM_EPS)[:, None]
        lse = total_lse.expand(n)
        grad_z = _pair_lse_backward(z_hat, z_hat, lse, lse, 2.0 * t, n, 0, False, chunk_rows)
        grad_z = grad_z * (grad_loss.to(acc) * (2.0 * t))
        return _normalize_backward(z_hat, norms, grad_z).to(z.dtype), None, None


def _uniformity_torch(z: Tensor, t: float, chunk_rows: Optional[int] = None) -> Tensor:
    return _UniformityTorch.apply(z, t, chunk_rows)


# --------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------


def _kernels():
    """The Triton module, imported on first use (``import fastssl`` needs no Triton)."""
    from fastssl.kernels import ntxent as kernels

    return kernels


def _triton_dtype_ok(*tensors: Tensor) -> bool:
    """The kernels take float32/float16/bfloat16; float64 runs on the PyTorch path."""
    return all(x.dtype != torch.float64 for x in tensors)


@outside_autocast
def ntxent_loss(
    out0: Tensor,
    out1: Tensor,
    temperature: float = 0.5,
    *,
    gather_distributed: bool = False,
    backend: str = "auto",
) -> Tensor:
    r"""NT-Xent over the 2N embeddings of two views (see :func:`fastssl.reference.ntxent_loss`).

    Args:
        out0, out1: (N, d) projections of the two views (any float dtype).
        temperature: any non-zero finite number (negative too, as lightly allows).
        gather_distributed: negatives from every rank (DESIGN §3 semantics).
        backend: ``"auto" | "triton" | "torch" | "reference"``.
    Returns:
        0-d float32 loss.
    """
    check_pair("out0", out0, "out1", out1)
    temperature = check_nonzero("temperature", temperature)
    check_distributed_available("gather_distributed", gather_distributed)
    impl = resolve_backend(backend, out0)
    if impl == "reference":
        if gather_distributed:
            out0, out1 = distributed.gather(out0), distributed.gather(out1)
        return reference.ntxent_loss(out0, out1, temperature).float()
    if impl == "triton" and _triton_dtype_ok(out0, out1):
        # A kernel that cannot compile or launch here falls back to the torch path under "auto".
        return triton_with_fallback(
            "ntxent",
            backend,
            lambda: _kernels().ntxent_loss_triton(out0, out1, temperature, gather_distributed=gather_distributed),
            lambda: _ntxent_torch(out0, out1, temperature, gather_distributed),
        )
    return _ntxent_torch(out0, out1, temperature, gather_distributed)


@outside_autocast
def infonce_loss(
    query: Tensor,
    key: Tensor,
    negatives: Tensor,
    temperature: float = 0.5,
    *,
    gather_distributed: bool = False,
    backend: str = "auto",
) -> Tensor:
    r"""InfoNCE of queries against their keys and a bank of negatives (MoCo).

    Args:
        query, key: (N, d), L2-normalized inside.
        negatives: (K, d) bank, used as given (no normalization, no gradient).
        gather_distributed: report the mean over all ranks' queries (gradients per DESIGN §3).
    Returns:
        0-d float32 loss.
    """
    check_pair("query", query, "key", key)
    check_tensor("negatives", negatives)
    if negatives.shape[1] != query.shape[1]:
        raise ValueError(
            f"negatives must have shape (K, {query.shape[1]}) to match query, got {tuple(negatives.shape)}"
        )
    if negatives.device != query.device:
        raise ValueError(f"negatives must be on the device of query ({query.device}), got {negatives.device}")
    temperature = check_nonzero("temperature", temperature)
    check_distributed_available("gather_distributed", gather_distributed)
    impl = resolve_backend(backend, query)
    negatives = negatives.detach()
    if impl == "reference":
        loss = reference.infonce_loss(query, key, negatives, temperature).float()
    elif impl == "triton" and _triton_dtype_ok(query, key):
        loss = triton_with_fallback(
            "infonce",
            backend,
            lambda: _kernels().infonce_loss_triton(query, key, negatives, temperature),
            lambda: _infonce_torch(query, key, negatives, temperature),
        )
    else:
        loss = _infonce_torch(query, key, negatives, temperature)
    return distributed.global_mean(loss) if gather_distributed else loss


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
    """
    check_tensor("z", z)
    t = check_finite("t", t)
    impl = resolve_backend(backend, z)
    if z.shape[0] < 2:
        return torch.full((), float("nan"), dtype=torch.float32, device=z.device)
    if impl == "reference":
        return reference.uniformity(z, t).float()
    if impl == "triton" and _triton_dtype_ok(z):
        return triton_with_fallback(
            "uniformity", backend, lambda: _kernels().uniformity_triton(z, t), lambda: _uniformity_torch(z, t)
        )
    return _uniformity_torch(z, t)


# --------------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------------


def _parse_bank_size(memory_bank_size: Union[int, Sequence[int]]) -> Tuple[int, Optional[int]]:
    if isinstance(memory_bank_size, bool):
        raise TypeError("memory_bank_size must be an int or a (size, dim) pair, got bool")
    if isinstance(memory_bank_size, int):
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
        if self.gather_distributed:
            keys = distributed.gather_no_grad(keys)
        # lightly's ring buffer: the batch is written at the pointer; a batch that reaches the end
        # fills it and the pointer wraps to 0 (the part that does not fit is dropped). Written
        # with tensor ops only (no int(ptr) host sync), so the step compiles without a graph
        # break; it touches the whole bank once, as the snapshot in forward already does.
        size, batch = self.size, keys.shape[0]
        ptr = self.bank_ptr[0]
        offset = torch.arange(size, device=self.bank.device) - ptr
        in_batch = (offset >= 0) & (offset < batch)
        incoming = keys.to(self.bank.dtype)[offset.clamp(0, batch - 1)]
        self.bank.copy_(torch.where(in_batch[:, None], incoming, self.bank))
        self.bank_ptr.copy_(torch.where(ptr + batch >= size, torch.zeros_like(ptr), ptr + batch).reshape(1))


class NTXentLoss(nn.Module):
    """Drop-in for ``lightly.loss.NTXentLoss``: SimCLR's NT-Xent, or MoCo's InfoNCE with a bank.

    Args:
        temperature: scale of the logits; any ``|temperature| >= 1e-8``.
        memory_bank_size: 0 (SimCLR), ``(size, dim)`` (MoCo, as lightly), or an int ``size``
            whose feature dimension is taken from the first batch.
        gather_distributed: negatives from all ranks; with a bank, the bank is filled with
            the keys of all ranks.
        backend: ``"auto" | "triton" | "torch" | "reference"`` (env ``FASTSSL_BACKEND``).

    Forward ``(out0, out1)``, each (N, d). With a bank, ``out0`` are the queries and ``out1``
    the keys; the bank (normalized keys of earlier batches, ``self.memory_bank.bank`` as in
    lightly, also reachable as ``self.bank``) provides the negatives and is updated with
    ``out1`` whenever ``out0`` requires a gradient (lightly's rule, which keeps the bank fixed
    during evaluation). Returns a 0-d float32 loss.
    """

    def __init__(
        self,
        temperature: float = 0.5,
        memory_bank_size: Union[int, Sequence[int]] = 0,
        gather_distributed: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.temperature = check_nonzero("temperature", temperature)
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
        # The loss keeps the bank for its backward, so it gets a snapshot: the enqueue below
        # writes into the buffer in place.
        negatives = bank.bank.clone()
        if out0.requires_grad:
            # As lightly: the keys are normalized in their own dtype, then stored in the bank's.
            bank.enqueue(F.normalize(out1.detach(), dim=1))
        return infonce_loss(
            out0,
            out1,
            negatives,
            self.temperature,
            gather_distributed=self.gather_distributed,
            backend=self.backend,
        )
