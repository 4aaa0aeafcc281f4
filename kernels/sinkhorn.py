r"""Triton kernels for SwAV: log-domain Sinkhorn-Knopp and the fused swapped-prediction loss,
as ``torch.library`` custom ops (``fastssl::sinkhorn``, ``fastssl::swav``,
``fastssl::swav_backward``) so that ``torch.compile(fullgraph=True)`` keeps them whole.

Sinkhorn (Caron et al. 2020, Sec. 3.1 and App. A; derivation in :mod:`fastssl.swav`). With
L = S/ε, every iterate of SwAV's Sinkhorn is log Q[b, k] = L[b, k] − a_k − c_b, and one
iteration is two log-sum-exp sweeps:

* over the samples (rows of the (N, K) score matrix), per prototype: a_k = LSE_b(L[b, k] − c_b);
* over the prototypes, per sample:                                    c_b = LSE_k(L[b, k] − a_k).

:func:`_partial_lse_kernel` does either sweep (the two differ only in which stride is reduced)
with an online, max-shifted log-sum-exp, split along the reduced axis so that narrow problems
still fill the GPU; :func:`_merge_kernel` combines the few partial (max, sum) pairs into the
potential -- on the device, between the sweeps: no PyTorch op runs between the launches (for a
distributed Sinkhorn the prototype potentials are all-reduced over ranks there). No exponential
ever exceeds 1 and the maximum term of every sum is exactly 1, so no scores or ε overflow or
underflow to an all-zero row or column. The H high-resolution crops (each with the queue
appended) are one launch: a (H, N, K) problem with the crop as grid axis 2. A problem small
enough for one tile (:data:`_RESIDENT_ELEMENTS`) runs every iteration in one program,
:func:`_sinkhorn_resident_kernel`, its matrix read once and kept in registers.

Swapped prediction. Codes carry no gradient, so the loss over the V crops is

    L = −1/(H (V−1) B) Σ_v Σ_{b,k} T_v[b, k] (x_v[b, k] − lse_v[b]),    x_v = s_v/τ,

with targets T_v = Σ_{i<H} q_i − [v < H] q_v and ∂L/∂s_v = (w_v p_v − T_v)/(τ H (V−1) B),
p_v = softmax(x_v), w_v = Σ_k T_v[b, k] (= H − [v < H] once the codes are normalized).
:func:`_codes_kernel` writes Σ_i q_i once (float32, (B, K)); :func:`_swav_ce_kernel` runs one
program per (crop, row block), all crops in one launch, in two sweeps over its rows (online LSE,
then loss terms and gradient), a high-resolution crop recomputing its own codes from its scores
instead of reading them. Log-probabilities are formed as (x − max) − log Σ, never through the
rounded lse = max + log Σ (which loses digits when the scores carry a large common offset). The
gradient is written in the forward; the backward (:func:`fastssl.kernels._common.scale_gradient`)
only scales it by the incoming gradient, read on the device.

Host side. The crops are separate tensors (one per view, as models produce them); the kernels
read them in place through pointer arguments (:func:`fastssl.kernels._common.prepare_views`):
no stacked copy and no address table. Every float32 intermediate (potentials, partial sums,
codes, loss partials) lives in one workspace allocation addressed by element offsets, and the
loss is summed on the device (:func:`fastssl.kernels._common.sum_to_scalar_kernel`): per
forward + backward the eager PyTorch ops are 3 allocations (workspace, gradient, loss), the
backward's output allocation and its unbind -- no host synchronization, no host-to-device copy,
so a training step can be captured in a CUDA graph. Only with a queue is each high-resolution
crop concatenated with its queue once, as the Sinkhorn problem.

Cost, per loss call, with e bytes per input element, N = B + Q rows per Sinkhorn problem and I
iterations. Headline shape B = 4096, K = 3000, I = 3, H = V = 2, Q = 0, bf16, on an H200
(4.3 TB/s copy, ~60 TFLOP/s fp32, ~3.7·10¹² exp/s: 16 MUFU ops per SM per clock):

* minimum bytes: read every crop and queue once, write every crop's gradient once:
  (2 V B K + H Q K) e = 98 MB -> 23 µs;
* FLOPs: Sinkhorn 2 I H N K x ~5 (scale, shift, max, exp, add), codes H B K x ~4, loss
  V B K x ~15 (two sweeps): 0.74 + 0.10 + 0.37 = 1.2 GFLOP -> 20 µs of fp32 ALU;
* exponentials: 2 I H N K + H B K + ~3 V B K = 0.25·10⁹ -> 66 µs, the binding floor;
* traffic of this implementation: 2 I sweeps over the H problems (6 x 49 MB, partly from the
  50 MB L2), the codes pass (49 MB read, 49 MB float32 written), two sweeps over every crop
  (98 MB), the float32 targets read once per crop (98 MB), the gradients (49 MB) and the
  backward's scaling (49 MB read, 49 MB written): ~0.74 GB -> 170-230 µs of kernels.
* programs at the headline shape (132 SMs): column sweeps (reduce over samples) 6 K-blocks x 43
  splits x 2 problems = 516 (3.9 waves), row sweeps 512 x 2 = 1024, codes 512 x 6 = 3072, loss
  512 x 2 = 1024, backward scaling 6000; merges and the loss sum are a few programs each.
  Launches per forward + backward: 2I sweeps + 2I merges + codes + loss + sum + scale = 16.

Predicted effect of moving the glue onto the device (written before the change): the previous
host side ran ~70 eager ops per forward + backward (partial merges in PyTorch after each of the
2I sweeps, weights, the loss sum, per-crop scaling) and two host-to-device table copies (each a
stream synchronization). On a GPU those ops are CPU-bound at ~5-10 µs each, so the step took
≈ 170-230 µs of kernels + ≈ 350-500 µs of launch-bound glue and stalls: ≈ 10-15 % of the 66 µs
floor. With 5 eager ops and 16 launches issued back to back, the kernels dominate:
predicted 180-250 µs, ≈ 26-37 % of the floor (and 170-230 µs under a CUDA graph).
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastssl import distributed
from fastssl.distributed import all_reduce_logsumexp
from fastssl.kernels._common import (
    Views,
    common_dtype,
    k_align,
    merge_lse_partials,
    next_pow2,
    online_lse_step,
    prepare_views,
    scale_gradient,
    sum_to_scalar_kernel,
    target_programs,
    view_base,
)

# Tile sizes (elements). The contiguous axis of a tile gets up to _TILE_CONTIGUOUS elements, the
# other axis the rest of _TILE_ELEMENTS. Tests shrink both to run multi-tile loops, masks and
# split reductions on small inputs.
_TILE_ELEMENTS = 4096
_TILE_CONTIGUOUS = 512
# A Sinkhorn problem whose padded (N, K) matrix has at most this many elements runs all its
# iterations in one program, the matrix held in registers (one launch instead of 4I + 1).
_RESIDENT_ELEMENTS = 16384
_MERGE_BLOCK = 1024

# Buffers every kernel fully overwrites; tests replace this with a NaN-filled allocation to
# check that every element is written.
_new_buffer = torch.empty


def _tile(n_contiguous: int, n_other: int) -> Tuple[int, int]:
    """Power-of-two tile (contiguous axis, other axis) for extents n_contiguous x n_other."""
    block_contiguous = min(next_pow2(n_contiguous), _TILE_CONTIGUOUS)
    block_other = min(next_pow2(n_other), max(1, _TILE_ELEMENTS // block_contiguous))
    return block_contiguous, block_other


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _partial_lse_kernel(
    p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15, p_view_stride, p_stride_units,
    ws_ptr,
    potential_offset,
    max_offset,
    sum_offset,
    n_rows,
    k_units,
    reduce_per_split,
    potential_stride_problem,
    out_stride_problem,
    out_stride_split,
    scale,
    P_VIEWS: tl.constexpr,
    P_UNIFORM: tl.constexpr,
    P_ROW_ALIGN: tl.constexpr,
    K_ALIGN: tl.constexpr,
    REDUCE_ROWS: tl.constexpr,
    HAS_POTENTIAL: tl.constexpr,
    BLOCK_KEEP: tl.constexpr,
    BLOCK_REDUCE: tl.constexpr,
):
    """For each kept index j, over one split of the reduced index i of problem program_id(2):
    m_j = max_i y_ij and s_j = Σ_i exp(y_ij − m_j), y_ij = scale·x_ij − potential_i, stored in
    the workspace at [problem, split, j]. REDUCE_ROWS: reduce over samples, keep prototypes;
    else reduce over prototypes, keep samples."""
    pid_keep = tl.program_id(0)
    pid_split = tl.program_id(1)
    pid_problem = tl.program_id(2)
    # K = k_units·K_ALIGN: written as a product with a constant, the compiler knows that K-axis
    # masks are constant over K_ALIGN-wide groups and keeps 16-byte loads.
    if REDUCE_ROWS:
        n_keep = k_units * K_ALIGN
        n_reduce = n_rows
    else:
        n_keep = n_rows
        n_reduce = k_units * K_ALIGN
    base = view_base(pid_problem, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15, p_view_stride, P_VIEWS, P_UNIFORM)
    row_stride = p_stride_units * P_ROW_ALIGN
    keep = pid_keep * BLOCK_KEEP + tl.arange(0, BLOCK_KEEP)
    keep_mask = keep < n_keep
    run_max = tl.full([BLOCK_KEEP], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_KEEP], tl.float32)
    potential_ptr = ws_ptr + potential_offset + pid_problem * potential_stride_problem
    reduce_begin = pid_split * reduce_per_split
    for r0 in range(reduce_begin, reduce_begin + reduce_per_split, BLOCK_REDUCE):
        red = r0 + tl.arange(0, BLOCK_REDUCE)
        red_mask = red < n_reduce
        mask = keep_mask[:, None] & red_mask[None, :]
        if REDUCE_ROWS:
            ptrs = base + red.to(tl.int64)[None, :] * row_stride + keep[:, None]
        else:
            ptrs = base + keep.to(tl.int64)[:, None] * row_stride + red[None, :]
        y = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) * scale
        if HAS_POTENTIAL:
            pot = tl.load(potential_ptr + red, mask=red_mask, other=0.0)
            y = y - pot[None, :]
        y = tl.where(mask, y, float("-inf"))
        run_max, run_sum = online_lse_step(run_max, run_sum, y, 1)
    out = pid_problem * out_stride_problem + pid_split * out_stride_split + keep
    tl.store(ws_ptr + max_offset + out, run_max, mask=keep_mask)
    tl.store(ws_ptr + sum_offset + out, run_sum, mask=keep_mask)


@triton.jit
def _merge_kernel(
    ws_ptr,
    max_offset,
    sum_offset,
    out_offset,
    n_keep,
    n_splits,
    part_stride_problem,
    part_stride_split,
    out_stride_problem,
    BLOCK: tl.constexpr,
):
    """potential[problem, j] = log Σ_splits s·exp(m) for the partials of one sweep."""
    keep = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    problem = tl.program_id(1)
    mask = keep < n_keep
    offsets = problem * part_stride_problem + keep
    shift, log_total = merge_lse_partials(
        ws_ptr + max_offset, ws_ptr + sum_offset, offsets, mask, n_splits, part_stride_split
    )
    tl.store(ws_ptr + out_offset + problem * out_stride_problem + keep, shift + log_total, mask=mask)


@triton.jit
def _zero_iteration_kernel(
    ws_ptr,
    a_offset,
    c_offset,
    row_sums_offset,
    n_samples,
    rows_out,
    n_proto,
    c_stride_problem,
    log_n,
    BLOCK: tl.constexpr,
):
    """Sinkhorn without iterations, problem program_id(0): c holds LSE_k(L[b, :]) on entry; with
    the global log_total = LSE_b of it, the codes are N·exp(L − log_total): c_b ← log_total −
    log N, a ← 0, and the codes' row sums exp(lse_b − c_b) are written for the loss weights."""
    h = tl.program_id(0)
    c_ptr = ws_ptr + c_offset + h * c_stride_problem
    run_max = tl.full([BLOCK], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_samples, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        row_lse = tl.load(c_ptr + offs, mask=offs < n_samples, other=float("-inf"))
        # Lane-wise online LSE (the lanes are merged after the loop).
        new_max = tl.maximum(run_max, row_lse)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - shift) + tl.exp(row_lse - shift)
        run_max = new_max
    top = tl.max(run_max, axis=0)
    top_shift = tl.where(top == float("-inf"), 0.0, top)
    log_total = top_shift + tl.log(tl.sum(run_sum * tl.exp(run_max - top_shift), axis=0))
    potential = log_total - log_n
    for start in range(0, rows_out, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        row_lse = tl.load(c_ptr + offs, mask=offs < rows_out, other=0.0)
        tl.store(ws_ptr + row_sums_offset + h * rows_out + offs, tl.exp(row_lse - potential), mask=offs < rows_out)
    for start in range(0, n_samples, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        tl.store(c_ptr + offs, tl.zeros([BLOCK], tl.float32) + potential, mask=offs < n_samples)
    for start in range(0, n_proto, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        tl.store(ws_ptr + a_offset + h * n_proto + offs, tl.zeros([BLOCK], tl.float32), mask=offs < n_proto)


@triton.jit
def _codes_kernel(
    p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15, p_view_stride, p_stride_units,
    ws_ptr,
    a_offset,
    c_offset,
    c_stride_problem,
    out_ptr,
    out_offset,
    n_problems,
    n_rows,
    k_units,
    scale,
    P_VIEWS: tl.constexpr,
    P_UNIFORM: tl.constexpr,
    P_ROW_ALIGN: tl.constexpr,
    K_ALIGN: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_PROTO: tl.constexpr,
):
    """out[b, k] = Σ_h exp(scale·x_h[b, k] − a[h, k] − c[h, b]): the codes summed over problems
    ((n_rows, K) float32, contiguous at out_ptr + out_offset)."""
    n_proto = k_units * K_ALIGN
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_PROTO + tl.arange(0, BLOCK_PROTO)
    row_mask = rows < n_rows
    col_mask = cols < n_proto
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)
    row_stride = p_stride_units * P_ROW_ALIGN
    acc = tl.zeros([BLOCK_ROWS, BLOCK_PROTO], tl.float32)
    for h in range(n_problems):
        base = view_base(h, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15, p_view_stride, P_VIEWS, P_UNIFORM)
        x = tl.load(base + rows64[:, None] * row_stride + cols[None, :], mask=mask, other=0.0)
        a = tl.load(ws_ptr + a_offset + h * n_proto + cols, mask=col_mask, other=0.0)
        c = tl.load(ws_ptr + c_offset + h * c_stride_problem + rows, mask=row_mask, other=0.0)
        # Padding lanes get exp(-inf) = 0 rather than an overflowing exp of a stray potential.
        acc += tl.exp(tl.where(mask, x.to(tl.float32) * scale - a[None, :] - c[:, None], float("-inf")))
    tl.store(out_ptr + out_offset + rows64[:, None] * n_proto + cols[None, :], acc, mask=mask)


@triton.jit
def _sinkhorn_resident_kernel(
    p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15, p_view_stride, p_stride_units,
    ws_ptr,
    a_offset,
    c_offset,
    c_stride_problem,
    n_samples,
    k_units,
    scale,
    iterations,
    P_VIEWS: tl.constexpr,
    P_UNIFORM: tl.constexpr,
    P_ROW_ALIGN: tl.constexpr,
    K_ALIGN: tl.constexpr,
    BLOCK_SAMPLES: tl.constexpr,
    BLOCK_PROTO: tl.constexpr,
):
    """All iterations of one Sinkhorn problem whose (N, K) matrix fits one tile: the matrix is
    read once and stays in registers; writes a (K,) and the final c (N,)."""
    pid = tl.program_id(0)
    n_proto = k_units * K_ALIGN
    base = view_base(pid, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15, p_view_stride, P_VIEWS, P_UNIFORM)
    rows = tl.arange(0, BLOCK_SAMPLES)
    cols = tl.arange(0, BLOCK_PROTO)
    row_mask = rows < n_samples
    col_mask = cols < n_proto
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(base + rows.to(tl.int64)[:, None] * (p_stride_units * P_ROW_ALIGN) + cols[None, :], mask=mask, other=0.0)
    logits = x.to(tl.float32) * scale
    sample_potential = tl.zeros([BLOCK_SAMPLES], tl.float32)
    prototype_potential = tl.zeros([BLOCK_PROTO], tl.float32)
    for _ in range(iterations):
        # Padding lanes are -inf before every log-sum-exp (they add nothing) and their own
        # potentials are 0 (never stored).
        y = tl.where(mask, logits - sample_potential[:, None], float("-inf"))
        top = tl.max(y, axis=0)
        shift = tl.where(top == float("-inf"), 0.0, top)
        total = tl.sum(tl.exp(y - shift[None, :]), axis=0)
        prototype_potential = tl.where(col_mask, shift + tl.log(tl.where(col_mask, total, 1.0)), 0.0)
        y = tl.where(mask, logits - prototype_potential[None, :], float("-inf"))
        top = tl.max(y, axis=1)
        shift = tl.where(top == float("-inf"), 0.0, top)
        total = tl.sum(tl.exp(y - shift[:, None]), axis=1)
        sample_potential = tl.where(row_mask, shift + tl.log(tl.where(row_mask, total, 1.0)), 0.0)
    tl.store(ws_ptr + a_offset + pid * n_proto + cols, prototype_potential, mask=col_mask)
    tl.store(ws_ptr + c_offset + pid * c_stride_problem + rows, sample_potential, mask=row_mask)


@triton.jit
def _swav_ce_kernel(
    c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15, c_view_stride, c_stride_units,
    ws_ptr,
    targets_offset,
    a_offset,
    c_offset,
    c_stride_problem,
    row_sums_offset,
    loss_offset,
    grad_ptr,
    temperature_ptr,
    temperature_grad_offset,
    n_high,
    n_rows,
    k_units,
    inv_temperature,
    inv_epsilon,
    inv_normalizer,
    C_VIEWS: tl.constexpr,
    C_UNIFORM: tl.constexpr,
    C_ROW_ALIGN: tl.constexpr,
    K_ALIGN: tl.constexpr,
    UNIT_ROW_SUMS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    TEMPERATURE_TENSOR: tl.constexpr,
    TEMPERATURE_GRAD: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_PROTO: tl.constexpr,
):
    """Crop v = program_id(1), rows of program_id(0):
    loss[v, pid] = −Σ_b Σ_k T[b, k] log p, grad[v] = (w p − T)·grad_scale, with
    T = targets − (the crop's own codes, recomputed from its scores, if v < n_high) and
    w = Σ_k T (H − [v < H] when UNIT_ROW_SUMS, else from the codes' row sums (H, B)),
    grad_scale = 1/(τ M). TEMPERATURE_TENSOR: τ is read from temperature_ptr (a learnable
    temperature, 0-d on the device) instead of inv_temperature; TEMPERATURE_GRAD: also
    ∂L/∂τ's partial −Σ (w p − T)·x/(τ M) at temperature_grad_offset + (v, pid). Potentials
    a (H, K), c (H, c_stride_problem) and grad (V, B, K) are contiguous."""
    pid = tl.program_id(0)
    v = tl.program_id(1)
    if TEMPERATURE_TENSOR:
        inv_temperature = 1.0 / tl.load(temperature_ptr).to(tl.float32)
    grad_scale = inv_temperature * inv_normalizer
    n_proto = k_units * K_ALIGN
    base = view_base(v, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15, c_view_stride, C_VIEWS, C_UNIFORM)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    row_ptr = base + rows64[:, None] * (c_stride_units * C_ROW_ALIGN)
    # Sweep 1: per-row max and Σ exp(x − max) of x = s/τ, online.
    run_max = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_ROWS], tl.float32)
    for k0 in range(0, n_proto, BLOCK_PROTO):
        cols = k0 + tl.arange(0, BLOCK_PROTO)
        mask = row_mask[:, None] & (cols < n_proto)[None, :]
        s = tl.load(row_ptr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, s * inv_temperature, float("-inf"))
        run_max, run_sum = online_lse_step(run_max, run_sum, x, 1)
    row_max = tl.where(row_mask, run_max, 0.0)
    log_sum = tl.where(row_mask, tl.log(tl.where(row_mask, run_sum, 1.0)), 0.0)
    is_high = v < n_high
    if UNIT_ROW_SUMS:
        weight = (n_high - is_high.to(tl.int32)).to(tl.float32) + tl.zeros([BLOCK_ROWS], tl.float32)
    else:
        weight = tl.zeros([BLOCK_ROWS], tl.float32)
        for h in range(n_high):
            weight += tl.load(ws_ptr + row_sums_offset + h * n_rows + rows, mask=row_mask, other=0.0)
        own_sum = tl.load(ws_ptr + row_sums_offset + tl.minimum(v, n_high - 1) * n_rows + rows, mask=row_mask, other=0.0)
        weight = tl.where(is_high, weight - own_sum, weight)
    # Used only when is_high; the index is clamped so that the load stays inside (H, ...).
    own_c = tl.load(ws_ptr + c_offset + tl.minimum(v, n_high - 1) * c_stride_problem + rows, mask=row_mask, other=0.0)
    # Sweep 2: loss terms and gradient.
    grad_row = grad_ptr + v.to(tl.int64) * n_rows * n_proto + rows64[:, None] * n_proto
    targets_row = ws_ptr + targets_offset + rows64[:, None] * n_proto
    acc = tl.zeros([BLOCK_ROWS, BLOCK_PROTO], tl.float32)
    temperature_acc = tl.zeros([BLOCK_ROWS, BLOCK_PROTO], tl.float32)
    for k0 in range(0, n_proto, BLOCK_PROTO):
        cols = k0 + tl.arange(0, BLOCK_PROTO)
        col_mask = cols < n_proto
        mask = row_mask[:, None] & col_mask[None, :]
        s = tl.load(row_ptr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # (x − max) − log Σ: no rounding at the magnitude of x. Padding lanes: log_p = 0 and
        # target = 0, so they add nothing and exp stays finite.
        x = s * inv_temperature
        log_p = tl.where(mask, (x - row_max[:, None]) - log_sum[:, None], 0.0)
        target = tl.load(targets_row + cols[None, :], mask=mask, other=0.0)
        if is_high:
            own_a = tl.load(ws_ptr + a_offset + v * n_proto + cols, mask=col_mask, other=0.0)
            own_log_q = tl.where(mask, s * inv_epsilon - own_a[None, :] - own_c[:, None], float("-inf"))
            target = target - tl.exp(own_log_q)
        acc += target * log_p
        if COMPUTE_GRAD or TEMPERATURE_GRAD:
            # M τ ∂L/∂s; padding lanes: w·exp(0) − 0 = w, zeroed by x = 0 in the τ partial.
            grad_x = weight[:, None] * tl.exp(log_p) - target
            if TEMPERATURE_GRAD:
                temperature_acc += grad_x * x
            if COMPUTE_GRAD:
                grad = grad_x * grad_scale
                tl.store(grad_row + cols[None, :], grad.to(grad_ptr.dtype.element_ty), mask=mask)
    out = v * tl.num_programs(0) + pid
    tl.store(ws_ptr + loss_offset + out, -tl.sum(tl.sum(acc, axis=1), axis=0))
    if TEMPERATURE_GRAD:
        # ∂L/∂τ = −1/τ Σ ∂L/∂x · x, with ∂L/∂x = grad_x/M.
        tl.store(ws_ptr + temperature_grad_offset + out, -tl.sum(tl.sum(temperature_acc, axis=1), axis=0) * grad_scale)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


class _Sweep(NamedTuple):
    """Launch plan of one log-sum-exp sweep over H problems."""

    block_keep: int
    block_reduce: int
    keep_blocks: int
    splits: int
    reduce_per_split: int


def _plan_sweep(reduce_rows: bool, n_rows: int, n_proto: int, n_problems: int, device: torch.device) -> _Sweep:
    if reduce_rows:
        n_keep, n_reduce = n_proto, n_rows
        block_keep, block_reduce = _tile(n_proto, n_rows)
    else:
        n_keep, n_reduce = n_rows, n_proto
        block_reduce, block_keep = _tile(n_proto, n_rows)
    keep_blocks = triton.cdiv(n_keep, block_keep)
    reduce_blocks = triton.cdiv(n_reduce, block_reduce)
    want = max(1, target_programs(device) // (keep_blocks * n_problems))
    splits = max(1, min(reduce_blocks, want, 65535))
    reduce_per_split = triton.cdiv(reduce_blocks, splits) * block_reduce
    splits = triton.cdiv(n_reduce, reduce_per_split)  # every split holds at least one element
    return _Sweep(block_keep, block_reduce, keep_blocks, splits, reduce_per_split)


class _Workspace(NamedTuple):
    """One float32 allocation for every intermediate, addressed by element offsets."""

    buffer: Tensor
    a: int  # (H, K) prototype potentials
    c: int  # (H, N) sample potentials
    part_max: int  # (H, splits, max(N, K)) partial maxima of a sweep
    part_sum: int  # (H, splits, max(N, K)) partial sums
    row_sums: int  # (H, B) the codes' row sums (no iterations only)
    targets: int  # (B, K) Σ_h codes (loss only)
    loss: int  # (V, row blocks) loss partials (loss only)
    temperature_grad: int  # (V, row blocks) partials of ∂L/∂τ (learnable temperature only)


def _workspace(
    n_problems, n_samples, n_proto, rows_out, splits, targets_size, loss_size, device, temperature_grad_size=0
) -> _Workspace:
    sizes = [
        n_problems * n_proto,
        n_problems * n_samples,
        n_problems * splits * max(n_samples, n_proto),
        n_problems * splits * max(n_samples, n_proto),
        n_problems * rows_out,
        targets_size,
        loss_size,
        temperature_grad_size,
    ]
    offsets = [0]
    for size in sizes[:-1]:
        # 16-byte aligned sections: vector loads stay possible.
        offsets.append(offsets[-1] + (size + 3) // 4 * 4)
    buffer = _new_buffer((offsets[-1] + sizes[-1],), dtype=torch.float32, device=device)
    return _Workspace(buffer, *offsets)


def _problem_args(problems: Views, n_proto: int) -> Tuple[list, dict]:
    return problems.args(), dict(**problems.constexprs("P_"), K_ALIGN=k_align(n_proto))


def _lse_sweep(
    problems: Views, ws: _Workspace, n_problems: int, reduce_rows: bool, potential_offset: Optional[int],
    out_offset: int, scale: float, n_rows: int, n_samples: int, n_proto: int,
) -> None:  # fmt: skip
    """One sweep of all problems: partials, then their merge into the potential at out_offset
    ((H, K) when reduce_rows, else (H, n_samples) of which the first n_rows are written)."""
    plan = _plan_sweep(reduce_rows, n_rows, n_proto, n_problems, ws.buffer.device)
    n_keep = n_proto if reduce_rows else n_rows
    has_potential = potential_offset is not None
    pointer_args, constexprs = _problem_args(problems, n_proto)
    _partial_lse_kernel[(plan.keep_blocks, plan.splits, n_problems)](
        *pointer_args, ws.buffer,
        potential_offset if has_potential else 0, ws.part_max, ws.part_sum,
        n_rows, n_proto // k_align(n_proto), plan.reduce_per_split,
        n_samples if reduce_rows else n_proto,  # potential stride: c (H, N) or a (H, K)
        plan.splits * n_keep, n_keep, scale,
        **constexprs, REDUCE_ROWS=reduce_rows, HAS_POTENTIAL=has_potential,
        BLOCK_KEEP=plan.block_keep, BLOCK_REDUCE=plan.block_reduce,
    )  # fmt: skip
    _merge_kernel[(triton.cdiv(n_keep, _MERGE_BLOCK), n_problems)](
        ws.buffer, ws.part_max, ws.part_sum, out_offset, n_keep, plan.splits,
        plan.splits * n_keep, n_keep, n_proto if reduce_rows else n_samples, BLOCK=_MERGE_BLOCK,
    )  # fmt: skip


def _max_splits(n_samples: int, n_proto: int, n_problems: int, device: torch.device) -> int:
    return max(
        _plan_sweep(True, n_samples, n_proto, n_problems, device).splits,
        _plan_sweep(False, n_samples, n_proto, n_problems, device).splits,
    )


def _resident(n_samples: int, n_proto: int, distributed_on: bool) -> bool:
    return not distributed_on and next_pow2(n_samples) * next_pow2(n_proto) <= _RESIDENT_ELEMENTS


def _sinkhorn_potentials(
    problems: Views, ws: _Workspace, n_problems: int, n_samples: int, n_proto: int, rows_out: int,
    iterations: int, epsilon: float, distributed_on: bool,
) -> None:  # fmt: skip
    """Potentials of the codes q[h, b, k] = exp(x_h[b, k]/ε − a[h, k] − c[h, b]) into the
    workspace: a (H, K), c (H, N) (the first ``rows_out`` final), and -- without iterations --
    the codes' row sums (H, rows_out)."""
    scale = 1.0 / epsilon
    if iterations == 0:
        # q = N_global·exp(L − LSE_{b,k} L): lightly's division by the global sum, times B.
        _lse_sweep(problems, ws, n_problems, False, None, ws.c, scale, n_samples, n_samples, n_proto)
        if distributed_on:
            _distributed_zero_iteration(ws, n_problems, n_samples, n_proto, rows_out)
            return
        _zero_iteration_kernel[(n_problems,)](
            ws.buffer, ws.a, ws.c, ws.row_sums, n_samples, rows_out, n_proto, n_samples, math.log(n_samples),
            BLOCK=_MERGE_BLOCK,
        )  # fmt: skip
        return
    if _resident(n_samples, n_proto, distributed_on):
        pointer_args, constexprs = _problem_args(problems, n_proto)
        _sinkhorn_resident_kernel[(n_problems,)](
            *pointer_args, ws.buffer, ws.a, ws.c, n_samples, n_samples, n_proto // k_align(n_proto), scale,
            iterations, **constexprs, BLOCK_SAMPLES=next_pow2(n_samples), BLOCK_PROTO=next_pow2(n_proto),
            num_warps=8,
        )  # fmt: skip
        return
    for it in range(iterations):
        # c = 0 before the first sweep: the global normalization cancels.
        _lse_sweep(problems, ws, n_problems, True, ws.c if it > 0 else None, ws.a, scale, n_samples, n_samples, n_proto)
        if distributed_on:
            a = ws.buffer[ws.a : ws.a + n_problems * n_proto]
            a.copy_(all_reduce_logsumexp(a))
        # The last column normalization is needed for the codes' rows only.
        rows = n_samples if it + 1 < iterations else rows_out
        _lse_sweep(problems, ws, n_problems, False, ws.a, ws.c, scale, rows, n_samples, n_proto)


def _distributed_zero_iteration(ws: _Workspace, n_problems: int, n_samples: int, n_proto: int, rows_out: int) -> None:
    """Without iterations, across ranks: the global sum is a log-sum-exp over every rank's rows,
    and N the global row count (ranks may hold different numbers), summed on the device."""
    buffer = ws.buffer
    row_lse = buffer[ws.c : ws.c + n_problems * n_samples].view(n_problems, n_samples)
    log_total = all_reduce_logsumexp(torch.logsumexp(row_lse, dim=1, keepdim=True))
    n_global = distributed.all_reduce_sum_(torch.full((), n_samples, dtype=torch.float32, device=buffer.device))
    potential = log_total - torch.log(n_global)
    buffer[ws.row_sums : ws.row_sums + n_problems * rows_out].view(n_problems, rows_out).copy_(
        torch.exp(row_lse[:, :rows_out] - potential)
    )
    row_lse.copy_(potential.expand(n_problems, n_samples))
    buffer[ws.a : ws.a + n_problems * n_proto].zero_()


def _sum_of_codes(problems: Views, ws: _Workspace, n_problems: int, n_samples: int, n_proto: int, rows_out: int,
                  epsilon: float, out: Tensor, out_offset: int) -> None:  # fmt: skip
    """Σ_h q[h] over the first ``rows_out`` samples into out[out_offset:] ((rows_out, K) float32)."""
    block_proto, block_rows = _tile(n_proto, rows_out)
    pointer_args, constexprs = _problem_args(problems, n_proto)
    grid = (triton.cdiv(rows_out, block_rows), triton.cdiv(n_proto, block_proto))
    _codes_kernel[grid](
        *pointer_args, ws.buffer, ws.a, ws.c, n_samples, out, out_offset, n_problems, rows_out,
        n_proto // k_align(n_proto), 1.0 / epsilon, **constexprs, BLOCK_ROWS=block_rows, BLOCK_PROTO=block_proto,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Operators
# --------------------------------------------------------------------------------------------


def _sinkhorn_forward(scores: Tensor, iterations: int, epsilon: float, gather_distributed: bool) -> Tensor:
    problems = prepare_views([scores], scores.dtype)
    n_samples, n_proto = scores.shape
    device = scores.device
    distributed_on = gather_distributed and distributed.is_distributed()
    splits = 0 if iterations > 0 and _resident(n_samples, n_proto, distributed_on) else _max_splits(
        n_samples, n_proto, 1, device
    )
    ws = _workspace(1, n_samples, n_proto, n_samples, splits, 0, 0, device)
    _sinkhorn_potentials(problems, ws, 1, n_samples, n_proto, n_samples, iterations, epsilon, distributed_on)
    codes = _new_buffer((n_samples, n_proto), dtype=torch.float32, device=device)
    _sum_of_codes(problems, ws, 1, n_samples, n_proto, n_samples, epsilon, codes, 0)
    return codes


_sinkhorn_op = torch.library.custom_op(
    "fastssl::sinkhorn",
    _sinkhorn_forward,
    mutates_args=(),
    schema="(Tensor scores, int iterations, float epsilon, bool gather_distributed) -> Tensor",
)


@_sinkhorn_op.register_fake
def _(scores, iterations, epsilon, gather_distributed):
    return scores.new_empty(scores.shape, dtype=torch.float32)


def sinkhorn_triton(scores: Tensor, iterations: int, epsilon: float, gather_distributed: bool = False) -> Tensor:
    """Sinkhorn-Knopp codes (see :func:`fastssl.swav.sinkhorn`), log domain, float32 throughout.

    Args:
        scores: (B, K), any strides and float dtype; CUDA, or CPU under ``TRITON_INTERPRET=1``.
    Returns:
        (B, K) float32 codes (no gradient).
    """
    return _sinkhorn_op(scores.detach(), int(iterations), float(epsilon), bool(gather_distributed))


def _swav_forward(
    crops: List[Tensor],
    queue: Optional[List[Tensor]],
    n_high: int,
    temperature: float,
    temperature_tensor: Optional[Tensor],
    iterations: int,
    epsilon: float,
    gather_distributed: bool,
    compute_grad: bool,
    compute_temperature_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The rank-local loss (0-d float32); with ``compute_grad``, the (V, B, K) gradient of the
    loss with respect to the crops (in their common dtype; empty otherwise); with
    ``compute_temperature_grad``, ∂L/∂τ (0-d float32; empty otherwise). τ is
    ``temperature_tensor`` (a 0-d tensor read on the device) when given, else ``temperature``."""
    dtype = common_dtype(crops)
    crop_views = prepare_views(crops, dtype)
    n_crops = len(crops)
    batch, n_proto = crops[0].shape
    device = crops[0].device
    distributed_on = gather_distributed and distributed.is_distributed()
    if queue is None:
        # The high-resolution crops themselves are the Sinkhorn problems: the first H views.
        problems, n_samples = crop_views, batch
    else:
        # (Inside the custom op, below autograd: nothing to detach; no cast op for a same dtype.)
        scores = [torch.cat([h, q if q.dtype == dtype else q.to(dtype)]) for h, q in zip(crop_views.tensors[:n_high], queue)]
        problems, n_samples = prepare_views(scores, dtype), scores[0].shape[0]
    resident = iterations > 0 and _resident(n_samples, n_proto, distributed_on)
    splits = 0 if resident else _max_splits(n_samples, n_proto, n_high, device)
    block_proto, block_rows = _tile(n_proto, batch)
    row_blocks = triton.cdiv(batch, block_rows)
    with_temperature_grad = compute_temperature_grad and temperature_tensor is not None
    ws = _workspace(
        n_high, n_samples, n_proto, batch, splits, batch * n_proto, n_crops * row_blocks, device,
        n_crops * row_blocks if with_temperature_grad else 0,
    )  # fmt: skip
    _sinkhorn_potentials(problems, ws, n_high, n_samples, n_proto, batch, iterations, epsilon, distributed_on)
    _sum_of_codes(problems, ws, n_high, n_samples, n_proto, batch, epsilon, ws.buffer, ws.targets)

    shape = (n_crops, batch, n_proto) if compute_grad else (0,)
    grads = _new_buffer(shape, dtype=dtype, device=device)
    normalizer = n_high * (n_crops - 1) * batch
    _swav_ce_kernel[(row_blocks, n_crops)](
        *crop_views.args(), ws.buffer, ws.targets, ws.a, ws.c, n_samples, ws.row_sums, ws.loss, grads,
        ws.buffer if temperature_tensor is None else temperature_tensor, ws.temperature_grad,
        n_high, batch, n_proto // k_align(n_proto), 1.0 / temperature, 1.0 / epsilon, 1.0 / normalizer,
        **crop_views.constexprs("C_"), K_ALIGN=k_align(n_proto), UNIT_ROW_SUMS=iterations > 0, COMPUTE_GRAD=compute_grad,
        TEMPERATURE_TENSOR=temperature_tensor is not None, TEMPERATURE_GRAD=with_temperature_grad,
        BLOCK_ROWS=block_rows, BLOCK_PROTO=block_proto,
    )  # fmt: skip
    loss = _new_buffer((), dtype=torch.float32, device=device)
    sum_to_scalar_kernel[(1,)](ws.buffer, ws.loss, n_crops * row_blocks, loss, 1.0 / normalizer, BLOCK=1024)
    temperature_grad = _new_buffer(() if with_temperature_grad else (0,), dtype=torch.float32, device=device)
    if with_temperature_grad:
        sum_to_scalar_kernel[(1,)](ws.buffer, ws.temperature_grad, n_crops * row_blocks, temperature_grad, 1.0, BLOCK=1024)
    return loss, grads, temperature_grad


_swav_op = torch.library.custom_op(
    "fastssl::swav",
    _swav_forward,
    mutates_args=(),
    schema="(Tensor[] crops, Tensor[]? queue, int n_high, float temperature, Tensor? temperature_tensor, "
    "int iterations, float epsilon, bool gather_distributed, bool compute_grad, bool compute_temperature_grad) "
    "-> (Tensor, Tensor, Tensor)",
)


@_swav_op.register_fake
def _(crops, queue, n_high, temperature, temperature_tensor, iterations, epsilon, gather_distributed, compute_grad,
      compute_temperature_grad):  # fmt: skip
    dtype = common_dtype(crops)
    shape = (len(crops), *crops[0].shape) if compute_grad else (0,)
    with_temperature_grad = compute_temperature_grad and temperature_tensor is not None
    return (
        crops[0].new_empty((), dtype=torch.float32),
        crops[0].new_empty(shape, dtype=dtype),
        crops[0].new_empty(() if with_temperature_grad else (0,), dtype=torch.float32),
    )


def _swav_setup(ctx, inputs, output) -> None:
    # The saved gradient outputs get no incoming gradient: no (V, B, K) zeros materialized.
    ctx.set_materialize_grads(False)
    crops, temperature_tensor = inputs[0], inputs[4]
    ctx.input_dtypes = [c.dtype for c in crops]
    ctx.n_queue = None if inputs[1] is None else len(inputs[1])
    ctx.temperature_meta = None if temperature_tensor is None else (temperature_tensor.shape, temperature_tensor.dtype)
    ctx.save_for_backward(output[1], output[2])


def _swav_gradient(ctx, grad_loss, _grad_grads, _grad_temperature_grad):
    saved, temperature_grad = ctx.saved_tensors
    if saved.numel() == 0:
        crop_grads = [None] * len(ctx.input_dtypes)
    else:
        scaled = scale_gradient(saved, grad_loss).unbind(0)
        crop_grads = [g if g.dtype == dtype else g.to(dtype) for g, dtype in zip(scaled, ctx.input_dtypes)]
    queue_grads = None if ctx.n_queue is None else [None] * ctx.n_queue
    grad_temperature = None
    if ctx.temperature_meta is not None and temperature_grad.numel() > 0:
        shape, dtype = ctx.temperature_meta
        grad_temperature = (temperature_grad * grad_loss).to(dtype).reshape(shape)
    return crop_grads, queue_grads, None, None, grad_temperature, None, None, None, None, None


_swav_op.register_autograd(_swav_gradient, setup_context=_swav_setup)


def swav_loss_triton(
    high: Sequence[Tensor],
    low: Sequence[Tensor],
    queue: Optional[Sequence[Tensor]],
    temperature: Union[float, Tensor],
    iterations: int,
    epsilon: float,
    gather_distributed: bool = False,
) -> Tensor:
    """SwAV's swapped-prediction loss (see :func:`fastssl.swav.swav_loss`) on the kernels.

    Args:
        high: H tensors (B, K); low: tensors (B, K); queue: None or H tensors (Q, K);
        temperature: a number, or a one-element tensor read by the kernel on the device (a
            learnable temperature gets ∂L/∂τ).
    Returns:
        0-d float32 loss: the mean over this rank's samples, reported as the row-weighted mean
        over ranks when ``gather_distributed`` (ranks may hold different batches).

    Example::

        loss = swav_loss_triton([h0, h1], [l0, l1], None, 0.1, 3, 0.05)
        loss.backward()
    """
    crops = list(high) + list(low)
    compute_grad = torch.is_grad_enabled() and any(c.requires_grad for c in crops)
    queue_list = None if queue is None else [q.detach() for q in queue]
    temperature_tensor = None
    if isinstance(temperature, Tensor):
        # A CPU scalar beside CUDA crops is copied to their device (the kernel reads it there).
        temperature_tensor = temperature.reshape(()).to(crops[0].device)
        compute_temperature_grad = torch.is_grad_enabled() and temperature.requires_grad
        temperature = 1.0  # unused: the kernel reads the tensor
    else:
        compute_temperature_grad = False
    loss, _, _ = _swav_op(
        crops, queue_list, len(high), float(temperature), temperature_tensor, int(iterations), float(epsilon),
        bool(gather_distributed), compute_grad, compute_temperature_grad,
    )  # fmt: skip
    if gather_distributed:
        return distributed.global_mean(loss, crops[0].shape[0])
    return loss
