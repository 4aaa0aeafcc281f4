"""PNG plots of a run (matplotlib with the Agg backend; skipped with a warning without it).

``plots/loss.png``, ``knn_top1.png``, ``stable_rank.png``, ``center_vector_norm.png`` over the
epochs of ``metrics.jsonl``, and ``spectrum.png``: the eigenvalues of the covariance of the
final held-out embeddings on a log scale (a cliff marks dimensional collapse).
"""

from __future__ import annotations

import os
import warnings
from typing import Dict, List, Optional, Sequence

CURVES = (
    ("loss", "training loss"),
    ("knn_top1", "kNN top-1 (held-out)"),
    ("stable_rank", "stable rank of the embeddings"),
    ("center_vector_norm", "center-vector norm"),
)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_plots(records: Sequence[Dict], spectrum: Optional[Sequence[float]], out_dir: str, title: str = "") -> List[str]:
    """Write the PNGs into ``out_dir``; returns the paths written ([] without matplotlib)."""
    plt = _pyplot()
    if plt is None:
        warnings.warn("matplotlib is not installed: no plots written (pip install matplotlib)", RuntimeWarning, stacklevel=2)
        return []
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for key, label in CURVES:
        points = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(f"{title} {label}".strip(), fontsize=9)
        ax.grid(alpha=0.3)
        fig.subplots_adjust(left=0.17, right=0.97, bottom=0.15, top=0.9)
        path = os.path.join(out_dir, f"{key}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    if spectrum is not None and len(spectrum):
        values = [max(float(v), 1e-12) for v in spectrum]
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.semilogy(range(1, len(values) + 1), values)
        ax.set_xlabel("eigenvalue index")
        ax.set_ylabel("covariance eigenvalue")
        ax.set_title(f"{title} spectrum of the final embeddings".strip(), fontsize=9)
        ax.grid(alpha=0.3)
        fig.subplots_adjust(left=0.17, right=0.97, bottom=0.15, top=0.9)
        path = os.path.join(out_dir, "spectrum.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _integer_epochs(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")


def write_dashboard(
    records: Sequence[Dict],
    step_losses: Sequence[Sequence[float]],
    initial_spectrum: Optional[Sequence[float]],
    final_spectrum: Optional[Sequence[float]],
    path: str,
    title: str = "",
    num_classes: Optional[int] = None,
    dpi: int = 150,
) -> Optional[str]:
    """One figure of a run, six panels: training loss per step; kNN top-1 with the chance and
    untrained levels; stable and entropy rank; center-vector norm; std of the normalized
    embeddings with its healthy level 1/sqrt(d); covariance spectrum untrained vs final.
    Epoch axes have integer ticks. Returns the path, or None without matplotlib.
    """
    plt = _pyplot()
    if plt is None:
        warnings.warn("matplotlib is not installed: no dashboard written (pip install matplotlib)", RuntimeWarning, stacklevel=2)
        return None
    evals = [r for r in records if r.get("knn_top1") is not None]
    epochs = [r["epoch"] for r in evals]
    steps_per_epoch = None
    trained = [r for r in evals if r["epoch"] > 0 and r.get("step")]
    if trained:
        steps_per_epoch = trained[0]["step"] / trained[0]["epoch"]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.2))
    (ax_loss, ax_knn, ax_rank), (ax_center, ax_std, ax_spec) = axes

    # 1. loss per step (x in epochs), epoch means as dots
    if step_losses and steps_per_epoch:
        xs = [s / steps_per_epoch for s, _ in step_losses]
        ax_loss.plot(xs, [v for _, v in step_losses], lw=0.8, alpha=0.7, label="per step")
    means = [(r["epoch"], r["loss"]) for r in evals if r.get("loss") is not None]
    if means:
        ax_loss.plot([m[0] for m in means], [m[1] for m in means], "o-", ms=4, label="epoch mean")
    ax_loss.set_title("training loss")
    ax_loss.legend(fontsize=7)
    # 2. kNN
    knn = [r["knn_top1"] for r in evals]
    ax_knn.plot(epochs, knn, "o-", ms=4, label="kNN top-1")
    if evals:
        ax_knn.axhline(evals[0]["knn_top1"], color="tab:red", ls="--", lw=1, label=f"untrained ({evals[0]['knn_top1']:.3f})")
    if num_classes:
        ax_knn.axhline(1.0 / num_classes, color="gray", ls=":", lw=1, label=f"chance ({1.0 / num_classes:.2f})")
    probe = [r.get("linear_probe_top1") for r in evals if r.get("linear_probe_top1") is not None]
    if probe:
        ax_knn.plot([evals[-1]["epoch"]], probe[-1:], "s", color="tab:green", label=f"linear probe ({probe[-1]:.3f})")
    ax_knn.set_title("held-out accuracy")
    ax_knn.legend(fontsize=7)
    # 3. ranks
    ax_rank.plot(epochs, [r.get("stable_rank") for r in evals], "o-", ms=4, label="stable rank")
    ax_rank.plot(epochs, [r.get("entropy_rank") for r in evals], "s-", ms=4, label="entropy rank")
    ax_rank.set_title("rank of the embeddings")
    ax_rank.legend(fontsize=7)
    # 4. center-vector norm
    ax_center.plot(epochs, [r.get("center_vector_norm") for r in evals], "o-", ms=4, color="tab:purple")
    ax_center.set_ylim(0, 1.05)
    ax_center.axhline(1.0, color="gray", ls=":", lw=1)
    ax_center.set_title("center-vector norm (1 = all embeddings aligned)")
    # 5. std of the normalized embeddings
    ax_std.plot(epochs, [r.get("std_of_l2_normalized") for r in evals], "o-", ms=4, color="tab:orange")
    dim = len(final_spectrum or initial_spectrum or [])
    if dim:
        ax_std.axhline(dim ** -0.5, color="gray", ls=":", lw=1, label=f"1/sqrt(d), d = {dim}")
        ax_std.legend(fontsize=7)
    ax_std.set_ylim(bottom=0)
    ax_std.set_title("std of normalized embeddings (0 = collapse)")
    for ax in (ax_loss, ax_knn, ax_rank, ax_center, ax_std):
        _integer_epochs(ax)
        ax.grid(alpha=0.3)
    # 6. spectrum
    for spectrum, label in ((initial_spectrum, "untrained"), (final_spectrum, "final")):
        if spectrum:
            # Structural zeros (d > N) and round-off below 1e-9 of the top would only stretch the axis.
            top = max(float(v) for v in spectrum)
            values = [float(v) for v in spectrum if float(v) > top * 1e-9] if top > 0 else []
            if values:
                ax_spec.semilogy(range(1, len(values) + 1), values, label=label)
    ax_spec.set_xlabel("eigenvalue index")
    ax_spec.set_title("covariance spectrum of the embeddings")
    ax_spec.grid(alpha=0.3)
    ax_spec.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
