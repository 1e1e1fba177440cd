"""The batch order as a pure function of (seed, epoch, step), and the validation split.

Nothing here keeps state: a run restored at any step recomputes the same order
from the config, so checkpoints need no data-iterator state.
"""

from __future__ import annotations

import numpy as np

# Seed of the validation split. It stays fixed across training seeds, so runs with
# different seeds are compared on the same held-out examples.
VALIDATION_SEED = 20170825


def split_validation(num_examples: int, val_split: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (train indices, validation indices), holding out `val_split` examples at random."""
    order = np.random.default_rng(VALIDATION_SEED).permutation(num_examples)
    return np.sort(order[val_split:]), np.sort(order[:val_split])


def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """Return the shuffled example positions, int32 of length `num_examples`, for one epoch."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples).astype(np.int32)


def chunk_indices(order: np.ndarray, position: int, num_steps: int, batch_size: int,
                  rows: int) -> np.ndarray:
    """Return (rows, batch_size) positions for steps `position` to `position + num_steps` of an epoch.

    Rows past `num_steps` are zero padding, so every chunk has the same shape and
    the compiled loop is reused.
    """
    chunk = np.zeros((rows, batch_size), np.int32)
    first, last = position * batch_size, (position + num_steps) * batch_size
    chunk[:num_steps] = order[first:last].reshape(num_steps, batch_size)
    return chunk
