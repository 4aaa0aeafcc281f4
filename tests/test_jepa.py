"""SIGReg, LeJEPA, LeWM and VISReg: the torch path against the float64 reference on the same
directions (values and input gradients, awkward shapes, half precision), against lightly 1.6's
classes seeded identically, lightly's behaviour checks in our words, the chunked characteristic
function (no (…, N, S, K) tensor), and ``gather_distributed`` on gloo with 2 and 3 processes
for every class of this issue's families that has the flag (TiCo and VICRegL included)."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

import fastssl
import fastssl.functional as FS
from fastssl import jepa, reference
import _lightly
from _helpers import assert_matches_reference, assert_numpy_hyperparameters_accepted

LIGHTLY = _lightly.load()
needs_lightly = pytest.mark.skipif(LIGHTLY is None, reason="lightly is not installed")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _unit(d, s, seed=5):
    a = torch.randn(d, s, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a / a.norm(dim=0)


# --------------------------------------------------------------------------------------------
# Against the float64 reference (fixed directions)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, slices", [((1, 3), 5), ((2, 7), 16), ((3, 17, 5), 33), ((2, 2, 40, 9), 8)])
def test_sigreg_matches_reference(shape, slices, dtype):
    proj = torch.randn(*shape).to(dtype)
    directions = _unit(shape[-1], slices)
    assert_matches_reference(
        lambda p: FS.sigreg_loss(p, 9, 2.5, directions=directions.float(), backend="torch"),
        lambda p: reference.sigreg_loss(p, directions.to(p.dtype), 9, 2.5),
        [proj],
    )


def test_sigreg_many_chunks_match_one(monkeypatch):
    proj = torch.randn(3, 50, 12)
    directions = _unit(12, 300).float()
    one = FS.sigreg_loss(proj, directions=directions, backend="torch")
    monkeypatch.setitem(jepa.CHUNK_ELEMENTS, "cpu", 3 * 50 * 17 * 7)  # 7 slices per chunk
    leaves = proj.clone().requires_grad_(True)
    many = FS.sigreg_loss(leaves, directions=directions, backend="torch")
    torch.testing.assert_close(many, one)
    assert_matches_reference(
        lambda p: FS.sigreg_loss(p, directions=directions, backend="torch"),
        lambda p: reference.sigreg_loss(p, directions.to(p.dtype)),
        [proj],
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_local, n_global, n, d", [(1, 1, 2, 3), (3, 2, 9, 16), (2, 1, 33, 5)])
def test_lejepa_matches_reference(n_local, n_global, n, d, dtype):
    local, glob = torch.randn(n_local, n, d).to(dtype), torch.randn(n_global, n, d).to(dtype)
    directions = _unit(d, 24)
    assert_matches_reference(
        lambda lo, gl: FS.lejepa_loss(lo, gl, 0.3, directions=directions.float(), backend="torch"),
        lambda lo, gl: reference.lejepa_loss(lo, gl, directions.to(lo.dtype), 0.3),
        [local, glob],
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("b, t, d", [(2, 2, 3), (9, 4, 16)])
def test_lewm_matches_reference(b, t, d, normalize, dtype):
    embeddings = torch.randn(b, t, d).to(dtype)
    predicted = torch.randn(b, t - 1, d).to(dtype)
    target = torch.randn(b, t - 1, d).to(dtype)  # detached by the loss: no gradient
    directions = _unit(d, 20)
    assert_matches_reference(
        lambda p, e: FS.lewm_loss(p, target, e, 0.4, normalize, directions=directions.float(), backend="torch"),
        lambda p, e: reference.lewm_loss(p, target.to(p.dtype), e, directions.to(p.dtype), 0.4, normalize),
        [predicted, embeddings],
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_local, n_global, n, d, s", [(1, 1, 2, 3, 4), (3, 2, 9, 16, 40), (2, 1, 33, 5, 7)])
def test_visreg_matches_reference(n_local, n_global, n, d, s, dtype):
    local, glob = torch.randn(n_local, n, d).to(dtype), torch.randn(n_global, n, d).to(dtype)
    slices = _unit(d, s)
    weights = dict(lambda_param=0.7, lambda_scale=0.5, lambda_shape=2.0, lambda_center=0.25)
    for part in range(5):
        assert_matches_reference(
            lambda lo, gl: FS.visreg_loss_components(lo, gl, slices=slices.float(), backend="torch", **weights)[part],
            lambda lo, gl: reference.visreg_components(lo, gl, slices.to(lo.dtype), **weights)[part],
            [local, glob],
        )


def test_reference_backend_dispatches_to_the_reference():
    proj, local, glob = torch.randn(2, 16, 6), torch.randn(2, 16, 6), torch.randn(1, 16, 6)
    directions = _unit(6, 10).float()
    pairs = [
        (lambda b: FS.sigreg_loss(proj, directions=directions, backend=b)),
        (lambda b: FS.lejepa_loss(local, glob, directions=directions, backend=b)),
        (lambda b: FS.lewm_loss(local[:, 1:], glob.expand(2, 16, 6)[:, 1:], local, directions=directions, backend=b)),
        (lambda b: FS.visreg_loss(local, glob, slices=directions, backend=b)),
    ]
    for fn in pairs:
        torch.testing.assert_close(fn("torch"), fn("reference"), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Against lightly 1.6, seeded identically
# --------------------------------------------------------------------------------------------


def _seeded_step(theirs, ours, call, inputs, seed, rtol=2e-5, atol=1e-6):
    results = []
    for module in (theirs, ours):
        leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
        torch.manual_seed(seed)
        loss = call(module, leaves)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
        results.append((loss.detach(), grads))
    (loss_t, grads_t), (loss_o, grads_o) = results
    assert loss_o.shape == torch.Size([]) and loss_o.dtype == torch.float32
    torch.testing.assert_close(loss_o, loss_t.float(), rtol=rtol, atol=atol)
    for g_o, g_t, x in zip(grads_o, grads_t, inputs):
        assert g_o.dtype == x.dtype
        err = (g_o - g_t).abs().max().item()
        assert err <= rtol * g_t.abs().max().item() + atol, err


@needs_lightly
@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("shape, kwargs", [((64, 16), {}), ((3, 40, 9), dict(knots=9, t_max=1.5, num_vectors=77))])
def test_sigreg_matches_lightly_over_several_calls(shape, kwargs, backend):
    theirs, ours = LIGHTLY.SIGReg(**kwargs), fastssl.SIGReg(**kwargs, backend=backend)
    for seed in range(3):
        _seeded_step(theirs, ours, lambda m, x: m(x[0]), [torch.randn(*shape)], seed)
    for name in ("t", "phi", "weights"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name))


@needs_lightly
@pytest.mark.parametrize("kwargs", [dict(sigreg_num_vectors=64), dict(lambda_param=0.5, sigreg_knots=5, sigreg_num_vectors=33)])
def test_lejepa_matches_lightly(kwargs):
    theirs, ours = LIGHTLY.LeJEPALoss(**kwargs), fastssl.LeJEPALoss(**kwargs)
    for seed in range(2):
        _seeded_step(theirs, ours, lambda m, x: m(local_proj=x[0], global_proj=x[1]),
                     [torch.randn(4, 32, 16), torch.randn(2, 32, 16)], seed)  # fmt: skip


@needs_lightly
@pytest.mark.parametrize("normalize", [False, True])
def test_lewm_matches_lightly(normalize):
    theirs = LIGHTLY.LeWMLoss(lambda_param=0.3, normalize=normalize, sigreg_num_vectors=32)
    ours = fastssl.LeWMLoss(lambda_param=0.3, normalize=normalize, sigreg_num_vectors=32)
    emb = torch.randn(8, 4, 16)
    _seeded_step(theirs, ours, lambda m, x: m(predicted=x[0], target=x[1], embeddings=x[2]),
                 [torch.randn(8, 3, 16), emb[:, 1:].clone(), emb], seed=1)  # fmt: skip


@needs_lightly
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_visreg_matches_lightly_with_components(backend):
    kwargs = dict(lambda_param=0.7, num_slices=48, lambda_scale=0.5, lambda_shape=2.0, lambda_center=0.25, eps=1e-3)
    theirs, ours = LIGHTLY.VISRegLoss(**kwargs), fastssl.VISRegLoss(**kwargs, backend=backend)
    inputs = [torch.randn(3, 32, 16), torch.randn(2, 32, 16)]
    _seeded_step(theirs, ours, lambda m, x: m(local_proj=x[0], global_proj=x[1]), inputs, seed=4)
    torch.manual_seed(9)
    parts_theirs = theirs.forward_components(local_proj=inputs[0], global_proj=inputs[1])
    torch.manual_seed(9)
    parts_ours = ours.forward_components(local_proj=inputs[0], global_proj=inputs[1])
    assert isinstance(parts_ours, fastssl.VISRegLossComponents) and parts_ours._fields == parts_theirs._fields
    for a, b in zip(parts_ours, parts_theirs):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)


@needs_lightly
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_within_lightly_error(dtype):
    """lightly computes SIGReg and VISReg in the input dtype; fastssl in float32 (gradients in
    the input dtype): within 2x lightly's own half-precision error against lightly in float64."""
    proj = torch.randn(2, 48, 12).to(dtype)

    def ours(p):
        directions = torch.randn(12, 40, generator=torch.Generator().manual_seed(3))
        return FS.sigreg_loss(p, directions=directions / directions.norm(dim=0), backend="torch")

    def theirs(p):
        directions = torch.randn(12, 40, generator=torch.Generator().manual_seed(3))
        module = LIGHTLY.SIGReg(num_vectors=40)
        unit = directions / directions.norm(dim=0)
        module._generate_unit_vectors = lambda device, d, f: unit.to(device, d)
        return module(p)

    assert_matches_reference(ours, theirs, [proj])


def test_lightly_behaviour_checks():
    for kwargs in (dict(knots=1), dict(t_max=0.0), dict(num_vectors=0)):
        with pytest.raises(ValueError):
            fastssl.SIGReg(**kwargs)
    with pytest.raises(TypeError):
        fastssl.SIGReg(17)  # keyword-only, as lightly
    for lam in (-0.1, 1.1):
        with pytest.raises(ValueError, match="unit interval"):
            fastssl.LeJEPALoss(lambda_param=lam)
        with pytest.raises(ValueError, match="unit interval"):
            fastssl.VISRegLoss(lambda_param=lam)
    local, glob = torch.randn(8, 32, 12), torch.randn(8, 32, 12)
    loss = fastssl.LeJEPALoss(lambda_param=0.0)(local_proj=local, global_proj=glob)
    all_proj = torch.cat([glob, local])
    torch.testing.assert_close(loss, reference.lejepa_invariance(all_proj, glob))
    lejepa, sigreg = fastssl.LeJEPALoss(lambda_param=1.0), fastssl.SIGReg()
    torch.manual_seed(42)
    a = lejepa(local_proj=local, global_proj=glob)
    torch.manual_seed(42)
    torch.testing.assert_close(a, sigreg(all_proj))
    with pytest.raises(TypeError):
        fastssl.LeWMLoss(sigreg_num_vectors=32)(torch.randn(8, 3, 16), torch.randn(8, 3, 16), torch.randn(8, 4, 16))
    with pytest.raises(ValueError, match="embeddings must have shape"):
        fastssl.LeWMLoss()(predicted=torch.randn(8, 3, 2, 16), target=torch.randn(8, 3, 2, 16),
                           embeddings=torch.randn(8, 4, 2, 16))  # fmt: skip
    with pytest.raises(ValueError, match="same shape"):
        fastssl.LeWMLoss()(predicted=torch.randn(8, 3, 16), target=torch.randn(8, 2, 16), embeddings=torch.randn(8, 4, 16))
    with pytest.raises(ValueError, match="must not be negative"):
        fastssl.LeWMLoss(lambda_param=-1.0)
    predicted = torch.randn(4, 3, 16, requires_grad=True)
    target = torch.randn(4, 3, 16, requires_grad=True)
    fastssl.LeWMLoss(sigreg_num_vectors=8)(predicted=predicted, target=target, embeddings=torch.randn(4, 4, 16)).backward()
    assert predicted.grad is not None and target.grad is None
    # SIGReg reads the batch axis: a batch-collapsed clip scores worse than a time-collapsed one
    criterion = fastssl.LeWMLoss(lambda_param=1.0, sigreg_num_vectors=32)
    batch_collapsed = torch.randn(1, 4, 16).expand(8, 4, 16)
    time_collapsed = torch.randn(8, 1, 16).expand(8, 4, 16)
    zeros = torch.zeros(8, 3, 16)
    assert criterion(predicted=zeros, target=batch_collapsed[:, 1:], embeddings=batch_collapsed) > criterion(
        predicted=zeros, target=time_collapsed[:, 1:], embeddings=time_collapsed
    )
    for kwargs in (dict(num_slices=0), dict(eps=0.0), dict(lambda_scale=-1.0), dict(lambda_center=-1.0)):
        with pytest.raises(ValueError):
            fastssl.VISRegLoss(**kwargs)
    with pytest.raises(ValueError, match="greater than one"):
        fastssl.VISRegLoss(num_slices=8)(local_proj=torch.randn(2, 1, 16), global_proj=torch.randn(1, 1, 16))
    for local_shape, global_shape in [((32, 16), (2, 32, 16)), ((6, 32, 16), (32, 16)), ((6, 16, 16), (2, 32, 16))]:
        with pytest.raises(ValueError):
            fastssl.VISRegLoss(num_slices=8)(local_proj=torch.randn(*local_shape), global_proj=torch.randn(*global_shape))
        with pytest.raises(ValueError):
            fastssl.LeJEPALoss()(local_proj=torch.randn(*local_shape), global_proj=torch.randn(*global_shape))


def test_visreg_properties():
    """lightly's VISReg checks: the shape term is scale invariant in value but not in gradient,
    Gaussian data scores small, the scale term keeps a gradient under collapse."""
    z = torch.randn(1, 64, 8)
    slices = _unit(8, 16).float()
    parts = FS.visreg_loss_components(z, z, slices=slices)
    scaled = FS.visreg_loss_components(100 * z, 100 * z, slices=slices)
    assert parts.shape.item() == pytest.approx(scaled.shape.item(), abs=1e-4)
    theta = torch.tensor(1.0, requires_grad=True)
    FS.visreg_loss_components(theta * z, theta * z, slices=slices).shape.backward()
    assert theta.grad.abs() > 1e-4
    gaussian = FS.visreg_loss_components(torch.randn(2, 2048, 8), torch.randn(1, 2048, 8), num_slices=64)
    assert gaussian.center < 0.01 and gaussian.scale < 0.01 and gaussian.shape < 0.05
    collapsed = (1e-8 * torch.randn(1, 32, 16)).requires_grad_()
    FS.visreg_loss_components(collapsed, collapsed.detach(), num_slices=8).scale.backward()
    assert torch.isfinite(collapsed.grad).all() and collapsed.grad.norm() > 1e-2
    constant = torch.full((1, 32, 16), 5.0, requires_grad=True)
    FS.visreg_loss_components(constant, constant.detach(), num_slices=8).total.backward()
    assert torch.isfinite(constant.grad).all()


# --------------------------------------------------------------------------------------------
# No (…, N, S, K) tensor
# --------------------------------------------------------------------------------------------


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_sigreg_never_materializes_the_angles(monkeypatch):
    views, n, d, slices, knots = 2, 64, 8, 512, 17
    monkeypatch.setitem(jepa.CHUNK_ELEMENTS, "cpu", views * n * knots * 32)  # 32 slices per chunk
    proj = torch.randn(views, n, d, requires_grad=True)
    with _LargestTensor() as recorder:
        FS.sigreg_loss(proj, num_vectors=slices, backend="torch").backward()
    assert recorder.largest <= views * n * knots * 32 < views * n * slices * knots / 10


def test_no_host_sync_on_the_hot_path(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronization")

    monkeypatch.setattr(torch.Tensor, "item", forbidden)
    monkeypatch.setattr(torch.Tensor, "tolist", forbidden)
    local, glob = torch.randn(2, 16, 6, requires_grad=True), torch.randn(1, 16, 6)
    fastssl.LeJEPALoss(sigreg_num_vectors=16)(local_proj=local, global_proj=glob).backward()
    fastssl.VISRegLoss(num_slices=16)(local_proj=local, global_proj=glob).backward()


# --------------------------------------------------------------------------------------------
# gather_distributed on gloo: loss = single-process loss on the concatenation, gradient W × slice
# --------------------------------------------------------------------------------------------

N_PER_RANK, DIM = 4, 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(world):
    g = torch.Generator().manual_seed(11)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    n = N_PER_RANK * world
    return {
        "tico": [r(n, DIM), r(n, DIM)],
        "vicregl": [r(n, DIM), r(n, 3, 3, 5), r(n, DIM), r(n, 3, 3, 5), r(n, DIM), r(n, 2, 2, 5)],
        "sigreg": [r(2, n, DIM).transpose(0, 1).contiguous()],  # batch first, moved to -2 below
        "lejepa": [r(n, 3, DIM), r(n, 2, DIM)],
        "lewm": [r(n, 3, DIM), r(n, 4, DIM)],
        "visreg": [r(n, 3, DIM), r(n, 2, DIM)],
    }


def _grids(world):
    g = torch.Generator().manual_seed(12)
    n = N_PER_RANK * world
    return [torch.randn(n, 3, 3, 2, generator=g), torch.randn(n, 3, 3, 2, generator=g), torch.randn(n, 2, 2, 2, generator=g)]


def _run(name, gather, tensors, grids, backend):
    """The loss of ``name`` on batch-first tensors (rank slices or the whole batch)."""
    torch.manual_seed(123)  # the same random directions on every rank and in the oracle
    if name == "tico":
        module = fastssl.TiCoLoss(beta=0.5, gather_distributed=gather, backend=backend)
        module(tensors[0].detach(), tensors[1].detach())  # a running covariance from a first step
        return module(*tensors), module.C
    if name == "vicregl":
        g0, l0, g1, l1, g2, l2 = tensors
        module = fastssl.VICRegLLoss(num_matches=(4, 2), gather_distributed=gather, backend=backend)
        return module([(g0, l0), (g1, l1)], grids[:2], [(g2, l2)], grids[2:]), None
    if name == "sigreg":
        return fastssl.SIGReg(num_vectors=40, gather_distributed=gather, backend=backend)(tensors[0].transpose(0, 1)), None
    if name == "lejepa":
        module = fastssl.LeJEPALoss(lambda_param=0.5, sigreg_num_vectors=40, gather_distributed=gather, backend=backend)
        return module(local_proj=tensors[0].transpose(0, 1), global_proj=tensors[1].transpose(0, 1)), None
    if name == "lewm":
        module = fastssl.LeWMLoss(lambda_param=0.5, sigreg_num_vectors=40, gather_distributed=gather, backend=backend)
        emb = tensors[1]
        return module(predicted=tensors[0], target=emb[:, 1:], embeddings=emb), None
    module = fastssl.VISRegLoss(lambda_param=0.5, num_slices=40, gather_distributed=gather, backend=backend)
    return module(local_proj=tensors[0].transpose(0, 1), global_proj=tensors[1].transpose(0, 1)), None


CASES = [(name, backend) for name in ("tico", "vicregl", "sigreg", "lejepa", "lewm", "visreg")
         for backend in ("torch", "reference")]  # fmt: skip


def _worker(rank, world, port, result_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        inputs, grids = _inputs(world), _grids(world)
        rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
        results = {}
        for name, backend in CASES:
            local = [x[rows].clone().requires_grad_(True) for x in inputs[name]]
            loss, state = _run(name, True, local, [g[rows] for g in grids], backend)
            grads = torch.autograd.grad(loss, local, allow_unused=True)
            grads = [torch.zeros_like(x) if g is None else g for x, g in zip(local, grads)]
            results[(name, backend)] = (loss.detach(), [g.detach() for g in grads], state)
        torch.save(results, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_gather_distributed_semantics(world):
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, port, tmp), nprocs=world, join=True)
        per_rank = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]
    inputs, grids = _inputs(world), _grids(world)
    for name, backend in CASES:
        full = [x.clone().requires_grad_(True) for x in inputs[name]]
        loss, state = _run(name, False, full, grids, "reference")
        grads = torch.autograd.grad(loss, full, allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for x, g in zip(full, grads)]
        for r in range(world):
            rank_loss, rank_grads, rank_state = per_rank[r][(name, backend)]
            assert rank_loss.item() == pytest.approx(loss.item(), rel=1e-5, abs=1e-7), (name, backend, r)
            for i, (g_rank, g_full) in enumerate(zip(rank_grads, grads)):
                expected = world * g_full[r * N_PER_RANK : (r + 1) * N_PER_RANK]
                err = (g_rank.double() - expected).abs().max().item()
                assert err <= 1e-4 * expected.abs().max().item() + 1e-6, (name, backend, r, i, err)
            if state is not None:
                torch.testing.assert_close(rank_state.double(), state.double(), rtol=1e-5, atol=1e-7)


def test_gather_distributed_without_a_group_is_the_single_process_loss():
    local, glob = torch.randn(2, 16, 6), torch.randn(1, 16, 6)
    for flagged, plain in [(fastssl.LeJEPALoss(gather_distributed=True, sigreg_num_vectors=8), fastssl.LeJEPALoss(sigreg_num_vectors=8)),
                           (fastssl.VISRegLoss(gather_distributed=True, num_slices=8), fastssl.VISRegLoss(num_slices=8))]:  # fmt: skip
        torch.manual_seed(0)
        a = flagged(local_proj=local, global_proj=glob)
        torch.manual_seed(0)
        assert a.item() == pytest.approx(plain(local_proj=local, global_proj=glob).item(), rel=1e-6)


def test_gather_distributed_needs_torch_distributed(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    for cls, kwargs in [(fastssl.SIGReg, {}), (fastssl.LeJEPALoss, {}), (fastssl.LeWMLoss, {}),
                        (fastssl.VISRegLoss, {}), (fastssl.TiCoLoss, {})]:  # fmt: skip
        with pytest.raises(ValueError, match="gather_distributed"):
            cls(gather_distributed=True, **kwargs)


def test_losses_compile_without_graph_breaks():
    proj = torch.randn(2, 16, 6)
    directions = _unit(6, 10).float()

    def losses(p):
        return FS.sigreg_loss(p, directions=directions) + FS.visreg_loss(p, p[:1], slices=directions)

    compiled = torch.compile(losses, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(proj), losses(proj))


# NumPy scalar hyperparameters (a config loaded with NumPy, a swept grid) are accepted as lightly
# accepts them; bool is rejected, a flag passed where a number belongs being a bug.
@pytest.mark.parametrize("name", ["SIGReg", "LeJEPALoss", "LeWMLoss", "VISRegLoss"])
def test_numpy_scalar_hyperparameters_accepted_bool_rejected(name):
    assert_numpy_hyperparameters_accepted(getattr(fastssl, name))
