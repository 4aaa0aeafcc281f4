r"""Triton kernels for DINO (Caron et al. 2021, Alg. 1): soft-target cross-entropy from the
centered, sharpened teacher to the student, without materializing a (views, B, K) probability
tensor, as ``torch.library`` custom ops (``fastssl::dino`` and the shared
``fastssl::scale_saved_gradient``) so that ``torch.compile(fullgraph=True)`` keeps them whole.

With P_t = softmax((t − c)/τ_t), log P_s = s/τ_s − lse_s and the pairs (t, s), t ≠ s (same view
index excluded), the loss regroups by student view (see :mod:`fastssl.dino`):

    L = −1/(n B) Σ_s Σ_{b,k} Q_s[b, k] log P_s[b, k],   Q_s = Σ_t P_t − [s < T] P_s,
    ∂L/∂s = (m_s softmax(s/τ_s) − Q_s)/(τ_s n B),       m_s = T − [s < T],  n = T·S − min(T, S).

Launches over a (row block, K chunk) grid -- K is split so that a batch of 64 rows still fills
the GPU:

1. :func:`_dino_stats_kernel`: online max-shifted log-sum-exp partials (one float pair per row,
   view and K chunk) for every teacher and student view, and -- for the center's EMA -- the
   column sums of the raw teacher outputs per row block.
2. :func:`_dino_epilogue_kernel`: merges the partials into a (row max, log Σ) pair per view and
   row, and sums the teacher column sums into the new center m·c + (1−m)·mean_t (or, under a
   process group, into the teacher sum the caller all-reduces).
3. :func:`_dino_loss_grad_kernel`: per K tile, Σ_t P_t from the teacher tiles, then for every
   student view its loss terms and its gradient (written in the forward; the backward only
   scales it). A student view with a same-index teacher reloads that teacher tile (from cache)
   to subtract its P.
4. :func:`fastssl.kernels._common.sum_to_scalar_kernel`: the loss partials into the loss.

iBOT's masked-patch loss (Zhou et al. 2022; iBOT++ with given row weights) has its own three
launches below (:func:`ibot_patch_loss_triton`, custom ops ``fastssl::ibot_patch`` and
``fastssl::ibot_patch_backward``): same-index pairs instead of cross-view ones, so the loss comes
from one pass and the gradient from a second one in the backward; they share this file's tile
conventions and the helpers of :mod:`fastssl.kernels._common`.

Precision. Log-probabilities are formed relative to the row maximum, (y − max) − log Σ, never
as y − lse with lse = max + log Σ rounded first: with logits that carry a common offset of
10³-10⁴ (·1/τ), lse's rounding at that magnitude cost 15-36x PyTorch's own float32 error; now
the error is log_softmax's.

Host side. The views are separate tensors (one per crop, as models produce them); the kernels
read them in place through pointer arguments (:func:`fastssl.kernels._common.prepare_views`):
no stacked (views, B, K) copy, no address table. Every float32 intermediate lives in one
workspace allocation addressed by element offsets. Per forward + backward the eager PyTorch ops
are 4 allocations (workspace, gradient, loss, center), the backward's output and its unbind,
and the module's in-place center copy -- no host synchronization, no host-to-device copy.

Cost, per call, with V = T + S views and e bytes per element. Headline shape T = 2, S = 12,
B = 64, K = 65536, on an H200 (4.3 TB/s copy, ~60 TFLOP/s fp32, ~3.7·10¹² exp/s):

* minimum bytes: read every view once, write every student gradient once:
  (V + S) B K e = 26·4.2M·e = 109 M·e -> 51 µs (bf16), 101 µs (fp32); the binding floor;
* FLOPs: ~6 per element in sweep 1 and ~10 in sweep 2 for V views: 16·V·B·K = 0.94 GFLOP
  -> 16 µs;
* exponentials: sweep 1 one per view element, sweep 2 one per teacher element, two per
  student element and one per diagonal teacher reload: (V + T + 2 S + min(T, S)) B K =
  0.18·10⁹ -> 48 µs;
* traffic of this implementation: every view twice (once per sweep), the diagonal teachers a
  third time (mostly from L2), the gradients written once, and read and written once more by
  the backward's scaling: (2 V + 3 S) B K e ≈ 0.54 GB (bf16) -> predicted 130-170 µs for
  forward + backward (bf16), ≈ 250-300 µs (fp32).
* programs at the headline shape (132 SMs): stats and loss kernels 8 row blocks x 64 K chunks
  = 512 each (3.9 waves); epilogue 64 (center) + 2 (row statistics); scaling 12 288; sum 1.

Predicted effect of moving the glue onto the device (written before the change): the previous
host side ran ~60 eager ops per forward + backward (partial merges, loss and center sums,
per-view gradient scaling and casts, the module's EMA arithmetic) and two host-to-device table
copies (stream synchronizations), ≈ 300-500 µs of CPU-bound glue on top of ≈ 130-160 µs of
kernels: ≈ 10-15 % of the 51 µs floor (bf16). With 7 eager ops and 5 launches: predicted
140-180 µs, ≈ 28-36 % of the floor; memory beyond the inputs: the gradient (S B K e) plus the
workspace (teacher column sums per row block, 2 MB, and O(V B · splits) floats).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastssl.kernels._common import (
    common_dtype,
    inverse_temperature,
    k_align,
    merge_lse_partials,
    next_pow2,
    online_lse_step,
    prepare_views,
    scale_gradient,
    sum_to_scalar_kernel,
    target_programs,
    view_rows,
)

# Tile sizes (elements); tests shrink them to run multi-tile loops, masks and K splits on small
# inputs.
_TILE_ELEMENTS = 4096
_TILE_CONTIGUOUS = 512
_EPILOGUE_BLOCK = 1024

# What the op returns beside the loss: nothing, the (K,) teacher column sum, or the new center.
CENTER_NONE, CENTER_TEACHER_SUM, CENTER_EMA = 0, 1, 2

# Buffers every kernel fully overwrites; tests replace this with a NaN-filled allocation to
# check that every element is written.
_new_buffer = torch.empty


@triton.jit
def _dino_stats_kernel(
    t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14, t15, t_view_stride, t_stride_units,
    s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15, s_view_stride, s_stride_units,
    center_ptr,
    ws_ptr,
    t_max_offset,
    t_sum_offset,
    s_max_offset,
    s_sum_offset,
    colsum_offset,
    teacher_temp_ptr,
    student_temp_ptr,
    n_rows,
    k_units,
    k_per_split,
    inv_teacher_temp,
    inv_student_temp,
    T_VIEWS: tl.constexpr,
    T_UNIFORM: tl.constexpr,
    T_ROW_ALIGN: tl.constexpr,
    S_VIEWS: tl.constexpr,
    S_UNIFORM: tl.constexpr,
    S_ROW_ALIGN: tl.constexpr,
    K_ALIGN: tl.constexpr,
    WITH_COLSUM: tl.constexpr,
    TEACHER_TEMP_TENSOR: tl.constexpr,
    STUDENT_TEMP_TENSOR: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Per (view, row) over one K chunk: m = max y, s = Σ exp(y − m), with y = (t − c)/τ_t for
    teachers and s/τ_s for students; stored at [view, split, row]. With WITH_COLSUM, also
    colsum[row block, k] = Σ_t Σ_rows t[row, k]. *_TEMP_TENSOR: that temperature is read from its
    0-d tensor (a learnable or scheduled temperature, on the device) instead of the float."""
    pid_rows = tl.program_id(0)
    pid_split = tl.program_id(1)
    inv_teacher_temp = inverse_temperature(inv_teacher_temp, teacher_temp_ptr, TEACHER_TEMP_TENSOR)
    inv_student_temp = inverse_temperature(inv_student_temp, student_temp_ptr, STUDENT_TEMP_TENSOR)
    # K = k_units·K_ALIGN: written as a product with a constant, the compiler knows that K-axis
    # masks and row offsets are constant over K_ALIGN-wide groups and keeps 16-byte accesses.
    n_proto = k_units * K_ALIGN
    n_splits = tl.num_programs(1)
    rows = pid_rows * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    k_begin = pid_split * k_per_split
    for t in range(T_VIEWS):
        view = view_rows(t, rows64, t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14, t15, t_view_stride, t_stride_units, T_VIEWS, T_UNIFORM, T_ROW_ALIGN)
        run_max = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
        run_sum = tl.zeros([BLOCK_ROWS], tl.float32)
        for k0 in range(k_begin, k_begin + k_per_split, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_mask = cols < n_proto
            mask = row_mask[:, None] & col_mask[None, :]
            raw = tl.load(view + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            center = tl.load(center_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            y = tl.where(mask, (raw - center[None, :]) * inv_teacher_temp, float("-inf"))
            run_max, run_sum = online_lse_step(run_max, run_sum, y, 1)
            if WITH_COLSUM:
                # This program owns colsum[pid_rows, chunk]: read-modify-write, no atomics.
                col_ptr = ws_ptr + colsum_offset + pid_rows.to(tl.int64) * n_proto + cols
                previous = tl.load(col_ptr, mask=col_mask & (t > 0), other=0.0)
                tl.store(col_ptr, previous + tl.sum(raw, axis=0), mask=col_mask)
        out = (t * n_splits + pid_split) * n_rows + rows
        tl.store(ws_ptr + t_max_offset + out, run_max, mask=row_mask)
        tl.store(ws_ptr + t_sum_offset + out, run_sum, mask=row_mask)
    for s in range(S_VIEWS):
        view = view_rows(s, rows64, s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15, s_view_stride, s_stride_units, S_VIEWS, S_UNIFORM, S_ROW_ALIGN)
        run_max = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
        run_sum = tl.zeros([BLOCK_ROWS], tl.float32)
        for k0 in range(k_begin, k_begin + k_per_split, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            mask = row_mask[:, None] & (cols < n_proto)[None, :]
            raw = tl.load(view + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            y = tl.where(mask, raw * inv_student_temp, float("-inf"))
            run_max, run_sum = online_lse_step(run_max, run_sum, y, 1)
        out = (s * n_splits + pid_split) * n_rows + rows
        tl.store(ws_ptr + s_max_offset + out, run_max, mask=row_mask)
        tl.store(ws_ptr + s_sum_offset + out, run_sum, mask=row_mask)


@triton.jit
def _dino_epilogue_kernel(
    ws_ptr,
    max_offset,
    sum_offset,
    row_max_offset,
    log_sum_offset,
    colsum_offset,
    center_ptr,
    center_out_ptr,
    n_view_rows,
    n_rows,
    n_splits,
    n_row_blocks,
    n_proto,
    inv_teacher_rows,
    momentum,
    lse_programs,
    CENTER_MODE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Programs [0, lse_programs): (row max, log Σ) of every (view, row) from the K-chunk
    partials stored at [view, split, row] (teachers then students: n_view_rows = V·B).
    The others, column block by column block: the teacher column sums over row blocks, written
    as they are (CENTER_MODE 1) or as the center's EMA m·c + (1−m)·sum/(T·B) (CENTER_MODE 2)."""
    pid = tl.program_id(0)
    if pid < lse_programs:
        entries = pid * BLOCK + tl.arange(0, BLOCK)
        mask = entries < n_view_rows
        view = entries // n_rows
        row = entries - view * n_rows
        offsets = view * n_splits * n_rows + row
        row_max, log_sum = merge_lse_partials(ws_ptr + max_offset, ws_ptr + sum_offset, offsets, mask, n_splits, n_rows)
        tl.store(ws_ptr + row_max_offset + entries, row_max, mask=mask)
        tl.store(ws_ptr + log_sum_offset + entries, log_sum, mask=mask)
    else:
        if CENTER_MODE > 0:
            cols = (pid - lse_programs) * BLOCK + tl.arange(0, BLOCK)
            col_mask = cols < n_proto
            total = tl.zeros([BLOCK], tl.float32)
            for block in range(n_row_blocks):
                total += tl.load(ws_ptr + colsum_offset + block * n_proto + cols, mask=col_mask, other=0.0)
            if CENTER_MODE == 2:
                center = tl.load(center_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
                total = center * momentum + (total * inv_teacher_rows) * (1.0 - momentum)
            tl.store(center_out_ptr + cols, total, mask=col_mask)


@triton.jit
def _dino_loss_grad_kernel(
    t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14, t15, t_view_stride, t_stride_units,
    s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15, s_view_stride, s_stride_units,
    center_ptr,
    ws_ptr,
    row_max_offset,
    log_sum_offset,
    loss_offset,
    temperature_grad_offset,
    grad_ptr,
    grad_stride_view,
    teacher_temp_ptr,
    student_temp_ptr,
    n_rows,
    k_units,
    k_per_split,
    inv_teacher_temp,
    inv_student_temp,
    inv_normalizer,
    T_VIEWS: tl.constexpr,
    T_UNIFORM: tl.constexpr,
    T_ROW_ALIGN: tl.constexpr,
    S_VIEWS: tl.constexpr,
    S_UNIFORM: tl.constexpr,
    S_ROW_ALIGN: tl.constexpr,
    K_ALIGN: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    TEACHER_TEMP_TENSOR: tl.constexpr,
    STUDENT_TEMP_TENSOR: tl.constexpr,
    TEMPERATURE_GRAD: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """loss[program] = −Σ_s Σ_{rows, chunk} Q_s log P_s and, with COMPUTE_GRAD,
    grad[s] = (m_s P_s − Q_s)·grad_scale over the chunk (grad contiguous (S, B, K)),
    grad_scale = 1/(τ_s n B); with TEMPERATURE_GRAD, the partial −Σ_s ⟨grad[s], x_s⟩ of ∂L/∂τ_s
    (x_s = s/τ_s) at temperature_grad_offset. Row statistics (max, log Σ) are stored teachers
    first, (V, B)."""
    pid_rows = tl.program_id(0)
    pid_split = tl.program_id(1)
    inv_teacher_temp = inverse_temperature(inv_teacher_temp, teacher_temp_ptr, TEACHER_TEMP_TENSOR)
    inv_student_temp = inverse_temperature(inv_student_temp, student_temp_ptr, STUDENT_TEMP_TENSOR)
    grad_scale = inv_student_temp * inv_normalizer
    n_proto = k_units * K_ALIGN
    rows = pid_rows * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    k_begin = pid_split * k_per_split
    # Accumulated per row, not per tile lane: full-tile accumulators (32 registers per thread
    # each at 8 x 512 with 4 warps) spilled at the CUDA tiles.
    acc = tl.zeros([BLOCK_ROWS], tl.float32)
    temperature_acc = tl.zeros([BLOCK_ROWS], tl.float32)
    # The gradient pointer advances by one view (grad_stride_view = B·K, an int64 argument when
    # it needs one) per student: 64-bit pointer arithmetic, where view index x B·K could
    # overflow int32.
    grad_rows = grad_ptr + rows64[:, None] * n_proto
    max_ptr = ws_ptr + row_max_offset + rows
    log_sum_ptr = ws_ptr + log_sum_offset + rows
    for k0 in range(k_begin, k_begin + k_per_split, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < n_proto
        mask = row_mask[:, None] & col_mask[None, :]
        center = tl.load(center_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        prob_sum = tl.zeros([BLOCK_ROWS, BLOCK_K], tl.float32)
        for t in range(T_VIEWS):
            view = view_rows(t, rows64, t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14, t15, t_view_stride, t_stride_units, T_VIEWS, T_UNIFORM, T_ROW_ALIGN)
            raw = tl.load(view + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            row_max = tl.load(max_ptr + t * n_rows, mask=row_mask, other=0.0)
            log_sum = tl.load(log_sum_ptr + t * n_rows, mask=row_mask, other=0.0)
            y = (raw - center[None, :]) * inv_teacher_temp
            # Padding lanes: exp(-inf) = 0 (an unmasked exponent could overflow there).
            prob_sum += tl.exp(tl.where(mask, (y - row_max[:, None]) - log_sum[:, None], float("-inf")))
        out_ptr = grad_rows + cols[None, :]
        for s in range(S_VIEWS):
            view = view_rows(s, rows64, s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15, s_view_stride, s_stride_units, S_VIEWS, S_UNIFORM, S_ROW_ALIGN)
            raw = tl.load(view + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            row_max = tl.load(max_ptr + (T_VIEWS + s) * n_rows, mask=row_mask, other=0.0)
            log_sum = tl.load(log_sum_ptr + (T_VIEWS + s) * n_rows, mask=row_mask, other=0.0)
            # Padding lanes: log_p = 0 and target = 0, so they add nothing and exp stays finite.
            x = raw * inv_student_temp
            log_p = tl.where(mask, (x - row_max[:, None]) - log_sum[:, None], 0.0)
            # m_s: the teachers this student view is compared with (its own index excluded).
            matches = tl.where(s < T_VIEWS, T_VIEWS - 1.0, T_VIEWS * 1.0)
            target = prob_sum
            if s < T_VIEWS:
                # The same-index teacher is excluded: subtract its P (tile reloaded, from cache).
                same = view_rows(s, rows64, t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14, t15, t_view_stride, t_stride_units, T_VIEWS, T_UNIFORM, T_ROW_ALIGN)
                same_raw = tl.load(same + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                same_max = tl.load(max_ptr + s * n_rows, mask=row_mask, other=0.0)
                same_log_sum = tl.load(log_sum_ptr + s * n_rows, mask=row_mask, other=0.0)
                y = (same_raw - center[None, :]) * inv_teacher_temp
                target = prob_sum - tl.exp(
                    tl.where(mask, (y - same_max[:, None]) - same_log_sum[:, None], float("-inf"))
                )
            acc += tl.sum(target * log_p, axis=1)
            if COMPUTE_GRAD or TEMPERATURE_GRAD:
                grad = (matches * tl.exp(log_p) - target) * grad_scale
                if TEMPERATURE_GRAD:
                    temperature_acc += tl.sum(grad * x, axis=1)  # padding lanes: x = 0
                if COMPUTE_GRAD:
                    tl.store(out_ptr, grad.to(grad_ptr.dtype.element_ty), mask=mask)
            out_ptr += grad_stride_view
    total = tl.sum(acc, axis=0)
    program = pid_rows * tl.num_programs(1) + pid_split
    tl.store(ws_ptr + loss_offset + program, -total)
    if TEMPERATURE_GRAD:
        tl.store(ws_ptr + temperature_grad_offset + program, -tl.sum(temperature_acc, axis=0))


# --------------------------------------------------------------------------------------------
# Operator
# --------------------------------------------------------------------------------------------


def _dino_forward(
    teacher: List[Tensor],
    student: List[Tensor],
    center: Tensor,
    teacher_temp: float,
    student_temp: float,
    teacher_temp_tensor: Optional[Tensor],
    student_temp_tensor: Optional[Tensor],
    center_momentum: float,
    center_mode: int,
    compute_grad: bool,
    compute_temperature_grad: bool,
):
    """Returns the 0-d float32 loss, the (K,) float32 center output (``center_mode``: empty,
    the teacher column sum, or the EMA-updated center), the (S, B, K) student gradient of the
    loss (empty without ``compute_grad``) and ∂L/∂τ_s (0-d float32; empty without
    ``compute_temperature_grad``). A temperature given as a 0-d tensor is read on the device
    instead of its float."""
    n_teacher, n_student = len(teacher), len(student)
    t_views = prepare_views(teacher, common_dtype(teacher))
    student_dtype = common_dtype(student)
    s_views = prepare_views(student, student_dtype)
    n_rows, n_proto = student[0].shape
    device = student[0].device
    if not center.is_contiguous():
        center = center.contiguous()
    n_terms = n_teacher * n_student - min(n_teacher, n_student)
    with_temperature_grad = compute_temperature_grad and student_temp_tensor is not None

    block_k = min(next_pow2(n_proto), _TILE_CONTIGUOUS)
    block_rows = min(next_pow2(n_rows), max(1, _TILE_ELEMENTS // block_k))
    row_blocks = triton.cdiv(n_rows, block_rows)
    k_blocks = triton.cdiv(n_proto, block_k)
    splits = max(1, min(k_blocks, target_programs(device) // row_blocks, 65535))
    k_per_split = triton.cdiv(k_blocks, splits) * block_k
    splits = triton.cdiv(n_proto, k_per_split)  # every split holds at least one column
    grid = (row_blocks, splits)

    # Workspace sections (float32 elements): partial (max, sum) per (view, split, row), merged
    # (row max, log Σ) per (view, row), teacher column sums per row block, loss partials and
    # (learnable student temperature) ∂L/∂τ_s partials.
    n_views = n_teacher + n_student
    partials = n_views * splits * n_rows
    with_colsum = center_mode != CENTER_NONE
    sizes = [
        partials, partials, n_views * n_rows, n_views * n_rows, row_blocks * n_proto if with_colsum else 0,
        row_blocks * splits,
    ]  # fmt: skip
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + (size + 3) // 4 * 4)
    part_max, part_sum, row_max, log_sum, colsum, loss_partials, temperature_partials = offsets
    ws = _new_buffer((temperature_partials + (row_blocks * splits if with_temperature_grad else 0),), dtype=torch.float32, device=device)

    views = (*t_views.args(), *s_views.args())
    constexprs = dict(**t_views.constexprs("T_"), **s_views.constexprs("S_"), K_ALIGN=k_align(n_proto))
    temperature_flags = dict(
        TEACHER_TEMP_TENSOR=teacher_temp_tensor is not None, STUDENT_TEMP_TENSOR=student_temp_tensor is not None
    )
    temperature_pointers = (
        ws if teacher_temp_tensor is None else teacher_temp_tensor,
        ws if student_temp_tensor is None else student_temp_tensor,
    )
    k_units = n_proto // k_align(n_proto)
    # Student partials follow the teachers' in the same (view, split, row) layout.
    s_part = n_teacher * splits * n_rows
    _dino_stats_kernel[grid](
        *views, center, ws, part_max, part_sum, part_max + s_part, part_sum + s_part, colsum, *temperature_pointers,
        n_rows, k_units, k_per_split, 1.0 / teacher_temp, 1.0 / student_temp,
        **constexprs, **temperature_flags, WITH_COLSUM=with_colsum, BLOCK_ROWS=block_rows, BLOCK_K=block_k,
    )  # fmt: skip
    center_out = _new_buffer((n_proto,) if with_colsum else (0,), dtype=torch.float32, device=device)
    lse_programs = triton.cdiv(n_views * n_rows, _EPILOGUE_BLOCK)
    center_programs = triton.cdiv(n_proto, _EPILOGUE_BLOCK) if with_colsum else 0
    _dino_epilogue_kernel[(lse_programs + center_programs,)](
        ws, part_max, part_sum, row_max, log_sum, colsum, center, center_out if with_colsum else ws,
        n_views * n_rows, n_rows, splits, row_blocks, n_proto, 1.0 / (n_teacher * n_rows), float(center_momentum),
        lse_programs, CENTER_MODE=center_mode, BLOCK=_EPILOGUE_BLOCK,
    )  # fmt: skip

    grads = _new_buffer((n_student, n_rows, n_proto) if compute_grad else (0,), dtype=student_dtype, device=device)
    _dino_loss_grad_kernel[grid](
        *views, center, ws, row_max, log_sum, loss_partials, temperature_partials, grads if compute_grad else ws,
        n_rows * n_proto, *temperature_pointers,
        n_rows, k_units, k_per_split, 1.0 / teacher_temp, 1.0 / student_temp, 1.0 / (n_terms * n_rows),
        **constexprs, **temperature_flags, COMPUTE_GRAD=compute_grad, TEMPERATURE_GRAD=with_temperature_grad,
        BLOCK_ROWS=block_rows, BLOCK_K=block_k,
        # The temperature's partials keep one more tile live: 8 warps halve the registers per
        # thread (4 spill at 8 x 512).
        num_warps=8 if with_temperature_grad else 4,
    )  # fmt: skip
    loss = _new_buffer((), dtype=torch.float32, device=device)
    sum_to_scalar_kernel[(1,)](ws, loss_partials, row_blocks * splits, loss, 1.0 / (n_terms * n_rows), BLOCK=1024)
    temperature_grad = _new_buffer(() if with_temperature_grad else (0,), dtype=torch.float32, device=device)
    if with_temperature_grad:
        sum_to_scalar_kernel[(1,)](ws, temperature_partials, row_blocks * splits, temperature_grad, 1.0, BLOCK=1024)
    return loss, center_out, grads, temperature_grad


_dino_op = torch.library.custom_op(
    "fastssl::dino",
    _dino_forward,
    mutates_args=(),
    schema="(Tensor[] teacher, Tensor[] student, Tensor center, float teacher_temp, float student_temp, "
    "Tensor? teacher_temp_tensor, Tensor? student_temp_tensor, float center_momentum, int center_mode, "
    "bool compute_grad, bool compute_temperature_grad) -> (Tensor, Tensor, Tensor, Tensor)",
)


@_dino_op.register_fake
def _(teacher, student, center, teacher_temp, student_temp, teacher_temp_tensor, student_temp_tensor, center_momentum,
      center_mode, compute_grad, compute_temperature_grad):  # fmt: skip
    n_proto = student[0].shape[1]
    grad_shape = (len(student), *student[0].shape) if compute_grad else (0,)
    with_temperature_grad = compute_temperature_grad and student_temp_tensor is not None
    return (
        center.new_empty((), dtype=torch.float32),
        center.new_empty((n_proto,) if center_mode != CENTER_NONE else (0,), dtype=torch.float32),
        student[0].new_empty(grad_shape, dtype=common_dtype(student)),
        center.new_empty(() if with_temperature_grad else (0,), dtype=torch.float32),
    )


def _dino_setup(ctx, inputs, output) -> None:
    # The saved gradient outputs get no incoming gradient: no (V, B, K) zeros materialized.
    ctx.set_materialize_grads(False)
    ctx.n_teacher = len(inputs[0])
    ctx.input_dtypes = [s.dtype for s in inputs[1]]
    student_temp_tensor = inputs[6]
    ctx.temperature_meta = None if student_temp_tensor is None else (student_temp_tensor.shape, student_temp_tensor.dtype)
    ctx.save_for_backward(output[2], output[3])


def _dino_gradient(ctx, grad_loss, _grad_center, _grad_grads, _grad_temperature_grad):
    saved, temperature_grad = ctx.saved_tensors
    if saved.numel() == 0:
        student_grads = [None] * len(ctx.input_dtypes)
    else:
        scaled = scale_gradient(saved, grad_loss).unbind(0)
        student_grads = [g if g.dtype == dtype else g.to(dtype) for g, dtype in zip(scaled, ctx.input_dtypes)]
    grad_student_temp = None
    if ctx.temperature_meta is not None and temperature_grad.numel() > 0:
        shape, dtype = ctx.temperature_meta
        grad_student_temp = (temperature_grad * grad_loss).to(dtype).reshape(shape)
    return [None] * ctx.n_teacher, student_grads, None, None, None, None, grad_student_temp, None, None, None, None


_dino_op.register_autograd(_dino_gradient, setup_context=_dino_setup)


def dino_loss_triton(
    teacher_out: Sequence[Tensor],
    student_out: Sequence[Tensor],
    center: Tensor,
    teacher_temp: Union[float, Tensor],
    student_temp: Union[float, Tensor],
    *,
    center_momentum: float = 0.0,
    center_mode: int = CENTER_NONE,
):
    """DINO's cross-entropy (see :func:`fastssl.dino.dino_loss`) on the kernels.

    Args:
        teacher_out: T tensors (B, K), no gradient; student_out: S tensors (B, K);
        center: K entries ((K,) or (1, 1, K)).
        teacher_temp, student_temp: numbers or one-element tensors (read by the kernels on the
            device); a student temperature that requires grad gets ∂L/∂τ_s.
        center_mode: :data:`CENTER_NONE` returns the loss only; :data:`CENTER_TEACHER_SUM` also
            the (K,) float32 sum of the teacher outputs over views and batch;
            :data:`CENTER_EMA` also the new center ``m·center + (1−m)·mean`` (flattened,
            float32), with m = ``center_momentum`` -- both from the loss's own pass over the
            teacher.
    Returns:
        0-d float32 loss, or ``(loss, center output)``.

    Example::

        loss = dino_loss_triton([t0, t1], [s0, s1, s2], center, 0.04, 0.1)
        loss.backward()
    """
    student = list(student_out)
    compute_grad = torch.is_grad_enabled() and any(s.requires_grad for s in student)
    # The teacher gets no gradient; detaching also keeps a tensor passed as both a teacher and a
    # student view from being two inputs of one autograd node.
    teacher = [t.detach() if t.requires_grad else t for t in teacher_out]
    teacher_temp_tensor = student_temp_tensor = None
    compute_temperature_grad = False
    device = student[0].device
    # A temperature tensor elsewhere (a CPU scalar beside CUDA views) is copied to the views' device.
    if isinstance(teacher_temp, Tensor):
        teacher_temp_tensor, teacher_temp = teacher_temp.detach().reshape(()).to(device), 1.0
    if isinstance(student_temp, Tensor):
        compute_temperature_grad = torch.is_grad_enabled() and student_temp.requires_grad
        student_temp_tensor, student_temp = student_temp.reshape(()).to(device), 1.0
    loss, center_out, _, _ = _dino_op(
        teacher, student, center.detach() if center.requires_grad else center, float(teacher_temp),
        float(student_temp), teacher_temp_tensor, student_temp_tensor, float(center_momentum), int(center_mode),
        compute_grad, compute_temperature_grad,
    )  # fmt: skip
    if center_mode == CENTER_NONE:
        return loss
    return loss, center_out


# --------------------------------------------------------------------------------------------
# iBOT's masked-patch loss: same-index pairing, per-row weights
# --------------------------------------------------------------------------------------------
#
# iBOT (Zhou et al. 2022, Eq. 2, weighted as in DINOv2, Oquab et al. 2024) pairs student row i
# with teacher row i only (no cross-view pairs) and weights it by w_i (iBOT: 1/(B·n_b) for the
# n_b masked tokens of its image b; iBOT++: given weights). With y = (t − c)/τ_t, x = s/τ_s,
# q = softmax(y), p = softmax(x):
#
#     L = Σ_i w_i ce_i,   ce_i = Σ_k q_ik (lse(x_i) − x_ik),   ∂L/∂s_i = w_i (p_i − q_i)/τ_s.
#
# One streaming pass suffices for the loss: per row and K tile, with m_t, m_s the tile maxima of
# y and x, e = exp(y − m_t),
#
#     S_t = Σ e,   S_s = Σ exp(x − m_s),   D = Σ e·(m_s − x)   (every term ≥ 0),
#
# merged over tiles like log-sum-exps (D_j rescaled by exp(m_tj − M_t) and shifted by
# (M_s − m_sj)·S_tj), and ce = D/S_t + log S_s: a weighted mean of non-negative gaps plus a log,
# relative to the row maxima (no lse of large logits rounded first, as in the DINO kernels).
# The gradient needs the finished row statistics, so the backward streams teacher and student
# once more and writes the gradient already scaled by the incoming gradient (read on the device).


# Per row: M_t, log S_t, M_s, log S_s, weight (then the center's copy, K floats).
_IBOT_STATS_PER_ROW = 5
_IBOT_STATS = tl.constexpr(_IBOT_STATS_PER_ROW)  # the same, as the kernels read it


@triton.jit
def _ibot_stats_kernel(
    t_ptr,
    t_stride_units,
    s_ptr,
    s_stride_units,
    center_ptr,
    ws_ptr,
    partial_offset,
    colsum_offset,
    n_rows,
    rows_per_group,
    k_units,
    teacher_scale,
    student_scale,
    T_ROW_ALIGN: tl.constexpr,
    S_ROW_ALIGN: tl.constexpr,
    K_ALIGN: tl.constexpr,
    HAS_CENTER: tl.constexpr,
    WITH_COLSUM: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program (row group g, K tile j): for every row of the group, the tile's partial
    statistics (m_t, S_t, D, m_s, S_s) stored at ws[partial_offset + (stat·splits + j)·R + row],
    in base 2: logits y = (t − c)·teacher_scale and x = s·student_scale with the scales
    log2(e)/τ, so that every exponential is one ex2 (maxima and D in these units);
    with WITH_COLSUM, colsum[g, tile] = Σ_rows t (the center's batch sum; this program owns it)."""
    pid_group = tl.program_id(0)
    pid_split = tl.program_id(1)
    n_proto = k_units * K_ALIGN
    n_splits = tl.num_programs(1)
    cols = pid_split * BLOCK_K + tl.arange(0, BLOCK_K)
    col_mask = cols < n_proto
    # y = t·scale − c·scale: one FMA per element with the center scaled once per program.
    if HAS_CENTER:
        center = tl.load(center_ptr + cols, mask=col_mask, other=0.0).to(tl.float32) * teacher_scale
    else:
        center = tl.zeros([BLOCK_K], tl.float32)
    # Column sums per tile lane, reduced over rows once at the end (a reduction across warps per
    # tile cost more instructions than the loss arithmetic).
    colsum = tl.zeros([BLOCK_ROWS, BLOCK_K], tl.float32)
    row_begin = pid_group * rows_per_group
    row_end = tl.minimum(row_begin + rows_per_group, n_rows)
    stat_stride = n_splits * n_rows
    for row0 in range(row_begin, row_end, BLOCK_ROWS):
        rows = row0 + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < n_rows
        # Rows past the end read the last row again (their statistics are not stored): with
        # EVEN_K no lane is padding, and the hot loop carries no masks.
        rows64 = tl.minimum(rows, n_rows - 1).to(tl.int64)
        t_at = t_ptr + rows64[:, None] * (t_stride_units * T_ROW_ALIGN) + cols[None, :]
        s_at = s_ptr + rows64[:, None] * (s_stride_units * S_ROW_ALIGN) + cols[None, :]
        if EVEN_K:
            raw_t = tl.load(t_at).to(tl.float32)
            raw_s = tl.load(s_at).to(tl.float32)
            y = raw_t * teacher_scale - center[None, :]
            x = raw_s * student_scale
        else:
            raw_t = tl.load(t_at, mask=col_mask[None, :], other=0.0).to(tl.float32)
            raw_s = tl.load(s_at, mask=col_mask[None, :], other=0.0).to(tl.float32)
            y = tl.where(col_mask[None, :], raw_t * teacher_scale - center[None, :], float("-inf"))
            x = tl.where(col_mask[None, :], raw_s * student_scale, float("-inf"))
        if WITH_COLSUM:
            colsum += tl.where(row_mask[:, None], raw_t, 0.0)
        max_t = tl.max(y, axis=1)
        max_s = tl.max(x, axis=1)
        # A row of -inf logits: shift by 0 so that exp gives 0, not NaN.
        shift_t = tl.where(max_t == float("-inf"), 0.0, max_t)
        shift_s = tl.where(max_s == float("-inf"), 0.0, max_s)
        e = tl.exp2(y - shift_t[:, None])
        sum_t = tl.sum(e, axis=1)
        sum_s = tl.sum(tl.exp2(x - shift_s[:, None]), axis=1)
        if EVEN_K:
            gaps = tl.sum(e * (shift_s[:, None] - x), axis=1)
        else:
            # Padding lanes: e = 0 and the gap would be +inf; 0 keeps the sum finite.
            gaps = tl.sum(e * tl.where(col_mask[None, :], shift_s[:, None] - x, 0.0), axis=1)
        out = ws_ptr + partial_offset + pid_split * n_rows + rows
        tl.store(out, max_t, mask=row_mask)
        tl.store(out + stat_stride, sum_t, mask=row_mask)
        tl.store(out + 2 * stat_stride, gaps, mask=row_mask)
        tl.store(out + 3 * stat_stride, max_s, mask=row_mask)
        tl.store(out + 4 * stat_stride, sum_s, mask=row_mask)
    if WITH_COLSUM:
        column_sum = tl.sum(colsum, axis=0)
        tl.store(ws_ptr + colsum_offset + pid_group.to(tl.int64) * n_proto + cols, column_sum, mask=col_mask)


@triton.jit
def _ibot_epilogue_kernel(
    ws_ptr,
    partial_offset,
    loss_offset,
    colsum_offset,
    stats_ptr,
    weights_ptr,
    mask_ptr,
    center_ptr,
    center_out_ptr,
    n_rows,
    n_splits,
    n_groups,
    n_images,
    n_tokens,
    n_proto,
    inv_teacher_rows,
    momentum,
    row_programs,
    WEIGHTS_FROM_MASK: tl.constexpr,
    HAS_CENTER: tl.constexpr,
    CENTER_MODE: tl.constexpr,
    BLOCK: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,
    IMAGE_BLOCK: tl.constexpr,
    TOKEN_BLOCK: tl.constexpr,
    CENTER_BLOCK: tl.constexpr,
):
    """Programs [0, row_programs), BLOCK rows each: the K-tile partials (base 2, see
    _ibot_stats_kernel) merged into the row statistics stats[0:4] = (M_t, log2 S_t, M_s,
    log2 S_s), the cross-entropy ce = ln 2·(D/S_t + log2 S_s), and the row weight stats[4] (from the
    (B, tokens) boolean mask: 1/(B·max(n_b, 1)) for the n_b masked tokens of the row's image, rows
    in the mask's row-major order; or read from weights_ptr), and the program's Σ w_i·ce_i at
    ws[loss_offset + program] -- NaN when the mask marks a number of tokens other than R. The
    other programs, column block by column block: with HAS_CENTER, a copy of the center at
    stats[5·R:] (the backward's: the module updates its center in place before the backward);
    the teacher column sums over row groups, as they are (CENTER_MODE 1) or as the center's EMA
    m·c + (1−m)·sum/R (CENTER_MODE 2)."""
    pid = tl.program_id(0)
    if pid < row_programs:
        rows = pid * BLOCK + tl.arange(0, BLOCK)
        row_mask = rows < n_rows
        stat_stride = n_splits * n_rows
        part = ws_ptr + partial_offset + rows[None, :]
        # (splits, rows) tiles: rows are contiguous in the partials, and a few wide loads per
        # statistic replace a loop of one dependent load per split.
        split_lanes = tl.arange(0, SPLIT_BLOCK)
        top_t = tl.full([BLOCK], float("-inf"), tl.float32)
        top_s = tl.full([BLOCK], float("-inf"), tl.float32)
        for split0 in range(0, n_splits, SPLIT_BLOCK):
            splits = split0 + split_lanes
            tile_mask = (splits < n_splits)[:, None] & row_mask[None, :]
            at = part + splits[:, None] * n_rows
            top_t = tl.maximum(top_t, tl.max(tl.load(at, mask=tile_mask, other=float("-inf")), axis=0))
            top_s = tl.maximum(top_s, tl.max(tl.load(at + 3 * stat_stride, mask=tile_mask, other=float("-inf")), axis=0))
        shift_t = tl.where(top_t == float("-inf"), 0.0, top_t)
        shift_s = tl.where(top_s == float("-inf"), 0.0, top_s)
        sum_t = tl.zeros([BLOCK], tl.float32)
        sum_s = tl.zeros([BLOCK], tl.float32)
        gaps = tl.zeros([BLOCK], tl.float32)
        for split0 in range(0, n_splits, SPLIT_BLOCK):
            splits = split0 + split_lanes
            tile_mask = (splits < n_splits)[:, None] & row_mask[None, :]
            at = part + splits[:, None] * n_rows
            m_t = tl.load(at, mask=tile_mask, other=float("-inf"))
            s_t = tl.load(at + stat_stride, mask=tile_mask, other=0.0)
            d = tl.load(at + 2 * stat_stride, mask=tile_mask, other=0.0)
            m_s = tl.load(at + 3 * stat_stride, mask=tile_mask, other=float("-inf"))
            s_s = tl.load(at + 4 * stat_stride, mask=tile_mask, other=0.0)
            scale_t = tl.exp2(m_t - shift_t[None, :])
            sum_t += tl.sum(s_t * scale_t, axis=0)
            sum_s += tl.sum(s_s * tl.exp2(m_s - shift_s[None, :]), axis=0)
            # D_j was taken against the tile's own student max m_sj: shift it to M_s. A tile
            # whose teacher mass is 0 adds nothing (and its -inf max no NaN).
            gap_shift = shift_s[None, :] - tl.where(s_t > 0.0, m_s, shift_s[None, :])
            gaps += tl.sum(tl.where(s_t > 0.0, scale_t * (d + gap_shift * s_t), 0.0), axis=0)
        log_sum_t = tl.log2(tl.where(row_mask, sum_t, 1.0))
        log_sum_s = tl.log2(tl.where(row_mask, sum_s, 1.0))
        cross_entropy = (gaps / tl.where(row_mask, sum_t, 1.0) + log_sum_s) * 0.6931471805599453
        if WEIGHTS_FROM_MASK:
            # Row r belongs to image b when start_b <= r < end_b, end_b = Σ_{b' <= b} n_b': the
            # mask's counts, IMAGE_BLOCK images at a time (a prefix sum per block).
            weights = tl.zeros([BLOCK], tl.float32)
            seen = tl.zeros([], tl.int32)
            inv_images = 1.0 / n_images
            image_lanes = tl.arange(0, IMAGE_BLOCK)
            token_lanes = tl.arange(0, TOKEN_BLOCK)
            for image0 in range(0, n_images, IMAGE_BLOCK):
                images = image0 + image_lanes
                counts = tl.zeros([IMAGE_BLOCK], tl.int32)
                for token0 in range(0, n_tokens, TOKEN_BLOCK):
                    tokens = token0 + token_lanes
                    marked = tl.load(
                        mask_ptr + images[:, None] * n_tokens + tokens[None, :],
                        mask=(images < n_images)[:, None] & (tokens < n_tokens)[None, :], other=0,
                    )
                    counts += tl.sum((marked != 0).to(tl.int32), axis=1)
                ends = seen + tl.cumsum(counts, axis=0)
                starts = ends - counts
                inside = (rows[:, None] >= starts[None, :]) & (rows[:, None] < ends[None, :])
                image_weight = inv_images / tl.maximum(counts, 1).to(tl.float32)
                weights += tl.sum(tl.where(inside, image_weight[None, :], 0.0), axis=1)
                seen += tl.sum(counts, axis=0)
            # lightly requires exactly R marked tokens; a mismatch poisons the loss (no host check).
            poison = tl.where(seen == n_rows, 0.0, float("nan"))
        else:
            weights = tl.load(weights_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
            poison = 0.0
        tl.store(stats_ptr + rows, shift_t, mask=row_mask)
        tl.store(stats_ptr + n_rows + rows, log_sum_t, mask=row_mask)
        tl.store(stats_ptr + 2 * n_rows + rows, shift_s, mask=row_mask)
        tl.store(stats_ptr + 3 * n_rows + rows, log_sum_s, mask=row_mask)
        tl.store(stats_ptr + 4 * n_rows + rows, weights, mask=row_mask)
        weighted = tl.sum(tl.where(row_mask, weights * cross_entropy, 0.0), axis=0)
        tl.store(ws_ptr + loss_offset + pid, weighted + poison)
    else:
        cols = (pid - row_programs) * CENTER_BLOCK + tl.arange(0, CENTER_BLOCK)
        col_mask = cols < n_proto
        if HAS_CENTER:
            center = tl.load(center_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            tl.store(stats_ptr + _IBOT_STATS * n_rows + cols, center, mask=col_mask)
        if CENTER_MODE > 0:
            column_sum = tl.zeros([CENTER_BLOCK], tl.float32)
            for group in range(n_groups):
                column_sum += tl.load(ws_ptr + colsum_offset + group * n_proto + cols, mask=col_mask, other=0.0)
            if CENTER_MODE == 2:
                column_sum = center * momentum + (column_sum * inv_teacher_rows) * (1.0 - momentum)
            tl.store(center_out_ptr + cols, column_sum, mask=col_mask)


@triton.jit
def _ibot_grad_kernel(
    t_ptr,
    t_stride_units,
    s_ptr,
    s_stride_units,
    stats_ptr,
    upstream_ptr,
    grad_ptr,
    n_rows,
    rows_per_group,
    k_units,
    teacher_scale,
    student_scale,
    inv_student_temp,
    T_ROW_ALIGN: tl.constexpr,
    S_ROW_ALIGN: tl.constexpr,
    K_ALIGN: tl.constexpr,
    HAS_CENTER: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """grad[i] = w_i·g·(p_i − q_i)/τ_s over the program's (row group, K tile), g the incoming
    gradient (read on the device), p and q rebuilt from the row statistics and the center's copy
    at stats[5·R:] (base 2, as _ibot_stats_kernel; contiguous (R, K) gradient)."""
    pid_group = tl.program_id(0)
    pid_split = tl.program_id(1)
    n_proto = k_units * K_ALIGN
    cols = pid_split * BLOCK_K + tl.arange(0, BLOCK_K)
    col_mask = cols < n_proto
    if HAS_CENTER:
        center = tl.load(stats_ptr + _IBOT_STATS * n_rows + cols, mask=col_mask, other=0.0) * teacher_scale
    else:
        center = tl.zeros([BLOCK_K], tl.float32)
    factor = tl.load(upstream_ptr).to(tl.float32) * inv_student_temp
    row_begin = pid_group * rows_per_group
    row_end = tl.minimum(row_begin + rows_per_group, n_rows)
    for row0 in range(row_begin, row_end, BLOCK_ROWS):
        rows = row0 + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < n_rows
        # Rows past the end recompute the last row (not stored): no masks on the loads.
        rows_read = tl.minimum(rows, n_rows - 1)
        rows64 = rows_read.to(tl.int64)
        max_t = tl.load(stats_ptr + rows_read)
        log_sum_t = tl.load(stats_ptr + n_rows + rows_read)
        max_s = tl.load(stats_ptr + 2 * n_rows + rows_read)
        log_sum_s = tl.load(stats_ptr + 3 * n_rows + rows_read)
        scale = tl.load(stats_ptr + 4 * n_rows + rows_read) * factor
        t_at = t_ptr + rows64[:, None] * (t_stride_units * T_ROW_ALIGN) + cols[None, :]
        s_at = s_ptr + rows64[:, None] * (s_stride_units * S_ROW_ALIGN) + cols[None, :]
        if EVEN_K:
            y = tl.load(t_at).to(tl.float32) * teacher_scale - center[None, :]
            x = tl.load(s_at).to(tl.float32) * student_scale
            q = tl.exp2((y - max_t[:, None]) - log_sum_t[:, None])
            p = tl.exp2((x - max_s[:, None]) - log_sum_s[:, None])
        else:
            y = tl.load(t_at, mask=col_mask[None, :], other=0.0).to(tl.float32) * teacher_scale - center[None, :]
            x = tl.load(s_at, mask=col_mask[None, :], other=0.0).to(tl.float32) * student_scale
            # Padding lanes: both exponents -inf (an unmasked one could overflow there).
            q = tl.exp2(tl.where(col_mask[None, :], (y - max_t[:, None]) - log_sum_t[:, None], float("-inf")))
            p = tl.exp2(tl.where(col_mask[None, :], (x - max_s[:, None]) - log_sum_s[:, None], float("-inf")))
        grad = (p - q) * scale[:, None]
        out = grad_ptr + rows.to(tl.int64)[:, None] * n_proto + cols[None, :]
        tl.store(out, grad.to(grad_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


# Warps of the two streaming kernels: two (8, 512) float32 tiles per program on 8 warps keep
# about 90 registers per thread (172 on 4 warps), so more warps per SM keep loads in flight.
_IBOT_STREAM_WARPS = 8
_IBOT_TILE_ELEMENTS = 4096
_IBOT_TILE_K = 4096
_IBOT_ROW_BLOCK = 32  # rows per epilogue program (the partial merge)
_LOG2E = 1.4426950408889634  # the kernels' logits are in base 2: one ex2 per exponential
_IBOT_SPLIT_BLOCK = 32  # K-tile partials merged per load
_IBOT_IMAGE_BLOCK = 16
_IBOT_TOKEN_BLOCK = 256


def _row_operand(x: Tensor):
    """``x`` with unit stride along K, its row stride as (units, ROW_ALIGN) (see prepare_views)."""
    if x.shape[1] > 1 and x.stride(1) != 1:
        x = x.contiguous()
    row_stride = x.stride(0) if x.shape[0] > 1 else x.shape[1]
    row_align = math.gcd(max(row_stride, 1), max(1, 16 // x.element_size()))
    return x, max(row_stride, 1) // row_align, row_align


def _ibot_stats_size(n_rows: int, n_proto: int, has_center: bool) -> int:
    return _IBOT_STATS_PER_ROW * n_rows + (n_proto if has_center else 0)


def _ibot_plan(n_rows: int, n_proto: int, device: torch.device):
    """(BLOCK_ROWS, BLOCK_K, row groups, rows per group, K tiles): one program per (row group,
    K tile), row groups only as many as four waves of programs need."""
    block_k = min(next_pow2(n_proto), _IBOT_TILE_K)
    block_rows = min(next_pow2(n_rows), max(1, _IBOT_TILE_ELEMENTS // block_k))
    row_blocks = triton.cdiv(n_rows, block_rows)
    k_blocks = triton.cdiv(n_proto, block_k)
    groups = max(1, min(row_blocks, triton.cdiv(target_programs(device), k_blocks)))
    blocks_per_group = triton.cdiv(row_blocks, groups)
    groups = triton.cdiv(row_blocks, blocks_per_group)
    return block_rows, block_k, groups, blocks_per_group * block_rows, k_blocks


def _ibot_forward(
    teacher: Tensor,
    student: Tensor,
    center: Optional[Tensor],
    mask: Optional[Tensor],
    weights: Optional[Tensor],
    teacher_temp: float,
    student_temp: float,
    center_momentum: float,
    center_mode: int,
):
    """The 0-d float32 loss, the (K,) float32 center output (``center_mode``: empty, the teacher
    column sum or the EMA-updated center) and the float32 row statistics (5·R, then the center's
    K entries when there is one) the backward reads. Weights from the (B, ...) boolean ``mask`` (iBOT) or the (R,) ``weights`` (given)."""
    n_rows, n_proto = student.shape
    device = student.device
    teacher, t_units, t_align = _row_operand(teacher)
    student, s_units, s_align = _row_operand(student)
    if center is not None and not center.is_contiguous():
        center = center.contiguous()
    block_rows, block_k, groups, rows_per_group, splits = _ibot_plan(n_rows, n_proto, device)
    with_colsum = center_mode != CENTER_NONE
    row_programs = triton.cdiv(n_rows, _IBOT_ROW_BLOCK)
    # Workspace (float32 elements): the K-tile partials (5, splits, R), the teacher column sums
    # per row group, the loss partials.
    sizes = [_IBOT_STATS_PER_ROW * splits * n_rows, groups * n_proto if with_colsum else 0, row_programs]
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + (size + 3) // 4 * 4)
    partials, colsum, loss_partials, ws_size = offsets
    ws = _new_buffer((ws_size,), dtype=torch.float32, device=device)
    k_alignment = k_align(n_proto)
    _ibot_stats_kernel[(groups, splits)](
        teacher, t_units, student, s_units, ws if center is None else center, ws, partials, colsum,
        n_rows, rows_per_group, n_proto // k_alignment, _LOG2E / teacher_temp, _LOG2E / student_temp,
        T_ROW_ALIGN=t_align, S_ROW_ALIGN=s_align, K_ALIGN=k_alignment, HAS_CENTER=center is not None,
        WITH_COLSUM=with_colsum, EVEN_K=n_proto % block_k == 0, BLOCK_ROWS=block_rows, BLOCK_K=block_k,
        num_warps=_IBOT_STREAM_WARPS,
    )  # fmt: skip
    stats = _new_buffer((_ibot_stats_size(n_rows, n_proto, center is not None),), dtype=torch.float32, device=device)
    center_out = _new_buffer((n_proto,) if with_colsum else (0,), dtype=torch.float32, device=device)
    if mask is not None:
        if not mask.is_contiguous():
            mask = mask.contiguous()
        n_images = mask.shape[0]
        n_tokens = mask.numel() // max(n_images, 1)
    else:
        n_images = n_tokens = 1
    center_programs = triton.cdiv(n_proto, _EPILOGUE_BLOCK) if with_colsum or center is not None else 0
    _ibot_epilogue_kernel[(row_programs + center_programs,)](
        ws, partials, loss_partials, colsum, stats, ws if weights is None else weights, ws if mask is None else mask,
        ws if center is None else center, center_out if with_colsum else ws,
        n_rows, splits, groups, n_images, n_tokens, n_proto, 1.0 / n_rows, float(center_momentum), row_programs,
        WEIGHTS_FROM_MASK=mask is not None, HAS_CENTER=center is not None, CENTER_MODE=center_mode,
        BLOCK=_IBOT_ROW_BLOCK, SPLIT_BLOCK=min(next_pow2(splits), _IBOT_SPLIT_BLOCK),
        IMAGE_BLOCK=min(next_pow2(n_images), _IBOT_IMAGE_BLOCK), TOKEN_BLOCK=min(next_pow2(n_tokens), _IBOT_TOKEN_BLOCK),
        CENTER_BLOCK=_EPILOGUE_BLOCK,
    )  # fmt: skip
    loss = _new_buffer((), dtype=torch.float32, device=device)
    sum_to_scalar_kernel[(1,)](ws, loss_partials, row_programs, loss, 1.0, BLOCK=1024)
    return loss, center_out, stats


def _ibot_backward(
    teacher: Tensor,
    student: Tensor,
    stats: Tensor,
    grad_loss: Tensor,
    teacher_temp: float,
    student_temp: float,
) -> Tensor:
    """The (R, K) student gradient in the student's dtype, scaled by the 0-d ``grad_loss``."""
    n_rows, n_proto = student.shape
    teacher, t_units, t_align = _row_operand(teacher)
    student, s_units, s_align = _row_operand(student)
    has_center = stats.numel() > _IBOT_STATS_PER_ROW * n_rows
    block_rows, block_k, groups, rows_per_group, splits = _ibot_plan(n_rows, n_proto, student.device)
    grad = _new_buffer((n_rows, n_proto), dtype=student.dtype, device=student.device)
    k_alignment = k_align(n_proto)
    _ibot_grad_kernel[(groups, splits)](
        teacher, t_units, student, s_units, stats, grad_loss, grad,
        n_rows, rows_per_group, n_proto // k_alignment, _LOG2E / teacher_temp, _LOG2E / student_temp,
        1.0 / student_temp,
        T_ROW_ALIGN=t_align, S_ROW_ALIGN=s_align, K_ALIGN=k_alignment, HAS_CENTER=has_center,
        EVEN_K=n_proto % block_k == 0, BLOCK_ROWS=block_rows, BLOCK_K=block_k, num_warps=_IBOT_STREAM_WARPS,
    )  # fmt: skip
    return grad


_ibot_op = torch.library.custom_op(
    "fastssl::ibot_patch",
    _ibot_forward,
    mutates_args=(),
    schema="(Tensor teacher, Tensor student, Tensor? center, Tensor? mask, Tensor? weights, float teacher_temp, "
    "float student_temp, float center_momentum, int center_mode) -> (Tensor, Tensor, Tensor)",
)


@_ibot_op.register_fake
def _(teacher, student, center, mask, weights, teacher_temp, student_temp, center_momentum, center_mode):
    n_rows, n_proto = student.shape
    return (
        student.new_empty((), dtype=torch.float32),
        student.new_empty((n_proto,) if center_mode != CENTER_NONE else (0,), dtype=torch.float32),
        student.new_empty((_ibot_stats_size(n_rows, n_proto, center is not None),), dtype=torch.float32),
    )


_ibot_backward_op = torch.library.custom_op(
    "fastssl::ibot_patch_backward",
    _ibot_backward,
    mutates_args=(),
    schema="(Tensor teacher, Tensor student, Tensor stats, Tensor grad_loss, float teacher_temp, float student_temp) "
    "-> Tensor",
)


@_ibot_backward_op.register_fake
def _(teacher, student, stats, grad_loss, teacher_temp, student_temp):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _ibot_setup(ctx, inputs, output) -> None:
    teacher, student, _center, _mask, _weights, teacher_temp, student_temp, _momentum, _mode = inputs
    ctx.set_materialize_grads(False)
    ctx.temperatures = (teacher_temp, student_temp)
    ctx.save_for_backward(teacher, student, output[2])


def _ibot_gradient(ctx, grad_loss, _grad_center, _grad_stats):
    teacher, student, stats = ctx.saved_tensors
    grad = None
    if grad_loss is not None and ctx.needs_input_grad[1]:
        upstream = grad_loss if grad_loss.dtype == torch.float32 else grad_loss.float()
        grad = _ibot_backward_op(teacher, student, stats, upstream, *ctx.temperatures)
    return None, grad, None, None, None, None, None, None, None


_ibot_op.register_autograd(_ibot_gradient, setup_context=_ibot_setup)


def ibot_patch_loss_triton(
    teacher_out: Tensor,
    student_out: Tensor,
    center: Optional[Tensor],
    teacher_temp: float,
    student_temp: float,
    *,
    mask: Optional[Tensor] = None,
    weights: Optional[Tensor] = None,
    center_momentum: float = 0.0,
    center_mode: int = CENTER_NONE,
):
    """iBOT's weighted same-index soft cross-entropy (see :func:`fastssl.prototype.ibot_patch_loss`)
    on the kernels: ``Σ_i w_i Σ_k −softmax((t_i − c)/τ_t)_k log softmax(s_i/τ_s)_k``.

    Args:
        teacher_out, student_out: (R, K), row i of one paired with row i of the other; no
            gradient flows to the teacher.
        center: K entries, or None (zeros).
        mask: boolean (B, ...) token mask with R entries set, rows in its row-major order of
            set entries: w_i = 1/(B·n_b), n_b the set entries of row i's image (at least 1); a
            mask with another number of set entries gives a NaN loss. Or
        weights: (R,) per-row weights (exactly one of ``mask`` and ``weights``).
        center_mode: as :func:`dino_loss_triton` (the teacher sum over the R rows, or the EMA
            with ``center_momentum``; the EMA needs a center).
    Returns:
        0-d float32 loss, or ``(loss, center output)``.

    Cost (H200, 4.3 TB/s; iBOT at DINOv2's shape: R = 5018 masked tokens of 64 × 196, K = 65536,
    e bytes per element, E = R·K = 3.3·10⁸), counted before the kernels were written:

    * floor: read teacher and student once, write the gradient once: 3·E·e = 3.9 GB (fp32)
      -> 918 µs; 1.97 GB (bf16) -> 459 µs. ~25 FLOPs and 4 exponentials per element pair over
      both passes (8 GFLOP, 1.3·10⁹ ex2): below the copy time, so bytes bind.
    * this implementation: the forward reads teacher and student once (the loss from one pass,
      ce = D/S_t + log S_s), the backward reads them again and writes the gradient already
      scaled by the incoming gradient (no saved gradient, no scaling pass): 5·E·e = 6.6 GB
      (fp32) -> 1,530 µs, 1,545 µs with the small launches; 3.3 GB (bf16) -> 770 µs: ≈ 60 % of
      the floor, the most a forward and a backward that each need the finished row statistics
      can reach (the K-tile partials add 5·R·K/4096 floats, 1.6 MB, and the center's column
      sums per row group 8.6 MB).
    * instruction issue (sm_90 SASS, Triton 3.9, hot loop per warp per (1, 4096) tile on 8
      warps): stats kernel 364 instructions = 0.71 warp-instructions per element pair -> 223 µs
      at 4 issues per cycle per SM, under the forward's copy time (612 µs fp32, 306 µs bf16);
      gradient kernel 213 -> 131 µs, under its 918 / 459 µs. Predicted effect of the two
      changes made after the first compile (written before each): per-tile masks and a
      cross-warp column sum per tile gone (845 -> 789 instructions per (8, 512) tile), base-2
      logits with log2(e) folded into the scales (-> 645), (1, 4096) tiles so that each row
      reduction crosses warps once per 4096 elements instead of once per 512 (-> 364): bf16
      forward from issue-bound (~520 µs) to copy-bound (306 µs).
    * memory beyond the inputs: the gradient (E·e, which any backward returns) and ~10 MB of
      workspace; lightly's autograd keeps softmax, log-softmax and their product (3·E·4 B =
      3.9 GB at fp32) on top of its gradient.
    * programs (132 SMs): stats and gradient kernels 33 row groups × 16 K tiles = 528 (4.0
      waves, 99-127 registers, no spills under Triton 3.6 and 3.9); epilogue 157 row blocks +
      64 center blocks; sum 1. Eager ops per module step: 8 (5 allocations, 2 detaches, the
      center's in-place copy); no host synchronisation.

    Example::

        loss = ibot_patch_loss_triton(t, s.requires_grad_(), center, 0.04, 0.1, mask=mask)
        loss.backward()
    """
    if (mask is None) == (weights is None):
        raise ValueError("pass exactly one of mask and weights")
    if center is None and center_mode == CENTER_EMA:
        raise ValueError("the center EMA needs a center")
    # Read flat by the kernels: any shape with K entries. The teacher (and center, weights) get
    # no gradient; detaching only what requires one keeps the eager ops few.
    if center is not None and center.requires_grad:
        center = center.detach()
    if weights is not None and weights.requires_grad:
        weights = weights.detach()
    teacher = teacher_out.detach() if teacher_out.requires_grad else teacher_out
    loss, center_out, _ = _ibot_op(
        teacher, student_out, center, mask, weights,
        float(teacher_temp), float(student_temp), float(center_momentum), int(center_mode),
    )  # fmt: skip
    if center_mode == CENTER_NONE:
        return loss
    return loss, center_out
