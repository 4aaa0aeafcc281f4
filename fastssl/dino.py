r"""DINO: the centered, sharpened teacher-to-student cross-entropy; functional API, optimized
PyTorch path and the drop-in :class:`DINOLoss`. The Triton kernels live in
:mod:`fastssl.kernels.dino`.
"""

from __future__ import annotations

import math
import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastssl import reference
from fastssl._backend import (
    check_backend_name,
    guard_triton_backward,
    outside_autocast,
    resolve_backend,
    run_reference,
    triton_with_fallback,
)
from fastssl._checks import check_int, check_nonzero, check_probability, check_tensor_list
from fastssl._checks import check_module_temperature, check_temperature

# --------------------------------------------------------------------------------------------
# Optimized PyTorch path
# --------------------------------------------------------------------------------------------
#
# With P_t = softmax((t − c)/τ_t) for the T teacher views and log P_s = log_softmax(s/τ_s) for the
# S student views, DINO sums −P_t·log P_s over all pairs except (v, v), v < min(T, S). With W the
# (S, T) matrix of the pairs that count (all ones but the diagonal) and n = T·S − min(T, S):
#
#     L = −1/(n B) Σ_{s,t} W_st ⟨P_t, log P_s⟩,
#     ∂L/∂s = (m_s · softmax(s/τ_s) − Q_s)/(τ_s n B),   Q_s = Σ_t W_st P_t,  m_s = Σ_t W_st,
#     ∂L/∂τ_s = −Σ_s ⟨∂L/∂s, s/τ_s⟩                      (a learnable student temperature).
#
# Both the (T, S) pair sums ⟨P_t, log P_s⟩ and the targets Q are matrix products over the
# flattened (rows · K) axis -- one GEMM each, as lightly's einsum, instead of a target tensor and
# a product per student view; every term is a non-negative weight times a log-probability
# (nothing large cancels). The gradient is written in the forward, into the softmax's own buffer
# (m_s p_s − Q_s by one scaling and one in-place GEMM), and only scaled in the backward. The
# batch is processed in chunks of rows, so the (views, rows, K) temporaries stay bounded
# (K = 65536 in DINO); teacher column sums (the center's batch mean) come out of the same pass.

# fp32 elements of one (views, rows, K) temporary per chunk: 2**22 is 16 MiB.
_CHUNK_ELEMENTS = 1 << 22


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _as_scalar(value: Union[float, Tensor], dtype: torch.dtype) -> Union[float, Tensor]:
    """A temperature as the compute dtype's 0-d tensor (no gradient) or a Python float."""
    return value.detach().to(dtype).reshape(()) if isinstance(value, Tensor) else value


class _DinoTorchFunction(torch.autograd.Function):
    """Chunked DINO loss; inputs ``(center, teacher_temp, student_temp, n_teacher, *views)`` with
    the T teacher views first (temperatures: floats or one-element tensors; the student's gets a
    gradient). Returns the 0-d loss and the (K,) column sums of the teacher views
    (non-differentiable)."""

    @staticmethod
    def forward(ctx, center, teacher_temp, student_temp, n_teacher, *views):  # type: ignore[override]
        teachers = [t.detach() for t in views[:n_teacher]]
        students = [s.detach() for s in views[n_teacher:]]
        n_student = len(students)
        batch, k = students[0].shape
        dtype = _compute_dtype(students[0])
        device = students[0].device
        n_terms = n_teacher * n_student - min(n_teacher, n_student)
        need_grad = any(ctx.needs_input_grad[4 + n_teacher :])
        need_temperature_grad = isinstance(student_temp, Tensor) and ctx.needs_input_grad[2]
        center = center.detach().reshape(1, 1, k).to(dtype)
        inv_teacher_temp = 1.0 / _as_scalar(teacher_temp, dtype)
        inv_student_temp = 1.0 / _as_scalar(student_temp, dtype)
        # W (S, T): the pairs that count; m_s = its row sums.
        pairs = torch.ones(n_student, n_teacher, dtype=dtype, device=device)
        same = min(n_teacher, n_student)
        pairs[torch.arange(same), torch.arange(same)] = 0
        matches = (n_teacher - (torch.arange(n_student, device=device) < n_teacher).to(dtype)).reshape(-1, 1, 1)
        grad_scale = inv_student_temp / (n_terms * batch)
        negligible = torch.finfo(dtype).tiny * 2.0**26
        grads = torch.empty((n_student, batch, k), dtype=dtype, device=device) if need_grad or need_temperature_grad else None
        chunk = max(1, _CHUNK_ELEMENTS // (k * (n_teacher + n_student)))
        total = torch.zeros((), dtype=dtype, device=device)
        temperature_grad = torch.zeros((), dtype=dtype, device=device)
        teacher_colsum = torch.zeros(k, dtype=dtype, device=device)
        for start in range(0, batch, chunk):
            stop = min(start + chunk, batch)
            rows = stop - start
            raw = torch.stack([t[start:stop] for t in teachers]).to(dtype)  # (T, rows, K)
            teacher_colsum += raw.sum(dim=(0, 1))
            teacher_probs = torch.softmax((raw - center) * inv_teacher_temp, dim=2).reshape(n_teacher, rows * k)
            # Probabilities below 2**-100 (float32; 2**-996 in float64) are flushed to 0: they
            # change no result at the compute precision (each row sums to 1), but they and their
            # products with the gradient scale are subnormal, and every CPU operation touching a
            # subnormal takes a slow path (sharp teachers give many: 10-20x slower GEMMs).
            torch.nn.functional.threshold(teacher_probs, negligible, 0.0, inplace=True)
            scaled = torch.empty((n_student, rows, k), dtype=dtype, device=device)  # x_s = s/τ_s
            for v, s in enumerate(students):
                torch.mul(s[start:stop].to(dtype), inv_student_temp, out=scaled[v])
            log_probs = torch.log_softmax(scaled, dim=2)
            pair_sums = teacher_probs @ log_probs.reshape(n_student, rows * k).T  # (T, S)
            total = total - (pair_sums * pairs.T).sum()
            if grads is not None:
                grad = grads[:, start:stop]  # (S, rows, K), each view's rows contiguous
                torch.exp(log_probs, out=grad)
                torch.nn.functional.threshold(grad, negligible, 0.0, inplace=True)  # as the teacher's
                grad.mul_(matches * grad_scale)
                grad.view(n_student, rows * k).addmm_(pairs * (-grad_scale), teacher_probs)
                if need_temperature_grad:
                    for v in range(n_student):
                        temperature_grad = temperature_grad - torch.dot(grad[v].reshape(-1), scaled[v].reshape(-1))
        if need_grad:
            student_grads = [g if g.dtype == s.dtype else g.to(s.dtype) for g, s in zip(grads.unbind(0), students)]
        else:
            student_grads = []
        ctx.save_for_backward(*student_grads)
        ctx.n_teacher = n_teacher
        ctx.need_grad = need_grad
        ctx.temperature_grad = temperature_grad if need_temperature_grad else None
        ctx.temperature_meta = (student_temp.shape, student_temp.dtype) if isinstance(student_temp, Tensor) else None
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
        temperature_grad = None
        if ctx.temperature_grad is not None:
            shape, dtype = ctx.temperature_meta
            temperature_grad = (ctx.temperature_grad * grad_loss).to(dtype).reshape(shape)
        return (None, None, temperature_grad, None, *([None] * ctx.n_teacher), *student_grads)


def _dino_torch_with_colsum(
    teacher: Sequence[Tensor],
    student: Sequence[Tensor],
    center: Tensor,
    teacher_temp: Union[float, Tensor],
    student_temp: Union[float, Tensor],
) -> Tuple[Tensor, Tensor]:
    """Loss (0-d float32) and the (K,) float32 sum of the teacher outputs over views and batch."""
    # The teacher gets no gradient; detaching also gives the Function distinct inputs when the
    # same tensor is passed as a teacher and a student view (which torch.compile requires).
    teacher = [t.detach() for t in teacher]
    if isinstance(teacher_temp, Tensor):
        teacher_temp = teacher_temp.detach()  # as lightly: the teacher temperature is not trained
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
            f"the views have {teacher[0].shape[1]} columns but the center has {center.numel()} entries "
            f"(shape {tuple(center.shape)}): construct DINOLoss(output_dim={teacher[0].shape[1]}) to "
            "match the head's output dimension (lightly's default output_dim is 65536)"
        )


@outside_autocast
def dino_loss(
    teacher_out: Sequence[Tensor],
    student_out: Sequence[Tensor],
    center: Optional[Tensor] = None,
    teacher_temp: Union[float, Tensor] = 0.04,
    student_temp: Union[float, Tensor] = 0.1,
    *,
    backend: str = "auto",
) -> Tensor:
    r"""DINO's cross-entropy (see :func:`fastssl.reference.dino_loss`). The center is not updated.

    Args:
        teacher_out: list of T tensors (B, K); no gradient flows to them.
        student_out: list of S tensors (B, K).
        center: (K,) or (1, 1, K) teacher center; zeros when None.
        teacher_temp: a number or a one-element tensor (used without gradient, as lightly).
        student_temp: a number or a one-element tensor; a tensor that requires grad (a learnable
            temperature) gets its gradient on every backend.
    Returns:
        0-d float32 loss.

    Example::

        loss = dino_loss([t0, t1], [s0, s1, s2, s3], center, teacher_temp=0.04)
        loss.backward()
    """
    _check_views(teacher_out, student_out, center)
    teacher_temp = check_temperature("teacher_temp", teacher_temp)
    student_temp = check_temperature("student_temp", student_temp)
    if center is None:
        center = teacher_out[0].new_zeros(teacher_out[0].shape[1])
    return _dino_dispatch(teacher_out, student_out, center, teacher_temp, student_temp, backend)[0]


@outside_autocast
def _dino_op_torch_loss(teacher, student, center, teacher_temp, student_temp, teacher_temp_tensor,
                        student_temp_tensor, center_momentum, center_mode, compute_grad,
                        compute_temperature_grad) -> Tensor:  # fmt: skip
    """The torch path's loss as a function of ``fastssl::dino``'s inputs (its backward's fallback)."""
    tau_t = teacher_temp if teacher_temp_tensor is None else teacher_temp_tensor
    tau_s = student_temp if student_temp_tensor is None else student_temp_tensor
    return _dino_torch(teacher, student, center, tau_t, tau_s)


def _dino_kernels():
    """The Triton kernels' module, the DINO custom op's backward guarded: under ``"auto"`` a
    backward kernel that fails gives the torch path's gradient after one warning
    (:func:`fastssl._backend.guard_triton_backward`)."""
    from fastssl.kernels import dino as kernels

    guard_triton_backward(kernels._dino_op, "dino", kernels._dino_setup, kernels._dino_gradient, _dino_op_torch_loss)
    return kernels


@outside_autocast  # the module calls it directly, not through dino_loss
def _dino_dispatch(
    teacher_out: Sequence[Tensor],
    student_out: Sequence[Tensor],
    center: Tensor,
    teacher_temp: Union[float, Tensor],
    student_temp: Union[float, Tensor],
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
        return loss, _center_ema(center, teacher_sum, n_teacher_rows, center_momentum)

    def run_torch() -> Tuple[Tensor, Tensor]:
        return with_center(*_dino_torch_with_colsum(teacher_out, student_out, center, teacher_temp, student_temp))

    if impl == "reference":
        # The teacher side carries no gradient (DINO's stop-gradient), as on the other backends.
        teacher = [t.detach() for t in teacher_out]
        fixed_teacher_temp = teacher_temp.detach() if isinstance(teacher_temp, Tensor) else teacher_temp
        loss = run_reference(reference.dino_loss, teacher, list(student_out), center, fixed_teacher_temp, student_temp)
        with torch.no_grad():
            teacher_sum = torch.stack([t.float() for t in teacher]).sum(dim=(0, 1))
        return with_center(loss, teacher_sum)
    if impl == "triton":

        def run_triton() -> Tuple[Tensor, Tensor]:
            kernels = _dino_kernels()
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
def _center_ema(center: Tensor, teacher_sum: Tensor, teacher_rows: int, momentum: float) -> Tensor:
    """``m·c + (1−m)·mean``, with mean = ``teacher_sum / teacher_rows`` -- over every rank's rows
    when a process group is initialized (one all-reduce of the sum and the row count, on the
    device): the mean of the global batch, whatever each rank holds.

    lightly averages the ranks' own means instead (``center_mean`` all-reduces the mean and
    divides by the world size), which weighs a short last batch like a full one; the two agree
    when every rank holds the same number of rows."""
    teacher_sum = teacher_sum.float().reshape(-1)
    if _process_group():
        packed = torch.cat([teacher_sum, teacher_sum.new_full((1,), float(teacher_rows))])
        dist.all_reduce(packed)
        batch_center = packed[:-1] / packed[-1]
    else:
        batch_center = teacher_sum / teacher_rows
    # Broadcast, as lightly: a (K,) batch center updates a (1, 1, K) center.
    return center * momentum + batch_center.reshape((1,) * (center.dim() - 1) + (-1,)).to(center.dtype) * (1 - momentum)


@torch.no_grad()
def dino_center_update(center: Tensor, teacher_out: Sequence[Tensor], momentum: float = 0.9) -> Tensor:
    r"""New center :math:`m\,c + (1-m)\,\bar t`, with :math:`\bar t` the mean teacher output over
    views and batch -- over the global batch when a process group is initialized (row-weighted;
    see :func:`_center_ema` for the difference from lightly)."""
    stacked = torch.stack([t.detach().float() for t in teacher_out])
    return _center_ema(center, stacked.sum(dim=(0, 1)), stacked.shape[0] * stacked.shape[1], momentum)


# --------------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------------


class DINOLoss(nn.Module):
    """Drop-in for ``lightly.loss.DINOLoss`` (Caron et al. 2021, Alg. 1: centered, sharpened
    teacher-to-student cross-entropy; teacher-temperature warm-up, center EMA).

    Args:
        output_dim: number of prototypes K (size of the center buffer).
        warmup_teacher_temp: teacher temperature at epoch 0 of the warm-up.
        teacher_temp: teacher temperature after the warm-up (a number or a one-element tensor,
            used without gradient, as lightly).
        warmup_teacher_temp_epochs: length of the linear warm-up, in epochs.
        student_temp: student temperature: a number, or a one-element tensor; an
            ``nn.Parameter`` is registered (as lightly's attribute assignment registers it) and
            trained, with its gradient on every backend.
        center_momentum: EMA momentum of the center.
        center_mode: only ``"mean"`` (as lightly).
        backend: ``"auto" | "triton" | "torch" | "reference"`` (env ``FASTSSL_BACKEND``).

    Forward ``(teacher_out, student_out, teacher_temp=None, epoch=None)``: lists of (B, K)
    tensors; returns a 0-d float32 loss and updates ``center`` (shape (1, 1, K)). ``epoch``
    (an int, or an integral float such as ``3.0``) picks the warm-up temperature; an epoch at or
    beyond ``warmup_teacher_temp_epochs`` uses ``teacher_temp``, as lightly's schedule does.
    Under a process group the center moves to the mean of the global batch (rows of all ranks,
    row-weighted; lightly averages the ranks' means, which differs only for unequal batches).

    Example::

        criterion = DINOLoss(output_dim=4096, warmup_teacher_temp_epochs=10)
        loss = criterion([t0, t1], [s0, s1, s2, s3], epoch=epoch)  # (B, 4096) each
        loss.backward()
    """

    center: Tensor

    def __init__(
        self,
        output_dim: int = 65536,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: Union[float, Tensor] = 0.04,
        warmup_teacher_temp_epochs: int = 30,
        student_temp: Union[float, Tensor] = 0.1,
        center_momentum: float = 0.9,
        center_mode: str = "mean",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_int("output_dim", output_dim, minimum=1)
        self.teacher_temp = check_module_temperature("teacher_temp", teacher_temp)
        self.student_temp = check_module_temperature("student_temp", student_temp)
        check_nonzero("warmup_teacher_temp", warmup_teacher_temp)
        self.warmup_teacher_temp_epochs = check_int("warmup_teacher_temp_epochs", warmup_teacher_temp_epochs)
        self.center_momentum = check_probability("center_momentum", center_momentum)
        if center_mode != "mean":
            raise ValueError(f"Unknown mode '{center_mode}'. Valid modes are ['mean'].")
        self.backend = check_backend_name(backend)
        self.register_buffer("center", torch.zeros(1, 1, output_dim))
        final_teacher_temp = float(teacher_temp.detach()) if isinstance(teacher_temp, Tensor) else teacher_temp
        self.teacher_temp_schedule = torch.linspace(
            float(warmup_teacher_temp), float(final_teacher_temp), warmup_teacher_temp_epochs
        )
        # The same float32 values as Python floats: looking one up needs no tensor read (which
        # would break a torch.compile graph).
        self._teacher_temp_values = self.teacher_temp_schedule.tolist()

    def _teacher_temperature(self, teacher_temp: object, epoch: object) -> Union[float, Tensor]:
        if teacher_temp is not None:
            return check_temperature("teacher_temp", teacher_temp)
        if epoch is not None:
            epoch = _epoch_index(epoch)
            if epoch < self.warmup_teacher_temp_epochs:
                return self._teacher_temp_values[epoch]
        return self.teacher_temp

    def forward(
        self,
        teacher_out: List[Tensor],
        student_out: List[Tensor],
        teacher_temp: Optional[Union[float, Tensor]] = None,
        epoch: Optional[int] = None,
    ) -> Tensor:
        """DINO loss; updates the center buffer (EMA of the teacher outputs).

        Args:
            teacher_out: list of T tensors (B, K), the teacher's views (no gradient flows to them).
            student_out: list of S tensors (B, K), the student's views; pairs of the same index
                are excluded.
            teacher_temp: teacher temperature; by default the warm-up schedule's value at ``epoch``.
            epoch: the current epoch, for the teacher-temperature schedule.

        Returns:
            0-d float32 loss, the mean cross-entropy over the pairs.
        """
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
        (broadcast to the center; over the global batch when a process group is initialized).
        ``teacher_out`` is the stacked (views, B, K) teacher output; as in lightly, a 2-D tensor
        is averaged over both of its dimensions."""
        teacher = teacher_out.detach().float()
        rows = teacher.shape[0] * teacher.shape[1]
        self.center.copy_(_center_ema(self.center, teacher.sum(dim=(0, 1)), rows, self.center_momentum))


def _epoch_index(epoch: object) -> int:
    """``epoch`` as an int: an int (Python, NumPy, 0-d integer tensor) or an integral float
    (``3.0``: epoch counters computed as floats); negative epochs and fractions are rejected."""
    if isinstance(epoch, bool):
        raise TypeError("epoch must be an int, got bool")
    if isinstance(epoch, numbers.Integral) or (isinstance(epoch, Tensor) and not epoch.is_floating_point()):
        value = int(epoch)
    elif isinstance(epoch, (numbers.Real, Tensor)):
        as_float = float(epoch)
        if not math.isfinite(as_float) or as_float != int(as_float):
            raise ValueError(f"epoch must be a whole number, got {epoch}")
        value = int(as_float)
    else:
        raise TypeError(f"epoch must be an int, got {type(epoch).__name__}")
    if value < 0:
        raise ValueError(f"epoch must be >= 0, got {value}")
    return value
