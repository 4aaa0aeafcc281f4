r"""Triton kernels for DINO: soft-target cross-entropy from the centered, sharpened teacher to the
student, without materializing a (views, B, K) probability tensor.

With P_t = softmax((t − c)/τ_t), log P_s = s/τ_s − lse_s and the pairs (t, s), t ≠ s (same view
index excluded), the loss regroups by student view (see :mod:`fastssl.dino`):

    L = −1/(n B) Σ_s Σ_{b,k} Q_s[b, k] log P_s[b, k],   Q_s = Σ_t P_t − [s < T] P_s,
    ∂L/∂s = (m_s softmax(s/τ_s) − Q_s)/(τ_s n B),       m_s = T − [s < T],  n = T·S − min(T, S).

Two launches over a (row block, K chunk) grid -- K is split so that a batch of 64 rows still
fills the GPU:

1. :func:`_dino_stats_kernel`: online max-shifted log-sum-exp partials (one float pair per row,
   view and K chunk) for every teacher and student view, and -- for the center's EMA -- the
   column sums of the raw teacher outputs per row block. The partials are combined in PyTorch
   (a few floats per row).
2. :func:`_dino_loss_grad_kernel`: per K tile, Σ_t P_t from the teacher tiles, then for every
   student view its loss terms and its gradient (written in the forward; the backward only
   scales it). A student view with a same-index teacher reloads that teacher tile (from cache)
   to subtract its P.

The views are separate tensors (one per crop, as models produce them); the kernels read them in
place through (V,) tables of addresses and row strides instead of stacking them into one
(views, B, K) copy, which would cost as much memory as the gradient. Only a view whose K axis is
strided or whose dtype differs from the others' is copied first.

Cost, per call, with V = T + S views and e bytes per element (prediction for the benchmark
shape T = 2, S = 12, B = 64, K = 65536, bf16, H100 at ~3 TB/s, ~60 TFLOP/s fp32,
~3.7·10¹² exp/s):

* minimum bytes: read every view once, write every student gradient once:
  (V + S) B K e = 26·4.2M·2 B = 218 MB -> 73 µs; the binding floor;
* FLOPs: ~6 per element in sweep 1 and ~10 in sweep 2 for V views: 16·V·B·K = 0.94 GFLOP
  -> 16 µs;
* exponentials: sweep 1 one per view element, sweep 2 one per teacher element, two per
  student element and one per diagonal teacher reload: (V + T + 2 S + min(T, S)) B K =
  0.18·10⁹ -> 48 µs;
* this implementation reads every view twice (once per sweep) and the diagonal teachers a
  third time (mostly from L2), and writes the gradients once: ~0.37 GB -> predicted
  130-160 µs for forward + backward; memory beyond the inputs: the gradient (S B K e = 100 MB)
  plus the teacher column sums per row block (4 MB) and O(V B) floats -- against the eager
  reference's stacked copies, probabilities and log-probabilities of all views.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastssl.kernels.sinkhorn import _TRITON_DTYPES, _next_pow2, _target_programs, k_align, view_base, view_table

# Tile sizes (elements); tests shrink them to run multi-tile loops, masks and K splits on small
# inputs.
_TILE_ELEMENTS = 4096
_TILE_CONTIGUOUS = 512

# Buffers every kernel fully overwrites; tests replace this with a NaN-filled allocation to
# check that every element is written.
_new_buffer = torch.empty


@triton.jit
def _view_rows(addresses_ptr, row_strides_ptr, view, rows64, DTYPE: tl.constexpr, ALIGN: tl.constexpr):
    """Pointers to the rows of view ``view`` of a :func:`~fastssl.kernels.sinkhorn.view_table`."""
    base, row_stride = view_base(addresses_ptr, row_strides_ptr, view, DTYPE, ALIGN)
    return base + rows64[:, None] * row_stride


@triton.jit
def _dino_stats_kernel(
    t_addresses_ptr,
    t_row_strides_ptr,
    s_addresses_ptr,
    s_row_strides_ptr,
    center_ptr,
    t_max_ptr,
    t_sum_ptr,
    s_max_ptr,
    s_sum_ptr,
    colsum_ptr,
    n_teacher,
    n_student,
    n_rows,
    k_units,
    k_per_split,
    inv_teacher_temp,
    inv_student_temp,
    T_DTYPE: tl.constexpr,
    S_DTYPE: tl.constexpr,
    T_ALIGN: tl.constexpr,
    S_ALIGN: tl.constexpr,
    K_ALIGN: tl.constexpr,
    WITH_COLSUM: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Per (view, row) over one K chunk: m = max y, s = Σ exp(y − m), with y = (t − c)/τ_t for
    teachers and s/τ_s for students; stored at [view, split, row]. With WITH_COLSUM, also
    colsum[row block, k] = Σ_t Σ_rows t[row, k]."""
    pid_rows = tl.program_id(0)
    pid_split = tl.program_id(1)
    # K = k_units·K_ALIGN: written as a product with a constant, the compiler knows that K-axis
    # masks and row offsets are constant over K_ALIGN-wide groups and keeps 16-byte accesses.
    n_proto = k_units * K_ALIGN
    n_splits = tl.num_programs(1)
    rows = pid_rows * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    k_begin = pid_split * k_per_split
    for t in range(n_teacher):
        view_rows = _view_rows(t_addresses_ptr, t_row_strides_ptr, t, rows64, T_DTYPE, T_ALIGN)
        run_max = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
        run_sum = tl.zeros([BLOCK_ROWS], tl.float32)
        for k0 in range(k_begin, k_begin + k_per_split, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_mask = cols < n_proto
            mask = row_mask[:, None] & col_mask[None, :]
            raw = tl.load(view_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            center = tl.load(center_ptr + cols, mask=col_mask, other=0.0)
            y = tl.where(mask, (raw - center[None, :]) * inv_teacher_temp, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(y, axis=1))
            # Padding rows stay at -inf; shift them by 0 so that exp gives 0, not NaN.
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(y - shift[:, None]), axis=1)
            run_max = new_max
            if WITH_COLSUM:
                # This program owns colsum[pid_rows, chunk]: read-modify-write, no atomics.
                col_ptr = colsum_ptr + pid_rows.to(tl.int64) * n_proto + cols
                previous = tl.load(col_ptr, mask=col_mask & (t > 0), other=0.0)
                tl.store(col_ptr, previous + tl.sum(raw, axis=0), mask=col_mask)
        out = (t * n_splits + pid_split) * n_rows + rows
        tl.store(t_max_ptr + out, run_max, mask=row_mask)
        tl.store(t_sum_ptr + out, run_sum, mask=row_mask)
    for s in range(n_student):
        view_rows = _view_rows(s_addresses_ptr, s_row_strides_ptr, s, rows64, S_DTYPE, S_ALIGN)
        run_max = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
        run_sum = tl.zeros([BLOCK_ROWS], tl.float32)
        for k0 in range(k_begin, k_begin + k_per_split, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            mask = row_mask[:, None] & (cols < n_proto)[None, :]
            raw = tl.load(view_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            y = tl.where(mask, raw * inv_student_temp, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(y, axis=1))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(y - shift[:, None]), axis=1)
            run_max = new_max
        out = (s * n_splits + pid_split) * n_rows + rows
        tl.store(s_max_ptr + out, run_max, mask=row_mask)
        tl.store(s_sum_ptr + out, run_sum, mask=row_mask)


@triton.jit
def _dino_loss_grad_kernel(
    t_addresses_ptr,
    t_row_strides_ptr,
    s_addresses_ptr,
    s_row_strides_ptr,
    center_ptr,
    t_lse_ptr,
    s_lse_ptr,
    grad_ptr,
    grad_stride_view,
    loss_partial_ptr,
    n_teacher,
    n_student,
    n_rows,
    k_units,
    k_per_split,
    inv_teacher_temp,
    inv_student_temp,
    grad_scale,
    T_DTYPE: tl.constexpr,
    S_DTYPE: tl.constexpr,
    T_ALIGN: tl.constexpr,
    S_ALIGN: tl.constexpr,
    K_ALIGN: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """loss_partial[program] = −Σ_s Σ_{rows, chunk} Q_s log P_s and, with COMPUTE_GRAD,
    grad[s] = (m_s P_s − Q_s)·grad_scale over the chunk (grad contiguous (S, B, K))."""
    pid_rows = tl.program_id(0)
    pid_split = tl.program_id(1)
    # K = k_units·K_ALIGN: written as a product with a constant, the compiler knows that K-axis
    # masks and row offsets are constant over K_ALIGN-wide groups and keeps 16-byte accesses.
    n_proto = k_units * K_ALIGN
    rows = pid_rows * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    k_begin = pid_split * k_per_split
    acc = tl.zeros([BLOCK_ROWS, BLOCK_K], tl.float32)
    # The gradient pointer advances by one view (grad_stride_view = B·K, an int64 argument when
    # it needs one) per student: 64-bit pointer arithmetic, where view index x B·K could
    # overflow int32.
    grad_rows = grad_ptr + rows64[:, None] * n_proto
    for k0 in range(k_begin, k_begin + k_per_split, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < n_proto
        mask = row_mask[:, None] & col_mask[None, :]
        center = tl.load(center_ptr + cols, mask=col_mask, other=0.0)
        prob_sum = tl.zeros([BLOCK_ROWS, BLOCK_K], tl.float32)
        for t in range(n_teacher):
            view_rows = _view_rows(t_addresses_ptr, t_row_strides_ptr, t, rows64, T_DTYPE, T_ALIGN)
            raw = tl.load(view_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            lse = tl.load(t_lse_ptr + t * n_rows + rows, mask=row_mask, other=0.0)
            # Padding lanes: exp(-inf) = 0 (an unmasked exponent could overflow there).
            prob_sum += tl.exp(tl.where(mask, (raw - center[None, :]) * inv_teacher_temp - lse[:, None], float("-inf")))
        out_ptr = grad_rows + cols[None, :]
        for s in range(n_student):
            view_rows = _view_rows(s_addresses_ptr, s_row_strides_ptr, s, rows64, S_DTYPE, S_ALIGN)
            raw = tl.load(view_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            lse = tl.load(s_lse_ptr + s * n_rows + rows, mask=row_mask, other=0.0)
            # Padding lanes: log_p = 0 and target = 0, so they add nothing and exp stays finite.
            log_p = tl.where(mask, raw * inv_student_temp - lse[:, None], 0.0)
            # m_s: the teachers this student view is compared with (its own index excluded).
            matches = n_teacher - (s < n_teacher).to(tl.float32)
            target = prob_sum
            if s < n_teacher:
                # The same-index teacher is excluded: subtract its P (tile reloaded, from cache).
                same_rows = _view_rows(t_addresses_ptr, t_row_strides_ptr, s, rows64, T_DTYPE, T_ALIGN)
                same = tl.load(same_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                same_lse = tl.load(t_lse_ptr + s * n_rows + rows, mask=row_mask, other=0.0)
                target = prob_sum - tl.exp(
                    tl.where(mask, (same - center[None, :]) * inv_teacher_temp - same_lse[:, None], float("-inf"))
                )
            acc += target * log_p
            if COMPUTE_GRAD:
                grad = (matches * tl.exp(log_p) - target) * grad_scale
                tl.store(out_ptr, grad.to(grad_ptr.dtype.element_ty), mask=mask)
            out_ptr += grad_stride_view
    total = tl.sum(tl.sum(acc, axis=1), axis=0)
    tl.store(loss_partial_ptr + pid_rows * tl.num_programs(1) + pid_split, -total)


def _combine_partials(run_max: Tensor, run_sum: Tensor) -> Tensor:
    """log Σ_splits s·exp(m) over dim 1 of (views, splits, B) partials -> (views, B)."""
    top = run_max.amax(dim=1, keepdim=True)
    shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return shift.squeeze(1) + torch.log((run_sum * torch.exp(run_max - shift)).sum(dim=1))


def _common_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


class _DinoTritonFunction(torch.autograd.Function):
    """Inputs ``(settings, center, *views)``, the T teacher views first; returns the 0-d loss and
    the (K,) float32 teacher column sums (non-differentiable)."""

    @staticmethod
    def forward(ctx, settings, center, *views):  # type: ignore[override]
        n_teacher, teacher_temp, student_temp, with_colsum = settings
        input_dtypes = [v.dtype for v in views[n_teacher:]]
        teacher_dtype = _common_dtype(views[:n_teacher])
        student_dtype = _common_dtype(views[n_teacher:])
        teacher, t_addresses, t_row_strides, t_align = view_table(views[:n_teacher], teacher_dtype)
        student, s_addresses, s_row_strides, s_align = view_table(views[n_teacher:], student_dtype)
        n_student = len(student)
        n_rows, n_proto = student[0].shape
        device = student[0].device
        center = center.detach().reshape(-1).to(torch.float32).contiguous()
        n_terms = n_teacher * n_student - min(n_teacher, n_student)

        block_k = min(_next_pow2(n_proto), _TILE_CONTIGUOUS)
        block_rows = min(_next_pow2(n_rows), max(1, _TILE_ELEMENTS // block_k))
        row_blocks = triton.cdiv(n_rows, block_rows)
        k_blocks = triton.cdiv(n_proto, block_k)
        splits = max(1, min(k_blocks, _target_programs(device) // row_blocks, 65535))
        k_per_split = triton.cdiv(k_blocks, splits) * block_k
        splits = triton.cdiv(n_proto, k_per_split)  # every split holds at least one column
        grid = (row_blocks, splits)
        tables = (t_addresses, t_row_strides, s_addresses, s_row_strides, center)
        dtypes = dict(T_DTYPE=_TRITON_DTYPES[teacher_dtype], S_DTYPE=_TRITON_DTYPES[student_dtype],
                      T_ALIGN=t_align, S_ALIGN=s_align, K_ALIGN=k_align(n_proto))  # fmt: skip

        t_max = _new_buffer((n_teacher, splits, n_rows), dtype=torch.float32, device=device)
        t_sum = _new_buffer((n_teacher, splits, n_rows), dtype=torch.float32, device=device)
        s_max = _new_buffer((n_student, splits, n_rows), dtype=torch.float32, device=device)
        s_sum = _new_buffer((n_student, splits, n_rows), dtype=torch.float32, device=device)
        colsum = _new_buffer((row_blocks, n_proto), dtype=torch.float32, device=device) if with_colsum else t_max
        _dino_stats_kernel[grid](
            *tables, t_max, t_sum, s_max, s_sum, colsum,
            n_teacher, n_student, n_rows, n_proto // k_align(n_proto), k_per_split,
            1.0 / teacher_temp, 1.0 / student_temp,
            **dtypes, WITH_COLSUM=with_colsum, BLOCK_ROWS=block_rows, BLOCK_K=block_k,
        )  # fmt: skip
        t_lse = _combine_partials(t_max, t_sum).contiguous()
        s_lse = _combine_partials(s_max, s_sum).contiguous()

        compute_grad = any(ctx.needs_input_grad[2 + n_teacher :])
        grads = _new_buffer((n_student, n_rows, n_proto), dtype=student_dtype, device=device) if compute_grad else t_lse
        loss_partial = _new_buffer((row_blocks * splits,), dtype=torch.float32, device=device)
        _dino_loss_grad_kernel[grid](
            *tables, t_lse, s_lse, grads, n_rows * n_proto, loss_partial,
            n_teacher, n_student, n_rows, n_proto // k_align(n_proto), k_per_split,
            1.0 / teacher_temp, 1.0 / student_temp, 1.0 / (student_temp * n_terms * n_rows),
            **dtypes, COMPUTE_GRAD=compute_grad, BLOCK_ROWS=block_rows, BLOCK_K=block_k,
        )  # fmt: skip
        loss = loss_partial.sum() / (n_terms * n_rows)
        teacher_sum = colsum.sum(dim=0) if with_colsum else torch.zeros(n_proto, dtype=torch.float32, device=device)
        ctx.mark_non_differentiable(teacher_sum)
        ctx.n_teacher = n_teacher
        ctx.input_dtypes = input_dtypes
        ctx.compute_grad = compute_grad
        if compute_grad:
            ctx.save_for_backward(grads)
        return loss, teacher_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_teacher_sum):  # type: ignore[override]
        student_grads: List = [None] * len(ctx.input_dtypes)
        if ctx.compute_grad:
            (grads,) = ctx.saved_tensors
            needs = ctx.needs_input_grad[2 + ctx.n_teacher :]
            student_grads = [
                (grads[v] * grad_loss).to(dtype) if need else None
                for v, (need, dtype) in enumerate(zip(needs, ctx.input_dtypes))
            ]
        return (None, None, *([None] * ctx.n_teacher), *student_grads)


def dino_loss_triton(
    teacher_out: Sequence[Tensor],
    student_out: Sequence[Tensor],
    center: Tensor,
    teacher_temp: float,
    student_temp: float,
    *,
    return_teacher_sum: bool = False,
):
    """DINO's cross-entropy (see :func:`fastssl.dino.dino_loss`) on the kernels.

    Args:
        teacher_out: T tensors (B, K), no gradient; student_out: S tensors (B, K);
        center: K entries ((K,) or (1, 1, K)).
        return_teacher_sum: also return the (K,) float32 sum of the teacher outputs over views
            and batch, computed by the loss's own pass over the teacher (for the center update).
    Returns:
        0-d float32 loss, or ``(loss, teacher_sum)``.
    """
    settings = (len(teacher_out), float(teacher_temp), float(student_temp), bool(return_teacher_sum))
    loss, teacher_sum = _DinoTritonFunction.apply(settings, center, *teacher_out, *student_out)
    if return_teacher_sum:
        return loss, teacher_sum
    return loss
