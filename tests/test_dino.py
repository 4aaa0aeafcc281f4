"""DINO (torch backend): the chunked loss with its hand-written gradient against the reference,
and the module against lightly's DINOLoss over several calls (teacher-temperature schedule,
center EMA)."""

from __future__ import annotations


import pytest
import torch

import fastssl
import fastssl.functional as FS
from fastssl import dino as dino_module
from fastssl import reference

import _lightly
from _helpers import assert_matches_reference, awkward_inputs

VIEW_COUNTS = [(2, 2), (2, 5), (1, 2), (3, 1)]


def load_lightly_dino():
    """lightly's loss classes (``.DINOLoss``), loaded without torchvision by ``tests/_lightly.py``;
    skips when lightly is not installed."""
    lightly = _lightly.load()
    if lightly is None:
        pytest.skip("lightly is not installed or not importable")
    return lightly


def dino_fns(n_teacher: int, center: torch.Tensor, teacher_temp: float, student_temp: float, backend: str):
    """(impl, ref) over inputs ``[*teacher views, *student views]`` for assert_matches_reference."""

    def impl(*xs):
        c = center.to(device=xs[0].device, dtype=xs[0].dtype)
        return FS.dino_loss(list(xs[:n_teacher]), list(xs[n_teacher:]), c, teacher_temp, student_temp, backend=backend)

    def ref(*xs):
        c = center.to(device=xs[0].device, dtype=xs[0].dtype)
        return reference.dino_loss(list(xs[:n_teacher]), list(xs[n_teacher:]), c, teacher_temp, student_temp)

    return impl, ref


def _assert_close(ours: torch.Tensor, exact: torch.Tensor, rtol: float = 2e-5, atol: float = 1e-6) -> None:
    err = (ours.double() - exact.double()).abs().max().item()
    allowed = rtol * exact.abs().max().item() + atol
    assert err <= allowed, f"max error {err:.3e} > {allowed:.3e}"


# --------------------------------------------------------------------------------------------
# Loss and gradient against the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_teacher,n_student", VIEW_COUNTS)
@pytest.mark.parametrize("b,k", [(1, 1), (3, 129), (127, 3), (4, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dino_matches_reference(n_teacher, n_student, b, k, dtype):
    views = awkward_inputs(b, k, dtype=dtype, views=n_teacher + n_student, non_contiguous=(b == 3))
    center = torch.randn(k) * 0.5
    impl, ref = dino_fns(n_teacher, center, 0.04, 0.1, "torch")
    assert_matches_reference(impl, ref, views)


def test_dino_float64_inputs_accumulate_in_float64():
    views = awkward_inputs(5, 7, dtype=torch.float64, views=4)
    impl, ref = dino_fns(2, torch.randn(7), 0.04, 0.1, "torch")
    # The loss is float32 (DESIGN §3), hence 1e-7; float32 arithmetic would miss that on the
    # float64 gradients.
    assert_matches_reference(impl, ref, views, rtol=1e-7, atol=1e-12)


def test_dino_chunks_of_rows_match_the_whole_batch(monkeypatch):
    # Two rows per chunk (3 prototypes in 8 elements), 7 rows: four chunks, the last partial.
    monkeypatch.setattr(dino_module, "_CHUNK_ELEMENTS", 8)
    views = awkward_inputs(7, 3, views=5)
    impl, ref = dino_fns(2, torch.randn(3), 0.04, 0.1, "torch")
    assert_matches_reference(impl, ref, views)


@pytest.mark.parametrize("teacher_temp,student_temp", [(0.01, 0.1), (0.04, 0.01), (-0.5, 0.2)])
def test_dino_large_logits_and_other_temperatures(teacher_temp, student_temp):
    # (t − c)/τ up to ~1e4: softmax and log-softmax must stay finite and exact.
    views = [x * 30 for x in awkward_inputs(6, 9, views=4)]
    impl, ref = dino_fns(2, torch.randn(9) * 30, teacher_temp, student_temp, "torch")
    assert_matches_reference(impl, ref, views)


def test_dino_no_gradient_to_the_teacher_and_none_needed():
    teacher = [torch.randn(4, 6, requires_grad=True) for _ in range(2)]
    student = [torch.randn(4, 6, requires_grad=True) for _ in range(3)]
    loss = FS.dino_loss(teacher, student, backend="torch")
    grads = torch.autograd.grad(loss, teacher + student, allow_unused=True)
    assert grads[0] is None and grads[1] is None
    assert all(g is not None and torch.isfinite(g).all() for g in grads[2:])
    with torch.no_grad():
        value = FS.dino_loss(teacher, student, backend="torch")
    assert value.item() == pytest.approx(loss.item(), rel=1e-6)


def test_dino_needs_a_cross_view_pair():
    a = torch.randn(4, 6)
    with pytest.raises(ValueError, match="at least two views"):
        FS.dino_loss([a], [a], backend="torch")
    with pytest.raises(ValueError, match="at least two views"):
        fastssl.DINOLoss(output_dim=6, backend="torch")([a], [a])


# --------------------------------------------------------------------------------------------
# Module: drop-in for lightly's DINOLoss
# --------------------------------------------------------------------------------------------


def assert_module_matches_lightly(backend: str, device: str = "cpu") -> None:
    """Five calls with changing epochs, a temperature override and multi-crop: losses, student
    gradients and the center after every call."""
    lightly_dino = load_lightly_dino()
    kwargs = dict(output_dim=9, warmup_teacher_temp=0.07, teacher_temp=0.04, warmup_teacher_temp_epochs=3,
                  student_temp=0.2, center_momentum=0.8)  # fmt: skip
    theirs = lightly_dino.DINOLoss(**kwargs)
    ours = fastssl.DINOLoss(**kwargs, backend=backend).to(device)
    calls = [dict(epoch=0), dict(epoch=2), dict(epoch=5), dict(teacher_temp=0.06, epoch=1), dict()]
    for n_student, call in zip([2, 4, 3, 4, 2], calls):
        teacher = [torch.randn(5, 9) * 2 for _ in range(2)]
        student = [torch.randn(5, 9) for _ in range(n_student)]
        student_a = [s.clone().requires_grad_(True) for s in student]
        student_b = [s.to(device).requires_grad_(True) for s in student]
        expected = theirs(teacher, student_a, **call)
        value = ours([t.to(device) for t in teacher], student_b, **call)
        assert value.shape == () and value.dtype == torch.float32
        assert value.item() == pytest.approx(expected.item(), rel=1e-5)
        for g, g_exact in zip(torch.autograd.grad(value, student_b), torch.autograd.grad(expected, student_a)):
            _assert_close(g.cpu(), g_exact, rtol=1e-5)
        assert ours.center.shape == (1, 1, 9)
        _assert_close(ours.center.cpu(), theirs.center, rtol=1e-6)


def test_dino_module_matches_lightly():
    assert_module_matches_lightly("torch")


def test_dino_reference_backend_module_matches_lightly():
    assert_module_matches_lightly("reference")


def test_dino_center_is_updated_in_place_in_float32():
    loss = fastssl.DINOLoss(output_dim=6, center_momentum=0.5, backend="torch")
    buffer = loss.center
    teacher = [torch.randn(4, 6).bfloat16() for _ in range(2)]
    loss(teacher, [torch.randn(4, 6).bfloat16() for _ in range(2)])
    assert loss.center is buffer and loss.center.dtype == torch.float32
    expected = 0.5 * torch.stack([t.float() for t in teacher]).mean(dim=(0, 1))
    _assert_close(loss.center.flatten(), expected, rtol=1e-6)
    assert torch.equal(loss.state_dict()["center"], loss.center)


def test_dino_center_update_function_matches_reference():
    center = torch.randn(1, 1, 7)
    teacher = [torch.randn(5, 7) for _ in range(3)]
    expected = reference.dino_center_update(center, teacher, 0.7)
    _assert_close(FS.dino_center_update(center, teacher, 0.7), expected, rtol=1e-6)


def _compile_dino(backend: str) -> None:
    eager_module = fastssl.DINOLoss(output_dim=8, backend="torch")
    compiled_module = fastssl.DINOLoss(output_dim=8, backend="torch")
    fn = torch.compile(lambda t, s, e: compiled_module(t, s, epoch=e), fullgraph=True, backend=backend)
    # Two calls: the second runs the compiled graph on the center the first one updated.
    for epoch in [1, 1]:
        teacher = [torch.randn(4, 8) for _ in range(2)]
        student = [torch.randn(4, 8, requires_grad=True) for _ in range(3)]
        value = fn(teacher, student, epoch)
        grads = torch.autograd.grad(value, student)
        eager = eager_module(teacher, student, epoch=epoch)
        eager_grads = torch.autograd.grad(eager, student)
        assert value.item() == pytest.approx(eager.item(), rel=1e-5)
        for g, g_eager in zip(grads, eager_grads):
            _assert_close(g, g_eager, rtol=1e-5)
        _assert_close(compiled_module.center, eager_module.center, rtol=1e-6)


def test_dino_torch_path_compiles_without_graph_breaks():
    _compile_dino("aot_eager")


@pytest.mark.slow
def test_dino_torch_path_compiles_with_inductor():
    _compile_dino("inductor")


def test_dino_update_center_method_matches_lightly():
    lightly_dino = load_lightly_dino()
    theirs = lightly_dino.DINOLoss(output_dim=6, center_momentum=0.7)
    ours = fastssl.DINOLoss(output_dim=6, center_momentum=0.7, backend="torch")
    for shape in [(3, 4, 6), (2, 6)]:
        x = torch.randn(shape)
        theirs.update_center(x)
        ours.update_center(x)
        assert ours.center.shape == (1, 1, 6)
        _assert_close(ours.center, theirs.center, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Learnable student temperature, epochs, the reference backend's dtype rule
# --------------------------------------------------------------------------------------------


def learnable_temperature_fns(n_teacher: int, center: torch.Tensor, backend: str):
    """(impl, ref) over ``[*teacher views, *student views, student_temp]`` (a 0-d tensor input,
    so that assert_matches_reference checks its gradient)."""

    def impl(*xs):
        c = center.to(device=xs[0].device, dtype=xs[0].dtype)
        return FS.dino_loss(list(xs[:n_teacher]), list(xs[n_teacher:-1]), c, 0.04, xs[-1], backend=backend)

    def ref(*xs):
        c = center.to(device=xs[0].device, dtype=xs[0].dtype)
        return reference.dino_loss(list(xs[:n_teacher]), list(xs[n_teacher:-1]), c, 0.04, xs[-1])

    return impl, ref


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("n_teacher,n_student,b,k", [(2, 3, 1, 5), (1, 2, 3, 129), (2, 2, 4, 3)])
def test_dino_learnable_student_temperature_gets_its_gradient(backend, n_teacher, n_student, b, k):
    views = awkward_inputs(b, k, views=n_teacher + n_student)
    center = 0.1 * torch.randn(k)
    impl, ref = learnable_temperature_fns(n_teacher, center, backend)
    assert_matches_reference(impl, ref, list(views) + [torch.tensor(0.12)])


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_dino_module_registers_and_trains_a_student_temperature_parameter(backend):
    """As lightly: ``DINOLoss(student_temp=nn.Parameter(...))`` registers it; it is trained with
    the float64 formula's gradient. A tensor teacher temperature is accepted and not trained."""
    student_temp = torch.nn.Parameter(torch.tensor(0.2))
    criterion = dino_module.DINOLoss(output_dim=6, student_temp=student_temp, teacher_temp=torch.tensor(0.05),
                                     warmup_teacher_temp=0.05, backend=backend)  # fmt: skip
    assert dict(criterion.named_parameters()) == {"student_temp": student_temp}
    teacher = [torch.randn(4, 6) for _ in range(2)]
    student = [torch.randn(4, 6) for _ in range(3)]
    criterion(teacher, student).backward()
    exact_temp = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    exact = reference.dino_loss([t.double() for t in teacher], [s.double() for s in student],
                                torch.zeros(6, dtype=torch.float64), 0.05, exact_temp)  # fmt: skip
    (exact_grad,) = torch.autograd.grad(exact, [exact_temp])
    assert student_temp.grad.item() == pytest.approx(exact_grad.item(), rel=1e-4)


@pytest.mark.parametrize("epoch", [0, 2, 2.0, 5, 5.0, 100, torch.tensor(3)])
def test_dino_epoch_within_and_beyond_the_warmup(epoch):
    """Integral floats index the warm-up schedule like ints; epochs at or beyond its end use
    ``teacher_temp``, as lightly's schedule does."""
    ours = dino_module.DINOLoss(output_dim=5, warmup_teacher_temp=0.02, teacher_temp=0.06, warmup_teacher_temp_epochs=5, backend="torch")
    index = int(epoch)
    expected_temp = ours.teacher_temp_schedule[index].item() if index < 5 else 0.06
    teacher = [torch.randn(3, 5) for _ in range(2)]
    student = [torch.randn(3, 5) for _ in range(2)]
    loss = ours(teacher, student, epoch=epoch)
    expected = reference.dino_loss([t.double() for t in teacher], [s.double() for s in student],
                                   torch.zeros(5, dtype=torch.float64), expected_temp, 0.1)  # fmt: skip
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("epoch,error", [(2.5, ValueError), (-1, ValueError), (float("nan"), ValueError), ("3", TypeError), (True, TypeError)])
def test_dino_bad_epoch_is_a_clear_error(epoch, error):
    criterion = dino_module.DINOLoss(output_dim=5, warmup_teacher_temp_epochs=5, backend="torch")
    with pytest.raises(error, match="epoch"):
        criterion([torch.randn(3, 5)] * 2, [torch.randn(3, 5)] * 2, epoch=epoch)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dino_reference_backend_computes_half_inputs_in_float32(dtype):
    """Half-precision views beside the module's float32 center: the reference backend
    evaluates the formula in float32 (no dtype clash), gradients come back in the views' dtype."""
    criterion = dino_module.DINOLoss(output_dim=7, backend="reference")
    criterion.center.copy_(0.1 * torch.randn(1, 1, 7))
    center = criterion.center.clone()
    teacher = [torch.randn(4, 7).to(dtype) for _ in range(2)]
    student = [torch.randn(4, 7).to(dtype).requires_grad_(True) for _ in range(3)]
    loss = criterion(teacher, student)
    grads = torch.autograd.grad(loss, student)
    exact_student = [s.detach().double().requires_grad_(True) for s in student]
    expected = reference.dino_loss([t.double() for t in teacher], exact_student, center.double(), 0.04, 0.1)
    expected_grads = torch.autograd.grad(expected, exact_student)
    assert loss.dtype == torch.float32
    _assert_close(loss, expected, rtol=1e-5)
    for g, g_exact in zip(grads, expected_grads):
        assert g.dtype == dtype
        _assert_close(g, g_exact, rtol=1e-2)
