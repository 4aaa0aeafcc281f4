"""Backend selection shared by every loss.

Three implementations exist for each loss (see DESIGN):

* ``"reference"`` -- the textbook formula in :mod:`fastssl.reference`;
* ``"torch"``     -- optimized pure PyTorch in each family's module (``fastssl/<family>.py``),
  the default on CPU;
* ``"triton"``    -- fused kernels in :mod:`fastssl.kernels`, the default on CUDA.

``"auto"`` resolves to ``"triton"`` for CUDA tensors when Triton imports and the family has a
kernel, and to ``"torch"`` otherwise. The environment variable ``FASTSSL_BACKEND`` replaces
``"auto"`` (an explicit ``backend=`` argument always wins). Triton kernels run on CPU tensors
only under ``TRITON_INTERPRET=1`` -- that is how the test-suite exercises them without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from typing import Callable, Optional, Set, TypeVar

import torch

BACKENDS = ("auto", "triton", "torch", "reference")
ENV_VAR = "FASTSSL_BACKEND"


def check_backend_name(backend: str) -> str:
    """Validate a ``backend=`` argument at construction time; returns it unchanged."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


# Whether Triton is installed, decided once without importing it (import fastssl stays light,
# and torch.compile sees a constant instead of a cached function call).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True when Triton is installed (it is not on macOS/Windows CPU wheels)."""
    return _TRITON_INSTALLED


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, tensor: torch.Tensor, has_triton_kernel: bool = True) -> str:
    """Turn a requested backend into the one that runs for ``tensor``.

    Args:
        backend: ``"auto" | "triton" | "torch" | "reference"``.
        tensor: any input of the loss; its device decides ``"auto"``.
        has_triton_kernel: whether this loss family has a Triton implementation.

    Raises:
        ValueError: unknown name, or ``"triton"`` asked for where it cannot run.
    """
    check_backend_name(backend)
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env:
            if env not in BACKENDS:
                raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {env!r}")
            backend = env
    if backend == "auto":
        if tensor.is_cuda and has_triton_kernel and triton_available():
            return "triton"
        return "torch"
    if backend == "triton":
        if not has_triton_kernel:
            # Families whose hot loop is a library call (e.g. a batched Cholesky) have no
            # Triton kernel; "triton" then means "the fastest path", i.e. the torch one.
            return "torch"
        if not triton_available():
            raise ValueError("backend='triton' requested but Triton cannot be imported here")
        if not tensor.is_cuda and not triton_interpreter_enabled():
            raise ValueError(
                "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 to run the "
                f"kernels on {tensor.device.type} tensors through the Triton interpreter"
            )
    return backend


def triton_requested_explicitly(backend: str) -> bool:
    """Whether the caller (argument or ``FASTSSL_BACKEND``) asked for ``"triton"`` by name."""
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    return backend == "triton"


_T = TypeVar("_T")
_FALLBACK_WARNED: Set[str] = set()


def triton_with_fallback(
    kernel: str, backend: str, run_triton: Callable[[], _T], run_torch: Callable[[], _T]
) -> _T:
    """Run a Triton path; under ``"auto"`` fall back to the torch path if it cannot run.

    A kernel that fails to compile or launch (an unsupported GPU, a Triton version the kernel
    was not written for, a driver error) must not end a training run that asked for nothing in
    particular: with ``backend="auto"`` the error is reported once per kernel as a
    ``RuntimeWarning`` naming the kernel and the error, and ``run_torch()`` gives the result.
    With ``backend="triton"`` (argument or ``FASTSSL_BACKEND``) the error propagates.
    Out-of-memory errors always propagate (the torch path would need more memory, not less),
    and inside ``torch.compile`` tracing the Triton path is used as is.

    Args:
        kernel: name shown in the warning, e.g. ``"ntxent"``.
        backend: the backend argument as the caller passed it (before resolution).
        run_triton: zero-argument callable running the Triton path.
        run_torch: zero-argument callable running the torch path on the same inputs.
    """
    if triton_requested_explicitly(backend) or torch.compiler.is_compiling():
        return run_triton()
    try:
        return run_triton()
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as error:  # compile errors, launch failures: whatever Triton raises
        if kernel not in _FALLBACK_WARNED:
            _FALLBACK_WARNED.add(kernel)
            warnings.warn(
                f"fastssl: the Triton kernel for {kernel} failed ({type(error).__name__}: "
                f"{error}); using the torch path instead. Pass backend='triton' to see the "
                "error raised.",
                RuntimeWarning,
                stacklevel=3,
            )
        return run_torch()


def _first_tensor(args: tuple) -> Optional[torch.Tensor]:
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg
        if isinstance(arg, (list, tuple)) and arg and isinstance(arg[0], torch.Tensor):
            return arg[0]
    return None


def outside_autocast(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Run a loss with autocast disabled on its inputs' device.

    The losses choose their own precision (half-precision operands where safe, float32
    accumulation, float32 result). Under an enclosing ``torch.autocast`` region PyTorch would
    recast their internal matrix products to half precision, and tensors saved for a
    hand-written backward would come back in a dtype the backward does not expect.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = _first_tensor(args)
        if first is None or not torch.is_autocast_enabled(first.device.type):
            return fn(*args, **kwargs)
        with torch.autocast(device_type=first.device.type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper
