r"""Barlow Twins / VICReg, Gram path (N < d): the loss through the N×N Grams, never a d×d buffer.

Both losses need the d×d matrix (Barlow Twins C = ÂᵀB̂/N, VICReg K_v = X_vᵀX_v/(N−1)) only
through its diagonal (column sums, :mod:`fastssl.kernels.decorrelation_stats`) and its squared
Frobenius norm, ‖AᵀB‖²_F = ⟨AAᵀ, BBᵀ⟩_F: the Grams G_v = V_vV_vᵀ (N×N, symmetric) carry it.

Kernels (V_v the standardized operands the statistics kernel wrote, hi + lo for half inputs):

* :func:`_gram_partial_kernel`, grid (T, S): tile t = (p, q), q >= p, of G_a and G_b (the same
  :func:`~fastssl.kernels.decorrelation_tiles.tile_product` for both views) over the feature
  range s of S (split-K). The N×N Grams have few tiles (N = 256: T = 10 tiles of 64×64), and
  each program used to run the whole d = 8192 reduction: 10 programs on 132 SMs, ~1-2 % of the
  floor. With S chosen so that T·S fills two programs per SM (N = 256, d = 8192: S = 26 ranges
  of 320 features, 260 programs, 1.97 waves), the fp32 partial tiles (S·T·2·64²·4 bytes =
  8.5 MB, L2-resident) are summed by :func:`_gram_finish_kernel` (grid T × 8 row chunks = 80
  programs, ~2 µs). With S = 1 (N = 2048: T = 528 tiles, 4 waves) the partial kernel finishes
  its tile itself -- unless N is not a multiple of 16 and a backward follows: the in-place
  epilogue then stores the Grams element by element with both accumulators live and spills,
  and the finishing kernel does it in row chunks (see the launch plans in
  :mod:`fastssl.kernels.decorrelation`). Predicted effect at N = 256: the Gram forward from
  ~250 µs (10 SMs, each standardizing and splitting every operand tile on load) to ~6-8 µs.
* finishing a tile: its share of ⟨G_a, G_b⟩ (Barlow Twins) or ‖G_a‖², ‖G_b‖² (VICReg), doubled
  off the diagonal for the mirrored tile, and, when a gradient is needed, the Grams/d without
  their diagonal as operands of the backward (input dtype; hi + lo for half inputs when 2N > d)
  plus that diagonal (N,) in float32.
* :func:`_gram_backward_kernel`: per view and column block, the (N, d) product G·Ṽ and the whole
  gradient formula in its epilogue. Barlow Twins' batch-norm backward needs the column sums
  w_j = Σ_b δ_bj Â_bj of the pre-batch-norm gradient δ before any element is final; the kernel
  used to run the product twice (once for w, once for the gradient, 8N²d flops). Now one
  program owns a column block over all N rows and runs the product once: for N <= 256 the
  whole column of δ stays in registers (BLOCK_M = N); above, δ goes to a float32 scratch that
  the same program reads back (2·N·d·4 bytes written and read: at N = 2048, d = 8192 134 MB
  each way, 62 µs at 4.3 TB/s against the 174 µs the second product took at full tensor-core
  rate). VICReg's centering backward vanishes (1ᵀX = 0): one pass, one row block per program.

Why the Grams' diagonal is applied apart (in float32, to the unrounded view): for N ≪ d,
G ≈ (d/N)·tr-scaled identity, so G·V is nearly parallel to V and the batch-norm projection
(Barlow Twins) or the diagonal subtraction (VICReg) removes most of it; a G_pp applied to a
rounded Ṽ_pj would leave its rounding error as the gradient. Both losses need the products
without their d×d-diagonal part: with G = P Pᵀ (P the partner view: B̂ for a in Barlow Twins,
Y_a itself in VICReg) that part is P_pj·Σ_k P_kj Ṽ_kj; the statistics kernel sums it from the
very operands (``COL_CORR_*``), so the subtraction cancels what the products hold.

Cost, half inputs (P = 2 operand parts), 2 flops per multiply-add:

* forward: 2 views × N²d (upper triangle) × 3 (hi·hi + lo·hi + hi·lo) = 6N²d;
* backward: 2 views × 2N²d, ×2 when 2N > d (the Gram's lo part) = 4N²d;
* bytes: operand tiles from L2 (each row panel read N/64 times), the inputs once more in the
  backward epilogue (2Nd·e), the gradients written (2Nd·e), the Grams 2·P·N²·e.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .decorrelation_stats import COL_CORR_A, COL_MEAN_A, COL_SCALE_A, COL_X
from .decorrelation_tiles import round_operand, tile_product, upper_triangle_tile


@triton.jit
def _store_gram_operand(gram, ptr, rows_p, rows_q, mask, mirror, n_rows, SPLIT_GRAM: tl.constexpr,
                        EMULATE_BF16: tl.constexpr):
    """(p, q) tile of a symmetric Gram (diagonal already removed, scaled) as the backward's
    operand: hi at ``ptr``, lo two planes further (part 1 of the (part, view, N, N) layout)."""
    DTYPE = ptr.dtype.element_ty
    plane = tl.cast(n_rows, tl.int64) * n_rows
    offsets = rows_p[:, None].to(tl.int64) * n_rows + rows_q[None, :]
    mirrored = rows_q[None, :].to(tl.int64) * n_rows + rows_p[:, None]
    hi = round_operand(gram, DTYPE, EMULATE_BF16)
    tl.store(ptr + offsets, hi, mask=mask)
    if mirror:
        tl.store(ptr + mirrored, hi, mask=mask)
    if SPLIT_GRAM:
        lo = round_operand(gram - hi.to(tl.float32), DTYPE, EMULATE_BF16)
        tl.store(ptr + 2 * plane + offsets, lo, mask=mask)
        if mirror:
            tl.store(ptr + 2 * plane + mirrored, lo, mask=mask)


@triton.jit
def _gram_tile_finish(
    acc_a,
    acc_b,
    slot,
    p,
    q,
    row0,
    ws_ptr,
    ops_ptr,
    tile_offset,
    gdiag_offset,
    gram_base,
    n_rows,
    inv_d,
    VICREG: tl.constexpr,
    KEEP: tl.constexpr,
    SPLIT_GRAM: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    """Loss share of rows [row0, row0 + ROWS) of the complete tile (p, q) of G_a, G_b (partial
    sums slot ``slot``), and with KEEP the backward's operands of those rows."""
    weight = tl.where(p == q, 1.0, 2.0)
    if VICREG:
        part_a = tl.sum(tl.sum(acc_a * acc_a, axis=1), axis=0) * weight
        part_b = tl.sum(tl.sum(acc_b * acc_b, axis=1), axis=0) * weight
    else:
        part_a = tl.sum(tl.sum(acc_a * acc_b, axis=1), axis=0) * weight
        part_b = part_a * 0.0
    tl.store(ws_ptr + tile_offset + 2 * slot, part_a)
    tl.store(ws_ptr + tile_offset + 2 * slot + 1, part_b)
    if KEEP:
        rows_p = p * BLOCK + row0 + tl.arange(0, ROWS)
        rows_q = q * BLOCK + tl.arange(0, BLOCK)
        valid_p = rows_p < n_rows
        mask = valid_p[:, None] & (rows_q < n_rows)[None, :]
        on_diagonal = rows_p[:, None] == rows_q[None, :]
        if p == q:
            diag_a = tl.sum(tl.where(on_diagonal, acc_a, 0.0), axis=1)
            diag_b = tl.sum(tl.where(on_diagonal, acc_b, 0.0), axis=1)
            tl.store(ws_ptr + gdiag_offset + rows_p, diag_a * inv_d, mask=valid_p)
            tl.store(ws_ptr + gdiag_offset + n_rows + rows_p, diag_b * inv_d, mask=valid_p)
        plane = tl.cast(n_rows, tl.int64) * n_rows
        mirror = p != q
        _store_gram_operand(tl.where(on_diagonal, 0.0, acc_a) * inv_d, ops_ptr + gram_base, rows_p, rows_q, mask,
                            mirror, n_rows, SPLIT_GRAM, EMULATE_BF16)
        _store_gram_operand(tl.where(on_diagonal, 0.0, acc_b) * inv_d, ops_ptr + gram_base + plane, rows_p, rows_q,
                            mask, mirror, n_rows, SPLIT_GRAM, EMULATE_BF16)


@triton.jit
def _gram_partial_kernel(
    ops_ptr,
    ws_ptr,
    n_rows,
    n_cols,
    n_row_blocks,
    k_chunk,
    split_offset,
    tile_offset,
    gdiag_offset,
    gram_base,
    inv_d,
    VICREG: tl.constexpr,
    SPLIT: tl.constexpr,
    FINISH: tl.constexpr,
    KEEP: tl.constexpr,
    SPLIT_GRAM: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    """Tile t = (p, q >= p) of G_a, G_b over features [s·k_chunk, (s+1)·k_chunk): finished in
    place (FINISH, one range), else written to the partial buffer [s, t, view] (BLOCK × BLOCK)."""
    t = tl.program_id(0)
    s = tl.program_id(1)
    p, q = upper_triangle_tile(t, n_row_blocks, True)
    rows_p = p * BLOCK + tl.arange(0, BLOCK)
    rows_q = q * BLOCK + tl.arange(0, BLOCK)
    valid_p = rows_p < n_rows
    valid_q = rows_q < n_rows
    k_start = s * k_chunk
    k_end = tl.minimum(k_start + k_chunk, n_cols)
    plane = tl.cast(n_rows, tl.int64) * n_cols
    view_a = ops_ptr
    view_b = ops_ptr + plane
    # V_p · V_qᵀ: left rows p, right rows q, both reduced over features (stride 1)
    acc_a = tile_product(
        tl.zeros([BLOCK, BLOCK], dtype=tl.float32), view_a, view_a + 2 * plane, rows_p, valid_p, n_cols, 1,
        view_a, view_a + 2 * plane, rows_q, valid_q, n_cols, 1, k_start, k_end,
        SPLIT, SPLIT, BLOCK_K, DOT_PRECISION, EMULATE_BF16,
    )  # fmt: skip
    acc_b = tile_product(
        tl.zeros([BLOCK, BLOCK], dtype=tl.float32), view_b, view_b + 2 * plane, rows_p, valid_p, n_cols, 1,
        view_b, view_b + 2 * plane, rows_q, valid_q, n_cols, 1, k_start, k_end,
        SPLIT, SPLIT, BLOCK_K, DOT_PRECISION, EMULATE_BF16,
    )  # fmt: skip
    if FINISH:
        _gram_tile_finish(acc_a, acc_b, t, p, q, 0, ws_ptr, ops_ptr, tile_offset, gdiag_offset, gram_base, n_rows,
                          inv_d, VICREG, KEEP, SPLIT_GRAM, BLOCK, BLOCK, EMULATE_BF16)
    else:
        n_tiles = tl.num_programs(0)
        square = BLOCK * BLOCK
        inner = tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
        out = ws_ptr + split_offset + (tl.cast(s, tl.int64) * n_tiles + t) * 2 * square
        tl.store(out + inner, acc_a)
        tl.store(out + square + inner, acc_b)


@triton.jit
def _gram_finish_kernel(
    ops_ptr,
    ws_ptr,
    n_rows,
    n_row_blocks,
    n_splits,
    split_offset,
    tile_offset,
    gdiag_offset,
    gram_base,
    inv_d,
    VICREG: tl.constexpr,
    KEEP: tl.constexpr,
    SPLIT_GRAM: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    """Grid (T, BLOCK/ROWS): rows [c·ROWS, (c+1)·ROWS) of tile t, the sum of its S partial tiles
    in a fixed order (deterministic), then finished. Chunks of rows rather than whole tiles: the
    S partial tiles are S·32 KB per tile, and T programs alone (10 at N = 256) would read them
    through 10 SMs' load bandwidth."""
    t = tl.program_id(0)
    chunk = tl.program_id(1)
    n_tiles = tl.num_programs(0)
    p, q = upper_triangle_tile(t, n_row_blocks, True)
    square = BLOCK * BLOCK
    row0 = chunk * ROWS
    inner = (row0 + tl.arange(0, ROWS))[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    acc_a = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    acc_b = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for s in range(0, n_splits):
        partial = ws_ptr + split_offset + (tl.cast(s, tl.int64) * n_tiles + t) * 2 * square
        acc_a += tl.load(partial + inner)
        acc_b += tl.load(partial + square + inner)
    _gram_tile_finish(acc_a, acc_b, t * tl.num_programs(1) + chunk, p, q, row0, ws_ptr, ops_ptr, tile_offset,
                      gdiag_offset, gram_base, n_rows, inv_d, VICREG, KEEP, SPLIT_GRAM, BLOCK, ROWS, EMULATE_BF16)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_view(ptr, stride_n, stride_d, rows, cols, mask):
    return tl.load(ptr + rows[:, None].to(tl.int64) * stride_n + cols[None, :].to(tl.int64) * stride_d, mask=mask,
                   other=0.0).to(tl.float32)


@triton.jit
def _barlow_twins_delta(
    own_ptr,
    own_stride_n,
    own_stride_d,
    partner_ptr,
    partner_stride_n,
    partner_stride_d,
    ws_ptr,
    gram_ptr,
    own_operand_ptr,
    gdiag_ptr,
    rows,
    cols,
    col_mask,
    mean_own,
    scale_own,
    mean_partner,
    scale_partner,
    diag_grad,
    correction,
    n_rows,
    n_cols,
    c1,
    c2,
    SPLIT_GRAM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    """Pre-batch-norm gradient δ of one view on rows × cols, with Â of that view:
        δ_a = c1·(G_b/d·Ã + diag(G_b)/d·Â) + B̂·(2(C_jj − 1)/N − c2·(S_a + B̂(Â − Ã)))
    c1 = 2λd/N², c2 = 2λ/N², S_a = Σ_k B̂_kj Ã_kj (Ã: Â as rounded in the operands)."""
    DTYPE = own_operand_ptr.dtype.element_ty
    valid_rows = rows < n_rows
    acc = tile_product(
        tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), gram_ptr, gram_ptr + 2 * tl.cast(n_rows, tl.int64) * n_rows,
        rows, valid_rows, n_rows, 1, own_operand_ptr, own_operand_ptr, cols, col_mask, 1, n_cols, 0, n_rows,
        SPLIT_GRAM, False, BLOCK_K, DOT_PRECISION, EMULATE_BF16,
    )  # fmt: skip
    mask = valid_rows[:, None] & col_mask[None, :]
    hat = tl.where(mask, (_load_view(own_ptr, own_stride_n, own_stride_d, rows, cols, mask) - mean_own) * scale_own, 0.0)
    seen = round_operand(hat, DTYPE, EMULATE_BF16).to(tl.float32)
    hat_partner = _load_view(partner_ptr, partner_stride_n, partner_stride_d, rows, cols, mask)
    hat_partner = tl.where(mask, (hat_partner - mean_partner) * scale_partner, 0.0)
    gram_diag = tl.load(gdiag_ptr + rows, mask=valid_rows, other=0.0)
    products = acc + gram_diag[:, None] * hat
    delta = c1 * products + hat_partner * (diag_grad - c2 * (correction + hat_partner * (hat - seen)))
    return delta, hat


@triton.jit
def _barlow_twins_gram_backward_view(
    own_ptr,
    own_stride_n,
    own_stride_d,
    partner_ptr,
    partner_stride_n,
    partner_stride_d,
    out_ptr,
    scratch_ptr,
    ws_ptr,
    ops_ptr,
    go_ptr,
    n_rows,
    n_cols,
    gdiag_offset,
    gram_base,
    c1,
    c2,
    VIEW: tl.constexpr,
    SINGLE: tl.constexpr,
    SPLIT_GRAM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    """∂L/∂z of view VIEW on a column block, all rows: r·(δ − Â·w), w_j = Σ_b δ_bj Â_bj / N (the
    column mean of δ vanishes: 1ᵀB̂ = 0 and 1ᵀG = 0)."""
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    mean_own = tl.load(ws_ptr + (COL_MEAN_A + VIEW) * n_cols + cols, mask=col_mask, other=0.0)[None, :]
    scale_own = tl.load(ws_ptr + (COL_SCALE_A + VIEW) * n_cols + cols, mask=col_mask, other=0.0)[None, :]
    mean_partner = tl.load(ws_ptr + (COL_MEAN_A + 1 - VIEW) * n_cols + cols, mask=col_mask, other=0.0)[None, :]
    scale_partner = tl.load(ws_ptr + (COL_SCALE_A + 1 - VIEW) * n_cols + cols, mask=col_mask, other=0.0)[None, :]
    diag_grad = tl.load(ws_ptr + COL_X * n_cols + cols, mask=col_mask, other=0.0)[None, :]
    correction = tl.load(ws_ptr + (COL_CORR_A + VIEW) * n_cols + cols, mask=col_mask, other=0.0)[None, :]
    gram_plane = tl.cast(n_rows, tl.int64) * n_rows
    gram_ptr = ops_ptr + gram_base + (1 - VIEW) * gram_plane  # Barlow Twins: the partner's Gram
    own_operand_ptr = ops_ptr + VIEW * tl.cast(n_rows, tl.int64) * n_cols
    gdiag_ptr = ws_ptr + gdiag_offset + (1 - VIEW) * n_rows
    go = tl.load(go_ptr)
    DTYPE = out_ptr.dtype.element_ty
    if SINGLE:
        rows = tl.arange(0, BLOCK_M)
        mask = (rows < n_rows)[:, None] & col_mask[None, :]
        delta, hat = _barlow_twins_delta(
            own_ptr, own_stride_n, own_stride_d, partner_ptr, partner_stride_n, partner_stride_d, ws_ptr, gram_ptr,
            own_operand_ptr, gdiag_ptr, rows, cols, col_mask, mean_own, scale_own, mean_partner, scale_partner,
            diag_grad, correction, n_rows, n_cols, c1, c2, SPLIT_GRAM, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION,
            EMULATE_BF16,
        )  # fmt: skip
        w = tl.sum(tl.where(mask, delta * hat, 0.0), axis=0) / n_rows
        grad = go * scale_own * (delta - hat * w[None, :])
        offsets = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
        tl.store(out_ptr + offsets, round_operand(grad, DTYPE, EMULATE_BF16), mask=mask)
    else:
        w = tl.zeros([BLOCK_N], dtype=tl.float32)
        for r0 in range(0, n_rows, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            mask = (rows < n_rows)[:, None] & col_mask[None, :]
            delta, hat = _barlow_twins_delta(
                own_ptr, own_stride_n, own_stride_d, partner_ptr, partner_stride_n, partner_stride_d, ws_ptr,
                gram_ptr, own_operand_ptr, gdiag_ptr, rows, cols, col_mask, mean_own, scale_own, mean_partner,
                scale_partner, diag_grad, correction, n_rows, n_cols, c1, c2, SPLIT_GRAM, BLOCK_M, BLOCK_N, BLOCK_K,
                DOT_PRECISION, EMULATE_BF16,
            )  # fmt: skip
            w += tl.sum(tl.where(mask, delta * hat, 0.0), axis=0)
            tl.store(scratch_ptr + rows[:, None].to(tl.int64) * n_cols + cols[None, :], delta, mask=mask)
        w = w / n_rows
        tl.debug_barrier()  # the scratch rows are read back by other threads of this program
        for r0 in range(0, n_rows, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            mask = (rows < n_rows)[:, None] & col_mask[None, :]
            offsets = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
            delta = tl.load(scratch_ptr + offsets, mask=mask, other=0.0)
            hat = _load_view(own_ptr, own_stride_n, own_stride_d, rows, cols, mask)
            hat = tl.where(mask, (hat - mean_own) * scale_own, 0.0)
            grad = go * scale_own * (delta - hat * w[None, :])
            tl.store(out_ptr + offsets, round_operand(grad, DTYPE, EMULATE_BF16), mask=mask)


@triton.jit
def _vicreg_gram_backward_view(
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
    gdiag_offset,
    gram_base,
    c1,
    c2,
    c3,
    c4,
    VIEW: tl.constexpr,
    SPLIT_GRAM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    """∂L/∂z of view VIEW on one (rows, cols) tile, with X = z − mean, Y = X/s:
        c1·(z − z_partner) + hinge·X + c2·s³·(c3·(G_y/d·Ỹ + diag(G_y)/d·Y) − c4·Y·(S + Y(Y − Ỹ)))
    c1 = 2λ/(Nd), c2 = 4ν/(d(N−1)), c3 = d/(N−1), c4 = 1/(N−1): the last bracket is Y·K_y,off."""
    DTYPE = out_ptr.dtype.element_ty
    rows = tl.program_id(0) // 2 * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    valid_rows = rows < n_rows
    col_mask = cols < n_cols
    gram_ptr = ops_ptr + gram_base + VIEW * tl.cast(n_rows, tl.int64) * n_rows
    own_operand_ptr = ops_ptr + VIEW * tl.cast(n_rows, tl.int64) * n_cols
    acc = tile_product(
        tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), gram_ptr, gram_ptr + 2 * tl.cast(n_rows, tl.int64) * n_rows,
        rows, valid_rows, n_rows, 1, own_operand_ptr, own_operand_ptr, cols, col_mask, 1, n_cols, 0, n_rows,
        SPLIT_GRAM, False, BLOCK_K, DOT_PRECISION, EMULATE_BF16,
    )  # fmt: skip
    mask = valid_rows[:, None] & col_mask[None, :]
    mean = tl.load(ws_ptr + (COL_MEAN_A + VIEW) * n_cols + cols, mask=col_mask, other=0.0)[None, :]
    inv_s = tl.load(ws_ptr + (COL_SCALE_A + VIEW) * n_cols + cols, mask=col_mask, other=1.0)[None, :]
    hinge = tl.load(ws_ptr + (COL_X + VIEW) * n_cols + cols, mask=col_mask, other=0.0)[None, :]
    correction = tl.load(ws_ptr + (COL_CORR_A + VIEW) * n_cols + cols, mask=col_mask, other=0.0)[None, :]
    gram_diag = tl.load(ws_ptr + gdiag_offset + VIEW * n_rows + rows, mask=valid_rows, other=0.0)
    z = _load_view(own_ptr, own_stride_n, own_stride_d, rows, cols, mask)
    z_partner = _load_view(partner_ptr, partner_stride_n, partner_stride_d, rows, cols, mask)
    x = tl.where(mask, z - mean, 0.0)
    y = x * inv_s
    seen = round_operand(y, DTYPE, EMULATE_BF16).to(tl.float32)
    covariance = c3 * (acc + gram_diag[:, None] * y) - c4 * y * (correction + y * (y - seen))
    s = 1.0 / inv_s
    grad = tl.load(go_ptr) * (c1 * (z - z_partner) + hinge * x + c2 * (covariance * s * s * s))
    offsets = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    tl.store(out_ptr + offsets, round_operand(grad, DTYPE, EMULATE_BF16), mask=mask)


@triton.jit
def _gram_backward_kernel(
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
    scratch_ptr,
    n_rows,
    n_cols,
    gdiag_offset,
    gram_base,
    c1,
    c2,
    c3,
    c4,
    VICREG: tl.constexpr,
    SINGLE: tl.constexpr,
    SPLIT_GRAM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    """Grid (2·R, column blocks): program_id(0) = 2·r + view. VICReg: R row blocks, one each;
    Barlow Twins: R = 1, every row (see :func:`_barlow_twins_gram_backward_view`)."""
    view = tl.program_id(0) % 2
    if VICREG:
        if view == 0:
            _vicreg_gram_backward_view(
                a_ptr, a_stride_n, a_stride_d, b_ptr, b_stride_n, b_stride_d, out_a_ptr, ws_ptr, ops_ptr, go_ptr,
                n_rows, n_cols, gdiag_offset, gram_base, c1, c2, c3, c4, 0, SPLIT_GRAM, BLOCK_M, BLOCK_N, BLOCK_K,
                DOT_PRECISION, EMULATE_BF16,
            )  # fmt: skip
        else:
            _vicreg_gram_backward_view(
                b_ptr, b_stride_n, b_stride_d, a_ptr, a_stride_n, a_stride_d, out_b_ptr, ws_ptr, ops_ptr, go_ptr,
                n_rows, n_cols, gdiag_offset, gram_base, c1, c2, c3, c4, 1, SPLIT_GRAM, BLOCK_M, BLOCK_N, BLOCK_K,
                DOT_PRECISION, EMULATE_BF16,
            )  # fmt: skip
    else:
        if view == 0:
            _barlow_twins_gram_backward_view(
                a_ptr, a_stride_n, a_stride_d, b_ptr, b_stride_n, b_stride_d, out_a_ptr, scratch_ptr, ws_ptr,
                ops_ptr, go_ptr, n_rows, n_cols, gdiag_offset, gram_base, c1, c2, 0, SINGLE, SPLIT_GRAM, BLOCK_M,
                BLOCK_N, BLOCK_K, DOT_PRECISION, EMULATE_BF16,
            )  # fmt: skip
        else:
            _barlow_twins_gram_backward_view(
                b_ptr, b_stride_n, b_stride_d, a_ptr, a_stride_n, a_stride_d, out_b_ptr,
                scratch_ptr + tl.cast(n_rows, tl.int64) * n_cols, ws_ptr, ops_ptr, go_ptr, n_rows, n_cols,
                gdiag_offset, gram_base, c1, c2, 1, SINGLE, SPLIT_GRAM, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION,
                EMULATE_BF16,
            )  # fmt: skip
