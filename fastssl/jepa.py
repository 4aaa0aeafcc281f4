r"""SIGReg, LeJEPA, LeWM and VISReg: functional API, optimized PyTorch path and the drop-in modules
for lightly's ``SIGReg``, ``LeJEPALoss``, ``LeWMLoss``, ``VISRegLoss`` (and the
``VISRegLossComponents`` it returns).

**SIGReg** (Balestriero & LeCun 2025, LeJEPA Alg. 1) projects the N samples onto S random unit
directions and compares their empirical characteristic function at K frequencies with the
standard normal's. lightly materializes the angles, their cosines and their sines as
(…, N, S, K) tensors (8 views × 64 × 1024 × 17 ≈ 8.9 M elements each, several kept for the
backward). Here one autograd function produces only the (…, S, K) sums of cosines and sines:
it runs over chunks of directions, and its backward recomputes each chunk's angles and applies
the closed form

.. math:: \frac{\partial L}{\partial x_{ns}} = \sum_k t_k\Big(\cos(t_kx_{ns})\,
          \frac{\partial L}{\partial S^{\sin}_{sk}} - \sin(t_kx_{ns})\,
          \frac{\partial L}{\partial S^{\cos}_{sk}}\Big),\qquad
          \frac{\partial L}{\partial P} = \frac{\partial L}{\partial X}A^\top

so memory is O(N·d + S·K + one chunk) instead of O(N·S·K). Under ``gather_distributed`` the
sums are all-reduced with a backward that all-reduces their gradient: each rank's input gradient
is then exactly ``W ×`` its slice of the global one (the 1/W error lightly fixed in #1920 cannot
occur), the sample count is ``N × W`` (no ``.item()``), and the directions are broadcast from
rank 0 (a device collective; lightly's draw, so rank 0 reproduces lightly's random stream).

**VISReg** (Wu et al. 2026) replaces the characteristic function by a sliced 2-Wasserstein
distance: every projection is sorted over the batch. The torch path sorts contiguous rows (the
projections are formed directly as (…, S, N), about twice as fast as sorting along a strided
batch axis) and scatters the residuals back through the saved permutation in the backward.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from fastssl import distributed, reference
from fastssl._backend import check_backend_name, outside_autocast, resolve_backend
from fastssl._checks import check_distributed_available, check_finite, check_int, check_tensor

# Elements of one chunk of angles (…, chunk of S, K, N). On a CPU 2^18 (1 MiB of float32): the
# angles, their cosines and sines stay in the L2 cache between the passes, and each temporary is
# small enough for the allocator's free lists (a fresh multi-MiB buffer per pass is mapped and
# page-faulted again every time: 32 MiB chunks made SIGReg at 8 × 64 samples, S = 1024 run 2x
# slower than 1 MiB ones, and slower than torch.compile of the reference). On a GPU large enough
# to fill it.
CHUNK_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 25}


def _accumulation_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


# --------------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------------


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the backward sums the incoming gradients over ranks too. Every rank
    computes the same loss from the summed statistic, so rank r's gradient with respect to its
    own contribution is ``Σ_ranks ∂L/∂S = W ∂L/∂S`` -- the distributed contract of :mod:`fastssl.distributed`."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def _all_reduce_sum(x: Tensor) -> Tensor:
    return _AllReduceSum.apply(x) if distributed.is_distributed() else x


def _gather_samples(x: Tensor) -> Tensor:
    """Concatenate (…, N, d) from all ranks along the sample axis N (gradient: W × slice)."""
    if not distributed.is_distributed():
        return x
    return distributed.gather(x.movedim(-2, 0)).movedim(0, -2)


def random_directions(
    num_features: int, num_vectors: int, device: torch.device, dtype: torch.dtype, shared: bool = False
) -> Tensor:
    """``num_vectors`` random unit directions (num_features, num_vectors), drawn as lightly draws
    them (``torch.randn`` in ``dtype`` from the default generator), normalized in float32 (float64
    for float64). ``shared``: inside a process group, rank 0's draw is broadcast to every rank."""
    directions = torch.randn(num_features, num_vectors, device=device, dtype=dtype)
    if shared and distributed.is_distributed():
        dist.broadcast(directions, src=0)
    directions = directions.to(_accumulation_dtype(directions))
    return directions / directions.norm(p=2, dim=0)


# --------------------------------------------------------------------------------------------
# SIGReg
# --------------------------------------------------------------------------------------------


def frequency_grid(knots: int, t_max: float, device: Optional[torch.device] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """SIGReg's frequencies ``t`` (K,), the normal characteristic function ``phi`` there and the
    trapezoid weights times ``phi`` (as lightly's buffers), built on ``device`` without a copy."""
    t = torch.linspace(0, t_max, knots, dtype=torch.float32, device=device)
    dt = t_max / (knots - 1)
    weights = torch.full((knots,), 2 * dt, dtype=torch.float32, device=device)
    weights[0] = dt
    weights[-1] = dt
    phi = torch.exp(-t.square() / 2.0)
    return t, phi, weights * phi


class _CharacteristicSums(torch.autograd.Function):
    r"""``(Σ_n cos(t_k x_ns), Σ_n sin(t_k x_ns))`` with ``X = P A``, for P (…, N, d), unit
    directions A (d, S) and frequencies t (K,); both sums (…, S, K). Chunks of directions are
    processed in the layout (…, chunk, K, N) so the sums over N run along contiguous memory; the
    backward recomputes the chunk's angles (see the module docstring)."""

    @staticmethod
    def forward(ctx, proj: Tensor, directions: Tensor, t: Tensor, chunk: int):  # type: ignore[override]
        num_slices = directions.shape[1]
        cos_sum = proj.new_empty(*proj.shape[:-2], num_slices, t.shape[0])
        sin_sum = torch.empty_like(cos_sum)
        for start in range(0, num_slices, chunk):
            stop = min(start + chunk, num_slices)
            angles = _angles(proj, directions[:, start:stop], t)  # (…, c, K, N)
            torch.sum(torch.cos(angles), dim=-1, out=cos_sum[..., start:stop, :])
            torch.sum(angles.sin_(), dim=-1, out=sin_sum[..., start:stop, :])  # in place: one buffer less
        ctx.save_for_backward(proj, directions, t)
        ctx.chunk = chunk
        return cos_sum, sin_sum

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_cos: Tensor, grad_sin: Tensor):  # type: ignore[override]
        proj, directions, t = ctx.saved_tensors
        grad_proj = torch.zeros_like(proj)
        num_slices = directions.shape[1]
        # cos(θ)·g_sin - sin(θ)·g_cos = R·cos(θ + φ) with R = |(g_sin, g_cos)|, φ = atan2(g_cos, g_sin):
        # one cosine per angle instead of a cosine and a sine.
        amplitude = torch.hypot(grad_sin, grad_cos) * t
        phase = torch.atan2(grad_cos, grad_sin)
        for start in range(0, num_slices, ctx.chunk):
            stop = min(start + ctx.chunk, num_slices)
            angles = _angles(proj, directions[:, start:stop], t)
            angles += phase[..., start:stop, :, None]
            grad_x = angles.cos_().mul_(amplitude[..., start:stop, :, None]).sum(dim=-2)  # (…, c, N)
            grad_proj += grad_x.mT @ directions[:, start:stop].T
        return grad_proj, None, None, None


def _angles(proj: Tensor, directions: Tensor, t: Tensor) -> Tensor:
    """``t_k · (P A)_ns`` laid out (…, S, K, N)."""
    projected = directions.T @ proj.mT  # (…, S, N)
    return projected[..., None, :] * t[:, None]


def _chunk_size(proj: Tensor, knots: int) -> int:
    per_slice = max(1, proj[..., 0].numel() * knots)
    return max(1, CHUNK_ELEMENTS.get(proj.device.type, CHUNK_ELEMENTS["cuda"]) // per_slice)


def _sigreg_torch(
    proj: Tensor, directions: Tensor, t: Tensor, phi: Tensor, weights: Tensor, gather_distributed: bool
) -> Tensor:
    acc = _accumulation_dtype(proj, directions)
    proj = proj.to(acc)
    num_samples = proj.shape[-2] * (distributed.world_size() if gather_distributed else 1)
    t, phi, weights = t.to(acc), phi.to(acc), weights.to(acc)
    cos_sum, sin_sum = _CharacteristicSums.apply(proj, directions.to(acc), t, _chunk_size(proj, t.shape[0]))
    if gather_distributed:
        cos_sum, sin_sum = _all_reduce_sum(cos_sum), _all_reduce_sum(sin_sum)
    error = (cos_sum / num_samples - phi).square() + (sin_sum / num_samples).square()
    return ((error @ weights) * num_samples).mean().float()


def _sigreg_dispatch(proj, directions, knots, t_max, grid, gather_distributed, impl) -> Tensor:
    if impl == "reference":
        if gather_distributed:
            proj = _gather_samples(proj)
        acc = _accumulation_dtype(proj, directions)
        return reference.sigreg_loss(proj.to(acc), directions.to(acc), knots, t_max).float()
    t, phi, weights = grid if grid is not None else frequency_grid(knots, t_max, proj.device)
    return _sigreg_torch(proj, directions, t, phi, weights, gather_distributed)


def _check_sigreg_grid(knots: int, t_max: float, num_vectors: int) -> Tuple[int, float, int]:
    knots = check_int("knots", knots, minimum=-(2**62))
    if knots <= 1:
        raise ValueError("knots must be an integer greater than one.")
    t_max = check_finite("t_max", t_max)
    if t_max <= 0:
        raise ValueError("t_max must be greater than zero.")
    num_vectors = check_int("num_vectors", num_vectors, minimum=-(2**62))
    if num_vectors <= 0:
        raise ValueError("num_vectors must be a positive integer.")
    return knots, t_max, num_vectors


def _check_directions(directions: Optional[Tensor], num_features: int, name: str = "directions") -> None:
    if directions is None:
        return
    check_tensor(name, directions, ndim=2)
    if directions.shape[0] != num_features:
        raise ValueError(f"{name} must have shape ({num_features}, num_vectors), got {tuple(directions.shape)}")


@outside_autocast
def sigreg_loss(
    proj: Tensor,
    knots: int = 17,
    t_max: float = 3.0,
    num_vectors: int = 1024,
    *,
    directions: Optional[Tensor] = None,
    gather_distributed: bool = False,
    backend: str = "auto",
) -> Tensor:
    r"""SIGReg (see :func:`fastssl.reference.sigreg_loss`).

    Args:
        proj: (…, N, d) projected embeddings; the statistic is over N, one per leading index.
        knots, t_max: the frequency grid ``linspace(0, t_max, knots)``.
        num_vectors: number of random directions drawn when ``directions`` is None.
        directions: optional (d, S) unit directions (fixed slices; e.g. for reproducibility).
        gather_distributed: the statistic over the global batch (every rank's N samples).
        backend: ``"auto" | "triton" | "torch" | "reference"`` (no Triton kernel: torch).
    Returns:
        0-d float32 loss.

    Example::

        >>> loss = sigreg_loss(torch.randn(2, 64, 16), num_vectors=32)
    """
    check_tensor("proj", proj, ndim=None)
    if proj.dim() < 2:
        raise ValueError(f"proj must have shape (..., N, D), got shape {tuple(proj.shape)}")
    knots, t_max, num_vectors = _check_sigreg_grid(knots, t_max, num_vectors)
    _check_directions(directions, proj.shape[-1])
    check_distributed_available("gather_distributed", gather_distributed)
    impl = resolve_backend(backend, proj, has_triton_kernel=False)
    if directions is None:
        directions = random_directions(proj.shape[-1], num_vectors, proj.device, proj.dtype, shared=gather_distributed)
    return _sigreg_dispatch(proj, directions, knots, t_max, None, gather_distributed, impl)


class SIGReg(nn.Module):
    """Drop-in for ``lightly.loss.SIGReg`` (Balestriero & LeCun 2025, "LeJEPA: Provable and
    Scalable Self-Supervised Learning Without the Heuristics", Alg. 1).

    Sketched isotropic Gaussian regularization: the mean over random unit directions of the
    Epps-Pulley statistic between the projected samples' empirical characteristic function and
    the standard normal's, on the frequency grid held in the buffers ``t``, ``phi``, ``weights``
    (lightly's). Computed without the (…, N, S, K) angle tensors (see :mod:`fastssl.jepa`).

    Keyword-only arguments, as in lightly:

    Args:
        knots: number of frequencies (> 1).
        t_max: largest frequency (> 0).
        num_vectors: random directions per call (> 0).
        gather_distributed: statistic over the global batch; exact gradients (W × slice), the
            directions broadcast from rank 0, the sample count without a host sync.
        backend: ``"auto" | "triton" | "torch" | "reference"``.

    Forward ``(proj)``, (…, N, d); returns a 0-d float32 loss.

    Example::

        >>> sigreg = SIGReg(num_vectors=64)
        >>> loss = sigreg(torch.randn(64, 16))
    """

    t: Tensor
    phi: Tensor
    weights: Tensor

    def __init__(
        self,
        *,
        knots: int = 17,
        t_max: float = 3.0,
        num_vectors: int = 1024,
        gather_distributed: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        knots, t_max, num_vectors = _check_sigreg_grid(knots, t_max, num_vectors)
        check_distributed_available("gather_distributed", gather_distributed)
        self.num_vectors = num_vectors
        self.gather_distributed = gather_distributed
        self.knots, self.t_max = knots, t_max
        self.backend = check_backend_name(backend)
        t, phi, weights = frequency_grid(knots, t_max)
        self.register_buffer("t", t)
        self.register_buffer("phi", phi)
        self.register_buffer("weights", weights)

    def forward(self, proj: Tensor) -> Tensor:
        """SIGReg statistic of projections against an isotropic Gaussian.

        Args:
            proj: (..., N, C) projected embeddings: N samples of C features, with optional
                leading dimensions (e.g. views).

        Returns:
            0-d float32 loss.
        """
        return self.with_directions(proj, None)

    def with_directions(self, proj: Tensor, directions: Optional[Tensor]) -> Tensor:
        """The loss on given unit ``directions`` (d, S) instead of a fresh random draw (``None``)."""
        gather_distributed = self.gather_distributed
        check_tensor("proj", proj, ndim=None)
        if proj.dim() < 2:
            raise ValueError(f"proj must have shape (..., N, D), got shape {tuple(proj.shape)}")
        _check_directions(directions, proj.shape[-1])
        impl = resolve_backend(self.backend, proj, has_triton_kernel=False)
        if directions is None:
            directions = random_directions(
                proj.shape[-1], self.num_vectors, proj.device, proj.dtype, shared=gather_distributed
            )
        grid = (self.t, self.phi, self.weights)
        return _outside_autocast_sigreg(proj, directions, self.knots, self.t_max, grid, gather_distributed, impl)


@outside_autocast
def _outside_autocast_sigreg(proj, directions, knots, t_max, grid, gather_distributed, impl) -> Tensor:
    return _sigreg_dispatch(proj, directions, knots, t_max, grid, gather_distributed, impl)


# --------------------------------------------------------------------------------------------
# LeJEPA
# --------------------------------------------------------------------------------------------


def _check_projections(local_proj: object, global_proj: object) -> None:
    """lightly's shape checks (ValueError, same messages), plus dtype checks."""
    check_tensor("local_proj", local_proj, ndim=None)
    check_tensor("global_proj", global_proj, ndim=None)
    assert isinstance(local_proj, Tensor) and isinstance(global_proj, Tensor)
    if local_proj.ndim != 3:
        raise ValueError(f"local_proj must have shape (V_local, N, D), got {local_proj.shape}.")
    if global_proj.ndim != 3:
        raise ValueError(f"global_proj must have shape (V_global, N, D), got {global_proj.shape}.")
    if local_proj.shape[1:] != global_proj.shape[1:]:
        raise ValueError(
            "local_proj and global_proj must have matching batch and feature "
            f"dimensions, got {local_proj.shape} and {global_proj.shape}."
        )


def _invariance(all_proj: Tensor, global_proj: Tensor, gather_distributed: bool) -> Tensor:
    """Mean squared distance of every view to the global views' centroid; under
    ``gather_distributed`` reported for the global batch (the gradient stays the local one,
    which is W × the global gradient's slice)."""
    acc = _accumulation_dtype(all_proj)
    invariance = (global_proj.to(acc).mean(dim=0) - all_proj.to(acc)).square().mean()
    return distributed.global_mean(invariance) if gather_distributed else invariance


def _check_unit_interval(name: str, value: float) -> float:
    value = check_finite(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in the unit interval [0, 1].")
    return value


@outside_autocast
def lejepa_loss(
    local_proj: Tensor,
    global_proj: Tensor,
    lambda_param: float = 0.05,
    knots: int = 17,
    t_max: float = 3.0,
    num_vectors: int = 1024,
    *,
    directions: Optional[Tensor] = None,
    gather_distributed: bool = False,
    backend: str = "auto",
) -> Tensor:
    r"""LeJEPA loss (see :func:`fastssl.reference.lejepa_loss`):
    ``λ·SIGReg(all views) + (1 - λ)·MSE(all views, global centroid)``.

    Args:
        local_proj: (Vl, N, d); global_proj: (Vg, N, d).
        lambda_param: weight of SIGReg in [0, 1].
        knots, t_max, num_vectors, directions: as :func:`sigreg_loss`.
        gather_distributed: SIGReg over the global batch, every term reported for it.
        backend: ``"auto" | "triton" | "torch" | "reference"``.
    Returns:
        0-d float32 loss.

    Example::

        >>> loss = lejepa_loss(torch.randn(4, 32, 16), torch.randn(2, 32, 16), num_vectors=64)
    """
    _check_projections(local_proj, global_proj)
    lambda_param = _check_unit_interval("lambda_param", lambda_param)
    knots, t_max, num_vectors = _check_sigreg_grid(knots, t_max, num_vectors)
    _check_directions(directions, global_proj.shape[-1])
    check_distributed_available("gather_distributed", gather_distributed)
    impl = resolve_backend(backend, global_proj, has_triton_kernel=False)
    all_proj = torch.cat([global_proj, local_proj], dim=0)
    if directions is None:
        directions = random_directions(all_proj.shape[-1], num_vectors, all_proj.device, all_proj.dtype,
                                       shared=gather_distributed)  # fmt: skip
    sigreg = _sigreg_dispatch(all_proj, directions, knots, t_max, None, gather_distributed, impl)
    return (lambda_param * sigreg + (1 - lambda_param) * _invariance(all_proj, global_proj, gather_distributed)).float()


class LeJEPALoss(nn.Module):
    """Drop-in for ``lightly.loss.LeJEPALoss`` (Balestriero & LeCun 2025, "LeJEPA", Eq. 9).

    ``lambda_param · SIGReg(all views) + (1 - lambda_param) · MSE(all views, mean global view)``.
    Under ``gather_distributed`` every rank returns the global batch's loss (lightly: the
    invariance term is each rank's own).

    Args:
        lambda_param: weight of SIGReg in [0, 1].
        gather_distributed: SIGReg over the global batch (exact gradients).
        sigreg_knots, sigreg_t_max, sigreg_num_vectors: SIGReg's grid and directions.
        backend: ``"auto" | "triton" | "torch" | "reference"``.

    Forward ``(*, local_proj, global_proj)``, (Vl, N, d) and (Vg, N, d); returns a 0-d float32 loss.

    Example::

        >>> loss_fn = LeJEPALoss(sigreg_num_vectors=64)
        >>> loss = loss_fn(local_proj=torch.randn(4, 32, 16), global_proj=torch.randn(2, 32, 16))
    """

    def __init__(
        self,
        lambda_param: float = 0.05,
        gather_distributed: bool = False,
        sigreg_knots: int = 17,
        sigreg_t_max: float = 3.0,
        sigreg_num_vectors: int = 1024,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.lambda_param = _check_unit_interval("lambda_param", lambda_param)
        self.sigreg = SIGReg(
            knots=sigreg_knots,
            t_max=sigreg_t_max,
            num_vectors=sigreg_num_vectors,
            gather_distributed=gather_distributed,
            backend=backend,
        )
        self.backend = self.sigreg.backend

    def forward(self, *, local_proj: Tensor, global_proj: Tensor) -> Tensor:
        """LeJEPA loss: SIGReg of every view plus prediction of the global-view mean.

        Args:
            local_proj: (Vl, N, D) local-view projections.
            global_proj: (Vg, N, D) global-view projections.

        Returns:
            0-d float32 loss.
        """
        _check_projections(local_proj, global_proj)
        all_proj = torch.cat([global_proj, local_proj], dim=0)
        gather = self.sigreg.gather_distributed
        sigreg = self.sigreg(all_proj)
        invariance = _invariance(all_proj, global_proj, gather)
        return (self.lambda_param * sigreg + (1.0 - self.lambda_param) * invariance).float()


# --------------------------------------------------------------------------------------------
# LeWM
# --------------------------------------------------------------------------------------------


def _check_lewm(predicted: object, target: object, embeddings: object) -> None:
    for name, x in (("predicted", predicted), ("target", target), ("embeddings", embeddings)):
        check_tensor(name, x, ndim=None)
    assert isinstance(predicted, Tensor) and isinstance(target, Tensor) and isinstance(embeddings, Tensor)
    if embeddings.ndim != 3:
        raise ValueError(f"embeddings must have shape (B, T, D), got {tuple(embeddings.shape)}.")
    if embeddings.shape[0] != predicted.shape[0] or embeddings.shape[-1] != predicted.shape[-1]:
        raise ValueError(
            "embeddings must share the batch size and embedding dimension of "
            f"predicted, got {tuple(embeddings.shape)} and {tuple(predicted.shape)}."
        )
    if predicted.shape != target.shape:
        raise ValueError(
            "predicted and target must have the same shape, got "
            f"{tuple(predicted.shape)} and {tuple(target.shape)}."
        )


def _prediction_loss(predicted: Tensor, target: Tensor, normalize: bool, gather_distributed: bool) -> Tensor:
    acc = _accumulation_dtype(predicted, target)
    predicted, target = predicted.to(acc), target.detach().to(acc)
    if normalize:
        predicted = nn.functional.layer_norm(predicted, predicted.shape[-1:])
        target = nn.functional.layer_norm(target, target.shape[-1:])
    loss = (predicted - target).square().mean()
    return distributed.global_mean(loss) if gather_distributed else loss


def _check_lambda_nonnegative(lambda_param: float) -> float:
    lambda_param = check_finite("lambda_param", lambda_param)
    if lambda_param < 0.0:
        raise ValueError("lambda_param must not be negative.")
    return lambda_param


@outside_autocast
def lewm_loss(
    predicted: Tensor,
    target: Tensor,
    embeddings: Tensor,
    lambda_param: float = 0.1,
    normalize: bool = False,
    knots: int = 17,
    t_max: float = 3.0,
    num_vectors: int = 1024,
    *,
    directions: Optional[Tensor] = None,
    gather_distributed: bool = False,
    backend: str = "auto",
) -> Tensor:
    r"""LeWM loss (see :func:`fastssl.reference.lewm_loss`): next-embedding MSE to the detached
    target plus ``lambda_param`` × SIGReg of the (B, T, d) embeddings over the batch, per time step.

    Example::

        >>> emb = torch.randn(8, 4, 16)
        >>> loss = lewm_loss(torch.randn(8, 3, 16), emb[:, 1:], emb, num_vectors=32)
    """
    _check_lewm(predicted, target, embeddings)
    lambda_param = _check_lambda_nonnegative(lambda_param)
    knots, t_max, num_vectors = _check_sigreg_grid(knots, t_max, num_vectors)
    _check_directions(directions, embeddings.shape[-1])
    check_distributed_available("gather_distributed", gather_distributed)
    impl = resolve_backend(backend, embeddings, has_triton_kernel=False)
    prediction = _prediction_loss(predicted, target, normalize, gather_distributed)
    # SIGReg samples along dimension -2: the batch goes there (one statistic per time step)
    sigreg_input = embeddings.flatten(start_dim=1, end_dim=-2).transpose(0, 1)
    if directions is None:
        directions = random_directions(embeddings.shape[-1], num_vectors, embeddings.device, embeddings.dtype,
                                       shared=gather_distributed)  # fmt: skip
    sigreg = _sigreg_dispatch(sigreg_input, directions, knots, t_max, None, gather_distributed, impl)
    return (prediction + lambda_param * sigreg).float()


class LeWMLoss(nn.Module):
    """Drop-in for ``lightly.loss.LeWMLoss`` (LeWorldModel, 2026): next-embedding prediction plus
    ``lambda_param`` × SIGReg of the frame embeddings (over the batch, per time step).

    Args:
        lambda_param: weight of SIGReg (>= 0).
        normalize: layer-normalize prediction and target before the MSE.
        gather_distributed: SIGReg over the global batch (exact gradients), the prediction loss
            reported for the global batch.
        sigreg_knots, sigreg_t_max, sigreg_num_vectors: SIGReg's grid and directions.
        backend: ``"auto" | "triton" | "torch" | "reference"``.

    Forward ``(*, predicted, target, embeddings)``: (B, T', d), the same shape, and (B, T, d);
    returns a 0-d float32 loss.

    Example::

        >>> criterion = LeWMLoss(sigreg_num_vectors=32)
        >>> emb = torch.randn(8, 4, 16)
        >>> loss = criterion(predicted=torch.randn(8, 3, 16), target=emb[:, 1:], embeddings=emb)
    """

    def __init__(
        self,
        lambda_param: float = 0.1,
        normalize: bool = False,
        gather_distributed: bool = False,
        sigreg_knots: int = 17,
        sigreg_t_max: float = 3.0,
        sigreg_num_vectors: int = 1024,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.lambda_param = _check_lambda_nonnegative(lambda_param)
        self.normalize = normalize
        self.sigreg = SIGReg(
            knots=sigreg_knots,
            t_max=sigreg_t_max,
            num_vectors=sigreg_num_vectors,
            gather_distributed=gather_distributed,
            backend=backend,
        )
        self.backend = self.sigreg.backend

    def forward(self, *, predicted: Tensor, target: Tensor, embeddings: Tensor) -> Tensor:
        """LeWM loss: next-embedding prediction error plus SIGReg over the batch axis.

        Args:
            predicted: (B, T', D) predicted next-step embeddings.
            target: (B, T', D) observed next-step embeddings (no gradient flows to them).
            embeddings: (B, T, D) embeddings regularized by SIGReg.

        Returns:
            0-d float32 loss.
        """
        _check_lewm(predicted, target, embeddings)
        gather = self.sigreg.gather_distributed
        prediction = _prediction_loss(predicted, target, self.normalize, gather)
        regularization = self.sigreg(embeddings.flatten(start_dim=1, end_dim=-2).transpose(0, 1))
        return (prediction + self.lambda_param * regularization).float()


# --------------------------------------------------------------------------------------------
# VISReg
# --------------------------------------------------------------------------------------------


class VISRegLossComponents(NamedTuple):
    """The VISReg loss and its parts (lightly's ``VISRegLossComponents``): ``total``, ``pred``
    (invariance), and the unweighted ``scale``, ``shape`` and ``center`` terms."""

    total: Tensor
    pred: Tensor
    scale: Tensor
    shape: Tensor
    center: Tensor


class _SlicedWasserstein(torch.autograd.Function):
    r"""``mean((sort_N(Z A) - q)²)`` for Z (…, N, d), unit slices A (d, S), Gaussian quantiles q (N,).

    The projections are formed as (S, …, N) by one matrix product over all leading indices (a
    batched product against the broadcast slices copies them per view and runs smaller products),
    so each slice sorts a contiguous row. The gradient is ``2/M (x - q_{rank(x)})`` per
    projection (M elements), scattered back through the saved permutation, then
    ``∂L/∂Z = (∂L/∂X) Aᵀ``, again one product.
    """

    @staticmethod
    def forward(ctx, z: Tensor, slices: Tensor, quantiles: Tensor) -> Tensor:  # type: ignore[override]
        rows = z.reshape(-1, z.shape[-1])  # (… · N, d)
        projections = (slices.T @ rows.T).view(slices.shape[1], *z.shape[:-1])  # (S, …, N)
        ordered, order = projections.sort(dim=-1)
        residual = ordered - quantiles
        ctx.save_for_backward(residual, order, slices)
        ctx.z_shape = z.shape
        return residual.square().mean()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        residual, order, slices = ctx.saved_tensors
        grad_projections = torch.empty_like(residual).scatter_(-1, order, residual * (2 * grad / residual.numel()))
        grad_rows = grad_projections.view(slices.shape[1], -1).T @ slices.T  # (… · N, d)
        return grad_rows.view(ctx.z_shape), None, None


def _visreg_torch(
    local_proj: Tensor, global_proj: Tensor, slices: Optional[Tensor], num_slices: int, lambda_param: float,
    lambda_scale: float, lambda_shape: float, lambda_center: float, eps: float, gather_distributed: bool,
    impl: str,
) -> VISRegLossComponents:  # fmt: skip
    acc = _accumulation_dtype(local_proj, global_proj)
    proj = torch.cat([global_proj, local_proj], dim=0)
    pred = _invariance(proj, global_proj, gather_distributed)
    if gather_distributed:
        proj = _gather_samples(proj)
    if slices is None:
        slices = random_directions(proj.shape[-1], num_slices, proj.device, proj.dtype, shared=gather_distributed)
    if impl == "reference":
        quantiles = reference.gaussian_quantiles(proj.shape[-2], acc, proj.device)
        p = proj.to(acc)
        std = p.std(dim=-2, unbiased=False, keepdim=True)
        scale = (1.0 - std).square().mean()
        z_norm = (p - p.mean(dim=-2, keepdim=True)) / (std.detach() + eps)
        shape = (torch.sort(z_norm @ slices.to(acc), dim=-2).values - quantiles[:, None]).square().mean()
        center = p.mean(dim=-2).square().mean()
    else:
        p = proj.to(acc)
        std = p.std(dim=-2, unbiased=False, keepdim=True)
        scale = (1.0 - std).square().mean()
        mean = p.mean(dim=-2, keepdim=True)
        # σ under a stop-gradient: shape optimization does not act on the scale (Wu et al. Eq. 2)
        z_norm = (p - mean) / (std.detach() + eps)
        quantiles = reference.gaussian_quantiles(proj.shape[-2], acc, proj.device)
        shape = _SlicedWasserstein.apply(z_norm, slices.to(acc), quantiles)
        center = mean.square().mean()
    regularization = lambda_scale * scale + lambda_shape * shape + lambda_center * center
    total = (1.0 - lambda_param) * pred + lambda_param * regularization
    return VISRegLossComponents(total.float(), pred.float(), scale.float(), shape.float(), center.float())


def _check_visreg(lambda_param, num_slices, lambda_scale, lambda_shape, lambda_center, eps) -> tuple:
    lambda_param = _check_unit_interval("lambda_param", lambda_param)
    num_slices = check_int("num_slices", num_slices, minimum=-(2**62))
    if num_slices < 1:
        raise ValueError("num_slices must be a positive integer.")
    weights = [check_finite(n, v) for n, v in (("lambda_scale", lambda_scale), ("lambda_shape", lambda_shape),
                                               ("lambda_center", lambda_center))]  # fmt: skip
    if min(weights) < 0:
        raise ValueError("lambda_scale, lambda_shape, and lambda_center must be non-negative.")
    eps = check_finite("eps", eps)
    if eps <= 0:
        raise ValueError("eps must be greater than zero.")
    return (lambda_param, num_slices, *weights, eps)


def _check_visreg_inputs(local_proj: object, global_proj: object) -> None:
    _check_projections(local_proj, global_proj)
    assert isinstance(local_proj, Tensor)
    if local_proj.size(-2) < 2:
        raise ValueError(f"Batch size must be greater than one, got {local_proj.size(-2)}.")


@outside_autocast
def visreg_loss_components(
    local_proj: Tensor,
    global_proj: Tensor,
    lambda_param: float = 0.9,
    num_slices: int = 4096,
    lambda_scale: float = 1.0,
    lambda_shape: float = 1.0,
    lambda_center: float = 1.0,
    eps: float = 1e-4,
    *,
    slices: Optional[Tensor] = None,
    gather_distributed: bool = False,
    backend: str = "auto",
) -> VISRegLossComponents:
    r"""VISReg (see :func:`fastssl.reference.visreg_components`), every part as 0-d float32.

    Args:
        local_proj: (Vl, N, d); global_proj: (Vg, N, d); N >= 2.
        lambda_param: weight of the regularization in [0, 1] (the invariance gets 1 - λ).
        num_slices: random slices drawn when ``slices`` is None.
        lambda_scale, lambda_shape, lambda_center: weights inside the regularization (>= 0).
        eps: added to σ before standardizing (> 0).
        slices: optional (d, S) unit directions.
        gather_distributed: regularization over the global batch (slices broadcast from rank 0,
            so every rank computes the same loss; lightly draws per-rank slices), every term
            reported for the global batch.
        backend: ``"auto" | "triton" | "torch" | "reference"``.

    Example::

        >>> parts = visreg_loss_components(torch.randn(4, 32, 16), torch.randn(2, 32, 16), num_slices=64)
        >>> parts.total, parts.shape
    """
    _check_visreg_inputs(local_proj, global_proj)
    checked = _check_visreg(lambda_param, num_slices, lambda_scale, lambda_shape, lambda_center, eps)
    _check_directions(slices, global_proj.shape[-1], "slices")
    check_distributed_available("gather_distributed", gather_distributed)
    impl = resolve_backend(backend, global_proj, has_triton_kernel=False)
    lambda_param, num_slices, lambda_scale, lambda_shape, lambda_center, eps = checked
    return _visreg_torch(local_proj, global_proj, slices, num_slices, lambda_param, lambda_scale, lambda_shape,
                         lambda_center, eps, gather_distributed, impl)  # fmt: skip


def visreg_loss(local_proj: Tensor, global_proj: Tensor, *args, **kwargs) -> Tensor:
    """The total of :func:`visreg_loss_components` (same arguments)."""
    return visreg_loss_components(local_proj, global_proj, *args, **kwargs).total


class VISRegLoss(nn.Module):
    """Drop-in for ``lightly.loss.VISRegLoss`` (Wu et al. 2026, "VISReg").

    ``(1 - λ)·pred + λ·(λ_scale·scale + λ_shape·shape + λ_center·center)`` over all views: the
    LeJEPA invariance, ``(1 - σ)²`` of the per-feature std, the sliced 2-Wasserstein distance of the
    standardized (σ under a stop-gradient) projections to N(0, 1) quantiles, and the squared mean.

    Without ``gather_distributed`` each rank draws its own slices and computes on its own batch
    (no communication; the paper's setting, as lightly). With it, the regularization is computed
    on the global batch with rank 0's slices, so every rank returns the single-process loss of
    the global batch and receives W × its slice of that gradient (lightly keeps per-rank slices
    and a per-rank invariance there).

    Args:
        lambda_param: weight of the regularization in [0, 1].
        num_slices: random slices per call (>= 1).
        lambda_scale, lambda_shape, lambda_center: weights of the three terms (>= 0).
        gather_distributed: regularization over the global batch.
        eps: added to σ before standardizing (> 0).
        backend: ``"auto" | "triton" | "torch" | "reference"``.

    Forward ``(*, local_proj, global_proj)``; ``forward_components`` returns
    :class:`VISRegLossComponents`.

    Example::

        >>> loss_fn = VISRegLoss(num_slices=64)
        >>> loss = loss_fn(local_proj=torch.randn(4, 32, 16), global_proj=torch.randn(2, 32, 16))
    """

    def __init__(
        self,
        lambda_param: float = 0.9,
        num_slices: int = 4096,
        lambda_scale: float = 1.0,
        lambda_shape: float = 1.0,
        lambda_center: float = 1.0,
        gather_distributed: bool = False,
        eps: float = 1e-4,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        checked = _check_visreg(lambda_param, num_slices, lambda_scale, lambda_shape, lambda_center, eps)
        check_distributed_available("gather_distributed", gather_distributed)
        (self.lambda_param, self.num_slices, self.lambda_scale, self.lambda_shape, self.lambda_center,
         self.eps) = checked  # fmt: skip
        self.gather_distributed = gather_distributed
        self.backend = check_backend_name(backend)

    def forward(self, *, local_proj: Tensor, global_proj: Tensor) -> Tensor:
        """VISReg loss: prediction of the global-view mean plus scale, shape and center terms.

        Args:
            local_proj: (Vl, N, D) local-view projections.
            global_proj: (Vg, N, D) global-view projections.

        Returns:
            0-d float32 loss (``forward_components`` returns the terms).
        """
        return self.forward_components(local_proj=local_proj, global_proj=global_proj).total

    def forward_components(self, *, local_proj: Tensor, global_proj: Tensor) -> VISRegLossComponents:
        return visreg_loss_components(
            local_proj,
            global_proj,
            self.lambda_param,
            self.num_slices,
            self.lambda_scale,
            self.lambda_shape,
            self.lambda_center,
            self.eps,
            gather_distributed=self.gather_distributed,
            backend=self.backend,
        )
