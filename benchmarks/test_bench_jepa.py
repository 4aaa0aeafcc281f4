"""SIGReg, LeJEPA, LeWM and VISReg, forward + backward: the textbook reference, its
``torch.compile``, lightly 1.6.0's module and fastssl's default path.

Registered into :mod:`benchmarks._harness` and :mod:`benchmarks.roofline` as the other families
(lightly's modules through ``tests/_lightly.py``'s loader). The reference and fastssl receive the
case's random unit directions; lightly draws its own (the same work). Hyperparameters are
lightly's defaults except the number of directions, which is the case's ``s`` (SIGReg: 1024,
VISReg: 2048 as lightly's ImageNet benchmark runs it).

Roofline (``s`` the element size, M = views·n samples, S directions, K = 17 frequencies):

* ``sigreg`` / ``lejepa`` (views, n, d, s): the projection and its gradient product
  (2·2·M·d·S); the M·S·K cosines and sines are charged as nothing (special functions), so the
  floor is that of the products. B = 2·M·d·s.
* ``lewm`` (b, t, d, s): as SIGReg with M = b·t, plus the prediction error. B = 4·b·t·d·s.
* ``visreg`` (views, n, d, s): the projection and its gradient (2·2·M·d·S); the sort is charged
  as nothing. B = 2·M·d·s.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import fastssl.functional as FS
from fastssl import reference

from benchmarks import _harness, roofline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import _lightly  # noqa: E402  (tests/_lightly.py: lightly's loss files without torchvision)

FP32, BF16 = torch.float32, torch.bfloat16
GLOBAL_VIEWS = 2

GPU_POINTS = {
    # LeJEPA ViT recipe: 2 global + 8 local views, a per-GPU batch of 256, 512-d projections
    "sigreg": [({"views": 10, "n": 256, "d": 512, "s": 1024}, FP32), ({"views": 10, "n": 256, "d": 512, "s": 1024}, BF16)],
    "lejepa": [({"views": 10, "n": 256, "d": 512, "s": 1024}, FP32)],
    "lewm": [({"b": 128, "t": 4, "d": 192, "s": 1024}, FP32)],  # LeWorldModel: history 3 + 1, 192-d
    "visreg": [({"views": 10, "n": 256, "d": 512, "s": 2048}, FP32)],
}
CPU_POINTS = {
    "sigreg": [({"views": 8, "n": 64, "d": 128, "s": 1024}, FP32)],  # lightly's example sizes
    "lejepa": [({"views": 8, "n": 64, "d": 128, "s": 1024}, FP32)],
    "lewm": [({"b": 64, "t": 4, "d": 192, "s": 1024}, FP32)],
    "visreg": [({"views": 8, "n": 64, "d": 128, "s": 2048}, FP32)],
}


def _directions(d, s, device):
    a = torch.randn(d, s, device=device)
    return a / a.norm(dim=0)


def _proj_inputs(shape, dtype, device):
    proj = _harness._randn((shape["views"], shape["n"], shape["d"]), dtype, device, True)
    return proj, _directions(shape["d"], shape["s"], device)


def _split_inputs(shape, dtype, device):
    local = _harness._randn((shape["views"] - GLOBAL_VIEWS, shape["n"], shape["d"]), dtype, device, True)
    glob = _harness._randn((GLOBAL_VIEWS, shape["n"], shape["d"]), dtype, device, True)
    return local, glob, _directions(shape["d"], shape["s"], device)


def _lewm_inputs(shape, dtype, device):
    b, t, d = shape["b"], shape["t"], shape["d"]
    embeddings = _harness._randn((b, t, d), dtype, device, True)
    predicted = _harness._randn((b, t - 1, d), dtype, device, True)
    return predicted, embeddings, _directions(d, shape["s"], device)


def _lightly_module(name, call, slices_argument):
    def build(shape, device):
        classes = _lightly.load()
        if classes is None:
            raise ImportError("lightly is not installed or its loss files cannot be imported")
        module = getattr(classes, name)(**{slices_argument: shape["s"]}).to(device)
        return lambda *args: call(module, *args)

    return build


FAMILIES = {
    "sigreg": _harness.Family(
        "sigreg",
        _proj_inputs,
        lambda proj, a: reference.sigreg_loss(proj, a.to(proj.dtype)),
        lambda proj, a, backend: FS.sigreg_loss(proj, directions=a, backend=backend),
        _lightly_module("SIGReg", lambda m, proj, a: m(proj), "num_vectors"),
    ),
    "lejepa": _harness.Family(
        "lejepa",
        _split_inputs,
        lambda local, glob, a: reference.lejepa_loss(local, glob, a.to(local.dtype)),
        lambda local, glob, a, backend: FS.lejepa_loss(local, glob, directions=a, backend=backend),
        _lightly_module("LeJEPALoss", lambda m, local, glob, a: m(local_proj=local, global_proj=glob), "sigreg_num_vectors"),
    ),
    "lewm": _harness.Family(
        "lewm",
        _lewm_inputs,
        lambda pred, emb, a: reference.lewm_loss(pred, emb[:, 1:], emb, a.to(pred.dtype)),
        lambda pred, emb, a, backend: FS.lewm_loss(pred, emb[:, 1:], emb, directions=a, backend=backend),
        _lightly_module("LeWMLoss", lambda m, pred, emb, a: m(predicted=pred, target=emb[:, 1:], embeddings=emb),
                        "sigreg_num_vectors"),  # fmt: skip
    ),
    "visreg": _harness.Family(
        "visreg",
        _split_inputs,
        lambda local, glob, a: reference.visreg_components(local, glob, a.to(local.dtype))[0],
        lambda local, glob, a, backend: FS.visreg_loss(local, glob, slices=a, backend=backend),
        _lightly_module("VISRegLoss", lambda m, local, glob, a: m(local_proj=local, global_proj=glob), "num_slices"),
    ),
}


def _projection_cost(samples, d, s, dtype, bytes_factor=2.0) -> roofline.Cost:
    return roofline.Cost(flops=4.0 * samples * d * s, bytes=bytes_factor * samples * d * roofline._element_size(dtype))


COSTS = {
    "sigreg": lambda shape, dtype: _projection_cost(shape["views"] * shape["n"], shape["d"], shape["s"], dtype),
    "lejepa": lambda shape, dtype: _projection_cost(shape["views"] * shape["n"], shape["d"], shape["s"], dtype),
    "lewm": lambda shape, dtype: _projection_cost(shape["b"] * shape["t"], shape["d"], shape["s"], dtype, 4.0),
    "visreg": lambda shape, dtype: _projection_cost(shape["views"] * shape["n"], shape["d"], shape["s"], dtype),
}

_harness.register_families(FAMILIES, GPU_POINTS, CPU_POINTS, COSTS)


@pytest.mark.parametrize("impl", _harness.impls())
@pytest.mark.parametrize("case", [c for loss in FAMILIES for c in _harness.cases(loss)], ids=lambda c: f"{c.loss}-{c}")
def test_jepa(benchmark, case, impl):
    _harness.run_case(benchmark, case, impl)
