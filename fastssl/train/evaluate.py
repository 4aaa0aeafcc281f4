"""Evaluation on the held-out split: weighted kNN, collapse metrics, linear probe.

* kNN (Wu et al. 2018 / DINO): backbone features of the training images (no augmentation) are
  the memory bank, the held-out images the queries; cosine similarity, the k most similar
  neighbours vote for their class with weight ``exp(sim / T)`` (T = 0.1). k = 20, capped by the
  bank size.
* Collapse metrics (:mod:`fastssl.metrics`) on the embeddings the loss sees, for the held-out
  images: stable rank, entropy rank, norm of the center vector, std of the L2-normalized rows.
* Linear probe: multinomial logistic regression on standardized frozen features, full-batch
  L-BFGS for a few hundred iterations, top-1 on the held-out split.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def extract(
    fn: Callable[[Tensor], Tensor], images_uint8: Tensor, to_input: Callable[[Tensor], Tensor], batch_size: int
) -> Tensor:
    """``fn`` over the images in batches (no augmentation); float32 rows on the device of
    ``fn``'s output. ``images_uint8``: an (N, C, H, W) uint8 tensor or a streamed folder."""
    from fastssl.train.data import StreamingImages, take

    outs = []
    n = int(images_uint8.shape[0])
    for start in range(0, n, batch_size):
        if isinstance(images_uint8, StreamingImages):
            batch = take(images_uint8, torch.arange(start, min(n, start + batch_size)))
        else:
            batch = images_uint8[start : start + batch_size]
        outs.append(fn(to_input(batch)).float())
    return torch.cat(outs)


@torch.no_grad()
def knn_top1(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    k: int = 20,
    temperature: float = 0.1,
    chunk: int = 1024,
) -> float:
    """Weighted kNN top-1 accuracy in [0, 1] (cosine similarity, weights exp(sim/T))."""
    bank = F.normalize(train_features.float(), dim=1)
    labels = train_labels.to(bank.device)
    num_classes = int(max(int(train_labels.max()), int(test_labels.max()))) + 1
    k = min(k, bank.shape[0])
    correct = 0
    for start in range(0, test_features.shape[0], chunk):
        q = F.normalize(test_features[start : start + chunk].float(), dim=1)
        sim = q @ bank.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, labels[top_idx], weights)
        pred = votes.argmax(dim=1)
        correct += int((pred == test_labels[start : start + chunk].to(pred.device)).sum())
    return correct / test_features.shape[0]


def embedding_metrics(z: Tensor) -> Dict[str, float]:
    """The collapse diagnostics logged every epoch, as plain floats."""
    from fastssl import metrics

    z = z.float()
    return {
        "stable_rank": float(metrics.stable_rank(z)),
        "entropy_rank": float(metrics.entropy_rank(z)),
        "center_vector_norm": float(metrics.center_vector_norm(z)),
        "std_of_l2_normalized": float(metrics.std_of_l2_normalized(z)),
    }


def covariance_spectrum(z: Tensor) -> Tensor:
    """Eigenvalues of the embeddings' covariance, descending (the spectrum plot)."""
    from fastssl import metrics

    return metrics.covariance_eigenvalues(z.float()).cpu()


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    steps: int = 300,
    weight_decay: float = 1e-4,
) -> Tuple[float, float]:
    """Logistic regression on frozen features; returns (train top-1, held-out top-1).

    Deterministic: zero initialization and full-batch L-BFGS use no random numbers.
    """
    device = train_features.device
    mean = train_features.mean(dim=0, keepdim=True)
    std = train_features.std(dim=0, keepdim=True).clamp_min(1e-6)
    xtr = ((train_features - mean) / std).float()
    xte = ((test_features - mean) / std).float()
    ytr, yte = train_labels.to(device), test_labels.to(device)
    num_classes = int(max(int(ytr.max()), int(yte.max()))) + 1
    weight = torch.zeros(xtr.shape[1], num_classes, device=device, requires_grad=True)
    bias = torch.zeros(num_classes, device=device, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ weight + bias, ytr) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        train_acc = float(((xtr @ weight + bias).argmax(1) == ytr).float().mean())
        test_acc = float(((xte @ weight + bias).argmax(1) == yte).float().mean())
    return train_acc, test_acc
