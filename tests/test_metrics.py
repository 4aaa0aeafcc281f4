"""Collapse metrics against direct float64 formulas on the d×d covariance, and the seeds' exercises."""

import math

import pytest
import torch
import torch.nn.functional as F

import fastssl.metrics as M
from fastssl import reference


def _sigma(z: torch.Tensor) -> torch.Tensor:
    """Σ = ZᵀZ/N − z̄z̄ᵀ written as in seed 001, in float64."""
    z = z.double()
    zbar = z.mean(dim=0)
    return z.T @ z / z.shape[0] - torch.outer(zbar, zbar)


def _eigs(z):
    return torch.linalg.eigvalsh(_sigma(z)).clamp_min(0).flip(0)


SHAPES = [(2, 1), (3, 3), (17, 5), (5, 17), (64, 129)]


@pytest.mark.parametrize("n,d", SHAPES)
def test_spectral_metrics_match_the_dxd_formulas(n, d):
    z = torch.randn(n, d) * torch.linspace(0.1, 3, d)
    lam = _eigs(z)
    assert torch.allclose(M.covariance_eigenvalues(z).double(), lam, atol=1e-10 * lam.max())
    expected_srank = lam.sum() ** 2 / (lam**2).sum()
    assert M.stable_rank(z).item() == pytest.approx(expected_srank.item(), rel=1e-5)
    p = lam / lam.sum()
    p = p[p > 1e-15]
    assert M.entropy_rank(z).item() == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-5)
    curve = M.explained_variance(z)
    assert curve.shape == (d,)
    assert torch.allclose(curve.double(), torch.cumsum(lam, 0) / lam.sum(), atol=1e-6)
    assert curve[-1].item() == pytest.approx(1.0, abs=1e-6)


def test_eigenvalue_log_ratio_full_rank_and_singular():
    z = torch.randn(200, 4) * torch.tensor([4.0, 2.0, 1.0, 0.5])
    lam = _eigs(z)
    assert M.eigenvalue_log_ratio(z).item() == pytest.approx(math.log(lam[0] / lam[-1]), rel=1e-5)
    # Singular beyond the structure: a rank-2 batch of 50 rows in 4 dimensions.
    assert M.eigenvalue_log_ratio(torch.randn(50, 2) @ torch.randn(2, 4)).item() == math.inf


def test_eigenvalue_log_ratio_when_n_is_at_most_d_uses_the_nonzero_eigenvalues():
    # 5 centered rows span at most 4 directions of R^10: the ratio is over those 4.
    z = torch.randn(5, 10, dtype=torch.float64)
    zc = z - z.mean(0)
    lam = torch.linalg.eigvalsh(zc @ zc.T / 5).flip(0)
    assert M.eigenvalue_log_ratio(z).item() == pytest.approx(math.log(lam[0] / lam[3]), rel=1e-6)
    assert math.isnan(M.eigenvalue_log_ratio(torch.randn(1, 10)).item())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_spectral_metrics_give_nan_for_non_finite_embeddings(bad):
    z = torch.randn(16, 8)
    z[3, 2] = bad
    for metric in (M.stable_rank, M.entropy_rank, M.eigenvalue_log_ratio):
        assert math.isnan(metric(z).item()), metric.__name__
    assert torch.isnan(M.covariance_eigenvalues(z)).all()
    assert torch.isnan(M.explained_variance(z)).all()


def test_stable_rank_is_scale_invariant_and_flags_a_dominated_spectrum():
    # srank(αΣ) = srank(Σ); one dominant eigenvalue → srank → 1.
    z = torch.randn(256, 32)
    assert M.stable_rank(7.5 * z).item() == pytest.approx(M.stable_rank(z).item(), rel=1e-6)
    basis = torch.linalg.qr(torch.randn(32, 32))[0]
    previous = 32.0
    for eps in [1.0, 0.1, 0.01, 0.001]:
        scales = torch.full((32,), eps)
        scales[0] = 1.0
        # rows whose covariance is diag(1, eps², ..., eps²) rotated by `basis`
        w = torch.randn(4096, 32)
        w = (w - w.mean(0)) / w.std(0, unbiased=False)
        w = torch.linalg.qr(w)[0] * math.sqrt(4096)  # exactly white columns
        zz = (w * scales) @ basis.T
        srank = M.stable_rank(zz).item()
        lam1, rest = 1.0, 31 * eps**4
        assert srank == pytest.approx((1 + 31 * eps**2) ** 2 / (lam1 + rest), rel=1e-3)
        assert srank <= previous + 1e-6
        previous = srank
    assert previous < 1.001


def test_full_collapse():
    row = torch.randn(1, 16)
    z = row.repeat(32, 1)
    assert M.stable_rank(z).item() == 0.0
    assert M.entropy_rank(z).item() == 0.0
    assert M.center_vector_norm(z).item() == pytest.approx(1.0, abs=1e-6)
    assert M.std_of_l2_normalized(z).item() == pytest.approx(0.0, abs=1e-6)
    assert M.uniformity(z).item() == pytest.approx(0.0, abs=1e-5)  # seed 001: 0 at collapse


def test_rank_one_collapse_gives_rank_one():
    z = torch.randn(64, 1) * torch.randn(1, 24) + torch.randn(1, 24)
    assert M.stable_rank(z).item() == pytest.approx(1.0, rel=1e-6)
    assert M.entropy_rank(z).item() == pytest.approx(1.0, rel=1e-4)


def test_center_vector_alignment_uniformity_std_formulas():
    z = torch.randn(50, 7)
    zn = F.normalize(z.double(), dim=1)
    assert M.center_vector_norm(z).item() == pytest.approx(zn.mean(0).norm().item(), rel=1e-5)
    assert M.std_of_l2_normalized(z).item() == pytest.approx(zn.std(0).mean().item(), rel=1e-5)
    w = z + 0.3 * torch.randn_like(z)
    wn = F.normalize(w.double(), dim=1)
    assert M.alignment(z, w).item() == pytest.approx(((zn - wn).norm(dim=1) ** 2).mean().item(), rel=1e-5)
    assert M.alignment(z, w, alpha=1).item() == pytest.approx((zn - wn).norm(dim=1).mean().item(), rel=1e-5)
    # uniformity over distinct pairs, as Wang & Isola's pdist formulation
    pd = torch.pdist(zn).pow(2)
    expected = torch.log(torch.exp(-2 * pd).mean()).item()
    assert M.uniformity(z).item() == pytest.approx(expected, rel=1e-5)
    assert M.uniformity(z, t=0.5).item() == pytest.approx(torch.log(torch.exp(-0.5 * pd).mean()).item(), rel=1e-5)
    assert M.uniformity(z).item() == pytest.approx(reference.uniformity(z.double()).item(), rel=1e-5)


def test_uniformity_single_sample_is_nan_and_gradients_flow():
    assert math.isnan(M.uniformity(torch.randn(1, 4)).item())
    z = torch.randn(9, 5, requires_grad=True)
    M.uniformity(z).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_mean_offdiagonal_correlation():
    z = torch.randn(40, 9)
    z[:, 3] = 2 * z[:, 1] + 0.1 * torch.randn(40)
    corr = torch.corrcoef(z.double().T)
    off = ~torch.eye(9, dtype=torch.bool)
    expected = corr[off].abs().mean().item()
    assert M.mean_offdiagonal_correlation(z).item() == pytest.approx(expected, rel=1e-5)
    # blocks smaller than d give the same number
    assert M.mean_offdiagonal_correlation(z, block=2).item() == pytest.approx(expected, rel=1e-5)
    assert M.mean_offdiagonal_correlation(torch.randn(5, 1)).item() == 0.0


def test_spectral_metrics_avoid_dxd_when_n_small():
    # N = 8, d = 8192: the spectrum comes from the 8×8 Gram matrix.
    z = torch.randn(8, 8192)
    lam = torch.linalg.eigvalsh((lambda c: c @ c.T / 8)(z.double() - z.double().mean(0))).flip(0)
    assert M.stable_rank(z).item() == pytest.approx((lam.sum() ** 2 / (lam**2).sum()).item(), rel=1e-6)
    assert M.covariance_eigenvalues(z).shape == (8192,)


def test_metrics_accept_half_precision_and_reject_bad_input():
    z = torch.randn(32, 8)
    for dtype in (torch.float16, torch.bfloat16):
        assert M.stable_rank(z.to(dtype)).item() == pytest.approx(M.stable_rank(z).item(), rel=2e-2)
        assert M.center_vector_norm(z.to(dtype)).dtype == torch.float32
    with pytest.raises(ValueError, match="z must have shape"):
        M.stable_rank(torch.randn(4))
    with pytest.raises(TypeError, match="floating-point"):
        M.stable_rank(torch.ones(4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="empty batch"):
        M.entropy_rank(torch.randn(0, 4))
    with pytest.raises(ValueError, match="same shape"):
        M.alignment(torch.randn(4, 3), torch.randn(5, 3))
