"""TiCo, FroSSL, MMCR, EMP-SSL and patch kernel alignment: the torch path against the float64
reference (values and input gradients, awkward shapes, half precision), against lightly 1.6's
classes (several calls, TiCo's running covariance), lightly's behaviour checks in our words,
singular and rank-deficient inputs, and the smaller-side algebra (no d×d tensor when N < d)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastssl
import fastssl.functional as FS
from fastssl import reference, spectral
import _lightly
from _helpers import assert_matches_reference, assert_numpy_hyperparameters_accepted

LIGHTLY = _lightly.load()
needs_lightly = pytest.mark.skipif(LIGHTLY is None, reason="lightly is not installed")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(2, 7), (3, 5), (17, 129), (64, 9)]  # (N, d): N < d and N > d, odd sizes


def _views(v, n, d, dtype=torch.float32, non_contiguous=False):
    out = []
    for _ in range(v):
        x = torch.randn(n, 2 * d)[:, ::2] if non_contiguous else torch.randn(n, d)
        out.append(x.to(dtype))
    return out


def _upcast_half(fn):
    """The reference with half inputs run in float32: PyTorch has no half-precision SVD or
    log-determinant on CPU, and lightly's patch kernel alignment computes in float32 anyway. The
    gradients still come back in the half dtype, so "PyTorch's own error" is its rounding."""
    half = (torch.float16, torch.bfloat16)
    return lambda *xs: fn(*[x.float() if x.dtype in half else x for x in xs])


def _lightly_step(theirs, ours, call, inputs, rtol=2e-5, atol=1e-6):
    """One forward/backward of lightly's and fastssl's module on the same values."""
    results = []
    for module in (theirs, ours):
        leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
        loss = call(module, leaves)
        grads = torch.autograd.grad(loss.sum(), leaves, allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
        results.append((loss.detach().reshape(()), grads))
    (loss_t, grads_t), (loss_o, grads_o) = results
    assert loss_o.dtype == torch.float32 and loss_o.shape == torch.Size([])
    assert torch.isfinite(loss_t)
    assert abs(loss_o.double() - loss_t.double()) <= rtol * abs(loss_t.item()) + atol, (loss_o, loss_t)
    for g_o, g_t, x in zip(grads_o, grads_t, inputs):
        assert g_o.dtype == x.dtype
        err = (g_o.double() - g_t.double()).abs().max().item()
        assert err <= rtol * g_t.abs().max().item() + atol, f"gradient error {err:.3e}"


# --------------------------------------------------------------------------------------------
# Against the float64 reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, d", SHAPES)
@pytest.mark.parametrize("update", [True, False])
def test_tico_matches_reference(n, d, dtype, update):
    covariance = torch.randn(d, d) / d
    covariance = covariance @ covariance.T  # a running covariance is positive semi-definite
    a, b = _views(2, n, d, dtype, non_contiguous=d % 2 == 1)
    assert_matches_reference(
        lambda x, y: spectral.tico_loss(x, y, covariance, 0.7, 3.0, update_covariance=update, backend="torch")[0],
        lambda x, y: reference.tico_loss(x, y, covariance.to(x.dtype), 0.7, 3.0)[0],
        [a, b],
    )


@pytest.mark.parametrize("n, d", SHAPES)
def test_tico_covariance_update_matches_reference(n, d):
    a, b = _views(2, n, d)
    old = torch.rand(d, d)
    _, new = spectral.tico_loss(a, b, old, 0.8, backend="torch")
    _, expected = reference.tico_loss(a.double(), b.double(), old.double(), 0.8)
    torch.testing.assert_close(new.double(), expected, rtol=1e-6, atol=1e-7)
    # the first call starts from zeros
    _, first = spectral.tico_loss(a, b, None, 0.8, backend="torch")
    torch.testing.assert_close(first.double(), reference.tico_loss(a.double(), b.double(), None, 0.8)[1])
    assert spectral.tico_loss(a, b, old, update_covariance=False)[1] is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, d", SHAPES)
@pytest.mark.parametrize("views", [2, 3])
def test_frossl_matches_reference(n, d, views, dtype):
    inputs = _views(views, n, d, dtype, non_contiguous=d % 2 == 1)
    assert_matches_reference(
        lambda *z: spectral.frossl_loss(list(z), 0.7, backend="torch"),
        lambda *z: reference.frossl_loss(list(z), 0.7),
        inputs,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b, k, d", [(1, 1, 5), (3, 2, 7), (9, 3, 4), (5, 4, 33)])
def test_mmcr_matches_reference(b, k, d, dtype):
    online, momentum = torch.randn(b, k, d).to(dtype), torch.randn(b, k, d).to(dtype)
    assert_matches_reference(
        lambda x, y: spectral.mmcr_loss(x, y, 0.3, backend="torch"),
        _upcast_half(lambda x, y: reference.mmcr_loss(x, y, 0.3)),
        [online, momentum],
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, d", SHAPES)
@pytest.mark.parametrize("views", [1, 4])
def test_emp_ssl_matches_reference(n, d, views, dtype):
    inputs = _views(views, n, d, dtype, non_contiguous=d % 2 == 1)
    assert_matches_reference(
        lambda *z: spectral.emp_ssl_loss(list(z), 0.3, 5.0, backend="torch"),
        _upcast_half(lambda *z: reference.emp_ssl_loss(list(z), 0.3, 5.0)),
        inputs,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b, n, d", [(1, 3, 2), (2, 17, 5), (3, 6, 40), (2, 33, 33)])
@pytest.mark.parametrize("masked", [False, True])
def test_patch_kernel_alignment_matches_reference(b, n, d, masked, dtype):
    student, teacher = torch.randn(b, n, d).to(dtype), torch.randn(b, n, d).to(dtype)
    mask = None
    if masked:
        mask = torch.rand(b, n) < 0.3
        mask[:, :3] = False  # at least three valid tokens per image: CKA has a gradient
    valid = None if mask is None else (~mask).double()
    assert_matches_reference(
        lambda s, t: spectral.patch_kernel_alignment_loss(s, t, mask, backend="torch"),
        _upcast_half(lambda s, t: reference.patch_kernel_alignment_loss(s, t, None if valid is None else valid.to(s.dtype))),
        [student, teacher],
    )


def test_reference_backend_dispatches_to_the_reference():
    a, b = _views(2, 5, 7)
    online, momentum = torch.randn(4, 2, 6), torch.randn(4, 2, 6)
    for fn, args in [
        (lambda **kw: FS.tico_loss(a, b, **kw)[0], ()),
        (lambda **kw: FS.frossl_loss([a, b], **kw), ()),
        (lambda **kw: FS.mmcr_loss(online, momentum, **kw), ()),
        (lambda **kw: FS.emp_ssl_loss([a, b], **kw), ()),
        (lambda **kw: FS.patch_kernel_alignment_loss(online, momentum, **kw), ()),
    ]:
        ours, ref = fn(backend="torch"), fn(backend="reference")
        assert ref.dtype == torch.float32
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Against lightly 1.6
# --------------------------------------------------------------------------------------------


@needs_lightly
@pytest.mark.parametrize("n, d", [(2, 3), (8, 32), (40, 16), (33, 65)])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_tico_matches_lightly_over_several_calls(n, d, backend):
    theirs, ours = LIGHTLY.TiCoLoss(beta=0.8, rho=5.0), fastssl.TiCoLoss(beta=0.8, rho=5.0, backend=backend)
    for update in (True, True, False, True):
        inputs = _views(2, n, d, non_contiguous=True)
        _lightly_step(theirs, ours, lambda m, x: m(x[0], x[1], update_covariance_matrix=update), inputs)
        assert ours.C is not None
        torch.testing.assert_close(ours.C, theirs.C, rtol=1e-5, atol=1e-7)


@needs_lightly
@pytest.mark.parametrize("n, d, views", [(2, 3, 2), (8, 32, 2), (40, 16, 3), (33, 65, 4)])
def test_frossl_matches_lightly(n, d, views):
    theirs, ours = LIGHTLY.FroSSLLoss(invariance_weight=0.5), fastssl.FroSSLLoss(invariance_weight=0.5)
    _lightly_step(theirs, ours, lambda m, x: m(list(x)), _views(views, n, d, non_contiguous=True))


@needs_lightly
@pytest.mark.parametrize("b, k, d", [(3, 4, 32), (16, 2, 8), (2, 1, 5)])
@pytest.mark.parametrize("lmda", [5e-3, 0.5])
def test_mmcr_matches_lightly(b, k, d, lmda):
    theirs, ours = LIGHTLY.MMCRLoss(lmda=lmda), fastssl.MMCRLoss(lmda=lmda)
    _lightly_step(theirs, ours, lambda m, x: m(x[0], x[1]), [torch.randn(b, k, d), torch.randn(b, k, d)])


@needs_lightly
@pytest.mark.parametrize("n, d, views", [(8, 32, 3), (40, 16, 2), (5, 5, 6)])
def test_emp_ssl_matches_lightly(n, d, views):
    """lightly factors the d×d matrix by LU in float32 (gradient errors ~1e-5 relative): both are
    measured against lightly's formula in float64, fastssl's error at most lightly's."""
    inputs = _views(views, n, d)
    assert_matches_reference(
        lambda *z: fastssl.EMPSSLLoss(tcr_eps=0.5, inv_coef=3.0)(list(z)),
        lambda *z: LIGHTLY.EMPSSLLoss(tcr_eps=0.5, inv_coef=3.0)(list(z)),
        inputs,
    )


@needs_lightly
@pytest.mark.parametrize("b, n, d", [(2, 16, 8), (3, 9, 24)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("max_tokens", [None, 6])
def test_patch_kernel_alignment_matches_lightly(b, n, d, masked, max_tokens):
    mask = (torch.rand(b, n) < 0.3) if masked else None
    theirs = LIGHTLY.PatchKernelAlignmentLoss(max_tokens=max_tokens)
    ours = fastssl.PatchKernelAlignmentLoss(max_tokens=max_tokens)
    inputs = [torch.randn(b, n, d), torch.randn(b, n, d)]
    results = []
    for module in (theirs, ours):  # the same random token subsample on both sides
        torch.manual_seed(7)
        leaves = [x.clone().requires_grad_(True) for x in inputs]
        loss = module(leaves[0], leaves[1], mask)
        results.append((loss.detach(), torch.autograd.grad(loss, leaves[0])[0]))
    (loss_t, grad_t), (loss_o, grad_o) = results
    torch.testing.assert_close(loss_o, loss_t.float(), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(grad_o, grad_t, rtol=2e-5, atol=1e-6)


@needs_lightly
def test_lightly_behaviour_checks():
    """lightly's own tests, in our words: errors, symmetry, special values."""
    with pytest.raises(AssertionError):  # TiCo: a batch of one
        fastssl.TiCoLoss()(torch.randn(1, 8), torch.randn(1, 8))
    with pytest.raises(AssertionError):  # TiCo: different shapes
        fastssl.TiCoLoss()(torch.randn(2, 8), torch.randn(2, 4))
    tico = fastssl.TiCoLoss()
    x0, x1 = torch.randn(3, 256), torch.randn(3, 256)
    assert tico(x0, x1, update_covariance_matrix=False).item() == pytest.approx(
        tico(x1, x0, update_covariance_matrix=False).item(), abs=1e-2
    )
    with pytest.raises(ValueError, match="at least two views"):
        fastssl.FroSSLLoss()([torch.randn(8, 32)])
    z0, z1 = torch.randn(8, 32), torch.randn(8, 32)
    assert fastssl.FroSSLLoss()([z0, z1]).item() == pytest.approx(fastssl.FroSSLLoss()([z1, z0]).item(), rel=1e-6)
    assert fastssl.FroSSLLoss()([z0, z1]).item() != pytest.approx(
        fastssl.FroSSLLoss(invariance_weight=0.0)([z0, z1]).item()
    )
    with pytest.raises(ValueError):
        fastssl.MMCRLoss(lmda=-1)
    with pytest.raises(AssertionError):
        fastssl.MMCRLoss()(torch.randn(3, 4, 8), torch.randn(3, 4, 9))
    assert fastssl.MMCRLoss()(torch.zeros(3, 4, 8), torch.zeros(3, 4, 8)).item() == 0.0
    with pytest.raises(ValueError):
        fastssl.PatchKernelAlignmentLoss(max_tokens=1)
    pka = fastssl.PatchKernelAlignmentLoss()
    features = torch.randn(3, 16, 8)
    assert pka(features, features.clone()).item() == pytest.approx(0.0, abs=1e-5)
    assert pka(features, features[:, torch.randperm(16)]) > pka(features, features.clone())
    for bad in [(torch.randn(2, 16), torch.randn(2, 16)), (torch.randn(2, 4, 3), torch.randn(2, 5, 3))]:
        with pytest.raises(ValueError):
            pka(*bad)
    with pytest.raises(ValueError, match="dtype torch.bool"):
        pka(features, features, torch.zeros(3, 16))
    with pytest.raises(ValueError, match="mask must have shape"):
        pka(features, features, torch.zeros(3, 15, dtype=torch.bool))


def test_patch_kernel_alignment_without_a_valid_image_is_a_differentiable_zero():
    student = torch.randn(2, 5, 4, requires_grad=True)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 0] = False  # one valid token is not enough
    loss = fastssl.PatchKernelAlignmentLoss()(student, torch.randn(2, 5, 4), mask)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(student.grad, torch.zeros_like(student))


# --------------------------------------------------------------------------------------------
# Singular and rank-deficient inputs
# --------------------------------------------------------------------------------------------


def _finite_loss_and_grad(fn, *inputs):
    leaves = [x.clone().requires_grad_(True) for x in inputs]
    loss = fn(*leaves)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
    assert torch.isfinite(loss), loss
    assert all(torch.isfinite(g).all() for g in grads)
    return loss, grads


def test_mmcr_rank_deficient_inputs():
    """Duplicated views, duplicated samples and zero embeddings: singular values at 0, where the
    SVD gradient is undefined; fastssl's value matches the float64 SVD and the gradient is the
    minimum-norm subgradient (finite)."""
    base = torch.randn(6, 1, 16)
    online = base.expand(6, 3, 16).clone()  # every view identical: each Z_b has rank 1
    momentum = online.clone()
    momentum[3:] = momentum[:3]  # and half the centroids repeat: C has rank 3
    online[3:] = online[:3]
    loss, (g_online, _) = _finite_loss_and_grad(lambda x, y: fastssl.MMCRLoss(lmda=0.5)(x, y), online, momentum)
    expected = reference.mmcr_loss(online.double(), momentum.double(), 0.5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # The gradient of -‖C‖_* for C of rank r is the sum of u_i v_iᵀ over the r non-zero singular
    # values (per centroid row, then split over the 2k views): its squared norm is r / (2k).
    only_centroids = _finite_loss_and_grad(lambda x, y: fastssl.MMCRLoss(lmda=0.0)(x, y), online, momentum)[1]
    squared = sum(g.square().sum() for g in only_centroids) * 6  # 2k = 6 views share each row
    assert squared.item() == pytest.approx(3.0, rel=1e-4)
    zeros = torch.zeros(4, 2, 8)
    loss, grads = _finite_loss_and_grad(lambda x, y: fastssl.MMCRLoss()(x, y), zeros, zeros)
    assert loss.item() == 0.0 and all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_mmcr_non_finite_input_propagates_nan():
    online = torch.randn(3, 2, 8)
    online[1, 0, 2] = math.nan
    assert torch.isnan(fastssl.MMCRLoss()(online, torch.randn(3, 2, 8)))


def test_emp_ssl_rank_deficient_views():
    """Repeated rows, zero views and views of rank one: I + cZᵀZ stays positive definite, so the
    Cholesky factorization succeeds and matches the float64 reference."""
    rank_one = torch.randn(12, 1) * torch.randn(1, 20)
    repeated = torch.randn(3, 20).repeat(4, 1)
    zeros = torch.zeros(12, 20)
    views = [rank_one, repeated, zeros]
    loss, _ = _finite_loss_and_grad(lambda *z: fastssl.EMPSSLLoss()(list(z)), *views)
    assert loss.item() == pytest.approx(reference.emp_ssl_loss([v.double() for v in views]).item(), rel=1e-5)
    nan_view = rank_one.clone()
    nan_view[0, 0] = math.nan
    assert torch.isnan(fastssl.EMPSSLLoss()([nan_view, repeated]))


def test_frossl_and_tico_rank_deficient_views():
    rank_one = torch.randn(16, 1) * torch.randn(1, 24)
    other = torch.randn(16, 24)
    loss, _ = _finite_loss_and_grad(lambda a, b: fastssl.FroSSLLoss()([a, b]), rank_one, other)
    assert loss.item() == pytest.approx(reference.frossl_loss([rank_one.double(), other.double()]).item(), rel=1e-5)
    _finite_loss_and_grad(lambda a, b: fastssl.TiCoLoss()(a, b), rank_one, other)


def test_patch_kernel_alignment_constant_image_is_finite():
    """A constant image has a zero centered kernel (HSIC = 0): the clamp keeps the gradient finite."""
    student = torch.randn(2, 9, 4)
    student[0] = 3.0
    _finite_loss_and_grad(lambda s, t: fastssl.PatchKernelAlignmentLoss()(s, t), student, torch.randn(2, 9, 4))


# --------------------------------------------------------------------------------------------
# The smaller side: no d×d tensor when N < d (nor N×N when d < N)
# --------------------------------------------------------------------------------------------


class _RecordShapes(TorchDispatchMode):
    """Every tensor any operator returns, forward and backward."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def _shapes_of(fn, *inputs):
    leaves = [x.clone().requires_grad_(True) for x in inputs]
    with _RecordShapes() as recorder:
        fn(*leaves).backward()
    return recorder.shapes


@pytest.mark.parametrize(
    "name, fn, wide",
    [
        ("frossl", lambda a, b: FS.frossl_loss([a, b], backend="torch"), True),
        ("emp_ssl", lambda a, b: FS.emp_ssl_loss([a, b], backend="torch"), True),
        ("tico_no_update", lambda a, b: FS.tico_loss(a, b, update_covariance=False, backend="torch")[0], True),
        ("frossl", lambda a, b: FS.frossl_loss([a, b], backend="torch"), False),
        ("emp_ssl", lambda a, b: FS.emp_ssl_loss([a, b], backend="torch"), False),
    ],
)
def test_smaller_side_only(name, fn, wide):
    n, d = (16, 300) if wide else (300, 16)
    shapes = _shapes_of(fn, torch.randn(n, d), torch.randn(n, d))
    big = max(n, d)
    assert all(s[-2:] != (big, big) for s in shapes if len(s) >= 2), f"{name} formed a {big}×{big} tensor"


def test_patch_kernel_alignment_uses_feature_side_when_d_is_smaller():
    shapes = _shapes_of(lambda s, t: FS.patch_kernel_alignment_loss(s, t, backend="torch"),
                        torch.randn(2, 200, 8), torch.randn(2, 200, 8))  # fmt: skip
    assert all(s[-2:] != (200, 200) for s in shapes if len(s) >= 2)


def test_mmcr_forms_no_singular_vectors_of_the_long_side():
    shapes = _shapes_of(lambda x, y: FS.mmcr_loss(x, y, backend="torch"), torch.randn(4, 2, 300), torch.randn(4, 2, 300))
    assert all(s[-2:] != (300, 300) for s in shapes if len(s) >= 2)


def test_frossl_makes_no_host_sync(monkeypatch):
    """lightly divides by ``torch.trace(cov).item()``; fastssl keeps the trace on the device."""

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronization")

    z = [torch.randn(8, 32), torch.randn(8, 32)]
    monkeypatch.setattr(torch.Tensor, "item", forbidden)
    monkeypatch.setattr(torch.Tensor, "tolist", forbidden)
    FS.frossl_loss(z, backend="torch")
    FS.tico_loss(z[0], z[1], backend="torch")
    FS.patch_kernel_alignment_loss(torch.randn(2, 5, 3), torch.randn(2, 5, 3), backend="torch")


def test_losses_compile_without_graph_breaks():
    a, b = torch.randn(6, 10), torch.randn(6, 10)
    compiled = torch.compile(lambda x, y: FS.frossl_loss([x, y], backend="torch") + FS.emp_ssl_loss([x, y]),
                             fullgraph=True, backend="aot_eager")  # fmt: skip
    torch.testing.assert_close(compiled(a, b), FS.frossl_loss([a, b]) + FS.emp_ssl_loss([a, b]))


def test_more_losses_compile_without_graph_breaks():
    x = torch.randn(3, 8, 5)

    def losses(z):
        return (FS.tico_loss(z[0], z[1])[0] + FS.mmcr_loss(z, z) + FS.patch_kernel_alignment_loss(z, z.detach()))

    compiled = torch.compile(losses, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), losses(x))


# NumPy scalar hyperparameters (a config loaded with NumPy, a swept grid) are accepted as lightly
# accepts them; bool is rejected, a flag passed where a number belongs being a bug.
@pytest.mark.parametrize("name", ["TiCoLoss", "FroSSLLoss", "MMCRLoss", "EMPSSLLoss"])
def test_numpy_scalar_hyperparameters_accepted_bool_rejected(name):
    assert_numpy_hyperparameters_accepted(getattr(fastssl, name))


def test_emp_ssl_invariance_zero_rows_as_cosine_similarity():
    """The torch path sums normalized rows (F.normalize with cosine_similarity's ε) instead of
    V broadcast cosines: the same value and gradient, also for an all-zero row (below ε)."""
    generator = torch.Generator().manual_seed(7)
    views = [torch.randn(6, 5, generator=generator, dtype=torch.float64) for _ in range(3)]
    views[1][2] = 0.0
    values, grads = [], []
    torch_path = lambda z: FS.emp_ssl_loss(z, 0.3, 5.0, backend="torch")  # noqa: E731
    for loss_fn in (torch_path, lambda z: reference.emp_ssl_loss(z, 0.3, 5.0)):
        leaves = [v.clone().requires_grad_(True) for v in views]
        loss = loss_fn(leaves)
        values.append(loss)
        grads.append(torch.autograd.grad(loss, leaves))
    torch.testing.assert_close(values[0], values[1].float(), rtol=1e-6, atol=1e-6)
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("eps", [1e-12, 1e-8, 0.5])
def test_normalize_rows_closed_form_backward_matches_f_normalize(eps):
    """TiCo's and EMP-SSL's row normalization: F.normalize's value and gradient, rows below ε
    (zero, tiny, and norm < 0.5 for ε = 0.5) included."""
    generator = torch.Generator().manual_seed(13)
    x = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    x[1] = 0.0
    x[2] *= 1e-10
    x[3] *= 0.05
    upstream = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    ours, theirs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_ours, y_theirs = spectral._normalize_rows(ours, eps), torch.nn.functional.normalize(theirs, dim=-1, eps=eps)
    torch.testing.assert_close(y_ours, y_theirs, rtol=0, atol=0)
    (grad_ours,) = torch.autograd.grad(y_ours, ours, upstream)
    (grad_theirs,) = torch.autograd.grad(y_theirs, theirs, upstream)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-12, atol=1e-12)
