r"""Triton and launcher helpers shared by the kernel families (SwAV/Sinkhorn, DINO, ...).

Nothing here imports a family module (``fastssl/<family>.py``) or another kernel file: the
family kernels import this module, never the reverse (imports point down).

Views read in place, without an address table
---------------------------------------------
Multi-crop losses get their crops as separate (rows, K) tensors (one model call per crop) or as
chunks of one tensor. Stacking them into a (V, rows, K) copy costs as much memory traffic as the
loss; an address table built on the host costs a host-to-device copy per call (a stream
synchronization, and nothing a CUDA graph can capture). Instead every view's address travels as
a kernel argument: :func:`prepare_views` returns :data:`MAX_VIEWS` pointer arguments (unused
slots repeat the first view) and :func:`view_rows` picks view ``v``'s with a chain of scalar
selects (a few integer instructions per tile; the compiler keeps the 16-byte alignment that
Triton specializes on every pointer argument). Views that are equally spaced slices of one
storage (``torch.chunk`` of a concatenated output), and any group of more than
:data:`MAX_VIEWS` views (stacked once), are addressed as ``base + v·view_stride`` instead.
All views of a group share one row stride (a view with another one is copied, which only
happens for unusual inputs), passed as ``units × ROW_ALIGN`` so the compiler knows its
alignment for vector loads.
"""

from __future__ import annotations

import functools
import math
from typing import List, NamedTuple, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

TRITON_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}

# Views one group passes as separate pointer arguments; more are stacked into one tensor.
MAX_VIEWS = 16


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (n - 1).bit_length())


def target_programs(device: torch.device) -> int:
    """Programs that keep the device busy: four waves of SMs on CUDA (132 SMs on an H100/H200:
    528); few on the interpreter, where every program is a sequential Python call."""
    if device.type == "cuda":
        return _cuda_target_programs(torch.cuda.current_device() if device.index is None else device.index)
    return 4


@functools.lru_cache(maxsize=None)
def _cuda_target_programs(index: int) -> int:
    return 4 * torch.cuda.get_device_properties(index).multi_processor_count


def k_align(n: int) -> int:
    """The largest power of two up to 16 that divides ``n``: passing an extent as
    ``units × K_ALIGN`` (K_ALIGN constexpr) tells the compiler that masks along it are constant
    over K_ALIGN-wide groups, which keeps 16-byte loads and stores."""
    return math.gcd(n, 16)


def common_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """The promoted dtype of ``tensors`` (no dispatched op when they already share one)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        if t.dtype != dtype:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


class Views(NamedTuple):
    """Equally shaped (rows, K) tensors prepared for :func:`view_rows`."""

    tensors: List[Tensor]  # what the kernels read (must outlive the launches)
    pointers: List[Tensor]  # MAX_VIEWS pointer arguments
    view_stride: int  # elements from one view to the next (UNIFORM)
    stride_units: int  # the common row stride / ROW_ALIGN
    n_views: int
    uniform: bool
    row_align: int

    def args(self) -> list:
        """Positional kernel arguments: the pointers, view_stride, stride_units."""
        return [*self.pointers, self.view_stride, self.stride_units]

    def constexprs(self, prefix: str) -> dict:
        """The kernel's compile-time view parameters, named ``<prefix>VIEWS``, ``<prefix>UNIFORM``
        and ``<prefix>ROW_ALIGN``."""
        return {f"{prefix}VIEWS": self.n_views, f"{prefix}UNIFORM": self.uniform, f"{prefix}ROW_ALIGN": self.row_align}


def _uniform_spacing(tensors: Sequence[Tensor]) -> int:
    """Elements between consecutive views when they are equally spaced in one storage, else 0."""
    if len(tensors) == 1:
        return 0
    first = tensors[0]
    size = first.element_size()
    gap = tensors[1].data_ptr() - first.data_ptr()
    if gap <= 0 or gap % size != 0:
        return 0
    for a, b in zip(tensors[1:], tensors[2:]):
        if b.data_ptr() - a.data_ptr() != gap:
            return 0
    if any(t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() for t in tensors[1:]):
        return 0
    return gap // size


def prepare_views(views: Sequence[Tensor], dtype: torch.dtype) -> Views:
    """Make ``views`` readable by :func:`view_rows` in ``dtype``, copying only what must be.

    A view is copied when its dtype differs from ``dtype``, its K axis is strided or its row
    stride differs from the first view's; more than :data:`MAX_VIEWS` views are stacked once.
    No device memory is written otherwise, and nothing is copied to the device.
    """
    kept = []
    for v in views:
        # (Called inside custom ops, below autograd: no detach needed.)
        if v.dtype != dtype:
            v = v.to(dtype)
        if v.shape[1] > 1 and v.stride(1) != 1:
            v = v.contiguous()
        kept.append(v)
    row_stride = kept[0].stride(0) if kept[0].shape[0] > 1 else kept[0].shape[1]
    kept = [v if v.shape[0] <= 1 or v.stride(0) == row_stride else v.contiguous() for v in kept]
    if any(v.stride(0) != row_stride and v.shape[0] > 1 for v in kept):  # the first view was copied
        kept = [v.contiguous() for v in kept]
        row_stride = kept[0].shape[1]
    spacing = _uniform_spacing(kept)
    if len(kept) > MAX_VIEWS and spacing == 0:
        stacked = torch.stack(kept)
        kept = list(stacked.unbind(0))
        row_stride, spacing = stacked.stride(1), stacked.stride(0)
    uniform = spacing > 0
    vector = max(1, 16 // kept[0].element_size())
    row_align = math.gcd(max(row_stride, 1), vector)
    pointers = [kept[0]] if uniform else kept + [kept[0]] * (MAX_VIEWS - len(kept))
    pointers = pointers + [kept[0]] * (MAX_VIEWS - len(pointers))
    return Views(kept, pointers, spacing, max(row_stride, 1) // row_align, len(kept), uniform, row_align)


@triton.jit
def view_base(v, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15,
              view_stride, N_VIEWS: tl.constexpr, UNIFORM: tl.constexpr):  # fmt: skip
    """Pointer to element [0, 0] of view ``v`` (see :func:`prepare_views`)."""
    if UNIFORM:
        base = p0 + (tl.zeros([], tl.int64) + v) * view_stride
    else:
        # Scalar selects, statically cut at the number of views.
        base = p0
        if N_VIEWS > 1:
            base = tl.where(v == 1, p1, base)
        if N_VIEWS > 2:
            base = tl.where(v == 2, p2, base)
        if N_VIEWS > 3:
            base = tl.where(v == 3, p3, base)
        if N_VIEWS > 4:
            base = tl.where(v == 4, p4, base)
        if N_VIEWS > 5:
            base = tl.where(v == 5, p5, base)
        if N_VIEWS > 6:
            base = tl.where(v == 6, p6, base)
        if N_VIEWS > 7:
            base = tl.where(v == 7, p7, base)
        if N_VIEWS > 8:
            base = tl.where(v == 8, p8, base)
        if N_VIEWS > 9:
            base = tl.where(v == 9, p9, base)
        if N_VIEWS > 10:
            base = tl.where(v == 10, p10, base)
        if N_VIEWS > 11:
            base = tl.where(v == 11, p11, base)
        if N_VIEWS > 12:
            base = tl.where(v == 12, p12, base)
        if N_VIEWS > 13:
            base = tl.where(v == 13, p13, base)
        if N_VIEWS > 14:
            base = tl.where(v == 14, p14, base)
        if N_VIEWS > 15:
            base = tl.where(v == 15, p15, base)
    return base


@triton.jit
def view_rows(v, rows64, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15,
              view_stride, stride_units, N_VIEWS: tl.constexpr, UNIFORM: tl.constexpr,
              ROW_ALIGN: tl.constexpr):  # fmt: skip
    """(BLOCK_ROWS, 1) pointers to rows ``rows64`` (int64) of view ``v``."""
    base = view_base(v, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15,
                     view_stride, N_VIEWS, UNIFORM)  # fmt: skip
    return base + rows64[:, None] * (stride_units * ROW_ALIGN)


@triton.jit
def online_lse_step(run_max, run_sum, y, AXIS: tl.constexpr):
    """One step of a max-shifted online log-sum-exp along ``AXIS`` of tile ``y`` (masked lanes
    -inf): returns the new (max, Σ exp(y − max)). A lane that has seen only -inf is shifted by 0
    so that exp gives 0, not NaN."""
    new_max = tl.maximum(run_max, tl.max(y, axis=AXIS))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    if AXIS == 1:
        tile_sum = tl.sum(tl.exp(y - shift[:, None]), axis=1)
    else:
        tile_sum = tl.sum(tl.exp(y - shift[None, :]), axis=0)
    return new_max, run_sum * tl.exp(run_max - shift) + tile_sum


@triton.jit
def merge_lse_partials(max_ptr, sum_ptr, offsets, mask, n_splits, split_stride):
    """log Σ_splits s·exp(m − M) + M over partial (max, sum) pairs stored at
    ``offsets + split·split_stride``; returns (M, log Σ ...) kept apart so that callers can form
    x − M − log Σ without rounding the large M + log Σ first. An all -inf entry gives
    (-inf → 0 shift, log 0 = -inf)."""
    top = tl.full(offsets.shape, float("-inf"), tl.float32)
    for split in range(n_splits):
        top = tl.maximum(top, tl.load(max_ptr + offsets + split * split_stride, mask=mask, other=float("-inf")))
    shift = tl.where(top == float("-inf"), 0.0, top)
    total = tl.zeros(offsets.shape, tl.float32)
    for split in range(n_splits):
        m = tl.load(max_ptr + offsets + split * split_stride, mask=mask, other=float("-inf"))
        s = tl.load(sum_ptr + offsets + split * split_stride, mask=mask, other=0.0)
        total += s * tl.exp(m - shift)
    return shift, tl.log(tl.where(mask, total, 1.0))


@triton.jit
def inverse_temperature(inverse, temperature_ptr, FROM_TENSOR: tl.constexpr):
    """1/τ: read from the 0-d tensor at ``temperature_ptr`` when FROM_TENSOR (a learnable or
    scheduled temperature stays on the device: no host read), else ``inverse`` as passed."""
    if FROM_TENSOR:
        inverse = 1.0 / tl.load(temperature_ptr).to(tl.float32)
    return inverse


@triton.jit
def scale_gradient_kernel(src_ptr, upstream_ptr, dst_ptr, n_elements, BLOCK: tl.constexpr):
    """dst = src · upstream[0]: the backward of a loss whose gradient the forward wrote, scaled
    by the incoming gradient read on the device (no host synchronization)."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    upstream = tl.load(upstream_ptr).to(tl.float32)
    g = tl.load(src_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst_ptr + offsets, (g * upstream).to(dst_ptr.dtype.element_ty), mask=mask)


def _scale_gradient(saved: Tensor, grad_loss: Tensor) -> Tensor:
    out = torch.empty_like(saved)
    upstream = grad_loss if grad_loss.dtype == torch.float32 else grad_loss.float()
    block = 4096
    scale_gradient_kernel[(triton.cdiv(saved.numel(), block),)](saved, upstream, out, saved.numel(), BLOCK=block)
    return out


# ``saved · grad_loss`` (0-d upstream gradient) in ``saved``'s dtype, in one launch: the backward
# of the losses whose forward writes the gradient (SwAV, DINO). A custom op, so that compiled
# graphs keep it whole.
scale_gradient = torch.library.custom_op(
    "fastssl::scale_saved_gradient", _scale_gradient, mutates_args=(), schema="(Tensor saved, Tensor grad_loss) -> Tensor"
)


@scale_gradient.register_fake
def _(saved, grad_loss):
    return torch.empty_like(saved)


@triton.jit
def sum_to_scalar_kernel(src_ptr, src_offset, n_elements, out_ptr, scale, BLOCK: tl.constexpr):
    """out[0] = scale · Σ src[src_offset : src_offset + n_elements], one program, in a fixed
    order (deterministic, unlike atomics)."""
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_elements, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        acc += tl.load(src_ptr + src_offset + offsets, mask=offsets < n_elements, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0) * scale)
