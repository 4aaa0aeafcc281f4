"""Backend selection shared by every loss.

Three implementations exist for each loss:

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

import contextlib
import functools
import importlib.util
import os
import threading
import warnings
from typing import Any, Callable, Iterator, Optional, Set, Tuple, TypeVar

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
    and inside ``torch.compile`` tracing the Triton path is used as is. The backward of a
    custom op run by ``run_triton`` falls back the same way when the op is registered with
    :func:`guard_triton_backward`.

    Args:
        kernel: name shown in the warning, e.g. ``"ntxent"``.
        backend: the backend argument as the caller passed it (before resolution).
        run_triton: zero-argument callable running the Triton path.
        run_torch: zero-argument callable running the torch path on the same inputs.
    """
    if triton_requested_explicitly(backend) or torch.compiler.is_compiling():
        return run_triton()
    try:
        with _backward_fallback_recorded():
            return run_triton()
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as error:  # compile errors, launch failures: whatever Triton raises
        _warn_fallback_once(kernel, error)
        return run_torch()


def _warn_fallback_once(kernel: str, error: BaseException) -> None:
    """One ``RuntimeWarning`` per kernel and process, naming the kernel and the error."""
    if kernel in _FALLBACK_WARNED:
        return
    _FALLBACK_WARNED.add(kernel)
    warnings.warn(
        f"fastssl: the Triton kernel for {kernel} failed ({type(error).__name__}: "
        f"{error}); using the torch path instead. Pass backend='triton' to see the "
        "error raised.",
        RuntimeWarning,
        stacklevel=4,
    )


# --------------------------------------------------------------------------------------------
# The same guarantee for the backward of a Triton custom op
# --------------------------------------------------------------------------------------------
#
# A backward kernel compiles on the first backward, after its forward ran: under "auto" it may
# fail where the forward did not. Whether the step may fall back is decided when the forward
# runs (the backend argument and FASTSSL_BACKEND are not known to the backward): the forward of
# every Triton custom op runs inside triton_with_fallback, which marks this thread while
# run_triton() executes; the op's setup_context reads the mark into a Python attribute of its
# autograd context, together with references to the op's inputs (no copy, no tensor op, no host
# sync). A backward that fails then recomputes the loss on the torch path from those inputs and
# differentiates it -- the gradient the torch path gives -- after one warning per kernel.

_RECORDING = threading.local()


@contextlib.contextmanager
def _backward_fallback_recorded() -> Iterator[None]:
    """Mark this thread while an "auto" forward runs the Triton path (re-entrant)."""
    previous = getattr(_RECORDING, "auto", False)
    _RECORDING.auto = True
    try:
        yield
    finally:
        _RECORDING.auto = previous


def backward_fallback_allowed() -> bool:
    """Whether the Triton forward running now on this thread was chosen by ``"auto"`` (outside
    ``torch.compile`` tracing), so that its backward may fall back to the torch path."""
    return getattr(_RECORDING, "auto", False)


def guard_triton_backward(
    op: Any,
    kernel: str,
    setup_context: Callable[..., None],
    backward: Callable[..., Any],
    torch_loss: Callable[..., torch.Tensor],
) -> None:
    """Register ``op``'s autograd formula so that under ``"auto"`` a failing backward falls back
    to the torch path; idempotent (call it every time the kernels are about to run).

    Args:
        op: a ``torch.library.custom_op`` whose first output is the 0-d loss.
        kernel: name shown in the warning, e.g. ``"barlow_twins"`` (shown as
            ``"barlow_twins backward"``).
        setup_context, backward: the op's own autograd formula (as given to
            ``op.register_autograd``); they run unchanged.
        torch_loss: the torch path's loss as a function of the op's inputs, in the op's
            argument order (non-tensor arguments included); it must not reach a Triton kernel.

    With an explicit ``backend="triton"`` (or ``FASTSSL_BACKEND=triton``) and inside
    ``torch.compile`` the op's backward runs as registered and its errors propagate.
    Out-of-memory errors always propagate. Cost under ``"auto"``: none in time (no tensor op, no
    host sync); in memory, the op's inputs stay referenced until its backward, which matters
    only where the op saves something else (SwAV, DINO: the crops' outputs beside the gradient
    the forward wrote).

    Example::

        guard_triton_backward(kernels._barlow_twins_op, "barlow_twins", kernels._barlow_twins_setup,
                              kernels._barlow_twins_gradient,
                              lambda z_a, z_b, lam, *rest: _barlow_twins_torch(z_a, z_b, lam, "auto"))
    """
    if torch.compiler.is_compiling() or getattr(op, "_fastssl_backward_guard", None) == (setup_context, backward):
        return  # registered already, or being traced (registration is no graph operation)

    def guarded_setup(ctx: Any, inputs: Tuple[Any, ...], output: Any) -> None:
        setup_context(ctx, inputs, output)
        # Decided at forward time: the inputs are kept (by reference) only when "auto" chose
        # the kernels; None means "errors propagate".
        ctx.fastssl_torch_fallback_inputs = tuple(inputs) if backward_fallback_allowed() else None

    def guarded_backward(ctx: Any, grad_loss: Optional[torch.Tensor], *grad_auxiliary: Any) -> Any:
        inputs = ctx.fastssl_torch_fallback_inputs
        if inputs is None:
            return backward(ctx, grad_loss, *grad_auxiliary)
        try:
            return backward(ctx, grad_loss, *grad_auxiliary)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as error:  # compile errors, launch failures: whatever Triton raises
            _warn_fallback_once(f"{kernel} backward", error)
            return torch_path_gradients(torch_loss, inputs, grad_loss)

    op.register_autograd(guarded_backward, setup_context=guarded_setup)
    op._fastssl_backward_guard = (setup_context, backward)


def torch_path_gradients(
    torch_loss: Callable[..., torch.Tensor], inputs: Tuple[Any, ...], grad_loss: Optional[torch.Tensor]
) -> Tuple[Any, ...]:
    """The gradients of ``torch_loss(*inputs)`` with respect to every tensor of ``inputs`` that
    requires grad (in lists too), scaled by ``grad_loss``; structured as ``inputs`` (a list of
    gradients for a list argument, None for everything else), as a custom op's backward returns.

    The loss is recomputed under ``enable_grad`` on detached copies of the inputs' references
    (the same storage), so the autograd graph of the inputs' producers is left alone.
    """
    leaves: list = []

    def detached(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if value.requires_grad:
                leaf = value.detach().requires_grad_(True)
                leaves.append(leaf)
                return leaf
            return value
        if isinstance(value, (list, tuple)):
            return type(value)(detached(item) for item in value)
        return value

    with torch.enable_grad():
        rebuilt = tuple(detached(value) for value in inputs)
        if grad_loss is None or not leaves:
            grads: Tuple[Optional[torch.Tensor], ...] = (None,) * len(leaves)
        else:
            loss = torch_loss(*rebuilt)
            grads = torch.autograd.grad(loss, leaves, grad_outputs=grad_loss.to(loss.dtype).reshape(loss.shape),
                                        allow_unused=True)
    by_leaf = {id(leaf): grad for leaf, grad in zip(leaves, grads)}

    def gradient_of(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return by_leaf.get(id(value))
        if isinstance(value, (list, tuple)) and any(isinstance(item, torch.Tensor) for item in value):
            return [gradient_of(item) for item in value]
        return None

    return tuple(gradient_of(value) for value in rebuilt)


# --------------------------------------------------------------------------------------------
# The "reference" backend's dtype rule
# --------------------------------------------------------------------------------------------


def _floating_tensors(value: Any):
    """The floating-point tensors in an argument: a tensor, or a list/tuple of them (nested)."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _floating_tensors(item)


def reference_dtype(*args: Any, **kwargs: Any) -> torch.dtype:
    """The dtype the ``"reference"`` backend computes in for these arguments: the promoted dtype
    of every floating tensor argument of at least one dimension, and at least float32.

    float16/bfloat16 inputs give float32 (PyTorch's half-precision reductions, exponentials and
    factorizations are what the other backends avoid by accumulating in float32), float64 gives
    float64, views of different dtypes their promotion (float16 with bfloat16: float32).
    0-d tensors (a learnable temperature, say) follow the inputs and do not promote them, as in
    PyTorch's own type promotion.
    """
    dtype = torch.float32
    for value in (*args, *kwargs.values()):
        for tensor in _floating_tensors(value):
            if tensor.dim() > 0:
                dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _cast_floating(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (list, tuple)) and any(True for _ in _floating_tensors(value)):
        return type(value)(_cast_floating(item, dtype) for item in value)
    return value


def _as_float32(result: Any) -> Any:
    if isinstance(result, torch.Tensor):
        return result.float() if result.is_floating_point() else result
    if isinstance(result, tuple):
        return tuple(_as_float32(item) for item in result)
    return result


def run_reference(formula: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a formula of :mod:`fastssl.reference` the way the public ``backend="reference"`` runs it.

    The rule (the dtype contract every backend keeps): the textbook formula is evaluated in
    :func:`reference_dtype` of the arguments -- float32 for float16/bfloat16 inputs, the promoted
    dtype for views of different dtypes, float64 for float64 --; every floating tensor argument,
    in lists too (crops, views, a float32 center or memory bank beside half inputs), is cast to
    it; the casts are differentiable, so each input's gradient comes back in its own dtype;
    floating results are returned in float32 (the loss as a 0-d float32 tensor). Integer and
    bool tensors (labels, masks), Python numbers and other arguments pass through unchanged.

    The functions of :mod:`fastssl.reference` called directly stay in their inputs' dtype: the
    tests run them at half precision to measure PyTorch's own error.

    Example::

        if impl == "reference":
            return run_reference(reference.ntxent_loss, out0, out1, temperature)
    """
    dtype = reference_dtype(*args, **kwargs)
    args = tuple(_cast_floating(value, dtype) for value in args)
    kwargs = {key: _cast_floating(value, dtype) for key, value in kwargs.items()}
    return _as_float32(formula(*args, **kwargs))


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
