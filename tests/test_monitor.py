"""CollapseMonitor (plain PyTorch) and its Lightning callback."""

from __future__ import annotations

import math
import os
import socket
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastssl import metrics
from fastssl.monitor import CollapseMonitor, CollapseThresholds, CollapseWarning


def _spread(n: int = 256, d: int = 32) -> torch.Tensor:
    return torch.randn(n, d)


def _collapsed(n: int = 256, d: int = 32) -> torch.Tensor:
    """Every sample at the same point, up to 1e-4 noise: total collapse."""
    return torch.randn(1, d).expand(n, d) + 1e-4 * torch.randn(n, d)


def _rank_one(n: int = 256, d: int = 32) -> torch.Tensor:
    """Spread along a single centered direction: dimensional collapse without total collapse."""
    return torch.randn(n, 1) * torch.randn(1, d) + 1e-4 * torch.randn(n, d)


def test_healthy_embeddings_give_no_warning_and_expected_values():
    monitor = CollapseMonitor(warmup_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapseWarning)
        values = monitor.update(_spread(), _spread(), step=0)
    assert values["normalized_std"] == pytest.approx(1.0, abs=0.1)
    assert values["center_vector_norm"] < 0.2  # about 1/sqrt(256) for isotropic rows
    assert values["entropy_rank"] > 20
    assert values["max_rank"] == 32
    assert 0 < values["alignment"] < 4 and values["uniformity"] < 0
    assert monitor.spectrum.shape == (32,) and monitor.spectrum[0] >= monitor.spectrum[-1]
    assert monitor.history == [values]


def test_total_collapse_warns_once_naming_the_metric_and_threshold():
    monitor = CollapseMonitor(warmup_steps=0)
    with pytest.warns(CollapseWarning, match=r"total collapse: std of the L2-normalized .* < 0\.05"):
        monitor.update(_collapsed(), step=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapseWarning)
        monitor.update(_collapsed(), step=1)  # once per kind
    assert set(monitor.warned) == {"total"}
    assert len(monitor.history) == 2 and monitor.history[-1]["step"] == 1


def test_center_vector_norm_alone_flags_total_collapse():
    monitor = CollapseMonitor(warmup_steps=0, thresholds=CollapseThresholds(min_normalized_std=0.0))
    with pytest.warns(CollapseWarning, match=r"center-vector norm = 0\.9\d* > 0\.95|center-vector norm = 1"):
        monitor.update(_collapsed())


def test_dimensional_collapse_is_told_apart_from_total_collapse():
    monitor = CollapseMonitor(warmup_steps=0)
    with pytest.warns(CollapseWarning, match=r"dimensional collapse: entropy rank = 1(\.\d+)? < 1\.5"):
        values = monitor.update(_rank_one())
    assert "total" not in monitor.warned
    assert values["normalized_std"] > 0.5


def test_warmup_and_every():
    monitor = CollapseMonitor(every=3, warmup_steps=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapseWarning)
        results = [monitor.update(_collapsed(64, 8)) for _ in range(6)]
    assert [r is not None for r in results] == [True, False, False, True, False, False]
    with pytest.warns(CollapseWarning):
        monitor.update(_collapsed(64, 8))  # call 6: monitored and past the warm-up
    state = monitor.state_dict()
    fresh = CollapseMonitor(every=3, warmup_steps=6)
    fresh.load_state_dict(state)
    assert fresh.history == monitor.history and fresh.warned == monitor.warned


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_views_and_n_smaller_than_d(dtype):
    z = torch.randn(12, 300)
    values = CollapseMonitor(warmup_steps=0).update(z.to(dtype))
    assert values["stable_rank"] == pytest.approx(metrics.stable_rank(z).item(), rel=2e-2)
    assert values["max_rank"] == 11


def test_bad_input_is_rejected():
    monitor = CollapseMonitor()
    with pytest.raises(ValueError, match="at least one"):
        monitor.update()
    with pytest.raises((ValueError, TypeError)):
        monitor.update(torch.randn(8))
    with pytest.raises((ValueError, TypeError)):
        CollapseMonitor(every=0)


# ---------------------------------------------------------------------------------------------
# torch.distributed: every rank sees the metrics of the global batch, for any per-rank sizes.
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank: int, world: int, port: int, sizes, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        full = torch.randn(sum(sizes), 16)
        start = sum(sizes[:rank])
        values = CollapseMonitor(warn=False).compute(full[start : start + sizes[rank]])
        torch.save(values, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_metrics_equal_the_global_batch_for_unequal_splits():
    sizes = [5, 11]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_distributed_worker, args=(2, _free_port(), sizes, out_dir), nprocs=2)
        torch.manual_seed(0)
        expected = CollapseMonitor(warn=False).compute(torch.randn(sum(sizes), 16))
        for rank in range(2):
            got = torch.load(os.path.join(out_dir, f"rank{rank}.pt"))
            for key, value in expected.items():
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


# ---------------------------------------------------------------------------------------------
# Lightning: a real Trainer.fit on CPU.
# ---------------------------------------------------------------------------------------------

lightning = pytest.importorskip("lightning", reason="lightning is not installed")


class _TinySSL(lightning.LightningModule):
    """Two noisy views through a linear encoder; `collapse=True` makes the encoder constant."""

    def __init__(self, collapse: bool) -> None:
        super().__init__()
        self.encoder = torch.nn.Linear(8, 16)
        self.collapse = collapse

    def training_step(self, batch, batch_idx):
        (x,) = batch
        z0 = self.encoder(x + 0.1 * torch.randn_like(x))
        z1 = self.encoder(x + 0.1 * torch.randn_like(x))
        if self.collapse:
            z0 = 0 * z0 + self.encoder.bias
            z1 = 0 * z1 + self.encoder.bias
        loss = (z0 - z1).pow(2).mean() + 1e-3 * z0.pow(2).mean()
        return {"loss": loss, "embeddings": (z0, z1)}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(collapse: bool, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from fastssl.lightning import CollapseMonitorCallback

    data = torch.utils.data.TensorDataset(torch.randn(64, 8))
    callback = CollapseMonitorCallback(every_n_steps=2, warmup_steps=0)
    trainer = lightning.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=CSVLogger(str(tmp_path)),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(_TinySSL(collapse), torch.utils.data.DataLoader(data, batch_size=32))
    return callback, trainer


def test_lightning_callback_logs_to_the_trainer_loggers(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapseWarning)
        callback, trainer = _fit(collapse=False, tmp_path=tmp_path)
    # on_train_batch_end sees the global step after the optimizer step: 2 and 4 of 4.
    assert [h["step"] for h in callback.monitor.history] == [2.0, 4.0]
    trainer.logger.save()
    text = open(os.path.join(trainer.logger.log_dir, "metrics.csv")).read()
    assert "collapse/stable_rank" in text and "collapse/center_vector_norm" in text


def test_lightning_callback_warns_on_a_collapsing_run(tmp_path):
    with pytest.warns(CollapseWarning, match="total collapse"):
        callback, _ = _fit(collapse=True, tmp_path=tmp_path)
    assert "total" in callback.monitor.warned
    assert math.isclose(callback.monitor.history[-1]["center_vector_norm"], 1.0, rel_tol=1e-4)
