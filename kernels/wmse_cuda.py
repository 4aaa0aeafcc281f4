r"""Loader, launchers, custom op and ``autograd.Function`` of the CUDA C++ W-MSE kernels
(``csrc/wmse_whitening.cu``, installed as ``fastssl.csrc``): Cholesky whitening of sub-batches
and the normalized MSE between views (Ermolov et al. 2021, "Whitening for Self-Supervised
Representation Learning", Eq. 3-5), forward and backward.

Build. The extension is compiled on first use with ``torch.utils.cpp_extension.load`` (nvcc
and ninja needed; the result is cached in torch's extension directory). When it cannot be
built — no CUDA, no nvcc, a compiler error — :func:`load_extension` warns once and returns
``None`` for the rest of the process, and :mod:`fastssl.wmse` runs its batched PyTorch path.

Use. :mod:`fastssl.wmse` calls

* :func:`wmse_loss_cholesky` — the whole default loss (whitening of every sub-batch, the
  normalized MSE between 2 to 8 views, its gradient) as the custom op
  ``fastssl::wmse_cholesky_loss`` with a registered autograd and fake implementation, so that
  ``torch.compile(fullgraph=True)`` keeps it whole;
* :func:`whiten_cholesky` — whitening alone (a custom ``loss_fn``, ``Whitening2d``), eager.

Both take CUDA float32/float16/bfloat16 inputs with d <= 256 (read in their dtype, computed in
float32, the gradient written in the input dtype).

Cost at the headline shape (d = 128, w = 256, 4 sub-batches per view, 2 views,
w_iter = 1: S = 8 sub-batches, N = 2048 rows)
-----------------------------------------------------------------------------------------------
Per sub-batch, FMA = 2 FLOP, minimum (symmetry and triangles exploited):

=====================================  ====================  ==========
step                                   FLOP                  at S = 8
=====================================  ====================  ==========
covariance  X_cᵀX_c (lower half)       w·d(d+1)              34 M
LDLᵀ + inverse (one sweep)             2/3·d³                11 M
whitening   Z = X_c Wᵀ (triangular)    w·d(d+1)              34 M
backward    Gᵀ Z (lower half)          w·d(d+1)              34 M
            Z S' (full)                2·w·d²                67 M
            H W (triangular)           w·d(d+1)              34 M
=====================================  ====================  ==========

214 MFLOP in all (the launch report's model, which counts the torch path's full products,
says 290 MFLOP). Bytes: read x (1 MB) and write its gradient (1 MB) = 2.1 MB. Floor on an
H200 = max(FLOP / rate, bytes / 4.3 TB/s):

* float32 on the FMA units (60 TFLOP/s): 3.6 µs (290 MFLOP: 4.8 µs) — the floor of an
  implementation that keeps float32 products, which a Cholesky of a covariance needs;
* TF32 tensor-core rate (395 TFLOP/s, the launch report's): 0.73 µs (bytes: 0.49 µs).

Launch plan (5 launches per forward + backward; +1 when w_iter > 1)
-------------------------------------------------------------------
Programs and waves on the H200's 132 SMs at the headline shape (S = 8, V = 2, d = 128,
w = 256). Every launch that carries O(w·d²) products fills at least one wave; F2, the
sequential elimination (one program per sub-batch, d dependent steps), is exempt.

==  ====================  ================================  ========  =====  ====  =====  =================
#   kernel                grid at the headline shape        programs  waves  regs  smem   predicted (H200)
==  ====================  ================================  ========  =====  ====  =====  =================
F1  gram_kernel<0>        S x 10 lower 32-tiles x 2 halves  160       1.21   113   38 KB  ≈ 2 µs (3 before)
F2  factor_kernel<8,reg>  S (exempt: sequential)            8         0.06   122   3 KB   ≈ 15 µs
F3  whiten_kernel<loss>   S/V x w/4                         256       1.94   70    74 KB  ≈ 3 µs (4 before)
B1  gram_kernel<1>        S x 10 x 2 halves                 160       1.21   113   38 KB  ≈ 2 µs (3 before)
B2  row_gradient_kernel   S x w/8                           256       1.94   93    70 KB  ≈ 3 µs
==  ====================  ================================  ========  =====  ====  =====  =================

Before: F1 and B1 ran S x 10 = 80 programs (0.61 wave, ≈ 3 µs each) and F3 ran S/V x w/8 = 128
(0.97 wave, ≈ 4 µs): 28 µs of kernels. Why the new plan is not slower anywhere:

* F1/B1: the w rows of a sub-batch are split in two halves, each program's tile product
  covers one half (one 128-row staging step instead of two; the column-mean pass still reads
  all w rows, so both halves center with the same rounded mean). The halves go to two
  buffers (F1: the covariance output and the W output, which F2 overwrites after reading it;
  B1: S' and a second scratch square) that the consumer adds, half 0 + half 1, while loading
  them (F2, B2): a fixed order, no atomics. All 160 programs are resident at once (2 per SM
  by registers and shared memory), each doing half of the old program's product.
  Before, with 80 programs, 52 SMs were idle.
* F2, B2: the second half is loaded next to the first (independent loads, the same one L2
  round trip); F2 writes the summed covariance back (stores only).
* F3: 4 rows per program (2 per thread) instead of 8, and only W's lower triangle staged
  (its upper triangle is zero: half the bytes), so the L2 bytes in all are unchanged; 2 of
  the 256 programs are resident per SM (70 registers, 74 KB: 101 and 81 KB before), each
  with half the products of the old program.

(registers from ``nvcc -O3 -arch=sm_90 -Xptxas -v``, nvcc 13.0, for the headline instances; zero
spills and zero stack in all 30 instances, d > 128 and w_iter > 1 included.)
F2 is the one sequential part: d elimination steps, each one barrier and a rank-1 update of
the square held in registers (8 x 8 per thread); ≈ 100 issued instructions per warp and step
on 8 warps ≈ 230 cycles -> 128 steps ≈ 15 µs. Everything else has more than one block per
sub-batch (20 in F1/B1, 64 row blocks per view pair in F3, 32 per sub-batch in B2) and is
bound by L2 round trips (one per staged operand: W and S' are staged whole for d <= 128).

Predicted forward + backward: GPU ≈ 25 µs of kernels (28 before) + 5 launch gaps ≈ 30 µs; host: two
custom-op calls and the eager ops counted by ``tests/test_wmse_cuda.py`` (2 before the op:
the device permutation, ``rand`` + ``argsort``; 4 allocations in the forward binding, 2 in the
backward: 8 eager ops, no host sync) -> host-bound in eager mode (≈ 2 x 15 µs + 5 launches x
4 µs + 8 ops x 4 µs ≈ 80 µs with the launch report's constants: 0.9 % of the TF32 floor),
GPU-bound (≈ 30 µs) under a CUDA graph. Against the floors: ≈ 30 µs is 2.4 % of the TF32 floor
and 12-16 % of the float32-FMA floor; before
(batched PyTorch: 129 eager ops, a cuSOLVER batched Cholesky and triangular solves, three
more solves in the backward) the launch report predicted 516 µs (0.1 % of the TF32 floor).
What would close the rest: a blocked F2 (4-column panels, a quarter of the barriers) and a
persistent single launch per direction; neither changes the interface.

Determinism. No atomic accumulation anywhere: every reduction has a fixed order (warp order
in the Gram tiles, lane order in the row norms, block order for the loss, whose blocks take a
ticket from one counter so that the last one adds the partials); each input row's gradient
is written once per iteration (the sub-batches of one iteration partition the rows), and the
w_iter slices are added in order.
"""

from __future__ import annotations

import shutil
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

import fastssl.csrc as _csrc_package

# The sources live in the top-level ``csrc/`` of the repository, installed as ``fastssl.csrc``.
CSRC = Path(_csrc_package.__file__).resolve().parent
SOURCES = ("wmse_whitening.cpp", "wmse_whitening.cu")
EXTENSION_NAME = "fastssl_wmse_kernels"

# Limits of the kernels (csrc/wmse_whitening.h): kMaxDim, kMaxViews, kRowTile, kWhitenRowTile.
MAX_DIM = 256
MAX_VIEWS = 8
ROW_TILE = 8
WHITEN_ROW_TILE = 4  # rows per block of the whitening and loss kernel (one loss partial each)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

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
        extra_cuda_cflags=["-O3", "-std=c++17"],
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


@torch.compiler.assume_constant_result
def extension_available() -> bool:
    """Whether the extension is (or can be) built; a constant for ``torch.compile`` (evaluated
    once while tracing, so the build and its warning stay out of the graph)."""
    return load_extension() is not None


def build_failure() -> Optional[str]:
    """Why the extension could not be built, or ``None``."""
    return _failure


def _reset() -> None:
    """Forget the build outcome (tests)."""
    global _extension, _failure
    with _lock:
        _extension = None
        _failure = None


def _require_extension() -> ModuleType:
    extension = load_extension()
    if extension is None:
        raise RuntimeError(f"the W-MSE CUDA extension is unavailable: {_failure}")
    return extension


def _stream(x: Tensor) -> int:
    """The current stream of x's device as an integer handle (0 off CUDA: the tests' host
    emulation)."""
    return torch.cuda.current_stream(x.device).cuda_stream if x.is_cuda else 0


def num_blocks(perms: Tensor, views: int, w_size: int) -> int:
    """S = iterations · (bs / w_size) · views sub-batches for (iterations, bs) permutations."""
    return perms.shape[0] * (perms.shape[1] // w_size) * views


def forward_layout(blocks: int, views: int, w: int, d: int, with_loss: bool) -> Dict[str, int]:
    """Offsets (in float32 elements) of the forward workspace's parts, as ``forward_layout`` in
    ``csrc/wmse_whitening.cu``: Z (S, w, d), G (S, w, d) with the loss, W (S, d, d), the factor
    scratch (S, d, d) for d > 128, the loss partials, info (S,) int32, the ticket counter."""
    rows, squares = blocks * w * d, blocks * d * d
    layout = {"z": 0}
    layout["grad_z"] = rows
    layout["w_inv"] = layout["grad_z"] + (rows if with_loss else 0)
    layout["square"] = layout["w_inv"] + squares
    layout["partials"] = layout["square"] + (squares if d > 128 else 0)
    layout["info"] = layout["partials"] + ((blocks // views) * -(-w // WHITEN_ROW_TILE) if with_loss else 0)
    layout["counter"] = layout["info"] + blocks
    layout["total"] = layout["counter"] + 1
    return layout


def _launch_forward(x: Tensor, perms: Tensor, views: int, w_size: int, eps: float, with_loss: bool,
                    loss_scale: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, means (S, d), covariances (S, d, d), workspace) on x's device and current stream."""
    extension = _require_extension()
    if x.is_cuda:
        with torch.cuda.device(x.device):
            return tuple(extension.forward(x, perms, views, w_size, eps, with_loss, loss_scale, _stream(x)))
    return tuple(extension.forward(x, perms, views, w_size, eps, with_loss, loss_scale, 0))


def _launch_backward(grad_loss: Optional[Tensor], grad_z: Optional[Tensor], workspace: Tensor, x: Tensor,
                     perms: Tensor, views: int, w_size: int, eps: float, iterations: int) -> Tensor:
    """∂ℓ/∂x (N, d) in x's dtype, from the fused loss's gradient or from G = ∂ℓ/∂Z."""
    extension = _require_extension()
    args = (grad_loss, grad_z, workspace, x, perms, views, w_size, eps, iterations)
    if x.is_cuda:
        with torch.cuda.device(x.device):
            return extension.backward(*args, _stream(x))
    return extension.backward(*args, 0)


# --------------------------------------------------------------------------------------------
# The fused loss: one custom op per direction
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("fastssl::wmse_cholesky_loss", mutates_args=())
def _loss_op(x: Tensor, perms: Tensor, views: int, w_size: int, eps: float,
             loss_scale: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    loss, mean, cov, workspace = _launch_forward(x, perms, views, w_size, eps, True, loss_scale)
    return loss, mean, cov, workspace


@_loss_op.register_fake
def _(x, perms, views, w_size, eps, loss_scale):
    blocks, d = num_blocks(perms, views, w_size), x.shape[1]
    total = forward_layout(blocks, views, w_size, d, True)["total"]
    return (x.new_empty((), dtype=torch.float32), x.new_empty((blocks, d), dtype=torch.float32),
            x.new_empty((blocks, d, d), dtype=torch.float32), x.new_empty((total,), dtype=torch.float32))


@torch.library.custom_op("fastssl::wmse_cholesky_loss_backward", mutates_args=())
def _loss_backward_op(grad_loss: Tensor, workspace: Tensor, x: Tensor, perms: Tensor, views: int, w_size: int,
                      eps: float) -> Tensor:
    return _launch_backward(grad_loss, None, workspace, x, perms, views, w_size, eps, perms.shape[0])


@_loss_backward_op.register_fake
def _(grad_loss, workspace, x, perms, views, w_size, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _loss_setup_context(ctx, inputs, output) -> None:
    x, perms, views, w_size, eps, _ = inputs
    _, mean, cov, workspace = output
    ctx.save_for_backward(x, perms, workspace)
    ctx.views, ctx.w_size, ctx.eps = views, w_size, eps
    ctx.mark_non_differentiable(mean, cov, workspace)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the statistics and workspace


def _loss_gradient(ctx, grad_loss, grad_mean, grad_cov, grad_workspace):
    x, perms, workspace = ctx.saved_tensors
    grad_x = None
    if grad_loss is not None and ctx.needs_input_grad[0]:
        grad_x = _loss_backward_op(grad_loss, workspace, x, perms, ctx.views, ctx.w_size, ctx.eps)
    return grad_x, None, None, None, None, None


_loss_op.register_autograd(_loss_gradient, setup_context=_loss_setup_context)


def wmse_loss_cholesky(x: Tensor, perms: Tensor, views: int, w_size: int, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """W-MSE's default loss (Cholesky whitening, normalized MSE) in one custom op.

    Args:
        x: (views · bs, d) CUDA float32/float16/bfloat16, views stacked; d <= 256.
        perms: (w_iter, bs) int64, contiguous, one permutation of range(bs) per iteration.
        views: num_samples, 2 to 8.
        w_size: rows per sub-batch (divides bs).
        eps: shrinkage toward the identity.
    Returns:
        The 0-d float32 loss (NaN when a sub-batch covariance could not be factored), and the
        (S, d) means and (S, d, d) unshrunk covariances of the sub-batches in lightly's order.

    Example::

        perms = torch.rand(1, 512, device="cuda").argsort(dim=1)
        loss, _, _ = wmse_loss_cholesky(torch.randn(1024, 64, device="cuda"), perms, 2, 256, 0.0)
    """
    iterations, bs = perms.shape
    pairs = views * (views - 1) // 2
    loss_scale = 2.0 / (iterations * pairs * bs)  # loss = 2 - 2 · mean of the cosines
    loss, mean, cov, _ = _loss_op(x, perms, views, w_size, float(eps), loss_scale)
    return loss, mean, cov


# --------------------------------------------------------------------------------------------
# Whitening alone (custom loss_fn, Whitening2d)
# --------------------------------------------------------------------------------------------


def whitening_backward(grad_z: Tensor, z: Tensor, w_inv: Tensor, eps: float) -> Tensor:
    r"""The kernels' backward written in batched PyTorch (a reference for the tests).

    With G = ∂ℓ/∂Z, P = tril(-Gᵀ Z), S = ½(P + tril(P, -1)ᵀ):
    ∂ℓ/∂X_c = (G + 2(1-ε)/(w-1) · Z S) W, ∂ℓ/∂X = ∂ℓ/∂X_c minus its column means. The first
    term is the direct path Z = X_c Wᵀ; the second the path through the covariance:
    Lᵀ ∂ℓ/∂L = -Gᵀ Z, Cholesky's backward (Murray 2016) gives ∂ℓ/∂Σ = Wᵀ S W, and
    Σ = X_cᵀ X_c (1-ε)/(w-1) sends it to X_c as 2(1-ε)/(w-1) · Z S W.

    Args:
        grad_z: (S, w, d) ∂ℓ/∂Z.
        z: (S, w, d) whitened rows X_c L⁻ᵀ.
        w_inv: (S, d, d) W = L⁻¹.
        eps: the shrinkage of the forward.
    Returns:
        (S, w, d) ∂ℓ/∂X.
    """
    w = z.shape[1]
    p = torch.tril(-(grad_z.mT @ z))
    sym = 0.5 * (p + torch.tril(p, -1).mT)
    grad_xc = (grad_z + (2.0 * (1.0 - eps) / (w - 1)) * (z @ sym)) @ w_inv
    return grad_xc - grad_xc.mean(dim=1, keepdim=True)


class _CholeskyWhitening(torch.autograd.Function):
    """x (N, d), index (S, w) covering every row of x the same number of times, in passes of
    S / passes blocks -> Z (S, w, d), means (S, d), covariances (S, d, d), info (S,) int32."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, eps: float):  # type: ignore[override]
        blocks, w = index.shape
        d = x.shape[1]
        table = index.reshape(1, -1)  # an index table: one "permutation" row, one view
        _, mean, cov, workspace = _launch_forward(x, table, 1, w, eps, False, 0.0)
        layout = forward_layout(blocks, 1, w, d, False)
        z = workspace[layout["z"]: layout["z"] + blocks * w * d].view(blocks, w, d)
        info = workspace[layout["info"]: layout["info"] + blocks].view(torch.int32)
        ctx.save_for_backward(x, table, workspace)
        ctx.eps, ctx.w = eps, w
        ctx.mark_non_differentiable(mean, cov, info)
        return z, mean, cov, info

    @staticmethod
    def backward(ctx, grad_z: Optional[Tensor], *unused):  # type: ignore[override]
        if grad_z is None:
            return None, None, None
        x, table, workspace = ctx.saved_tensors
        passes = table.numel() // x.shape[0]
        grad = grad_z.to(torch.float32).contiguous()
        grad_x = _launch_backward(None, grad, workspace, x, table, 1, ctx.w, ctx.eps, passes)
        return grad_x, None, None


def whiten_cholesky(x: Tensor, index: Tensor, eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Cholesky-whiten the blocks ``x[index]`` with the CUDA kernels.

    Args:
        x: (N, d) CUDA tensor, float32/float16/bfloat16, d <= 256 (computed in float32).
        index: (S, w) int64 rows of x per block; every row of x must appear the same number of
            times p, in p passes of S / p consecutive blocks (as W-MSE's sub-batches do).
        eps: shrinkage toward the identity, in [0, 1].
    Returns:
        Z (S, w, d) float32 (differentiable with respect to x), means (S, d), covariances
        (S, d, d) and ``failed`` (S,) bool, as :func:`fastssl.wmse._whiten_blocks_torch`.

    Example::

        x = torch.randn(512, 64, device="cuda")
        z, mean, cov, failed = whiten_cholesky(x, torch.arange(512, device="cuda").view(2, 256), 0.0)
    """
    z, mean, cov, info = _CholeskyWhitening.apply(x, index.to(torch.int64).contiguous(), float(eps))
    return z, mean, cov, info != 0
