r"""Triton kernels for Barlow Twins and VICReg.

Both losses depend on a d×d matrix -- Barlow Twins on C = ÂᵀB̂/N of the batch-standardized
views, VICReg on K_v = X_vᵀX_v/(N-1) of each centered view -- only through its diagonal and its
(off-diagonal) squared Frobenius norm (derivations in :mod:`fastssl.decorrelation`). Every
kernel reads the raw (N, d) inputs through their strides and standardizes (Barlow Twins:
(z − mean)·rsqrt(var + 1e-5)) or centers (VICReg) each tile as it is loaded: no normalized copy
is ever written. Matrix products run on tiles in the input dtype (tensor cores for fp16/bf16;
IEEE fp32 for fp32 unless ``torch.backends.cuda.matmul.allow_tf32`` is set) with fp32
accumulators; every reduction is fp32.

Kernels:

1. :func:`_column_stats_kernel` -- one pass over both views: per column the mean and
   centered sum of squares of each view, their co-moment Σ(a−ā)(b−b̄) and Σ(a−b)² (VICReg's
   invariance), merged chunk by chunk with Chan's parallel update (no E[x²]−E[x]²
   cancellation); rows are split over a second grid axis and the splits merged in PyTorch.
2. Gram path (N < d, never a d×d buffer):
   :func:`_gram_forward_kernel` -- N×N tiles of G_a = ÂÂᵀ and G_b = B̂B̂ᵀ (upper triangle only,
   the Grams are symmetric), reduced in the tile to ⟨G_a, G_b⟩ (Barlow Twins) or
   ‖G_a‖² + ‖G_b‖² (VICReg), plus the diagonal of the d×d matrix from column sums of the
   same tiles; the Grams are kept (N×N fp32, their own diagonal apart) only when a gradient
   is needed.
   :func:`_gram_backward_kernel` -- (N, d) tiles of G·Ṽ, with the whole gradient formula in the
   epilogue (VICReg: one pass; Barlow Twins: a first pass for the batch-norm column sums
   Σ_b (∂L/∂Â)_bj Â_bj, then the gradient).
3. Cross path (N >= d): :func:`_cross_tile_kernel` -- d×d tiles of C (or of K_a, K_b, upper
   triangle), reduced to the loss in the tile in the forward ((1−C_ii)², λC_ij², off-diagonal
   K²) and never written; in the backward the same tiles are recomputed and G = ∂L/∂C (or the
   off-diagonal K) is written once (d×d <= N×d here), with the batch-norm column sums
   Σ_j C_ij G_ij. :func:`_cross_backward_kernel` -- (N, d) tiles of B̂Gᵀ, ÂG (or X_v K_off) with the
   gradient formula in the epilogue.

Precision. Half-precision inputs are standardized in fp32 and must be rounded to enter tensor
cores. The forward products take each operand as hi + lo (two half values; hi·hi + hi·lo + lo·hi)
so that the loss value is good to ~16 bits, not to the 8 of a bf16 operand: the loss is a sum of
squares of these products, and a user comparing backends sees the same number. The backward
products use single-rounded operands, with two exceptions on the gram path, where most of
G·Ṽ cancels in the gradient: the Grams' own diagonal (~√(d/N) times the rest when N ≪ d) is
applied in fp32 to the unrounded views, and with 2N > d the Gram enters as hi + lo. Measured
against float64 with nearly equal views (a converged model), the bf16 Barlow Twins gradients
are then ~10× closer than PyTorch's own bf16 ones (VICReg: 2-3×). fp32 inputs use IEEE fp32
products throughout.

Cost (2 flops per multiply-add; e bytes per input element). Minimum for the loss itself:

* gram (N < d): 2N²d forward (two symmetric Grams), 4N²d backward (two (N×N)·(N×d) products):
  6N²d for either loss. cross (N >= d): Barlow Twins 2Nd² + 4Nd², VICReg 2Nd² (two symmetric
  d×d) + 4Nd²: 6Nd².
* bytes: read both views in the forward and in the backward, write both gradients: 6Nd·e (plus
  the N×N Grams, 2·N²·4 written and read, on the gram path).

This implementation, half inputs (fp32: forward products ×1/3, no hi + lo Gram):

* column statistics: 2Nd·e read once per call;
* Barlow Twins gram: forward 3·2N²d, backward 2 × 4N²d (the batch-norm column sums need all of
  G_b Â before any gradient element is final, so the product is computed twice instead of
  storing an fp32 (N, d) scratch), ×2 for the hi + lo Gram when 2N > d: 14N²d (2N <= d);
* VICReg gram: 3·2N²d + 4N²d = 10N²d (its centering backward vanishes: 1ᵀX = 0, one pass);
* cross, either loss: forward 3·2Nd², backward: d×d matrix 2Nd² + products 4Nd² = 12Nd².

Predictions on an H100 (~990 TFLOP/s bf16 dense, ~60 TFLOP/s fp32, ~3 TB/s), bf16, forward +
backward, Barlow Twins (VICReg in brackets):

* N = 256, d = 8192: floor max(6N²d = 3.2 GFLOP -> 3.3 µs, 6Nd·e + 8N² = 26 MB -> 8.7 µs)
  = 8.7 µs, bandwidth-bound. This implementation: 14N²d = 7.5 GFLOP [10N²d = 5.4] and ~10
  passes over the 8.4 MB of inputs (mostly from the 50 MB L2) in 6 [4] launches: predicted
  40-60 µs [30-45 µs], launch latency and short tile loops dominating; no d×d buffer.
* N = 2048, d = 8192: floor max(6N²d = 206 GFLOP -> 208 µs, 201 MB -> 67 µs) = 208 µs,
  compute-bound. This implementation: 14N²d = 481 GFLOP [344] -> 0.49 ms [0.35 ms] at peak,
  predicted 0.7-0.8 ms [0.5-0.6 ms] at the ~65 % of peak that 64×64 tiles reach: 25-30 %
  [35-40 %] of the floor. Extra memory: the two N×N fp32 Grams (32 MB).
* fp32 inputs run the products on the FMA pipe: N = 2048, d = 8192 Barlow Twins 10N²d =
  344 GFLOP -> 6-12 ms (the fp32 eager reference runs 825 GFLOP of SGEMM on the same pipe).

``benchmarks/roofline.py`` counts the floor its own way (Gram products as full products, the
inputs read once: min(6Nd², 8N²d) for Barlow Twins, 8Nd·min(N, d) for VICReg, 4Nd·e bytes),
against the measured matmul and copy rates of the run. At peak rates that gives, bf16:
N = 256, d = 8192: max(4.3 GFLOP -> 4.3 µs, 16.8 MB -> 5.6 µs) = 5.6 µs; N = 2048, d = 8192:
275 GFLOP -> 278 µs. Predicted fractions of that floor: ~10-15 % at N = 256 (launch- and
latency-bound), ~35-40 % [50-55 %] at N = 2048.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastssl.decorrelation import BATCH_NORM_EPS, _barlow_twins_torch, _use_gram, _vicreg_torch

# Tile sides. On CUDA: 64 × 64 output tiles with a reduction step of 32 (fp16/bf16) or 16
# (fp32, whose IEEE products run on the FMA pipe with operands in registers), 8 warps; sizes
# chosen so that ptxas (sm_90) allocates every kernel without, or with at most a few dozen
# bytes of, register spills. Column statistics: 64 × 64 with 4 warps. The interpreter runs each
# program as NumPy calls (~0.1-0.5 ms per operation, and tl.dot as a non-BLAS loop), so there
# tiles are fitted to the extents: the smallest power of two >= the extent, within [16, 256]
# (reduction steps within [16, 128]). Tests set _FORCED_TILES = (tile, reduction step) to run
# multi-tile loops and masks on small inputs.
_CUDA_TILE = 64
_CUDA_STEP = {torch.float32: 16, torch.float16: 32, torch.bfloat16: 32}
_CUDA_STATS_TILE = 64
_MATMUL_WARPS = 8
_STATS_WARPS = 4
_FORCED_TILES: Optional[Tuple[int, int]] = None

# Buffers the kernels fully overwrite are allocated through this; tests replace it with a
# NaN-filled allocation to check that every element is written.
_new_buffer = torch.empty


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _tile(z: Tensor, extent: int) -> int:
    """Side of an output tile along an axis of ``extent`` elements, for input ``z``."""
    if _FORCED_TILES is not None:
        return _FORCED_TILES[0]
    if z.device.type == "cuda":
        return _CUDA_TILE
    return min(256, max(16, _next_pow2(extent)))


def _step(z: Tensor, extent: int) -> int:
    """Reduction step along an axis of ``extent`` elements, for input ``z``."""
    if _FORCED_TILES is not None:
        return _FORCED_TILES[1]
    if z.device.type == "cuda":
        return _CUDA_STEP[z.dtype]
    return min(128, max(16, _next_pow2(extent)))


def _target_programs(device: torch.device) -> int:
    """Programs that keep the device busy: a few waves on CUDA; on the interpreter (every
    program a sequential Python call) as few as possible."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _dot_precision(device: torch.device) -> str:
    """fp32 tiles use IEEE fp32 products unless PyTorch's own matmuls are allowed TF32."""
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _emulate_bf16(z: Tensor) -> bool:
    """bfloat16 through the interpreter: round in the kernel, multiply in float32 (see :func:`_bf16_rtne`)."""
    return z.dtype == torch.bfloat16 and z.device.type != "cuda"


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
#
# Under the interpreter every call of a @triton.jit helper costs milliseconds (the language
# module is patched anew per call), so the tile loops load and standardize inline; the helpers
# called in loops (_split_operand, _bf16_rtne) serve half-precision inputs only.


@triton.jit
def _bf16_rtne(x):
    """float32 → the nearest-even bfloat16 value, kept in float32.

    The interpreter converts float32 → bfloat16 by truncation (the GPU rounds) and multiplies
    bfloat16 tiles as raw uint16. Rounding the bits here and multiplying in IEEE float32 gives
    the tensor-core product (bf16 × bf16 is exact in float32) up to summation order, so a CPU
    test sees the GPU's numerics.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _column_stats_kernel(
    a_ptr,
    a_stride_n,
    a_stride_d,
    b_ptr,
    b_stride_n,
    b_stride_d,
    out_ptr,
    n_rows,
    n_cols,
    rows_per_split,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[split] (6, d) = mean_a, mean_b, M2_a, M2_b, Σ(a−ā)(b−b̄), Σ(a−b)² over this split's rows."""
    pid_d = tl.program_id(0)
    pid_split = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < n_cols
    a_cols = cols[None, :].to(tl.int64) * a_stride_d
    b_cols = cols[None, :].to(tl.int64) * b_stride_d
    row_start = pid_split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, n_rows)

    count = tl.zeros([BLOCK_D], dtype=tl.float32)
    mean_a = tl.zeros([BLOCK_D], dtype=tl.float32)
    mean_b = tl.zeros([BLOCK_D], dtype=tl.float32)
    m2_a = tl.zeros([BLOCK_D], dtype=tl.float32)
    m2_b = tl.zeros([BLOCK_D], dtype=tl.float32)
    co = tl.zeros([BLOCK_D], dtype=tl.float32)
    sq_diff = tl.zeros([BLOCK_D], dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        row_valid = rows < row_end
        mask = row_valid[:, None] & col_mask[None, :]
        rows64 = rows[:, None].to(tl.int64)
        x = tl.load(a_ptr + rows64 * a_stride_n + a_cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(b_ptr + rows64 * b_stride_n + b_cols, mask=mask, other=0.0).to(tl.float32)
        chunk = tl.sum(row_valid.to(tl.float32), axis=0)
        chunk_mean_a = tl.sum(x, axis=0) / chunk
        chunk_mean_b = tl.sum(y, axis=0) / chunk
        dx = tl.where(mask, x - chunk_mean_a[None, :], 0.0)
        dy = tl.where(mask, y - chunk_mean_b[None, :], 0.0)
        # Chan et al.'s merge of (count, mean, M2, co-moment) with this chunk's
        total = count + chunk
        delta_a = chunk_mean_a - mean_a
        delta_b = chunk_mean_b - mean_b
        cross_weight = count * chunk / total
        mean_a += delta_a * (chunk / total)
        mean_b += delta_b * (chunk / total)
        m2_a += tl.sum(dx * dx, axis=0) + delta_a * delta_a * cross_weight
        m2_b += tl.sum(dy * dy, axis=0) + delta_b * delta_b * cross_weight
        co += tl.sum(dx * dy, axis=0) + delta_a * delta_b * cross_weight
        diff = x - y
        sq_diff += tl.sum(diff * diff, axis=0)
        count = total
    out = out_ptr + pid_split.to(tl.int64) * 6 * n_cols + cols
    tl.store(out, mean_a, mask=col_mask)
    tl.store(out + n_cols, mean_b, mask=col_mask)
    tl.store(out + 2 * n_cols, m2_a, mask=col_mask)
    tl.store(out + 3 * n_cols, m2_b, mask=col_mask)
    tl.store(out + 4 * n_cols, co, mask=col_mask)
    tl.store(out + 5 * n_cols, sq_diff, mask=col_mask)


@triton.jit
def _split_operand(x, DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """fp32 ``x`` as hi + lo, two values of the half input dtype (in float32 on the interpreter's
    bfloat16 lane). Products hi·hi + hi·lo + lo·hi then carry ~16 bits instead of 8 (bf16) or
    11 (fp16): the rounding of the standardized operands no longer limits the loss value."""
    if EMULATE_BF16:
        hi = _bf16_rtne(x)
        lo = _bf16_rtne(x - hi)
    else:
        hi = x.to(DTYPE)
        lo = (x - hi.to(tl.float32)).to(DTYPE)
    return hi, lo


@triton.jit
def _gram_forward_kernel(
    a_ptr,
    a_stride_n,
    a_stride_d,
    b_ptr,
    b_stride_n,
    b_stride_d,
    shift_ptr,
    scale_ptr,
    gram_a_ptr,
    gram_b_ptr,
    gram_diag_a_ptr,
    gram_diag_b_ptr,
    partial_ptr,
    diag_ptr,
    n_rows,
    n_cols,
    gram_scale,
    VICREG: tl.constexpr,
    STORE_GRAM: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    """Tile (p, q), q >= p, of G_a = ÂÂᵀ and G_b = B̂B̂ᵀ (Â, B̂ the views standardized or centered
    as they are loaded: (z − shift)·scale).

    partial[p, q]: Σ G_a∘G_b (Barlow Twins) or Σ G_a² + Σ G_b² (VICReg) over the tile, doubled
    off the diagonal for the mirrored tile; 0 for q < p. Diagonal tiles also write their row
    block's column sums, diag[p] = Σ_b â b̂ (Barlow Twins) or (Σ_b â², Σ_b b̂²) (VICReg): the
    diagonal of the d×d matrix, subtracted from the norm. With STORE_GRAM, gram_a and gram_b
    (N, N) get the Grams times ``gram_scale`` with their diagonal set to 0, and gram_diag_a,
    gram_diag_b (N,) that diagonal: the backward multiplies the two parts separately (see
    :func:`_gram_backward_kernel`). SPLIT (half inputs): operands as hi + lo.
    """
    pid_p = tl.program_id(0)
    pid_q = tl.program_id(1)
    n_blocks = tl.num_programs(0)
    if pid_q < pid_p:
        tl.store(partial_ptr + pid_p * n_blocks + pid_q, 0.0)
        return
    DTYPE = a_ptr.dtype.element_ty
    rows_p = pid_p * BLOCK + tl.arange(0, BLOCK)
    rows_q = pid_q * BLOCK + tl.arange(0, BLOCK)
    valid_p = rows_p < n_rows
    valid_q = rows_q < n_rows
    a_rows_p = rows_p[:, None].to(tl.int64) * a_stride_n
    a_rows_q = rows_q[:, None].to(tl.int64) * a_stride_n
    b_rows_p = rows_p[:, None].to(tl.int64) * b_stride_n
    b_rows_q = rows_q[:, None].to(tl.int64) * b_stride_n
    acc_a = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for k0 in range(0, n_cols, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < n_cols
        a_cols = cols[None, :].to(tl.int64) * a_stride_d
        b_cols = cols[None, :].to(tl.int64) * b_stride_d
        shift_a = tl.load(shift_ptr + cols, mask=col_mask, other=0.0)[None, :]
        shift_b = tl.load(shift_ptr + n_cols + cols, mask=col_mask, other=0.0)[None, :]
        scale_a = tl.load(scale_ptr + cols, mask=col_mask, other=0.0)[None, :]
        scale_b = tl.load(scale_ptr + n_cols + cols, mask=col_mask, other=0.0)[None, :]
        mask_p = valid_p[:, None] & col_mask[None, :]
        mask_q = valid_q[:, None] & col_mask[None, :]
        # padded rows and columns must be 0 after the shift, or they would enter the products
        a_p = tl.load(a_ptr + a_rows_p + a_cols, mask=mask_p, other=0.0).to(tl.float32)
        a_p = tl.where(mask_p, (a_p - shift_a) * scale_a, 0.0)
        b_p = tl.load(b_ptr + b_rows_p + b_cols, mask=mask_p, other=0.0).to(tl.float32)
        b_p = tl.where(mask_p, (b_p - shift_b) * scale_b, 0.0)
        a_q = tl.load(a_ptr + a_rows_q + a_cols, mask=mask_q, other=0.0).to(tl.float32)
        a_q = tl.where(mask_q, (a_q - shift_a) * scale_a, 0.0)
        b_q = tl.load(b_ptr + b_rows_q + b_cols, mask=mask_q, other=0.0).to(tl.float32)
        b_q = tl.where(mask_q, (b_q - shift_b) * scale_b, 0.0)
        if SPLIT:
            a_p_hi, a_p_lo = _split_operand(a_p, DTYPE, EMULATE_BF16)
            a_q_hi, a_q_lo = _split_operand(a_q, DTYPE, EMULATE_BF16)
            b_p_hi, b_p_lo = _split_operand(b_p, DTYPE, EMULATE_BF16)
            b_q_hi, b_q_lo = _split_operand(b_q, DTYPE, EMULATE_BF16)
            acc_a = tl.dot(a_p_hi, tl.trans(a_q_hi), acc_a, input_precision=DOT_PRECISION)
            acc_a = tl.dot(a_p_hi, tl.trans(a_q_lo), acc_a, input_precision=DOT_PRECISION)
            acc_a = tl.dot(a_p_lo, tl.trans(a_q_hi), acc_a, input_precision=DOT_PRECISION)
            acc_b = tl.dot(b_p_hi, tl.trans(b_q_hi), acc_b, input_precision=DOT_PRECISION)
            acc_b = tl.dot(b_p_hi, tl.trans(b_q_lo), acc_b, input_precision=DOT_PRECISION)
            acc_b = tl.dot(b_p_lo, tl.trans(b_q_hi), acc_b, input_precision=DOT_PRECISION)
        else:
            acc_a = tl.dot(a_p, tl.trans(a_q), acc_a, input_precision=DOT_PRECISION)
            acc_b = tl.dot(b_p, tl.trans(b_q), acc_b, input_precision=DOT_PRECISION)
        if pid_p == pid_q:
            diag_row = pid_p.to(tl.int64) * n_cols
            if VICREG:
                tl.store(diag_ptr + 2 * diag_row + cols, tl.sum(a_p * a_p, axis=0), mask=col_mask)
                tl.store(diag_ptr + 2 * diag_row + n_cols + cols, tl.sum(b_p * b_p, axis=0), mask=col_mask)
            else:
                tl.store(diag_ptr + diag_row + cols, tl.sum(a_p * b_p, axis=0), mask=col_mask)
    weight = tl.where(pid_p == pid_q, 1.0, 2.0)
    if VICREG:
        part = tl.sum(tl.sum(acc_a * acc_a, axis=1), axis=0) + tl.sum(tl.sum(acc_b * acc_b, axis=1), axis=0)
    else:
        part = tl.sum(tl.sum(acc_a * acc_b, axis=1), axis=0)
    tl.store(partial_ptr + pid_p * n_blocks + pid_q, part * weight)
    if STORE_GRAM:
        mask = valid_p[:, None] & valid_q[None, :]
        on_diagonal = rows_p[:, None] == rows_q[None, :]
        if pid_p == pid_q:
            diag_a = tl.sum(tl.where(on_diagonal, acc_a, 0.0), axis=1)
            diag_b = tl.sum(tl.where(on_diagonal, acc_b, 0.0), axis=1)
            tl.store(gram_diag_a_ptr + rows_p, diag_a * gram_scale, mask=valid_p)
            tl.store(gram_diag_b_ptr + rows_p, diag_b * gram_scale, mask=valid_p)
        off_a = tl.where(on_diagonal, 0.0, acc_a) * gram_scale
        off_b = tl.where(on_diagonal, 0.0, acc_b) * gram_scale
        offsets = rows_p[:, None].to(tl.int64) * n_rows + rows_q[None, :]
        tl.store(gram_a_ptr + offsets, off_a, mask=mask)
        tl.store(gram_b_ptr + offsets, off_b, mask=mask)
        if pid_p != pid_q:
            mirrored = rows_q[None, :].to(tl.int64) * n_rows + rows_p[:, None]
            tl.store(gram_a_ptr + mirrored, off_a, mask=mask)
            tl.store(gram_b_ptr + mirrored, off_b, mask=mask)


@triton.jit
def _cross_tile_kernel(
    a_ptr,
    a_stride_n,
    a_stride_d,
    b_ptr,
    b_stride_n,
    b_stride_d,
    shift_ptr,
    scale_ptr,
    partial_ptr,
    mat_a_ptr,
    mat_b_ptr,
    row_sum_ptr,
    col_sum_ptr,
    n_rows,
    n_cols,
    inv_norm,
    lambda_param,
    VICREG: tl.constexpr,
    BACKWARD: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    """Tile (i, j) of the d×d matrix, reduced over all N rows.

    Barlow Twins: C = ÂᵀB̂·inv_norm. Forward: partial[i, j] = Σ (1−C_ii)² on the diagonal plus
    Σ λC_ij² off it. Backward: mat_a = G = ∂L/∂C (2(C_ii − 1) on, 2λC_ij off the diagonal),
    row_sum[j-block, i] = Σ_j C_ij G_ij and col_sum[i-block, j] = Σ_i C_ij G_ij (N times the
    batch-norm column means mean_b(δ Â) of each view's gradient).
    VICReg (j >= i only; K is symmetric): K_v = X_vᵀX_v·inv_norm. Forward: partial[i, j] =
    Σ_{i≠j} K_a² + K_b², doubled for the mirrored tile. Backward: mat_a, mat_b (d, d) = the
    off-diagonal K_a, K_b, written at (i, j) and mirrored at (j, i).
    SPLIT (forward, half inputs): operands as hi + lo; otherwise rounded to the input dtype.
    """
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    n_blocks = tl.num_programs(0)
    if VICREG:
        if pid_j < pid_i:
            if not BACKWARD:
                tl.store(partial_ptr + pid_i * n_blocks + pid_j, 0.0)
            return
    DTYPE = a_ptr.dtype.element_ty
    cols_i = pid_i * BLOCK + tl.arange(0, BLOCK)
    cols_j = pid_j * BLOCK + tl.arange(0, BLOCK)
    valid_i = cols_i < n_cols
    valid_j = cols_j < n_cols
    # Barlow Twins: view a through columns i, view b through columns j. VICReg: both views
    # through both (K_a from a's columns i and j, K_b from b's).
    left_ptr = a_ptr
    left_stride_n = a_stride_n
    left_cols = cols_i[None, :].to(tl.int64) * a_stride_d
    left_shift = tl.load(shift_ptr + cols_i, mask=valid_i, other=0.0)[None, :]
    left_scale = tl.load(scale_ptr + cols_i, mask=valid_i, other=0.0)[None, :]
    if VICREG:
        right_ptr = a_ptr
        right_stride_n = a_stride_n
        right_cols = cols_j[None, :].to(tl.int64) * a_stride_d
        right_shift = tl.load(shift_ptr + cols_j, mask=valid_j, other=0.0)[None, :]
        right_scale = tl.load(scale_ptr + cols_j, mask=valid_j, other=0.0)[None, :]
        b_cols_i = cols_i[None, :].to(tl.int64) * b_stride_d
        b_shift_i = tl.load(shift_ptr + n_cols + cols_i, mask=valid_i, other=0.0)[None, :]
        b_scale_i = tl.load(scale_ptr + n_cols + cols_i, mask=valid_i, other=0.0)[None, :]
        b_cols_j = cols_j[None, :].to(tl.int64) * b_stride_d
        b_shift_j = tl.load(shift_ptr + n_cols + cols_j, mask=valid_j, other=0.0)[None, :]
        b_scale_j = tl.load(scale_ptr + n_cols + cols_j, mask=valid_j, other=0.0)[None, :]
    else:
        right_ptr = b_ptr
        right_stride_n = b_stride_n
        right_cols = cols_j[None, :].to(tl.int64) * b_stride_d
        right_shift = tl.load(shift_ptr + n_cols + cols_j, mask=valid_j, other=0.0)[None, :]
        right_scale = tl.load(scale_ptr + n_cols + cols_j, mask=valid_j, other=0.0)[None, :]
    acc_a = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for k0 in range(0, n_rows, BLOCK_K):
        rows = k0 + tl.arange(0, BLOCK_K)
        row_valid = (rows < n_rows)[:, None]
        rows64 = rows[:, None].to(tl.int64)
        mask_i = row_valid & valid_i[None, :]
        mask_j = row_valid & valid_j[None, :]
        left = tl.load(left_ptr + rows64 * left_stride_n + left_cols, mask=mask_i, other=0.0).to(tl.float32)
        left = tl.where(mask_i, (left - left_shift) * left_scale, 0.0)
        right = tl.load(right_ptr + rows64 * right_stride_n + right_cols, mask=mask_j, other=0.0).to(tl.float32)
        right = tl.where(mask_j, (right - right_shift) * right_scale, 0.0)
        if SPLIT:
            left_hi, left_lo = _split_operand(left, DTYPE, EMULATE_BF16)
            right_hi, right_lo = _split_operand(right, DTYPE, EMULATE_BF16)
            acc_a = tl.dot(tl.trans(left_hi), right_hi, acc_a, input_precision=DOT_PRECISION)
            acc_a = tl.dot(tl.trans(left_hi), right_lo, acc_a, input_precision=DOT_PRECISION)
            acc_a = tl.dot(tl.trans(left_lo), right_hi, acc_a, input_precision=DOT_PRECISION)
        else:
            if EMULATE_BF16:
                left = _bf16_rtne(left)
                right = _bf16_rtne(right)
            else:
                left = left.to(DTYPE)
                right = right.to(DTYPE)
            acc_a = tl.dot(tl.trans(left), right, acc_a, input_precision=DOT_PRECISION)
        if VICREG:
            left_b = tl.load(b_ptr + rows64 * b_stride_n + b_cols_i, mask=mask_i, other=0.0).to(tl.float32)
            left_b = tl.where(mask_i, (left_b - b_shift_i) * b_scale_i, 0.0)
            right_b = tl.load(b_ptr + rows64 * b_stride_n + b_cols_j, mask=mask_j, other=0.0).to(tl.float32)
            right_b = tl.where(mask_j, (right_b - b_shift_j) * b_scale_j, 0.0)
            if SPLIT:
                left_hi, left_lo = _split_operand(left_b, DTYPE, EMULATE_BF16)
                right_hi, right_lo = _split_operand(right_b, DTYPE, EMULATE_BF16)
                acc_b = tl.dot(tl.trans(left_hi), right_hi, acc_b, input_precision=DOT_PRECISION)
                acc_b = tl.dot(tl.trans(left_hi), right_lo, acc_b, input_precision=DOT_PRECISION)
                acc_b = tl.dot(tl.trans(left_lo), right_hi, acc_b, input_precision=DOT_PRECISION)
            else:
                if EMULATE_BF16:
                    left_b = _bf16_rtne(left_b)
                    right_b = _bf16_rtne(right_b)
                else:
                    left_b = left_b.to(DTYPE)
                    right_b = right_b.to(DTYPE)
                acc_b = tl.dot(tl.trans(left_b), right_b, acc_b, input_precision=DOT_PRECISION)

    valid = valid_i[:, None] & valid_j[None, :]
    on_diagonal = cols_i[:, None] == cols_j[None, :]
    if VICREG:
        off = valid & (cols_i[:, None] != cols_j[None, :])
        k_a = tl.where(off, acc_a * inv_norm, 0.0)
        k_b = tl.where(off, acc_b * inv_norm, 0.0)
        if BACKWARD:
            offsets = cols_i[:, None].to(tl.int64) * n_cols + cols_j[None, :]
            tl.store(mat_a_ptr + offsets, k_a, mask=valid)
            tl.store(mat_b_ptr + offsets, k_b, mask=valid)
            if pid_i != pid_j:
                mirrored = cols_j[None, :].to(tl.int64) * n_cols + cols_i[:, None]
                tl.store(mat_a_ptr + mirrored, k_a, mask=valid)
                tl.store(mat_b_ptr + mirrored, k_b, mask=valid)
        else:
            part = tl.sum(tl.sum(k_a * k_a + k_b * k_b, axis=1), axis=0)
            tl.store(partial_ptr + pid_i * n_blocks + pid_j, part * tl.where(pid_i == pid_j, 1.0, 2.0))
    else:
        c = acc_a * inv_norm
        if BACKWARD:
            grad = tl.where(valid, tl.where(on_diagonal, 2.0 * (c - 1.0), 2.0 * lambda_param * c), 0.0)
            offsets = cols_i[:, None].to(tl.int64) * n_cols + cols_j[None, :]
            tl.store(mat_a_ptr + offsets, grad, mask=valid)
            c_times_grad = c * grad
            tl.store(row_sum_ptr + pid_j.to(tl.int64) * n_cols + cols_i, tl.sum(c_times_grad, axis=1), mask=valid_i)
            tl.store(col_sum_ptr + pid_i.to(tl.int64) * n_cols + cols_j, tl.sum(c_times_grad, axis=0), mask=valid_j)
        else:
            one_minus = 1.0 - c
            terms = tl.where(on_diagonal, one_minus * one_minus, lambda_param * c * c)
            part = tl.sum(tl.sum(tl.where(valid, terms, 0.0), axis=1), axis=0)
            tl.store(partial_ptr + pid_i * n_blocks + pid_j, part)


@triton.jit
def _gradient_epilogue(
    acc_a,
    acc_b,
    diag_a,
    diag_b,
    gram_diag_a,
    gram_diag_b,
    a_ptr,
    a_stride_n,
    a_stride_d,
    b_ptr,
    b_stride_n,
    b_stride_d,
    shift_ptr,
    scale_ptr,
    vec_ptr,
    go_ptr,
    out_a_ptr,
    out_b_ptr,
    rows,
    cols,
    pid_rows,
    n_rows,
    n_cols,
    c1,
    c2,
    c3,
    c4,
    VICREG: tl.constexpr,
    GRAM: tl.constexpr,
    FINALIZE: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    """The rest of the gradient formula on an (N, d) tile of the products ``acc_a``, ``acc_b``.

    Gram path (see :func:`_gram_backward_kernel`): ``acc`` holds the products with the Grams'
    off-diagonal entries, ``gram_diag_*`` (per row) their diagonal, which is applied here to the
    unrounded view; ``diag_*`` (per column) the sums S_j = Σ_k P_kj Ṽ_kj for the d×d-diagonal
    part of the products, P_pj·(S_j + P_pj(V_pj − Ṽ_pj)) once the row's own term is the exact one.
    Â, B̂ are (z − shift)·scale; Ã, B̃ the same rounded to the input dtype.

    Barlow Twins. Gram path, T_a = (G_b Ã)/d with its diagonal term exact:
        δ_a = c1·T_a − c2·B̂·(S_a + B̂(Â − Ã)) + B̂·vec[0]
    with c1 = 2λd/N², c2 = 2λ/N², vec[0] = 2(C_jj − 1)/N.
    Cross path, acc = (B̃Gᵀ, ÃG): δ_a = c1·acc_a (c1 = 1/N). Then
        not FINALIZE: out_a[row block] = Σ_rows δ_a Â     (partial column sums)
        FINALIZE:     ∂L/∂z_a = go·r_a·(δ_a − Â·vec[1])   (vec[1] = w_a = mean_b δ_a Â, r = scale)
    and the same with a and b swapped (vec[2] = w_b).
    VICReg, with X = z − shift and cov_a = c3·T_a − c4·X_a·(S_a + X_a(X_a − X̃_a)) (gram path,
    T_a = G_a X̃_a/d with its diagonal term exact, c3 = d/(N−1), c4 = 1/(N−1)) or cov_a = acc_a
    (cross path, acc = X̃_a K_off,a):
        ∂L/∂z_a = go·(c1(z_a − z_b) + vec[0]·X_a + c2·cov_a)
    with c1 = 2λ/(Nd), c2 = 4ν/(d(N−1)), vec[0] the hinge factor −μ[σ<1]/(2d(N−1)σ); for b: −c1,
    vec[1]. The centering's own backward adds nothing: every column of X sums to 0.
    """
    DTYPE = a_ptr.dtype.element_ty
    col_mask = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_mask[None, :]
    rows64 = rows[:, None].to(tl.int64)
    cols64 = cols[None, :].to(tl.int64)
    shift_a = tl.load(shift_ptr + cols, mask=col_mask, other=0.0)[None, :]
    shift_b = tl.load(shift_ptr + n_cols + cols, mask=col_mask, other=0.0)[None, :]
    z_a = tl.load(a_ptr + rows64 * a_stride_n + cols64 * a_stride_d, mask=mask, other=0.0).to(tl.float32)
    z_b = tl.load(b_ptr + rows64 * b_stride_n + cols64 * b_stride_d, mask=mask, other=0.0).to(tl.float32)
    out_offsets = rows64 * n_cols + cols64
    if VICREG:
        x_a = tl.where(mask, z_a - shift_a, 0.0)
        x_b = tl.where(mask, z_b - shift_b, 0.0)
        hinge_a = tl.load(vec_ptr + cols, mask=col_mask, other=0.0)[None, :]
        hinge_b = tl.load(vec_ptr + n_cols + cols, mask=col_mask, other=0.0)[None, :]
        invariance = c1 * (z_a - z_b)
        if GRAM:
            if EMULATE_BF16:
                x_a_seen = _bf16_rtne(x_a)
                x_b_seen = _bf16_rtne(x_b)
            else:
                x_a_seen = x_a.to(DTYPE).to(tl.float32)
                x_b_seen = x_b.to(DTYPE).to(tl.float32)
            t_a = acc_a + gram_diag_a[:, None] * x_a
            t_b = acc_b + gram_diag_b[:, None] * x_b
            cov_a = c3 * t_a - c4 * x_a * (diag_a[None, :] + x_a * (x_a - x_a_seen))
            cov_b = c3 * t_b - c4 * x_b * (diag_b[None, :] + x_b * (x_b - x_b_seen))
        else:
            cov_a = acc_a
            cov_b = acc_b
        go = tl.load(go_ptr)
        grad_a = go * (invariance + hinge_a * x_a + c2 * cov_a)
        grad_b = go * (hinge_b * x_b + c2 * cov_b - invariance)
        if EMULATE_BF16:
            grad_a = _bf16_rtne(grad_a)
            grad_b = _bf16_rtne(grad_b)
        tl.store(out_a_ptr + out_offsets, grad_a.to(out_a_ptr.dtype.element_ty), mask=mask)
        tl.store(out_b_ptr + out_offsets, grad_b.to(out_b_ptr.dtype.element_ty), mask=mask)
    else:
        scale_a = tl.load(scale_ptr + cols, mask=col_mask, other=0.0)[None, :]
        scale_b = tl.load(scale_ptr + n_cols + cols, mask=col_mask, other=0.0)[None, :]
        hat_a = tl.where(mask, (z_a - shift_a) * scale_a, 0.0)
        hat_b = tl.where(mask, (z_b - shift_b) * scale_b, 0.0)
        if GRAM:
            if EMULATE_BF16:
                hat_a_seen = _bf16_rtne(hat_a)
                hat_b_seen = _bf16_rtne(hat_b)
            else:
                hat_a_seen = hat_a.to(DTYPE).to(tl.float32)
                hat_b_seen = hat_b.to(DTYPE).to(tl.float32)
            diag_grad = tl.load(vec_ptr + cols, mask=col_mask, other=0.0)[None, :]
            t_a = acc_a + gram_diag_a[:, None] * hat_a
            t_b = acc_b + gram_diag_b[:, None] * hat_b
            delta_a = c1 * t_a + hat_b * (diag_grad - c2 * (diag_a[None, :] + hat_b * (hat_a - hat_a_seen)))
            delta_b = c1 * t_b + hat_a * (diag_grad - c2 * (diag_b[None, :] + hat_a * (hat_b - hat_b_seen)))
        else:
            delta_a = c1 * acc_a
            delta_b = c1 * acc_b
        if FINALIZE:
            w_a = tl.load(vec_ptr + n_cols + cols, mask=col_mask, other=0.0)[None, :]
            w_b = tl.load(vec_ptr + 2 * n_cols + cols, mask=col_mask, other=0.0)[None, :]
            go = tl.load(go_ptr)
            # batch-norm backward; the column mean of δ vanishes (1ᵀB̂ = 0, 1ᵀG_b = 0)
            grad_a = go * scale_a * (delta_a - hat_a * w_a)
            grad_b = go * scale_b * (delta_b - hat_b * w_b)
            if EMULATE_BF16:
                grad_a = _bf16_rtne(grad_a)
                grad_b = _bf16_rtne(grad_b)
            tl.store(out_a_ptr + out_offsets, grad_a.to(out_a_ptr.dtype.element_ty), mask=mask)
            tl.store(out_b_ptr + out_offsets, grad_b.to(out_b_ptr.dtype.element_ty), mask=mask)
        else:
            sums = pid_rows.to(tl.int64) * n_cols + cols
            tl.store(out_a_ptr + sums, tl.sum(tl.where(mask, delta_a * hat_a, 0.0), axis=0), mask=col_mask)
            tl.store(out_b_ptr + sums, tl.sum(tl.where(mask, delta_b * hat_b, 0.0), axis=0), mask=col_mask)


@triton.jit
def _gram_backward_kernel(
    a_ptr,
    a_stride_n,
    a_stride_d,
    b_ptr,
    b_stride_n,
    b_stride_d,
    shift_ptr,
    scale_ptr,
    gram_for_a_ptr,
    gram_for_b_ptr,
    gram_diag_for_a_ptr,
    gram_diag_for_b_ptr,
    vec_ptr,
    go_ptr,
    out_a_ptr,
    out_b_ptr,
    n_rows,
    n_cols,
    c1,
    c2,
    c3,
    c4,
    VICREG: tl.constexpr,
    FINALIZE: tl.constexpr,
    SPLIT_GRAM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    """(N, d) tile (p, c) of gram_for_a·Ã and gram_for_b·B̃ over k in N, then
    :func:`_gradient_epilogue`. Barlow Twins passes (G_b, G_a), VICReg (G_a, G_b): N×N fp32
    Grams of the fp32 views V_v (standardized or centered), scaled by 1/d; Ṽ is V rounded to
    the input dtype.

    The Grams come without their diagonal, which the epilogue applies to the unrounded V: for
    N ≪ d, G ≈ (d/N)·tr-scaled identity, G·V is nearly parallel to V, and the batch-norm
    projection (Barlow Twins) or the diagonal subtraction (VICReg) removes most of it; a G_pp
    applied to a rounded Ṽ_pj would leave its rounding error, d·2⁻⁹·|V|, as the gradient.

    Both losses need these products without their d×d-diagonal part: with G = P Pᵀ (P the
    partner view: B̂ for a in Barlow Twins, X_a itself in VICReg), G Ṽ = P (Pᵀ Ṽ), whose
    diagonal part is P_pj·Σ_k P_kj Ṽ_kj. The loop accumulates exactly that sum (``diag_*``)
    from the very operands of the products, so that the subtraction in the epilogue cancels
    what the products hold, whatever the rounding of Ṽ.

    SPLIT_GRAM (half inputs, 2N > d): each Gram tile enters as hi + lo, so that it keeps ~16
    bits. Once N is comparable to d the diagonal part is a large share of the product, and a
    Gram rounded to 8 bits would leave the difference with few correct bits.
    """
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    DTYPE = a_ptr.dtype.element_ty
    rows_p = pid_p * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    valid_p = rows_p < n_rows
    col_mask = cols < n_cols
    a_cols = cols[None, :].to(tl.int64) * a_stride_d
    b_cols = cols[None, :].to(tl.int64) * b_stride_d
    shift_a = tl.load(shift_ptr + cols, mask=col_mask, other=0.0)[None, :]
    shift_b = tl.load(shift_ptr + n_cols + cols, mask=col_mask, other=0.0)[None, :]
    scale_a = tl.load(scale_ptr + cols, mask=col_mask, other=0.0)[None, :]
    scale_b = tl.load(scale_ptr + n_cols + cols, mask=col_mask, other=0.0)[None, :]
    acc_a = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    diag_a = tl.zeros([BLOCK_N], dtype=tl.float32)
    diag_b = tl.zeros([BLOCK_N], dtype=tl.float32)
    gram_rows = rows_p[:, None].to(tl.int64) * n_rows
    for k0 in range(0, n_rows, BLOCK_K):
        rows_k = k0 + tl.arange(0, BLOCK_K)
        valid_k = rows_k < n_rows
        gram_mask = valid_p[:, None] & valid_k[None, :]
        g_a = tl.load(gram_for_a_ptr + gram_rows + rows_k[None, :], mask=gram_mask, other=0.0)
        g_b = tl.load(gram_for_b_ptr + gram_rows + rows_k[None, :], mask=gram_mask, other=0.0)
        mask_k = valid_k[:, None] & col_mask[None, :]
        rows64 = rows_k[:, None].to(tl.int64)
        v_a = tl.load(a_ptr + rows64 * a_stride_n + a_cols, mask=mask_k, other=0.0).to(tl.float32)
        v_a = tl.where(mask_k, (v_a - shift_a) * scale_a, 0.0)
        v_b = tl.load(b_ptr + rows64 * b_stride_n + b_cols, mask=mask_k, other=0.0).to(tl.float32)
        v_b = tl.where(mask_k, (v_b - shift_b) * scale_b, 0.0)
        if EMULATE_BF16:
            g_a_hi = _bf16_rtne(g_a)
            g_b_hi = _bf16_rtne(g_b)
            v_a_op = _bf16_rtne(v_a)
            v_b_op = _bf16_rtne(v_b)
        else:
            g_a_hi = g_a.to(DTYPE)
            g_b_hi = g_b.to(DTYPE)
            v_a_op = v_a.to(DTYPE)
            v_b_op = v_b.to(DTYPE)
        if VICREG:
            diag_a += tl.sum(v_a * v_a_op.to(tl.float32), axis=0)
            diag_b += tl.sum(v_b * v_b_op.to(tl.float32), axis=0)
        else:
            diag_a += tl.sum(v_b * v_a_op.to(tl.float32), axis=0)
            diag_b += tl.sum(v_a * v_b_op.to(tl.float32), axis=0)
        acc_a = tl.dot(g_a_hi, v_a_op, acc_a, input_precision=DOT_PRECISION)
        acc_b = tl.dot(g_b_hi, v_b_op, acc_b, input_precision=DOT_PRECISION)
        if SPLIT_GRAM:
            g_a_lo = g_a - g_a_hi.to(tl.float32)
            g_b_lo = g_b - g_b_hi.to(tl.float32)
            if EMULATE_BF16:
                g_a_lo = _bf16_rtne(g_a_lo)
                g_b_lo = _bf16_rtne(g_b_lo)
            else:
                g_a_lo = g_a_lo.to(DTYPE)
                g_b_lo = g_b_lo.to(DTYPE)
            acc_a = tl.dot(g_a_lo, v_a_op, acc_a, input_precision=DOT_PRECISION)
            acc_b = tl.dot(g_b_lo, v_b_op, acc_b, input_precision=DOT_PRECISION)
    gram_diag_a = tl.load(gram_diag_for_a_ptr + rows_p, mask=valid_p, other=0.0)
    gram_diag_b = tl.load(gram_diag_for_b_ptr + rows_p, mask=valid_p, other=0.0)
    _gradient_epilogue(
        acc_a, acc_b, diag_a, diag_b, gram_diag_a, gram_diag_b, a_ptr, a_stride_n, a_stride_d, b_ptr,
        b_stride_n, b_stride_d, shift_ptr, scale_ptr, vec_ptr, go_ptr, out_a_ptr, out_b_ptr, rows_p, cols,
        pid_p, n_rows, n_cols, c1, c2, c3, c4, VICREG, True, FINALIZE, EMULATE_BF16,
    )  # fmt: skip


@triton.jit
def _cross_backward_kernel(
    a_ptr,
    a_stride_n,
    a_stride_d,
    b_ptr,
    b_stride_n,
    b_stride_d,
    shift_ptr,
    scale_ptr,
    mat_a_ptr,
    mat_a_stride_k,
    mat_a_stride_c,
    mat_b_ptr,
    mat_b_stride_k,
    mat_b_stride_c,
    vec_ptr,
    go_ptr,
    out_a_ptr,
    out_b_ptr,
    n_rows,
    n_cols,
    c1,
    c2,
    VICREG: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    """(N, d) tile (p, c) of left_a·mat_a and left_b·mat_b over k in d, then
    :func:`_gradient_epilogue`. Barlow Twins: left_a = B̃, mat_a = Gᵀ, left_b = Ã, mat_b = G.
    VICReg: left_v = X̃_v, mat_v = K_off of view v."""
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    DTYPE = a_ptr.dtype.element_ty
    rows = pid_p * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    valid_rows = rows < n_rows
    col_mask = cols < n_cols
    a_rows = rows[:, None].to(tl.int64) * a_stride_n
    b_rows = rows[:, None].to(tl.int64) * b_stride_n
    mat_a_cols = cols[None, :].to(tl.int64) * mat_a_stride_c
    mat_b_cols = cols[None, :].to(tl.int64) * mat_b_stride_c
    acc_a = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, n_cols, BLOCK_K):
        cols_k = k0 + tl.arange(0, BLOCK_K)
        valid_k = cols_k < n_cols
        shift_a = tl.load(shift_ptr + cols_k, mask=valid_k, other=0.0)[None, :]
        shift_b = tl.load(shift_ptr + n_cols + cols_k, mask=valid_k, other=0.0)[None, :]
        scale_a = tl.load(scale_ptr + cols_k, mask=valid_k, other=0.0)[None, :]
        scale_b = tl.load(scale_ptr + n_cols + cols_k, mask=valid_k, other=0.0)[None, :]
        mask = valid_rows[:, None] & valid_k[None, :]
        cols_k64 = cols_k[None, :].to(tl.int64)
        v_a = tl.load(a_ptr + a_rows + cols_k64 * a_stride_d, mask=mask, other=0.0).to(tl.float32)
        v_a = tl.where(mask, (v_a - shift_a) * scale_a, 0.0)
        v_b = tl.load(b_ptr + b_rows + cols_k64 * b_stride_d, mask=mask, other=0.0).to(tl.float32)
        v_b = tl.where(mask, (v_b - shift_b) * scale_b, 0.0)
        mat_mask = valid_k[:, None] & col_mask[None, :]
        k_rows = cols_k[:, None].to(tl.int64)
        m_a = tl.load(mat_a_ptr + k_rows * mat_a_stride_k + mat_a_cols, mask=mat_mask, other=0.0)
        m_b = tl.load(mat_b_ptr + k_rows * mat_b_stride_k + mat_b_cols, mask=mat_mask, other=0.0)
        if EMULATE_BF16:
            v_a = _bf16_rtne(v_a)
            v_b = _bf16_rtne(v_b)
            m_a = _bf16_rtne(m_a)
            m_b = _bf16_rtne(m_b)
        else:
            v_a = v_a.to(DTYPE)
            v_b = v_b.to(DTYPE)
            m_a = m_a.to(DTYPE)
            m_b = m_b.to(DTYPE)
        if VICREG:
            acc_a = tl.dot(v_a, m_a, acc_a, input_precision=DOT_PRECISION)
            acc_b = tl.dot(v_b, m_b, acc_b, input_precision=DOT_PRECISION)
        else:
            acc_a = tl.dot(v_b, m_a, acc_a, input_precision=DOT_PRECISION)
            acc_b = tl.dot(v_a, m_b, acc_b, input_precision=DOT_PRECISION)
    no_columns = tl.zeros([BLOCK_N], dtype=tl.float32)
    no_rows = tl.zeros([BLOCK_M], dtype=tl.float32)
    _gradient_epilogue(
        acc_a, acc_b, no_columns, no_columns, no_rows, no_rows, a_ptr, a_stride_n, a_stride_d, b_ptr,
        b_stride_n, b_stride_d, shift_ptr, scale_ptr, vec_ptr, go_ptr, out_a_ptr, out_b_ptr, rows, cols,
        pid_p, n_rows, n_cols, c1, c2, 1.0, 0.0, VICREG, False, True, EMULATE_BF16,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def column_stats(z_a: Tensor, z_b: Tensor, row_splits: int | None = None) -> Tensor:
    """Per-column statistics of two (N, d) views in one pass.

    Returns:
        (6, d) float32: mean_a, mean_b, M2_a = Σ(a−ā)², M2_b, Σ(a−ā)(b−b̄), Σ(a−b)².
    """
    n, d = z_a.shape
    if z_a.device.type == "cuda" and _FORCED_TILES is None:
        stats_block_n = stats_block_d = _CUDA_STATS_TILE
    else:
        stats_block_n, stats_block_d = _step(z_a, n), 2 * _tile(z_a, d)
    col_blocks = triton.cdiv(d, stats_block_d)
    row_blocks = triton.cdiv(n, stats_block_n)
    if row_splits is None:
        row_splits = max(1, _target_programs(z_a.device) // col_blocks)
    row_splits = max(1, min(row_splits, row_blocks, 65535))
    rows_per_split = triton.cdiv(row_blocks, row_splits) * stats_block_n
    row_splits = triton.cdiv(n, rows_per_split)  # every split holds at least one row
    partial = _new_buffer((row_splits, 6, d), dtype=torch.float32, device=z_a.device)
    _column_stats_kernel[(col_blocks, row_splits)](
        z_a, z_a.stride(0), z_a.stride(1), z_b, z_b.stride(0), z_b.stride(1), partial, n, d, rows_per_split,
        BLOCK_N=stats_block_n, BLOCK_D=stats_block_d, num_warps=_STATS_WARPS,
    )  # fmt: skip
    if row_splits == 1:
        return partial[0]
    # Merge the splits: the parallel-axis theorem, exact and free of cancellation
    counts = torch.clamp(n - torch.arange(row_splits, device=z_a.device) * rows_per_split, max=rows_per_split)
    weights = counts.to(torch.float32)[:, None]
    mean_a = (weights * partial[:, 0]).sum(0) / n
    mean_b = (weights * partial[:, 1]).sum(0) / n
    dev_a = partial[:, 0] - mean_a
    dev_b = partial[:, 1] - mean_b
    m2_a = partial[:, 2].sum(0) + (weights * dev_a * dev_a).sum(0)
    m2_b = partial[:, 3].sum(0) + (weights * dev_b * dev_b).sum(0)
    co = partial[:, 4].sum(0) + (weights * dev_a * dev_b).sum(0)
    return torch.stack([mean_a, mean_b, m2_a, m2_b, co, partial[:, 5].sum(0)])


def _views(z_a: Tensor, z_b: Tensor) -> Tuple:
    return (z_a, z_a.stride(0), z_a.stride(1), z_b, z_b.stride(0), z_b.stride(1))


def gram_forward(
    z_a: Tensor, z_b: Tensor, shift: Tensor, scale: Tensor, vicreg: bool, store_gram: bool
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """N×N Gram tiles of the standardized (Barlow Twins) or centered (VICReg) views.

    Args:
        z_a, z_b: (N, d) inputs; shift, scale: (2, d) float32 (per view, per column).
    Returns:
        partial (nb, nb) float32 whose sum is ⟨G_a, G_b⟩ (Barlow Twins) or ‖G_a‖² + ‖G_b‖²;
        diag (nb, d) or (nb, 2, d) column sums of â·b̂ or (â², b̂²) per row block;
        gram (2, N, N) float32 = (G_a, G_b)/d without their diagonal and gram_diag (2, N) that
        diagonal, if ``store_gram`` (else empty).
    """
    n, d = z_a.shape
    block, block_k = _tile(z_a, n), _step(z_a, d)
    blocks = triton.cdiv(n, block)
    device = z_a.device
    partial = _new_buffer((blocks, blocks), dtype=torch.float32, device=device)
    diag = _new_buffer((blocks, 2, d) if vicreg else (blocks, d), dtype=torch.float32, device=device)
    gram = _new_buffer((2, n, n) if store_gram else (2, 0, 0), dtype=torch.float32, device=device)
    gram_diag = _new_buffer((2, n) if store_gram else (2, 0), dtype=torch.float32, device=device)
    stores = (gram[0], gram[1], gram_diag[0], gram_diag[1]) if store_gram else (partial,) * 4
    _gram_forward_kernel[(blocks, blocks)](
        *_views(z_a, z_b), shift, scale, *stores, partial, diag, n, d, 1.0 / d,
        VICREG=vicreg, STORE_GRAM=store_gram, SPLIT=z_a.dtype != torch.float32, BLOCK=block, BLOCK_K=block_k,
        DOT_PRECISION=_dot_precision(device), EMULATE_BF16=_emulate_bf16(z_a), num_warps=_MATMUL_WARPS,
    )  # fmt: skip
    return partial, diag, gram, gram_diag


def cross_forward(
    z_a: Tensor, z_b: Tensor, shift: Tensor, scale: Tensor, vicreg: bool, inv_norm: float, lambda_param: float
) -> Tensor:
    """d×d tiles reduced to the loss in the tile. Returns (nb, nb) float32 partial sums of
    Σ(1−C_ii)² + λΣ_{i≠j}C_ij² (Barlow Twins) or Σ_{i≠j} K_a² + K_b² (VICReg)."""
    n, d = z_a.shape
    block, block_k = _tile(z_a, d), _step(z_a, n)
    blocks = triton.cdiv(d, block)
    partial = _new_buffer((blocks, blocks), dtype=torch.float32, device=z_a.device)
    _cross_tile_kernel[(blocks, blocks)](
        *_views(z_a, z_b), shift, scale, partial, partial, partial, partial, partial, n, d, inv_norm, lambda_param,
        VICREG=vicreg, BACKWARD=False, SPLIT=z_a.dtype != torch.float32, BLOCK=block, BLOCK_K=block_k,
        DOT_PRECISION=_dot_precision(z_a.device), EMULATE_BF16=_emulate_bf16(z_a),
        num_warps=_MATMUL_WARPS,
    )  # fmt: skip
    return partial


def cross_backward_matrix(
    z_a: Tensor, z_b: Tensor, shift: Tensor, scale: Tensor, vicreg: bool, inv_norm: float, lambda_param: float
) -> Tuple[Tensor, Tensor, Tensor]:
    """The d×d matrix the backward multiplies by: G = ∂L/∂C (Barlow Twins, (d, d)) with the
    partial sums row_sum (nb, d) = Σ_j C_ij G_ij and col_sum (nb, d) = Σ_i C_ij G_ij (Barlow
    Twins, G as (1, d, d)), or the off-diagonal (K_a, K_b) (VICReg, (2, d, d); the sums are
    returned as ``mat`` itself and mean nothing)."""
    n, d = z_a.shape
    block, block_k = _tile(z_a, d), _step(z_a, n)
    blocks = triton.cdiv(d, block)
    device = z_a.device
    mat = _new_buffer((2, d, d) if vicreg else (1, d, d), dtype=torch.float32, device=device)
    if vicreg:  # no sums; the kernel never touches these
        row_sum = col_sum = mat
    else:
        row_sum = _new_buffer((blocks, d), dtype=torch.float32, device=device)
        col_sum = _new_buffer((blocks, d), dtype=torch.float32, device=device)
    _cross_tile_kernel[(blocks, blocks)](
        *_views(z_a, z_b), shift, scale, mat, mat[0], mat[-1], row_sum, col_sum, n, d, inv_norm, lambda_param,
        VICREG=vicreg, BACKWARD=True, SPLIT=False, BLOCK=block, BLOCK_K=block_k,
        DOT_PRECISION=_dot_precision(device), EMULATE_BF16=_emulate_bf16(z_a), num_warps=_MATMUL_WARPS,
    )  # fmt: skip
    return mat, row_sum, col_sum


def gram_backward(
    z_a: Tensor,
    z_b: Tensor,
    shift: Tensor,
    scale: Tensor,
    gram_for_a: Tensor,
    gram_for_b: Tensor,
    gram_diag_for_a: Tensor,
    gram_diag_for_b: Tensor,
    vec: Tensor,
    grad_loss: Tensor,
    coefficients: Tuple[float, float, float, float],
    vicreg: bool,
    finalize: bool,
) -> Tuple[Tensor, Tensor]:
    """Launch :func:`_gram_backward_kernel` (``vec`` and ``coefficients``: see
    :func:`_gradient_epilogue`). Returns the two input gradients ((N, d), input dtype) when
    ``finalize`` (VICReg always), else the Barlow Twins batch-norm column sums (two (nb, d)
    float32 partials over row blocks)."""
    n, d = z_a.shape
    block_m, block_n, block_k = _tile(z_a, n), _tile(z_a, d), _step(z_a, n)
    row_blocks = triton.cdiv(n, block_m)
    device = z_a.device
    if finalize:
        out_a = _new_buffer((n, d), dtype=z_a.dtype, device=device)
        out_b = _new_buffer((n, d), dtype=z_b.dtype, device=device)
    else:
        out_a = _new_buffer((row_blocks, d), dtype=torch.float32, device=device)
        out_b = _new_buffer((row_blocks, d), dtype=torch.float32, device=device)
    _gram_backward_kernel[(row_blocks, triton.cdiv(d, block_n))](
        *_views(z_a, z_b), shift, scale, gram_for_a, gram_for_b, gram_diag_for_a, gram_diag_for_b, vec,
        grad_loss, out_a, out_b, n, d,
        *coefficients, VICREG=vicreg, FINALIZE=finalize, SPLIT_GRAM=z_a.dtype != torch.float32 and 2 * n > d,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_PRECISION=_dot_precision(device), EMULATE_BF16=_emulate_bf16(z_a), num_warps=_MATMUL_WARPS,
    )  # fmt: skip
    return out_a, out_b


def cross_backward(
    z_a: Tensor,
    z_b: Tensor,
    shift: Tensor,
    scale: Tensor,
    mat_a: Tensor,
    mat_b: Tensor,
    vec: Tensor,
    grad_loss: Tensor,
    coefficients: Tuple[float, float],
    vicreg: bool,
) -> Tuple[Tensor, Tensor]:
    """Launch :func:`_cross_backward_kernel` (``mat_a``, ``mat_b``: (d, d) views, any strides;
    ``vec`` and ``coefficients`` (c1, c2): see :func:`_gradient_epilogue`). Returns the two
    input gradients, (N, d) in the input dtype."""
    n, d = z_a.shape
    block_m, block_n, block_k = _tile(z_a, n), _tile(z_a, d), _step(z_a, d)
    out_a = _new_buffer((n, d), dtype=z_a.dtype, device=z_a.device)
    out_b = _new_buffer((n, d), dtype=z_b.dtype, device=z_b.device)
    _cross_backward_kernel[(triton.cdiv(n, block_m), triton.cdiv(d, block_n))](
        *_views(z_a, z_b), shift, scale, mat_a, mat_a.stride(0), mat_a.stride(1), mat_b, mat_b.stride(0),
        mat_b.stride(1), vec, grad_loss, out_a, out_b, n, d, *coefficients,
        VICREG=vicreg, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_PRECISION=_dot_precision(z_a.device),
        EMULATE_BF16=_emulate_bf16(z_a), num_warps=_MATMUL_WARPS,
    )  # fmt: skip
    return out_a, out_b


# --------------------------------------------------------------------------------------------
# Operators: forward and backward are torch.library custom ops with a registered autograd
# formula, so that torch.compile keeps each as one opaque node (no graph break, no tracing into
# the launchers) and autograd still connects them. The forward returns, beside the loss, what
# its backward needs (per-column statistics, the N×N Grams); those outputs carry no gradient.
# --------------------------------------------------------------------------------------------


def _upstream(grad_loss: Tensor) -> Tensor:
    """The incoming scalar gradient as a 1-element float32 buffer the kernels read (no host sync)."""
    return grad_loss.detach().to(torch.float32).reshape(1).contiguous()


def _empty(like: Tensor, *shape: int) -> Tensor:
    return like.new_empty(shape, dtype=torch.float32)


def _barlow_twins_forward(
    z_a: Tensor, z_b: Tensor, lambda_param: float, use_gram: bool, keep_for_backward: bool
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns the loss and, for the backward, shift = column means (2, d), inv_std (2, d),
    C's diagonal (d,) and, on the gram path with ``keep_for_backward``, the Grams (2, N, N)
    without their diagonal and that diagonal (2, N) (else empty)."""
    n, d = z_a.shape
    stats = column_stats(z_a, z_b)
    mean_a, mean_b, m2_a, m2_b, co = stats[0], stats[1], stats[2], stats[3], stats[4]
    inv_std = torch.rsqrt(torch.stack([m2_a, m2_b]) / n + BATCH_NORM_EPS)
    shift = torch.stack([mean_a, mean_b])
    c_diag = co * inv_std[0] * inv_std[1] / n
    gram, gram_diag = _empty(z_a, 2, 0, 0), _empty(z_a, 2, 0)
    if use_gram:
        partial, diag, gram, gram_diag = gram_forward(
            z_a, z_b, shift, inv_std, vicreg=False, store_gram=keep_for_backward
        )
        # ‖C‖² − Σ C_ii², the diagonal summed from the same tiles as the Grams
        diag_of_products = diag.sum(0) / n
        off_diag = partial.sum() / (n * n) - torch.dot(diag_of_products, diag_of_products)
        off_diag = off_diag.clamp_min(0)  # a sum of squares; rounding must not make it negative
        loss = torch.dot(1 - c_diag, 1 - c_diag) + lambda_param * off_diag
    else:
        partial = cross_forward(z_a, z_b, shift, inv_std, False, inv_norm=1.0 / n, lambda_param=lambda_param)
        loss = partial.sum()
    return loss, shift, inv_std, c_diag, gram, gram_diag


def _barlow_twins_backward(
    grad_loss: Tensor,
    z_a: Tensor,
    z_b: Tensor,
    shift: Tensor,
    inv_std: Tensor,
    c_diag: Tensor,
    gram: Tensor,
    gram_diag: Tensor,
    lambda_param: float,
    use_gram: bool,
) -> Tuple[Tensor, Tensor]:
    """The two input gradients (formulas in :class:`fastssl.decorrelation._BarlowTwinsFunction`)."""
    lam = lambda_param
    n, d = z_a.shape
    go = _upstream(grad_loss)
    if use_gram:
        # δ_a = (2λ/N²)(G_b Â − its diagonal part) + B̂·2(C_jj − 1)/N; the stored Grams carry 1/d
        diag_grad = 2 * (c_diag - 1) / n
        vec = torch.stack([diag_grad, torch.zeros_like(diag_grad), torch.zeros_like(diag_grad)])
        coefficients = (2 * lam * d / (n * n), 2 * lam / (n * n), 0.0, 0.0)
        args = (z_a, z_b, shift, inv_std, gram[1], gram[0], gram_diag[1], gram_diag[0])
        sums_a, sums_b = gram_backward(*args, vec, go, coefficients, vicreg=False, finalize=False)
        # batch-norm's w = mean_b(δ Â) per column, from the row-block partial sums
        vec[1] = sums_a.sum(0) / n
        vec[2] = sums_b.sum(0) / n
        return gram_backward(*args, vec, go, coefficients, vicreg=False, finalize=True)
    mat, row_sum, col_sum = cross_backward_matrix(z_a, z_b, shift, inv_std, False, inv_norm=1.0 / n, lambda_param=lam)
    dl_dc = mat[0]
    vec = torch.stack([torch.zeros_like(c_diag), row_sum.sum(0) / n, col_sum.sum(0) / n])
    return cross_backward(z_a, z_b, shift, inv_std, dl_dc.T, dl_dc, vec, go, (1.0 / n, 0.0), vicreg=False)


def _vicreg_forward(
    z_a: Tensor,
    z_b: Tensor,
    lambda_param: float,
    mu_param: float,
    nu_param: float,
    eps: float,
    use_gram: bool,
    keep_for_backward: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns the loss and, for the backward, shift = column means (2, d), the hinge factors
    −μ[σ<1]/(2d(N−1)σ) (2, d) and, on the gram path with ``keep_for_backward``, the Grams
    (2, N, N) without their diagonal and that diagonal (2, N) (else empty)."""
    n, d = z_a.shape
    stats = column_stats(z_a, z_b)
    shift = stats[0:2].contiguous()
    var = stats[2:4] / (n - 1)
    std = torch.sqrt(var + eps)
    invariance = stats[5].sum() / (n * d)
    variance = torch.relu(1 - std).mean(dim=1).sum()
    ones = torch.ones_like(shift)
    gram, gram_diag = _empty(z_a, 2, 0, 0), _empty(z_a, 2, 0)
    if use_gram:
        partial, diag, gram, gram_diag = gram_forward(
            z_a, z_b, shift, ones, vicreg=True, store_gram=keep_for_backward
        )
        k_diag = diag.sum(0) / (n - 1)  # (2, d): diag K of each view, summed from the Grams' tiles
        off = (partial.sum() / ((n - 1) ** 2) - (k_diag * k_diag).sum()).clamp_min(0)
    else:
        off = cross_forward(z_a, z_b, shift, ones, vicreg=True, inv_norm=1.0 / (n - 1), lambda_param=0.0).sum()
    covariance = off / d
    # ½μ · hinge'(σ) · ∂σ/∂x per column, 0 where the hinge is flat (σ >= 1, as relu's gradient at 0)
    hinge = torch.where(std < 1, -0.5 * mu_param / (d * (n - 1)) / std, torch.zeros_like(std))
    loss = lambda_param * invariance + mu_param * 0.5 * variance + nu_param * covariance
    return loss, shift, hinge, gram, gram_diag


def _vicreg_backward(
    grad_loss: Tensor,
    z_a: Tensor,
    z_b: Tensor,
    shift: Tensor,
    hinge: Tensor,
    gram: Tensor,
    gram_diag: Tensor,
    lambda_param: float,
    nu_param: float,
    use_gram: bool,
) -> Tuple[Tensor, Tensor]:
    """The two input gradients (formulas in :class:`fastssl.decorrelation._VICRegFunction`)."""
    n, d = z_a.shape
    go = _upstream(grad_loss)
    ones = torch.ones_like(shift)
    invariance_coef = 2 * lambda_param / (n * d)
    cov_coef = 4 * nu_param / (d * (n - 1))
    if use_gram:
        coefficients = (invariance_coef, cov_coef, d / (n - 1), 1 / (n - 1))  # the stored Grams carry 1/d
        return gram_backward(
            z_a, z_b, shift, ones, gram[0], gram[1], gram_diag[0], gram_diag[1], hinge, go, coefficients,
            vicreg=True, finalize=True,
        )  # fmt: skip
    k_off, _, _ = cross_backward_matrix(z_a, z_b, shift, ones, True, inv_norm=1.0 / (n - 1), lambda_param=0.0)
    return cross_backward(z_a, z_b, shift, ones, k_off[0], k_off[1], hinge, go, (invariance_coef, cov_coef), vicreg=True)


_barlow_twins_op = torch.library.custom_op(
    "fastssl::decorrelation_barlow_twins",
    _barlow_twins_forward,
    mutates_args=(),
    schema="(Tensor z_a, Tensor z_b, float lambda_param, bool use_gram, bool keep_for_backward) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
_barlow_twins_backward_op = torch.library.custom_op(
    "fastssl::decorrelation_barlow_twins_backward",
    _barlow_twins_backward,
    mutates_args=(),
    schema="(Tensor grad_loss, Tensor z_a, Tensor z_b, Tensor shift, Tensor inv_std, Tensor c_diag, "
    "Tensor gram, Tensor gram_diag, float lambda_param, bool use_gram) -> (Tensor, Tensor)",
)
_vicreg_op = torch.library.custom_op(
    "fastssl::decorrelation_vicreg",
    _vicreg_forward,
    mutates_args=(),
    schema="(Tensor z_a, Tensor z_b, float lambda_param, float mu_param, float nu_param, float eps, "
    "bool use_gram, bool keep_for_backward) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
_vicreg_backward_op = torch.library.custom_op(
    "fastssl::decorrelation_vicreg_backward",
    _vicreg_backward,
    mutates_args=(),
    schema="(Tensor grad_loss, Tensor z_a, Tensor z_b, Tensor shift, Tensor hinge, Tensor gram, "
    "Tensor gram_diag, float lambda_param, float nu_param, bool use_gram) -> (Tensor, Tensor)",
)


def _stored_grams(z: Tensor, use_gram: bool, keep: bool) -> Tuple[Tensor, Tensor]:
    n = z.shape[0] if use_gram and keep else 0
    return _empty(z, 2, n, n), _empty(z, 2, n)


@_barlow_twins_op.register_fake
def _(z_a, z_b, lambda_param, use_gram, keep_for_backward):
    d = z_a.shape[1]
    return (_empty(z_a), _empty(z_a, 2, d), _empty(z_a, 2, d), _empty(z_a, d)) + _stored_grams(
        z_a, use_gram, keep_for_backward
    )


@_vicreg_op.register_fake
def _(z_a, z_b, lambda_param, mu_param, nu_param, eps, use_gram, keep_for_backward):
    d = z_a.shape[1]
    return (_empty(z_a), _empty(z_a, 2, d), _empty(z_a, 2, d)) + _stored_grams(z_a, use_gram, keep_for_backward)


@_barlow_twins_backward_op.register_fake
def _(grad_loss, z_a, z_b, *rest):
    return z_a.new_empty(z_a.shape), z_b.new_empty(z_b.shape)


@_vicreg_backward_op.register_fake
def _(grad_loss, z_a, z_b, *rest):
    return z_a.new_empty(z_a.shape), z_b.new_empty(z_b.shape)


def _barlow_twins_setup(ctx, inputs, output) -> None:
    z_a, z_b, lambda_param, use_gram, _ = inputs
    _, shift, inv_std, c_diag, gram, gram_diag = output
    ctx.save_for_backward(z_a, z_b, shift, inv_std, c_diag, gram, gram_diag)
    ctx.lambda_param, ctx.use_gram = lambda_param, use_gram


def _barlow_twins_gradient(ctx, grad_loss, *_auxiliary):
    grads = _barlow_twins_backward_op(grad_loss, *ctx.saved_tensors, ctx.lambda_param, ctx.use_gram)
    return grads[0], grads[1], None, None, None


def _vicreg_setup(ctx, inputs, output) -> None:
    z_a, z_b, lambda_param, _, nu_param, _, use_gram, _ = inputs
    _, shift, hinge, gram, gram_diag = output
    ctx.save_for_backward(z_a, z_b, shift, hinge, gram, gram_diag)
    ctx.lambda_param, ctx.nu_param, ctx.use_gram = lambda_param, nu_param, use_gram


def _vicreg_gradient(ctx, grad_loss, *_auxiliary):
    grads = _vicreg_backward_op(grad_loss, *ctx.saved_tensors, ctx.lambda_param, ctx.nu_param, ctx.use_gram)
    return grads[0], grads[1], None, None, None, None, None, None


_barlow_twins_op.register_autograd(_barlow_twins_gradient, setup_context=_barlow_twins_setup)
_vicreg_op.register_autograd(_vicreg_gradient, setup_context=_vicreg_setup)


# --------------------------------------------------------------------------------------------
# Entry points (called by fastssl.decorrelation after validation)
# --------------------------------------------------------------------------------------------


def _common_dtype(z_a: Tensor, z_b: Tensor) -> Tuple[Tensor, Tensor]:
    """tl.dot needs one operand dtype: views of different dtypes meet at the promoted one."""
    if z_a.dtype == z_b.dtype:
        return z_a, z_b
    dtype = torch.promote_types(z_a.dtype, z_b.dtype)
    return z_a.to(dtype), z_b.to(dtype)


def barlow_twins_loss_triton(z_a: Tensor, z_b: Tensor, lambda_param: float, path: str = "auto") -> Tensor:
    """Barlow Twins on the Triton kernels.

    Args:
        z_a, z_b: (N, d) views, N >= 2, float32/float16/bfloat16 (float64 runs the PyTorch path,
            which accumulates in float64), any strides.
        lambda_param: weight of the off-diagonal term.
        path: ``"gram"`` (N×N tiles), ``"cross"`` (d×d tiles) or ``"auto"`` (gram when N < d).
    Returns:
        0-d float32 loss.
    """
    z_a, z_b = _common_dtype(z_a, z_b)
    if z_a.dtype == torch.float64:
        return _barlow_twins_torch(z_a, z_b, lambda_param, path)
    n, d = z_a.shape
    keep = torch.is_grad_enabled() and (z_a.requires_grad or z_b.requires_grad)
    return _barlow_twins_op(z_a, z_b, float(lambda_param), _use_gram(n, d, path), keep)[0]


def vicreg_loss_triton(
    z_a: Tensor,
    z_b: Tensor,
    lambda_param: float,
    mu_param: float,
    nu_param: float,
    eps: float,
    path: str = "auto",
) -> Tensor:
    """VICReg on the Triton kernels (arguments as :func:`barlow_twins_loss_triton`, weights and
    eps as :func:`fastssl.decorrelation.vicreg_loss`). Returns a 0-d float32 loss."""
    z_a, z_b = _common_dtype(z_a, z_b)
    if z_a.dtype == torch.float64:
        return _vicreg_torch(z_a, z_b, lambda_param, mu_param, nu_param, eps, path)
    n, d = z_a.shape
    keep = torch.is_grad_enabled() and (z_a.requires_grad or z_b.requires_grad)
    hyper = (float(lambda_param), float(mu_param), float(nu_param), float(eps))
    return _vicreg_op(z_a, z_b, *hyper, _use_gram(n, d, path), keep)[0]
