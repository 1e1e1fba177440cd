"""Command-line pieces that `scripts/train.py` and `scripts/benchmark.py` share."""

from __future__ import annotations

import argparse
import logging
from typing import Any

# One row per config flag: (flag, TrainConfig field, argparse type, help text).
ConfigFlag = tuple[str, str, type, str]


def configure_logging() -> None:
    """Log INFO and above as bare messages, and only warnings from JAX, absl and Orbax."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    for noisy in ("absl", "jax._src.xla_bridge", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def config_overrides(args: argparse.Namespace, flags: list[ConfigFlag]) -> dict[str, Any]:
    """Return the config fields that the command line set, leaving out unset flags."""
    return {field: getattr(args, field) for _, field, _, _ in flags
            if getattr(args, field) is not None}
