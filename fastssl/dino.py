r"""DINO: the centered, sharpened teacher-to-student cross-entropy; functional API, optimized
PyTorch path and the drop-in :class:`DINOLoss`. The Triton kernels live in
:mod:`fastssl.kernels.dino`.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastssl import reference
from fastssl._backend import check_backend_name, resolve_backend
from fastssl._checks import check_int, check_nonzero, check_probability, check_tensor_list

# --------------------------------------------------------------------------------------------
# Optimized PyTorch path
# --------------------------------------------------------------------------------------------


def _dino_torch(
    teacher: Sequence[Tensor], student: Sequence[Tensor], center: Tensor, teacher_temp: float, student_temp: float
) -> Tensor:
    # Placeholder until the chunked path lands.
    return reference.dino_loss(
        [t.float() for t in teacher], [s.float() for s in student], center.float(), teacher_temp, student_temp
    ).float()


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
    impl = resolve_backend(backend, teacher_out[0])
    if impl == "reference":
        return reference.dino_loss(teacher_out, student_out, center, teacher_temp, student_temp).float()
    if impl == "triton":
        from fastssl.kernels.dino import dino_loss_triton

        return dino_loss_triton(teacher_out, student_out, center, teacher_temp, student_temp)
    return _dino_torch(teacher_out, student_out, center, teacher_temp, student_temp)


@torch.no_grad()
def dino_center_update(center: Tensor, teacher_out: Sequence[Tensor], momentum: float = 0.9) -> Tensor:
    r"""New center :math:`m\,c + (1-m)\,\bar t`, with :math:`\bar t` the mean teacher output over
    views and batch -- and over ranks when a process group is initialized, as lightly does."""
    batch_center = torch.stack([t.detach().float() for t in teacher_out]).mean(dim=(0, 1))
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(batch_center)
        batch_center /= dist.get_world_size()
    return center * momentum + batch_center.reshape(center.shape).to(center.dtype) * (1 - momentum)


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

    def _teacher_temperature(self, teacher_temp: Optional[float], epoch: Optional[int]) -> float:
        if teacher_temp is not None:
            return check_nonzero("teacher_temp", teacher_temp)
        if epoch is not None and epoch < self.warmup_teacher_temp_epochs:
            return float(self.teacher_temp_schedule[epoch])
        return self.teacher_temp

    def forward(
        self,
        teacher_out: List[Tensor],
        student_out: List[Tensor],
        teacher_temp: Optional[float] = None,
        epoch: Optional[int] = None,
    ) -> Tensor:
        loss = dino_loss(
            teacher_out,
            student_out,
            self.center,
            self._teacher_temperature(teacher_temp, epoch),
            self.student_temp,
            backend=self.backend,
        )
        self.center = dino_center_update(self.center, teacher_out, self.center_momentum)
        return loss
