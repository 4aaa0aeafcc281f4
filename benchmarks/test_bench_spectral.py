"""TiCo, FroSSL, MMCR, EMP-SSL, patch kernel alignment and VICRegL, forward + backward: the
textbook reference, its ``torch.compile``, lightly 1.6.0's module and fastssl's default path.

Families, shapes and roofline costs are registered here into the tables of
:mod:`benchmarks._harness` and :mod:`benchmarks.roofline`, so every row goes through the same
``run_case`` as the other losses. lightly's modules come from ``tests/_lightly.py``'s loader
(VICRegL needs ``lightly.models.utils.nearest_neighbors`` and patch kernel alignment a
torchvision import, which :mod:`benchmarks.lightly_loader`'s stand-ins do not provide).
Hyperparameters are lightly's defaults. ``fastssl-triton`` rows (CUDA only) run the torch path:
these losses have no kernel (VICRegL's global term uses the decorrelation kernels).

Shapes: the papers' (GPU) and scaled-down CPU versions. Roofline (``s`` the element size; FLOPs of
the products the torch path cannot avoid, bytes = inputs read once + gradients written once):

* ``tico`` (n, d): the running covariance update ``ẐᵀẐ`` and ``ẐC`` (2·2nd²). B = 4nd·s.
* ``frossl`` (views, n, d): per view a Gram on the smaller side and its gradient product,
  4·n·d·min(n, d). B = 2·views·n·d·s.
* ``mmcr`` (b, k, d): per sample the 2k×2k Gram and its gradient product (2·2·(2k)²d), the
  centroids' min(b, d)² Gram and product (4·b·d·min(b, d)); eigen-decompositions are O(k³), O(b³).
  B = 2·2·b·k·d·s.
* ``emp_ssl`` (views, n, d): per view the smaller-side Gram, its Cholesky (m³/3, m = min(n, d))
  and the gradient's triangular solves (2·n·d·m). B = 2·views·n·d·s.
* ``patch_kernel`` (b, n, d): per image three d×d (or n×n) products and two gradient products,
  10·b·n·d·min(n, d). B = 3·b·n·d·s (student, teacher, student gradient).
* ``vicregl`` (b, d, c): global VICReg of 8 views (8·4·b·d·min(b, d)) and the local VICReg of the
  matched positions (bounded by its global-view share); counted as the global term only.
  B = 2 · (8·b·d + 2·49·b·c + 6·16·b·c)·s.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Mapping

import pytest
import torch

import fastssl.functional as FS
from fastssl import reference

from benchmarks import _harness, roofline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import _lightly  # noqa: E402  (tests/_lightly.py: lightly's loss files without torchvision)

FP32, BF16 = torch.float32, torch.bfloat16
VICREGL_GLOBAL_VIEWS, VICREGL_LOCAL_VIEWS = 2, 6
VICREGL_GLOBAL_GRID, VICREGL_LOCAL_GRID = 7, 4

GPU_POINTS = {
    "tico": [({"n": 1024, "d": 8192}, FP32), ({"n": 1024, "d": 8192}, BF16)],  # ResNet-50, 8192-d projector
    "frossl": [({"views": 8, "n": 256, "d": 1024}, FP32)],
    "mmcr": [({"b": 256, "k": 16, "d": 512}, FP32)],  # MMCR ImageNet: 16 views per sample... per GPU batch
    "emp_ssl": [({"views": 20, "n": 256, "d": 1024}, FP32)],  # 20 patches, 1024-d
    "patch_kernel": [({"b": 64, "n": 196, "d": 384}, FP32), ({"b": 64, "n": 196, "d": 768}, BF16)],  # ViT-S/B
    "vicregl": [({"b": 256, "d": 8192, "c": 512}, FP32)],
}
CPU_POINTS = {
    "tico": [({"n": 256, "d": 1024}, FP32), ({"n": 512, "d": 256}, FP32)],
    "frossl": [({"views": 2, "n": 256, "d": 1024}, FP32), ({"views": 4, "n": 512, "d": 128}, FP32)],
    "mmcr": [({"b": 64, "k": 4, "d": 512}, FP32)],
    "emp_ssl": [({"views": 8, "n": 64, "d": 512}, FP32), ({"views": 8, "n": 512, "d": 64}, FP32)],
    "patch_kernel": [({"b": 8, "n": 196, "d": 64}, FP32), ({"b": 8, "n": 64, "d": 384}, FP32)],
    "vicregl": [({"b": 32, "d": 512, "c": 128}, FP32)],
}


# --------------------------------------------------------------------------------------------
# Inputs and implementations
# --------------------------------------------------------------------------------------------


def _randn(shape, dtype, device):
    return _harness._randn(shape, dtype, device, True)


def _tico_inputs(shape, dtype, device):
    a, b = _harness._pair_inputs(shape, dtype, device)
    # a running covariance from an earlier step (detached), as in training
    z = torch.nn.functional.normalize(torch.randn(shape["n"], shape["d"], device=device), dim=1)
    return a, b, (z.T @ z / shape["n"])


def _views_inputs(shape, dtype, device):
    return ([_randn((shape["n"], shape["d"]), dtype, device) for _ in range(shape["views"])],)


def _mmcr_inputs(shape, dtype, device):
    return tuple(_randn((shape["b"], shape["k"], shape["d"]), dtype, device) for _ in range(2))


def _patch_inputs(shape, dtype, device):
    return _randn((shape["b"], shape["n"], shape["d"]), dtype, device), torch.randn(
        shape["b"], shape["n"], shape["d"], device=device
    ).to(dtype)


def _vicregl_inputs(shape, dtype, device):
    b, d, c = shape["b"], shape["d"], shape["c"]
    features, grids = [], []
    for v in range(VICREGL_GLOBAL_VIEWS + VICREGL_LOCAL_VIEWS):
        g = VICREGL_GLOBAL_GRID if v < VICREGL_GLOBAL_VIEWS else VICREGL_LOCAL_GRID
        features.append((_randn((b, d), dtype, device), _randn((b, g, g, c), dtype, device)))
        grids.append(torch.rand(b, g, g, 2, device=device))
    return features, grids


def _split(features, grids):
    n = VICREGL_GLOBAL_VIEWS
    return features[:n], grids[:n], features[n:], grids[n:]


def _lightly_module(name, call, **kwargs):
    def build(shape, device):
        classes = _lightly.load()
        if classes is None:
            raise ImportError("lightly is not installed or its loss files cannot be imported")
        module = getattr(classes, name)(**kwargs).to(device)
        return lambda *args: call(module, *args)

    return build


def _tico_lightly_call(module, a, b, covariance):
    module.C = covariance.to(a.dtype)  # the same running covariance for every implementation
    return module(a, b)


FAMILIES = {
    "tico": _harness.Family(
        "tico",
        _tico_inputs,
        lambda a, b, c: reference.tico_loss(a, b, c.to(a.dtype))[0],
        lambda a, b, c, backend: FS.tico_loss(a, b, c, backend=backend)[0],
        _lightly_module("TiCoLoss", _tico_lightly_call),
    ),
    "frossl": _harness.Family(
        "frossl",
        _views_inputs,
        lambda views: reference.frossl_loss(views),
        lambda views, backend: FS.frossl_loss(views, backend=backend),
        _lightly_module("FroSSLLoss", lambda m, views: m(views)),
    ),
    "mmcr": _harness.Family(
        "mmcr",
        _mmcr_inputs,
        lambda online, momentum: reference.mmcr_loss(online, momentum),
        lambda online, momentum, backend: FS.mmcr_loss(online, momentum, backend=backend),
        _lightly_module("MMCRLoss", lambda m, online, momentum: m(online, momentum)),
    ),
    "emp_ssl": _harness.Family(
        "emp_ssl",
        _views_inputs,
        lambda views: reference.emp_ssl_loss(views),
        lambda views, backend: FS.emp_ssl_loss(views, backend=backend),
        _lightly_module("EMPSSLLoss", lambda m, views: m(views)),
    ),
    "patch_kernel": _harness.Family(
        "patch_kernel",
        _patch_inputs,
        lambda s, t: reference.patch_kernel_alignment_loss(s, t),
        lambda s, t, backend: FS.patch_kernel_alignment_loss(s, t, backend=backend),
        _lightly_module("PatchKernelAlignmentLoss", lambda m, s, t: m(s, t)),
    ),
    "vicregl": _harness.Family(
        "vicregl",
        _vicregl_inputs,
        lambda features, grids: reference.vicregl_loss(*_split(features, grids)),
        lambda features, grids, backend: FS.vicregl_loss(*_split(features, grids), backend=backend),
        _lightly_module("VICRegLLoss", lambda m, features, grids: m(*_split(features, grids)).reshape(())),
    ),
}


def _s(dtype):
    return roofline._element_size(dtype)


def _tico_cost(shape: Mapping[str, int], dtype) -> roofline.Cost:
    n, d = shape["n"], shape["d"]
    return roofline.Cost(flops=4.0 * n * d * d, bytes=4.0 * n * d * _s(dtype))


def _views_gram_cost(shape, dtype) -> roofline.Cost:
    v, n, d = shape["views"], shape["n"], shape["d"]
    return roofline.Cost(flops=4.0 * v * n * d * min(n, d), bytes=2.0 * v * n * d * _s(dtype))


def _emp_ssl_cost(shape, dtype) -> roofline.Cost:
    v, n, d = shape["views"], shape["n"], shape["d"]
    m = min(n, d)
    return roofline.Cost(flops=v * (2.0 * n * d * m + m**3 / 3 + 2.0 * n * d * m), bytes=2.0 * v * n * d * _s(dtype))


def _mmcr_cost(shape, dtype) -> roofline.Cost:
    b, k, d = shape["b"], shape["k"], shape["d"]
    flops = 4.0 * b * (2 * k) ** 2 * d + 4.0 * b * d * min(b, d)
    return roofline.Cost(flops=flops, bytes=4.0 * b * k * d * _s(dtype))


def _patch_cost(shape, dtype) -> roofline.Cost:
    b, n, d = shape["b"], shape["n"], shape["d"]
    return roofline.Cost(flops=10.0 * b * n * d * min(n, d), bytes=3.0 * b * n * d * _s(dtype))


def _vicregl_cost(shape, dtype) -> roofline.Cost:
    b, d, c = shape["b"], shape["d"], shape["c"]
    views = VICREGL_GLOBAL_VIEWS + VICREGL_LOCAL_VIEWS
    local = VICREGL_GLOBAL_VIEWS * VICREGL_GLOBAL_GRID**2 + VICREGL_LOCAL_VIEWS * VICREGL_LOCAL_GRID**2
    return roofline.Cost(flops=views * 4.0 * b * d * min(b, d), bytes=2.0 * (views * b * d + local * b * c) * _s(dtype))


COSTS = {"tico": _tico_cost, "frossl": _views_gram_cost, "mmcr": _mmcr_cost, "emp_ssl": _emp_ssl_cost,
         "patch_kernel": _patch_cost, "vicregl": _vicregl_cost}  # fmt: skip

_harness.register_families(FAMILIES, GPU_POINTS, CPU_POINTS, COSTS)


@pytest.mark.parametrize("impl", _harness.impls())
@pytest.mark.parametrize("case", [c for loss in FAMILIES for c in _harness.cases(loss)], ids=lambda c: f"{c.loss}-{c}")
def test_spectral(benchmark, case, impl):
    _harness.run_case(benchmark, case, impl)
