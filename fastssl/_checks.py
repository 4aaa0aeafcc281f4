"""Input validation shared by every loss: one message style, naming the argument.

Every public entry point calls these before choosing a backend, so the reference, torch
and triton paths reject the same inputs with the same errors.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Sequence

import torch

def _compiling() -> bool:
    """Under torch.compile, scalar hyperparameters may be traced symbolically; they were checked
    when the module was built (and are checked in eager calls), so the trace skips the checks."""
    return torch.compiler.is_compiling()


class BatchShapeError(ValueError, AssertionError):
    """A batch too small for the statistic, or two views of different shapes.

    A ``ValueError`` (fastssl's convention) that is also an ``AssertionError``, because lightly's
    losses assert these conditions and drop-in callers may catch that type.
    """


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, x: object, ndim: int | None = 2, min_rows: int = 1) -> torch.Tensor:
    """Check that ``x`` is a floating tensor of rank ``ndim`` with at least ``min_rows`` rows.

    Raises:
        TypeError: not a tensor, or not a floating-point dtype.
        ValueError: wrong rank, empty batch or feature dimension, too few rows.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {x.dtype}"
        )
    if ndim is not None and x.dim() != ndim:
        expected = "(batch_size, dim)" if ndim == 2 else f"{ndim} dimensions"
        raise ValueError(f"{name} must have shape {expected}, got shape {tuple(x.shape)}")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"{name} has an empty batch (shape {tuple(x.shape)})")
    if x.dim() >= 2 and x.shape[-1] == 0:
        raise ValueError(f"{name} has an empty feature dimension (shape {tuple(x.shape)})")
    if x.shape[0] < min_rows:
        raise BatchShapeError(
            f"{name} needs a batch of at least {min_rows} samples for this statistic, "
            f"got shape {tuple(x.shape)}"
        )
    return x


def check_pair(name_a: str, a: object, name_b: str, b: object, min_rows: int = 1) -> None:
    """Two embeddings of the same samples: same shape, same device, floating point."""
    check_tensor(name_a, a, min_rows=min_rows)
    check_tensor(name_b, b, min_rows=min_rows)
    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
    if a.shape != b.shape:
        raise BatchShapeError(
            f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must be on the same device, got {a.device} and {b.device}")


def check_tensor_list(
    name: str, xs: object, min_len: int = 1, ndim: int = 2, same_shape: bool = False
) -> list:
    """A non-empty list/tuple of floating tensors with equal trailing dimension."""
    if isinstance(xs, torch.Tensor) or not isinstance(xs, Sequence):
        raise TypeError(f"{name} must be a list of tensors, got {type(xs).__name__}")
    if len(xs) < min_len:
        raise ValueError(f"{name} must contain at least {min_len} tensor(s), got {len(xs)}")
    for i, x in enumerate(xs):
        check_tensor(f"{name}[{i}]", x, ndim=ndim)
    if not xs:
        return []
    first = xs[0]
    for i, x in enumerate(xs):
        if x.shape[-1] != first.shape[-1]:
            raise ValueError(
                f"{name}[{i}] has {x.shape[-1]} features but {name}[0] has {first.shape[-1]}"
            )
        if same_shape and x.shape != first.shape:
            raise ValueError(
                f"{name}[{i}] has shape {tuple(x.shape)} but {name}[0] has {tuple(first.shape)}"
            )
    return list(xs)


def _real_scalar(name: str, value: object) -> float:
    """``value`` as a Python float when it is a real scalar as lightly's arithmetic takes one:
    a Python or NumPy number (``numpy.float32``, ``numpy.int64``, ...; registered as
    :class:`numbers.Real`), a 0-d NumPy array of a real dtype, or a one-element tensor. bool
    (Python or NumPy) is rejected: a flag passed where a number belongs is a bug."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        raise TypeError(f"{name} must be a real number, got bool")
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype == torch.bool:
        if value.is_complex():
            raise TypeError(f"{name} must be a real number, got a complex tensor")
        return float(value)
    if getattr(value, "shape", None) == () and getattr(getattr(value, "dtype", None), "kind", "") in "fiu" \
            and hasattr(value, "item"):
        return float(value.item())  # a 0-d NumPy array
    raise TypeError(f"{name} must be a real number, got {type(value).__name__}")


def check_real(name: str, value: object) -> float:
    """A real number, ``inf`` and NaN included (the caller bounds it): Python or NumPy scalar,
    0-d NumPy array or one-element tensor, as a Python float; bool rejected."""
    return _real_scalar(name, value)


def check_finite(name: str, value: object) -> float:
    """A finite real number (Python, NumPy or one-element tensor; bool rejected)."""
    if _compiling():
        return value  # type: ignore[return-value]
    value = _real_scalar(name, value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_positive(name: str, value: object, allow_zero: bool = False) -> float:
    if _compiling():
        return value  # type: ignore[return-value]
    value = check_finite(name, value)
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def check_nonzero(name: str, value: object, tiny: float = 1e-8) -> float:
    """A finite number with ``|value| >= tiny`` (temperatures; negative ones are allowed)."""
    if _compiling():
        return value  # type: ignore[return-value]
    value = check_finite(name, value)
    if abs(value) < tiny:
        raise ValueError(f"{name} must satisfy abs({name}) >= {tiny}, got {value}")
    return value


def check_temperature(name: str, value: object) -> float | torch.Tensor:
    """A temperature: a finite number with ``|value| >= 1e-8`` (Python or NumPy), or a
    one-element floating-point tensor -- a learnable temperature (``nn.Parameter``), used as it
    is, with gradient. A tensor's value is checked only where reading it costs no host
    synchronization (module construction), not per call."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point() or value.numel() != 1:
            raise TypeError(
                f"{name} must be a number or a one-element floating-point tensor, got a tensor of "
                f"dtype {value.dtype} and shape {tuple(value.shape)}"
            )
        return value
    return check_nonzero(name, value)


def check_module_temperature(name: str, value: object) -> float | torch.Tensor:
    """:func:`check_temperature` plus, for a tensor, the value check (one host read, once)."""
    value = check_temperature(name, value)
    if isinstance(value, torch.Tensor):
        check_nonzero(name, value.detach().cpu())
    return value


def check_int(name: str, value: object, minimum: int = 0) -> int:
    """An integer (Python or NumPy/0-d tensor integer; bool rejected) >= ``minimum``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        value = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_probability(name: str, value: object) -> float:
    """A number in [0, 1] (momenta)."""
    if _compiling():
        return value  # type: ignore[return-value]
    value = check_finite(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def check_distributed_available(flag_name: str, flag: bool) -> None:
    if flag and not torch.distributed.is_available():
        raise ValueError(
            f"{flag_name}=True but torch.distributed is not available in this PyTorch build; "
            f"set {flag_name}=False"
        )


class DimensionError(ValueError, IndexError):
    """A ``dim`` argument outside the tensor's dimensions.

    A ``ValueError`` (fastssl's convention) that is also an ``IndexError``, the type PyTorch (and
    so lightly) raises for an out-of-range dimension."""


def check_dim(name: str, dim: object, ndim: int | None = None) -> int:
    """An integer dimension (Python or NumPy; bool rejected); with ``ndim``, one that indexes a
    tensor of that many dimensions (``-ndim <= dim < ndim``). Returns it as a Python int."""
    if isinstance(dim, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        dim = operator.index(dim)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(dim).__name__}") from None
    if ndim is not None and not -ndim <= dim < ndim:
        raise DimensionError(
            f"{name}={dim} is out of range for inputs with {ndim} dimension(s) "
            f"(expected {-ndim} <= {name} < {ndim})"
        )
    return dim
