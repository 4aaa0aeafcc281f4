"""Assertions shared by the loss tests: values and input gradients against the fp64 reference.

The precision rule (DESIGN §3): in float32 an implementation must match the float64 reference
to float32 precision; in float16/bfloat16 its error against the float64 reference may be at most
twice the error of the same reference formula run by PyTorch at that dtype (plus a floor for the
cases where PyTorch happens to be exact).
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import pytest
import torch

HALF = (torch.float16, torch.bfloat16)

# The parametrization every Triton test uses: CPU tensors through the interpreter (CI) and the
# compiled kernels on CUDA (the ``gpu`` lane).
TRITON_DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
            reason="CPU tensors need TRITON_INTERPRET=1 (set by conftest when CUDA is absent)",
        ),
        id="interpret",
    ),
    pytest.param("cuda", marks=pytest.mark.gpu, id="cuda"),
]


def _grads(fn: Callable, inputs: Sequence[torch.Tensor]):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    value = fn(*leaves)
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
    return value.detach(), grads


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_matches_reference(
    impl: Callable,
    ref: Callable,
    inputs: Sequence[torch.Tensor],
    *,
    rtol: float = 2e-5,
    atol: float = 1e-6,
    half_factor: float = 2.0,
    check_grad: bool = True,
) -> None:
    """``impl(*inputs)`` against ``ref`` run in float64 on the same values.

    ``inputs`` are in the dtype under test (and on the device under test). For float32/float64
    the loss and every input gradient must agree to ``rtol``/``atol`` relative to the largest
    reference magnitude. For half dtypes, the error is bounded by ``half_factor`` times PyTorch's
    own error (``ref`` run at the half dtype) plus a float32-level floor. Also checks that the
    loss comes back in float32 and the gradients in the inputs' dtype.
    """
    dtype = inputs[0].dtype
    inputs64 = [x.detach().double() for x in inputs]
    value64, grads64 = _grads(ref, inputs64)
    value, grads = _grads(impl, inputs) if check_grad else (impl(*inputs).detach(), [])
    assert value.dtype == torch.float32, f"loss dtype {value.dtype}, expected float32"
    assert value.shape == torch.Size([]), f"loss shape {tuple(value.shape)}, expected a 0-d tensor"
    for g, x in zip(grads, inputs):
        assert g.dtype == x.dtype, f"gradient dtype {g.dtype}, expected {x.dtype}"
        assert g.shape == x.shape

    def scale(t: torch.Tensor) -> float:
        return max(t.abs().max().item(), 1e-30)

    pairs = [("loss", value, value64)] + [
        (f"grad[{i}]", g, g64) for i, (g, g64) in enumerate(zip(grads, grads64))
    ]
    if dtype in HALF:
        value_h, grads_h = _grads(ref, inputs) if check_grad else (ref(*inputs).detach(), [])
        torch_pairs = [value_h] + list(grads_h)
        for (name, ours, exact), theirs in zip(pairs, torch_pairs):
            err_ours = _max_err(ours, exact)
            err_torch = _max_err(theirs, exact)
            floor = rtol * scale(exact) + atol
            assert err_ours <= half_factor * err_torch + floor, (
                f"{name}: error {err_ours:.3e} vs PyTorch's own {dtype} error {err_torch:.3e} "
                f"(allowed {half_factor}x + {floor:.1e})"
            )
    else:
        for name, ours, exact in pairs:
            err = _max_err(ours, exact)
            allowed = rtol * scale(exact) + atol
            assert err <= allowed, f"{name}: max error {err:.3e} > {allowed:.3e} (scale {scale(exact):.3e})"


def poisoned(shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """An output buffer full of NaN: a kernel that leaves an element unwritten is caught."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def awkward_inputs(n: int, d: int, dtype=torch.float32, device="cpu", views: int = 2, non_contiguous: bool = False):
    """Random (n, d) views drawn fresh; optionally non-contiguous (a strided column slice)."""
    out = []
    for _ in range(views):
        if non_contiguous:
            x = torch.randn(n, 2 * d).to(dtype=dtype, device=device)[:, ::2]
            assert not x.is_contiguous() or d == 1 or n == 1
        else:
            x = torch.randn(n, d).to(dtype=dtype, device=device)
        out.append(x)
    return out


def numeric_hyperparameters(cls) -> list:
    """(name, default) of ``cls``'s constructor arguments whose default is a number (not a bool):
    the hyperparameters a NumPy scalar may be passed for (a config loaded with NumPy, a swept
    grid), as lightly accepts them."""
    import inspect

    parameters = inspect.signature(cls.__init__).parameters.items()
    return [(name, p.default) for name, p in parameters
            if isinstance(p.default, (int, float)) and not isinstance(p.default, bool)]  # fmt: skip


def numpy_versions(default) -> list:
    """NumPy scalars standing for ``default``: integers for counts and sizes (lightly's
    ``range()`` rejects floats there), float32/float64 and an integer for real numbers."""
    import numpy as np

    if isinstance(default, int):
        return [np.int64(default), np.int32(default)]
    return [np.float32(default), np.float64(default), np.int64(1)]


def assert_numpy_hyperparameters_accepted(cls, required: dict | None = None, skip: Sequence[str] = ()) -> None:
    """Every numeric constructor argument of ``cls`` takes NumPy scalars (:func:`numpy_versions`)
    and rejects ``True`` / ``np.bool_(True)`` with a TypeError (a flag passed where a number
    belongs is a bug). ``required``: other arguments the constructor needs; ``skip``: arguments
    exempt (with the reason at the call site)."""
    import numpy as np

    required = required or {}
    hyperparameters = [(h, d) for h, d in numeric_hyperparameters(cls) if h not in skip]
    assert hyperparameters, f"{cls.__name__} has no numeric hyperparameter to check"
    for hyperparameter, default in hyperparameters:
        for value in numpy_versions(default):
            cls(**required, **{hyperparameter: value})
        for flag in (True, np.bool_(True)):
            with pytest.raises(TypeError):
                cls(**required, **{hyperparameter: flag})


def cuda_wmse_extension():
    """The compiled W-MSE CUDA extension for the gpu lane: a skip when this machine cannot build
    it (no nvcc or ninja), a failure when it is there and the build fails."""
    from fastssl.kernels import wmse_cuda

    extension = wmse_cuda.load_extension()
    if extension is None:
        reason = wmse_cuda.build_failure() or ""
        if "nvcc was not found" in reason or "Ninja is required" in reason:
            pytest.skip(f"no CUDA toolchain to build the extension: {reason}")
        pytest.fail(f"the CUDA extension failed to build: {reason}")
    return extension
