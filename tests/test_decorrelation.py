"""Barlow Twins and VICReg, PyTorch path: values and gradients against the reference, the Gram
identity at d = 8192, the seeds' exercises, equivalence with lightly, memory and torch.compile."""

from __future__ import annotations


import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastssl
from fastssl import decorrelation, reference
import _lightly
from _helpers import assert_matches_reference, awkward_inputs

SHAPES_N = [2, 3, 17, 64]
SHAPES_D = [1, 7, 129, 300]
PATHS = ["auto", "gram", "cross"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _bt(path, lambda_param=0.1):
    return lambda x, y: decorrelation.barlow_twins_loss(x, y, lambda_param, backend="torch", path=path)


def _bt_ref(lambda_param=0.1):
    return lambda x, y: reference.barlow_twins_loss(x, y, lambda_param)


VICREG_HYPER = (2.0, 3.0, 0.7, 1e-4)  # lambda, mu, nu, eps: every term weighs in the gradient


def _vicreg(path, hyper=VICREG_HYPER):
    return lambda x, y: decorrelation.vicreg_loss(x, y, *hyper, backend="torch", path=path)


def _vicreg_ref(hyper=VICREG_HYPER):
    return lambda x, y: reference.vicreg_loss(x, y, *hyper)


# --------------------------------------------------------------------------------------------
# Against the reference: values and input gradients
# --------------------------------------------------------------------------------------------


def _value_and_grads(fn, inputs):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    value = fn(*leaves)
    return [value.detach()] + list(torch.autograd.grad(value, leaves))


def assert_barlow_twins_matches(impl, ref, inputs):
    """``assert_matches_reference``, except at N = 2 in float32.

    With two samples each standardized column is ±sqrt(var/(var+eps)): the loss depends on the
    inputs only through batch-norm's eps, and its gradient (of order eps) is what is left after
    the batch-norm backward cancels O(1) terms. The float32 reference itself is then off by up
    to 10 % of that tiny gradient, so float32 is held to the rule DESIGN §3 sets for half
    precision: at most twice PyTorch's own float32 error against float64, plus a float32 floor.
    """
    if inputs[0].dtype != torch.float32 or inputs[0].shape[0] > 2:
        assert_matches_reference(impl, ref, inputs)
        return
    exact = _value_and_grads(ref, [x.double() for x in inputs])
    torch_own = _value_and_grads(ref, inputs)
    ours = _value_and_grads(impl, inputs)
    assert ours[0].dtype == torch.float32 and all(g.dtype == torch.float32 for g in ours[1:])
    for name, o, t, e in zip(["loss", "grad[0]", "grad[1]"], ours, torch_own, exact):
        err_ours = (o.double() - e).abs().max().item()
        err_torch = (t.double() - e).abs().max().item()
        floor = 2e-5 * e.abs().max().item() + 1e-6
        assert err_ours <= 2 * err_torch + floor, f"{name}: {err_ours:.3e} vs float32 reference {err_torch:.3e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("d", SHAPES_D)
@pytest.mark.parametrize("n", SHAPES_N)
def test_torch_path_matches_reference(n, d, path, dtype):
    a, b = awkward_inputs(n, d, dtype=dtype, non_contiguous=(d % 2 == 1))
    assert_barlow_twins_matches(_bt(path), _bt_ref(), [a, b])
    assert_matches_reference(_vicreg(path), _vicreg_ref(), [a, b])


@pytest.mark.parametrize("path", ["gram", "cross"])
def test_default_hyperparameters_and_modules(path):
    a, b = awkward_inputs(17, 40)
    assert_matches_reference(
        lambda x, y: fastssl.BarlowTwinsLoss(backend="torch", path=path)(x, y), reference.barlow_twins_loss, [a, b]
    )
    assert_matches_reference(
        lambda x, y: fastssl.VICRegLoss(backend="torch", path=path)(x, y), reference.vicreg_loss, [a, b]
    )


@pytest.mark.parametrize("path", ["gram", "cross"])
def test_float64_inputs_accumulate_in_float64(path):
    a, b = awkward_inputs(9, 13, dtype=torch.float64)
    for ours, ref in [(_bt(path), _bt_ref()), (_vicreg(path), _vicreg_ref())]:
        xa, xb = a.clone().requires_grad_(), b.clone().requires_grad_()
        value = ours(xa, xb)
        value.backward()
        ra, rb = a.clone().requires_grad_(), b.clone().requires_grad_()
        expected = ref(ra, rb)
        expected.backward()
        assert value.dtype == torch.float32
        assert xa.grad.dtype == torch.float64
        # float64 accuracy in the gradients: far below what float32 accumulation could give
        torch.testing.assert_close(xa.grad, ra.grad, rtol=1e-11, atol=1e-13)
        torch.testing.assert_close(xb.grad, rb.grad, rtol=1e-11, atol=1e-13)
        torch.testing.assert_close(value, expected.float())


@pytest.mark.parametrize("path", ["gram", "cross"])
def test_mixed_dtypes_give_gradients_in_each_views_dtype(path):
    a, b = awkward_inputs(7, 12)
    b = b.bfloat16()
    for ours, ref in [(_bt(path), _bt_ref()), (_vicreg(path), _vicreg_ref())]:
        xa, xb = a.clone().requires_grad_(), b.clone().requires_grad_()
        value = ours(xa, xb)
        value.backward()
        assert value.dtype == torch.float32 and xa.grad.dtype == torch.float32 and xb.grad.dtype == torch.bfloat16
        ya, yb = a.double().requires_grad_(), b.double().requires_grad_()
        expected = ref(ya, yb)
        expected.backward()
        torch.testing.assert_close(value, expected.float())
        torch.testing.assert_close(xa.grad, ya.grad.float(), rtol=1e-4, atol=1e-6)


def test_auto_picks_the_smaller_side():
    assert decorrelation._use_gram(16, 8192, "auto")
    assert decorrelation._use_gram(127, 128, "auto")
    assert not decorrelation._use_gram(128, 128, "auto")
    assert not decorrelation._use_gram(4096, 128, "auto")
    assert decorrelation._use_gram(4096, 128, "gram")
    assert not decorrelation._use_gram(16, 8192, "cross")


def test_unknown_path_is_rejected():
    a, b = awkward_inputs(4, 3)
    with pytest.raises(ValueError, match="path"):
        decorrelation.barlow_twins_loss(a, b, path="diagonal")
    with pytest.raises(ValueError, match="path"):
        fastssl.VICRegLoss(path="tiles")


@pytest.mark.parametrize("path", ["gram", "cross"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_propagates(path, bad):
    a, b = awkward_inputs(6, 5)
    a[2, 1] = bad
    assert not torch.isfinite(_bt(path)(a, b))
    assert not torch.isfinite(_vicreg(path)(a, b))


def test_upstream_gradient_scales_the_input_gradient():
    a, b = awkward_inputs(5, 9)
    for loss in [_bt("gram"), _bt("cross"), _vicreg("gram"), _vicreg("cross")]:
        xa = a.clone().requires_grad_()
        loss(xa, b).backward()
        once = xa.grad.clone()
        xa.grad = None
        (-2.5 * loss(xa, b)).backward()
        torch.testing.assert_close(xa.grad, -2.5 * once)


# --------------------------------------------------------------------------------------------
# The Gram identity at d = 8192 against the d×d form in float64
# --------------------------------------------------------------------------------------------


def _off_diagonal_squares_float64(
    left: torch.Tensor, right: torch.Tensor, symmetric: bool, chunk: int = 1024
) -> float:
    """Σ_{i≠j} (leftᵀ right)_ij² summed entry by entry in float64, one block of rows at a time
    (so that d = 8192 needs a few MB); for a symmetric product only the blocks on and above the
    diagonal are formed."""
    d = left.shape[1]
    total = 0.0
    for start in range(0, d, chunk):
        stop = min(start + chunk, d)
        first_col = start if symmetric else 0
        block = left[:, start:stop].T @ right[:, first_col:]
        rows = torch.arange(stop - start)
        block[rows, rows + start - first_col] = 0
        on_diagonal_block = torch.linalg.vector_norm(block[:, : stop - first_col]).item() ** 2
        rest = torch.linalg.vector_norm(block[:, stop - first_col :]).item() ** 2
        total += on_diagonal_block + (2 if symmetric else 1) * rest
    return total


def _cross_form_float64(z_a: torch.Tensor, z_b: torch.Tensor, kind: str) -> float:
    """The d×d form of Barlow Twins (λ = 5e-3) or of VICReg's covariance term, in float64."""
    a, b = z_a.double(), z_b.double()
    n, d = a.shape
    if kind == "barlow_twins":
        a, b = reference.batch_standardize(a), reference.batch_standardize(b)
        diag = (a * b).sum(0) / n
        off = _off_diagonal_squares_float64(a, b, symmetric=False) / n**2
        return ((1 - diag) ** 2).sum().item() + 5e-3 * off
    total = 0.0
    for z in (a, b):
        x = z - z.mean(0)
        total += _off_diagonal_squares_float64(x, x, symmetric=True) / (n - 1) ** 2 / d
    return total


@pytest.mark.parametrize("kind,n", [("barlow_twins", 16), ("barlow_twins", 64), ("vicreg", 40)])
def test_gram_identity_at_d8192(kind, n):
    # The float64 d×d side writes 2·d² = 134M numbers per view: one VICReg case keeps this short.
    d = 8192
    a = torch.randn(n, d)
    b = a + 0.05 * torch.randn(n, d)  # nearly equal views: C_ii ≈ 1, the diagonal weighs in
    exact = _cross_form_float64(a, b, kind)
    assert decorrelation._use_gram(n, d, "auto")
    if kind == "barlow_twins":
        ours32 = decorrelation.barlow_twins_loss(a, b, backend="torch").item()
        ours64 = decorrelation._BarlowTwinsFunction.apply(a.double(), b.double(), 5e-3, True).item()
    else:  # the covariance term alone: no invariance, no variance
        ours32 = decorrelation.vicreg_loss(a, b, 0.0, 0.0, 1.0, backend="torch").item()
        ours64 = decorrelation._VICRegFunction.apply(a.double(), b.double(), 0.0, 0.0, 1.0, 1e-4, True).item()
    assert ours32 == pytest.approx(exact, rel=2e-6)
    assert ours64 == pytest.approx(exact, rel=1e-7)  # float64 throughout; the float32 loss is the limit


# --------------------------------------------------------------------------------------------
# The seeds' exercises
# --------------------------------------------------------------------------------------------


def _orthogonal_design(n: int, d: int, dtype=torch.float64) -> torch.Tensor:
    """(n, d), n > d: zero-mean columns, mutually orthogonal, biased variance exactly 1."""
    m = torch.randn(n, d, dtype=dtype)
    q, _ = torch.linalg.qr(m - m.mean(0))  # the columns span a subspace orthogonal to the ones vector
    return q * n**0.5


@pytest.mark.parametrize("path", ["gram", "cross"])
def test_barlow_twins_is_zero_when_c_is_identity(path):
    n, d = 24, 10
    z = _orthogonal_design(n, d)
    scale, shift = torch.rand(d, dtype=z.dtype) + 0.5, torch.randn(d, dtype=z.dtype)
    z_a, z_b = z, z * scale + shift  # both standardize to the same orthogonal columns
    za, zb = z_a.clone().requires_grad_(), z_b.clone().requires_grad_()
    loss = decorrelation._BarlowTwinsFunction.apply(za, zb, 5e-3, path == "gram")
    loss.backward()
    # C = diag(1/sqrt((1+eps/s²)(1+eps))) ≈ I: the loss is of order d·eps², the gradient order eps
    assert 0 <= loss.item() < d * 1e-9
    assert za.grad.abs().max().item() < 1e-4 and zb.grad.abs().max().item() < 1e-4
    # the same views with one column mixed into another are far from the optimum
    z_mixed = z_b.clone()
    z_mixed[:, 1] += z_mixed[:, 0]
    assert decorrelation._BarlowTwinsFunction.apply(z_a, z_mixed, 5e-3, path == "gram").item() > 1e-2


@pytest.mark.parametrize("path", ["gram", "cross"])
@pytest.mark.parametrize("n,d", [(32, 8), (8, 32)])
def test_barlow_twins_is_invariant_to_per_feature_affine_maps(path, n, d):
    a, b = awkward_inputs(n, d, dtype=torch.float64)
    b = a + 0.5 * b
    sign = torch.where(torch.rand(d) < 0.5, -1.0, 1.0).double()  # a sign flip shared by both views
    scale_a, scale_b = (torch.rand(d) + 0.5).double() * sign, (torch.rand(d) + 0.5).double() * sign
    mapped = (a * scale_a + torch.randn(d).double(), b * scale_b + torch.randn(d).double())
    loss = _bt(path)
    before, after = loss(a, b).item(), loss(*mapped).item()
    # exact up to batch-norm's eps (1e-5 against variances of order 1)
    assert after == pytest.approx(before, rel=1e-4)
    assert loss(a, b**3).item() != pytest.approx(before, rel=1e-2)  # a non-affine map is seen
    # VICReg: a shift common to both views changes none of its terms
    common = torch.randn(d).double() * 3
    v = _vicreg(path)
    assert v(a + common, b + common).item() == pytest.approx(v(a, b).item(), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("path", ["gram", "cross"])
def test_vicreg_hinge_gradient_closed_form(path, dtype):
    n, d = 12, 9
    z = 0.3 * torch.randn(n, d, dtype=dtype)
    z[:, :3] *= 10  # σ > 1: hinge inactive on the first three features
    other = torch.randn(n, d, dtype=dtype)
    z_leaf = z.clone().requires_grad_()
    # λ = ν = 0 and μ = 2 leave var_a + var_b; only view a depends on z_leaf
    decorrelation.vicreg_loss(z_leaf, other, 0.0, 2.0, 0.0, 1e-4, backend="torch", path=path).backward()
    sigma = torch.sqrt(z.var(0) + 1e-4)
    active = sigma < 1
    assert active.sum() == d - 3
    closed_form = -(z - z.mean(0)) / (d * (n - 1) * sigma) * active
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(z_leaf.grad, closed_form, rtol=tol, atol=tol)
    assert torch.all(z_leaf.grad[:, :3] == 0)


# --------------------------------------------------------------------------------------------
# Equivalence with lightly 1.6
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n,d", [(3, 16), (40, 12)])
def test_matches_lightly(path, n, d):
    bt = vic = _lightly.load()  # lightly's classes, loaded without torchvision
    if bt is None:
        pytest.skip("lightly is not installed or not importable")
    a, b = awkward_inputs(n, d, dtype=torch.float64)
    cases = [
        (fastssl.BarlowTwinsLoss(backend="torch", path=path), bt.BarlowTwinsLoss()),
        (fastssl.BarlowTwinsLoss(0.3, backend="torch", path=path), bt.BarlowTwinsLoss(0.3)),
        (fastssl.VICRegLoss(backend="torch", path=path), vic.VICRegLoss()),
        (
            fastssl.VICRegLoss(1.0, 2.0, 3.0, eps=1e-3, backend="torch", path=path),
            vic.VICRegLoss(1.0, 2.0, 3.0, eps=1e-3),
        ),
    ]
    for ours, theirs in cases:
        assert_matches_reference(ours, lambda x, y: theirs(x, y), [a.float(), b.float()])
        xa, xb = a.clone().requires_grad_(), b.clone().requires_grad_()
        ours(xa, xb).backward()
        ya, yb = a.clone().requires_grad_(), b.clone().requires_grad_()
        expected = theirs(ya, yb)
        expected.backward()
        torch.testing.assert_close(ours(a, b), expected.float())
        torch.testing.assert_close(xa.grad, ya.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(xb.grad, yb.grad, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Memory: no d×d tensor when N < d
# --------------------------------------------------------------------------------------------


class _RecordShapes(TorchDispatchMode):
    """Every tensor any operator returns, forward and backward (same thread on CPU)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def _largest_tensors(fn, a, b):
    xa, xb = a.clone().requires_grad_(), b.clone().requires_grad_()
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with _RecordShapes() as mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(xa, xb).backward()
    numel = lambda s: int(torch.tensor(s).prod().item()) if s else 1  # noqa: E731
    return max(numel(s) for s in mode.shapes), max(numel(s) for s in saved), mode.shapes


@pytest.mark.parametrize("loss", ["barlow_twins", "vicreg"])
def test_no_d_by_d_tensor_when_n_below_d(loss):
    n, d = 12, 200
    a, b = awkward_inputs(n, d)
    fn = {"barlow_twins": _bt, "vicreg": _vicreg}[loss]
    largest, largest_saved, shapes = _largest_tensors(fn("auto"), a, b)
    assert largest <= n * d, f"a tensor of {largest} elements (> N·d = {n * d}) was allocated"
    assert largest_saved <= n * d
    assert (d, d) not in shapes
    # the detector sees the d×d matrix when it is there
    largest_cross, largest_saved_cross, _ = _largest_tensors(fn("cross"), a, b)
    assert largest_cross >= d * d and largest_saved_cross >= d * d


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------


def _both_losses(path):
    def fn(x, y):
        return (
            decorrelation.barlow_twins_loss(x, y, 0.1, backend="torch", path=path)
            + decorrelation.vicreg_loss(x, y, backend="torch", path=path)
        )

    return fn


def _check_compiled(compile_backend, path):
    torch._dynamo.reset()
    a, b = awkward_inputs(6, 10)
    fn = _both_losses(path)
    compiled = torch.compile(fn, fullgraph=True, backend=compile_backend)
    xa, xb = a.clone().requires_grad_(), b.clone().requires_grad_()
    value = compiled(xa, xb)
    value.backward()
    ya, yb = a.clone().requires_grad_(), b.clone().requires_grad_()
    expected = fn(ya, yb)
    expected.backward()
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(xa.grad, ya.grad)
    torch.testing.assert_close(xb.grad, yb.grad)


def test_torch_compile_fullgraph_captures_the_torch_path():
    # fullgraph=True raises on any graph break; "eager" runs the captured graph as is.
    _check_compiled("eager", "auto")
    _check_compiled("eager", "cross")


@pytest.mark.slow
def test_torch_compile_fullgraph_inductor():
    _check_compiled("inductor", "auto")


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_vicreg_on_inputs_with_positions_is_the_mean_over_positions(backend):
    # lightly's VICRegLoss takes (batch, ..., dim) inputs (VICRegL's local features).
    a, b = torch.randn(5, 2, 3, 7, dtype=torch.float64), torch.randn(5, 2, 3, 7, dtype=torch.float64)
    expected = torch.stack(
        [reference.vicreg_loss(a[:, i, j], b[:, i, j]) for i in range(2) for j in range(3)]
    ).mean()
    value = fastssl.VICRegLoss(backend=backend)(a, b)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="at least 2 samples"):
        fastssl.VICRegLoss(backend=backend)(a[:1], b[:1])
