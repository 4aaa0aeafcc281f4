"""The variants of benchmarked losses that lightly 1.6.0 ships as their own classes -- DirectCLR
(NT-Xent on a slice), DetCon-S (DetCon-B with predictions = targets), iBOT++ (iBOT on every
token), PMSN and PMSNCustom (MSN with a prior's KL) -- forward + backward: the textbook
reference, its ``torch.compile``, lightly's module and fastssl's default path.

Registered into the tables of :mod:`benchmarks._harness`, :mod:`benchmarks.roofline` and
:mod:`benchmarks.lightly_loader` as the other families, so that the interleaved CPU comparison
(``python -m benchmarks._harness directclr detcon_s ...``) and pytest-benchmark run them alike.
Hyperparameters are lightly's defaults (DirectCLR: ``loss_dim=64``, τ = 0.5; DetCon-S: τ = 0.1;
iBOT++: the iBOT temperatures, visible weight 1; PMSN: power-law exponent 0.25; PMSNCustom: a
uniform target distribution).

Shapes: DirectCLR on 2N = 4096 ResNet-18-sized 512-d representations (its paper's backbone
width), DetCon-S at DetCon-B's, iBOT++ at iBOT's (every one of the 196 tokens enters the loss),
PMSN at MSN's.

Roofline (``s`` the element size): DirectCLR as NT-Xent on (n, loss_dim), plus reading the full
representations; DetCon-S as DetCon-B with one input pair (F = 6R²d, B = 2Rd·s); iBOT++ reads
teacher and student and writes the student gradient (B = 3·images·196·K·s); PMSN as MSN.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Mapping

import pytest
import torch
from torch import Tensor

import fastssl
import fastssl.functional as FS
from fastssl import reference
from fastssl.prototype import power_law_distribution

from benchmarks import _harness, lightly_loader, roofline
from benchmarks import test_bench_contrastive as contrastive
from benchmarks import test_bench_prototype as prototype

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import _lightly  # noqa: E402  (tests/_lightly.py: lightly's loss files without torchvision)

FP32, BF16 = torch.float32, torch.bfloat16
DIRECTCLR_LOSS_DIM, DIRECTCLR_TEMPERATURE = 64, 0.5
PMSN_EXPONENT = 0.25
IBOT_TOKENS, IBOT_GRID = prototype.IBOT_TOKENS, 14

GPU_POINTS = {
    "directclr": [({"n": 4096, "d": 2048}, BF16)],
    "detcon_s": [({"b": 256, "m": 16, "d": 128}, BF16)],
    "ibot_plus_plus": [({"images": 64, "k": 8192}, FP32)],
    "pmsn": [({"views": 11, "b": 256, "k": 1024, "d": 256}, FP32)],
    "pmsn_custom": [({"views": 11, "b": 256, "k": 1024, "d": 256}, FP32)],
}
CPU_POINTS = {
    "directclr": [({"n": 2048, "d": 512}, FP32)],
    "detcon_s": [({"b": 128, "m": 16, "d": 128}, FP32)],
    "ibot_plus_plus": [({"images": 8, "k": 8192}, FP32)],
    "pmsn": [({"views": 3, "b": 128, "k": 1024, "d": 256}, FP32)],
    "pmsn_custom": [({"views": 3, "b": 128, "k": 1024, "d": 256}, FP32)],
}


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _detcon_s_inputs(shape: Mapping[str, int], dtype: torch.dtype, device: torch.device) -> tuple:
    b, m, d = shape["b"], shape["m"], shape["d"]
    views = tuple(_harness._randn((b, m, d), dtype, device, True) for _ in range(2))
    masks = tuple(torch.randint(0, m, (b, m), device=device) for _ in range(2))
    return views + masks


def _ibot_plus_plus_inputs(shape: Mapping[str, int], dtype: torch.dtype, device: torch.device) -> tuple:
    """Full (images, 196, K) teacher and student logits, ≈40 % of each image's tokens masked."""
    images, k = shape["images"], shape["k"]
    order = torch.rand(images, IBOT_TOKENS, device=device).argsort(dim=1)
    mask = torch.zeros(images, IBOT_TOKENS, dtype=torch.bool, device=device)
    mask.scatter_(1, order[:, : prototype.IBOT_MASKED], True)
    teacher = torch.randn(images, IBOT_TOKENS, k, device=device).to(dtype)
    student = torch.randn(images, IBOT_TOKENS, k, device=device).to(dtype).requires_grad_(True)
    center = 0.1 * torch.randn(k, device=device)
    return teacher, student, mask.reshape(images, IBOT_GRID, IBOT_GRID), center


def _uniform(mean_probs: Tensor) -> Tensor:
    return torch.full_like(mean_probs, 1.0 / mean_probs.shape[0])


# --------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------


def _lightly_class(name: str):
    """lightly's class ``name`` through ``tests/_lightly.py``'s loader: DirectCLR's and PMSN's
    files import their parent classes as ``lightly.loss.<file>``, which
    :mod:`benchmarks.lightly_loader` (one file at a time) cannot resolve."""
    classes = _lightly.load()
    if classes is None:
        raise ImportError("lightly is not installed or its loss files cannot be imported")
    return getattr(classes, name)


def _directclr_lightly(shape, device):
    return _lightly_class("DirectCLRLoss")(loss_dim=DIRECTCLR_LOSS_DIM, temperature=DIRECTCLR_TEMPERATURE).to(device)


def _detcon_s_lightly(shape, device):
    return lightly_loader.load("DetConSLoss")(temperature=contrastive.DETCON_TEMPERATURE, gather_distributed=False).to(device)


def _ibot_plus_plus_reference(teacher: Tensor, student: Tensor, mask: Tensor, center: Tensor) -> Tensor:
    return reference.ibot_plus_plus_patch_loss(
        teacher, student, mask, center, prototype.IBOT_TEACHER_TEMP, prototype.IBOT_STUDENT_TEMP
    )


def _ibot_plus_plus_fastssl(teacher: Tensor, student: Tensor, mask: Tensor, center: Tensor, backend: str) -> Tensor:
    return FS.ibot_plus_plus_patch_loss(
        teacher, student, mask, center, prototype.IBOT_TEACHER_TEMP, prototype.IBOT_STUDENT_TEMP, backend=backend
    )


def _ibot_plus_plus_lightly(shape, device):
    module = lightly_loader.load("IBOTPlusPlusPatchLoss")(
        output_dim=shape["k"], teacher_temp=prototype.IBOT_TEACHER_TEMP, student_temp=prototype.IBOT_STUDENT_TEMP
    ).to(device)

    def call(teacher, student, mask, center):
        module.center.center.copy_(center.reshape(1, -1))  # lightly's EMA moved it: reset
        return module(teacher, student, mask)

    return call


def _msn_reference_with(regularization):
    def call(anchors: Tensor, targets: Tensor, prototypes: Tensor) -> Tensor:
        return reference.msn_loss(
            anchors, targets, prototypes, prototype.MSN_TEMPERATURE, prototype.MSN_ITERATIONS,
            prototype.MSN_WEIGHT, prototype.MSN_SHARPEN, regularization=regularization,
        )  # fmt: skip

    return call


def _power_law_kl(mean_probs: Tensor) -> Tensor:
    prior = power_law_distribution(mean_probs.shape[0], PMSN_EXPONENT, mean_probs.device)
    return reference.prior_kl_regularization(mean_probs, prior)


def _uniform_kl(mean_probs: Tensor) -> Tensor:
    return reference.prior_kl_regularization(mean_probs, _uniform(mean_probs))


def _pmsn_fastssl(anchors: Tensor, targets: Tensor, prototypes: Tensor, backend: str) -> Tensor:
    return FS.pmsn_loss(
        anchors, targets, prototypes, prototype.MSN_TEMPERATURE, prototype.MSN_ITERATIONS, prototype.MSN_WEIGHT,
        PMSN_EXPONENT, prototype.MSN_SHARPEN, backend=backend,
    )  # fmt: skip


@functools.lru_cache(maxsize=None)
def _pmsn_custom_module(backend: str) -> torch.nn.Module:
    return fastssl.PMSNCustomLoss(
        _uniform, temperature=prototype.MSN_TEMPERATURE, sinkhorn_iterations=prototype.MSN_ITERATIONS,
        regularization_weight=prototype.MSN_WEIGHT, backend=backend,
    )  # fmt: skip


def _pmsn_custom_fastssl(anchors: Tensor, targets: Tensor, prototypes: Tensor, backend: str) -> Tensor:
    return _pmsn_custom_module(backend)(anchors, targets, prototypes, prototype.MSN_SHARPEN)


def _pmsn_lightly(shape, device):
    module = _lightly_class("PMSNLoss")(
        temperature=prototype.MSN_TEMPERATURE, sinkhorn_iterations=prototype.MSN_ITERATIONS,
        regularization_weight=prototype.MSN_WEIGHT, power_law_exponent=PMSN_EXPONENT,
    ).to(device)  # fmt: skip
    return lambda anchors, targets, prototypes: module(anchors, targets, prototypes, prototype.MSN_SHARPEN)


def _pmsn_custom_lightly(shape, device):
    module = _lightly_class("PMSNCustomLoss")(
        _uniform, temperature=prototype.MSN_TEMPERATURE, sinkhorn_iterations=prototype.MSN_ITERATIONS,
        regularization_weight=prototype.MSN_WEIGHT,
    ).to(device)  # fmt: skip
    return lambda anchors, targets, prototypes: module(anchors, targets, prototypes, prototype.MSN_SHARPEN)


FAMILIES = {
    "directclr": _harness.Family(
        "directclr",
        _harness._pair_inputs,
        lambda a, b: reference.directclr_loss(a, b, DIRECTCLR_LOSS_DIM, DIRECTCLR_TEMPERATURE),
        lambda a, b, backend: FS.directclr_loss(a, b, DIRECTCLR_LOSS_DIM, DIRECTCLR_TEMPERATURE, backend=backend),
        _directclr_lightly,
    ),
    "detcon_s": _harness.Family(
        "detcon_s",
        _detcon_s_inputs,
        lambda *args: reference.detcon_s_loss(*args, contrastive.DETCON_TEMPERATURE),
        lambda *args, backend: FS.detcon_s_loss(
            *args, contrastive.DETCON_TEMPERATURE, gather_distributed=False, backend=backend
        ),
        _detcon_s_lightly,
    ),
    "ibot_plus_plus": _harness.Family(
        "ibot_plus_plus", _ibot_plus_plus_inputs, _ibot_plus_plus_reference, _ibot_plus_plus_fastssl,
        _ibot_plus_plus_lightly,
    ),  # fmt: skip
    "pmsn": _harness.Family(
        "pmsn", prototype._msn_inputs, _msn_reference_with(_power_law_kl), _pmsn_fastssl, _pmsn_lightly
    ),
    "pmsn_custom": _harness.Family(
        "pmsn_custom", prototype._msn_inputs, _msn_reference_with(_uniform_kl), _pmsn_custom_fastssl,
        _pmsn_custom_lightly,
    ),  # fmt: skip
}


# --------------------------------------------------------------------------------------------
# Roofline costs
# --------------------------------------------------------------------------------------------


def _directclr_cost(shape: Mapping[str, int], dtype: torch.dtype) -> roofline.Cost:
    sliced = roofline.ntxent_cost({"n": shape["n"], "d": min(shape["d"], DIRECTCLR_LOSS_DIM)}, dtype)
    return roofline.Cost(flops=sliced.flops, bytes=sliced.bytes + 2.0 * shape["n"] * shape["d"] * roofline._element_size(dtype))


def _detcon_s_cost(shape: Mapping[str, int], dtype: torch.dtype) -> roofline.Cost:
    rows, d = 2 * shape["b"] * shape["m"], shape["d"]
    return roofline.Cost(flops=6.0 * rows * rows * d, bytes=2.0 * rows * d * roofline._element_size(dtype))


def _ibot_plus_plus_cost(shape: Mapping[str, int], dtype: torch.dtype) -> roofline.Cost:
    elements = shape["images"] * IBOT_TOKENS * shape["k"]
    return roofline.Cost(flops=0.0, bytes=3.0 * elements * roofline._element_size(dtype))


COSTS = {"directclr": _directclr_cost, "detcon_s": _detcon_s_cost, "ibot_plus_plus": _ibot_plus_plus_cost,
         "pmsn": prototype._msn_cost, "pmsn_custom": prototype._msn_cost}  # fmt: skip
LIGHTLY_FILES = {"DetConSLoss": "detcon_loss", "IBOTPlusPlusPatchLoss": "ibot_loss"}

_harness.register_families(FAMILIES, GPU_POINTS, CPU_POINTS, COSTS, LIGHTLY_FILES)


@pytest.mark.parametrize("impl", _harness.impls())
@pytest.mark.parametrize("case", [c for loss in FAMILIES for c in _harness.cases(loss)], ids=lambda c: f"{c.loss}-{c}")
def test_variants(benchmark, case, impl):
    _harness.run_case(benchmark, case, impl)
