"""Prototype losses, forward + backward: iBOT's masked-patch loss, CAPI's position-wise Sinkhorn
cross-entropy and MSN, against the reference, its compiled form and lightly 1.6's modules.

The three families are registered with the harness here (cases, inputs, implementations, the
roofline cost and lightly's files), so that the shared harness files need no edit:

* ``ibot``: ``images`` × 196 patches with ``round(0.4 · 196) = 78`` masked per image (DINOv2's
  ≈40 %), K prototypes; the DESIGN §5 shape is 64 images at K = 65536, on CPU 8 images at
  K = 8192. Fewest bytes: teacher and student read, student gradient written.
* ``capi``: B images, T = 196 teacher tokens, P = 98 predicted, K clusters (lightly's ViT-B/16
  CAPI benchmark uses K = 16384). Bytes: teacher, student, gradient.
* ``msn``: V anchor views of B images, D = 256, K = 1024 prototypes (lightly's example).
  FLOPs: the anchor-prototype products (forward, recomputed in the backward, and the two
  gradient products) and the targets' forward: (8 V + 2) · B · K · D.
"""

from __future__ import annotations

from typing import Mapping

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import fastssl.functional as FS
from fastssl import reference

from benchmarks import _harness, lightly_loader, roofline

IBOT_TOKENS, IBOT_MASKED = 196, 78
IBOT_TEACHER_TEMP, IBOT_STUDENT_TEMP = 0.04, 0.1
CAPI_TOKENS, CAPI_PREDICTED = 196, 98
CAPI_TEACHER_TEMP, CAPI_STUDENT_TEMP, CAPI_ITERATIONS = 0.06, 0.12, 3
MSN_TEMPERATURE, MSN_ITERATIONS, MSN_WEIGHT, MSN_SHARPEN = 0.1, 3, 1.0, 0.25
FP32, BF16 = torch.float32, torch.bfloat16


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _ibot_inputs(shape: Mapping[str, int], dtype: torch.dtype, device: torch.device) -> tuple:
    images, k = shape["images"], shape["k"]
    order = torch.rand(images, IBOT_TOKENS, device=device).argsort(dim=1)
    mask = torch.zeros(images, IBOT_TOKENS, dtype=torch.bool, device=device)
    mask.scatter_(1, order[:, :IBOT_MASKED], True)
    mask = mask.reshape(images, 14, 14)
    rows = images * IBOT_MASKED
    teacher = torch.randn(rows, k, device=device).to(dtype)
    student = torch.randn(rows, k, device=device).to(dtype).requires_grad_(True)
    center = 0.1 * torch.randn(k, device=device)
    return teacher, student, mask, center


def _capi_inputs(shape: Mapping[str, int], dtype: torch.dtype, device: torch.device) -> tuple:
    b, k = shape["b"], shape["k"]
    teacher = torch.randn(b, CAPI_TOKENS, k, device=device).to(dtype)
    student = torch.randn(b, CAPI_PREDICTED, k, device=device).to(dtype).requires_grad_(True)
    index = torch.rand(b, CAPI_TOKENS, device=device).argsort(dim=1)[:, :CAPI_PREDICTED].contiguous()
    return teacher, student, index


def _msn_inputs(shape: Mapping[str, int], dtype: torch.dtype, device: torch.device) -> tuple:
    views, b, k, d = shape["views"], shape["b"], shape["k"], shape["d"]
    anchors = torch.randn(views * b, d, device=device).to(dtype).requires_grad_(True)
    targets = torch.randn(b, d, device=device).to(dtype)
    prototypes = F.normalize(torch.randn(k, d, device=device), dim=1).to(dtype).requires_grad_(True)
    return anchors, targets, prototypes


# --------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------


def _ibot_reference(teacher: Tensor, student: Tensor, mask: Tensor, center: Tensor) -> Tensor:
    return reference.ibot_patch_loss(teacher, student, mask, center, IBOT_TEACHER_TEMP, IBOT_STUDENT_TEMP)


def _ibot_fastssl(teacher: Tensor, student: Tensor, mask: Tensor, center: Tensor, backend: str) -> Tensor:
    return FS.ibot_patch_loss(teacher, student, mask, center, IBOT_TEACHER_TEMP, IBOT_STUDENT_TEMP, backend=backend)


def _ibot_lightly(shape, device):
    module = lightly_loader.load("IBOTPatchLoss")(
        output_dim=shape["k"], teacher_temp=IBOT_TEACHER_TEMP, student_temp=IBOT_STUDENT_TEMP
    ).to(device)

    def call(teacher, student, mask, center):
        # lightly moves its centre by EMA after every call: reset it to the case's centre.
        module.center.center.copy_(center.reshape(1, -1))
        return module(teacher, student, mask)

    return call


def _capi_reference(teacher: Tensor, student: Tensor, index: Tensor) -> Tensor:
    return reference.capi_loss(teacher, student, index, CAPI_TEACHER_TEMP, CAPI_STUDENT_TEMP, CAPI_ITERATIONS)


def _capi_fastssl(teacher: Tensor, student: Tensor, index: Tensor, backend: str) -> Tensor:
    return FS.capi_loss(
        teacher, student, index, CAPI_TEACHER_TEMP, CAPI_STUDENT_TEMP, CAPI_ITERATIONS, backend=backend
    )


def _capi_lightly(shape, device):
    module = lightly_loader.load("CAPILoss")(
        teacher_temperature=CAPI_TEACHER_TEMP, student_temperature=CAPI_STUDENT_TEMP,
        sinkhorn_iterations=CAPI_ITERATIONS,
    ).to(device)  # fmt: skip
    return lambda teacher, student, index: module(teacher, student, index)


def _msn_reference(anchors: Tensor, targets: Tensor, prototypes: Tensor) -> Tensor:
    return reference.msn_loss(
        anchors, targets, prototypes, MSN_TEMPERATURE, MSN_ITERATIONS, MSN_WEIGHT, MSN_SHARPEN
    )


def _msn_fastssl(anchors: Tensor, targets: Tensor, prototypes: Tensor, backend: str) -> Tensor:
    return FS.msn_loss(
        anchors, targets, prototypes, MSN_TEMPERATURE, MSN_ITERATIONS, MSN_WEIGHT, MSN_SHARPEN, backend=backend
    )


def _msn_lightly(shape, device):
    module = lightly_loader.load("MSNLoss")(
        temperature=MSN_TEMPERATURE, sinkhorn_iterations=MSN_ITERATIONS, regularization_weight=MSN_WEIGHT
    ).to(device)
    return lambda anchors, targets, prototypes: module(anchors, targets, prototypes, MSN_SHARPEN)


# --------------------------------------------------------------------------------------------
# Roofline costs
# --------------------------------------------------------------------------------------------


def _ibot_cost(shape: Mapping[str, int], dtype: torch.dtype) -> roofline.Cost:
    elements = shape["images"] * IBOT_MASKED * shape["k"]
    return roofline.Cost(flops=0.0, bytes=3.0 * elements * roofline._element_size(dtype))


def _capi_cost(shape: Mapping[str, int], dtype: torch.dtype) -> roofline.Cost:
    elements = shape["b"] * (CAPI_TOKENS + 2 * CAPI_PREDICTED) * shape["k"]
    return roofline.Cost(flops=0.0, bytes=float(elements * roofline._element_size(dtype)))


def _msn_cost(shape: Mapping[str, int], dtype: torch.dtype) -> roofline.Cost:
    views, b, k, d = shape["views"], shape["b"], shape["k"], shape["d"]
    size = roofline._element_size(dtype)
    return roofline.Cost(
        flops=(8.0 * views + 2.0) * b * k * d,
        bytes=(2.0 * views * b * d + b * d + 2.0 * k * d) * size,
    )


# --------------------------------------------------------------------------------------------
# Registration with the harness
# --------------------------------------------------------------------------------------------

_harness.FAMILIES.update(
    ibot=_harness.Family("ibot", _ibot_inputs, _ibot_reference, _ibot_fastssl, _ibot_lightly),
    capi=_harness.Family("capi", _capi_inputs, _capi_reference, _capi_fastssl, _capi_lightly),
    msn=_harness.Family("msn", _msn_inputs, _msn_reference, _msn_fastssl, _msn_lightly),
)
roofline.COSTS.update(ibot=_ibot_cost, capi=_capi_cost, msn=_msn_cost)
lightly_loader.LOSS_FILES.update(IBOTPatchLoss="ibot_loss", CAPILoss="capi_loss", MSNLoss="msn_loss")
_harness.GPU_POINTS.update(
    ibot=[({"images": 64, "k": 65536}, FP32), ({"images": 64, "k": 65536}, BF16)],
    capi=[({"b": 32, "k": 16384}, FP32)],
    msn=[({"views": 11, "b": 256, "k": 1024, "d": 256}, FP32)],
)
_harness.CPU_POINTS.update(
    ibot=[({"images": 8, "k": 8192}, FP32)],
    capi=[({"b": 8, "k": 4096}, FP32)],
    msn=[({"views": 3, "b": 128, "k": 1024, "d": 256}, FP32)],
)


@pytest.mark.parametrize("impl", _harness.impls())
@pytest.mark.parametrize("case", _harness.cases("ibot"), ids=str)
def test_ibot(benchmark, case, impl):
    _harness.run_case(benchmark, case, impl)


@pytest.mark.parametrize("impl", _harness.impls())
@pytest.mark.parametrize("case", _harness.cases("capi"), ids=str)
def test_capi(benchmark, case, impl):
    _harness.run_case(benchmark, case, impl)


@pytest.mark.parametrize("impl", _harness.impls())
@pytest.mark.parametrize("case", _harness.cases("msn"), ids=str)
def test_msn(benchmark, case, impl):
    _harness.run_case(benchmark, case, impl)
