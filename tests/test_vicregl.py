"""VICRegL: the torch path against the float64 reference (values and gradients of every global
and local feature, awkward shapes, half precision), against lightly 1.6's VICRegLLoss (random
and regular grids, with and without local views, several hyperparameters), lightly's
behaviour checks in our words, and the batched VICReg over positions on both of its sides.
The distributed check is in tests/test_jepa.py (one process group for every loss with the flag)."""

from __future__ import annotations

import pytest
import torch

import fastssl
from fastssl import reference, vicregl
import _lightly
from _helpers import assert_matches_reference, assert_numpy_hyperparameters_accepted

LIGHTLY = _lightly.load()
needs_lightly = pytest.mark.skipif(LIGHTLY is None, reason="lightly is not installed")

HYPER = dict(lambda_param=2.0, mu_param=3.0, nu_param=0.7, alpha=0.6, num_matches=(5, 3))


def _views(batch, dim, channels, n_global=2, n_local=2, grid=(4, 4), local_grid=(3, 3), dtype=torch.float32,
           regular_grids=False):  # fmt: skip
    """Flat list of tensors [g_0, l_0, ..., g_V, l_V] and the grids (global views first)."""
    tensors, grids = [], []
    for v in range(n_global + n_local):
        h, w = grid if v < n_global else local_grid
        tensors += [torch.randn(batch, dim).to(dtype), torch.randn(batch, h, w, channels).to(dtype)]
        if regular_grids:  # crops of one image: shifted, scaled regular meshes (many tied distances)
            ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
            mesh = torch.stack([xs, ys], dim=-1) * (1.0 + 0.5 * (v % 2)) + v
            grids.append(mesh.expand(batch, h, w, 2).clone())
        else:
            grids.append(torch.randn(batch, h, w, 2))
    return tensors, grids


def _call(fn, tensors, grids, n_global):
    pairs = [(tensors[2 * i], tensors[2 * i + 1]) for i in range(len(tensors) // 2)]
    local = pairs[n_global:] or None
    local_grids = grids[n_global:] or None
    return fn(pairs[:n_global], grids[:n_global], local, local_grids)


# --------------------------------------------------------------------------------------------
# Against the float64 reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "batch, dim, channels, n_global, n_local",
    [(2, 3, 5, 2, 0), (3, 9, 7, 2, 1), (5, 4, 33, 3, 2), (9, 17, 4, 1, 1)],
)
def test_torch_path_matches_reference(batch, dim, channels, n_global, n_local, dtype):
    tensors, grids = _views(batch, dim, channels, n_global, n_local, dtype=dtype)
    half = (torch.float16, torch.bfloat16)

    def ref(*t):
        # PyTorch has no half-precision cdist on CPU: half inputs are measured in float32, as the
        # torch path measures them (PyTorch's own error is then the gradients' rounding)
        return _call(lambda *a: reference.vicregl_loss(*a, **HYPER), [x.float() if x.dtype in half else x for x in t],
                     grids, n_global)  # fmt: skip

    assert_matches_reference(
        lambda *t: _call(lambda *a: vicregl.vicregl_loss(*a, **HYPER, backend="torch"), list(t), grids, n_global),
        ref,
        tensors,
    )


@pytest.mark.parametrize("batch, channels", [(3, 40), (40, 3), (6, 6)])
def test_vicreg_over_positions_both_sides(batch, channels):
    """The batched VICReg over positions (Gram side when N < d, d×d side otherwise) against the
    per-position reference."""
    z_a, z_b = torch.randn(batch, 7, channels), torch.randn(batch, 7, channels)

    def ours(a, b):
        inv, reg = vicregl._vicreg_positions(a, b, 3.0, 0.35, 1e-4)
        return (2.0 * inv + reg).mean()

    assert_matches_reference(ours, lambda a, b: reference.vicreg_per_position(a, b, 2.0, 3.0, 0.35), [z_a, z_b])


# --------------------------------------------------------------------------------------------
# Against lightly 1.6
# --------------------------------------------------------------------------------------------


def _lightly_compare(kwargs, tensors, grids, n_global, backend="torch", rtol=2e-5):
    results = []
    for module in (LIGHTLY.VICRegLLoss(**kwargs), fastssl.VICRegLLoss(**kwargs, backend=backend)):
        leaves = [t.clone().requires_grad_(True) for t in tensors]
        loss = _call(module, leaves, grids, n_global)
        results.append((loss.detach().reshape(()), torch.autograd.grad(loss.sum(), leaves)))
    (loss_t, grads_t), (loss_o, grads_o) = results
    assert loss_o.shape == torch.Size([]) and loss_o.dtype == torch.float32
    torch.testing.assert_close(loss_o, loss_t.float(), rtol=rtol, atol=1e-6)
    for g_o, g_t in zip(grads_o, grads_t):
        err = (g_o - g_t).abs().max().item()
        assert err <= rtol * g_t.abs().max().item() + 1e-7, err


@needs_lightly
@pytest.mark.parametrize(
    "batch, dim, channels, n_global, n_local, regular, backend",
    [(2, 32, 8, 2, 6, False, "torch"), (5, 16, 40, 2, 2, False, "torch"), (4, 8, 8, 3, 0, True, "torch"),
     (6, 24, 12, 2, 3, True, "torch"), (3, 16, 20, 2, 2, True, "reference")],
)  # fmt: skip
def test_matches_lightly(batch, dim, channels, n_global, n_local, regular, backend):
    tensors, grids = _views(batch, dim, channels, n_global, n_local, grid=(7, 7), local_grid=(4, 4),
                            regular_grids=regular)  # fmt: skip
    _lightly_compare({}, tensors, grids, n_global, backend)


@needs_lightly
@pytest.mark.parametrize("kwargs", [HYPER, dict(num_matches=(100, -1)), dict(alpha=1.0), dict(alpha=0.0, eps=1e-2)])
def test_matches_lightly_hyperparameters(kwargs):
    tensors, grids = _views(4, 12, 10, 2, 2, grid=(5, 5), local_grid=(3, 3))
    _lightly_compare(kwargs, tensors, grids, 2)


@needs_lightly
def test_global_term_is_the_authors_formula():
    """lightly checks its global loss against the VICRegL authors' code: with alpha = 1 the loss is
    that term alone, and equals the reference's (itself checked against lightly above)."""
    tensors, grids = _views(2, 32, 8, 2, 6, grid=(7, 7), local_grid=(4, 4))
    ours = _call(fastssl.VICRegLLoss(alpha=1.0), tensors, grids, 2)
    theirs = _call(LIGHTLY.VICRegLLoss(alpha=1.0), tensors, grids, 2)
    torch.testing.assert_close(ours, theirs.reshape(()), rtol=1e-6, atol=1e-6)
    assert ours > 0


def test_lightly_behaviour_checks():
    criterion = fastssl.VICRegLLoss()
    features = [(torch.randn(2, 32), torch.randn(2, 7, 7, 8)) for _ in range(2)]
    with pytest.raises(ValueError, match="global_view_features and global_view_grids must have same length but found 2 and 1."):
        criterion(global_view_features=features, global_view_grids=[torch.randn(2, 7, 7, 2)])
    local = [(torch.randn(2, 32), torch.randn(2, 4, 4, 8)) for _ in range(2)]
    with pytest.raises(ValueError, match="local_view_features and local_view_grids must have same length but found 2 and 1."):
        criterion(global_view_features=[], global_view_grids=[], local_view_features=local,
                  local_view_grids=[torch.randn(2, 4, 4, 2)])  # fmt: skip
    with pytest.raises(ValueError, match="must either both be set or None but found <class 'list'> and <class 'NoneType'>."):
        criterion(global_view_features=[], global_view_grids=[], local_view_features=local, local_view_grids=None)
    with pytest.raises(ValueError, match="must either both be set or None but found <class 'NoneType'> and <class 'list'>."):
        criterion(global_view_features=[], global_view_grids=[], local_view_features=None,
                  local_view_grids=[torch.randn(2, 4, 4, 2)] * 2)  # fmt: skip
    with pytest.raises(ValueError, match="at least one global view and one other view"):
        criterion(features[:1], [torch.randn(2, 7, 7, 2)])
    with pytest.raises(AssertionError):  # a batch of one, as lightly's VICReg asserts
        criterion([(torch.randn(1, 4), torch.randn(1, 2, 2, 3))] * 2, [torch.randn(1, 2, 2, 2)] * 2)
    tensors, grids = _views(2, 32, 8, 2, 6, grid=(7, 7), local_grid=(4, 4))
    assert _call(criterion, tensors, grids, 2) > 0


def test_gather_distributed_needs_torch_distributed(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    with pytest.raises(ValueError, match="gather_distributed"):
        fastssl.VICRegLLoss(gather_distributed=True)


# NumPy scalar hyperparameters (a config loaded with NumPy, a swept grid) are accepted as lightly
# accepts them; bool is rejected, a flag passed where a number belongs being a bug.
@pytest.mark.parametrize("name", ["VICRegLLoss"])
def test_numpy_scalar_hyperparameters_accepted_bool_rejected(name):
    assert_numpy_hyperparameters_accepted(getattr(fastssl, name))
