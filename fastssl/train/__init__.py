"""The pretraining driver, ``python -m fastssl.train`` (user guide: docs/training.md).

>>> from fastssl.train import TrainConfig, run
>>> summary = run(TrainConfig(method="simclr", epochs=2))  # doctest: +SKIP
"""

from fastssl.train.cli import main
from fastssl.train.config import ConfigError, TrainConfig, parse_args


def run(cfg: TrainConfig):
    """Train and evaluate as configured; returns the summary dictionary."""
    from fastssl.train.config import validate
    from fastssl.train.loop import run as _run

    validate(cfg)
    return _run(cfg)


__all__ = ["ConfigError", "TrainConfig", "main", "parse_args", "run"]
