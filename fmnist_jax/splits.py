"""The dataset splits placed on devices, and evaluation over them."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fmnist_jax import augment, batches, distributed
from fmnist_jax.config import TrainConfig
from fmnist_jax.data import Dataset
from fmnist_jax.distributed import to_global
from fmnist_jax.errors import ConfigError
from fmnist_jax.steps import TrainState, eval_batches

# Small enough that the convolutions' patch buffers stay in the CPU cache.
EVAL_BATCH_SIZE = 200


@dataclasses.dataclass
class Splits:
    """Device-resident uint8 images and int32 labels of each split."""

    train: tuple[jax.Array, jax.Array]  # (N, 28, 28) uint8 images, (N,) int32 labels
    val: tuple[jax.Array, ...] | None  # stacked for `evaluate`
    test: tuple[jax.Array, ...]
    # `augment.precompute` of the training images for the config's augmentation.
    train_precomputed: tuple[jax.Array, ...] = ()


def place_splits(dataset: Dataset, config: TrainConfig, mesh: Mesh) -> Splits:
    train_images, train_labels = dataset.train_images, dataset.train_labels
    if config.train_examples:
        train_images = train_images[:config.train_examples]
        train_labels = train_labels[:config.train_examples]
    if config.val_split >= len(train_images):
        raise ConfigError(f"invalid --val-split {config.val_split}: it must leave training examples "
                          f"out of the {len(train_images)} available")
    train_idx, val_idx = batches.split_validation(len(train_images), config.val_split)
    replicated = distributed.replicated(mesh)
    # Each device evaluates its share of every batch when the devices divide the batch.
    eval_sharding = replicated
    if EVAL_BATCH_SIZE % mesh.size == 0:
        eval_sharding = NamedSharding(mesh, PartitionSpec(None, distributed.DATA_AXIS))

    val = None
    if config.val_split:
        val = stack_for_eval(train_images[val_idx], train_labels[val_idx], eval_sharding)
    train = to_global((train_images[train_idx], train_labels[train_idx].astype(np.int32)),
                      replicated)
    return Splits(
        train=train,
        val=val,
        test=stack_for_eval(dataset.test_images, dataset.test_labels, eval_sharding),
        train_precomputed=augment.precompute(config.augment, train[0]),
    )


def evaluate(state: TrainState, eval_set: tuple[jax.Array, ...]) -> dict[str, float]:
    """Return the mean loss and accuracy of `state` on a set built by `stack_for_eval`."""
    totals = jax.device_get(eval_batches(state, *eval_set))
    count = int(totals["count"])
    return {"loss": float(totals["loss_sum"]) / count, "accuracy": int(totals["correct"]) / count}


def stack_for_eval(images: np.ndarray, labels: np.ndarray,
                   sharding: NamedSharding) -> tuple[jax.Array, ...]:
    """Pad to whole batches and stack as (N, EVAL_BATCH_SIZE, ...) with a mask of real rows."""
    batches_needed = -(-len(images) // EVAL_BATCH_SIZE)
    pad = batches_needed * EVAL_BATCH_SIZE - len(images)
    images = np.pad(images, ((0, pad), (0, 0), (0, 0)))
    labels = np.pad(labels.astype(np.int32), (0, pad))
    mask = np.arange(len(labels)) < len(labels) - pad
    stacked = [array.reshape(batches_needed, EVAL_BATCH_SIZE, *array.shape[1:])
               for array in (images, labels, mask)]
    return to_global(tuple(stacked), sharding)
