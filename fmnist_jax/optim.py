"""Optimizers and learning-rate schedules built from a `TrainConfig`.

The optax transform here computes only the update direction. The learning rate
is applied by `TrainState.apply_gradients` from a schedule of `state.step`, so the
schedule never keeps a step counter of its own and never restarts at 0 when the
optimizer is rebuilt on resume.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import optax

from fmnist_jax.config import TrainConfig

# One-cycle warmup starts at the peak learning rate divided by this.
WARMUP_START_DIVISOR = 25.0
# The step schedule multiplies the learning rate by this at 1/2 and 3/4 of the segment.
STEP_DECAY_FACTOR = 0.1

Schedule = Callable[[jnp.ndarray], jnp.ndarray]


def family(optimizer: str) -> str:
    """Return the name of the optimizer-state layout; a resume keeps the state within a family."""
    return "adam" if optimizer in ("adam", "adamw") else optimizer


def build_direction(config: TrainConfig) -> optax.GradientTransformation:
    """Return the transform that turns gradients into an update direction, before the learning rate."""
    if family(config.optimizer) == "adam":
        # adam and adamw share one state layout, so moments survive a switch between them.
        return optax.chain(optax.scale_by_adam(),
                           optax.add_decayed_weights(config.weight_decay))
    if config.optimizer == "sgd":
        return optax.chain(optax.add_decayed_weights(config.weight_decay),
                           optax.trace(decay=config.momentum))
    raise ValueError(f"unknown optimizer {config.optimizer!r}")


def build_schedule(config: TrainConfig, start_step: int, steps_per_epoch: int) -> Schedule:
    """Return the learning rate as a function of the global step for a segment starting at `start_step`.

    The schedule's shape spans from `start_step` to the end of `config.epochs`, so
    a resume that changes it decays over the steps that remain.
    """
    total_steps = config.epochs * steps_per_epoch
    length = max(total_steps - start_step, 1)
    lr = config.lr
    if config.schedule == "constant":
        base = optax.constant_schedule(lr)
    elif config.schedule == "cosine":
        base = optax.cosine_decay_schedule(lr, decay_steps=length)
    elif config.schedule == "warmup_cosine":
        # At most half the segment, so that a short segment still decays towards 0.
        warmup = min(round(config.warmup_epochs * steps_per_epoch), length // 2)
        base = optax.warmup_cosine_decay_schedule(
            init_value=lr / WARMUP_START_DIVISOR, peak_value=lr, warmup_steps=warmup,
            decay_steps=length, end_value=0.0)
    elif config.schedule == "step":
        # In a segment of under 4 steps both boundaries fall on one step, which then decays twice.
        factors: dict[int, float] = {}
        for boundary in (length // 2, (3 * length) // 4):
            factors[boundary] = factors.get(boundary, 1.0) * STEP_DECAY_FACTOR
        base = optax.piecewise_constant_schedule(lr, factors)
    else:
        raise ValueError(f"unknown schedule {config.schedule!r}")

    def schedule(step: jnp.ndarray) -> jnp.ndarray:
        return jnp.asarray(base(step - start_step), jnp.float32)

    return schedule
