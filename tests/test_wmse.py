"""W-MSE: the batched PyTorch path against the reference loop (values and gradients), drop-in
equivalence with lightly's WMSELoss (running statistics, eval mode, state, errors), singular
covariances, the CUDA kernels' backward formula and dispatch (the kernels themselves, run on
the CPU through host_emulation.h, are tested in test_wmse_cuda.py), the loader's fallback, and
torch.compile."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F

import fastssl
import fastssl.functional as FS
from fastssl import reference, wmse
from fastssl.kernels import wmse_cuda
from _helpers import HALF, assert_matches_reference, cuda_wmse_extension

CSRC = wmse_cuda.CSRC


def _views(bs: int, d: int, num_samples: int, dtype=torch.float32, device="cpu", non_contiguous=False) -> torch.Tensor:
    """(bs * num_samples, d) fresh random views stacked; optionally a strided column slice."""
    if non_contiguous:
        x = torch.randn(bs * num_samples, 2 * d).to(dtype=dtype, device=device)[:, ::2]
        assert d == 1 or not x.is_contiguous()
        return x
    return torch.randn(bs * num_samples, d).to(dtype=dtype, device=device)


def _perms(bs: int, w_iter: int):
    return [torch.randperm(bs) for _ in range(w_iter)]


def _max_rel_err(ours: torch.Tensor, exact: torch.Tensor) -> float:
    return ((ours.double() - exact.double()).abs().max() / exact.double().abs().max().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------------------------
# Batched PyTorch path against the reference loop
# --------------------------------------------------------------------------------------------

# (d, w_size, num_samples, w_iter, eps, sub-batches per view)
CONFIGS = [
    (1, 2, 2, 1, 0.0, 3),
    (1, 32, 3, 2, 0.1, 1),
    (3, 4, 2, 2, 0.0, 2),
    (3, 6, 3, 1, 0.1, 2),
    (3, 32, 2, 1, 0.0, 1),
    (16, 17, 2, 1, 0.1, 2),
    (16, 32, 3, 2, 0.0, 1),
    (16, 32, 2, 2, 0.1, 2),
]


def _config_id(c):
    return "d{}-w{}-v{}-it{}-eps{}-chunks{}".format(*c)


def _value_and_grad(fn: Callable, x: torch.Tensor):
    leaf = x.detach().clone().requires_grad_(True)
    value = fn(leaf)
    (grad,) = torch.autograd.grad(value, leaf)
    return value.detach(), grad


def assert_matches_reference_conditioned(impl: Callable, ref: Callable, x: torch.Tensor) -> None:
    """``assert_matches_reference`` for W-MSE in float32. A sub-batch of w rows close to d has an
    ill-conditioned covariance, and whitening multiplies float32 rounding by its condition
    number, so a fixed tolerance is either loose or wrong: in float32 the error against the
    float64 reference may be twice the reference's own float32 error (the rule DESIGN §3 sets
    for half precision), plus a float32 floor of 2e-5 relative. Other dtypes: the usual rule."""
    if x.dtype != torch.float32:
        assert_matches_reference(impl, ref, [x], rtol=1e-10 if x.dtype == torch.float64 else 2e-5)
        return
    value, grad = _value_and_grad(impl, x)
    assert value.dtype == torch.float32 and value.shape == () and grad.dtype == x.dtype
    exact_value, exact_grad = _value_and_grad(ref, x.double())
    torch_value, torch_grad = _value_and_grad(ref, x)
    for name, ours, theirs, exact in (("loss", value, torch_value, exact_value), ("grad", grad, torch_grad, exact_grad)):
        scale = exact.double().abs().max().item()
        err_ours = (ours.double() - exact.double()).abs().max().item()
        err_torch = (theirs.double() - exact.double()).abs().max().item()
        allowed = 2 * err_torch + 2e-5 * scale + 1e-6
        assert err_ours <= allowed, f"{name}: error {err_ours:.3e} > {allowed:.3e} (PyTorch's own {err_torch:.3e})"


@pytest.mark.parametrize("whitening", ["cholesky", "zca"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_batched_path_matches_reference(config, dtype, whitening):
    d, w_size, num_samples, w_iter, eps, chunks = config
    bs = w_size * chunks
    x = _views(bs, d, num_samples, dtype, non_contiguous=(chunks == 2))
    perms = _perms(bs, w_iter)
    impl = lambda t: FS.wmse_loss(t, num_samples, w_size, w_iter, eps, whitening=whitening, permutations=perms, backend="torch")
    ref = lambda t: reference.wmse_loss(t, num_samples, w_size, w_iter, eps, whitening, perms)
    assert_matches_reference_conditioned(impl, ref, x)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("whitening", ["cholesky", "zca"])
def test_half_inputs_are_whitened_in_float32(dtype, whitening):
    """The reference cannot factor in half precision (no half Cholesky/eigh), so the 2x rule of
    DESIGN §3 has no PyTorch error to compare with: half inputs are whitened in float32, the loss
    matches the float64 reference on the same (half-rounded) values to float32 precision and the
    gradient up to its rounding to the input dtype."""
    bs, d, w_size = 32, 3, 16
    x = _views(bs, d, 2, dtype, non_contiguous=True)
    perms = _perms(bs, 2)
    leaf = x.detach().clone().requires_grad_(True)
    loss = FS.wmse_loss(leaf, 2, w_size, 2, whitening=whitening, permutations=perms, backend="torch")
    (grad,) = torch.autograd.grad(loss, leaf)
    exact_leaf = x.detach().double().requires_grad_(True)
    exact = reference.wmse_loss(exact_leaf, 2, w_size, 2, 0.0, whitening, perms)
    (exact_grad,) = torch.autograd.grad(exact, exact_leaf)
    assert loss.dtype == torch.float32 and loss.shape == () and grad.dtype == dtype
    assert abs(loss.item() - exact.item()) <= 2e-5 * abs(exact.item()) + 1e-6
    allowed = torch.finfo(dtype).eps * exact_grad.abs().max().item() + 2e-5 * exact_grad.abs().max().item()
    assert (grad.double() - exact_grad).abs().max().item() <= allowed


def test_default_permutations_are_lightlys_randperm_calls():
    """Without explicit permutations both draw torch.randperm(bs) once per iteration, in order."""
    x = _views(16, 3, 2)
    torch.manual_seed(5)
    ours = FS.wmse_loss(x, 2, 8, 3, backend="torch")
    after_ours = torch.rand(())
    torch.manual_seed(5)
    theirs = reference.wmse_loss(x, 2, 8, 3)
    after_theirs = torch.rand(())
    assert abs(ours.item() - theirs.item()) <= 1e-5 * abs(theirs.item())
    assert after_ours == after_theirs  # the same number of draws from the generator


def test_custom_loss_fn_sees_rows_in_input_order():
    """A loss_fn that depends on the row order (neighbouring rows) gets the whitened rows back
    where lightly has them."""
    x = _views(16, 3, 3)

    def neighbour_loss(a, b):
        return (a[1:] * b[:-1]).sum(dim=1).mean()

    theirs = fastssl.WMSELoss(embedding_dim=3, w_size=8, w_iter=2, num_samples=3, loss_fn=neighbour_loss, backend="reference")
    ours = fastssl.WMSELoss(embedding_dim=3, w_size=8, w_iter=2, num_samples=3, loss_fn=neighbour_loss, backend="torch")
    torch.manual_seed(2)
    expected = theirs(x)
    torch.manual_seed(2)
    value = ours(x)
    assert abs(value.item() - expected.item()) <= 2e-5 * abs(expected.item()) + 1e-6


def test_permutation_validation():
    x = _views(8, 3, 2)
    with pytest.raises(ValueError, match="w_iter=2 permutations"):
        FS.wmse_loss(x, 2, 4, 2, permutations=[torch.randperm(8)], backend="torch")
    with pytest.raises(ValueError, match="permutation of range"):
        FS.wmse_loss(x, 2, 4, 1, permutations=[torch.zeros(8, dtype=torch.long)], backend="torch")
    with pytest.raises(ValueError, match=r"shape \(8,\)"):
        FS.wmse_loss(x, 2, 4, 1, permutations=[torch.randperm(7)], backend="torch")


# --------------------------------------------------------------------------------------------
# Errors: batch sizes and singular covariances
# --------------------------------------------------------------------------------------------


def test_batch_size_errors_are_lightlys_types():
    loss = fastssl.WMSELoss(embedding_dim=3, w_size=8)
    with pytest.raises(RuntimeError, match="num_samples"):  # lightly: RuntimeError
        loss(torch.randn(33, 3))
    with pytest.raises(ValueError, match="num_samples"):  # fastssl: ValueError, the same error
        loss(torch.randn(33, 3))
    with pytest.raises(ValueError, match="w_size"):
        loss(torch.randn(2 * 4, 3))
    with pytest.raises(RuntimeError, match="multiple of w_size"):  # lightly: view() fails
        loss(torch.randn(2 * 12, 3))
    with pytest.raises(ValueError, match="multiple of w_size"):
        FS.wmse_loss(torch.randn(2 * 12, 3), 2, 8)


def test_constructor_errors():
    with pytest.raises(ValueError, match="w_size"):
        fastssl.WMSELoss(embedding_dim=128, w_size=200)
    with pytest.raises(ValueError, match="eps"):
        fastssl.WMSELoss(embedding_dim=3, w_size=8, eps=1.5)
    with pytest.raises(ValueError, match="momentum"):
        fastssl.WMSELoss(embedding_dim=3, w_size=8, momentum=-0.1)
    with pytest.raises(TypeError, match="loss_fn"):
        fastssl.WMSELoss(embedding_dim=3, w_size=8, loss_fn="mse")
    with pytest.raises(ValueError, match="whitening"):
        fastssl.WMSELoss(embedding_dim=3, w_size=8, whitening="pca")


def test_sub_batch_not_larger_than_d_is_rejected_up_front():
    with pytest.raises(ValueError, match=r"w_size=8 <= d=8.*eps > 0"):
        FS.wmse_loss(torch.randn(2 * 8, 8), 2, 8, backend="torch")
    assert torch.isfinite(FS.wmse_loss(torch.randn(2 * 8, 8), 2, 8, eps=0.2, backend="torch"))


def _collapsed_views(whitening_rows: int = 8) -> torch.Tensor:
    """Two views of 16 images, d = 3; in view 0 the first sub-batch (rows 0..7 under the identity
    permutation) is one integer-valued row repeated, so its centered rows are exactly 0 and its
    covariance exactly singular."""
    x = torch.randn(2 * 16, 3)
    x[:whitening_rows] = torch.randint(-3, 4, (1, 3)).float()
    return x


@pytest.mark.parametrize("whitening", ["cholesky", "zca"])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_singular_covariance_is_a_clear_error(whitening, backend):
    x = _collapsed_views()
    identity = [torch.arange(16)]
    with pytest.raises(ValueError, match=r"singular.*eps > 0"):
        FS.wmse_loss(x, 2, 8, whitening=whitening, permutations=identity, backend=backend)
    # shrinkage makes the same sub-batch whitenable
    shrunk = FS.wmse_loss(x, 2, 8, eps=0.1, whitening=whitening, permutations=identity, backend=backend)
    assert torch.isfinite(shrunk)


def test_singular_covariance_in_the_module_train_and_eval():
    x = torch.randn(2 * 8, 3)
    x[:8] = 2.0  # every sub-batch of view 0 collapsed, whatever the permutation
    loss = fastssl.WMSELoss(embedding_dim=3, w_size=8, backend="torch")
    with pytest.raises(ValueError, match="singular"):
        loss(x)
    loss.eval()
    loss.whitening.running_variance.zero_()
    with pytest.raises(ValueError, match="running covariance.*singular"):
        loss(torch.randn(2 * 8, 3))
    with pytest.raises(ValueError, match="running covariance.*singular"):
        loss.whitening(torch.randn(5, 3))


@pytest.mark.parametrize("whitening", ["cholesky", "zca"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_gives_nan_not_an_error(whitening, bad):
    x = _views(16, 3, 2)
    x[3, 1] = bad
    value = FS.wmse_loss(x, 2, 8, whitening=whitening, backend="torch")
    assert torch.isnan(value)


# --------------------------------------------------------------------------------------------
# Module semantics without lightly: batched path against the block-by-block loop
# --------------------------------------------------------------------------------------------


def _step(module, x: torch.Tensor, seed: int):
    leaf = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    value = module(leaf)
    (grad,) = torch.autograd.grad(value, leaf)
    return value.detach(), grad


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor, what: str, rtol: float) -> None:
    assert ours.shape == theirs.shape, what
    err = (ours.double() - theirs.double()).abs().max().item()
    allowed = rtol * theirs.double().abs().max().item() + 1e-6
    assert err <= allowed, f"{what}: {err:.3e} > {allowed:.3e}"


@pytest.mark.parametrize("whitening", ["cholesky", "zca"])
def test_module_running_statistics_closed_form_matches_the_loop(whitening):
    kwargs = dict(embedding_dim=4, momentum=0.3, eps=0.05, w_iter=2, w_size=8, num_samples=3, whitening=whitening)
    loop = fastssl.WMSELoss(**kwargs, backend="reference")
    batched = fastssl.WMSELoss(**kwargs, backend="torch")
    for step in range(3):
        x = _views(16, 4, 3)
        for what, a, b in zip(("loss", "grad"), _step(batched, x, step), _step(loop, x, step)):
            _assert_close(a, b, f"step {step} {what}", 1e-4)
        for name, buffer in loop.whitening.named_buffers():
            _assert_close(dict(batched.whitening.named_buffers())[name], buffer, f"step {step} {name}", 2e-5)
    loop.eval()
    batched.eval()
    x = _views(16, 4, 3)
    for what, a, b in zip(("eval loss", "eval grad"), _step(batched, x, 9), _step(loop, x, 9)):
        _assert_close(a, b, what, 1e-4)


def test_eval_mode_ignores_the_sub_batches_but_draws_the_permutations():
    loss = fastssl.WMSELoss(embedding_dim=3, w_size=8, w_iter=3, backend="torch")
    loss.eval()
    x = _views(16, 3, 2)
    torch.manual_seed(0)
    first = loss(x)
    after = torch.rand(())
    torch.manual_seed(0)
    for _ in range(3):
        torch.randperm(16)
    assert torch.rand(()) == after
    # the running statistics are the identity: the eval whitening is x - 0 times I
    expected = reference.normalized_mse(x[:16], x[16:])
    assert abs(first.item() - expected.item()) <= 1e-5 * abs(expected.item())


def test_no_running_statistics_when_not_tracked():
    loss = fastssl.WMSELoss(embedding_dim=3, w_size=8, track_running_stats=False, backend="torch")
    assert dict(loss.named_buffers()) == {}
    x = _views(16, 3, 2)
    loss.eval()  # batch statistics in both modes
    torch.manual_seed(1)
    value = loss(x)
    torch.manual_seed(1)
    assert abs(value.item() - reference.wmse_loss(x, 2, 8).item()) <= 1e-5 * abs(value.item())


def test_whitening2d_forward_whitens_and_updates():
    white = wmse.Whitening2d(3, momentum=0.5)
    x = torch.randn(10, 3)
    z = white(x)
    torch.testing.assert_close(z, reference.whiten_cholesky(x.double()).float(), rtol=1e-5, atol=1e-5)
    xc = x - x.mean(0)
    torch.testing.assert_close(white.running_variance, 0.5 * torch.eye(3) + 0.5 * (xc.T @ xc / 9))
    torch.testing.assert_close(white.running_mean.reshape(-1), 0.5 * x.mean(0))


# --------------------------------------------------------------------------------------------
# Drop-in equivalence with lightly (the source file, loaded without lightly.loss)
# --------------------------------------------------------------------------------------------


def _load_lightly_wmse() -> Optional[ModuleType]:
    spec = importlib.util.find_spec("lightly")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "loss" / "wmse_loss.py"
    if not path.exists():
        return None
    module_spec = importlib.util.spec_from_file_location("_lightly_wmse_loss", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception:
        return None
    return module


LIGHTLY = _load_lightly_wmse()
needs_lightly = pytest.mark.skipif(LIGHTLY is None, reason="lightly's wmse_loss.py is not installed")


def _neighbour_loss(a, b):
    return F.mse_loss(a[1:], b[:-1])


# (embedding_dim, w_size, num_samples, w_iter, eps, momentum, track_running_stats, loss_fn, bs, dtype)
LIGHTLY_CONFIGS = [
    (3, 8, 2, 1, 0.0, 0.1, True, None, 16, torch.float32),
    (4, 8, 3, 2, 0.05, 0.3, True, _neighbour_loss, 16, torch.float32),
    (1, 4, 2, 2, 0.0, 0.01, False, None, 8, torch.float32),
    (16, 32, 2, 1, 0.1, 0.01, True, None, 64, torch.float32),
    (3, 8, 2, 2, 0.0, 0.2, True, None, 16, torch.float64),
]


@needs_lightly
@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("config", LIGHTLY_CONFIGS, ids=lambda c: "d{}-w{}-v{}-it{}-eps{}-m{}-track{}-{}-bs{}-{}".format(
    *c[:7], "custom" if c[7] else "normmse", c[8], str(c[9])[6:]))
def test_matches_lightly_train_eval_and_state(config, backend):
    d, w_size, num_samples, w_iter, eps, momentum, track, loss_fn, bs, dtype = config
    kwargs = dict(embedding_dim=d, momentum=momentum, eps=eps, track_running_stats=track, w_iter=w_iter, w_size=w_size,
                  num_samples=num_samples)
    if loss_fn is not None:
        kwargs["loss_fn"] = loss_fn
    theirs = LIGHTLY.WMSELoss(**kwargs).to(dtype)
    ours = fastssl.WMSELoss(**kwargs, backend=backend).to(dtype)
    for step in range(3):  # training steps: loss, input gradient, running statistics
        x = _views(bs, d, num_samples, dtype, non_contiguous=(step == 1))
        (l_ours, g_ours), (l_theirs, g_theirs) = _step(ours, x, 10 + step), _step(theirs, x, 10 + step)
        assert l_ours.dtype == torch.float32 and l_ours.shape == ()
        _assert_close(l_ours, l_theirs.float(), f"step {step} loss", 1e-4)
        _assert_close(g_ours, g_theirs, f"step {step} grad", 1e-4)
        for name, buffer in theirs.state_dict().items():
            _assert_close(ours.state_dict()[name], buffer, f"step {step} {name}", 2e-5)
    ours.eval()
    theirs.eval()
    x = _views(bs, d, num_samples, dtype)
    (l_ours, g_ours), (l_theirs, g_theirs) = _step(ours, x, 20), _step(theirs, x, 20)
    _assert_close(l_ours, l_theirs.float(), "eval loss", 1e-4)
    _assert_close(g_ours, g_theirs, "eval grad", 1e-4)
    for name, buffer in theirs.state_dict().items():  # eval mode leaves the statistics alone
        _assert_close(ours.state_dict()[name], buffer, f"eval {name}", 2e-5)


@needs_lightly
def test_state_dict_loads_both_ways():
    theirs = LIGHTLY.WMSELoss(embedding_dim=3, w_size=8, momentum=0.5)
    ours = fastssl.WMSELoss(embedding_dim=3, w_size=8, momentum=0.5)
    _step(theirs, _views(16, 3, 2), 0)  # non-trivial statistics
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.eval()
    theirs.eval()
    x = _views(16, 3, 2)
    _assert_close(_step(ours, x, 1)[0], _step(theirs, x, 1)[0], "eval loss after loading lightly's state", 1e-5)
    fresh = LIGHTLY.WMSELoss(embedding_dim=3, w_size=8)
    fresh.load_state_dict(ours.state_dict(), strict=True)
    torch.testing.assert_close(fresh.whitening.running_variance, theirs.whitening.running_variance)


@needs_lightly
def test_constructor_matches_lightly_positionally():
    import inspect

    theirs = list(inspect.signature(LIGHTLY.WMSELoss.__init__).parameters.values())[1:]
    ours = list(inspect.signature(fastssl.WMSELoss.__init__).parameters.values())[1:]
    assert [p.name for p in ours[: len(theirs)]] == [p.name for p in theirs]
    for a, b in zip(ours, theirs):
        if b.name == "loss_fn":  # lightly's own function object; ours is the same formula
            assert a.default.__name__ == b.default.__name__ == "norm_mse_loss"
            u, v = torch.randn(5, 4), torch.randn(5, 4)
            torch.testing.assert_close(a.default(u, v), b.default(u, v))
        else:
            assert a.default == b.default, b.name
    assert [p.name for p in ours[len(theirs):]] == ["whitening", "backend"]
    for name in ("w_iter", "w_size", "num_samples", "num_pairs"):
        assert getattr(fastssl.WMSELoss(4, 0.1, 0.0, True, 2, 8, F.mse_loss, 3), name) == getattr(
            LIGHTLY.WMSELoss(4, 0.1, 0.0, True, 2, 8, F.mse_loss, 3), name)


@needs_lightly
@pytest.mark.parametrize("train", [True, False])
def test_whitening2d_matches_lightly(train):
    theirs = LIGHTLY.Whitening2d(4, momentum=0.2, eps=0.1)
    ours = wmse.Whitening2d(4, momentum=0.2, eps=0.1)
    for module in (theirs, ours):
        module.train(True)
    for _ in range(2):
        x = torch.randn(12, 4)
        _assert_close(ours(x), theirs(x), "whitened", 1e-5)
    theirs.train(train)
    ours.train(train)
    x = torch.randn(12, 4)
    _assert_close(ours(x), theirs(x), "whitened", 1e-5)
    for name, buffer in theirs.state_dict().items():
        _assert_close(ours.state_dict()[name], buffer, name, 1e-5)


# --------------------------------------------------------------------------------------------
# The CUDA kernel's backward (batched PyTorch from the saved factor)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("blocks, w, d, eps", [(3, 8, 3, 0.0), (2, 5, 1, 0.0), (2, 20, 7, 0.3), (1, 40, 16, 0.0)])
def test_hand_written_whitening_backward_matches_autograd(blocks, w, d, eps):
    x = torch.randn(blocks, w, d, dtype=torch.float64)
    grad_z = torch.randn(blocks, w, d, dtype=torch.float64)
    leaf = x.clone().requires_grad_(True)
    z = torch.stack([reference.whiten_cholesky(leaf[i], eps) for i in range(blocks)])
    (expected,) = torch.autograd.grad(z, leaf, grad_z)
    xc = x - x.mean(dim=1, keepdim=True)
    factor = torch.linalg.cholesky(wmse._shrink(xc.mT @ xc / (w - 1), eps))
    w_inv = torch.linalg.solve_triangular(factor, torch.eye(d, dtype=x.dtype).expand(blocks, d, d), upper=False)
    got = wmse_cuda.whitening_backward(grad_z, z.detach(), w_inv, eps)
    assert _max_rel_err(got, expected) < 1e-12


# --------------------------------------------------------------------------------------------
# The CUDA kernels on the CPU (host emulation), their values and gradients: test_wmse_cuda.py
# --------------------------------------------------------------------------------------------


def test_kernel_eligibility(mocker):
    mocker.patch.object(wmse, "_on_cuda", return_value=True)
    mocker.patch.object(wmse_cuda, "load_extension", return_value=object())
    assert wmse._use_cuda_kernel(torch.randn(4, 256), "cholesky")
    assert wmse._use_cuda_kernel(torch.randn(4, 3, dtype=torch.bfloat16), "cholesky")
    assert not wmse._use_cuda_kernel(torch.randn(4, 257), "cholesky")
    assert not wmse._use_cuda_kernel(torch.randn(4, 3), "zca")
    assert not wmse._use_cuda_kernel(torch.randn(4, 3, dtype=torch.float64), "cholesky")
    mocker.patch.object(wmse, "_on_cuda", return_value=False)
    assert not wmse._use_cuda_kernel(torch.randn(4, 3), "cholesky")


# --------------------------------------------------------------------------------------------
# Loader: one warning, then the PyTorch path
# --------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_loader():
    wmse_cuda._reset()
    yield
    wmse_cuda._reset()


def test_build_failure_warns_once_and_falls_back(fresh_loader, mocker):
    build = mocker.patch.object(wmse_cuda, "_build_extension", side_effect=RuntimeError("nvcc fatal: unsupported gpu"))
    mocker.patch.object(wmse, "_on_cuda", return_value=True)  # as if the tensors were on a GPU
    fallback = mocker.spy(wmse, "_whiten_blocks_torch")
    x = _views(16, 3, 2)
    perms = _perms(16, 1)
    with pytest.warns(RuntimeWarning, match="could not be built.*nvcc fatal: unsupported gpu.*PyTorch path"):
        first = FS.wmse_loss(x, 2, 8, permutations=perms)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would fail here
        second = FS.wmse_loss(x, 2, 8, permutations=perms)
    assert build.call_count == 1
    assert fallback.call_count == 2
    assert wmse_cuda.load_extension() is None and "unsupported gpu" in wmse_cuda.build_failure()
    expected = reference.wmse_loss(x.double(), 2, 8, 1, 0.0, "cholesky", perms)
    for value in (first, second):
        assert abs(value.item() - expected.item()) <= 1e-5 * abs(expected.item())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the loader on a machine without CUDA")
def test_loader_without_cuda_returns_none_with_one_warning(fresh_loader):
    with pytest.warns(RuntimeWarning, match="CUDA is not available"):
        assert wmse_cuda.load_extension() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert wmse_cuda.load_extension() is None


# --------------------------------------------------------------------------------------------
# torch.compile of the PyTorch path
# --------------------------------------------------------------------------------------------


def _check_compiled(compile_backend: str) -> None:
    torch._dynamo.reset()
    fn = lambda t: FS.wmse_loss(t, 2, 8, 2, 0.0, backend="torch")
    compiled = torch.compile(fn, fullgraph=True, backend=compile_backend)
    x = _views(16, 3, 2)
    leaf = x.clone().requires_grad_(True)
    torch.manual_seed(3)
    value = compiled(leaf)
    value.backward()
    expected_leaf = x.clone().requires_grad_(True)
    torch.manual_seed(3)  # the same torch.randperm draws inside the graph
    expected = fn(expected_leaf)
    expected.backward()
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(leaf.grad, expected_leaf.grad, rtol=1e-5, atol=1e-6)
    # the singular-covariance check is an op of the graph: the same ValueError
    collapsed = _views(16, 3, 2)
    collapsed[:16] = 1.0
    with pytest.raises(ValueError, match="singular"):
        compiled(collapsed)


def test_torch_compile_fullgraph_captures_the_torch_path():
    # fullgraph=True raises on any graph break; "aot_eager" also traces the backward.
    _check_compiled("aot_eager")


def test_torch_compile_fullgraph_module_updates_running_statistics():
    torch._dynamo.reset()
    eager = fastssl.WMSELoss(embedding_dim=3, w_size=8, momentum=0.2, backend="torch")
    module = fastssl.WMSELoss(embedding_dim=3, w_size=8, momentum=0.2, backend="torch")
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    for step in range(2):
        x = _views(16, 3, 2)
        _assert_close(_step(compiled, x, step)[0], _step(eager, x, step)[0], "loss", 1e-5)
    torch.testing.assert_close(module.whitening.running_variance, eager.whitening.running_variance)


@pytest.mark.slow
def test_torch_compile_fullgraph_inductor():
    _check_compiled("inductor")


# --------------------------------------------------------------------------------------------
# GPU lane: the compiled CUDA extension
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d, w_size", [(3, 8), (128, 256), (256, 512)])
def test_cuda_loss_matches_reference(d, w_size, dtype):
    cuda_wmse_extension()
    bs = 2 * w_size
    x = _views(bs, d, 2, dtype, device="cuda", non_contiguous=True)
    perms = _perms(bs, 2)
    impl = lambda t: FS.wmse_loss(t, 2, w_size, 2, permutations=perms)
    ref = lambda t: reference.wmse_loss(t, 2, w_size, 2, 0.0, "cholesky", perms)
    if dtype == torch.float32:
        assert_matches_reference_conditioned(impl, ref, x)
        return
    leaf = x.detach().clone().requires_grad_(True)
    value = impl(leaf)
    (grad,) = torch.autograd.grad(value, leaf)
    exact_leaf = x.detach().double().requires_grad_(True)
    exact = ref(exact_leaf)
    (exact_grad,) = torch.autograd.grad(exact, exact_leaf)
    assert value.dtype == torch.float32 and grad.dtype == dtype
    assert abs(value.item() - exact.item()) <= 2e-4 * abs(exact.item()) + 1e-6
    scale = exact_grad.abs().max().item()
    assert (grad.double() - exact_grad).abs().max().item() <= (torch.finfo(dtype).eps + 2e-4) * scale


@pytest.mark.gpu
@needs_lightly
def test_cuda_module_matches_lightly():
    cuda_wmse_extension()
    kwargs = dict(embedding_dim=128, momentum=0.1, w_size=256, w_iter=2)
    theirs = LIGHTLY.WMSELoss(**kwargs).cuda()
    ours = fastssl.WMSELoss(**kwargs).cuda()
    for step in range(2):
        x = _views(512, 128, 2, device="cuda")
        (l_ours, g_ours), (l_theirs, g_theirs) = _step(ours, x, step), _step(theirs, x, step)
        _assert_close(l_ours, l_theirs, "loss", 1e-4)
        _assert_close(g_ours, g_theirs, "grad", 1e-4)
        for name, buffer in theirs.state_dict().items():
            _assert_close(ours.state_dict()[name], buffer, name, 2e-5)


@pytest.mark.gpu
def test_cuda_singular_covariance_is_a_clear_error():
    cuda_wmse_extension()
    x = _collapsed_views().cuda()
    with pytest.raises(ValueError, match="singular"):
        FS.wmse_loss(x, 2, 8, permutations=[torch.arange(16)])
    bad = _views(16, 3, 2, device="cuda")
    bad[2, 1] = float("nan")
    assert torch.isnan(FS.wmse_loss(bad, 2, 8))


# --------------------------------------------------------------------------------------------
# No host synchronization on CUDA: device-drawn permutations, NaN instead of a raised error
# --------------------------------------------------------------------------------------------


def test_no_host_synchronization_where_it_would_cost_one(mocker):
    """With the checks that would synchronize a CUDA stream switched off (as for CUDA tensors),
    no op reads a device value on the host: the permutations are drawn on the device and a
    singular sub-batch covariance gives a NaN loss and NaN whitened rows instead of an error."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostReads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.reads = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(name in str(func) for name in ("_local_scalar_dense", "nonzero", "equal", "lift_fresh", "randperm")):
                self.reads.append(str(func))
            return func(*args, **(kwargs or {}))

    mocker.patch.object(wmse, "_check_synchronizes", return_value=True)
    module = fastssl.WMSELoss(embedding_dim=3, w_size=8, backend="torch")
    with HostReads() as mode:
        healthy = module(_views(16, 3, 2).requires_grad_(True))
        torch.autograd.grad(healthy, list(module.parameters()) or [healthy], allow_unused=True)
        singular = FS.wmse_loss(_collapsed_views(), 2, 8, permutations=[torch.arange(16)])
        whitened = fastssl.Whitening2d(3)(_collapsed_views()[:8])
    assert mode.reads == []
    assert torch.isfinite(healthy) and torch.isnan(singular) and torch.isnan(whitened).all()
    # Device-drawn permutations are permutations.
    perms = wmse._draw_permutations(64, 3, None, torch.device("cpu"))
    assert perms.shape == (3, 64) and torch.equal(perms.sort(dim=1).values, torch.arange(64).expand(3, 64))


@pytest.mark.gpu
def test_wmse_training_step_captures_in_a_cuda_graph():
    from test_sinkhorn_triton import capture_training_step

    module = fastssl.WMSELoss(embedding_dim=32, w_size=64).cuda()
    # One sub-batch per view (w_size = batch): the loss does not depend on the permutation
    # drawn, so graph replays and eager steps can be compared.
    capture_training_step(lambda outputs: module(torch.cat(outputs, dim=0)), views=2, rows=64, dim=16, k=32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_backend_whitens_half_inputs_in_float32(dtype):
    """PyTorch has no half-precision Cholesky on CPU: the reference backend (module and function)
    computes in float32, like the batched path, and returns the gradient in the input dtype."""
    x = torch.randn(256, 8).to(dtype)
    results = []
    for backend in ["reference", "torch"]:
        for call in [
            lambda inp: fastssl.WMSELoss(embedding_dim=8, w_size=64, backend=backend)(inp),
            lambda inp: FS.wmse_loss(inp, 2, 64, backend=backend),
        ]:
            leaf = x.clone().requires_grad_(True)
            torch.manual_seed(3)
            loss = call(leaf)
            (grad,) = torch.autograd.grad(loss, leaf)
            assert loss.dtype == torch.float32 and torch.isfinite(loss)
            assert grad.dtype == dtype and torch.isfinite(grad.float()).all()
            results.append(loss.item())
    torch.manual_seed(3)
    expected = reference.wmse_loss(x.double(), 2, 64).item()
    assert results == pytest.approx([expected] * 4, rel=1e-4)
