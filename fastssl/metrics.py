r"""Collapse diagnostics, cheap enough to log every step.

The spectral measures follow the dimensional-collapse literature (Jing et al. 2022; Garrido
et al. 2023, RankMe), the center vector Jha et al. 2024, alignment and uniformity Wang & Isola
2020, the per-feature spread of normalized outputs Chen & He 2021 (SimSiam, Fig. 2).

Every function takes an (N, d) tensor of embeddings (rows are samples) and returns a 0-d
float32 tensor, except :func:`explained_variance` (a 1-d curve of length d).

Spectral metrics use the biased covariance of the rows as given:

.. math:: \Sigma = \tfrac1N Z^\top Z - \bar z\bar z^\top \in \mathbb{R}^{d\times d}.

Its nonzero eigenvalues are those of the N×N matrix :math:`\tfrac1N Z_c Z_c^\top`, so the
spectrum is computed on the smaller side (never a d×d matrix when N < d), in float64. The
spectral metrics are diagnostics and carry no gradient. :func:`center_vector_norm`,
:func:`alignment`, :func:`uniformity` and :func:`std_of_l2_normalized` L2-normalize the rows
first and stay differentiable (Wang & Isola use alignment and uniformity as losses).

Non-finite embeddings give NaN (never a number that reads as collapse or health).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastssl._checks import check_pair, check_positive, check_tensor

# Beyond this many rows/columns on the small side, eigvalsh in float64 gets slow (O(m³));
# float32 on the centered Gram matrix is still accurate to ~1e-6 relative for the metrics.
_FLOAT64_SPECTRUM_MAX = 4096


def _centered(z: Tensor) -> Tensor:
    dtype = torch.float64 if min(z.shape) <= _FLOAT64_SPECTRUM_MAX else torch.float32
    z = z.detach().to(dtype)
    return z - z.mean(dim=0, keepdim=True)


def _small_side_covariance(z: Tensor) -> Tensor:
    """The smaller of Z_cᵀZ_c/N (d×d) and Z_cZ_cᵀ/N (N×N): same nonzero spectrum as Σ."""
    zc = _centered(z)
    n, d = zc.shape
    return (zc @ zc.T if n < d else zc.T @ zc) / n


def covariance_eigenvalues(z: Tensor) -> Tensor:
    """All d eigenvalues of Σ in descending order (the ``d - min(N, d)`` structural zeros included),
    clamped at 0 (tiny negative values are round-off). float64 for moderate sizes. All NaN when
    ``z`` holds a NaN or an infinity."""
    check_tensor("z", z)
    d = z.shape[1]
    cov = _small_side_covariance(z)
    if not bool(torch.isfinite(cov).all()):  # eigvalsh raises on non-finite input
        return torch.full((d,), float("nan"), dtype=cov.dtype, device=z.device)
    evals = torch.linalg.eigvalsh(cov).clamp_min(0).flip(0)
    if evals.numel() < d:
        evals = torch.cat([evals, evals.new_zeros(d - evals.numel())])
    return evals


def stable_rank(z: Tensor) -> Tensor:
    r"""Stable rank :math:`(\mathrm{tr}\,\Sigma)^2/\|\Sigma\|_F^2 \in [1, d]`: scale-invariant, → 1 when one
    eigenvalue dominates. Needs no eigendecomposition. A fully collapsed batch (Σ = 0) gives 0,
    non-finite embeddings NaN."""
    check_tensor("z", z)
    cov = _small_side_covariance(z)
    trace = torch.diagonal(cov).sum()
    frob_sq = (cov * cov).sum()
    # frob_sq is NaN for non-finite input: the first branch then gives NaN too.
    rank = torch.where(frob_sq > 0, trace * trace / frob_sq.clamp_min(1e-300), torch.zeros_like(trace))
    rank = torch.where(torch.isfinite(frob_sq), rank, torch.full_like(rank, float("nan")))
    return rank.float()


def entropy_rank(z: Tensor) -> Tensor:
    r"""Entropy (effective) rank :math:`\exp(-\sum_i \sigma_i\log\sigma_i)`, :math:`\sigma_i = \lambda_i/\sum_j\lambda_j`.
    Equals d iff all eigenvalues are equal, 1 iff one is nonzero; 0 for Σ = 0, NaN for
    non-finite embeddings."""
    evals = covariance_eigenvalues(z)
    total = evals.sum()
    if not bool(torch.isfinite(total)):
        return torch.full((), float("nan"), dtype=torch.float32, device=z.device)
    if total <= 0:
        return torch.zeros((), dtype=torch.float32, device=z.device)
    p = evals / total
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum()
    return torch.exp(entropy).float()


def eigenvalue_log_ratio(z: Tensor) -> Tensor:
    r""":math:`\log(\lambda_1/\lambda_r)` over the eigenvalues a batch of N rows can make nonzero:
    :math:`r = \min(d, N - 1)` (centering removes one direction, so for N ≤ d the ``d - N + 1``
    smallest eigenvalues are zero by construction and are left out). Large under dimensional
    collapse; ``inf`` when Σ has fewer than r nonzero eigenvalues, NaN for Σ = 0, for N = 1 and
    for non-finite embeddings."""
    evals = covariance_eigenvalues(z)
    n, d = z.shape
    structural_rank = min(d, n - 1)
    if structural_rank < 1:
        return torch.full((), float("nan"), dtype=torch.float32, device=z.device)
    return (torch.log(evals[0]) - torch.log(evals[structural_rank - 1])).float()


def explained_variance(z: Tensor) -> Tensor:
    r"""Cumulative explained variance :math:`\sum_{i\le k}\lambda_i/\sum_i\lambda_i` for k = 1..d (1-d,
    length d). Saturating at small k signals dimensional collapse. NaN for Σ = 0."""
    evals = covariance_eigenvalues(z)
    return (torch.cumsum(evals, 0) / evals.sum()).float()


def center_vector_norm(z: Tensor) -> Tensor:
    r"""Norm of the center vector :math:`\|\mathrm{mean}_b\,\hat z_b\|` (Jha et al.): 1 at full collapse,
    about :math:`1/\sqrt N` for directions spread uniformly."""
    check_tensor("z", z)
    acc = torch.promote_types(z.dtype, torch.float32)
    return torch.linalg.vector_norm(F.normalize(z.to(acc), dim=1).mean(dim=0)).float()


def alignment(z_a: Tensor, z_b: Tensor, alpha: float = 2.0) -> Tensor:
    r"""Alignment (Wang & Isola): :math:`\mathbb{E}_b\|\hat z_a^{(b)} - \hat z_b^{(b)}\|^\alpha`, 0 for identical views."""
    check_pair("z_a", z_a, "z_b", z_b)
    alpha = check_positive("alpha", alpha)
    acc = torch.promote_types(z_a.dtype, torch.float32)
    diff = F.normalize(z_a.to(acc), dim=1) - F.normalize(z_b.to(acc), dim=1)
    return diff.norm(dim=1).pow(alpha).mean().float()


def uniformity(z: Tensor, t: float = 2.0) -> Tensor:
    r"""Uniformity (Wang & Isola): :math:`\log\,\mathrm{mean}_{i\ne j} e^{-t\|\hat z_i - \hat z_j\|^2}`.

    0 at full collapse, more negative when spread on the sphere. Computed through the tiled
    NT-Xent machinery, so memory stays O(N·d) at large N. NaN for a single sample.
    """
    check_tensor("z", z)
    t = check_positive("t", t)
    from fastssl.ntxent import uniformity_loss

    return uniformity_loss(z, t)


def mean_offdiagonal_correlation(z: Tensor, block: int = 1024) -> Tensor:
    r"""Mean absolute Pearson correlation between distinct features, :math:`\frac{1}{d(d-1)}\sum_{i\ne j}|r_{ij}|`.

    Redundancy between dimensions (what Barlow Twins drives to 0). Computed over column blocks
    of at most ``block`` features, so memory is O(d·block), not O(d²). Constant features have
    no defined correlation and count as uncorrelated. 0 for d = 1.
    """
    check_tensor("z", z)
    n, d = z.shape
    if d == 1:
        return torch.zeros((), dtype=torch.float32, device=z.device)
    zc = _centered(z)
    std = zc.norm(dim=0)
    zs = zc / torch.where(std > 0, std, torch.ones_like(std))
    total = zs.new_zeros(())
    for start in range(0, d, block):
        corr = zs[:, start : start + block].T @ zs  # (block, d)
        total = total + corr.abs().sum()
        # remove the diagonal entries (|r_ii| = 1 for non-constant features)
        total = total - torch.diagonal(corr[:, start : start + block]).abs().sum()
    return (total / (d * (d - 1))).float()


def std_of_l2_normalized(z: Tensor) -> Tensor:
    r"""SimSiam's collapse monitor: the per-feature standard deviation of :math:`\hat z` over the batch,
    averaged over features. 0 at full collapse, about :math:`1/\sqrt d` for well-spread outputs."""
    check_tensor("z", z, min_rows=2)
    acc = torch.promote_types(z.dtype, torch.float32)
    return F.normalize(z.to(acc), dim=1).std(dim=0).mean().float()


__all__ = [
    "alignment",
    "center_vector_norm",
    "covariance_eigenvalues",
    "eigenvalue_log_ratio",
    "entropy_rank",
    "explained_variance",
    "mean_offdiagonal_correlation",
    "stable_rank",
    "std_of_l2_normalized",
    "uniformity",
]
