"""lightly's loss modules, loaded file by file.

``import lightly.loss`` imports every loss of the package, and some of them need torchvision
(and the model zoo). The losses fastssl replaces need only torch plus two small helpers of
``lightly.models.modules`` (``memory_bank``, ``center``), whose package ``__init__`` imports
torchvision as well. So each loss file is executed on its own: ``lightly.models`` and
``lightly.models.modules`` are briefly replaced by empty packages pointing at the real
directories (their ``__init__`` is not run), ``lightly.models.utils`` by a stand-in that offers
only what ``memory_bank`` imports from it, and ``sys.modules`` is restored afterwards. The
loaded code is lightly's, unchanged.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import types
from typing import Optional

#: module class (or function) -> file under lightly/loss/
LOSS_FILES = {
    "NTXentLoss": "ntx_ent_loss",
    "BarlowTwinsLoss": "barlow_twins_loss",
    "VICRegLoss": "vicreg_loss",
    "SwaVLoss": "swav_loss",
    "sinkhorn": "swav_loss",
    "DINOLoss": "dino_loss",
    "WMSELoss": "wmse_loss",
}

_STUBBED = ("lightly.models", "lightly.models.modules", "lightly.models.utils")


def lightly_version() -> Optional[str]:
    try:
        import lightly
    except Exception:
        return None
    return getattr(lightly, "__version__", "unknown")


def _lightly_dir() -> str:
    spec = importlib.util.find_spec("lightly")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("lightly is not installed")
    return list(spec.submodule_search_locations)[0]


def _concat_all_gather_unavailable(*args, **kwargs):
    raise RuntimeError("the benchmark's lightly loader does not support gather_distributed")


@functools.lru_cache(maxsize=None)
def _load_file(stem: str) -> types.ModuleType:
    root = _lightly_dir()
    saved = {name: sys.modules.get(name) for name in _STUBBED}
    before = set(sys.modules)
    try:
        for name, sub in (("lightly.models", "models"), ("lightly.models.modules", "models/modules")):
            package = types.ModuleType(name)
            package.__path__ = [os.path.join(root, sub)]
            sys.modules[name] = package
        utils = types.ModuleType("lightly.models.utils")
        utils.concat_all_gather = _concat_all_gather_unavailable
        sys.modules["lightly.models.utils"] = utils
        sys.modules["lightly.models"].utils = utils

        path = os.path.join(root, "loss", f"{stem}.py")
        spec = importlib.util.spec_from_file_location(f"_fastssl_bench_lightly_{stem}", path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        # Whatever was imported through the stand-ins goes again; the real modules come back.
        for name in set(sys.modules) - before:
            if name.startswith("lightly.models"):
                del sys.modules[name]
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def load(name: str):
    """lightly's ``name`` (a key of :data:`LOSS_FILES`). Raises ``ImportError`` (with the reason)
    when lightly is missing or the file cannot be executed here."""
    if name not in LOSS_FILES:
        raise KeyError(f"no lightly loss {name!r}; known: {sorted(LOSS_FILES)}")
    try:
        module = _load_file(LOSS_FILES[name])
    except ImportError:
        raise
    except Exception as error:  # a failing import inside lightly's file
        raise ImportError(f"loading lightly/loss/{LOSS_FILES[name]}.py failed: {error!r}") from error
    return getattr(module, name)
