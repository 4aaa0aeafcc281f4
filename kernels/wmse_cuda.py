r"""Loader, launcher and ``autograd.Function`` of the CUDA C++ W-MSE whitening kernel
(``csrc/wmse_whitening.cu``, installed as ``fastssl.csrc``).

Build. The extension is compiled on first use with ``torch.utils.cpp_extension.load`` (nvcc
and ninja needed; the result is cached in torch's extension directory). When it cannot be
built — no CUDA, no nvcc, a compiler error — :func:`load_extension` warns once and returns
``None`` for the rest of the process, and :mod:`fastssl.wmse` runs its batched PyTorch path.

Use. :mod:`fastssl.wmse` calls :func:`whiten_cholesky` for Cholesky whitening of CUDA tensors
with d <= 256 (float32/float16/bfloat16 inputs, computed in float32) outside ``torch.compile``;
ZCA whitening, float64 inputs, larger d and compiled graphs take the PyTorch path.

Forward (kernel): per sub-batch of w rows, Z = X_c L⁻ᵀ with (1-ε)Σ + εI = L Lᵀ, and W = L⁻¹
saved. Backward (batched PyTorch, from the saved W and Z — a handful of batched products, no
factorization): with G = ∂ℓ/∂Z,

.. math:: P = \mathrm{tril}(-G^\top Z),\quad
          S = \tfrac12\big(P + \mathrm{tril}(P, -1)^\top\big),\quad
          \partial\ell/\partial X_c = \big(G + \tfrac{2(1-\epsilon)}{w-1} Z S\big) W,\quad
          \partial\ell/\partial X = \partial\ell/\partial X_c - \tfrac1w \mathbf 1\mathbf 1^\top \partial\ell/\partial X_c.

The first term is the direct path Z = X_c Wᵀ; the second is the path through the covariance:
∂ℓ/∂L = -Wᵀ Gᵀ Z, so Lᵀ ∂ℓ/∂L = -Gᵀ Z, and Cholesky's backward (Murray 2016, as PyTorch writes
it) gives ∂ℓ/∂Σ = Wᵀ S W, which the symmetric product Σ = X_cᵀ X_c (1-ε)/(w-1) sends to
X_c as 2(1-ε)/(w-1) X_c Wᵀ S W = 2(1-ε)/(w-1) Z S W. Cost 3 batched products of S·w·d² FMAs
each (the forward's order).
"""

from __future__ import annotations

import shutil
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional, Tuple

import torch
from torch import Tensor

import fastssl.csrc as _csrc_package

# The sources live in the top-level ``csrc/`` of the repository, installed as ``fastssl.csrc``.
CSRC = Path(_csrc_package.__file__).resolve().parent
SOURCES = ("wmse_whitening.cpp", "wmse_whitening.cu")
EXTENSION_NAME = "fastssl_wmse_whitening"

_lock = threading.Lock()
_extension: Optional[ModuleType] = None
_failure: Optional[str] = None


def _build_extension() -> ModuleType:
    """Compile and import the extension (raises when impossible)."""
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available")
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None and shutil.which("nvcc") is None:
        raise RuntimeError("nvcc was not found (install the CUDA toolkit or set CUDA_HOME)")
    return cpp_extension.load(
        name=EXTENSION_NAME,
        sources=[str(CSRC / name) for name in SOURCES],
        extra_include_paths=[str(CSRC)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3"],
        verbose=False,
    )


def load_extension() -> Optional[ModuleType]:
    """The compiled extension, built on the first call; ``None`` (after one warning per
    process) when it cannot be built."""
    global _extension, _failure
    if _extension is not None or _failure is not None:
        return _extension
    with _lock:
        if _extension is None and _failure is None:
            try:
                _extension = _build_extension()
            except Exception as error:  # any build problem means: use the PyTorch path
                _failure = f"{type(error).__name__}: {error}"
                warnings.warn(
                    "fastssl: the CUDA W-MSE whitening kernel could not be built "
                    f"({_failure.splitlines()[0][:300]}); W-MSE uses the batched PyTorch path instead",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return _extension


def build_failure() -> Optional[str]:
    """Why the extension could not be built, or ``None``."""
    return _failure


def _reset() -> None:
    """Forget the build outcome (tests)."""
    global _extension, _failure
    with _lock:
        _extension = None
        _failure = None


def _run_extension(x: Tensor, index: Tensor, eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Launch on x's device and current stream: (Z, W, means, covariances, info)."""
    extension = load_extension()
    if extension is None:
        raise RuntimeError(f"the W-MSE CUDA extension is unavailable: {_failure}")
    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream(x.device).cuda_stream
        return tuple(extension.whiten_forward(x, index, float(eps), stream))  # type: ignore[return-value]


def whitening_backward(grad_z: Tensor, z: Tensor, w_inv: Tensor, eps: float) -> Tensor:
    r"""Gradient of Cholesky whitening with respect to the (S, w, d) sub-batch rows.

    Args:
        grad_z: (S, w, d) ∂ℓ/∂Z.
        z: (S, w, d) whitened rows X_c L⁻ᵀ.
        w_inv: (S, d, d) W = L⁻¹.
        eps: the shrinkage of the forward.
    Returns:
        (S, w, d) ∂ℓ/∂X (see the module docstring for the formula).
    """
    w = z.shape[1]
    p = torch.tril(-(grad_z.mT @ z))
    sym = 0.5 * (p + torch.tril(p, -1).mT)
    grad_xc = (grad_z + (2.0 * (1.0 - eps) / (w - 1)) * (z @ sym)) @ w_inv
    return grad_xc - grad_xc.mean(dim=1, keepdim=True)


class _CholeskyWhitening(torch.autograd.Function):
    """x (N, d) float32, index (S, w) -> Z (S, w, d), means (S, d), covariances (S, d, d), info (S,)."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, eps: float):  # type: ignore[override]
        z, w_inv, mean, cov, info = _run_extension(x, index, eps)
        ctx.save_for_backward(z, w_inv, index)
        ctx.eps = eps
        ctx.rows = x.shape[0]
        ctx.mark_non_differentiable(mean, cov, info)
        return z, mean, cov, info

    @staticmethod
    def backward(ctx, grad_z: Optional[Tensor], *unused):  # type: ignore[override]
        if grad_z is None:
            return None, None, None
        z, w_inv, index = ctx.saved_tensors
        d = z.shape[-1]
        grad_blocks = whitening_backward(grad_z, z, w_inv, ctx.eps)
        # Every input row lies in w_iter blocks (one per permutation): sum their gradients.
        grad_x = grad_blocks.new_zeros(ctx.rows, d).index_add_(0, index.reshape(-1), grad_blocks.reshape(-1, d))
        return grad_x, None, None


def whiten_cholesky(x: Tensor, index: Tensor, eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Cholesky-whiten the blocks ``x[index]`` with the CUDA kernel.

    Args:
        x: (N, d) CUDA tensor, d <= 256 (computed in float32).
        index: (S, w) int64 rows of x per block.
        eps: shrinkage toward the identity, in [0, 1].
    Returns:
        Z (S, w, d) float32 (differentiable with respect to x), means (S, d), covariances
        (S, d, d) and ``failed`` (S,) bool, as :func:`fastssl.wmse._whiten_blocks_torch`.
    """
    x32 = x if x.dtype == torch.float32 else x.float()
    z, mean, cov, info = _CholeskyWhitening.apply(x32, index.to(torch.int64).contiguous(), float(eps))
    return z, mean, cov, info != 0
