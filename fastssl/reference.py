r"""Textbook implementations of every loss: the oracle that every test compares against.

Each function is written to be read beside the source documents (``shared/seeds``) and the
original papers' code, never for speed: it materializes every matrix the formula names. Inputs
are used in the dtype they come in (so that a test can measure PyTorch's own half-precision
error by running the reference in half precision and in float64). No argument checking happens
here: the public functions in :mod:`fastssl.functional` validate before they dispatch.

Notation: ``N`` samples per view, ``d`` features, ``τ`` a temperature, ``ẑ = z / ‖z‖``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# --------------------------------------------------------------------------------------------
# Norms and batch statistics that neither overflow nor underflow
# --------------------------------------------------------------------------------------------
#
# Cosines and batch-standardized columns do not depend on the scale of their vectors, but the
# textbook evaluation squares the entries: float32 values beyond ~1.8e19 square to inf (and a
# sum of N squares sooner), values below ~1e-19 to subnormals or zero. As LAPACK's nrm2 does,
# each vector (a row for a norm, a column for batch statistics) is first multiplied by 2^-k,
# with 2^k at least its largest magnitude; a power of two scales exactly, so the result is the
# textbook value wherever that one was representable. The scale is a constant for autograd
# (norm(x) = 2^k·norm(2^-k x) holds for any k), so gradients are the textbook gradients too.


def _inverse_power_of_two(peak: Tensor, at_most_one: bool = False) -> Tensor:
    """``2^-k`` with ``2^k >= peak`` (up to one rounding of log2), in ``peak``'s dtype, within
    the dtype's range (peak 0 gives the largest power; NaN gives NaN and so propagates).
    ``at_most_one``: never scale up (``k >= 0``)."""
    largest = math.frexp(torch.finfo(peak.dtype).max)[1] - 1  # 2^largest is the top power of two
    exponent = -torch.ceil(torch.log2(peak.detach()))
    return torch.exp2(exponent.clamp(min=-largest - 1, max=0 if at_most_one else largest))


def _max_abs(x: Tensor, dim: int) -> Tensor:
    return torch.linalg.vector_norm(x.detach(), ord=float("inf"), dim=dim, keepdim=True)


def inverse_power_of_two_scale(x: Tensor, dim: int, at_most_one: bool = False) -> Tensor:
    """Per vector along ``dim`` (kept as a size-1 dimension): ``2^-k`` with ``2^k`` at least the
    vector's largest magnitude, a constant for autograd. ``at_most_one``: only scale down."""
    return _inverse_power_of_two(_max_abs(x, dim), at_most_one)


def vector_norm(x: Tensor, dim: int = -1, keepdim: bool = False) -> Tensor:
    r"""Euclidean norm along ``dim``, computed on ``2^-k x`` (no overflow of the squares)."""
    inverse_scale = _inverse_power_of_two(_max_abs(x, dim))
    norm = torch.linalg.vector_norm(x * inverse_scale, dim=dim, keepdim=True) / inverse_scale
    return norm if keepdim else norm.squeeze(dim)


def normalize(x: Tensor, dim: int = 1, eps: float = 1e-12) -> Tensor:
    r"""``F.normalize``: :math:`x / \max(\|x\|_2, \epsilon)` along ``dim``, on the scaled vector
    (:math:`y = 2^{-k}x`, :math:`y / \max(\|y\|, 2^{-k}\epsilon)`; the gradient passes where the
    norm is not clamped, as ``F.normalize``'s)."""
    inverse_scale = _inverse_power_of_two(_max_abs(x, dim))
    y = x * inverse_scale
    norm = torch.linalg.vector_norm(y, dim=dim, keepdim=True)
    floor = eps * inverse_scale
    return y / torch.where(norm >= floor, norm, floor)


# --------------------------------------------------------------------------------------------
# Contrastive: NT-Xent (SimCLR) and InfoNCE with a memory bank (MoCo)
# --------------------------------------------------------------------------------------------


def ntxent_loss(out0: Tensor, out1: Tensor, temperature: float = 0.5) -> Tensor:
    r"""NT-Xent (SimCLR), the normalized temperature-scaled cross-entropy.

    With :math:`Z = [\hat z^{(0)}; \hat z^{(1)}] \in \mathbb{R}^{2N\times d}` and
    :math:`S = ZZ^\top/\tau`, each of the 2N rows is a (2N-1)-way classification whose correct
    class is the other view of the same image:

    .. math:: \ell_k = -S_{k,p(k)} + \log\sum_{m\ne k} e^{S_{km}}, \qquad
              L = \frac{1}{2N}\sum_k \ell_k, \quad p(k) = k \pm N.

    Its gradient with respect to a logit is :math:`\partial\ell_k/\partial s_m = p_m/\tau` for
    a negative (softmax probability over the row), :math:`(p_{p(k)} - 1)/\tau` for the positive.

    Args:
        out0, out1: (N, d) projections of the two views.
    Returns:
        0-d loss.
    """
    n = out0.shape[0]
    z = normalize(torch.cat([out0, out1], dim=0), dim=1)
    logits = z @ z.T / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, positives)


def infonce_loss(query: Tensor, key: Tensor, negatives: Tensor, temperature: float = 0.5) -> Tensor:
    r"""InfoNCE with a bank of negatives (MoCo), as lightly's ``NTXentLoss(memory_bank_size>0)``.

    Queries and keys are L2-normalized; the bank rows are used as given (the module stores
    normalized keys). Each query is a (1+K)-way classification, the key being class 0:

    .. math:: \ell_i = -\hat q_i\cdot\hat k_i/\tau + \log\Big(e^{\hat q_i\cdot\hat k_i/\tau}
              + \sum_{j=1}^{K} e^{\hat q_i\cdot b_j/\tau}\Big).

    Args:
        query: (N, d); key: (N, d); negatives: (K, d) memory bank.
    """
    q = normalize(query, dim=1)
    k = normalize(key, dim=1)
    positive = (q * k).sum(dim=1, keepdim=True)
    negative = q @ negatives.to(q.dtype).T
    logits = torch.cat([positive, negative], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels)


# --------------------------------------------------------------------------------------------
# Predictive: SimSiam / BYOL
# --------------------------------------------------------------------------------------------


def negative_cosine_similarity(x0: Tensor, x1: Tensor, dim: int = 1, eps: float = 1e-8) -> Tensor:
    r"""SimSiam's :math:`-\cos(x_0, x_1)` averaged over the batch; the caller detaches the target.

    .. math:: \cos(a, b) = \frac{a\cdot b}{\max(\|a\|,\epsilon)\,\max(\|b\|,\epsilon)}

    ``F.cosine_similarity`` (lightly's formula) evaluated on scaled vectors (see
    :func:`normalize`), with its gradient: where a norm is clamped at ε it differentiates the
    norm as if unclamped (PyTorch clamps the norm's value only).
    """
    x0, x1 = torch.broadcast_tensors(x0, x1)

    def unit(x: Tensor) -> Tensor:
        inverse_scale = _inverse_power_of_two(_max_abs(x, dim))
        y = x * inverse_scale
        norm = torch.linalg.vector_norm(y, dim=dim, keepdim=True)
        clamped = norm + (torch.clamp_min(norm, eps * inverse_scale) - norm).detach()
        return y / clamped

    return -(unit(x0) * unit(x1)).sum(dim=dim).mean()


def byol_loss(prediction: Tensor, target: Tensor) -> Tensor:
    r"""BYOL's normalized MSE :math:`\|\hat p - \hat z\|^2 = 2 - 2\cos(p, z)`, batch mean."""
    p = normalize(prediction, dim=1)
    z = normalize(target, dim=1)
    return (2 - 2 * (p * z).sum(dim=1)).mean()


# --------------------------------------------------------------------------------------------
# Decorrelation: Barlow Twins and VICReg
# --------------------------------------------------------------------------------------------


def batch_standardize(z: Tensor, eps: float = 1e-5) -> Tensor:
    """Per-feature batch-norm without affine parameters: biased variance, ``eps`` inside the root.

    Columns whose largest magnitude exceeds 1 are first scaled by a power of two 2^-k below it
    (``(z − mean)/sqrt(var + eps)`` = ``(y − mean_y)/sqrt(var_y + eps·4^-k)`` for ``y = 2^-k z``),
    so that no square overflows; smaller columns are used as they are (their squares can only
    underflow where ``eps`` dominates the variance anyway)."""
    inverse_scale = _inverse_power_of_two(_max_abs(z, 0), at_most_one=True)
    y = z * inverse_scale
    mean = y.mean(dim=0, keepdim=True)
    var = y.var(dim=0, unbiased=False, keepdim=True)
    return (y - mean) / torch.sqrt(var + eps * inverse_scale * inverse_scale)


def barlow_twins_loss(z_a: Tensor, z_b: Tensor, lambda_param: float = 5e-3) -> Tensor:
    r"""Barlow Twins: drive the cross-correlation of the standardized views to the identity.

    .. math:: C = \frac{1}{N}\tilde Z_a^\top \tilde Z_b \in \mathbb{R}^{d\times d},\qquad
              L = \sum_i (1 - C_{ii})^2 + \lambda \sum_{i\ne j} C_{ij}^2

    with :math:`\tilde Z` each view batch-normalized per feature (biased variance, eps 1e-5).
    """
    n, d = z_a.shape
    c = batch_standardize(z_a).T @ batch_standardize(z_b) / n
    on_diag = torch.diagonal(c)
    off_diag_mask = ~torch.eye(d, dtype=torch.bool, device=c.device)
    return ((1 - on_diag) ** 2).sum() + lambda_param * (c[off_diag_mask] ** 2).sum()


def vicreg_invariance(z_a: Tensor, z_b: Tensor) -> Tensor:
    r"""Mean squared error over all N·d entries."""
    return F.mse_loss(z_a, z_b)


def vicreg_variance(z: Tensor, eps: float = 1e-4) -> Tensor:
    r"""Hinge on the per-feature standard deviation: :math:`\frac1d\sum_j \max(0, 1-\sqrt{\mathrm{Var}(z^j)+\epsilon})`,
    unbiased variance. Where the hinge is active its gradient is
    :math:`-(z_{bj}-\bar z_j)/(d\,(N-1)\,\sigma_j)`."""
    std = torch.sqrt(z.var(dim=0, unbiased=True) + eps)
    return F.relu(1 - std).mean()


def vicreg_covariance(z: Tensor) -> Tensor:
    r"""Off-diagonal squared sum of :math:`\mathrm{Cov} = Z_c^\top Z_c/(N-1)`, divided by d."""
    n, d = z.shape
    zc = z - z.mean(dim=0, keepdim=True)
    cov = zc.T @ zc / (n - 1)
    off_diag_mask = ~torch.eye(d, dtype=torch.bool, device=z.device)
    return (cov[off_diag_mask] ** 2).sum() / d


def vicreg_loss(
    z_a: Tensor,
    z_b: Tensor,
    lambda_param: float = 25.0,
    mu_param: float = 25.0,
    nu_param: float = 1.0,
    eps: float = 1e-4,
) -> Tensor:
    r"""VICReg: :math:`\lambda\,\mathrm{inv} + \mu\cdot\tfrac12(\mathrm{var}_a + \mathrm{var}_b)
    + \nu(\mathrm{cov}_a + \mathrm{cov}_b)`, as the original code (and lightly) weighs them."""
    inv = vicreg_invariance(z_a, z_b)
    var = 0.5 * (vicreg_variance(z_a, eps) + vicreg_variance(z_b, eps))
    cov = vicreg_covariance(z_a) + vicreg_covariance(z_b)
    return lambda_param * inv + mu_param * var + nu_param * cov


# --------------------------------------------------------------------------------------------
# Clustering: SwAV (Sinkhorn-Knopp equipartition + swapped prediction)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def sinkhorn(scores: Tensor, iterations: int = 3, epsilon: float = 0.05) -> Tensor:
    r"""Sinkhorn-Knopp soft codes, written as SwAV's code (and lightly's) writes it.

    :math:`Q = \exp(S/\epsilon)^\top \in \mathbb{R}^{K\times B}` normalized to sum 1; then
    ``iterations`` times: rows to sum 1/K, columns to sum 1/B; finally scaled so that each
    sample's code sums to 1. This exponentiates without a shift, so it overflows to inf/NaN when
    :math:`|S|/\epsilon` is large (about 88 in float32) -- the peers' bug, kept here on purpose:
    the optimized paths must not share it.

    Args:
        scores: (B, K) prototype scores.
    Returns:
        (B, K) codes, each row summing to 1.
    """
    q = torch.exp(scores / epsilon).T
    q = q / q.sum()
    k, b = q.shape
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).T


def swav_cross_entropy(scores: Tensor, codes: Tensor, temperature: float = 0.1) -> Tensor:
    r""":math:`-\frac1B\sum_b\sum_k q_{bk}\log\mathrm{softmax}(s_b/\tau)_k`."""
    return -(codes * F.log_softmax(scores / temperature, dim=1)).sum(dim=1).mean()


def swav_loss(
    high_resolution_outputs: Sequence[Tensor],
    low_resolution_outputs: Sequence[Tensor] = (),
    queue_outputs: Optional[Sequence[Tensor]] = None,
    temperature: float = 0.1,
    sinkhorn_iterations: int = 3,
    sinkhorn_epsilon: float = 0.05,
) -> Tensor:
    r"""SwAV's swapped prediction over multi-crop.

    For every high-resolution crop i, codes :math:`q_i` come from Sinkhorn over its scores
    (with the queue's scores appended, then dropped); every other crop v predicts them:

    .. math:: L = \frac{1}{H}\sum_{i<H}\frac{1}{V-1}\sum_{v\ne i}
              \mathrm{CE}(\mathrm{softmax}(s_v/\tau), q_i)

    with H high-resolution and V crops in all. Codes carry no gradient.
    """
    n_high = len(high_resolution_outputs)
    n_crops = n_high + len(low_resolution_outputs)
    total = 0.0
    for i in range(n_high):
        scores = high_resolution_outputs[i].detach()
        if queue_outputs is not None:
            scores = torch.cat([scores, queue_outputs[i].detach()])
        codes = sinkhorn(scores, sinkhorn_iterations, sinkhorn_epsilon)[: len(high_resolution_outputs[i])]
        others = [high_resolution_outputs[v] for v in range(n_high) if v != i]
        others += list(low_resolution_outputs)
        total = total + sum(swav_cross_entropy(s, codes, temperature) for s in others) / (n_crops - 1)
    return total / n_high


# --------------------------------------------------------------------------------------------
# Self-distillation: DINO
# --------------------------------------------------------------------------------------------


def dino_loss(
    teacher_out: Sequence[Tensor],
    student_out: Sequence[Tensor],
    center: Tensor,
    teacher_temp: float = 0.04,
    student_temp: float = 0.1,
) -> Tensor:
    r"""DINO: cross-entropy from the centered, sharpened teacher to the student.

    .. math:: P_t = \mathrm{softmax}((t - c)/\tau_t),\quad \log P_s = \mathrm{logsoftmax}(s/\tau_s),
              \quad L = \frac{1}{B\,|\{(t,s): t\ne s\}|}\sum_{t\ne s}\sum_b -P_t^{(b)}\cdot\log P_s^{(b)}

    over all teacher views t and student views s except the same view index. The teacher is
    detached (no gradient), as in DINO's code.

    Args:
        teacher_out: list of T tensors (B, K); student_out: list of S tensors (B, K);
        center: (K,) or (1, 1, K).
    """
    teacher = torch.stack([t.detach() for t in teacher_out])
    student = torch.stack(list(student_out))
    p_teacher = F.softmax((teacher - center.reshape(1, 1, -1)) / teacher_temp, dim=-1)
    log_p_student = F.log_softmax(student / student_temp, dim=-1)
    pair_loss = -torch.einsum("tbk,sbk->ts", p_teacher, log_p_student)
    same_view = torch.eye(pair_loss.shape[0], pair_loss.shape[1], dtype=torch.bool, device=pair_loss.device)
    n_terms = pair_loss.numel() - int(same_view.sum())
    return pair_loss.masked_fill(same_view, 0).sum() / (n_terms * teacher.shape[1])


@torch.no_grad()
def dino_center_update(center: Tensor, teacher_out: Sequence[Tensor], momentum: float = 0.9) -> Tensor:
    r""":math:`c \leftarrow m\,c + (1-m)\,\mathrm{mean}_{t,b}(t_b)` (returns the new center)."""
    batch_center = torch.stack(list(teacher_out)).mean(dim=(0, 1))
    return center * momentum + batch_center.reshape(center.shape).to(center.dtype) * (1 - momentum)


# --------------------------------------------------------------------------------------------
# Whitening: W-MSE
# --------------------------------------------------------------------------------------------


def whiten_cholesky(x: Tensor, eps: float = 0.0) -> Tensor:
    r"""Cholesky whitening of one sub-batch: :math:`\Sigma = X_c^\top X_c/(n-1)`,
    :math:`\Sigma_\epsilon = (1-\epsilon)\Sigma + \epsilon I = LL^\top`, output :math:`X_c L^{-\top}`
    (whose covariance is the identity)."""
    n, d = x.shape
    xc = x - x.mean(dim=0, keepdim=True)
    cov = xc.T @ xc / (n - 1)
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    cov = (1 - eps) * cov + eps * eye
    inv_l = torch.linalg.solve_triangular(torch.linalg.cholesky(cov), eye, upper=False)
    return xc @ inv_l.T


def whiten_zca(x: Tensor, eps: float = 0.0) -> Tensor:
    r"""ZCA whitening of one sub-batch: output :math:`X_c \Sigma_\epsilon^{-1/2}` (symmetric
    inverse square root, the whitening closest to the input in Frobenius norm)."""
    n, d = x.shape
    xc = x - x.mean(dim=0, keepdim=True)
    cov = xc.T @ xc / (n - 1)
    cov = (1 - eps) * cov + eps * torch.eye(d, dtype=x.dtype, device=x.device)
    evals, evecs = torch.linalg.eigh(cov)
    return xc @ (evecs * evals.rsqrt()) @ evecs.T


def normalized_mse(x0: Tensor, x1: Tensor) -> Tensor:
    r""":math:`2 - 2\,\mathrm{mean}_b\cos(x_0^{(b)}, x_1^{(b)})` (W-MSE's loss between views)."""
    return 2 - 2 * (F.normalize(x0, dim=1) * F.normalize(x1, dim=1)).sum(dim=1).mean()


def wmse_loss(
    input: Tensor,
    num_samples: int = 2,
    w_size: int = 256,
    w_iter: int = 1,
    eps: float = 0.0,
    whitening: str = "cholesky",
    permutations: Optional[Sequence[Tensor]] = None,
) -> Tensor:
    r"""W-MSE: whiten random sub-batches of every view, then normalized MSE over view pairs.

    ``input`` stacks ``num_samples`` views of ``bs`` images: rows ``i*bs .. (i+1)*bs``. For
    each of ``w_iter`` iterations a permutation of the ``bs`` images is cut into sub-batches of
    ``w_size``; each view of each sub-batch is whitened on its own; the loss averages
    :func:`normalized_mse` over all view pairs and iterations. The permutations are drawn with
    ``torch.randperm(bs)`` (as lightly draws them) unless given.
    """
    whiten = whiten_cholesky if whitening == "cholesky" else whiten_zca
    bs = input.shape[0] // num_samples
    total = 0.0
    n_pairs = num_samples * (num_samples - 1) // 2
    for it in range(w_iter):
        perm = torch.randperm(bs) if permutations is None else permutations[it]
        z = torch.empty_like(input)
        for idx in perm.view(-1, w_size):
            idx = idx.to(input.device)
            for i in range(num_samples):
                z[idx + i * bs] = whiten(input[idx + i * bs], eps)
        for i in range(num_samples - 1):
            for j in range(i + 1, num_samples):
                total = total + normalized_mse(z[i * bs : (i + 1) * bs], z[j * bs : (j + 1) * bs])
    return total / (w_iter * n_pairs)


# --------------------------------------------------------------------------------------------
# Jha et al.'s simplified objective (Jha et al. 2024, Sec. 3.1)
# --------------------------------------------------------------------------------------------


def center_vector(*views: Tensor) -> Tensor:
    r"""The center vector :math:`s = \mathbb{E}[\hat z]`: mean of the L2-normalized rows of all views."""
    return torch.cat([normalize(v, dim=1) for v in views]).mean(dim=0)


def center_penalty_loss(z_a: Tensor, z_b: Tensor, lambda_param: float = -1.0) -> Tensor:
    r"""Simplified SSL objective :math:`L_{simple} = 0.5\,(L(f) - \lambda_L \|s\|)`, eq. (32).

    :math:`L(f) = \mathrm{mean}_b\|\hat z_a - \hat z_b\|^2` is the invariance loss between the
    normalized views and :math:`s` the center vector of both views; the paper sets
    :math:`\lambda_L = -1`, so the center vector's magnitude is penalized.
    """
    za = normalize(z_a, dim=1)
    zb = normalize(z_b, dim=1)
    invariance = ((za - zb) ** 2).sum(dim=1).mean()
    return 0.5 * (invariance - lambda_param * torch.linalg.vector_norm(center_vector(z_a, z_b)))


# --------------------------------------------------------------------------------------------
# Hypersphere statistics used by the metrics (Wang & Isola)
# --------------------------------------------------------------------------------------------


def uniformity(z: Tensor, t: float = 2.0) -> Tensor:
    r""":math:`\log \frac{1}{n(n-1)}\sum_{i\ne j} e^{-t\|\hat z_i-\hat z_j\|^2}` over distinct pairs (0 at
    full collapse). A single sample has no pair: the result is NaN."""
    n = z.shape[0]
    if n < 2:
        return z.new_tensor(float("nan"))
    z = normalize(z, dim=1)  # F.normalize on scaled rows: no overflow of the squares
    sq_dist = (z[:, None, :] - z[None, :, :]).pow(2).sum(dim=-1)
    distinct = ~torch.eye(n, dtype=torch.bool, device=z.device)
    return torch.logsumexp(-t * sq_dist[distinct], dim=0) - math.log(n * (n - 1))


def alignment(z_a: Tensor, z_b: Tensor, alpha: float = 2.0) -> Tensor:
    r""":math:`\mathbb{E}_b\|\hat z_a^{(b)} - \hat z_b^{(b)}\|^\alpha`."""
    return (F.normalize(z_a, dim=1) - F.normalize(z_b, dim=1)).norm(dim=1).pow(alpha).mean()


# --------------------------------------------------------------------------------------------
# Contrastive extensions: DCL, DCLW, DirectCLR, MACL, DetCon, SupCon, KoLeo
# --------------------------------------------------------------------------------------------


def _two_view_logits(out0: Tensor, out1: Tensor, temperature) -> tuple:
    """``Z = [ẑ⁰; ẑ¹]`` (2N, d), ``S = ZZᵀ/τ`` and the column of each row's positive, ``k ± N``."""
    n = out0.shape[0]
    z = F.normalize(torch.cat([out0, out1], dim=0), dim=1)
    logits = z @ z.T / temperature
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return z, logits, positives


def negative_mises_fisher_weights(out0: Tensor, out1: Tensor, sigma: float = 0.5) -> Tensor:
    r"""DCLW's positive weights (Yeh et al. 2022, Eq. 7): :math:`w_i = 2 - N\,\mathrm{softmax}_i(
    \hat z^{(0)}_i\cdot\hat z^{(1)}_i/\sigma)`, the softmax taken over the batch; detached.
    The inputs are used as given (DCL passes normalized embeddings)."""
    similarity = (out0.detach() * out1.detach()).sum(dim=1) / sigma
    return 2 - out0.shape[0] * torch.softmax(similarity, dim=0)


def dcl_loss(out0: Tensor, out1: Tensor, temperature: float = 0.1, weight_fn=None) -> Tensor:
    r"""Decoupled contrastive learning (Yeh et al. 2022, Eq. 6): NT-Xent with the positive
    removed from the denominator, averaged over both views' rows.

    .. math:: \ell_k = -w_k S_{k,p(k)} + \log\sum_{m\notin\{k,\,p(k)\}} e^{S_{km}}, \qquad
              L = \frac{1}{2N}\sum_{k=1}^{2N}\ell_k,

    with :math:`S = ZZ^\top/\tau` as in :func:`ntxent_loss`. ``weight_fn(ẑ⁰, ẑ¹)`` gives the
    weights of view 0's rows and ``weight_fn(ẑ¹, ẑ⁰)`` those of view 1's (1 without it).
    """
    n = out0.shape[0]
    z, logits, positives = _two_view_logits(out0, out1, temperature)
    rows = torch.arange(2 * n, device=z.device)
    positive_logits = logits[rows, positives]
    excluded = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    excluded[rows, positives] = True
    negative_lse = torch.logsumexp(logits.masked_fill(excluded, float("-inf")), dim=1)
    if weight_fn is not None:
        weights = torch.cat([weight_fn(z[:n], z[n:]), weight_fn(z[n:], z[:n])])
        positive_logits = weights * positive_logits
    return (negative_lse - positive_logits).mean()


def dclw_loss(out0: Tensor, out1: Tensor, temperature: float = 0.1, sigma: float = 0.5) -> Tensor:
    """DCL weighted by :func:`negative_mises_fisher_weights` (Yeh et al. 2022, DCLW)."""
    return dcl_loss(out0, out1, temperature, lambda a, b: negative_mises_fisher_weights(a, b, sigma))


def directclr_loss(out0: Tensor, out1: Tensor, loss_dim: int = 64, temperature: float = 0.5) -> Tensor:
    """DirectCLR (Jing et al. 2022): NT-Xent on the first ``loss_dim`` features of the flattened
    representation, without a projection head."""
    return ntxent_loss(out0.flatten(1)[:, :loss_dim], out1.flatten(1)[:, :loss_dim], temperature)


def macl_loss(z0: Tensor, z1: Tensor, temperature: float = 0.1, alpha: float = 0.5, A_0: float = 0.0,
              eps: float = 1e-8) -> Tensor:
    r"""Model-aware contrastive loss (Huang et al. 2023, MACL).

    The temperature follows the alignment magnitude :math:`A`, the mean positive cosine
    (detached): :math:`\tau_A = \tau\,(1 + \alpha(A - A_0))`. With :math:`P_k` the softmax
    probability of row k's positive among all other rows (NT-Xent's row at temperature
    :math:`\tau_A`) and the detached reweighting :math:`V_k = 1/(1 - P_k + \epsilon)`:

    .. math:: L = -\frac{1}{2N}\sum_k V_k \log P_k.
    """
    n = z0.shape[0]
    z = F.normalize(torch.cat([z0, z1], dim=0), dim=1)
    cosine = z @ z.T
    rows = torch.arange(2 * n, device=z.device)
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    positive_cosine = cosine[rows, positives]
    alignment = positive_cosine.detach().mean()
    adaptive_temperature = temperature * (1 + alpha * (alignment - A_0))
    # Scaled before masking: τ_A < 0 is possible (α(A - A_0) < -1), and -inf/τ_A would be +inf.
    logits = (cosine / adaptive_temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    log_prob = torch.log_softmax(logits, dim=1)[rows, positives]
    reweight = 1.0 / (1.0 - log_prob.exp() + eps)
    return -(reweight.detach() * log_prob).mean()


def supcon_loss(out0: Tensor, out1: Tensor, labels: Optional[Tensor] = None, temperature: float = 0.5,
                rescale: bool = True) -> Tensor:
    r"""Supervised contrastive loss :math:`\mathcal{L}^{sup}_{out}` (Khosla et al. 2020, Eq. 2)
    over the 2N embeddings of two views.

    Row k's positives :math:`P(k)` are every other row with the same label (its other view
    included); the denominator runs over every row but k:

    .. math:: L = \frac{c}{2N}\sum_k \frac{-1}{|P(k)|}\sum_{p\in P(k)}
              \log\frac{e^{S_{kp}}}{\sum_{m\ne k} e^{S_{km}}}, \qquad c = \tau \text{ if rescale else } 1.

    Without labels every sample is its own class, and the loss is NT-Xent (times c).
    """
    n = out0.shape[0]
    z, logits, _ = _two_view_logits(out0, out1, temperature)
    if labels is None:
        labels = torch.arange(n, device=z.device)
    y = torch.cat([labels, labels])
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    positive = (y[:, None] == y[None, :]) & ~self_mask
    log_prob = torch.log_softmax(logits.masked_fill(self_mask, float("-inf")), dim=1)
    mean_log_prob = log_prob.masked_fill(~positive, 0.0).sum(dim=1) / positive.sum(dim=1)
    loss = -mean_log_prob.mean()
    return loss * temperature if rescale else loss


def _detcon_direction(pred: Tensor, target_other: Tensor, target_same: Tensor, mask: Tensor,
                      mask_other: Tensor, temperature: float) -> Tensor:
    """One view's half of DetCon: rows are its B·M predicted regions, columns every target region
    of the other view (positives: same image, same mask id) and of its own view (the same image's
    regions with the row's mask id are left out of the denominator)."""
    b, m, d = pred.shape
    p = F.normalize(pred, dim=2).reshape(b * m, d)
    other = F.normalize(target_other, dim=2).reshape(b * m, d)
    same = F.normalize(target_same, dim=2).reshape(b * m, d)
    image = torch.arange(b, device=pred.device).repeat_interleave(m)
    same_image = image[:, None] == image[None, :]
    region, region_other = mask.reshape(-1), mask_other.reshape(-1)
    positive = same_image & (region[:, None] == region_other[None, :])
    excluded = same_image & (region[:, None] == region[None, :])
    # Scaled before masking, so that a negative temperature keeps the excluded logits at -inf.
    cross_logits = p @ other.T / temperature
    same_logits = (p @ same.T / temperature).masked_fill(excluded, float("-inf"))
    logits = torch.cat([cross_logits, same_logits], dim=1)
    log_prob = torch.log_softmax(logits, dim=1)[:, : b * m]
    n_positive = positive.sum(dim=1)
    mean_log_prob = log_prob.masked_fill(~positive, 0.0).sum(dim=1) / n_positive.clamp_min(1)
    # Row (b, i) is weighted by 1 / (number of regions of its image and view sharing its mask id).
    area = (mask[:, :, None] == mask[:, None, :]).sum(dim=2).reshape(-1)
    weight = (n_positive > 0).to(log_prob.dtype) / area
    return -(weight * mean_log_prob).mean()


def detcon_b_loss(pred_view0: Tensor, pred_view1: Tensor, target_view0: Tensor, target_view1: Tensor,
                  mask_view0: Tensor, mask_view1: Tensor, temperature: float = 0.1) -> Tensor:
    r"""DetCon-B (Hénaff et al. 2021): a multi-positive contrastive loss over mask-pooled region
    features (B, M, d), symmetrized over the two views.

    Row (b, i) of view v scores its prediction against every target region of both views. Its
    positives are the other view's regions of the same image with the same mask id (uniform
    soft label 1/#positives); the same view's regions of the same image with that mask id are
    removed from the denominator. Row (b, i) is weighted by
    :math:`[\#\mathrm{pos}>0] / \#\{j: m_{bj} = m_{bi}\}` (its own view's masks), rows are
    averaged over the B·M rows of each view, and the two views' losses are added.
    """
    return _detcon_direction(pred_view0, target_view1, target_view0, mask_view0, mask_view1, temperature) + \
        _detcon_direction(pred_view1, target_view0, target_view1, mask_view1, mask_view0, temperature)


def detcon_s_loss(view0: Tensor, view1: Tensor, mask_view0: Tensor, mask_view1: Tensor,
                  temperature: float = 0.1) -> Tensor:
    """DetCon-S (Hénaff et al. 2021, SimCLR-based): DetCon-B with predictions = targets."""
    return detcon_b_loss(view0, view1, view0, view1, mask_view0, mask_view1, temperature)


def koleo_loss(x: Tensor, p: float = 2, eps: float = 1e-8) -> Tensor:
    r"""Kozachenko–Leonenko entropy regularizer (Sablayrolles et al. 2019; DINOv2):

    .. math:: L = -\frac{1}{N}\sum_i \log(\|\hat x_i - \hat x_{n(i)} + \epsilon\|_p + \epsilon),

    where :math:`n(i)` is the nearest other row by cosine similarity. The ε added to the
    difference (``F.pairwise_distance``) keeps the loss and its gradient finite for duplicate rows.
    """
    x = F.normalize(x, p=2, dim=-1, eps=eps)
    cosine = (x @ x.T).masked_fill(torch.eye(x.shape[0], dtype=torch.bool, device=x.device), -2.0)
    neighbor = cosine.argmax(dim=1)
    distance = F.pairwise_distance(x, x[neighbor], p=p, eps=eps)
    return -(distance + eps).log().mean()


# (end of contrastive extensions)


# --------------------------------------------------------------------------------------------
# Prototype extensions: iBOT, iBOT++, CAPI, MSN, PMSN
# --------------------------------------------------------------------------------------------


def weighted_soft_target_cross_entropy(
    teacher: Tensor, student: Tensor, weights: Tensor, center: Tensor, teacher_temp: float, student_temp: float
) -> Tensor:
    r""":math:`\sum_i w_i\,\big(-\mathrm{softmax}((t_i - c)/\tau_t)\cdot\log\mathrm{softmax}(s_i/\tau_s)\big)`,
    teacher row i paired with student row i (iBOT's masked-patch term); the teacher is detached.

    Args:
        teacher, student: (R, K); weights: (R,); center: (K,).
    """
    q = F.softmax((teacher.detach() - center.reshape(1, -1)) / teacher_temp, dim=-1)
    log_p = F.log_softmax(student / student_temp, dim=-1)
    return (weights * -(q * log_p).sum(dim=-1)).sum()


def ibot_patch_loss(
    teacher_out: Tensor, student_out: Tensor, mask: Tensor, center: Tensor, teacher_temp: float = 0.04,
    student_temp: float = 0.1,
) -> Tensor:
    r"""iBOT's masked-image-modelling loss (Zhou et al. 2022, Eq. 2) with DINOv2's weighting:

    .. math:: L = \frac1B\sum_b\frac{1}{\max(n_b,1)}\sum_{i\in\mathrm{masked}(b)}
              -\mathrm{softmax}\Big(\frac{t_i - c}{\tau_t}\Big)\cdot\log\mathrm{softmax}\Big(\frac{s_i}{\tau_s}\Big)

    Args:
        teacher_out, student_out: (M, K), the M masked patches in the mask's row-major order.
        mask: boolean (B, H, W) or (B, N) with M entries set; center: (K,) or (1, K).
    """
    flat = mask.reshape(mask.shape[0], -1)
    counts = flat.sum(dim=1, keepdim=True).clamp(min=1).to(student_out.dtype)
    weights = (1.0 / counts).expand_as(flat)[flat] / mask.shape[0]
    return weighted_soft_target_cross_entropy(teacher_out, student_out, weights, center, teacher_temp, student_temp)


def ibot_plus_plus_patch_loss(
    teacher_out: Tensor, student_out: Tensor, mask: Optional[Tensor], center: Tensor, teacher_temp: float = 0.04,
    student_temp: float = 0.1, visible_loss_weight: float = 1.0,
) -> Tensor:
    r"""iBOT++ (TIPSv2): the iBOT cross-entropy on every token, per image
    :math:`\bar\ell^{\,m}_b + w_v\,\bar\ell^{\,v}_b` (means over masked and visible tokens, each
    count at least 1), averaged over images; without a mask the mean over all tokens.

    Args:
        teacher_out, student_out: (B, N, K), or (B·N, K) with the mask giving B.
        mask: None or (B, H, W) / (B, N), 1 = masked.
    """
    batch = teacher_out.shape[0] if teacher_out.dim() == 3 else mask.shape[0]
    teacher_flat, student_flat = teacher_out.reshape(-1, teacher_out.shape[-1]), student_out.reshape(-1, student_out.shape[-1])
    tokens = teacher_flat.shape[0] // batch
    q = F.softmax((teacher_flat.detach() - center.reshape(1, -1)) / teacher_temp, dim=-1)
    ce = -(q * F.log_softmax(student_flat / student_temp, dim=-1)).sum(dim=-1).view(batch, tokens)
    if mask is None:
        return ce.mean()
    masked = mask.reshape(batch, tokens).to(ce.dtype)
    visible = 1.0 - masked
    masked_mean = (ce * masked).sum(dim=1) / masked.sum(dim=1).clamp(min=1.0)
    visible_mean = (ce * visible).sum(dim=1) / visible.sum(dim=1).clamp(min=1.0)
    return (masked_mean + visible_loss_weight * visible_mean).mean()


@torch.no_grad()
def capi_sinkhorn(logits: Tensor, iterations: int = 3, epsilon: float = 1e-8, gather_distributed: bool = False) -> Tensor:
    r"""CAPI's position-wise Sinkhorn-Knopp (Darcet et al. 2025, Sec. 3.2), as CAPI's code and
    lightly write it: per token position, :math:`Q = \exp(X - \max_b X)` over (batch, clusters),
    then ``iterations`` times: divide by the sum over the batch (+ε), by the sum over the
    clusters (+ε). Sums over the batch include every rank's when ``gather_distributed``.

    Args:
        logits: (B, T, K), already divided by the teacher temperature.
    Returns:
        (B, T, K) assignments.
    """
    all_reduce = gather_distributed and torch.distributed.is_available() and torch.distributed.is_initialized()
    q = logits.transpose(0, 1)
    shift = torch.amax(q, dim=1, keepdim=True)
    if all_reduce:
        torch.distributed.all_reduce(shift, op=torch.distributed.ReduceOp.MAX)
    q = torch.exp(q - shift)
    for _ in range(iterations):
        over_batch = q.sum(dim=1, keepdim=True)
        if all_reduce:
            torch.distributed.all_reduce(over_batch)
        q = q / (over_batch + epsilon)
        q = q / (q.sum(dim=2, keepdim=True) + epsilon)
    return q.transpose(0, 1)


def capi_loss(
    teacher_logits: Tensor, student_logits: Tensor, teacher_index: Optional[Tensor] = None,
    teacher_temperature: float = 0.06, student_temperature: float = 0.12, sinkhorn_iterations: int = 3,
    gather_distributed: bool = False,
) -> Tensor:
    r"""CAPI's loss: :math:`\mathrm{mean}_{b,p}\,-q_{b,\iota(b,p)}\cdot\log\mathrm{softmax}(s_{b,p}/\tau_s)`
    with :math:`q` = :func:`capi_sinkhorn` of the teacher logits / τ_t and ι the teacher index
    (the identity without one)."""
    q = capi_sinkhorn(teacher_logits.detach() / teacher_temperature, sinkhorn_iterations, 1e-8, gather_distributed)
    if teacher_index is not None:
        q = torch.gather(q, 1, teacher_index.unsqueeze(-1).expand(-1, -1, q.shape[-1]))
    return -(q * F.log_softmax(student_logits / student_temperature, dim=-1)).sum(dim=-1).mean()


@torch.no_grad()
def msn_sinkhorn(probabilities: Tensor, iterations: int = 3, gather_distributed: bool = False) -> Tensor:
    r"""MSN's Sinkhorn-Knopp on target probabilities (B, K) (Assran et al. 2022, App.; MSN's
    ``distributed_sinkhorn``): normalize to sum 1, then ``iterations`` times every prototype to
    1/K (sums over all ranks' targets when ``gather_distributed``) and every target to 1/B;
    finally scaled so each target row sums to 1. Probability domain, as the paper's code."""
    if iterations <= 0:
        return probabilities
    all_reduce = gather_distributed and torch.distributed.is_available() and torch.distributed.is_initialized()
    b, k = probabilities.shape
    q = probabilities.T
    total = q.sum()
    if all_reduce:
        torch.distributed.all_reduce(total)
    q = q / total
    for _ in range(iterations):
        per_prototype = q.sum(dim=1, keepdim=True)
        if all_reduce:
            torch.distributed.all_reduce(per_prototype)
        q = q / per_prototype / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).T


def mean_entropy_regularization(mean_probs: Tensor) -> Tensor:
    r"""MSN's mean-entropy maximisation term :math:`\sum_k m_k\log m_k + \log K` (= log K − H(m))."""
    return torch.xlogy(mean_probs, mean_probs).sum() + math.log(mean_probs.shape[0])


def prior_kl_regularization(mean_probs: Tensor, prior: Tensor) -> Tensor:
    r"""PMSN's :math:`\mathrm{KL}(\pi\,\|\,m) = \sum_k \pi_k(\log\pi_k - \log m_k)` (Assran et al. 2023)."""
    prior = prior.to(device=mean_probs.device)
    return F.kl_div(mean_probs.log(), prior, reduction="sum")


def msn_cross_entropy_and_mean_probs(
    anchors: Tensor, targets: Tensor, prototypes: Tensor, temperature: float = 0.1, sinkhorn_iterations: int = 3,
    target_sharpen_temperature: float = 0.25, gather_distributed: bool = False,
) -> tuple:
    r"""MSN's two ingredients (Assran et al. 2022, Eq. 2–4): with :math:`p_i = \mathrm{softmax}(
    \hat a_i\hat P^\top/\tau)` and the targets' :math:`q = \mathrm{Sinkhorn}(\mathrm{sharpen}(
    \mathrm{softmax}(\hat t\hat P^\top/\tau), T))` (no gradient), repeated over the V anchor views,
    returns :math:`(\frac{1}{VB}\sum_i -q_{i \bmod B}\cdot\log p_i,\; m = \mathrm{mean}_i\,p_i)`."""
    views = anchors.shape[0] // targets.shape[0]
    anchors_n, prototypes_n = F.normalize(anchors, dim=1), F.normalize(prototypes, dim=1)
    log_p = F.log_softmax(anchors_n @ prototypes_n.T / temperature, dim=1)
    with torch.no_grad():
        targets_n = F.normalize(targets, dim=1)
        probs = F.softmax(targets_n @ prototypes_n.T / temperature, dim=1)
        sharpened = probs ** (1.0 / target_sharpen_temperature)
        sharpened = sharpened / sharpened.sum(dim=1, keepdim=True)
        q = msn_sinkhorn(sharpened, sinkhorn_iterations, gather_distributed).repeat(views, 1)
    return -(q * log_p).sum(dim=1).mean(), log_p.exp().mean(dim=0)


def msn_loss(
    anchors: Tensor, targets: Tensor, prototypes: Tensor, temperature: float = 0.1, sinkhorn_iterations: int = 3,
    regularization_weight: float = 1.0, target_sharpen_temperature: float = 0.25, regularization=None,
) -> Tensor:
    r"""MSN (PMSN with ``regularization`` = a prior's KL): the cross-entropy of
    :func:`msn_cross_entropy_and_mean_probs` plus ``regularization_weight`` × R(m) when the weight
    is positive; R defaults to :func:`mean_entropy_regularization`.

    Args:
        anchors: (V·B, D), view-major; targets: (B, D); prototypes: (K, D).
        regularization: callable of the mean anchor probabilities m (K,).
    """
    ce, mean_probs = msn_cross_entropy_and_mean_probs(
        anchors, targets, prototypes, temperature, sinkhorn_iterations, target_sharpen_temperature
    )
    if regularization_weight > 0:
        regularization = mean_entropy_regularization if regularization is None else regularization
        ce = ce + regularization_weight * regularization(mean_probs)
    return ce

# (end of prototype extensions)


# --------------------------------------------------------------------------------------------
# Decorrelation and spectral extensions: TiCo, FroSSL, VICRegL, MMCR, EMP-SSL, CKA
# --------------------------------------------------------------------------------------------


def tico_loss(
    z_a: Tensor, z_b: Tensor, covariance: Optional[Tensor] = None, beta: float = 0.9, rho: float = 8.0
) -> tuple:
    r"""TiCo (Zhu et al. 2022, Alg. 1): transformation invariance plus covariance contrast.

    With row-normalized views :math:`\hat Z_a, \hat Z_b` and the running covariance
    :math:`C = \beta C_{\mathrm{old}} + (1-\beta)\,\mathrm{sg}(\hat Z_a^\top\hat Z_a)/N`,

    .. math:: L = 1 - \frac1N\sum_i \hat z_{a,i}\cdot\hat z_{b,i}
              + \frac{\rho}{N}\sum_i \hat z_{a,i}^\top C\,\hat z_{a,i}

    Returns ``(loss, C)``; ``covariance=None`` starts from zeros (lightly's first call).
    """
    z_a = F.normalize(z_a, dim=1)
    z_b = F.normalize(z_b, dim=1)
    batch_covariance = (z_a.T @ z_a).detach() / z_a.shape[0]
    if covariance is None:
        covariance = torch.zeros_like(batch_covariance)
    c = beta * covariance + (1 - beta) * batch_covariance
    invariance = 1 - (z_a * z_b).sum(dim=1).mean()
    contrast = rho * ((z_a @ c) * z_a).sum(dim=1).mean()
    return invariance + contrast, c.detach()


def frossl_loss(z_views: Sequence[Tensor], invariance_weight: float = 1.0) -> Tensor:
    r"""FroSSL (Skean et al. 2024, Alg. 1): per view, columns L2-normalized over the batch,
    :math:`K_v = \hat Z_v^\top\hat Z_v/\mathrm{tr}(\hat Z_v^\top\hat Z_v)` (d×d; the trace enters as a
    constant, as in the paper's code) and

    .. math:: L = \sum_v \log\|K_v\|_F^2 + w\,V d\,\sum_v \mathrm{MSE}(\hat Z_v, \bar Z)

    with :math:`\bar Z` the mean of the normalized views.
    """
    views = [F.normalize(z, p=2, dim=0) for z in z_views]
    mean_view = torch.stack(views).mean(dim=0)
    n_views, d = len(views), views[0].shape[1]
    total = 0.0
    for z in views:
        cov = z.T @ z
        cov = cov / torch.trace(cov).detach()
        total = total + torch.log((cov**2).sum()) + invariance_weight * n_views * d * F.mse_loss(z, mean_view)
    return total


def nuclear_norm(x: Tensor) -> Tensor:
    r""":math:`\|X\|_* = \sum_i\sigma_i(X)` over the last two dimensions."""
    return torch.linalg.svdvals(x).sum(dim=-1)


def mmcr_loss(online: Tensor, momentum: Tensor, lmda: float = 5e-3) -> Tensor:
    r"""MMCR (Yerxa et al. 2023, Eq. 2 with lightly's local term): with the 2k views of sample b
    stacked as :math:`Z_b` (2k×d) and the centroids :math:`C = [\bar z_b]_b` (B×d),

    .. math:: L = -\|C\|_* + \frac{\lambda}{B}\sum_b\|Z_b\|_*
    """
    z = torch.cat([online, momentum], dim=1)
    return -nuclear_norm(z.mean(dim=1)) + lmda * nuclear_norm(z).sum() / online.shape[0]


def emp_ssl_loss(z_views: Sequence[Tensor], tcr_eps: float = 0.2, inv_coef: float = 200.0) -> Tensor:
    r"""EMP-SSL (Tong et al. 2023, Eq. 3-4): total coding rate plus invariance to the mean view,

    .. math:: L = \frac{1}{2V}\sum_v\log\det\Big(I_d + \frac{d}{N\epsilon}Z_v^\top Z_v\Big)
              - \lambda\,\frac{1}{VN}\sum_{v,i}\cos(z_{v,i}, \bar z_i)

    (ε unsquared, as the authors' code and lightly).
    """
    z = torch.stack(list(z_views))
    _, n, d = z.shape
    eye = torch.eye(d, dtype=z.dtype, device=z.device)
    tcr = 0.5 * torch.logdet(eye + d / (n * tcr_eps) * z.transpose(1, 2) @ z).mean()
    invariance = -F.cosine_similarity(z, z.mean(dim=0, keepdim=True), dim=-1).mean()
    return tcr + inv_coef * invariance


def double_centered_kernel(features: Tensor, valid: Tensor) -> Tensor:
    r"""Mask-aware :math:`HKH` of :math:`K = XX^\top` (B, N, N): row, column and total means over
    the valid tokens only; entries of an ignored token are zero."""
    kernel = features @ features.transpose(-2, -1)
    n = valid.sum(dim=-1).clamp(min=1.0)
    row_mean = (kernel * valid[:, None, :]).sum(dim=-1) / n[:, None]
    col_mean = (kernel * valid[:, :, None]).sum(dim=1) / n[:, None]
    total = (kernel * valid[:, None, :] * valid[:, :, None]).sum(dim=(1, 2)) / (n * n)
    centered = kernel - row_mean[:, :, None] - col_mean[:, None, :] + total[:, None, None]
    return centered * valid[:, :, None] * valid[:, None, :]


def patch_kernel_alignment_loss(student: Tensor, teacher: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    r"""PaKa (2025): one minus the linear CKA of the student's and teacher's token kernels, per image,

    .. math:: \mathrm{CKA} = \frac{\langle HK_sH, HK_tH\rangle_F}
              {\sqrt{\max(\|HK_sH\|_F^2,\epsilon)}\sqrt{\max(\|HK_tH\|_F^2,\epsilon)}},\quad \epsilon = 10^{-6}

    averaged over the images with at least two valid tokens (0 when there is none). The teacher
    is detached. ``valid``: (B, N) weights, 1 for a token that counts (default: all).
    """
    teacher = teacher.detach()
    if valid is None:
        valid = student.new_ones(student.shape[:2])
    valid = valid.to(student.dtype)
    k_s = double_centered_kernel(student, valid)
    k_t = double_centered_kernel(teacher, valid)
    hsic_st = (k_s * k_t).sum(dim=(1, 2))
    hsic_ss = (k_s * k_s).sum(dim=(1, 2))
    hsic_tt = (k_t * k_t).sum(dim=(1, 2))
    cka = hsic_st / (hsic_ss.clamp_min(1e-6).sqrt() * hsic_tt.clamp_min(1e-6).sqrt())
    valid_image = (valid.sum(dim=-1) >= 2).to(cka.dtype)
    return ((1 - cka) * valid_image).sum() / valid_image.sum().clamp(min=1.0)


def nearest_neighbor_pairs(inputs: Tensor, candidates: Tensor, distances: Tensor, num_matches: int) -> tuple:
    r"""VICRegL's matching (Bardes et al. 2022, Sec. 3.2): each input position's nearest candidate
    (by ``distances`` (B, P, Q)), then the ``num_matches`` pairs of smallest distance, in order of
    increasing distance. Returns the matched inputs and candidates, each (B, num_matches, d)."""
    if num_matches is None or num_matches == -1 or num_matches > inputs.shape[1]:
        num_matches = inputs.shape[1]
    # topk, as lightly and the authors' code: ties (regular grids) resolve the same way.
    nearest_distance, nearest = distances.topk(k=1, dim=2, largest=False)
    nearest_distance, nearest = nearest_distance[..., 0], nearest[..., 0]
    order = nearest_distance.topk(k=num_matches, dim=1, largest=False).indices
    matched_inputs = torch.gather(inputs, 1, order[..., None].expand(-1, -1, inputs.shape[2]))
    matched_candidates = torch.gather(
        candidates, 1, torch.gather(nearest, 1, order)[..., None].expand(-1, -1, candidates.shape[2])
    )
    return matched_inputs, matched_candidates


def vicreg_per_position(z_a: Tensor, z_b: Tensor, lambda_param: float, mu_param: float, nu_param: float,
                        eps: float = 1e-4) -> Tensor:  # fmt: skip
    r"""VICReg of (B, ..., d) views as lightly generalizes it: the invariance over every entry,
    the variance hinge and the covariance term per position (over the batch), averaged."""
    positions = z_a.reshape(z_a.shape[0], -1, z_a.shape[-1]).unbind(1), z_b.reshape(z_b.shape[0], -1, z_b.shape[-1]).unbind(1)
    var = torch.stack([0.5 * (vicreg_variance(a, eps) + vicreg_variance(b, eps)) for a, b in zip(*positions)]).mean()
    cov = torch.stack([vicreg_covariance(a) + vicreg_covariance(b) for a, b in zip(*positions)]).mean()
    return lambda_param * F.mse_loss(z_a, z_b) + mu_param * var + nu_param * cov


def vicregl_loss(
    global_view_features: Sequence[tuple],
    global_view_grids: Sequence[Tensor],
    local_view_features: Optional[Sequence[tuple]] = None,
    local_view_grids: Optional[Sequence[Tensor]] = None,
    lambda_param: float = 25.0,
    mu_param: float = 25.0,
    nu_param: float = 1.0,
    alpha: float = 0.75,
    eps: float = 1e-4,
    num_matches: tuple = (20, 4),
) -> Tensor:
    r"""VICRegL (Bardes et al. 2022, Eq. 1-4) as its authors' code computes it:
    :math:`\alpha\,L_{\mathrm{global}} + (1-\alpha)\,L_{\mathrm{local}}`.

    * global: λ·mean MSE over the pairs (global view a, any other view b) + μ·mean variance hinge
      + ν·mean covariance term over all views' global embeddings;
    * local: for each such pair, VICReg (covariance weight ν/2) between the ``num_matches[0]``
      nearest (a→b) and ``num_matches[1]`` nearest (b→a) feature-map positions, matched once by
      feature distance and once by grid distance, each direction weighted ½, averaged over pairs.
    """
    features = list(global_view_features) + list(local_view_features or [])
    grids = list(global_view_grids) + list(local_view_grids or [])
    n_global = len(global_view_features)
    # pairs (a, b): a global view and any other view (a tensor passed twice is not paired with itself)
    pairs = [(a, b) for a in range(n_global) for b in range(len(features)) if features[b][0] is not features[a][0]]
    inv = torch.stack([F.mse_loss(features[a][0], features[b][0]) for a, b in pairs]).mean()
    var = torch.stack([vicreg_variance(f[0], eps) for f in features]).mean()
    cov = torch.stack([vicreg_covariance(f[0]) for f in features]).mean()
    global_loss = lambda_param * inv + mu_param * var + nu_param * cov

    def vicreg(x, y):
        return vicreg_per_position(x, y, lambda_param, mu_param, 0.5 * nu_param, eps)

    local_pairs = [(a, b) for a in range(n_global) for b in range(len(features))
                   if b >= n_global or features[b][1] is not features[a][1]]  # fmt: skip
    local = []
    for a, b in local_pairs:
        za, zb = features[a][1].flatten(1, 2), features[b][1].flatten(1, 2)
        ga, gb = grids[a].flatten(1, 2), grids[b].flatten(1, 2)
        for da, db in ((torch.cdist(za, zb), torch.cdist(zb, za)), (torch.cdist(ga, gb), torch.cdist(gb, ga))):
            local.append(0.5 * vicreg(*nearest_neighbor_pairs(za, zb, da, num_matches[0]))
                         + 0.5 * vicreg(*nearest_neighbor_pairs(zb, za, db, num_matches[1])))  # fmt: skip
    local_loss = torch.stack(local).sum() / len(local_pairs)
    return alpha * global_loss + (1 - alpha) * local_loss

# (end of spectral extensions)


# --------------------------------------------------------------------------------------------
# Distribution matching: SIGReg, LeJEPA, LeWM, VISReg
# --------------------------------------------------------------------------------------------


def sigreg_frequencies(knots: int = 17, t_max: float = 3.0) -> tuple:
    r"""The Epps-Pulley grid of SIGReg: frequencies :math:`t_k = k\,t_{max}/(K-1)`, the standard
    normal characteristic function :math:`\phi(t) = e^{-t^2/2}` there, and the trapezoid weights
    over :math:`[-t_{max}, t_{max}]` (doubled, the integrand being even) times φ."""
    t = torch.linspace(0, t_max, knots, dtype=torch.float32)
    dt = t_max / (knots - 1)
    weights = torch.full((knots,), 2 * dt, dtype=torch.float32)
    weights[[0, -1]] = dt
    phi = torch.exp(-t.square() / 2.0)
    return t, phi, weights * phi


def sigreg_loss(proj: Tensor, directions: Tensor, knots: int = 17, t_max: float = 3.0) -> Tensor:
    r"""SIGReg (Balestriero & LeCun 2025, LeJEPA Alg. 1): project the N samples of each leading
    index onto the unit columns of ``directions`` (d, S), then for every slice s

    .. math:: T_s = N\int w(t)\,\Big|\frac1N\sum_n e^{i t x_{ns}} - \phi(t)\Big|^2 dt

    by the trapezoid rule on the grid of :func:`sigreg_frequencies`; the mean over slices and
    leading indices. ``proj``: (..., N, d).
    """
    t, phi, weights = (x.to(device=proj.device, dtype=proj.dtype) for x in sigreg_frequencies(knots, t_max))
    n = proj.shape[-2]
    x_t = (proj @ directions)[..., None] * t  # (..., N, S, K), every angle materialized
    cos_mean = x_t.cos().mean(dim=-3)
    sin_mean = x_t.sin().mean(dim=-3)
    error = (cos_mean - phi).square() + sin_mean.square()
    return (n * (error @ weights)).mean()


def lejepa_invariance(all_proj: Tensor, global_proj: Tensor) -> Tensor:
    r"""Mean squared distance of every view (V, N, d) to the centroid of the global views."""
    return (global_proj.mean(dim=0) - all_proj).square().mean()


def lejepa_loss(
    local_proj: Tensor, global_proj: Tensor, directions: Tensor, lambda_param: float = 0.05,
    knots: int = 17, t_max: float = 3.0,
) -> Tensor:  # fmt: skip
    r"""LeJEPA (Balestriero & LeCun 2025, Eq. 9): with every view :math:`A = [G; L]`,
    :math:`\lambda\,\mathrm{SIGReg}(A) + (1-\lambda)\,\mathrm{MSE}(A, \bar G)`."""
    all_proj = torch.cat([global_proj, local_proj], dim=0)
    return lambda_param * sigreg_loss(all_proj, directions, knots, t_max) + (1 - lambda_param) * lejepa_invariance(
        all_proj, global_proj
    )


def lewm_loss(
    predicted: Tensor, target: Tensor, embeddings: Tensor, directions: Tensor, lambda_param: float = 0.1,
    normalize: bool = False, knots: int = 17, t_max: float = 3.0,
) -> Tensor:  # fmt: skip
    r"""LeWM (LeWorldModel 2026): next-embedding MSE to the detached target (both layer-normalized
    when ``normalize``) plus λ·SIGReg of the (B, T, d) embeddings, one statistic per time step
    over the batch."""
    target = target.detach()
    if normalize:
        predicted = F.layer_norm(predicted, predicted.shape[-1:])
        target = F.layer_norm(target, target.shape[-1:])
    sigreg = sigreg_loss(embeddings.flatten(1, -2).transpose(0, 1), directions, knots, t_max)
    return (predicted - target).square().mean() + lambda_param * sigreg


def gaussian_quantiles(n: int, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    r""":math:`\Phi^{-1}(i/(n+1)) = \sqrt2\,\mathrm{erf}^{-1}(2i/(n+1) - 1)`, i = 1..n (computed in
    float32 as ``torch.distributions.Normal.icdf`` does, then cast)."""
    positions = torch.arange(1, n + 1, dtype=torch.float32, device=device) / (n + 1)
    return (torch.erfinv(2 * positions - 1) * math.sqrt(2)).to(dtype)


def visreg_components(
    local_proj: Tensor, global_proj: Tensor, slices: Tensor, lambda_param: float = 0.9,
    lambda_scale: float = 1.0, lambda_shape: float = 1.0, lambda_center: float = 1.0, eps: float = 1e-4,
) -> tuple:  # fmt: skip
    r"""VISReg (Wu et al. 2026, Alg. 1) on all views :math:`Z` (V, N, d): returns
    ``(total, pred, scale, shape, center)`` with

    * pred: the LeJEPA invariance to the global views' centroid;
    * scale: :math:`\mathrm{mean}(1-\sigma)^2` of the biased per-feature std over the batch;
    * shape: sliced 2-Wasserstein to N(0,1): the views standardized with a stop-gradient on σ,
      projected on the unit columns of ``slices`` (d, S), sorted over the batch and compared with
      :func:`gaussian_quantiles`, mean squared difference;
    * center: mean squared batch mean;
    * total: :math:`(1-\lambda)\,\mathrm{pred} + \lambda(\lambda_{sc}\,\mathrm{scale}
      + \lambda_{sh}\,\mathrm{shape} + \lambda_{c}\,\mathrm{center})`.
    """
    proj = torch.cat([global_proj, local_proj], dim=0)
    pred = lejepa_invariance(proj, global_proj)
    std = proj.std(dim=-2, unbiased=False, keepdim=True)
    scale = (1.0 - std).square().mean()
    z_norm = (proj - proj.mean(dim=-2, keepdim=True)) / (std.detach() + eps)
    projections = (z_norm @ slices).sort(dim=-2).values
    quantiles = gaussian_quantiles(proj.shape[-2], proj.dtype, proj.device)[:, None]
    shape = (projections - quantiles).square().mean()
    center = proj.mean(dim=-2).square().mean()
    total = (1 - lambda_param) * pred + lambda_param * (lambda_scale * scale + lambda_shape * shape + lambda_center * center)
    return total, pred, scale, shape, center

# (end of distribution-matching extensions)
