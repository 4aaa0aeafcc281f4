"""Barlow Twins and VICReg, Triton kernels: values and gradients against the reference on both
paths, every output buffer written, multi-tile loops, the seeds' exercises. CPU tensors run
through the interpreter; the ``gpu`` lane runs the same bodies on CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("n,d", [(5, 70), (70, 5)])
def test_auto_path_dispatch(device, n, d, mocker):
    a, b = awkward_inputs(n, d, device=device)
    spy_gram = mocker.spy(kernels, "gram_forward")
    spy_cross = mocker.spy(kernels, "cross_forward")
    _check_both_losses(a, b, paths=("auto",))
    expected, other = (spy_gram, spy_cross) if n < d else (spy_cross, spy_gram)
    assert expected.call_count == 2 and other.call_count == 0  # once per loss


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize(
    "n,d,dtype", [(33, 17, torch.float32), (17, 20, torch.bfloat16)], ids=["33x17-fp32", "17x20-bf16"]
)
def test_multi_tile_loops_and_masks(device, n, d, dtype, monkeypatch):
    # 16-wide tiles: several row and column blocks, partial edge tiles, multi-step reductions,
    # mirrored symmetric tiles and several row splits of the column statistics
    monkeypatch.setattr(kernels, "_FORCED_TILES", (16, 16))
    a, b = awkward_inputs(n, d, dtype=dtype, device=device, non_contiguous=True)
    _check_both_losses(a, b)


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
def test_column_statistics_with_row_splits(device, monkeypatch):
    monkeypatch.setattr(kernels, "_FORCED_TILES", (16, 16))
    n, d = 45, 37
    a, b = awkward_inputs(n, d, device=device, non_contiguous=True)
    a = a * 3 + 100  # a large mean: a naive E[x²] − E[x]² would lose the variance
    for splits in (1, 3):
        stats = kernels.column_stats(a, b, row_splits=splits)
        assert stats.shape == (6, d) and torch.isfinite(stats).all()
        a64, b64 = a.double(), b.double()
        expected = torch.stack([
            a64.mean(0), b64.mean(0), a64.var(0, correction=0) * n, b64.var(0, correction=0) * n,
            ((a64 - a64.mean(0)) * (b64 - b64.mean(0))).sum(0), ((a64 - b64) ** 2).sum(0),
        ])  # fmt: skip
        torch.testing.assert_close(stats.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_every_kernel_output_is_written(device, monkeypatch):
    monkeypatch.setattr(kernels, "_FORCED_TILES", (16, 16))
    n, d = 20, 18
    a, b = awkward_inputs(n, d, device=device)
    shift = torch.randn(2, d, device=device)
    scale = torch.rand(2, d, device=device) + 0.5
    for vicreg in (False, True):
        for out in kernels.gram_forward(a, b, shift, scale, vicreg=vicreg, store_gram=True):
            assert torch.isfinite(out).all()
        assert torch.isfinite(kernels.cross_forward(a, b, shift, scale, vicreg, 0.1, 0.2)).all()
        mat, row_sum, col_sum = kernels.cross_backward_matrix(a, b, shift, scale, vicreg, 0.1, 0.2)
        assert torch.isfinite(mat).all() and torch.isfinite(row_sum).all() and torch.isfinite(col_sum).all()
        gram = torch.randn(2, n, n, device=device)
        vec = torch.randn(4, d, device=device)
        go = torch.ones(1, device=device)
        for finalize in (False, True):
            coefficients = (0.3, 0.2, 0.1, 0.05)
            grads = kernels.gram_backward(
                a, b, shift, scale, gram[0], gram[1], gram[0, 0], gram[1, 0], vec, go, coefficients,
                vicreg, finalize or vicreg,
            )  # fmt: skip
            assert all(torch.isfinite(g).all() for g in grads)
        grads = kernels.cross_backward(a, b, shift, scale, mat[0], mat[-1], vec, go, (0.3, 0.2), vicreg)
        assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("loss", ["barlow_twins", "vicreg"])
def test_no_d_by_d_buffer_when_n_below_d(device, loss, monkeypatch):
    n, d = 6, 40
    shapes = []

    def recording(shape, dtype, device):
        shapes.append(tuple(shape))
        return poisoned(shape, dtype, device)

    monkeypatch.setattr(kernels, "_new_buffer", recording)
    a, b = awkward_inputs(n, d, device=device)
    fn = {"barlow_twins": _bt, "vicreg": _vicreg}[loss]
    xa, xb = a.clone().requires_grad_(), b.clone().requires_grad_()
    fn("auto")(xa, xb).backward()
    assert max(torch.Size(s).numel() for s in shapes) <= n * d, shapes
    # the Grams are kept only when a gradient is needed
    shapes.clear()
    with torch.no_grad():
        fn("auto")(a, b)
    assert all(s != (2, n, n) for s in shapes)
    # and the cross path does form d×d (the recorder sees it)
    shapes.clear()
    fn("cross")(xa, xb).backward()
    assert any(torch.Size(s).numel() >= d * d for s in shapes)


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


# --------------------------------------------------------------------------------------------
# Without a GPU: every kernel variant compiles for sm_90 (H100) with the CUDA tile sizes
# --------------------------------------------------------------------------------------------

_COMPILE_SCRIPT = r"""
import itertools, os, subprocess, sys, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import fastssl.kernels.decorrelation as K

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
TL = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
INT_ARGS = ("stride", "n_rows", "n_cols", "rows_per_split")


def signature(fn, dtype, constexprs, half_outputs):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            view = name in ("a_ptr", "b_ptr") or (half_outputs and name.startswith("out_"))
            sig[name] = "*" + (TL[dtype] if view else "fp32")
        elif any(key in name for key in INT_ARGS):
            sig[name] = "i32"
        else:
            sig[name] = "fp32"
    return sig


def variants(dtype):
    half = dtype != torch.float32
    tile, step = K._CUDA_TILE, K._CUDA_STEP[dtype]
    stats = K._CUDA_STATS_TILE
    yield K._column_stats_kernel, dict(BLOCK_N=stats, BLOCK_D=stats), K._STATS_WARPS, False
    common = dict(DOT_PRECISION="ieee", EMULATE_BF16=False, a_stride_d=1, b_stride_d=1)
    square = dict(common, BLOCK=tile, BLOCK_K=step)
    oblong = dict(common, BLOCK_M=tile, BLOCK_N=tile, BLOCK_K=step)
    warps = K._MATMUL_WARPS
    for vicreg in (False, True):
        yield K._gram_forward_kernel, dict(square, VICREG=vicreg, STORE_GRAM=True, SPLIT=half), warps, False
        for backward in (False, True):
            split = half and not backward
            yield K._cross_tile_kernel, dict(square, VICREG=vicreg, BACKWARD=backward, SPLIT=split), warps, False
        finalizes = (True,) if vicreg else (False, True)
        for finalize, split in itertools.product(finalizes, (False, True) if half else (False,)):
            constexprs = dict(oblong, VICREG=vicreg, FINALIZE=finalize, SPLIT_GRAM=split)
            yield K._gram_backward_kernel, constexprs, warps, finalize
        yield K._cross_backward_kernel, dict(oblong, VICREG=vicreg), warps, True


failures = []
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for fn, constexprs, warps, half_outputs in variants(dtype):
        name = f"{fn.__name__} {dtype} " + " ".join(f"{k}={v}" for k, v in constexprs.items() if k.isupper())
        try:
            src = ASTSource(fn=fn, signature=signature(fn, dtype, constexprs, half_outputs), constexprs=constexprs)
            compiled = triton.compile(src, target=TARGET, options={"num_warps": warps})
        except Exception as error:  # noqa: BLE001 - reported below
            failures.append(f"{name}: {type(error).__name__}: {error}")
            continue
        if os.path.exists(CUOBJDUMP):
            with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
                f.write(compiled.asm["cubin"])
            usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
            stack = int(usage.split("STACK:")[1].split()[0])
            if stack > 64:
                failures.append(f"{name}: {stack} bytes of register spills")
print("\n".join(failures) if failures else "all kernels compiled")
sys.exit(1 if failures else 0)
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_spills(tmp_path):
    """Catches what the interpreter cannot: code the GPU compiler rejects, and tiles too large
    for the register file. Runs Triton's own compiler and ptxas; needs no GPU."""
    import os
    import subprocess
    import sys

    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no ahead-of-time compiler API")
    script = tmp_path / "compile_kernels.py"
    script.write_text(_COMPILE_SCRIPT)
    repo = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = os.pathsep.join([repo] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=repo, timeout=1200
    )
    if "ptxas" in result.stderr and "not found" in result.stderr:
        pytest.skip("no ptxas in this Triton installation")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
