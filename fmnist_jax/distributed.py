"""Devices and processes: the data mesh, global arrays, and multi-process start-up.

One code path serves 1 CPU, 8 TPU cores, N GPUs and several hosts: the state is
replicated over a 1-D mesh named "data", and each batch is split along it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fmnist_jax.errors import ConfigError

logger = logging.getLogger(__name__)

DATA_AXIS = "data"


def initialize_from_env() -> None:
    """Join a multi-process job when JAX_COORDINATOR_ADDRESS is set; do nothing otherwise.

    The job also needs JAX_NUM_PROCESSES and JAX_PROCESS_ID (0 to N-1) in every process.
    """
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not address or jax.distributed.is_initialized():
        return
    try:
        processes = int(os.environ["JAX_NUM_PROCESSES"])
        process_id = int(os.environ["JAX_PROCESS_ID"])
    except (KeyError, ValueError) as error:
        raise ConfigError(
            f"JAX_COORDINATOR_ADDRESS is set to {address!r}, but JAX_NUM_PROCESSES and "
            "JAX_PROCESS_ID are missing or not integers; set both in every process") from error
    jax.distributed.initialize(address, processes, process_id)
    logger.info("process %d of %d joined the job at %s", process_id, processes, address)


def make_mesh() -> Mesh:
    """Return a 1-D mesh over every device of every process."""
    return Mesh(np.array(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Return the sharding of a (steps, batch) index array: split along the batch."""
    return NamedSharding(mesh, PartitionSpec(None, DATA_AXIS))


def to_global(tree: Any, sharding: NamedSharding) -> Any:
    """Place host or device values as global arrays with `sharding`.

    Every process passes the same full values and contributes only the shards of
    its own devices, which works alike with one process and with many.
    """

    def place(value: Any) -> jax.Array:
        host = np.asarray(value)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, tree)


def is_primary() -> bool:
    """Return whether this process reports progress, draws plots and holds the run lock."""
    return jax.process_index() == 0
