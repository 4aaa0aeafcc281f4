"""SwAV: log-domain Sinkhorn-Knopp and the swapped-prediction loss (torch backend) against the
reference, lightly's SwaVLoss, a float64 log-domain oracle where the reference overflows, and
the distributed semantics of DESIGN §3."""

from __future__ import annotations

import importlib.util
import math
import os
import socket
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastssl
import fastssl.functional as FS
from fastssl import reference

from _helpers import assert_matches_reference, awkward_inputs

# --------------------------------------------------------------------------------------------
# Oracles
# --------------------------------------------------------------------------------------------


def log_domain_sinkhorn_oracle(scores: torch.Tensor, iterations: int, epsilon: float) -> torch.Tensor:
    """lightly's Sinkhorn step by step, every quantity kept as its logarithm, in float64: each
    ``Q /= sum`` becomes ``log Q -= logsumexp``. Finite for any finite scores and ε."""
    log_q = (scores.double() / epsilon).T
    log_q = log_q - torch.logsumexp(log_q.flatten(), dim=0)
    batch = log_q.shape[1]
    for _ in range(iterations):
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True)
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(batch)
    return torch.exp(log_q + math.log(batch)).T


def swav_loss_with_codes(crops, n_high: int, codes, temperature: float) -> torch.Tensor:
    """The swapped-prediction loss given each high-resolution crop's codes, in float64."""
    n_crops = len(crops)
    total = 0.0
    for i in range(n_high):
        others = [crops[v] for v in range(n_crops) if v != i]
        total = total + sum(reference.swav_cross_entropy(s.double(), codes[i], temperature) for s in others)
    return total / ((n_crops - 1) * n_high)


def load_lightly_swav():
    """lightly's ``swav_loss`` module, loaded from its source file (``import lightly.loss`` needs
    torchvision); skips when lightly is not installed."""
    spec = importlib.util.find_spec("lightly")
    if spec is None or spec.origin is None:
        pytest.skip("lightly is not installed")
    path = Path(spec.origin).parent / "loss" / "swav_loss.py"
    module_spec = importlib.util.spec_from_file_location("_lightly_swav_loss", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _scores(b: int, k: int, dtype=torch.float32, non_contiguous: bool = False, scale: float = 1.0):
    return awkward_inputs(b, k, dtype=torch.float32, views=1, non_contiguous=non_contiguous)[0].mul(scale).to(dtype)


def _assert_close(ours: torch.Tensor, exact: torch.Tensor, rtol: float = 2e-5, atol: float = 1e-6) -> None:
    err = (ours.double() - exact.double()).abs().max().item()
    allowed = rtol * exact.abs().max().item() + atol
    assert err <= allowed, f"max error {err:.3e} > {allowed:.3e}"


# --------------------------------------------------------------------------------------------
# Sinkhorn
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("b,k", [(1, 1), (1, 3), (3, 129), (127, 3), (5, 1)])
@pytest.mark.parametrize("iterations", [0, 1, 3])
def test_sinkhorn_matches_reference(b, k, iterations):
    scores = _scores(b, k, non_contiguous=(b == 3))
    codes = FS.sinkhorn(scores, iterations, 0.05, backend="torch")
    assert codes.dtype == torch.float32 and codes.shape == (b, k)
    _assert_close(codes, reference.sinkhorn(scores.double(), iterations, 0.05))
    if iterations >= 1:
        _assert_close(codes.sum(dim=1), torch.ones(b, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_sinkhorn_half_and_double_inputs_give_float32_codes(dtype):
    scores = _scores(16, 7, dtype=dtype)
    codes = FS.sinkhorn(scores, 3, 0.05, backend="torch")
    assert codes.dtype == torch.float32
    # The codes of the (rounded) input values, computed in float32 or better.
    _assert_close(codes, reference.sinkhorn(scores.double(), 3, 0.05))


@pytest.mark.parametrize("iterations", [0, 1, 3])
def test_sinkhorn_extreme_scores_where_the_reference_overflows(iterations):
    # |s|/ε ≈ 1e4: a large per-prototype offset plus moderate noise.
    epsilon = 0.05
    offsets = torch.randn(9) * 500 * epsilon
    scores = offsets + torch.randn(12, 9) * 3 * epsilon
    assert (scores / epsilon).abs().max() > 1e3
    with torch.no_grad():
        assert not torch.isfinite(reference.sinkhorn(scores, iterations, epsilon)).all()
    codes = FS.sinkhorn(scores, iterations, epsilon, backend="torch")
    assert torch.isfinite(codes).all()
    oracle = log_domain_sinkhorn_oracle(scores, iterations, epsilon)
    _assert_close(codes, oracle, rtol=1e-4)
    if iterations >= 1:
        # With at least one iteration, Sinkhorn is invariant to per-prototype shifts; shifted
        # by the offsets, the float64 reference is finite and gives the same codes.
        shifted = reference.sinkhorn((scores - offsets).double(), iterations, epsilon)
        assert torch.isfinite(shifted).all()
        _assert_close(codes, shifted, rtol=1e-4)
        _assert_close(codes.sum(dim=1), torch.ones(12, dtype=torch.float64))


def test_log_domain_oracle_agrees_with_the_reference_where_it_is_finite():
    scores = torch.randn(11, 6, dtype=torch.float64)
    for iterations in [0, 1, 3]:
        oracle = log_domain_sinkhorn_oracle(scores, iterations, 0.05)
        _assert_close(oracle, reference.sinkhorn(scores, iterations, 0.05), rtol=1e-10)


def test_sinkhorn_matches_lightly():
    lightly_swav = load_lightly_swav()
    scores = torch.nn.functional.normalize(torch.randn(32, 10), dim=1)  # cosine scores in [-1, 1]
    for iterations in [0, 1, 3]:
        ours = FS.sinkhorn(scores, iterations, 0.05, backend="torch")
        _assert_close(ours, lightly_swav.sinkhorn(scores.clone(), iterations, 0.05), rtol=1e-5)


def test_sinkhorn_arguments_are_checked():
    with pytest.raises(ValueError, match="epsilon"):
        FS.sinkhorn(torch.randn(3, 4), 3, 0.0)
    with pytest.raises(ValueError, match="iterations"):
        FS.sinkhorn(torch.randn(3, 4), -1, 0.05)
    with pytest.raises(TypeError, match="scores"):
        FS.sinkhorn(torch.ones(3, 4, dtype=torch.long), 3, 0.05)


# --------------------------------------------------------------------------------------------
# Swapped-prediction loss
# --------------------------------------------------------------------------------------------

SWAV_CASES = [
    # (n_high, n_low, queue rows, batch, prototypes, iterations)
    (2, 0, 0, 4, 3, 3),
    (2, 3, 0, 3, 129, 3),
    (2, 3, 5, 6, 7, 3),
    (1, 1, 0, 1, 1, 3),
    (3, 1, 4, 127, 3, 1),
    (2, 1, 3, 5, 3, 0),
]


def _swav_fns(n_high: int, queue, temperature: float, iterations: int, epsilon: float, backend: str):
    def split(xs):
        return list(xs[:n_high]), list(xs[n_high:])

    def impl(*xs):
        high, low = split(xs)
        q = None if queue is None else [t.to(xs[0].device) for t in queue]
        return FS.swav_loss(high, low, q, temperature, iterations, epsilon, backend=backend)

    def ref(*xs):
        high, low = split(xs)
        q = None if queue is None else [t.to(device=xs[0].device, dtype=xs[0].dtype) for t in queue]
        return reference.swav_loss(high, low, q, temperature, iterations, epsilon)

    return impl, ref


@pytest.mark.parametrize("n_high,n_low,queue_rows,b,k,iterations", SWAV_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_swav_loss_matches_reference(n_high, n_low, queue_rows, b, k, iterations, dtype):
    # In half precision the reference itself (lightly's arithmetic) under- and overflows unless
    # the scores are mild: cosine-sized for bfloat16, and below 65504 after exp for float16.
    scale, epsilon = {torch.float32: (1.0, 0.05), torch.bfloat16: (0.3, 0.05), torch.float16: (0.5, 0.5)}[dtype]
    crops = [_scores(b, k, dtype, non_contiguous=(v == 1), scale=scale) for v in range(n_high + n_low)]
    queue = None if queue_rows == 0 else [_scores(queue_rows, k, dtype, scale=scale) for _ in range(n_high)]
    impl, ref = _swav_fns(n_high, queue, 0.1, iterations, epsilon, "torch")
    assert_matches_reference(impl, ref, crops)


def test_swav_float64_inputs_accumulate_in_float64():
    crops = [torch.randn(5, 4, dtype=torch.float64) for _ in range(3)]
    impl, ref = _swav_fns(2, None, 0.1, 3, 0.05, "torch")
    assert_matches_reference(impl, ref, crops, rtol=1e-7, atol=1e-9)


def test_swav_extreme_scores_give_a_finite_loss():
    epsilon, temperature = 0.05, 0.1
    offsets = torch.randn(6) * 500 * epsilon
    crops = [(offsets + torch.randn(8, 6) * 3 * epsilon).requires_grad_(True) for _ in range(3)]
    with torch.no_grad():
        assert not torch.isfinite(reference.swav_loss(crops[:2], crops[2:], None, temperature, 3, epsilon))
    loss = FS.swav_loss(crops[:2], crops[2:], None, temperature, 3, epsilon, backend="torch")
    grads = torch.autograd.grad(loss, crops)
    exact_crops = [c.detach().double().requires_grad_(True) for c in crops]
    codes = [log_domain_sinkhorn_oracle(c.detach(), 3, epsilon) for c in exact_crops[:2]]
    exact = swav_loss_with_codes(exact_crops, 2, codes, temperature)
    exact_grads = torch.autograd.grad(exact, exact_crops)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    _assert_close(loss, exact, rtol=1e-4)
    for g, g_exact in zip(grads, exact_grads):
        _assert_close(g, g_exact, rtol=1e-4)


def test_swav_module_matches_lightly():
    lightly_swav = load_lightly_swav()
    theirs = lightly_swav.SwaVLoss(temperature=0.2, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)
    ours = fastssl.SwaVLoss(temperature=0.2, sinkhorn_iterations=3, sinkhorn_epsilon=0.05, backend="torch")
    # Prototype scores of normalized features: cosines in [-1, 1], as in SwAV.
    crops = [torch.nn.functional.normalize(torch.randn(16, 12), dim=1) for _ in range(5)]
    queue = [torch.nn.functional.normalize(torch.randn(8, 12), dim=1) for _ in range(2)]
    for q in [None, queue]:
        leaves_a = [c.clone().requires_grad_(True) for c in crops]
        leaves_b = [c.clone().requires_grad_(True) for c in crops]
        expected = theirs(leaves_a[:2], leaves_a[2:], q)
        value = ours(leaves_b[:2], leaves_b[2:], q)
        assert value.shape == () and value.dtype == torch.float32
        assert value.item() == pytest.approx(expected.item(), rel=1e-5)
        for g, g_exact in zip(torch.autograd.grad(value, leaves_b), torch.autograd.grad(expected.sum(), leaves_a)):
            _assert_close(g, g_exact, rtol=1e-5)


def test_swav_gradient_only_to_crops_that_need_it():
    crops = [torch.randn(4, 5) for _ in range(3)]
    crops[1].requires_grad_(True)
    loss = FS.swav_loss(crops[:2], crops[2:], backend="torch")
    (grad,) = torch.autograd.grad(loss, [crops[1]])
    exact = [c.double().requires_grad_(v == 1) for v, c in enumerate(crops)]
    (grad_exact,) = torch.autograd.grad(reference.swav_loss(exact[:2], exact[2:]), [exact[1]])
    _assert_close(grad, grad_exact)


def _compile_swav(backend: str):
    fn = torch.compile(lambda h, lo: FS.swav_loss(h, lo, backend="torch"), fullgraph=True, backend=backend)
    crops = [torch.randn(6, 5, requires_grad=True) for _ in range(3)]
    value = fn(crops[:2], crops[2:])
    grads = torch.autograd.grad(value, crops)
    eager = FS.swav_loss(crops[:2], crops[2:], backend="torch")
    eager_grads = torch.autograd.grad(eager, crops)
    assert value.item() == pytest.approx(eager.item(), rel=1e-5)
    for g, g_eager in zip(grads, eager_grads):
        _assert_close(g, g_eager, rtol=1e-5)


def test_swav_torch_path_compiles_without_graph_breaks():
    _compile_swav("aot_eager")


@pytest.mark.slow
def test_swav_torch_path_compiles_with_inductor():
    _compile_swav("inductor")


# --------------------------------------------------------------------------------------------
# Distributed Sinkhorn (gloo, CPU)
# --------------------------------------------------------------------------------------------

_K = 5
# Per-rank (batch rows, queue rows): equal, and unequal as DDP without drop_last gives them
# (a rank with one row; queues of different lengths).
_SPLITS = {
    "equal-2": [(3, 2), (3, 2)],
    "unequal-2": [(2, 3), (5, 1)],
    "unequal-3": [(4, 2), (1, 3), (3, 0)],
}


def _distributed_inputs(split):
    sizes = _SPLITS[split]
    rows, queue_rows = sum(b for b, _ in sizes), sum(q for _, q in sizes)
    g = torch.Generator().manual_seed(7)
    offsets = torch.randn(_K, generator=g, dtype=torch.float64) * 400 * 0.05
    crops = [torch.randn(rows, _K, generator=g, dtype=torch.float64) for _ in range(3)]
    queue = [torch.randn(queue_rows, _K, generator=g, dtype=torch.float64) for _ in range(2)]
    extreme = [offsets + 0.1 * torch.randn(rows, _K, generator=g, dtype=torch.float64) for _ in range(2)]
    return crops, queue, extreme


def _rank_rows(split, rank):
    """This rank's slices of the global batch and of the global queue."""
    sizes = _SPLITS[split]
    start = sum(b for b, _ in sizes[:rank])
    queue_start = sum(q for _, q in sizes[:rank])
    return slice(start, start + sizes[rank][0]), slice(queue_start, queue_start + sizes[rank][1])


def _distributed_backends():
    backends = ["torch", "reference"]
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        backends.append("triton")
    return backends


def _distributed_worker(rank: int, world: int, port: int, result_dir: str, split: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        crops, queue, extreme = _distributed_inputs(split)
        rows, queue_rows = _rank_rows(split, rank)
        results = {}
        for backend in _distributed_backends():
            for iterations in [0, 3]:
                local = [c[rows].float().clone().requires_grad_(True) for c in crops]
                # A learnable temperature: its gradient is summed over ranks by DDP, like a weight's.
                temperature = torch.tensor(0.1, requires_grad=True)
                local_queue = [q[queue_rows].float() for q in queue]
                loss = FS.swav_loss(
                    local[:2], local[2:], local_queue, temperature, iterations, 0.05,
                    sinkhorn_gather_distributed=True, backend=backend,
                )  # fmt: skip
                grads = torch.autograd.grad(loss, local + [temperature])
                # The textbook reference overflows on the extreme scores (on purpose): mild ones.
                scores = crops[2] if backend == "reference" else extreme[0]
                codes = FS.sinkhorn(scores[rows].float(), iterations, 0.05, gather_distributed=True, backend=backend)
                results[(backend, iterations)] = (loss.detach(), [g.detach() for g in grads], codes)
        torch.save(results, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("split", sorted(_SPLITS))
def test_distributed_sinkhorn_is_the_global_sinkhorn(split):
    """Each rank's codes equal the single-process codes of the concatenated batch (every rank's
    queue included), the loss equals the single-process loss, and each rank's gradient is W
    times its slice of the single-process gradient -- for equal and unequal per-rank batch and
    queue sizes, on every backend, also for scores where lightly's exp overflows. The
    temperature's gradients, summed over ranks (as DDP does for a parameter, up to its 1/W
    average), are W times the single-process one."""
    world = len(_SPLITS[split])
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_distributed_worker, args=(world, port, tmp, split), nprocs=world, join=True)
        per_rank = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]
    crops, queue, extreme = _distributed_inputs(split)
    for backend in _distributed_backends():
        for iterations in [0, 3]:
            # Single process: Sinkhorn over the whole batch with the whole queue appended (the
            # order of the samples does not change Sinkhorn's codes), rows of the batch kept.
            full = [c.float().double().requires_grad_(True) for c in crops]
            temperature = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
            batch = full[0].shape[0]
            codes = [
                log_domain_sinkhorn_oracle(torch.cat([full[i].detach(), queue[i].float().double()]), iterations, 0.05)[:batch]
                for i in range(2)
            ]
            exact = swav_loss_with_codes(full, 2, codes, temperature)
            exact_grads = torch.autograd.grad(exact, full + [temperature])
            scores = crops[2] if backend == "reference" else extreme[0]
            exact_codes = log_domain_sinkhorn_oracle(scores.float().double(), iterations, 0.05)
            temperature_grad_sum = 0.0
            for r in range(world):
                loss, grads, rank_codes = per_rank[r][(backend, iterations)]
                rows, _ = _rank_rows(split, r)
                assert loss.item() == pytest.approx(exact.item(), rel=1e-5), (backend, iterations, r)
                for g, g_exact in zip(grads[:-1], exact_grads[:-1]):
                    _assert_close(g, world * g_exact[rows], rtol=1e-5)
                temperature_grad_sum += grads[-1].item()
                assert torch.isfinite(rank_codes).all()
                _assert_close(rank_codes, exact_codes[rows], rtol=1e-4)
            assert temperature_grad_sum == pytest.approx(world * exact_grads[-1].item(), rel=1e-4), (backend, iterations)


# --------------------------------------------------------------------------------------------
# Learnable temperature, empty queues, the reference backend's dtype rule
# --------------------------------------------------------------------------------------------


def learnable_temperature_fns(n_high: int, iterations: int, backend: str):
    """(impl, ref) over ``[*crops, temperature]``: the temperature a 0-d tensor input, so that
    assert_matches_reference checks its gradient beside the crops'."""

    def impl(*xs):
        return FS.swav_loss(list(xs[:n_high]), list(xs[n_high:-1]), None, xs[-1], iterations, 0.05, backend=backend)

    def ref(*xs):
        return reference.swav_loss(list(xs[:n_high]), list(xs[n_high:-1]), None, xs[-1], iterations, 0.05)

    return impl, ref


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("iterations", [0, 3])
@pytest.mark.parametrize("b,k", [(1, 3), (5, 129)])
def test_swav_learnable_temperature_gets_its_gradient(backend, iterations, b, k):
    crops = [_scores(b, k, non_contiguous=(v == 2)) for v in range(4)]
    impl, ref = learnable_temperature_fns(2, iterations, backend)
    assert_matches_reference(impl, ref, crops + [torch.tensor(0.13)])


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_swav_module_registers_and_trains_a_temperature_parameter(backend):
    """As lightly: ``SwaVLoss(temperature=nn.Parameter(...))`` registers the parameter, and an
    optimizer step moves it (with the gradient of the float64 formula)."""
    temperature = torch.nn.Parameter(torch.tensor(0.2))
    criterion = fastssl.SwaVLoss(temperature=temperature, backend=backend)
    assert dict(criterion.named_parameters()) == {"temperature": temperature}
    assert "temperature" in criterion.state_dict()
    crops = [_scores(6, 7) for _ in range(3)]
    criterion(crops[:2], crops[2:]).backward()
    exact_temperature = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    exact = reference.swav_loss([c.double() for c in crops[:2]], [crops[2].double()], None, exact_temperature)
    (exact_grad,) = torch.autograd.grad(exact, [exact_temperature])
    assert temperature.grad is not None and temperature.grad.item() == pytest.approx(exact_grad.item(), rel=1e-4)
    torch.optim.SGD([temperature], lr=1e-3).step()
    assert temperature.item() != 0.2


def test_swav_temperature_tensor_must_be_one_floating_element():
    crops = [torch.randn(4, 5) for _ in range(2)]
    with pytest.raises(TypeError, match="temperature"):
        FS.swav_loss(crops, [], None, torch.tensor([0.1, 0.2]))
    with pytest.raises(TypeError, match="temperature"):
        fastssl.SwaVLoss(temperature=torch.tensor(1))
    with pytest.raises(ValueError, match="temperature"):
        fastssl.SwaVLoss(temperature=torch.nn.Parameter(torch.tensor(0.0)))


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_swav_empty_queue_is_no_queue(backend):
    """lightly accepts (0, K) queue tensors (a queue not yet filled): the loss is the loss
    without a queue."""
    crops = [_scores(5, 6) for _ in range(3)]
    empty = [torch.empty(0, 6) for _ in range(2)]
    without = FS.swav_loss(crops[:2], crops[2:], None, backend=backend)
    with_empty = FS.swav_loss(crops[:2], crops[2:], empty, backend=backend)
    assert with_empty.item() == pytest.approx(without.item(), rel=1e-6)
    lightly_swav = load_lightly_swav()
    expected = lightly_swav.SwaVLoss()(crops[:2], crops[2:], empty)
    assert with_empty.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="prototypes"):
        FS.swav_loss(crops[:2], crops[2:], [torch.empty(0, 5)] * 2, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_swav_reference_backend_computes_half_inputs_in_float32(dtype):
    """The textbook formula in float16 overflows (exp(s/ε) > 65504 beyond s/ε ≈ 11); the
    reference backend evaluates it in float32 and returns gradients in the input dtype."""
    crops = [(_scores(6, 5) * 0.8).to(dtype).requires_grad_(True) for _ in range(3)]
    loss = FS.swav_loss(crops[:2], crops[2:], backend="reference")
    grads = torch.autograd.grad(loss, crops)
    exact = [c.detach().double().requires_grad_(True) for c in crops]
    expected = reference.swav_loss(exact[:2], exact[2:])
    expected_grads = torch.autograd.grad(expected, exact)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    _assert_close(loss, expected, rtol=1e-5)
    for g, g_exact in zip(grads, expected_grads):
        assert g.dtype == dtype
        _assert_close(g, g_exact, rtol=1e-2)
    codes = FS.sinkhorn(crops[0].detach(), 3, 0.05, backend="reference")
    assert codes.dtype == torch.float32 and torch.isfinite(codes).all()
    _assert_close(codes, reference.sinkhorn(crops[0].detach().double(), 3, 0.05), rtol=1e-5)
