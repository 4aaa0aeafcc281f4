r"""VICRegL (Bardes, Ponce & LeCun 2022): functional API, optimized PyTorch path and the drop-in
module for lightly's ``VICRegLLoss``.

``α · global + (1 - α) · local``:

* the global term is VICReg on the views' global embeddings (invariance over the pairs (global
  view, any other view), variance and covariance averaged over all views). Its variance and
  covariance run through :func:`fastssl.decorrelation.vicreg_loss`, two views per call, so they
  take that family's Gram path (no d×d matrix when N < d) or its Triton kernels on CUDA;
* the local term matches feature-map positions between every such pair of views, by nearest
  neighbour in feature space and in grid (image) space, and applies VICReg (covariance weight
  ν/2, as the authors' code) to the matched positions. lightly runs one VICReg per matching and
  direction, each forming an (M, d, d) covariance per position; here all matchings with the same
  number of positions are stacked and run as one batched VICReg over positions, on the N×N Gram
  side when N < d (the local covariances have rank at most N).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from fastssl import distributed, reference
from fastssl._backend import check_backend_name, outside_autocast, resolve_backend
from fastssl._checks import BatchShapeError, check_distributed_available, check_finite, check_int, check_positive
from fastssl.decorrelation import vicreg_loss


def _accumulation_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


# --------------------------------------------------------------------------------------------
# VICReg over positions, batched
# --------------------------------------------------------------------------------------------


def _variance_hinge(x: Tensor, eps: float) -> Tensor:
    """Per position, ``mean_j relu(1 - sqrt(var_j + eps))`` of centered x (N, P, d), unbiased."""
    var = x.square().sum(dim=0) / (x.shape[0] - 1)
    return torch.relu(1 - torch.sqrt(var + eps)).mean(dim=-1)


def _covariance_term(x: Tensor) -> Tensor:
    r"""Per position p, ``Σ_{i≠j} K_ij² / d`` with ``K = X_pᵀX_p/(N-1)`` of centered x (N, P, d).

    The value comes from the N×N Gram matrices when N < d (``‖K‖² = ‖X_pX_pᵀ‖²/(N-1)²``) and the
    gradient is applied in closed form, ``4/(d(N-1)) · X_p K_off`` (with
    ``X_p K = (X_pX_pᵀ)X_p/(N-1)`` on the Gram side), so no product is differentiated.
    """
    n, _, d = x.shape
    xd = x.detach().transpose(0, 1)  # (P, N, d)
    var = xd.square().sum(dim=1) / (n - 1)  # (P, d), the diagonal of K
    if n < d:
        gram = xd @ xd.mT
        # rank(K) <= N keeps this difference well conditioned; a sum of squares stays >= 0
        off = (gram.square().sum(dim=(1, 2)) / (n - 1) ** 2 - var.square().sum(dim=1)).clamp_min(0)
        x_k_off = gram @ xd / (n - 1) - xd * var[:, None, :]
    else:
        k = xd.mT @ xd / (n - 1)
        k.diagonal(dim1=-2, dim2=-1).zero_()
        off = k.square().sum(dim=(1, 2))
        x_k_off = xd @ k
    value = off / d
    gradient = (x_k_off * (4 / (d * (n - 1)))).transpose(0, 1)
    # value plus a zero-valued carrier whose gradient with respect to x is the closed form
    carrier = (gradient * (x - x.detach())).sum(dim=(0, 2))
    return value + carrier


def _vicreg_positions(
    z_a: Tensor, z_b: Tensor, mu_param: float, nu_param: float, eps: float
) -> Tuple[Tensor, Tensor]:
    """Invariance and regularization per position of (N, P, d) views: ``(mse_p, reg_p)`` with
    ``reg_p = μ·½(var_a + var_b) + ν·(cov_a + cov_b)`` at position p (each (P,))."""
    acc = _accumulation_dtype(z_a, z_b)
    za, zb = z_a.to(acc), z_b.to(acc)
    invariance = (za - zb).square().mean(dim=(0, 2))
    reg = za.new_zeros(za.shape[1])
    for z in (za, zb):
        x = z - z.mean(dim=0)
        reg = reg + 0.5 * mu_param * _variance_hinge(x, eps) + nu_param * _covariance_term(x)
    return invariance, reg


# --------------------------------------------------------------------------------------------
# Nearest-neighbour matching (as lightly.models.utils.nearest_neighbors)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def _match(distances: Tensor, num_matches: Optional[int]) -> Tuple[Tensor, Tensor]:
    """Indices (B, M) of the matched inputs and of their nearest candidates: each input's nearest
    candidate, then the M inputs with the smallest such distance, in order of increasing
    distance. ``topk`` as lightly, so ties (regular grids) resolve the same way."""
    if num_matches is None or num_matches == -1 or num_matches > distances.shape[1]:
        num_matches = distances.shape[1]
    nearest_distance, nearest = distances.topk(k=1, dim=2, largest=False)
    order = nearest_distance.squeeze(-1).topk(k=num_matches, dim=1, largest=False).indices
    return order, torch.gather(nearest.squeeze(-1), 1, order)


def _select(x: Tensor, index: Tensor) -> Tensor:
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))


def _distances(x: Tensor, y: Tensor) -> Tensor:
    # lightly's torch.cdist on the inputs' dtype (half precision is measured in float32 here)
    if x.dtype in (torch.float16, torch.bfloat16):
        x, y = x.float(), y.float()
    return torch.cdist(x.detach(), y.detach())


# --------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------


def _check_views(
    global_view_features, global_view_grids, local_view_features, local_view_grids
) -> Tuple[list, list]:
    """lightly's argument checks (same messages), then shapes; returns all views and grids."""
    if len(global_view_features) != len(global_view_grids):
        raise ValueError(
            f"global_view_features and global_view_grids must have same length "
            f"but found {len(global_view_features)} and {len(global_view_grids)}."
        )
    if local_view_features is not None and local_view_grids is not None:
        if len(local_view_features) != len(local_view_grids):
            raise ValueError(
                f"local_view_features and local_view_grids must have same length "
                f"but found {len(local_view_features)} and {len(local_view_grids)}."
            )
    elif local_view_features is not None or local_view_grids is not None:
        raise ValueError(
            f"local_view_features and local_view_grids must either both be set or "
            f"None but found {type(local_view_features)} and {type(local_view_grids)}."
        )
    features = list(global_view_features) + list(local_view_features or [])
    grids = list(global_view_grids) + list(local_view_grids or [])
    if not global_view_features or len(features) < 2:
        raise ValueError(
            "VICRegL needs at least one global view and one other view, got "
            f"{len(global_view_features)} global and {len(features) - len(global_view_features)} local views"
        )
    first_global = features[0][0]
    for i, (pair, grid) in enumerate(zip(features, grids)):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise TypeError(f"view {i}: features must be a (global_features, local_features) pair")
        g, local = pair
        for name, t, ndim in (("global features", g, 2), ("local features", local, 4), ("grid", grid, 4)):
            if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() != ndim:
                raise ValueError(f"view {i}: {name} must be a floating tensor with {ndim} dimensions")
        if g.shape != first_global.shape:
            raise ValueError(f"view {i}: global features of shape {tuple(g.shape)}, view 0 has {tuple(first_global.shape)}")
        if local.shape[0] != g.shape[0] or grid.shape[:3] != local.shape[:3] or grid.shape[3] != 2:
            raise ValueError(
                f"view {i}: local features (B, H, W, D) {tuple(local.shape)} and grid (B, H, W, 2) "
                f"{tuple(grid.shape)} do not match the batch of {g.shape[0]}"
            )
        if local.shape[-1] != features[0][1].shape[-1]:
            raise ValueError(f"view {i}: local features have {local.shape[-1]} channels, view 0 has {features[0][1].shape[-1]}")
    if first_global.shape[0] < 2:
        raise BatchShapeError(f"VICRegL needs a batch of at least 2 samples, got {first_global.shape[0]}")
    return features, grids


def _pairs(features: list, n_global: int) -> Tuple[List[Tuple[int, int]], List[Tuple[int, int]]]:
    """lightly's pairs: (global view a, any other view b); a tensor passed for two views is not
    paired with itself (lightly compares the global, resp. local, features by identity)."""
    global_pairs = [(a, b) for a in range(n_global) for b in range(len(features)) if features[b][0] is not features[a][0]]
    local_pairs = [(a, b) for a in range(n_global) for b in range(len(features))
                   if b >= n_global or features[b][1] is not features[a][1]]  # fmt: skip
    return global_pairs, local_pairs


def _global_term(features, global_pairs, lambda_param, mu_param, nu_param, eps, gather_distributed, backend):
    """λ·mean pair MSE + μ·mean variance + ν·mean covariance; the variance and covariance of two
    views per :func:`vicreg_loss` call (``μ·½(var_a+var_b)`` with μ' = 2μ/V, ``ν'(cov_a+cov_b)``
    with ν' = ν/V; an odd view out is paired with itself at half those weights)."""
    embeddings = [f[0] for f in features]
    n_views = len(embeddings)
    acc = _accumulation_dtype(*embeddings)
    invariance = torch.stack([(embeddings[a].to(acc) - embeddings[b].to(acc)).square().mean() for a, b in global_pairs]).mean()
    if gather_distributed:
        invariance = distributed.global_mean(invariance)  # lightly: per rank; here the global batch's
    total = lambda_param * invariance
    for i in range(0, n_views, 2):
        if i + 1 < n_views:
            a, b, mu, nu = embeddings[i], embeddings[i + 1], 2 * mu_param / n_views, nu_param / n_views
        else:
            a, b, mu, nu = embeddings[i], embeddings[i], mu_param / n_views, nu_param / (2 * n_views)
        total = total + vicreg_loss(a, b, 0.0, mu, nu, eps, gather_distributed=gather_distributed, backend=backend)
    return total


def _local_term(features, grids, local_pairs, num_matches, lambda_param, mu_param, nu_param, eps, gather_distributed):
    """Every matching (feature space and grid space, both directions) of every pair, stacked by
    number of matched positions M and run as one VICReg over positions (ν/2 as lightly)."""
    stacks: Dict[int, Tuple[List[Tensor], List[Tensor]]] = {}

    def add(inputs: Tensor, candidates: Tensor, distances: Tensor, m: int) -> None:
        order, nearest = _match(distances, m)
        group = stacks.setdefault(order.shape[1], ([], []))
        group[0].append(_select(inputs, order))
        group[1].append(_select(candidates, nearest))

    for a, b in local_pairs:
        za, zb = features[a][1].flatten(1, 2), features[b][1].flatten(1, 2)
        ga, gb = grids[a].flatten(1, 2), grids[b].flatten(1, 2)
        for d_ab, d_ba in ((_distances(za, zb), _distances(zb, za)), (_distances(ga, gb), _distances(gb, ga))):
            add(za, zb, d_ab, num_matches[0])
            add(zb, za, d_ba, num_matches[1])
    invariance, regularization = 0.0, 0.0
    for m, (inputs, candidates) in stacks.items():
        z_a, z_b = torch.cat(inputs, dim=1), torch.cat(candidates, dim=1)  # (B, calls·M, d)
        inv_local = z_a.new_zeros(())
        if lambda_param != 0:
            inv_local = (z_a.to(_accumulation_dtype(z_a, z_b)) - z_b).square().mean(dim=(0, 2)).sum() / m
        if gather_distributed:
            z_a, z_b = distributed.gather(z_a), distributed.gather(z_b)
        _, reg = _vicreg_positions(z_a, z_b, mu_param, 0.5 * nu_param, eps)
        invariance = invariance + inv_local
        regularization = regularization + reg.sum() / m
    if gather_distributed:
        invariance = distributed.global_mean(invariance)
    # each matching weighs ½ (two directions), averaged over the pairs
    return 0.5 * (lambda_param * invariance + regularization) / len(local_pairs)


@outside_autocast
def vicregl_loss(
    global_view_features: Sequence[Tuple[Tensor, Tensor]],
    global_view_grids: Sequence[Tensor],
    local_view_features: Optional[Sequence[Tuple[Tensor, Tensor]]] = None,
    local_view_grids: Optional[Sequence[Tensor]] = None,
    lambda_param: float = 25.0,
    mu_param: float = 25.0,
    nu_param: float = 1.0,
    alpha: float = 0.75,
    eps: float = 1e-4,
    num_matches: Tuple[int, int] = (20, 4),
    *,
    gather_distributed: bool = False,
    backend: str = "auto",
) -> Tensor:
    r"""VICRegL loss (see :func:`fastssl.reference.vicregl_loss`).

    Args:
        global_view_features: per global view, ``(global (B, D), local (B, H, W, C))``.
        global_view_grids: per global view, (B, H, W, 2) positions of the local features.
        local_view_features, local_view_grids: the same for the local views (both or neither;
            H, W may differ from the global views').
        lambda_param, mu_param, nu_param: weights of invariance, variance and covariance.
        alpha: weight of the global term; the local term gets ``1 - alpha``.
        eps: added to the variance under the square root.
        num_matches: positions kept by the first and the second nearest-neighbour search.
        gather_distributed: variance and covariance over the global batch (see :mod:`fastssl.distributed`).
        backend: ``"auto" | "triton" | "torch" | "reference"``; the global term's VICReg uses
            the decorrelation family's backend (Triton on CUDA under ``"auto"``).
    Returns:
        0-d float32 loss (lightly returns shape (1,)).

    Example::

        >>> views = [(torch.randn(4, 32), torch.randn(4, 7, 7, 8)) for _ in range(2)]
        >>> grids = [torch.randn(4, 7, 7, 2) for _ in range(2)]
        >>> loss = vicregl_loss(views, grids)
    """
    features, grids = _check_views(global_view_features, global_view_grids, local_view_features, local_view_grids)
    lambda_param = check_finite("lambda_param", lambda_param)
    mu_param = check_finite("mu_param", mu_param)
    nu_param = check_finite("nu_param", nu_param)
    alpha = check_finite("alpha", alpha)
    eps = check_positive("eps", eps, allow_zero=True)
    num_matches = _check_num_matches(num_matches)
    check_distributed_available("gather_distributed", gather_distributed)
    impl = resolve_backend(backend, features[0][0])
    n_global = len(global_view_features)
    if impl == "reference":
        if gather_distributed:
            # Matching is per image, so the loss on the gathered batch is the global loss.
            features = [(distributed.gather(g), distributed.gather(loc)) for g, loc in features]
            grids = [distributed.gather_no_grad(g) for g in grids]
        acc = _accumulation_dtype(*[f[0] for f in features])
        features = [(g.to(acc), loc.to(acc)) for g, loc in features]
        return reference.vicregl_loss(
            features[:n_global], [g.to(acc) for g in grids[:n_global]],
            features[n_global:] or None, [g.to(acc) for g in grids[n_global:]] or None,
            lambda_param, mu_param, nu_param, alpha, eps, num_matches,
        ).float()  # fmt: skip
    global_pairs, local_pairs = _pairs(features, n_global)  # by identity, before any cast
    # Half-precision views in float32 once: every gradient then accumulates in float32 and is
    # rounded to the input dtype a single time (a no-op for float32 inputs).
    acc = _accumulation_dtype(*[f[0] for f in features])
    features = [(g.to(acc), loc.to(acc)) for g, loc in features]
    global_loss = _global_term(features, global_pairs, lambda_param, mu_param, nu_param, eps, gather_distributed, impl)
    local_loss = _local_term(
        features, grids, local_pairs, num_matches, lambda_param, mu_param, nu_param, eps, gather_distributed
    )
    return (alpha * global_loss + (1 - alpha) * local_loss).float()


def _check_num_matches(num_matches) -> Tuple[int, int]:
    if not isinstance(num_matches, (tuple, list)) or len(num_matches) != 2:
        raise ValueError(f"num_matches must be a pair of ints, got {num_matches!r}")
    out = []
    for i, m in enumerate(num_matches):
        if m is None:
            out.append(-1)
            continue
        m = check_int(f"num_matches[{i}]", m, minimum=-1)
        if m == 0:
            raise ValueError(f"num_matches[{i}] must be positive (or -1 for all positions), got 0")
        out.append(m)
    return out[0], out[1]


class VICRegLLoss(nn.Module):
    """Drop-in for ``lightly.loss.VICRegLLoss`` (Bardes, Ponce & LeCun 2022, "VICRegL:
    Self-Supervised Learning of Local Visual Features").

    ``alpha * global + (1 - alpha) * local`` (see :mod:`fastssl.vicregl`). Differences from
    lightly: a 0-d float32 loss (lightly: shape (1,)); a single view (nothing to compare, NaN in
    lightly) is a ValueError; under ``gather_distributed`` the invariance terms are reported for
    the global batch too, so every rank returns the same loss.

    Args:
        lambda_param, mu_param, nu_param: weights of invariance, variance and covariance.
        alpha: weight of the global term.
        gather_distributed: variance and covariance over the global batch.
        eps: added to the variance under the square root.
        num_matches: positions kept by the two nearest-neighbour searches.
        backend: ``"auto" | "triton" | "torch" | "reference"`` (env ``FASTSSL_BACKEND``).

    Forward ``(global_view_features, global_view_grids, local_view_features=None,
    local_view_grids=None)``; returns a 0-d float32 loss.

    Example::

        >>> criterion = VICRegLLoss()
        >>> views = [(torch.randn(4, 32), torch.randn(4, 7, 7, 8)) for _ in range(2)]
        >>> loss = criterion(views, [torch.randn(4, 7, 7, 2) for _ in range(2)])
    """

    def __init__(
        self,
        lambda_param: float = 25.0,
        mu_param: float = 25.0,
        nu_param: float = 1.0,
        alpha: float = 0.75,
        gather_distributed: bool = False,
        eps: float = 0.0001,
        num_matches: Tuple[int, int] = (20, 4),
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_distributed_available("gather_distributed", gather_distributed)
        self.alpha = check_finite("alpha", alpha)
        self.num_matches = num_matches
        _check_num_matches(num_matches)
        self.lambda_param = check_finite("lambda_param", lambda_param)
        self.mu_param = check_finite("mu_param", mu_param)
        self.nu_param = check_finite("nu_param", nu_param)
        self.eps = check_positive("eps", eps, allow_zero=True)
        self.gather_distributed = gather_distributed
        self.backend = check_backend_name(backend)

    def forward(
        self,
        global_view_features: Sequence[Tuple[Tensor, Tensor]],
        global_view_grids: Sequence[Tensor],
        local_view_features: Optional[Sequence[Tuple[Tensor, Tensor]]] = None,
        local_view_grids: Optional[Sequence[Tensor]] = None,
    ) -> Tensor:
        """VICRegL: alpha x VICReg of the global features + (1 - alpha) x VICReg of matched local features.

        Args:
            global_view_features: sequence of (global (B, Dg), local (B, H, W, Dl)) pairs from the
                global crops.
            global_view_grids: sequence of (B, H, W, 2) grids of the global crops.
            local_view_features: optional pairs of the local crops, as above.
            local_view_grids: optional grids of the local crops.

        Returns:
            0-d float32 loss.
        """
        return vicregl_loss(
            global_view_features,
            global_view_grids,
            local_view_features,
            local_view_grids,
            self.lambda_param,
            self.mu_param,
            self.nu_param,
            self.alpha,
            self.eps,
            self.num_matches,
            gather_distributed=self.gather_distributed,
            backend=self.backend,
        )
