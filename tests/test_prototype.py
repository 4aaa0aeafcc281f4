"""Prototype losses (iBOT, iBOT++, CAPI, MSN, PMSN): the chunked torch paths and their
hand-written gradients against the float64 reference, the modules against lightly 1.6's classes
over several calls (centre state included), lightly's own behaviour checks in our words, bad
input, and ``gather_distributed`` on gloo."""

from __future__ import annotations

import inspect
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastssl
import fastssl.functional as FS
from fastssl import prototype, reference

import _lightly
from _helpers import assert_matches_reference, assert_numpy_hyperparameters_accepted

LIGHTLY = _lightly.load()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def need_lightly():
    if LIGHTLY is None:
        pytest.skip("lightly is not installed or not importable")
    return LIGHTLY


def _close(ours: torch.Tensor, theirs: torch.Tensor, what: str, rtol: float = 2e-5, atol: float = 1e-6) -> None:
    assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
    assert torch.isfinite(theirs).all(), f"{what}: comparison value not finite"
    err = (ours.double() - theirs.double()).abs().max().item()
    allowed = rtol * theirs.double().abs().max().item() + atol
    assert err <= allowed, f"{what}: max error {err:.3e} > {allowed:.3e}"


def _mask(batch: int, h: int, w: int, p: float = 0.4) -> torch.Tensor:
    mask = torch.rand(batch, h, w) < p
    mask.view(batch, -1)[:, 0] = True  # at least one masked token somewhere
    if batch > 1:
        mask[-1] = False  # an image without masked tokens (weight clamp)
        mask[-1, 0, 0] = batch % 2 == 0
    return mask


def _rows(n: int, k: int, dtype: torch.dtype, non_contiguous: bool = False, scale: float = 1.0) -> torch.Tensor:
    if non_contiguous:
        return (torch.randn(n, 2 * k) * scale).to(dtype)[:, ::2]
    return (torch.randn(n, k) * scale).to(dtype)


# --------------------------------------------------------------------------------------------
# iBOT and iBOT++ against the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,k", [(1, 1), (2, 7), (3, 129)])
def test_ibot_matches_reference(batch, k, dtype):
    mask = _mask(batch, 3, 5)
    rows = int(mask.sum())
    center = torch.randn(k) * 0.3
    inputs = [_rows(rows, k, dtype, non_contiguous=batch == 3), _rows(rows, k, dtype)]

    def impl(t, s):
        return FS.ibot_patch_loss(t, s, mask, center.to(t.dtype), 0.04, 0.1, backend="torch")

    def ref(t, s):
        return reference.ibot_patch_loss(t, s, mask, center.to(t.dtype), 0.04, 0.1)

    assert_matches_reference(impl, ref, inputs)


def test_ibot_chunks_and_float64(monkeypatch):
    monkeypatch.setattr(prototype, "_CHUNK_ELEMENTS", 10)  # 2 rows of 5 per chunk, last one partial
    mask = _mask(3, 3, 3, 0.6)
    rows = int(mask.sum())
    inputs = [torch.randn(rows, 5, dtype=torch.float64) for _ in range(2)]
    center = torch.randn(5, dtype=torch.float64)
    assert_matches_reference(
        lambda t, s: FS.ibot_patch_loss(t, s, mask, center, 0.07, 0.2, backend="torch"),
        lambda t, s: reference.ibot_patch_loss(t, s, mask, center, 0.07, 0.2),
        inputs, rtol=1e-7, atol=1e-12,
    )  # fmt: skip


@pytest.mark.parametrize("teacher_temp,student_temp", [(0.01, 0.1), (0.04, 0.01), (-0.5, 0.3)])
def test_ibot_large_logits(teacher_temp, student_temp):
    # (t − c)/τ_t up to ~1e4: most teacher probabilities underflow; everything stays exact.
    mask = _mask(2, 4, 4)
    rows = int(mask.sum())
    inputs = [torch.randn(rows, 9) * 30, torch.randn(rows, 9) * 30]
    center = torch.randn(9) * 30
    assert_matches_reference(
        lambda t, s: FS.ibot_patch_loss(t, s, mask, center, teacher_temp, student_temp, backend="torch"),
        lambda t, s: reference.ibot_patch_loss(t, s, mask, center, teacher_temp, student_temp),
        inputs,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,mask_kind,weight", [((2, 6, 7), None, 1.0), ((3, 4, 129), "bool", 0.3), ((1, 9, 5), "float", 0.0)]
)
def test_ibot_plus_plus_matches_reference(shape, mask_kind, weight, dtype):
    b, n, k = shape
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(b, 2, n // 2) < 0.5
    elif mask_kind == "float":
        mask = (torch.rand(b, n) < 0.5).float()
    center = torch.randn(k) * 0.2
    inputs = [_rows(b * n, k, dtype).reshape(b, n, k), _rows(b * n, k, dtype, non_contiguous=True).reshape(b, n, k)]

    def impl(t, s):
        return FS.ibot_plus_plus_patch_loss(t, s, mask, center.to(t.dtype), 0.04, 0.1, weight, backend="torch")

    def ref(t, s):
        return reference.ibot_plus_plus_patch_loss(t, s, mask, center.to(t.dtype), 0.04, 0.1, weight)

    assert_matches_reference(impl, ref, inputs)


def test_ibot_plus_plus_rank_two_equals_rank_three():
    t, s = torch.randn(3, 7, 8), torch.randn(3, 7, 8)
    mask = torch.rand(3, 7) < 0.5
    a = FS.ibot_plus_plus_patch_loss(t, s, mask, backend="torch")
    b = FS.ibot_plus_plus_patch_loss(t.flatten(0, 1), s.flatten(0, 1), mask, backend="torch")
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


# --------------------------------------------------------------------------------------------
# CAPI against the reference (and lightly's Sinkhorn)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,t,p,k,indexed", [(1, 3, 3, 5, False), (2, 6, 3, 7, True), (3, 4, 4, 129, False)])
@pytest.mark.parametrize("iterations", [0, 3])
def test_capi_matches_reference(b, t, p, k, indexed, iterations, dtype):
    index = torch.stack([torch.randperm(t)[:p] for _ in range(b)]) if indexed else None
    teacher = (torch.randn(b, t, k) * 0.5).to(dtype)
    student = (torch.randn(b, 2 * p, k)).to(dtype)[:, ::2] if b == 3 else torch.randn(b, p, k).to(dtype)

    def impl(x, y):
        return FS.capi_loss(x, y, index, 0.06, 0.12, iterations, backend="torch")

    def ref(x, y):
        return reference.capi_loss(x, y, index, 0.06, 0.12, iterations)

    assert_matches_reference(impl, ref, [teacher, student])


def test_capi_chunks_extreme_logits_and_lightly_sinkhorn(monkeypatch):
    monkeypatch.setattr(prototype, "_CHUNK_ELEMENTS", 12)  # one position of (3, 4) per chunk
    # Rows far below the column maxima: entries underflow and the ε of the denominators matters.
    teacher = torch.randn(3, 5, 4, dtype=torch.float64) * 4
    teacher[1] -= 3.0
    student = torch.randn(3, 5, 4, dtype=torch.float64)
    assert_matches_reference(
        lambda x, y: FS.capi_loss(x, y, None, 0.06, 0.12, 3, backend="torch"),
        lambda x, y: reference.capi_loss(x, y, None, 0.06, 0.12, 3),
        [teacher, student], rtol=1e-7, atol=1e-12,
    )  # fmt: skip
    logits = torch.randn(4, 6, 9) * 20
    _close(FS.capi_sinkhorn(logits), reference.capi_sinkhorn(logits.double()), "sinkhorn", atol=1e-7)
    if LIGHTLY is not None:
        lightly_sinkhorn = LIGHTLY.CAPILoss.forward.__globals__["sinkhorn_knopp"]
        _close(FS.capi_sinkhorn(logits), lightly_sinkhorn(logits), "lightly's sinkhorn", atol=1e-7)


def test_capi_sinkhorn_is_positionwise_and_normalized():
    logits = torch.randn(6, 5, 10)
    full = FS.capi_sinkhorn(logits)
    assert torch.allclose(full.sum(dim=-1), torch.ones(6, 5), atol=1e-4)
    assert torch.allclose(full[:, 1:2], FS.capi_sinkhorn(logits[:, 1:2]), atol=1e-6)


# --------------------------------------------------------------------------------------------
# MSN and PMSN against the reference
# --------------------------------------------------------------------------------------------


def _msn_inputs(views: int, b: int, k: int, d: int, dtype: torch.dtype):
    return [torch.randn(views * b, d).to(dtype), torch.randn(b, d).to(dtype), torch.randn(k, d).to(dtype)]


def _uniform(mean_probs: torch.Tensor) -> torch.Tensor:
    return mean_probs.new_ones(mean_probs.shape[0]) / mean_probs.shape[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("views,b,k,d", [(1, 1, 3, 5), (2, 3, 7, 4), (3, 2, 129, 9)])
@pytest.mark.parametrize("prior", ["msn", "power", "custom"])
def test_msn_family_matches_reference(views, b, k, d, prior, dtype):
    inputs = _msn_inputs(views, b, k, d, dtype)
    iterations, weight = (0, 1.0) if views == 2 else (3, 0.7)

    def impl(a, t, p):
        if prior == "power":
            return FS.pmsn_loss(a, t, p, 0.1, iterations, weight, 0.25, backend="torch")
        return FS.msn_loss(a, t, p, 0.1, iterations, weight, prior=_uniform if prior == "custom" else None,
                           backend="torch")  # fmt: skip

    def ref(a, t, p):
        if prior == "msn":
            regularization = None
        elif prior == "power":
            power = prototype.power_law_distribution(p.shape[0], 0.25).to(p.dtype)
            regularization = lambda m: reference.prior_kl_regularization(m, power)  # noqa: E731
        else:
            regularization = lambda m: reference.prior_kl_regularization(m, _uniform(m))  # noqa: E731
        return reference.msn_loss(a, t, p, 0.1, iterations, weight, 0.25, regularization)

    if dtype != torch.float32 and not torch.isfinite(ref(*inputs)):
        # PyTorch's own half-precision MSN is NaN here (the sharpened p ** 4 underflows, and
        # Sinkhorn divides 0 by 0): no error to compare with. Hold fastssl (float32 inside) to
        # float32 precision for the loss and to the input dtype's rounding for the gradients.
        exact = [x.detach().double().requires_grad_(True) for x in inputs]
        loss64 = ref(*exact)
        grads64 = torch.autograd.grad(loss64, exact, allow_unused=True)
        leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
        loss = impl(*leaves)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        _close(loss, loss64, "loss", rtol=1e-4)
        assert grads[1] is None and grads64[1] is None  # no gradient reaches the targets
        for g, g64 in zip(grads[::2], grads64[::2]):
            assert g.dtype == dtype
            _close(g, g64, "gradient", rtol=1e-2, atol=1e-4)
        return
    assert_matches_reference(impl, ref, inputs)


def test_msn_chunks_and_float64(monkeypatch):
    monkeypatch.setattr(prototype, "_CHUNK_ELEMENTS", 10)  # two anchors of K = 5 per chunk
    inputs = [x.double() for x in _msn_inputs(3, 5, 5, 4, torch.float32)]
    assert_matches_reference(
        lambda a, t, p: FS.msn_loss(a, t, p, 0.2, 2, 1.3, 0.3, backend="torch"),
        lambda a, t, p: reference.msn_loss(a, t, p, 0.2, 2, 1.3, 0.3),
        inputs, rtol=1e-7, atol=1e-12,
    )  # fmt: skip


def test_msn_finite_where_lightly_overflows():
    """τ = 0.01: log p reaches −200, so lightly's ``p ** −q`` overflows to inf in float32;
    fastssl stays finite and agrees with the float64 reference."""
    torch.manual_seed(3)
    anchors, prototypes_ = torch.randn(8, 3), torch.randn(6, 3)
    targets = anchors[4:].clone()  # q has its mass where the other anchor view's p is ~e^-100
    inputs = [anchors, targets, prototypes_]
    assert torch.isfinite(FS.msn_loss(*inputs, temperature=0.01, target_sharpen_temperature=1.0, backend="torch"))
    if LIGHTLY is not None:
        assert not torch.isfinite(LIGHTLY.MSNLoss(temperature=0.01)(*inputs, target_sharpen_temperature=1.0))
    assert_matches_reference(
        lambda a, t, p: FS.msn_loss(a, t, p, 0.01, 3, 1.0, 1.0, backend="torch"),
        lambda a, t, p: reference.msn_loss(a, t, p, 0.01, 3, 1.0, 1.0),
        inputs, rtol=1e-5,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Modules against lightly, several calls each
# --------------------------------------------------------------------------------------------

MODULES = ["IBOTPatchLoss", "IBOTPlusPlusPatchLoss", "CAPILoss", "MSNLoss", "PMSNLoss", "PMSNCustomLoss"]


@pytest.mark.parametrize("name", MODULES)
def test_signatures_extend_lightly(name):
    lightly = need_lightly()

    def rows(function):
        return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values() if p.name != "self"]

    theirs, ours = rows(getattr(lightly, name).__init__), rows(getattr(fastssl, name).__init__)
    assert ours[: len(theirs)] == theirs
    assert [n for n, _, _ in ours[len(theirs):]] == ["backend"]
    assert rows(getattr(fastssl, name).forward) == rows(getattr(lightly, name).forward)


def _grads(module, call, inputs, needs):
    leaves = [x.detach().clone().requires_grad_(g) if isinstance(x, torch.Tensor) else x for x, g in zip(inputs, needs)]
    loss = call(module, leaves)
    wanted = [x for x in leaves if isinstance(x, torch.Tensor) and x.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, wanted)


def _compare_calls(theirs, ours, make, call, needs, steps=3, state=None):
    for _ in range(steps):
        inputs = make()
        loss_t, grads_t = _grads(theirs, call, inputs, needs)
        loss_o, grads_o = _grads(ours, call, inputs, needs)
        assert loss_o.dtype == torch.float32 and loss_o.shape == torch.Size([])
        _close(loss_o, loss_t.float(), "loss")
        for g_o, g_t in zip(grads_o, grads_t):
            _close(g_o, g_t, "gradient")
        if state is not None:
            _close(state(ours), state(theirs), "state")


@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
def test_ibot_modules_match_lightly_over_calls(backend):
    lightly = need_lightly()
    k = 13
    kwargs = dict(output_dim=k, teacher_temp=0.05, student_temp=0.2, center_momentum=0.7)
    theirs, ours = lightly.IBOTPatchLoss(**kwargs), fastssl.IBOTPatchLoss(**kwargs, backend=backend)
    masks = iter([_mask(3, 4, 4), _mask(2, 3, 5), _mask(1, 2, 2)])

    def make():
        mask = next(masks)
        rows = int(mask.sum())
        return [torch.randn(rows, k) + 1.0, torch.randn(rows, k), mask]

    def call(m, xs):
        return m(xs[0], xs[1], xs[2], teacher_temp=0.06 if xs[0].shape[0] % 2 else None)

    _compare_calls(theirs, ours, make, call, [False, True, False], state=lambda m: m.center.value)

    theirs, ours = lightly.IBOTPlusPlusPatchLoss(**kwargs), fastssl.IBOTPlusPlusPatchLoss(**kwargs, backend=backend)
    cases = iter([(None, 1.0), (torch.rand(2, 3, 3) < 0.5, 0.4), ((torch.rand(2, 9) < 0.5).float(), 0.0)])

    def make_pp():
        return [torch.randn(2, 9, k) + 0.5, torch.randn(2, 9, k), *next(cases)]

    def call_pp(m, xs):
        return m(xs[0], xs[1], xs[2], visible_loss_weight=xs[3]) if xs[2] is not None else m(xs[0], xs[1])

    _compare_calls(theirs, ours, make_pp, call_pp, [False, True, False, False], state=lambda m: m.center.value)
    assert set(ours.state_dict()) == set(theirs.state_dict()) == {"center.center"}


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_capi_module_matches_lightly(backend):
    lightly = need_lightly()
    kwargs = dict(teacher_temperature=0.05, student_temperature=0.1, sinkhorn_iterations=4)
    theirs, ours = lightly.CAPILoss(**kwargs), fastssl.CAPILoss(**kwargs, backend=backend)
    index = torch.stack([torch.randperm(6)[:3] for _ in range(4)])
    _compare_calls(theirs, ours, lambda: [torch.randn(4, 6, 11), torch.randn(4, 3, 11), index],
                   lambda m, xs: m(xs[0], xs[1], xs[2]), [False, True, False])  # fmt: skip
    _compare_calls(theirs, ours, lambda: [torch.randn(3, 5, 11) * 3, torch.randn(3, 5, 11)],
                   lambda m, xs: m(xs[0], xs[1]), [False, True], steps=2)  # fmt: skip


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("name", ["MSNLoss", "PMSNLoss", "PMSNCustomLoss"])
def test_msn_modules_match_lightly(name, backend):
    lightly = need_lightly()
    args = (_uniform,) if name == "PMSNCustomLoss" else ()
    kwargs = dict(temperature=0.15, sinkhorn_iterations=2, regularization_weight=0.8)
    theirs, ours = getattr(lightly, name)(*args, **kwargs), getattr(fastssl, name)(*args, **kwargs, backend=backend)
    _compare_calls(theirs, ours, lambda: _msn_inputs(3, 4, 9, 6, torch.float32),
                   lambda m, xs: m(xs[0], xs[1], xs[2], target_sharpen_temperature=0.3), [True, False, True])  # fmt: skip
    mean_probs = torch.softmax(torch.randn(9), 0)
    _close(ours.regularization_loss(mean_probs), theirs.regularization_loss(mean_probs), "regularization_loss")


def test_msn_subclass_regularizer_is_honoured():
    class Doubled(fastssl.MSNLoss):
        def regularization_loss(self, mean_anchor_probs):
            return 2 * super().regularization_loss(mean_anchor_probs)

    inputs = _msn_inputs(2, 3, 5, 4, torch.float32)
    plain = FS.msn_loss(*inputs, regularization_weight=0.0)
    reg = reference.mean_entropy_regularization(
        reference.msn_cross_entropy_and_mean_probs(*inputs)[1]
    )
    assert Doubled()(*inputs).item() == pytest.approx((plain + 2 * reg).item(), rel=1e-5)


# --------------------------------------------------------------------------------------------
# lightly's behaviour checks, in our words
# --------------------------------------------------------------------------------------------


def test_ibot_value_of_the_dinov2_example():
    """lightly's test: the loss of DINOv2's original implementation on a 3-image example."""
    criterion = fastssl.IBOTPatchLoss(output_dim=2, teacher_temp=0.1, student_temp=0.2, center_momentum=0.9)
    teacher = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    student = torch.tensor([[0.7, 0.8], [0.9, 1.0], [1.1, 1.2]])
    mask = torch.tensor([[[True, False], [True, False]], [[False, False], [False, True]], [[False, False], [False, False]]])
    assert criterion(teacher, student, mask).item() == pytest.approx(0.4057, rel=1e-4)
    assert torch.allclose(criterion.center.value, 0.1 * teacher.mean(0))


def test_ibot_plus_plus_visible_weight_zero_gives_visible_tokens_no_gradient():
    student = torch.randn(2, 6, 5, requires_grad=True)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, :3] = True
    fastssl.IBOTPlusPlusPatchLoss(output_dim=5)(torch.randn(2, 6, 5), student, mask, visible_loss_weight=0.0).backward()
    assert torch.all(student.grad[:, 3:] == 0) and student.grad[:, :3].abs().sum() > 0


def test_capi_behaviour():
    criterion = fastssl.CAPILoss()
    teacher = torch.randn(8, 4, 16, requires_grad=True)
    student = torch.randn(8, 4, 16, requires_grad=True)
    loss = criterion(teacher, student)
    loss.backward()
    assert loss.item() > 0 and teacher.grad is None and student.grad is not None
    assert criterion(teacher, teacher.detach().clone()) < criterion(teacher, torch.randn(8, 4, 16))


def test_power_law_and_custom_regularizers_values():
    m = torch.tensor([0.1, 0.3, 0.6])
    norm = sum(k ** -0.25 for k in (1, 2, 3))
    t = [k ** -0.25 / norm for k in (1, 2, 3)]
    expected = sum(ti * torch.log(torch.tensor(ti / mi)).item() for ti, mi in zip(t, m.tolist()))
    assert fastssl.PMSNLoss().regularization_loss(m).item() == pytest.approx(expected, rel=1e-5)
    uniform = sum(1 / 3 * torch.log(torch.tensor((1 / 3) / mi)).item() for mi in m.tolist())
    assert fastssl.PMSNCustomLoss(_uniform).regularization_loss(m).item() == pytest.approx(uniform, rel=1e-5)
    power = prototype.power_law_distribution(4, 0.5)
    assert torch.allclose(power, torch.tensor([1, 2 ** -0.5, 3 ** -0.5, 0.5]) / 2.784457050376173)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_bad_inputs_are_clear_errors():
    mask = torch.ones(2, 2, 2, dtype=torch.bool)
    t = torch.randn(8, 4)
    with pytest.raises(ValueError, match="exactly the masked tokens"):
        FS.ibot_patch_loss(t[:7], t[:7], mask)
    with pytest.raises(TypeError, match="boolean"):
        FS.ibot_patch_loss(t, t, mask.float())
    with pytest.raises(ValueError, match="same shape"):
        FS.ibot_patch_loss(t, t[:, :3], mask)
    with pytest.raises(TypeError, match="floating-point"):
        FS.ibot_patch_loss(t.long(), t, mask)
    with pytest.raises(ValueError, match="output_dim=5"):
        fastssl.IBOTPatchLoss(output_dim=5)(t, t, mask)
    with pytest.raises(ValueError, match="empty"):
        FS.ibot_patch_loss(t[:0], t[:0], torch.zeros(2, 2, 2, dtype=torch.bool))
    criterion = fastssl.IBOTPlusPlusPatchLoss(output_dim=4)
    with pytest.raises(ValueError, match="same shape"):
        criterion(torch.randn(2, 5, 4), torch.randn(2, 6, 4))
    with pytest.raises(ValueError, match="rank 2 or 3"):
        criterion(torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4))
    with pytest.raises(ValueError, match="mask is required"):
        criterion(torch.randn(10, 4), torch.randn(10, 4))
    with pytest.raises(ValueError, match="not divisible"):
        criterion(torch.randn(7, 4), torch.randn(7, 4), mask=torch.zeros(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not fit"):
        criterion(torch.randn(2, 6, 4), torch.randn(2, 6, 4), mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="Unknown mode"):
        fastssl.IBOTPatchLoss(center_mode="median")
    capi = fastssl.CAPILoss()
    with pytest.raises(ValueError, match="paired position by position"):
        capi(torch.randn(2, 6, 4), torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="int64"):
        capi(torch.randn(2, 6, 4), torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="teacher_index must have shape"):
        capi(torch.randn(2, 6, 4), torch.randn(2, 3, 4), torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="student_logits"):
        capi(torch.randn(2, 6, 4), torch.randn(2, 6))
    with pytest.raises(ValueError, match=r"temperature must be in \(0, inf\)"):
        fastssl.MSNLoss(temperature=0.0)
    with pytest.raises(ValueError, match="sinkhorn_iterations must be >= 0"):
        fastssl.MSNLoss(sinkhorn_iterations=-1)
    a, tg, p = _msn_inputs(2, 3, 4, 5, torch.float32)
    with pytest.raises(ValueError, match="anchor_views"):
        fastssl.MSNLoss()(a[:5], tg, p)
    with pytest.raises(ValueError, match="same dim"):
        fastssl.MSNLoss()(a, tg, p[:, :4])
    with pytest.raises(ValueError, match="target_sharpen_temperature"):
        fastssl.MSNLoss()(a, tg, p, target_sharpen_temperature=0.0)
    for cls, kwargs in [(fastssl.CAPILoss, {}), (fastssl.MSNLoss, {}), (fastssl.PMSNLoss, {}),
                        (fastssl.PMSNCustomLoss, {"target_distribution": _uniform})]:  # fmt: skip
        with pytest.raises(ValueError, match="backend"):
            cls(backend="cuda", **kwargs)


def test_gather_distributed_needs_torch_distributed(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    for cls, args in [(fastssl.CAPILoss, ()), (fastssl.MSNLoss, ()), (fastssl.PMSNLoss, ()),
                      (fastssl.PMSNCustomLoss, (_uniform,))]:  # fmt: skip
        with pytest.raises(ValueError, match="torch.distributed is not available"):
            cls(*args, gather_distributed=True)


def test_non_finite_input_propagates():
    mask = torch.ones(1, 2, 2, dtype=torch.bool)
    t = torch.randn(4, 3)
    s = t.clone()
    s[1, 1] = float("nan")
    assert torch.isnan(FS.ibot_patch_loss(t, s, mask))
    a, tg, p = _msn_inputs(1, 3, 4, 5, torch.float32)
    a[0, 0] = float("nan")
    assert torch.isnan(FS.msn_loss(a, tg, p))


# --------------------------------------------------------------------------------------------
# gather_distributed on gloo
# --------------------------------------------------------------------------------------------

PER_RANK = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_inputs(world: int):
    g = torch.Generator().manual_seed(7)
    b = PER_RANK * world
    return {
        "capi": [torch.randn(b, 4, 6, generator=g, dtype=torch.float64), torch.randn(b, 4, 6, generator=g, dtype=torch.float64)],
        # MSN: 2 anchor views per image, view-major per rank.
        "msn": [torch.randn(2, b, 5, generator=g, dtype=torch.float64), torch.randn(b, 5, generator=g, dtype=torch.float64),
                torch.randn(7, 5, generator=g, dtype=torch.float64)],
        "ibot": torch.randn(b * 2, 6, generator=g),
    }  # fmt: skip


def _msn_factories():
    return {"msn": lambda g: fastssl.MSNLoss(gather_distributed=g, regularization_weight=0.7),
            "pmsn": lambda g: fastssl.PMSNLoss(gather_distributed=g)}  # fmt: skip


def _worker(rank: int, world: int, port: int, result_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        data = _global_inputs(world)
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        out = {}
        for backend in ("torch", "reference"):
            t, s = (x[rows].clone().requires_grad_(True) for x in data["capi"])
            loss = fastssl.CAPILoss(gather_distributed=True, backend=backend)(t, s)
            out[f"capi-{backend}"] = (loss.detach(), torch.autograd.grad(loss, [s])[0])
            for name, factory in _msn_factories().items():
                anchors = data["msn"][0][:, rows].reshape(-1, 5).clone().requires_grad_(True)
                targets = data["msn"][1][rows].clone()
                protos = data["msn"][2].clone().requires_grad_(True)
                module = factory(True)
                module.backend = backend
                loss = module(anchors, targets, protos)
                out[f"{name}-{backend}"] = (loss.detach(), *torch.autograd.grad(loss, [anchors, protos]))
        ibot = fastssl.IBOTPatchLoss(output_dim=6, center_momentum=0.5)
        mask = torch.ones(PER_RANK, 1, 2, dtype=torch.bool)
        local = data["ibot"][rank * 2 * PER_RANK : (rank + 1) * 2 * PER_RANK]
        ibot(local, local, mask)
        out["ibot-center"] = ibot.center.value.clone()
        torch.save(out, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_gather_distributed_semantics(world):
    """Each rank's loss equals the single-process loss on the concatenated batch; per-sample
    input gradients are W × their slice of the single-process gradient; the shared prototypes'
    gradients average (as DDP does) to the single-process gradient."""
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, port, tmp), nprocs=world, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]
    data = _global_inputs(world)
    t, s = (x.clone().requires_grad_(True) for x in data["capi"])
    loss = fastssl.CAPILoss(backend="reference")(t, s)
    grad = torch.autograd.grad(loss, [s])[0]
    for backend in ("torch", "reference"):
        for r in range(world):
            rank_loss, rank_grad = ranks[r][f"capi-{backend}"]
            assert rank_loss.item() == pytest.approx(loss.item(), rel=1e-5)
            _close(rank_grad, world * grad[r * PER_RANK : (r + 1) * PER_RANK], f"capi {backend} grad", rtol=1e-4)
    for name, factory in _msn_factories().items():
        anchors = data["msn"][0].reshape(-1, 5).clone().requires_grad_(True)
        protos = data["msn"][2].clone().requires_grad_(True)
        module = factory(False)
        module.backend = "reference"
        loss = module(anchors, data["msn"][1], protos)
        g_anchors, g_protos = torch.autograd.grad(loss, [anchors, protos])
        g_anchors = g_anchors.reshape(2, -1, 5)
        for backend in ("torch", "reference"):
            mean_proto_grad = sum(ranks[r][f"{name}-{backend}"][2] for r in range(world)) / world
            _close(mean_proto_grad, g_protos, f"{name} {backend} prototypes", rtol=1e-4)
            for r in range(world):
                rank_loss, rank_anchor_grad, _ = ranks[r][f"{name}-{backend}"]
                assert rank_loss.item() == pytest.approx(loss.item(), rel=1e-5), (name, backend)
                expected = world * g_anchors[:, r * PER_RANK : (r + 1) * PER_RANK].reshape(-1, 5)
                _close(rank_anchor_grad, expected, f"{name} {backend} anchors", rtol=1e-4)
    expected_center = 0.5 * data["ibot"].mean(0)
    for r in range(world):
        _close(ranks[r]["ibot-center"].flatten(), expected_center, "ibot centre", atol=1e-6)


def test_modules_under_autocast_compute_in_float32():
    """The modules run their chunked paths outside autocast (bf16 matrix products would cost MSN
    its float32 agreement)."""
    inputs = _msn_inputs(2, 4, 9, 16, torch.float32)
    plain = fastssl.MSNLoss()(*inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = fastssl.MSNLoss()(*inputs)
    assert autocast.dtype == torch.float32 and autocast.item() == pytest.approx(plain.item(), rel=1e-6)
    mask = _mask(2, 3, 3)
    t, s = torch.randn(2, int(mask.sum()), 7).unbind(0)
    plain = fastssl.IBOTPatchLoss(output_dim=7)(t, s, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = fastssl.IBOTPatchLoss(output_dim=7)(t, s, mask)
    assert autocast.item() == pytest.approx(plain.item(), rel=1e-6)


@pytest.mark.slow
def test_fullgraph_compile_of_the_modules():
    """The chunked paths (Python loops over chunks, hand-written autograd Functions) trace into
    one graph: no graph break under torch.compile(fullgraph=True)."""
    mask = _mask(2, 3, 3)
    rows = int(mask.sum())
    teacher_rows, teacher_tokens, targets, prototypes_ = (
        torch.randn(rows, 7), torch.randn(2, 5, 7), torch.randn(3, 7), torch.randn(5, 7)
    )
    cases = [
        (lambda: fastssl.IBOTPatchLoss(output_dim=7), lambda m, s: m(teacher_rows, s, mask), (rows, 7)),
        (fastssl.CAPILoss, lambda m, s: m(teacher_tokens, s), (2, 5, 7)),
        (fastssl.MSNLoss, lambda m, s: m(s, targets, prototypes_), (6, 7)),
    ]
    for factory, call, shape in cases:  # a fresh module per call: iBOT's centre moves
        student = torch.randn(*shape, requires_grad=True)
        eager = call(factory(), student)
        (grad_eager,) = torch.autograd.grad(eager, student)
        module = factory()
        compiled = torch.compile(lambda s: call(module, s), fullgraph=True, backend="aot_eager")(student)
        (grad_compiled,) = torch.autograd.grad(compiled, student)
        assert compiled.item() == pytest.approx(eager.item(), rel=1e-5)
        _close(grad_compiled, grad_eager, "compiled gradient")


# NumPy scalar hyperparameters (a config loaded with NumPy, a swept grid) are accepted as lightly
# accepts them; bool is rejected, a flag passed where a number belongs being a bug.
@pytest.mark.parametrize("name", ["IBOTPatchLoss", "IBOTPlusPlusPatchLoss", "CAPILoss", "MSNLoss", "PMSNLoss", "PMSNCustomLoss"])
def test_numpy_scalar_hyperparameters_accepted_bool_rejected(name):
    uniform = {"target_distribution": lambda m: torch.full_like(m, 1.0 / m.shape[0])}
    assert_numpy_hyperparameters_accepted(getattr(fastssl, name), uniform if name == "PMSNCustomLoss" else {})


def test_numpy_scalar_forward_hyperparameters_give_the_same_loss():
    import numpy as np

    generator = torch.Generator().manual_seed(5)
    anchors, targets, prototypes = (torch.randn(rows, 8, generator=generator) for rows in (12, 4, 10))
    for cls in (fastssl.MSNLoss, fastssl.PMSNLoss):
        expected = cls()(anchors, targets, prototypes, target_sharpen_temperature=0.5)
        got = cls()(anchors, targets, prototypes, target_sharpen_temperature=np.float32(0.5))
        assert torch.equal(got, expected)
    mask = torch.zeros(2, 2, 2, dtype=torch.bool)
    mask[:, 0] = True
    teacher, student = torch.randn(2, 4, 16, generator=generator), torch.randn(2, 4, 16, generator=generator)
    # fresh modules: each call moves the centre
    expected = fastssl.IBOTPlusPlusPatchLoss(output_dim=16)(
        teacher, student, mask, teacher_temp=0.05, visible_loss_weight=0.5
    )
    got = fastssl.IBOTPlusPlusPatchLoss(output_dim=16)(
        teacher, student, mask, teacher_temp=np.float64(0.05), visible_loss_weight=np.float32(0.5)
    )
    assert torch.equal(got, expected)
    with pytest.raises(TypeError):
        fastssl.IBOTPlusPlusPatchLoss(output_dim=16)(teacher, student, mask, visible_loss_weight=True)


@pytest.mark.parametrize("temperature", [0.1, 0.01])  # p kept (no underflow possible) / log p kept
@pytest.mark.parametrize("regularization_weight", [0.0, 1.3])
def test_msn_unchunked_rule_matches_the_chunked_path(monkeypatch, temperature, regularization_weight):
    """Below the chunk budget MSN keeps the probabilities of one product for the backward; above
    it, it recomputes them chunk by chunk. Both give the same loss and gradients."""
    generator = torch.Generator().manual_seed(11)
    inputs = [torch.randn(rows, 6, generator=generator, dtype=torch.float64) for rows in (9, 3, 7)]

    def run():
        leaves = [x.clone().requires_grad_(True) for x in inputs]
        loss = FS.msn_loss(*leaves, temperature, 2, regularization_weight, 0.3, backend="torch")
        return (loss, *torch.autograd.grad(loss, [leaves[0], leaves[2]]))

    unchunked = run()
    monkeypatch.setattr(prototype, "_CHUNK_ELEMENTS", 14)  # two anchors of K = 7 per chunk
    chunked = run()
    for got, expected in zip(unchunked, chunked):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
