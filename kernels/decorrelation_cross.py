r"""Barlow Twins / VICReg, cross path (N >= d): the d×d matrix in tiles, reduced over the batch.

Kernels (V_v the standardized operands of :mod:`fastssl.kernels.decorrelation_stats`):

* :func:`_cross_partial_kernel`, grid (T, S): tile t = (i, j) of C = ÂᵀB̂ (Barlow Twins, all
  tiles) or of Y_aᵀY_a and Y_bᵀY_b (VICReg, j >= i: symmetric), summed over the batch rows of
  range s (split-K over N: at d = 256 there are 16 Barlow Twins tiles, 10 VICReg ones, so the
  N-long reductions are split until T·S fills two programs per SM). S = 1 finishes in place,
  else :func:`_cross_finish_kernel` sums the S partial tiles.
* finishing a tile: the loss share (Barlow Twins: Σ(1 − C_ii)² on, λ·Σ C_ij² off the diagonal;
  VICReg: Σ_{i≠j} (YᵀY)²_ij per view, doubled for the mirrored tile) and, when a gradient is
  needed, the matrix the backward multiplies by, written once in the input dtype (d×d <= N×d
  on this path): Barlow Twins Γ = ∂L/∂C (2(C_ii − 1) on, 2λC_ij off the diagonal) with the
  batch-norm sums Σ_j C_ij Γ_ij (per row of C, one partial per column block) and Σ_i C_ij Γ_ij;
  VICReg K_y without its diagonal, mirrored. The backward no longer recomputes the d×d tiles.
* :func:`_cross_backward_kernel`, grid (2 · N/BLOCK_M, d/BLOCK_N): per view an (N, d) tile of
  B̃Γᵀ, ÃΓ (Barlow Twins) or Ỹ_v K_off,v (VICReg) over k in d, and the gradient formula.

Cost (half inputs): forward 3·2Nd² (Barlow Twins) or 3·2·Nd² (VICReg, two symmetric halves),
backward 2·2Nd²; bytes: the operands from L2, the d×d matrix written and read once (d²·e).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .decorrelation_stats import COL_MEAN_A, COL_SCALE_A, COL_X
from .decorrelation_tiles import round_operand, tile_product, upper_triangle_tile


@triton.jit
def _cross_tile_finish(
    acc_a,
    acc_b,
    slot,
    i,
    j,
    chunk,
    n_chunks,
    ws_ptr,
    ops_ptr,
    tile_offset,
    sums_offset,
    mat_base,
    n_rows,
    n_cols,
    lambda_param,
    VICREG: tl.constexpr,
    KEEP: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    """Rows [chunk·ROWS, +ROWS) of the complete tile (i, j): loss share into slot ``slot`` and,
    with KEEP, the backward's matrix and batch-norm sums of those rows."""
    DTYPE = ops_ptr.dtype.element_ty
    cols_i = i * BLOCK + chunk * ROWS + tl.arange(0, ROWS)
    cols_j = j * BLOCK + tl.arange(0, BLOCK)
    valid_i = cols_i < n_cols
    valid_j = cols_j < n_cols
    valid = valid_i[:, None] & valid_j[None, :]
    on_diagonal = cols_i[:, None] == cols_j[None, :]
    offsets = cols_i[:, None].to(tl.int64) * n_cols + cols_j[None, :]
    if VICREG:
        off = valid & (cols_i[:, None] != cols_j[None, :])
        k_a = tl.where(off, acc_a, 0.0)
        k_b = tl.where(off, acc_b, 0.0)
        weight = tl.where(i == j, 1.0, 2.0)
        tl.store(ws_ptr + tile_offset + 2 * slot, tl.sum(tl.sum(k_a * k_a, axis=1), axis=0) * weight)
        tl.store(ws_ptr + tile_offset + 2 * slot + 1, tl.sum(tl.sum(k_b * k_b, axis=1), axis=0) * weight)
        if KEEP:
            plane = tl.cast(n_cols, tl.int64) * n_cols
            mirrored = cols_j[None, :].to(tl.int64) * n_cols + cols_i[:, None]
            k_a = round_operand(k_a / (n_rows - 1), DTYPE, EMULATE_BF16)
            k_b = round_operand(k_b / (n_rows - 1), DTYPE, EMULATE_BF16)
            tl.store(ops_ptr + mat_base + offsets, k_a, mask=valid)
            tl.store(ops_ptr + mat_base + plane + offsets, k_b, mask=valid)
            if i != j:
                tl.store(ops_ptr + mat_base + mirrored, k_a, mask=valid)
                tl.store(ops_ptr + mat_base + plane + mirrored, k_b, mask=valid)
    else:
        c = acc_a / n_rows
        one_minus = 1.0 - c
        terms = tl.where(on_diagonal, one_minus * one_minus, lambda_param * c * c)
        tl.store(ws_ptr + tile_offset + 2 * slot, tl.sum(tl.sum(tl.where(valid, terms, 0.0), axis=1), axis=0))
        tl.store(ws_ptr + tile_offset + 2 * slot + 1, 0.0)
        if KEEP:
            grad = tl.where(valid, tl.where(on_diagonal, 2.0 * (c - 1.0), 2.0 * lambda_param * c), 0.0)
            tl.store(ops_ptr + mat_base + offsets, round_operand(grad, DTYPE, EMULATE_BF16), mask=valid)
            c_times_grad = c * grad
            # batch-norm sums: per row i of C over this column block j (rows (n_blocks, d)), per
            # column j over this chunk of rows of block i (rows (n_blocks·n_chunks, d) after those)
            tl.store(ws_ptr + sums_offset + j.to(tl.int64) * n_cols + cols_i, tl.sum(c_times_grad, axis=1),
                     mask=valid_i)
            n_blocks = tl.cdiv(n_cols, BLOCK)
            tl.store(ws_ptr + sums_offset + (n_blocks + i * n_chunks + chunk).to(tl.int64) * n_cols + cols_j,
                     tl.sum(c_times_grad, axis=0), mask=valid_j)


@triton.jit
def _cross_partial_kernel(
    ops_ptr,
    ws_ptr,
    n_rows,
    n_cols,
    n_col_blocks,
    k_chunk,
    split_offset,
    tile_offset,
    sums_offset,
    mat_base,
    lambda_param,
    VICREG: tl.constexpr,
    SPLIT: tl.constexpr,
    FINISH: tl.constexpr,
    KEEP: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    """Tile t = (i, j) over batch rows [s·k_chunk, (s+1)·k_chunk): finished in place (FINISH),
    else written to the partial buffer [s, t, view]."""
    t = tl.program_id(0)
    s = tl.program_id(1)
    i, j = upper_triangle_tile(t, n_col_blocks, VICREG)
    cols_i = i * BLOCK + tl.arange(0, BLOCK)
    cols_j = j * BLOCK + tl.arange(0, BLOCK)
    valid_i = cols_i < n_cols
    valid_j = cols_j < n_cols
    k_start = s * k_chunk
    k_end = tl.minimum(k_start + k_chunk, n_rows)
    plane = tl.cast(n_rows, tl.int64) * n_cols
    view_a = ops_ptr
    view_b = ops_ptr + plane
    if VICREG:
        right_view = view_a
    else:
        right_view = view_b
    # columns i of the left view against columns j of the right one, reduced over the rows
    # (stride n_cols): Barlow Twins Âᵀ B̂; VICReg Y_aᵀ Y_a and Y_bᵀ Y_b
    acc_a = tile_product(
        tl.zeros([BLOCK, BLOCK], dtype=tl.float32), view_a, view_a + 2 * plane, cols_i, valid_i, 1, n_cols,
        right_view, right_view + 2 * plane, cols_j, valid_j, 1, n_cols,
        k_start, k_end, SPLIT, SPLIT, BLOCK_K, DOT_PRECISION, EMULATE_BF16,
    )  # fmt: skip
    if VICREG:
        acc_b = tile_product(
            tl.zeros([BLOCK, BLOCK], dtype=tl.float32), view_b, view_b + 2 * plane, cols_i, valid_i, 1, n_cols,
            view_b, view_b + 2 * plane, cols_j, valid_j, 1, n_cols, k_start, k_end,
            SPLIT, SPLIT, BLOCK_K, DOT_PRECISION, EMULATE_BF16,
        )  # fmt: skip
    else:
        acc_b = acc_a
    if FINISH:
        _cross_tile_finish(acc_a, acc_b, t, i, j, 0, 1, ws_ptr, ops_ptr, tile_offset, sums_offset, mat_base, n_rows,
                           n_cols, lambda_param, VICREG, KEEP, BLOCK, BLOCK, EMULATE_BF16)
    else:
        n_tiles = tl.num_programs(0)
        square = BLOCK * BLOCK
        inner = tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
        out = ws_ptr + split_offset + (tl.cast(s, tl.int64) * n_tiles + t) * 2 * square
        tl.store(out + inner, acc_a)
        if VICREG:
            tl.store(out + square + inner, acc_b)


@triton.jit
def _cross_finish_kernel(
    ops_ptr,
    ws_ptr,
    n_rows,
    n_cols,
    n_col_blocks,
    n_splits,
    split_offset,
    tile_offset,
    sums_offset,
    mat_base,
    lambda_param,
    VICREG: tl.constexpr,
    KEEP: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    """Grid (T, BLOCK/ROWS): rows [c·ROWS, +ROWS) of tile t, the sum of its S partial tiles in a
    fixed order (deterministic), then finished (chunks of rows: see :func:`_gram_finish_kernel`)."""
    t = tl.program_id(0)
    chunk = tl.program_id(1)
    n_chunks = tl.num_programs(1)
    n_tiles = tl.num_programs(0)
    i, j = upper_triangle_tile(t, n_col_blocks, VICREG)
    square = BLOCK * BLOCK
    inner = (chunk * ROWS + tl.arange(0, ROWS))[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    acc_a = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    acc_b = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for s in range(0, n_splits):
        partial = ws_ptr + split_offset + (tl.cast(s, tl.int64) * n_tiles + t) * 2 * square
        acc_a += tl.load(partial + inner)
        if VICREG:
            acc_b += tl.load(partial + square + inner)
    _cross_tile_finish(acc_a, acc_b, t * n_chunks + chunk, i, j, chunk, n_chunks, ws_ptr, ops_ptr, tile_offset,
                       sums_offset, mat_base, n_rows, n_cols, lambda_param, VICREG, KEEP, BLOCK, ROWS, EMULATE_BF16)


@triton.jit
def _cross_backward_view(
    own_ptr,
    own_stride_n,
    own_stride_d,
    partner_ptr,
    partner_stride_n,
    partner_stride_d,
    out_ptr,
    ws_ptr,
    ops_ptr,
    go_ptr,
    n_rows,
    n_cols,
    n_sum_rows,
    sums_offset,
    mat_base,
    c1,
    c2,
    VICREG: tl.constexpr,
    VIEW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    """Barlow Twins: δ_a = B̃Γᵀ/N, δ_b = ÃΓ/N, ∂L/∂z = r·(δ − V̂·w) with w = the batch-norm sums
    over their column blocks / N. VICReg: c1·(z − z_partner) + hinge·X + c2·s³·Ỹ K_y,off
    (c1 = 2λ/(Nd), c2 = 4ν/(d(N−1)))."""
    DTYPE = out_ptr.dtype.element_ty
    rows = tl.program_id(0) // 2 * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    valid_rows = rows < n_rows
    col_mask = cols < n_cols
    plane = tl.cast(n_rows, tl.int64) * n_cols
    if VICREG:
        left_ptr = ops_ptr + VIEW * plane
        mat_ptr = ops_ptr + mat_base + VIEW * tl.cast(n_cols, tl.int64) * n_cols
        mat_stride_n = 1
        mat_stride_k = n_cols
    else:
        left_ptr = ops_ptr + (1 - VIEW) * plane
        mat_ptr = ops_ptr + mat_base
        # view a multiplies by Γᵀ (right[k, n] = Γ[n, k]), view b by Γ
        if VIEW == 0:
            mat_stride_n = n_cols
            mat_stride_k = 1
        else:
            mat_stride_n = 1
            mat_stride_k = n_cols
    acc = tile_product(
        tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), left_ptr, left_ptr, rows, valid_rows, n_cols, 1,
        mat_ptr, mat_ptr, cols, col_mask, mat_stride_n, mat_stride_k, 0, n_cols,
        False, False, BLOCK_K, DOT_PRECISION, EMULATE_BF16,
    )  # fmt: skip
    mask = valid_rows[:, None] & col_mask[None, :]
    rows64 = rows[:, None].to(tl.int64)
    cols64 = cols[None, :].to(tl.int64)
    z = tl.load(own_ptr + rows64 * own_stride_n + cols64 * own_stride_d, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(ws_ptr + (COL_MEAN_A + VIEW) * n_cols + cols, mask=col_mask, other=0.0)[None, :]
    scale = tl.load(ws_ptr + (COL_SCALE_A + VIEW) * n_cols + cols, mask=col_mask, other=1.0)[None, :]
    go = tl.load(go_ptr)
    if VICREG:
        z_partner = tl.load(partner_ptr + rows64 * partner_stride_n + cols64 * partner_stride_d, mask=mask,
                            other=0.0).to(tl.float32)
        hinge = tl.load(ws_ptr + (COL_X + VIEW) * n_cols + cols, mask=col_mask, other=0.0)[None, :]
        s = 1.0 / scale
        grad = go * (c1 * (z - z_partner) + hinge * tl.where(mask, z - mean, 0.0) + c2 * (acc * s * s * s))
    else:
        w = tl.zeros([BLOCK_N], dtype=tl.float32)
        # view a: the (n_blocks, d) per-row sums; view b: the (n_blocks·chunks, d) per-column ones
        sums = ws_ptr + sums_offset + cols
        for block in range(0, n_sum_rows):
            w += tl.load(sums + block * tl.cast(n_cols, tl.int64), mask=col_mask, other=0.0)
        hat = tl.where(mask, (z - mean) * scale, 0.0)
        grad = go * scale * (acc / n_rows - hat * (w / n_rows)[None, :])
    tl.store(out_ptr + rows64 * n_cols + cols64, round_operand(grad, DTYPE, EMULATE_BF16), mask=mask)


@triton.jit
def _cross_backward_kernel(
    a_ptr,
    a_stride_n,
    a_stride_d,
    b_ptr,
    b_stride_n,
    b_stride_d,
    ws_ptr,
    ops_ptr,
    go_ptr,
    out_a_ptr,
    out_b_ptr,
    n_rows,
    n_cols,
    n_sum_rows_a,
    n_sum_rows_b,
    sums_offset,
    mat_base,
    c1,
    c2,
    VICREG: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    """Grid (2 · row blocks, column blocks): program_id(0) = 2·row block + view."""
    if tl.program_id(0) % 2 == 0:
        _cross_backward_view(
            a_ptr, a_stride_n, a_stride_d, b_ptr, b_stride_n, b_stride_d, out_a_ptr, ws_ptr, ops_ptr, go_ptr,
            n_rows, n_cols, n_sum_rows_a, sums_offset, mat_base, c1, c2, VICREG, 0, BLOCK_M, BLOCK_N, BLOCK_K,
            DOT_PRECISION, EMULATE_BF16,
        )  # fmt: skip
    else:
        _cross_backward_view(
            b_ptr, b_stride_n, b_stride_d, a_ptr, a_stride_n, a_stride_d, out_b_ptr, ws_ptr, ops_ptr, go_ptr,
            n_rows, n_cols, n_sum_rows_b, sums_offset + n_sum_rows_a * tl.cast(n_cols, tl.int64), mat_base, c1, c2,
            VICREG, 1, BLOCK_M, BLOCK_N, BLOCK_K,
            DOT_PRECISION, EMULATE_BF16,
        )  # fmt: skip
