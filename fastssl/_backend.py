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
import os

import torch

BACKENDS = ("auto", "triton", "torch", "reference")
ENV_VAR = "FASTSSL_BACKEND"


def check_backend_name(backend: str) -> str:
    """Validate a ``backend=`` argument at construction time; returns it unchanged."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when ``import triton`` works (it does not on macOS/Windows CPU wheels)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the platform
        return False
    return True


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
