r"""W-MSE: whitening of sub-batches (Cholesky, or ZCA) followed by the normalized MSE between
views; functional API, batched PyTorch path and the drop-in :class:`WMSELoss`. The CUDA C++
whitening kernel lives in ``fastssl/csrc`` and is loaded by :mod:`fastssl.kernels.wmse_cuda`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from fastssl import reference
from fastssl._backend import check_backend_name, resolve_backend
from fastssl._checks import check_finite, check_int, check_tensor

WHITENINGS = ("cholesky", "zca")

# --------------------------------------------------------------------------------------------
# Optimized PyTorch path
# --------------------------------------------------------------------------------------------


def _wmse_torch(
    input: Tensor,
    num_samples: int,
    w_size: int,
    w_iter: int,
    eps: float,
    whitening: str,
    permutations: Optional[Sequence[Tensor]],
) -> Tensor:
    # Placeholder until the batched path lands: the reference loop in float32 at least.
    acc = torch.promote_types(input.dtype, torch.float32)
    return reference.wmse_loss(input.to(acc), num_samples, w_size, w_iter, eps, whitening, permutations).float()


# --------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------


def _check_wmse_args(input: Tensor, num_samples: int, w_size: int, w_iter: int, eps: float, whitening: str) -> int:
    check_tensor("input", input)
    check_int("num_samples", num_samples, minimum=2)
    check_int("w_size", w_size, minimum=2)
    check_int("w_iter", w_iter, minimum=1)
    eps = check_finite("eps", eps)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps must be in [0, 1] (shrinkage toward the identity), got {eps}")
    if whitening not in WHITENINGS:
        raise ValueError(f"whitening must be one of {WHITENINGS}, got {whitening!r}")
    if input.shape[0] % num_samples != 0:
        raise ValueError(
            f"input has {input.shape[0]} rows, not divisible by num_samples={num_samples}: "
            "expected (batch_size * num_samples, dim)"
        )
    bs = input.shape[0] // num_samples
    if bs < w_size or bs % w_size != 0:
        raise ValueError(
            f"the batch of {bs} images per view must be a multiple of w_size={w_size} "
            f"(input shape {tuple(input.shape)}, num_samples={num_samples})"
        )
    return bs


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
    r"""W-MSE loss (see :func:`fastssl.reference.wmse_loss`).

    Args:
        input: (batch_size * num_samples, d), the views stacked one after the other.
        w_size: rows per whitened sub-batch (must divide batch_size; > d for a full-rank covariance).
        eps: shrinkage of the covariance toward the identity, in [0, 1].
        whitening: ``"cholesky"`` (W-MSE's) or ``"zca"``.
        permutations: ``w_iter`` permutations of ``range(batch_size)``; drawn with
            ``torch.randperm`` (as lightly) when None.
    Returns:
        0-d float32 loss.
    """
    _check_wmse_args(input, num_samples, w_size, w_iter, eps, whitening)
    impl = resolve_backend(backend, input, has_triton_kernel=False)
    if impl == "reference":
        return reference.wmse_loss(input, num_samples, w_size, w_iter, eps, whitening, permutations).float()
    return _wmse_torch(input, num_samples, w_size, w_iter, eps, whitening, permutations)


# --------------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------------


class WMSELoss(nn.Module):
    """Drop-in for ``lightly.loss.WMSELoss``.

    Args:
        embedding_dim: feature dimension d.
        momentum: EMA momentum of the running statistics (used in eval mode, as lightly).
        eps: covariance shrinkage toward the identity.
        track_running_stats: keep running mean/covariance for eval mode.
        w_iter: whitening iterations (fresh permutation each).
        w_size: sub-batch size; lightly requires ``w_size >= 2 * embedding_dim``.
        num_samples: views per image stacked in the input.
        whitening: ``"cholesky"`` or ``"zca"``.
        backend: ``"auto" | "triton" | "torch" | "reference"`` (env ``FASTSSL_BACKEND``).

    Forward ``(input)`` of shape (batch_size * num_samples, embedding_dim); returns a 0-d
    float32 loss.
    """

    def __init__(
        self,
        embedding_dim: int = 128,
        momentum: float = 0.01,
        eps: float = 0.0,
        track_running_stats: bool = True,
        w_iter: int = 1,
        w_size: int = 256,
        num_samples: int = 2,
        whitening: str = "cholesky",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.embedding_dim = check_int("embedding_dim", embedding_dim, minimum=1)
        self.momentum = check_finite("momentum", momentum)
        self.eps = check_finite("eps", eps)
        self.track_running_stats = track_running_stats
        self.w_iter = check_int("w_iter", w_iter, minimum=1)
        self.w_size = check_int("w_size", w_size, minimum=2)
        self.num_samples = check_int("num_samples", num_samples, minimum=2)
        if embedding_dim * 2 > w_size:
            raise ValueError(
                f"w_size ({w_size}) should be at least twice embedding_dim ({embedding_dim}) "
                "to avoid instability"
            )
        if whitening not in WHITENINGS:
            raise ValueError(f"whitening must be one of {WHITENINGS}, got {whitening!r}")
        self.whitening = whitening
        self.backend = check_backend_name(backend)

    def forward(self, input: Tensor) -> Tensor:
        check_tensor("input", input)
        if input.shape[1] != self.embedding_dim:
            raise ValueError(
                f"input must have shape (batch_size * {self.num_samples}, {self.embedding_dim}), "
                f"got {tuple(input.shape)}"
            )
        return wmse_loss(
            input,
            self.num_samples,
            self.w_size,
            self.w_iter,
            self.eps,
            whitening=self.whitening,
            backend=self.backend,
        )
