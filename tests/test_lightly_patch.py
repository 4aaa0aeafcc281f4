"""``fastssl.patch_lightly()`` / ``fastssl.unpatch_lightly()``: the round trip with and without an
importable torchvision, what is replaced (and where), and exact restoration."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

import fastssl
from fastssl import lightly_patch

import _lightly

# The comparison tests' lightly classes are loaded (and cached) before anything here patches.
_lightly.load()

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("lightly") is None, reason="lightly is not installed"
)


def _owned(name: str) -> bool:
    return any(name == top or name.startswith(top + ".") for top in ("lightly", "torchvision"))


@pytest.fixture
def clean_modules():
    """Run with the lightly/torchvision entries of sys.modules as they are, and put them back
    exactly afterwards (whatever the test imported goes again)."""
    saved = {name: module for name, module in sys.modules.items() if _owned(name)}
    try:
        yield
    finally:
        lightly_patch.unpatch_lightly()
        for name in [name for name in sys.modules if _owned(name)]:
            if name not in saved:
                del sys.modules[name]
        sys.modules.update(saved)


def _snapshot():
    """Every attribute of every loaded lightly.loss module, by identity."""
    return {
        name: dict(vars(module))
        for name, module in sys.modules.items()
        if module is not None and (name == "lightly.loss" or name.startswith("lightly.loss."))
    }


def _expected_names():
    """Classes lightly.loss exports that fastssl has under the same name."""
    return {name for name in lightly_patch.lightly_exports() if isinstance(getattr(fastssl, name, None), type)}


def test_exports_are_read_from_lightly_source():
    exports = lightly_patch.lightly_exports()
    assert exports["IBOTPatchLoss"] == "lightly.loss.ibot_loss"
    assert exports["PMSNCustomLoss"] == "lightly.loss.pmsn_loss"
    assert len([n for n in exports if n[0].isupper()]) >= 32  # lightly 1.6.0 exports 32 classes


def test_round_trip_without_torchvision(clean_modules):
    """Without torchvision ``import lightly.loss`` fails; the submodules that import on their
    own are patched, and unpatch removes them again."""
    sys.modules["torchvision"] = None  # type: ignore[assignment]  # `import torchvision` raises
    before = {name for name in sys.modules if _owned(name)}
    replaced = fastssl.patch_lightly()
    assert {"MSNLoss", "PMSNLoss", "PMSNCustomLoss", "CAPILoss"} <= set(replaced)
    assert "IBOTPatchLoss" not in replaced  # ibot_loss needs lightly.models, hence torchvision
    msn = sys.modules["lightly.loss.msn_loss"]
    pmsn = sys.modules["lightly.loss.pmsn_loss"]
    assert msn.MSNLoss is fastssl.MSNLoss and pmsn.PMSNLoss is fastssl.PMSNLoss
    assert pmsn.MSNLoss is fastssl.MSNLoss  # the name pmsn_loss imports is replaced too
    assert replaced["MSNLoss"].__module__ == "lightly.loss.msn_loss" and replaced["MSNLoss"] is not fastssl.MSNLoss
    assert "lightly.loss" not in sys.modules  # no half-made package is left behind
    assert lightly_patch.is_patched()

    restored = fastssl.unpatch_lightly()
    assert restored.keys() == replaced.keys()
    assert {name for name in sys.modules if _owned(name)} == before
    assert not lightly_patch.is_patched()
    assert fastssl.unpatch_lightly() == {}


def _placeholder_torchvision():
    for name in ("torchvision", "torchvision.ops"):
        sys.modules[name] = _lightly._placeholder_module(name)
    sys.modules["torchvision"].ops = sys.modules["torchvision.ops"]  # type: ignore[attr-defined]


def test_round_trip_with_lightly_loss_importable(clean_modules):
    if importlib.util.find_spec("torchvision") is None:
        _placeholder_torchvision()
    try:
        lightly_loss = importlib.import_module("lightly.loss")
    except ImportError as error:
        pytest.skip(f"lightly.loss does not import here: {error}")
    originals = {name: getattr(lightly_loss, name) for name in lightly_patch.lightly_exports()}
    snapshot = _snapshot()

    replaced = fastssl.patch_lightly()
    assert set(replaced) == _expected_names()
    for name in ["IBOTPatchLoss", "IBOTPlusPlusPatchLoss", "CAPILoss", "MSNLoss", "PMSNLoss", "PMSNCustomLoss",
                 "DINOLoss", "NTXentLoss"]:  # fmt: skip
        assert getattr(lightly_loss, name) is getattr(fastssl, name), name
        assert replaced[name] is originals[name]
    assert sys.modules["lightly.loss.ibot_loss"].IBOTPlusPlusPatchLoss is fastssl.IBOTPlusPlusPatchLoss
    from lightly.loss import IBOTPatchLoss  # what a script does after the patch

    assert IBOTPatchLoss is fastssl.IBOTPatchLoss
    assert lightly_loss.roi_resample_to_grid is originals["roi_resample_to_grid"]  # a function: left alone
    for name in set(originals) - set(replaced):
        assert getattr(lightly_loss, name) is originals[name]

    # A patched lightly-style call runs fastssl's loss.
    anchors, targets, prototypes = torch.randn(6, 4), torch.randn(3, 4), torch.randn(5, 4)
    value = lightly_loss.MSNLoss()(anchors, targets, prototypes)
    assert value.item() == pytest.approx(fastssl.MSNLoss()(anchors, targets, prototypes).item())

    assert fastssl.patch_lightly() == replaced  # idempotent
    fastssl.unpatch_lightly()
    assert _snapshot() == snapshot  # every attribute of every lightly.loss module, by identity


def test_patch_picks_up_classes_added_later(clean_modules, monkeypatch):
    sys.modules["torchvision"] = None  # type: ignore[assignment]
    first = fastssl.patch_lightly()
    assert "MSNLoss" in first
    capi_module = sys.modules["lightly.loss.capi_loss"]
    lightly_capi = first["CAPILoss"]

    # A class fastssl gains after a call (another family landing) is picked up by the next one.
    fastssl.unpatch_lightly()
    monkeypatch.delattr(fastssl, "CAPILoss")
    partial = fastssl.patch_lightly()
    assert "CAPILoss" not in partial
    monkeypatch.undo()
    later = fastssl.patch_lightly()
    assert "CAPILoss" in later and sys.modules["lightly.loss.capi_loss"].CAPILoss is fastssl.CAPILoss
    fastssl.unpatch_lightly()
    assert capi_module.CAPILoss is lightly_capi or "lightly.loss.capi_loss" not in sys.modules


def test_without_lightly_nothing_is_replaced(clean_modules, monkeypatch):
    monkeypatch.setattr(lightly_patch, "_loss_directory", lambda: None)
    for name in [name for name in sys.modules if name == "lightly" or name.startswith("lightly.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lightly", None)  # `import lightly` raises
    assert fastssl.patch_lightly() == {}
    assert fastssl.unpatch_lightly() == {}


def test_patched_classes_keep_working_for_the_loader():
    """The comparison tests' lightly classes were loaded before any patch: still lightly's."""
    lightly = _lightly.load()
    if lightly is None:
        pytest.skip("lightly's loss files are not importable here")
    assert lightly.MSNLoss.__module__.startswith("lightly.") and lightly.MSNLoss is not fastssl.MSNLoss
