"""Pixel-exact checks of each augmentation op and of the jitted TrivialAugment-Wide draw."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmnist_jax import augment, optim, steps
from fmnist_jax.config import TrainConfig
from fmnist_jax.model import CNN


def from_levels(levels: np.ndarray) -> jnp.ndarray:
    """Return uint8 levels (28, 28) as the (28, 28, 1) float32 image the training loop makes."""
    # XLA on CPU computes x / 255 as x * (1 / 255), which can differ from numpy in the last bit.
    return steps.images_to_float(jnp.asarray(levels, jnp.uint8)[None])[0]


def level_value(level: int) -> np.float32:
    """Return the float that `from_levels` gives uint8 `level`."""
    return np.asarray(from_levels(np.full((28, 28), level, np.uint8)))[0, 0, 0]


def gradient() -> jnp.ndarray:
    """Return a (28, 28, 1) image whose every pixel is distinct."""
    return jnp.asarray(np.arange(784, dtype=np.float32).reshape(28, 28, 1) / 784)


def dot(row: int, col: int) -> jnp.ndarray:
    """Return a black (28, 28, 1) image with one white pixel at (row, col)."""
    image = np.zeros((28, 28, 1), np.float32)
    image[row, col] = 1.0
    return jnp.asarray(image)


apply_trivial = jax.jit(functools.partial(augment.apply, "trivial"))


def random_batch(size: int, seed: int = 0) -> jnp.ndarray:
    levels = np.random.default_rng(seed).integers(0, 256, (size, 28, 28), dtype=np.uint8)
    return steps.images_to_float(jnp.asarray(levels))


def test_identity_returns_input():
    np.testing.assert_array_equal(augment.identity(gradient(), 0.0), gradient())


def test_random_flip_mirrors_or_keeps():
    images = jnp.broadcast_to(gradient(), (16, 28, 28, 1))
    flipped = np.asarray(augment.random_flip(jax.random.PRNGKey(0), images))
    mirrored = np.asarray(gradient())[:, ::-1]
    is_mirrored = [np.array_equal(image, mirrored) for image in flipped]
    is_kept = [np.array_equal(image, gradient()) for image in flipped]
    assert all(m or k for m, k in zip(is_mirrored, is_kept))
    assert any(is_mirrored)
    assert any(is_kept)


def test_brightness_scales_and_clips():
    image = jnp.asarray([0.0, 0.25, 0.5, 0.75], jnp.float32).reshape(2, 2, 1)
    np.testing.assert_array_equal(augment.brightness(image, 0.5).ravel(), [0.0, 0.375, 0.75, 1.0])
    halved = augment.brightness(image, -0.5).ravel()
    np.testing.assert_array_equal(halved, [0.0, 0.125, 0.25, 0.375])


def test_contrast_scales_about_mean():
    levels = np.where(np.arange(784).reshape(28, 28) % 2 == 0, 0.25, 0.75).astype(np.float32)
    image = jnp.asarray(levels)[..., None]  # mean 0.5
    out = np.asarray(augment.contrast(image, 0.5))
    np.testing.assert_array_equal(out[0, :2, 0], [0.125, 0.875])
    np.testing.assert_array_equal(np.asarray(augment.contrast(image, -1.0)), 0.5)


def test_sharpness_blends_with_smoothed_interior():
    image = dot(10, 10)
    smoothed = np.asarray(augment.sharpness(image, -1.0))  # factor 0: the smoothed image
    np.testing.assert_allclose(smoothed[9:12, 9:12, 0], [[1 / 13, 1 / 13, 1 / 13],
                                                         [1 / 13, 5 / 13, 1 / 13],
                                                         [1 / 13, 1 / 13, 1 / 13]], rtol=1e-6)
    assert smoothed.sum() == pytest.approx(1.0, rel=1e-6)
    # Factor 1.5 on a grey dot pushes its neighbours below 0, where they clip.
    sharpened = np.asarray(augment.sharpness(0.5 * image, 0.5))
    assert sharpened[10, 10, 0] == pytest.approx(1.5 * 0.5 - 0.5 * 0.5 * 5 / 13, rel=1e-6)
    assert sharpened[9, 10, 0] == 0.0


def test_sharpness_keeps_border():
    image = dot(0, 5)
    np.testing.assert_array_equal(augment.sharpness(image, -1.0)[0], image[0])


def test_posterize_keeps_top_bits():
    levels = np.zeros((28, 28), np.uint8)
    levels[3, 4], levels[5, 6] = 0b10110111, 0b01111111
    out = np.asarray(augment.posterize(from_levels(levels), 2.0))
    assert out[3, 4, 0] == level_value(0b10000000)
    assert out[5, 6, 0] == level_value(0b01000000)


def test_posterize_8_bits_is_identity():
    image = random_batch(1)[0]
    np.testing.assert_array_equal(augment.posterize(image, 8.0), image)


def test_solarize_inverts_at_threshold():
    image = jnp.asarray([0.25, 0.5, 0.75, 1.0], jnp.float32).reshape(2, 2, 1)
    np.testing.assert_array_equal(augment.solarize(image, 0.5).ravel(), [0.25, 0.5, 0.25, 0.0])
    np.testing.assert_array_equal(augment.solarize(image, 1.0).ravel(), [0.25, 0.5, 0.75, 0.0])


def test_solarize_bins_match_uint8_thresholds():
    # torchvision's uint8 path inverts levels at or above 255 - 8.5 * bin.
    levels = (np.arange(784) % 256).reshape(28, 28)
    image = np.asarray(from_levels(levels))
    solarize = jax.jit(augment.solarize)
    for bin_index, threshold in enumerate(augment.OPS["solarize"].magnitudes):
        inverted = levels >= np.ceil(255 - 8.5 * bin_index)
        expected = np.where(inverted[..., None], 1.0 - image, image)
        out = solarize(image, threshold)
        np.testing.assert_array_equal(out, expected, err_msg=f"bin {bin_index}")


def test_autocontrast_stretches_to_full_range():
    image = jnp.asarray([0.25, 0.5, 0.625, 0.75], jnp.float32).reshape(2, 2, 1)
    np.testing.assert_array_equal(augment.autocontrast(image, 0.0).ravel(), [0.0, 0.5, 0.75, 1.0])


def test_autocontrast_keeps_flat_image():
    image = jnp.full((28, 28, 1), 0.3, jnp.float32)
    np.testing.assert_array_equal(augment.autocontrast(image, 0.0), image)


def test_equalize_spreads_histogram():
    # 392 pixels at level 10, 196 at 100 and 196 at 200: torchvision's step is
    # (784 - 196) // 255 = 2, so the levels map to 0, (392 + 1) // 2 = 196 and 255.
    levels = np.zeros(784, np.uint8)
    levels[:392], levels[392:588], levels[588:] = 10, 100, 200
    out = np.asarray(augment.equalize(from_levels(levels.reshape(28, 28)), 0.0)).ravel()
    assert out[0] == 0.0
    assert out[400] == level_value(196)
    assert out[700] == 1.0


def test_equalize_keeps_image_with_few_lower_pixels():
    # Fewer than 255 pixels below the top level make torchvision's step 0.
    levels = np.full(784, 255, np.uint8)
    levels[:200] = 3
    image = from_levels(levels.reshape(28, 28))
    np.testing.assert_array_equal(augment.equalize(image, 0.0), image)


def test_translate_x_shifts_with_zero_fill():
    expected = np.zeros((28, 28, 1), np.float32)
    expected[:, 3:] = np.asarray(gradient())[:, :-3]
    np.testing.assert_array_equal(augment.translate_x(gradient(), 3.0), expected)


def test_translate_y_shifts_with_zero_fill():
    expected = np.zeros((28, 28, 1), np.float32)
    expected[:-2] = np.asarray(gradient())[2:]
    np.testing.assert_array_equal(augment.translate_y(gradient(), -2.0), expected)


def test_rotate_90_is_counter_clockwise():
    np.testing.assert_array_equal(augment.rotate(gradient(), 90.0), np.rot90(gradient()))


def test_rotate_minus_90_is_clockwise():
    np.testing.assert_array_equal(augment.rotate(gradient(), -90.0), np.rot90(gradient(), -1))


def test_shear_x_moves_pixel():
    # Row 9 shifts left by 0.5 * (9 + 0.5) = 4.75 pixels, so column 20 lands on 15.
    out = np.asarray(augment.shear_x(dot(9, 20), 0.5))
    np.testing.assert_array_equal(np.argwhere(out[..., 0]), [[9, 15]])


def test_shear_y_moves_pixel():
    out = np.asarray(augment.shear_y(dot(20, 9), 0.5))
    np.testing.assert_array_equal(np.argwhere(out[..., 0]), [[15, 9]])


def test_magnitude_ranges_match_torchvision():
    ranges = {name: op.magnitudes for name, op in augment.OPS.items()}
    assert ranges["rotate"][-1] == pytest.approx(135.0)
    assert ranges["shear_x"][-1] == pytest.approx(0.99)
    assert ranges["brightness"][-1] == pytest.approx(0.99)
    assert list(ranges["translate_x"][[0, 7, 8, 30]]) == [0, 0, 1, 4]
    assert ranges["posterize"][0] == 8
    assert ranges["posterize"][-1] == 2


def test_trivial_applies_drawn_op_per_example():
    key, images = jax.random.PRNGKey(3), random_batch(64)
    indices, magnitudes = augment.draw_ops(key, 64)
    out = jax.jit(augment.trivial_augment)(key, images)
    names = list(augment.OPS)
    functions = {name: jax.jit(op.function) for name, op in augment.OPS.items()}
    for image, result, index, magnitude in zip(images, out, indices, magnitudes):
        expected = functions[names[int(index)]](image, magnitude)
        np.testing.assert_allclose(result, expected, atol=1e-6, err_msg=names[int(index)])
    assert len(set(indices.tolist())) >= 8


def test_draw_ops_signs_only_signed_ops():
    indices, magnitudes = augment.draw_ops(jax.random.PRNGKey(0), 1000)
    ops = list(augment.OPS.values())
    drawn = [(ops[i], m) for i, m in zip(np.asarray(indices), np.asarray(magnitudes))]
    assert all(np.isclose(op.magnitudes, m).any() for op, m in drawn if not op.signed)
    assert all(np.isclose(op.magnitudes, abs(m)).any() for op, m in drawn if op.signed)
    assert any(m < 0 for op, m in drawn if op.signed)


def test_apply_matches_draw_then_apply_drawn():
    key, images = jax.random.PRNGKey(5), random_batch(32)
    for name in ("none", "flip", "trivial"):
        expected = augment.apply_drawn(name, augment.draw(name, key, images.shape), images)
        np.testing.assert_array_equal(augment.apply(name, key, images), expected)


def equalize_draws(key: jax.Array, images: jnp.ndarray) -> tuple[jax.Array, ...]:
    """Return "trivial" draws for `images` with every image's op set to equalize."""
    flips, indices, magnitudes, matrices = augment.draw("trivial", key, images.shape)
    indices = jnp.full_like(indices, list(augment.OPS).index("equalize"))
    return flips, indices, magnitudes, matrices


def few_level_batch() -> np.ndarray:
    """Return uint8 images (4, 28, 28); equalize leaves the first, second and fourth unchanged."""
    levels = np.full((4, 28, 28), 200, np.uint8)
    levels[:, 0, :3] = 7
    levels[1] = 0
    levels[2, 5:9, 3:20] = 255
    return levels


def test_precompute_equalizes_each_image():
    levels = np.concatenate([np.random.default_rng(2).integers(0, 256, (12, 28, 28), dtype=np.uint8),
                             few_level_batch()])
    (equalized,) = augment.precompute("trivial", jnp.asarray(levels))
    assert equalized.dtype == jnp.uint8
    for image, result in zip(steps.images_to_float(jnp.asarray(levels)), equalized):
        expected = jax.jit(augment.equalize)(image, 0.0)
        np.testing.assert_array_equal(steps.images_to_float(result[None])[0], expected)


def test_precomputed_equalize_is_bitwise_equal():
    levels = np.concatenate([np.random.default_rng(3).integers(0, 256, (28, 28, 28), dtype=np.uint8),
                             few_level_batch()])
    images = steps.images_to_float(jnp.asarray(levels))
    (equalized,) = augment.precompute("trivial", jnp.asarray(levels))
    draws = equalize_draws(jax.random.PRNGKey(4), images)
    assert bool(draws[0].any())  # some images flipped
    assert not bool(draws[0].all())  # and some not

    apply = jax.jit(functools.partial(augment.apply_drawn, "trivial"))
    with_table = apply(draws, images, (steps.images_to_float(equalized),))
    without = apply(draws, images)
    np.testing.assert_array_equal(with_table, without)
    # A wrong table changes the output, which shows that the table is used.
    wrong_table = apply(draws, images, (jnp.zeros_like(images),))
    assert not np.array_equal(wrong_table, without)


def test_precompute_other_methods_need_nothing():
    levels = jnp.zeros((2, 28, 28), jnp.uint8)
    assert augment.precompute("none", levels) == ()
    assert augment.precompute("flip", levels) == ()
    with pytest.raises(ValueError, match="unknown augmentation"):
        augment.precompute("mixup", levels)


def test_trivial_flips_then_augments():
    key, images = jax.random.PRNGKey(5), random_batch(32)
    flip_key, augment_key = jax.random.split(key)
    expected = augment.trivial_augment(augment_key, augment.random_flip(flip_key, images))
    np.testing.assert_allclose(apply_trivial(key, images), expected, atol=1e-6)


def test_trivial_is_deterministic_per_key():
    images = random_batch(32)
    first = apply_trivial(jax.random.PRNGKey(1), images)
    second = apply_trivial(jax.random.PRNGKey(1), images)
    np.testing.assert_array_equal(first, second)


def test_trivial_differs_across_keys():
    images = random_batch(32)
    first = apply_trivial(jax.random.PRNGKey(1), images)
    second = apply_trivial(jax.random.PRNGKey(2), images)
    assert not np.array_equal(first, second)


def test_trivial_keeps_shape_dtype_and_range():
    out = apply_trivial(jax.random.PRNGKey(0), random_batch(32))
    assert out.shape == (32, 28, 28, 1)
    assert out.dtype == jnp.float32
    assert float(out.min()) >= 0.0
    assert float(out.max()) <= 1.0


def test_trivial_compiles_once_in_while_loop():
    images = random_batch(8)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def augment_steps(key):
        def body(carry):
            total, i = carry
            out = augment.apply("trivial", jax.random.fold_in(key, i), images)
            return total + out.sum(), i + 1

        return jax.lax.while_loop(lambda carry: carry[1] < 3, body, (jnp.float32(0), 0))[0]

    first = augment_steps(jax.random.PRNGKey(0))
    second = augment_steps(jax.random.PRNGKey(1))
    assert float(first) != float(second)


def test_train_steps_runs_trivial():
    config = TrainConfig(width=4, batch_size=8, augment="trivial")
    state = steps.create_train_state(CNN(width=4, conv="matmul"), optim.build_direction(config),
                                     optim.build_schedule(config, 0, steps_per_epoch=10), seed=0)
    levels = np.random.default_rng(0).integers(0, 256, (64, 28, 28), dtype=np.uint8)
    labels = jnp.asarray(np.arange(64) % 10, jnp.int32)
    indices = jnp.arange(32, dtype=jnp.int32).reshape(4, 8)
    state, totals = steps.train_steps(state, jnp.asarray(levels), labels, indices, jnp.int32(4),
                                      augmentation="trivial")
    assert int(totals["steps"]) == 4
    assert np.isfinite(float(totals["loss_sum"]))


def test_apply_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown augmentation"):
        augment.apply("mixup", jax.random.PRNGKey(0), random_batch(2))
