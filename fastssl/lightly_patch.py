"""Put fastssl's losses in place of lightly's in a running program: :func:`patch_lightly` and
:func:`unpatch_lightly`.

One line at the top of an existing lightly training script::

    import fastssl; fastssl.patch_lightly()
    from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss   # now fastssl's classes

Every class that ``lightly.loss`` exports (the names imported by ``lightly/loss/__init__.py``)
for which ``fastssl`` has a class of the same name *at the time of the call* is replaced, in
``lightly.loss`` and in every loaded ``lightly.loss.*`` submodule whose attribute of that name is
lightly's class (the module that defines it, and those that import it, e.g.
``lightly.loss.pmsn_loss.MSNLoss``). Classes fastssl does not (yet) have stay lightly's.

What a replacement does not reach: a name bound before the call (``from lightly.loss import X``
executed earlier keeps lightly's ``X``), instances already built, and lightly's own subclasses
(lightly's ``PMSNLoss`` still derives from lightly's ``MSNLoss`` -- but ``PMSNLoss`` itself is
replaced). So call it before importing the loss classes.

Without torchvision, ``import lightly.loss`` fails (its ``__init__`` imports
``dense_relational_utils``, which needs ``torchvision.ops``), so no lightly script can import a
loss in the usual way there. :func:`patch_lightly` then patches the ``lightly.loss.*`` submodules
that are already loaded and those that import on their own (each file loaded below a temporary
bare ``lightly.loss`` package; files that need torchvision or lightly's model zoo are skipped),
and :func:`unpatch_lightly` removes again the submodules it loaded that way.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
import threading
import types
from pathlib import Path
from typing import Dict, List, Optional, Tuple

_PACKAGE = "lightly.loss"

_lock = threading.Lock()
# (module, attribute name, lightly's object) for every attribute replaced, in patch order.
_replaced: List[Tuple[types.ModuleType, str, object]] = []
# Submodules patch_lightly imported itself (no-torchvision fallback); unpatch removes them.
_loaded_by_patch: List[str] = []


def _loss_directory() -> Optional[Path]:
    spec = importlib.util.find_spec("lightly")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "loss"


def lightly_exports() -> Dict[str, str]:
    """``{class or function name: defining submodule}`` of every name ``lightly/loss/__init__.py``
    imports, read from the installed source (without importing it); empty when lightly is absent."""
    directory = _loss_directory()
    init = directory / "__init__.py" if directory is not None else None
    if init is None or not init.is_file():
        return {}
    exports: Dict[str, str] = {}
    for node in ast.walk(ast.parse(init.read_text(), str(init))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(_PACKAGE + "."):
            for alias in node.names:
                exports[alias.asname or alias.name] = node.module
    return exports


def _import_submodules_without_package(modules: List[str]) -> None:
    """Load ``lightly.loss.<x>`` files one by one below a temporary bare ``lightly.loss`` package
    (its ``__init__``, which needs torchvision, does not run). Files that fail to import are skipped."""
    directory = _loss_directory()
    if directory is None or _PACKAGE in sys.modules:
        return
    bare = types.ModuleType(_PACKAGE)
    bare.__path__ = [str(directory)]  # type: ignore[attr-defined]
    sys.modules[_PACKAGE] = bare
    try:
        for name in modules:
            if name in sys.modules:
                continue
            try:
                importlib.import_module(name)
            except Exception:  # needs torchvision, timm, or lightly's models: not patchable here
                sys.modules.pop(name, None)
    finally:
        if sys.modules.get(_PACKAGE) is bare:
            del sys.modules[_PACKAGE]
        lightly = sys.modules.get("lightly")
        if lightly is not None and getattr(lightly, "loss", None) is bare:
            delattr(lightly, "loss")


def _target_modules(exports: Dict[str, str]) -> List[types.ModuleType]:
    """``lightly.loss`` (when it imports) and every loaded ``lightly.loss.*`` submodule."""
    before = set(sys.modules)
    try:
        importlib.import_module(_PACKAGE)
    except ImportError:
        _import_submodules_without_package(sorted(set(exports.values())))
        # What this attempt loaded (the failed package import leaves the submodules it got
        # through, e.g. lightly.loss.barlow_twins_loss) goes again at unpatch_lightly().
        _loaded_by_patch.extend(
            name for name in sys.modules
            if name not in before and name.startswith("lightly") and name not in _loaded_by_patch
        )  # fmt: skip
    return [
        module
        for name, module in sorted(sys.modules.items())
        if module is not None and (name == _PACKAGE or name.startswith(_PACKAGE + "."))
    ]


def patch_lightly() -> Dict[str, type]:
    """Replace lightly's loss classes by fastssl's classes of the same name, for this process.

    Returns:
        ``{name: lightly's class}`` of every class replaced (so far, when called again; a second
        call also picks up fastssl classes added since the first). Empty when lightly is not
        installed.

    Example:
        >>> import fastssl
        >>> replaced = fastssl.patch_lightly()     # e.g. {"DINOLoss": <lightly's DINOLoss>, ...}
        >>> from lightly.loss import DINOLoss      # fastssl.DINOLoss
    """
    import fastssl

    exports = lightly_exports()
    with _lock:
        modules = _target_modules(exports)
        already = {(id(module), attribute) for module, attribute, _ in _replaced}
        for name in sorted(exports):
            ours = getattr(fastssl, name, None)
            if not isinstance(ours, type):
                continue
            # lightly's class: from the defining submodule if loaded, else from the package.
            defining = sys.modules.get(exports[name])
            theirs = getattr(defining, name, None) if defining is not None else None
            if theirs is None:
                package = sys.modules.get(_PACKAGE)
                theirs = getattr(package, name, None) if package is not None else None
            if not isinstance(theirs, type) or theirs is ours:
                continue
            for module in modules:
                if (id(module), name) in already:
                    continue
                if module.__dict__.get(name) is theirs:
                    setattr(module, name, ours)
                    _replaced.append((module, name, theirs))
        return _replaced_classes()


def _replaced_classes() -> Dict[str, type]:
    out: Dict[str, type] = {}
    for _, name, theirs in _replaced:
        out.setdefault(name, theirs)  # type: ignore[arg-type]
    return out


def unpatch_lightly() -> Dict[str, type]:
    """Undo :func:`patch_lightly`: every replaced attribute gets lightly's class back, and the
    submodules that :func:`patch_lightly` itself loaded (without torchvision) are unloaded.

    Returns:
        ``{name: lightly's class}`` of the classes restored (empty if nothing was patched).
    """
    with _lock:
        restored = _replaced_classes()
        for module, name, theirs in reversed(_replaced):
            setattr(module, name, theirs)
        _replaced.clear()
        for name in _loaded_by_patch:
            sys.modules.pop(name, None)
        _loaded_by_patch.clear()
        return restored


def is_patched() -> bool:
    """Whether :func:`patch_lightly` has replaced anything that is not yet restored."""
    return bool(_replaced)
