"""Per-example image augmentations that run inside the jitted training step.

Every random draw comes from the key passed in, which the training loop derives
from the seed and the step, so a resumed run augments exactly as an unbroken one.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

NUM_BINS = 31  # magnitude bins of torchvision's TrivialAugmentWide
# torchvision translates by up to 32 px on 224 px ImageNet crops: 32 / 224 * 28 = 4 px here.
MAX_TRANSLATE = 4


def random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
    """Flip each image of (B, H, W, C) left to right with probability 1/2."""
    return apply("flip", key, images)


def flip_where(flips: jax.Array, images: jax.Array) -> jax.Array:
    """Flip left to right each image of (B, H, W, C) whose entry in `flips`, (B,) bool, is true."""
    return jnp.where(flips[:, None, None, None], images[:, :, ::-1, :], images)


# The ops below follow torchvision 0.28's tensor functions on one (H, W, C) float
# image in [0, 1]. Each takes a scalar `magnitude` in the unit its docstring names.


def identity(image: jax.Array, magnitude: ArrayLike) -> jax.Array:
    """Return `image` unchanged."""
    return image


def _blend(image: jax.Array, other: jax.Array, factor: jax.Array) -> jax.Array:
    return jnp.clip(factor * image + (1.0 - factor) * other, 0.0, 1.0)


def brightness(image: jax.Array, magnitude: ArrayLike) -> jax.Array:
    """Return `image` scaled by 1 + `magnitude`, clipped to [0, 1]."""
    return _blend(image, jnp.zeros_like(image), 1.0 + magnitude)


def contrast(image: jax.Array, magnitude: ArrayLike) -> jax.Array:
    """Return `image` blended away from its mean by factor 1 + `magnitude`, clipped to [0, 1]."""
    return _blend(image, jnp.mean(image), 1.0 + magnitude)


def _smooth(image: jax.Array) -> jax.Array:
    """Return `image` with its interior filtered by [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13."""
    height, width = image.shape[:2]
    total = sum(image[dy:height - 2 + dy, dx:width - 2 + dx] for dy in range(3) for dx in range(3))
    interior = (total + 4.0 * image[1:-1, 1:-1]) / 13.0
    return image.at[1:-1, 1:-1].set(interior)


def sharpness(image: jax.Array, magnitude: ArrayLike) -> jax.Array:
    """Return `image` blended away from its smoothed copy by 1 + `magnitude`, border unchanged."""
    return _blend(image, _smooth(image), 1.0 + magnitude)


def _to_levels(image: jax.Array) -> jax.Array:
    """Return the 8-bit grey levels of `image` as int32."""
    return jnp.round(image * 255.0).astype(jnp.int32)


def posterize(image: jax.Array, magnitude: ArrayLike) -> jax.Array:
    """Return `image` with only the top `magnitude` bits (1 to 8) of each 8-bit level kept."""
    # torchvision posterizes uint8 images only, so this rounds to 8-bit levels first.
    # With 8 bits it returns any image that came from uint8 unchanged.
    shift = 8 - jnp.asarray(magnitude).astype(jnp.int32)
    levels = (_to_levels(image) >> shift) << shift
    return levels.astype(image.dtype) / 255.0


def solarize(image: jax.Array, magnitude: ArrayLike) -> jax.Array:
    """Return `image` with every pixel at or above the threshold `magnitude` inverted."""
    return jnp.where(image >= magnitude, 1.0 - image, image)


def autocontrast(image: jax.Array, magnitude: ArrayLike) -> jax.Array:
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
    # torchvision's step: the pixels below the highest level present, floor-divided by 255.
    step = (levels.size - histogram[jnp.max(levels)]) // 255
    safe_step = jnp.maximum(step, 1)
    # Level v maps via the count of pixels below v, the cumulative histogram shifted by one.
    below = jnp.cumsum(histogram) - histogram
    table = jnp.minimum((below + safe_step // 2) // safe_step, 255)
    # With fewer than 255 pixels below the top level, torchvision returns the input.
    return jnp.where(step == 0, image, table[levels].astype(image.dtype) / 255.0)


def equalize(image: jax.Array, magnitude: ArrayLike) -> jax.Array:
    """Return `image` histogram-equalised over 256 levels, channel by channel."""
    # A loop over the 1 or 3 channels, not vmap, because under the batch's vmap a
    # vmapped histogram adds an index column to its scatter.
    return jnp.stack([_equalize_channel(image[..., c]) for c in range(image.shape[-1])], axis=-1)


# A geometric op is a 2x3 matrix [a, b, tx, c, d, ty] mapping output pixel coordinates,
# centred on the image, to the input coordinates sampled, as torchvision's inverse
# affine matrix does. y points down, so a positive angle turns counter-clockwise.


def _rotation(magnitude: ArrayLike, shape: tuple[int, ...]) -> jax.Array:
    cos, sin = jnp.cos(jnp.deg2rad(magnitude)), jnp.sin(jnp.deg2rad(magnitude))
    return jnp.stack([cos, -sin, 0.0, sin, cos, 0.0])


def _shear_x(magnitude: ArrayLike, shape: tuple[int, ...]) -> jax.Array:
    # torchvision shears about the top-left corner, half the height above the centre.
    return jnp.stack([1.0, magnitude, magnitude * shape[0] / 2, 0.0, 1.0, 0.0])


def _shear_y(magnitude: ArrayLike, shape: tuple[int, ...]) -> jax.Array:
    return jnp.stack([1.0, 0.0, 0.0, magnitude, 1.0, magnitude * shape[1] / 2])


def _translate_x(magnitude: ArrayLike, shape: tuple[int, ...]) -> jax.Array:
    return jnp.stack([1.0, 0.0, -magnitude, 0.0, 1.0, 0.0])


def _translate_y(magnitude: ArrayLike, shape: tuple[int, ...]) -> jax.Array:
    return jnp.stack([1.0, 0.0, 0.0, 0.0, 1.0, -magnitude])


def _no_warp(magnitude: ArrayLike, shape: tuple[int, ...]) -> jax.Array:
    return jnp.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])


def _warp(image: jax.Array, matrix: jax.Array) -> jax.Array:
    """Return `image` resampled through `matrix` by nearest neighbour, 0 where it falls outside."""
    height, width = image.shape[:2]
    y, x = jnp.meshgrid(jnp.arange(height) - (height - 1) / 2, jnp.arange(width) - (width - 1) / 2,
                        indexing="ij")
    # jnp.round rounds half to even, as torch 2.13's grid_sample does in nearest mode.
    cols = jnp.round(matrix[0] * x + matrix[1] * y + matrix[2] + (width - 1) / 2).astype(jnp.int32)
    rows = jnp.round(matrix[3] * x + matrix[4] * y + matrix[5] + (height - 1) / 2).astype(jnp.int32)
    inside = (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)
    sampled = image[jnp.clip(rows, 0, height - 1), jnp.clip(cols, 0, width - 1)]
    return jnp.where(inside[..., None], sampled, 0.0)


def rotate(image: jax.Array, magnitude: ArrayLike) -> jax.Array:
    """Return `image` rotated counter-clockwise by `magnitude` degrees about its centre."""
    return _warp(image, _rotation(magnitude, image.shape))


def shear_x(image: jax.Array, magnitude: ArrayLike) -> jax.Array:
    """Return `image` with row r shifted left by `magnitude` * (r + 0.5) pixels."""
    return _warp(image, _shear_x(magnitude, image.shape))


def shear_y(image: jax.Array, magnitude: ArrayLike) -> jax.Array:
    """Return `image` with column c shifted up by `magnitude` * (c + 0.5) pixels."""
    return _warp(image, _shear_y(magnitude, image.shape))


def translate_x(image: jax.Array, magnitude: ArrayLike) -> jax.Array:
    """Return `image` shifted right by `magnitude` whole pixels."""
    return _warp(image, _translate_x(magnitude, image.shape))


def translate_y(image: jax.Array, magnitude: ArrayLike) -> jax.Array:
    """Return `image` shifted down by `magnitude` whole pixels."""
    return _warp(image, _translate_y(magnitude, image.shape))


class Op(NamedTuple):
    """One TrivialAugment-Wide op and how `trivial_augment` draws its magnitude."""

    function: Callable[[jax.Array, ArrayLike], jax.Array]
    warp: Callable[[ArrayLike, tuple[int, ...]], jax.Array] | None  # None for photometric ops
    magnitudes: np.ndarray  # (NUM_BINS,) magnitude of each bin, before the sign
    signed: bool  # whether a random sign applies


_FRACTIONS = np.linspace(0.0, 1.0, NUM_BINS)
# Whole pixels, as torchvision truncates the translation with int().
_TRANSLATIONS = np.arange(NUM_BINS) * MAX_TRANSLATE // (NUM_BINS - 1)
# 8 bits down to 2, rounding half to even as torch.round does.
_BITS = 8 - np.round(np.arange(NUM_BINS) / ((NUM_BINS - 1) / 6))
# torchvision's uint8 thresholds run from 255 down to 0. Each threshold here sits half a
# level below the lowest level that torchvision's inverts, so images from uint8 solarize
# exactly as in torchvision, whichever way their division by 255 rounded.
_THRESHOLDS = (np.ceil(np.linspace(255, 0, NUM_BINS)) - 0.5) / 255
_NO_MAGNITUDE = np.zeros(NUM_BINS)

# torchvision's TrivialAugmentWide ops and ranges, less Color, which needs RGB.
OPS = {
    "identity": Op(identity, _no_warp, _NO_MAGNITUDE, False),
    "shear_x": Op(shear_x, _shear_x, 0.99 * _FRACTIONS, True),
    "shear_y": Op(shear_y, _shear_y, 0.99 * _FRACTIONS, True),
    "translate_x": Op(translate_x, _translate_x, _TRANSLATIONS, True),
    "translate_y": Op(translate_y, _translate_y, _TRANSLATIONS, True),
    "rotate": Op(rotate, _rotation, 135.0 * _FRACTIONS, True),
    "brightness": Op(brightness, None, 0.99 * _FRACTIONS, True),
    "contrast": Op(contrast, None, 0.99 * _FRACTIONS, True),
    "sharpness": Op(sharpness, None, 0.99 * _FRACTIONS, True),
    "posterize": Op(posterize, None, _BITS, False),
    "solarize": Op(solarize, None, _THRESHOLDS, False),
    "autocontrast": Op(autocontrast, None, _NO_MAGNITUDE, False),
    "equalize": Op(equalize, None, _NO_MAGNITUDE, False),
}
_MAGNITUDES = np.stack([op.magnitudes for op in OPS.values()]).astype(np.float32)
_SIGNED = np.array([op.signed for op in OPS.values()])


# Each op's row in the stack of candidate outputs: row 0 is the warped image, which
# identity and the geometric ops share, and each other op has a row of its own.
_WARPS = np.array([op.warp is not None for op in OPS.values()])
_ROWS = np.where(_WARPS, 0, np.cumsum(~_WARPS))


def _warp_matrices(indices: jax.Array, magnitudes: jax.Array,
                   shape: tuple[int, ...]) -> jax.Array:
    """Return each image's warp matrix, (B, 6), for images of `shape` (H, W, C).

    Photometric ops get the identity matrix.
    """
    def one_matrix(index: jax.Array, magnitude: jax.Array) -> jax.Array:
        return jax.lax.select_n(index, *[(op.warp or _no_warp)(magnitude, shape)
                                         for op in OPS.values()])

    return jax.vmap(one_matrix)(indices, magnitudes)


def _augment_one(image: jax.Array, index: jax.Array, magnitude: ArrayLike, matrix: jax.Array,
                 done: dict[str, jax.Array]) -> jax.Array:
    """Return one (H, W, C) image transformed by op number `index` of `OPS` at `magnitude`.

    `matrix` is this image's row of `_warp_matrices`. `done` maps names of
    ops without a magnitude to their output for this image, computed beforehand.
    """
    # Every op runs and one output is picked, as vmap of lax.switch compiles to, but the
    # geometric ops share one gather. The pick indexes a stack because XLA on CPU fuses
    # an elementwise select_n, with every op feeding it, into each of its consumers, and
    # the CPU convolution has nine. With select_n or vmap of lax.switch, a step of
    # `steps.train_steps` (width 8, batch 32, 2-core CPU) took about 1.5x the time of
    # "none". XLA fuses this whole function into one loop over the pixels, so the
    # caller passes the matrix. Selected here, it would be selected again per pixel.
    warped = _warp(image, matrix)
    others = [done[name] if name in done else op.function(image, magnitude)
              for name, op in OPS.items() if op.warp is None]
    return jnp.stack([warped, *others])[jnp.asarray(_ROWS)[index]]


def draw_ops(key: jax.Array, batch: int) -> tuple[jax.Array, jax.Array]:
    """Return an op index into `OPS` and a signed magnitude for each of `batch` examples.

    The draw is torchvision's TrivialAugmentWide: an op uniformly, one of
    `NUM_BINS` bins uniformly, and for signed ops a random sign.
    """
    # One call for all three draws, since each jax.random call runs its own threefry
    # loop on CPU. Taking 32 random bits modulo 13 or 31 is biased by under 1e-8.
    op_bits, bin_bits, sign_bits = jax.random.bits(key, (3, batch))
    indices = (op_bits % len(OPS)).astype(jnp.int32)
    bins = (bin_bits % NUM_BINS).astype(jnp.int32)
    negate = ((sign_bits & 1) == 1) & jnp.asarray(_SIGNED)[indices]
    magnitudes = jnp.where(negate, -1.0, 1.0) * jnp.asarray(_MAGNITUDES)[indices, bins]
    return indices, magnitudes


def trivial_augment(key: jax.Array, images: jax.Array) -> jax.Array:
    """Apply TrivialAugment-Wide (Müller and Hutter, 2021) to each image of (B, H, W, C)."""
    indices, magnitudes = draw_ops(key, images.shape[0])
    matrices = _warp_matrices(indices, magnitudes, images.shape[1:])
    return jax.vmap(_augment_one)(images, indices, magnitudes, matrices, {})


def draw(name: str, key: jax.Array, shape: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """Return the random choices that the method `name` makes for images of `shape` (B, H, W, C).

    Drawing apart from `apply_drawn` lets a training loop draw for many steps in
    one call. For "trivial" the choices include each image's warp matrix, so the
    loop computes those once per chunk as well.
    """
    batch = shape[0]
    if name == "none":
        return ()
    if name == "flip":
        return (jax.random.bernoulli(key, 0.5, (batch,)),)
    if name == "trivial":
        flip_key, augment_key = jax.random.split(key)
        indices, magnitudes = draw_ops(augment_key, batch)
        matrices = _warp_matrices(indices, magnitudes, tuple(shape[1:]))
        return (jax.random.bernoulli(flip_key, 0.5, (batch,)), indices, magnitudes, matrices)
    raise ValueError(f"unknown augmentation {name!r}")


def precompute(name: str, images: jax.Array) -> tuple[jax.Array, ...]:
    """Compute, once per training set, the per-image arrays that method `name` can reuse.

    Args:
      name: the augmentation method.
      images: (N, H, W) uint8.

    Returns:
      For "trivial", the histogram-equalized images as (N, H, W) uint8. The other
      methods need nothing, so they get an empty tuple.
    """
    if name in ("none", "flip"):
        return ()
    if name == "trivial":
        return (_equalize_levels(images),)
    raise ValueError(f"unknown augmentation {name!r}")


@jax.jit
def _equalize_levels(images: jax.Array) -> jax.Array:
    def equalize_one(levels: jax.Array) -> jax.Array:
        # The same float image as `steps.images_to_float` makes. equalize returns
        # whole levels divided by 255, which _to_levels recovers exactly.
        image = (levels.astype(jnp.float32) / 255.0)[..., None]
        return _to_levels(equalize(image, 0.0))[..., 0].astype(jnp.uint8)

    # Batches of 1024 keep the int32 levels and histograms to a few MB.
    return jax.lax.map(equalize_one, images, batch_size=1024)


def apply_drawn(name: str, draws: tuple[jax.Array, ...], images: jax.Array,
                precomputed: tuple[jax.Array, ...] = ()) -> jax.Array:
    """Return `images` (B, H, W, C) float in [0, 1] augmented by method `name` with `draw`'s choices.

    `precomputed` may hold this batch's rows of `precompute`'s arrays, as float
    images like `images`. The result is bitwise the same with or without them.
    """
    if name == "none":
        return images
    if name == "flip":
        (flips,) = draws
        return flip_where(flips, images)
    if name == "trivial":
        flips, indices, magnitudes, matrices = draws
        done = {}
        if precomputed:
            # The histogram ignores pixel order, so equalizing commutes with the flip.
            (equalized,) = precomputed
            done["equalize"] = flip_where(flips, equalized)
        return jax.vmap(_augment_one)(flip_where(flips, images), indices, magnitudes, matrices, done)
    raise ValueError(f"unknown augmentation {name!r}")


def apply(name: str, key: jax.Array, images: jax.Array) -> jax.Array:
    """Return `images` (B, H, W, C) float in [0, 1] augmented by the method `name`.

    "trivial" flips each image at random, as the original recipe does, and then
    applies TrivialAugment-Wide.
    """
    return apply_drawn(name, draw(name, key, images.shape), images)
