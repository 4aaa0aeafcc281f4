r"""W-MSE: whitening of sub-batches (Cholesky, or ZCA) followed by the normalized MSE between
views; functional API, batched PyTorch path and the drop-in :class:`WMSELoss`. The CUDA C++
whitening kernel lives in ``csrc/`` (installed as ``fastssl.csrc``) and is loaded by :mod:`fastssl.kernels.wmse_cuda`;
it serves Cholesky whitening of CUDA tensors with d <= 256 (eager mode). ZCA whitening needs an
eigendecomposition, which stays in this PyTorch path (batched ``eigh``), as do float64 inputs,
larger d and compiled graphs.

The batched path
----------------
lightly (after W-MSE's code) loops: for each of ``w_iter`` permutations, for each sub-batch of
``w_size`` images, for each of the V views, it whitens one (w_size, d) block — ``V · bs/w_size ·
w_iter`` separate covariances, Cholesky factorizations and triangular solves, each a handful of
kernel launches and (on CUDA) a host synchronization. Here every block is gathered at once into
an (S, w, d) tensor, S = ``w_iter · bs/w_size · V``, ordered (iteration, sub-batch, view) — the
order of lightly's calls — and whitened with one ``bmm`` (covariances), one batched
``cholesky_ex`` and one batched ``solve_triangular``:

.. math:: \Sigma_s = \tfrac{1}{w-1} X_{c,s}^\top X_{c,s},\quad
          (1-\epsilon)\Sigma_s + \epsilon I = L_s L_s^\top,\quad Z_s = X_{c,s} L_s^{-\top}.

The permutations are the same ``torch.randperm(bs)`` calls as lightly's (one per iteration, on
the default CPU generator), so a seeded run gives lightly's numbers to float32 precision. The
default loss (normalized MSE) pairs row ``b`` of one view with row ``b`` of another and averages
over rows, so the whitened blocks are compared where they lie, without scattering them back; a
custom ``loss_fn`` gets the rows back in input order.

Cost for S blocks of (w, d), FLOPs: covariances 2·S·w·d² (``bmm`` forms the full square),
Cholesky S·d³/3, triangular solve S·w·d²; bytes: the (S, w, d) gather (read and write), Z, and
S·d² per factor. For d = 128, w = 256, S = 8: ≈ 106 MFLOP and ≈ 4 MB, i.e. under 2 µs of
arithmetic or traffic on an H100 (60 TFLOP/s fp32, 3 TB/s), so the batched path is bound by its
~15 kernel launches, not by FLOPs or bytes; lightly's loop pays launches and a synchronization per block. On CUDA
tensors nothing reads a device value on the host: the permutations are drawn on the device and a
singular sub-batch covariance gives a NaN loss instead of an error (CPU tensors, where the check
costs nothing, still raise), so a training step can be captured in a CUDA graph.

Running statistics (module, training mode): lightly updates
``r ← m·s_k + (1-m)·r`` after each of the K = S whitening calls, with s_k the block's mean and
(unshrunk) covariance; in closed form
:math:`r_K = (1-m)^K r_0 + \sum_k m(1-m)^{K-1-k} s_k`, one weighted sum over the stacked blocks.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastssl import reference
from fastssl._backend import check_backend_name, outside_autocast, reference_dtype, resolve_backend, run_reference
from fastssl._checks import check_finite, check_int, check_probability, check_tensor

WHITENINGS = ("cholesky", "zca")

# The CUDA kernel keeps one block per sub-batch and a d x d factor per block; beyond this d the
# batched PyTorch path (cuSOLVER) is used.
CUDA_KERNEL_MAX_DIM = 256


class WMSEBatchSizeError(ValueError, RuntimeError):
    """A batch that cannot be cut into views or sub-batches.

    Both a ``ValueError`` (fastssl's bad-input convention) and a ``RuntimeError`` (what lightly's
    ``WMSELoss`` raises for the same inputs), so code written against either keeps working.
    """


def norm_mse_loss(x0: Tensor, x1: Tensor) -> Tensor:
    r"""W-MSE's loss between two whitened views (lightly's ``norm_mse_loss``):
    :math:`2 - 2\,\mathrm{mean}_b \cos(x_0^{(b)}, x_1^{(b)})` for (n, d) inputs."""
    x0 = F.normalize(x0)
    x1 = F.normalize(x1)
    return 2 - 2 * (x0 * x1).sum(dim=-1).mean()


def _accumulation_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_eps(eps: object) -> float:
    eps = check_finite("eps", eps)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps must be in [0, 1] (shrinkage toward the identity), got {eps}")
    return eps


def _per_view_batch(rows: int, num_samples: int, w_size: int) -> int:
    """Images per view; the errors lightly raises, with the sizes named."""
    if rows % num_samples != 0:
        raise WMSEBatchSizeError(
            f"input batch size must be divisible by num_samples: {rows} rows, num_samples="
            f"{num_samples}; expected (batch_size * num_samples, dim)"
        )
    bs = rows // num_samples
    if bs < w_size:
        raise ValueError(
            f"batch size must be greater than or equal to w_size: {bs} images per view, "
            f"w_size={w_size} (input has {rows} rows, num_samples={num_samples})"
        )
    if bs % w_size != 0:
        raise WMSEBatchSizeError(
            f"the batch of {bs} images per view must be a multiple of w_size={w_size} "
            f"(input has {rows} rows, num_samples={num_samples})"
        )
    return bs


def _check_wmse_args(input: Tensor, num_samples: int, w_size: int, w_iter: int, eps: float, whitening: str) -> int:
    check_tensor("input", input)
    check_int("num_samples", num_samples, minimum=2)
    check_int("w_size", w_size, minimum=2)
    check_int("w_iter", w_iter, minimum=1)
    eps = _check_eps(eps)
    if whitening not in WHITENINGS:
        raise ValueError(f"whitening must be one of {WHITENINGS}, got {whitening!r}")
    bs = _per_view_batch(input.shape[0], num_samples, w_size)
    d = input.shape[1]
    if eps == 0.0 and w_size <= d:
        raise ValueError(
            f"w_size={w_size} <= d={d}: the covariance of a sub-batch of {w_size} centered rows has "
            f"rank at most {w_size - 1} < {d}, so it is singular and cannot be whitened; use "
            "w_size > d (lightly requires w_size >= 2 * d) or eps > 0 (shrinkage toward the identity)"
        )
    return bs


def _draw_permutations(bs: int, w_iter: int, permutations: Optional[Sequence[Tensor]], device: torch.device) -> Tensor:
    """(w_iter, bs) int64 permutations of the images, on ``device``.

    Drawn exactly as lightly draws them: ``torch.randperm(bs)`` once per iteration, in order, on
    the default CPU generator (so ``torch.manual_seed`` reproduces lightly's sub-batches).
    """
    if permutations is None:
        if _check_synchronizes(device):
            # On a GPU, drawn there: a permutation from the CPU generator would be one
            # host-to-device copy (a stream synchronization) per call, and nothing a CUDA graph
            # can replay. The values then differ from lightly's for the same seed (the CUDA
            # generator), the distribution does not: the argsort of i.i.d. uniforms is a uniform
            # permutation.
            return torch.rand(w_iter, bs, device=device).argsort(dim=1)
        return torch.stack([torch.randperm(bs) for _ in range(w_iter)]).to(device)
    if isinstance(permutations, Tensor) and permutations.dim() == 1:
        permutations = [permutations]
    if len(permutations) != w_iter:
        raise ValueError(f"permutations must hold w_iter={w_iter} permutations, got {len(permutations)}")
    perms = []
    for i, p in enumerate(permutations):
        if not isinstance(p, Tensor) or p.dtype.is_floating_point or p.dtype == torch.bool or p.shape != (bs,):
            raise ValueError(f"permutations[{i}] must be an integer tensor of shape ({bs},), got {p!r:.80}")
        perms.append(p.to(device=device, dtype=torch.int64))
    stacked = torch.stack(perms)
    if not torch.compiler.is_compiling() and not _check_synchronizes(device):
        expected = torch.arange(bs, device=device).expand(w_iter, bs)
        if not torch.equal(stacked.sort(dim=1).values, expected):
            raise ValueError(f"every entry of permutations must be a permutation of range({bs})")
    return stacked


def _subbatch_index(perms: Tensor, num_samples: int, w_size: int, bs: int) -> Tensor:
    """(S, w_size) input rows of each whitened block, S = w_iter · (bs / w_size) · num_samples,
    ordered (iteration, sub-batch, view) as lightly's calls."""
    w_iter = perms.shape[0]
    chunks = perms.view(w_iter, bs // w_size, 1, w_size)
    view_offsets = torch.arange(num_samples, device=perms.device).view(1, 1, num_samples, 1) * bs
    return (chunks + view_offsets).reshape(-1, w_size)


# --------------------------------------------------------------------------------------------
# Singular covariances: a clear error, also under torch.compile
# --------------------------------------------------------------------------------------------


def _check_synchronizes(device: torch.device) -> bool:
    """Whether reading a device value on the host (to raise an error, to validate) costs a
    stream synchronization: not for CPU tensors, on CUDA yes -- which a training step must not
    pay, and which no CUDA graph can capture."""
    return torch.device(device).type == "cuda"


def _nan_if_singular(out: Tensor, failed: Tensor) -> Tensor:
    """``out``, or NaN everywhere when a block could not be factored: what a singular covariance
    gives where raising would need a host synchronization (CUDA)."""
    return torch.where(failed.any(), float("nan"), out)


def _raise_if_singular(failed: Tensor, cov: Tensor, w_size: int) -> None:
    """``failed`` (S,) bool: blocks whose shrunk covariance could not be factored. Raise unless
    the covariance itself is non-finite (a NaN/inf input, which must propagate as NaN).
    ``w_size`` is the rows per block, or 0 for the running covariance (eval mode)."""
    if not bool(failed.any()):
        return
    finite = torch.isfinite(cov.detach()).flatten(1).all(dim=1)
    singular = (failed & finite).nonzero().flatten()
    if singular.numel() == 0:
        return
    d = cov.shape[-1]
    if w_size == 0:
        raise ValueError(
            f"W-MSE whitening failed: the running covariance (whitening.running_variance, {d} x {d}) "
            "is singular (not positive-definite), so eval mode cannot whiten with it. Use eps > 0 "
            "(shrinkage: (1 - eps) * cov + eps * I), or train with a non-degenerate embedding first."
        )
    raise ValueError(
        f"W-MSE whitening failed: the covariance of {singular.numel()} of {failed.numel()} whitened "
        f"sub-batch(es) (first: block {int(singular[0])}, {w_size} rows x {d} features) is singular "
        "(not positive-definite). This happens when a sub-batch has no more rows than features, "
        "or duplicated / linearly dependent rows or constant features (a collapsed embedding). "
        "Use eps > 0 (shrinkage: (1 - eps) * cov + eps * I) or a larger w_size."
    )


@torch.library.custom_op("fastssl::wmse_check_whitening", mutates_args=())
def _check_whitening_op(failed: Tensor, cov: Tensor, w_size: int) -> Tensor:
    """The singular-covariance check as an opaque op, so that a compiled graph keeps it (a
    data-dependent ``if`` would break the graph) and raises the same ``ValueError``. Returns a
    0-d float32 zero that the caller adds to the loss, which keeps the op alive in the graph."""
    _raise_if_singular(failed, cov, w_size)
    return torch.zeros((), dtype=torch.float32, device=failed.device)


@_check_whitening_op.register_fake
def _(failed: Tensor, cov: Tensor, w_size: int) -> Tensor:
    return failed.new_empty((), dtype=torch.float32)


def _checked(loss: Tensor, failed: Tensor, cov: Tensor, w_size: int) -> Tensor:
    """``loss``, after the singular-covariance check (eagerly, or as a graph op when compiling);
    on CUDA a NaN loss instead of the error (no host synchronization)."""
    if _check_synchronizes(loss.device):
        return _nan_if_singular(loss, failed)
    if torch.compiler.is_compiling():
        return loss + _check_whitening_op(failed, cov.detach(), w_size).to(loss.dtype)
    _raise_if_singular(failed, cov, w_size)
    return loss


# --------------------------------------------------------------------------------------------
# Batched whitening
# --------------------------------------------------------------------------------------------


def _shrink(cov: Tensor, eps: float) -> Tensor:
    # Same expression (and rounding) as lightly's: (1 - eps) * cov + eps * I.
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    return (1 - eps) * cov + eps * eye


def _whitening_matrices(shrunk: Tensor, whitening: str) -> Tuple[Tensor, Tensor, bool]:
    """(..., d, d) shrunk covariances -> (M, failed, transposed_triangular).

    Cholesky: M = L (lower), whiten as X_c L^{-T}. ZCA: M = Σ^{-1/2} (symmetric), whiten as X_c M.
    """
    if whitening == "cholesky":
        factor, info = torch.linalg.cholesky_ex(shrunk)
        return factor, info != 0, True
    # eigh fails to converge on non-finite matrices: factor those as the identity and let the
    # NaN input reach the output through X_c (the caller marks them).
    finite = torch.isfinite(shrunk).flatten(-2).all(dim=-1)
    eye = torch.eye(shrunk.shape[-1], dtype=shrunk.dtype, device=shrunk.device)
    safe = torch.where(finite[..., None, None], shrunk, eye)
    evals, evecs = torch.linalg.eigh(safe)
    failed = ~(evals[..., 0] > 0)
    inv_sqrt = (evecs * evals.clamp_min(torch.finfo(evals.dtype).tiny).rsqrt().unsqueeze(-2)) @ evecs.mT
    inv_sqrt = torch.where(finite[..., None, None], inv_sqrt, torch.full_like(inv_sqrt, float("nan")))
    return inv_sqrt, failed, False


def _apply_whitening(xc: Tensor, matrix: Tensor, triangular: bool) -> Tensor:
    if triangular:  # X_c L^{-T}: one triangular solve, L^{-1} is never formed
        return torch.linalg.solve_triangular(matrix.mT, xc, upper=True, left=False)
    return xc @ matrix


def _whiten_blocks_torch(x: Tensor, index: Tensor, eps: float, whitening: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Whiten the (S, w) blocks of rows ``x[index]`` with their own statistics.

    Returns Z (S, w, d), means (S, d), covariances (S, d, d) (unshrunk, for the running
    statistics) and ``failed`` (S,) bool (factorization impossible).
    """
    s, w = index.shape
    blocks = x[index.reshape(-1)].view(s, w, x.shape[1])
    mean = blocks.mean(dim=1, keepdim=True)
    xc = blocks - mean
    cov = xc.mT @ xc / (w - 1)
    matrix, failed, triangular = _whitening_matrices(_shrink(cov, eps), whitening)
    return _apply_whitening(xc, matrix, triangular), mean.squeeze(1), cov, failed


def _on_cuda(x: Tensor) -> bool:
    return x.is_cuda


def _use_cuda_kernel(x: Tensor, whitening: str) -> bool:
    """The CUDA C++ kernel serves Cholesky whitening of CUDA tensors with d <= 256 in eager
    mode (float64 inputs stay in the float64 PyTorch path; ZCA always does)."""
    if whitening != "cholesky" or x.dtype == torch.float64 or x.shape[1] > CUDA_KERNEL_MAX_DIM:
        return False
    if torch.compiler.is_compiling() or not _on_cuda(x):
        return False
    from fastssl.kernels import wmse_cuda

    return wmse_cuda.load_extension() is not None


def _use_fused_cuda_loss(x: Tensor, whitening: str, num_samples: int) -> bool:
    """The default loss with Cholesky whitening of CUDA float32/float16/bfloat16 tensors, d <= 256
    and 2 to 8 views runs as one custom op of CUDA kernels (whitening, normalized MSE and its
    gradient), in eager mode and inside ``torch.compile``."""
    if whitening != "cholesky" or x.dtype == torch.float64 or x.shape[1] > CUDA_KERNEL_MAX_DIM:
        return False
    if not 2 <= num_samples <= 8 or not _on_cuda(x):
        return False
    from fastssl.kernels import wmse_cuda

    return wmse_cuda.extension_available()


def _whiten_blocks(x: Tensor, index: Tensor, eps: float, whitening: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    if _use_cuda_kernel(x, whitening):
        from fastssl.kernels import wmse_cuda

        z, mean, cov, failed = wmse_cuda.whiten_cholesky(x, index, eps)
        return z.to(x.dtype), mean.to(x.dtype), cov.to(x.dtype), failed
    return _whiten_blocks_torch(x, index, eps, whitening)


def _whiten_with_statistics(x: Tensor, mean: Tensor, cov: Tensor, eps: float, whitening: str) -> Tuple[Tensor, Tensor]:
    """Whiten every row of (n, d) ``x`` with a given mean (d,) and covariance (d, d) (eval mode)."""
    matrix, failed, triangular = _whitening_matrices(_shrink(cov, eps), whitening)
    return _apply_whitening(x - mean, matrix, triangular), failed.reshape(1)


# --------------------------------------------------------------------------------------------
# Loss between views
# --------------------------------------------------------------------------------------------


def _normalized_mse_blocks(z: Tensor) -> Tensor:
    """Default loss from the blocks as whitened: z (w_iter, chunks, V, w, d). Every image sits
    at the same (chunk, position) in all V views, and the normalized MSE is a mean over images,
    so the mean over view pairs of (2 - 2 mean cos) needs no reordering."""
    num_samples = z.shape[2]
    zn = F.normalize(z, dim=-1)
    cos_sum = None
    for i in range(num_samples - 1):
        for j in range(i + 1, num_samples):
            cos = (zn[:, :, i] * zn[:, :, j]).sum(dim=-1)
            cos_sum = cos if cos_sum is None else cos_sum + cos
    n_pairs = num_samples * (num_samples - 1) // 2
    return 2 - 2 * cos_sum.mean() / n_pairs


def _pair_losses_in_input_order(
    z: Tensor, index: Tensor, num_samples: int, bs: int, loss_fn: Callable[[Tensor, Tensor], Tensor]
) -> Tensor:
    """Custom ``loss_fn``: rows back in input order per iteration, then lightly's sum over
    iterations and view pairs."""
    d = z.shape[-1]
    w_iter = index.numel() // (num_samples * bs)
    rows = z.reshape(w_iter, num_samples * bs, d)
    # index holds the input row of every whitened row; argsort of a permutation inverts it.
    inverse = torch.argsort(index.reshape(w_iter, num_samples * bs), dim=1)
    ordered = torch.gather(rows, 1, inverse.unsqueeze(-1).expand(-1, -1, d))
    total = 0.0
    for it in range(w_iter):
        for i in range(num_samples - 1):
            for j in range(i + 1, num_samples):
                total = total + loss_fn(ordered[it, i * bs : (i + 1) * bs], ordered[it, j * bs : (j + 1) * bs])
    return total / (w_iter * num_samples * (num_samples - 1) // 2)


def _view_pair_loss(z_views: Sequence[Tensor], loss_fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    total = 0.0
    for i in range(len(z_views) - 1):
        for j in range(i + 1, len(z_views)):
            total = total + loss_fn(z_views[i], z_views[j])
    return total / (len(z_views) * (len(z_views) - 1) // 2)


# --------------------------------------------------------------------------------------------
# Optimized PyTorch path
# --------------------------------------------------------------------------------------------


def _wmse_batched(
    input: Tensor,
    bs: int,
    num_samples: int,
    w_size: int,
    perms: Tensor,
    eps: float,
    whitening: str,
    loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Training-mode W-MSE with sub-batch statistics.

    Returns the 0-d float32 loss, and the (S, d) means and (S, d, d) covariances of the blocks
    in lightly's call order (for the running statistics).
    """
    if (loss_fn is None or loss_fn is norm_mse_loss) and _use_fused_cuda_loss(input, whitening, num_samples):
        from fastssl.kernels import wmse_cuda

        return wmse_cuda.wmse_loss_cholesky(input, perms, num_samples, w_size, eps)
    x = input.to(_accumulation_dtype(input))
    index = _subbatch_index(perms, num_samples, w_size, bs)
    z, means, covs, failed = _whiten_blocks(x, index, eps, whitening)
    if loss_fn is None or loss_fn is norm_mse_loss:
        loss = _normalized_mse_blocks(z.view(perms.shape[0], bs // w_size, num_samples, w_size, -1))
    else:
        loss = _pair_losses_in_input_order(z, index, num_samples, bs, loss_fn)
        loss = torch.as_tensor(loss, device=input.device)
    loss = _checked(loss.float(), failed, covs, w_size)
    return loss, means, covs


def _wmse_with_running_statistics(
    input: Tensor,
    num_samples: int,
    w_iter: int,
    mean: Tensor,
    cov: Tensor,
    eps: float,
    whitening: str,
    loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]],
) -> Tensor:
    """Eval mode with running statistics: every sub-batch is whitened with the same mean and
    covariance, so the whitening is one (N, d) product and the sub-batches (and the w_iter
    identical iterations) do not change the value; the caller still draws lightly's
    permutations to keep the random stream in step."""
    acc = _accumulation_dtype(input)
    z, failed = _whiten_with_statistics(input.to(acc), mean.reshape(-1).to(acc), cov.to(acc), eps, whitening)
    views = z.view(num_samples, -1, z.shape[1]).unbind(0)
    loss = _view_pair_loss(views, loss_fn or norm_mse_loss)
    loss = torch.as_tensor(loss, device=input.device).float()
    return _checked(loss, failed, cov.to(acc).unsqueeze(0), 0)


# --------------------------------------------------------------------------------------------
# Sequential reference for the module (lightly's loop, one block at a time)
# --------------------------------------------------------------------------------------------


def _wmse_loop(
    input: Tensor,
    bs: int,
    num_samples: int,
    w_size: int,
    perms: Tensor,
    eps: float,
    whitening: str,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    white: "Whitening2d",
) -> Tensor:
    """``backend="reference"`` of :class:`WMSELoss`: lightly's loop, with the running statistics
    updated after every block (no batching, no closed forms), in the reference backend's dtype
    (float32 for half inputs: PyTorch has no half-precision Cholesky on CPU; the cast is
    differentiable, so the gradient comes back in the input dtype)."""
    input = input.to(reference_dtype(input))
    use_running = not white.training and white.track_running_stats
    update = white.training and white.track_running_stats
    whiten = reference.whiten_cholesky if whitening == "cholesky" else reference.whiten_zca
    total = 0.0
    for perm in perms:
        z = torch.empty_like(input)
        for idx in perm.view(-1, w_size):
            for i in range(num_samples):
                rows = input[idx + i * bs]
                if use_running:
                    z[idx + i * bs] = _whiten_with_statistics(
                        rows, white.running_mean.reshape(-1), white.running_variance, eps, whitening
                    )[0].to(input.dtype)
                    continue
                z[idx + i * bs] = whiten(rows, eps)
                if update:
                    with torch.no_grad():
                        xc = rows - rows.mean(dim=0)
                        cov = xc.T @ xc / (w_size - 1)
                        m = white.momentum
                        white.running_mean.mul_(1 - m).add_(m * rows.mean(dim=0).reshape(white.running_mean.shape))
                        white.running_variance.mul_(1 - m).add_(m * cov)
        views = z.view(num_samples, bs, -1).unbind(0)
        total = total + _view_pair_loss(views, loss_fn)
    return torch.as_tensor(total / perms.shape[0], device=input.device).float()


# --------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------


@outside_autocast
def wmse_loss(
    input: Tensor,
    num_samples: int = 2,
    w_size: int = 256,
    w_iter: int = 1,
    eps: float = 0.0,
    *,
    whitening: str = "cholesky",
    permutations: Optional[Sequence[Tensor]] = None,
    backend: str = "auto",
) -> Tensor:
    r"""W-MSE loss with sub-batch statistics (see :func:`fastssl.reference.wmse_loss`).

    Args:
        input: (batch_size * num_samples, d), the views stacked one after the other.
        w_size: rows per whitened sub-batch (must divide batch_size; > d unless eps > 0).
        eps: shrinkage of the covariance toward the identity, in [0, 1].
        whitening: ``"cholesky"`` (W-MSE's) or ``"zca"``.
        permutations: ``w_iter`` permutations of ``range(batch_size)``; drawn with
            ``torch.randperm`` (as lightly) when None.
        backend: ``"reference"`` runs the textbook loop; every other choice the batched path
            (with the CUDA C++ kernel for Cholesky whitening of CUDA tensors, d <= 256).
    Returns:
        0-d float32 loss.
    Raises:
        WMSEBatchSizeError (a ValueError and RuntimeError): rows not divisible by num_samples,
            or images per view not a multiple of w_size.
        ValueError: fewer images per view than w_size; a singular sub-batch covariance (for
            CPU tensors; on CUDA the loss is NaN instead, since raising would synchronize the
            stream on every call).
    """
    bs = _check_wmse_args(input, num_samples, w_size, w_iter, eps, whitening)
    impl = resolve_backend(backend, input, has_triton_kernel=False)
    if impl == "reference":
        return run_reference(reference.wmse_loss, input, num_samples, w_size, w_iter, eps, whitening, permutations)
    perms = _draw_permutations(bs, w_iter, permutations, input.device)
    loss, _, _ = _wmse_batched(input, bs, num_samples, w_size, perms, eps, whitening)
    return loss


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class Whitening2d(nn.Module):
    """lightly's ``Whitening2d``: whitening with running statistics (same buffers and behaviour).

    Buffers (when ``track_running_stats``): ``running_mean`` (1, d, 1, 1), zeros, and
    ``running_variance`` (d, d), the identity. In training mode each whitened batch updates
    them by ``r <- momentum * batch + (1 - momentum) * r`` (batch mean and unshrunk covariance);
    in eval mode the running mean and covariance replace the batch's.

    Args:
        num_features: d.
        momentum: EMA momentum in [0, 1].
        track_running_stats: keep the running statistics.
        eps: shrinkage toward the identity in [0, 1].
        whitening: ``"cholesky"`` (lightly's) or ``"zca"``.
    """

    running_mean: Tensor
    running_variance: Tensor

    def __init__(
        self,
        num_features: int,
        momentum: float = 0.01,
        track_running_stats: bool = True,
        eps: float = 0,
        whitening: str = "cholesky",
    ) -> None:
        super().__init__()
        self.num_features = check_int("num_features", num_features, minimum=1)
        self.momentum = check_probability("momentum", momentum)
        self.track_running_stats = bool(track_running_stats)
        self.eps = _check_eps(eps)
        if whitening not in WHITENINGS:
            raise ValueError(f"whitening must be one of {WHITENINGS}, got {whitening!r}")
        self.method = whitening
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros([1, num_features, 1, 1]))
            self.register_buffer("running_variance", torch.eye(num_features))

    def uses_running_statistics(self) -> bool:
        return not self.training and self.track_running_stats

    @torch.no_grad()
    def update_running_statistics(self, means: Tensor, covs: Tensor) -> None:
        """Apply the EMA for K successive batches at once: means (K, d), covariances (K, d, d)."""
        if not (self.training and self.track_running_stats) or means.shape[0] == 0:
            return
        k = means.shape[0]
        decay = 1.0 - self.momentum
        exponents = torch.arange(k - 1, -1, -1, device=means.device, dtype=means.dtype)
        weights = self.momentum * torch.pow(decay, exponents)
        new_mean = decay**k * self.running_mean.reshape(-1).to(means.dtype) + weights @ means
        new_cov = decay**k * self.running_variance.to(covs.dtype) + torch.tensordot(weights, covs, dims=1)
        self.running_mean.copy_(new_mean.reshape(self.running_mean.shape))
        self.running_variance.copy_(new_cov)

    def forward(self, x: Tensor) -> Tensor:
        """Whiten (n, d) ``x``; returns (n, d) in ``x``'s dtype."""
        check_tensor("x", x, min_rows=1)
        if x.shape[1] != self.num_features:
            raise ValueError(f"x must have shape (n, {self.num_features}), got {tuple(x.shape)}")
        acc = _accumulation_dtype(x)
        if self.uses_running_statistics():
            z, failed = _whiten_with_statistics(
                x.to(acc), self.running_mean.reshape(-1).to(acc), self.running_variance.to(acc), self.eps, self.method
            )
            if _check_synchronizes(x.device):
                return _nan_if_singular(z, failed).to(x.dtype)
            _raise_if_singular(failed, self.running_variance.unsqueeze(0), 0)
            return z.to(x.dtype)
        check_tensor("x", x, min_rows=2)
        index = torch.arange(x.shape[0], device=x.device).view(1, -1)
        z, means, covs, failed = _whiten_blocks(x.to(acc), index, self.eps, self.method)
        if _check_synchronizes(x.device):
            z = _nan_if_singular(z, failed)
        else:
            _raise_if_singular(failed, covs, x.shape[0])
        self.update_running_statistics(means, covs)
        return z[0].to(x.dtype)


class WMSELoss(nn.Module):
    """Drop-in for ``lightly.loss.WMSELoss``: same constructor, state and train/eval behaviour.

    Args:
        embedding_dim: feature dimension d.
        momentum: EMA momentum of the running statistics (used in eval mode, as lightly).
        eps: covariance shrinkage toward the identity, in [0, 1].
        track_running_stats: keep running mean/covariance (buffers of ``self.whitening``) and
            whiten with them in eval mode.
        w_iter: whitening iterations (a fresh permutation each).
        w_size: sub-batch size; lightly requires ``w_size >= 2 * embedding_dim``.
        loss_fn: loss between two whitened views, (n, d) x (n, d) -> 0-d; lightly's normalized MSE.
        num_samples: views per image stacked in the input.
        whitening: ``"cholesky"`` (lightly's) or ``"zca"``.
        backend: ``"auto" | "triton" | "torch" | "reference"`` (env ``FASTSSL_BACKEND``);
            ``"reference"`` runs lightly's loop block by block, the others the batched path.

    Forward ``(input)`` of shape (batch_size * num_samples, embedding_dim); returns a 0-d
    float32 loss. Raises :class:`WMSEBatchSizeError` (a RuntimeError, as lightly, and a
    ValueError) when the rows are not divisible by num_samples or the images per view by
    w_size, and ValueError when there are fewer images per view than w_size or a covariance is
    singular (CPU tensors).

    On CUDA tensors the step never waits for the host (it can be captured in a CUDA graph),
    which changes two things against lightly: a singular sub-batch covariance gives a NaN loss
    instead of an error (raising would need the factorization's status on the host every
    call), and the sub-batch permutations come from the CUDA generator (``torch.rand`` on the
    device, argsorted), so ``torch.manual_seed`` reproduces fastssl's own runs but not lightly's
    CPU ``torch.randperm`` draws; the permutations are uniform all the same. float16/bfloat16
    inputs are whitened in float32 on every backend (``"reference"`` included).

    Example::

        criterion = WMSELoss(embedding_dim=64, w_size=128)
        loss = criterion(torch.cat([z_view0, z_view1]))  # (2 * batch_size, 64)
        loss.backward()
    """

    def __init__(
        self,
        embedding_dim: int = 128,
        momentum: float = 0.01,
        eps: float = 0.0,
        track_running_stats: bool = True,
        w_iter: int = 1,
        w_size: int = 256,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = norm_mse_loss,
        num_samples: int = 2,
        whitening: str = "cholesky",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_int("embedding_dim", embedding_dim, minimum=1)
        self.whitening = Whitening2d(
            num_features=embedding_dim,
            momentum=momentum,
            eps=eps,
            track_running_stats=track_running_stats,
            whitening=whitening,
        )
        if embedding_dim * 2 > w_size:
            raise ValueError(
                f"w_size should be at least twice the size of embedding_dim to avoid instability: "
                f"w_size={w_size}, embedding_dim={embedding_dim}"
            )
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.embedding_dim = embedding_dim
        self.w_iter = check_int("w_iter", w_iter, minimum=1)
        self.w_size = check_int("w_size", w_size, minimum=2)
        self.loss_f = loss_fn
        self.num_samples = check_int("num_samples", num_samples, minimum=2)
        self.num_pairs = num_samples * (num_samples - 1) // 2
        self.backend = check_backend_name(backend)

    def forward(self, input: Tensor) -> Tensor:
        """W-MSE loss of ``num_samples`` stacked views.

        Args:
            input: (num_samples * B, D) embeddings, the views stacked one after the other; B must
                be a multiple of ``w_size``.

        Returns:
            0-d float32 loss: ``loss_fn`` between every pair of whitened views, averaged over
            ``w_iter`` random sub-batch splits.
        """
        check_tensor("input", input)
        if input.shape[1] != self.embedding_dim:
            raise ValueError(
                f"input must have shape (batch_size * {self.num_samples}, {self.embedding_dim}), "
                f"got {tuple(input.shape)}"
            )
        bs = _per_view_batch(input.shape[0], self.num_samples, self.w_size)
        impl = resolve_backend(self.backend, input, has_triton_kernel=False)
        white = self.whitening
        perms = _draw_permutations(bs, self.w_iter, None, input.device)
        loss_fn = self.loss_f
        if impl == "reference":
            return _wmse_loop(input, bs, self.num_samples, self.w_size, perms, white.eps, white.method, loss_fn, white)
        if white.uses_running_statistics():
            return _wmse_with_running_statistics(
                input, self.num_samples, self.w_iter, white.running_mean, white.running_variance,
                white.eps, white.method, loss_fn,
            )
        update = white.training and white.track_running_stats
        loss, means, covs = _wmse_batched(
            input, bs, self.num_samples, self.w_size, perms, white.eps, white.method, loss_fn
        )
        if update:
            white.update_running_statistics(means, covs)
        return loss
