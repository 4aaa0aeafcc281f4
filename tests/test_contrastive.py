"""DCL, DCLW, DirectCLR, MACL, DetCon-S/B, SupCon and KoLeo: the torch path against the float64
reference, the modules against lightly 1.6.0's own classes, the chunked primitive's memory, the
errors, and ``gather_distributed`` on gloo with 2 and 3 processes.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fastssl
import fastssl.functional as FS
from fastssl import contrastive, reference
import _lightly
from _helpers import assert_matches_reference, awkward_inputs, assert_numpy_hyperparameters_accepted



@pytest.fixture
def small_chunks(monkeypatch):
    """Three or four row chunks at every size (one row each below 3 rows): the chunk loop, its
    seams and the recomputing backward are exercised instead of the single kept chunk."""
    monkeypatch.setattr(contrastive, "_rows_per_chunk", lambda n_rows, n_cols, chunk_rows: max(1, n_rows // 3))


@pytest.fixture(scope="module")
def lightly():
    loaded = _lightly.load()
    if loaded is None:
        pytest.skip("lightly 1.6.0 is not installed (pip install --no-deps lightly==1.6.0)")
    return loaded


def _masks(b: int, m: int, ids: int) -> tuple:
    return torch.randint(0, ids, (b, m)), torch.randint(0, ids, (b, m))


def _atol(temperature: float) -> float:
    """Absolute floor of a comparison: float32 rounding (a few ulps) of logits of size 1/|τ|,
    which matters where the exact loss or gradient is 0 (one column per row, d = 1) and the
    relative part of the tolerance vanishes."""
    return 2e-6 * max(1.0, 1.0 / abs(temperature))


def _weight_fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A differentiable, asymmetric weight function: gradients flow through it, and the two calls
    (view 0 first, view 1 first) differ."""
    return 1.0 + (a - 0.5 * b).pow(2).sum(dim=1)


# --------------------------------------------------------------------------------------------
# The torch path against the float64 reference
# --------------------------------------------------------------------------------------------

SHAPES = [(2, 1), (2, 3), (3, 129), (3, 2), (17, 5)]

# (dtype, chunking): float32 on both the kept single chunk and small recomputed chunks, each half
# precision on one of them.
PRECISIONS = [
    pytest.param(torch.float32, "single", id="float32-single"),
    pytest.param(torch.float32, "small", id="float32-small"),
    pytest.param(torch.bfloat16, "small", id="bfloat16-small"),
    pytest.param(torch.float16, "single", id="float16-single"),
]


@pytest.mark.parametrize("dtype,chunks", PRECISIONS)
@pytest.mark.parametrize("n,d", SHAPES)
def test_dcl_and_dclw_match_reference(n, d, dtype, chunks, request):
    if chunks == "small":
        request.getfixturevalue("small_chunks")
    for i, temperature in enumerate((0.1, 1.0, -0.7)):
        a, b = awkward_inputs(n, d, dtype=dtype, non_contiguous=(i % 2 == 0))
        assert_matches_reference(
            lambda x, y: FS.dcl_loss(x, y, temperature, backend="torch"),
            lambda x, y: reference.dcl_loss(x, y, temperature),
            [a, b],
            atol=_atol(temperature),
        )
        assert_matches_reference(
            lambda x, y: FS.dclw_loss(x, y, temperature, sigma=0.3, backend="torch"),
            lambda x, y: reference.dclw_loss(x, y, temperature, 0.3),
            [a, b],
            atol=_atol(temperature),
        )
    a, b = awkward_inputs(n, d, dtype=dtype)
    assert_matches_reference(
        lambda x, y: FS.dcl_loss(x, y, 0.2, _weight_fn, backend="torch"),
        lambda x, y: reference.dcl_loss(x, y, 0.2, _weight_fn),
        [a, b],
        atol=_atol(0.2),
    )


@pytest.mark.parametrize("dtype,chunks", PRECISIONS)
@pytest.mark.parametrize("n,d", [(1, 3)] + SHAPES)
def test_supcon_matches_reference(n, d, dtype, chunks, request):
    if chunks == "small":
        request.getfixturevalue("small_chunks")
    label_sets = [None, torch.zeros(n, dtype=torch.long), torch.arange(n), torch.randint(0, 3, (n,))]
    for i, labels in enumerate(label_sets):
        temperature, rescale = [(0.5, True), (0.07, False), (-1.0, True), (2.0, False)][i]
        a, b = awkward_inputs(n, d, dtype=dtype, non_contiguous=(i % 2 == 0))
        # The positive term comes from class sums, not from the log-sum-exp's own product: the
        # two agree to float32 precision of logits of size 1/|τ| (a loss of exactly 0, as at
        # N = 1 with one class, is then reached within that).
        assert_matches_reference(
            lambda x, y: FS.supcon_loss(x, y, labels, temperature, rescale, backend="torch"),
            lambda x, y: reference.supcon_loss(x, y, labels, temperature, rescale),
            [a, b],
            atol=1e-6 if rescale else _atol(temperature),
        )


def test_supcon_float_labels_group_by_value():
    a, b = awkward_inputs(6, 4)
    labels_int = torch.tensor([3, 1, 3, 7, 1, 1])
    labels_float = torch.tensor([0.5, -2.0, 0.5, 9.25, -2.0, -2.0])
    expected = FS.supcon_loss(a, b, labels_int, 0.3, backend="reference")
    assert FS.supcon_loss(a, b, labels_float, 0.3, backend="torch").item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("dtype,chunks", PRECISIONS)
@pytest.mark.parametrize("n,d", [(1, 3)] + SHAPES)
def test_macl_matches_reference(n, d, dtype, chunks, request):
    if chunks == "small":
        request.getfixturevalue("small_chunks")

    def ref(x, y, *args):
        # In float16, 1 - P + 1e-8 rounds to 0 wherever P rounds to 1 and the textbook formula
        # gives NaN: PyTorch's error for float16 inputs is measured with the formula in float32.
        if x.dtype == torch.float16:
            x, y = x.float(), y.float()
        return reference.macl_loss(x, y, *args)

    for i, (temperature, alpha, a_0) in enumerate([(0.1, 0.5, 0.0), (0.5, 1.0, 0.3), (0.05, 0.0, 1.0)]):
        a, b = awkward_inputs(n, d, dtype=dtype, non_contiguous=(i % 2 == 0))
        assert_matches_reference(
            lambda x, y: FS.macl_loss(x, y, temperature, alpha, a_0, backend="torch"),
            lambda x, y: ref(x, y, temperature, alpha, a_0),
            [a, b],
            atol=_atol(temperature),
        )


def test_macl_single_sample_is_exactly_zero():
    """One positive and no negative: log P = 0 exactly (lightly's value), although V = 1/ε."""
    a, b = torch.randn(1, 8), torch.randn(1, 8)
    assert FS.macl_loss(a, b, backend="torch").item() == 0.0


@pytest.mark.parametrize("dtype,chunks", PRECISIONS)
@pytest.mark.parametrize("b,m,d,ids", [(1, 1, 3, 1), (1, 3, 2, 2), (2, 4, 5, 3), (3, 5, 33, 4), (4, 2, 3, 9)])
def test_detcon_matches_reference(b, m, d, ids, dtype, chunks, request):
    if chunks == "small":
        request.getfixturevalue("small_chunks")
    mask0, mask1 = _masks(b, m, ids)
    # τ = 0.02: 2/|τ| + log C > 80, the row-maximum / two-exponential paths.
    for i, temperature in enumerate((0.1, 1.0, -0.5, 0.02)):
        views = [x.reshape(b, m, d) for x in awkward_inputs(b * m, d, dtype=dtype, views=4, non_contiguous=(i % 2 == 0))]
        assert_matches_reference(
            lambda p0, p1, t0, t1: FS.detcon_b_loss(p0, p1, t0, t1, mask0, mask1, temperature, backend="torch"),
            lambda p0, p1, t0, t1: reference.detcon_b_loss(p0, p1, t0, t1, mask0, mask1, temperature),
            views,
            atol=_atol(temperature),
        )
        assert_matches_reference(
            lambda v0, v1: FS.detcon_s_loss(v0, v1, mask0, mask1, temperature, backend="torch"),
            lambda v0, v1: reference.detcon_s_loss(v0, v1, mask0, mask1, temperature),
            views[:2],
            atol=_atol(temperature),
        )


def test_detcon_rows_without_positive_carry_no_weight():
    """View 1's mask ids never occur in view 0: no row has a positive, the loss is 0 and so is
    every gradient (lightly's weights [#pos > 0])."""
    b, m, d = 2, 3, 4
    views = [torch.randn(b, m, d, requires_grad=True) for _ in range(4)]
    mask0, mask1 = torch.zeros(b, m, dtype=torch.long), torch.ones(b, m, dtype=torch.long)
    loss = FS.detcon_b_loss(*views, mask0, mask1, backend="torch")
    loss.backward()
    assert loss.item() == 0.0
    assert all(v.grad.abs().max().item() == 0.0 for v in views)


@pytest.mark.parametrize("dtype,chunks", PRECISIONS)
@pytest.mark.parametrize("n,d", [(1, 1), (1, 4), (2, 3), (3, 129), (17, 5)])
def test_koleo_matches_reference(n, d, dtype, chunks, request):
    if chunks == "small":
        request.getfixturevalue("small_chunks")

    def ref(x, *args):
        # float16 rounds ε = 1e-8 to 0: the textbook formula's distance to a duplicate (or, at
        # N = 1, to itself) is 0 and its gradient NaN. PyTorch's error is measured in float32.
        return reference.koleo_loss(x.float() if x.dtype == torch.float16 else x, *args)

    for i, (p, eps) in enumerate([(2, 1e-8), (1, 1e-8), (3, 1e-4)]):
        (x,) = awkward_inputs(n, d, dtype=dtype, views=1, non_contiguous=(i % 2 == 0))
        assert_matches_reference(lambda z: FS.koleo_loss(z, p, eps, backend="torch"), lambda z: ref(z, p, eps), [x])


def test_koleo_duplicate_rows_are_finite():
    x = torch.randn(5, 7)
    x = torch.cat([x, x[:3]]).requires_grad_(True)
    loss = FS.koleo_loss(x, backend="torch")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    # Three duplicate pairs: each of their six rows sits at distance ε·√d from its neighbour.
    assert loss.item() > 6 / 8 * 15


@pytest.mark.parametrize("n,d", [(1, 3), (3, 129), (9, 70)])
def test_directclr_is_ntxent_on_the_leading_features(n, d):
    a, b = awkward_inputs(n, d, non_contiguous=True)
    for loss_dim in (1, 64, 1000):
        assert_matches_reference(
            lambda x, y: FS.directclr_loss(x, y, loss_dim, 0.3, backend="torch"),
            lambda x, y: reference.directclr_loss(x, y, loss_dim, 0.3),
            [a, b],
        )
    images = torch.randn(n, 3, 4, 5)
    flat = FS.directclr_loss(images, images.flip(0), loss_dim=7, backend="torch")
    expected = reference.ntxent_loss(images.flatten(1)[:, :7], images.flip(0).flatten(1)[:, :7], 0.5)
    assert flat.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("chunks", ["single", "small"])
@pytest.mark.parametrize("temperature", [0.3, -1.0])
def test_factored_and_two_exponential_backward_agree(temperature, chunks, monkeypatch, request):
    if chunks == "small":
        request.getfixturevalue("small_chunks")
    a, b = awkward_inputs(9, 6)
    labels = torch.randint(0, 3, (9,))

    def grads():
        x, y = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        (FS.dcl_loss(x, y, temperature, backend="torch") + FS.supcon_loss(x, y, labels, temperature, backend="torch")).backward()
        return x.grad, y.grad

    factored = grads()
    monkeypatch.setattr(contrastive, "_exp_factorizable", lambda inv_temp_bound, n_cols: False)
    two_exponentials = grads()
    for g0, g1 in zip(factored, two_exponentials):
        torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-7)


def test_reference_and_triton_backends():
    """``reference`` is the textbook formula; ``triton`` runs the torch path (no kernel yet),
    including on CPU tensors without the interpreter."""
    a, b = awkward_inputs(5, 4)
    for fn in (FS.dcl_loss, FS.dclw_loss, FS.supcon_loss, FS.macl_loss):
        values = [fn(a, b, backend=backend) for backend in ("reference", "torch", "triton")]
        assert all(v.dtype == torch.float32 and v.shape == () for v in values)
        assert values[1].item() == pytest.approx(values[0].item(), rel=1e-5)
        assert values[2].item() == values[1].item()


def test_float64_inputs_accumulate_in_float64():
    a, b = awkward_inputs(7, 5, dtype=torch.float64)
    a.requires_grad_(True)
    loss = FS.dcl_loss(a, b, 0.2, backend="torch")
    loss.backward()
    assert loss.dtype == torch.float32 and a.grad.dtype == torch.float64
    x = a.detach().clone().requires_grad_(True)
    reference.dcl_loss(x, b, 0.2).backward()
    torch.testing.assert_close(a.grad, x.grad, rtol=1e-12, atol=1e-14)


def test_non_finite_inputs_propagate():
    a, b = awkward_inputs(4, 3)
    a[1, 2] = float("nan")
    mask = torch.zeros(2, 2, dtype=torch.long)
    assert torch.isnan(FS.dcl_loss(a, b, backend="torch"))
    assert torch.isnan(FS.supcon_loss(a, b, backend="torch"))
    assert torch.isnan(FS.macl_loss(a, b, backend="torch"))
    assert torch.isnan(FS.koleo_loss(a, backend="torch"))
    assert torch.isnan(FS.detcon_s_loss(a.reshape(2, 2, 3), b.reshape(2, 2, 3), mask, mask, backend="torch"))


# --------------------------------------------------------------------------------------------
# The restated checks of lightly's own tests, and the paper's closed forms
# --------------------------------------------------------------------------------------------


def test_detcon_values_of_the_original_implementation():
    """The two values lightly's tests took from DetCon's original (JAX) implementation."""
    x = torch.tensor([[[0.48962486, 0.2522575], [-0.6273904, -0.7026027]], [[0.7157335, -0.5684994], [-1.7461833, -2.7258704]]])
    mask = torch.tensor([[1, 0], [1, 1]])
    y = torch.tensor([[[-0.6067, -1.6712], [0.5318, -0.1990]], [[0.0800, -0.3512], [-0.3968, -1.0643]]])
    zeros = torch.zeros(2, 2, dtype=torch.long)
    for backend in ("torch", "reference"):
        loss = fastssl.DetConBLoss(gather_distributed=False, backend=backend)
        # Separate tensors with equal values (the B path) and the very same tensors (the S path).
        assert loss(x, x.clone(), x.clone(), x.clone(), mask, mask).item() == pytest.approx(3.012971, abs=1e-4)
        assert loss(y, y, y, y, zeros, zeros).item() == pytest.approx(3.6086373, abs=1e-4)
        assert fastssl.DetConSLoss(backend=backend)(y, y, zeros, zeros).item() == pytest.approx(3.6086373, abs=1e-4)


@pytest.mark.parametrize(
    "x,expected",
    [
        ([[1.0]], 17.7275),
        ([[0.0, 1.0], [0.0, -1.0]], -math.log(2)),
        ([[0.0, 1.0], [1.0, 0.0]], -math.log(2**0.5)),
        ([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [-1.0, -1.0]], 0.2674),
    ],
)
def test_koleo_values_of_dinov2(x, expected):
    """Values of DINOv2's implementation, as restated in lightly's tests (one row: the distance to
    itself is ε·√d, so the loss is -log(2ε))."""
    for backend in ("torch", "reference"):
        assert fastssl.KoLeoLoss(backend=backend)(torch.tensor(x)).item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("n", [2, 3, 8])
def test_dcl_is_symmetric_in_its_views_and_positive(n):
    a, b = torch.rand(n, 3), torch.rand(n, 3)
    for module in (fastssl.DCLLoss(0.5), fastssl.DCLWLoss(0.5), fastssl.DCLLoss(0.5, contrastive.negative_mises_fisher_weights)):
        loss0, loss1 = module(a, b), module(b, a)
        assert loss0.item() > 0
        assert loss0.item() == pytest.approx(loss1.item(), rel=1e-6)


@pytest.mark.parametrize("n", [2, 5, 19])
def test_macl_is_symmetric_in_its_views(n):
    loss = fastssl.MACLLoss()
    for d in (32, 1):
        a, b = torch.randn(n, d), torch.randn(n, d)
        assert loss(a, b).item() == pytest.approx(loss(b, a).item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 0.1])
def test_supcon_without_labels_is_ntxent(temperature):
    a, b = torch.rand(8, 10), torch.rand(8, 10)
    ntxent = FS.ntxent_loss(a, b, temperature, backend="reference").item()
    assert fastssl.SupConLoss(temperature, rescale=False)(a, b).item() == pytest.approx(ntxent, rel=1e-5)
    assert fastssl.SupConLoss(temperature)(a, b).item() == pytest.approx(temperature * ntxent, rel=1e-5)
    # Distinct labels are the same as no labels.
    assert fastssl.SupConLoss(temperature)(a, b, torch.arange(8)).item() == pytest.approx(temperature * ntxent, rel=1e-5)


@pytest.mark.parametrize("labels", [[0, 0, 0, 0], [0, 1, 1, 1], [0, 1, 2, 3]])
def test_supcon_is_the_soft_label_cross_entropy(labels):
    """Restates the proposal's check: the mean over the 2N rows of the cross-entropy against a
    uniform soft label on every other same-class row, times the temperature."""
    temperature = 0.5
    a, b = F.normalize(torch.rand(4, 10), dim=-1), F.normalize(torch.rand(4, 10), dim=-1)
    y = torch.tensor(labels).repeat(2)
    z = torch.cat([a, b])
    same = (y[:, None] == y[None, :]).float().fill_diagonal_(0)
    logits = (z @ z.T / temperature).fill_diagonal_(-1e9)
    expected = -(same / same.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean() * temperature
    assert fastssl.SupConLoss(temperature)(a, b, torch.tensor(labels)).item() == pytest.approx(expected.item(), rel=1e-5)


def test_supcon_all_one_class_gradient_pulls_together():
    """One class: every row is a positive of every other and there is no negative; the loss is
    smallest, log(2N - 1), at collapse, and its gradient at random points is nonzero."""
    a, b = awkward_inputs(6, 3)
    a.requires_grad_(True)
    loss = FS.supcon_loss(a, b, torch.zeros(6), 1.0, rescale=False, backend="torch")
    loss.backward()
    collapsed = torch.ones(6, 3)
    # At collapse every logit is 1/τ: the loss is its minimum log(2N - 1).
    assert FS.supcon_loss(collapsed, collapsed, torch.zeros(6), 1.0, rescale=False).item() == pytest.approx(math.log(11), rel=1e-6)
    assert loss.item() > 0 and a.grad.abs().max().item() > 0


# --------------------------------------------------------------------------------------------
# Against lightly 1.6.0's classes: signatures, values and gradients over several calls
# --------------------------------------------------------------------------------------------

PAIRS = ["DCLLoss", "DCLWLoss", "DirectCLRLoss", "MACLLoss", "DetConSLoss", "DetConBLoss", "KoLeoLoss"]


@pytest.mark.parametrize("name", PAIRS)
def test_constructor_and_forward_signatures_match_lightly(lightly, name):
    theirs, ours = getattr(lightly, name), getattr(fastssl, name)
    for method in ("__init__", "forward"):
        p_theirs = list(inspect.signature(getattr(theirs, method)).parameters.values())
        p_ours = [p for p in inspect.signature(getattr(ours, method)).parameters.values() if p.name != "backend"]
        assert [(p.name, p.default, p.kind) for p in p_ours] == [(p.name, p.default, p.kind) for p in p_theirs]
    assert inspect.signature(ours.__init__).parameters["backend"].default == "auto"


def test_module_attributes_match_lightly(lightly):
    pairs = [
        (lightly.DCLLoss(0.2), fastssl.DCLLoss(0.2), ("temperature", "weight_fn", "gather_distributed")),
        (lightly.MACLLoss(0.2, 0.3, 0.4), fastssl.MACLLoss(0.2, 0.3, 0.4), ("temperature", "alpha", "A_0", "eps")),
        (lightly.DetConBLoss(0.2), fastssl.DetConBLoss(0.2), ("temperature", "gather_distributed", "eps")),
        (lightly.KoLeoLoss(1, 1e-6), fastssl.KoLeoLoss(1, 1e-6), ("p", "eps")),
        (lightly.DirectCLRLoss(7, 0.2), fastssl.DirectCLRLoss(7, 0.2), ("loss_dim", "temperature", "gather_distributed")),
    ]
    for theirs, ours, names in pairs:
        for name in names:
            assert getattr(ours, name) == getattr(theirs, name), name
    assert isinstance(fastssl.DetConSLoss().detconbloss, fastssl.DetConBLoss)
    assert fastssl.DetConSLoss().detconbloss.gather_distributed is True
    assert isinstance(fastssl.KoLeoLoss().pairwise_distance, torch.nn.PairwiseDistance)
    assert isinstance(fastssl.DirectCLRLoss(), fastssl.NTXentLoss)
    assert fastssl.DCLWLoss(sigma=0.25).weight_fn.keywords == {"sigma": 0.25}
    for module in (fastssl.DCLLoss(), fastssl.MACLLoss(), fastssl.DetConSLoss(), fastssl.KoLeoLoss(), fastssl.SupConLoss()):
        assert list(module.buffers()) == [] and list(module.parameters()) == []


def _value_and_grads(fn, inputs):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    value = fn(*leaves)
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    return value.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]


def _assert_same(theirs, ours, inputs_per_call, rtol=1e-5, atol=1e-6, theirs_in_float64=False, grad_atol=1e-5):
    """Ours in float32 against lightly's module in float32 (or, for a loss that is ill-conditioned
    in float32 itself, run in float64 on the same values), call after call."""
    for inputs in inputs_per_call:
        v0, g0 = _value_and_grads(theirs, [x.double() for x in inputs] if theirs_in_float64 else inputs)
        v1, g1 = _value_and_grads(ours, inputs)
        assert v1.dtype == torch.float32
        torch.testing.assert_close(v1, v0.float(), rtol=rtol, atol=atol)
        for a, b in zip(g1, g0):
            # atol: float32 rounding of logits of size 1/τ, where an exact gradient is 0 (d = 1,
            # or one region per image).
            torch.testing.assert_close(a, b.float(), rtol=10 * rtol, atol=grad_atol)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("n,d", [(2, 1), (3, 5), (16, 33)])
def test_dcl_family_equivalent_to_lightly(lightly, backend, n, d):
    calls = [awkward_inputs(n, d, non_contiguous=(i == 1)) for i in range(3)]
    _assert_same(lightly.DCLLoss(), fastssl.DCLLoss(backend=backend), calls)
    _assert_same(lightly.DCLLoss(0.5, _weight_fn), fastssl.DCLLoss(0.5, _weight_fn, backend=backend), calls)
    with pytest.warns(UserWarning):  # lightly's weights copy-construct a tensor, and PyTorch says so
        _assert_same(lightly.DCLWLoss(0.07, 0.3), fastssl.DCLWLoss(0.07, 0.3, backend=backend), calls)
    # lightly's own weight function, handed to our DCL
    with pytest.warns(UserWarning):
        _assert_same(
            lightly.DCLLoss(weight_fn=lightly.negative_mises_fisher_weights),
            fastssl.DCLLoss(weight_fn=lightly.negative_mises_fisher_weights, backend=backend),
            calls,
        )
    a, b = calls[0]
    z0, z1 = F.normalize(a, dim=1), F.normalize(b, dim=1)
    with pytest.warns(UserWarning):
        expected = lightly.negative_mises_fisher_weights(z0, z1, 0.3)
    torch.testing.assert_close(contrastive.negative_mises_fisher_weights(z0, z1, 0.3), expected)


@pytest.mark.parametrize("n,d", [(1, 3), (2, 1), (3, 5), (16, 33)])
def test_macl_equivalent_to_lightly(lightly, n, d):
    """MACL's weight 1/(1 - P + ε) (up to 10^8) amplifies the float32 rounding of log P where a
    positive dominates its row: lightly's own float32 value can be off by tens of percent there.
    Our torch path keeps float32 precision (``_macl_torch``): it is compared with lightly run in
    float64, and the reference backend (the textbook formula, in float64 too) with it as well."""
    calls = [awkward_inputs(n, d, non_contiguous=(i == 1)) for i in range(3)]
    for args in [(), (0.5, 1.0, 0.2), (0.05, 0.1, 1.0)]:
        _assert_same(lightly.MACLLoss(*args), fastssl.MACLLoss(*args, backend="torch"), calls, rtol=2e-5, theirs_in_float64=True)
        ours_float64 = fastssl.MACLLoss(*args, backend="reference")
        _assert_same(lightly.MACLLoss(*args), lambda a, b: ours_float64(a.double(), b.double()), calls, rtol=1e-9,
                     theirs_in_float64=True)
    # Moderate temperatures and alignments: float32 against float32.
    _assert_same(lightly.MACLLoss(1.0, 0.5, 0.0), fastssl.MACLLoss(1.0, 0.5, 0.0, backend="torch"), calls, rtol=2e-5)


def test_macl_keeps_float32_precision_where_the_positive_dominates():
    """A positive far closer than every negative at τ = 0.05: P = 1 - O(e^-30); the float32 path
    agrees with the float64 reference to 1e-5 relative, value and gradient."""
    torch.manual_seed(5)
    a = torch.randn(4, 8)
    b = a + 0.01 * torch.randn(4, 8)
    assert_matches_reference(
        lambda x, y: FS.macl_loss(x, y, 0.05, 0.0, 1.0, backend="torch"),
        lambda x, y: reference.macl_loss(x, y, 0.05, 0.0, 1.0),
        [a, b],
        rtol=1e-5,
    )


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("n,d", [(1, 3), (5, 40)])
def test_koleo_equivalent_to_lightly(lightly, backend, n, d):
    calls = [awkward_inputs(n, d, views=1, non_contiguous=(i == 1)) for i in range(2)]
    calls.append([torch.cat([calls[0][0], calls[0][0][:1]])])  # a duplicate row
    for args in [(), (1, 1e-6), (3,)]:
        _assert_same(lightly.KoLeoLoss(*args), fastssl.KoLeoLoss(*args, backend=backend), calls)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("b,m,d,ids", [(1, 1, 3, 1), (2, 4, 5, 3), (3, 6, 17, 4)])
def test_detcon_equivalent_to_lightly(lightly, backend, b, m, d, ids):
    mask0, mask1 = _masks(b, m, ids)
    calls = [[x.reshape(b, m, d) for x in awkward_inputs(b * m, d, views=4, non_contiguous=(i == 1))] for i in range(3)]
    for temperature in (0.1, 0.7):
        theirs = lightly.DetConBLoss(temperature)
        ours = fastssl.DetConBLoss(temperature, backend=backend)
        tolerances = dict(atol=_atol(temperature), grad_atol=2 * _atol(temperature))
        _assert_same(lambda *v: theirs(*v, mask0, mask1), lambda *v: ours(*v, mask0, mask1), calls, **tolerances)
        theirs_s = lightly.DetConSLoss(temperature)
        ours_s = fastssl.DetConSLoss(temperature, backend=backend)
        _assert_same(lambda *v: theirs_s(*v, mask0, mask1), lambda *v: ours_s(*v, mask0, mask1), [c[:2] for c in calls],
                     **tolerances)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_directclr_equivalent_to_lightly(lightly, backend):
    calls = [[torch.randn(6, 2, 5, 4), torch.randn(6, 2, 5, 4)] for _ in range(2)] + [awkward_inputs(3, 70, non_contiguous=True)]
    for loss_dim in (64, 3):
        _assert_same(lightly.DirectCLRLoss(loss_dim), fastssl.DirectCLRLoss(loss_dim, backend=backend), calls)


def test_directclr_memory_bank_follows_lightly_over_calls(lightly):
    """The bank (of the sliced keys) evolves as lightly's: values and gradients at every call."""
    torch.manual_seed(3)
    theirs = lightly.DirectCLRLoss(loss_dim=4, temperature=0.3, memory_bank_size=(5, 4))
    torch.manual_seed(3)
    ours = fastssl.DirectCLRLoss(loss_dim=4, temperature=0.3, memory_bank_size=(5, 4), backend="torch")
    for _ in range(4):
        a, b = torch.randn(3, 9), torch.randn(3, 9)
        _assert_same(theirs, ours, [[a, b]])
    torch.testing.assert_close(ours.memory_bank.bank, theirs.memory_bank.bank)  # both (size, dim)
    assert int(ours.memory_bank.bank_ptr) == int(theirs.memory_bank.bank_ptr)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_constructor_errors():
    with pytest.raises(ValueError, match="temperature"):
        fastssl.MACLLoss(temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        fastssl.MACLLoss(temperature=-0.1)  # lightly: temperature < 1e-8 is illegal, sign included
    with pytest.raises(ValueError, match="alpha"):
        fastssl.MACLLoss(alpha=1.5)
    with pytest.raises(ValueError, match="A_0"):
        fastssl.MACLLoss(A_0=-0.1)
    for cls in (fastssl.DCLLoss, fastssl.DCLWLoss, fastssl.DetConBLoss, fastssl.DetConSLoss, fastssl.SupConLoss):
        with pytest.raises(ValueError, match="temperature"):
            cls(temperature=1e-9)
    with pytest.raises(ValueError, match="sigma"):
        fastssl.DCLWLoss(sigma=0.0)
    with pytest.raises(TypeError, match="weight_fn"):
        fastssl.DCLLoss(weight_fn=3)
    with pytest.raises(ValueError, match="loss_dim"):
        fastssl.DirectCLRLoss(loss_dim=0)
    with pytest.raises(ValueError, match="p must be"):
        fastssl.KoLeoLoss(p=0)
    with pytest.raises(ValueError, match="backend"):
        fastssl.DCLLoss(backend="cuda")


def test_gather_distributed_requires_torch_distributed(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    for cls in (fastssl.DCLLoss, fastssl.DCLWLoss, fastssl.SupConLoss, fastssl.DetConBLoss, fastssl.DirectCLRLoss):
        with pytest.raises(ValueError, match="torch.distributed is not available"):
            cls(gather_distributed=True)
    # DetCon gathers by default, as lightly; without torch.distributed it must be turned off.
    with pytest.raises(ValueError, match="torch.distributed is not available"):
        fastssl.DetConSLoss()
    fastssl.DetConSLoss(gather_distributed=False)


def test_forward_errors():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    for fn in (FS.dcl_loss, FS.dclw_loss, FS.supcon_loss, FS.macl_loss):
        with pytest.raises(ValueError, match="same shape"):
            fn(a, b[:3])
        with pytest.raises(ValueError, match="shape"):
            fn(a[0], b[0])
        with pytest.raises(TypeError, match="floating"):
            fn(a.long(), b.long())
        with pytest.raises(ValueError, match="empty"):
            fn(a[:0], b[:0])
    with pytest.raises(AssertionError, match="at least 2 samples"):  # a BatchShapeError (ValueError)
        FS.dcl_loss(a[:1], b[:1])
    with pytest.raises(ValueError, match="labels"):
        FS.supcon_loss(a, b, torch.arange(3))
    with pytest.raises(ValueError, match="labels"):
        FS.supcon_loss(a, b, torch.zeros(4, 1))
    with pytest.raises(TypeError, match="labels"):
        FS.supcon_loss(a, b, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="x must have shape"):
        FS.koleo_loss(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="empty"):
        FS.koleo_loss(torch.randn(0, 4))
    v, m = torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="num_masks, dim"):
        FS.detcon_s_loss(v[0], v[1], m, m)
    with pytest.raises(ValueError, match="same shape"):
        FS.detcon_b_loss(v, v, v, v[:, :2], m, m)
    with pytest.raises(ValueError, match="mask_view1 must have shape"):
        FS.detcon_s_loss(v, v, m, m[:, :2])
    with pytest.raises(TypeError, match="integer mask ids"):
        FS.detcon_s_loss(v, v, m, m.float())
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        FS.directclr_loss(torch.randn(4), torch.randn(4))


# --------------------------------------------------------------------------------------------
# Memory, host syncs, torch.compile
# --------------------------------------------------------------------------------------------


class _LargestOutput(TorchDispatchMode):
    """Largest number of elements any operator produces (the full matrix would show up here)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(func)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _largest_produced(fn, inputs):
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    with _LargestOutput() as mode:
        fn(*leaves).backward()
    return mode.largest, mode.ops


@pytest.mark.parametrize("what", ["dcl", "supcon", "macl", "detcon_b", "detcon_s", "koleo"])
def test_chunked_path_never_forms_the_full_matrix(what, monkeypatch):
    n, d, chunk_rows = 48, 4, 8
    rows = 2 * n
    monkeypatch.setattr(contrastive, "_SINGLE_CHUNK_ELEMENTS", 0)
    monkeypatch.setattr(contrastive, "_MAX_CHUNK_ELEMENTS", chunk_rows * rows)
    a, b = awkward_inputs(n, d)
    labels = torch.randint(0, 5, (n,))
    views = [x.reshape(n // 4, 4, d) for x in awkward_inputs(n, d, views=4)]
    mask0, mask1 = _masks(n // 4, 4, 3)
    fns = {
        "dcl": (lambda x, y: FS.dcl_loss(x, y, backend="torch"), [a, b], rows * rows),
        "supcon": (lambda x, y: FS.supcon_loss(x, y, labels, backend="torch"), [a, b], rows * rows),
        "macl": (lambda x, y: FS.macl_loss(x, y, backend="torch"), [a, b], rows * rows),
        "detcon_b": (lambda *v: FS.detcon_b_loss(*v, mask0, mask1, backend="torch"), views, rows * rows),
        "detcon_s": (lambda *v: FS.detcon_s_loss(*v, mask0, mask1, backend="torch"), views[:2], rows * rows),
        "koleo": (lambda x: FS.koleo_loss(x, backend="torch"), [torch.cat([a, b])], rows * rows),
    }
    fn, inputs, full = fns[what]
    largest, _ = _largest_produced(fn, inputs)
    assert largest <= max(chunk_rows * rows, rows * d), f"an op produced {largest} elements (chunk {chunk_rows * rows})"
    assert largest < full


def test_default_chunks_are_bounded():
    assert contrastive._rows_per_chunk(8192, 8192, None) * 8192 <= contrastive._MAX_CHUNK_ELEMENTS
    assert contrastive._rows_per_chunk(4096, 4096, None) == 4096  # one kept chunk of 2^24 logits
    assert contrastive._rows_per_chunk(1, 1 << 30, None) == 1


def test_no_host_synchronization():
    """No ``.item()``-like device-to-host reads in forward or backward (CUDA-graph friendly):
    MACL's adaptive temperature in particular stays a device tensor."""
    a, b = awkward_inputs(6, 5)
    labels = torch.randint(0, 3, (6,))
    views = [x.reshape(3, 2, 5) for x in awkward_inputs(6, 5, views=4)]
    mask0, mask1 = _masks(3, 2, 2)
    for fn, inputs in [
        (lambda x, y: FS.dcl_loss(x, y, backend="torch"), [a, b]),
        (lambda x, y: FS.dclw_loss(x, y, backend="torch"), [a, b]),
        (lambda x, y: FS.supcon_loss(x, y, labels, backend="torch"), [a, b]),
        (lambda x, y: FS.macl_loss(x, y, backend="torch"), [a, b]),
        (lambda *v: FS.detcon_b_loss(*v, mask0, mask1, backend="torch"), views),
        (lambda x: FS.koleo_loss(x, backend="torch"), [a]),
    ]:
        _, ops = _largest_produced(fn, inputs)
        assert torch.ops.aten._local_scalar_dense.default not in ops


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    labels = torch.randint(0, 3, (6,))

    def step(x, y):
        return FS.dcl_loss(x, y, 0.2, backend="torch") + FS.supcon_loss(x, y, labels, 0.3, backend="torch") + FS.macl_loss(x, y, backend="torch")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a, b = awkward_inputs(6, 5)
    assert_matches_reference(
        compiled,
        lambda x, y: reference.dcl_loss(x, y, 0.2) + reference.supcon_loss(x, y, labels, 0.3) + reference.macl_loss(x, y),
        [a, b],
    )


# --------------------------------------------------------------------------------------------
# gather_distributed on gloo
# --------------------------------------------------------------------------------------------

N_PER_RANK, D, M = 3, 5, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cases():
    """name -> (loss of (tensors, labels, masks, gather, backend), number of float inputs, 3-D)."""
    return {
        "dcl": (lambda t, y, m, g, bk: FS.dcl_loss(*t, 0.3, gather_distributed=g, backend=bk), 2, False),
        "dcl_weight_fn": (lambda t, y, m, g, bk: FS.dcl_loss(*t, 0.3, _weight_fn, gather_distributed=g, backend=bk), 2, False),
        "dclw": (lambda t, y, m, g, bk: FS.dclw_loss(*t, 0.3, 0.4, gather_distributed=g, backend=bk), 2, False),
        "supcon": (lambda t, y, m, g, bk: FS.supcon_loss(*t, y, 0.3, gather_distributed=g, backend=bk), 2, False),
        "supcon_no_labels": (lambda t, y, m, g, bk: FS.supcon_loss(*t, None, 0.3, gather_distributed=g, backend=bk), 2, False),
        "directclr": (lambda t, y, m, g, bk: FS.directclr_loss(*t, 3, 0.3, gather_distributed=g, backend=bk), 2, False),
        "detcon_b": (lambda t, y, m, g, bk: FS.detcon_b_loss(*t, *m, 0.3, gather_distributed=g, backend=bk), 4, True),
        "detcon_s": (lambda t, y, m, g, bk: FS.detcon_s_loss(*t, *m, 0.3, gather_distributed=g, backend=bk), 2, True),
    }


def _global_inputs(world: int):
    g = torch.Generator().manual_seed(1234)
    rows = N_PER_RANK * world
    out = {}
    for name, (_, n_inputs, regions) in _cases().items():
        shape = (rows, M, D) if regions else (rows, D)
        out[name] = [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(n_inputs)]
    labels = torch.randint(0, 3, (rows,), generator=g)
    masks = [torch.randint(0, 2, (rows, M), generator=g) for _ in range(2)]
    return out, labels, masks


def _worker(rank: int, world: int, port: int, result_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        inputs, labels, masks = _global_inputs(world)
        rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
        results = {}
        for name, (fn, _, _) in _cases().items():
            for backend in ("torch", "reference"):
                local = [x[rows].clone().requires_grad_(True) for x in inputs[name]]
                loss = fn(local, labels[rows], [m[rows] for m in masks], True, backend)
                grads = torch.autograd.grad(loss, local)
                results[name, backend] = (loss.detach(), [g.detach() for g in grads])
        torch.save(results, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_gather_distributed_semantics(world):
    """Each rank's loss is the single-process loss of the concatenated batch, and each rank's
    gradient is world × its slice of that loss's gradient (torch and reference backends)."""
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, port, tmp), nprocs=world, join=True)
        per_rank = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]
    inputs, labels, masks = _global_inputs(world)
    for name, (fn, _, _) in _cases().items():
        full = [x.clone().requires_grad_(True) for x in inputs[name]]
        loss = fn(full, labels, masks, False, "reference")
        grads = torch.autograd.grad(loss, full)
        for r in range(world):
            for backend in ("torch", "reference"):
                rank_loss, rank_grads = per_rank[r][name, backend]
                assert rank_loss.item() == pytest.approx(loss.item(), rel=1e-6, abs=1e-8), (name, backend, r)
                for g_rank, g_full in zip(rank_grads, grads):
                    expected = world * g_full[r * N_PER_RANK : (r + 1) * N_PER_RANK]
                    err = (g_rank.double() - expected).abs().max().item()
                    assert err <= 1e-9 + 1e-7 * expected.abs().max().item(), (name, backend, r, err)


def test_gather_distributed_without_a_group_is_the_single_process_loss():
    a, b = awkward_inputs(5, 4)
    labels = torch.randint(0, 2, (5,))
    assert FS.dcl_loss(a, b, gather_distributed=True).item() == FS.dcl_loss(a, b).item()
    assert FS.supcon_loss(a, b, labels, gather_distributed=True).item() == FS.supcon_loss(a, b, labels).item()
    v = [x.reshape(5, 1, 4) for x in (a, b)]
    m = torch.zeros(5, 1, dtype=torch.long)
    assert fastssl.DetConSLoss()(*v, m, m).item() == fastssl.DetConSLoss(gather_distributed=False)(*v, m, m).item()


# NumPy scalar hyperparameters (a config loaded with NumPy, a swept grid) are accepted as lightly
# accepts them; bool is rejected, a flag passed where a number belongs being a bug.
@pytest.mark.parametrize("name", PAIRS + ["SupConLoss"])
def test_numpy_scalar_hyperparameters_accepted_bool_rejected(name):
    required = {"gather_distributed": False} if name.startswith("DetCon") else {}
    # lightly's memory bank takes a Python int or a (size, dim) pair only
    skip = ("memory_bank_size",) if name == "DirectCLRLoss" else ()
    assert_numpy_hyperparameters_accepted(getattr(fastssl, name), required, skip)


@pytest.mark.parametrize("convert", ["float32", "float64", "int64"])
def test_koleo_numpy_norm_degree_gives_the_same_loss(convert):
    import numpy as np

    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(3), requires_grad=True)
    expected = FS.koleo_loss(x, p=1)
    (expected_grad,) = torch.autograd.grad(expected, x)
    p = getattr(np, convert)(1)
    for loss in (FS.koleo_loss(x, p=p), fastssl.KoLeoLoss(p=p)(x)):
        assert torch.equal(loss, expected)
        assert torch.equal(torch.autograd.grad(loss, x)[0], expected_grad)
    assert type(fastssl.KoLeoLoss(p=p).p) is float
    for bad in (float("nan"), np.float32(-1)):
        with pytest.raises(ValueError, match="p must be > 0"):
            fastssl.KoLeoLoss(p=bad)


def test_macl_eps_validated():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(TypeError, match="eps"):
        FS.macl_loss(a, b, eps=True)
    with pytest.raises(ValueError, match="eps"):
        FS.macl_loss(a, b, eps=-1e-8)
