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
