"""Triton kernels for NT-Xent, InfoNCE and uniformity (``fastssl.kernels.ntxent``).

Parametrized over ``TRITON_DEVICES``: CPU tensors through the Triton interpreter (CI) and the
compiled kernels on CUDA (``gpu`` lane). Values and input gradients against the float64
reference; output buffers poisoned with NaN before every launch.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fastssl
import fastssl.functional as FS
from fastssl import reference
from fastssl.ntxent import uniformity_loss
from _helpers import TRITON_DEVICES, assert_matches_reference, awkward_inputs, poisoned

K = pytest.importorskip("fastssl.kernels.ntxent")

# Tiny tiles: several row/column blocks at small N, and d walked in 16-wide chunks (the
# read-modify-write accumulation path) instead of one register tile.
CHUNKED = K.KernelConfig(16, 16, 16, single_k=False)
HALF_OPERANDS = K.KernelConfig(16, 16, 16, single_k=True, fp32_operands=False)
# The column sweep split over programs (merged by log-sum-exp forward, partial gradients summed
# backward), with one register tile and with d in chunks.
SPLIT = K.KernelConfig(16, 16, 64, single_k=True, col_splits=3)
SPLIT_CHUNKED = K.KernelConfig(16, 16, 16, single_k=False, col_splits=2)
SPLIT_WIDE = K.KernelConfig(64, 64, 16, single_k=True, col_splits=4)  # larger N, few programs
_CONFIG_NAMES = {id(CHUNKED): "chunked", id(SPLIT): "split", id(SPLIT_CHUNKED): "split-chunked",
                 id(SPLIT_WIDE): "split-wide"}


def _inputs(n, d, dtype, device, non_contiguous=False, views=2):
    return awkward_inputs(n, d, dtype=dtype, device=device, views=views, non_contiguous=non_contiguous)


def _bank(k, d, device):
    return F.normalize(torch.randn(k, d), dim=1).to(device)


def pairwise_uniformity(z, t):
    n = z.shape[0]
    z = F.normalize(z, dim=1)
    sq_dist = (z[:, None, :] - z[None, :, :]).pow(2).sum(-1)
    distinct = ~torch.eye(n, dtype=torch.bool, device=z.device)
    return torch.logsumexp(-t * sq_dist[distinct], dim=0) - math.log(n * (n - 1))


# (n, d, dtype, temperature, non_contiguous, config): N ∈ {1, 2, 3, 65}, d ∈ {1, 3, 129},
# every temperature, fp32/bf16/fp16, both accumulation paths, half operands (d = 129), and
# N = 17 for several row and column tiles with the small tiles. Sized for the interpreter.
NTXENT_CASES = [
    (1, 3, torch.float32, 0.1, True, None),
    (1, 129, torch.bfloat16, -1.0, False, CHUNKED),
    (2, 1, torch.bfloat16, -1.0, True, None),
    (2, 129, torch.float32, 7.0, False, CHUNKED),
    (3, 3, torch.float16, 1.0, True, CHUNKED),
    (3, 129, torch.bfloat16, 0.1, True, None),
    (3, 129, torch.float16, 7.0, True, None),
    (17, 3, torch.bfloat16, 7.0, False, CHUNKED),
    (65, 3, torch.float32, -1.0, True, None),
    (65, 3, torch.bfloat16, 0.1, False, None),
    (5, 129, torch.bfloat16, 0.01, True, None),  # 2/|τ| = 200: the two-exponential backward
    # Split sweeps: 37 rows per view (row blocks straddle the views, so a tile holds self and
    # positive columns of both), a single pair, fully masked first tiles of later splits.
    (37, 3, torch.bfloat16, 0.1, False, SPLIT),
    (127, 3, torch.float16, 0.2, True, SPLIT_WIDE),
    (1, 3, torch.float16, 7.0, True, SPLIT),
    (3, 1, torch.float32, -1.0, True, SPLIT),
    (2, 129, torch.float16, 0.5, True, SPLIT_CHUNKED),
    (9, 33, torch.float32, 0.01, False, SPLIT_CHUNKED),
]
# Larger shapes for the compiled kernels only (GPU configs: one register tile up to d = 256,
# d-chunks beyond).
NTXENT_GPU_CASES = [
    (65, 129, torch.bfloat16, 0.1, False, None),
    (65, 129, torch.float32, 1.0, True, None),
    (1000, 128, torch.bfloat16, 0.1, False, None),
    (1000, 256, torch.float16, -1.0, True, None),
    (300, 1000, torch.bfloat16, 0.2, False, None),
    (257, 4096, torch.bfloat16, 0.1, False, None),
    (300, 1000, torch.float32, 0.5, True, None),
]


def _case_id(case):
    n, d, dtype, t, nc, cfg = case
    return f"n{n}-d{d}-{str(dtype)[6:]}-t{t}" + ("-strided" if nc else "") + (f"-{_CONFIG_NAMES[id(cfg)]}" if cfg is not None else "")


def _check_ntxent(device, case):
    n, d, dtype, temperature, non_contiguous, config = case
    a, b = _inputs(n, d, dtype, device, non_contiguous)
    assert_matches_reference(
        lambda x, y: K.ntxent_loss_triton(x, y, temperature, config=config),
        lambda x, y: reference.ntxent_loss(x, y, temperature),
        [a, b],
    )


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("case", NTXENT_CASES, ids=_case_id)
def test_ntxent_triton_matches_reference(device, case):
    _check_ntxent(device, case)


@pytest.mark.gpu
@pytest.mark.parametrize("case", NTXENT_GPU_CASES, ids=_case_id)
def test_ntxent_triton_matches_reference_large(case):
    _check_ntxent("cuda", case)


INFONCE_CASES = [
    (1, 3, torch.float32, 0.1, 17, True, None),
    (2, 1, torch.bfloat16, 7.0, 1, False, None),
    (3, 129, torch.bfloat16, -1.0, 15, True, CHUNKED),
    (3, 129, torch.float32, 1.0, 16, False, None),
    (65, 3, torch.float16, 0.1, 16, True, None),
    (17, 37, torch.bfloat16, 1.0, 17, False, CHUNKED),
    (37, 3, torch.float16, 0.2, 40, False, SPLIT),
    (127, 3, torch.bfloat16, 0.5, 200, True, SPLIT_WIDE),
    (1, 129, torch.bfloat16, 1.0, 33, True, SPLIT_CHUNKED),
    (2, 1, torch.float32, -0.5, 17, True, SPLIT),
]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("case", INFONCE_CASES, ids=lambda c: f"n{c[0]}-d{c[1]}-{str(c[2])[6:]}-t{c[3]}-bank{c[4]}")
def test_infonce_triton_matches_reference(device, case):
    n, d, dtype, temperature, bank_size, non_contiguous, config = case
    q, k = _inputs(n, d, dtype, device, non_contiguous)
    bank = _bank(bank_size, d, device)  # float32, as the module keeps it
    if non_contiguous:
        bank = torch.cat([bank, bank], dim=1)[:, ::2]
    assert_matches_reference(
        lambda x, y: K.infonce_loss_triton(x, y, bank, temperature, config=config),
        lambda x, y: reference.infonce_loss(x, y, bank, temperature),
        [q, k],
    )


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize(
    "n,d,dtype,t,config",
    [(2, 1, torch.float32, 2.0, None), (3, 129, torch.float32, 0.5, CHUNKED), (65, 3, torch.float32, 2.0, None),
     (33, 129, torch.bfloat16, 2.0, None), (17, 3, torch.float16, 1.0, CHUNKED), (2, 3, torch.float32, 2.0, SPLIT),
     (37, 3, torch.bfloat16, 2.0, SPLIT), (5, 129, torch.float32, 1.0, SPLIT_CHUNKED)],
)
def test_uniformity_triton_matches_reference(device, n, d, dtype, t, config):
    (z,) = _inputs(n, d, dtype, device, non_contiguous=True, views=1)
    # cdist (the reference's) has no half-precision CPU kernel: the explicit-difference form is
    # the same formula and measures PyTorch's own half-precision error.
    ref = (lambda x: reference.uniformity(x, t)) if dtype == torch.float32 else (lambda x: pairwise_uniformity(x, t))
    assert_matches_reference(lambda x: K.uniformity_triton(x, t, config=config), ref, [z])


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_uniformity_triton_edge_cases(device):
    assert math.isnan(K.uniformity_triton(torch.randn(1, 4, device=device)).item())
    collapsed = torch.randn(1, 6, device=device).repeat(9, 1)
    assert K.uniformity_triton(collapsed).item() == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------------------------
# Learnable temperature, extreme magnitudes, float64 banks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("case", [(1, 3, torch.float32, 0.3, None), (3, 129, torch.bfloat16, -0.7, CHUNKED),
                                  (37, 3, torch.float16, 0.2, SPLIT), (5, 33, torch.float32, 0.01, SPLIT_CHUNKED)],
                         ids=lambda c: f"n{c[0]}-d{c[1]}-{str(c[2])[6:]}-t{c[3]}")
def test_tensor_temperature_is_read_on_the_device_with_gradient(device, case):
    """τ as a one-element tensor: the kernels read it from device memory (no .item()), and the
    loss, the inputs' and τ's gradients match the float64 formula (NT-Xent and InfoNCE, split
    sweeps and d in chunks; τ = 0.01 in the two-exponential backward)."""
    n, d, dtype, temperature, config = case
    a, b = _inputs(n, d, dtype, device, non_contiguous=True)
    tau = torch.tensor(temperature, device=device)
    bank = _bank(19, d, device)
    assert_matches_reference(lambda x, y, t: K.ntxent_loss_triton(x, y, t, config=config),
                             lambda x, y, t: reference.ntxent_loss(x, y, t.to(x.dtype)), [a, b, tau])
    assert_matches_reference(lambda x, y, t: K.infonce_loss_triton(x, y, bank, t, config=config),
                             lambda x, y, t: reference.infonce_loss(x, y, bank, t.to(x.dtype)), [a, b, tau])


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_module_trains_a_parameter_temperature_on_triton(device, monkeypatch):
    """The module's nn.Parameter temperature gets the torch path's gradient through the kernels,
    with and without a bank, and the launches read it without a host sync."""
    from fastssl import ntxent

    monkeypatch.setattr(ntxent, "_pointer_readable_on_host", lambda device: False)
    for bank_size in (0, 16):
        grads = {}
        for backend in ("triton", "torch"):
            torch.manual_seed(4)
            module = fastssl.NTXentLoss(temperature=torch.nn.Parameter(torch.tensor(0.25)),
                                        memory_bank_size=(bank_size, 6), backend=backend).to(device)
            a, b = [x.requires_grad_(True) for x in _inputs(9, 6, torch.float32, device)]
            module(a, b).backward()
            grads[backend] = module.temperature.grad
        torch.testing.assert_close(grads["triton"], grads["torch"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("scale", [1e19, 1e-19, 1e37])
def test_extreme_magnitudes_give_the_float64_value(device, scale):
    """float32 rows near 1e19 (squares overflow: NaN before) or 1e-19 (squares underflow, below
    F.normalize's clamp): NT-Xent, InfoNCE and uniformity give the float64 value and gradients;
    also uniformity with a zero row and a tiny one beside normal rows."""
    torch.manual_seed(0)
    a, b = [x * scale for x in _inputs(7, 9, torch.float32, device)]
    bank = _bank(6, 9, device)
    atol = 1e-30 if scale > 1 else 1e-6
    assert_matches_reference(lambda x, y: K.ntxent_loss_triton(x, y, 0.3),
                             lambda x, y: reference.ntxent_loss(x, y, 0.3), [a, b], atol=atol)
    assert_matches_reference(lambda x, y: K.infonce_loss_triton(x, y, bank, 0.3),
                             lambda x, y: reference.infonce_loss(x, y, bank, 0.3), [a, b], atol=atol)
    assert_matches_reference(lambda x: K.uniformity_triton(x), lambda x: reference.uniformity(x), [a], atol=atol)
    mixed = _inputs(6, 5, torch.float32, device, views=1)[0]
    mixed[1] = 0.0
    mixed[3] *= scale
    assert_matches_reference(lambda x: K.uniformity_triton(x), reference.uniformity, [mixed])


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_float64_bank_runs_like_the_torch_path(device):
    """A float64 bank with float32 queries: backend="triton" accepts it as the torch path does
    (dispatched to the path that accumulates it), with the reference's value."""
    q, k = _inputs(5, 4, torch.float32, device)
    bank = _bank(9, 4, device).double()
    assert_matches_reference(lambda x, y: FS.infonce_loss(x, y, bank, 0.3, backend="triton"),
                             lambda x, y: reference.infonce_loss(x, y, bank, 0.3), [q, k])
    assert FS.infonce_loss(q, k, bank, 0.3, backend="triton").item() == pytest.approx(
        FS.infonce_loss(q, k, bank, 0.3, backend="torch").item(), rel=1e-6)


# --------------------------------------------------------------------------------------------
# Every output element written: launchers on NaN-poisoned buffers
# --------------------------------------------------------------------------------------------


def _assert_regions_finite(workspace, regions, names):
    for name in names:
        region = regions.view(workspace, name)
        assert region.numel() == regions.sizes[name] and torch.isfinite(region).all(), name


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("config", [None, CHUNKED, SPLIT, SPLIT_CHUNKED], ids=["default", "chunked", "split", "split-chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_launchers_write_every_output(device, config, dtype):
    """Every region of the forward and backward workspaces (one float32 tensor per call, carved
    by element offsets) and every output is written: all poisoned with NaN beforehand."""
    n, d = 9, 37  # no tile size divides 2N or d
    a, b = _inputs(n, d, dtype, device, non_contiguous=True)
    r = 2 * n
    ints = K._config_to_ints(config)
    plan = K._NTXentPlan(n, d, dtype, torch.device(device), [], ints)
    assert (plan.forward_sweep.splits > 1) == (config is not None and config.col_splits is not None)
    assert all(offset % 16 == 0 for offset in plan.state.offsets.values())  # aligned regions
    z = poisoned((r, d), plan.z_dtype, device)
    ws = poisoned((plan.state.size,), torch.float32, device)
    K._ntxent_forward_into(a, b, None, 2.0, plan, z, ws)
    assert torch.isfinite(z).all()
    _assert_regions_finite(ws, plan.state, ["norms", "pos_cos", "lse", "row_loss"])
    assert (plan.state.view(ws, "pos_cos").abs() <= 1 + 1e-6).all()

    grad_one = torch.ones((), device=device)
    grads = poisoned((plan.grads.size,), torch.float32, device)
    grad0, grad1 = poisoned((n, d), dtype, device), poisoned((n, d), dtype, device)
    K._ntxent_backward_into(grad_one, a, b, None, z, ws, 2.0, plan, grads, grad0, grad1)
    _assert_regions_finite(grads, plan.grads, ["coef", "dz"])
    assert torch.isfinite(grad0).all() and torch.isfinite(grad1).all()

    # InfoNCE with a tensor temperature: the projection region of its gradient too.
    bank = _bank(23, d, device)
    tau = torch.tensor(0.5, device=device)
    iplan = K._InfoNCEPlan(n, d, 23, dtype, torch.device(device), ints, temperature_grad=True)
    z = poisoned((r, d), iplan.z_dtype, device)
    ws = poisoned((iplan.state.size,), torch.float32, device)
    K._infonce_forward_into(a, b, bank, tau, 1.0, iplan, z, ws)
    assert torch.isfinite(z).all()
    _assert_regions_finite(ws, iplan.state, ["norms", "pos_cos", "lse", "row_loss"])
    grads = poisoned((iplan.grads.size,), torch.float32, device)
    grad_q, grad_k = poisoned((n, d), dtype, device), poisoned((n, d), dtype, device)
    K._infonce_backward_into(grad_one, a, b, bank, tau, z, ws, 1.0, iplan, grads, grad_q, grad_k)
    _assert_regions_finite(grads, iplan.grads, ["coef", "projection", "dz"])
    assert torch.isfinite(grad_q).all() and torch.isfinite(grad_k).all()


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_views_of_different_dtypes_meet_at_the_promoted_one(device):
    """float32 and bfloat16 views: the kernels run on the promoted dtype (float32 operands, the
    bfloat16 values exactly), so the loss and the float32 view's gradient are those of the
    all-float32 call and the bfloat16 view's gradient is its rounding (its own launch of the
    normalization backward: the two-view launch needs one gradient dtype)."""
    a, b = _inputs(5, 7, torch.float32, device)
    b16 = b.to(torch.bfloat16)
    x, y = a.clone().requires_grad_(True), b16.clone().requires_grad_(True)
    loss = K.ntxent_loss_triton(x, y, 0.3)
    loss.backward()
    x32, y32 = a.clone().requires_grad_(True), b16.float().requires_grad_(True)
    expected = K.ntxent_loss_triton(x32, y32, 0.3)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    assert x.grad.dtype == torch.float32 and y.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad, x32.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(y.grad, y32.grad.to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("temperature", [0.1, -0.05])
def test_factored_backward_equals_two_exponential_form(device, temperature):
    n, d = 9, 5
    a, b = _inputs(n, d, torch.float32, device)
    plan = K._NTXentPlan(n, d, torch.float32, torch.device(device), [], [])
    z = torch.empty((2 * n, d), device=device)
    ws = torch.empty((plan.state.size,), device=device)
    K._ntxent_forward_into(a, b, None, 1 / temperature, plan, z, ws)
    assert K._factored_backward(1 / temperature, 2 * n)
    one = torch.ones((), device=device)
    results = []
    for factored in (True, False):
        grads = torch.full((plan.grads.size,), float("nan"), device=device)
        K.pair_lse_backward(z, z, ws, plan.state, plan.state.lse, plan.state.lse, grads, plan.grads,
                            plan.backward_sweep, one, 1 / temperature, 1.0, n, 0, factored=factored)
        results.append([plan.grads.view(grads, name) for name in ("dz", "coef")])
    for factored, plain in zip(*results):
        torch.testing.assert_close(factored, plain, rtol=1e-5, atol=1e-5)
    assert not K._factored_backward(100.0, 2 * n)


# --------------------------------------------------------------------------------------------
# The seed's exercises and semantics
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("n", [1, 2, 17])
def test_fully_correlated_embeddings_give_log_of_2n_minus_1(device, n):
    row = torch.randn(1, 12, device=device)
    for temperature in (0.1, 1.0, 7.0, -1.0):
        value = K.ntxent_loss_triton(row.repeat(n, 1), 2.0 * row.repeat(n, 1), temperature)
        assert value.item() == pytest.approx(-math.log(1 / (2 * n - 1)), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("temperature", [0.1, -1.0])
def test_gradient_equals_seed_closed_form(device, temperature):
    """dL/dx for unit-norm inputs from ∂ℓ_k/∂s_m = (p_m - [m = positive])/τ (seed 000)."""
    from test_ntxent import closed_form_unit_norm_gradient

    a, b = [F.normalize(x, dim=1).requires_grad_(True) for x in _inputs(7, 5, torch.float32, device)]
    K.ntxent_loss_triton(a, b, temperature).backward()
    ga, gb = closed_form_unit_norm_gradient(a.detach(), b.detach(), temperature)
    torch.testing.assert_close(a.grad.double(), ga, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad.double(), gb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_half_operands_compute_the_rounded_formula(device):
    """With ẑ stored in bf16 (forced at small d), the loss is the float64 formula evaluated on
    the bf16-rounded ẑ and bank, with the positive logit from the float32 cosine."""
    n, d, temperature = 9, 3, 0.2
    q, k = _inputs(n, d, torch.bfloat16, device)
    bank = _bank(17, d, device)
    qd, kd = F.normalize(q.double(), dim=1), F.normalize(k.double(), dim=1)
    positive = (qd * kd).sum(dim=1)
    negatives = qd.bfloat16().double() @ bank.bfloat16().double().T
    expected = (torch.logsumexp(torch.cat([positive[:, None], negatives], 1) / temperature, 1) - positive / temperature).mean()
    value = K.infonce_loss_triton(q, k, bank, temperature, config=HALF_OPERANDS)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)

    z = torch.cat([qd, kd])
    s = (z.bfloat16().double() @ z.bfloat16().double().T).fill_diagonal_(float("-inf"))
    pos_idx = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(device)
    s[torch.arange(2 * n, device=device), pos_idx] = positive.repeat(2)
    expected = F.cross_entropy(s / temperature, pos_idx)
    value = K.ntxent_loss_triton(q, k, temperature, config=HALF_OPERANDS)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_non_finite_inputs_give_nan(device):
    for bad in (float("nan"), float("inf")):
        a, b = _inputs(6, 5, torch.float32, device)
        a[2, 1] = bad
        assert torch.isnan(K.ntxent_loss_triton(a, b, 0.5))
        assert torch.isnan(K.infonce_loss_triton(a, b, _bank(4, 5, device), 0.5))
        assert torch.isnan(K.uniformity_triton(a))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_public_api_and_module_on_triton(device):
    a, b = _inputs(5, 4, torch.float32, device)
    assert_matches_reference(lambda x, y: FS.ntxent_loss(x, y, 0.3, backend="triton"),
                             lambda x, y: reference.ntxent_loss(x, y, 0.3), [a, b])
    torch.manual_seed(5)
    module = fastssl.NTXentLoss(temperature=0.3, memory_bank_size=(12, 4), backend="triton").to(device)
    bank = module.bank.clone()

    def ours(x, y):
        module.bank.copy_(bank)
        module.bank_ptr.zero_()
        return module(x, y)

    assert_matches_reference(ours, lambda x, y: reference.infonce_loss(x, y, bank, 0.3), [a, b])
    assert int(module.bank_ptr) == 5  # the keys were enqueued
    # float64 has no kernel: the public API runs it on the PyTorch path
    a64, b64 = a.double(), b.double()
    assert FS.ntxent_loss(a64, b64, backend="triton").item() == pytest.approx(
        reference.ntxent_loss(a64, b64).item(), rel=1e-6)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Dynamo's notes on lru_cache'd helpers
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("bank_size", [0, 20], ids=["simclr", "moco"])
def test_torch_compile_fullgraph_keeps_the_kernels_whole(device, bank_size):
    """The kernels are torch.library custom ops: Dynamo records each as one node (fullgraph
    fails on any graph break), aot_eager runs their fake functions and registered backward.
    Two steps with a bank: the second sees the keys the first enqueued."""
    torch._dynamo.reset()
    torch.manual_seed(1)
    head = torch.nn.Linear(6, 5).to(device)
    twin_head = torch.nn.Linear(6, 5).to(device)
    twin_head.load_state_dict(head.state_dict())
    loss_fn = fastssl.NTXentLoss(0.3, memory_bank_size=(bank_size, 5) if bank_size else 0, backend="triton").to(device)
    twin_fn = fastssl.NTXentLoss(0.3, memory_bank_size=(bank_size, 5) if bank_size else 0, backend="triton").to(device)
    twin_fn.load_state_dict(loss_fn.state_dict())
    if bank_size:
        twin_fn.memory_bank.bank.copy_(loss_fn.memory_bank.bank)

    def step(x, head, loss_fn):
        return loss_fn(head(x), head(x.flip(0) + 0.5))

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        x = torch.randn(7, 6, device=device)
        value = compiled(x, head, loss_fn)
        value.backward()
        expected = step(x, twin_head, twin_fn)
        expected.backward()
        torch.testing.assert_close(value, expected)
        torch.testing.assert_close(head.weight.grad, twin_head.weight.grad)
        if bank_size:
            torch.testing.assert_close(loss_fn.memory_bank.bank, twin_fn.memory_bank.bank)
    uniformity = torch.compile(lambda z: uniformity_loss(head(z), backend="triton"), fullgraph=True,
                               backend="aot_eager")
    z = torch.randn(9, 6, device=device)
    value = uniformity(z)
    value.backward()
    expected = uniformity_loss(twin_head(z), backend="triton")
    expected.backward()
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(head.weight.grad, twin_head.weight.grad)


@pytest.mark.parametrize("family", ["ntxent", "infonce", "uniformity"])
def test_auto_falls_back_to_torch_when_a_kernel_fails(family, monkeypatch):
    """Under "auto" a kernel that fails to compile or launch gives the torch result with one
    warning naming the kernel; an explicit backend="triton" raises the error."""
    from fastssl import _backend, ntxent

    def failing_launch(*args, **kwargs):
        raise RuntimeError("simulated launch failure")

    for launcher in ("pair_lse_forward", "infonce_forward"):
        monkeypatch.setattr(K, launcher, failing_launch)
    monkeypatch.setattr(_backend, "_FALLBACK_WARNED", set())
    # "auto" picks the kernels for CUDA tensors: make it do so for these CPU tensors.
    monkeypatch.setattr(ntxent, "resolve_backend", lambda backend, tensor: "triton")
    a, b = _inputs(6, 5, torch.float32, "cpu")
    bank = _bank(11, 5, "cpu")
    call = {
        "ntxent": lambda backend: FS.ntxent_loss(a, b, 0.3, backend=backend),
        "infonce": lambda backend: FS.infonce_loss(a, b, bank, 0.3, backend=backend),
        "uniformity": lambda backend: uniformity_loss(a, backend=backend),
    }[family]
    with pytest.warns(RuntimeWarning, match=f"kernel for {family} failed.*simulated launch failure"):
        first = call("auto")
    expected = call("torch")
    torch.testing.assert_close(first, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per kernel: the second failure is silent
        torch.testing.assert_close(call("auto"), expected)
    with pytest.raises(RuntimeError, match="simulated launch failure"):
        call("triton")


class _EagerOps(TorchDispatchMode):
    """Records the PyTorch operators a call dispatches around the kernels: inside the custom
    ops too (their bodies run again under the mode), not inside kernel launches (the
    interpreter's own tensor traffic). Views and detaches move no data and launch nothing:
    recorded apart."""

    def __init__(self):
        super().__init__()
        self.ops, self.views, self.launches, self._in_launch = [], [], 0, False

    def launch(self, original):
        def observed(*args, **kwargs):
            self.launches += 1
            self._in_launch = True
            try:
                return original(*args, **kwargs)
            finally:
                self._in_launch = False

        return observed

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._in_launch:
            return func(*args, **kwargs)
        if func.namespace == "fastssl":  # a custom op: record what its body dispatches
            from torch._library.custom_ops import _maybe_get_opdef

            with self:
                return _maybe_get_opdef(func._name)._init_fn(*args, **kwargs)
        (self.views if func.is_view else self.ops).append(str(func))
        return func(*args, **kwargs)


# Operators that wait for the device (.item(), bool(tensor), .tolist(), nonzero) or copy host
# data to it (torch.tensor(python data)).
_HOST_SYNCS = ("aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.lift_fresh", "aten.masked_select")


@pytest.mark.parametrize("family", ["ntxent", "infonce", "uniformity", "ntxent_module", "moco_module",
                                    "learnable_ntxent", "learnable_infonce"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_eager_ops_and_host_syncs_per_training_step(family, dtype, monkeypatch):
    """At most 16 PyTorch operators (allocations included) around the kernels per
    forward + backward, none of them a host sync or a host-to-device copy."""
    from fastssl import ntxent

    mode = _EagerOps()
    monkeypatch.setattr(K, "_launch", mode.launch(K._launch))
    # The bank's ring buffer as on a CUDA device (on the CPU it reads its pointer on the host).
    monkeypatch.setattr(ntxent, "_pointer_readable_on_host", lambda device: False)
    a, b = [x.requires_grad_(True) for x in _inputs(40, 24, dtype, "cpu")]
    bank = _bank(70, 24, "cpu")
    simclr = fastssl.NTXentLoss(0.3, backend="triton")
    moco = fastssl.NTXentLoss(0.3, memory_bank_size=(70, 24), backend="triton")
    tau = torch.nn.Parameter(torch.tensor(0.3))
    call = {
        "ntxent": lambda: FS.ntxent_loss(a, b, 0.3, backend="triton"),
        "infonce": lambda: FS.infonce_loss(a, b, bank, 0.3, backend="triton"),
        "uniformity": lambda: uniformity_loss(a, backend="triton"),
        "ntxent_module": lambda: simclr(a, b),
        "moco_module": lambda: moco(a, b),
        "learnable_ntxent": lambda: FS.ntxent_loss(a, b, tau, backend="triton"),
        "learnable_infonce": lambda: FS.infonce_loss(a, b, bank, tau, backend="triton"),
    }[family]
    call().backward()  # first call: bank allocation, compilation
    leaves = [a, b, tau] if family.startswith("learnable") else [a, b]
    # As the launch report counts (benchmarks/launch_capture.forward_backward): the loss's own
    # forward and backward -- the upstream gradient made outside, the input gradients returned
    # rather than accumulated into .grad (whose detach is the caller's, not the loss's).
    with mode:
        loss = call()
    seed = torch.ones_like(loss)
    with mode:
        torch.autograd.grad(loss, leaves, grad_outputs=seed, allow_unused=True)
    assert mode.launches >= 2
    assert not [op for op in mode.ops + mode.views if op.startswith(_HOST_SYNCS)], mode.ops
    limit = 16 if family != "moco_module" else 16 + _ENQUEUE_OPS
    counted = mode.ops + mode.views
    assert len(counted) <= limit, f"{len(counted)} operators: {counted}"


# The memory bank's snapshot and ring-buffer update (the module's state, not the loss), written
# in tensor operations: 24 operators, views included (25 with a bfloat16 batch: a cast).
_ENQUEUE_OPS = 25


_HEADLINE_CAPTURE = r"""
import json
from benchmarks import launch_report as R
out = {}
for case in R.HEADLINE_CASES:
    if case.family in ("ntxent", "infonce"):
        capture = R.capture_case(case)
        counted = [op for op in capture.eager_ops if op.category != "host"]  # the report's count
        out[case.name] = {"error": capture.error, "ops": [f"{op.op} ({op.phase})" for op in counted],
                          "syncs": len(capture.syncs), "launches": len(capture.launches),
                          "limit": R.TARGET_MAX_EAGER_OPS}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_headline_shapes_issue_at_most_16_eager_ops_as_the_launch_report_counts(tmp_path):
    """The launch report's own count (benchmarks/launch_capture: every ATen operator outside the
    kernels -- allocations, views, detaches, compute) of the CUDA paths at the NT-Xent and
    InfoNCE headline shapes: at most 16 per forward + backward, no host sync, no detach (the
    auxiliary outputs of the custom ops are non-differentiable). Captured without the
    interpreter, in a subprocess (meta tensors: no memory, nothing compiled)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update({"TRITON_CACHE_DIR": str(tmp_path / "cache"), "TMPDIR": str(tmp_path)})
    env["PYTHONPATH"] = os.pathsep.join([str(repo)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    result = subprocess.run([sys.executable, "-c", _HEADLINE_CAPTURE], env=env, cwd=repo, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    cases = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(cases) == 3, cases.keys()
    for name, case in cases.items():
        assert case["error"] is None, f"{name}: {case['error']}"
        assert case["launches"] >= 4 and case["syncs"] == 0, name
        assert len(case["ops"]) <= case["limit"], f"{name}: {len(case['ops'])} eager ops: {case['ops']}"
        assert not [op for op in case["ops"] if op.startswith("aten.detach")], f"{name}: {case['ops']}"


def test_kernel_argument_errors():
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        K.ntxent_loss_triton(torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64), 0.5)
    with pytest.raises(ValueError, match="power of two"):
        K.KernelConfig(24, 16, 16, True)
    with pytest.raises(ValueError, match="single_k"):
        K.ntxent_loss_triton(torch.randn(3, 40), torch.randn(3, 40), 0.5, config=K.KernelConfig(16, 16, 16, True))


def test_headline_shapes_fill_the_chip(monkeypatch):
    """The GPU schedule (132 SMs): NT-Xent 2N = 8192 and InfoNCE N = 256 against 65536 bank rows
    launch at least one full wave for the forward and the backward sweeps; 2N = 2**20 needs no
    split (and none is paid for)."""
    monkeypatch.setattr(K, "triton_interpreter_enabled", lambda: False)
    cpu = torch.device("cpu")  # not CUDA: the H200's 132 SMs are assumed
    cfg = K.default_config(128, torch.bfloat16)
    assert (cfg.block_m, cfg.num_warps) == (64, 4)

    def programs(rows, cols, flops, partial_bytes):
        splits, cols_per_split = K._split_columns(cfg, rows, cols, flops, partial_bytes, cpu)
        assert cols_per_split % cfg.block_n == 0 and (splits - 1) * cols_per_split < cols <= splits * cols_per_split
        return splits, -(-rows // cfg.block_m) * splits

    d = 128
    assert programs(8192, 8192, 2 * d, 16 * 8192) == (2, 256)  # NT-Xent forward
    assert programs(8192, 8192, 4 * d, 8 * 8192 * d) == (2, 256)  # backward, partial gradients
    splits, count = programs(256, 65536, 2 * d, 16 * 256)  # InfoNCE forward
    assert count >= K.DEFAULT_SMS and splits > 32
    splits, count = programs(256, 65536, 4 * d, 8 * 256 * d)  # backward
    assert count >= K.DEFAULT_SMS and splits * 256 * d * 4 <= 16 * 2**20  # partials ≤ 16 MiB
    assert programs(2**20, 2**20, 4 * d, 8 * 2**20 * d)[0] == 1
    # The rule itself: whole waves, then the cheapest split.
    assert K.column_splits(row_blocks=264, col_tiles=100, sweep_seconds=1.0, partial_seconds=0.0) == 1
    assert K.column_splits(row_blocks=1, col_tiles=5, sweep_seconds=1.0, partial_seconds=0.0) == 5
    assert K.column_splits(row_blocks=1, col_tiles=1000, sweep_seconds=1.0, partial_seconds=1.0) == 1


def test_default_configs_cover_every_width(monkeypatch):
    monkeypatch.setattr(K, "triton_interpreter_enabled", lambda: False)  # the GPU table
    for d in (1, 3, 16, 17, 64, 65, 128, 129, 256, 257, 1000, 4096):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            operand = K.operand_dtype(d, dtype)
            cfg = K.default_config(d, operand)
            assert cfg.single_k == (cfg.block_k >= d)
            assert cfg.block_k <= 256 and cfg.block_m * cfg.block_k <= 128 * 128


# --------------------------------------------------------------------------------------------
# GPU lane only: the sizes the design targets
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_large_batch_runs_deterministically_in_bounded_memory():
    """2N = 131072, d = 128, bf16 on one GPU (the reference would need 2N×2N logits = 68 GB in
    float32): finite, equal to the PyTorch path, deterministic, loss memory O(N·d)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    n, d = 65536, 128
    a, b = [x.requires_grad_(True) for x in _inputs(n, d, torch.bfloat16, "cuda")]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = K.ntxent_loss_triton(a, b, 0.1)
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert torch.isfinite(loss) and torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    assert peak < 64 * 2 * n * d, f"peak {peak / 2**20:.0f} MiB is not O(N·d)"
    first = (a.grad.clone(), b.grad.clone())
    a.grad, b.grad = None, None
    K.ntxent_loss_triton(a, b, 0.1).backward()
    assert torch.equal(first[0], a.grad) and torch.equal(first[1], b.grad)
    torch_value = FS.ntxent_loss(a.detach(), b.detach(), 0.1, backend="torch")
    assert loss.item() == pytest.approx(torch_value.item(), rel=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("bank_size", [0, 96], ids=["simclr", "moco"])
def test_training_step_is_captured_in_a_cuda_graph(bank_size):
    """Forward, backward and optimizer step with NTXentLoss on the kernels, captured in one CUDA
    graph (no host sync, no host-to-device copy, no allocation outside the graph's pool) and
    replayed: the same loss, weights and bank as the same step run eagerly."""
    import copy

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32)).cuda()
    loss_fn = fastssl.NTXentLoss(0.2, memory_bank_size=(bank_size, 32) if bank_size else 0, backend="triton").cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(40, 48, device="cuda")
    noise = 0.1 * torch.randn(40, 48, device="cuda")

    def step(model, loss_fn, optimizer):
        optimizer.zero_grad(set_to_none=False)
        loss = loss_fn(model(x), model(x + noise))
        loss.backward()
        optimizer.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compile the kernels, allocate the bank and grads
        for _ in range(3):
            step(model, loss_fn, optimizer)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(model, loss_fn, optimizer)

    twin_model, twin_loss_fn = copy.deepcopy(model), copy.deepcopy(loss_fn)
    twin_optimizer = torch.optim.SGD(twin_model.parameters(), lr=0.1, momentum=0.9)
    twin_optimizer.load_state_dict(optimizer.state_dict())
    for _ in range(2):
        graph.replay()
        expected = step(twin_model, twin_loss_fn, twin_optimizer)
        torch.cuda.synchronize()
        torch.testing.assert_close(static_loss, expected, rtol=1e-5, atol=1e-6)
        for ours, theirs in zip(model.parameters(), twin_model.parameters()):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        if bank_size:
            torch.testing.assert_close(loss_fn.memory_bank.bank, twin_loss_fn.memory_bank.bank)
            assert torch.equal(loss_fn.memory_bank.bank_ptr, twin_loss_fn.memory_bank.bank_ptr)
