r"""Triton kernels for SwAV: log-domain Sinkhorn-Knopp and the fused swapped-prediction loss.

Sinkhorn (see :mod:`fastssl.swav` for the derivation). With L = S/ε, every iterate of SwAV's
Sinkhorn is log Q[b, k] = L[b, k] − a_k − c_b, and one iteration is two log-sum-exp sweeps:

* over the samples (rows of the (N, K) score matrix), per prototype: a_k = LSE_b(L[b, k] − c_b);
* over the prototypes, per sample:                                    c_b = LSE_k(L[b, k] − a_k).

:func:`_partial_lse_kernel` does either sweep (the two differ only in which stride is reduced)
with an online, max-shifted log-sum-exp, split along the reduced axis so that narrow problems
still fill the GPU; the few partial (max, sum) pairs are combined in PyTorch -- and, for the
prototype sweep of a distributed Sinkhorn, all-reduced over ranks between iterations. No
exponential ever exceeds 1 and the maximum term of every sum is exactly 1, so no scores or ε
overflow or underflow to an all-zero row or column. The H high-resolution crops (each with
the queue appended) are one launch: a (H, N, K) problem with the crop as grid axis 2. A problem
small enough for one tile (:data:`_RESIDENT_ELEMENTS`) runs every iteration in one program,
:func:`_sinkhorn_resident_kernel`, its matrix read once and kept in registers: one launch
instead of 2I + 1 when launch latency, not bandwidth, is the cost.

Swapped prediction. Codes carry no gradient, so the loss over the V crops is

    L = −1/(H (V−1) B) Σ_v Σ_{b,k} T_v[b, k] (x_v[b, k] − lse_v[b]),    x_v = s_v/τ,

with targets T_v = Σ_{i<H} q_i − [v < H] q_v and ∂L/∂s_v = (w_v p_v − T_v)/(τ H (V−1) B),
p_v = softmax(x_v), w_v = Σ_k T_v[b, k] (= H − [v < H] once the codes are normalized).
:func:`_codes_kernel` writes Σ_i q_i once (float32, (B, K)); :func:`_swav_ce_kernel` runs one
program per (crop, row block), all crops in one launch, in two sweeps over its rows (online LSE,
then loss terms and gradient), a high-resolution crop recomputing its own codes from its scores
instead of reading them. The gradient is written in the forward; the backward only scales it.

The crops are separate tensors (one per view, as models produce them); every kernel reads them
in place through (V,) tables of addresses and row strides (:func:`view_table`), never through a
stacked copy. Only with a queue is each high-resolution crop concatenated with its queue once,
as the Sinkhorn problem.

Cost, per loss call, with e bytes per input element, N = B + Q rows per Sinkhorn problem and I
iterations (prediction for the benchmark shape B = 4096, K = 3000, I = 3, H = V = 2, Q = 0,
bf16, on an H100 with ~3 TB/s HBM, ~60 TFLOP/s fp32 and ~3.7·10¹² exp/s (16 MUFU ops per SM
per clock)):

* minimum bytes: read every crop and queue once, write every crop's gradient once:
  (2 V B K + H Q K) e = 98 MB -> 33 µs;
* FLOPs: Sinkhorn 2 I H N K x ~5 (scale, shift, max, exp, add), codes H B K x ~4, loss
  V B K x ~15 (two sweeps): 0.74 + 0.10 + 0.37 = 1.2 GFLOP -> 20 µs of fp32 ALU;
* exponentials: 2 I H N K + H B K + ~3 V B K = 0.25·10⁹ -> 66 µs, the binding floor;
* this implementation moves more: 2 I sweeps over the H problems (6 x 49 MB here, partly
  from the 50 MB L2), the codes pass (49 MB read, 49 MB float32 written), two sweeps over every
  crop (98 MB), the float32 targets read once per crop (98 MB) and the gradients (49 MB):
  ~0.64 GB -> predicted 150-220 µs for forward + backward, against several milliseconds for
  the eager reference.
"""

from __future__ import annotations

import functools
import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastssl import distributed
from fastssl.swav import all_reduce_logsumexp

# Tile sizes (elements). The contiguous axis of a tile gets up to _TILE_CONTIGUOUS elements, the
# other axis the rest of _TILE_ELEMENTS. Tests shrink both to run multi-tile loops, masks and
# split reductions on small inputs.
_TILE_ELEMENTS = 4096
_TILE_CONTIGUOUS = 512
# A Sinkhorn problem whose padded (N, K) matrix has at most this many elements runs all its
# iterations in one program, the matrix held in registers (one launch instead of 2I + 1).
_RESIDENT_ELEMENTS = 16384

# Buffers every kernel fully overwrites; tests replace this with a NaN-filled allocation to
# check that every element is written.
_new_buffer = torch.empty


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _target_programs(device: torch.device) -> int:
    """Programs that keep the device busy: a few waves of SMs on CUDA; few on the interpreter,
    where every program is a sequential Python call."""
    if device.type == "cuda":
        return _cuda_target_programs(torch.cuda.current_device() if device.index is None else device.index)
    return 4


@functools.lru_cache(maxsize=None)
def _cuda_target_programs(index: int) -> int:
    return 4 * torch.cuda.get_device_properties(index).multi_processor_count


def _tile(n_contiguous: int, n_other: int) -> Tuple[int, int]:
    """Power-of-two tile (contiguous axis, other axis) for extents n_contiguous x n_other."""
    block_contiguous = min(_next_pow2(n_contiguous), _TILE_CONTIGUOUS)
    block_other = min(_next_pow2(n_other), max(1, _TILE_ELEMENTS // block_contiguous))
    return block_contiguous, block_other


_TRITON_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def k_align(n_proto: int) -> int:
    """The largest power of two up to 16 that divides K (a compiler hint for K-axis masks)."""
    return math.gcd(n_proto, 16)


def view_table(views: Sequence[Tensor], dtype: torch.dtype) -> Tuple[List[Tensor], Tensor, Tensor, int]:
    """Equally shaped (rows, K) tensors as the kernels read them: in place, through (V,) int64
    tables of their addresses and row strides, instead of a stacked (V, rows, K) copy. A view is
    copied only when its dtype differs from ``dtype`` or its K axis is strided.

    Returns:
        the tensors read (they must outlive the launches), the address table, the row-stride
        table, and the alignment the kernels may promise the compiler: the elements per 16
        bytes when every address is 16-byte aligned and every row stride a multiple of that
        (16-byte vector loads), else 1.
    """
    kept = []
    for v in views:
        v = v.detach().to(dtype)
        if v.shape[1] > 1 and v.stride(1) != 1:
            v = v.contiguous()
        kept.append(v)
    device = kept[0].device
    addresses = torch.tensor([v.data_ptr() for v in kept], dtype=torch.int64, device=device)
    row_strides = torch.tensor([v.stride(0) for v in kept], dtype=torch.int64, device=device)
    vector = max(1, 16 // kept[0].element_size())
    aligned = all(v.data_ptr() % 16 == 0 and v.stride(0) % vector == 0 for v in kept)
    return kept, addresses, row_strides, vector if aligned else 1


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def view_base(addresses_ptr, row_strides_ptr, view, DTYPE: tl.constexpr, ALIGN: tl.constexpr):
    """(pointer to element [0, 0], row stride) of view ``view`` of a :func:`view_table`. With
    ALIGN > 1 (checked by :func:`view_table`) the compiler may use 16-byte vector loads."""
    base = tl.load(addresses_ptr + view).to(tl.pointer_type(DTYPE))
    row_stride = tl.load(row_strides_ptr + view)
    if ALIGN > 1:
        base = tl.multiple_of(base, 16)
        row_stride = tl.multiple_of(row_stride, ALIGN)
    return base, row_stride


@triton.jit
def _partial_lse_kernel(
    addresses_ptr,
    row_strides_ptr,
    potential_ptr,
    max_out_ptr,
    sum_out_ptr,
    n_rows,
    k_units,
    reduce_per_split,
    potential_stride_problem,
    out_stride_problem,
    out_stride_split,
    scale,
    DTYPE: tl.constexpr,
    ALIGN: tl.constexpr,
    K_ALIGN: tl.constexpr,
    REDUCE_ROWS: tl.constexpr,
    HAS_POTENTIAL: tl.constexpr,
    BLOCK_KEEP: tl.constexpr,
    BLOCK_REDUCE: tl.constexpr,
):
    """For each kept index j, over one split of the reduced index i of problem program_id(2):
    m_j = max_i y_ij and s_j = Σ_i exp(y_ij − m_j), y_ij = scale·x_ij − potential_i. REDUCE_ROWS:
    reduce over samples, keep prototypes; else reduce over prototypes, keep samples."""
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
    base, row_stride = view_base(addresses_ptr, row_strides_ptr, pid_problem, DTYPE, ALIGN)
    keep = pid_keep * BLOCK_KEEP + tl.arange(0, BLOCK_KEEP)
    keep_mask = keep < n_keep
    run_max = tl.full([BLOCK_KEEP], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_KEEP], tl.float32)
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
            pot = tl.load(potential_ptr + pid_problem * potential_stride_problem + red, mask=red_mask, other=0.0)
            y = y - pot[None, :]
        y = tl.where(mask, y, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(y, axis=1))
        # All -inf so far (masked lanes): shift by 0 so that exp(-inf - shift) is 0, not NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(y - shift[:, None]), axis=1)
        run_max = new_max
    out = pid_problem * out_stride_problem + pid_split * out_stride_split + keep
    tl.store(max_out_ptr + out, run_max, mask=keep_mask)
    tl.store(sum_out_ptr + out, run_sum, mask=keep_mask)


@triton.jit
def _codes_kernel(
    addresses_ptr,
    row_strides_ptr,
    prototype_potential_ptr,
    sample_potential_ptr,
    out_ptr,
    n_problems,
    n_rows,
    k_units,
    prototype_stride_problem,
    sample_stride_problem,
    scale,
    DTYPE: tl.constexpr,
    ALIGN: tl.constexpr,
    K_ALIGN: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_PROTO: tl.constexpr,
):
    """out[b, k] = Σ_h exp(scale·x_h[b, k] − a[h, k] − c[h, b]): the codes summed over problems
    (out contiguous)."""
    # K = k_units·K_ALIGN: written as a product with a constant, the compiler knows that K-axis
    # masks and row offsets are constant over K_ALIGN-wide groups and keeps 16-byte accesses.
    n_proto = k_units * K_ALIGN
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_PROTO + tl.arange(0, BLOCK_PROTO)
    row_mask = rows < n_rows
    col_mask = cols < n_proto
    mask = row_mask[:, None] & col_mask[None, :]
    acc = tl.zeros([BLOCK_ROWS, BLOCK_PROTO], tl.float32)
    for h in range(n_problems):
        base, row_stride = view_base(addresses_ptr, row_strides_ptr, h, DTYPE, ALIGN)
        x = tl.load(base + rows.to(tl.int64)[:, None] * row_stride + cols[None, :], mask=mask, other=0.0)
        a = tl.load(prototype_potential_ptr + h * prototype_stride_problem + cols, mask=col_mask, other=0.0)
        c = tl.load(sample_potential_ptr + h * sample_stride_problem + rows, mask=row_mask, other=0.0)
        # Padding lanes get exp(-inf) = 0 rather than an overflowing exp of a stray potential.
        acc += tl.exp(tl.where(mask, x.to(tl.float32) * scale - a[None, :] - c[:, None], float("-inf")))
    out = rows.to(tl.int64)[:, None] * n_proto + cols[None, :]
    tl.store(out_ptr + out, acc, mask=mask)


@triton.jit
def _sinkhorn_resident_kernel(
    addresses_ptr,
    row_strides_ptr,
    prototype_potential_ptr,
    sample_potential_ptr,
    n_samples,
    k_units,
    rows_out,
    scale,
    iterations,
    DTYPE: tl.constexpr,
    ALIGN: tl.constexpr,
    K_ALIGN: tl.constexpr,
    BLOCK_SAMPLES: tl.constexpr,
    BLOCK_PROTO: tl.constexpr,
):
    """All iterations of one Sinkhorn problem whose (N, K) matrix fits one tile: the matrix is
    read once and stays in registers; writes a (K,) and the final c (rows_out,)."""
    pid = tl.program_id(0)
    # K = k_units·K_ALIGN: written as a product with a constant, the compiler knows that K-axis
    # masks and row offsets are constant over K_ALIGN-wide groups and keeps 16-byte accesses.
    n_proto = k_units * K_ALIGN
    base, row_stride = view_base(addresses_ptr, row_strides_ptr, pid, DTYPE, ALIGN)
    rows = tl.arange(0, BLOCK_SAMPLES)
    cols = tl.arange(0, BLOCK_PROTO)
    row_mask = rows < n_samples
    col_mask = cols < n_proto
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(base + rows.to(tl.int64)[:, None] * row_stride + cols[None, :], mask=mask, other=0.0)
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
    tl.store(prototype_potential_ptr + pid * n_proto + cols, prototype_potential, mask=col_mask)
    tl.store(sample_potential_ptr + pid * rows_out + rows, sample_potential, mask=rows < rows_out)


@triton.jit
def _swav_ce_kernel(
    addresses_ptr,
    row_strides_ptr,
    targets_ptr,
    prototype_potential_ptr,
    sample_potential_ptr,
    weight_ptr,
    grad_ptr,
    loss_partial_ptr,
    n_high,
    n_rows,
    k_units,
    inv_temperature,
    inv_epsilon,
    grad_scale,
    DTYPE: tl.constexpr,
    ALIGN: tl.constexpr,
    K_ALIGN: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_PROTO: tl.constexpr,
):
    """Crop v = program_id(1), rows of program_id(0):
    loss_partial[v, pid] = −Σ_b Σ_k T[b, k] (x − lse), grad[v] = (w p − T)·grad_scale, with
    T = targets − (the crop's own codes, recomputed from its scores, if v < n_high).
    Weights (V, B), potentials (H, K) and (H, B), grad (V, B, K) are contiguous."""
    pid = tl.program_id(0)
    v = tl.program_id(1)
    # K = k_units·K_ALIGN: written as a product with a constant, the compiler knows that K-axis
    # masks and row offsets are constant over K_ALIGN-wide groups and keeps 16-byte accesses.
    n_proto = k_units * K_ALIGN
    base, row_stride = view_base(addresses_ptr, row_strides_ptr, v, DTYPE, ALIGN)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    row_ptr = base + rows64[:, None] * row_stride
    # Sweep 1: lse of x = s/τ per row, online and max-shifted.
    run_max = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_ROWS], tl.float32)
    for k0 in range(0, n_proto, BLOCK_PROTO):
        cols = k0 + tl.arange(0, BLOCK_PROTO)
        mask = row_mask[:, None] & (cols < n_proto)[None, :]
        s = tl.load(row_ptr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, s * inv_temperature, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(x, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
        run_max = new_max
    lse = tl.where(row_mask, run_max + tl.log(tl.where(row_mask, run_sum, 1.0)), 0.0)
    weight = tl.load(weight_ptr + v * n_rows + rows, mask=row_mask, other=0.0)
    is_high = v < n_high
    # Used only when is_high; the index is clamped so that the load stays inside (H, B).
    own_c = tl.load(sample_potential_ptr + tl.minimum(v, n_high - 1) * n_rows + rows, mask=row_mask, other=0.0)
    # Sweep 2: loss terms and gradient.
    grad_row = grad_ptr + v.to(tl.int64) * n_rows * n_proto + rows64[:, None] * n_proto
    acc = tl.zeros([BLOCK_ROWS, BLOCK_PROTO], tl.float32)
    for k0 in range(0, n_proto, BLOCK_PROTO):
        cols = k0 + tl.arange(0, BLOCK_PROTO)
        col_mask = cols < n_proto
        mask = row_mask[:, None] & col_mask[None, :]
        s = tl.load(row_ptr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # Padding lanes: log_p = 0 and target = 0, so they add nothing and exp stays finite.
        log_p = tl.where(mask, s * inv_temperature - lse[:, None], 0.0)
        target = tl.load(targets_ptr + rows64[:, None] * n_proto + cols[None, :], mask=mask, other=0.0)
        if is_high:
            own_a = tl.load(prototype_potential_ptr + v * n_proto + cols, mask=col_mask, other=0.0)
            own_log_q = tl.where(mask, s * inv_epsilon - own_a[None, :] - own_c[:, None], float("-inf"))
            target = target - tl.exp(own_log_q)
        acc += target * log_p
        if COMPUTE_GRAD:
            grad = (weight[:, None] * tl.exp(log_p) - target) * grad_scale
            tl.store(grad_row + cols[None, :], grad.to(grad_ptr.dtype.element_ty), mask=mask)
    tl.store(loss_partial_ptr + v * tl.num_programs(0) + pid, -tl.sum(tl.sum(acc, axis=1), axis=0))


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _combine_partials(run_max: Tensor, run_sum: Tensor) -> Tensor:
    """log Σ_splits s·exp(m) over dim 1 of (P, splits, n) partials -> (P, n)."""
    top = run_max.amax(dim=1, keepdim=True)
    shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = (run_sum * torch.exp(run_max - shift)).sum(dim=1)
    return shift.squeeze(1) + torch.log(total)


class _Problems(NamedTuple):
    """H Sinkhorn problems, (N, K) score matrices read through a :func:`view_table`."""

    tensors: List[Tensor]
    addresses: Tensor
    row_strides: Tensor
    align: int
    dtype: torch.dtype

    @staticmethod
    def of(matrices: Sequence[Tensor], dtype: torch.dtype) -> "_Problems":
        return _Problems(*view_table(matrices, dtype), dtype)

    def launch_args(self) -> dict:
        return dict(DTYPE=_TRITON_DTYPES[self.dtype], ALIGN=self.align, K_ALIGN=k_align(self.tensors[0].shape[1]))


def _logsumexp(
    problems: _Problems, reduce_rows: bool, potential: Optional[Tensor], scale: float, n_rows: int
) -> Tensor:
    """LSE of ``scale·x − potential`` over one axis of every problem.

    Args:
        reduce_rows: True reduces over samples (returns (H, K)); False reduces over prototypes
            (returns (H, n_rows)).
        potential: (H, extent of the reduced axis) float32 contiguous, subtracted along it.
        n_rows: samples used (the first ``n_rows`` of N).
    """
    n_problems = len(problems.tensors)
    n_proto = problems.tensors[0].shape[1]
    device = problems.addresses.device
    if reduce_rows:
        n_keep, n_reduce = n_proto, n_rows
        block_keep, block_reduce = _tile(n_proto, n_rows)
    else:
        n_keep, n_reduce = n_rows, n_proto
        block_reduce, block_keep = _tile(n_proto, n_rows)
    keep_blocks = triton.cdiv(n_keep, block_keep)
    reduce_blocks = triton.cdiv(n_reduce, block_reduce)
    want = max(1, _target_programs(device) // (keep_blocks * n_problems))
    splits = max(1, min(reduce_blocks, want, 65535))
    reduce_per_split = triton.cdiv(reduce_blocks, splits) * block_reduce
    splits = triton.cdiv(n_reduce, reduce_per_split)  # every split holds at least one element
    run_max = _new_buffer((n_problems, splits, n_keep), dtype=torch.float32, device=device)
    run_sum = _new_buffer((n_problems, splits, n_keep), dtype=torch.float32, device=device)
    has_potential = potential is not None
    _partial_lse_kernel[(keep_blocks, splits, n_problems)](
        problems.addresses,
        problems.row_strides,
        potential if has_potential else run_max,
        run_max,
        run_sum,
        n_rows,
        n_proto // k_align(n_proto),
        reduce_per_split,
        potential.stride(0) if has_potential else 0,
        splits * n_keep,
        n_keep,
        scale,
        **problems.launch_args(),
        REDUCE_ROWS=reduce_rows,
        HAS_POTENTIAL=has_potential,
        BLOCK_KEEP=block_keep,
        BLOCK_REDUCE=block_reduce,
    )
    return _combine_partials(run_max, run_sum)


def _sinkhorn_potentials(
    problems: _Problems, rows_out: int, iterations: int, epsilon: float, gather_distributed: bool
) -> Tuple[Tensor, Tensor, Tensor]:
    """Potentials of the codes q[h, b, k] = exp(x_h[b, k]/ε − a[h, k] − c[h, b]).

    Args:
        problems: H (N, K) score matrices.
        rows_out: the codes are wanted for the first ``rows_out`` samples.
    Returns:
        a (H, K), c (H, rows_out) and the codes' row sums (H, rows_out), all float32
        contiguous (the row sums are 1 after at least one iteration).
    """
    scale = 1.0 / epsilon
    distributed_on = gather_distributed and distributed.is_distributed()
    n_problems = len(problems.tensors)
    n_samples, n_proto = problems.tensors[0].shape
    device = problems.addresses.device
    if iterations == 0:
        # q = N_global·exp(L − LSE_{b,k} L): lightly's division by the global sum, times B.
        row_lse = _logsumexp(problems, False, None, scale, n_samples)  # (H, N)
        log_total = torch.logsumexp(row_lse, dim=1, keepdim=True)
        if distributed_on:
            log_total = all_reduce_logsumexp(log_total)
        n_global = n_samples * (distributed.world_size() if distributed_on else 1)
        sample_potential = (log_total - math.log(n_global)).expand(n_problems, rows_out).contiguous()
        prototype_potential = torch.zeros(n_problems, n_proto, dtype=torch.float32, device=device)
        row_sums = torch.exp(row_lse[:, :rows_out] - sample_potential)
        return prototype_potential, sample_potential, row_sums
    row_sums = torch.ones(n_problems, rows_out, dtype=torch.float32, device=device)
    block_samples, block_proto = _next_pow2(n_samples), _next_pow2(n_proto)
    if not distributed_on and block_samples * block_proto <= _RESIDENT_ELEMENTS:
        prototype_potential = _new_buffer((n_problems, n_proto), dtype=torch.float32, device=device)
        sample_potential = _new_buffer((n_problems, rows_out), dtype=torch.float32, device=device)
        _sinkhorn_resident_kernel[(n_problems,)](
            problems.addresses,
            problems.row_strides,
            prototype_potential,
            sample_potential,
            n_samples,
            n_proto // k_align(n_proto),
            rows_out,
            scale,
            iterations,
            **problems.launch_args(),
            BLOCK_SAMPLES=block_samples,
            BLOCK_PROTO=block_proto,
            num_warps=8,
        )
        return prototype_potential, sample_potential, row_sums
    sample_potential: Optional[Tensor] = None  # c = 0: the global normalization cancels
    for it in range(iterations):
        prototype_potential = _logsumexp(problems, True, sample_potential, scale, n_samples)
        if distributed_on:
            prototype_potential = all_reduce_logsumexp(prototype_potential)
        if it + 1 < iterations:
            sample_potential = _logsumexp(problems, False, prototype_potential, scale, n_samples)
    # The last column normalization, needed for the codes' rows only.
    sample_potential = _logsumexp(problems, False, prototype_potential, scale, rows_out)
    return prototype_potential.contiguous(), sample_potential.contiguous(), row_sums


def _sum_of_codes(
    problems: _Problems, rows_out: int, prototype_potential: Tensor, sample_potential: Tensor, epsilon: float
) -> Tensor:
    """Σ_h q[h] over the first ``rows_out`` samples: (rows_out, K) float32."""
    n_proto = problems.tensors[0].shape[1]
    device = problems.addresses.device
    out = _new_buffer((rows_out, n_proto), dtype=torch.float32, device=device)
    block_proto, block_rows = _tile(n_proto, rows_out)
    grid = (triton.cdiv(rows_out, block_rows), triton.cdiv(n_proto, block_proto))
    _codes_kernel[grid](
        problems.addresses,
        problems.row_strides,
        prototype_potential,
        sample_potential,
        out,
        len(problems.tensors),
        rows_out,
        n_proto // k_align(n_proto),
        prototype_potential.stride(0),
        sample_potential.stride(0),
        1.0 / epsilon,
        **problems.launch_args(),
        BLOCK_ROWS=block_rows,
        BLOCK_PROTO=block_proto,
    )
    return out


@torch.no_grad()
def sinkhorn_triton(scores: Tensor, iterations: int, epsilon: float, gather_distributed: bool = False) -> Tensor:
    """Sinkhorn-Knopp codes (see :func:`fastssl.swav.sinkhorn`), log domain, float32 throughout.

    Args:
        scores: (B, K), any strides and float dtype; CUDA, or CPU under ``TRITON_INTERPRET=1``.
    Returns:
        (B, K) float32 codes.
    """
    problems = _Problems.of([scores], scores.dtype)
    rows = scores.shape[0]
    prototype_potential, sample_potential, _ = _sinkhorn_potentials(
        problems, rows, iterations, epsilon, gather_distributed
    )
    return _sum_of_codes(problems, rows, prototype_potential, sample_potential, epsilon)


# --------------------------------------------------------------------------------------------
# Swapped prediction
# --------------------------------------------------------------------------------------------


class _SwavTritonFunction(torch.autograd.Function):
    """Inputs ``(settings, queue, *crops)``, the H high-resolution crops first; returns the 0-d
    rank-local loss. Every crop's gradient is computed in the forward; the backward scales it."""

    @staticmethod
    def forward(ctx, settings, queue, *crops):  # type: ignore[override]
        n_high, temperature, iterations, epsilon, gather_distributed = settings
        input_dtypes = [c.dtype for c in crops]
        # One dtype for the kernels (the crops almost always share one already).
        dtype = input_dtypes[0]
        for other in input_dtypes[1:]:
            dtype = torch.promote_types(dtype, other)
        crop_table = _Problems.of(crops, dtype)
        n_crops = len(crops)
        batch, n_proto = crops[0].shape
        device = crops[0].device
        if queue is None:
            # The high-resolution crops themselves are the Sinkhorn problems: the first H
            # entries of the crops' table.
            problems = _Problems(
                crop_table.tensors[:n_high], crop_table.addresses[:n_high], crop_table.row_strides[:n_high],
                crop_table.align, dtype,
            )  # fmt: skip
        else:
            scores = [torch.cat([h, q.detach().to(dtype)]) for h, q in zip(crop_table.tensors[:n_high], queue)]
            problems = _Problems.of(scores, dtype)
        prototype_potential, sample_potential, row_sums = _sinkhorn_potentials(
            problems, batch, iterations, epsilon, gather_distributed
        )
        targets = _sum_of_codes(problems, batch, prototype_potential, sample_potential, epsilon)
        # w_v = Σ_k T_v[b, k]: all codes' row sums minus the crop's own.
        total_row_sums = row_sums.sum(dim=0, keepdim=True)
        own_row_sums = torch.cat([row_sums, row_sums.new_zeros(n_crops - n_high, batch)])
        weights = (total_row_sums - own_row_sums).contiguous()

        compute_grad = any(ctx.needs_input_grad[2:])
        block_proto, block_rows = _tile(n_proto, batch)
        row_blocks = triton.cdiv(batch, block_rows)
        loss_partial = _new_buffer((n_crops, row_blocks), dtype=torch.float32, device=device)
        grads = _new_buffer((n_crops, batch, n_proto), dtype=dtype, device=device) if compute_grad else targets
        normalizer = n_high * (n_crops - 1) * batch
        _swav_ce_kernel[(row_blocks, n_crops)](
            crop_table.addresses,
            crop_table.row_strides,
            targets,
            prototype_potential,
            sample_potential,
            weights,
            grads,
            loss_partial,
            n_high,
            batch,
            n_proto // k_align(n_proto),
            1.0 / temperature,
            1.0 / epsilon,
            1.0 / (temperature * normalizer),
            **crop_table.launch_args(),
            COMPUTE_GRAD=compute_grad,
            BLOCK_ROWS=block_rows,
            BLOCK_PROTO=block_proto,
        )
        ctx.input_dtypes = input_dtypes
        ctx.compute_grad = compute_grad
        if compute_grad:
            ctx.save_for_backward(grads)
        return loss_partial.sum() / normalizer

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        if not ctx.compute_grad:
            return (None, None, *([None] * len(ctx.input_dtypes)))
        (grads,) = ctx.saved_tensors
        scaled = [
            (grads[v] * grad_loss).to(dtype) if need else None
            for v, (need, dtype) in enumerate(zip(ctx.needs_input_grad[2:], ctx.input_dtypes))
        ]
        return (None, None, *scaled)


def swav_loss_triton(
    high: Sequence[Tensor],
    low: Sequence[Tensor],
    queue: Optional[Sequence[Tensor]],
    temperature: float,
    iterations: int,
    epsilon: float,
    gather_distributed: bool = False,
) -> Tensor:
    """SwAV's swapped-prediction loss (see :func:`fastssl.swav.swav_loss`) on the kernels.

    Args:
        high: H tensors (B, K); low: tensors (B, K); queue: None or H tensors (Q, K).
    Returns:
        0-d float32 loss: the mean over this rank's samples, reported as the mean over ranks
        when ``gather_distributed`` (DESIGN §3).
    """
    crops = list(high) + list(low)
    settings = (len(high), float(temperature), int(iterations), float(epsilon), bool(gather_distributed))
    loss = _SwavTritonFunction.apply(settings, None if queue is None else list(queue), *crops)
    if gather_distributed:
        return distributed.global_mean(loss)
    return loss
