"""The train state and the pure, jitted step functions.

Nothing here logs, reads files or keeps state between calls: each function maps
arrays to arrays, so the same inputs give bitwise the same outputs.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state

from fmnist_jax import augment
from fmnist_jax.model import CNN
from fmnist_jax.optim import Schedule

Batch = dict[str, jax.Array]  # "image": (B, 28, 28, 1) float32 in [0, 1], "label": (B,) int32
Metrics = dict[str, jax.Array]


class TrainState(train_state.TrainState):
    """Params, optimizer state, step and PRNG key; the learning rate is a function of the step."""

    rng: jax.Array  # raw uint32[2] key data, which Orbax saves as a plain array
    lr_schedule: Schedule = struct.field(pytree_node=False)

    def apply_gradients(self, *, grads: Any, **kwargs: Any) -> TrainState:
        """Return the state after one update at the learning rate of the current step."""
        direction, opt_state = self.tx.update(grads, self.opt_state, self.params)
        lr = self.lr_schedule(self.step)
        updates = jax.tree.map(lambda d: -lr * d, direction)
        return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                            opt_state=opt_state, **kwargs)


def create_train_state(model: CNN, tx: optax.GradientTransformation, lr_schedule: Schedule,
                       seed: int) -> TrainState:
    """Return a fresh state whose params and PRNG key both derive from `seed`."""
    init_key, rng = jax.random.split(jax.random.PRNGKey(seed))
    # One compiled init instead of one small compilation per parameter initializer.
    params = jax.jit(model.init)(init_key, jnp.zeros((1, 28, 28, 1), jnp.float32))["params"]
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                              lr_schedule=lr_schedule, rng=rng)
    # A concrete int32 step, not Python's 0, so the first update compiles like every later one.
    return state.replace(step=jnp.zeros((), jnp.int32))


def _loss_and_logits(params: Any, state: TrainState, batch: Batch) -> tuple[jax.Array, jax.Array]:
    logits = state.apply_fn({"params": params}, batch["image"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, logits


def _train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    grad_fn = jax.value_and_grad(_loss_and_logits, has_aux=True)
    (loss, logits), grads = grad_fn(state.params, state, batch)
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
        "lr": state.lr_schedule(state.step),
    }
    return state.apply_gradients(grads=grads), metrics


train_step = jax.jit(_train_step)
train_step.__doc__ = """Return the state after one update on `batch`, and that batch's loss, accuracy and lr."""


def _eval_step(state: TrainState, batch: Batch) -> Metrics:
    """Return summed loss, correct count and example count over `batch`, ignoring masked-out rows.

    `batch` may carry "mask", (B,) bool, so a padded last batch counts only its real rows.
    """
    logits = state.apply_fn({"params": state.params}, batch["image"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    mask = batch.get("mask", jnp.ones(batch["label"].shape, bool))
    correct = (jnp.argmax(logits, -1) == batch["label"]) & mask
    return {
        "loss_sum": jnp.sum(jnp.where(mask, losses, 0.0)),
        "correct": jnp.sum(correct, dtype=jnp.int32),
        "count": jnp.sum(mask, dtype=jnp.int32),
    }


eval_step = jax.jit(_eval_step)


@jax.jit
def eval_batches(state: TrainState, images: jax.Array, labels: jax.Array,
                 mask: jax.Array) -> Metrics:
    """Return `eval_step`'s metrics summed over stacked batches, in one compiled loop.

    Args:
      state: the state to evaluate.
      images: (N, B, 28, 28) uint8.
      labels: (N, B) int32.
      mask: (N, B) bool, false on padding rows.
    """

    def add_batch(totals: Metrics, batch: Batch) -> tuple[Metrics, None]:
        batch = {**batch, "image": images_to_float(batch["image"])}
        metrics = _eval_step(state, batch)
        return jax.tree.map(jnp.add, totals, metrics), None

    zeros = {"loss_sum": jnp.zeros((), jnp.float32), "correct": jnp.zeros((), jnp.int32),
             "count": jnp.zeros((), jnp.int32)}
    totals, _ = jax.lax.scan(add_batch, zeros, {"image": images, "label": labels, "mask": mask})
    return totals


def images_to_float(images: jax.Array) -> jax.Array:
    """Map uint8 images (B, 28, 28) to float32 (B, 28, 28, 1) in [0, 1]."""
    return (images.astype(jnp.float32) / 255.0)[..., None]


@functools.partial(jax.jit, static_argnames=("augmentation",), donate_argnums=0)
def train_steps(state: TrainState, images: jax.Array, labels: jax.Array, indices: jax.Array,
                num_steps: jax.Array, augmentation: str,
                precomputed: tuple[jax.Array, ...] = ()) -> tuple[TrainState, Metrics]:
    """Run up to `num_steps` training steps in one compiled loop; stop before a non-finite loss.

    Args:
      state: the state to update; its buffers are donated.
      images: (N, 28, 28) uint8, the whole training set, resident on device.
      labels: (N,) int32.
      indices: (K, B) int32, the example indices of the next K batches. Rows at or
        past `num_steps` are ignored, so one compiled loop serves every chunk length.
      num_steps: scalar int32, at most K.
      augmentation: the name of the augmentation applied to each batch.
      precomputed: `augment.precompute(augmentation, images)`, or () to compute
        everything on every step. The result is the same either way.

    Returns:
      The new state and summed metrics: "loss_sum", "accuracy_sum", "steps" run,
      "last_lr" and "nonfinite", which is true when the loop stopped at a step
      whose loss was not finite. That step's update is not applied.
    """

    # The augmentation draws for the whole chunk in one call, since on CPU each
    # jax.random call runs its own threefry loop. Step s still uses the key fold_in(rng, s).
    chunk_steps = state.step + jnp.arange(indices.shape[0], dtype=state.step.dtype)
    batch_shape = (indices.shape[1], *images.shape[1:], 1)  # as images_to_float returns
    chunk_draws = jax.vmap(lambda step: augment.draw(
        augmentation, jax.random.fold_in(state.rng, step), batch_shape))(chunk_steps)

    def run_one(carry):
        state, totals, i = carry
        batch_indices = indices[i]
        draws = jax.tree.map(lambda chunk: chunk[i], chunk_draws)
        batch_precomputed = tuple(images_to_float(table[batch_indices]) for table in precomputed)
        batch = {
            "image": augment.apply_drawn(augmentation, draws, images_to_float(images[batch_indices]),
                                         batch_precomputed),
            "label": labels[batch_indices],
        }
        new_state, metrics = _train_step(state, batch)
        finite = jnp.isfinite(metrics["loss"])
        state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        totals = {
            "loss_sum": totals["loss_sum"] + jnp.where(finite, metrics["loss"], 0.0),
            "accuracy_sum": totals["accuracy_sum"] + jnp.where(finite, metrics["accuracy"], 0.0),
            "steps": totals["steps"] + finite.astype(jnp.int32),
            "last_lr": metrics["lr"],
            "nonfinite": ~finite,
        }
        return state, totals, i + 1

    def keep_going(carry):
        _, totals, i = carry
        return (i < num_steps) & ~totals["nonfinite"]

    totals = {
        "loss_sum": jnp.zeros((), jnp.float32),
        "accuracy_sum": jnp.zeros((), jnp.float32),
        "steps": jnp.zeros((), jnp.int32),
        "last_lr": jnp.zeros((), jnp.float32),
        "nonfinite": jnp.zeros((), bool),
    }
    state, totals, _ = jax.lax.while_loop(keep_going, run_one, (state, totals, jnp.int32(0)))
    return state, totals
