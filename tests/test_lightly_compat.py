"""Drop-in compatibility with lightly 1.6's loss modules (``lightly.loss``).

DESIGN §1: replacing ``from lightly.loss import X`` by ``from fastssl import X`` changes nothing
but speed and memory. These tests build lightly's class (loaded from the installed package by
``tests/_lightly.py``) and fastssl's with the same constructor arguments, run several
forward/backward steps on fresh random inputs, and compare losses, input gradients and module
state (memory bank, DINO's center) to float32 precision, for the ``torch`` and ``reference``
backends. They also check, in fastssl's terms, the behaviours lightly's own test-suite checks:
error conditions, the memory bank's ring buffer, DINO's temperature schedule and center,
SwAV's multi-crop and queue, W-MSE's sub-batch sizes.

The deliberate differences (DESIGN) are tested as fastssl documents them, each marked where it
happens: a bare-int ``memory_bank_size``, the extra ``backend=`` argument, 0-d float32 losses
(lightly's SwaVLoss returns shape (1,), and lightly returns float64 for float64 inputs),
``ValueError`` for bad input (lightly: ``AssertionError`` in VICReg, NaN for a single SwAV crop),
and a DINO teacher that receives no gradient.
Compatibility gaps that fastssl has not closed yet are ``xfail(strict=True)`` with the exact
lightly behaviour in the reason, so each turns into a failure (to be unmarked) once fixed.

The whole module skips when lightly is not installed.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F

import fastssl
from fastssl import reference

from _helpers import TRITON_DEVICES, assert_matches_reference, awkward_inputs
import _lightly

LIGHTLY = _lightly.load()
if LIGHTLY is None:
    pytest.skip("lightly is not installed (or its loss modules cannot be imported)", allow_module_level=True)

BACKENDS = ["torch", "reference"]
# Every loss class fastssl shares with lightly.loss (CLASSES also lists lightly functions).
CLASS_NAMES = [name for name in _lightly.CLASSES if isinstance(getattr(LIGHTLY, name), type)]
# Constructor arguments a class cannot do without.
REQUIRED_KWARGS = {"PMSNCustomLoss": dict(target_distribution=lambda mean_anchor_probs: torch.full_like(mean_anchor_probs, 1.0 / mean_anchor_probs.numel()))}

# Float32 precision relative to the largest magnitude compared (the rule of tests/_helpers.py).
RTOL, ATOL = 2e-5, 1e-6


# --------------------------------------------------------------------------------------------
# Shared machinery
# --------------------------------------------------------------------------------------------


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor, what: str, rtol: float = RTOL, atol: float = ATOL) -> None:
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} vs lightly's {tuple(theirs.shape)}"
    if ours.numel() == 0:
        return
    assert torch.isfinite(theirs).all(), f"{what}: lightly's value is not finite; pick other inputs"
    err = (ours.double() - theirs.double()).abs().max().item()
    allowed = rtol * theirs.abs().max().item() + atol
    assert err <= allowed, f"{what}: max |fastssl - lightly| = {err:.3e} > {allowed:.3e}"


def _loss_and_grads(module, call: Callable, inputs: Sequence[torch.Tensor], needs_grad: Sequence[bool]):
    """Run ``call(module, leaves)`` on fresh leaf copies of ``inputs``; gradients of the leaves that
    require one (zeros where none flows), and ``None`` in place of the others."""
    leaves = [x.detach().clone().requires_grad_(g) for x, g in zip(inputs, needs_grad)]
    loss = call(module, leaves)
    wanted = [leaf for leaf in leaves if leaf.requires_grad]
    grads = torch.autograd.grad(loss.sum(), wanted, allow_unused=True) if wanted else []
    grads = iter([torch.zeros_like(w) if g is None else g for w, g in zip(wanted, grads)])
    return loss.detach(), [next(grads) if leaf.requires_grad else None for leaf in leaves]


def _compare_step(
    theirs_module,
    ours_module,
    call: Callable,
    inputs: Sequence[torch.Tensor],
    needs_grad: Optional[Sequence[bool]] = None,
    rtol: float = RTOL,
    atol: float = ATOL,
) -> torch.Tensor:
    """One forward/backward of both modules on the same values: loss and every input gradient.

    lightly's SwaVLoss returns shape (1,); fastssl returns a 0-d float32 loss for every module
    (deliberate difference, DESIGN §1/§3), so the values are compared after reshaping lightly's.
    """
    needs_grad = [True] * len(inputs) if needs_grad is None else list(needs_grad)
    loss_theirs, grads_theirs = _loss_and_grads(theirs_module, call, inputs, needs_grad)
    loss_ours, grads_ours = _loss_and_grads(ours_module, call, inputs, needs_grad)
    assert loss_ours.shape == torch.Size([]) and loss_ours.dtype == torch.float32
    _assert_close(loss_ours, loss_theirs.reshape(()).float(), "loss", rtol=rtol, atol=atol)
    for i, (g_ours, g_theirs) in enumerate(zip(grads_ours, grads_theirs)):
        if g_theirs is not None:
            assert g_ours.dtype == inputs[i].dtype
            _assert_close(g_ours, g_theirs, f"grad of input {i}", rtol=rtol, atol=atol)
    return loss_ours


def _atol_for(d: int) -> float:
    """With one feature, L2-normalized rows (and batch-standardized columns of two samples) are
    +-1 whatever the input: the true gradient is ~0 and what both libraries return is float32
    rounding amplified by 1/|x|, compared against an absolute floor instead."""
    return 1e-5 if d == 1 else ATOL


def _pair(module, leaves):
    return module(leaves[0], leaves[1])


def _unit_rows(n: int, k: int, features: int = 16) -> torch.Tensor:
    """Cosine similarities of n random unit vectors to k random unit prototypes: SwAV's scores,
    bounded by 1 so that ``exp(score / 0.05)`` stays finite in float32 (lightly exponentiates
    without a shift)."""
    z = F.normalize(torch.randn(n, features), dim=1)
    prototypes = F.normalize(torch.randn(k, features), dim=1)
    return z @ prototypes.T


def _both(name: str, *args, backend: str = "torch", **kwargs):
    """lightly's and fastssl's module ``name`` built with the same arguments."""
    return getattr(LIGHTLY, name)(*args, **kwargs), getattr(fastssl, name)(*args, backend=backend, **kwargs)


# --------------------------------------------------------------------------------------------
# Constructor and forward signatures, attributes, module state
# --------------------------------------------------------------------------------------------

def _class_names_marking(gaps: dict) -> list:
    """CLASS_NAMES as parameters, the classes with a known gap (name -> the exact lightly vs
    fastssl behaviour) marked xfail(strict=True) with that description."""
    return [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=gaps[n])) if n in gaps else n
        for n in CLASS_NAMES
    ]


def _comparable_default(default: object) -> object:
    # A function default (WMSELoss's loss_fn=norm_mse_loss) is each library's own function:
    # compare it by name.
    return ("function", default.__name__) if inspect.isfunction(default) else default


def _signature_rows(function) -> List[Tuple[str, object, object]]:
    return [
        (p.name, p.kind, _comparable_default(p.default))
        for p in inspect.signature(function).parameters.values()
        if p.name != "self"
    ]


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_constructor_signature_extends_lightly(name: str) -> None:
    """lightly's __init__ parameters (names, kinds, order, defaults) are a prefix of fastssl's, and
    what fastssl adds after them (backend, path, whitening, ...) has a default -- so every
    positional or keyword call that works with lightly works with fastssl."""
    theirs = _signature_rows(getattr(LIGHTLY, name).__init__)
    ours = _signature_rows(getattr(fastssl, name).__init__)
    assert ours[: len(theirs)] == theirs, f"{name}.__init__: lightly {theirs}\nfastssl {ours[:len(theirs)]}"
    extra = ours[len(theirs):]
    assert all(default is not inspect.Parameter.empty for _, _, default in extra), extra
    assert "backend" in [n for n, _, _ in extra]


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_forward_signature_matches_lightly(name: str) -> None:
    theirs = _signature_rows(getattr(LIGHTLY, name).forward)
    ours = _signature_rows(getattr(fastssl, name).forward)
    assert [(n, d) for n, _, d in ours] == [(n, d) for n, _, d in theirs]


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_constructor_arguments_stored_like_lightly(name: str) -> None:
    """Every constructor argument lightly keeps as a same-named attribute, fastssl keeps too,
    with the same value (code that reads ``loss_fn.temperature`` keeps working)."""
    kwargs = {
        "NTXentLoss": dict(temperature=0.2),
        "NegativeCosineSimilarity": dict(dim=0, eps=1e-6),
        "BarlowTwinsLoss": dict(lambda_param=0.01),
        "VICRegLoss": dict(lambda_param=3.0, mu_param=4.0, nu_param=0.5, eps=1e-3),
        "SwaVLoss": dict(temperature=0.2, sinkhorn_iterations=5, sinkhorn_epsilon=0.1),
        "DINOLoss": dict(output_dim=7, warmup_teacher_temp=0.02, teacher_temp=0.06,
                         warmup_teacher_temp_epochs=4, student_temp=0.2, center_momentum=0.8),
        "WMSELoss": dict(embedding_dim=3, momentum=0.1, eps=0.01, w_iter=2, w_size=8, num_samples=3),
    }.get(name, REQUIRED_KWARGS.get(name, {}))
    theirs, ours = _both(name, **kwargs)
    for parameter in inspect.signature(type(theirs).__init__).parameters:
        if hasattr(theirs, parameter) and not isinstance(getattr(theirs, parameter), torch.nn.Module):
            assert hasattr(ours, parameter), f"{name}.{parameter} missing"
            assert getattr(ours, parameter) == getattr(theirs, parameter), parameter
    if name == "DINOLoss":
        torch.testing.assert_close(ours.teacher_temp_schedule, theirs.teacher_temp_schedule)


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_state_dict_loads_across(name: str) -> None:
    """Checkpoints move both ways: same persistent keys and shapes; lightly's state loads into
    fastssl's module with strict=True."""
    kwargs = {"DINOLoss": dict(output_dim=5), "WMSELoss": dict(embedding_dim=3, w_size=8)}.get(
        name, REQUIRED_KWARGS.get(name, {})
    )
    theirs, ours = _both(name, **kwargs)
    for buffer in theirs.buffers():  # non-trivial state, so that loading is observable
        if buffer.is_floating_point():
            buffer.copy_(torch.randn_like(buffer))
    sd_theirs, sd_ours = theirs.state_dict(), ours.state_dict()
    assert {k: tuple(v.shape) for k, v in sd_ours.items()} == {k: tuple(v.shape) for k, v in sd_theirs.items()}
    ours.load_state_dict(sd_theirs, strict=True)
    for key, value in sd_theirs.items():
        torch.testing.assert_close(ours.state_dict()[key], value)


_BUFFER_GAPS: dict = {}


@pytest.mark.parametrize("name", _class_names_marking(_BUFFER_GAPS))
def test_named_buffers_match(name: str) -> None:
    kwargs = {
        "NTXentLoss": dict(memory_bank_size=(6, 3)),
        "DINOLoss": dict(output_dim=5),
        "WMSELoss": dict(embedding_dim=3, w_size=8),
    }.get(name, REQUIRED_KWARGS.get(name, {}))
    torch.manual_seed(1)
    theirs = getattr(LIGHTLY, name)(**kwargs)
    torch.manual_seed(1)
    ours = getattr(fastssl, name)(**kwargs)
    buffers_theirs = dict(theirs.named_buffers())
    buffers_ours = dict(ours.named_buffers())
    assert sorted(buffers_ours) == sorted(buffers_theirs)
    for key, value in buffers_theirs.items():
        assert buffers_ours[key].shape == value.shape and buffers_ours[key].dtype == value.dtype, key


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("DINOLoss", dict(output_dim=5, warmup_teacher_temp_epochs=3)),
        ("SwaVLoss", dict(sinkhorn_iterations=2)),
        ("WMSELoss", dict(embedding_dim=3, w_size=8, w_iter=2, num_samples=2)),
    ],
)
def test_numpy_integer_hyperparameters(name: str, kwargs: dict) -> None:
    np = pytest.importorskip("numpy")
    as_numpy = {k: np.int64(v) for k, v in kwargs.items()}
    getattr(LIGHTLY, name)(**as_numpy)  # lightly accepts them
    getattr(fastssl, name)(**as_numpy)


@pytest.mark.parametrize("name", ["NTXentLoss", "BarlowTwinsLoss", "VICRegLoss", "SwaVLoss"])
def test_gather_distributed_needs_torch_distributed(name: str, monkeypatch) -> None:
    """As lightly: asking for the distributed variant where torch.distributed is unavailable is a
    ValueError at construction; where it is available, construction succeeds."""
    flag = "sinkhorn_gather_distributed" if name == "SwaVLoss" else "gather_distributed"
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    getattr(LIGHTLY, name)(**{flag: True})
    getattr(fastssl, name)(**{flag: True})
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    with pytest.raises(ValueError):
        getattr(LIGHTLY, name)(**{flag: True})
    with pytest.raises(ValueError, match=flag):
        getattr(fastssl, name)(**{flag: True})


@pytest.mark.parametrize("name", ["NTXentLoss", "NegativeCosineSimilarity", "BarlowTwinsLoss", "VICRegLoss"])
def test_float64_inputs_give_float32_loss(name: str) -> None:
    """Deliberate difference (DESIGN §3, NOTES): fastssl returns the loss as 0-d float32 for every
    input dtype, where lightly returns it in the input's dtype (float64 here); the value agrees.
    Gradients stay in the input's dtype in both."""
    inputs = [x.double() for x in awkward_inputs(4, 5)]
    theirs, ours = _both(name)
    leaves = [x.clone().requires_grad_(True) for x in inputs]
    loss_theirs = theirs(*leaves)
    loss_ours = ours(*leaves)
    assert loss_theirs.dtype == torch.float64
    assert loss_ours.dtype == torch.float32 and loss_ours.shape == torch.Size([])
    _assert_close(loss_ours.double(), loss_theirs.detach(), "loss")
    grads = torch.autograd.grad(loss_ours, leaves)
    assert all(g.dtype == torch.float64 for g in grads)


# Inputs and call of each loss for the dtype and device sweeps below: (constructor kwargs,
# inputs(dtype, device), call, number of leading inputs that are teacher outputs, i.e. get no
# gradient).
def _sweep_case(name: str, dtype: torch.dtype, device: str, small: bool = False):
    def pairs(n, d):
        return [x.to(dtype) for x in awkward_inputs(n, d, device=device)]

    if name == "SwaVLoss":
        b, k = (5, 7) if small else (16, 11)
        crops = [_unit_rows(b, k).to(device=device, dtype=dtype) for _ in range(4)]
        return {}, crops, lambda m, xs: m(list(xs[:2]), list(xs[2:])).reshape(()), 0
    if name == "DINOLoss":
        b, k = (3, 11) if small else (8, 37)
        views = [torch.randn(b, k, device=device).to(dtype) for _ in range(2 + 4)]
        return dict(output_dim=k), views, lambda m, xs: m(list(xs[:2]), list(xs[2:])), 2
    if small:
        return {}, pairs(5, 3), lambda m, xs: m(*xs), 0
    n, d = (33, 129) if name == "NTXentLoss" else (24, 65)
    return {}, pairs(n, d), lambda m, xs: m(*xs), 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["NTXentLoss", "NegativeCosineSimilarity", "BarlowTwinsLoss", "VICRegLoss",
                                  "SwaVLoss", "DINOLoss"])
def test_half_precision_within_lightly_error(name: str, dtype: torch.dtype) -> None:
    """In half precision fastssl's loss and gradients are at most 2x as far from lightly-in-float64
    as lightly itself is at that dtype (DESIGN §3), and come back as float32 / the input dtype.
    lightly's DINOLoss needs the module cast to the input dtype (its float32 center meets the
    half student in an einsum otherwise); fastssl's takes half inputs as they are.

    lightly's SwAV in float16 overflows: ``exp(score / 0.05)`` of a cosine score exceeds 65504,
    so its loss is NaN and gives no error to compare with. fastssl's codes (log domain, float32)
    are then held to float32 precision against lightly in float64, gradients to float16's
    rounding."""
    kwargs, inputs, call, n_teacher = _sweep_case(name, dtype, "cpu")
    if name == "SwaVLoss" and dtype == torch.float16:
        assert torch.isnan(call(LIGHTLY.SwaVLoss(), inputs))
        exact = [x.double() for x in inputs]
        loss64, grads64 = _loss_and_grads(LIGHTLY.SwaVLoss(), call, exact, [True] * len(inputs))
        loss, grads = _loss_and_grads(fastssl.SwaVLoss(backend="torch"), call, inputs, [True] * len(inputs))
        assert loss.dtype == torch.float32 and all(g.dtype == dtype for g in grads)
        _assert_close(loss.double(), loss64, "loss", rtol=1e-4)
        for g, g64 in zip(grads, grads64):
            _assert_close(g.double(), g64, "gradient", rtol=2e-3)
        return

    def lightly_fresh(*xs):  # a fresh module per call: DINO's center must start at zero each time
        module = getattr(LIGHTLY, name)(**kwargs).to(xs[0].dtype)
        return call(module, [x.detach() if i < n_teacher else x for i, x in enumerate(xs)])

    def ours_fresh(*xs):
        return call(getattr(fastssl, name)(backend="torch", **kwargs), list(xs))

    assert_matches_reference(ours_fresh, lightly_fresh, inputs)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("name", ["NTXentLoss", "BarlowTwinsLoss", "VICRegLoss", "SwaVLoss", "DINOLoss"])
def test_triton_matches_lightly(name: str, device: str) -> None:
    """fastssl's kernels (backend "triton") against lightly on the same tensors, float32 (DINO's
    center included): one step on tiny shapes through the interpreter, three larger ones on CUDA."""
    small = device == "cpu"
    kwargs = _sweep_case(name, torch.float32, "cpu", small)[0]
    theirs = getattr(LIGHTLY, name)(**kwargs).to(device)
    ours = getattr(fastssl, name)(backend="triton", **kwargs).to(device)
    for _ in range(1 if small else 3):
        _, inputs, call, n_teacher = _sweep_case(name, torch.float32, device, small)
        _compare_step(theirs, ours, call, inputs, needs_grad=[i >= n_teacher for i in range(len(inputs))])
    if name == "DINOLoss":
        _assert_close(ours.center, theirs.center, "center")


# --------------------------------------------------------------------------------------------
# lightly's formulas are fastssl's oracle: the reference agrees with lightly in float64
# --------------------------------------------------------------------------------------------


def test_reference_formulas_equal_lightly_in_float64() -> None:
    """fastssl's tests compare every backend against ``fastssl.reference``; that oracle must be
    lightly's formula. In float64 the two agree to ~1e-12 for every loss."""
    tight = dict(rtol=1e-10, atol=1e-12)
    a, b = (x.double() for x in awkward_inputs(9, 7))
    _assert_close(reference.ntxent_loss(a, b, 0.3), LIGHTLY.NTXentLoss(0.3)(a, b), "ntxent", **tight)
    _assert_close(
        reference.negative_cosine_similarity(a, b), LIGHTLY.NegativeCosineSimilarity()(a, b), "negcos", **tight
    )
    _assert_close(reference.barlow_twins_loss(a, b, 0.01), LIGHTLY.BarlowTwinsLoss(0.01)(a, b), "barlow", **tight)
    _assert_close(
        reference.vicreg_loss(a, b, 2.0, 3.0, 0.5, 1e-3),
        LIGHTLY.VICRegLoss(2.0, 3.0, 0.5, eps=1e-3)(a, b),
        "vicreg",
        **tight,
    )
    high = [_unit_rows(6, 5).double() for _ in range(2)]
    low = [_unit_rows(6, 5).double() for _ in range(3)]
    queue = [_unit_rows(4, 5).double() for _ in range(2)]
    _assert_close(
        reference.swav_loss(high, low, queue, 0.1, 3, 0.05),
        LIGHTLY.SwaVLoss()(high, low, queue).reshape(()),
        "swav",
        **tight,
    )
    teacher = [torch.randn(3, 5, dtype=torch.float64) for _ in range(2)]
    student = [torch.randn(3, 5, dtype=torch.float64) for _ in range(4)]
    center = torch.randn(1, 1, 5, dtype=torch.float64)
    theirs = LIGHTLY.DINOLoss(output_dim=5).double()
    theirs.center.copy_(center)
    # lightly divides by torch.tensor(teacher_temp), a float32 scalar, even for float64 inputs
    teacher_temp32 = float(torch.tensor(0.04))
    _assert_close(
        reference.dino_loss(teacher, student, center, teacher_temp32, 0.1), theirs(teacher, student), "dino", **tight
    )
    _assert_close(reference.dino_center_update(center, teacher, 0.9), theirs.center, "dino center", **tight)
    x = torch.randn(3 * 16, 3, dtype=torch.float64)
    torch.manual_seed(5)
    wmse_theirs = LIGHTLY.WMSELoss(embedding_dim=3, w_size=8, w_iter=2, num_samples=3).double()(x)
    torch.manual_seed(5)
    wmse_ref = reference.wmse_loss(x, num_samples=3, w_size=8, w_iter=2)
    _assert_close(wmse_ref, wmse_theirs, "wmse", **tight)


# --------------------------------------------------------------------------------------------
# NTXentLoss (SimCLR) and its memory bank (MoCo)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "n, d, temperature, non_contiguous",
    [(1, 3, 0.5, False), (2, 1, 0.07, True), (3, 129, -1.0, False), (17, 33, 0.5, True), (127, 3, 0.1, False)],
)
def test_ntxent_matches_lightly(backend: str, n: int, d: int, temperature: float, non_contiguous: bool) -> None:
    theirs, ours = _both("NTXentLoss", temperature=temperature, backend=backend)
    for _ in range(3):
        inputs = awkward_inputs(n, d, non_contiguous=non_contiguous)
        _compare_step(theirs, ours, _pair, inputs, atol=_atol_for(d))
    assert_matches_reference(ours, lambda a, b: reference.ntxent_loss(a, b, temperature), inputs, atol=_atol_for(d))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d, temperature", [(32, 0.5), (1, 0.5), (32, -1.0)])
def test_ntxent_is_symmetric_in_its_views(backend: str, d: int, temperature: float) -> None:
    """Swapping the views permutes the 2N classification rows: the mean is unchanged (lightly
    checks this for batch sizes 1..19, one feature, and a negative temperature)."""
    loss = fastssl.NTXentLoss(temperature=temperature, backend=backend)
    for n in (1, 2, 3, 8, 19):
        a, b = awkward_inputs(n, d)
        assert loss(a, b).item() == pytest.approx(loss(b, a).item(), rel=1e-5, abs=1e-6)
        assert loss(a, b).item() == pytest.approx(LIGHTLY.NTXentLoss(temperature)(a, b).item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 8])
@pytest.mark.parametrize("bank_size", [0, 1, 15, 16, 17])
@pytest.mark.parametrize("temperature", [0.1, 7.0])
def test_ntxent_collinear_embeddings(backend: str, n: int, bank_size: int, temperature: float) -> None:
    """When every embedding is a positive multiple of one direction all logits are equal, so each
    row's cross-entropy is log(#candidates): log(2N-1) in SimCLR, log(M+1) once the bank of M
    entries holds only that direction (after enough batches to overwrite its random start)."""
    direction = torch.randn(1, 2)
    out0 = (torch.rand(n, 1) + 0.5) * direction
    out1 = (torch.rand(n, 1) + 0.5) * direction
    size = (bank_size, 2) if bank_size else 0
    loss_fn = fastssl.NTXentLoss(temperature=temperature, memory_bank_size=size, backend=backend)
    out0.requires_grad_(True)  # the bank is only updated when the query requires a gradient
    for _ in range(bank_size // n + 2 if bank_size else 1):
        loss = loss_fn(out0, out1)
    candidates = bank_size + 1 if bank_size else 2 * n - 1
    assert loss.item() == pytest.approx(math.log(candidates), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bank_size, n, d", [(7, 3, 4), (6, 3, 1), (3, 5, 3), (5, 1, 129)])
def test_memory_bank_matches_lightly(backend: str, bank_size: int, n: int, d: int) -> None:
    """Same seed, same bank: fastssl draws its initial bank with the same RNG calls as lightly's
    MemoryBankModule. Then, step by step: the negatives are the bank *before* the step (the
    current keys are not among them), the normalized keys are written at bank_ptr, a batch that
    reaches the end fills it and wraps bank_ptr to 0 (the rest is dropped), and a query without
    gradient (evaluation) leaves the bank as it was."""
    torch.manual_seed(11)
    theirs = LIGHTLY.NTXentLoss(temperature=0.2, memory_bank_size=(bank_size, d))
    torch.manual_seed(11)
    ours = fastssl.NTXentLoss(temperature=0.2, memory_bank_size=(bank_size, d), backend=backend)
    _assert_close(ours.bank, theirs.memory_bank.bank, "initial bank", rtol=0, atol=0)
    expected_ptr = 0
    for step in range(5):
        before = ours.bank.clone()
        out0, out1 = awkward_inputs(n, d, non_contiguous=step % 2 == 1)
        _compare_step(theirs, ours, _pair, [out0, out1], needs_grad=[True, False], atol=_atol_for(d))
        _assert_close(ours.bank, theirs.memory_bank.bank, f"bank after step {step}")
        assert int(ours.bank_ptr) == int(theirs.memory_bank.bank_ptr)
        # the ring buffer, written out: keys land at the old pointer, clipped at the end
        written = min(n, bank_size - expected_ptr)
        keys = F.normalize(out1, dim=1)[:written]
        _assert_close(ours.bank[expected_ptr : expected_ptr + written], keys, "enqueued keys")
        _assert_close(ours.bank[: expected_ptr], before[: expected_ptr], "untouched head", rtol=0, atol=0)
        expected_ptr = 0 if expected_ptr + n >= bank_size else expected_ptr + n
        assert int(ours.bank_ptr) == expected_ptr
    frozen = ours.bank.clone()
    out0, out1 = awkward_inputs(n, d)
    _compare_step(theirs, ours, _pair, [out0, out1], needs_grad=[False, False], atol=_atol_for(d))
    _assert_close(ours.bank, frozen, "bank after an evaluation step", rtol=0, atol=0)
    _assert_close(theirs.memory_bank.bank, frozen, "lightly's bank after an evaluation step")


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_bank_bare_int_size(backend: str) -> None:
    """Deliberate difference (DESIGN §1): lightly 1.6 rejects a bare int ``memory_bank_size > 0``
    (the feature dimension is missing); fastssl accepts it and takes the dimension from the
    first batch. Drawn at that first batch from the same seed, the bank is lightly's
    ``(size, dim)`` bank, and the losses, gradients and banks then agree step by step."""
    size, n, d = 10, 4, 6
    with pytest.raises(ValueError):
        LIGHTLY.NTXentLoss(memory_bank_size=size)
    ours = fastssl.NTXentLoss(memory_bank_size=size, backend=backend)
    assert ours.bank.numel() == 0
    steps = [awkward_inputs(n, d) for _ in range(4)]
    torch.manual_seed(3)
    theirs = LIGHTLY.NTXentLoss(memory_bank_size=(size, d))
    torch.manual_seed(3)  # fastssl draws its bank inside the first forward
    for out0, out1 in steps:
        _compare_step(theirs, ours, _pair, [out0, out1], needs_grad=[True, False])
        assert ours.bank.shape == (size, d)
        _assert_close(ours.bank, theirs.memory_bank.bank, "bank")
        assert int(ours.bank_ptr) == int(theirs.memory_bank.bank_ptr)


@pytest.mark.parametrize("size", [-1, (10, -1), (-2, 3), (10, 2, 3)])
def test_memory_bank_size_rejected_like_lightly(size) -> None:
    with pytest.raises(ValueError):
        LIGHTLY.NTXentLoss(memory_bank_size=size)
    with pytest.raises(ValueError, match="memory_bank_size"):
        fastssl.NTXentLoss(memory_bank_size=size)


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_bank_of_size_zero_is_simclr(backend: str) -> None:
    """``(0, dim)`` disables the bank in lightly as ``0`` does: the loss is SimCLR's."""
    theirs, ours = _both("NTXentLoss", memory_bank_size=(0, 5), backend=backend)
    inputs = awkward_inputs(6, 5)
    _compare_step(theirs, ours, _pair, inputs)
    assert_matches_reference(ours, lambda a, b: reference.ntxent_loss(a, b, 0.5), inputs)


# --------------------------------------------------------------------------------------------
# NegativeCosineSimilarity
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shape, dim, non_contiguous",
    [((1, 3), 1, False), ((19, 32), 1, True), ((4, 129), 1, False), ((2, 3, 5), 1, False),
     ((2, 3, 5), -1, False), ((6, 3), 0, True)],
)
def test_negative_cosine_similarity_matches_lightly(backend: str, shape, dim: int, non_contiguous: bool) -> None:
    theirs, ours = _both("NegativeCosineSimilarity", dim=dim, backend=backend)
    for _ in range(2):
        x0, x1 = (torch.randn(*shape[:-1], 2 * shape[-1])[..., ::2] if non_contiguous else torch.randn(shape)
                  for _ in range(2))
        loss = _compare_step(theirs, ours, _pair, [x0, x1])
        assert loss.item() == pytest.approx(ours(x1, x0).item(), abs=1e-6)  # symmetric
    assert_matches_reference(ours, lambda a, b: reference.negative_cosine_similarity(a, b, dim=dim), [x0, x1])


def test_negative_cosine_similarity_broadcasts_like_lightly() -> None:
    theirs, ours = _both("NegativeCosineSimilarity")
    _compare_step(theirs, ours, _pair, [torch.randn(5, 8), torch.randn(1, 8)])


def test_negative_cosine_similarity_accepts_eps_zero() -> None:
    theirs, ours = _both("NegativeCosineSimilarity", eps=0.0)
    _compare_step(theirs, ours, _pair, awkward_inputs(5, 8))


# --------------------------------------------------------------------------------------------
# BarlowTwinsLoss
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "n, d, lambda_param, non_contiguous",
    [(2, 1, 5e-3, False), (3, 3, 5e-3, True), (9, 129, 0.1, False), (32, 33, 5e-3, True), (127, 3, 1.0, False)],
)
def test_barlow_twins_matches_lightly(backend: str, n: int, d: int, lambda_param: float, non_contiguous: bool) -> None:
    theirs, ours = _both("BarlowTwinsLoss", lambda_param=lambda_param, backend=backend)
    for _ in range(2):
        inputs = awkward_inputs(n, d, non_contiguous=non_contiguous)
        _compare_step(theirs, ours, _pair, inputs, atol=_atol_for(d))
    assert_matches_reference(
        ours, lambda a, b: reference.barlow_twins_loss(a, b, lambda_param), inputs, atol=_atol_for(d)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_barlow_twins_is_affine_invariant(backend: str) -> None:
    """Per-feature batch normalization removes any positive scale and shift of a view. Not exactly:
    the 1e-5 inside the square root changes C by O(eps/var), hence the 1e-4 tolerance."""
    loss = fastssl.BarlowTwinsLoss(backend=backend)
    x = torch.randn(32, 64)
    shifted = 2 * x + 4
    assert loss(x, shifted).item() == pytest.approx(loss(x, x).item(), rel=1e-4)
    assert loss(x, shifted).item() == pytest.approx(LIGHTLY.BarlowTwinsLoss()(x, shifted).item(), rel=1e-5)


def test_barlow_twins_batch_of_one_rejected_like_lightly() -> None:
    """lightly's batch-norm raises ValueError for a batch of one; fastssl names the argument."""
    a, b = awkward_inputs(1, 4)
    with pytest.raises(ValueError):
        LIGHTLY.BarlowTwinsLoss()(a, b)
    with pytest.raises(ValueError, match="z_a"):
        fastssl.BarlowTwinsLoss()(a, b)


# --------------------------------------------------------------------------------------------
# VICRegLoss
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "n, d, kwargs, non_contiguous",
    [
        (2, 32, {}, False),
        (3, 1, dict(eps=0.0), True),
        (9, 129, dict(nu_param=0.5), False),
        (17, 3, dict(lambda_param=1.0, mu_param=2.0, nu_param=3.0, eps=1e-2), True),
        (127, 5, {}, False),
    ],
)
def test_vicreg_matches_lightly(backend: str, n: int, d: int, kwargs: dict, non_contiguous: bool) -> None:
    theirs, ours = _both("VICRegLoss", backend=backend, **kwargs)
    for _ in range(2):
        inputs = awkward_inputs(n, d, non_contiguous=non_contiguous)
        _compare_step(theirs, ours, _pair, inputs, atol=_atol_for(d))
        assert ours(*inputs).item() == pytest.approx(ours(*inputs[::-1]).item(), rel=1e-5)  # symmetric
    args = [kwargs.get(k, v) for k, v in (("lambda_param", 25.0), ("mu_param", 25.0), ("nu_param", 1.0), ("eps", 1e-4))]
    assert_matches_reference(ours, lambda a, b: reference.vicreg_loss(a, b, *args), inputs, atol=_atol_for(d))


@pytest.mark.parametrize("shapes", [((1, 32), (1, 32)), ((2, 32), (2, 16))])
def test_vicreg_bad_batch_is_value_error(shapes) -> None:
    """Deliberate difference (DESIGN §3): lightly asserts (AssertionError) a batch > 1 and equal
    shapes; fastssl raises ValueError naming the argument, under the same conditions."""
    a, b = (torch.randn(s) for s in shapes)
    with pytest.raises(AssertionError):
        LIGHTLY.VICRegLoss()(a, b)
    with pytest.raises(ValueError, match="z_a"):
        fastssl.VICRegLoss()(a, b)


def test_vicreg_bad_batch_also_catchable_as_lightly_error() -> None:
    with pytest.raises(AssertionError):
        fastssl.VICRegLoss()(torch.randn(1, 32), torch.randn(1, 32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_vicreg_accepts_more_than_two_dimensions(backend: str) -> None:
    theirs, ours = _both("VICRegLoss", nu_param=0.5, backend=backend)
    _compare_step(theirs, ours, _pair, [torch.randn(2, 10, 32), torch.randn(2, 10, 32)])


# --------------------------------------------------------------------------------------------
# SwaVLoss
# --------------------------------------------------------------------------------------------


def _swav_call(n_high: int, n_low: int, with_queue: bool):
    def call(module, leaves):
        high, low = leaves[:n_high], leaves[n_high : n_high + n_low]
        queue = leaves[n_high + n_low :] if with_queue else None
        return module(high, low, queue)

    return call


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "batch, prototypes, n_high, n_low, queue_len, iterations",
    [
        (1, 3, 2, 0, 0, 3),  # batch of one
        (8, 5, 2, 4, 16, 3),  # multi-crop with a queue
        (7, 33, 2, 2, 0, 0),  # no Sinkhorn iteration
        (5, 1, 2, 1, 4, 1),  # a single prototype
        (6, 7, 3, 2, 10, 2),  # three high-resolution crops
    ],
)
def test_swav_matches_lightly(
    backend: str, batch: int, prototypes: int, n_high: int, n_low: int, queue_len: int, iterations: int
) -> None:
    """Losses and gradients of every crop; the queue gets no gradient in either (it only widens
    Sinkhorn's batch). lightly returns shape (1,), fastssl a 0-d tensor (deliberate)."""
    theirs, ours = _both("SwaVLoss", temperature=0.2, sinkhorn_iterations=iterations, backend=backend)
    with_queue = queue_len > 0
    call = _swav_call(n_high, n_low, with_queue)
    for _ in range(2):
        crops = [_unit_rows(batch, prototypes) for _ in range(n_high + n_low)]
        queue = [_unit_rows(queue_len, prototypes) for _ in range(n_high)] if with_queue else []
        _compare_step(theirs, ours, call, crops + queue, needs_grad=[True] * len(crops) + [False] * len(queue))
    assert LIGHTLY.SwaVLoss()(crops[:n_high], crops[n_high:]).shape == (1,)
    # the queue's scores carry no gradient back (codes are computed under no_grad)
    if with_queue:
        crop_leaves = [c.clone().requires_grad_(True) for c in crops]
        queue_leaves = [q.clone().requires_grad_(True) for q in queue]
        loss = ours(crop_leaves[:n_high], crop_leaves[n_high:], queue_leaves)
        assert all(g is None for g in torch.autograd.grad(loss, queue_leaves, allow_unused=True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_low", [0, 1, 5])
@pytest.mark.parametrize("iterations", range(3))
@pytest.mark.parametrize("with_queue", [False, True])
def test_swav_confident_assignments_give_small_loss(backend: str, n_low: int, iterations: int, with_queue: bool) -> None:
    """Every crop of a sample scoring one prototype far above the others (and the batch spread
    over all prototypes, so equipartition agrees): the swapped prediction is nearly certain and
    the loss stays below 0.5, queue or not (lightly checks this with identity scores)."""
    k = 32
    assignment = torch.randperm(k)
    scores = lambda: torch.eye(k)[assignment] + 0.01 * torch.randn(k, k)  # noqa: E731
    high = [scores() for _ in range(2)]
    low = [scores() for _ in range(n_low)]
    queue = [torch.eye(k)[torch.randint(k, (4 * k,))] + 0.01 * torch.randn(4 * k, k) for _ in range(2)] if with_queue else None
    loss = fastssl.SwaVLoss(sinkhorn_iterations=iterations, backend=backend)(high, low, queue)
    assert loss.item() < 0.5
    lightly_loss = LIGHTLY.SwaVLoss(sinkhorn_iterations=iterations)(high, low, queue)
    assert loss.item() == pytest.approx(lightly_loss.item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_swav_single_prototype_and_single_sample(backend: str) -> None:
    """One prototype: every code is 1 and the log-softmax 0, so the loss is exactly 0. One
    sample per crop: Sinkhorn runs on a single column and the loss is finite, as lightly's."""
    loss_fn = fastssl.SwaVLoss(backend=backend)
    assert loss_fn([_unit_rows(8, 1) for _ in range(2)], [_unit_rows(8, 1)]).item() == 0.0
    high = [_unit_rows(1, 32) for _ in range(2)]
    low = [_unit_rows(1, 32) for _ in range(3)]
    loss = loss_fn(high, low)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(LIGHTLY.SwaVLoss()(high, low).item(), rel=1e-5)


def test_swav_single_crop_is_an_error() -> None:
    """With one crop in all there is no other crop to predict: lightly divides by n_crops - 1 = 0
    and returns NaN; fastssl raises ValueError (DESIGN §3: bad input gets a clear error)."""
    crop = [_unit_rows(4, 5)]
    assert torch.isnan(LIGHTLY.SwaVLoss()(crop, [])).all()
    with pytest.raises(ValueError, match="two crops"):
        fastssl.SwaVLoss()(crop, [])


# --------------------------------------------------------------------------------------------
# DINOLoss
# --------------------------------------------------------------------------------------------


def _dino_call(n_teacher: int, teacher_temp: Optional[float], epoch: Optional[int]):
    def call(module, leaves):
        return module(leaves[:n_teacher], leaves[n_teacher:], teacher_temp=teacher_temp, epoch=epoch)

    return call


# (teacher_temp, epoch) of successive steps: default, inside and past the warm-up, explicit
# temperature (which wins over the epoch)
_DINO_STEPS = [(None, None), (None, 0), (None, 3), (None, 5), (None, 40), (0.07, None), (0.05, 2)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "batch, output_dim, n_teacher, n_student",
    [(3, 5, 2, 6), (1, 1, 2, 2), (4, 129, 2, 3), (2, 8, 1, 4)],
)
def test_dino_matches_lightly(backend: str, batch: int, output_dim: int, n_teacher: int, n_student: int) -> None:
    """Several steps through the warm-up schedule: loss, student gradients and the center buffer
    (an EMA of the teacher's mean output) agree after every step."""
    kwargs = dict(output_dim=output_dim, warmup_teacher_temp=0.02, teacher_temp=0.06,
                  warmup_teacher_temp_epochs=5, student_temp=0.2, center_momentum=0.8)
    theirs, ours = _both("DINOLoss", backend=backend, **kwargs)
    for teacher_temp, epoch in _DINO_STEPS:
        teacher = [torch.randn(batch, output_dim) for _ in range(n_teacher)]
        student = [torch.randn(batch, output_dim) for _ in range(n_student)]
        _compare_step(
            theirs, ours, _dino_call(n_teacher, teacher_temp, epoch), teacher + student,
            needs_grad=[False] * n_teacher + [True] * n_student,
        )
        assert ours.center.shape == (1, 1, output_dim)
        _assert_close(ours.center, theirs.center, f"center after step ({teacher_temp}, {epoch})")


@pytest.mark.parametrize("warmup_teacher_temp, teacher_temp", [(0.01, 0.07), (0.07, 0.04)])
@pytest.mark.parametrize("warmup_epochs", [0, 1, 10])
@pytest.mark.parametrize("epoch", [0, 1, 10, 20])
def test_dino_teacher_temperature_warmup(
    warmup_teacher_temp: float, teacher_temp: float, warmup_epochs: int, epoch: int
) -> None:
    """``epoch`` picks the teacher temperature from a linear warm-up over ``warmup_epochs`` epochs,
    then ``teacher_temp``; the same loss comes from passing that temperature explicitly."""
    kwargs = dict(output_dim=6, warmup_teacher_temp=warmup_teacher_temp, teacher_temp=teacher_temp,
                  warmup_teacher_temp_epochs=warmup_epochs)
    teacher = [torch.randn(3, 6) for _ in range(2)]
    student = [torch.randn(3, 6) for _ in range(5)]
    by_epoch = fastssl.DINOLoss(backend="torch", **kwargs)(teacher, student, epoch=epoch)
    lightly_by_epoch = LIGHTLY.DINOLoss(**kwargs)(teacher, student, epoch=epoch)
    _assert_close(by_epoch, lightly_by_epoch, "loss by epoch")
    if epoch < warmup_epochs:
        temperature = warmup_teacher_temp + (teacher_temp - warmup_teacher_temp) * epoch / max(warmup_epochs - 1, 1)
    else:
        temperature = teacher_temp
    explicit = fastssl.DINOLoss(backend="torch", **kwargs)(teacher, student, teacher_temp=temperature)
    _assert_close(by_epoch, explicit, "loss by epoch vs explicit temperature")


@pytest.mark.parametrize("backend", BACKENDS)
def test_dino_training_step_matches_lightly(backend: str) -> None:
    """lightly's own check, on fastssl: a frozen linear teacher and a linear student, 2 global and
    4 local crops, one SGD step -- the student's parameters after the step agree."""
    dim = 5
    teacher = torch.nn.Linear(dim, dim).requires_grad_(False)
    student_theirs = torch.nn.Linear(dim, dim)
    student_ours = torch.nn.Linear(dim, dim)
    student_ours.load_state_dict(student_theirs.state_dict())
    global_views = [torch.rand(3, dim) for _ in range(2)]
    views = global_views + [torch.rand(3, dim) for _ in range(4)]
    theirs, ours = _both("DINOLoss", output_dim=dim, center_momentum=0.5, backend=backend)
    for loss_fn, student in ((theirs, student_theirs), (ours, student_ours)):
        optimizer = torch.optim.SGD(student.parameters(), lr=1.0)
        loss = loss_fn([teacher(v) for v in global_views], [student(v) for v in views], epoch=3)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for p_ours, p_theirs in zip(student_ours.parameters(), student_theirs.parameters()):
        _assert_close(p_ours.detach(), p_theirs.detach(), "student parameter after a step")
    _assert_close(ours.center, theirs.center, "center")


@pytest.mark.parametrize("backend", BACKENDS)
def test_dino_teacher_receives_no_gradient(backend: str) -> None:
    """Documented difference (fastssl.reference.dino_loss, as DINO's own code): the teacher's
    probabilities are detached. lightly's DINOLoss does not detach them, so a teacher output
    that requires grad receives one there; in practice the teacher runs under no_grad and the
    two agree (test_dino_matches_lightly)."""
    teacher = [torch.randn(3, 5, requires_grad=True) for _ in range(2)]
    student = [torch.randn(3, 5, requires_grad=True) for _ in range(3)]
    loss = fastssl.DINOLoss(output_dim=5, backend=backend)(teacher, student)
    grads = torch.autograd.grad(loss, teacher + student, allow_unused=True)
    assert all(g is None or not g.any() for g in grads[:2])
    assert all(g is not None and g.abs().sum() > 0 for g in grads[2:])
    lightly_loss = LIGHTLY.DINOLoss(output_dim=5)(teacher, student)
    lightly_grads = torch.autograd.grad(lightly_loss, teacher, allow_unused=True)
    assert any(g is not None and g.any() for g in lightly_grads)


def test_dino_needs_two_views_like_lightly() -> None:
    views = [torch.randn(2, 4)]
    with pytest.raises(ValueError):
        LIGHTLY.DINOLoss(output_dim=4)(views, views)
    with pytest.raises(ValueError, match="two views"):
        fastssl.DINOLoss(output_dim=4)(views, views)


def test_dino_update_center_method() -> None:
    theirs, ours = _both("DINOLoss", output_dim=6, center_momentum=0.7)
    for shape in [(2, 6), (3, 4, 6)]:
        x = torch.randn(shape)
        theirs.update_center(x)
        ours.update_center(x)
        _assert_close(ours.center, theirs.center, f"center after update_center{shape}")


# --------------------------------------------------------------------------------------------
# WMSELoss
# --------------------------------------------------------------------------------------------


def _wmse_step(theirs, ours, x: torch.Tensor, seed: int) -> None:
    """Both draw their sub-batch permutations with torch.randperm: the same seed before each
    call gives the same permutations."""
    def call(module, leaves):
        torch.manual_seed(seed)
        return module(leaves[0])

    _compare_step(theirs, ours, call, [x], rtol=1e-4)


@pytest.mark.parametrize(
    "backend, dim, num_samples, w_size, w_iter, batch, eps",
    [
        ("torch", 3, 3, 8, 2, 16, 0.0),
        ("torch", 1, 2, 4, 1, 8, 0.1),
        ("torch", 4, 2, 9, 3, 18, 0.05),
        ("reference", 3, 3, 8, 2, 16, 0.0),  # the reference loops over sub-batches: one case
    ],
)
def test_wmse_matches_lightly(
    backend: str, dim: int, num_samples: int, w_size: int, w_iter: int, batch: int, eps: float
) -> None:
    """Training-mode steps (the rtol is 1e-4: the Cholesky factor of a sub-batch covariance of a
    few samples amplifies float32 rounding by its condition number)."""
    theirs, ours = _both("WMSELoss", embedding_dim=dim, eps=eps, w_iter=w_iter, w_size=w_size,
                         num_samples=num_samples, backend=backend)
    for step in range(2):
        x = torch.randn(batch * num_samples, 2 * dim)[:, ::2] if step == 1 else torch.randn(batch * num_samples, dim)
        _wmse_step(theirs, ours, x, seed=100 + step)


def test_wmse_lightly_defaults() -> None:
    """lightly's defaults (d = 128, w_size = 256) on a batch of 512 images, two views: the loss
    is positive and equal to lightly's."""
    theirs, ours = _both("WMSELoss")
    x = torch.randn(512 * 2, 128)
    torch.manual_seed(7)
    loss_theirs = theirs(x)
    torch.manual_seed(7)
    loss_ours = ours(x)
    assert loss_ours.item() > 0
    _assert_close(loss_ours, loss_theirs, "loss", rtol=1e-4)


def test_wmse_w_size_below_twice_embedding_dim_rejected() -> None:
    for kwargs in (dict(embedding_dim=2, w_size=2), dict(w_size=5)):
        with pytest.raises(ValueError):
            LIGHTLY.WMSELoss(**kwargs)
        with pytest.raises(ValueError, match="w_size"):
            fastssl.WMSELoss(**kwargs)


def test_wmse_batch_smaller_than_w_size_rejected() -> None:
    x = torch.randn(2 * 4, 3)
    with pytest.raises(ValueError):
        LIGHTLY.WMSELoss(embedding_dim=3, w_size=8)(x)
    with pytest.raises(ValueError, match="w_size"):
        fastssl.WMSELoss(embedding_dim=3, w_size=8)(x)


@pytest.mark.parametrize("rows, kwargs", [(5 * 1, dict(num_samples=3)), (2 * 12, dict(embedding_dim=3, w_size=8))])
def test_wmse_indivisible_batch_is_both_error_types(rows: int, kwargs: dict) -> None:
    """Rows not divisible by num_samples, or a per-view batch that w_size does not divide, are
    RuntimeErrors in lightly (its own check, resp. a failing view()) and what its tests expect;
    DESIGN §3 asks for ValueError. fastssl's error is both, so either ``except`` catches it."""
    dim = kwargs.get("embedding_dim", 128)
    x = torch.randn(rows, dim)
    with pytest.raises(RuntimeError):
        LIGHTLY.WMSELoss(**kwargs)(x)
    with pytest.raises(RuntimeError):
        fastssl.WMSELoss(**kwargs)(x)
    with pytest.raises(ValueError):
        fastssl.WMSELoss(**kwargs)(x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wmse_running_statistics_and_eval_mode(backend: str) -> None:
    """lightly's Whitening2d keeps running_mean (1, d, 1, 1) and running_variance (d, d), an EMA
    with ``momentum`` of every training sub-batch's mean and covariance, and whitens with them
    in eval mode: buffers after each training step, and the eval-mode loss, agree."""
    theirs, ours = _both("WMSELoss", embedding_dim=3, w_size=8, momentum=0.3, backend=backend)
    for step in range(2):
        _wmse_step(theirs, ours, torch.randn(2 * 16, 3), seed=step)
        for key, value in theirs.state_dict().items():
            _assert_close(ours.state_dict()[key], value, f"{key} after step {step}", rtol=1e-4)
    theirs.eval()
    ours.eval()
    _wmse_step(theirs, ours, torch.randn(2 * 16, 3), seed=9)
    for key, value in theirs.state_dict().items():  # eval mode leaves the statistics alone
        _assert_close(ours.state_dict()[key], value, f"{key} after the eval step", rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_wmse_custom_loss_fn(backend: str) -> None:
    """``loss_fn`` replaces the normalized MSE between the whitened views, as in lightly."""
    def squared_distance(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        return (x0 - x1).pow(2).sum(dim=1).mean()

    theirs, ours = _both("WMSELoss", embedding_dim=3, w_size=8, num_samples=3, loss_fn=squared_distance,
                         backend=backend)
    _wmse_step(theirs, ours, torch.randn(3 * 16, 3), seed=4)
