"""Triton DINO kernels against the reference: CPU tensors through the interpreter, CUDA tensors
compiled (``gpu`` lane). Every buffer the kernels fill is allocated NaN-poisoned, so an element
left unwritten shows up in the compared outputs; tiny tiles run multi-tile loops, partial tiles
and K splits on small inputs."""

from __future__ import annotations

import pytest
import torch

import fastssl
from fastssl.kernels import dino as kernels

from _helpers import TRITON_DEVICES, assert_matches_reference, awkward_inputs, poisoned
from test_dino import _assert_close, assert_module_matches_lightly, dino_fns
from test_sinkhorn_triton import compile_for_sm90


@pytest.fixture(autouse=True)
def _poisoned_buffers(monkeypatch):
    monkeypatch.setattr(kernels, "_new_buffer", lambda shape, dtype, device: poisoned(shape, dtype, device))


def _tiny_tiles(monkeypatch) -> None:
    monkeypatch.setattr(kernels, "_TILE_ELEMENTS", 16)
    monkeypatch.setattr(kernels, "_TILE_CONTIGUOUS", 4)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize(
    "n_teacher,n_student,b,k,tiles",
    [
        (2, 2, 1, 1, "default"),
        (2, 5, 3, 129, "default"),
        (1, 2, 127, 3, "default"),
        (3, 1, 4, 3, "default"),
        (2, 4, 5, 11, "tiny"),
        (3, 2, 7, 6, "tiny"),
    ],
)
def test_dino_triton_matches_reference(device, n_teacher, n_student, b, k, tiles, monkeypatch):
    if tiles == "tiny":
        _tiny_tiles(monkeypatch)
    views = awkward_inputs(b, k, device=device, views=n_teacher + n_student, non_contiguous=(b == 3))
    impl, ref = dino_fns(n_teacher, torch.randn(k) * 0.5, 0.04, 0.1, "triton")
    assert_matches_reference(impl, ref, views)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dino_triton_other_dtypes(device, dtype):
    views = awkward_inputs(6, 10, dtype=dtype, device=device, views=4, non_contiguous=True)
    impl, ref = dino_fns(2, torch.randn(10) * 0.5, 0.04, 0.1, "triton")
    assert_matches_reference(impl, ref, views)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("teacher_temp,student_temp", [(0.01, 0.1), (-0.5, 0.2)])
def test_dino_triton_large_logits_and_other_temperatures(device, teacher_temp, student_temp, monkeypatch):
    _tiny_tiles(monkeypatch)
    views = [x * 30 for x in awkward_inputs(3, 9, device=device, views=3)]
    impl, ref = dino_fns(1, torch.randn(9) * 30, teacher_temp, student_temp, "triton")
    assert_matches_reference(impl, ref, views)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_dino_triton_teacher_sum_and_chunked_views(device, monkeypatch):
    """Views that are chunks of one tensor (read in place like any other views); the fused
    teacher column sums equal the sum over views and batch."""
    _tiny_tiles(monkeypatch)
    teacher_all = torch.randn(2 * 5, 7, device=device)
    student_all = torch.randn(4 * 5, 7, device=device, requires_grad=True)
    teacher, student = list(teacher_all.chunk(2)), list(student_all.chunk(4))
    center = torch.randn(1, 1, 7, device=device)
    loss, teacher_sum = kernels.dino_loss_triton(
        teacher, student, center, 0.04, 0.1, center_mode=kernels.CENTER_TEACHER_SUM
    )
    expected = fastssl.functional.dino_loss(teacher, student, center, 0.04, 0.1, backend="torch")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    grad, expected_grad = (torch.autograd.grad(v, student_all)[0] for v in (loss, expected))
    _assert_close(grad.cpu(), expected_grad.cpu())
    assert teacher_sum.dtype == torch.float32 and teacher_sum.shape == (7,)
    _assert_close(teacher_sum.cpu(), teacher_all.sum(dim=0).cpu(), rtol=1e-6)
    # The fused EMA: m·c + (1 − m)·mean over views and batch, from the same pass.
    _, new_center = kernels.dino_loss_triton(
        teacher, student, center, 0.04, 0.1, center_momentum=0.7, center_mode=kernels.CENTER_EMA
    )
    expected_center = 0.7 * center.flatten() + 0.3 * teacher_all.mean(dim=0)
    _assert_close(new_center.cpu(), expected_center.cpu(), rtol=1e-6)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_dino_triton_gradient_only_where_needed_and_no_grad_forward(device):
    teacher = [torch.randn(4, 6, device=device) for _ in range(2)]
    student = [torch.randn(4, 6, device=device) for _ in range(3)]
    student[1].requires_grad_(True)
    loss = fastssl.functional.dino_loss(teacher, student, backend="triton")
    (grad,) = torch.autograd.grad(loss, [student[1]])
    expected = fastssl.functional.dino_loss(teacher, student, backend="torch")
    (expected_grad,) = torch.autograd.grad(expected, [student[1]])
    _assert_close(grad.cpu(), expected_grad.cpu())
    with torch.no_grad():
        value = fastssl.functional.dino_loss(teacher, student, backend="triton")
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_dino_triton_mixed_view_dtypes(device):
    """Teacher views in float32, student views in bfloat16 and float16: each read in its own
    dtype (the students promoted to one), each gradient returned in its input's dtype."""
    teacher = [torch.randn(5, 12, device=device) for _ in range(2)]
    student = [torch.randn(5, 12, device=device).to(dtype) for dtype in (torch.bfloat16, torch.float16, torch.bfloat16)]
    values, grads = [], []
    for backend in ["triton", "torch"]:
        leaves = [s.detach().clone().requires_grad_(True) for s in student]
        values.append(fastssl.functional.dino_loss(teacher, leaves, backend=backend))
        grads.append(torch.autograd.grad(values[-1], leaves))
    assert values[0].item() == pytest.approx(values[1].item(), rel=1e-5)
    for g, g_torch, s in zip(grads[0], grads[1], student):
        assert g.dtype == s.dtype
        _assert_close(g.float().cpu(), g_torch.float().cpu(), rtol=1e-2)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_dino_triton_module_matches_lightly(device):
    # The module takes the center's batch mean from the kernel's fused column sums.
    assert_module_matches_lightly("triton", device)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("view", [0, 3])
def test_dino_triton_non_finite_inputs_give_nan(device, bad, view):
    views = awkward_inputs(4, 6, device=device, views=4)
    views[view][1, 2] = bad
    assert not torch.isfinite(fastssl.functional.dino_loss(views[:2], views[2:], backend="triton"))


_MODULE = "fastssl.kernels.dino"


def _views(prefix: str, dtype: str) -> dict:
    return {f"{prefix}{i}": dtype for i in range(16)}


_TABLES_BF16 = {**_views("t", "*bf16"), **_views("s", "*bf16")}
_TABLES_MIXED = {**_views("t", "*fp32"), **_views("s", "*fp16"), "s_view_stride": "i64"}
_FLOAT_TEMPS = {"TEACHER_TEMP_TENSOR": False, "STUDENT_TEMP_TENSOR": False}
_BF16 = {"T_VIEWS": 2, "S_VIEWS": 12, "T_UNIFORM": False, "S_UNIFORM": False, "T_ROW_ALIGN": 8, "S_ROW_ALIGN": 8, "K_ALIGN": 8, **_FLOAT_TEMPS}
_MIXED = {"T_VIEWS": 1, "S_VIEWS": 17, "T_UNIFORM": False, "S_UNIFORM": True, "T_ROW_ALIGN": 4, "S_ROW_ALIGN": 1, "K_ALIGN": 1, **_FLOAT_TEMPS}
# Temperatures read from 0-d tensors (a learnable student temperature, with its ∂L/∂τ partials).
_TENSOR_TEMPS = {"TEACHER_TEMP_TENSOR": True, "STUDENT_TEMP_TENSOR": True}


@pytest.mark.slow
def test_dino_kernels_compile_for_sm90():
    """Compiled-mode check without a GPU (see test_sinkhorn_triton): both kernels, aligned and
    not, with one teacher view and one row specialized to constants, and a 64-bit view stride."""
    compile_for_sm90([
        (_MODULE, "_dino_stats_kernel", _TABLES_BF16, {**_BF16, "WITH_COLSUM": True, "BLOCK_ROWS": 8, "BLOCK_K": 512, "n_rows": 1}, 4),
        (_MODULE, "_dino_stats_kernel", _TABLES_MIXED, {**_MIXED, "WITH_COLSUM": False, "BLOCK_ROWS": 2, "BLOCK_K": 16}, 4),
        (_MODULE, "_dino_loss_grad_kernel", {**_TABLES_BF16, "grad_ptr": "*bf16", "grad_stride_view": "i64"}, {**_BF16, "COMPUTE_GRAD": True, "TEMPERATURE_GRAD": False, "BLOCK_ROWS": 8, "BLOCK_K": 512, "n_rows": 1}, 4),
        (_MODULE, "_dino_loss_grad_kernel", {**_TABLES_MIXED, "grad_ptr": "*fp16"}, {**_MIXED, "COMPUTE_GRAD": False, "TEMPERATURE_GRAD": False, "BLOCK_ROWS": 2, "BLOCK_K": 16}, 4),
        (_MODULE, "_dino_stats_kernel", _TABLES_BF16, {**_BF16, "WITH_COLSUM": True, "BLOCK_ROWS": 2, "BLOCK_K": 8, "k_units": 1}, 4),
        (_MODULE, "_dino_stats_kernel", _TABLES_BF16, {**_BF16, **_TENSOR_TEMPS, "WITH_COLSUM": True, "BLOCK_ROWS": 8, "BLOCK_K": 512}, 4),
        (_MODULE, "_dino_loss_grad_kernel", {**_TABLES_BF16, "grad_ptr": "*bf16", "grad_stride_view": "i64"}, {**_BF16, **_TENSOR_TEMPS, "COMPUTE_GRAD": True, "TEMPERATURE_GRAD": True, "BLOCK_ROWS": 8, "BLOCK_K": 512}, 8),
    ])  # fmt: skip


# --------------------------------------------------------------------------------------------
# Precision with a common offset, custom ops, eager ops, fallback, CUDA graphs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_dino_triton_logits_with_a_large_common_offset(device, offset):
    """Log-probabilities stay relative to the row maximum: with logits that share an offset of
    10³-10⁴ the float32 error is at most twice PyTorch's own float32 error (the reference
    formula run in float32), for the loss and the student gradients. Single errors at this
    magnitude are rounding noise, so the root-mean-square over a few draws is compared; an lse
    rounded at the offset's magnitude was 15-36x worse."""
    from fastssl import reference

    def run(fn, xs, center):
        leaves = [x.detach().clone().requires_grad_(i >= 2) for i, x in enumerate(xs)]
        value = fn(leaves[:2], leaves[2:], center)
        return value.double(), [g.double().cpu() for g in torch.autograd.grad(value, leaves[2:])]

    def ours(teacher, student, center):
        return fastssl.functional.dino_loss(teacher, student, center, 0.04, 0.1, backend="triton")

    def formula(teacher, student, center):
        return reference.dino_loss(teacher, student, center, 0.04, 0.1)

    squared = {"ours": [0.0, 0.0], "pytorch": [0.0, 0.0]}
    for seed in range(6):
        torch.manual_seed(seed)
        views = [x + offset for x in awkward_inputs(6, 40, views=5)]
        center = torch.randn(40)
        exact_value, exact_grads = run(formula, [x.double() for x in views], center.double())
        runs = {
            "pytorch": run(formula, views, center),
            "ours": run(ours, [x.to(device) for x in views], center.to(device)),
        }
        for name, (value, grads) in runs.items():
            squared[name][0] += (value.cpu() - exact_value).item() ** 2
            squared[name][1] += max((g - e).abs().max().item() for g, e in zip(grads, exact_grads)) ** 2
    for quantity in range(2):
        assert squared["ours"][quantity] ** 0.5 <= 2 * squared["pytorch"][quantity] ** 0.5, squared


def test_dino_triton_module_compiles_fullgraph_with_aot_eager():
    """The DINO kernels are custom ops: a compiled module step (loss, student gradients, center
    EMA) has no graph break and matches eager execution."""
    torch._dynamo.reset()
    eager_module = fastssl.DINOLoss(output_dim=8, backend="triton")
    compiled_module = fastssl.DINOLoss(output_dim=8, backend="triton")
    compiled = torch.compile(lambda t, s: compiled_module(t, s, epoch=1), fullgraph=True, backend="aot_eager")
    for _ in range(2):  # the second call runs on the center the first one updated
        teacher = [torch.randn(4, 8) for _ in range(2)]
        student = [torch.randn(4, 8, requires_grad=True) for _ in range(3)]
        value = compiled(teacher, student)
        grads = torch.autograd.grad(value, student)
        expected = eager_module(teacher, student, epoch=1)
        expected_grads = torch.autograd.grad(expected, student)
        torch.testing.assert_close(value, expected)
        for g, g_expected in zip(grads, expected_grads):
            torch.testing.assert_close(g, g_expected)
        torch.testing.assert_close(compiled_module.center, eager_module.center)


def test_dino_triton_eager_ops_per_step_within_budget(monkeypatch):
    """The module's forward + backward, center update included, issues at most 16 PyTorch ops
    around the kernels (allocations included), none of them a host synchronization."""
    from test_sinkhorn_triton import EAGER_OP_BUDGET, EagerOpCounter

    _tiny_tiles(monkeypatch)
    module = fastssl.DINOLoss(output_dim=11, backend="triton")
    teacher = [torch.randn(5, 11) for _ in range(2)]
    student = [torch.randn(5, 11, requires_grad=True) for _ in range(6)]
    before = module.center.clone()
    with EagerOpCounter() as counter:
        loss = module(teacher, student, epoch=3)
        grads = torch.autograd.grad(loss, student)
    assert all(g.shape == (5, 11) for g in grads) and not torch.equal(module.center, before)
    assert len(counter.ops) <= EAGER_OP_BUDGET, counter.ops
    assert not any(name in op for op in counter.ops for name in ("_local_scalar_dense", "nonzero", "lift_fresh")), counter.ops


def test_dino_auto_falls_back_to_torch_when_a_kernel_fails(monkeypatch):
    from fastssl import _backend
    from fastssl import dino as dino_module

    def failing_launch(*args, **kwargs):
        raise RuntimeError("simulated launch failure")

    teacher = [torch.randn(4, 6) for _ in range(2)]
    student = [torch.randn(4, 6) for _ in range(3)]
    expected = fastssl.functional.dino_loss(teacher, student, backend="torch")
    monkeypatch.setattr(kernels, "_dino_stats_kernel", type("Failing", (), {"__getitem__": lambda self, grid: failing_launch})())
    monkeypatch.setattr(dino_module, "resolve_backend", lambda backend, tensor, *a: "triton")  # as for CUDA tensors
    monkeypatch.setattr(_backend, "_FALLBACK_WARNED", set())
    with pytest.warns(RuntimeWarning, match="dino.*simulated launch failure"):
        value = fastssl.functional.dino_loss(teacher, student, backend="auto")
    torch.testing.assert_close(value, expected)
    with pytest.raises(RuntimeError, match="simulated launch failure"):
        fastssl.functional.dino_loss(teacher, student, backend="triton")


@pytest.mark.gpu
def test_dino_training_step_captures_in_a_cuda_graph():
    from test_sinkhorn_triton import capture_training_step

    module = fastssl.DINOLoss(output_dim=300, backend="triton").cuda()
    # Teacher views from the same network without gradient, as a momentum teacher would give.
    capture_training_step(lambda outputs: module([o.detach() for o in outputs[:2]], outputs), views=6)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("tiles", [False, True])
def test_dino_triton_learnable_student_temperature_gets_its_gradient(device, tiles, monkeypatch):
    """Temperatures given as 0-d tensors are read by the kernels on the device; the student's
    gets ∂L/∂τ_s from the kernel's per-program partials (several K splits with small tiles)."""
    if tiles:
        monkeypatch.setattr(kernels, "_TILE_ELEMENTS", 32)
        monkeypatch.setattr(kernels, "_TILE_CONTIGUOUS", 8)
    from test_dino import learnable_temperature_fns

    views = [v.to(device) for v in awkward_inputs(3, 37, views=5)]
    impl, ref = learnable_temperature_fns(2, 0.1 * torch.randn(37), "triton")
    assert_matches_reference(impl, ref, views + [torch.tensor(0.12, device=device)])
    student_temp = torch.nn.Parameter(torch.tensor(0.2, device=device))
    criterion = fastssl.DINOLoss(output_dim=37, student_temp=student_temp, teacher_temp=torch.tensor(0.05), backend="triton")
    criterion.to(device)(views[:2], views[2:]).backward()
    assert student_temp.grad is not None and torch.isfinite(student_temp.grad)
