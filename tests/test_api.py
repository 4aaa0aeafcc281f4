"""The public surface shared by every loss: exports, backend selection, argument validation,
NaN propagation, and the predictive losses (SimSiam, BYOL, center penalty)."""

from __future__ import annotations

import copy
import importlib
import math

import pytest
import torch

import fastssl
import fastssl.functional as FS
from fastssl import reference
from fastssl._backend import resolve_backend

from _helpers import assert_matches_reference, awkward_inputs


def test_public_api_exports():
    for name in [
        "NTXentLoss",
        "NegativeCosineSimilarity",
        "BarlowTwinsLoss",
        "VICRegLoss",
        "SwaVLoss",
        "DINOLoss",
        "WMSELoss",
        "CenterPenaltyLoss",
    ]:
        assert issubclass(getattr(fastssl, name), torch.nn.Module)
    for name in FS.__all__:
        assert callable(getattr(FS, name))
    for module in ["fastssl.metrics", "fastssl.reference", "fastssl.distributed"]:
        importlib.import_module(module)


# --------------------------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------------------------


def test_auto_backend_is_torch_on_cpu(monkeypatch):
    x = torch.randn(2, 2)
    monkeypatch.delenv("FASTSSL_BACKEND", raising=False)
    assert resolve_backend("auto", x) == "torch"
    assert resolve_backend("reference", x) == "reference"


def test_env_var_replaces_auto_but_not_an_explicit_choice(monkeypatch):
    x = torch.randn(2, 2)
    monkeypatch.setenv("FASTSSL_BACKEND", "reference")
    assert resolve_backend("auto", x) == "reference"
    assert resolve_backend("torch", x) == "torch"
    monkeypatch.setenv("FASTSSL_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTSSL_BACKEND"):
        resolve_backend("auto", x)


def test_env_var_reaches_the_modules(monkeypatch, mocker):
    spy = mocker.spy(reference, "barlow_twins_loss")
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    monkeypatch.setenv("FASTSSL_BACKEND", "reference")
    fastssl.BarlowTwinsLoss()(a, b)
    assert spy.call_count == 1
    monkeypatch.setenv("FASTSSL_BACKEND", "torch")
    fastssl.BarlowTwinsLoss(backend="reference")(a, b)
    assert spy.call_count == 2


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.randn(2, 2))


def test_unknown_backend_rejected_at_construction():
    for cls in [fastssl.NTXentLoss, fastssl.BarlowTwinsLoss, fastssl.VICRegLoss, fastssl.SwaVLoss,
                fastssl.DINOLoss, fastssl.WMSELoss, fastssl.NegativeCosineSimilarity, fastssl.CenterPenaltyLoss]:
        with pytest.raises(ValueError, match="backend must be one of"):
            cls(backend="cuda")


# --------------------------------------------------------------------------------------------
# Argument validation: every message names the argument and what was expected
# --------------------------------------------------------------------------------------------

PAIRWISE = [
    ("ntxent", lambda a, b: FS.ntxent_loss(a, b)),
    ("barlow_twins", lambda a, b: FS.barlow_twins_loss(a, b)),
    ("vicreg", lambda a, b: FS.vicreg_loss(a, b)),
    ("byol", lambda a, b: FS.byol_loss(a, b)),
    ("center_penalty", lambda a, b: FS.center_penalty_loss(a, b)),
]


@pytest.mark.parametrize("name,fn", PAIRWISE, ids=[p[0] for p in PAIRWISE])
def test_pairwise_losses_reject_bad_inputs(name, fn):
    with pytest.raises(ValueError, match="same shape"):
        fn(torch.randn(4, 3), torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"\(batch_size, dim\)"):
        fn(torch.randn(4), torch.randn(4))
    if name != "vicreg":  # VICReg takes lightly's (batch, ..., dim) form as well
        with pytest.raises(ValueError, match=r"\(batch_size, dim\)"):
            fn(torch.randn(4, 3, 2), torch.randn(4, 3, 2))
    with pytest.raises(ValueError, match="empty batch"):
        fn(torch.randn(0, 3), torch.randn(0, 3))
    with pytest.raises(ValueError, match="empty feature"):
        fn(torch.randn(3, 0), torch.randn(3, 0))
    with pytest.raises(TypeError, match="floating-point"):
        fn(torch.ones(4, 3, dtype=torch.int64), torch.ones(4, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        fn([[1.0, 2.0]], [[1.0, 2.0]])


@pytest.mark.parametrize("fn", [FS.barlow_twins_loss, FS.vicreg_loss])
def test_decorrelation_losses_need_two_samples(fn):
    with pytest.raises(ValueError, match="at least 2 samples"):
        fn(torch.randn(1, 3), torch.randn(1, 3))


@pytest.mark.parametrize(
    "factory,match",
    [
        (lambda: fastssl.NTXentLoss(temperature=0.0), "temperature"),
        (lambda: fastssl.NTXentLoss(temperature=float("nan")), "temperature must be finite"),
        (lambda: fastssl.NTXentLoss(memory_bank_size=-1), "memory_bank_size"),
        (lambda: fastssl.NTXentLoss(memory_bank_size=(4, 0)), r"memory_bank_size\[1\]"),
        (lambda: fastssl.NTXentLoss(memory_bank_size=(1, 2, 3)), "memory_bank_size"),
        (lambda: fastssl.BarlowTwinsLoss(lambda_param=float("inf")), "lambda_param must be finite"),
        (lambda: fastssl.VICRegLoss(mu_param=float("nan")), "mu_param must be finite"),
        (lambda: fastssl.VICRegLoss(eps=-1.0), "eps"),
        (lambda: fastssl.SwaVLoss(sinkhorn_epsilon=0.0), "sinkhorn_epsilon"),
        (lambda: fastssl.SwaVLoss(sinkhorn_iterations=-1), "sinkhorn_iterations"),
        (lambda: fastssl.SwaVLoss(temperature=float("nan")), "temperature"),
        (lambda: fastssl.DINOLoss(output_dim=0), "output_dim"),
        (lambda: fastssl.DINOLoss(center_momentum=1.5), "center_momentum"),
        (lambda: fastssl.DINOLoss(student_temp=0.0), "student_temp"),
        (lambda: fastssl.DINOLoss(center_mode="median"), "Unknown mode"),
        (lambda: fastssl.WMSELoss(embedding_dim=128, w_size=200), "w_size"),
        (lambda: fastssl.NegativeCosineSimilarity(eps=-1.0), "eps"),
        (lambda: fastssl.CenterPenaltyLoss(lambda_param=float("nan")), "lambda_param"),
    ],
)
def test_bad_hyperparameters_are_rejected(factory, match):
    with pytest.raises((ValueError, TypeError), match=match):
        factory()


def test_list_inputs_are_validated():
    a = torch.randn(4, 5)
    with pytest.raises(TypeError, match="high_resolution_outputs must be a list"):
        FS.swav_loss(a, [a])
    with pytest.raises(ValueError, match="at least two crops"):
        FS.swav_loss([a], [])
    with pytest.raises(ValueError, match=r"low_resolution_outputs\[0\]"):
        FS.swav_loss([a], [torch.randn(4, 6)])
    with pytest.raises(ValueError, match="queue_outputs"):
        FS.swav_loss([a, a], [], queue_outputs=[a])
    with pytest.raises(ValueError, match="at least two views"):
        fastssl.DINOLoss(output_dim=5)([a], [a])
    with pytest.raises(ValueError, match=r"construct DINOLoss\(output_dim=\d+\)"):
        FS.dino_loss([a, a], [a, a], center=torch.zeros(3))
    with pytest.raises(ValueError, match="same shape"):
        FS.dino_loss([a, a], [torch.randn(4, 6)])


def test_wmse_batch_checks():
    loss = fastssl.WMSELoss(embedding_dim=4, w_size=8)
    with pytest.raises((ValueError, RuntimeError), match="num_samples"):
        loss(torch.randn(33, 4))
    with pytest.raises(ValueError, match="w_size"):
        loss(torch.randn(8, 4))  # 4 images per view < w_size
    with pytest.raises(ValueError, match=r"\(batch_size \* 2, 4\)"):
        loss(torch.randn(32, 5))


def test_memory_bank_dimension_mismatch():
    loss = fastssl.NTXentLoss(memory_bank_size=(8, 4))
    with pytest.raises(ValueError, match="memory bank stores 4"):
        loss(torch.randn(3, 5, requires_grad=True), torch.randn(3, 5))


# --------------------------------------------------------------------------------------------
# Non-finite inputs propagate NaN; they never become a silent finite number
# --------------------------------------------------------------------------------------------

NAN_CASES = [
    ("ntxent", lambda a, b: fastssl.NTXentLoss(backend="torch")(a, b)),
    ("moco", lambda a, b: fastssl.NTXentLoss(memory_bank_size=(16, 6), backend="torch")(a, b)),
    ("barlow_twins", lambda a, b: fastssl.BarlowTwinsLoss(backend="torch")(a, b)),
    ("vicreg", lambda a, b: fastssl.VICRegLoss(backend="torch")(a, b)),
    ("swav", lambda a, b: fastssl.SwaVLoss(backend="torch")([a, b], [])),
    ("dino", lambda a, b: fastssl.DINOLoss(output_dim=6, backend="torch")([a, b], [b, a])),
    ("negcos", lambda a, b: fastssl.NegativeCosineSimilarity()(a, b)),
    ("center_penalty", lambda a, b: fastssl.CenterPenaltyLoss()(a, b)),
    ("wmse", lambda a, b: fastssl.WMSELoss(embedding_dim=6, w_size=16, backend="torch")(torch.cat([a, b]))),
]


@pytest.mark.parametrize("name,fn", NAN_CASES, ids=[c[0] for c in NAN_CASES])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_gives_nan_loss(name, fn, bad):
    a, b = torch.randn(16, 6), torch.randn(16, 6)
    a[3, 2] = bad
    out = fn(a, b)
    assert not torch.isfinite(out), f"{name}: a non-finite input produced the finite loss {out.item()}"


# --------------------------------------------------------------------------------------------
# Predictive losses: SimSiam, BYOL, center penalty
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,d", [(1, 1), (2, 3), (3, 129), (127, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_predictive_losses_match_reference(n, d, dtype):
    a, b = awkward_inputs(n, d, dtype=dtype, non_contiguous=(n == 3))
    assert_matches_reference(lambda x, y: FS.negative_cosine_similarity(x, y), reference.negative_cosine_similarity, [a, b])
    assert_matches_reference(lambda x, y: FS.byol_loss(x, y), reference.byol_loss, [a, b])
    assert_matches_reference(lambda x, y: FS.center_penalty_loss(x, y), reference.center_penalty_loss, [a, b])
    assert_matches_reference(
        lambda x, y: FS.center_penalty_loss(x, y, lambda_param=2.5),
        lambda x, y: reference.center_penalty_loss(x, y, 2.5),
        [a, b],
    )


def test_negative_cosine_similarity_other_dim_and_eps():
    x0, x1 = torch.randn(3, 8, 5), torch.randn(3, 8, 5)
    ours = fastssl.NegativeCosineSimilarity(dim=2, eps=1e-3)(x0, x1)
    assert ours.item() == pytest.approx(-torch.nn.functional.cosine_similarity(x0, x1, 2, 1e-3).mean().item(), rel=1e-6)


def test_center_penalty_properties():
    # Identical views: invariance 0, so the loss is 0.5·‖s‖ (λ = −1), ‖s‖ = 1 at full collapse.
    z = torch.randn(1, 7).repeat(10, 1)
    assert FS.center_penalty_loss(z, z).item() == pytest.approx(0.5, abs=1e-6)
    z = torch.randn(10, 7)
    s = torch.nn.functional.normalize(z, dim=1).mean(0).norm().item()
    assert FS.center_penalty_loss(z, z).item() == pytest.approx(0.5 * s, rel=1e-5)


def test_byol_equals_two_plus_two_negative_cosine():
    a, b = torch.randn(9, 4), torch.randn(9, 4)
    assert FS.byol_loss(a, b).item() == pytest.approx(2 + 2 * FS.negative_cosine_similarity(a, b).item(), rel=1e-6)


def test_modules_keep_state_dict_and_move_devices():
    loss = fastssl.NTXentLoss(memory_bank_size=(32, 8))
    assert loss.bank.shape == (32, 8)
    assert torch.allclose(loss.bank.norm(dim=1), torch.ones(32))
    assert "bank" not in loss.state_dict()  # non-persistent, as lightly
    dino = fastssl.DINOLoss(output_dim=10)
    assert dino.state_dict()["center"].shape == (1, 1, 10)


def test_memory_bank_with_int_size_takes_dim_from_first_batch():
    loss = fastssl.NTXentLoss(memory_bank_size=6, backend="reference")
    a = torch.randn(4, 5, requires_grad=True)
    b = torch.randn(4, 5)
    value = loss(a, b)
    assert loss.bank.shape == (6, 5) and int(loss.bank_ptr) == 4
    assert torch.isfinite(value)
    # the keys were enqueued normalized
    assert torch.allclose(loss.bank[:4], torch.nn.functional.normalize(b, dim=1), atol=1e-6)
    loss(a, b)  # 4 + 4 >= 6: fills the end, wraps to 0 (lightly's ring buffer)
    assert int(loss.bank_ptr) == 0
    # evaluation (no grad) leaves the bank alone
    with torch.no_grad():
        before = loss.bank.clone()
        loss(a.detach(), torch.randn(4, 5))
    assert torch.equal(before, loss.bank)


def test_losses_return_float32_scalars_for_half_inputs():
    a, b = torch.randn(8, 4).bfloat16(), torch.randn(8, 4).bfloat16()
    for value in [
        FS.ntxent_loss(a, b),
        FS.barlow_twins_loss(a, b),
        FS.vicreg_loss(a, b),
        FS.negative_cosine_similarity(a, b),
        FS.swav_loss([a, b], []),
        FS.dino_loss([a, b], [b, a]),
    ]:
        assert value.dtype == torch.float32 and value.dim() == 0 and math.isfinite(value.item())


# --------------------------------------------------------------------------------------------
# Autocast and torch.compile of a model that uses the losses
# --------------------------------------------------------------------------------------------

MODULE_CASES = [
    ("ntxent", lambda: fastssl.NTXentLoss(), lambda za, zb: (za, zb)),
    ("moco", lambda: fastssl.NTXentLoss(memory_bank_size=(32, 16)), lambda za, zb: (za, zb)),
    ("barlow_twins", lambda: fastssl.BarlowTwinsLoss(), lambda za, zb: (za, zb)),
    ("vicreg", lambda: fastssl.VICRegLoss(), lambda za, zb: (za, zb)),
    ("swav", lambda: fastssl.SwaVLoss(), lambda za, zb: ([za, zb], [])),
    ("dino", lambda: fastssl.DINOLoss(output_dim=16), lambda za, zb: ([za, zb], [zb, za])),
    ("negcos", lambda: fastssl.NegativeCosineSimilarity(), lambda za, zb: (za, zb.detach())),
    ("center_penalty", lambda: fastssl.CenterPenaltyLoss(), lambda za, zb: (za, zb)),
]


@pytest.mark.parametrize("name,factory,args", MODULE_CASES, ids=[c[0] for c in MODULE_CASES])
def test_losses_under_autocast_match_the_half_precision_call(name, factory, args):
    # Under autocast the projector emits bfloat16; the loss must run (forward and backward) and
    # give what it gives on the same bfloat16 embeddings outside autocast.
    head = torch.nn.Linear(8, 16)
    x = torch.randn(12, 8)
    loss_fn = factory()
    twin = copy.deepcopy(loss_fn)  # same state (memory bank, center) for the plain call
    with torch.autocast("cpu", dtype=torch.bfloat16):
        za, zb = head(x), head(x + 0.1 * torch.randn_like(x))
        value = loss_fn(*args(za, zb))
    value.backward()
    assert value.dtype == torch.float32 and head.weight.grad is not None
    assert torch.isfinite(head.weight.grad).all()
    plain = twin(*args(za.detach(), zb.detach()))
    assert value.item() == pytest.approx(plain.item(), rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_compiled_model_with_every_loss_has_no_graph_break():
    # DESIGN §3: torch.compile of a model that uses the losses works without graph breaks.
    torch._dynamo.reset()
    for name, factory, args in MODULE_CASES:
        head = torch.nn.Linear(8, 16)
        loss_fn = factory()
        twin = copy.deepcopy(loss_fn)  # stateful losses (bank, center): eager twin, same state

        def step(x, loss_fn, head=head, args=args):
            return loss_fn(*args(head(x), head(x.flip(0))))

        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        for _ in range(2):  # the second call sees the updated bank / center
            x = torch.randn(12, 8)
            value = compiled(x, loss_fn)
            value.backward()
            assert torch.isfinite(value), name
            assert value.item() == pytest.approx(step(x, twin).item(), rel=1e-4, abs=1e-6), name
