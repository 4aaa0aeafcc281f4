r"""Barlow Twins and VICReg on Triton: launch plans, launchers and the torch.library custom ops.

Both losses depend on a d×d matrix -- Barlow Twins on C = ÂᵀB̂/N of the batch-standardized
views, VICReg on K_v = X_vᵀX_v/(N−1) of each centered view -- only through its diagonal and its
squared Frobenius norm (derivations in :mod:`fastssl.decorrelation`). The kernels, by role:

* :mod:`~fastssl.kernels.decorrelation_stats` -- column statistics and the standardized operands,
  written once per call (hi + lo in the input dtype for half inputs); the scalar loss assembled
  from partial sums on the device;
* :mod:`~fastssl.kernels.decorrelation_gram` -- N < d: the N×N Grams (split-K), and the (N, d)
  gradient products with the whole gradient formula in their epilogue;
* :mod:`~fastssl.kernels.decorrelation_cross` -- N >= d: the d×d matrix in tiles (split-K), and
  the gradient products;
* :mod:`~fastssl.kernels.decorrelation_tiles` -- the one tile product every kernel above uses.

This module decides nothing about *whether* to use them (float64, the choice of path, the
fallback to the torch path: :mod:`fastssl.decorrelation`); it plans each launch from the shapes
(:func:`plan`), allocates, launches, and registers forward and backward as custom ops.

Launches per call (forward + backward), N < d: statistics (1, VICReg 2), Gram partial tiles,
Gram finish (when split-K, or N not a multiple of 16), loss; backward 1. Eager PyTorch ops
around them: the loss, one float32 workspace and one operand buffer in the forward, the two
gradients (and, Barlow Twins at N > 256, a float32 scratch) in the backward -- no host sync:
every count is a shape, the incoming gradient is read by the kernels from the device.

Precision. Half-precision inputs are standardized in fp32 and must be rounded to enter tensor
cores. The forward products take each operand as hi + lo (hi·hi + lo·hi + hi·lo) so that the
loss is good to ~16 bits, not to the 8 of a bf16 operand: the loss is a sum of squares of these
products, and a user comparing backends sees the same number. The backward products use
single-rounded view operands; on the gram path the Grams' own diagonal and the d×d-diagonal
correction are applied in fp32 (see :mod:`~fastssl.kernels.decorrelation_gram`), and with
2N > d the Gram enters as hi + lo. fp32 inputs use IEEE fp32 products throughout (TF32 when
``torch.backends.cuda.matmul.allow_tf32`` is set).

Predictions (H200: 790 TFLOP/s bf16 dense, 4.3 TB/s; floor = max(6N²d / 790 TFLOP/s,
(6Nd·e + 8N²) / 4.3 TB/s), the fewest flops and bytes of forward + backward on the gram path),
bf16, forward + backward, Barlow Twins (VICReg within ±15 %):

* N = 256, d = 8192: floor 6.0 µs (bandwidth: 25.7 MB). Before: 10 Gram programs on 132 SMs,
  the backward product run twice, ~45 eager ops: an estimated 1-2 % of the floor. Now:
  statistics + operands ~8 µs (256 programs, inputs read twice, 17 MB of operands written),
  Gram split-K ~6-8 µs (260 programs), finish ~2 µs (80), loss ~2 µs, backward ~9 µs (512
  programs, one product): ~30 µs, ~20 % of the floor -- latency- and launch-bound (5 launches,
  7 eager ops).
* N = 2048, d = 8192: floor 261 µs (compute: 206 GFLOP). Before: the Gram path spent 14N²d on
  tensor cores with more issue slots in standardize-on-load arithmetic than in wgmma, an
  estimated ≤ 5 % (slower than the float32 cuBLAS torch path). Now: 10N²d = 344 GFLOP of pure
  load → wgmma tiles (528 + 256 programs) at ~50 % of peak = 0.87 ms, plus ~0.12 ms of
  operand writing and δ scratch: ~1.0 ms, ~25 % of the floor. What would close more of the gap:
  128×128 tiles with 8 warps (intensity ×2), and dropping the lo·hi forward products at this
  shape (the loss is then good to bf16's 8 bits, 2N²d less).
* float32 inputs run IEEE fp32 products on the FMA pipe (~25 TFLOP/s): N = 2048, d = 8192
  ~8 ms, where cuBLAS SGEMM (the torch path) wins; ``auto`` then runs the torch path (cost
  model in :mod:`fastssl.decorrelation`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
from torch import Tensor

from .decorrelation_cross import _cross_backward_kernel, _cross_finish_kernel, _cross_partial_kernel
from .decorrelation_gram import _gram_backward_kernel, _gram_finish_kernel, _gram_partial_kernel
from .decorrelation_stats import BLK_SLOTS, COL_ROWS, _loss_kernel, _standardize_kernel

# --------------------------------------------------------------------------------------------
# Tile tables
# --------------------------------------------------------------------------------------------
#
# CUDA: 64×64 product tiles, reduction step 32 (fp16/bf16: two wgmma k-steps) or 16 (fp32 IEEE
# products run on the FMA pipe with operands in registers), 4 warps for the square products,
# 8 for the gradient tiles (whose epilogue holds five fp32 tiles); statistics 64 rows × 32
# columns (256 programs at d = 8192), 4 warps. Sizes chosen so that ptxas (sm_90, Triton 3.6
# and 3.9) allocates every kernel without spills. The interpreter runs each program as NumPy
# calls: there tiles are fitted to the extents (powers of two within [16, 256]) and nothing is
# split. Tests set _FORCED_TILES = (tile, reduction step) and _FORCED_SPLITS to run multi-tile
# loops, masks and split-K on small inputs.
#
# Three departures from these tables, all found by compiling the captured launches of small and
# odd shapes for sm_90 (benchmarks/launch_capture.py); none applies at the headline shapes,
# whose plans are the tables' (N >= 64 and both N and d multiples of 16):
#
# * Tiles no larger than the product. A product tile's side is N (Gram) or d (cross) rounded up
#   to a power of two within [16, 64], and a gradient tile has at most that many rows (N). At
#   N = 2 a 64×64 Gram tile is 99.9 % padding, yet its loads (row stride d) and its epilogue's
#   Gram stores (row stride N) run element by element over all of it: 255 registers and 744 B
#   of spills (Barlow Twins N = 2, d = 7 bf16; likewise N = 5, d = 33 fp32 and VICReg N = 3,
#   d = 17 fp16, under Triton 3.6 and 3.9). A 16×16 tile needs 72-127 registers; it runs on
#   mma.sync instead of wgmma (M = 64), which does not matter for a product of that size.
# * d not a multiple of 16. The operands are (N, d) rows of stride d: Triton then cannot prove
#   16-byte alignment, loads every element of a tile alone with its own 64-bit address and mask
#   (no vectors, no cp.async), and a 64×32 half-precision step of the four hi/lo operand tiles
#   fills the register file: 255 registers and spills at N = 200, d = 1000 bf16 (Gram product;
#   Barlow Twins' gradient: 232 B under Triton 3.6) and at N = 1000, d = 100 (cross product).
#   There the products take reduction steps of 16 and, in 64-wide tiles, 8 warps (118-142
#   registers), the gradient tiles half the columns and steps of 16 (64-215 registers). fp32
#   keeps its step of 16 (a step of 8 does not compile under Triton 3.6): its 8 warps suffice.
# * N not a multiple of 16 on the gram path with a backward to come. A Gram tile finished in
#   place stores both Grams (hi and lo, and mirrored) element by element at row stride N, with
#   both 64×64 fp32 accumulators live: 255 registers and 15-456 B of spills (N = 100, d = 128;
#   N = 1000, d = 2048 or 8192; N = 2001, d = 4096, bf16). There the product kernel writes its
#   tiles to the split-K buffer even with one range, and the finishing kernel stores the Grams
#   in 4-row chunks (103-108 and 32 registers), at the cost of one launch and 2·T·16 KB
#   written and read again (N = 2001: 17 MB, ~8 µs against ~250 µs of Gram product).
_CUDA_TILE = 64
_CUDA_MIN_TILE = 16
_CUDA_STEP = {torch.float32: 16, torch.float16: 32, torch.bfloat16: 32}
_CUDA_UNALIGNED_STEP = 16
_CUDA_STATS_ROWS = 64
_CUDA_STATS_COLS = 32
_PRODUCT_WARPS = 4
_UNALIGNED_PRODUCT_WARPS = 8
_GRADIENT_WARPS = 8
_STATS_WARPS = 4
_LOSS_BLOCK = 256
# Rows of a product tile per program of the split-K finishing kernels (64/8 = 8 programs a tile);
# 4 for Grams of N not a multiple of 16 (at 8, ptxas of Triton 3.6 spills 1-4 B at N = 136,
# 184, 200: N ≡ 8 mod 16 with split-K)
_CUDA_FINISH_ROWS = 8
_CUDA_UNALIGNED_FINISH_ROWS = 4
# Barlow Twins' gram backward keeps a whole column panel of δ in registers up to this N, in
# tiles of this many fp32 elements (32 per thread at 8 warps; half that with unaligned rows)
_SINGLE_PASS_ROWS = 256
_SINGLE_PASS_ELEMENTS = 8192
_FORCED_TILES: Optional[Tuple[int, int]] = None
_FORCED_SPLITS: Optional[int] = None

# Buffers are allocated through this; tests replace it with a NaN-filled allocation to check
# that every element a kernel is meant to fill is written.
_new_buffer = torch.empty


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# The target the kernels are tuned for (H100/H200), used to plan CUDA launches where no CUDA
# device can be queried (a launch capture on a machine without a GPU)
_DEFAULT_SMS = 132


@functools.lru_cache(maxsize=None)
def _sm_count_of(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (a host-side query, cached: no sync per call)."""
    if not torch.cuda.is_available():
        return _DEFAULT_SMS
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


def _cuda_tile(extent: int) -> int:
    """Side of a CUDA product tile over ``extent`` rows or columns: the table's 64, or less for a
    smaller product (see the tile tables)."""
    return min(_CUDA_TILE, max(_CUDA_MIN_TILE, _next_pow2(extent)))


def _is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


@dataclass(frozen=True)
class Plan:
    """Every size, offset and launch parameter of one call, a function of the shapes only (the
    fake implementations and the backward recompute it; nothing is read from the device)."""

    n: int
    d: int
    vicreg: bool
    gram: bool
    keep: bool
    parts: int  # operand parts: 2 (hi, lo) for half inputs, 1 for float32
    split_gram: bool  # the backward's Gram operand as hi + lo (half inputs, 2N > d)
    cuda: bool
    # statistics
    stats_rows: int
    stats_cols: int
    stats_blocks: int
    # products
    block: int
    block_k: int
    product_warps: int
    tile_blocks: int  # blocks per side of the N×N or d×d product
    tiles: int
    splits: int
    k_chunk: int
    finish_in_place: bool  # the product kernel finishes its tiles (else the finishing kernel)
    finish_rows: int  # rows of a tile per finishing program (split-K)
    finish_chunks: int  # programs per tile of the finishing kernel (1 when finished in place)
    # backward tiles
    grad_block_m: int
    grad_block_n: int
    grad_block_k: int
    single: bool  # Barlow Twins gram backward: the whole column panel in registers
    # workspace (float32) offsets
    blk_offset: int
    tile_offset: int
    gdiag_offset: int
    sums_offset: int
    split_offset: int
    workspace_size: int
    # operand buffer (input dtype)
    mat_base: int
    operand_size: int

    @property
    def stats_programs(self) -> int:
        return self.stats_blocks

    @property
    def product_grid(self) -> Tuple[int, int]:
        return (self.tiles, self.splits)

    @property
    def gradient_grid(self) -> Tuple[int, int]:
        rows = 1 if (self.gram and not self.vicreg) else triton.cdiv(self.n, self.grad_block_m)
        return (2 * rows, triton.cdiv(self.d, self.grad_block_n))

    @property
    def scratch_size(self) -> int:
        """float32 (2, N, d) for Barlow Twins' gram backward above ``_SINGLE_PASS_ROWS``."""
        return 2 * self.n * self.d if (self.gram and not self.vicreg and not self.single) else 0


def _splits(tiles: int, k_extent: int, block_k: int, cuda: bool, sms: int) -> Tuple[int, int]:
    """Split-K: (ranges S, range length). Enough ranges that T·S fills two programs per SM,
    each range at least 4 reduction steps; one range when the tiles alone fill the chip, and on
    the interpreter (whose programs run one after another)."""
    if _FORCED_SPLITS is not None:
        chunk = triton.cdiv(triton.cdiv(k_extent, _FORCED_SPLITS), block_k) * block_k
        return triton.cdiv(k_extent, chunk), chunk
    if not cuda or tiles >= sms:
        return 1, k_extent
    wanted = triton.cdiv(2 * sms, tiles)
    chunk = max(4 * block_k, triton.cdiv(triton.cdiv(k_extent, wanted), block_k) * block_k)
    return triton.cdiv(k_extent, chunk), chunk


def plan(
    n: int, d: int, dtype: torch.dtype, device: torch.device, vicreg: bool, use_gram: bool, keep: bool,
    sms: Optional[int] = None,
) -> Plan:
    """The launch plan of one call. ``sms``: multiprocessors of the target (default: the device's;
    the launch report passes 132 to plan an H100/H200 from a machine without a GPU).

    Headline shapes on 132 SMs (bf16; programs per launch, forward then backward):

    ========================  =====================================================================
    N = 256, d = 8192         stats 256 (2×256 VICReg) · Gram partial 10 tiles × 26 ranges = 260 ·
                              finish 10 · loss 1 | backward 2 × 256 (Barlow Twins, δ in registers)
                              or 2·4 × 128 (VICReg)
    N = 2048, d = 8192        stats 256 · Gram 528 tiles × 1 (finished in place) · loss 1 |
                              backward 2 × 128 (Barlow Twins, δ through the scratch) or 2·32 × 128
    ========================  =====================================================================

    Below N = 64 (Gram) or d = 64 (cross), and with d not a multiple of 16, tiles, steps and
    warps shrink, and with N not a multiple of 16 the Gram tiles are finished by the finishing
    kernel, so that no launch spills (see the tile tables above).
    """
    cuda = _is_cuda(device) if sms is None else True
    if cuda and sms is None:
        sms = _sm_count(device)
    half = dtype != torch.float32
    parts = 2 if half else 1
    forced = _FORCED_TILES
    if forced is not None:
        stats_rows, stats_cols = forced[1], forced[0]
    elif cuda:
        stats_rows, stats_cols = _CUDA_STATS_ROWS, _CUDA_STATS_COLS
    else:
        stats_rows, stats_cols = min(128, max(16, _next_pow2(n))), min(256, max(16, _next_pow2(d)))
    stats_blocks = triton.cdiv(d, stats_cols)

    product_extent, k_extent = (n, d) if use_gram else (d, n)
    # d not a multiple of 16: element-wise operand loads (see the tile tables)
    unaligned = d % 16 != 0
    product_warps = _PRODUCT_WARPS
    if forced is not None:
        block, block_k = forced
    elif cuda:
        block, block_k = _cuda_tile(product_extent), _CUDA_STEP[dtype]
        if unaligned:
            block_k = min(block_k, _CUDA_UNALIGNED_STEP)
            if block == _CUDA_TILE:
                product_warps = _UNALIGNED_PRODUCT_WARPS
    else:
        block, block_k = min(256, max(16, _next_pow2(product_extent))), min(128, max(16, _next_pow2(k_extent)))
    tile_blocks = triton.cdiv(product_extent, block)
    symmetric = use_gram or vicreg
    tiles = tile_blocks * (tile_blocks + 1) // 2 if symmetric else tile_blocks * tile_blocks
    splits, k_chunk = _splits(tiles, k_extent, block_k, cuda, sms or 1)
    finish_in_place = splits == 1
    if cuda and forced is None and use_gram and keep and n % 16 and block == _CUDA_TILE:
        # the Grams' element-wise stores (row stride N) through the finishing kernel's row chunks
        finish_in_place = False
    finish_rows = block
    if not finish_in_place:
        if cuda and forced is None:
            finish_rows = min(block, _CUDA_UNALIGNED_FINISH_ROWS if use_gram and n % 16 else _CUDA_FINISH_ROWS)
        else:
            finish_rows = max(1, block // 2)
    finish_chunks = block // finish_rows

    grad_k_extent = n if use_gram else d
    single = False
    if forced is not None:
        grad_block_m = grad_block_n = forced[0]
        grad_block_k = forced[1]
        single = n <= grad_block_m
    elif cuda:
        grad_block_m, grad_block_n, grad_block_k = _cuda_tile(n), _CUDA_TILE, _CUDA_STEP[dtype]
        panel = _SINGLE_PASS_ELEMENTS
        if unaligned:
            grad_block_n, grad_block_k, panel = _CUDA_TILE // 2, min(grad_block_k, _CUDA_UNALIGNED_STEP), panel // 2
        if use_gram and not vicreg and n <= _SINGLE_PASS_ROWS:
            # the whole column panel in registers: BLOCK_M·BLOCK_N = ``panel`` fp32 per tile
            grad_block_m = max(16, _next_pow2(n))
            grad_block_n = min(64, max(16, panel // grad_block_m))
            single = True
    else:
        grad_block_m = min(256, max(16, _next_pow2(n)))
        grad_block_n = min(256, max(16, _next_pow2(d)))
        grad_block_k = min(128, max(16, _next_pow2(grad_k_extent)))
        single = n <= grad_block_m
    if not use_gram or vicreg:
        single = False

    split_gram = half and use_gram and 2 * n > d
    # float32 workspace
    offset = COL_ROWS * d
    blk_offset = offset
    offset += BLK_SLOTS * stats_blocks
    tile_offset = offset
    offset += 2 * tiles * finish_chunks
    gdiag_offset = offset
    if use_gram and keep:
        offset += 2 * n
    sums_offset = offset
    if not use_gram and not vicreg and keep:
        offset += (1 + finish_chunks) * tile_blocks * d
    split_offset = offset
    if not finish_in_place:
        offset += splits * tiles * 2 * block * block
    # operands: (part, view, N, d), then the backward's matrix
    mat_base = parts * 2 * n * d
    operand_size = mat_base
    if keep:
        operand_size += ((2 if split_gram else 1) * 2 * n * n) if use_gram else ((2 if vicreg else 1) * d * d)
    return Plan(
        n=n, d=d, vicreg=vicreg, gram=use_gram, keep=keep, parts=parts, split_gram=split_gram, cuda=cuda,
        stats_rows=stats_rows, stats_cols=stats_cols, stats_blocks=stats_blocks, block=block, block_k=block_k,
        product_warps=product_warps,
        tile_blocks=tile_blocks, tiles=tiles, splits=splits, k_chunk=k_chunk,
        finish_in_place=finish_in_place, finish_rows=finish_rows,
        finish_chunks=finish_chunks, grad_block_m=grad_block_m,
        grad_block_n=grad_block_n, grad_block_k=grad_block_k, single=single, blk_offset=blk_offset,
        tile_offset=tile_offset, gdiag_offset=gdiag_offset, sums_offset=sums_offset, split_offset=split_offset,
        workspace_size=offset, mat_base=mat_base, operand_size=operand_size,
    )  # fmt: skip


def _dot_precision(device: torch.device) -> str:
    """fp32 tiles use IEEE fp32 products unless PyTorch's own matmuls are allowed TF32."""
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _emulate_bf16(z: Tensor) -> bool:
    """bfloat16 through the interpreter: round in the kernel, multiply in float32."""
    return z.dtype == torch.bfloat16 and z.device.type != "cuda"


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _views(z_a: Tensor, z_b: Tensor) -> Tuple:
    return (z_a, z_a.stride(0), z_a.stride(1), z_b, z_b.stride(0), z_b.stride(1))


def forward(
    z_a: Tensor,
    z_b: Tensor,
    p: Plan,
    lambda_param: float,
    mu_param: float,
    nu_param: float,
    eps: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Loss (0-d float32), workspace (float32) and operand buffer (input dtype) of one call.
    ``eps``: batch-norm's (Barlow Twins) or the variance's (VICReg)."""
    n, d = p.n, p.d
    device = z_a.device
    loss = _new_buffer((), dtype=torch.float32, device=device)
    ws = _new_buffer((p.workspace_size,), dtype=torch.float32, device=device)
    ops = _new_buffer((p.operand_size,), dtype=z_a.dtype, device=device)
    emulate = _emulate_bf16(z_a)
    precision = _dot_precision(device)
    half = p.parts == 2
    hinge_coefficient = -0.5 * mu_param / (d * (n - 1)) if p.vicreg else 0.0
    stats_args = (*_views(z_a, z_b), ws, ops, n, d, p.stats_blocks, p.blk_offset, eps, eps, hinge_coefficient)
    stats_meta = dict(VICREG=p.vicreg, SPLIT=half, BLOCK_N=p.stats_rows, BLOCK_D=p.stats_cols, EMULATE_BF16=emulate,
                      num_warps=_STATS_WARPS)
    if p.vicreg:  # the operand scale needs every column's statistics first
        _standardize_kernel[(p.stats_blocks,)](*stats_args, PHASE=0, **stats_meta)
        _standardize_kernel[(p.stats_blocks,)](*stats_args, PHASE=1, **stats_meta)
    else:
        _standardize_kernel[(p.stats_blocks,)](*stats_args, PHASE=2, **stats_meta)
    finish = p.finish_in_place
    if p.gram:
        _gram_partial_kernel[p.product_grid](
            ops, ws, n, d, p.tile_blocks, p.k_chunk, p.split_offset, p.tile_offset, p.gdiag_offset, p.mat_base,
            1.0 / d, VICREG=p.vicreg, SPLIT=half, FINISH=finish, KEEP=p.keep, SPLIT_GRAM=p.split_gram,
            BLOCK=p.block, BLOCK_K=p.block_k, DOT_PRECISION=precision, EMULATE_BF16=emulate,
            num_warps=p.product_warps,
        )  # fmt: skip
        if not finish:
            _gram_finish_kernel[(p.tiles, p.finish_chunks)](
                ops, ws, n, p.tile_blocks, p.splits, p.split_offset, p.tile_offset, p.gdiag_offset, p.mat_base,
                1.0 / d, VICREG=p.vicreg, KEEP=p.keep, SPLIT_GRAM=p.split_gram, BLOCK=p.block, ROWS=p.finish_rows,
                EMULATE_BF16=emulate, num_warps=_STATS_WARPS,
            )  # fmt: skip
    else:
        _cross_partial_kernel[p.product_grid](
            ops, ws, n, d, p.tile_blocks, p.k_chunk, p.split_offset, p.tile_offset, p.sums_offset, p.mat_base,
            lambda_param, VICREG=p.vicreg, SPLIT=half, FINISH=finish, KEEP=p.keep, BLOCK=p.block,
            BLOCK_K=p.block_k, DOT_PRECISION=precision, EMULATE_BF16=emulate, num_warps=p.product_warps,
        )  # fmt: skip
        if not finish:
            _cross_finish_kernel[(p.tiles, p.finish_chunks)](
                ops, ws, n, d, p.tile_blocks, p.splits, p.split_offset, p.tile_offset, p.sums_offset, p.mat_base,
                lambda_param, VICREG=p.vicreg, KEEP=p.keep, BLOCK=p.block, ROWS=p.finish_rows,
                EMULATE_BF16=emulate, num_warps=_STATS_WARPS,
            )  # fmt: skip
    _loss_kernel[(1,)](
        ws, loss, p.blk_offset, p.stats_blocks, p.tile_offset, p.tiles * p.finish_chunks, n, d, lambda_param, mu_param, nu_param,
        VICREG=p.vicreg, GRAM=p.gram, BLOCK=_LOSS_BLOCK, num_warps=4,
    )  # fmt: skip
    return loss, ws, ops


def backward(
    grad_loss: Tensor, z_a: Tensor, z_b: Tensor, ws: Tensor, ops: Tensor, p: Plan, lambda_param: float, nu_param: float
) -> Tuple[Tensor, Tensor]:
    """The two input gradients ((N, d), contiguous, input dtype); ``grad_loss`` a 0-d float32
    tensor read by the kernels (no host sync)."""
    n, d = p.n, p.d
    device = z_a.device
    grad_a = _new_buffer((n, d), dtype=z_a.dtype, device=device)
    grad_b = _new_buffer((n, d), dtype=z_b.dtype, device=device)
    emulate = _emulate_bf16(z_a)
    precision = _dot_precision(device)
    meta = dict(BLOCK_M=p.grad_block_m, BLOCK_N=p.grad_block_n, BLOCK_K=p.grad_block_k, DOT_PRECISION=precision,
                EMULATE_BF16=emulate, num_warps=_GRADIENT_WARPS)
    if p.vicreg:
        coefficients = (2 * lambda_param / (n * d), 4 * nu_param / (d * (n - 1)), d / (n - 1), 1 / (n - 1))
    else:
        coefficients = (2 * lambda_param * d / (n * n), 2 * lambda_param / (n * n), 0.0, 0.0)
    if p.gram:
        scratch = _new_buffer((p.scratch_size,), dtype=torch.float32, device=device) if p.scratch_size else ws
        _gram_backward_kernel[p.gradient_grid](
            *_views(z_a, z_b), ws, ops, grad_loss, grad_a, grad_b, scratch, n, d, p.gdiag_offset, p.mat_base,
            *coefficients, VICREG=p.vicreg, SINGLE=p.single, SPLIT_GRAM=p.split_gram, **meta,
        )  # fmt: skip
    else:
        c1, c2 = (coefficients[0], coefficients[1]) if p.vicreg else (0.0, 0.0)
        _cross_backward_kernel[p.gradient_grid](
            *_views(z_a, z_b), ws, ops, grad_loss, grad_a, grad_b, n, d, p.tile_blocks,
            p.tile_blocks * p.finish_chunks, p.sums_offset, p.mat_base, c1, c2, VICREG=p.vicreg, **meta,
        )  # fmt: skip
    return grad_a, grad_b


# --------------------------------------------------------------------------------------------
# Operators: forward and backward are torch.library custom ops with a registered autograd
# formula, so that torch.compile keeps each as one opaque node (no graph break, no tracing into
# the launchers) and autograd still connects them. The forward returns, beside the loss, the
# workspace and operand buffers its backward reads; those outputs carry no gradient.
# --------------------------------------------------------------------------------------------


def _barlow_twins_forward(
    z_a: Tensor, z_b: Tensor, lambda_param: float, bn_eps: float, use_gram: bool, keep_for_backward: bool
) -> Tuple[Tensor, Tensor, Tensor]:
    p = plan(*z_a.shape, z_a.dtype, z_a.device, False, use_gram, keep_for_backward)
    return forward(z_a, z_b, p, lambda_param, 0.0, 0.0, bn_eps)


def _barlow_twins_backward(
    grad_loss: Tensor, z_a: Tensor, z_b: Tensor, ws: Tensor, ops: Tensor, lambda_param: float, use_gram: bool
) -> Tuple[Tensor, Tensor]:
    p = plan(*z_a.shape, z_a.dtype, z_a.device, False, use_gram, True)
    return backward(grad_loss, z_a, z_b, ws, ops, p, lambda_param, 0.0)


def _vicreg_forward(
    z_a: Tensor, z_b: Tensor, lambda_param: float, mu_param: float, nu_param: float, eps: float, use_gram: bool,
    keep_for_backward: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    p = plan(*z_a.shape, z_a.dtype, z_a.device, True, use_gram, keep_for_backward)
    return forward(z_a, z_b, p, lambda_param, mu_param, nu_param, eps)


def _vicreg_backward(
    grad_loss: Tensor, z_a: Tensor, z_b: Tensor, ws: Tensor, ops: Tensor, lambda_param: float, nu_param: float,
    use_gram: bool,
) -> Tuple[Tensor, Tensor]:
    p = plan(*z_a.shape, z_a.dtype, z_a.device, True, use_gram, True)
    return backward(grad_loss, z_a, z_b, ws, ops, p, lambda_param, nu_param)


_barlow_twins_op = torch.library.custom_op(
    "fastssl::decorrelation_barlow_twins",
    _barlow_twins_forward,
    mutates_args=(),
    schema="(Tensor z_a, Tensor z_b, float lambda_param, float bn_eps, bool use_gram, bool keep_for_backward) "
    "-> (Tensor, Tensor, Tensor)",
)
_barlow_twins_backward_op = torch.library.custom_op(
    "fastssl::decorrelation_barlow_twins_backward",
    _barlow_twins_backward,
    mutates_args=(),
    schema="(Tensor grad_loss, Tensor z_a, Tensor z_b, Tensor workspace, Tensor operands, float lambda_param, "
    "bool use_gram) -> (Tensor, Tensor)",
)
_vicreg_op = torch.library.custom_op(
    "fastssl::decorrelation_vicreg",
    _vicreg_forward,
    mutates_args=(),
    schema="(Tensor z_a, Tensor z_b, float lambda_param, float mu_param, float nu_param, float eps, "
    "bool use_gram, bool keep_for_backward) -> (Tensor, Tensor, Tensor)",
)
_vicreg_backward_op = torch.library.custom_op(
    "fastssl::decorrelation_vicreg_backward",
    _vicreg_backward,
    mutates_args=(),
    schema="(Tensor grad_loss, Tensor z_a, Tensor z_b, Tensor workspace, Tensor operands, float lambda_param, "
    "float nu_param, bool use_gram) -> (Tensor, Tensor)",
)


def _fake_outputs(z_a: Tensor, vicreg: bool, use_gram: bool, keep: bool) -> Tuple[Tensor, Tensor, Tensor]:
    p = plan(*z_a.shape, z_a.dtype, z_a.device, vicreg, use_gram, keep)
    return (
        z_a.new_empty((), dtype=torch.float32),
        z_a.new_empty((p.workspace_size,), dtype=torch.float32),
        z_a.new_empty((p.operand_size,)),
    )


@_barlow_twins_op.register_fake
def _(z_a, z_b, lambda_param, bn_eps, use_gram, keep_for_backward):
    return _fake_outputs(z_a, False, use_gram, keep_for_backward)


@_vicreg_op.register_fake
def _(z_a, z_b, lambda_param, mu_param, nu_param, eps, use_gram, keep_for_backward):
    return _fake_outputs(z_a, True, use_gram, keep_for_backward)


@_barlow_twins_backward_op.register_fake
def _(grad_loss, z_a, z_b, *rest):
    return z_a.new_empty(z_a.shape), z_b.new_empty(z_b.shape)


@_vicreg_backward_op.register_fake
def _(grad_loss, z_a, z_b, *rest):
    return z_a.new_empty(z_a.shape), z_b.new_empty(z_b.shape)


def _upstream(grad_loss: Tensor) -> Tensor:
    """The incoming scalar gradient as the 0-d float32 tensor the kernels read (no host sync;
    no op at all in the usual case, where it already is one)."""
    if grad_loss.dtype != torch.float32 or grad_loss.dim() != 0:
        grad_loss = grad_loss.to(torch.float32).reshape(())
    return grad_loss


def _barlow_twins_setup(ctx, inputs, output) -> None:
    z_a, z_b, lambda_param, _, use_gram, _ = inputs
    _, ws, ops = output
    ctx.mark_non_differentiable(ws, ops)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(z_a, z_b, ws, ops)
    ctx.lambda_param, ctx.use_gram = lambda_param, use_gram


def _barlow_twins_gradient(ctx, grad_loss, *_auxiliary):
    z_a, z_b, ws, ops = ctx.saved_tensors
    grads = _barlow_twins_backward_op(_upstream(grad_loss), z_a, z_b, ws, ops, ctx.lambda_param, ctx.use_gram)
    return grads[0], grads[1], None, None, None, None


def _vicreg_setup(ctx, inputs, output) -> None:
    z_a, z_b, lambda_param, _, nu_param, _, use_gram, _ = inputs
    _, ws, ops = output
    ctx.mark_non_differentiable(ws, ops)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(z_a, z_b, ws, ops)
    ctx.lambda_param, ctx.nu_param, ctx.use_gram = lambda_param, nu_param, use_gram


def _vicreg_gradient(ctx, grad_loss, *_auxiliary):
    z_a, z_b, ws, ops = ctx.saved_tensors
    grads = _vicreg_backward_op(
        _upstream(grad_loss), z_a, z_b, ws, ops, ctx.lambda_param, ctx.nu_param, ctx.use_gram
    )
    return grads[0], grads[1], None, None, None, None, None, None


_barlow_twins_op.register_autograd(_barlow_twins_gradient, setup_context=_barlow_twins_setup)
_vicreg_op.register_autograd(_vicreg_gradient, setup_context=_vicreg_setup)


# --------------------------------------------------------------------------------------------
# Entry points (called by fastssl.decorrelation after validation and the choice of path)
# --------------------------------------------------------------------------------------------

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _common_dtype(z_a: Tensor, z_b: Tensor) -> Tuple[Tensor, Tensor]:
    """tl.dot needs one operand dtype: views of different dtypes meet at the promoted one."""
    if z_a.dtype == z_b.dtype:
        return z_a, z_b
    dtype = torch.promote_types(z_a.dtype, z_b.dtype)
    return z_a.to(dtype), z_b.to(dtype)


def _needs_gradient(z_a: Tensor, z_b: Tensor) -> bool:
    return torch.is_grad_enabled() and (z_a.requires_grad or z_b.requires_grad)


def barlow_twins_loss_triton(
    z_a: Tensor, z_b: Tensor, lambda_param: float, *, use_gram: bool, bn_eps: float
) -> Tensor:
    """Barlow Twins on the Triton kernels.

    Args:
        z_a, z_b: (N, d) views, N >= 2, float32/float16/bfloat16 (the promoted dtype of the two),
            any strides.
        lambda_param: weight of the off-diagonal term.
        use_gram: N×N Gram tiles (True) or d×d tiles (False).
        bn_eps: batch-norm's epsilon.
    Returns:
        0-d float32 loss.
    """
    z_a, z_b = _common_dtype(z_a, z_b)
    keep = _needs_gradient(z_a, z_b)
    return _barlow_twins_op(z_a, z_b, float(lambda_param), float(bn_eps), use_gram, keep)[0]


def vicreg_loss_triton(
    z_a: Tensor, z_b: Tensor, lambda_param: float, mu_param: float, nu_param: float, eps: float, *, use_gram: bool
) -> Tensor:
    """VICReg on the Triton kernels (arguments as :func:`barlow_twins_loss_triton`, weights and
    eps as :func:`fastssl.decorrelation.vicreg_loss`). Returns a 0-d float32 loss."""
    z_a, z_b = _common_dtype(z_a, z_b)
    keep = _needs_gradient(z_a, z_b)
    hyper = (float(lambda_param), float(mu_param), float(nu_param), float(eps))
    return _vicreg_op(z_a, z_b, *hyper, use_gram, keep)[0]
