"""Collapse monitoring as a PyTorch Lightning callback.

>>> from lightning.pytorch import Trainer
>>> from fastssl.lightning import CollapseMonitorCallback
>>> trainer = Trainer(callbacks=[CollapseMonitorCallback(every_n_steps=50)])

The callback reads the embeddings of each training step from what ``training_step`` returns —
a dict with the key ``"embeddings"`` (default), whose value is one (N, d) tensor or a
tuple/list of views — or, when the output has no such key, from the LightningModule attribute
of the same name (set ``self.embeddings = (z0, z1)`` in ``training_step``). Every
``every_n_steps`` global steps it computes the metrics of :class:`fastssl.monitor.CollapseMonitor`,
logs them as ``collapse/<metric>`` to every logger the Trainer has (TensorBoard, CSV, wandb, ...)
and warns once when the representation collapses. Lightning itself is imported only when the
callback module is imported, so ``import fastssl`` does not need it.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from fastssl.monitor import CollapseMonitor, CollapseThresholds


try:  # Lightning 2.x ships as "lightning"; older installs as "pytorch_lightning"
    from lightning.pytorch.callbacks import Callback as _Callback
except ImportError:  # pragma: no cover - depends on the environment
    try:
        from pytorch_lightning.callbacks import Callback as _Callback
    except ImportError:
        _Callback = object  # the class below then refuses to be created


def _as_views(value: Any) -> Optional[Sequence[torch.Tensor]]:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(value)
    raise TypeError(
        "the embeddings for CollapseMonitorCallback must be a tensor or a list/tuple of (N, d) "
        f"tensors, got {type(value).__name__}"
    )


class CollapseMonitorCallback(_Callback):  # type: ignore[misc, valid-type]
    """A Lightning ``Callback`` that monitors collapse (see the module docstring).

    Args:
        every_n_steps: monitor on global steps divisible by this.
        key: output key / module attribute holding the embeddings.
        warmup_steps, thresholds, warn: as in :class:`fastssl.monitor.CollapseMonitor`.
        prefix: prefix of the logged metric names.

    Attributes:
        monitor: the :class:`~fastssl.monitor.CollapseMonitor` (history, last spectrum).
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        key: str = "embeddings",
        warmup_steps: int = 100,
        thresholds: Optional[CollapseThresholds] = None,
        warn: bool = True,
        prefix: str = "collapse/",
    ) -> None:
        if _Callback is object:
            raise ImportError("CollapseMonitorCallback needs PyTorch Lightning: pip install lightning")
        super().__init__()
        self.key = key
        self.prefix = prefix
        self.monitor = CollapseMonitor(
            every=every_n_steps, warmup_steps=warmup_steps, thresholds=thresholds, warn=warn
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.monitor.every:
            return
        found = outputs.get(self.key) if isinstance(outputs, dict) else None
        if found is None:
            found = getattr(pl_module, self.key, None)
        views = _as_views(found)
        if views is None:
            return
        values = self.monitor.update(*views, step=step)
        if values is None:
            return
        logged = {f"{self.prefix}{name}": value for name, value in values.items() if name != "step"}
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=step)

    def state_dict(self) -> dict:
        return self.monitor.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.monitor.load_state_dict(state_dict)


__all__ = ["CollapseMonitorCallback"]
