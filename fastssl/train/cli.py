"""``python -m fastssl.train``: parse the configuration, run, report errors without a traceback."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from fastssl.train.config import ConfigError, parse_args
from fastssl.train.data import DataError


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the process exit code (2 for a configuration or data error)."""
    try:
        cfg = parse_args(argv)
        from fastssl.train.loop import run

        run(cfg)
    except (ConfigError, DataError) as e:
        print(f"python -m fastssl.train: error: {e}", file=sys.stderr)
        return 2
    return 0
