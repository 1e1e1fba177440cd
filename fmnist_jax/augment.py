"""Per-example image augmentations that run inside the jitted training step.

Every random draw comes from the key passed in, which the training loop derives
from the seed and the step, so a resumed run augments exactly as an unbroken one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NUM_BINS = 31  # magnitude bins of torchvision's TrivialAugmentWide
# torchvision translates by up to 32 px on 224 px ImageNet crops: 32 / 224 * 28 = 4 px here.
MAX_TRANSLATE = 4


def random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
    """Flip each image of (B, H, W, C) left to right with probability 1/2."""
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0],))
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


# The ops below follow torchvision 0.28's tensor functions on one (H, W, C) float
# image in [0, 1]. Each takes a scalar `magnitude` in the unit its docstring names.


def identity(image: jax.Array, magnitude: jax.Array) -> jax.Array:
    """Return `image` unchanged."""
    return image


def _blend(image: jax.Array, other: jax.Array, factor: jax.Array) -> jax.Array:
    return jnp.clip(factor * image + (1.0 - factor) * other, 0.0, 1.0)


def brightness(image: jax.Array, magnitude: jax.Array) -> jax.Array:
    """Return `image` scaled by 1 + `magnitude`, clipped to [0, 1]."""
    return _blend(image, jnp.zeros_like(image), 1.0 + magnitude)


def contrast(image: jax.Array, magnitude: jax.Array) -> jax.Array:
    """Return `image` blended away from its mean by factor 1 + `magnitude`, clipped to [0, 1]."""
    return _blend(image, jnp.mean(image), 1.0 + magnitude)


def _smooth(image: jax.Array) -> jax.Array:
    """Return `image` with its interior filtered by [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13."""
    height, width = image.shape[:2]
    total = sum(image[dy:height - 2 + dy, dx:width - 2 + dx] for dy in range(3) for dx in range(3))
    interior = (total + 4.0 * image[1:-1, 1:-1]) / 13.0
    return image.at[1:-1, 1:-1].set(interior)


def sharpness(image: jax.Array, magnitude: jax.Array) -> jax.Array:
    """Return `image` blended away from its smoothed copy by factor 1 + `magnitude`."""
    return _blend(image, _smooth(image), 1.0 + magnitude)


def _to_levels(image: jax.Array) -> jax.Array:
    """Return the 8-bit grey levels of `image` as int32."""
    return jnp.round(image * 255.0).astype(jnp.int32)


def posterize(image: jax.Array, magnitude: jax.Array) -> jax.Array:
    """Return `image` with only the top `magnitude` bits (1 to 8) of each 8-bit level kept."""
    # torchvision posterizes uint8 only, so round to 8 bits first; 8 bits gives back
    # any image that came from uint8 exactly.
    shift = 8 - magnitude.astype(jnp.int32)
    levels = (_to_levels(image) >> shift) << shift
    return levels.astype(image.dtype) / 255.0


def solarize(image: jax.Array, magnitude: jax.Array) -> jax.Array:
    """Return `image` with every pixel at or above the threshold `magnitude` inverted."""
    return jnp.where(image >= magnitude, 1.0 - image, image)


def autocontrast(image: jax.Array, magnitude: jax.Array) -> jax.Array:
    """Return each channel of `image` rescaled so its min maps to 0 and its max to 1."""
    low = jnp.min(image, axis=(0, 1))
    high = jnp.max(image, axis=(0, 1))
    # A flat channel would divide by zero, so torchvision leaves it as it is.
    flat = high == low
    scale = jnp.where(flat, 1.0, 1.0 / jnp.where(flat, 1.0, high - low))
    return jnp.clip((image - jnp.where(flat, 0.0, low)) * scale, 0.0, 1.0)


def _equalize_channel(image: jax.Array) -> jax.Array:
    levels = _to_levels(image)
    histogram = jnp.bincount(levels.ravel(), length=256)
    # torchvision's step: pixels not at the top level present, over 255 levels.
    step = (levels.size - histogram[jnp.max(levels)]) // 255
    safe_step = jnp.maximum(step, 1)
    # Level v maps from the count of pixels below v, torchvision's cumulative sum shifted by one.
    below = jnp.cumsum(histogram) - histogram
    table = jnp.minimum((below + safe_step // 2) // safe_step, 255)
    # With fewer than 255 pixels below the top level, torchvision returns the input.
    return jnp.where(step == 0, image, table[levels].astype(image.dtype) / 255.0)


def equalize(image: jax.Array, magnitude: jax.Array) -> jax.Array:
    """Return `image` histogram-equalised over 256 levels, channel by channel."""
    return jax.vmap(_equalize_channel, in_axes=-1, out_axes=-1)(image)


# A geometric op is a 2x3 matrix [a, b, tx, c, d, ty] mapping output pixel coordinates,
# centred on the image, to the input coordinates sampled, as torchvision's inverse
# affine matrix does. y points down, so a positive angle turns counter-clockwise.


def _rotation(magnitude: jax.Array, size: int) -> jax.Array:
    cos, sin = jnp.cos(jnp.deg2rad(magnitude)), jnp.sin(jnp.deg2rad(magnitude))
    return jnp.stack([cos, -sin, 0.0, sin, cos, 0.0])


def _shear_x(magnitude: jax.Array, size: int) -> jax.Array:
    # torchvision shears about the top-left corner, which lies size / 2 up and left of the centre.
    return jnp.stack([1.0, magnitude, magnitude * size / 2, 0.0, 1.0, 0.0])


def _shear_y(magnitude: jax.Array, size: int) -> jax.Array:
    return jnp.stack([1.0, 0.0, 0.0, magnitude, 1.0, magnitude * size / 2])


def _translate_x(magnitude: jax.Array, size: int) -> jax.Array:
    return jnp.stack([1.0, 0.0, -magnitude, 0.0, 1.0, 0.0])


def _translate_y(magnitude: jax.Array, size: int) -> jax.Array:
    return jnp.stack([1.0, 0.0, 0.0, 0.0, 1.0, -magnitude])


def _no_warp(magnitude: jax.Array, size: int) -> jax.Array:
    return jnp.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])


def _warp(image: jax.Array, matrix: jax.Array) -> jax.Array:
    """Return `image` resampled through `matrix` by nearest neighbour, with 0 outside it."""
    height, width = image.shape[:2]
    y, x = jnp.meshgrid(jnp.arange(height) - (height - 1) / 2, jnp.arange(width) - (width - 1) / 2,
                        indexing="ij")
    # jnp.round rounds half to even, like the nearest mode of torch's grid_sample.
    cols = jnp.round(matrix[0] * x + matrix[1] * y + matrix[2] + (width - 1) / 2).astype(jnp.int32)
    rows = jnp.round(matrix[3] * x + matrix[4] * y + matrix[5] + (height - 1) / 2).astype(jnp.int32)
    inside = (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)
    sampled = image[jnp.clip(rows, 0, height - 1), jnp.clip(cols, 0, width - 1)]
    return jnp.where(inside[..., None], sampled, 0.0)


def rotate(image: jax.Array, magnitude: jax.Array) -> jax.Array:
    """Return `image` rotated counter-clockwise by `magnitude` degrees about its centre."""
    return _warp(image, _rotation(magnitude, image.shape[0]))


def shear_x(image: jax.Array, magnitude: jax.Array) -> jax.Array:
    """Return `image` with row r shifted left by `magnitude` * (r + 0.5) pixels."""
    return _warp(image, _shear_x(magnitude, image.shape[1]))


def shear_y(image: jax.Array, magnitude: jax.Array) -> jax.Array:
    """Return `image` with column c shifted up by `magnitude` * (c + 0.5) pixels."""
    return _warp(image, _shear_y(magnitude, image.shape[0]))


def translate_x(image: jax.Array, magnitude: jax.Array) -> jax.Array:
    """Return `image` shifted right by `magnitude` whole pixels."""
    return _warp(image, _translate_x(magnitude, image.shape[1]))


def translate_y(image: jax.Array, magnitude: jax.Array) -> jax.Array:
    """Return `image` shifted down by `magnitude` whole pixels."""
    return _warp(image, _translate_y(magnitude, image.shape[0]))


_LINEAR = np.arange(NUM_BINS) / (NUM_BINS - 1)
# name: (op, its warp matrix or None, magnitude per bin, whether a random sign applies).
# Magnitudes are torchvision's TrivialAugmentWide ranges; Color is left out for grey images.
OPS = {
    "identity": (identity, _no_warp, np.zeros(NUM_BINS), False),
    "shear_x": (shear_x, _shear_x, 0.99 * _LINEAR, True),
    "shear_y": (shear_y, _shear_y, 0.99 * _LINEAR, True),
    # Whole pixels, as torchvision truncates the translation with int().
    "translate_x": (translate_x, _translate_x, np.arange(NUM_BINS) * MAX_TRANSLATE // (NUM_BINS - 1), True),
    "translate_y": (translate_y, _translate_y, np.arange(NUM_BINS) * MAX_TRANSLATE // (NUM_BINS - 1), True),
    "rotate": (rotate, _rotation, 135.0 * _LINEAR, True),
    "brightness": (brightness, None, 0.99 * _LINEAR, True),
    "contrast": (contrast, None, 0.99 * _LINEAR, True),
    "sharpness": (sharpness, None, 0.99 * _LINEAR, True),
    "posterize": (posterize, None, 8 - np.round(np.arange(NUM_BINS) / ((NUM_BINS - 1) / 6)), False),
    # torchvision's 8-bit thresholds divided in float32, so they equal uint8 levels / 255 exactly.
    "solarize": (solarize, None, np.linspace(255, 0, NUM_BINS).astype(np.float32) / np.float32(255), False),
    "autocontrast": (autocontrast, None, np.zeros(NUM_BINS), False),
    "equalize": (equalize, None, np.zeros(NUM_BINS), False),
}
_MAGNITUDES = np.stack([spec[2] for spec in OPS.values()]).astype(np.float32)
_SIGNED = np.array([spec[3] for spec in OPS.values()])


def _augment_one(image: jax.Array, op: jax.Array, magnitude: jax.Array) -> jax.Array:
    """Return one (H, W, C) image transformed by op number `op` at `magnitude`."""
    # vmap turns a per-example lax.switch into running every branch and selecting,
    # with one gather per geometric op. Selecting the warp matrix first shares one
    # gather among all of them; ops that do not warp get the identity matrix, which
    # samples every pixel exactly, so the warped image is the input for them.
    size = image.shape[0]
    matrices = [(warp or _no_warp)(magnitude, size) for _, warp, _, _ in OPS.values()]
    warped = _warp(image, jax.lax.select_n(op, *matrices))
    outputs = [warped if warp else fn(image, magnitude) for fn, warp, _, _ in OPS.values()]
    return jax.lax.select_n(op, *outputs)


def trivial_augment(key: jax.Array, images: jax.Array) -> jax.Array:
    """Return each image of (B, H, W, C) transformed by one random op at a random magnitude.

    This is TrivialAugment-Wide (Müller and Hutter, 2021) as torchvision's
    `TrivialAugmentWide` draws it: an op uniformly from `OPS`, a bin uniformly from
    `NUM_BINS`, and a random sign for signed ops.
    """
    op_key, bin_key, sign_key = jax.random.split(key, 3)
    batch = images.shape[0]
    ops = jax.random.randint(op_key, (batch,), 0, len(OPS))
    bins = jax.random.randint(bin_key, (batch,), 0, NUM_BINS)
    negate = jax.random.bernoulli(sign_key, 0.5, (batch,)) & jnp.asarray(_SIGNED)[ops]
    magnitudes = jnp.where(negate, -1.0, 1.0) * jnp.asarray(_MAGNITUDES)[ops, bins]
    return jax.vmap(_augment_one)(images, ops, magnitudes)


def apply(name: str, key: jax.Array, images: jax.Array) -> jax.Array:
    """Return `images` (B, H, W, C) float in [0, 1] augmented by the method `name`.

    "trivial" flips each image at random, as the original recipe does, and then
    applies `trivial_augment`.
    """
    if name == "none":
        return images
    if name == "flip":
        return random_flip(key, images)
    if name == "trivial":
        flip_key, augment_key = jax.random.split(key)
        return trivial_augment(augment_key, random_flip(flip_key, images))
    raise ValueError(f"unknown augmentation {name!r}")
