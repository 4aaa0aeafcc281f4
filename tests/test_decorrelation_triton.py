"""Barlow Twins and VICReg, Triton kernels: values and gradients against the reference on both
paths, every output buffer written, multi-tile loops, the seeds' exercises. CPU tensors run
through the interpreter; the ``gpu`` lane runs the same bodies on CUDA."""

from __future__ import annotations

import pytest
import torch

from torch.utils._python_dispatch import TorchDispatchMode

from fastssl import decorrelation, reference
from _helpers import TRITON_DEVICES, assert_matches_reference, awkward_inputs, poisoned

kernels = pytest.importorskip("fastssl.kernels.decorrelation")

VICREG_HYPER = (2.0, 3.0, 0.7, 1e-4)  # lambda, mu, nu, eps: every term weighs in the gradient


@pytest.fixture(autouse=True)
def _poison_kernel_buffers(monkeypatch):
    """Every buffer a kernel is meant to fill starts as NaN: an element left unwritten turns the
    loss or a gradient into NaN, which every comparison below catches."""
    monkeypatch.setattr(kernels, "_new_buffer", lambda shape, dtype, device: poisoned(shape, dtype, device))


def _bt(path, lambda_param=0.1):
    return lambda x, y: decorrelation.barlow_twins_loss(x, y, lambda_param, backend="triton", path=path)


def _bt_ref(lambda_param=0.1):
    return lambda x, y: reference.barlow_twins_loss(x, y, lambda_param)


def _vicreg(path, hyper=VICREG_HYPER):
    return lambda x, y: decorrelation.vicreg_loss(x, y, *hyper, backend="triton", path=path)


def _vicreg_ref(hyper=VICREG_HYPER):
    return lambda x, y: reference.vicreg_loss(x, y, *hyper)


def _check_both_losses(a, b, paths=("gram", "cross")):
    for path in paths:
        _assert_barlow_twins_matches(_bt(path), _bt_ref(), [a, b])
        assert_matches_reference(_vicreg(path), _vicreg_ref(), [a, b])


def _assert_barlow_twins_matches(impl, ref, inputs):
    """As in test_decorrelation.py: at N = 2 the Barlow Twins gradient is of order batch-norm's
    eps, a remainder of cancelling O(1) terms, and float32 is held to twice PyTorch's own
    float32 error (the rule DESIGN §3 sets for half precision)."""
    if inputs[0].dtype != torch.float32 or inputs[0].shape[0] > 2:
        assert_matches_reference(impl, ref, inputs)
        return

    def value_and_grads(fn, xs):
        leaves = [x.detach().clone().requires_grad_(True) for x in xs]
        value = fn(*leaves)
        return [value.detach()] + list(torch.autograd.grad(value, leaves))

    exact = value_and_grads(ref, [x.double() for x in inputs])
    torch_own = value_and_grads(ref, inputs)
    ours = value_and_grads(impl, inputs)
    for name, o, t, e in zip(["loss", "grad[0]", "grad[1]"], ours, torch_own, exact):
        err_ours = (o.double() - e).abs().max().item()
        err_torch = (t.double() - e).abs().max().item()
        allowed = 2 * err_torch + 2e-5 * e.abs().max().item() + 1e-6
        assert err_ours <= allowed, f"{name}: {err_ours:.3e} vs float32 reference {err_torch:.3e}"


# --------------------------------------------------------------------------------------------
# Against the reference, both paths
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("d", [1, 7, 129, 300])
@pytest.mark.parametrize("n", [2, 3, 17, 64])
def test_float32_matches_reference(device, n, d):
    a, b = awkward_inputs(n, d, device=device, non_contiguous=(d % 2 == 1))
    _check_both_losses(a, b)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("n,d", [(2, 1), (3, 129), (17, 300), (64, 7)])
def test_bfloat16_matches_reference(device, n, d):
    a, b = awkward_inputs(n, d, dtype=torch.bfloat16, device=device, non_contiguous=(n == 17))
    _check_both_losses(a, b)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("n,d", [(8, 48), (40, 12)])
def test_nearly_equal_views_bfloat16(device, n, d):
    # The regime of a converged model: C ≈ I, and for N ≪ d the Gram is nearly a multiple of the
    # identity, so most of each gradient cancels (batch-norm projection) and what is left must
    # not be rounding noise of the cancelled part.
    a = torch.randn(n, d, device=device)
    b = a + 0.05 * torch.randn(n, d, device=device)
    _check_both_losses(a.bfloat16(), b.bfloat16())


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("n,d", [(3, 40), (40, 9)])
def test_float16_matches_reference(device, n, d):
    a, b = awkward_inputs(n, d, dtype=torch.float16, device=device)
    _check_both_losses(a, b)


def _record_plans(monkeypatch):
    """The launch plans of every forward call (to see which path ran)."""
    plans = []
    original = kernels.forward

    def recording(z_a, z_b, p, *args):
        plans.append(p)
        return original(z_a, z_b, p, *args)

    monkeypatch.setattr(kernels, "forward", recording)
    return plans


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("n,d", [(5, 70), (70, 5)])
def test_auto_path_dispatch(device, n, d, monkeypatch):
    a, b = awkward_inputs(n, d, device=device)
    plans = _record_plans(monkeypatch)
    _check_both_losses(a, b, paths=("auto",))
    assert len(plans) == 2 and all(p.gram == (n < d) for p in plans)  # one call per loss


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize(
    "n,d,dtype,splits",
    [(33, 17, torch.float32, None), (17, 20, torch.bfloat16, None), (20, 37, torch.float16, 3), (37, 20, torch.float32, 3)],
    ids=["33x17-fp32", "17x20-bf16", "20x37-fp16-split3", "37x20-fp32-split3"],
)
def test_multi_tile_loops_and_masks(device, n, d, dtype, splits, monkeypatch):
    # 16-wide tiles: several row and column blocks, partial edge tiles, multi-step reductions,
    # mirrored symmetric tiles, Barlow Twins' backward through its scratch (N > tile), and
    # split-K ranges merged by the finishing kernels (the last range a partial one)
    monkeypatch.setattr(kernels, "_FORCED_TILES", (16, 16))
    monkeypatch.setattr(kernels, "_FORCED_SPLITS", splits)
    plans = _record_plans(monkeypatch)
    a, b = awkward_inputs(n, d, dtype=dtype, device=device, non_contiguous=True)
    _check_both_losses(a, b)
    if splits:
        assert all(p.splits > 1 for p in plans)  # (the last range a partial one where 3 do not divide)
    assert any(not p.single for p in plans)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_upstream_gradient_and_no_grad(device):
    a, b = awkward_inputs(6, 11, device=device)
    cases = [(_bt(path), _bt_ref()) for path in ("gram", "cross")]
    cases += [(_vicreg(path), _vicreg_ref()) for path in ("gram", "cross")]
    for ours, ref in cases:
        xa, ya = a.clone().requires_grad_(), a.double().requires_grad_()
        (-2.5 * ours(xa, b)).backward()  # the kernels read the incoming gradient from the device
        (-2.5 * ref(ya, b.double())).backward()
        torch.testing.assert_close(xa.grad.double(), ya.grad, rtol=1e-4, atol=1e-6)
    for ours, _ in cases[::2]:  # the gram paths keep no Gram without a gradient to compute
        with torch.no_grad():
            torch.testing.assert_close(ours(a, b), ours(a.clone().requires_grad_(), b).detach())


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_float64_and_mixed_dtypes(device):
    a, b = awkward_inputs(5, 9, dtype=torch.float64, device=device)
    # float64 runs the PyTorch path: float64 accumulation, float64 gradients
    xa = a.clone().requires_grad_()
    _bt("gram")(xa, b).backward()
    ya = a.clone().requires_grad_()
    _bt_ref()(ya, b).backward()
    torch.testing.assert_close(xa.grad, ya.grad, rtol=1e-11, atol=1e-13)
    # views of different dtypes meet at the promoted one; gradients come back in each own dtype
    xa, xb = a.float().requires_grad_(), b.bfloat16().requires_grad_()
    value = _vicreg("gram")(xa, xb)
    value.backward()
    assert value.dtype == torch.float32 and xa.grad.dtype == torch.float32 and xb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(value, _vicreg_ref()(a.float(), b.bfloat16().float()))


@pytest.mark.filterwarnings("ignore::UserWarning")  # Dynamo on the lru_cache in backend resolution
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_torch_compile_fullgraph_keeps_the_kernels_whole(device):
    # The kernels run as torch.library custom ops: Dynamo records each as one node (no graph
    # break, no tracing into the launchers); aot_eager also runs their fake (shape) functions
    # and the registered backward.
    def both(x, y):
        return decorrelation.barlow_twins_loss(x, y, 0.1, backend="triton") + decorrelation.vicreg_loss(
            x, y, *VICREG_HYPER, backend="triton"
        )

    for n, d in [(6, 10), (10, 6)]:  # gram and cross paths
        torch._dynamo.reset()
        a, b = awkward_inputs(n, d, device=device)
        compiled = torch.compile(both, fullgraph=True, backend="aot_eager")
        xa, xb = a.clone().requires_grad_(), b.clone().requires_grad_()
        value = compiled(xa, xb)
        value.backward()
        ya, yb = a.clone().requires_grad_(), b.clone().requires_grad_()
        expected = both(ya, yb)
        expected.backward()
        torch.testing.assert_close(value, expected)
        torch.testing.assert_close(xa.grad, ya.grad)
        torch.testing.assert_close(xb.grad, yb.grad)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy, under the interpreter, on inf − inf
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("path", ["gram", "cross"])
def test_non_finite_input_propagates(device, path):
    for bad in (float("nan"), float("inf")):
        a, b = awkward_inputs(6, 5, device=device)
        a[2, 1] = bad
        assert not torch.isfinite(_bt(path)(a, b))
        assert not torch.isfinite(_vicreg(path)(a, b))


# --------------------------------------------------------------------------------------------
# Launchers: every element of every output written; statistics; memory
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_statistics_and_operands(device, dtype, monkeypatch):
    monkeypatch.setattr(kernels, "_FORCED_TILES", (16, 16))
    stats = pytest.importorskip("fastssl.kernels.decorrelation_stats")
    n, d = 45, 37
    a, b = awkward_inputs(n, d, device=device, non_contiguous=True)
    a = a * 3 + 100  # a large mean: a naive E[x²] − E[x]² would lose the variance
    a, b = a.to(dtype), b.to(dtype)
    a64, b64 = a.double(), b.double()
    rows = lambda ws, *ids: ws[: stats.COL_ROWS * d].view(stats.COL_ROWS, d)[list(ids)].double()  # noqa: E731
    for vicreg in (False, True):
        p = kernels.plan(n, d, dtype, a.device, vicreg, True, True)
        _, ws, ops = kernels.forward(a, b, p, 0.1, 1.0, 1.0, 1e-5 if not vicreg else 1e-4)
        torch.testing.assert_close(rows(ws, 0, 1), torch.stack([a64.mean(0), b64.mean(0)]), rtol=1e-6, atol=1e-5)
        scale = rows(ws, 2, 3)
        if vicreg:  # one power of two per view, every column norm of Y within 2^7
            inv_s = scale[:, 0]
            assert torch.all(torch.log2(inv_s) == torch.round(torch.log2(inv_s)))
            assert torch.all(scale == inv_s[:, None])
            norms = torch.stack([(a64 - a64.mean(0)).norm(dim=0), (b64 - b64.mean(0)).norm(dim=0)])
            assert torch.all(norms.max(1).values * inv_s <= 128) and torch.all(norms.max(1).values * inv_s > 32)
            expected = torch.stack([a64 - a64.mean(0), b64 - b64.mean(0)]) * inv_s[:, None, None]
        else:
            expected_scale = torch.rsqrt(torch.stack([a64.var(0, correction=0), b64.var(0, correction=0)]) + 1e-5)
            torch.testing.assert_close(scale, expected_scale, rtol=1e-5, atol=0)
            expected = torch.stack([(a64 - a64.mean(0)), (b64 - b64.mean(0))]) * expected_scale[:, None, :]
        operands = ops[: p.mat_base].view(p.parts, 2, n, d).double().sum(0)  # hi (+ lo)
        tol = 1e-5 if dtype == torch.float32 else 2**-15
        torch.testing.assert_close(operands, expected, rtol=tol, atol=tol * expected.abs().max().item())


def _unused_workspace(p, d):
    """Workspace entries no kernel writes for this plan (everything else must be)."""
    stats = pytest.importorskip("fastssl.kernels.decorrelation_stats")
    unused = torch.zeros(p.workspace_size, dtype=torch.bool)
    if not p.vicreg:
        unused[stats.COL_Y.value * d : (stats.COL_Y.value + 1) * d] = True
    blk = unused[p.blk_offset : p.blk_offset + stats.BLK_SLOTS * p.stats_blocks].view(p.stats_blocks, stats.BLK_SLOTS)
    blk[:, 7] = True
    if not p.vicreg:
        blk[:, 2:] = True
    if p.splits > 1 and not p.gram and not p.vicreg:  # one product (C), no view-b partial tiles
        split = unused[p.split_offset : p.split_offset + p.splits * p.tiles * 2 * p.block**2]
        split.view(p.splits * p.tiles, 2, p.block**2)[:, 1] = True
    return unused


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("splits", [None, 2])
def test_every_kernel_output_is_written(device, splits, monkeypatch):
    monkeypatch.setattr(kernels, "_FORCED_TILES", (16, 16))
    monkeypatch.setattr(kernels, "_FORCED_SPLITS", splits)
    for n, d in [(20, 35), (35, 20)]:
        a, b = awkward_inputs(n, d, device=device)
        go = torch.tensor(1.5, device=device)
        for vicreg in (False, True):
            p = kernels.plan(n, d, a.dtype, a.device, vicreg, n < d, True)
            loss, ws, ops = kernels.forward(a, b, p, 0.1, 0.2, 0.3, 1e-4)
            assert torch.isfinite(loss) and torch.isfinite(ops).all()
            written = ws[~_unused_workspace(p, d).to(ws.device)]
            assert torch.isfinite(written).all(), (n, d, vicreg)
            assert all(torch.isfinite(g).all() for g in kernels.backward(go, a, b, ws, ops, p, 0.1, 0.3))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("loss", ["barlow_twins", "vicreg"])
def test_no_d_by_d_buffer_when_n_below_d(device, loss, monkeypatch):
    n, d = 6, 40
    sizes = []

    def recording(shape, dtype, device):
        sizes.append(torch.Size(shape).numel())
        return poisoned(shape, dtype, device)

    monkeypatch.setattr(kernels, "_new_buffer", recording)
    a, b = awkward_inputs(n, d, device=device)
    fn = {"barlow_twins": _bt, "vicreg": _vicreg}[loss]
    xa, xb = a.clone().requires_grad_(), b.clone().requires_grad_()
    fn("auto")(xa, xb).backward()
    # operands (2, N, d), Grams (2, N, N), per-column statistics (8, d): O(N·d + N²), no d×d
    assert max(sizes) <= 2 * n * d + 2 * n * n and max(sizes) < d * d, sizes
    # and the cross path does form d×d (the recorder sees it)
    sizes.clear()
    fn("cross")(xa, xb).backward()
    assert max(sizes) >= d * d


# --------------------------------------------------------------------------------------------
# Dispatch: the fallback under "auto", the cost-model rule
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["barlow_twins", "vicreg"])
def test_auto_falls_back_to_the_torch_path_when_a_kernel_fails(loss, monkeypatch):
    from fastssl import _backend

    def failing_launch(*args, **kwargs):
        raise RuntimeError("PTX JIT compilation failed")

    monkeypatch.setattr(kernels, "forward", failing_launch)
    monkeypatch.setattr(_backend, "_FALLBACK_WARNED", set())
    # "auto" resolves to the Triton path as it does for CUDA tensors
    monkeypatch.setattr(decorrelation, "resolve_backend", lambda backend, tensor: "triton")
    a, b = awkward_inputs(6, 11)
    fn = {"barlow_twins": decorrelation.barlow_twins_loss, "vicreg": decorrelation.vicreg_loss}[loss]
    with pytest.warns(RuntimeWarning, match=f"{loss}.*PTX JIT compilation failed"):
        value = fn(a, b, backend="auto")
    torch.testing.assert_close(value, fn(a, b, backend="torch"))
    with pytest.raises(RuntimeError, match="PTX JIT"):
        fn(a, b, backend="triton")


def test_auto_rule_from_the_cost_model():
    rule = decorrelation.auto_prefers_triton
    for vicreg in (False, True):
        # float32 products on the FMA pipe lose to cuBLAS SGEMM once they dominate the launches
        assert not rule(2048, 8192, torch.float32, True, vicreg)
        assert rule(256, 8192, torch.float32, True, vicreg)  # launch-bound: fewer launches win
        for dtype in (torch.bfloat16, torch.float16):  # tensor cores against float32 SGEMM
            assert rule(2048, 8192, dtype, True, vicreg) and rule(256, 8192, dtype, True, vicreg)
    torch_s, triton_s = decorrelation.predicted_seconds(2048, 8192, torch.float32, True, False)
    assert torch_s < triton_s


# --------------------------------------------------------------------------------------------
# Eager ops and host syncs around the kernels
# --------------------------------------------------------------------------------------------


class _CountEagerOps(TorchDispatchMode):
    """Every aten op of a forward + backward, including those inside fastssl's custom ops (run
    here through their Python implementations), excluding the interpreter's own work inside a
    kernel launch (on CUDA a launch is no aten op)."""

    IMPLS = {
        "fastssl::decorrelation_barlow_twins": "_barlow_twins_forward",
        "fastssl::decorrelation_barlow_twins_backward": "_barlow_twins_backward",
        "fastssl::decorrelation_vicreg": "_vicreg_forward",
        "fastssl::decorrelation_vicreg_backward": "_vicreg_backward",
    }

    def __init__(self, ops):
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        impl = self.IMPLS.get(func._schema.name)
        if impl is not None:
            with _CountEagerOps(self.ops):
                return getattr(kernels, impl)(*args, **kwargs)
        self.ops.append(str(func))
        return func(*args, **kwargs)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("path", ["gram", "cross"])
@pytest.mark.parametrize("loss", ["barlow_twins", "vicreg"])
def test_at_most_16_eager_ops_and_no_host_sync(device, loss, path, monkeypatch):
    from torch.utils._python_dispatch import _disable_current_modes

    if device == "cpu":
        from triton.runtime.interpreter import GridExecutor

        run_kernel = GridExecutor.__call__

        def launch_unseen(self, *args, **kwargs):
            with _disable_current_modes():
                return run_kernel(self, *args, **kwargs)

        monkeypatch.setattr(GridExecutor, "__call__", launch_unseen)
    a, b = awkward_inputs(8, 12, device=device)
    if path == "cross":
        a, b = a.T.contiguous(), b.T.contiguous()
    xa, xb = a.clone().requires_grad_(), b.clone().requires_grad_()
    fn = {"barlow_twins": _bt, "vicreg": _vicreg}[loss](path)
    ops = []
    with _CountEagerOps(ops):
        fn(xa, xb).backward()
    assert len(ops) <= 16, ops
    # no host sync: nothing reads a device value back (.item(), bool(), .tolist(), nonzero)
    syncing = ("_local_scalar_dense", "nonzero", "is_nonzero", "equal")
    assert not any(name.split(".")[0].split("::")[-1] in syncing for name in ops), ops
    assert torch.isfinite(xa.grad).all() and torch.isfinite(xb.grad).all()


# --------------------------------------------------------------------------------------------
# float16 range: VICReg's centered operands beyond 65504
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("n,d", [(6, 10), (12, 40), (10, 6), (40, 12)])
def test_float16_centered_values_beyond_the_float16_range(device, n, d):
    # Columns of ±6e4 with unequal signs: centered values reach ~1e5 (float16 max 65504), their
    # squares 1e10. VICReg's operands are scaled by a power of two per view (the torch backend
    # computes in float32); Barlow Twins' standardized operands are bounded by sqrt(N). ν is
    # small so that the covariance gradient (∝ x³) stays inside the float16 range.
    sign = torch.where(torch.rand(n, d) < 0.3, 1.0, -1.0)
    a = (sign * (6e4 - 100 * torch.rand(n, d))).half().to(device)
    b = (a.float() * 0.5 + 1e3 * torch.randn(n, d, device=device)).half()
    assert (a.float() - a.float().mean(0)).abs().max() > 65504
    hyper = (1e-3, 25.0, 1e-14, 1e-4)
    for ours, ref in [(_vicreg("auto", hyper), _vicreg_ref(hyper)), (_bt("auto"), _bt_ref())]:
        xa, xb = a.clone().requires_grad_(), b.clone().requires_grad_()
        value = ours(xa, xb)
        value.backward()
        ya, yb = a.double().requires_grad_(), b.double().requires_grad_()
        expected = ref(ya, yb)
        expected.backward()
        assert torch.isfinite(value) and value.item() == pytest.approx(expected.item(), rel=1e-5)
        for grad, grad64 in [(xa.grad, ya.grad), (xb.grad, yb.grad)]:
            assert torch.isfinite(grad).all()
            if grad64.abs().max() > 1e-3:  # Barlow Twins' gradients here (~1e-7) are float16 subnormals
                torch.testing.assert_close(grad.double(), grad64, rtol=0, atol=1e-2 * grad64.abs().max().item())


# --------------------------------------------------------------------------------------------
# The seeds' exercises, on the kernels
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("path", ["gram", "cross"])
def test_barlow_twins_zero_at_identity_and_affine_invariance(device, path):
    n, d = 24, 10
    m = torch.randn(n, d, dtype=torch.float64)
    q, _ = torch.linalg.qr(m - m.mean(0))  # zero-mean, orthonormal columns
    z = (q * n**0.5).float().to(device)
    scale, shift = torch.rand(d, device=device) + 0.5, torch.randn(d, device=device)
    za, zb = z.clone().requires_grad_(), (z * scale + shift).requires_grad_()
    loss = _bt(path, 5e-3)(za, zb)
    loss.backward()
    assert 0 <= loss.item() < 1e-5  # float32 standardization of orthonormal columns: C = I ± 1e-7
    assert za.grad.abs().max().item() < 1e-4 and zb.grad.abs().max().item() < 1e-4
    a, b = awkward_inputs(n, d, device=device)
    sign = torch.where(torch.rand(d, device=device) < 0.5, -1.0, 1.0)
    scale_a, scale_b = (torch.rand(d, device=device) + 0.5) * sign, (torch.rand(d, device=device) + 0.5) * sign
    mapped = (a * scale_a + 1.0, b * scale_b - 2.0)
    assert _bt(path)(*mapped).item() == pytest.approx(_bt(path)(a, b).item(), rel=1e-4)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("path", ["gram", "cross"])
def test_vicreg_hinge_gradient_closed_form(device, path):
    n, d = 12, 9
    z = 0.3 * torch.randn(n, d, device=device)
    z[:, :3] *= 10  # hinge inactive on the first three features
    z_leaf = z.clone().requires_grad_()
    other = torch.randn(n, d, device=device)
    decorrelation.vicreg_loss(z_leaf, other, 0.0, 2.0, 0.0, 1e-4, backend="triton", path=path).backward()
    sigma = torch.sqrt(z.var(0) + 1e-4)
    closed_form = -(z - z.mean(0)) / (d * (n - 1) * sigma) * (sigma < 1)
    torch.testing.assert_close(z_leaf.grad, closed_form, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------
# GPU lane only: the Gram identity at d = 8192 against the d×d form in float64
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [16, 64])
def test_gram_identity_at_d8192(device, dtype, n):
    d = 8192
    a = torch.randn(n, d, device=device)
    b = (a + 0.05 * torch.randn(n, d, device=device)).to(dtype)
    a = a.to(dtype)
    exact_bt = reference.barlow_twins_loss(a.double(), b.double(), 5e-3).item()
    exact_cov = (reference.vicreg_covariance(a.double()) + reference.vicreg_covariance(b.double())).item()
    tol = 2e-6 if dtype == torch.float32 else 1e-4  # half inputs: hi + lo forward products
    assert decorrelation.barlow_twins_loss(a, b, backend="triton").item() == pytest.approx(exact_bt, rel=tol)
    assert decorrelation.vicreg_loss(a, b, 0.0, 0.0, 1.0, backend="triton").item() == pytest.approx(exact_cov, rel=tol)
    assert_matches_reference(_bt("auto"), _bt_ref(), [a, b])
    assert_matches_reference(_vicreg("auto"), _vicreg_ref(), [a, b])


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")])
@pytest.mark.parametrize("loss_name", ["BarlowTwinsLoss", "VICRegLoss"])
def test_cuda_graph_capture_of_a_training_step(device, loss_name):
    # No host sync and no host-to-device copy on the Triton path: a whole training step
    # (forward, backward, optimizer) is captured in a CUDA graph and replayed on new inputs.
    import fastssl

    torch.manual_seed(0)
    model = torch.nn.Linear(64, 256, device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    criterion = getattr(fastssl, loss_name)(backend="triton")
    x_a = torch.randn(32, 64, device=device)
    x_b = torch.randn(32, 64, device=device)

    def step():
        optimizer.zero_grad(set_to_none=False)
        loss = criterion(model(x_a), model(x_b))
        loss.backward()
        optimizer.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: compile the kernels, allocate the gradients
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_loss = step()
    x_a.copy_(torch.randn_like(x_a))
    x_b.copy_(torch.randn_like(x_b))
    weights, bias = model.weight.detach().clone(), model.bias.detach().clone()
    graph.replay()
    torch.cuda.synchronize()
    reference_criterion = getattr(fastssl, loss_name)(backend="torch")
    expected = reference_criterion(x_a @ weights.T + bias, x_b @ weights.T + bias)  # before the replayed update
    torch.testing.assert_close(captured_loss, expected, rtol=1e-4, atol=1e-5)
    assert not torch.equal(model.weight.detach(), weights)  # the optimizer step ran in the replay


# --------------------------------------------------------------------------------------------
# The CUDA launch plans at small and unaligned shapes (their sm_90 compiles, registers and
# spills under Triton 3.6 and 3.9: tests/test_kernel_compile.py and .ci/step-20-triton36.sh)
# --------------------------------------------------------------------------------------------

_H200 = dict(device=torch.device("cpu"), sms=132)  # a CUDA plan for 132 SMs, no device needed


def _cuda_plan(n, d, dtype, vicreg, use_gram=None):
    return kernels.plan(n, d, dtype, _H200["device"], vicreg, n < d if use_gram is None else use_gram, True,
                        sms=_H200["sms"])


@pytest.mark.parametrize("vicreg", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_headline_cuda_plans_keep_the_tile_tables(dtype, vicreg):
    """N >= 64 and d a multiple of 16: 64×64 products in steps of 32 (fp32: 16) on 4 warps."""
    step = 16 if dtype == torch.float32 else 32
    for n in (256, 2048):
        p = _cuda_plan(n, 8192, dtype, vicreg)
        assert (p.block, p.block_k, p.product_warps, p.grad_block_k) == (64, step, 4, step)
        if vicreg:
            assert (p.grad_block_m, p.grad_block_n) == (64, 64)
        else:
            assert (p.grad_block_m, p.grad_block_n) == ((256, 32) if n == 256 else (64, 64))


@pytest.mark.parametrize(
    "n,d,dtype,vicreg,tile",
    [(2, 7, torch.bfloat16, False, 16), (5, 33, torch.float32, False, 16), (3, 17, torch.float16, True, 16),
     (20, 1000, torch.float16, True, 32)],
)
def test_cuda_plans_fit_the_tiles_to_small_batches(n, d, dtype, vicreg, tile):
    """A Gram tile and the gradient tiles' rows no larger than N rounded up (at N = 2 a 64-row
    tile spilled registers), never below the 16 of an mma."""
    p = _cuda_plan(n, d, dtype, vicreg)
    assert p.gram and p.block == tile and p.tiles == 1
    assert p.grad_block_m == tile
    cross = _cuda_plan(70, 20, dtype, vicreg, use_gram=False)
    assert cross.block == 32  # the d×d product of d = 20


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_plans_for_rows_not_a_multiple_of_16(dtype):
    """d = 1000 (Gram) or 100 (cross): element-wise operand loads; the products in steps of 16
    on 8 warps, the gradient tiles with half the columns (Barlow Twins' register panel halved)."""
    for vicreg in (False, True):
        p = _cuda_plan(200, 1000, dtype, vicreg)
        assert (p.block, p.block_k, p.product_warps, p.grad_block_k) == (64, 16, 8, 16)
        assert (p.grad_block_m, p.grad_block_n) == ((64, 32) if vicreg else (256, 16))
        aligned = _cuda_plan(200, 1024, dtype, vicreg)
        assert aligned.product_warps == 4 and aligned.grad_block_n == (64 if vicreg else 32)
        cross = _cuda_plan(1000, 100, dtype, vicreg)
        assert not cross.gram and (cross.block, cross.block_k, cross.product_warps) == (64, 16, 8)
        assert (cross.grad_block_n, cross.grad_block_k) == (32, 16)


@pytest.mark.parametrize("vicreg", [False, True])
def test_cuda_plans_finish_gram_tiles_apart_when_n_is_not_a_multiple_of_16(vicreg):
    """The Grams of N = 1000 are stored by the finishing kernel (4-row chunks), even with one
    split-K range; without a backward, or with N a multiple of 16, the product kernel finishes."""
    p = _cuda_plan(1000, 8192, torch.bfloat16, vicreg)
    assert p.splits == 1 and not p.finish_in_place and p.finish_rows == 4
    assert p.workspace_size - p.split_offset == p.tiles * 2 * 64 * 64
    no_backward = kernels.plan(1000, 8192, torch.bfloat16, torch.device("cpu"), vicreg, True, False, sms=132)
    assert no_backward.finish_in_place and no_backward.workspace_size == no_backward.split_offset
    assert _cuda_plan(2048, 8192, torch.bfloat16, vicreg).finish_in_place
    assert _cuda_plan(200, 1024, torch.bfloat16, vicreg).finish_rows == 4  # split-K: 4-row chunks too
    assert _cuda_plan(256, 8192, torch.bfloat16, vicreg).finish_rows == 8


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize(
    "n,d,dtype,paths",
    [(2, 7, torch.bfloat16, ("gram", "cross")), (5, 33, torch.float32, ("gram", "cross")),
     (3, 17, torch.float16, ("gram", "cross")), (40, 50, torch.bfloat16, ("gram",)),
     (50, 20, torch.float16, ("cross",))],
    ids=["2x7-bf16", "5x33-fp32", "3x17-fp16", "40x50-bf16", "50x20-fp16"],
)
def test_cuda_plans_match_reference_at_awkward_shapes(device, n, d, dtype, paths, monkeypatch):
    """The tiles, steps, split-K ranges, register panels and finishing the CUDA path plans for
    these shapes, run by the interpreter: 16-wide Gram tiles at tiny N; at N = 40, d = 50 steps
    of 16, the halved Barlow Twins panel and the Grams finished apart with one range; at d = 20
    a 32-wide cross tile in steps of 16."""
    monkeypatch.setattr(kernels, "_is_cuda", lambda device: True)
    monkeypatch.setattr(kernels, "_sm_count", lambda device: 132)
    plans = _record_plans(monkeypatch)
    a, b = awkward_inputs(n, d, dtype=dtype, device=device, non_contiguous=(n == 3))
    _check_both_losses(a, b, paths=paths)
    assert plans and all(p.cuda and p.block == kernels._cuda_tile(p.n if p.gram else p.d) for p in plans)
    if d % 16:
        assert all(p.block_k == 16 for p in plans)
    if n == 40:
        assert all(p.splits == 1 and not p.finish_in_place for p in plans)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("path", ["gram", "cross"])
def test_barlow_twins_statistics_rescale_as_row_chunks_grow(path, device, monkeypatch):
    """Column magnitudes from 1e-2 to 1e36 down the rows, 16-row statistics chunks: every chunk
    raises the columns' power-of-two scale, so the running mean and M2 are rescaled each time
    (float32 squares beyond ~1.8e19 would overflow without the scale)."""
    monkeypatch.setattr(kernels, "_FORCED_TILES", (16, 16))
    n, d = 50, 21
    magnitude = torch.logspace(-2, 36, n, dtype=torch.float64).unsqueeze(1)
    a = torch.randn(n, d, dtype=torch.float64) * magnitude
    b = a * (1 + 0.3 * torch.randn(n, d, dtype=torch.float64))
    inputs = [a.float().to(device), b.float().to(device)]
    assert_matches_reference(_bt(path), _bt_ref(), inputs, rtol=2e-5, atol=0.0)
