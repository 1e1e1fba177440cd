"""The CNN's shape, parameter count and its two convolution implementations."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fmnist_jax.model import CNN, build_model, max_pool_2x2, resolve_conv


def count_params(params) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(params))


@pytest.mark.parametrize("width, expected", [(8, 5762), (16, 14970)])
def test_param_count_matches_pytorch_original(width, expected):
    # Per width w: conv 9w+w, three convs 9w*w+w, dense 49w*10+10, as torch counts them.
    params = CNN(width=width).init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))["params"]
    assert count_params(params) == expected


def test_output_is_batch_by_ten_logits():
    model = CNN(width=4, conv="matmul")
    images = jnp.zeros((5, 28, 28, 1))
    params = model.init(jax.random.PRNGKey(0), images)
    assert model.apply(params, images).shape == (5, 10)


@pytest.mark.parametrize("width", [8, 16])
def test_implementations_share_params_and_outputs(width):
    rng = np.random.default_rng(0)
    images = rng.random((6, 28, 28, 1), np.float32)
    images[:, :6] = 0.0  # black margins make tied maxima in the pooling windows
    images[:, :, -5:] = 0.0
    images = jnp.asarray(images)
    labels = jnp.asarray([0, 1, 2, 3, 4, 5])
    xla, matmul = CNN(width=width, conv="xla"), CNN(width=width, conv="matmul")
    params = xla.init(jax.random.PRNGKey(0), images)
    # Non-zero biases, so that the margins give equal positive activations.
    params = jax.tree_util.tree_map_with_path(
        lambda path, leaf: leaf + 0.1 if path[-1].key == "bias" else leaf, params)
    chex.assert_trees_all_equal_shapes(params, matmul.init(jax.random.PRNGKey(0), images))
    np.testing.assert_allclose(matmul.apply(params, images), xla.apply(params, images),
                               rtol=1e-5, atol=1e-5)

    def grads(model):
        def loss(p):
            return optax.softmax_cross_entropy_with_integer_labels(
                model.apply(p, images), labels).mean()
        return jax.grad(loss)(params)

    chex.assert_trees_all_close(grads(matmul), grads(xla), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 5, 6])
def test_batch_slices_share_params_and_outputs(batch):
    images = jnp.asarray(np.random.default_rng(2).random((batch, 28, 28, 1), np.float32))
    labels = jnp.arange(batch) % 10
    whole, halves = CNN(width=4, conv="matmul"), CNN(width=4, conv="matmul", batch_slices=2)
    params = whole.init(jax.random.PRNGKey(0), images)
    chex.assert_trees_all_equal(halves.init(jax.random.PRNGKey(0), images), params)
    np.testing.assert_allclose(halves.apply(params, images), whole.apply(params, images),
                               rtol=1e-6, atol=1e-6)

    def grads(model):
        return jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
            model.apply(p, images), labels).mean())(params)

    chex.assert_trees_all_close(grads(halves), grads(whole), rtol=1e-5, atol=1e-7)


def test_batch_slices_below_one_rejected():
    with pytest.raises(ValueError, match="invalid batch_slices 0"):
        CNN(width=4, conv="matmul", batch_slices=0).init(jax.random.PRNGKey(0),
                                                         jnp.zeros((2, 28, 28, 1)))


def test_build_model_slices_by_backend(monkeypatch):
    assert build_model(8, "matmul").batch_slices == 2
    assert build_model(8, "xla").batch_slices == 1
    monkeypatch.setattr(jax, "device_count", lambda: 4)
    assert build_model(8, "matmul").batch_slices == 1


def test_checkpoint_restores_under_other_implementation(tmp_path):
    from tests.test_checkpoint import fresh_state
    from fmnist_jax.checkpoint import RunCheckpoints
    from fmnist_jax import optim
    from fmnist_jax.config import TrainConfig
    from fmnist_jax.steps import create_train_state

    saved = fresh_state(width=4)  # the "matmul" implementation
    checkpoints = RunCheckpoints(tmp_path, keep=1)
    checkpoints.save(saved.replace(step=1), {})
    checkpoints.wait()
    config = TrainConfig(width=4)
    template = create_train_state(CNN(width=4, conv="xla"), optim.build_direction(config),
                                  optim.build_schedule(config, 0, 10), seed=5)
    restored = checkpoints.restore(1, template)
    checkpoints.close()
    chex.assert_trees_all_equal(restored.params, saved.params)
    images = jnp.asarray(np.random.default_rng(1).random((3, 28, 28, 1), np.float32))
    np.testing.assert_allclose(restored.apply_fn({"params": restored.params}, images),
                               saved.apply_fn({"params": saved.params}, images),
                               rtol=1e-5, atol=1e-5)


def test_max_pool_takes_window_maximum():
    x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    np.testing.assert_array_equal(max_pool_2x2(x)[0, :, :, 0], [[5.0, 7.0], [13.0, 15.0]])


def test_auto_conv_follows_backend():
    assert resolve_conv("auto", "cpu") == "matmul"
    assert resolve_conv("auto", "gpu") == "xla"
    assert resolve_conv("auto", "tpu") == "xla"
    assert resolve_conv("xla", "cpu") == "xla"
