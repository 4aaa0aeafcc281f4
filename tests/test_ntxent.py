"""NT-Xent, InfoNCE (memory bank) and uniformity: the PyTorch path, the module, lightly equivalence.

Every value and input gradient is checked against :mod:`fastssl.reference` run in float64
(``assert_matches_reference``). The Triton kernels are tested in ``test_ntxent_triton.py``.
"""

from __future__ import annotations

import math
import os
import socket
import tempfile
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fastssl
import fastssl.functional as FS
from fastssl import ntxent, reference
import _lightly
from _helpers import assert_matches_reference, awkward_inputs

TEMPERATURES = (0.1, 1.0, 7.0, -1.0)
BANK_SIZES = (1, 15, 16, 17)
ALL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _bank(k: int, d: int) -> torch.Tensor:
    """A memory bank as the module keeps it: normalized rows, float32."""
    return F.normalize(torch.randn(k, d), dim=1)


@pytest.fixture
def small_chunks(monkeypatch):
    """Force three or four row chunks at every N (one row each below N = 3), so the chunk loop
    and its seams are exercised."""
    monkeypatch.setattr(ntxent, "_rows_per_chunk", lambda n_cols, chunk_rows: max(1, n_cols // 3))


def pairwise_uniformity(z: torch.Tensor, t: float) -> torch.Tensor:
    """Uniformity written with explicit differences (``torch.cdist``, which the reference uses,
    has no half-precision CPU kernel): measures PyTorch's own half-precision error."""
    n = z.shape[0]
    z = F.normalize(z, dim=1)
    sq_dist = (z[:, None, :] - z[None, :, :]).pow(2).sum(-1)
    distinct = ~torch.eye(n, dtype=torch.bool, device=z.device)
    return torch.logsumexp(-t * sq_dist[distinct], dim=0) - math.log(n * (n - 1))


# --------------------------------------------------------------------------------------------
# Values and gradients against the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("n,d", [(1, 1), (1, 129), (2, 3), (2, 129), (3, 1), (3, 129), (65, 3), (65, 129)])
def test_ntxent_torch_matches_reference(n, d, dtype, small_chunks):
    for i, temperature in enumerate(TEMPERATURES):
        a, b = awkward_inputs(n, d, dtype=dtype, non_contiguous=(i % 2 == 0))
        assert_matches_reference(
            lambda x, y: FS.ntxent_loss(x, y, temperature, backend="torch"),
            lambda x, y: reference.ntxent_loss(x, y, temperature),
            [a, b],
        )


@pytest.mark.parametrize("temperature", [0.3, -1.0, 0.01])
@pytest.mark.parametrize("n,d", [(1, 3), (3, 129), (40, 7)])
def test_ntxent_torch_single_chunk_matches_reference(n, d, temperature):
    """Without the small-chunk fixture the logits form one chunk, which the backward reuses;
    τ = 0.01 (2/|τ| = 200) takes the two-exponential form of the backward."""
    for dtype in (torch.float32, torch.bfloat16):
        a, b = awkward_inputs(n, d, dtype=dtype, non_contiguous=True)
        assert_matches_reference(
            lambda x, y: FS.ntxent_loss(x, y, temperature, backend="torch"),
            lambda x, y: reference.ntxent_loss(x, y, temperature),
            [a, b],
        )


@pytest.mark.parametrize("temperature", [0.3, 0.01])
def test_fixed_shift_and_row_maximum_forms_agree(temperature):
    """The fixed-shift form (one product with [Z, e^{-lo} Z]) and the row-maximum form (two
    exponentials) give the same log-sum-exps and gradient, kept chunk or recomputed chunks."""
    z = F.normalize(torch.randn(30, 6, dtype=torch.float64), dim=1)
    inv = 1 / temperature
    assert (ntxent._fixed_shift(inv, 30) is not None) == (temperature > 0.1)

    def run(keep, chunk_rows):
        hi, lo, positives, kept = ntxent._pair_lse_forward(z, z, inv, 15, 0, True, chunk_rows, keep=keep)
        assert (kept is not None) == (keep and chunk_rows is None)
        grad = ntxent._pair_lse_backward(z, z, (hi, lo), (hi, lo), inv, 15, 0, True, chunk_rows, kept=kept)
        return hi + lo, lo - positives, grad

    results = [run(True, None), run(False, 7)]
    with mock.patch.object(ntxent, "_fixed_shift", lambda inv_temp, n_cols: None):
        results += [run(True, None), run(False, 7)]
    for other in results[1:]:
        for ours, theirs in zip(results[0], other):
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    # The oracle: per-row log-sum-exp and loss of the textbook formula.
    logits = (z @ z.T * inv).fill_diagonal_(float("-inf"))
    torch.testing.assert_close(results[0][0], torch.logsumexp(logits, dim=1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("temperature", [1e-3, 1e-4, -1e-4])
def test_ntxent_torch_keeps_float32_precision_at_small_temperatures(temperature):
    """At |τ| <= 1e-3 the logits reach ~1e4, where one float32 rounding of a log-sum-exp moves
    every probability by ~1e-3: the torch path's value and gradients stay within twice PyTorch's
    own float32 error (the reference formula run in float32), both against float64."""
    torch.manual_seed(0)
    for n, d, chunk_rows in [(8, 5, None), (33, 16, None), (33, 16, 20)]:
        a, b = awkward_inputs(n, d)
        inputs64 = [a.double(), b.double()]

        def grads(fn, xs):
            leaves = [x.clone().requires_grad_(True) for x in xs]
            value = fn(*leaves)
            return [value.detach().double()] + [g.double() for g in torch.autograd.grad(value, leaves)]

        exact = grads(lambda x, y: reference.ntxent_loss(x, y, temperature), inputs64)
        pytorch = grads(lambda x, y: reference.ntxent_loss(x, y, temperature), [a, b])
        ours = grads(lambda x, y: ntxent._ntxent_torch(x, y, temperature, False, chunk_rows), [a, b])
        for name, o, p, e in zip(["loss", "grad0", "grad1"], ours, pytorch, exact):
            err_ours, err_torch = (o - e).abs().max().item(), (p - e).abs().max().item()
            floor = 1e-6 * e.abs().max().item()
            assert err_ours <= 2 * err_torch + floor, f"{name} n={n}: {err_ours:.3e} vs PyTorch's {err_torch:.3e}"


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("n,d", [(1, 3), (2, 1), (3, 129), (65, 3)])
def test_infonce_torch_matches_reference(n, d, dtype, small_chunks):
    for i, bank_size in enumerate(BANK_SIZES):
        temperature = TEMPERATURES[i]
        a, b = awkward_inputs(n, d, dtype=dtype, non_contiguous=(i % 2 == 1))
        bank = _bank(bank_size, d)
        assert_matches_reference(
            lambda x, y: FS.infonce_loss(x, y, bank, temperature, backend="torch"),
            lambda x, y: reference.infonce_loss(x, y, bank, temperature),
            [a, b],
        )


def test_infonce_bank_gets_no_gradient_and_is_used_as_given():
    q, k = torch.randn(4, 5), torch.randn(4, 5)
    bank = (3.0 * torch.randn(6, 5)).requires_grad_(True)  # not normalized: used as given
    value = FS.infonce_loss(q, k, bank, 0.3, backend="torch")
    assert not value.requires_grad
    assert value.item() == pytest.approx(reference.infonce_loss(q.double(), k.double(), bank.detach().double(), 0.3).item(), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("n,d", [(2, 1), (3, 129), (65, 3)])
def test_uniformity_torch_matches_reference(n, d, dtype, small_chunks):
    for t in (2.0, 0.5, -1.0):
        (z,) = awkward_inputs(n, d, dtype=dtype, views=1, non_contiguous=True)
        assert_matches_reference(
            lambda x: ntxent.uniformity_loss(x, t, backend="torch"),
            lambda x: reference.uniformity(x, t),
            [z],
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_uniformity_torch_half_precision(dtype, small_chunks):
    (z,) = awkward_inputs(33, 7, dtype=dtype, views=1)
    # the explicit-difference formula is the reference's formula
    assert pairwise_uniformity(z.double(), 2.0).item() == pytest.approx(reference.uniformity(z.double()).item(), rel=1e-12)
    assert_matches_reference(lambda x: ntxent.uniformity_loss(x, backend="torch"), lambda x: pairwise_uniformity(x, 2.0), [z])


def test_uniformity_edge_cases():
    for backend in ("torch", "reference"):
        assert math.isnan(ntxent.uniformity_loss(torch.randn(1, 4), backend=backend).item())
        collapsed = torch.randn(1, 6).repeat(9, 1)
        assert ntxent.uniformity_loss(collapsed, backend=backend).item() == pytest.approx(0.0, abs=1e-6)
    value = ntxent.uniformity_loss(torch.randn(5, 3).bfloat16())
    assert value.dtype == torch.float32 and value.dim() == 0
    with pytest.raises(ValueError, match="t must be finite"):
        ntxent.uniformity_loss(torch.randn(5, 3), float("inf"))


def test_reference_backend_returns_float32():
    a, b = awkward_inputs(4, 3, dtype=torch.bfloat16)
    value = FS.ntxent_loss(a, b, backend="reference")
    assert value.dtype == torch.float32 and value.dim() == 0
    assert value.item() == pytest.approx(reference.ntxent_loss(a.double(), b.double()).item(), rel=2e-2)


def test_float64_inputs_accumulate_in_float64():
    a, b = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    assert_matches_reference(
        lambda x, y: FS.ntxent_loss(x, y, 0.2, backend="torch"),
        lambda x, y: reference.ntxent_loss(x, y, 0.2),
        [a, b],
        rtol=1e-7,  # the loss itself comes back in float32, the gradients in float64
        atol=1e-12,
    )


# --------------------------------------------------------------------------------------------
# Learnable temperature, extreme magnitudes, the reference backend's dtype rule
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("n,d,temperature", [(1, 3, 0.3), (2, 129, -0.7), (3, 2, 0.05), (17, 6, 0.01)])
def test_tensor_temperature_gets_its_gradient(backend, dtype, n, d, temperature, small_chunks):
    """A one-element tensor τ (learnable) is used as it is: the loss, the inputs' and τ's
    gradients match the float64 formula, for NT-Xent and InfoNCE (τ = 0.01: the row-maximum form)."""
    a, b = awkward_inputs(n, d, dtype=dtype, non_contiguous=True)
    tau = torch.tensor(temperature)
    bank = _bank(5, d)
    assert_matches_reference(
        lambda x, y, t: FS.ntxent_loss(x, y, t, backend=backend),
        lambda x, y, t: reference.ntxent_loss(x, y, t.to(x.dtype)),
        [a, b, tau],
    )
    assert_matches_reference(
        lambda x, y, t: FS.infonce_loss(x, y, bank, t, backend=backend),
        lambda x, y, t: reference.infonce_loss(x, y, bank, t.to(x.dtype)),
        [a, b, tau],
    )


def test_module_registers_and_trains_a_parameter_temperature(lightly_ntxent):
    """As lightly: ``NTXentLoss(temperature=nn.Parameter(...))`` lists τ among its parameters and
    state, an optimizer moves it, and its gradient is lightly's (with and without a bank)."""
    for bank_size in (0, 8):
        torch.manual_seed(2)
        ours = fastssl.NTXentLoss(temperature=torch.nn.Parameter(torch.tensor(0.4)), memory_bank_size=(bank_size, 6),
                                  backend="torch")
        torch.manual_seed(2)
        theirs = lightly_ntxent(temperature=torch.nn.Parameter(torch.tensor(0.4)), memory_bank_size=(bank_size, 6))
        assert [name for name, _ in ours.named_parameters()] == ["temperature"]
        assert set(ours.state_dict()) == set(theirs.state_dict())
        a, b = awkward_inputs(5, 6)
        v0, _, _ = _value_and_grads(theirs, a, b)
        v1, _, _ = _value_and_grads(ours, a, b)
        torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.temperature.grad, theirs.temperature.grad, rtol=1e-4, atol=1e-6)
        before = ours.temperature.detach().clone()
        torch.optim.SGD(ours.parameters(), lr=0.1).step()
        assert ours.temperature.item() != before.item()
    with pytest.raises(ValueError, match="temperature"):
        fastssl.NTXentLoss(temperature=torch.nn.Parameter(torch.tensor(1e-9)))
    with pytest.raises(TypeError, match="one-element"):
        fastssl.NTXentLoss(temperature=torch.ones(2))


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("scale", [1e19, 1e-19, 1e37])
def test_extreme_magnitudes_give_the_float64_value(backend, scale):
    """float32 rows near 1e19 (squares overflow) or 1e-19 (squares underflow; below the clamp of
    F.normalize) give the float64 value and gradient: NT-Xent, InfoNCE, uniformity; also with a
    row of zeros beside normal ones."""
    torch.manual_seed(0)
    a, b = [x * scale for x in awkward_inputs(7, 9)]
    bank = _bank(6, 9)
    # Gradients scale as 1/scale: above 1 the absolute floor must not swallow them; below, the
    # values (log-sum-exps of ~0 logits) set it.
    atol = 1e-30 if scale > 1 else 1e-6
    assert_matches_reference(lambda x, y: FS.ntxent_loss(x, y, 0.3, backend=backend),
                             lambda x, y: reference.ntxent_loss(x, y, 0.3), [a, b], atol=atol)
    assert_matches_reference(lambda x, y: FS.infonce_loss(x, y, bank, 0.3, backend=backend),
                             lambda x, y: reference.infonce_loss(x, y, bank, 0.3), [a, b], atol=atol)
    assert_matches_reference(lambda x: ntxent.uniformity_loss(x, backend=backend),
                             lambda x: reference.uniformity(x), [a], atol=atol)
    mixed = awkward_inputs(6, 5, views=1)[0]
    mixed[1] = 0.0
    mixed[3] *= scale
    assert_matches_reference(lambda x: ntxent.uniformity_loss(x, backend=backend), reference.uniformity, [mixed])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_reference_backend_computes_half_inputs_in_float32(dtype):
    """The reference backend's dtype rule: half inputs are computed in float32 (float32 accuracy,
    not half's), gradients come back in the inputs' dtypes, mixed views in their promotion."""
    a, b = awkward_inputs(6, 5, dtype=dtype)
    bank = _bank(7, 5)
    for fn, ref in [
        (lambda x, y: FS.ntxent_loss(x, y, 0.2, backend="reference"), lambda x, y: reference.ntxent_loss(x, y, 0.2)),
        (lambda x, y: FS.infonce_loss(x, y, bank, 0.2, backend="reference"),
         lambda x, y: reference.infonce_loss(x, y, bank, 0.2)),
    ]:
        assert_matches_reference(fn, lambda x, y: ref(x.double(), y.double()), [a, b])  # float32 accuracy
    x, y = a.clone().requires_grad_(True), b.to(torch.float16 if dtype == torch.bfloat16 else torch.bfloat16)
    y.requires_grad_(True)
    value = FS.ntxent_loss(x, y, 0.2, backend="reference")
    value.backward()
    assert value.dtype == torch.float32 and x.grad.dtype == x.dtype and y.grad.dtype == y.dtype
    assert value.item() == pytest.approx(reference.ntxent_loss(x.double(), y.double(), 0.2).item(), rel=1e-5)
    (z,) = awkward_inputs(9, 4, dtype=dtype, views=1)
    assert ntxent.uniformity_loss(z, backend="reference").item() == pytest.approx(
        reference.uniformity(z.double()).item(), rel=1e-5)


def test_reference_backend_near_the_float16_range():
    """float16 embeddings near 6e4 (their squares overflow float16): the reference backend gives
    the float64 value, as the torch path does."""
    torch.manual_seed(1)
    a, b = [(6e4 * torch.rand(5, 8) - 3e4).half() for _ in range(2)]
    a[0, 0] = 65000.0
    expected = reference.ntxent_loss(a.double(), b.double(), 0.5).item()
    for backend in ("reference", "torch"):
        assert FS.ntxent_loss(a, b, 0.5, backend=backend).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("batches", [[3, 4, 5], [20], [11, 11, 2], [1, 1, 30]])
def test_bank_ring_buffer_row_writes_equal_the_tensor_form(batches, monkeypatch):
    """The CPU's row-wise enqueue and the tensor form used on devices (and under torch.compile)
    leave the same bank and pointer: wrap-around, a batch as large as the bank, larger."""
    torch.manual_seed(0)
    row_wise, tensor_form = ntxent.MemoryBank(12, 3), ntxent.MemoryBank(12, 3)
    tensor_form.bank.copy_(row_wise.bank)
    for size in batches:
        keys = torch.randn(size, 3)
        row_wise.enqueue(keys)
        with monkeypatch.context() as patch:
            patch.setattr(ntxent, "_pointer_readable_on_host", lambda device: False)
            tensor_form.enqueue(keys)
        assert torch.equal(row_wise.bank, tensor_form.bank)
        assert torch.equal(row_wise.bank_ptr, tensor_form.bank_ptr)


# --------------------------------------------------------------------------------------------
# The seed's exercises
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_seed_gradient_wrt_similarity_is_softmax_over_tau(temperature):
    """Seed 000: ∂ℓ_k/∂s_m = p_m/τ for a negative m, (p₊ - 1)/τ for the positive."""
    n = 5
    z = F.normalize(torch.randn(2 * n, 8, dtype=torch.float64), dim=1)
    sim = (z @ z.T).requires_grad_(True)  # s_km = cos(z_k, z_m)
    self_mask = torch.eye(2 * n, dtype=torch.bool)
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    logits = (sim / temperature).masked_fill(self_mask, float("-inf"))
    per_row = F.cross_entropy(logits, positives, reduction="none")  # ℓ_k
    for k in (0, n + 2):
        (grad,) = torch.autograd.grad(per_row[k], sim, retain_graph=True)
        p = torch.softmax(logits[k].detach(), dim=0)  # over m ≠ k, the positive included
        expected = p / temperature
        expected[positives[k]] -= 1 / temperature
        torch.testing.assert_close(grad[k], expected, rtol=1e-12, atol=1e-14)
        assert grad[k, k] == 0 and (grad[torch.arange(2 * n) != k] == 0).all()


def closed_form_unit_norm_gradient(out0: torch.Tensor, out1: torch.Tensor, temperature: float):
    """dL/dx for unit-norm rows from the seed's ∂ℓ_k/∂s_m: (1/(2Nτ))·P⊥(G + Gᵀ)Z, G = p - onehot."""
    n = out0.shape[0]
    z = torch.cat([out0, out1]).double()
    logits = (z @ z.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    g = torch.softmax(logits, dim=1)
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    g[torch.arange(2 * n, device=z.device), positives] -= 1
    dz = (g + g.T) @ z / (2 * n * temperature)
    dx = dz - z * (z * dz).sum(dim=1, keepdim=True)  # normalization's backward at ‖x‖ = 1
    return dx[:n], dx[n:]


@pytest.mark.parametrize("temperature", [0.1, -1.0])
def test_torch_gradient_equals_seed_closed_form(temperature, small_chunks):
    a, b = [F.normalize(x, dim=1).requires_grad_(True) for x in awkward_inputs(7, 5)]
    FS.ntxent_loss(a, b, temperature, backend="torch").backward()
    ga, gb = closed_form_unit_norm_gradient(a.detach(), b.detach(), temperature)
    torch.testing.assert_close(a.grad.double(), ga, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad.double(), gb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("n", [1, 2, 5, 64])
def test_fully_correlated_embeddings_give_log_of_2n_minus_1(backend, n):
    """Seed 000: with all rows identical every logit is 1/τ, so ℓ = -log(1/(2N-1))."""
    row = torch.randn(1, 12)
    for temperature in TEMPERATURES:
        value = FS.ntxent_loss(row.repeat(n, 1), 3.0 * row.repeat(n, 1), temperature, backend=backend)
        assert value.item() == pytest.approx(-math.log(1 / (2 * n - 1)), rel=1e-5, abs=1e-6)


# --------------------------------------------------------------------------------------------
# Memory: the chunked path never holds the 2N×2N matrix
# --------------------------------------------------------------------------------------------


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor any ATen op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _largest_saved_and_produced(fn, inputs):
    saved = [0]

    def pack(t):
        saved[0] = max(saved[0], t.numel())
        return t

    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    with _LargestOutput() as mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*leaves).backward()
    return saved[0], mode.largest


@pytest.mark.parametrize("what", ["ntxent", "uniformity", "infonce"])
def test_chunked_path_memory_is_n_times_chunk(what, monkeypatch):
    n, d, chunk = 64, 4, 8
    monkeypatch.setattr(ntxent, "_MAX_CHUNK_ELEMENTS", chunk * 2 * n)
    a, b = awkward_inputs(n, d)
    bank = _bank(2 * n - 1, d)  # 1 + K = 2N logits per query, as NT-Xent's 2N columns
    fns = {
        "ntxent": (lambda x, y: FS.ntxent_loss(x, y, 0.5, backend="torch"), lambda x, y: FS.ntxent_loss(x, y, 0.5, backend="reference"), [a, b]),
        "uniformity": (lambda x: ntxent.uniformity_loss(x, backend="torch"), lambda x: ntxent.uniformity_loss(x, backend="reference"), [torch.cat([a, b])]),
        "infonce": (lambda x, y: FS.infonce_loss(x, y, bank, 0.5, backend="torch"), lambda x, y: FS.infonce_loss(x, y, bank, 0.5, backend="reference"), [a, b]),
    }
    fn, ref_fn, inputs = fns[what]
    saved, produced = _largest_saved_and_produced(fn, inputs)
    bound = chunk * 2 * n  # one chunk of logits
    # O(N·d) buffers beside it: the backward's (2N, 2d) operand [Z, e^{-lo} Z], uniformity's two
    # bias features. Both bounds stay far below the (2N)² logits.
    rows_bound = 2 * (2 * n) * (d + 2)
    assert saved <= max(bound, rows_bound), f"a saved tensor has {saved} elements (chunk bound {bound})"
    assert produced <= max(bound, rows_bound), f"an op produced {produced} elements (chunk bound {bound})"
    assert max(bound, rows_bound) * 4 < (2 * n) ** 2
    # The probe sees the full matrix when it is there: the reference materializes all logits.
    _, produced_ref = _largest_saved_and_produced(ref_fn, inputs)
    all_logits = {"ntxent": (2 * n) ** 2, "uniformity": (2 * n) ** 2, "infonce": n * 2 * n}[what]
    assert produced_ref >= all_logits - 2 * n


def test_default_chunk_is_bounded():
    assert ntxent._rows_per_chunk(131072, None) * 131072 <= ntxent._MAX_CHUNK_ELEMENTS
    assert ntxent._rows_per_chunk(3, None) * 3 <= ntxent._MAX_CHUNK_ELEMENTS
    assert ntxent._rows_per_chunk(1 << 30, None) == 1


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------


def _compile_and_check(backend: str):
    torch._dynamo.reset()

    def step(x, y):
        return FS.ntxent_loss(x, y, 0.3, backend="torch")

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    a, b = awkward_inputs(6, 5)
    assert_matches_reference(compiled, lambda x, y: reference.ntxent_loss(x, y, 0.3), [a, b])


def test_torch_compile_fullgraph_traces_forward_and_backward():
    # aot_eager: Dynamo must capture the whole function (fullgraph) and AOTAutograd the
    # hand-written backward, without the C++ code generation of the default backend.
    _compile_and_check("aot_eager")


@pytest.mark.slow
def test_torch_compile_fullgraph_inductor():
    _compile_and_check("inductor")


# --------------------------------------------------------------------------------------------
# The module, and equivalence with lightly's NTXentLoss
# --------------------------------------------------------------------------------------------


def test_module_matches_functional_and_validates():
    a, b = awkward_inputs(6, 4)
    module = fastssl.NTXentLoss(temperature=0.2, backend="torch")
    assert module(a, b).item() == pytest.approx(FS.ntxent_loss(a, b, 0.2, backend="reference").item(), rel=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        module(a, b[:3])
    with pytest.raises(ValueError, match="temperature"):
        fastssl.NTXentLoss(temperature=1e-9)


def test_module_accepts_numpy_integer_bank_sizes():
    """NumPy integer scalars (as lightly accepts them, e.g. from a config array) for the bank's
    size and dimension, stored as Python ints; bools (Python's or NumPy's) are still refused."""
    np = pytest.importorskip("numpy")
    sized = fastssl.NTXentLoss(memory_bank_size=np.int64(16384), backend="torch")
    assert sized.memory_bank_size == 16384 and type(sized.memory_bank_size) is int
    assert sized.bank.numel() == 0  # the dimension comes with the first batch
    for pair in [(np.int64(12), np.int64(5)), (np.int32(12), 5), np.array([12, 5], dtype=np.int64)]:
        module = fastssl.NTXentLoss(memory_bank_size=pair, backend="torch")
        assert module.memory_bank_size == 12 and module.bank.shape == (12, 5)
    q, k = awkward_inputs(4, 5)
    torch.manual_seed(0)
    numpy_sized = fastssl.NTXentLoss(0.3, memory_bank_size=(np.int64(12), np.int64(5)), backend="torch")
    torch.manual_seed(0)
    int_sized = fastssl.NTXentLoss(0.3, memory_bank_size=(12, 5), backend="torch")
    assert torch.equal(numpy_sized.bank, int_sized.bank)
    assert numpy_sized(q, k).item() == pytest.approx(int_sized(q, k).item(), rel=1e-6)
    for bad in (np.bool_(True), True, (np.bool_(True), 5), (12, True)):
        with pytest.raises(TypeError, match="bool"):
            fastssl.NTXentLoss(memory_bank_size=bad)
    with pytest.raises(ValueError, match=">= 0"):
        fastssl.NTXentLoss(memory_bank_size=np.int64(-1))
    with pytest.raises(TypeError, match="int"):
        fastssl.NTXentLoss(memory_bank_size=(np.float64(12.0), 5))


def test_module_bank_gradients_match_reference():
    q, k = awkward_inputs(5, 6)
    torch.manual_seed(3)
    module = fastssl.NTXentLoss(temperature=0.4, memory_bank_size=(16, 6), backend="torch")
    bank = module.bank.clone()

    def ours(x, y):
        module.bank.copy_(bank)
        module.bank_ptr.zero_()
        return module(x, y)

    assert_matches_reference(ours, lambda x, y: reference.infonce_loss(x, y, bank, 0.4), [q, k])


@pytest.fixture
def lightly_ntxent():
    """lightly's ``NTXentLoss`` class (loaded without torchvision by ``tests/_lightly.py``)."""
    lightly = _lightly.load()
    if lightly is None:
        pytest.skip("lightly is not installed or not importable")
    return lightly.NTXentLoss


def _value_and_grads(module, a, b):
    x, y = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    value = module(x, y)
    value.backward()
    return value.detach(), x.grad, y.grad


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("temperature", [0.5, 0.07, -1.0])
def test_equivalent_to_lightly_without_bank(lightly_ntxent, backend, temperature):
    theirs = lightly_ntxent(temperature=temperature)
    ours = fastssl.NTXentLoss(temperature=temperature, backend=backend)
    for n, d in [(1, 3), (8, 16)]:
        a, b = awkward_inputs(n, d, non_contiguous=True)
        v0, ga0, gb0 = _value_and_grads(theirs, a, b)
        v1, ga1, gb1 = _value_and_grads(ours, a, b)
        torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-6)
        # N = 1: the true gradient is 0 (a single column per row); float32 rounding of the
        # probabilities leaves ~1e-7 of the logits' scale 1/|τ|.
        atol = 1e-6 * max(1.0, 1.0 / abs(temperature))
        torch.testing.assert_close(ga1, ga0, rtol=1e-4, atol=atol)
        torch.testing.assert_close(gb1, gb0, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("bank_size", BANK_SIZES)
def test_equivalent_to_lightly_with_bank(lightly_ntxent, bank_size):
    d, temperature = 5, 0.3
    torch.manual_seed(11)
    theirs = lightly_ntxent(temperature=temperature, memory_bank_size=(bank_size, d))
    torch.manual_seed(11)
    ours = fastssl.NTXentLoss(temperature=temperature, memory_bank_size=(bank_size, d), backend="torch")
    torch.testing.assert_close(ours.bank, theirs.memory_bank.bank, rtol=0, atol=0)
    for step, n in enumerate([4, 6, 4, 9, 3]):
        a, b = awkward_inputs(n, d, non_contiguous=(step % 2 == 0))
        if step == 3:  # evaluation: no gradient, the bank must stay as it is
            with torch.no_grad():
                v0, v1 = theirs(a, b), ours(a, b)
        else:
            v0, ga0, gb0 = _value_and_grads(theirs, a, b)
            v1, ga1, gb1 = _value_and_grads(ours, a, b)
            torch.testing.assert_close(ga1, ga0, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(gb1, gb0, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-6)
        assert torch.equal(ours.bank, theirs.memory_bank.bank)
        assert int(ours.bank_ptr) == int(theirs.memory_bank.bank_ptr)


# --------------------------------------------------------------------------------------------
# Distributed: 2 and 3 processes, gloo, unequal batch sizes
# --------------------------------------------------------------------------------------------

D = 5
BANK = 11
# Per-rank batch sizes as DDP without drop_last gives them (a short last batch; a single sample).
UNEQUAL_SPLITS = {2: [2, 5], 3: [4, 1, 3]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backends():
    backends = ["torch", "reference"]
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        backends.append("triton")
    return backends


def _global_inputs(total: int):
    g = torch.Generator().manual_seed(7)
    out0 = torch.randn(total, D, generator=g)
    out1 = torch.randn(total, D, generator=g)
    bank = F.normalize(torch.randn(BANK, D, generator=g), dim=1)
    return out0, out1, bank


def _loss(name: str, a, b, bank, temperature, backend: str, gather: bool):
    if name == "ntxent":
        return FS.ntxent_loss(a, b, temperature, gather_distributed=gather, backend=backend)
    return FS.infonce_loss(a, b, bank, temperature, gather_distributed=gather, backend=backend)


def _moco_steps(module, batches):
    """Two training steps of MoCo's NTXentLoss; per step the loss, the input gradients, and the
    bank and pointer after the step's enqueue."""
    out = []
    for a, b in batches:
        a, b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        value = module(a, b)
        value.backward()
        out.append((value.detach(), a.grad, b.grad, module.bank.clone(), module.bank_ptr.clone()))
    return out


def _distributed_worker(rank: int, world: int, port: int, result_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        sizes = UNEQUAL_SPLITS[world]
        out0, out1, bank = _global_inputs(sum(sizes))
        rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        results = {}
        for backend in _backends():
            for name in ("ntxent", "infonce"):
                for learnable in (False, True):
                    a = out0[rows].clone().requires_grad_(True)
                    b = out1[rows].clone().requires_grad_(True)
                    tau = torch.nn.Parameter(torch.tensor(0.3)) if learnable else 0.3
                    value = _loss(name, a, b, bank, tau, backend, True)
                    value.backward()
                    results[(backend, name, learnable)] = (value.detach(), a.grad, b.grad, tau.grad if learnable else None)
            # MoCo: the bank is filled with every rank's keys (unequal counts), the same on all ranks.
            torch.manual_seed(5)
            module = fastssl.NTXentLoss(0.3, memory_bank_size=(BANK, D), gather_distributed=True, backend=backend)
            second = slice(rows.start, rows.stop)  # a second step on the same rows, shifted values
            results[(backend, "moco")] = _moco_steps(module, [(out0[rows], out1[rows]), (out1[second], out0[second])])
        torch.save(results, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # process start-ups and the interpreted kernels: ~20-40 s per world size
@pytest.mark.parametrize("world", sorted(UNEQUAL_SPLITS))
def test_gather_distributed_unequal_batches(world):
    """Ranks holding different batch sizes: each rank reports the single-process loss of the
    concatenated batch and its input gradients are world_size × its slice of the single-process
    gradient, on every backend, NT-Xent and InfoNCE; a learnable temperature's gradient,
    averaged over ranks as DDP does, is the single-process one; MoCo's bank receives every
    rank's keys in rank order and every rank keeps the same bank and pointer."""
    sizes = UNEQUAL_SPLITS[world]
    out0, out1, bank = _global_inputs(sum(sizes))
    expected = {}
    for name in ("ntxent", "infonce"):
        a, b = out0.double().requires_grad_(True), out1.double().requires_grad_(True)
        tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        if name == "ntxent":
            value = reference.ntxent_loss(a, b, tau)
        else:
            value = reference.infonce_loss(a, b, bank.double(), tau)
        value.backward()
        expected[name] = (value.detach(), a.grad, b.grad, tau.grad)
    torch.manual_seed(5)
    single = fastssl.NTXentLoss(0.3, memory_bank_size=(BANK, D), backend="reference")
    expected_moco = _moco_steps(single, [(out0, out1), (out1, out0)])

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_distributed_worker, args=(world, _free_port(), tmp), nprocs=world, join=True)
        per_rank = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]

    for backend in _backends():
        for name in ("ntxent", "infonce"):
            v_ref, ga_ref, gb_ref, tau_ref = expected[name]
            for learnable in (False, True):
                tau_grads = []
                for rank, results in enumerate(per_rank):
                    rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
                    value, ga, gb, tau_grad = results[(backend, name, learnable)]
                    where = f"{backend}/{name}/learnable={learnable}/rank {rank}"
                    assert value.item() == pytest.approx(v_ref.item(), rel=1e-5), where
                    torch.testing.assert_close(ga.double(), world * ga_ref[rows], rtol=1e-4, atol=1e-6, msg=where)
                    torch.testing.assert_close(gb.double(), world * gb_ref[rows], rtol=1e-4, atol=1e-6, msg=where)
                    tau_grads.append(tau_grad)
                if learnable:
                    mean = torch.stack(tau_grads).double().mean()
                    assert mean.item() == pytest.approx(tau_ref.item(), rel=1e-4), f"{backend}/{name}: dL/dτ"
        for step, (v_ref, ga_ref, gb_ref, bank_ref, ptr_ref) in enumerate(expected_moco):
            for rank, results in enumerate(per_rank):
                rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
                value, ga, gb, bank_after, ptr_after = results[(backend, "moco")][step]
                where = f"{backend}/moco step {step}/rank {rank}"
                assert value.item() == pytest.approx(v_ref.item(), rel=1e-5), where
                torch.testing.assert_close(ga, world * ga_ref[rows], rtol=1e-4, atol=1e-6, msg=where)
                torch.testing.assert_close(gb, world * gb_ref[rows], rtol=1e-4, atol=1e-6, msg=where)
                torch.testing.assert_close(bank_after, bank_ref, rtol=0, atol=1e-6, msg=where)
                assert torch.equal(ptr_after, ptr_ref), where
