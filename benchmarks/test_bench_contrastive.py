"""lightly's other contrastive losses (DCL, DCLW, MACL, DetCon-B, KoLeo) and SupCon, forward +
backward: the textbook reference, its ``torch.compile``, lightly 1.6.0's module (none for SupCon,
which lightly 1.6.0 does not have) and fastssl's default path.

The families, shapes and roofline costs of these losses are registered here, into the tables of
:mod:`benchmarks._harness`, :mod:`benchmarks.roofline` and :mod:`benchmarks.lightly_loader`, so
that every row goes through the same ``run_case`` as the other losses. Hyperparameters are
lightly's defaults (SupCon: the proposed ``SupConLoss(temperature=0.5, rescale=True)``).

``fastssl-triton`` rows (CUDA only) run the torch path for now: these losses have no kernel yet.

Roofline (``s`` the element size, M = 2n rows): DCL, DCLW, SupCon and MACL need NT-Xent's two
M×M×d products (F = 4M²d, B = 2Md·s); DetCon-B (R = 2·b·m rows against as many target columns,
predictions ≠ targets) the logits and both input gradients, F = 6R²d, B = 4Rd·s (read predictions
and targets, write their gradients); KoLeo the n×n cosine product only (the nearest-neighbour
search carries no gradient), F = 2n²d, B = 2nd·s.
"""

from __future__ import annotations

from typing import Mapping

import pytest
import torch
from torch import Tensor

import fastssl.functional as FS
from fastssl import reference

from benchmarks import _harness, lightly_loader, roofline

DCL_TEMPERATURE, DCLW_SIGMA = 0.1, 0.5
SUPCON_TEMPERATURE, SUPCON_CLASSES = 0.5, 100
MACL_TEMPERATURE, MACL_ALPHA, MACL_A0 = 0.1, 0.5, 0.0
DETCON_TEMPERATURE = 0.1
KOLEO_P, KOLEO_EPS = 2, 1e-8

# --------------------------------------------------------------------------------------------
# Shapes: DCL and SupCon at 2N = 8192, d = 128 on a GPU (DESIGN's NT-Xent shape); on a CPU at
# 2N = 4096 and 8192 (where the memory of the matrix-forming implementations shows).
# --------------------------------------------------------------------------------------------

FP32, BF16 = torch.float32, torch.bfloat16
_PAIR_GPU = [({"n": 4096, "d": 128}, BF16), ({"n": 4096, "d": 128}, FP32)]
_PAIR_CPU = [({"n": n, "d": 128}, FP32) for n in (2048, 4096)]

GPU_POINTS = {
    "dcl": _PAIR_GPU,
    "dclw": _PAIR_GPU,
    "supcon": _PAIR_GPU,
    "macl": _PAIR_GPU,
    # DetCon's ImageNet setting: 16 masks per image; 256 images (R = 8192 region rows).
    "detcon_b": [({"b": 256, "m": 16, "d": 128}, BF16)],
    # DINOv2 applies KoLeo per GPU to its class tokens; a large batch and width here.
    "koleo": [({"n": 4096, "d": 1024}, FP32)],
}
CPU_POINTS = {
    "dcl": _PAIR_CPU,
    "dclw": _PAIR_CPU[:1],
    "supcon": _PAIR_CPU,
    "macl": _PAIR_CPU[:1],
    "detcon_b": [({"b": 128, "m": 16, "d": 128}, FP32)],
    "koleo": [({"n": 2048, "d": 384}, FP32)],
}


# --------------------------------------------------------------------------------------------
# Inputs and implementations
# --------------------------------------------------------------------------------------------


def _supcon_inputs(shape: Mapping[str, int], dtype: torch.dtype, device: torch.device) -> tuple:
    a, b = _harness._pair_inputs(shape, dtype, device)
    return a, b, torch.randint(0, SUPCON_CLASSES, (shape["n"],), device=device)


def _detcon_inputs(shape: Mapping[str, int], dtype: torch.dtype, device: torch.device) -> tuple:
    b, m, d = shape["b"], shape["m"], shape["d"]
    features = tuple(_harness._randn((b, m, d), dtype, device, True) for _ in range(4))
    # Mask ids drawn among m: several pooled regions of an image share an id, as with DetCon's
    # sampled masks.
    masks = tuple(torch.randint(0, m, (b, m), device=device) for _ in range(2))
    return features + masks


def _koleo_inputs(shape: Mapping[str, int], dtype: torch.dtype, device: torch.device) -> tuple:
    return (_harness._randn((shape["n"], shape["d"]), dtype, device, True),)


def _lightly(name: str, **kwargs):
    def build(shape, device):
        return lightly_loader.load(name)(**kwargs).to(device)

    return build


def _pair_cost(shape: Mapping[str, int], dtype: torch.dtype) -> roofline.Cost:
    return roofline.ntxent_cost(shape, dtype)


def _detcon_cost(shape: Mapping[str, int], dtype: torch.dtype) -> roofline.Cost:
    rows, d = 2 * shape["b"] * shape["m"], shape["d"]
    return roofline.Cost(flops=6.0 * rows * rows * d, bytes=4.0 * rows * d * roofline._element_size(dtype))


def _koleo_cost(shape: Mapping[str, int], dtype: torch.dtype) -> roofline.Cost:
    n, d = shape["n"], shape["d"]
    return roofline.Cost(flops=2.0 * n * n * d, bytes=2.0 * n * d * roofline._element_size(dtype))


FAMILIES = {
    "dcl": _harness.Family(
        "dcl",
        _harness._pair_inputs,
        lambda a, b: reference.dcl_loss(a, b, DCL_TEMPERATURE),
        lambda a, b, backend: FS.dcl_loss(a, b, DCL_TEMPERATURE, backend=backend),
        _lightly("DCLLoss", temperature=DCL_TEMPERATURE),
    ),
    "dclw": _harness.Family(
        "dclw",
        _harness._pair_inputs,
        lambda a, b: reference.dclw_loss(a, b, DCL_TEMPERATURE, DCLW_SIGMA),
        lambda a, b, backend: FS.dclw_loss(a, b, DCL_TEMPERATURE, DCLW_SIGMA, backend=backend),
        _lightly("DCLWLoss", temperature=DCL_TEMPERATURE, sigma=DCLW_SIGMA),
    ),
    "supcon": _harness.Family(
        "supcon",
        _supcon_inputs,
        lambda a, b, y: reference.supcon_loss(a, b, y, SUPCON_TEMPERATURE),
        lambda a, b, y, backend: FS.supcon_loss(a, b, y, SUPCON_TEMPERATURE, backend=backend),
        None,  # not in lightly 1.6.0
    ),
    "macl": _harness.Family(
        "macl",
        _harness._pair_inputs,
        lambda a, b: reference.macl_loss(a, b, MACL_TEMPERATURE, MACL_ALPHA, MACL_A0),
        lambda a, b, backend: FS.macl_loss(a, b, MACL_TEMPERATURE, MACL_ALPHA, MACL_A0, backend=backend),
        _lightly("MACLLoss", temperature=MACL_TEMPERATURE, alpha=MACL_ALPHA, A_0=MACL_A0),
    ),
    "detcon_b": _harness.Family(
        "detcon_b",
        _detcon_inputs,
        lambda *args: reference.detcon_b_loss(*args, DETCON_TEMPERATURE),
        lambda *args, backend: FS.detcon_b_loss(*args, DETCON_TEMPERATURE, gather_distributed=False, backend=backend),
        _lightly("DetConBLoss", temperature=DETCON_TEMPERATURE, gather_distributed=False),
    ),
    "koleo": _harness.Family(
        "koleo",
        _koleo_inputs,
        lambda x: reference.koleo_loss(x, KOLEO_P, KOLEO_EPS),
        lambda x, backend: FS.koleo_loss(x, KOLEO_P, KOLEO_EPS, backend=backend),
        _lightly("KoLeoLoss", p=KOLEO_P, eps=KOLEO_EPS),
    ),
}

COSTS = {"dcl": _pair_cost, "dclw": _pair_cost, "supcon": _pair_cost, "macl": _pair_cost,
         "detcon_b": _detcon_cost, "koleo": _koleo_cost}
LIGHTLY_FILES = {"DCLLoss": "dcl_loss", "DCLWLoss": "dcl_loss", "MACLLoss": "macl_loss",
                 "DetConBLoss": "detcon_loss", "KoLeoLoss": "koleo_loss"}

_harness.register_families(FAMILIES, GPU_POINTS, CPU_POINTS, COSTS, LIGHTLY_FILES)


@pytest.mark.parametrize("impl", _harness.impls())
@pytest.mark.parametrize("case", [c for loss in FAMILIES for c in _harness.cases(loss)], ids=lambda c: f"{c.loss}-{c}")
def test_contrastive(benchmark, case, impl):
    _harness.run_case(benchmark, case, impl)
