"""Under ``backend="auto"`` a Triton BACKWARD kernel that fails to compile or launch must not end
the step: the backward gives the torch path's gradient after one warning naming the kernel and
the error; with ``backend="triton"`` the error propagates (fastssl._backend.guard_triton_backward).

The kernels run on CPU tensors through the interpreter; "auto" is made to pick the Triton path
as it does for CUDA tensors (each family's ``resolve_backend`` patched), and each family's
backward launcher is replaced by one that raises. The forward still runs the kernels, so the
fallback is the backward's own.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import fastssl.functional as FS
from fastssl import _backend, decorrelation, dino, swav

pytest.importorskip("triton")


class SimulatedFailure(RuntimeError):
    pass


def _raise(*args, **kwargs):
    raise SimulatedFailure("simulated backward launch failure")


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(_backend, "_FALLBACK_WARNED", set())


def _auto_picks_triton(backend, tensor, *args):
    """resolve_backend as on CUDA tensors: "auto" gives "triton"; other names stay."""
    return "triton" if backend in ("auto", "triton") else backend


def _leaves(*shapes, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator).to(dtype).requires_grad_(True) for shape in shapes]


def _gradients(call, leaves, backend):
    fresh = [leaf.detach().clone().requires_grad_(True) for leaf in leaves]
    loss = call(fresh, backend)
    return loss.detach(), torch.autograd.grad(loss, fresh)


def _check_fallback(call, leaves, kernel):
    """auto: the torch path's loss and gradient, one warning; triton: the error propagates."""
    expected_loss, expected_grads = _gradients(call, leaves, "torch")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss, grads = _gradients(call, leaves, "auto")
        _gradients(call, leaves, "auto")  # a second failure is silent
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert f"{kernel} backward failed" in messages[0] and "simulated backward launch failure" in messages[0]
    # The forward ran the kernels (its value is the Triton one); the gradient is the torch path's.
    torch.testing.assert_close(loss, expected_loss, rtol=1e-4, atol=1e-5)
    for grad, expected in zip(grads, expected_grads):
        assert grad.dtype == expected.dtype and torch.count_nonzero(expected) > 0
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(SimulatedFailure):
        _gradients(call, leaves, "triton")


# --------------------------------------------------------------------------------------------
# Barlow Twins and VICReg: both launch plans (N×N Gram tiles and d×d tiles)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["barlow_twins", "vicreg"])
@pytest.mark.parametrize("n, d", [(5, 11), (9, 3)], ids=["gram", "cross"])
def test_decorrelation_backward_falls_back_under_auto(loss, n, d, monkeypatch):
    from fastssl.kernels import decorrelation as kernels

    monkeypatch.setattr(kernels, "backward", _raise)
    monkeypatch.setattr(decorrelation, "resolve_backend", _auto_picks_triton)
    fn = {"barlow_twins": FS.barlow_twins_loss, "vicreg": FS.vicreg_loss}[loss]
    _check_fallback(lambda views, backend: fn(*views, backend=backend), _leaves((n, d), (n, d)), loss)


def test_decorrelation_half_inputs_get_gradients_in_their_dtype(monkeypatch):
    from fastssl.kernels import decorrelation as kernels

    monkeypatch.setattr(kernels, "backward", _raise)
    monkeypatch.setattr(decorrelation, "resolve_backend", _auto_picks_triton)
    a, b = _leaves((6, 7), (6, 7), dtype=torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="barlow_twins backward"):
        loss = FS.barlow_twins_loss(a, b, backend="auto")
        grad_a, grad_b = torch.autograd.grad(loss, [a, b])
    expected = torch.autograd.grad(FS.barlow_twins_loss(a, b, backend="torch"), [a, b])
    assert grad_a.dtype == grad_b.dtype == torch.bfloat16
    torch.testing.assert_close(grad_a, expected[0])
    torch.testing.assert_close(grad_b, expected[1])


def test_the_decision_is_recorded_at_forward_time(monkeypatch):
    """The op's autograd context holds the inputs' references under "auto" only (a Python
    attribute set when the forward ran); an explicit "triton" keeps nothing and its backward
    runs the kernels unguarded."""
    monkeypatch.setattr(decorrelation, "resolve_backend", _auto_picks_triton)
    a, b = _leaves((4, 6), (4, 6))
    auto = FS.barlow_twins_loss(a, b, backend="auto")
    kept = auto.grad_fn.fastssl_torch_fallback_inputs
    assert kept[0] is a and kept[1] is b
    explicit = FS.barlow_twins_loss(a, b, backend="triton")
    assert explicit.grad_fn.fastssl_torch_fallback_inputs is None
    assert not _backend.backward_fallback_allowed()  # the mark ends with the forward
    for grad, expected in zip(torch.autograd.grad(explicit, [a, b]), torch.autograd.grad(auto, [a, b])):
        torch.testing.assert_close(grad, expected)


# --------------------------------------------------------------------------------------------
# SwAV and DINO: the backward is the scaling of the gradient the forward kernel wrote
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("learnable_temperature", [False, True])
def test_swav_backward_falls_back_under_auto(learnable_temperature, monkeypatch):
    from fastssl.kernels import sinkhorn as kernels

    monkeypatch.setattr(kernels, "scale_gradient", _raise)
    monkeypatch.setattr(swav, "resolve_backend", _auto_picks_triton)
    leaves = _leaves((4, 5), (4, 5), (4, 5), seed=1)
    if learnable_temperature:
        leaves.append(torch.tensor(0.2, requires_grad=True))

    def call(views, backend):
        temperature = views[3] if learnable_temperature else 0.1
        return FS.swav_loss(views[:2], views[2:3], temperature=temperature, backend=backend)

    _check_fallback(call, leaves, "swav")


@pytest.mark.parametrize("learnable_temperature", [False, True])
def test_dino_backward_falls_back_under_auto(learnable_temperature, monkeypatch):
    from fastssl.kernels import dino as kernels

    monkeypatch.setattr(kernels, "scale_gradient", _raise)
    monkeypatch.setattr(dino, "resolve_backend", _auto_picks_triton)
    teacher = [torch.randn(3, 6) for _ in range(2)]
    center = torch.randn(6) * 0.1
    leaves = _leaves((3, 6), (3, 6), (3, 6), seed=2)
    if learnable_temperature:
        leaves.append(torch.tensor(0.1, requires_grad=True))

    def call(views, backend):
        student_temp = views[3] if learnable_temperature else 0.1
        return FS.dino_loss(teacher, views[:3], center, 0.04, student_temp, backend=backend)

    _check_fallback(call, leaves, "dino")


# --------------------------------------------------------------------------------------------
# NT-Xent, InfoNCE, uniformity: runs once fastssl.ntxent._kernels() guards its ops
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["ntxent", "infonce", "uniformity"])
@pytest.mark.parametrize("learnable_temperature", [False, True])
def test_contrastive_backward_falls_back_under_auto(family, learnable_temperature, monkeypatch):
    from fastssl import ntxent
    from fastssl.kernels import ntxent as kernels

    op = {"ntxent": kernels._ntxent_op, "infonce": kernels._infonce_op, "uniformity": kernels._uniformity_op}[family]
    ntxent._kernels()
    if getattr(op, "_fastssl_backward_guard", None) is None:
        pytest.skip("fastssl.ntxent._kernels() does not guard the contrastive ops' backward yet")
    for launcher in ("_ntxent_backward_op", "_infonce_backward_op", "_uniformity_backward_op"):
        monkeypatch.setattr(kernels, launcher, _raise)
    monkeypatch.setattr(ntxent, "resolve_backend", _auto_picks_triton)
    bank = torch.randn(11, 5, generator=torch.Generator().manual_seed(4))
    leaves = _leaves((6, 5), seed=3) if family == "uniformity" else _leaves((6, 5), (6, 5), seed=3)
    if learnable_temperature and family != "uniformity":
        leaves.append(torch.tensor(0.3, requires_grad=True))

    def call(views, backend):
        tau = views[2] if len(views) == 3 else 0.3
        if family == "ntxent":
            return FS.ntxent_loss(views[0], views[1], tau, backend=backend)
        if family == "infonce":
            return FS.infonce_loss(views[0], views[1], bank, tau, backend=backend)
        return ntxent.uniformity_loss(views[0], 2.0, backend=backend)

    _check_fallback(call, leaves, family)


# --------------------------------------------------------------------------------------------
# iBOT: the patch-loss kernels beside DINO's
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True], ids=["mask", "weights"])
def test_ibot_backward_falls_back_under_auto(weighted, monkeypatch):
    from fastssl import prototype
    from fastssl.kernels import dino as kernels

    monkeypatch.setattr(kernels, "_ibot_backward_op", _raise)
    monkeypatch.setattr(prototype, "resolve_backend", _auto_picks_triton)
    mask = torch.tensor([[True, False, True, True], [False, True, False, False]])
    teacher = torch.randn(4, 9, generator=torch.Generator().manual_seed(5))
    center = 0.1 * torch.randn(1, 9, generator=torch.Generator().manual_seed(6))
    weights = torch.tensor([0.1, 0.4, 0.2, 0.3])

    def call(views, backend):
        if weighted:
            return prototype._ibot_dispatch(teacher, views[0], weights, center, 0.04, 0.1, backend,
                                            want_teacher_sum=False)[0]
        return FS.ibot_patch_loss(teacher, views[0], mask, center, 0.04, 0.1, backend=backend)

    _check_fallback(call, _leaves((4, 9), seed=7), "ibot")
