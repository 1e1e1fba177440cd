"""Per-example image augmentations that run inside the jitted training step.

Every random draw comes from the key passed in, which the training loop derives
from the seed and the step, so a resumed run augments exactly as an unbroken one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
    """Flip each image of (B, H, W, C) left to right with probability 1/2."""
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0],))
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def apply(name: str, key: jax.Array, images: jax.Array) -> jax.Array:
    """Return `images` (B, H, W, C) float in [0, 1] augmented by the method `name`."""
    if name == "none":
        return images
    if name == "flip":
        return random_flip(key, images)
    raise ValueError(f"unknown augmentation {name!r}")
