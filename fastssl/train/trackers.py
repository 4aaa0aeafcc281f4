"""Optional experiment trackers fed from the records of ``metrics.jsonl``.

Every evaluation record the loop appends to ``metrics.jsonl`` (and the per-step training
losses) is also handed to the trackers that are available:

* TensorBoard (``torch.utils.tensorboard``, needs the ``tensorboard`` package): scalars under
  ``<run>/tensorboard``, written by default when the package is installed (``--no-tensorboard``
  turns it off). View with ``tensorboard --logdir runs``.
* Weights & Biases: only with ``--wandb`` (and ``wandb`` installed); the project is
  ``--wandb-project``, and ``WANDB_MODE=offline`` / ``disabled`` work as usual.

A tracker that is asked for but not installed is reported once and skipped: tracking never
stops a run.

>>> trackers = Trackers.create(cfg, "runs/x")        # doctest: +SKIP
>>> trackers.log_record({"epoch": 1, "knn_top1": 0.5, "step": 31})  # doctest: +SKIP
>>> trackers.close()                                  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, Dict, List, Optional

# Record keys that are bookkeeping, not curves.
_NOT_SCALARS = ("epoch", "step", "spectrum")


def scalars_of(record: Dict[str, Any]) -> Dict[str, float]:
    """The finite numeric entries of a record, as ``eval/<key>`` (``loss``: ``train/epoch_loss``)."""
    out: Dict[str, float] = {}
    for key, value in record.items():
        if key in _NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(float(value)):
            continue
        name = "train/epoch_loss" if key == "loss" else ("train/lr" if key == "lr" else f"eval/{key}")
        out[name] = float(value)
    return out


class Trackers:
    """The TensorBoard writer and/or wandb run of a training run (either may be absent)."""

    def __init__(self, tensorboard: Any = None, wandb_run: Any = None) -> None:
        self.tensorboard = tensorboard
        self.wandb_run = wandb_run

    @property
    def active(self) -> List[str]:
        return [name for name, t in (("tensorboard", self.tensorboard), ("wandb", self.wandb_run)) if t is not None]

    @classmethod
    def create(cls, cfg: Any, out_dir: str, resume: bool = False) -> "Trackers":
        """Open what ``cfg`` asks for and the environment has (main process only)."""
        tensorboard = None
        if getattr(cfg, "tensorboard", False):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception:  # tensorboard not installed (ImportError) or broken
                SummaryWriter = None
            if SummaryWriter is not None:
                tensorboard = SummaryWriter(log_dir=os.path.join(out_dir, "tensorboard"))
        wandb_run = None
        if getattr(cfg, "wandb", False):
            try:
                import wandb
            except ImportError:
                warnings.warn("--wandb: wandb is not installed (pip install wandb); not logging to it", RuntimeWarning, stacklevel=2)
            else:
                wandb_run = wandb.init(
                    project=cfg.wandb_project,
                    name=os.path.basename(os.path.normpath(out_dir)),
                    dir=out_dir,
                    config=cfg.to_dict(),
                    resume="allow" if resume else None,
                )
        return cls(tensorboard, wandb_run)

    def log_step(self, step: int, loss: float, lr: float) -> None:
        """A training step's loss and learning rate (called at the progress refresh)."""
        if self.tensorboard is not None:
            self.tensorboard.add_scalar("train/loss", loss, step)
            self.tensorboard.add_scalar("train/lr_step", lr, step)
        if self.wandb_run is not None:
            self.wandb_run.log({"train/loss": loss, "train/lr_step": lr}, step=step)

    def log_record(self, record: Dict[str, Any]) -> None:
        """One line of ``metrics.jsonl`` (an evaluation after an epoch)."""
        scalars = scalars_of(record)
        step = int(record.get("step") or 0)
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.add_scalar("eval/epoch", float(record["epoch"]), step)
            self.tensorboard.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(dict(scalars, epoch=record["epoch"]), step=step)

    def close(self, summary: Optional[Dict[str, Any]] = None) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            if summary:
                for key, value in scalars_of(summary.get("final", {})).items():
                    self.wandb_run.summary[key.replace("eval/", "final/")] = value
            self.wandb_run.finish()
