r"""Collapse monitoring inside any training loop.

A joint-embedding method can fail silently: the loss goes down while the encoder maps every
image to (nearly) the same point (*total* collapse, e.g. SimSiam without its predictor, Chen &
He 2021, Fig. 2; VICReg without its variance term, Bardes et al. 2022) or to a low-dimensional
subspace (*dimensional* collapse, Jing et al. 2022). :class:`CollapseMonitor` computes the
diagnostics of :mod:`fastssl.metrics` on the embeddings you hand it every ``every`` steps, keeps
their history, and warns once per kind of collapse, naming the metric, its value and the
threshold.

>>> monitor = CollapseMonitor(every=50)
>>> for step, (x0, x1) in enumerate(loader):
...     z0, z1 = model(x0), model(x1)
...     loss = loss_fn(z0, z1)
...     monitor.update(z0, z1, step=step)      # returns the metrics on monitored steps

What is measured (views are detached; a d×d matrix is never formed when N < d):

* ``std_of_l2_normalized`` × √d — SimSiam's spread of the normalized outputs: about 1 for
  well-spread embeddings, 0 at total collapse;
* ``center_vector_norm`` — norm of the mean normalized embedding (Jha et al. 2024): about
  1/√N when spread, 1 when all embeddings point the same way;
* ``stable_rank``, ``entropy_rank`` and the eigenvalue spectrum of the covariance — the number
  of directions in use (dimensional collapse when few of the min(d, N-1) possible ones are);
* ``alignment`` and ``uniformity`` (Wang & Isola 2020) when two or more views are given.

Under ``torch.distributed`` the views of all ranks are gathered first (any per-rank batch
sizes), so every rank computes the metrics of the global batch.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from fastssl import metrics
from fastssl._checks import check_int, check_tensor


class CollapseWarning(UserWarning):
    """Issued by :class:`CollapseMonitor` when a representation collapses."""


@dataclass
class CollapseThresholds:
    """When :class:`CollapseMonitor` warns.

    Fields:

    * ``min_normalized_std``: total collapse when ``std_of_l2_normalized · √d`` falls below
      this (about 1 for spread embeddings, 0 when every sample maps to one point).
    * ``max_center_vector_norm``: total collapse when the mean normalized embedding is longer
      than this (1 when every embedding points the same way).
    * ``min_rank_fraction``, ``min_entropy_rank``: dimensional collapse when the entropy rank
      is below ``max(min_entropy_rank, min_rank_fraction · min(d, N - 1))``, where
      ``min(d, N - 1)`` is the largest rank a centered batch of N rows can show.
    """

    min_normalized_std: float = 0.05
    max_center_vector_norm: float = 0.95
    min_rank_fraction: float = 0.02
    min_entropy_rank: float = 1.5


def _gather_rows(z: Tensor) -> Tensor:
    """Concatenate every rank's rows (any per-rank row count); no gradient."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return z
    world = dist.get_world_size()
    count = torch.tensor([z.shape[0]], device=z.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]  # a diagnostic, not a loss: one sync is fine here
    padded = z.new_zeros((max(sizes),) + tuple(z.shape[1:]))
    padded[: z.shape[0]] = z
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes)], dim=0)


class CollapseMonitor:
    """Running collapse diagnostics with one-time warnings.

    Args:
        every: compute the metrics on every ``every``-th call of :meth:`update` (or, when a
            ``step`` is passed, on steps divisible by ``every``).
        warmup_steps: no warning before this step (randomly initialized networks often look
            collapsed: ReLU features are all positive, so their center-vector norm is near 1).
        thresholds: :class:`CollapseThresholds`; the defaults flag only clear collapse.
        warn: issue :class:`CollapseWarning` (once per kind of collapse).
        gather_distributed: gather the views of every rank under ``torch.distributed``.
        max_rows: metrics use at most this many rows per view (the first ones), bounding the
            cost of the spectrum to O(max_rows² · d).

    Attributes:
        history: one dict of metric values (Python floats, plus ``"step"``) per monitored step.
        spectrum: the covariance eigenvalues (descending, float32, CPU) of the last monitored step.
    """

    def __init__(
        self,
        every: int = 1,
        warmup_steps: int = 100,
        thresholds: Optional[CollapseThresholds] = None,
        warn: bool = True,
        gather_distributed: bool = True,
        max_rows: int = 4096,
    ) -> None:
        self.every = check_int("every", every, minimum=1)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, minimum=0)
        self.max_rows = check_int("max_rows", max_rows, minimum=2)
        self.thresholds = thresholds if thresholds is not None else CollapseThresholds()
        self.warn = bool(warn)
        self.gather_distributed = bool(gather_distributed)
        self.history: List[Dict[str, float]] = []
        self.spectrum: Optional[Tensor] = None
        self.warned: Dict[str, str] = {}
        self._calls = 0

    def update(self, *views: Tensor, step: Optional[int] = None) -> Optional[Dict[str, float]]:
        """Feed the embeddings of one step: one or more (N, d) tensors (the views of a batch).

        Returns the metrics (a dict of floats) on monitored steps, else ``None``.
        """
        if not views:
            raise ValueError("update() needs at least one (N, d) embedding tensor")
        for i, view in enumerate(views):
            check_tensor(f"views[{i}]", view)
        if step is None:
            step = self._calls
        self._calls += 1
        if step % self.every:
            return None
        values = self.compute(*views)
        values["step"] = float(step)
        self.history.append(values)
        if self.warn and step >= self.warmup_steps:
            self._check(values, step)
        return values

    @torch.no_grad()
    def compute(self, *views: Tensor) -> Dict[str, float]:
        """The metrics of one batch of views (no history, no warning)."""
        rows = min(self.max_rows, min(view.shape[0] for view in views))
        prepared = []
        for view in views:
            view = view.detach()[:rows]
            if self.gather_distributed:
                view = _gather_rows(view)
            prepared.append(view)
        first = prepared[0]
        n, d = first.shape
        per_view = [self._single_view(view) for view in prepared]
        values = {key: sum(v[key] for v in per_view) / len(per_view) for key in per_view[0]}
        values["max_rank"] = float(max(min(d, n - 1), 0))
        if len(prepared) >= 2:
            values["alignment"] = float(metrics.alignment(prepared[0], prepared[1]))
        if n >= 2:
            values["uniformity"] = float(metrics.uniformity(first))
        self.spectrum = metrics.covariance_eigenvalues(first).float().cpu()
        return values

    @staticmethod
    def _single_view(z: Tensor) -> Dict[str, float]:
        d = z.shape[1]
        out = {
            "center_vector_norm": float(metrics.center_vector_norm(z)),
            "stable_rank": float(metrics.stable_rank(z)),
            "entropy_rank": float(metrics.entropy_rank(z)),
        }
        out["normalized_std"] = (
            float(metrics.std_of_l2_normalized(z)) * math.sqrt(d) if z.shape[0] >= 2 else float("nan")
        )
        return out

    def _check(self, values: Dict[str, float], step: int) -> None:
        t = self.thresholds
        total = None
        if values["normalized_std"] < t.min_normalized_std:
            total = (
                f"std of the L2-normalized embeddings × √d = {values['normalized_std']:.4g} "
                f"< {t.min_normalized_std:g}"
            )
        elif values["center_vector_norm"] > t.max_center_vector_norm:
            total = f"center-vector norm = {values['center_vector_norm']:.4g} > {t.max_center_vector_norm:g}"
        if total is not None:
            self._warn_once(
                "total",
                f"step {step}: total collapse: {total}. The embeddings of different images are "
                "(nearly) the same point; the loss can still decrease. Typical causes: a missing "
                "variance/contrastive term, stop-gradient or predictor, or too high a learning rate.",
            )
        limit = max(t.min_entropy_rank, t.min_rank_fraction * values["max_rank"])
        if total is None and values["entropy_rank"] < limit:
            self._warn_once(
                "dimensional",
                f"step {step}: dimensional collapse: entropy rank = {values['entropy_rank']:.4g} < "
                f"{limit:.4g} (of at most {values['max_rank']:.0f} directions; stable rank "
                f"{values['stable_rank']:.4g}). The embeddings span only a few directions; "
                "a covariance/decorrelation term or a wider projector usually helps.",
            )

    def _warn_once(self, kind: str, message: str) -> None:
        if kind in self.warned:
            return
        self.warned[kind] = message
        warnings.warn(message, CollapseWarning, stacklevel=4)

    def state_dict(self) -> Dict[str, object]:
        """History and warnings, to resume monitoring with a training checkpoint."""
        return {"history": list(self.history), "warned": dict(self.warned), "calls": self._calls}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        self.history = list(state["history"])  # type: ignore[arg-type]
        self.warned = dict(state["warned"])  # type: ignore[arg-type]
        self._calls = int(state["calls"])  # type: ignore[arg-type]


__all__ = ["CollapseMonitor", "CollapseThresholds", "CollapseWarning"]
