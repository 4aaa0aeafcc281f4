r"""Tile helpers of the Barlow Twins / VICReg kernels: operand rounding and the one tile product.

Every matrix product of the decorrelation kernels -- the N×N Grams and the d×d cross products
in the forward, the (N, d) gradient products in the backward, for view A and for view B -- is
:func:`tile_product`: a (BLOCK_M, BLOCK_N) fp32 accumulator of ``left · right`` over a range of
the reduction axis, with either operand given as hi + lo (two values of the input's half
dtype) when it must carry ~16 bits instead of the 8 (bf16) or 11 (fp16) of a single rounding.
The operands are read from buffers the standardization kernel wrote once (see
:mod:`fastssl.kernels.decorrelation_stats`); the loads go straight into ``tl.dot``, so Triton
pipelines them (cp.async on sm_80+, wgmma on sm_90) with no arithmetic in between.

Both operands are addressed through (element-of-the-tile, reduction) strides, so the same
helper reads rows of the (N, d) operands (Gram: reduction over features), columns of them
(cross products: reduction over the batch) or a stored (N, N) / (d, d) matrix, transposed or
not. The interpreter (``TRITON_INTERPRET=1``) stores bfloat16 as raw 16-bit integers and cannot
multiply it: there (``EMULATE_BF16``) the operands are widened to float32 and multiplied in IEEE
float32, which is exact for products of bfloat16 values, so a CPU test sees the GPU's numbers
up to summation order.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_operand(x, DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """float32 ``x`` rounded to nearest-even in DTYPE. The interpreter truncates float32 →
    bfloat16 (the GPU rounds): under it the bits are rounded here first, after which the
    conversion is exact."""
    if EMULATE_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def tile_product(
    acc,
    left_ptr,
    left_lo_ptr,
    left_idx,
    left_valid,
    left_stride_m,
    left_stride_k,
    right_ptr,
    right_lo_ptr,
    right_idx,
    right_valid,
    right_stride_n,
    right_stride_k,
    k_start,
    k_end,
    LEFT_LO: tl.constexpr,
    RIGHT_LO: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    """``acc`` (BLOCK_M, BLOCK_N) fp32 plus Σ_{k_start <= k < k_end} left[m, k]·right[k, n].

    left[m, k] is at ``left_ptr + left_idx[m]·left_stride_m + k·left_stride_k`` (zero where
    ``left_valid[m]`` is false or k >= k_end), right[k, n] likewise with ``right_idx``. With
    LEFT_LO / RIGHT_LO the operand is hi + lo (``*_lo_ptr`` the lo part at the same offsets) and
    the product is hi·hi + lo·hi + hi·lo: the lo·lo term is below the accumulator's rounding.
    Offsets are int64 at the base and advance by pointer increments (no int32 overflow for
    buffers over 2**31 elements). Per reduction step of BLOCK_K, 2·BLOCK_M·BLOCK_N·BLOCK_K
    flops per product term against (BLOCK_M + BLOCK_N)·BLOCK_K loaded elements per part.
    """
    ks = tl.arange(0, BLOCK_K)
    left_offsets = left_idx[:, None].to(tl.int64) * left_stride_m + (k_start + ks)[None, :].to(tl.int64) * left_stride_k
    right_offsets = right_idx[None, :].to(tl.int64) * right_stride_n + (k_start + ks)[:, None].to(tl.int64) * right_stride_k
    left_ptrs = left_ptr + left_offsets
    right_ptrs = right_ptr + right_offsets
    left_lo_ptrs = left_lo_ptr + left_offsets
    right_lo_ptrs = right_lo_ptr + right_offsets
    left_step = BLOCK_K * left_stride_k
    right_step = BLOCK_K * right_stride_k
    for k0 in range(k_start, k_end, BLOCK_K):
        k_valid = (k0 + ks) < k_end
        left_mask = left_valid[:, None] & k_valid[None, :]
        right_mask = k_valid[:, None] & right_valid[None, :]
        left = tl.load(left_ptrs, mask=left_mask, other=0.0)
        right = tl.load(right_ptrs, mask=right_mask, other=0.0)
        if EMULATE_BF16:
            left = left.to(tl.float32)
            right = right.to(tl.float32)
        acc = tl.dot(left, right, acc, input_precision=DOT_PRECISION)
        if LEFT_LO:
            left_lo = tl.load(left_lo_ptrs, mask=left_mask, other=0.0)
            if EMULATE_BF16:
                left_lo = left_lo.to(tl.float32)
            acc = tl.dot(left_lo, right, acc, input_precision=DOT_PRECISION)
            left_lo_ptrs += left_step
        if RIGHT_LO:
            right_lo = tl.load(right_lo_ptrs, mask=right_mask, other=0.0)
            if EMULATE_BF16:
                right_lo = right_lo.to(tl.float32)
            acc = tl.dot(left, right_lo, acc, input_precision=DOT_PRECISION)
            right_lo_ptrs += right_step
        left_ptrs += left_step
        right_ptrs += right_step
    return acc


@triton.jit
def upper_triangle_tile(t, n_blocks, UPPER: tl.constexpr):
    """Tile (p, q) of a square grid of ``n_blocks`` × ``n_blocks`` tiles for the linear index t:
    with UPPER the tiles q >= p in row-major order (symmetric products compute only those),
    otherwise all tiles row-major."""
    if UPPER:
        p = t * 0
        remaining = t
        while remaining >= n_blocks - p:
            remaining -= n_blocks - p
            p += 1
        q = p + remaining
    else:
        p = t // n_blocks
        q = t % n_blocks
    return p, q
