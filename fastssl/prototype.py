r"""Prototype losses: iBOT's masked-patch self-distillation (and iBOT++), CAPI's clustering of
latent patches, MSN / PMSN's prototype matching; functional API, optimized PyTorch path and
drop-ins for lightly's ``IBOTPatchLoss``, ``IBOTPlusPlusPatchLoss``, ``CAPILoss``, ``MSNLoss``,
``PMSNLoss`` and ``PMSNCustomLoss``.

All six are a soft-target cross-entropy over K prototypes, ``−Σ_k q_ik log softmax(s_i/τ_s)_k``,
between a target distribution ``q_i`` and the student row ``s_i`` *of the same index* (a masked
patch against the same patch of the teacher, a token against its own cluster assignment), and
they differ in where ``q`` comes from:

* iBOT (Zhou et al. 2022, Eq. 2; DINOv2, Oquab et al. 2024): ``q_i = softmax((t_i − c)/τ_t)``,
  the centred, sharpened teacher row, each masked patch weighted 1/(masked patches of its image);
* iBOT++ (TIPSv2): the same on every patch, masked and visible means weighted separately;
* CAPI (Darcet et al. 2025, Sec. 3.2): Sinkhorn-Knopp of the teacher logits, run separately at
  every token position;
* MSN (Assran et al. 2022, Eq. 2–4): sharpened cosine-to-prototype probabilities of the target
  view through Sinkhorn-Knopp, plus a mean-entropy regulariser; PMSN (Assran et al. 2023) swaps it
  for the KL divergence to a power-law (or any) prior.

The K-wide probability tensors are never materialized beyond a chunk of rows: the forward keeps
one float per row (the log-sum-exps, the target mass) and a hand-written backward recomputes the
chunk, as FlashAttention does for its softmax. At iBOT's DINOv2 shape (64 images × 196 patches,
≈40 % masked, K = 65536) lightly keeps several (5000 × 65536) float32 tensors for its backward
(1.3 GB each); this path keeps none.

iBOT and iBOT++ have Triton kernels (:func:`fastssl.kernels.dino.ibot_patch_loss_triton`, the
default for CUDA tensors): the loss from one streaming pass over teacher and student, the
gradient from a second one in the backward, iBOT's weights read from the mask on the device (no
host synchronisation) and the centre's EMA from the same pass. CAPI, MSN and PMSN run this torch
path on every backend (``backend="triton"`` is accepted and gives the same numbers).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from fastssl import distributed, reference
from fastssl._backend import (
    check_backend_name,
    guard_triton_backward,
    outside_autocast,
    resolve_backend,
    triton_with_fallback,
)
from fastssl._checks import (
    BatchShapeError,
    check_distributed_available,
    check_finite,
    check_int,
    check_nonzero,
    check_positive,
    check_probability,
    check_tensor,
)

# fp32 elements of one (rows, K) temporary per chunk. Per chunk the paths run about ten fused
# kernels, so the chunk trades cache locality against kernel count: on CPU 2**21 (8 MiB) keeps
# the number of parallel regions close to the unchunked formula's (a loaded machine makes every
# region wait for its slowest thread), on CUDA 2**24 (64 MiB) keeps the launches few while the
# temporaries stay a small fraction of iBOT's (5000 × 65536) inputs. Tests set an int here.
_CHUNK_ELEMENTS: Optional[int] = None
_DEVICE_CHUNK_ELEMENTS = {"cpu": 1 << 21}
_DEFAULT_CHUNK_ELEMENTS = 1 << 24

Prior = Union[None, Tensor, Callable[[Tensor], Tensor]]


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunk_elements(device: torch.device) -> int:
    if _CHUNK_ELEMENTS is not None:
        return _CHUNK_ELEMENTS
    return _DEVICE_CHUNK_ELEMENTS.get(device.type, _DEFAULT_CHUNK_ELEMENTS)


def _rows_per_chunk(width: int, device: torch.device) -> int:
    return max(1, _chunk_elements(device) // max(1, width))


# exp(x) for x below these is under the smallest normal number. Clamping the argument there
# costs nothing in accuracy (the result was < 1.2e-38, resp. 2.2e-308, anyway) and keeps the CPU
# off exp's slow underflow path (about 50x slower per element, and iBOT's teacher logits divided
# by τ_t = 0.04 reach it for most entries).
_EXP_FLOOR = {torch.float32: -87.0, torch.float64: -708.0}


def _exp_(x: Tensor) -> Tensor:
    """In-place ``exp`` of a float32/float64 tensor, its argument clamped at the normal range."""
    return x.clamp_(min=_EXP_FLOOR[x.dtype]).exp_()


def _logsumexp(x: Tensor, dim: int, keepdim: bool = False) -> Tensor:
    """``torch.logsumexp`` with :func:`_exp_` (same values; no slow underflow path)."""
    shift = x.amax(dim=dim, keepdim=True)
    out = shift + _exp_(x - shift).sum(dim=dim, keepdim=True).log_()
    return out if keepdim else out.squeeze(dim)


# --------------------------------------------------------------------------------------------
# Soft-target cross-entropy with same-index pairing and per-row weights (iBOT, iBOT++, CAPI)
# --------------------------------------------------------------------------------------------
#
# Row i of the student (R, K) is paired with teacher row g(i) (g = identity, or a gather) and its
# target log-probabilities are
#
#     log q_i = t_{g(i)} / τ_t − U[h(i)] − c_i,
#
# with U an (H, K) table of column offsets (iBOT: the one row c/τ_t of the centre; CAPI: the
# Sinkhorn column scalings of the row's token position h(i)) and c_i either the row's own
# log-sum-exp (iBOT: q_i is a softmax) or a given row scaling (CAPI). With
# log p_i = log_softmax(s_i/τ_s) and weights w_i the loss is L = −Σ_i w_i Σ_k q_ik log p_ik, and
#
#     ∂L/∂s_i = w_i (m_i p_i − q_i) / τ_s,    m_i = Σ_k q_ik,
#
# (m_i = 1 for a softmax target; CAPI's ε-regularised Sinkhorn leaves it slightly below 1, which
# lightly's autograd sees too). The forward keeps, per row, the two log-sum-exps and m_i; the
# backward recomputes q and p chunk by chunk.


def _target_logits(
    teacher: Tensor,
    teacher_rows: Optional[Tensor],
    offsets: Tensor,
    offset_rows: Optional[Tensor],
    row_shift: Optional[Tensor],
    teacher_scale: float,
    start: int,
    stop: int,
    dtype: torch.dtype,
) -> Tensor:
    """``t_{g(i)}/τ_t − U[h(i)]`` (minus the given row shift) for rows ``start:stop``, fresh tensor."""
    if teacher_rows is None:
        rows = teacher[start:stop]
    else:
        rows = teacher.index_select(0, teacher_rows[start:stop])
    # ``offsets`` and ``row_shift`` arrive negated (see _soft_target_ce): one fused kernel
    # computes −U[h(i)] + t·(1/τ_t), promoting a half-precision teacher on the fly.
    bias = offsets if offset_rows is None else offsets.index_select(0, offset_rows[start:stop])
    logits = torch.add(bias, rows, alpha=teacher_scale)
    if row_shift is not None:
        logits += row_shift[start:stop, None]
    return logits


def _softmax_targets(logits: Tensor, normalize: bool) -> Tensor:
    """Target probabilities from (chunk, K) target logits, in place where possible: a softmax
    (iBOT), or ``exp`` of logits already shifted by their row scaling (CAPI). Logits more than
    87 below their row's maximum are raised to that floor first: their probability (< 1.7e-38
    relative) does not change in float32, and the CPU's exp avoids its slow underflow path."""
    if not normalize:
        return _exp_(logits)
    floor = logits.amax(dim=1, keepdim=True) + _EXP_FLOOR[logits.dtype]
    return torch.softmax(logits.clamp_(min=floor), dim=1)


class _SoftTargetCrossEntropy(torch.autograd.Function):
    """Chunked ``−Σ_i w_i Σ_k q_ik log softmax(s_i/τ_s)_k`` (see the block comment above).

    Returns the 0-d loss (float32) and, when asked, the (K,) sum of the teacher rows (the
    centre's batch mean, read in the same pass; not differentiable). The forward keeps nothing
    per element: the backward recomputes each chunk's softmaxes (a handful of fused kernels per
    chunk, so the work stays in cache and the kernel count stays low)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        student: Tensor,
        teacher: Tensor,
        teacher_rows: Optional[Tensor],
        offsets: Tensor,
        offset_rows: Optional[Tensor],
        row_shift: Optional[Tensor],
        weights: Tensor,
        teacher_scale: float,
        student_temp: float,
        want_teacher_sum: bool,
    ):
        rows, k = student.shape
        dtype = _compute_dtype(student)
        device = student.device
        normalize = row_shift is None
        # Σ_k q_ik: 1 for a softmax target (not stored), measured for a given row shift.
        target_mass = None if normalize else torch.empty(rows, dtype=dtype, device=device)
        total = torch.zeros((), dtype=dtype, device=device)
        teacher_sum = torch.zeros(k if want_teacher_sum else 0, dtype=dtype, device=device)
        chunk = _rows_per_chunk(k, device)
        for start in range(0, rows, chunk):
            stop = min(start + chunk, rows)
            if want_teacher_sum:
                teacher_sum += teacher[start:stop].sum(dim=0, dtype=dtype)
            q = _softmax_targets(
                _target_logits(teacher, teacher_rows, offsets, offset_rows, row_shift, teacher_scale, start, stop, dtype),
                normalize,
            )  # fmt: skip
            if target_mass is not None:
                target_mass[start:stop] = q.sum(dim=1)
            log_p = torch.log_softmax(student[start:stop].to(dtype) / student_temp, dim=1)
            # Σ_k q log p per row, times the row weight, summed.
            total -= q.mul_(log_p).sum(dim=1) @ weights[start:stop]
        ctx.save_for_backward(student, teacher, teacher_rows, offsets, offset_rows, row_shift, target_mass, weights)
        ctx.teacher_scale = teacher_scale
        ctx.student_temp = student_temp
        ctx.normalize = normalize
        teacher_sum = teacher_sum.float()
        ctx.mark_non_differentiable(teacher_sum)
        return total.float(), teacher_sum

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_teacher_sum: Tensor):  # type: ignore[override]
        student, teacher, teacher_rows, offsets, offset_rows, row_shift, target_mass, weights = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            rows, k = student.shape
            dtype = weights.dtype
            grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
            # w_i · (upstream gradient) / τ_s, one factor per row.
            row_factor = (weights * (grad_loss.to(dtype) / ctx.student_temp))[:, None]
            mass = None if target_mass is None else target_mass[:, None]
            chunk = _rows_per_chunk(k, student.device)
            for start in range(0, rows, chunk):
                stop = min(start + chunk, rows)
                q = _softmax_targets(
                    _target_logits(teacher, teacher_rows, offsets, offset_rows, row_shift, ctx.teacher_scale, start,
                                   stop, dtype),
                    ctx.normalize,
                )  # fmt: skip
                p = torch.softmax(student[start:stop].to(dtype) / ctx.student_temp, dim=1)
                if mass is not None:
                    p *= mass[start:stop]
                p -= q
                if grad.dtype == dtype:
                    torch.mul(p, row_factor[start:stop], out=grad[start:stop])
                else:
                    grad[start:stop] = p.mul_(row_factor[start:stop])
        return grad, None, None, None, None, None, None, None, None, None


def _soft_target_ce(
    student: Tensor,
    teacher: Tensor,
    weights: Tensor,
    offsets: Tensor,
    teacher_scale: float,
    student_temp: float,
    *,
    teacher_rows: Optional[Tensor] = None,
    offset_rows: Optional[Tensor] = None,
    row_shift: Optional[Tensor] = None,
    want_teacher_sum: bool = False,
) -> Tuple[Tensor, Tensor]:
    # The teacher gets no gradient; detaching also keeps the Function's inputs distinct when the
    # same tensor is passed as teacher and student.
    # The Function adds −U and −c: negated once here rather than per chunk.
    return _SoftTargetCrossEntropy.apply(
        student, teacher.detach(), teacher_rows, -offsets, offset_rows, None if row_shift is None else -row_shift, weights,
        teacher_scale, student_temp, want_teacher_sum,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# iBOT and iBOT++: functional API
# --------------------------------------------------------------------------------------------


def _check_mask_dtype(mask: object, name: str = "mask", allow_float: bool = False) -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not (allow_float and (mask.is_floating_point() or mask.dtype in
                                                           (torch.uint8, torch.int32, torch.int64))):
        expected = "a boolean (or 0/1 numeric)" if allow_float else "a boolean"
        raise TypeError(f"{name} must be {expected} tensor, got dtype {mask.dtype}")
    return mask


def _center_row(center: Optional[Tensor], like: Tensor, dtype: torch.dtype, teacher_temp: float) -> Tensor:
    """The (1, K) column offset ``c/τ_t`` of iBOT's target logits."""
    k = like.shape[1]
    if center is None:
        return torch.zeros(1, k, dtype=dtype, device=like.device)
    if center.numel() != k:
        raise ValueError(f"center must have output_dim={k} entries, got shape {tuple(center.shape)}")
    return center.detach().reshape(1, k).to(device=like.device, dtype=dtype) / teacher_temp


def _ibot_patch_weights(mask: Tensor, rows: int, dtype: torch.dtype) -> Tensor:
    """Weight of each masked row: 1 / (B · masked patches of its image), rows in the mask's
    row-major order of True entries (lightly's ``(1/n).expand_as(mask)[mask]``, without the host
    synchronisation of a boolean index)."""
    batch = mask.shape[0]
    counts = mask.reshape(batch, -1).sum(dim=1)
    if mask.device.type == "cpu" and not torch.compiler.is_compiling():
        if int(counts.sum()) != rows:
            raise BatchShapeError(
                f"mask marks {int(counts.sum())} tokens but teacher_out and student_out have {rows} rows; "
                "they must hold exactly the masked tokens"
            )
    else:
        torch._assert_async(counts.sum() == rows, "mask must mark exactly as many tokens as teacher_out has rows")
    per_image = 1.0 / (batch * counts.clamp(min=1).to(dtype))
    return torch.repeat_interleave(per_image, counts, output_size=rows)


def _check_ibot_pair(teacher_out: Tensor, student_out: Tensor) -> None:
    check_tensor("teacher_out", teacher_out)
    check_tensor("student_out", student_out)
    if teacher_out.shape != student_out.shape:
        raise BatchShapeError(
            f"teacher_out and student_out must have the same shape, got {tuple(teacher_out.shape)} and "
            f"{tuple(student_out.shape)}"
        )
    if teacher_out.device != student_out.device:
        raise ValueError(
            f"teacher_out and student_out must be on the same device, got {teacher_out.device} and "
            f"{student_out.device}"
        )


def _on_device(mask: Tensor, device: torch.device) -> Tensor:
    """``mask`` on ``device``; no op at all when it is there already."""
    return mask if mask.device == device else mask.to(device)


def _check_mask_marks_rows(mask: Tensor, rows: int) -> None:
    """On CPU (where reading a count costs no device synchronisation): the mask must mark exactly
    ``rows`` tokens. CUDA paths check on the device instead (an asynchronous assert on the torch
    path, a NaN loss from the Triton kernels)."""
    if mask.device.type == "cpu" and not torch.compiler.is_compiling():
        marked = int(mask.sum())
        if marked != rows:
            raise BatchShapeError(
                f"mask marks {marked} tokens but teacher_out and student_out have {rows} rows; "
                "they must hold exactly the masked tokens"
            )


def _ibot_op_torch_loss(
    teacher: Tensor, student: Tensor, center: Optional[Tensor], mask: Optional[Tensor], weights: Optional[Tensor],
    teacher_temp: float, student_temp: float, _center_momentum: float, _center_mode: int,
) -> Tensor:
    """The torch path's loss from the inputs of the iBOT custom op (its schema's order)."""
    dtype = _compute_dtype(student)
    row_weights = _ibot_patch_weights(mask, student.shape[0], dtype) if weights is None else weights
    offsets = _center_row(center, teacher, dtype, teacher_temp)
    return _soft_target_ce(student, teacher, row_weights.to(dtype), offsets, 1.0 / teacher_temp, student_temp)[0]


@outside_autocast
def _ibot_dispatch(
    teacher: Tensor,
    student: Tensor,
    weights: Optional[Tensor],
    center: Optional[Tensor],
    teacher_temp: float,
    student_temp: float,
    backend: str,
    *,
    mask: Optional[Tensor] = None,
    center_momentum: Optional[float] = None,
    want_teacher_sum: bool = True,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Weighted iBOT cross-entropy over the (R, K) row pairs: row weights ``weights`` or, when
    None, iBOT's from the boolean ``mask`` (see :func:`_ibot_patch_weights`).

    Returns ``(loss, teacher_sum, new_center)``: the (K,) float32 sum of the teacher rows (None
    when not wanted), or -- on the Triton path, given ``center_momentum`` and a center, without a
    process group -- None and the center's EMA step ``m·c + (1−m)·mean`` as a (K,) float32
    tensor, both from the kernels' own pass over the teacher."""
    impl = resolve_backend(backend, student)
    dtype = _compute_dtype(student)

    def row_weights() -> Tensor:
        return _ibot_patch_weights(mask, student.shape[0], dtype) if weights is None else weights

    def run_torch() -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        offsets = _center_row(center, teacher, dtype, teacher_temp)
        loss, teacher_sum = _soft_target_ce(
            student, teacher, row_weights().to(dtype), offsets, 1.0 / teacher_temp, student_temp,
            want_teacher_sum=True,
        )  # fmt: skip
        return loss, teacher_sum, None

    if impl == "reference":
        c = torch.zeros(teacher.shape[1], dtype=teacher.dtype, device=teacher.device) if center is None else center
        loss = reference.weighted_soft_target_cross_entropy(
            teacher, student, row_weights().to(student.dtype), c.reshape(-1).to(teacher.dtype), teacher_temp,
            student_temp,
        ).float()  # fmt: skip
        with torch.no_grad():
            teacher_sum = teacher.detach().float().sum(dim=0)
        return loss, teacher_sum, None
    if impl == "triton":

        def run_triton() -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
            from fastssl.kernels import dino as kernels

            # Under "auto" a backward kernel that fails gives the torch path's gradient.
            guard_triton_backward(kernels._ibot_op, "ibot", kernels._ibot_setup, kernels._ibot_gradient,
                                  _ibot_op_torch_loss)
            if weights is None:
                _check_mask_marks_rows(mask, student.shape[0])
            fused_ema = center_momentum is not None and center is not None and not (
                dist.is_available() and dist.is_initialized())
            if fused_ema:
                mode = kernels.CENTER_EMA
            else:
                mode = kernels.CENTER_TEACHER_SUM if want_teacher_sum else kernels.CENTER_NONE
            out = kernels.ibot_patch_loss_triton(
                teacher, student, center, teacher_temp, student_temp, mask=mask if weights is None else None,
                weights=weights, center_momentum=center_momentum or 0.0, center_mode=mode,
            )  # fmt: skip
            if mode == kernels.CENTER_NONE:
                return out, None, None
            loss, center_out = out
            return (loss, None, center_out) if fused_ema else (loss, center_out, None)

        return triton_with_fallback("ibot", backend, run_triton, run_torch)
    return run_torch()


@outside_autocast
def ibot_patch_loss(
    teacher_out: Tensor,
    student_out: Tensor,
    mask: Tensor,
    center: Optional[Tensor] = None,
    teacher_temp: float = 0.04,
    student_temp: float = 0.1,
    *,
    backend: str = "auto",
) -> Tensor:
    r"""iBOT's masked-patch loss (Zhou et al. 2022, Eq. 2, as DINOv2 weights it).

    .. math:: L = \frac1B\sum_b \frac{1}{n_b}\sum_{i\in\text{masked}(b)}
              -\,\mathrm{softmax}\Big(\frac{t_i - c}{\tau_t}\Big)\cdot
              \log\mathrm{softmax}\Big(\frac{s_i}{\tau_s}\Big),

    ``n_b`` the masked patches of image b (at least 1). Teacher row i is paired with student row
    i; the teacher gets no gradient. The centre is not updated (:class:`IBOTPatchLoss` does).

    Args:
        teacher_out: (M, K) teacher outputs of the M masked patches, in the mask's row-major order.
        student_out: (M, K) student outputs of the same patches.
        mask: boolean (B, H, W) (or (B, N)) patch mask with exactly M entries set.
        center: (K,) or (1, K) teacher centre; zeros when None.
    Returns:
        0-d float32 loss.

    Example:
        >>> mask = torch.rand(8, 14, 14) < 0.4
        >>> t, s = torch.randn(2, int(mask.sum()), 8192).unbind(0)
        >>> loss = ibot_patch_loss(t, s.requires_grad_(), mask)
    """
    _check_ibot_pair(teacher_out, student_out)
    mask = _check_mask_dtype(mask)
    if mask.dim() < 2:
        raise ValueError(f"mask must have shape (batch_size, height, width), got shape {tuple(mask.shape)}")
    teacher_temp = check_nonzero("teacher_temp", teacher_temp)
    student_temp = check_nonzero("student_temp", student_temp)
    return _ibot_dispatch(
        teacher_out, student_out, None, center, teacher_temp, student_temp, backend,
        mask=_on_device(mask, student_out.device), want_teacher_sum=False,
    )[0]  # fmt: skip


def _ibot_plus_plus_rows(
    teacher_out: Tensor, student_out: Tensor, mask: Optional[Tensor], visible_loss_weight: float
) -> Tuple[Tensor, Tensor, Tensor]:
    """Flattened (B·N, K) teacher and student and the per-row weights of iBOT++."""
    if not isinstance(teacher_out, Tensor) or not isinstance(student_out, Tensor):
        raise TypeError("teacher_out and student_out must be torch.Tensors")
    if teacher_out.shape != student_out.shape:
        raise BatchShapeError(
            f"teacher_out and student_out must have the same shape but got {tuple(teacher_out.shape)} and "
            f"{tuple(student_out.shape)}."
        )
    if teacher_out.dim() not in (2, 3):
        raise ValueError(f"teacher_out must be rank 2 or 3 but got rank {teacher_out.dim()}.")
    check_tensor("teacher_out", teacher_out, ndim=None)
    check_tensor("student_out", student_out, ndim=None)
    if teacher_out.dim() == 3:
        batch = teacher_out.shape[0]
        teacher_flat, student_flat = teacher_out.flatten(0, 1), student_out.flatten(0, 1)
    else:
        if mask is None:
            raise ValueError(
                "mask is required when teacher_out has rank 2 so that the batch size B can be inferred."
            )
        batch = mask.shape[0] if mask.dim() > 0 else 0
        if batch == 0 or teacher_out.shape[0] % batch != 0:
            raise BatchShapeError(
                f"teacher_out length {teacher_out.shape[0]} is not divisible by batch size {batch} inferred "
                "from mask."
            )
        teacher_flat, student_flat = teacher_out, student_out
    if teacher_flat.shape[0] == 0 or teacher_flat.shape[1] == 0:
        raise ValueError(f"teacher_out is empty (shape {tuple(teacher_out.shape)})")
    tokens = teacher_flat.shape[0] // batch
    dtype = _compute_dtype(student_out)
    if mask is None:
        weights = torch.full((batch * tokens,), 1.0 / (batch * tokens), dtype=dtype, device=student_out.device)
        return teacher_flat, student_flat, weights
    mask = _check_mask_dtype(mask, allow_float=True)
    if mask.numel() != batch * tokens or mask.shape[0] != batch:
        raise BatchShapeError(
            f"mask of shape {tuple(mask.shape)} does not fit {batch} images of {tokens} tokens each"
        )
    masked = mask.reshape(batch, tokens).to(device=student_out.device, dtype=dtype)  # 1 = masked
    visible = 1.0 - masked
    masked_share = masked / masked.sum(dim=1, keepdim=True).clamp(min=1.0)
    visible_share = visible / visible.sum(dim=1, keepdim=True).clamp(min=1.0)
    weights = (masked_share + visible_loss_weight * visible_share).reshape(-1) / batch
    return teacher_flat, student_flat, weights


@outside_autocast
def ibot_plus_plus_patch_loss(
    teacher_out: Tensor,
    student_out: Tensor,
    mask: Optional[Tensor] = None,
    center: Optional[Tensor] = None,
    teacher_temp: float = 0.04,
    student_temp: float = 0.1,
    visible_loss_weight: float = 1.0,
    *,
    backend: str = "auto",
) -> Tensor:
    r"""iBOT++ (TIPSv2): iBOT's cross-entropy on every patch token.

    With ``ce`` the per-token iBOT cross-entropy and m the mask (1 = masked), per image b:
    ``masked_b = Σ m·ce / max(Σ m, 1)``, ``visible_b = Σ (1−m)·ce / max(Σ (1−m), 1)``, and
    ``L = mean_b(masked_b + visible_loss_weight · visible_b)``; without a mask, the mean over all
    tokens. The centre is not updated (:class:`IBOTPlusPlusPatchLoss` does).

    Args:
        teacher_out, student_out: (B, N, K), or (B·N, K) with a mask giving B.
        mask: optional (B, H, W) or (B, N) mask, boolean or 0/1.
        center: (K,) or (1, K) teacher centre; zeros when None.
    Returns:
        0-d float32 loss.

    Example:
        >>> t, s = torch.randn(2, 8, 196, 1024).unbind(0)
        >>> mask = torch.rand(8, 14, 14) < 0.4
        >>> loss = ibot_plus_plus_patch_loss(t, s.requires_grad_(), mask, visible_loss_weight=0.5)
    """
    visible_loss_weight = check_finite("visible_loss_weight", visible_loss_weight)
    teacher_temp = check_nonzero("teacher_temp", teacher_temp)
    student_temp = check_nonzero("student_temp", student_temp)
    teacher_flat, student_flat, weights = _ibot_plus_plus_rows(teacher_out, student_out, mask, visible_loss_weight)
    return _ibot_dispatch(
        teacher_flat, student_flat, weights, center, teacher_temp, student_temp, backend, want_teacher_sum=False
    )[0]


# --------------------------------------------------------------------------------------------
# iBOT and iBOT++: modules
# --------------------------------------------------------------------------------------------


class _Center(nn.Module):
    """The EMA centre of lightly's ``lightly.models.modules.center.Center`` (same buffer name
    ``center``, ``value`` property and ``update(x)``): ``c ← m·c + (1−m)·mean(x)``, the batch mean
    averaged over ranks whenever a process group is initialized, as lightly does."""

    center: Tensor

    def __init__(self, size: Tuple[int, ...], mode: str = "mean", momentum: float = 0.9) -> None:
        super().__init__()
        if mode != "mean":
            raise ValueError(f"Unknown mode '{mode}'. Valid modes are ['mean'].")
        self.size = size
        self.dim = tuple(i for i, s in enumerate(size) if s == 1)
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(size))

    @property
    def value(self) -> Tensor:
        return self.center

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """EMA step towards the mean of ``x`` over the centre's size-1 dimensions."""
        self.update_from_mean(x.detach().float().mean(dim=self.dim, keepdim=True))

    @torch.no_grad()
    def update_from_mean(self, batch_center: Tensor) -> None:
        """EMA step towards ``batch_center`` (this rank's batch mean, any shape that broadcasts)."""
        batch_center = batch_center.float().reshape(self.center.shape)
        if dist.is_available() and dist.is_initialized():
            batch_center = batch_center.clone()
            dist.all_reduce(batch_center)
            batch_center /= dist.get_world_size()
        # In place: references to the buffer stay valid (lightly rebinds it).
        self.center.mul_(self.momentum).add_(batch_center.to(self.center.dtype), alpha=1 - self.momentum)


class IBOTPatchLoss(nn.Module):
    """Drop-in for ``lightly.loss.IBOTPatchLoss``: iBOT's masked-patch loss (Zhou et al. 2022) as
    DINOv2 (Oquab et al. 2024) uses it, with the teacher centre's EMA.

    Args:
        output_dim: number of prototypes K (size of the centre).
        teacher_temp: teacher temperature (overridable per call).
        student_temp: student temperature.
        center_mode: only ``"mean"``.
        center_momentum: EMA momentum of the centre.
        backend: ``"auto" | "torch" | "reference" | "triton"`` (env ``FASTSSL_BACKEND``);
            ``"auto"`` runs the Triton kernels for CUDA tensors (the centre's EMA computed there).

    Forward ``(teacher_out, student_out, mask, teacher_temp=None)``: (M, K) outputs of the M
    masked patches and the boolean (B, H, W) mask; returns a 0-d float32 loss (see
    :func:`ibot_patch_loss`) and moves ``center.center`` (shape (1, K)) towards the batch mean of
    ``teacher_out``. Differences from lightly: the teacher receives no gradient, and an empty
    batch or a mask that does not mark exactly M patches is a ``ValueError`` (on CUDA, where
    reading the count would synchronise, a device-side assert on the torch path and a NaN loss
    from the Triton kernels).

    Example:
        >>> criterion = IBOTPatchLoss(output_dim=8192)
        >>> mask = torch.rand(8, 14, 14) < 0.4
        >>> loss = criterion(torch.randn(int(mask.sum()), 8192), student_patches, mask)
    """

    def __init__(
        self,
        output_dim: int = 65536,
        teacher_temp: float = 0.04,
        student_temp: float = 0.1,
        center_mode: str = "mean",
        center_momentum: float = 0.9,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_int("output_dim", output_dim, minimum=1)
        self.teacher_temp = check_nonzero("teacher_temp", teacher_temp)
        self.student_temp = check_nonzero("student_temp", student_temp)
        self.backend = check_backend_name(backend)
        self.center = _Center(size=(1, int(output_dim)), mode=center_mode, momentum=check_probability(
            "center_momentum", center_momentum))

    def _teacher_temperature(self, teacher_temp: Optional[float]) -> float:
        return self.teacher_temp if teacher_temp is None else check_nonzero("teacher_temp", teacher_temp)

    def _check_output_dim(self, teacher: Tensor) -> None:
        if teacher.shape[-1] != self.center.center.shape[-1]:
            raise ValueError(
                f"teacher_out has {teacher.shape[-1]} prototypes but the loss was built with output_dim="
                f"{self.center.center.shape[-1]}"
            )

    def forward(
        self,
        teacher_out: Tensor,
        student_out: Tensor,
        mask: Tensor,
        teacher_temp: Optional[float] = None,
    ) -> Tensor:
        """iBOT's masked-patch loss; updates the center in training mode.

        Args:
            teacher_out: (M, K) teacher outputs of the M masked tokens (no gradient flows to them).
            student_out: (M, K) student outputs of the same tokens, in the same order.
            mask: (B, H, W) boolean token mask with exactly M entries set.
            teacher_temp: teacher temperature; the constructor's when None.

        Returns:
            0-d float32 loss: per image the mean over its masked tokens, averaged over images.
        """
        _check_ibot_pair(teacher_out, student_out)
        self._check_output_dim(teacher_out)
        mask = _check_mask_dtype(mask)
        if mask.dim() < 2:
            raise ValueError(f"mask must have shape (batch_size, height, width), got shape {tuple(mask.shape)}")
        loss, teacher_sum, new_center = _ibot_dispatch(
            teacher_out, student_out, None, self.center.center,
            self._teacher_temperature(teacher_temp), self.student_temp, self.backend,
            mask=_on_device(mask, student_out.device), center_momentum=self.center.momentum,
        )  # fmt: skip
        self._update_center(teacher_sum, new_center, teacher_out.shape[0])
        return loss

    @torch.no_grad()
    def _update_center(self, teacher_sum: Optional[Tensor], new_center: Optional[Tensor], rows: int) -> None:
        """The EMA step from the batch's teacher sum, or the new center the kernels computed
        (copied in place, broadcast over the (1, K) buffer: references to it stay valid)."""
        if new_center is None:
            self.center.update_from_mean(teacher_sum / rows)
        else:
            self.center.center.copy_(new_center)


class IBOTPlusPlusPatchLoss(IBOTPatchLoss):
    """Drop-in for ``lightly.loss.IBOTPlusPlusPatchLoss``: iBOT++ (TIPSv2), the iBOT cross-entropy
    on all patch tokens, masked and visible means weighted separately (see
    :func:`ibot_plus_plus_patch_loss`).

    Forward ``(teacher_out, student_out, mask=None, teacher_temp=None, visible_loss_weight=1.0)``
    with (B, N, K) outputs, or (B·N, K) and a mask; returns a 0-d float32 loss and moves the centre
    towards the mean of all teacher tokens. The teacher receives no gradient.

    Example:
        >>> criterion = IBOTPlusPlusPatchLoss(output_dim=8192)
        >>> loss = criterion(torch.randn(8, 196, 8192), student_tokens, mask, visible_loss_weight=0.5)
    """

    def forward(  # type: ignore[override]
        self,
        teacher_out: Tensor,
        student_out: Tensor,
        mask: Optional[Tensor] = None,
        teacher_temp: Optional[float] = None,
        visible_loss_weight: float = 1.0,
    ) -> Tensor:
        """iBOT++: the patch loss on every token, masked and visible.

        Args:
            teacher_out: (B, N, K) or (B * N, K) teacher outputs of all tokens (no gradient).
            student_out: the student outputs, same shape.
            mask: (B, N) or (B, H, W) boolean mask of the masked tokens; None: one plain mean.
            teacher_temp: teacher temperature; the constructor's when None.
            visible_loss_weight: weight of the visible tokens' mean (0 gives iBOT).

        Returns:
            0-d float32 loss.
        """
        visible_loss_weight = check_finite("visible_loss_weight", visible_loss_weight)
        teacher_flat, student_flat, weights = _ibot_plus_plus_rows(teacher_out, student_out, mask, visible_loss_weight)
        self._check_output_dim(teacher_flat)
        loss, teacher_sum, new_center = _ibot_dispatch(
            teacher_flat, student_flat, weights, self.center.center,
            self._teacher_temperature(teacher_temp), self.student_temp, self.backend,
            center_momentum=self.center.momentum,
        )  # fmt: skip
        self._update_center(teacher_sum, new_center, teacher_flat.shape[0])
        return loss


# --------------------------------------------------------------------------------------------
# CAPI: position-wise Sinkhorn-Knopp + soft cross-entropy
# --------------------------------------------------------------------------------------------
#
# lightly's (and CAPI's) Sinkhorn works on Q = exp(X − max_b X) per position t, X = logits/τ_t of
# shape (B, K) there, and alternately divides by (column sum over the batch + ε) and by (row sum
# over the clusters + ε), ε = 1e-8. Every step is a diagonal scaling, so after any number of them
#
#     Q[t, b, k] = exp(X[t, b, k] − u[t, k] − v[t, b])
#
# with u (T, K) starting at the column maximum and gaining log(column sum + ε) per step, and
# v (T, B) gaining log(row sum + ε). Chunk by chunk over positions we form E = exp(X − max_b X)
# once (entries in [0, 1]) and iterate on the scalings alone, Q = diag(d) E diag(a): a column
# sum is a_k (Eᵀd)_k and a row sum d_b (E a)_b, one matrix-vector product each, E read and never
# rewritten; then u = max − log a and v = −log d. The cross-entropy pass rebuilds each target
# row as exp(X − u − v), so the (B, T, K) assignments are never stored. This is lightly's
# arithmetic, ε included (with a global column maximum and column sums under gather, as lightly).


@torch.no_grad()
def _capi_scalings(
    logits: Tensor, teacher_scale: float, iterations: int, epsilon: float, distributed_on: bool
) -> Tuple[Tensor, Tensor]:
    """Log-domain Sinkhorn scalings ``u`` (T, K) and ``v`` (T, B) of ``logits`` (B, T, K)."""
    batch, positions, k = logits.shape
    dtype = _compute_dtype(logits)
    u = torch.empty(positions, k, dtype=dtype, device=logits.device)
    v = torch.empty(positions, batch, dtype=dtype, device=logits.device)
    per_chunk = _rows_per_chunk(batch * k, logits.device)
    if distributed_on:
        # Every iteration all-reduces a column sum per chunk: fewer, larger chunks.
        per_chunk = max(per_chunk, -(-positions // 8))
    for start in range(0, positions, per_chunk):
        stop = min(start + per_chunk, positions)
        # E = exp(X − max_b X) once; the iterations only rescale it, Q = diag(d) E diag(a), so
        # each half-step is one matrix-vector product over E (read, never rewritten).
        x = logits[:, start:stop].transpose(0, 1).to(dtype) * teacher_scale  # (t, B, K)
        col_max = x.amax(dim=1, keepdim=True)  # (t, 1, K)
        if distributed_on:
            dist.all_reduce(col_max, op=dist.ReduceOp.MAX)
        e = _exp_(x.sub_(col_max))
        a = torch.ones(stop - start, k, 1, dtype=dtype, device=logits.device)
        d = torch.ones(stop - start, batch, 1, dtype=dtype, device=logits.device)
        for _ in range(iterations):
            col_sum = torch.bmm(e.transpose(1, 2), d).mul_(a)  # Σ_b Q[b, k], (t, K, 1)
            if distributed_on:
                dist.all_reduce(col_sum)
            a = a / col_sum.add_(epsilon)
            row_sum = torch.bmm(e, a).mul_(d)  # Σ_k Q[b, k], (t, B, 1)
            d = d / row_sum.add_(epsilon)
        u[start:stop] = col_max[:, 0] - a[..., 0].log()
        v[start:stop] = -d[..., 0].log()
    return u, v


def _check_capi_inputs(teacher_logits: Tensor, student_logits: Tensor, teacher_index: Optional[Tensor]) -> None:
    check_tensor("teacher_logits", teacher_logits, ndim=3)
    check_tensor("student_logits", student_logits, ndim=3)
    if teacher_logits.shape[0] != student_logits.shape[0] or teacher_logits.shape[2] != student_logits.shape[2]:
        raise BatchShapeError(
            "teacher_logits (batch_size, num_teacher_tokens, num_clusters) and student_logits (batch_size, "
            f"num_predicted_tokens, num_clusters) disagree: {tuple(teacher_logits.shape)} and "
            f"{tuple(student_logits.shape)}"
        )
    if teacher_logits.shape[1] == 0 or student_logits.shape[1] == 0:
        raise ValueError("teacher_logits and student_logits need at least one token")
    if teacher_logits.device != student_logits.device:
        raise ValueError("teacher_logits and student_logits must be on the same device")
    if teacher_index is None:
        if teacher_logits.shape[1] != student_logits.shape[1]:
            raise BatchShapeError(
                "without teacher_index the teacher and student tokens are paired position by position, but "
                f"teacher_logits has {teacher_logits.shape[1]} tokens and student_logits {student_logits.shape[1]}"
            )
        return
    if not isinstance(teacher_index, Tensor):
        raise TypeError(f"teacher_index must be a torch.Tensor, got {type(teacher_index).__name__}")
    if teacher_index.dtype != torch.int64:
        raise TypeError(f"teacher_index must be an int64 tensor, got dtype {teacher_index.dtype}")
    if tuple(teacher_index.shape) != tuple(student_logits.shape[:2]):
        raise BatchShapeError(
            f"teacher_index must have shape (batch_size, num_predicted_tokens) = {tuple(student_logits.shape[:2])}, "
            f"got {tuple(teacher_index.shape)}"
        )


def _capi_torch(
    teacher_logits: Tensor,
    student_logits: Tensor,
    teacher_index: Optional[Tensor],
    teacher_temperature: float,
    student_temperature: float,
    iterations: int,
    gather_distributed: bool,
) -> Tensor:
    batch, positions, k = teacher_logits.shape
    predicted = student_logits.shape[1]
    dtype = _compute_dtype(student_logits)
    device = student_logits.device
    distributed_on = gather_distributed and distributed.is_distributed()
    teacher = teacher_logits.detach()
    u, v = _capi_scalings(teacher, 1.0 / teacher_temperature, iterations, 1e-8, distributed_on)
    image = torch.arange(batch, device=device).repeat_interleave(predicted)  # b of each student row
    if teacher_index is None:
        position = torch.arange(predicted, device=device).repeat(batch)
    else:
        position = teacher_index.to(device).reshape(-1)
    teacher_rows = image * positions + position
    weights = torch.full((batch * predicted,), 1.0 / (batch * predicted), dtype=dtype, device=device)
    loss, _ = _soft_target_ce(
        student_logits.reshape(batch * predicted, k),
        teacher.reshape(batch * positions, k),
        weights,
        u,
        1.0 / teacher_temperature,
        student_temperature,
        teacher_rows=None if teacher_index is None else teacher_rows,
        offset_rows=position,
        row_shift=v.reshape(-1).index_select(0, position * batch + image),
    )
    return distributed.global_mean(loss) if distributed_on else loss


@torch.no_grad()
def capi_sinkhorn(
    logits: Tensor, iterations: int = 3, epsilon: float = 1e-8, *, gather_distributed: bool = False
) -> Tensor:
    """CAPI's position-wise Sinkhorn-Knopp (lightly's ``capi_loss.sinkhorn_knopp``), computed with
    log-domain scalings (see the block comment above).

    Args:
        logits: (B, T, K) cluster logits (already divided by the teacher temperature).
        iterations: Sinkhorn iterations (0: the max-shifted exponentials).
        epsilon: added to every denominator, as lightly.
        gather_distributed: the batch sums over all ranks' batches.
    Returns:
        (B, T, K) float32 (float64 for float64 input) assignments, each token's summing to ≈1.

    Example:
        >>> q = capi_sinkhorn(torch.randn(16, 196, 4096) / 0.06)
    """
    check_tensor("logits", logits, ndim=3)
    iterations = check_int("iterations", iterations)
    epsilon = check_positive("epsilon", epsilon, allow_zero=True)
    distributed_on = gather_distributed and distributed.is_distributed()
    u, v = _capi_scalings(logits.detach(), 1.0, iterations, epsilon, distributed_on)
    x = logits.detach().to(u.dtype)
    return _exp_(x - u[None] - v.T[:, :, None])


@outside_autocast
def capi_loss(
    teacher_logits: Tensor,
    student_logits: Tensor,
    teacher_index: Optional[Tensor] = None,
    teacher_temperature: float = 0.06,
    student_temperature: float = 0.12,
    sinkhorn_iterations: int = 3,
    *,
    gather_distributed: bool = False,
    backend: str = "auto",
) -> Tensor:
    r"""CAPI's clustering loss (Darcet et al. 2025, Sec. 3.2).

    Targets: position-wise Sinkhorn-Knopp of ``teacher_logits/τ_t`` (balanced over the batch at
    every token position, then normalized over the clusters; ε = 1e-8 in each denominator), taken
    at ``teacher_index`` when given; loss: the mean over predicted tokens of
    ``−q · log softmax(student/τ_s)``. No gradient reaches the teacher.

    Args:
        teacher_logits: (B, T, K) teacher cluster logits.
        student_logits: (B, P, K) student logits of the predicted tokens.
        teacher_index: optional int64 (B, P) positions of the predicted tokens among the T;
            without it T = P and tokens pair position by position.
        gather_distributed: Sinkhorn's batch sums over all ranks; the loss is then the global mean
            (each rank's gradient its own slice's, as fastssl's distributed contract asks).
    Returns:
        0-d float32 loss.

    Example:
        >>> t, s = torch.randn(16, 196, 4096), torch.randn(16, 49, 4096, requires_grad=True)
        >>> index = torch.randperm(196)[:49].expand(16, 49)
        >>> loss = capi_loss(t, s, index)
    """
    _check_capi_inputs(teacher_logits, student_logits, teacher_index)
    teacher_temperature = check_nonzero("teacher_temperature", teacher_temperature)
    student_temperature = check_nonzero("student_temperature", student_temperature)
    iterations = check_int("sinkhorn_iterations", sinkhorn_iterations)
    impl = resolve_backend(backend, student_logits, has_triton_kernel=False)
    if impl == "reference":
        loss = reference.capi_loss(
            teacher_logits, student_logits, teacher_index, teacher_temperature, student_temperature, iterations,
            gather_distributed=gather_distributed,
        ).float()  # fmt: skip
        return distributed.global_mean(loss) if gather_distributed else loss
    return _capi_torch(
        teacher_logits, student_logits, teacher_index, teacher_temperature, student_temperature, iterations,
        gather_distributed,
    )  # fmt: skip


class CAPILoss(nn.Module):
    """Drop-in for ``lightly.loss.CAPILoss`` (Darcet et al. 2025): position-wise Sinkhorn-Knopp
    targets from the teacher and a soft cross-entropy for the student (see :func:`capi_loss`).

    Args:
        teacher_temperature: divides the teacher logits before Sinkhorn-Knopp.
        student_temperature: divides the student logits in the cross-entropy.
        sinkhorn_iterations: Sinkhorn-Knopp iterations.
        gather_distributed: Sinkhorn's batch sums over all processes.
        backend: ``"auto" | "torch" | "reference" | "triton"`` (``"triton"`` runs the torch path
            for now).

    Forward ``(teacher_logits, student_logits, teacher_index=None)``: (B, T, K), (B, P, K) and
    optional int64 (B, P); returns a 0-d float32 loss. Under ``gather_distributed`` the value is
    the global mean over ranks (lightly returns the rank's own mean; the gradients agree).

    Example:
        >>> criterion = CAPILoss()
        >>> loss = criterion(teacher_logits, student_logits, teacher_index)
    """

    def __init__(
        self,
        teacher_temperature: float = 0.06,
        student_temperature: float = 0.12,
        sinkhorn_iterations: int = 3,
        gather_distributed: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_distributed_available("gather_distributed", gather_distributed)
        self.teacher_temperature = check_nonzero("teacher_temperature", teacher_temperature)
        self.student_temperature = check_nonzero("student_temperature", student_temperature)
        self.sinkhorn_iterations = check_int("sinkhorn_iterations", sinkhorn_iterations)
        self.gather_distributed = gather_distributed
        self.backend = check_backend_name(backend)

    def forward(
        self,
        teacher_logits: Tensor,
        student_logits: Tensor,
        teacher_index: Optional[Tensor] = None,
    ) -> Tensor:
        """CAPI: position-wise Sinkhorn targets from the teacher, cross-entropy of the student.

        Args:
            teacher_logits: (B, T, K) teacher cluster logits (no gradient).
            student_logits: (B, P, K) student logits of the predicted tokens.
            teacher_index: optional (B * P,) row-major indices of the predicted tokens among the
                B * T teacher tokens; without it P must equal T.

        Returns:
            0-d float32 loss.
        """
        return capi_loss(
            teacher_logits, student_logits, teacher_index, self.teacher_temperature, self.student_temperature,
            self.sinkhorn_iterations, gather_distributed=self.gather_distributed, backend=self.backend,
        )  # fmt: skip


# --------------------------------------------------------------------------------------------
# MSN and PMSN
# --------------------------------------------------------------------------------------------
#
# With â, t̂, p̂ the L2-normalized anchors (V·B, D), targets (B, D) and prototypes (K, D),
# log p = log_softmax(â p̂ᵀ/τ) for the anchors, and the targets' q = Sinkhorn(sharpen(softmax(
# t̂ p̂ᵀ/τ), T)) (no gradient), MSN's loss is
#
#     L = −1/(V B) Σ_i Σ_k q_{i mod B, k} log p_ik + λ R(m),   m = mean_i p_i,
#
# R(m) = Σ m log m + log K (mean-entropy maximisation) or KL(prior ‖ m) for PMSN. lightly writes
# the cross-entropy as log(p ** −q), which is +inf once p underflows to 0 with q > 0 and whose
# p ** −q overflows for log p < −88/q; here it is q · log_softmax, finite for all finite inputs.
# Sharpening softmax(z)^(1/T), renormalized, is softmax(z/T); Sinkhorn runs in the log domain
# (each of lightly's normalizations is a log-sum-exp subtraction; its constant factors cancel).
# The mean probabilities enter R through log m = LSE_i(log p_ik) − log(V B), accumulated chunk by
# chunk with a running column maximum, so R and its gradient stay finite where lightly's
# m ** −m meets m = 0.
#
# The backward, per chunk of anchors: with g the upstream gradient of the mean cross-entropy, h
# that of log m, N = V B, r_ik = p_ik/m_k = exp(log p_ik − log m_k) (≤ N) and s_i = Σ_k q_ik,
#
#     ∂L/∂z_ik = (g/N)(s_i p_ik − q_ik) + (1/N)(h_k r_ik − p_ik Σ_j h_j r_ij),
#
# then ∂L/∂â = (∂L/∂z) p̂/τ and ∂L/∂p̂ += (∂L/∂z)ᵀ â/τ; autograd takes the normalizations.


@torch.no_grad()
def _msn_targets(
    targets_n: Tensor, prototypes_n: Tensor, temperature: float, sharpen_temperature: float,
    iterations: int, distributed_on: bool,
) -> Tensor:
    """MSN's target distributions (B, K): sharpened prototype probabilities through Sinkhorn."""
    log_q = targets_n @ prototypes_n.T / (temperature * sharpen_temperature)
    log_q -= _logsumexp(log_q, dim=1, keepdim=True)
    for _ in range(iterations):
        # Prototypes (columns) over all targets of all ranks, then each target over prototypes.
        column = _logsumexp(log_q, dim=0, keepdim=True)
        if distributed_on:
            column = _all_reduce_logsumexp(column)
        log_q -= column
        log_q -= _logsumexp(log_q, dim=1, keepdim=True)
    return _exp_(log_q)


def _all_reduce_logsumexp(log_sums: Tensor) -> Tensor:
    """``log Σ_ranks exp(log_sums)`` elementwise (no gradient)."""
    shift = log_sums.clone()
    dist.all_reduce(shift, op=dist.ReduceOp.MAX)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    shifted = torch.exp(log_sums - shift)
    dist.all_reduce(shifted)
    return shift + shifted.log()


class _MSNCrossEntropy(torch.autograd.Function):
    """Chunked MSN cross-entropy of normalized anchors against fixed targets; returns the mean
    cross-entropy (0-d) and log m (K,), the log of the anchors' mean prototype probabilities."""

    @staticmethod
    def forward(ctx, anchors_n: Tensor, prototypes_n: Tensor, targets_q: Tensor, temperature: float):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        rows, _ = anchors_n.shape
        batch, k = targets_q.shape
        views = rows // batch
        dtype = anchors_n.dtype
        lse = torch.empty(rows, dtype=dtype, device=anchors_n.device)
        total = torch.zeros((), dtype=dtype, device=anchors_n.device)
        col_max = torch.full((k,), float("-inf"), dtype=dtype, device=anchors_n.device)
        col_sum = torch.zeros(k, dtype=dtype, device=anchors_n.device)
        chunk = _rows_per_chunk(k, anchors_n.device)
        scaled_prototypes = prototypes_n.T / temperature
        ctx.temperature = temperature
        ctx.kept = None
        if rows <= chunk:
            # Rule: when all V·B rows of logits fit in one chunk (the per-device element budget
            # above), one product for every view and the probabilities kept for the backward,
            # which then needs only the two gradient products; the chunked loop below recomputes
            # them (one more product) and pays off only where they would not fit. On a CPU at
            # MSN's V·B = 384, K = 1024 this is the reference's work: 4 products, not 13 smaller.
            # (log_softmax: one fused pass, and no slow exp underflow path.)
            log_p = torch.log_softmax(anchors_n @ scaled_prototypes, dim=1)
            total = -torch.linalg.vecdot(targets_q, log_p.view(views, batch, k), dim=-1).sum()
            if 2.0 / temperature + math.log(k) < -_EXP_FLOOR[torch.float32] - 7.0:
                # Unit rows give |logits| ≤ 1/τ, so log p ≥ −(2/τ + log K) > −80: no p underflows,
                # m = mean p is exact and r = p/m finite; p itself is kept.
                ctx.kept = "p"
                kept = log_p.exp_()
                log_mean = (kept.sum(dim=0) / rows).log_()
            else:  # p may underflow: log m from the log domain, log p kept
                ctx.kept = "log_p"
                kept = log_p
                log_mean = _logsumexp(log_p, dim=0) - math.log(rows)
            ctx.save_for_backward(anchors_n, prototypes_n, targets_q, kept, log_mean)
            return total / rows, log_mean
        for view in range(views):
            for b0 in range(0, batch, chunk):
                b1 = min(b0 + chunk, batch)
                start, stop = view * batch + b0, view * batch + b1
                log_p = anchors_n[start:stop] @ scaled_prototypes
                row_lse = _logsumexp(log_p, dim=1)
                lse[start:stop] = row_lse
                log_p -= row_lse[:, None]
                total -= torch.linalg.vecdot(targets_q[b0:b1], log_p, dim=1).sum()
                # Running column log-sum-exp of log p (for log m).
                new_max = torch.maximum(col_max, log_p.amax(dim=0))
                col_sum = col_sum * _exp_(col_max - new_max) + _exp_(log_p - new_max).sum(dim=0)
                col_max = new_max
        log_mean = col_max + col_sum.log() - math.log(rows)
        ctx.save_for_backward(anchors_n, prototypes_n, targets_q, lse, log_mean)
        return total / rows, log_mean

    @staticmethod
    def backward(ctx, grad_ce: Optional[Tensor], grad_log_mean: Optional[Tensor]):  # type: ignore[override]
        anchors_n, prototypes_n, targets_q, lse, log_mean = ctx.saved_tensors  # lse: p or log p if kept
        if grad_ce is None and grad_log_mean is None:
            return None, None, None, None
        rows, _ = anchors_n.shape
        batch, k = targets_q.shape
        views = rows // batch
        dtype = anchors_n.dtype
        tau = ctx.temperature
        g = (grad_ce.to(dtype) if grad_ce is not None else torch.zeros((), dtype=dtype, device=anchors_n.device)) / rows
        target_mass = targets_q.sum(dim=1)
        if ctx.kept is not None:  # all rows in one chunk: the same formula, unchunked
            # dz·τ = p (g s_i − Σ_j h_j r_ij / N) + h r / N − g q, r = p/m: a few passes over (V·B, K).
            h = grad_log_mean.to(dtype) / rows if grad_log_mean is not None else None
            if ctx.kept == "p":
                p = lse
                hr = p * (h * torch.exp(-log_mean)) if h is not None else None
            else:
                p = _exp_(lse.clone())
                hr = _exp_(lse - log_mean).mul_(h) if h is not None else None
            row_coefficient = (g * target_mass).repeat(views)
            if hr is not None:
                dz = hr
                row_coefficient = row_coefficient - dz.sum(dim=1)
                dz.addcmul_(p, row_coefficient[:, None])
            else:
                dz = p * row_coefficient[:, None]
            dz.view(views, batch, k).sub_(g * targets_q)
            grad_anchors = (dz @ prototypes_n).div_(tau) if ctx.needs_input_grad[0] else None
            grad_prototypes = (dz.T @ anchors_n).div_(tau) if ctx.needs_input_grad[1] else None
            return grad_anchors, grad_prototypes, None, None
        grad_anchors = torch.empty_like(anchors_n) if ctx.needs_input_grad[0] else None
        grad_prototypes = torch.zeros_like(prototypes_n) if ctx.needs_input_grad[1] else None
        scaled_prototypes = prototypes_n.T / tau
        chunk = _rows_per_chunk(k, anchors_n.device)
        for view in range(views):
            for b0 in range(0, batch, chunk):
                b1 = min(b0 + chunk, batch)
                start, stop = view * batch + b0, view * batch + b1
                a = anchors_n[start:stop]
                log_p = a @ scaled_prototypes
                log_p -= lse[start:stop, None]
                p = _exp_(log_p.clone())
                # Cross-entropy part: (g)(s_i p − q).
                dz = p * (g * target_mass[b0:b1])[:, None] - g * targets_q[b0:b1]
                if grad_log_mean is not None:
                    h = grad_log_mean.to(dtype)
                    r = _exp_(log_p - log_mean)
                    rh = r * h
                    dz += rh / rows
                    dz -= p * (rh.sum(dim=1) / rows)[:, None]
                dz /= tau
                if grad_anchors is not None:
                    grad_anchors[start:stop] = dz @ prototypes_n
                if grad_prototypes is not None:
                    grad_prototypes += dz.T @ a
        return grad_anchors, grad_prototypes, None, None


def _check_msn_inputs(anchors: Tensor, targets: Tensor, prototypes: Tensor) -> int:
    """Validate MSN's inputs; returns the number of anchor views V."""
    check_tensor("anchors", anchors)
    check_tensor("targets", targets)
    check_tensor("prototypes", prototypes)
    if not anchors.shape[1] == targets.shape[1] == prototypes.shape[1]:
        raise BatchShapeError(
            f"anchors, targets and prototypes must have the same dim, got shapes {tuple(anchors.shape)}, "
            f"{tuple(targets.shape)} and {tuple(prototypes.shape)}"
        )
    if anchors.shape[0] % targets.shape[0] != 0:
        raise BatchShapeError(
            f"anchors must hold anchor_views × batch_size rows for targets of batch_size {targets.shape[0]}, "
            f"got {anchors.shape[0]} rows"
        )
    if not anchors.device == targets.device == prototypes.device:
        raise ValueError("anchors, targets and prototypes must be on the same device")
    return anchors.shape[0] // targets.shape[0]


def _global_log_mean(log_mean: Tensor) -> Tensor:
    """log of the mean anchor probabilities over all ranks' anchors, with this rank's gradient
    scaled as the distributed contract asks: value LSE_r(log m_r) − log W, gradient to log m_r
    ``W · (1/W) exp(log m_r − log m)`` = ``m_r / m`` times the incoming one."""
    with torch.no_grad():
        global_log_mean = _all_reduce_logsumexp(log_mean.detach()) - math.log(distributed.world_size())
        ratio = torch.exp(log_mean.detach() - global_log_mean)
    return global_log_mean + ratio * (log_mean - log_mean.detach())


def _global_mean_probs(mean_probs: Tensor) -> Tensor:
    """The mean anchor probabilities over all ranks, this rank's gradient passed through
    unchanged (= W × its 1/W share, the distributed contract)."""
    with torch.no_grad():
        global_mean = mean_probs.detach().clone()
        dist.all_reduce(global_mean)
        global_mean /= distributed.world_size()
    return mean_probs + (global_mean - mean_probs.detach())


def _msn_parts(
    anchors: Tensor,
    targets: Tensor,
    prototypes: Tensor,
    temperature: float,
    sinkhorn_iterations: int,
    target_sharpen_temperature: float,
    gather_distributed: bool,
) -> Tuple[Tensor, Tensor]:
    """Mean cross-entropy (0-d, reported as the global mean under gather) and log of the mean
    anchor probabilities (K,) of the torch path."""
    distributed_on = gather_distributed and distributed.is_distributed()
    dtype = _compute_dtype(anchors)
    anchors_n = F.normalize(anchors.to(dtype), dim=1)
    prototypes_n = F.normalize(prototypes.to(dtype), dim=1)
    with torch.no_grad():
        targets_n = F.normalize(targets.detach().to(dtype), dim=1)
        targets_q = _msn_targets(
            targets_n, prototypes_n.detach(), temperature, target_sharpen_temperature, sinkhorn_iterations,
            distributed_on,
        )  # fmt: skip
    ce, log_mean = _MSNCrossEntropy.apply(anchors_n, prototypes_n, targets_q, temperature)
    if distributed_on:
        ce = distributed.global_mean(ce)
        log_mean = _global_log_mean(log_mean)
    return ce, log_mean


def mean_entropy_regularization(log_mean_probs: Tensor) -> Tensor:
    """MSN's me-max term ``Σ m log m + log K`` (= log K − H(m)) from log m; finite for m → 0."""
    mean_probs = log_mean_probs.exp()
    return (mean_probs * log_mean_probs).sum() + math.log(log_mean_probs.shape[0])


def prior_kl_regularization(log_mean_probs: Tensor, prior: Tensor) -> Tensor:
    """PMSN's ``KL(prior ‖ m) = Σ prior (log prior − log m)`` (``F.kl_div(log m, prior, "sum")``)."""
    prior = prior.to(device=log_mean_probs.device, dtype=log_mean_probs.dtype)
    return F.kl_div(log_mean_probs, prior, reduction="sum")


def power_law_distribution(size: int, exponent: float, device: Optional[torch.device] = None) -> Tensor:
    """PMSN's power-law prior, entry k ∝ k^−exponent for k = 1..size, summing to 1 (float32)."""
    k = torch.arange(1, size + 1, dtype=torch.float64, device=device)
    power = k ** (-exponent)
    return (power / power.sum()).float()


def _prior_regularization(prior: Prior) -> Callable[[Tensor], Tensor]:
    """R(log m) for a prior: None → mean entropy, a tensor → KL(prior ‖ m), a callable of m →
    KL(prior(m) ‖ m)."""
    if prior is None:
        return mean_entropy_regularization
    if isinstance(prior, Tensor):
        return lambda log_mean: prior_kl_regularization(log_mean, prior)
    if callable(prior):
        return lambda log_mean: prior_kl_regularization(log_mean, prior(log_mean.exp()))
    raise TypeError(f"prior must be None, a tensor or a callable, got {type(prior).__name__}")


def _check_msn_hyperparameters(temperature, sinkhorn_iterations, regularization_weight, target_sharpen_temperature):
    temperature = check_positive("temperature", temperature)
    sinkhorn_iterations = check_int("sinkhorn_iterations", sinkhorn_iterations)
    regularization_weight = check_finite("regularization_weight", regularization_weight)
    target_sharpen_temperature = check_positive("target_sharpen_temperature", target_sharpen_temperature)
    return temperature, sinkhorn_iterations, regularization_weight, target_sharpen_temperature


@outside_autocast
def _msn_with_regularization(
    anchors: Tensor,
    targets: Tensor,
    prototypes: Tensor,
    temperature: float,
    sinkhorn_iterations: int,
    regularization_weight: float,
    target_sharpen_temperature: float,
    log_regularization: Callable[[Tensor], Tensor],
    probability_regularization: Callable[[Tensor], Tensor],
    gather_distributed: bool,
    backend: str,
) -> Tensor:
    """Shared body of :func:`msn_loss` and the modules: the torch path regularizes from log m,
    the reference from m (lightly's formulas)."""
    impl = resolve_backend(backend, anchors, has_triton_kernel=False)
    if impl == "reference":
        ce, mean_probs = reference.msn_cross_entropy_and_mean_probs(
            anchors, targets, prototypes, temperature, sinkhorn_iterations, target_sharpen_temperature,
            gather_distributed,
        )  # fmt: skip
        if gather_distributed and distributed.is_distributed():
            ce = distributed.global_mean(ce)
            mean_probs = _global_mean_probs(mean_probs)
        if regularization_weight > 0:
            ce = ce + regularization_weight * probability_regularization(mean_probs)
        return ce.float()
    ce, log_mean = _msn_parts(
        anchors, targets, prototypes, temperature, sinkhorn_iterations, target_sharpen_temperature, gather_distributed
    )
    if regularization_weight > 0:
        ce = ce + regularization_weight * log_regularization(log_mean)
    return ce.float()


@outside_autocast
def msn_loss(
    anchors: Tensor,
    targets: Tensor,
    prototypes: Tensor,
    temperature: float = 0.1,
    sinkhorn_iterations: int = 3,
    regularization_weight: float = 1.0,
    target_sharpen_temperature: float = 0.25,
    *,
    prior: Prior = None,
    gather_distributed: bool = False,
    backend: str = "auto",
) -> Tensor:
    r"""MSN's loss (Assran et al. 2022, Eq. 2–4), or PMSN's (Assran et al. 2023) with a prior.

    Cross-entropy of the anchors' cosine-to-prototype probabilities ``softmax(â p̂ᵀ/τ)`` to the
    targets' sharpened (``T = target_sharpen_temperature``), Sinkhorn-balanced probabilities (no
    gradient), averaged over the V·B anchors (anchor view v, image b is row v·B + b); plus
    ``regularization_weight`` × the mean-entropy term ``Σ m log m + log K`` of the mean anchor
    probabilities m (with ``prior``: ``KL(prior ‖ m)``) when the weight is positive.

    Args:
        anchors: (V·B, D) anchor embeddings (view-major).
        targets: (B, D) target embeddings (no gradient flows to them).
        prototypes: (K, D) prototypes.
        prior: None (MSN), a (K,) tensor, or a callable taking m and returning the prior (PMSN).
        gather_distributed: Sinkhorn over all ranks' targets and m over all ranks' anchors, as
            MSN's own code does (lightly all-reduces the Sinkhorn sums only).
    Returns:
        0-d float32 loss.

    Example:
        >>> anchors, targets = torch.randn(4 * 32, 256, requires_grad=True), torch.randn(32, 256)
        >>> prototypes = torch.randn(1024, 256, requires_grad=True)
        >>> loss = msn_loss(anchors, targets, prototypes)
    """
    _check_msn_inputs(anchors, targets, prototypes)
    temperature, sinkhorn_iterations, regularization_weight, target_sharpen_temperature = _check_msn_hyperparameters(
        temperature, sinkhorn_iterations, regularization_weight, target_sharpen_temperature
    )
    log_regularization = _prior_regularization(prior)
    if prior is None:
        probability_regularization = reference.mean_entropy_regularization
    elif isinstance(prior, Tensor):
        probability_regularization = lambda m: reference.prior_kl_regularization(m, prior)  # noqa: E731
    else:
        probability_regularization = lambda m: reference.prior_kl_regularization(m, prior(m))  # noqa: E731
    return _msn_with_regularization(
        anchors, targets, prototypes, temperature, sinkhorn_iterations, regularization_weight,
        target_sharpen_temperature, log_regularization, probability_regularization, gather_distributed, backend,
    )  # fmt: skip


def pmsn_loss(
    anchors: Tensor,
    targets: Tensor,
    prototypes: Tensor,
    temperature: float = 0.1,
    sinkhorn_iterations: int = 3,
    regularization_weight: float = 1.0,
    power_law_exponent: float = 0.25,
    target_sharpen_temperature: float = 0.25,
    *,
    gather_distributed: bool = False,
    backend: str = "auto",
) -> Tensor:
    """PMSN (Assran et al. 2023): :func:`msn_loss` with ``KL(power law ‖ m)``, the power law
    ∝ k^−``power_law_exponent`` over the K prototypes.

    Example:
        >>> loss = pmsn_loss(anchors, targets, prototypes, power_law_exponent=0.25)
    """
    check_tensor("prototypes", prototypes)
    exponent = check_finite("power_law_exponent", power_law_exponent)
    prior = power_law_distribution(prototypes.shape[0], exponent, prototypes.device)
    return msn_loss(
        anchors, targets, prototypes, temperature, sinkhorn_iterations, regularization_weight,
        target_sharpen_temperature, prior=prior, gather_distributed=gather_distributed, backend=backend,
    )  # fmt: skip


class MSNLoss(nn.Module):
    """Drop-in for ``lightly.loss.MSNLoss`` (Assran et al. 2022; see :func:`msn_loss`).

    Args:
        temperature: similarities are divided by it; must be > 0.
        sinkhorn_iterations: Sinkhorn iterations on the targets (>= 0).
        regularization_weight: weight λ of the regularizer (<= 0 disables it).
        gather_distributed: Sinkhorn over all ranks' targets and the regularizer over all ranks'
            anchors (lightly: Sinkhorn only; MSN's code averages the anchor probabilities over
            ranks too). The reported loss is the global one.
        backend: ``"auto" | "torch" | "reference" | "triton"`` (``"triton"`` runs the torch path
            for now).

    Forward ``(anchors, targets, prototypes, target_sharpen_temperature=0.25)``: (V·B, D), (B, D),
    (K, D); returns a 0-d float32 loss. ``regularization_loss(mean_anchor_probs)`` is lightly's
    public method; a subclass that overrides it is honoured (called with m).

    Example:
        >>> criterion = MSNLoss()
        >>> loss = criterion(anchors_out, targets_out, prototypes=model.prototypes.weight)
    """

    def __init__(
        self,
        temperature: float = 0.1,
        sinkhorn_iterations: int = 3,
        regularization_weight: float = 1.0,
        gather_distributed: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if check_finite("temperature", temperature) <= 0:
            raise ValueError(f"temperature must be in (0, inf) but is {temperature}.")
        if check_int("sinkhorn_iterations", sinkhorn_iterations, minimum=-(2**62)) < 0:
            raise ValueError(f"sinkhorn_iterations must be >= 0 but is {sinkhorn_iterations}.")
        check_distributed_available("gather_distributed", gather_distributed)
        self.temperature = temperature
        self.sinkhorn_iterations = sinkhorn_iterations
        self.regularization_weight = check_finite("regularization_weight", regularization_weight)
        self.gather_distributed = gather_distributed
        self.backend = check_backend_name(backend)

    def forward(
        self,
        anchors: Tensor,
        targets: Tensor,
        prototypes: Tensor,
        target_sharpen_temperature: float = 0.25,
    ) -> Tensor:
        """MSN (and PMSN) loss of anchor and target views against prototypes.

        Args:
            anchors: (B * V, D) anchor-view embeddings (V anchor views per image).
            targets: (B, D) target-view embeddings (no gradient flows to them).
            prototypes: (K, D) prototypes.
            target_sharpen_temperature: temperature sharpening the target probabilities.

        Returns:
            0-d float32 loss: cross-entropy plus the regularizer weighted by
            ``regularization_weight``.
        """
        _check_msn_inputs(anchors, targets, prototypes)
        temperature, iterations, weight, sharpen = _check_msn_hyperparameters(
            self.temperature, self.sinkhorn_iterations, self.regularization_weight, target_sharpen_temperature
        )
        log_regularization = _LOG_DOMAIN_REGULARIZERS.get(type(self).regularization_loss)
        if log_regularization is None:  # a subclass's own regularizer, called with m
            own = self.regularization_loss

            def log_regularization(log_mean: Tensor) -> Tensor:
                return own(log_mean.exp())
        else:
            log_regularization = log_regularization.__get__(self)
        return _msn_with_regularization(
            anchors, targets, prototypes, temperature, iterations, weight, sharpen, log_regularization,
            self.regularization_loss, self.gather_distributed, self.backend,
        )  # fmt: skip

    def regularization_loss(self, mean_anchor_probs: Tensor) -> Tensor:
        """Mean-entropy regularizer ``Σ m log m + log K`` of the mean anchor probabilities m (K,)."""
        return reference.mean_entropy_regularization(mean_anchor_probs)

    def _log_regularization(self, log_mean: Tensor) -> Tensor:
        return mean_entropy_regularization(log_mean)


class PMSNLoss(MSNLoss):
    """Drop-in for ``lightly.loss.PMSNLoss`` (Assran et al. 2023): MSN with the regularizer
    ``KL(power law ‖ m)``, the power law ∝ k^−``power_law_exponent`` (see :func:`pmsn_loss`).

    Example:
        >>> criterion = PMSNLoss(power_law_exponent=0.25)
        >>> loss = criterion(anchors_out, targets_out, prototypes=model.prototypes.weight)
    """

    def __init__(
        self,
        temperature: float = 0.1,
        sinkhorn_iterations: int = 3,
        regularization_weight: float = 1,
        power_law_exponent: float = 0.25,
        gather_distributed: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            temperature=temperature,
            sinkhorn_iterations=sinkhorn_iterations,
            regularization_weight=regularization_weight,
            gather_distributed=gather_distributed,
            backend=backend,
        )
        self.power_law_exponent = check_finite("power_law_exponent", power_law_exponent)

    def regularization_loss(self, mean_anchor_probs: Tensor) -> Tensor:
        """``KL(power law ‖ m)`` for the mean anchor probabilities m (K,)."""
        prior = power_law_distribution(mean_anchor_probs.shape[0], self.power_law_exponent, mean_anchor_probs.device)
        return reference.prior_kl_regularization(mean_anchor_probs, prior)

    def _log_regularization(self, log_mean: Tensor) -> Tensor:
        prior = power_law_distribution(log_mean.shape[0], self.power_law_exponent, log_mean.device)
        return prior_kl_regularization(log_mean, prior)


class PMSNCustomLoss(MSNLoss):
    """Drop-in for ``lightly.loss.PMSNCustomLoss`` (Assran et al. 2023): MSN with the regularizer
    ``KL(target_distribution(m) ‖ m)`` for a user prior.

    Args:
        target_distribution: callable taking the mean anchor probabilities m (K,) and returning
            a distribution of the same shape.

    Example:
        >>> uniform = lambda m: m.new_ones(m.shape[0]) / m.shape[0]
        >>> criterion = PMSNCustomLoss(target_distribution=uniform)
        >>> loss = criterion(anchors_out, targets_out, prototypes=model.prototypes.weight)
    """

    def __init__(
        self,
        target_distribution: Callable[[Tensor], Tensor],
        temperature: float = 0.1,
        sinkhorn_iterations: int = 3,
        regularization_weight: float = 1,
        gather_distributed: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            temperature=temperature,
            sinkhorn_iterations=sinkhorn_iterations,
            regularization_weight=regularization_weight,
            gather_distributed=gather_distributed,
            backend=backend,
        )
        self.target_distribution = target_distribution

    def regularization_loss(self, mean_anchor_probs: Tensor) -> Tensor:
        """``KL(target_distribution(m) ‖ m)`` for the mean anchor probabilities m (K,)."""
        return reference.prior_kl_regularization(mean_anchor_probs, self.target_distribution(mean_anchor_probs))

    def _log_regularization(self, log_mean: Tensor) -> Tensor:
        return prior_kl_regularization(log_mean, self.target_distribution(log_mean.exp()))


# Each class's own regularization_loss -> its log-domain twin (a subclass overriding
# regularization_loss gets its override called instead).
_LOG_DOMAIN_REGULARIZERS = {
    MSNLoss.regularization_loss: MSNLoss._log_regularization,
    PMSNLoss.regularization_loss: PMSNLoss._log_regularization,
    PMSNCustomLoss.regularization_loss: PMSNCustomLoss._log_regularization,
}
