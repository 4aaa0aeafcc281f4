r"""Triton kernels for NT-Xent (SimCLR), InfoNCE with a bank (MoCo) and uniformity: kernels,
launchers and ``autograd.Function`` side by side.

Pipeline (NT-Xent, R = 2N rows of d features, C = R columns, or the gathered 2WN columns):

1. ``_l2_normalize_pair_fwd_kernel`` -- both views in one launch: ẑ = x / max(‖x‖, 1e-12)
   stored in the operand dtype (the input's; float32 for d ≤ 16, see ``operand_dtype``), plus
   ‖x‖ (float32) per row, and the positive pairs' cosines in float32 from the inputs, each
   factor scaled by its reciprocal norm first (no overflow), accumulated in the pass that
   stores ẑ. Reads each input through its own strides (no ``cat``/``contiguous`` copy). The
   squares are taken of the row times 2^-k, 2^k above its largest magnitude (exact), so
   float32 rows near 1e19 or 1e-19 normalize as in float64 (``_l2_normalize_fwd_kernel``: one
   view, for uniformity).
2. ``_pair_lse_fwd_kernel`` -- one program per block of BLOCK_M rows walks the columns in
   tiles of BLOCK_N, S = ẑ_r ẑ_cᵀ/τ through ``tl.dot`` (half inputs on tensor cores, float32
   accumulation; float32 inputs with ``input_precision="ieee"``, never TF32), self-similarity
   masked to -inf, and keeps an online log-sum-exp (m, l) per row, seeded with the float32
   positive logit (whose column the tiles skip). The running max m is the max of the *scaled*
   logits, so a negative τ (which flips the order) needs no special case. Stores lse (R,) and
   ℓ = lse - s₊ (R,). When the row blocks alone would leave SMs idle, each row block's column
   sweep is split over several programs (grid axis 1, :func:`column_splits`); their base-2
   (m, l) pairs are merged by ``_lse_merge_kernel`` (FlashAttention's split-KV recipe).
3. ``_pair_lse_bwd_kernel`` -- recomputes each tile from ẑ and the stored lse. Because S is
   symmetric and the positive relation an involution, the gradient of whole rows is

       dẑ_k = g/(2N τ) · (Σ_{m≠k} (e^{S_km - lse_k} + e^{S_km - lse_m}) ẑ_m - 2 ẑ_{p(k)}),

   i.e. (G + Gᵀ)Z/τ from one pass over the tiles of a row block: no column pass, no atomics,
   deterministic (a split sweep writes one partial dẑ per split, summed in a fixed order by
   step 4). e^{S_km - lse_m} = e^{S_km - lse_k}·e^{lse_k - c}·e^{c - lse_m} costs no
   second exponential where the factors cannot overflow. Accumulates in registers when d fits
   one BLOCK_K tile (``SINGLE_K``); for larger d the program owns its rows of a float32 scratch
   and read-modify-writes them per d-chunk (still deterministic). The positive's term
   (weight ≈ -2, float32) leaves the kernel as one coefficient per row.
4. ``_l2_normalize_pair_bwd_kernel`` (both views in one launch; ``_l2_normalize_bwd_kernel``
   for one) -- sums the splits' partial dẑ, adds coefficient × ẑ_{p(k)}, then
   dx = (dẑ - ẑ(ẑ·dẑ))/‖x‖ in the input dtype.

Temperature: a Python τ enters the launches as the scale 1/τ·log2 e; a tensor τ (learnable) is
read from device memory by every kernel that scales by it (``TEMP_IN_MEMORY``, no host sync),
and the backward then takes the two-exponential form (the factored form's bounds depend on τ's
value). Its gradient is :math:`-\frac{1}{h\tau}\sum_k \hat z_k\cdot\partial L/\partial\hat z_k`
(the logits are of degree h = 2 in NT-Xent's ẑ, 1 in InfoNCE's queries): the normalization
backward stores each row's projection ẑ·dẑ, scaled by -1/h, and one sum and one division give it.

Distributed: ranks may hold different batch sizes. The launcher exchanges them once
(``distributed.gather_sizes``); the columns are every rank's [view 0; view 1] block in rank
order, this rank's at 2·Σ_{q<r} n_q, and the loss is weighted by the rank's rows
(``distributed.global_mean``).

InfoNCE is the one-directional variant (queries × [own key; bank], no self-exclusion, no
gradient to the bank): ``_infonce_fwd_kernel`` / ``_infonce_bwd_kernel``. Uniformity reuses the
pair kernels without the positive: S = 2t ẑẑᵀ, log-mean-exp over i ≠ j, minus 2t.

Addresses: every row block's base offset is int64 (R·d passes 2**31 at R = 2**19, d = 4096),
offsets inside a tile int32 (at most BLOCK·d), which keeps the hot loops' address arithmetic
narrow; the row-wise kernels use int64 throughout. The grid is 1-D over row blocks (at most
2**31 - 1 programs), so any N the memory allows is launched. The default tiles compile for sm_90
without register spills (``default_config``). Kernels use only
``tl.load/store`` with masks, ``tl.dot``, ``tl.trans``, reductions, ``tl.exp/log``,
``tl.where``, ``tl.debug_barrier``: Triton 3.6 (GPU) and 3.9 (interpreter) both have them.

Cost model and prediction (H100 SXM: ~990 TFLOP/s dense bf16, ~60 TFLOP/s fp32 FMA, ~3 TB/s
HBM; the multi-function unit computes ~3.9e12 exponentials/s). With R = C = 2N:

* forward: 2·R·C·d FLOPs (S), R·C exponentials; backward: 4·R·C·d FLOPs (S again, H·Z) and
  R·C exponentials (the factored form; 2·R·C below |τ| ≈ 1/40). Total 6·(2N)²·d FLOPs,
  2·(2N)² exponentials. The fewest FLOPs any implementation needs is 4·(2N)²·d (no recompute,
  the benchmark suite's floor); recomputing S is the price of O(N·d) memory.
* fewest bytes: read x, write dx: 2·2N·d·b (b bytes per element) plus O(N) floats. This
  implementation also writes/reads ẑ (2·2N·d·b) and dẑ in float32 (2·2N·d·4) -- still O(N·d).
* 2N = 8192, d = 128, bf16: floor max(34.4 GFLOP / 990 TFLOP/s, 4.2 MB / 3 TB/s) = 35 µs,
  compute-bound. As implemented: 51.5 GFLOP (52 µs of tensor cores) and 134 M exponentials
  (34 µs of the exponential unit, which Triton does not overlap with the MMA the way FA3 does).
  Prediction: forward ≈ 25-35 µs, backward ≈ 50-70 µs, forward+backward ≈ 75-105 µs, i.e.
  35-45 % of the 35 µs floor (50-70 % of the 52 µs this algorithm's MMAs alone need).
* 2N = 131072, d = 128, bf16: 13.2 TFLOP → ≈ 15-25 ms; memory ≈ 2N·d·(2+2+2+4) bytes ≈ 170 MB
  instead of the (2N)² = 17 G logits of the reference.
* float32 inputs run ``tl.dot`` in IEEE float32 (FMA, ~60 TFLOP/s): floor 0.86 ms at
  2N = 8192, d = 128. Half inputs with d ≤ 16 also keep ẑ in float32 (``operand_dtype``): there
  2d FLOPs per logit cost less than its exponential anyway.
* InfoNCE, N queries, K bank rows: 6·N·K·d FLOPs, 2·N·K exponentials; bytes ≥ (4N + K)·d·b.
  N = 256, K = 65536, d = 128, bf16: 12.9 GFLOP → 13 µs; bytes 17 MB → 6 µs.
* Uniformity forward: 2·N²·d FLOPs, N² exponentials.

Schedule on the H200 (132 SMs; floor = max(FLOPs / 790 TFLOP/s, bytes / 4.3 TB/s), the
benchmark's measured rates; per SM and clock: 4096 bf16 MMA FLOPs, 16 exponentials (MUFU),
128 other lanes-instructions issued). Per logit at d = 128 the MMA needs 2d/4096 = 0.0625 clk
(forward) or 4d/4096 = 0.125 clk (backward), one exponential 1/16 = 0.0625 clk, and k other
instructions k/128 clk: above k ≈ 8 the forward is bound by instruction issue, not the MMA.

Before (one program per 128-row block, the whole column sweep in one program, natural exp,
every tile masked):

| launch | 2N = 8192, d = 128, bf16 | InfoNCE N = 256, K = 65536 |
|---|---|---|
| forward programs (waves on 132 SMs) | 64 (0.48) | 2 (0.02) |
| backward programs | 64 (0.48) | 2 (0.02) |
| instructions per logit, forward | ≈ 18 (scale, 3 compares + 2 ands + select, max, sub, mul by log2 e, ex2, sum) | ≈ 12 (edge compare + select on every tile) |
| exponentials per logit | 1 forward, 1 backward (factored) | 1 + 1 |

  NT-Xent: 64 of 132 SMs busy, issue-bound at 18/128 clk per logit: forward ≈ 67 M logits /
  64 SMs × 0.14 clk ≈ 80 µs, backward (MMA 0.125 + exp 0.0625 + ~20 other/128 per logit,
  little overlap) ≈ 110-180 µs: ≈ 190-260 µs, 17-23 % of the 43.5 µs floor (34.4 GFLOP at
  790 TFLOP/s; bytes 4.2 MB → 1 µs). InfoNCE: 2 SMs each sweep the whole 32 MB float32 bank
  (fp32 bank: 65536·128·4 B) at one SM's bandwidth (~0.1-0.2 TB/s) and one SM's MMA rate:
  forward ≈ 0.35 ms, backward ≈ 0.7 ms, ≈ 1 % of the floor (10.9 µs: 8.6 GFLOP; bytes 34 MB
  → 7.8 µs).

Changes and their predicted effect (made after this was written):

1. 64-row blocks, 4 warps (one warpgroup: wgmma m64n64k16 tiles), and a split column sweep:
   grid (row blocks, S) with S from a cost model (``column_splits``: whole waves of 2 programs
   per SM, plus, for the backward, the partial gradients' bytes). Forward splits write their
   (max, sum) per row; ``_lse_merge_kernel`` merges them by log-sum-exp (S·R·8 bytes, a few
   µs at most) and writes lse and the row loss. Backward splits write partial dẑ (S, R, d)
   float32, which the normalization backward sums: (S-1)·R·d·8 extra bytes (2 µs at 2N =
   8192, S = 2; 4 µs for InfoNCE, S ≈ 64). NT-Xent 8192: 128 row blocks × S = 2 → 256
   programs (1.9 waves of 132, one wave at 2 per SM) forward and backward; InfoNCE: 4 × 64 →
   256 programs. Predicted: NT-Xent ×2 (all SMs busy), InfoNCE ×50-100 (bank bandwidth-bound
   instead of one SM).
2. ``exp2`` with log2 e folded into the logits' scale (one multiply per logit instead of two);
   the running max and sum kept in base 2; lse converted once per row. −1 instruction per logit.
3. Masks only on the tiles that need them: the column edge, the rows' own (self) columns and
   their positives' (≤ 4 of the 128 tiles of a 64-row block at 2N = 8192), decided per tile
   from scalar bounds. −6 instructions per logit elsewhere (forward ≈ 5 per logit: multiply,
   max, subtract, ex2, add; backward ≈ 6 + the bf16 conversion of the weights).
   With 1-3: forward ≈ max(MMA 0.0625, ex2 0.0625, issue 0.04) to their sum per logit: 508 K
   logits per SM → 17-35 µs; backward 0.125-0.23 clk → 35-65 µs, + 2 µs of partials: total
   55-100 µs, 43-79 % of the floor (target ≥ 50 %). InfoNCE: forward ≈ bank read 7.4 µs (L2
   shares each tile between the 4 row blocks, which run side by side) to 15 µs; backward
   ≈ 11 µs MMA + 4 µs partials, bank re-read: 20-35 µs total, 30-55 % of the floor.
4. Uniformity's backward: the global log-sum-exp as one scalar (no expanded copy) and
   2·e^{S - T} as one exponential instead of two equal ones.

After (the captured CUDA launches compiled for sm_90 with Triton 3.9 and 3.6; no spills in
any kernel at the headline or the awkward shapes):

| launch | 2N = 8192, d = 128, bf16 | InfoNCE N = 256, K = 65536 |
|---|---|---|
| forward programs (waves on 132 SMs) | 256 (1.94), 93 / 92 registers (3.9 / 3.6), 3 per SM | 256 (1.94), 69 / 64 registers |
| backward programs | 256 (1.94), 210 / 186 registers, 2 per SM | 244 (1.85), 141 / 141 registers |
| forward hot loop, unmasked tile | ≈ 5.6 instructions per logit (FMUL, FMNMX, FADD, ex2, FADD) + 1 MUFU | same, no masks |
| eager ops per forward + backward (launch report's count) | 7 (was 33) | 7 (was 31) |

  The loop still waits for each wgmma group before the softmax (``WARPGROUP.DEPBAR`` right
  after the products): the overlap of MMA and exponentials comes from the 2-3 programs
  resident per SM, not from within one. Predicted: NT-Xent forward 17-35 µs, backward
  35-60 µs, the five small row-wise launches ≈ 10 µs: 60-105 µs, 40-70 % of the 43.5 µs
  floor (before: 17-23 %). InfoNCE: forward 8-12 µs, backward 12-18 µs, small launches
  ≈ 8 µs: 28-38 µs, 30-40 % of the 10.9 µs floor (before: ≈ 1 %); what remains is the float32
  bank read twice (forward and backward, 2 × 7.4 µs at 4.3 TB/s) -- a bf16 bank would halve it.
  Left for later: folding the scale into the exponent's FFMA (−1 instruction per logit, needs
  the temperature's sign as a constexpr) and keeping one wgmma group in flight across
  iterations.

Eager PyTorch operators around the kernels per forward + backward, as the launch report counts
them (``benchmarks/launch_capture``: every ATen operator outside the kernels -- allocations,
views, detaches, compute):

| headline shape | before | after |
|---|---|---|
| NT-Xent 2N = 8192, d = 128, bf16 | 21 + 12 = 33 | 4 + 3 = 7 |
| NT-Xent 2N = 1048576, d = 128, bf16 | 20 + 12 = 32 | 4 + 3 = 7 |
| InfoNCE N = 256, K = 65536, d = 128, bf16 | 21 + 10 = 31 | 4 + 3 = 7 |

  Before: 12 ``aten.detach`` -- the forward custom op returned six auxiliary tensors that
  ``setup_context`` saved for the backward while they were differentiable outputs, and autograd
  detaches such an output once when it is returned and once when the backward unpacks it (a
  saved output is stored without its grad_fn); Barlow Twins marks its two auxiliary outputs
  non-differentiable and had none -- plus ~12 allocations (one ``torch.empty`` per array, empty
  placeholders for the distributed-only columns and for the temperature's gradient) and their
  ``select``/``slice`` views, InfoNCE's ``detach`` of a bank that needs none, and the mean.
  After: the auxiliary outputs are marked non-differentiable; the forward returns the loss, ẑ
  and ONE float32 workspace (norms, positive cosines, log-sum-exps, row losses, split partials)
  that the kernels address by element offsets (:class:`Regions`, every region 16-aligned so
  the offsets keep Triton's divisibility attribute); the backward allocates one workspace
  (partial gradients, positive coefficients, temperature projections) and the two gradients,
  and returns τ's gradient only when there is one (``Tensor[]``). Forward: ẑ, workspace, the
  row-loss view and its mean; backward: workspace and two gradients. The pair and bank
  kernels keep their launch plans (grids, tiles, warps, stages) and compile to the same
  registers and hot loops (Triton 3.9 and 3.6, no spills). Predicted by the report, which is
  host-bound at the small sizes (4 µs per eager op, 8 µs per launch): NT-Xent 2N = 8192
  226 → 122 µs (19 → 36 % of the floor), InfoNCE 218 → 122 µs (5 → 9 %).

Fewer row-wise launches (the same report, next): the two normalizations and the cosine pass
become one launch (``_l2_normalize_pair_fwd_kernel``: both views' rows per program, the cosine
accumulated while ẑ is stored instead of re-reading both inputs) and NT-Xent's two
normalization backwards one (``_l2_normalize_pair_bwd_kernel``, grid 2 × row blocks). Predicted
before it was made: −3 launches NT-Xent (−24 µs of host time at 2N = 8192), −2 InfoNCE; at
2N = 2^20 the forward reads each input twice instead of three times (≈ −125 µs). Measured by
the report: launches 8 → 5 (2N = 8192), 7 → 4 (2^20), 8 → 6 (InfoNCE); predicted µs 122 → 98
(44 % of the floor), 983,713 → 981,595 (the row-wise forward 253 → 128 µs, backward
440 → 317 µs), 122 → 106 (10 %); no spills under Triton 3.9 and 3.6 (registers 56 / 93 forward
at 2N = 8192 / 2^20, 56 / 80 backward).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastssl import distributed
from fastssl._backend import triton_interpreter_enabled

_NORM_EPS = 1e-12  # F.normalize's clamp
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, FP32_IEEE: tl.constexpr):
    # FP32_IEEE: the product in IEEE float32. Float32 operands would otherwise default to TF32
    # on tensor cores (10-bit mantissa), too coarse for the float32 reference. The interpreter
    # also takes this path for bfloat16, which it stores as raw uint16 and cannot multiply;
    # bf16 x bf16 products are exact in float32, so that matches the tensor-core result.
    if FP32_IEEE:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _round_to(x, DTYPE: tl.constexpr, BF16_RTNE: tl.constexpr):
    """float32 → DTYPE rounding to nearest even. The interpreter truncates float32 → bfloat16
    (the GPU rounds), so under it (BF16_RTNE) the bits are rounded here first, after which the
    conversion is exact; a test on the CPU then sees the GPU's numerics."""
    if BF16_RTNE:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def _load_tile(ptr, rows64, row_mask, stride_row, stride_col, k0, D, BLOCK_K: tl.constexpr):
    """(BLOCK_M, BLOCK_K) tile of rows ``rows64``, features ``k0 .. k0+BLOCK_K``, zero-padded."""
    ks = k0 + tl.arange(0, BLOCK_K)
    offsets = rows64[:, None] * stride_row + ks[None, :].to(tl.int64) * stride_col
    return tl.load(ptr + offsets, mask=row_mask[:, None] & (ks[None, :] < D), other=0.0)


@triton.jit
def _load_block(ptr, row_start, n_rows, k0, D, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows ``row_start .. +BLOCK_R`` of a contiguous (n_rows, D) buffer, features ``k0 ..``:
    the int64 part of the address is one scalar, the in-tile offsets stay int32 (BLOCK_R·D
    < 2**31), which keeps the per-element address math (and registers) of the hot loops small."""
    r = tl.arange(0, BLOCK_R)
    ks = k0 + tl.arange(0, BLOCK_K)
    base = ptr + tl.cast(row_start, tl.int64) * D
    mask = ((row_start + r) < n_rows)[:, None] & (ks < D)[None, :]
    return tl.load(base + r[:, None] * D + ks[None, :], mask=mask, other=0.0)


@triton.jit
def _inverse_power_of_two(peak):
    """2^-k with 2^k > ``peak`` >= 0, k in [-126, 126], from the exponent bits (exact, no
    transcendental): peak in [2^(e-127), 2^(e-126)) has biased exponent e, so k = e - 126. A
    zero or subnormal peak gives 2^126; inf or NaN 2^-126 (then inf/inf: NaN propagates)."""
    biased = (peak.to(tl.int32, bitcast=True) >> 23) & 0xFF
    k = tl.minimum(biased - 126, 126)
    return ((127 - k) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _l2_normalize_fwd_kernel(
    X, stride_xm, stride_xd, Z, NORM, M, D, row_offset,
    EPS: tl.constexpr, BF16_RTNE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Z[row_offset + i] = X[i] / max(‖X[i]‖, EPS) (Z contiguous, Z's dtype); NORM = ‖X[i]‖.

    The squares are taken of y = 2^-k x, 2^k above the row's largest magnitude (an exact
    scaling): float32 rows near 1e19, whose squares overflow, or 1e-19, whose squares are
    subnormal, normalize as in float64. ẑ = y / max(‖y‖, 2^-k EPS) is the same number."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    rows64 = rows.to(tl.int64)
    # Correctly rounded sqrt and division (as PyTorch's): O(N·d) work, and a 1-d row then
    # normalizes to exactly ±1, whose normalization gradient is exactly 0.
    inverse_scale, scaled_norm = _scaled_row_norms(X, rows64, row_mask, stride_xm, stride_xd, D, BLOCK_D, BLOCK_M)
    clamped = tl.broadcast_to(tl.maximum(scaled_norm, EPS * inverse_scale)[:, None], (BLOCK_M, BLOCK_D))
    out_rows64 = rows64 + row_offset
    tl.store(NORM + out_rows64, scaled_norm / inverse_scale, mask=row_mask)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        y = _load_tile(X, rows64, row_mask, stride_xm, stride_xd, d0, D, BLOCK_D).to(tl.float32) * inverse_scale[:, None]
        tl.store(
            Z + out_rows64[:, None] * D + ds[None, :],
            _round_to(tl.div_rn(y, clamped), Z.dtype.element_ty, BF16_RTNE),
            mask=row_mask[:, None] & (ds[None, :] < D),
        )


@triton.jit
def _scaled_row_norms(X, rows64, row_mask, stride_xm, stride_xd, D, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """(2^-k, ‖2^-k x‖) per row, 2^k above the row's largest magnitude (see
    ``_l2_normalize_fwd_kernel``)."""
    peak = tl.zeros((BLOCK_M,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        x = _load_tile(X, rows64, row_mask, stride_xm, stride_xd, d0, D, BLOCK_D).to(tl.float32)
        peak = tl.maximum(peak, tl.max(tl.abs(x), axis=1))
    inverse_scale = _inverse_power_of_two(peak)
    sq = tl.zeros((BLOCK_M,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        y = _load_tile(X, rows64, row_mask, stride_xm, stride_xd, d0, D, BLOCK_D).to(tl.float32) * inverse_scale[:, None]
        sq += tl.sum(y * y, axis=1)
    return inverse_scale, tl.sqrt_rn(sq)


@triton.jit
def _l2_normalize_pair_fwd_kernel(
    X, stride_xm, stride_xd, Y, stride_ym, stride_yd, Z, WS, M, D, cos_offset,
    EPS: tl.constexpr, BF16_RTNE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Both views at once: Z[i] = x̂_i, Z[M + i] = ŷ_i (Z contiguous (2M, D), Z's dtype), their
    norms WS[i] = ‖x_i‖ and WS[M + i] = ‖y_i‖, and the positive pairs' cosine
    WS[cos_offset + i] = (x_i / max(‖x_i‖, EPS))·(y_i / max(‖y_i‖, EPS)) in float32 from the
    inputs (kept out of the half-precision tiles; each factor scaled by its reciprocal norm
    before the product: x·y and ‖x‖‖y‖ would overflow for rows near 1e19).

    One launch instead of two normalizations and a cosine pass (which re-read both inputs):
    the cosine is accumulated in the pass that stores ẑ. Each view's squares are taken of the
    row times 2^-k as in ``_l2_normalize_fwd_kernel``; the values are that kernel's and the
    former cosine kernel's, operation for operation."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    rows64 = rows.to(tl.int64)
    inverse_scale_x, scaled_norm_x = _scaled_row_norms(X, rows64, row_mask, stride_xm, stride_xd, D, BLOCK_D, BLOCK_M)
    inverse_scale_y, scaled_norm_y = _scaled_row_norms(Y, rows64, row_mask, stride_ym, stride_yd, D, BLOCK_D, BLOCK_M)
    norm_x = scaled_norm_x / inverse_scale_x
    norm_y = scaled_norm_y / inverse_scale_y
    tl.store(WS + rows64, norm_x, mask=row_mask)
    tl.store(WS + M + rows64, norm_y, mask=row_mask)
    clamped_x = tl.broadcast_to(tl.maximum(scaled_norm_x, EPS * inverse_scale_x)[:, None], (BLOCK_M, BLOCK_D))
    clamped_y = tl.broadcast_to(tl.maximum(scaled_norm_y, EPS * inverse_scale_y)[:, None], (BLOCK_M, BLOCK_D))
    inv_x = 1.0 / tl.maximum(norm_x, EPS)
    inv_y = 1.0 / tl.maximum(norm_y, EPS)
    cosine = tl.zeros((BLOCK_M,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        store_mask = row_mask[:, None] & (ds[None, :] < D)
        x = _load_tile(X, rows64, row_mask, stride_xm, stride_xd, d0, D, BLOCK_D).to(tl.float32)
        y = _load_tile(Y, rows64, row_mask, stride_ym, stride_yd, d0, D, BLOCK_D).to(tl.float32)
        cosine += tl.sum((x * inv_x[:, None]) * (y * inv_y[:, None]), axis=1)
        tl.store(Z + rows64[:, None] * D + ds[None, :],
                 _round_to(tl.div_rn(x * inverse_scale_x[:, None], clamped_x), Z.dtype.element_ty, BF16_RTNE),
                 mask=store_mask)
        tl.store(Z + (rows64 + M)[:, None] * D + ds[None, :],
                 _round_to(tl.div_rn(y * inverse_scale_y[:, None], clamped_y), Z.dtype.element_ty, BF16_RTNE),
                 mask=store_mask)
    tl.store(WS + cos_offset + rows64, cosine, mask=row_mask)


@triton.jit
def _l2_normalize_bwd_kernel(
    X, stride_xm, stride_xd, NORM, DZ, DX, M, D, n_parts, part_stride, PARTNER, PARTNER_COEF, PROJ,
    norm_offset, dz_offset, partner_offset, coef_offset, proj_offset,
    HAS_DZ: tl.constexpr, HAS_PARTNER: tl.constexpr, STORE_PROJECTION: tl.constexpr, PROJECTION_SCALE: tl.constexpr,
    EPS: tl.constexpr, BF16_RTNE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One view: ``_normalize_bwd_rows`` of block ``program_id(0)``, every pointer but X and DX
    at its element offset (the launcher passes the call's workspaces whole, no views)."""
    _normalize_bwd_rows(tl.program_id(0), X, stride_xm, stride_xd, NORM + norm_offset, DZ + dz_offset, DX, M, D,
                        n_parts, part_stride, PARTNER + partner_offset, PARTNER_COEF + coef_offset, PROJ + proj_offset,
                        HAS_DZ, HAS_PARTNER, STORE_PROJECTION, PROJECTION_SCALE, EPS, BF16_RTNE, BLOCK_M, BLOCK_D)


@triton.jit
def _l2_normalize_pair_bwd_kernel(
    X, stride_xm, stride_xd, Y, stride_ym, stride_yd, NORM, DZ, DX, DY, M, D, view_elements, n_parts, part_stride,
    PARTNER, PARTNER_COEF, PROJ, norm_offset, dz_offset, coef_offset, proj_offset,
    STORE_PROJECTION: tl.constexpr, PROJECTION_SCALE: tl.constexpr,
    EPS: tl.constexpr, BF16_RTNE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """NT-Xent's two views in one launch (grid 2 × row blocks): the first half of the programs
    gives DX from view 0 (rows 0..M of NORM, DZ, PARTNER_COEF, PROJ; partner ẑ rows M..2M of
    PARTNER), the second half DY from view 1 (rows M..2M; partner rows 0..M).
    ``view_elements`` = M·D (int64 when large)."""
    blocks = tl.cdiv(M, BLOCK_M)
    block = tl.program_id(0)
    NORM += norm_offset
    DZ += dz_offset
    PARTNER_COEF += coef_offset
    PROJ += proj_offset
    if block < blocks:
        _normalize_bwd_rows(block, X, stride_xm, stride_xd, NORM, DZ, DX, M, D, n_parts, part_stride,
                            PARTNER + view_elements, PARTNER_COEF, PROJ,
                            True, True, STORE_PROJECTION, PROJECTION_SCALE, EPS, BF16_RTNE, BLOCK_M, BLOCK_D)
    else:
        _normalize_bwd_rows(block - blocks, Y, stride_ym, stride_yd, NORM + M, DZ + view_elements, DY, M, D,
                            n_parts, part_stride, PARTNER, PARTNER_COEF + M, PROJ + M,
                            True, True, STORE_PROJECTION, PROJECTION_SCALE, EPS, BF16_RTNE, BLOCK_M, BLOCK_D)


@triton.jit
def _normalize_bwd_rows(
    block, X, stride_xm, stride_xd, NORM, DZ, DX, M, D, n_parts, part_stride, PARTNER, PARTNER_COEF, PROJ,
    HAS_DZ: tl.constexpr, HAS_PARTNER: tl.constexpr, STORE_PROJECTION: tl.constexpr, PROJECTION_SCALE: tl.constexpr,
    EPS: tl.constexpr, BF16_RTNE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """DX[i] = (dz - ẑ(ẑ·dz)) / ‖x‖ with ‖x‖ = NORM[i] and dz = Σ_p DZ[p·part_stride + i]
    (float32 (·, D) rows; ``n_parts`` partial gradients, one per column split of the pair
    kernels) -- plus, with a partner, PARTNER_COEF[i]·PARTNER[i] (the NT-Xent positive's term,
    see ``_pair_lse_bwd_kernel``; PARTNER contiguous (·, D)) -- and ẑ recomputed from X.
    Without DZ (HAS_DZ false: InfoNCE's key) dz is the partner term alone. Rows of block
    ``block``.

    Below the clamp (‖x‖ < EPS) the map is x/EPS, linear: the projection term vanishes.
    STORE_PROJECTION: PROJ[i] = PROJECTION_SCALE·ẑ·dz as well (before that rule), the row's
    share of a tensor temperature's gradient times τ (see ``fastssl.ntxent``)."""
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    rows64 = rows.to(tl.int64)
    norm = tl.load(NORM + rows64, mask=row_mask, other=1.0)
    clamped = tl.broadcast_to(tl.maximum(norm, EPS)[:, None], (BLOCK_M, BLOCK_D))
    if HAS_PARTNER:
        partner_coef = tl.load(PARTNER_COEF + rows64, mask=row_mask, other=0.0)
    projection = tl.zeros((BLOCK_M,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        x = _load_tile(X, rows64, row_mask, stride_xm, stride_xd, d0, D, BLOCK_D).to(tl.float32)
        dz = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        if HAS_DZ:
            for p in range(n_parts):
                dz += _load_tile(DZ + p * part_stride, rows64, row_mask, D, 1, d0, D, BLOCK_D)
        if HAS_PARTNER:
            dz += partner_coef[:, None] * _load_tile(PARTNER, rows64, row_mask, D, 1, d0, D, BLOCK_D).to(tl.float32)
        projection += tl.sum(tl.div_rn(x, clamped) * dz, axis=1)
    if STORE_PROJECTION:
        tl.store(PROJ + rows64, projection * PROJECTION_SCALE, mask=row_mask)
    projection = tl.where(norm >= EPS, projection, 0.0)
    # One reciprocal per row (the division's slow path, a subroutine call, once per row rather
    # than per element; within 1 ulp of dividing each element).
    inv_norm = 1.0 / tl.maximum(norm, EPS)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        x = _load_tile(X, rows64, row_mask, stride_xm, stride_xd, d0, D, BLOCK_D).to(tl.float32)
        dz = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        if HAS_DZ:
            for p in range(n_parts):
                dz += _load_tile(DZ + p * part_stride, rows64, row_mask, D, 1, d0, D, BLOCK_D)
        if HAS_PARTNER:
            dz += partner_coef[:, None] * _load_tile(PARTNER, rows64, row_mask, D, 1, d0, D, BLOCK_D).to(tl.float32)
        dx = (dz - tl.div_rn(x, clamped) * projection[:, None]) * inv_norm[:, None]
        tl.store(
            DX + rows64[:, None] * D + ds[None, :],
            _round_to(dx, DX.dtype.element_ty, BF16_RTNE),
            mask=row_mask[:, None] & (ds[None, :] < D),
        )


# --- shared pieces of the pair and bank kernels ---------------------------------------------


@triton.jit
def _row_block(R, BLOCK_M: tl.constexpr):
    """This program's block of rows: (row_start, in-block index r, rows, row_mask)."""
    row_start = tl.program_id(0) * BLOCK_M
    r = tl.arange(0, BLOCK_M)
    rows = row_start + r
    return row_start, r, rows, rows < R


@triton.jit
def _column_range(C, cols_per_split):
    """Columns [col_lo, col_hi) of this program's split (grid axis 1; cols_per_split is a
    multiple of BLOCK_N, so every split starts on a tile boundary)."""
    col_lo = tl.program_id(1) * cols_per_split
    return col_lo, tl.minimum(col_lo + cols_per_split, C)


@triton.jit
def _overlaps(n0, BLOCK_N: tl.constexpr, lo, hi):
    """Whether columns [n0, n0 + BLOCK_N) meet [lo, hi) (empty when hi <= lo)."""
    return (n0 < hi) & (n0 + BLOCK_N > lo) & (lo < hi)


@triton.jit
def _special_columns(row_start, R, n_local, col_offset, HAS_POSITIVE: tl.constexpr, BLOCK_M: tl.constexpr):
    """Column ranges a tile must be masked on for rows [row_start, +BLOCK_M) ∩ [0, R): their own
    (self) columns and, with positives, their partners' (row i ↔ i ± n_local), which form two
    contiguous ranges when the block straddles the views. Returned as (lo, hi) bounds."""
    row_end = tl.minimum(row_start + BLOCK_M, R)
    self_lo = row_start + col_offset
    self_hi = row_end + col_offset
    if HAS_POSITIVE:
        view0_lo = row_start
        view0_hi = tl.minimum(row_end, n_local)
        view1_lo = tl.maximum(row_start, n_local)
        view1_hi = row_end
        pos0_lo = view0_lo + n_local + col_offset
        pos0_hi = view0_hi + n_local + col_offset
        pos1_lo = view1_lo - n_local + col_offset
        pos1_hi = view1_hi - n_local + col_offset
    else:
        pos0_lo = self_lo
        pos0_hi = self_lo
        pos1_lo = self_lo
        pos1_hi = self_lo
    return self_lo, self_hi, pos0_lo, pos0_hi, pos1_lo, pos1_hi


@triton.jit
def _zero_rows(base, r, row_mask, D, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Zero this program's rows of a (·, D) float32 scratch (the chunked-d accumulator), then
    a barrier: later read-modify-writes by other warps must see the zeros."""
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        tl.store(base + r[:, None] * D + ks[None, :], tl.zeros((BLOCK_M, BLOCK_K), tl.float32),
                 mask=row_mask[:, None] & (ks[None, :] < D))
    tl.debug_barrier()


@triton.jit
def _store_scaled_rows(base, r, row_mask, acc, scale, D, SINGLE_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows of the gradient times the upstream scale: from the register accumulator
    (SINGLE_K), or in place in the chunked-d scratch."""
    if SINGLE_K:
        ks = tl.arange(0, BLOCK_K)
        tl.store(base + r[:, None] * D + ks[None, :], acc * scale, mask=row_mask[:, None] & (ks[None, :] < D))
    else:
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            ptrs = base + r[:, None] * D + ks[None, :]
            mask = row_mask[:, None] & (ks[None, :] < D)
            tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) * scale, mask=mask)


@triton.jit
def _per_temperature(value, TEMP, TEMP_IN_MEMORY: tl.constexpr):
    """A launch argument that carries the factor 1/τ: as passed for a Python temperature; for a
    tensor temperature (TEMP_IN_MEMORY, a learnable τ) the launcher passes it without that
    factor and the kernel divides by τ read from device memory (no host sync)."""
    if TEMP_IN_MEMORY:
        value = value / tl.load(TEMP).to(tl.float32)
    return value


@triton.jit
def _clamp_bias2(NORM, index, mask, scale2, EPS: tl.constexpr):
    """Uniformity's per-row bias in base 2 for rows below F.normalize's clamp: with ẑ = x/EPS,
    -t‖ẑ_i - ẑ_j‖² = 2t ẑ_i·ẑ_j - 2t + b_i + b_j, b = t(1 - ‖ẑ‖²) = t(1 - (‖x‖/EPS)²); 0 for the
    other rows (unit by definition). scale2 = 2t·log2 e."""
    norm = tl.load(NORM + index, mask=mask, other=1.0)
    ratio = norm / EPS
    return tl.where(norm < EPS, (0.5 * scale2) * (1.0 - ratio * ratio), 0.0)


@triton.jit
def _online_lse_step(m_i, l_i, s):
    """One tile of the base-2 online log-sum-exp: (m, l) with l = Σ 2^{s - m}. A row whose
    tiles so far were all masked keeps m = -inf; its exponents then use 0 instead of m
    (2^{-inf} = 0, no -inf - -inf)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_i = l_i * tl.exp2(m_i - m_use) + tl.sum(tl.exp2(s - m_use[:, None]), axis=1)
    return m_new, l_i


@triton.jit
def _store_lse(LSE, ROW_LOSS, PART, rows, row_mask, m_i, l_i, positive2, R,
               SPLIT: tl.constexpr, HAS_POSITIVE: tl.constexpr):
    """Unsplit: lse = (m + log2 l)·ln 2 and the row loss lse - s₊. Split: this split's (m, l)
    at [0, split, row] and [1, split, row] of the (2, S, R) partials PART, merged by
    ``_lse_merge_kernel``."""
    if SPLIT:
        offsets = tl.program_id(1).to(tl.int64) * R + rows
        tl.store(PART + offsets, m_i, mask=row_mask)
        tl.store(PART + tl.num_programs(1).to(tl.int64) * R + offsets, l_i, mask=row_mask)
    else:
        lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # ln 2
        tl.store(LSE + rows, lse, mask=row_mask)
        if HAS_POSITIVE:
            tl.store(ROW_LOSS + rows, lse - positive2 * 0.6931471805599453, mask=row_mask)


@triton.jit
def _lse_merge_kernel(
    WS, TEMP, R, n_local, n_splits, scale2, part_offset, pos_offset, lse_offset, loss_offset,
    HAS_POSITIVE: tl.constexpr, TEMP_IN_MEMORY: tl.constexpr, BLOCK: tl.constexpr,
):
    """Merge the column splits' base-2 (m_s, l_s) of each row (the (2, S, R) partials at
    WS[part_offset]): M = max_s m_s, lse = (M + log2 Σ_s l_s·2^{m_s - M})·ln 2; with positives
    also the row loss lse - s₊ (s₊ = POS_COS[sample]·scale2·ln 2, sample = row mod n_local).
    The split holding the first columns seeded its (m, l) with the positive, so M is finite.
    Every array is a region of the call's float32 workspace WS, at its element offset."""
    PART_M = WS + part_offset
    PART_L = PART_M + n_splits * R
    POS_COS = WS + pos_offset
    LSE = WS + lse_offset
    ROW_LOSS = WS + loss_offset
    scale2 = _per_temperature(scale2, TEMP, TEMP_IN_MEMORY)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_mask = rows < R
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    for split in range(n_splits):
        m = tl.maximum(m, tl.load(PART_M + split * R + rows, mask=row_mask, other=0.0))
    m_use = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros((BLOCK,), tl.float32)
    for split in range(n_splits):
        m_s = tl.load(PART_M + split * R + rows, mask=row_mask, other=0.0)
        total += tl.load(PART_L + split * R + rows, mask=row_mask, other=0.0) * tl.exp2(m_s - m_use)
    lse = (m_use + tl.log2(total)) * 0.6931471805599453  # ln 2
    tl.store(LSE + rows, lse, mask=row_mask)
    if HAS_POSITIVE:
        sample = tl.where(rows < n_local, rows, rows - n_local)
        positive2 = tl.load(POS_COS + sample, mask=row_mask, other=0.0) * scale2
        tl.store(ROW_LOSS + rows, lse - positive2 * 0.6931471805599453, mask=row_mask)


@triton.jit
def _logits_tile(
    ZR, row_start, R, a, ZC, n0, C, D,
    FP32_IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SINGLE_K: tl.constexpr,
):
    """ZR[row_start:+BLOCK_M]·ZC[n0:+BLOCK_N]ᵀ (float32, unscaled) and, when SINGLE_K, the column
    tile (reused by the backward's second product); ``a`` is the row tile when SINGLE_K."""
    if SINGLE_K:
        b = _load_block(ZC, n0, C, 0, D, BLOCK_N, BLOCK_K)
        s = _dot(a, tl.trans(b), FP32_IEEE)
    else:
        b = a  # unused
        s = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, D, BLOCK_K):
            a_k = _load_block(ZR, row_start, R, k0, D, BLOCK_M, BLOCK_K)
            b_k = _load_block(ZC, n0, C, k0, D, BLOCK_N, BLOCK_K)
            s += _dot(a_k, tl.trans(b_k), FP32_IEEE)
    return s, b


@triton.jit
def _pair_lse_fwd_kernel(
    ZR, ZC, WS, TEMP, R, C, D, n_local, col_offset, scale2, cols_per_split,
    pos_offset, lse_offset, loss_offset, part_offset, norm_offset,
    HAS_POSITIVE: tl.constexpr, SPLIT: tl.constexpr, FP32_IEEE: tl.constexpr, BF16_RTNE: tl.constexpr,
    TEMP_IN_MEMORY: tl.constexpr, CLAMP_BIAS: tl.constexpr, EPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE_K: tl.constexpr,
):
    """LSE[r] = log Σ_{c ≠ self(r)} exp(S_rc), S = ZR·ZCᵀ/τ; ROW_LOSS[r] = LSE[r] - S_r,pos(r).

    Grid (row blocks, column splits); each program sweeps columns [col_lo, col_hi) of its
    split in tiles of BLOCK_N. Logits are kept in base 2: s = S·log2 e = ZR·ZCᵀ·scale2, so each
    costs one multiply and one ``exp2``. Row r is sample r mod n_local of view r // n_local; its
    own column is col_offset + r and its positive col_offset + (r ± n_local) (columns are the
    rank-major concatenation of all ranks' rows). The positive logit is POS_COS[sample]·scale2,
    the cosine computed in float32 from the inputs: it seeds the online log-sum-exp of the
    first split (m = s₊, l = 1) and its column is masked in the tiles, so in half precision the
    term that dominates the loss is not rounded through the stored ẑ. Masks (self, positive,
    column edge) are applied only on the tiles that contain such columns. A tensor temperature
    is read from TEMP (``_per_temperature``). CLAMP_BIAS (uniformity, rows = columns): the
    logits get the biases of ``_clamp_bias2`` from the rows' norms NORM, the columns' in the
    tiles, the row's added to its log-sum-exp. POS_COS, LSE, ROW_LOSS, the (2, S, R) partials
    PART and NORM are regions of the call's float32 workspace WS, at their element offsets."""
    POS_COS = WS + pos_offset
    LSE = WS + lse_offset
    ROW_LOSS = WS + loss_offset
    PART = WS + part_offset
    NORM = WS + norm_offset
    scale2 = _per_temperature(scale2, TEMP, TEMP_IN_MEMORY)
    row_start, r, rows, row_mask = _row_block(R, BLOCK_M)
    col_lo, col_hi = _column_range(C, cols_per_split)
    self_lo, self_hi, pos0_lo, pos0_hi, pos1_lo, pos1_hi = _special_columns(
        row_start, R, n_local, col_offset, HAS_POSITIVE, BLOCK_M)
    self_cols = rows + col_offset
    pos_cols = tl.where(rows < n_local, rows + n_local, rows - n_local) + col_offset
    a = _load_block(ZR, row_start, R, 0, D, BLOCK_M, BLOCK_K)
    positive2 = tl.zeros((BLOCK_M,), tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    if HAS_POSITIVE:
        sample = tl.where(rows < n_local, rows, rows - n_local)
        positive2 = tl.load(POS_COS + sample, mask=row_mask, other=0.0) * scale2
        if tl.program_id(1) == 0:
            m_i = positive2
            l_i = tl.full((BLOCK_M,), 1.0, tl.float32)
    for n0 in range(col_lo, col_hi, BLOCK_N):
        s, b = _logits_tile(ZR, row_start, R, a, ZC, n0, C, D, FP32_IEEE, BLOCK_M, BLOCK_N, BLOCK_K, SINGLE_K)
        s = s * scale2
        if CLAMP_BIAS:
            tile_cols = n0 + tl.arange(0, BLOCK_N)
            s = s + _clamp_bias2(NORM, tile_cols, tile_cols < C, scale2, EPS)[None, :]
        needs_mask = (n0 + BLOCK_N > C) | _overlaps(n0, BLOCK_N, self_lo, self_hi)
        needs_mask = needs_mask | _overlaps(n0, BLOCK_N, pos0_lo, pos0_hi) | _overlaps(n0, BLOCK_N, pos1_lo, pos1_hi)
        if needs_mask:
            cols = n0 + tl.arange(0, BLOCK_N)
            keep = (cols[None, :] < C) & (cols[None, :] != self_cols[:, None])
            if HAS_POSITIVE:
                keep = keep & (cols[None, :] != pos_cols[:, None])
            s = tl.where(keep, s, float("-inf"))
        m_i, l_i = _online_lse_step(m_i, l_i, s)
    if CLAMP_BIAS:
        m_i = m_i + _clamp_bias2(NORM, rows, row_mask, scale2, EPS)
    _store_lse(LSE, ROW_LOSS, PART, rows, row_mask, m_i, l_i, positive2, R, SPLIT, HAS_POSITIVE)


@triton.jit
def _pair_lse_bwd_kernel(
    ZR, ZC, STATE, GRAD_LOSS, OUT, TEMP,
    R, C, D, n_local, col_offset, scale2, grad_scale, lse_shift2, cols_per_split,
    pos_offset, lse_r_offset, lse_c_offset, norm_offset, dz_offset, coef_offset,
    HAS_POSITIVE: tl.constexpr, WEIGHTS: tl.constexpr, FP32_IEEE: tl.constexpr, BF16_RTNE: tl.constexpr,
    TEMP_IN_MEMORY: tl.constexpr, CLAMP_BIAS: tl.constexpr, EPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE_K: tl.constexpr,
):
    """dẑ_r = g·grad_scale·Σ_{c≠self} H_rc ZC[c], H_rc = e^{S_rc - LSE_R[r]} + e^{S_rc - LSE_C[c]} - 2[c = pos(r)],
    written as DZ[split, r] (this split's columns but the positive) and POS_COEF[r] =
    g·grad_scale·H_r,pos(r) (by split 0): dẑ_r = Σ_split DZ[split, r] + POS_COEF[r]·ẑ_partner(r),
    completed by the normalization's backward.

    g is read from GRAD_LOSS on the device (no host sync). The negatives' weights lie in [0, 2]
    and go to ``tl.dot`` in the input dtype (as FlashAttention's P); the positive's weight (near
    -2, the dominant term) is computed in float32 from the float32 positive logit, as in the
    forward. Adding its ẑ_partner row here would cost a layout conversion into the accumulator
    and spill registers; the normalization backward reads that row anyway at no cost.

    Everything in base 2 (s = S·log2 e, lse₂ = lse·log2 e). WEIGHTS selects H's form:
    0 -- two exponentials, 2^{s - lse₂_r} + 2^{s - lse₂_c};
    1 -- factored: 2^{s - lse₂_c} = 2^{s - lse₂_r}·α_r·β_c with α_r = 2^{lse₂_r - shift},
         β_c = 2^{shift - lse₂_c}: one exponential per logit (the launcher enables it only where
         no factor can overflow and 2^{s - lse₂_r} cannot underflow while 2^{s - lse₂_c} matters,
         see ``_factored_backward``);
    2 -- one global log-sum-exp T in LSE_R[0] (uniformity): H = 2·2^{s - T₂}.
    A tensor temperature (TEMP_IN_MEMORY) scales scale2 and grad_scale by 1/τ read from TEMP;
    the launcher then uses form 0 (the factored form's bounds depend on τ's value).
    CLAMP_BIAS (with form 2): the biases of the forward (``_clamp_bias2``), and for the rows
    below the clamp the radial term of -t‖ẑ_i - ẑ_j‖²'s gradient, -2·g·grad_scale·e^{lse_r - T}
    per row (LSE_C holds the rows' log-sum-exps), written to POS_COEF for the normalization
    backward to multiply by the row's own ẑ (zero for the other rows, whose normalization
    removes a radial term anyway).

    POS_COS, LSE_R, LSE_C and NORM are regions of the forward's float32 workspace STATE, DZ
    (S, R, D) and POS_COEF of this call's OUT, each at its element offset."""
    POS_COS = STATE + pos_offset
    LSE_R = STATE + lse_r_offset
    LSE_C = STATE + lse_c_offset
    NORM = STATE + norm_offset
    DZ = OUT + dz_offset
    POS_COEF = OUT + coef_offset
    scale2 = _per_temperature(scale2, TEMP, TEMP_IN_MEMORY)
    grad_scale = _per_temperature(grad_scale, TEMP, TEMP_IN_MEMORY)
    row_start, r, rows, row_mask = _row_block(R, BLOCK_M)
    col_lo, col_hi = _column_range(C, cols_per_split)
    self_lo, self_hi, pos0_lo, pos0_hi, pos1_lo, pos1_hi = _special_columns(
        row_start, R, n_local, col_offset, HAS_POSITIVE, BLOCK_M)
    self_cols = rows + col_offset
    pos_cols = tl.where(rows < n_local, rows + n_local, rows - n_local) + col_offset
    log2e = 1.4426950408889634
    if WEIGHTS == 2:
        lse2_r = tl.zeros((BLOCK_M,), tl.float32) + tl.load(LSE_R) * log2e
    else:
        lse2_r = tl.load(LSE_R + rows, mask=row_mask, other=0.0) * log2e
    if CLAMP_BIAS:
        bias2_r = _clamp_bias2(NORM, rows, row_mask, scale2, EPS)
        lse2_r = lse2_r - bias2_r
    alpha_r = tl.exp2(lse2_r - lse_shift2)
    a = _load_block(ZR, row_start, R, 0, D, BLOCK_M, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
    dz_base = DZ + (tl.program_id(1).to(tl.int64) * R + row_start) * D
    if not SINGLE_K:
        _zero_rows(dz_base, r, row_mask, D, BLOCK_M, BLOCK_K)
    for n0 in range(col_lo, col_hi, BLOCK_N):
        s, b = _logits_tile(ZR, row_start, R, a, ZC, n0, C, D, FP32_IEEE, BLOCK_M, BLOCK_N, BLOCK_K, SINGLE_K)
        s = s * scale2
        if CLAMP_BIAS:
            tile_cols = n0 + tl.arange(0, BLOCK_N)
            s = s + _clamp_bias2(NORM, tile_cols, tile_cols < C, scale2, EPS)[None, :]
        p = tl.exp2(s - lse2_r[:, None])
        if WEIGHTS == 0:
            lse2_c = tl.load(LSE_C + n0 + tl.arange(0, BLOCK_N), mask=n0 + tl.arange(0, BLOCK_N) < C, other=0.0) * log2e
            h = p + tl.exp2(s - lse2_c[None, :])
        elif WEIGHTS == 1:
            lse2_c = tl.load(LSE_C + n0 + tl.arange(0, BLOCK_N), mask=n0 + tl.arange(0, BLOCK_N) < C, other=0.0) * log2e
            h = p + p * (alpha_r[:, None] * tl.exp2(lse_shift2 - lse2_c)[None, :])
        else:
            h = p + p
        needs_mask = (n0 + BLOCK_N > C) | _overlaps(n0, BLOCK_N, self_lo, self_hi)
        needs_mask = needs_mask | _overlaps(n0, BLOCK_N, pos0_lo, pos0_hi) | _overlaps(n0, BLOCK_N, pos1_lo, pos1_hi)
        if needs_mask:
            # Masked entries may be inf (an edge column's zero logit against a tiny lse) before
            # the select; the select drops them.
            cols = n0 + tl.arange(0, BLOCK_N)
            keep = (cols[None, :] < C) & (cols[None, :] != self_cols[:, None])
            if HAS_POSITIVE:
                keep = keep & (cols[None, :] != pos_cols[:, None])
            h = tl.where(keep, h, 0.0)
        h = _round_to(h, ZC.dtype.element_ty, BF16_RTNE)
        if SINGLE_K:
            acc += _dot(h, b, FP32_IEEE)
        else:
            # This program owns its rows of its split's DZ: read-modify-write per d-chunk,
            # race-free. The barrier orders one tile's stores before the next tile's loads.
            for k0 in range(0, D, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                b_k = _load_block(ZC, n0, C, k0, D, BLOCK_N, BLOCK_K)
                dz_ptrs = dz_base + r[:, None] * D + ks[None, :]
                dz_mask = row_mask[:, None] & (ks[None, :] < D)
                tl.store(dz_ptrs, tl.load(dz_ptrs, mask=dz_mask, other=0.0) + _dot(h, b_k, FP32_IEEE), mask=dz_mask)
            tl.debug_barrier()
    scale = tl.load(GRAD_LOSS).to(tl.float32) * grad_scale
    if HAS_POSITIVE:
        if tl.program_id(1) == 0:
            sample = tl.where(rows < n_local, rows, rows - n_local)
            positive2 = tl.load(POS_COS + sample, mask=row_mask, other=0.0) * scale2
            lse2_pos = tl.load(LSE_C + pos_cols, mask=row_mask, other=0.0) * log2e
            positive_weight = tl.exp2(positive2 - lse2_r) + tl.exp2(positive2 - lse2_pos) - 2.0
            tl.store(POS_COEF + rows, positive_weight * scale, mask=row_mask)
    if CLAMP_BIAS:
        if tl.program_id(1) == 0:
            row_mass = tl.exp2(tl.load(LSE_C + rows, mask=row_mask, other=0.0) * log2e - (lse2_r + bias2_r))
            clamped = tl.load(NORM + rows, mask=row_mask, other=1.0) < EPS
            tl.store(POS_COEF + rows, tl.where(clamped, -2.0 * scale * row_mass, 0.0), mask=row_mask)
    _store_scaled_rows(dz_base, r, row_mask, acc, scale, D, SINGLE_K, BLOCK_K)


@triton.jit
def _bank_tile(BANK, n0, K, stride_bank_row, stride_bank_col, k0, D, DTYPE: tl.constexpr,
               BF16_RTNE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Bank rows n0 .. +BLOCK_N in the queries' dtype (the reference casts the bank the same way).
    In-tile offsets are int32: the launcher guarantees BLOCK_N·stride and D·stride < 2**31."""
    c = tl.arange(0, BLOCK_N)
    ks = k0 + tl.arange(0, BLOCK_K)
    base = BANK + tl.cast(n0, tl.int64) * stride_bank_row
    b = tl.load(base + c[:, None] * stride_bank_row + ks[None, :] * stride_bank_col,
                mask=((n0 + c) < K)[:, None] & (ks < D)[None, :], other=0.0)
    if BF16_RTNE:
        b = _round_to(b.to(tl.float32), DTYPE, BF16_RTNE)
    else:
        b = b.to(DTYPE)
    return b


@triton.jit
def _bank_logits_tile(
    ZQ, row_start, N, a, BANK, n0, K, stride_bank_row, stride_bank_col, D,
    FP32_IEEE: tl.constexpr, BF16_RTNE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SINGLE_K: tl.constexpr,
):
    """(logits tile, bank tile when SINGLE_K), as ``_logits_tile`` for bank columns."""
    if SINGLE_K:
        b = _bank_tile(BANK, n0, K, stride_bank_row, stride_bank_col, 0, D, ZQ.dtype.element_ty, BF16_RTNE, BLOCK_N, BLOCK_K)
        s = _dot(a, tl.trans(b), FP32_IEEE)
    else:
        b = a  # unused
        s = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, D, BLOCK_K):
            a_k = _load_block(ZQ, row_start, N, k0, D, BLOCK_M, BLOCK_K)
            b_k = _bank_tile(BANK, n0, K, stride_bank_row, stride_bank_col, k0, D, ZQ.dtype.element_ty, BF16_RTNE, BLOCK_N, BLOCK_K)
            s += _dot(a_k, tl.trans(b_k), FP32_IEEE)
    return s, b


@triton.jit
def _infonce_fwd_kernel(
    ZQ, BANK, stride_bank_row, stride_bank_col, WS, TEMP, N, K, D, scale2, cols_per_split,
    pos_offset, lse_offset, loss_offset, part_offset,
    SPLIT: tl.constexpr, FP32_IEEE: tl.constexpr, BF16_RTNE: tl.constexpr, TEMP_IN_MEMORY: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE_K: tl.constexpr,
):
    """LSE[i] = log(e^{s₊} + Σ_j e^{q̂_i·b_j/τ}), s₊ = POS_COS[i]/τ (float32 cosine of the inputs);
    ROW_LOSS[i] = LSE[i] - s₊. Grid (row blocks, bank splits), base-2 logits as the pair
    kernel; the first split's online log-sum-exp starts from the positive (m = s₊, l = 1).
    Only the last bank tile is masked. A tensor temperature is read from TEMP. POS_COS, LSE,
    ROW_LOSS and the (2, S, N) partials PART are regions of the float32 workspace WS."""
    POS_COS = WS + pos_offset
    LSE = WS + lse_offset
    ROW_LOSS = WS + loss_offset
    PART = WS + part_offset
    scale2 = _per_temperature(scale2, TEMP, TEMP_IN_MEMORY)
    row_start, r, rows, row_mask = _row_block(N, BLOCK_M)
    col_lo, col_hi = _column_range(K, cols_per_split)
    positive2 = tl.load(POS_COS + rows, mask=row_mask, other=0.0) * scale2
    a = _load_block(ZQ, row_start, N, 0, D, BLOCK_M, BLOCK_K)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    if tl.program_id(1) == 0:
        m_i = positive2
        l_i = tl.full((BLOCK_M,), 1.0, tl.float32)
    for n0 in range(col_lo, col_hi, BLOCK_N):
        s, b = _bank_logits_tile(ZQ, row_start, N, a, BANK, n0, K, stride_bank_row, stride_bank_col, D,
                                 FP32_IEEE, BF16_RTNE, BLOCK_M, BLOCK_N, BLOCK_K, SINGLE_K)
        s = s * scale2
        if n0 + BLOCK_N > K:
            s = tl.where((n0 + tl.arange(0, BLOCK_N))[None, :] < K, s, float("-inf"))
        m_i, l_i = _online_lse_step(m_i, l_i, s)
    _store_lse(LSE, ROW_LOSS, PART, rows, row_mask, m_i, l_i, positive2, N, SPLIT, True)


@triton.jit
def _infonce_bwd_kernel(
    ZQ, BANK, stride_bank_row, stride_bank_col, STATE, GRAD_LOSS, OUT, TEMP,
    N, K, D, scale2, grad_scale, cols_per_split, pos_offset, lse_offset, dq_offset, coef_offset,
    FP32_IEEE: tl.constexpr, BF16_RTNE: tl.constexpr, TEMP_IN_MEMORY: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE_K: tl.constexpr,
):
    """dq̂_i = g·grad_scale·((p₊-1) k̂_i + Σ_j P_ij b_j), dk̂_i = g·grad_scale·(p₊-1) q̂_i, written as
    DQ[split, i] = g·grad_scale·Σ_{j in split} P_ij b_j and POS_COEF[i] = g·grad_scale·(p₊-1) (by
    split 0): the normalization backward sums the splits and adds the key (query) row times
    the coefficient, as for NT-Xent's positive. A tensor temperature is read from TEMP.
    POS_COS and LSE are regions of the forward's workspace STATE, DQ and POS_COEF of OUT."""
    POS_COS = STATE + pos_offset
    LSE = STATE + lse_offset
    DQ = OUT + dq_offset
    POS_COEF = OUT + coef_offset
    scale2 = _per_temperature(scale2, TEMP, TEMP_IN_MEMORY)
    grad_scale = _per_temperature(grad_scale, TEMP, TEMP_IN_MEMORY)
    row_start, r, rows, row_mask = _row_block(N, BLOCK_M)
    col_lo, col_hi = _column_range(K, cols_per_split)
    lse2 = tl.load(LSE + rows, mask=row_mask, other=0.0) * 1.4426950408889634  # log2 e
    a = _load_block(ZQ, row_start, N, 0, D, BLOCK_M, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
    dq_base = DQ + (tl.program_id(1).to(tl.int64) * N + row_start) * D
    if not SINGLE_K:
        _zero_rows(dq_base, r, row_mask, D, BLOCK_M, BLOCK_K)
    for n0 in range(col_lo, col_hi, BLOCK_N):
        s, b = _bank_logits_tile(ZQ, row_start, N, a, BANK, n0, K, stride_bank_row, stride_bank_col, D,
                                 FP32_IEEE, BF16_RTNE, BLOCK_M, BLOCK_N, BLOCK_K, SINGLE_K)
        p = tl.exp2(s * scale2 - lse2[:, None])
        if n0 + BLOCK_N > K:
            p = tl.where((n0 + tl.arange(0, BLOCK_N))[None, :] < K, p, 0.0)
        p = _round_to(p, ZQ.dtype.element_ty, BF16_RTNE)
        if SINGLE_K:
            acc += _dot(p, b, FP32_IEEE)
        else:
            for k0 in range(0, D, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                b_k = _bank_tile(BANK, n0, K, stride_bank_row, stride_bank_col, k0, D, ZQ.dtype.element_ty,
                                 BF16_RTNE, BLOCK_N, BLOCK_K)
                dq_ptrs = dq_base + r[:, None] * D + ks[None, :]
                dq_mask = row_mask[:, None] & (ks[None, :] < D)
                tl.store(dq_ptrs, tl.load(dq_ptrs, mask=dq_mask, other=0.0) + _dot(p, b_k, FP32_IEEE), mask=dq_mask)
            tl.debug_barrier()
    scale = tl.load(GRAD_LOSS).to(tl.float32) * grad_scale
    if tl.program_id(1) == 0:
        positive2 = tl.load(POS_COS + rows, mask=row_mask, other=0.0) * scale2
        tl.store(POS_COEF + rows, (tl.exp2(positive2 - lse2) - 1.0) * scale, mask=row_mask)
    _store_scaled_rows(dq_base, r, row_mask, acc, scale, D, SINGLE_K, BLOCK_K)


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelConfig:
    """Tile shape of the pair kernels. ``single_k``: the whole feature dimension is one
    ``block_k`` tile (register accumulation); otherwise d is walked in ``block_k`` chunks.
    ``fp32_operands``: keep ẑ in float32 and multiply in IEEE float32 even for half inputs
    (None: only when d <= ``FP32_OPERANDS_MAX_D``, see :func:`operand_dtype`).
    ``col_splits``: programs per row block, each sweeping a contiguous share of the columns
    (None: :func:`column_splits`' choice on CUDA, 1 under the interpreter)."""

    block_m: int
    block_n: int
    block_k: int
    single_k: bool
    num_warps: int = 4
    num_stages: int = 2
    fp32_operands: Optional[bool] = None
    col_splits: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            # tl.dot needs every tile side >= 16 on the GPU, and arange needs powers of two.
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
        if self.col_splits is not None and self.col_splits < 1:
            raise ValueError(f"col_splits must be >= 1, got {self.col_splits}")


def default_config(d: int, dtype: torch.dtype, bank: bool = False) -> KernelConfig:
    """Tiles for feature dimension ``d`` and operand ``dtype``.

    GPU: 64-row blocks so that small batches still fill the chip (with the column splits of
    :func:`column_splits`); half operands up to d = 128 as one warpgroup (4 warps, wgmma
    m64n64), chosen so that ptxas (sm_90) allocates every forward and backward kernel without
    register spills (checked by compiling the captured launches for sm_90): half operands keep
    the whole row in one register tile up to d = 256 and walk d in chunks of 32 beyond; float32
    operands (IEEE products on the FMA units, which hold both operands in registers) keep one
    tile up to d = 64 and walk chunks of 32 beyond, with the warps and stages that keep both
    the NT-Xent and the InfoNCE (``bank``) kernels spill-free under Triton 3.6 and 3.9. Under the interpreter, whose cost is per operation and
    program rather than per element, the largest tiles that stay small in memory."""
    block_d = max(16, triton.next_power_of_2(d))
    if triton_interpreter_enabled():
        if block_d <= 256:
            return KernelConfig(64, 128, block_d, True)
        return KernelConfig(64, 128, 256, False)
    if dtype in (torch.float16, torch.bfloat16):
        if block_d <= 128:
            return KernelConfig(64, 64, block_d, True, num_warps=4, num_stages=3)
        if block_d <= 256:
            return KernelConfig(64, 32, block_d, True, num_warps=8, num_stages=2)
        # d in chunks: the backward's read-modify-write of its float32 rows per chunk needs
        # 32-wide tiles to stay within 255 registers (64-wide ones spill).
        return KernelConfig(64, 32, 32, False, num_warps=4, num_stages=2)
    # float32 operands: IEEE products on the FMA units (no tensor cores), software-pipelined
    # loads gain little and cost registers (the InfoNCE backward spills with 2 stages).
    if block_d <= 16:
        return KernelConfig(64, 64, block_d, True, num_warps=4, num_stages=2)
    if block_d <= 64:
        return KernelConfig(64, 32, block_d, True, num_warps=8, num_stages=1)
    # d in chunks. Triton 3.6 caps the registers of the bank kernels lower (64-80) than 3.9 and
    # spills them with 64-row blocks; 32-row blocks fit both.
    if bank:
        return KernelConfig(32, 32, 32, False, num_warps=4, num_stages=1)
    return KernelConfig(64, 32, 32, False, num_warps=4, num_stages=1)


# The H200's (and H100's) SM count: the schedule assumed for a device that is not a CUDA one
# (launch capture and reports on a machine without a GPU).
DEFAULT_SMS = 132
# Programs of the default tiles resident per SM (registers and shared memory allow 2-3).
PROGRAMS_PER_SM = 2
# The H200's measured rates behind the floor: bf16 MMA and copy bandwidth.
MMA_FLOPS = 790e12
COPY_BYTES_PER_S = 4.3e12
MAX_SPLITS = 65535  # grid axis 1


@functools.lru_cache(maxsize=None)
def _sm_count_of(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """SMs of a CUDA device (a cached property query, no sync); DEFAULT_SMS elsewhere."""
    if device.type != "cuda":
        return DEFAULT_SMS
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


def column_splits(
    row_blocks: int, col_tiles: int, sweep_seconds: float, partial_seconds: float, sms: int = DEFAULT_SMS
) -> int:
    """Programs per row block for a column sweep split S ways, from a cost model.

    With ``slots = PROGRAMS_PER_SM · sms`` programs resident at once, row_blocks·S programs of
    ``sweep_seconds / S`` each (one row block's whole sweep takes ``sweep_seconds`` on one
    program slot) take ``ceil(row_blocks·S / slots) · sweep_seconds / S``; each further split
    adds ``partial_seconds`` (writing and re-reading its partial results). The smallest S
    minimizing the sum (each further split must gain 5 %), at most one per column tile; S = 1
    once the row blocks alone fill every slot. Large batches get S = 1; NT-Xent
    2N = 8192 (128 row blocks) gets 2, InfoNCE N = 256 against 65536 bank rows about 64."""
    slots = PROGRAMS_PER_SM * max(1, sms)
    if row_blocks >= slots:
        # The rows alone fill every slot: a split would only shave the last wave's imbalance
        # while its partial results grow with the batch.
        return 1
    best, best_time = 1, math.inf
    for splits in range(1, min(col_tiles, MAX_SPLITS, 4 * slots) + 1):
        waves = -(-row_blocks * splits // slots)
        time = waves * sweep_seconds / splits + (splits - 1) * partial_seconds
        if time < best_time * 0.95:  # a split must pay for itself clearly
            best, best_time = splits, time
    return best


def _split_columns(
    cfg: KernelConfig, n_rows: int, n_cols: int, flops_per_logit: float, partial_bytes: float, device: torch.device
) -> Tuple[int, int]:
    """(splits, columns per split, a multiple of block_n) for a sweep of n_rows × n_cols logits."""
    col_tiles = triton.cdiv(max(n_cols, 1), cfg.block_n)
    if cfg.col_splits is not None:
        splits = min(cfg.col_splits, col_tiles)
    elif device.type != "cuda" and triton_interpreter_enabled():
        splits = 1  # the interpreter's cost is per program
    else:
        sms = sm_count(device)
        per_slot = MMA_FLOPS / (PROGRAMS_PER_SM * sms)
        sweep = cfg.block_m * n_cols * flops_per_logit / per_slot
        splits = column_splits(triton.cdiv(n_rows, cfg.block_m), col_tiles, sweep, partial_bytes / COPY_BYTES_PER_S, sms)
    tiles_per_split = triton.cdiv(col_tiles, splits)
    return triton.cdiv(col_tiles, tiles_per_split), tiles_per_split * cfg.block_n


# Up to this d the pair kernels keep ẑ in float32 for half inputs. Rounding ẑ to bf16 moves a
# logit by ~2^-9·|ẑ|/τ; at large d those roundings average out over the features, at small d
# they do not and the result is no more accurate than PyTorch's own bf16 arithmetic. Small d is
# also where float32 products are cheap: at 2d FLOPs per logit the FMA units keep up with the
# exponential unit (one exp per logit) until d ≈ 16.
FP32_OPERANDS_MAX_D = 16


def operand_dtype(d: int, dtype: torch.dtype, config: Optional[KernelConfig] = None) -> torch.dtype:
    """Dtype of the stored ẑ and of the ``tl.dot`` operands for inputs of ``dtype`` and width d."""
    fp32 = config.fp32_operands if config is not None and config.fp32_operands is not None else d <= FP32_OPERANDS_MAX_D
    return torch.float32 if fp32 or dtype == torch.float32 else dtype


def _resolve_config(config: Optional[KernelConfig], d: int, dtype: torch.dtype, bank: bool = False) -> KernelConfig:
    config = config or default_config(d, dtype, bank)
    if config.single_k and config.block_k < d:
        raise ValueError(f"single_k needs block_k >= d, got block_k={config.block_k} for d={d}")
    return config


def _check_kernel_dtype(name: str, x: Tensor) -> None:
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16 for the Triton kernels, got {x.dtype}")


def _dot_in_fp32(dtype: torch.dtype) -> bool:
    """Float32 inputs always; bfloat16 under the interpreter (see ``_dot``)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and triton_interpreter_enabled())


def _emulate_rtne(dtype: torch.dtype) -> bool:
    """Round float32 → bfloat16 by hand under the interpreter (see ``_round_to``)."""
    return dtype == torch.bfloat16 and triton_interpreter_enabled()


def _int32_addressable(bank: Tensor, cfg: KernelConfig) -> Tensor:
    """The bank kernels address within a tile in int32 (``_bank_tile``): copy the rare bank whose
    strides would overflow that."""
    limit = 2**31 - 1
    if bank.stride(0) * cfg.block_n >= limit or bank.stride(1) * max(bank.shape[1], cfg.block_k) >= limit:
        return bank.contiguous()
    return bank


def _norm_blocks(m: int, d: int) -> Tuple[int, int]:
    """(rows, features) per program of the row-wise kernels: ≤ 2048 elements on the GPU, fewer
    rows while that leaves less than a wave of 2 programs per SM (these kernels are
    bandwidth-bound: InfoNCE's 256 queries summing 64 partial gradients need every SM); under
    the interpreter, as many rows as fit 2**16 elements (its cost is per program)."""
    block_d = min(max(16, triton.next_power_of_2(d)), 1024)
    if triton_interpreter_enabled():
        return max(1, min((1 << 16) // block_d, triton.next_power_of_2(m))), block_d
    rows = max(1, min(2048 // block_d, triton.next_power_of_2(m)))
    while rows > 1 and triton.cdiv(m, rows) < PROGRAMS_PER_SM * DEFAULT_SMS:
        rows //= 2
    return rows, block_d


# --------------------------------------------------------------------------------------------
# Launchers (explicit output buffers, so tests can poison them)
# --------------------------------------------------------------------------------------------

_LOG2E = 1.4426950408889634
_MERGE_BLOCK = 1024  # rows per program of the split merge (S·8 bytes per row)


def _launch(kernel, grid: Tuple[int, ...], *args, **kwargs) -> None:
    """Every kernel launch of this module goes through here (one place to observe them)."""
    kernel[grid](*args, **kwargs)


def _upstream(grad_loss: Tensor) -> Tensor:
    """The incoming loss gradient as the float32 scalar the kernels read on the device (no host
    sync). Autograd hands the 0-d float32 loss's gradient over as is: no copy then."""
    if grad_loss.dtype != torch.float32 or grad_loss.numel() != 1 or not grad_loss.is_contiguous():
        grad_loss = grad_loss.to(torch.float32).reshape(1).contiguous()
    return grad_loss


def l2_normalize_rows(
    x: Tensor, z: Optional[Tensor] = None, norms: Optional[Tensor] = None, row_offset: int = 0,
    dtype: Optional[torch.dtype] = None,
) -> Tuple[Tensor, Tensor]:
    """ẑ = x/max(‖x‖, 1e-12) into rows ``row_offset ..`` of ``z`` (contiguous (·, d)) and ‖x‖ into
    ``norms[row_offset ..]`` (float32; a workspace whose first region holds the norms). ``x``
    (M, d) may have any strides. Returns (z, norms)."""
    m, d = x.shape
    if z is None:
        z = torch.empty((m + row_offset, d), dtype=dtype or x.dtype, device=x.device)
    if norms is None:
        norms = torch.empty(m + row_offset, dtype=torch.float32, device=x.device)
    assert z.is_contiguous() and norms.dtype == torch.float32
    block_m, block_d = _norm_blocks(m, d)
    _launch(_l2_normalize_fwd_kernel, (triton.cdiv(m, block_m),),
        x, x.stride(0), x.stride(1), z, norms, m, d, row_offset,
        EPS=_NORM_EPS, BF16_RTNE=_emulate_rtne(z.dtype), BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4,
    )
    return z, norms


def l2_normalize_rows_backward(
    x: Tensor, norms: Tensor, grad_z: Optional[Tensor], out: Optional[Tensor] = None, *,
    norm_offset: int = 0, dz_offset: int = 0, n_parts: int = 1, part_stride: int = 0,
    partner: Optional[Tensor] = None, partner_offset: int = 0,
    partner_coef: Optional[Tensor] = None, coef_offset: int = 0,
    projection: Optional[Tensor] = None, proj_offset: int = 0, projection_scale: float = 1.0,
) -> Tensor:
    """dx (x's shape and dtype, contiguous) from ‖x‖ = ``norms[norm_offset + i]`` and dẑ = the sum
    of ``n_parts`` float32 (M, d) row blocks of ``grad_z`` starting at element ``dz_offset``,
    ``part_stride`` elements apart (the column splits' partial gradients) -- plus
    ``partner_coef[coef_offset + i] · partner[i]`` with a partner (contiguous rows of d from
    element ``partner_offset``); without ``grad_z``, that term alone. With ``projection``
    (float32), ``projection_scale``·ẑ·dẑ of each row is written to ``projection[proj_offset + i]``
    too. Every buffer is passed whole with element offsets (no views: no operators)."""
    m, d = x.shape
    if out is None:
        out = torch.empty((m, d), dtype=x.dtype, device=x.device)
    has_dz = grad_z is not None
    assert out.is_contiguous() and (not has_dz or (grad_z.is_contiguous() and grad_z.dtype == torch.float32))
    has_partner = partner is not None
    assert has_dz or has_partner
    if has_partner:
        assert partner.is_contiguous() and partner.shape[-1] == d and partner_coef is not None
    block_m, block_d = _norm_blocks(m, d)
    _launch(_l2_normalize_bwd_kernel, (triton.cdiv(m, block_m),),
        x, x.stride(0), x.stride(1), norms, grad_z if has_dz else norms, out, m, d, n_parts if has_dz else 1,
        part_stride if has_dz else 0, partner if has_partner else norms, partner_coef if has_partner else norms,
        projection if projection is not None else norms,
        norm_offset, dz_offset if has_dz else 0, partner_offset if has_partner else 0,
        coef_offset if has_partner else 0, proj_offset if projection is not None else 0,
        HAS_DZ=has_dz, HAS_PARTNER=has_partner, STORE_PROJECTION=projection is not None,
        PROJECTION_SCALE=float(projection_scale), EPS=_NORM_EPS,
        BF16_RTNE=_emulate_rtne(out.dtype), BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4,
    )
    return out


def l2_normalize_pair_rows(x: Tensor, y: Tensor, z: Tensor, ws: Tensor, cos_offset: int) -> None:
    """Both views in one launch: ẑ of x (M, d) into rows 0..M of ``z`` (contiguous (2M, d)) and of
    y into rows M..2M, ‖x‖ and ‖y‖ into ``ws[0 : 2M]`` (float32 workspace) and cos(x_i, y_i)
    into ``ws[cos_offset + i]``; x and y may have any strides."""
    m, d = x.shape
    assert z.is_contiguous() and ws.dtype == torch.float32 and y.shape == x.shape
    block_m, block_d = _norm_blocks(m, d)
    _launch(_l2_normalize_pair_fwd_kernel, (triton.cdiv(m, block_m),),
        x, x.stride(0), x.stride(1), y, y.stride(0), y.stride(1), z, ws, m, d, cos_offset,
        EPS=_NORM_EPS, BF16_RTNE=_emulate_rtne(z.dtype), BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4,
    )


def l2_normalize_pair_rows_backward(
    x: Tensor, y: Tensor, ws: Tensor, grads: Tensor, dx: Tensor, dy: Tensor, partner: Tensor, *, norm_offset: int,
    dz_offset: int, n_parts: int, part_stride: int, coef_offset: int, projection: bool, proj_offset: int,
    projection_scale: float,
) -> None:
    """NT-Xent's two normalization backwards in one launch: dx from view 0 and dy from view 1
    (M, d each, contiguous, their dtypes). Norms at ``ws[norm_offset ..]`` (2M), partial
    gradients (``n_parts`` × (2M, d) float32, ``part_stride`` apart) at ``grads[dz_offset ..]``,
    the positives' coefficients at ``grads[coef_offset ..]`` (2M), the partners' ẑ the rows of
    ``partner`` (2M, d) of the other view; with ``projection``, ``projection_scale``·ẑ·dẑ into
    ``grads[proj_offset ..]`` (2M)."""
    m, d = x.shape
    assert dx.is_contiguous() and dy.is_contiguous() and partner.is_contiguous() and grads.dtype == torch.float32
    block_m, block_d = _norm_blocks(m, d)
    _launch(_l2_normalize_pair_bwd_kernel, (2 * triton.cdiv(m, block_m),),
        x, x.stride(0), x.stride(1), y, y.stride(0), y.stride(1), ws, grads, dx, dy, m, d, m * d, n_parts,
        part_stride, partner, grads, grads, norm_offset, dz_offset, coef_offset, proj_offset if projection else 0,
        STORE_PROJECTION=projection, PROJECTION_SCALE=float(projection_scale), EPS=_NORM_EPS,
        BF16_RTNE=_emulate_rtne(dx.dtype), BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4,
    )


# --- workspaces: one float32 tensor per call, carved into regions by element offsets --------

# Every region starts on a multiple of 16 elements: its offset then carries Triton's
# 16-divisibility attribute, and the kernels' row-wise float32 accesses stay as aligned
# (vectorized) as on a separate allocation.
_REGION_ALIGN = 16


class Regions:
    """Element offsets of the named regions of one float32 workspace, in the order given (each
    16-aligned; a region of size 0 takes no room), and the workspace's total ``size``.

    One workspace per call instead of one allocation per array: the arrays reach the kernels as
    (workspace, offset) pairs, so neither the allocations nor the views of a workspace cost an
    operator each."""

    def __init__(self, **sizes: int) -> None:
        offset = 0
        self.sizes = dict(sizes)
        self.offsets: dict = {}
        for name, size in sizes.items():
            self.offsets[name] = offset
            offset += -(-int(size) // _REGION_ALIGN) * _REGION_ALIGN
        self.size = offset

    def __getattr__(self, name: str) -> int:
        offsets = self.__dict__.get("offsets")
        if offsets is None or name not in offsets:
            raise AttributeError(name)
        return offsets[name]

    def view(self, workspace: Tensor, name: str) -> Tensor:
        """The region as a tensor (a view: for tests and the rare path that needs one)."""
        return workspace.narrow(0, self.offsets[name], self.sizes[name])


@dataclass(frozen=True)
class Sweep:
    """Tiles of a pair or bank kernel and the split of its column sweep (:func:`_split_columns`)."""

    config: KernelConfig
    splits: int
    cols_per_split: int


def _sweep(config: Optional[KernelConfig], n_rows: int, n_cols: int, d: int, dtype: torch.dtype, device: torch.device,
           backward: bool, bank: bool = False) -> Sweep:
    """The launch plan of a forward (``backward`` false) or backward sweep of n_rows × n_cols
    logits: the split model counts 2d FLOPs per logit and 16 bytes of (m, l) partials per row
    forward, 4d FLOPs per logit and 8d bytes of partial gradients per row backward."""
    cfg = _resolve_config(config, d, dtype, bank)
    if backward:
        splits, cols = _split_columns(cfg, n_rows, n_cols, 4.0 * d, 8.0 * n_rows * d, device)
    else:
        splits, cols = _split_columns(cfg, n_rows, n_cols, 2.0 * d, 16.0 * n_rows, device)
    return Sweep(cfg, splits, cols)


def _partials_size(sweep: Sweep, n_rows: int) -> int:
    """(2, S, R) float32 (max, sum) partials of a split forward sweep; none unsplit."""
    return 2 * sweep.splits * n_rows if sweep.splits > 1 else 0


def _new_workspace(like: Tensor, regions: Regions) -> Tensor:
    return like.new_empty((regions.size,), dtype=torch.float32)


def _temperature_operand(temperature: Optional[Tensor], placeholder: Tensor) -> Tuple[Tensor, bool]:
    """(the TEMP pointer, TEMP_IN_MEMORY) of the kernels: a tensor temperature as given when it
    is float32 (the kernels read its one element; no operator), else converted once; without
    one, an unread placeholder."""
    if temperature is None:
        return placeholder, False
    if temperature.dtype != torch.float32:
        temperature = temperature.detach().to(torch.float32)
    return temperature, True


def _merge_splits(ws: Tensor, at: Regions, n_rows: int, n_splits: int, n_local: int, scale2: float,
                  with_positive: bool, temperature: Optional[Tensor] = None) -> None:
    block = _MERGE_BLOCK if not triton_interpreter_enabled() else triton.next_power_of_2(min(n_rows, 1 << 14))
    temp, temp_in_memory = _temperature_operand(temperature, ws)
    _launch(_lse_merge_kernel, (triton.cdiv(n_rows, block),),
        ws, temp, n_rows, n_local, n_splits, scale2, at.partials, at.pos_cos if with_positive else 0, at.lse,
        at.row_loss if with_positive else 0,
        HAS_POSITIVE=with_positive, TEMP_IN_MEMORY=temp_in_memory, BLOCK=block, num_warps=4,
    )


def pair_lse_forward(
    z_rows: Tensor, z_cols: Tensor, ws: Tensor, at: Regions, sweep: Sweep, inv_temp: float, n_local: int,
    col_offset: int, *, with_positive: bool = True, temperature: Optional[Tensor] = None, clamp_bias: bool = False,
) -> None:
    """Per-row log-sum-exp of z_rows·z_colsᵀ·inv_temp over all columns but each row's own
    (``col_offset + r``) into the region ``lse`` of the float32 workspace ``ws``, and
    ``with_positive`` -- the positive pairs' cosines in region ``pos_cos`` (n_local,) -- the
    NT-Xent row loss into ``row_loss``; a split sweep uses region ``partials``
    (:func:`_partials_size`). z_rows (R, d), z_cols (C, d) contiguous, same dtype.
    ``temperature``: a one-element tensor τ read by the kernels in place of ``inv_temp`` (which
    is then ignored). ``clamp_bias`` (uniformity, rows = columns): logits biased for rows below
    the clamp (``_clamp_bias2``) from the norms in region ``norms``."""
    r, d = z_rows.shape
    c = z_cols.shape[0]
    cfg = sweep.config
    temp, temp_in_memory = _temperature_operand(temperature, ws)
    scale2 = _LOG2E if temp_in_memory else float(inv_temp) * _LOG2E
    _launch(_pair_lse_fwd_kernel, (triton.cdiv(r, cfg.block_m), sweep.splits),
        z_rows, z_cols, ws, temp, r, c, d, n_local, col_offset, scale2, sweep.cols_per_split,
        at.pos_cos if with_positive else 0, at.lse, at.row_loss if with_positive else 0,
        at.partials if sweep.splits > 1 else 0, at.norms if clamp_bias else 0,
        HAS_POSITIVE=with_positive, SPLIT=sweep.splits > 1, FP32_IEEE=_dot_in_fp32(z_rows.dtype),
        BF16_RTNE=_emulate_rtne(z_rows.dtype), TEMP_IN_MEMORY=temp_in_memory,
        CLAMP_BIAS=clamp_bias, EPS=_NORM_EPS,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SINGLE_K=cfg.single_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if sweep.splits > 1:
        _merge_splits(ws, at, r, sweep.splits, n_local, scale2, with_positive, temperature)


def _factored_backward(inv_temp: float, n_cols: int) -> bool:
    """Whether the backward may use e^{S-lse_c} = e^{S-lse_r}·e^{lse_r-shift}·e^{shift-lse_c}.

    Every logit lies in [-1/|τ|, 1/|τ|], so every lse lies in ±1/|τ| + [0, log C] and, with
    shift = log(C-1), each factor lies within e^{±(1/|τ| + log C)}, and e^{S - lse_r} is at
    least e^{-(2/|τ| + log C)}. Below e^{-80} float32 loses it (underflow) while its partner
    e^{S - lse_c} may matter; above that bound the factored form is exact to rounding."""
    return 2.0 * abs(inv_temp) + math.log(max(n_cols, 2)) < 80.0


def pair_lse_backward(
    z_rows: Tensor, z_cols: Tensor, state: Tensor, at: Regions, lse_r_offset: int, lse_c_offset: int,
    out: Tensor, out_at: Regions, sweep: Sweep, grad_loss: Tensor, inv_temp: float, grad_scale: float,
    n_local: int, col_offset: int, *, with_positive: bool = True, factored: Optional[bool] = None,
    global_lse: bool = False, temperature: Optional[Tensor] = None, clamp_bias: bool = False,
) -> None:
    """dẑ rows: ``grad_loss · grad_scale · Σ_c (e^{S-lse_r} + e^{S-lse_c} - 2[c = pos]) z_c``.

    Reads the forward's workspace ``state`` (regions ``pos_cos`` and ``norms`` of ``at``; the
    rows' and columns' log-sum-exps at element offsets ``lse_r_offset``/``lse_c_offset``) and
    writes into ``out``: region ``dz`` of ``out_at``, (S, R, d) float32 -- the column splits'
    partial sums, S = 1 for an unsplit sweep -- and, ``with_positive``, region ``coef`` (R,):
    the positive column's term, left out of dz, as a coefficient of the row's partner ẑ_{r ± n}
    (see ``_pair_lse_bwd_kernel``). The log-sum-exps must be those of these logits for the
    factored form (default: where it is exact, :func:`_factored_backward`); ``global_lse``: one
    log-sum-exp for every row and column at ``lse_r_offset`` (uniformity). ``temperature``: a
    one-element tensor τ read by the kernel; ``inv_temp`` is then ignored and ``grad_scale``
    given without its factor 1/τ. ``clamp_bias`` (with ``global_lse``; ``lse_c_offset`` then
    the rows' log-sum-exps): the forward's biases, and ``coef`` is the radial term of the rows
    below the clamp (multiplies their own ẑ)."""
    r, d = z_rows.shape
    c = z_cols.shape[0]
    cfg = sweep.config
    with_coefficient = with_positive or clamp_bias
    temp, temp_in_memory = _temperature_operand(temperature, state)
    if factored is None:
        # A tensor temperature's value is not read on the host: the two-exponential form.
        factored = not temp_in_memory and _factored_backward(inv_temp, c)
    weights = 2 if global_lse else int(bool(factored))
    scale2 = _LOG2E if temp_in_memory else float(inv_temp) * _LOG2E
    _launch(_pair_lse_bwd_kernel, (triton.cdiv(r, cfg.block_m), sweep.splits),
        z_rows, z_cols, state, _upstream(grad_loss), out, temp,
        r, c, d, n_local, col_offset, scale2, float(grad_scale), math.log2(max(c - 1, 1)), sweep.cols_per_split,
        at.pos_cos if with_positive else 0, lse_r_offset, lse_c_offset, at.norms if clamp_bias else 0,
        out_at.dz, out_at.coef if with_coefficient else 0,
        HAS_POSITIVE=with_positive, WEIGHTS=weights, FP32_IEEE=_dot_in_fp32(z_rows.dtype),
        BF16_RTNE=_emulate_rtne(z_rows.dtype), TEMP_IN_MEMORY=temp_in_memory,
        CLAMP_BIAS=clamp_bias, EPS=_NORM_EPS,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SINGLE_K=cfg.single_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def infonce_forward(
    z: Tensor, bank: Tensor, ws: Tensor, at: Regions, sweep: Sweep, inv_temp: float,
    temperature: Optional[Tensor] = None,
) -> None:
    """Log-sum-exps (region ``lse``) and row losses (``row_loss``) of the queries q̂ = the first N
    rows of ``z`` against [own key (cosine in region ``pos_cos``); bank (K, d), any strides];
    a split sweep uses region ``partials``. ``temperature``: as for :func:`pair_lse_forward`."""
    n, d = at.sizes["lse"], z.shape[1]
    k = bank.shape[0]
    cfg = sweep.config
    bank = _int32_addressable(bank, cfg)
    temp, temp_in_memory = _temperature_operand(temperature, ws)
    scale2 = _LOG2E if temp_in_memory else float(inv_temp) * _LOG2E
    _launch(_infonce_fwd_kernel, (triton.cdiv(n, cfg.block_m), sweep.splits),
        z, bank, bank.stride(0), bank.stride(1), ws, temp, n, k, d, scale2, sweep.cols_per_split,
        at.pos_cos, at.lse, at.row_loss, at.partials if sweep.splits > 1 else 0,
        SPLIT=sweep.splits > 1, FP32_IEEE=_dot_in_fp32(z.dtype), BF16_RTNE=_emulate_rtne(z.dtype),
        TEMP_IN_MEMORY=temp_in_memory,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SINGLE_K=cfg.single_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if sweep.splits > 1:
        _merge_splits(ws, at, n, sweep.splits, n, scale2, True, temperature)


def infonce_backward(
    z: Tensor, bank: Tensor, state: Tensor, at: Regions, out: Tensor, out_at: Regions, sweep: Sweep,
    grad_loss: Tensor, inv_temp: float, grad_scale: float, temperature: Optional[Tensor] = None,
) -> None:
    """Into ``out``: region ``dz`` -- dq̂ from the bank, (S, N, d) float32, the bank splits'
    partial sums -- and ``coef`` (N,) float32: the full gradients are Σ_S dq̂ + coef·k̂ and
    dk̂ = coef·q̂ (added by the normalization backward). q̂ = the first N rows of ``z``;
    ``state``/``at``: the forward's workspace. ``temperature``: as for :func:`pair_lse_backward`."""
    n, d = at.sizes["lse"], z.shape[1]
    k = bank.shape[0]
    cfg = sweep.config
    bank = _int32_addressable(bank, cfg)
    temp, temp_in_memory = _temperature_operand(temperature, state)
    scale2 = _LOG2E if temp_in_memory else float(inv_temp) * _LOG2E
    _launch(_infonce_bwd_kernel, (triton.cdiv(n, cfg.block_m), sweep.splits),
        z, bank, bank.stride(0), bank.stride(1), state, _upstream(grad_loss), out, temp,
        n, k, d, scale2, float(grad_scale), sweep.cols_per_split, at.pos_cos, at.lse, out_at.dz, out_at.coef,
        FP32_IEEE=_dot_in_fp32(z.dtype), BF16_RTNE=_emulate_rtne(z.dtype), TEMP_IN_MEMORY=temp_in_memory,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SINGLE_K=cfg.single_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


# --------------------------------------------------------------------------------------------
# Operators: every Triton path is a forward and a backward ``torch.library`` custom op with a
# registered autograd formula and fake (shape) functions, so ``torch.compile`` records each as
# one opaque node -- no graph break, no tracing into the launchers -- and autograd still
# connects them.
#
# Eager operators per call. The forward returns, beside the loss, the normalized rows (operand
# dtype) and ONE float32 workspace holding every per-row array its kernels and the backward
# need (norms, positive cosines, log-sum-exps, row losses, split partials), carved by element
# offsets (:class:`Regions`): two allocations, and the loss as the mean of the row-loss region
# (a view and a mean). Those outputs are marked non-differentiable: autograd then neither
# detaches them when they are returned nor when the backward unpacks them (it did, one
# ``aten.detach`` each, six per direction). The backward allocates one float32 workspace
# (partial gradients, positive coefficients, temperature projections) and the two input
# gradients, and returns the temperature's gradient only when there is one (a ``Tensor[]``:
# no placeholder). A custom op may not return an alias of an input or of another output.
# --------------------------------------------------------------------------------------------


def _config_to_ints(config: Optional[KernelConfig]) -> List[int]:
    """A :class:`KernelConfig` as the ``int[]`` an operator schema can carry ([] = the default)."""
    if config is None:
        return []
    fp32 = -1 if config.fp32_operands is None else int(config.fp32_operands)
    return [config.block_m, config.block_n, config.block_k, int(config.single_k), config.num_warps,
            config.num_stages, fp32, config.col_splits or 0]


def _config_from_ints(ints: Sequence[int]) -> Optional[KernelConfig]:
    if len(ints) == 0:
        return None
    block_m, block_n, block_k, single_k, num_warps, num_stages, fp32, splits = (int(v) for v in ints)
    return KernelConfig(block_m, block_n, block_k, bool(single_k), num_warps, num_stages,
                        None if fp32 < 0 else bool(fp32), splits or None)


def _common_dtype(a: Tensor, b: Tensor) -> torch.dtype:
    # (torch.promote_types shows up as an operator call; the common case needs none)
    return a.dtype if a.dtype == b.dtype else torch.promote_types(a.dtype, b.dtype)


def _temperature_gradient(ws: Tensor, at: Regions, temperature: Tensor) -> Tensor:
    r""":math:`\partial L/\partial\tau = -\frac{1}{h\tau}\sum_k \hat z_k\cdot\partial L/\partial\hat z_k`
    from the normalization backward's per-row projections (region ``projection``), stored already
    times -1/h (the logits are of degree h in the normalized rows: 2 for NT-Xent, 1 for
    InfoNCE's queries; see :func:`_projection_scale`), in τ's dtype and shape."""
    grad = at.view(ws, "projection").sum() / temperature
    if grad.dtype != temperature.dtype:
        grad = grad.to(temperature.dtype)
    return grad if grad.shape == temperature.shape else grad.reshape(temperature.shape)


def _projection_scale(homogeneity: int) -> float:
    return -1.0 / homogeneity


class _NTXentPlan:
    """Shapes, launch plans and workspace layouts of one NT-Xent call: computed alike by the
    forward, the backward and the fake functions (no tensor data read)."""

    def __init__(self, n_local: int, d: int, dtype: torch.dtype, device: torch.device, rank_rows: Sequence[int],
                 config_ints: Sequence[int], temperature_grad: bool = False) -> None:
        config = _config_from_ints(config_ints)
        self.n_local, self.d = n_local, d
        self.rows = 2 * n_local
        self.distributed = len(rank_rows) > 0
        # Columns: every rank's [view 0; view 1] block in rank order, this rank's at col_offset.
        self.block_rows = [2 * int(rows) for rows in rank_rows]
        self.cols = sum(self.block_rows) if self.distributed else self.rows
        self.col_offset = distributed.rank_row_offset(self.rows, sizes=self.block_rows) if self.distributed else 0
        self.z_dtype = operand_dtype(d, dtype, config)
        self.forward_sweep = _sweep(config, self.rows, self.cols, d, self.z_dtype, device, backward=False)
        self.backward_sweep = _sweep(config, self.rows, self.cols, d, self.z_dtype, device, backward=True)
        # The norms first: the normalization kernel writes them at the workspace's start.
        self.state = Regions(norms=self.rows, pos_cos=n_local, lse=self.rows,
                             lse_cols=self.cols if self.distributed else 0, row_loss=self.rows,
                             partials=_partials_size(self.forward_sweep, self.rows))
        self.grads = Regions(coef=self.rows, projection=self.rows if temperature_grad else 0,
                             dz=self.backward_sweep.splits * self.rows * d)

    @property
    def lse_cols_offset(self) -> int:
        return self.state.lse_cols if self.distributed else self.state.lse


def _ntxent_forward(
    out0: Tensor, out1: Tensor, temperature: Optional[Tensor], inv_temp: float, rank_rows: List[int],
    config_ints: List[int],
) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (loss, ẑ, workspace): ẑ the normalized rows (2n, d) -- in a distributed run
    (``rank_rows`` every rank's n, else empty) the gathered columns (2N, d), this rank's rows
    at its column offset -- and the float32 workspace of :class:`_NTXentPlan` (norms, positive
    cosines, log-sum-exps, gathered ones when distributed, row losses). ``temperature``: a
    tensor τ read on the device (``inv_temp`` ignored)."""
    plan = _NTXentPlan(out0.shape[0], out0.shape[1], _common_dtype(out0, out1), out0.device, rank_rows, config_ints)
    z_rows = out0.new_empty((plan.rows, plan.d), dtype=plan.z_dtype)
    ws = _new_workspace(out0, plan.state)
    z_cols = _ntxent_forward_into(out0, out1, temperature, inv_temp, plan, z_rows, ws)
    loss = plan.state.view(ws, "row_loss").mean()
    if plan.distributed:
        lse_cols = distributed.gather_no_grad(plan.state.view(ws, "lse"), plan.block_rows)
        plan.state.view(ws, "lse_cols").copy_(lse_cols)
        return loss, z_cols, ws
    return loss, z_rows, ws


def _ntxent_forward_into(out0: Tensor, out1: Tensor, temperature: Optional[Tensor], inv_temp: float,
                         plan: _NTXentPlan, z_rows: Tensor, ws: Tensor) -> Tensor:
    """The forward's launches, writing ẑ rows into ``z_rows`` and every per-row array into the
    workspace ``ws``; returns the columns (``z_rows`` itself in a single process, the gathered
    rows of every rank when distributed, whose log-sum-exps the caller then gathers)."""
    n_local, at = plan.n_local, plan.state
    l2_normalize_pair_rows(out0, out1, z_rows, ws, at.pos_cos)  # ẑ, norms (region 0) and cosines
    if plan.distributed:
        z_cols = distributed.gather_no_grad(z_rows, plan.block_rows)
    else:
        z_cols = z_rows
    pair_lse_forward(z_rows, z_cols, ws, at, plan.forward_sweep, inv_temp, n_local, plan.col_offset,
                     temperature=temperature)
    return z_cols


def _ntxent_backward(
    grad_loss: Tensor, out0: Tensor, out1: Tensor, temperature: Optional[Tensor], z: Tensor, ws: Tensor,
    inv_temp: float, rank_rows: List[int], temperature_grad: bool, config_ints: List[int],
) -> List[Tensor]:
    """[dout0, dout1] and, with ``temperature_grad``, dτ."""
    plan = _NTXentPlan(out0.shape[0], out0.shape[1], _common_dtype(out0, out1), out0.device, rank_rows, config_ints,
                       temperature_grad)
    grads = _new_workspace(out0, plan.grads)
    grad0 = torch.empty(out0.shape, dtype=out0.dtype, device=out0.device)
    grad1 = torch.empty(out1.shape, dtype=out1.dtype, device=out1.device)
    _ntxent_backward_into(grad_loss, out0, out1, temperature, z, ws, inv_temp, plan, grads, grad0, grad1)
    if not temperature_grad:
        return [grad0, grad1]
    assert temperature is not None
    return [grad0, grad1, _temperature_gradient(grads, plan.grads, temperature)]


def _ntxent_backward_into(grad_loss: Tensor, out0: Tensor, out1: Tensor, temperature: Optional[Tensor], z: Tensor,
                          ws: Tensor, inv_temp: float, plan: _NTXentPlan, grads: Tensor, grad0: Tensor,
                          grad1: Tensor) -> None:
    n_local, d, at, out_at = plan.n_local, plan.d, plan.state, plan.grads
    if plan.distributed:  # z holds every rank's rows; this rank's at its column offset
        z_rows, z_cols = z.narrow(0, plan.col_offset, plan.rows), z
    else:
        z_rows = z_cols = z
    # 1/(2n), this rank's row count: W × the global gradient when distributed (module doc);
    # the kernel multiplies by 1/τ itself when τ is a tensor.
    row_scale = 1.0 / (2 * n_local)
    grad_scale = row_scale if temperature is not None else inv_temp * row_scale
    pair_lse_backward(z_rows, z_cols, ws, at, at.lse, plan.lse_cols_offset, grads, out_at, plan.backward_sweep,
                      grad_loss, inv_temp, grad_scale, n_local, plan.col_offset, temperature=temperature)
    # The positive's term: row i of view 0 pairs with row i of view 1 and vice versa. Both views
    # in one launch when they share a dtype (the gradients are in each input's dtype).
    with_projection = out_at.sizes["projection"] > 0
    common = dict(n_parts=plan.backward_sweep.splits, part_stride=plan.rows * d, coef_offset=out_at.coef,
                  proj_offset=out_at.projection, projection_scale=_projection_scale(2))
    if grad0.dtype == grad1.dtype:
        l2_normalize_pair_rows_backward(out0, out1, ws, grads, grad0, grad1, z_rows, norm_offset=at.norms,
                                        dz_offset=out_at.dz, projection=with_projection, **common)
        return
    parts = dict(n_parts=common["n_parts"], part_stride=common["part_stride"], partner_coef=grads,
                 projection=grads if with_projection else None, projection_scale=common["projection_scale"])
    l2_normalize_rows_backward(out0, ws, grads, grad0, norm_offset=at.norms, dz_offset=out_at.dz,
                               partner=z_rows, partner_offset=n_local * d, coef_offset=out_at.coef,
                               proj_offset=out_at.projection, **parts)
    l2_normalize_rows_backward(out1, ws, grads, grad1, norm_offset=at.norms + n_local,
                               dz_offset=out_at.dz + n_local * d, partner=z_rows, partner_offset=0,
                               coef_offset=out_at.coef + n_local, proj_offset=out_at.projection + n_local, **parts)


class _InfoNCEPlan:
    """Shapes, launch plans and workspace layouts of one InfoNCE call (as :class:`_NTXentPlan`)."""

    def __init__(self, n: int, d: int, k: int, dtype: torch.dtype, device: torch.device, config_ints: Sequence[int],
                 temperature_grad: bool = False) -> None:
        config = _config_from_ints(config_ints)
        self.n, self.d = n, d
        self.z_dtype = operand_dtype(d, dtype, config)
        self.forward_sweep = _sweep(config, n, k, d, self.z_dtype, device, backward=False, bank=True)
        self.backward_sweep = _sweep(config, n, k, d, self.z_dtype, device, backward=True, bank=True)
        # ẑ = [q̂; k̂] (2N, d); norms [‖q‖; ‖k‖] first (written by the normalization kernel).
        self.state = Regions(norms=2 * n, pos_cos=n, lse=n, row_loss=n,
                             partials=_partials_size(self.forward_sweep, n))
        self.grads = Regions(coef=n, projection=n if temperature_grad else 0, dz=self.backward_sweep.splits * n * d)


def _infonce_forward(
    query: Tensor, key: Tensor, negatives: Tensor, temperature: Optional[Tensor], inv_temp: float,
    config_ints: List[int],
) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (loss, ẑ = [q̂; k̂] (2N, d), the float32 workspace of :class:`_InfoNCEPlan`)."""
    n, d = query.shape
    plan = _InfoNCEPlan(n, d, negatives.shape[0], _common_dtype(query, key), query.device, config_ints)
    z = query.new_empty((2 * n, d), dtype=plan.z_dtype)
    ws = _new_workspace(query, plan.state)
    _infonce_forward_into(query, key, negatives, temperature, inv_temp, plan, z, ws)
    return plan.state.view(ws, "row_loss").mean(), z, ws


def _infonce_forward_into(query: Tensor, key: Tensor, negatives: Tensor, temperature: Optional[Tensor],
                          inv_temp: float, plan: _InfoNCEPlan, z: Tensor, ws: Tensor) -> None:
    l2_normalize_pair_rows(query, key, z, ws, plan.state.pos_cos)  # [q̂; k̂], norms (region 0), cosines
    infonce_forward(z, negatives, ws, plan.state, plan.forward_sweep, inv_temp, temperature=temperature)


def _infonce_backward(
    grad_loss: Tensor, query: Tensor, key: Tensor, negatives: Tensor, temperature: Optional[Tensor], z: Tensor,
    ws: Tensor, inv_temp: float, temperature_grad: bool, config_ints: List[int],
) -> List[Tensor]:
    """[dquery, dkey] and, with ``temperature_grad``, dτ."""
    n, d = query.shape
    plan = _InfoNCEPlan(n, d, negatives.shape[0], _common_dtype(query, key), query.device, config_ints,
                        temperature_grad)
    grads = _new_workspace(query, plan.grads)
    grad_q = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    grad_k = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    _infonce_backward_into(grad_loss, query, key, negatives, temperature, z, ws, inv_temp, plan, grads, grad_q, grad_k)
    if not temperature_grad:
        return [grad_q, grad_k]
    assert temperature is not None
    return [grad_q, grad_k, _temperature_gradient(grads, plan.grads, temperature)]


def _infonce_backward_into(grad_loss: Tensor, query: Tensor, key: Tensor, negatives: Tensor,
                           temperature: Optional[Tensor], z: Tensor, ws: Tensor, inv_temp: float, plan: _InfoNCEPlan,
                           grads: Tensor, grad_q: Tensor, grad_k: Tensor) -> None:
    n, d, at, out_at = plan.n, plan.d, plan.state, plan.grads
    row_scale = 1.0 / n
    grad_scale = row_scale if temperature is not None else inv_temp * row_scale
    infonce_backward(z, negatives, ws, at, grads, out_at, plan.backward_sweep, grad_loss, inv_temp, grad_scale,
                     temperature=temperature)
    with_projection = out_at.sizes["projection"] > 0
    l2_normalize_rows_backward(query, ws, grads, grad_q, norm_offset=at.norms, dz_offset=out_at.dz,
                               n_parts=plan.backward_sweep.splits, part_stride=n * d, partner=z,
                               partner_offset=n * d, partner_coef=grads, coef_offset=out_at.coef,
                               projection=grads if with_projection else None, proj_offset=out_at.projection,
                               projection_scale=_projection_scale(1))
    l2_normalize_rows_backward(key, ws, None, grad_k, norm_offset=at.norms + n, partner=z, partner_offset=0,
                               partner_coef=grads, coef_offset=out_at.coef)


class _UniformityPlan:
    def __init__(self, n: int, d: int, dtype: torch.dtype, device: torch.device, config_ints: Sequence[int]) -> None:
        config = _config_from_ints(config_ints)
        self.n, self.d = n, d
        self.z_dtype = operand_dtype(d, dtype, config)
        self.forward_sweep = _sweep(config, n, n, d, self.z_dtype, device, backward=False)
        self.backward_sweep = _sweep(config, n, n, d, self.z_dtype, device, backward=True)
        self.state = Regions(norms=n, lse=n, total=1, partials=_partials_size(self.forward_sweep, n))
        self.grads = Regions(coef=n, dz=self.backward_sweep.splits * n * d)


def _uniformity_forward(z: Tensor, t: float, config_ints: List[int]) -> Tuple[Tensor, Tensor, Tensor]:
    """U = LSE_{i≠j}(2t ẑ_i·ẑ_j + b_i + b_j) - 2t - log n(n-1), b nonzero only for rows below the
    clamp (``_clamp_bias2``). Returns (U, ẑ, the workspace: ‖z‖, the rows' LSEs, the global one)."""
    n, d = z.shape
    plan = _UniformityPlan(n, d, z.dtype, z.device, config_ints)
    z_hat = z.new_empty((n, d), dtype=plan.z_dtype)
    ws = _new_workspace(z, plan.state)
    l2_normalize_rows(z, z_hat, ws, 0)
    pair_lse_forward(z_hat, z_hat, ws, plan.state, plan.forward_sweep, 2.0 * t, n, 0, with_positive=False,
                     clamp_bias=True)
    total_lse = plan.state.view(ws, "total").squeeze(0)
    torch.logsumexp(plan.state.view(ws, "lse"), dim=0, out=total_lse)
    return total_lse - (2.0 * t + math.log(n * (n - 1))), z_hat, ws


def _uniformity_backward(grad_loss: Tensor, z: Tensor, z_hat: Tensor, ws: Tensor, t: float,
                         config_ints: List[int]) -> Tensor:
    """dẑ_i = g·2t·Σ_{j≠i} 2w_ij (ẑ_j - [row i below the clamp]·ẑ_i), w_ij = e^{S'_ij - T}: the pair
    kernel with both log-sum-exps set to T; the radial term returned as a coefficient of ẑ_i."""
    n, d = z.shape
    plan = _UniformityPlan(n, d, z.dtype, z.device, config_ints)
    at, out_at = plan.state, plan.grads
    grads = _new_workspace(z, out_at)
    pair_lse_backward(z_hat, z_hat, ws, at, at.total, at.lse, grads, out_at, plan.backward_sweep, grad_loss,
                      2.0 * t, 2.0 * t, n, 0, with_positive=False, global_lse=True, clamp_bias=True)
    return l2_normalize_rows_backward(z, ws, grads, norm_offset=at.norms, dz_offset=out_at.dz,
                                      n_parts=plan.backward_sweep.splits, part_stride=n * d, partner=z_hat,
                                      partner_coef=grads, coef_offset=out_at.coef)


_ntxent_op = torch.library.custom_op(
    "fastssl::ntxent_triton", _ntxent_forward, mutates_args=(),
    schema="(Tensor out0, Tensor out1, Tensor? temperature, float inv_temp, int[] rank_rows, int[] config) "
    "-> (Tensor, Tensor, Tensor)",
)
_ntxent_backward_op = torch.library.custom_op(
    "fastssl::ntxent_triton_backward", _ntxent_backward, mutates_args=(),
    schema="(Tensor grad_loss, Tensor out0, Tensor out1, Tensor? temperature, Tensor z, Tensor workspace, "
    "float inv_temp, int[] rank_rows, bool temperature_grad, int[] config) -> Tensor[]",
)
_infonce_op = torch.library.custom_op(
    "fastssl::infonce_triton", _infonce_forward, mutates_args=(),
    schema="(Tensor query, Tensor key, Tensor negatives, Tensor? temperature, float inv_temp, int[] config) "
    "-> (Tensor, Tensor, Tensor)",
)
_infonce_backward_op = torch.library.custom_op(
    "fastssl::infonce_triton_backward", _infonce_backward, mutates_args=(),
    schema="(Tensor grad_loss, Tensor query, Tensor key, Tensor negatives, Tensor? temperature, Tensor z, "
    "Tensor workspace, float inv_temp, bool temperature_grad, int[] config) -> Tensor[]",
)
_uniformity_op = torch.library.custom_op(
    "fastssl::uniformity_triton", _uniformity_forward, mutates_args=(),
    schema="(Tensor z, float t, int[] config) -> (Tensor, Tensor, Tensor)",
)
_uniformity_backward_op = torch.library.custom_op(
    "fastssl::uniformity_triton_backward", _uniformity_backward, mutates_args=(),
    schema="(Tensor grad_loss, Tensor z, Tensor z_hat, Tensor workspace, float t, int[] config) -> Tensor",
)


def _fake_gradients(a: Tensor, b: Tensor, temperature: Optional[Tensor], temperature_grad: bool) -> List[Tensor]:
    grads = [a.new_empty(a.shape), b.new_empty(b.shape)]
    if temperature_grad and temperature is not None:
        grads.append(temperature.new_empty(temperature.shape))
    return grads


def _fake_workspace(like: Tensor, regions: Regions) -> Tensor:
    return like.new_empty((regions.size,), dtype=torch.float32)


@_ntxent_op.register_fake
def _(out0, out1, temperature, inv_temp, rank_rows, config_ints):
    plan = _NTXentPlan(out0.shape[0], out0.shape[1], torch.promote_types(out0.dtype, out1.dtype), out0.device,
                       rank_rows, config_ints)
    return (out0.new_empty((), dtype=torch.float32), out0.new_empty((plan.cols, plan.d), dtype=plan.z_dtype),
            _fake_workspace(out0, plan.state))


@_ntxent_backward_op.register_fake
def _(grad_loss, out0, out1, temperature, z, ws, inv_temp, rank_rows, temperature_grad, config_ints):
    return _fake_gradients(out0, out1, temperature, temperature_grad)


@_infonce_op.register_fake
def _(query, key, negatives, temperature, inv_temp, config_ints):
    n, d = query.shape
    plan = _InfoNCEPlan(n, d, negatives.shape[0], torch.promote_types(query.dtype, key.dtype), query.device,
                        config_ints)
    return (query.new_empty((), dtype=torch.float32), query.new_empty((2 * n, d), dtype=plan.z_dtype),
            _fake_workspace(query, plan.state))


@_infonce_backward_op.register_fake
def _(grad_loss, query, key, negatives, temperature, z, ws, inv_temp, temperature_grad, config_ints):
    return _fake_gradients(query, key, temperature, temperature_grad)


@_uniformity_op.register_fake
def _(z, t, config_ints):
    n, d = z.shape
    plan = _UniformityPlan(n, d, z.dtype, z.device, config_ints)
    return z.new_empty((), dtype=torch.float32), z.new_empty((n, d), dtype=plan.z_dtype), _fake_workspace(z, plan.state)


@_uniformity_backward_op.register_fake
def _(grad_loss, z, *rest):
    return z.new_empty(z.shape)


def _ntxent_setup(ctx, inputs, output) -> None:
    out0, out1, temperature, inv_temp, rank_rows, config_ints = inputs
    _, z, ws = output
    # Non-differentiable auxiliary outputs: autograd neither detaches them on return nor on
    # unpacking them in the backward (one aten.detach each way per saved output otherwise).
    ctx.mark_non_differentiable(z, ws)
    ctx.set_materialize_grads(False)  # the auxiliary outputs get no gradient: no zero tensors
    ctx.save_for_backward(out0, out1, temperature, z, ws)
    ctx.inv_temp, ctx.rank_rows, ctx.config_ints = inv_temp, rank_rows, config_ints


def _ntxent_gradient(ctx, grad_loss, *_auxiliary):
    out0, out1, temperature, z, ws = ctx.saved_tensors
    temperature_grad = temperature is not None and ctx.needs_input_grad[2]
    grads = _ntxent_backward_op(grad_loss, out0, out1, temperature, z, ws, ctx.inv_temp, ctx.rank_rows,
                                temperature_grad, ctx.config_ints)
    return grads[0], grads[1], grads[2] if temperature_grad else None, None, None, None


def _infonce_setup(ctx, inputs, output) -> None:
    query, key, negatives, temperature, inv_temp, config_ints = inputs
    _, z, ws = output
    ctx.mark_non_differentiable(z, ws)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(query, key, negatives, temperature, z, ws)
    ctx.inv_temp, ctx.config_ints = inv_temp, config_ints


def _infonce_gradient(ctx, grad_loss, *_auxiliary):
    query, key, negatives, temperature, z, ws = ctx.saved_tensors
    temperature_grad = temperature is not None and ctx.needs_input_grad[3]
    grads = _infonce_backward_op(grad_loss, query, key, negatives, temperature, z, ws, ctx.inv_temp,
                                 temperature_grad, ctx.config_ints)
    return grads[0], grads[1], None, grads[2] if temperature_grad else None, None, None


def _uniformity_setup(ctx, inputs, output) -> None:
    z, t, config_ints = inputs
    _, z_hat, ws = output
    ctx.mark_non_differentiable(z_hat, ws)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(z, z_hat, ws)
    ctx.t, ctx.config_ints = t, config_ints


def _uniformity_gradient(ctx, grad_loss, *_auxiliary):
    return _uniformity_backward_op(grad_loss, *ctx.saved_tensors, ctx.t, ctx.config_ints), None, None


_ntxent_op.register_autograd(_ntxent_gradient, setup_context=_ntxent_setup)
_infonce_op.register_autograd(_infonce_gradient, setup_context=_infonce_setup)
_uniformity_op.register_autograd(_uniformity_gradient, setup_context=_uniformity_setup)


# --------------------------------------------------------------------------------------------
# Entry points (called by fastssl.ntxent)
# --------------------------------------------------------------------------------------------


def _temperature_arguments(temperature: Union[float, Tensor], device: torch.device) -> Tuple[Optional[Tensor], float]:
    """(τ as a tensor the kernels read on ``device``, or None; 1/τ as a float, or 1.0 unused).
    A tensor τ elsewhere is copied to the device (differentiably)."""
    if isinstance(temperature, Tensor):
        return (temperature if temperature.device == device else temperature.to(device)), 1.0
    return None, 1.0 / float(temperature)


def ntxent_loss_triton(
    out0: Tensor, out1: Tensor, temperature: Union[float, Tensor], gather_distributed: bool = False, *,
    config: Optional[KernelConfig] = None,
) -> Tensor:
    """NT-Xent through the kernels (SimCLR, Chen et al. 2020, eq. 1).

    Args:
        out0, out1: (N, d) float32/float16/bfloat16 views, any strides.
        temperature: τ, any non-zero float, or a one-element tensor (a learnable τ: read on the
            device, with gradient).
        gather_distributed: negatives from every rank, which may hold different N (the loss is
            then the global mean, weighted by rows).
        config: tile shape (None: :func:`default_config`).
    Returns:
        0-d float32 loss; gradients in the inputs' dtypes.

    Example::

        a, b = torch.randn(256, 128, device="cuda"), torch.randn(256, 128, device="cuda")
        loss = ntxent_loss_triton(a.requires_grad_(), b, 0.5)
        loss.backward()
    """
    _check_kernel_dtype("out0", out0)
    _check_kernel_dtype("out1", out1)
    temperature_tensor, inv_temp = _temperature_arguments(temperature, out0.device)
    distributed_run = gather_distributed and distributed.is_distributed()
    rank_rows = distributed.gather_sizes(out0.shape[0], out0.device) if distributed_run else []
    loss = _ntxent_op(out0, out1, temperature_tensor, inv_temp, rank_rows, _config_to_ints(config))[0]
    # Weighted by this rank's 2n rows: the global mean, and W × the global gradient.
    return distributed.global_mean(loss, 2 * out0.shape[0]) if gather_distributed else loss


def infonce_loss_triton(
    query: Tensor, key: Tensor, negatives: Tensor, temperature: Union[float, Tensor], *,
    config: Optional[KernelConfig] = None,
) -> Tensor:
    """InfoNCE through the kernels (MoCo, He et al. 2020, eq. 1).

    Args:
        query, key: (N, d) float32/float16/bfloat16, any strides.
        negatives: (K, d) bank (any strides, its rows used as given); no gradient.
        temperature: τ, any non-zero float, or a one-element tensor (read on the device, with
            gradient).
    Returns:
        0-d float32 loss.

    Example::

        q, k = torch.randn(256, 128, device="cuda"), torch.randn(256, 128, device="cuda")
        bank = torch.nn.functional.normalize(torch.randn(65536, 128, device="cuda"), dim=1)
        loss = infonce_loss_triton(q.requires_grad_(), k, bank, 0.2)
    """
    _check_kernel_dtype("query", query)
    _check_kernel_dtype("key", key)
    _check_kernel_dtype("negatives", negatives)
    temperature_tensor, inv_temp = _temperature_arguments(temperature, query.device)
    if negatives.requires_grad:  # the bank gets no gradient (detached only when needed: one operator)
        negatives = negatives.detach()
    return _infonce_op(query, key, negatives, temperature_tensor, inv_temp, _config_to_ints(config))[0]


def uniformity_triton(z: Tensor, t: float = 2.0, *, config: Optional[KernelConfig] = None) -> Tensor:
    """Uniformity (Wang & Isola 2020, eq. 3) of the rows of z (N, d) through the kernels.

    Args:
        z: (N, d) float32/float16/bfloat16, any strides; NaN for N < 2 (as the reference).
        t: kernel scale.
    Returns:
        0-d float32 value.

    Example::

        z = torch.randn(4096, 128, device="cuda", requires_grad=True)
        uniformity_triton(z).backward()
    """
    _check_kernel_dtype("z", z)
    if z.shape[0] < 2:
        return torch.full((), float("nan"), dtype=torch.float32, device=z.device)
    return _uniformity_op(z, float(t), _config_to_ints(config))[0]
