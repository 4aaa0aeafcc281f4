"""Triton iBOT patch-loss kernels (same-index pairing, per-row weights, on the DINO kernels'
helpers) against the float64 reference and lightly's ``IBOTPatchLoss``: CPU tensors through the
interpreter, CUDA tensors compiled (``gpu`` lane). Every buffer the kernels fill is allocated
NaN-poisoned, so an element left unwritten shows up in the compared outputs; tiny tiles run
multi-tile rows, several row groups, partial tiles and multi-block partial merges on small
inputs."""

from __future__ import annotations

import pytest
import torch

import fastssl
import fastssl.functional as FS
from fastssl import reference
from fastssl._checks import BatchShapeError
from fastssl.kernels import dino as kernels

from _helpers import TRITON_DEVICES, assert_matches_reference, poisoned


@pytest.fixture(autouse=True)
def _poisoned_buffers(monkeypatch):
    monkeypatch.setattr(kernels, "_new_buffer", lambda shape, dtype, device: poisoned(shape, dtype, device))


def _tiny_tiles(monkeypatch) -> None:
    # (2, 4) tiles, partials merged 2 splits x 4 rows at a time, 2 images per mask block.
    monkeypatch.setattr(kernels, "_IBOT_TILE_ELEMENTS", 8)
    monkeypatch.setattr(kernels, "_IBOT_TILE_K", 4)
    monkeypatch.setattr(kernels, "_IBOT_ROW_BLOCK", 4)
    monkeypatch.setattr(kernels, "_IBOT_SPLIT_BLOCK", 2)
    monkeypatch.setattr(kernels, "_IBOT_IMAGE_BLOCK", 2)
    monkeypatch.setattr(kernels, "_IBOT_TOKEN_BLOCK", 4)
    monkeypatch.setattr(kernels, "_EPILOGUE_BLOCK", 4)


def _mask(batch: int, h: int, w: int) -> torch.Tensor:
    """A random mask whose first image is fully masked and whose second has no masked token."""
    mask = torch.rand(batch, h, w) < 0.4
    mask[0] = True
    if batch > 1:
        mask[1] = False
    return mask


def _rows(n: int, k: int, dtype=torch.float32, device="cpu", non_contiguous: bool = False, scale: float = 1.0):
    if non_contiguous:
        return (torch.randn(n, 2 * k) * scale).to(dtype=dtype, device=device)[:, ::2]
    return (torch.randn(n, k) * scale).to(dtype=dtype, device=device)


def _fns(mask, center, teacher_temp=0.04, student_temp=0.1):
    def impl(t, s):
        c = None if center is None else center.to(t.device)
        return FS.ibot_patch_loss(t, s, mask.to(t.device), c, teacher_temp, student_temp, backend="triton")

    def ref(t, s):
        c = torch.zeros(t.shape[1], dtype=t.dtype) if center is None else center.to(t.dtype)
        return reference.ibot_patch_loss(t.cpu(), s.cpu(), mask, c, teacher_temp, student_temp)

    return impl, ref


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize(
    "batch,h,w,k,tiles,with_center",
    [
        (1, 1, 1, 1, "default", True),  # one token, one prototype (rows = 1 specialized)
        (2, 3, 5, 7, "default", True),
        (3, 3, 5, 129, "default", False),  # non-contiguous teacher, no center
        (5, 2, 3, 11, "tiny", True),  # several row groups, K tiles, merge and mask blocks
        (3, 1, 7, 6, "tiny", False),
    ],
)
def test_ibot_triton_matches_reference(device, batch, h, w, k, tiles, with_center, monkeypatch):
    if tiles == "tiny":
        _tiny_tiles(monkeypatch)
    mask = _mask(batch, h, w)
    rows = int(mask.sum())
    center = torch.randn(k) * 0.5 if with_center else None
    inputs = [_rows(rows, k, device=device, non_contiguous=batch == 3), _rows(rows, k, device=device)]
    assert_matches_reference(*_fns(mask, center), inputs)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_ibot_triton_other_dtypes(device, dtype, monkeypatch):
    _tiny_tiles(monkeypatch)
    mask = _mask(3, 2, 4)
    rows = int(mask.sum())
    inputs = [_rows(rows, 10, dtype, device, non_contiguous=True), _rows(rows, 10, dtype, device)]
    assert_matches_reference(*_fns(mask, torch.randn(10) * 0.5), inputs)


def _assert_within_twice_pytorch_float32_error(device, make_case, seeds: int = 4) -> None:
    """For logits where float32 itself rounds visibly (magnitudes of 10³-10⁴): the root-mean-square
    over a few draws of our error against float64, for the loss and the student gradient, is at
    most twice that of the reference formula run by PyTorch in float32 (single errors at this
    magnitude are rounding noise)."""
    squared = {"ours": [0.0, 0.0], "pytorch": [0.0, 0.0]}
    for seed in range(seeds):
        torch.manual_seed(seed)
        (impl, ref), (t, s) = make_case()
        exact = {}
        for name, fn, inputs in [("exact", ref, (t.double(), s.double())), ("pytorch", ref, (t, s)),
                                 ("ours", impl, (t.to(device), s.to(device)))]:  # fmt: skip
            leaf = inputs[1].detach().clone().requires_grad_(True)
            value = fn(inputs[0], leaf)
            (grad,) = torch.autograd.grad(value, leaf)
            if name == "exact":
                exact = {"value": value.double(), "grad": grad.double()}
                continue
            assert torch.isfinite(value) and torch.isfinite(grad).all()
            squared[name][0] += (value.double().cpu() - exact["value"]).item() ** 2
            squared[name][1] += (grad.double().cpu() - exact["grad"]).abs().max().item() ** 2
    for quantity in range(2):
        assert squared["ours"][quantity] ** 0.5 <= 2 * squared["pytorch"][quantity] ** 0.5 + 1e-12, squared


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("teacher_temp,student_temp", [(0.01, 0.1), (0.04, 0.01), (-0.5, 0.3)])
def test_ibot_triton_large_logits_and_other_temperatures(device, teacher_temp, student_temp, monkeypatch):
    """(t − c)/τ_t and s/τ_s up to ~10⁴ (most teacher probabilities underflow, and tiles whose
    teacher mass is 0 add nothing to the merged sums), a negative teacher temperature."""
    # Several K tiles per row; enough elements that both maximum errors approach the rounding
    # bound (with a handful, one lucky draw decides the comparison).
    monkeypatch.setattr(kernels, "_IBOT_TILE_ELEMENTS", 64)
    monkeypatch.setattr(kernels, "_IBOT_TILE_K", 8)

    def make_case():
        mask = _mask(4, 4, 4)
        rows = int(mask.sum())
        inputs = (_rows(rows, 40, scale=30.0), _rows(rows, 40, scale=30.0))
        return _fns(mask, torch.randn(40) * 30, teacher_temp, student_temp), inputs

    _assert_within_twice_pytorch_float32_error(device, make_case)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_ibot_triton_logits_with_a_large_common_offset(device):
    """The cross-entropy is formed relative to the row maxima (D/S_t + log S_s, non-negative
    terms), never as a difference of log-sum-exps rounded at the offset's magnitude."""

    def make_case():
        mask = _mask(3, 3, 4)
        rows = int(mask.sum())
        return _fns(mask, torch.randn(40)), (_rows(rows, 40) + 1e3, _rows(rows, 40) + 1e3)

    _assert_within_twice_pytorch_float32_error(device, make_case)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_ibot_triton_given_weights_match_reference(device, monkeypatch):
    """iBOT++ on the kernels: per-row weights passed in, every token of every image."""
    _tiny_tiles(monkeypatch)
    b, n, k = 3, 5, 7
    mask = torch.rand(b, n) < 0.5
    mask[0] = True
    center = torch.randn(k) * 0.3
    inputs = [_rows(b * n, k, device=device).reshape(b, n, k), _rows(b * n, k, device=device).reshape(b, n, k)]

    def impl(t, s):
        return FS.ibot_plus_plus_patch_loss(t, s, mask.to(t.device), center.to(t.device), 0.04, 0.1, 0.3, backend="triton")

    def ref(t, s):
        return reference.ibot_plus_plus_patch_loss(t.cpu(), s.cpu(), mask, center.to(t.dtype), 0.04, 0.1, 0.3)

    assert_matches_reference(impl, ref, inputs)


# --------------------------------------------------------------------------------------------
# The modules against lightly, the center, bad masks, non-finite inputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("tiles", ["default", "small"])
def test_ibot_triton_modules_match_lightly_over_calls(device, tiles, monkeypatch):
    """Loss, student gradient and the center's EMA (computed by the kernels) over three calls,
    a per-call teacher temperature on one of them; iBOT++ (given weights) likewise."""
    from test_prototype import need_lightly

    lightly = need_lightly()
    if tiles == "small":  # two K tiles, several row groups (tiny tiles make this test slow)
        monkeypatch.setattr(kernels, "_IBOT_TILE_ELEMENTS", 32)
        monkeypatch.setattr(kernels, "_IBOT_TILE_K", 8)
        monkeypatch.setattr(kernels, "_IBOT_ROW_BLOCK", 8)
    k = 13
    kwargs = dict(output_dim=k, teacher_temp=0.05, student_temp=0.2, center_momentum=0.7)
    theirs, ours = lightly.IBOTPatchLoss(**kwargs), fastssl.IBOTPatchLoss(**kwargs, backend="triton").to(device)
    for step, (batch, h, w) in enumerate([(3, 4, 4), (4, 3, 5), (1, 2, 2)]):
        mask = _mask(batch, h, w)
        rows = int(mask.sum())
        teacher, student = torch.randn(rows, k) + 1.0, torch.randn(rows, k)
        temp = 0.06 if step == 1 else None
        leaf_t, leaf_o = student.clone().requires_grad_(True), student.to(device).requires_grad_(True)
        loss_t = theirs(teacher, leaf_t, mask, teacher_temp=temp)
        loss_o = ours(teacher.to(device), leaf_o, mask.to(device), teacher_temp=temp)
        (grad_t,) = torch.autograd.grad(loss_t, leaf_t)
        (grad_o,) = torch.autograd.grad(loss_o, leaf_o)
        assert loss_o.dtype == torch.float32 and loss_o.shape == torch.Size([])
        torch.testing.assert_close(loss_o.cpu(), loss_t, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(grad_o.cpu(), grad_t, rtol=2e-5, atol=1e-7)
        torch.testing.assert_close(ours.center.value.cpu(), theirs.center.value, rtol=1e-6, atol=1e-7)

    theirs, ours = lightly.IBOTPlusPlusPatchLoss(**kwargs), fastssl.IBOTPlusPlusPatchLoss(**kwargs, backend="triton")
    for mask, weight in [(None, 1.0), (torch.rand(2, 3, 3) < 0.5, 0.4)]:
        teacher, student = torch.randn(2, 9, k) + 0.5, torch.randn(2, 9, k)
        leaf_t, leaf_o = student.clone().requires_grad_(True), student.to(device).requires_grad_(True)
        loss_t = theirs(teacher, leaf_t, mask, visible_loss_weight=weight)
        loss_o = ours(teacher.to(device), leaf_o, None if mask is None else mask.to(device), visible_loss_weight=weight)
        (grad_t,) = torch.autograd.grad(loss_t, leaf_t)
        (grad_o,) = torch.autograd.grad(loss_o, leaf_o)
        torch.testing.assert_close(loss_o.cpu(), loss_t, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(grad_o.cpu(), grad_t, rtol=2e-5, atol=1e-7)
        torch.testing.assert_close(ours.center.value.cpu(), theirs.center.value, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_ibot_triton_teacher_sum_and_center_ema(device, monkeypatch):
    """The kernels' center outputs: the teacher column sum over all rows, and the EMA
    m·c + (1 − m)·mean from the same pass (several row groups with tiny tiles)."""
    _tiny_tiles(monkeypatch)
    mask = _mask(4, 3, 3)
    rows = int(mask.sum())
    teacher, student = _rows(rows, 7, device=device), _rows(rows, 7, device=device).requires_grad_(True)
    center = torch.randn(1, 7, device=device)
    _, teacher_sum = kernels.ibot_patch_loss_triton(
        teacher, student, center, 0.04, 0.1, mask=mask.to(device), center_mode=kernels.CENTER_TEACHER_SUM
    )
    torch.testing.assert_close(teacher_sum.cpu(), teacher.sum(dim=0).cpu(), rtol=1e-6, atol=1e-6)
    _, new_center = kernels.ibot_patch_loss_triton(
        teacher, student, center, 0.04, 0.1, mask=mask.to(device), center_momentum=0.7, center_mode=kernels.CENTER_EMA
    )
    expected = 0.7 * center.flatten() + 0.3 * teacher.mean(dim=0)
    torch.testing.assert_close(new_center.cpu(), expected.cpu(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_ibot_triton_mask_marking_other_rows(device):
    """The kernels never read the mask's count on the host: a mask that marks more or fewer
    tokens than there are rows gives a NaN loss; the dispatcher raises on CPU, where the count
    costs no synchronisation."""
    mask = _mask(2, 2, 3)
    rows = int(mask.sum())
    teacher, student = _rows(rows + 1, 5, device=device), _rows(rows + 1, 5, device=device)
    loss = kernels.ibot_patch_loss_triton(teacher, student, None, 0.04, 0.1, mask=mask.to(device))
    assert torch.isnan(loss)
    good = kernels.ibot_patch_loss_triton(teacher[:rows], student[:rows], None, 0.04, 0.1, mask=mask.to(device))
    assert torch.isfinite(good)
    if device == "cpu":
        with pytest.raises(BatchShapeError, match="mask marks"):
            FS.ibot_patch_loss(teacher, student, mask, backend="triton")


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("which", ["teacher", "student"])
def test_ibot_triton_non_finite_inputs_give_non_finite_loss(device, bad, which):
    mask = _mask(2, 2, 3)
    rows = int(mask.sum())
    teacher, student = _rows(rows, 6, device=device), _rows(rows, 6, device=device)
    (teacher if which == "teacher" else student)[1, 2] = bad
    expected = FS.ibot_patch_loss(teacher, student, mask.to(device), backend="torch")
    value = FS.ibot_patch_loss(teacher, student, mask.to(device), backend="triton")
    assert not torch.isfinite(value) and not torch.isfinite(expected)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_ibot_triton_no_grad_and_shared_tensor(device):
    """Under no_grad no gradient work is saved; one tensor passed as teacher and student (the
    teacher is detached, so autograd sees one input)."""
    mask = _mask(2, 3, 2)
    rows = int(mask.sum())
    x = _rows(rows, 8, device=device).requires_grad_(True)
    with torch.no_grad():
        value = FS.ibot_patch_loss(x, x, mask.to(device), backend="triton")
    expected = FS.ibot_patch_loss(x, x, mask.to(device), backend="torch")
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    (grad,) = torch.autograd.grad(FS.ibot_patch_loss(x, x, mask.to(device), backend="triton"), x)
    (expected_grad,) = torch.autograd.grad(expected, x)
    torch.testing.assert_close(grad.cpu(), expected_grad.cpu(), rtol=2e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------
# Custom ops, torch.compile, eager ops, fallback, CUDA graphs
# --------------------------------------------------------------------------------------------


def test_ibot_custom_ops_pass_opcheck():
    mask = _mask(3, 2, 2)
    rows = int(mask.sum())
    teacher, student = _rows(rows, 6), _rows(rows, 6).requires_grad_(True)
    center = torch.randn(1, 6)
    for args in [
        (teacher, student, center, mask, None, 0.04, 0.1, 0.9, kernels.CENTER_EMA),
        (teacher, student, None, None, torch.rand(rows), 0.05, 0.2, 0.0, kernels.CENTER_NONE),
    ]:
        torch.library.opcheck(kernels._ibot_op, args, test_utils=("test_schema", "test_autograd_registration",
                                                                   "test_faketensor"))  # fmt: skip
    stats = kernels._ibot_op(teacher, student.detach(), center, mask, None, 0.04, 0.1, 0.9, kernels.CENTER_EMA)[2]
    torch.library.opcheck(
        kernels._ibot_backward_op, (teacher, student.detach(), stats, torch.tensor(1.5), 0.04, 0.1),
        test_utils=("test_schema", "test_faketensor"),
    )  # fmt: skip


def test_ibot_triton_module_compiles_fullgraph_with_aot_eager():
    """A compiled module step (loss, student gradient, center EMA) has no graph break and
    matches eager execution, the second call on the center the first one updated."""
    torch._dynamo.reset()
    eager_module = fastssl.IBOTPatchLoss(output_dim=8, backend="triton")
    compiled_module = fastssl.IBOTPatchLoss(output_dim=8, backend="triton")
    compiled = torch.compile(lambda t, s, m: compiled_module(t, s, m), fullgraph=True, backend="aot_eager")
    mask = _mask(3, 2, 3)
    rows = int(mask.sum())
    for _ in range(2):
        teacher = torch.randn(rows, 8)
        student = torch.randn(rows, 8, requires_grad=True)
        value = compiled(teacher, student, mask)
        (grad,) = torch.autograd.grad(value, student)
        expected = eager_module(teacher, student, mask)
        (expected_grad,) = torch.autograd.grad(expected, student)
        torch.testing.assert_close(value, expected)
        torch.testing.assert_close(grad, expected_grad)
        torch.testing.assert_close(compiled_module.center.value, eager_module.center.value)


def test_ibot_triton_eager_ops_per_step_within_budget(monkeypatch):
    """The module's forward + backward, center update included, issues at most 16 PyTorch ops
    around the kernels (allocations and views included), none a host synchronization."""
    from test_sinkhorn_triton import EAGER_OP_BUDGET, EagerOpCounter

    _tiny_tiles(monkeypatch)
    module = fastssl.IBOTPatchLoss(output_dim=11, backend="triton")
    mask = _mask(4, 3, 3)
    rows = int(mask.sum())
    teacher, student = torch.randn(rows, 11), torch.randn(rows, 11, requires_grad=True)
    before = module.center.value.clone()
    # Count on the device path: the CPU-only host check of the mask's count is not issued there.
    monkeypatch.setattr(fastssl.prototype, "_check_mask_marks_rows", lambda mask, rows: None)
    counter = EagerOpCounter()
    counter.implementations.update({
        "fastssl::ibot_patch": kernels._ibot_forward, "fastssl::ibot_patch_backward": kernels._ibot_backward,
    })  # fmt: skip
    with counter:
        loss = module(teacher, student, mask)
        (grad,) = torch.autograd.grad(loss, student)
    assert grad.shape == (rows, 11) and not torch.equal(module.center.value, before)
    assert len(counter.ops) <= EAGER_OP_BUDGET, counter.ops
    assert not any(name in op for op in counter.ops for name in ("_local_scalar_dense", "nonzero", "lift_fresh")), counter.ops


def test_ibot_auto_falls_back_to_torch_when_a_kernel_fails(monkeypatch):
    from fastssl import _backend
    from fastssl import prototype

    def failing_launch(*args, **kwargs):
        raise RuntimeError("simulated launch failure")

    mask = _mask(2, 2, 3)
    rows = int(mask.sum())
    teacher, student = torch.randn(rows, 6), torch.randn(rows, 6)
    expected = FS.ibot_patch_loss(teacher, student, mask, backend="torch")
    monkeypatch.setattr(kernels, "_ibot_stats_kernel", type("Failing", (), {"__getitem__": lambda self, grid: failing_launch})())
    monkeypatch.setattr(prototype, "resolve_backend", lambda backend, tensor, *a: "triton")  # as for CUDA tensors
    monkeypatch.setattr(_backend, "_FALLBACK_WARNED", set())
    with pytest.warns(RuntimeWarning, match="ibot.*simulated launch failure"):
        value = FS.ibot_patch_loss(teacher, student, mask, backend="auto")
    torch.testing.assert_close(value, expected)
    with pytest.raises(RuntimeError, match="simulated launch failure"):
        FS.ibot_patch_loss(teacher, student, mask, backend="triton")


@pytest.mark.gpu
def test_ibot_training_step_captures_in_a_cuda_graph():
    from test_sinkhorn_triton import capture_training_step

    # The captured and the eager steps share this module: momentum 1 keeps the center's value
    # fixed (the EMA kernel and the in-place copy still run inside the graph).
    module = fastssl.IBOTPatchLoss(output_dim=300, center_momentum=1.0, backend="triton").cuda()
    mask = torch.rand(8, 4, 4, device="cuda") < 0.5
    mask[:, 0, 0] = True
    rows = int(mask.sum())

    # Rows 0..rows of the first view are the masked tokens; the teacher is the second view.
    capture_training_step(lambda outputs: module(outputs[1][:rows].detach(), outputs[0][:rows], mask), views=2, rows=rows)
