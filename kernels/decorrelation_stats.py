r"""Barlow Twins / VICReg: per-column statistics, the standardized operands, the loss assembly.

:func:`_standardize_kernel` -- one program per block of BLOCK_D columns, over all N rows, so that
no statistic needs a merge across programs (and no eager PyTorch op):

* statistics pass: per column the mean and centered sum of squares M2 of each view, merged row
  chunk by row chunk with Chan et al.'s parallel update (no E[x²] − E[x]² cancellation); VICReg
  also Σ(a − b)² (invariance) and the hinge factor of the variance term;
* operand pass: each view standardized once -- Barlow Twins Â = (z − mean)·rsqrt(var + eps),
  VICReg Y = (z − mean)/s with s a power of two per view (below) -- and written in the input
  dtype as hi (+ lo for half inputs, lo = round(x − hi)) for the product kernels, with the
  column sums the backward's diagonal corrections need.

VICReg's operands are centered, not standardized: their magnitude is the input's. In float16
(max 65504) centered values, their squares in the stored Grams (G/d) and the d×d K entries
overflow for inputs of a few hundred. Y = X/s with s = 2^k, k chosen from the largest column
norm ‖x_j‖₂ = sqrt(M2_j) so that every ‖y_j‖₂ <= 2^7, bounds |y| <= 2^7, |G_y/d| <= 2^14 and
|K_y| <= 2^14/(N−1): all finite in float16. Powers of two scale exactly; the products are
scaled back (by s², s³, s⁴) in float32. The largest norm is a reduction over all columns, so
VICReg runs the statistics pass (PHASE 0) and the operand pass (PHASE 1) as two launches;
Barlow Twins' operands are bounded by sqrt(N) already and it runs both passes in one (PHASE 2).

Cost: the statistics pass reads both views once (2Nd·e bytes), the operand pass reads them again
(from L2 when the program's N × BLOCK_D column panel is still there) and writes 2·P·Nd·e (P = 2
parts for half inputs, 1 for float32). Bandwidth-bound: at N = 2048, d = 8192, bf16 about
4 × 67 MB → 62 µs at 4.3 TB/s (N = 256: 8 µs), against the product kernels' 0.4 ms (0.1 ms).
What it buys: the product kernels' inner loops are loads and ``tl.dot`` only; the previous
kernels standardized and split every operand tile on load, once per tile pair (N/64 times per
element at N = 2048), which cost more issue slots than the tensor-core instructions.

:func:`_loss_kernel` -- one program: the scalar loss from the per-column-block and per-tile
partial sums (no eager reduction ops, no host sync).

Workspace (float32, one buffer): rows of d per-column values (``COL_*``), 8 slots per column
block (``BLK_*``), 2 per product tile, then what the product kernels need (see the launchers in
:mod:`fastssl.kernels.decorrelation`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .decorrelation_tiles import round_operand

# Per-column rows of the workspace (each d floats)
COL_MEAN_A = tl.constexpr(0)
COL_MEAN_B = tl.constexpr(1)
COL_SCALE_A = tl.constexpr(2)  # Barlow Twins: rsqrt(var + eps); VICReg: 1/s (every column)
COL_SCALE_B = tl.constexpr(3)
COL_X = tl.constexpr(4)  # Barlow Twins: 2(C_jj − 1)/N; VICReg: hinge factor of view a
COL_Y = tl.constexpr(5)  # VICReg: hinge factor of view b
COL_CORR_A = tl.constexpr(6)  # Σ_k P_kj·round(V_kj): the backward's diagonal corrections
COL_CORR_B = tl.constexpr(7)
COL_ROWS = 8
# Slots per column block. Barlow Twins: 0 Σ(1 − C_jj)², 1 Σ C_jj². VICReg: 0 Σ(a − b)²,
# 1/2 Σ relu(1 − σ) of a/b, 3/4 Σ var² of a/b, 5/6 max M2 of a/b.
BLK_SLOTS = 8
BLK_0 = tl.constexpr(0)
BLK_1 = tl.constexpr(1)
BLK_2 = tl.constexpr(2)
BLK_3 = tl.constexpr(3)
BLK_4 = tl.constexpr(4)
BLK_5 = tl.constexpr(5)
BLK_6 = tl.constexpr(6)


@triton.jit
def _power_of_two_scale(max_m2):
    """1/s = 2^-k for the largest column sum of squares ``max_m2`` (see the module docstring):
    with m2 in [2^E, 2^(E+1)), sqrt(m2) < 2^ceil((E+1)/2), k = ceil((E+1)/2) − 7. Built from the
    exponent bits, so it is an exact power of two (0, subnormal, inf and NaN included: inf/NaN
    give a finite scale and the non-finite values propagate through the operands)."""
    # biased exponent e = E + 127 in [0, 255]; ceil((E + 1)/2) = (e + 1)//2 − 63 with e + 1 >= 1
    # (no negative integer division), so 1/s = 2^(7 − ceil((E + 1)/2)) has the biased exponent
    # 197 − (e + 1)//2, within [69, 197]: always a normal float32
    biased_exponent = (max_m2.to(tl.uint32, bitcast=True) >> 23) & 0xFF
    return ((197 - (biased_exponent + 1) // 2) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _column_inverse_scale(peak):
    """Barlow Twins: 2^-k with 2^k > ``peak`` (a column's largest magnitude) when peak >= 1, else
    1, from the exponent bits: peak in [2^E, 2^(E+1)) has the biased exponent e = E + 127 and
    2^-(E+1) the biased exponent 253 − e, clamped to [1, 127] (1: normal for inf/NaN peaks too,
    whose non-finite values propagate through the data; 127: never scale up)."""
    biased_exponent = ((peak.to(tl.uint32, bitcast=True) >> 23) & 0xFF).to(tl.int32)
    scaled_exponent = tl.minimum(tl.maximum(253 - biased_exponent, 1), 127)
    return (scaled_exponent << 23).to(tl.float32, bitcast=True)


@triton.jit
def _standardize_kernel(
    a_ptr,
    a_stride_n,
    a_stride_d,
    b_ptr,
    b_stride_n,
    b_stride_d,
    ws_ptr,
    ops_ptr,
    n_rows,
    n_cols,
    n_col_blocks,
    blk_offset,
    bn_eps,
    variance_eps,
    hinge_coefficient,
    VICREG: tl.constexpr,
    PHASE: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    """Columns [pid·BLOCK_D, +BLOCK_D) over all rows. PHASE 0: statistics; 1: operands (VICReg,
    statistics read back); 2: both (Barlow Twins). ``hinge_coefficient`` = −μ/(2d(N−1)): VICReg's
    variance gradient is hinge·X with hinge = coefficient/σ where σ = sqrt(var + eps) < 1."""
    DTYPE = ops_ptr.dtype.element_ty
    pid = tl.program_id(0)
    cols = pid * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < n_cols
    a_cols = cols[None, :].to(tl.int64) * a_stride_d
    b_cols = cols[None, :].to(tl.int64) * b_stride_d
    blk = ws_ptr + blk_offset + pid * 8
    row_offsets = tl.arange(0, BLOCK_N)
    if PHASE != 1:
        count = tl.zeros([BLOCK_D], dtype=tl.float32)
        mean_a = tl.zeros([BLOCK_D], dtype=tl.float32)
        mean_b = tl.zeros([BLOCK_D], dtype=tl.float32)
        m2_a = tl.zeros([BLOCK_D], dtype=tl.float32)
        m2_b = tl.zeros([BLOCK_D], dtype=tl.float32)
        sq_diff = tl.zeros([BLOCK_D], dtype=tl.float32)
        # Barlow Twins: each column's statistics are of 2^-k·z, 2^k above the largest magnitude
        # seen so far (1 below magnitude 1): the squares of float32 values near 1e19 overflow
        # otherwise. When a chunk raises a column's 2^k, its running mean and M2 are rescaled by
        # the (exact) power-of-two ratio. VICReg (not scale-invariant) keeps 2^k = 1.
        peak_a = tl.zeros([BLOCK_D], dtype=tl.float32)
        peak_b = tl.zeros([BLOCK_D], dtype=tl.float32)
        inv_a = tl.full([BLOCK_D], 1.0, dtype=tl.float32)
        inv_b = tl.full([BLOCK_D], 1.0, dtype=tl.float32)
        for r0 in range(0, n_rows, BLOCK_N):
            rows = r0 + row_offsets
            mask = (rows < n_rows)[:, None] & col_mask[None, :]
            rows64 = rows[:, None].to(tl.int64)
            x = tl.load(a_ptr + rows64 * a_stride_n + a_cols, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(b_ptr + rows64 * b_stride_n + b_cols, mask=mask, other=0.0).to(tl.float32)
            if VICREG:
                xs = x
                ys = y
            else:
                peak_a = tl.maximum(peak_a, tl.max(tl.abs(x), axis=0))
                peak_b = tl.maximum(peak_b, tl.max(tl.abs(y), axis=0))
                new_inv_a = _column_inverse_scale(peak_a)
                new_inv_b = _column_inverse_scale(peak_b)
                ratio_a = new_inv_a / inv_a
                ratio_b = new_inv_b / inv_b
                mean_a = mean_a * ratio_a
                mean_b = mean_b * ratio_b
                m2_a = m2_a * (ratio_a * ratio_a)
                m2_b = m2_b * (ratio_b * ratio_b)
                inv_a = new_inv_a
                inv_b = new_inv_b
                xs = x * inv_a[None, :]
                ys = y * inv_b[None, :]
            chunk = tl.sum((rows < n_rows).to(tl.float32), axis=0)
            chunk_mean_a = tl.sum(xs, axis=0) / chunk
            chunk_mean_b = tl.sum(ys, axis=0) / chunk
            # Chan et al.'s merge of (count, mean, M2) with this chunk's
            total = count + chunk
            delta_a = chunk_mean_a - mean_a
            delta_b = chunk_mean_b - mean_b
            cross_weight = count * chunk / total
            mean_a += delta_a * (chunk / total)
            mean_b += delta_b * (chunk / total)
            dx = tl.where(mask, xs - chunk_mean_a[None, :], 0.0)
            m2_a += tl.sum(dx * dx, axis=0) + delta_a * delta_a * cross_weight
            dy = tl.where(mask, ys - chunk_mean_b[None, :], 0.0)
            m2_b += tl.sum(dy * dy, axis=0) + delta_b * delta_b * cross_weight
            if VICREG:
                diff = x - y
                sq_diff += tl.sum(diff * diff, axis=0)
            count = total
        if not VICREG:
            mean_a = mean_a / inv_a
            mean_b = mean_b / inv_b
        tl.store(ws_ptr + COL_MEAN_A * n_cols + cols, mean_a, mask=col_mask)
        tl.store(ws_ptr + COL_MEAN_B * n_cols + cols, mean_b, mask=col_mask)
        if VICREG:
            var_a = m2_a / (n_rows - 1)
            var_b = m2_b / (n_rows - 1)
            sigma_a = tl.sqrt(var_a + variance_eps)
            sigma_b = tl.sqrt(var_b + variance_eps)
            # ½μ · hinge'(σ) · ∂σ/∂x, 0 where the hinge is flat (σ >= 1, as relu's gradient at 0)
            tl.store(ws_ptr + COL_X * n_cols + cols, tl.where(sigma_a < 1.0, hinge_coefficient / sigma_a, 0.0), mask=col_mask)
            tl.store(ws_ptr + COL_Y * n_cols + cols, tl.where(sigma_b < 1.0, hinge_coefficient / sigma_b, 0.0), mask=col_mask)
            tl.store(blk + BLK_0, tl.sum(sq_diff, axis=0))
            tl.store(blk + BLK_1, tl.sum(tl.where(col_mask, tl.maximum(1.0 - sigma_a, 0.0), 0.0), axis=0))
            tl.store(blk + BLK_2, tl.sum(tl.where(col_mask, tl.maximum(1.0 - sigma_b, 0.0), 0.0), axis=0))
            tl.store(blk + BLK_3, tl.sum(var_a * var_a, axis=0))
            tl.store(blk + BLK_4, tl.sum(var_b * var_b, axis=0))
            tl.store(blk + BLK_5, tl.max(m2_a, axis=0))
            tl.store(blk + BLK_6, tl.max(m2_b, axis=0))
        else:
            # 1/σ = 2^-k / sqrt(var_y + eps·4^-k), var_y of the scaled column; clamped at the
            # smallest normal number (a constant column beyond 2^75: eps·4^-k underflows)
            scaled_var_a = tl.maximum(m2_a / n_rows + bn_eps * inv_a * inv_a, 1.1754943508222875e-38)
            scaled_var_b = tl.maximum(m2_b / n_rows + bn_eps * inv_b * inv_b, 1.1754943508222875e-38)
            scale_a = inv_a / tl.sqrt(scaled_var_a)
            scale_b = inv_b / tl.sqrt(scaled_var_b)
    if PHASE != 0:
        if PHASE == 1:
            mean_a = tl.load(ws_ptr + COL_MEAN_A * n_cols + cols, mask=col_mask, other=0.0)
            mean_b = tl.load(ws_ptr + COL_MEAN_B * n_cols + cols, mask=col_mask, other=0.0)
        if VICREG:
            # the largest column norm of each view, over every column block's maximum
            max_a = tl.zeros([BLOCK_D], dtype=tl.float32)
            max_b = tl.zeros([BLOCK_D], dtype=tl.float32)
            block_ids = tl.arange(0, BLOCK_D)
            for b0 in range(0, n_col_blocks, BLOCK_D):
                ids = b0 + block_ids
                valid = ids < n_col_blocks
                max_a = tl.maximum(max_a, tl.load(ws_ptr + blk_offset + ids * 8 + BLK_5, mask=valid, other=0.0))
                max_b = tl.maximum(max_b, tl.load(ws_ptr + blk_offset + ids * 8 + BLK_6, mask=valid, other=0.0))
            scale_a = tl.zeros([BLOCK_D], dtype=tl.float32) + _power_of_two_scale(tl.max(max_a, axis=0))
            scale_b = tl.zeros([BLOCK_D], dtype=tl.float32) + _power_of_two_scale(tl.max(max_b, axis=0))
        tl.store(ws_ptr + COL_SCALE_A * n_cols + cols, scale_a, mask=col_mask)
        tl.store(ws_ptr + COL_SCALE_B * n_cols + cols, scale_b, mask=col_mask)
        plane = tl.cast(n_rows, tl.int64) * n_cols
        corr_a = tl.zeros([BLOCK_D], dtype=tl.float32)
        corr_b = tl.zeros([BLOCK_D], dtype=tl.float32)
        products = tl.zeros([BLOCK_D], dtype=tl.float32)
        for r0 in range(0, n_rows, BLOCK_N):
            rows = r0 + row_offsets
            mask = (rows < n_rows)[:, None] & col_mask[None, :]
            rows64 = rows[:, None].to(tl.int64)
            x = tl.load(a_ptr + rows64 * a_stride_n + a_cols, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(b_ptr + rows64 * b_stride_n + b_cols, mask=mask, other=0.0).to(tl.float32)
            # padded rows and columns are 0 after the shift: they enter no product
            hat_a = tl.where(mask, (x - mean_a[None, :]) * scale_a[None, :], 0.0)
            hat_b = tl.where(mask, (y - mean_b[None, :]) * scale_b[None, :], 0.0)
            out = ops_ptr + rows64 * n_cols + cols[None, :]
            hi_a = round_operand(hat_a, DTYPE, EMULATE_BF16)
            hi_b = round_operand(hat_b, DTYPE, EMULATE_BF16)
            tl.store(out, hi_a, mask=mask)
            tl.store(out + plane, hi_b, mask=mask)
            seen_a = hi_a.to(tl.float32)
            seen_b = hi_b.to(tl.float32)
            if SPLIT:
                tl.store(out + 2 * plane, round_operand(hat_a - seen_a, DTYPE, EMULATE_BF16), mask=mask)
                tl.store(out + 3 * plane, round_operand(hat_b - seen_b, DTYPE, EMULATE_BF16), mask=mask)
            if VICREG:  # the Grams are per view: G_a = Y_a Y_aᵀ
                corr_a += tl.sum(hat_a * seen_a, axis=0)
                corr_b += tl.sum(hat_b * seen_b, axis=0)
            else:  # Barlow Twins multiplies each view by the other's Gram
                corr_a += tl.sum(hat_b * seen_a, axis=0)
                corr_b += tl.sum(hat_a * seen_b, axis=0)
                products += tl.sum(hat_a * hat_b, axis=0)
        tl.store(ws_ptr + COL_CORR_A * n_cols + cols, corr_a, mask=col_mask)
        tl.store(ws_ptr + COL_CORR_B * n_cols + cols, corr_b, mask=col_mask)
        if not VICREG:
            c_diag = products / n_rows
            tl.store(ws_ptr + COL_X * n_cols + cols, 2.0 * (c_diag - 1.0) / n_rows, mask=col_mask)
            one_minus = tl.where(col_mask, 1.0 - c_diag, 0.0)
            tl.store(blk + BLK_0, tl.sum(one_minus * one_minus, axis=0))
            tl.store(blk + BLK_1, tl.sum(c_diag * c_diag, axis=0))


@triton.jit
def _loss_kernel(
    ws_ptr,
    loss_ptr,
    blk_offset,
    n_col_blocks,
    tile_offset,
    n_tiles,
    n_rows,
    n_cols,
    lambda_param,
    mu_param,
    nu_param,
    VICREG: tl.constexpr,
    GRAM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The loss from the partial sums.

    Barlow Twins, gram: Σ(1 − C_jj)² + λ·max(0, ⟨G_a, G_b⟩/N² − Σ C_jj²) (‖C‖²_F = ⟨G_a, G_b⟩/N²;
    the clamp: a sum of squares that rounding must not make negative); cross: the tiles' sum.
    VICReg: λ·Σ(a − b)²/(Nd) + ½μ·Σ_v mean_j relu(1 − σ_vj) + ν/d·Σ_v off_v with, per view,
    K = s²·YᵀY/(N−1): gram off_v = max(0, ‖G_y‖²·s⁴/(N−1)² − Σ var²), cross off_v = the tiles'
    Σ_{i≠j}(YᵀY)²·s⁴/(N−1)².
    """
    ids = tl.arange(0, BLOCK)
    blk0 = tl.zeros([BLOCK], dtype=tl.float32)
    blk1 = tl.zeros([BLOCK], dtype=tl.float32)
    blk2 = tl.zeros([BLOCK], dtype=tl.float32)
    blk3 = tl.zeros([BLOCK], dtype=tl.float32)
    blk4 = tl.zeros([BLOCK], dtype=tl.float32)
    for b0 in range(0, n_col_blocks, BLOCK):
        valid = (b0 + ids) < n_col_blocks
        slots = ws_ptr + blk_offset + (b0 + ids) * 8
        blk0 += tl.load(slots + BLK_0, mask=valid, other=0.0)
        blk1 += tl.load(slots + BLK_1, mask=valid, other=0.0)
        if VICREG:
            blk2 += tl.load(slots + BLK_2, mask=valid, other=0.0)
            blk3 += tl.load(slots + BLK_3, mask=valid, other=0.0)
            blk4 += tl.load(slots + BLK_4, mask=valid, other=0.0)
    tile0 = tl.zeros([BLOCK], dtype=tl.float32)
    tile1 = tl.zeros([BLOCK], dtype=tl.float32)
    for t0 in range(0, n_tiles, BLOCK):
        valid = (t0 + ids) < n_tiles
        tile0 += tl.load(ws_ptr + tile_offset + (t0 + ids) * 2, mask=valid, other=0.0)
        tile1 += tl.load(ws_ptr + tile_offset + (t0 + ids) * 2 + 1, mask=valid, other=0.0)
    products_a = tl.sum(tile0, axis=0)
    products_b = tl.sum(tile1, axis=0)
    if VICREG:
        s_a = 1.0 / tl.load(ws_ptr + COL_SCALE_A * n_cols)
        s_b = 1.0 / tl.load(ws_ptr + COL_SCALE_B * n_cols)
        factor_a = s_a * s_a / (n_rows - 1)
        factor_b = s_b * s_b / (n_rows - 1)
        off_a = products_a * factor_a * factor_a
        off_b = products_b * factor_b * factor_b
        if GRAM:
            off_a = tl.maximum(off_a - tl.sum(blk3, axis=0), 0.0)
            off_b = tl.maximum(off_b - tl.sum(blk4, axis=0), 0.0)
        invariance = tl.sum(blk0, axis=0) / n_rows / n_cols
        variance = (tl.sum(blk1, axis=0) + tl.sum(blk2, axis=0)) / n_cols
        loss = lambda_param * invariance + 0.5 * mu_param * variance + nu_param * (off_a + off_b) / n_cols
    else:
        if GRAM:
            off = tl.maximum(products_a / n_rows / n_rows - tl.sum(blk1, axis=0), 0.0)
            loss = tl.sum(blk0, axis=0) + lambda_param * off
        else:
            loss = products_a
    tl.store(loss_ptr, loss)
