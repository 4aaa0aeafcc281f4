r"""DINO: the centered, sharpened teacher-to-student cross-entropy; functional API, optimized
PyTorch path and the drop-in :class:`DINOLoss`. The Triton kernels live in
:mod:`fastssl.kernels.dino`.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastssl import reference
from fastssl._backend import check_backend_name, outside_autocast, resolve_backend, triton_with_fallback
from fastssl._checks import check_int, check_nonzero, check_probability, check_tensor_list

# --------------------------------------------------------------------------------------------
# Optimized PyTorch path
# --------------------------------------------------------------------------------------------
#
# With P_t = softmax((t − c)/τ_t) for the T teacher views and log P_s = log_softmax(s/τ_s) for the
# S student views, DINO sums −P_t·log P_s over all pairs except (v, v), v < min(T, S). Grouped by
# student view s, the teachers it is compared with sum to
#
#     Q_s = Σ_t P_t − [s < T] P_s,        L = −1/(n B) Σ_s Σ_{b,k} Q_s[b, k] log P_s[b, k],
#
# n = T·S − min(T, S): O(T + S) products instead of O(T·S), and every term is a non-negative
# weight times a log-probability (nothing large cancels). Since each P_t sums to 1 over k,
# Σ_k Q_s = T − [s < T] =: m_s, and
#
#     ∂L/∂s[b, :] = (m_s · softmax(s[b]/τ_s) − Q_s[b]) / (τ_s n B).
#
# The batch is processed in chunks of rows, so the (views, B, K) probability tensors are never
# materialized (K = 65536 in DINO); the gradient is written chunk by chunk in the forward and
# only scaled in the backward. Teacher column sums (the center's batch mean) come out of the same
# pass.

# fp32 elements of one (rows, K) temporary per chunk: 2**21 is 8 MiB.
_CHUNK_ELEMENTS = 1 << 21


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _DinoTorchFunction(torch.autograd.Function):
    """Chunked DINO loss; inputs ``(center, teacher_temp, student_temp, n_teacher, *views)`` with
    the T teacher views first. Returns the 0-d loss and the (K,) column sums of the teacher views
    (non-differentiable)."""

    @staticmethod
    def forward(ctx, center, teacher_temp, student_temp, n_teacher, *views):  # type: ignore[override]
        teachers = [t.detach() for t in views[:n_teacher]]
        students = [s.detach() for s in views[n_teacher:]]
        n_student = len(students)
        batch, k = students[0].shape
        dtype = _compute_dtype(students[0])
        n_terms = n_teacher * n_student - min(n_teacher, n_student)
        need_grad = any(ctx.needs_input_grad[4 + n_teacher :])
        center = center.detach().reshape(1, k).to(dtype)
        grads = [torch.empty(s.shape, dtype=s.dtype, device=s.device) for s in students] if need_grad else []
        grad_scale = 1.0 / (student_temp * n_terms * batch)
        chunk = max(1, _CHUNK_ELEMENTS // k)
        total = torch.zeros((), dtype=dtype, device=students[0].device)
        teacher_colsum = torch.zeros(k, dtype=dtype, device=students[0].device)
        for start in range(0, batch, chunk):
            stop = min(start + chunk, batch)
            probs = []
            for t in teachers:
                rows = t[start:stop].to(dtype)
                teacher_colsum += rows.sum(dim=0)
                probs.append(torch.softmax((rows - center) / teacher_temp, dim=1))
            prob_sum = probs[0]
            for p in probs[1:]:
                prob_sum = prob_sum + p
            for v, s in enumerate(students):
                log_p = torch.log_softmax(s[start:stop].to(dtype) / student_temp, dim=1)
                target = prob_sum - probs[v] if v < n_teacher else prob_sum
                total = total - (target * log_p).sum()
                if need_grad:
                    matches = n_teacher - 1 if v < n_teacher else n_teacher
                    grads[v][start:stop] = (matches * torch.exp(log_p) - target) * grad_scale
        ctx.save_for_backward(*grads)
        ctx.n_teacher = n_teacher
        ctx.need_grad = need_grad
        loss = (total / (n_terms * batch)).float()
        teacher_colsum = teacher_colsum.float()
        ctx.mark_non_differentiable(teacher_colsum)
        return loss, teacher_colsum

    @staticmethod
    def backward(ctx, grad_loss, _grad_colsum):  # type: ignore[override]
        student_grads = [g * grad_loss.to(g.dtype) for g in ctx.saved_tensors] if ctx.need_grad else []
        n_student = len(ctx.needs_input_grad) - 4 - ctx.n_teacher
        if not student_grads:
            student_grads = [None] * n_student
        return (None, None, None, None, *([None] * ctx.n_teacher), *student_grads)


def _dino_torch_with_colsum(
    teacher: Sequence[Tensor], student: Sequence[Tensor], center: Tensor, teacher_temp: float, student_temp: float
) -> Tuple[Tensor, Tensor]:
    """Loss (0-d float32) and the (K,) float32 sum of the teacher outputs over views and batch."""
    # The teacher gets no gradient; detaching also gives the Function distinct inputs when the
    # same tensor is passed as a teacher and a student view (which torch.compile requires).
    teacher = [t.detach() for t in teacher]
    return _DinoTorchFunction.apply(center, teacher_temp, student_temp, len(teacher), *teacher, *student)


def _dino_torch(
    teacher: Sequence[Tensor], student: Sequence[Tensor], center: Tensor, teacher_temp: float, student_temp: float
) -> Tensor:
    return _dino_torch_with_colsum(teacher, student, center, teacher_temp, student_temp)[0]


# --------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------


def _check_views(teacher_out: Sequence[Tensor], student_out: Sequence[Tensor], center: Optional[Tensor]) -> None:
    teacher = check_tensor_list("teacher_out", teacher_out, same_shape=True)
    student = check_tensor_list("student_out", student_out, same_shape=True)
    if teacher[0].shape != student[0].shape:
        raise ValueError(
            f"teacher_out and student_out views must have the same shape (batch_size, output_dim), "
            f"got {tuple(teacher[0].shape)} and {tuple(student[0].shape)}"
        )
    same_view_pairs = min(len(teacher), len(student))
    if len(teacher) * len(student) - same_view_pairs == 0:
        raise ValueError(
            "DINO needs at least two views in all: the pair of a teacher and a student view with the "
            f"same index is excluded, and {len(teacher)} teacher and {len(student)} student view(s) "
            "leave no other pair"
        )
    if center is not None and center.numel() != teacher[0].shape[1]:
        raise ValueError(
            f"center must have output_dim={teacher[0].shape[1]} entries, got shape {tuple(center.shape)}"
        )


@outside_autocast
def dino_loss(
    teacher_out: Sequence[Tensor],
    student_out: Sequence[Tensor],
    center: Optional[Tensor] = None,
    teacher_temp: float = 0.04,
    student_temp: float = 0.1,
    *,
    backend: str = "auto",
) -> Tensor:
    r"""DINO's cross-entropy (see :func:`fastssl.reference.dino_loss`). The center is not updated.

    Args:
        teacher_out: list of T tensors (B, K); no gradient flows to them.
        student_out: list of S tensors (B, K).
        center: (K,) or (1, 1, K) teacher center; zeros when None.
    Returns:
        0-d float32 loss.
    """
    _check_views(teacher_out, student_out, center)
    teacher_temp = check_nonzero("teacher_temp", teacher_temp)
    student_temp = check_nonzero("student_temp", student_temp)
    if center is None:
        center = teacher_out[0].new_zeros(teacher_out[0].shape[1])
    return _dino_dispatch(teacher_out, student_out, center, teacher_temp, student_temp, backend)[0]


def _dino_dispatch(
    teacher_out: Sequence[Tensor],
    student_out: Sequence[Tensor],
    center: Tensor,
    teacher_temp: float,
    student_temp: float,
    backend: str,
    center_momentum: Optional[float] = None,
) -> Tuple[Tensor, Tensor]:
    """The loss and, without ``center_momentum``, the (K,) float32 sum of the teacher outputs
    over views and batch; with it, the new center ``m·c + (1−m)·mean`` (see :func:`_center_ema`).
    The optimized backends take the teacher sum from the pass that reads the teacher for the
    loss; the Triton path also does the EMA there when no process group averages the mean."""
    impl = resolve_backend(backend, teacher_out[0])
    n_teacher_rows = len(teacher_out) * teacher_out[0].shape[0]

    def with_center(loss: Tensor, teacher_sum: Tensor) -> Tuple[Tensor, Tensor]:
        if center_momentum is None:
            return loss, teacher_sum
        return loss, _center_ema(center, teacher_sum / n_teacher_rows, center_momentum)

    def run_torch() -> Tuple[Tensor, Tensor]:
        return with_center(*_dino_torch_with_colsum(teacher_out, student_out, center, teacher_temp, student_temp))

    if impl == "reference":
        loss = reference.dino_loss(teacher_out, student_out, center, teacher_temp, student_temp).float()
        with torch.no_grad():
            teacher_sum = torch.stack([t.detach().float() for t in teacher_out]).sum(dim=(0, 1))
        return with_center(loss, teacher_sum)
    if impl == "triton":

        def run_triton() -> Tuple[Tensor, Tensor]:
            from fastssl.kernels import dino as kernels

            fused_ema = center_momentum is not None and not _process_group()
            mode = kernels.CENTER_EMA if fused_ema else kernels.CENTER_TEACHER_SUM
            loss, center_out = kernels.dino_loss_triton(
                teacher_out, student_out, center, teacher_temp, student_temp,
                center_momentum=center_momentum or 0.0, center_mode=mode,
            )  # fmt: skip
            return (loss, center_out) if fused_ema else with_center(loss, center_out)

        return triton_with_fallback("dino", backend, run_triton, run_torch)
    return run_torch()


def _process_group() -> bool:
    return dist.is_available() and dist.is_initialized()


@torch.no_grad()
def _center_ema(center: Tensor, batch_center: Tensor, momentum: float) -> Tensor:
    """``m·c + (1−m)·batch_center``, the batch center first averaged over ranks when a process
    group is initialized (lightly's ``center_mean`` does the same, whatever the flags)."""
    batch_center = batch_center.float()
    if _process_group():
        dist.all_reduce(batch_center)
        batch_center = batch_center / dist.get_world_size()
    # Broadcast, as lightly: a (K,) batch center updates a (1, 1, K) center.
    return center * momentum + batch_center.to(center.dtype) * (1 - momentum)


@torch.no_grad()
def dino_center_update(center: Tensor, teacher_out: Sequence[Tensor], momentum: float = 0.9) -> Tensor:
    r"""New center :math:`m\,c + (1-m)\,\bar t`, with :math:`\bar t` the mean teacher output over
    views and batch -- and over ranks when a process group is initialized, as lightly does."""
    batch_center = torch.stack([t.detach().float() for t in teacher_out]).mean(dim=(0, 1))
    return _center_ema(center, batch_center, momentum)


# --------------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------------


class DINOLoss(nn.Module):
    """Drop-in for ``lightly.loss.DINOLoss`` (teacher-temperature warm-up, center EMA).

    Args:
        output_dim: number of prototypes K (size of the center buffer).
        warmup_teacher_temp: teacher temperature at epoch 0 of the warm-up.
        teacher_temp: teacher temperature after the warm-up.
        warmup_teacher_temp_epochs: length of the linear warm-up, in epochs.
        student_temp: student temperature.
        center_momentum: EMA momentum of the center.
        center_mode: only ``"mean"`` (as lightly).
        backend: ``"auto" | "triton" | "torch" | "reference"`` (env ``FASTSSL_BACKEND``).

    Forward ``(teacher_out, student_out, teacher_temp=None, epoch=None)``: lists of (B, K)
    tensors; returns a 0-d float32 loss and updates ``center`` (shape (1, 1, K)).
    """

    center: Tensor

    def __init__(
        self,
        output_dim: int = 65536,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 30,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        center_mode: str = "mean",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_int("output_dim", output_dim, minimum=1)
        self.teacher_temp = check_nonzero("teacher_temp", teacher_temp)
        self.student_temp = check_nonzero("student_temp", student_temp)
        check_nonzero("warmup_teacher_temp", warmup_teacher_temp)
        self.warmup_teacher_temp_epochs = check_int("warmup_teacher_temp_epochs", warmup_teacher_temp_epochs)
        self.center_momentum = check_probability("center_momentum", center_momentum)
        if center_mode != "mean":
            raise ValueError(f"Unknown mode '{center_mode}'. Valid modes are ['mean'].")
        self.backend = check_backend_name(backend)
        self.register_buffer("center", torch.zeros(1, 1, output_dim))
        self.teacher_temp_schedule = torch.linspace(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs
        )
        # The same float32 values as Python floats: looking one up needs no tensor read (which
        # would break a torch.compile graph).
        self._teacher_temp_values = self.teacher_temp_schedule.tolist()

    def _teacher_temperature(self, teacher_temp: Optional[float], epoch: Optional[int]) -> float:
        if teacher_temp is not None:
            return check_nonzero("teacher_temp", teacher_temp)
        if epoch is not None and epoch < self.warmup_teacher_temp_epochs:
            return self._teacher_temp_values[epoch]
        return self.teacher_temp

    def forward(
        self,
        teacher_out: List[Tensor],
        student_out: List[Tensor],
        teacher_temp: Optional[float] = None,
        epoch: Optional[int] = None,
    ) -> Tensor:
        _check_views(teacher_out, student_out, self.center)
        loss, new_center = _dino_dispatch(
            teacher_out,
            student_out,
            self.center,
            self._teacher_temperature(teacher_temp, epoch),
            self.student_temp,
            self.backend,
            center_momentum=self.center_momentum,
        )
        # In place, like lightly's ``center.data = ...``: references to the buffer stay valid.
        with torch.no_grad():
            self.center.copy_(new_center.reshape(self.center.shape))
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: Tensor) -> None:
        """lightly's public EMA step: ``center ← m·center + (1−m)·teacher_out.mean(dim=(0, 1))``
        (kept dims, broadcast to the center; averaged over ranks when a process group is
        initialized). ``teacher_out`` is the stacked (views, B, K) teacher output; as in lightly,
        a 2-D tensor is averaged over both of its dimensions."""
        batch_center = teacher_out.detach().float().mean(dim=(0, 1), keepdim=True)
        self.center.copy_(_center_ema(self.center, batch_center, self.center_momentum))
