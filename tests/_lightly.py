"""Load lightly's loss modules from the installed ``lightly`` package, without ``import lightly.loss``.

``lightly/loss/__init__.py`` imports every loss lightly ships, and several of them (and
``lightly/models/utils.py``, which the memory bank needs) import ``torchvision`` at module level.
The compatibility tests only need the seven losses fastssl replaces, none of which calls
torchvision, so :func:`load` imports exactly their source files:

* ``lightly.loss``, ``lightly.models`` and ``lightly.models.modules`` are entered in
  ``sys.modules`` as bare packages pointing at the real directories, so that importing a
  submodule does not run the package's ``__init__`` (and its imports of everything else);
* where ``torchvision`` is not installed, a placeholder ``torchvision``/``torchvision.ops`` whose
  attributes raise when used is visible while the files are imported;
* afterwards the ``lightly*`` and ``torchvision*`` entries of ``sys.modules`` are restored
  exactly, so no other test sees the placeholders or a half-initialized ``lightly``. The loaded classes keep working: they hold references to the
  module objects they imported.

:func:`load` returns ``None`` when lightly is not installed (or its files cannot be imported),
so the tests that need it skip instead of failing.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Dict, Optional

# fastssl class name -> (lightly module, lightly class name)
CLASSES: Dict[str, tuple] = {
    "NTXentLoss": ("lightly.loss.ntx_ent_loss", "NTXentLoss"),
    "NegativeCosineSimilarity": ("lightly.loss.negative_cosine_similarity", "NegativeCosineSimilarity"),
    "BarlowTwinsLoss": ("lightly.loss.barlow_twins_loss", "BarlowTwinsLoss"),
    "VICRegLoss": ("lightly.loss.vicreg_loss", "VICRegLoss"),
    "SwaVLoss": ("lightly.loss.swav_loss", "SwaVLoss"),
    "DINOLoss": ("lightly.loss.dino_loss", "DINOLoss"),
    "WMSELoss": ("lightly.loss.wmse_loss", "WMSELoss"),
    "TiCoLoss": ("lightly.loss.tico_loss", "TiCoLoss"),
    "FroSSLLoss": ("lightly.loss.frossl_loss", "FroSSLLoss"),
    "MMCRLoss": ("lightly.loss.mmcr_loss", "MMCRLoss"),
    "EMPSSLLoss": ("lightly.loss.emp_ssl_loss", "EMPSSLLoss"),
    "PatchKernelAlignmentLoss": ("lightly.loss.patch_kernel_alignment_loss", "PatchKernelAlignmentLoss"),
    "VICRegLLoss": ("lightly.loss.vicregl_loss", "VICRegLLoss"),
    "SIGReg": ("lightly.loss.lejepa_loss", "SIGReg"),
    "LeJEPALoss": ("lightly.loss.lejepa_loss", "LeJEPALoss"),
    "LeWMLoss": ("lightly.loss.lewm_loss", "LeWMLoss"),
    "VISRegLoss": ("lightly.loss.visreg_loss", "VISRegLoss"),
    "DCLLoss": ("lightly.loss.dcl_loss", "DCLLoss"),
    "DCLWLoss": ("lightly.loss.dcl_loss", "DCLWLoss"),
    "negative_mises_fisher_weights": ("lightly.loss.dcl_loss", "negative_mises_fisher_weights"),
    "DirectCLRLoss": ("lightly.loss.directclr_loss", "DirectCLRLoss"),
    "MACLLoss": ("lightly.loss.macl_loss", "MACLLoss"),
    "DetConSLoss": ("lightly.loss.detcon_loss", "DetConSLoss"),
    "DetConBLoss": ("lightly.loss.detcon_loss", "DetConBLoss"),
    "KoLeoLoss": ("lightly.loss.koleo_loss", "KoLeoLoss"),
    "IBOTPatchLoss": ("lightly.loss.ibot_loss", "IBOTPatchLoss"),
    "IBOTPlusPlusPatchLoss": ("lightly.loss.ibot_loss", "IBOTPlusPlusPatchLoss"),
    "CAPILoss": ("lightly.loss.capi_loss", "CAPILoss"),
    "MSNLoss": ("lightly.loss.msn_loss", "MSNLoss"),
    "PMSNLoss": ("lightly.loss.pmsn_loss", "PMSNLoss"),
    "PMSNCustomLoss": ("lightly.loss.pmsn_loss", "PMSNCustomLoss"),
}

# Packages whose __init__ must not run: it imports torchvision (and timm-based models).
_BARE_PACKAGES = ("lightly.loss", "lightly.models", "lightly.models.modules")


class _Unavailable:
    """Stands in for a torchvision symbol that lightly imports but the losses never call."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name} is a placeholder: torchvision is not installed")

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unavailable(f"{self._name}.{attr}")


def _placeholder_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = []  # a package, so that "torchvision.ops" resolves below it

    def missing(attr: str):
        if attr.startswith("__"):  # keep introspection (inspect, pickle) honest
            raise AttributeError(attr)
        return _Unavailable(f"{name}.{attr}")

    module.__getattr__ = missing  # type: ignore[attr-defined]
    return module


def _owned(name: str) -> bool:
    """The entries of ``sys.modules`` this loader may add, replace and must restore."""
    return any(name == top or name.startswith(top + ".") for top in ("lightly", "torchvision"))


def _load_uncached() -> Optional[types.SimpleNamespace]:
    spec = importlib.util.find_spec("lightly")
    if spec is None or spec.origin is None:
        return None
    root = Path(spec.origin).parent
    import torch  # noqa: F401  (imported before any placeholder can be seen by it)

    saved = {name: module for name, module in sys.modules.items() if _owned(name)}
    try:
        if importlib.util.find_spec("torchvision") is None:
            for name in ("torchvision", "torchvision.ops"):
                sys.modules[name] = _placeholder_module(name)
            sys.modules["torchvision"].ops = sys.modules["torchvision.ops"]  # type: ignore[attr-defined]
        importlib.import_module("lightly")
        for package in _BARE_PACKAGES:
            bare = types.ModuleType(package)
            bare.__path__ = [str(root.joinpath(*package.split(".")[1:]))]
            sys.modules[package] = bare
        classes = {}
        for ours, (module_name, class_name) in CLASSES.items():
            classes[ours] = getattr(importlib.import_module(module_name), class_name)
        version = getattr(sys.modules["lightly"], "__version__", "unknown")
    except Exception:  # lightly present but not importable here: the tests skip
        return None
    finally:
        for name in [name for name in sys.modules if _owned(name)]:
            if name not in saved:
                del sys.modules[name]
        sys.modules.update(saved)
    return types.SimpleNamespace(version=version, path=str(root), **classes)


@functools.lru_cache(maxsize=None)
def load() -> Optional[types.SimpleNamespace]:
    """lightly's loss classes as attributes named like fastssl's (``.NTXentLoss`` ...), plus
    ``.version`` and ``.path``; ``None`` when lightly is not installed or not importable."""
    return _load_uncached()
