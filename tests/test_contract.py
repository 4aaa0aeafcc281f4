"""The contract every backend keeps, tested across families where it is one rule in one place.

* The ``reference`` backend's dtype rule (:func:`fastssl._backend.run_reference`): the textbook
  formula in float32 for float16/bfloat16 inputs, in the promoted dtype for views of different
  dtypes, gradients in each input's dtype, the loss as a 0-d float32 tensor.
* Scale: float32 inputs of any finite magnitude give the float64 value of the scale-invariant
  losses (cosine, BYOL, center penalty, Barlow Twins) on every backend.
* Arguments: NumPy scalars are hyperparameters as lightly takes them; ``dim`` and devices of
  the negative cosine similarity; VICReg's shape message.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastssl
import fastssl.functional as FS
from fastssl import reference
from fastssl._backend import reference_dtype, run_reference
from fastssl._checks import BatchShapeError, DimensionError

from _helpers import TRITON_DEVICES, assert_matches_reference, awkward_inputs

HALF = [torch.float16, torch.bfloat16]
# One rounding to the dtype (the unit roundoff, 2^-p): a gradient computed in float32 and
# rounded once is within this of the float64 one; one computed in half precision is not.
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}

# --------------------------------------------------------------------------------------------
# The reference backend's dtype rule
# --------------------------------------------------------------------------------------------

PAIR_LOSSES = {
    "barlow_twins": (lambda a, b, backend: FS.barlow_twins_loss(a, b, backend=backend), reference.barlow_twins_loss),
    "vicreg": (lambda a, b, backend: FS.vicreg_loss(a, b, backend=backend), reference.vicreg_loss),
    "negative_cosine": (
        lambda a, b, backend: FS.negative_cosine_similarity(a, b, backend=backend),
        reference.negative_cosine_similarity,
    ),
    "byol": (lambda a, b, backend: FS.byol_loss(a, b, backend=backend), reference.byol_loss),
    "center_penalty": (
        lambda a, b, backend: FS.center_penalty_loss(a, b, backend=backend),
        reference.center_penalty_loss,
    ),
}


def _value_and_grads(fn, inputs):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    value = fn(*leaves)
    return value.detach(), torch.autograd.grad(value, leaves)


def _assert_float32_accurate(fn, formula, inputs):
    """``fn(*inputs)`` as accurate as float32 arithmetic on the inputs' values: the loss within
    float32 precision of the float64 formula, each gradient within one rounding to its dtype."""
    value, grads = _value_and_grads(fn, inputs)
    exact, exact_grads = _value_and_grads(formula, [x.double() for x in inputs])
    assert value.dtype == torch.float32 and value.shape == torch.Size([])
    assert abs(value.item() - exact.item()) <= 1e-5 * max(1.0, abs(exact.item())), (value.item(), exact.item())
    for g, g64, x in zip(grads, exact_grads, inputs):
        assert g.dtype == x.dtype
        bound = 2 * UNIT_ROUNDOFF[x.dtype] * g64.abs() + 1e-5 * g64.abs().max()
        assert ((g.double() - g64).abs() <= bound).all(), (g.double() - g64).abs().max().item()


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name", list(PAIR_LOSSES))
def test_reference_backend_computes_half_inputs_in_float32(name, dtype):
    fn, formula = PAIR_LOSSES[name]
    inputs = awkward_inputs(9, 37, dtype=dtype)
    _assert_float32_accurate(lambda a, b: fn(a, b, "reference"), formula, inputs)


@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float32), (torch.bfloat16, torch.float16),
                                    (torch.float32, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("name", list(PAIR_LOSSES))
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_views_of_different_dtypes(name, dtypes, backend):
    fn, formula = PAIR_LOSSES[name]
    a, b = awkward_inputs(6, 11)
    inputs = [a.to(dtypes[0]), b.to(dtypes[1])]
    _assert_float32_accurate(lambda x, y: fn(x, y, backend), formula, inputs)


def test_reference_dtype_rule():
    half, bf16 = torch.ones(2, 3, dtype=torch.float16), torch.ones(2, 3, dtype=torch.bfloat16)
    assert reference_dtype(half, half) == torch.float32
    assert reference_dtype(half, bf16) == torch.float32
    assert reference_dtype([half, half], torch.ones(3, dtype=torch.float64)) == torch.float64
    # 0-d tensors (a learnable temperature) follow the inputs; integer tensors do not count
    assert reference_dtype(half, torch.tensor(0.5, dtype=torch.float64)) == torch.float32
    assert reference_dtype(half, torch.arange(3), labels=torch.arange(2)) == torch.float32
    assert reference_dtype(torch.ones(2, dtype=torch.float64)) == torch.float64


def test_run_reference_casts_nested_arguments_and_keeps_the_rest():
    seen = {}

    def formula(views, center, labels, temperature, *, scale):
        seen.update(views=[v.dtype for v in views], center=center.dtype, labels=labels.dtype,
                    temperature=temperature.dtype, scale=scale)
        return (views[0] * temperature).sum() * scale, labels

    views = [torch.randn(3, 4, dtype=torch.float16, requires_grad=True) for _ in range(2)]
    temperature = torch.tensor(0.5, requires_grad=True)
    loss, labels = run_reference(formula, views, torch.zeros(4), torch.arange(3), temperature, scale=2)
    assert seen == dict(views=[torch.float32] * 2, center=torch.float32, labels=torch.int64,
                        temperature=torch.float32, scale=2)
    assert loss.dtype == torch.float32 and labels.dtype == torch.int64
    loss.backward()
    assert views[0].grad.dtype == torch.float16 and temperature.grad is not None


# The formulas of the other families through the same helper: where the bare formula at half
# precision crashes or returns NaN, one call of run_reference gives the float32 value.


def test_run_reference_makes_the_dino_formula_take_half_views_with_a_float32_center():
    teacher = [torch.randn(4, 16, dtype=torch.float16) for _ in range(2)]
    student = [torch.randn(4, 16, dtype=torch.float16, requires_grad=True) for _ in range(3)]
    center = 0.1 * torch.randn(16)
    loss = run_reference(reference.dino_loss, teacher, student, center, 0.04, 0.1)
    expected = reference.dino_loss([t.double() for t in teacher], [s.double() for s in student], center.double(), 0.04, 0.1)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(s.grad.dtype == torch.float16 and torch.isfinite(s.grad).all() for s in student)


def test_run_reference_makes_the_wmse_formula_take_half_inputs():
    x = torch.randn(32, 4, dtype=torch.float16)
    with pytest.raises(RuntimeError):
        reference.wmse_loss(x, 2, 16, 1, 0.0)  # the bare formula: no half-precision Cholesky
    loss = run_reference(reference.wmse_loss, x, 2, 16, 1, 0.0)
    expected = reference.wmse_loss(x.double(), 2, 16, 1, 0.0)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-5)


def test_run_reference_keeps_sinkhorn_finite_in_float16():
    scores = (4.0 * torch.rand(8, 5) - 2.0).half()  # |S|/ε up to 40: e^40 overflows float16
    assert not torch.isfinite(reference.sinkhorn(scores, 3, 0.05)).all()
    codes = run_reference(reference.sinkhorn, scores, 3, 0.05)
    assert codes.dtype == torch.float32
    torch.testing.assert_close(codes.double(), reference.sinkhorn(scores.double(), 3, 0.05), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Scale: float32 inputs of extreme magnitude
# --------------------------------------------------------------------------------------------

SCALES = [1e19, 1e36, 1e-19]


def _scaled_pair(scale: float, n: int = 24, d: int = 33):
    a = torch.randn(n, d)
    b = a + 0.7 * torch.randn(n, d)  # correlated views: every term of every loss is non-trivial
    return [(a * scale).float(), (b * scale).float()]


SCALE_CASES = [
    ("negative_cosine", lambda backend: lambda a, b: FS.negative_cosine_similarity(a, b, backend=backend),
     reference.negative_cosine_similarity),
    ("negative_cosine_eps0", lambda backend: lambda a, b: FS.negative_cosine_similarity(a, b, eps=0.0, backend=backend),
     lambda a, b: reference.negative_cosine_similarity(a, b, eps=0.0)),
    ("byol", lambda backend: lambda a, b: FS.byol_loss(a, b, backend=backend), reference.byol_loss),
    ("center_penalty", lambda backend: lambda a, b: FS.center_penalty_loss(a, b, backend=backend),
     reference.center_penalty_loss),
    ("barlow_twins_gram", lambda backend: lambda a, b: FS.barlow_twins_loss(a, b, backend=backend, path="gram"),
     reference.barlow_twins_loss),
    ("barlow_twins_cross", lambda backend: lambda a, b: FS.barlow_twins_loss(a, b, backend=backend, path="cross"),
     reference.barlow_twins_loss),
]


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("name,make,formula", SCALE_CASES, ids=[c[0] for c in SCALE_CASES])
def test_scale_invariant_losses_at_extreme_float32_magnitudes(name, make, formula, backend, scale):
    # atol 0: gradients of inputs near 1e19 are near 1e-19, and must be right relative to that
    assert_matches_reference(make(backend), formula, _scaled_pair(scale), rtol=2e-5, atol=0.0)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("path", ["gram", "cross"])
def test_barlow_twins_triton_at_extreme_float32_magnitudes(path, scale, device):
    inputs = [x.to(device) for x in _scaled_pair(scale, n=20, d=17)]
    assert_matches_reference(
        lambda a, b: FS.barlow_twins_loss(a, b, backend="triton", path=path),
        reference.barlow_twins_loss, inputs, rtol=2e-5, atol=0.0,
    )


def test_cosine_formula_keeps_pytorchs_clamped_norm_gradient():
    # Below eps the norm is clamped in value only; lightly's F.cosine_similarity differentiates
    # it unclamped, and the reference (the oracle of every backend) must do the same.
    a = (1e-10 * torch.randn(5, 7, dtype=torch.float64)).requires_grad_()
    b = torch.randn(5, 7, dtype=torch.float64).requires_grad_()
    ours = reference.negative_cosine_similarity(a, b, eps=1e-8)
    theirs = -torch.nn.functional.cosine_similarity(a, b, eps=1e-8).mean()
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
    for g, h in zip(torch.autograd.grad(ours, [a, b]), torch.autograd.grad(theirs, [a, b])):
        torch.testing.assert_close(g, h, rtol=1e-10, atol=0)


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------

NUMPY_MODULES = [
    ("BarlowTwinsLoss", dict(lambda_param=np.float32(5e-3)), dict(lambda_param=5e-3), 2),
    ("VICRegLoss", dict(lambda_param=np.float32(25), mu_param=np.float64(25), nu_param=np.int64(1), eps=np.float32(1e-4)),
     dict(lambda_param=25.0, mu_param=25.0, nu_param=1.0, eps=float(np.float32(1e-4))), 2),
    ("NegativeCosineSimilarity", dict(dim=np.int64(1), eps=np.float32(1e-8)), dict(dim=1, eps=float(np.float32(1e-8))), 2),
    ("CenterPenaltyLoss", dict(lambda_param=np.float32(-1)), dict(lambda_param=-1.0), 2),
    ("NTXentLoss", dict(temperature=np.float32(0.5)), dict(temperature=0.5), 2),
    ("SwaVLoss", dict(temperature=np.float32(0.1), sinkhorn_iterations=np.int64(3), sinkhorn_epsilon=np.float32(0.05)),
     dict(temperature=float(np.float32(0.1)), sinkhorn_iterations=3, sinkhorn_epsilon=float(np.float32(0.05))), "swav"),
]


@pytest.mark.parametrize("name,numpy_kwargs,python_kwargs,call", NUMPY_MODULES, ids=[c[0] for c in NUMPY_MODULES])
def test_numpy_scalar_hyperparameters_are_accepted(name, numpy_kwargs, python_kwargs, call):
    a, b = torch.randn(8, 6), torch.randn(8, 6)
    with_numpy, with_python = getattr(fastssl, name)(**numpy_kwargs), getattr(fastssl, name)(**python_kwargs)
    if call == "swav":
        a, b = a.softmax(dim=1), b.softmax(dim=1)
        assert torch.equal(with_numpy([a, b], []), with_python([a, b], []))
    else:
        assert torch.equal(with_numpy(a, b), with_python(a, b))


@pytest.mark.parametrize("value", [np.float32(0.5), np.float64(0.5), np.int64(2), np.float16(0.5), np.array(0.5)])
def test_check_finite_takes_numpy_scalars(value):
    from fastssl._checks import check_finite

    result = check_finite("x", value)
    assert type(result) is float and result == float(value)


@pytest.mark.parametrize("value", [True, np.bool_(True), "0.5", np.array([0.5, 1.0]), None])
def test_check_finite_rejects_what_is_not_a_real_scalar(value):
    from fastssl._checks import check_finite

    with pytest.raises(TypeError, match="x must be a real number"):
        check_finite("x", value)


def test_negative_cosine_similarity_validates_dim():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    for dim in (2, -3):
        with pytest.raises(DimensionError, match=r"dim=.* out of range .* 2 dimension"):
            FS.negative_cosine_similarity(a, b, dim=dim)
    with pytest.raises(IndexError):  # PyTorch's (and lightly's) type for this error
        fastssl.NegativeCosineSimilarity(dim=5)(a, b)
    for bad in (1.0, True, "1"):
        with pytest.raises(TypeError, match="dim must be an int"):
            fastssl.NegativeCosineSimilarity(dim=bad)
    # a negative dim in range is PyTorch's, and the same loss as its positive twin
    torch.testing.assert_close(FS.negative_cosine_similarity(a, b, dim=-1), FS.negative_cosine_similarity(a, b, dim=1))
    torch.testing.assert_close(FS.negative_cosine_similarity(a, b, dim=0),
                               -torch.nn.functional.cosine_similarity(a, b, dim=0).mean())


def test_negative_cosine_similarity_validates_devices():
    with pytest.raises(ValueError, match="same device"):
        FS.negative_cosine_similarity(torch.randn(4, 3), torch.randn(4, 3, device="meta"))


def test_vicreg_positions_shape_mismatch_names_both_shapes():
    for shape_b in [(4, 5, 8), (4, 8), (4, 3, 2, 8)]:
        with pytest.raises(BatchShapeError, match=r"same shape.*\(4, 3, 8\) and " + repr(shape_b).replace("(", r"\(").replace(")", r"\)")):
            fastssl.VICRegLoss()(torch.randn(4, 3, 8), torch.randn(*shape_b))
    with pytest.raises(AssertionError):  # lightly asserts this condition
        FS.vicreg_loss(torch.randn(4, 8), torch.randn(4, 3, 8))


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("path", ["gram", "cross"])
def test_barlow_twins_torch_statistics_of_float32_reductions(path, scale, monkeypatch):
    """The torch path's rule for devices whose reductions accumulate in float32 (CUDA): columns
    scaled by a power of two before the variance. Run here on CPU tensors by taking that branch."""
    from fastssl import decorrelation

    monkeypatch.setattr(decorrelation, "_reductions_accumulate_in_float64", lambda device: False)
    assert_matches_reference(
        lambda a, b: FS.barlow_twins_loss(a, b, backend="torch", path=path),
        reference.barlow_twins_loss, _scaled_pair(scale), rtol=2e-5, atol=0.0,
    )
