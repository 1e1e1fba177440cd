"""Purity and correctness of the jitted step functions."""

from __future__ import annotations

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fmnist_jax import augment, optim, steps
from fmnist_jax.config import TrainConfig
from fmnist_jax.model import CNN, build_model


def make_state(width: int = 4, lr: float = 1e-2, conv: str = "matmul",
               optimizer: str = "adam") -> steps.TrainState:
    config = TrainConfig(width=width, lr=lr, optimizer=optimizer)
    return steps.create_train_state(CNN(width=width, conv=conv), optim.build_direction(config),
                                    optim.build_schedule(config, 0, steps_per_epoch=10), seed=0)


def make_batch(size: int = 8, seed: int = 0) -> steps.Batch:
    rng = np.random.default_rng(seed)
    return {"image": jnp.asarray(rng.random((size, 28, 28, 1), np.float32)),
            "label": jnp.asarray(rng.integers(0, 10, size), jnp.int32)}


def leaves_as_numpy(tree) -> list[np.ndarray]:
    return [np.array(leaf) for leaf in jax.tree.leaves(tree)]


def primitive_names(jaxpr) -> set[str]:
    """Return every primitive name in `jaxpr`, including nested sub-jaxprs."""
    names = set()
    for equation in jaxpr.eqns:
        names.add(equation.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(equation.params):
            names |= primitive_names(sub)
    return names


def test_train_step_is_deterministic():
    state, batch = make_state(), make_batch()
    first_state, first_metrics = steps.train_step(state, batch)
    second_state, second_metrics = steps.train_step(state, batch)
    chex.assert_trees_all_equal(first_state.params, second_state.params)
    chex.assert_trees_all_equal(first_state.opt_state, second_state.opt_state)
    chex.assert_trees_all_equal(first_metrics, second_metrics)


def test_train_step_leaves_input_untouched():
    state, batch = make_state(), make_batch()
    before = leaves_as_numpy(state)
    new_state, _ = steps.train_step(state, batch)
    after = leaves_as_numpy(state)
    for old, new in zip(before, after):
        np.testing.assert_array_equal(old, new)
    assert int(new_state.step) == 1
    assert int(state.step) == 0


def test_hot_path_has_no_host_callbacks():
    state, batch = make_state(), make_batch()
    images = jnp.zeros((64, 28, 28), jnp.uint8)
    labels = jnp.zeros((64,), jnp.int32)
    indices = jnp.zeros((3, 8), jnp.int32)
    single = jax.make_jaxpr(steps.train_step)(state, batch).jaxpr
    looped = jax.make_jaxpr(lambda s: steps.train_steps(s, images, labels, indices, jnp.int32(3),
                                                        augmentation="flip"))(state).jaxpr
    for jaxpr in (single, looped):
        names = primitive_names(jaxpr)
        assert not {name for name in names if "callback" in name}, names
        assert "while" in names or jaxpr is single


def test_train_step_compiles_once():
    state = make_state()
    traced_step = jax.jit(chex.assert_max_traces(steps._train_step, n=1))
    for seed in range(4):
        state, _ = traced_step(state, make_batch(seed=seed))
    assert int(state.step) == 4


def test_train_steps_compiles_once_for_any_chunk_length():
    state = make_state()
    images = jnp.asarray(np.random.default_rng(0).integers(0, 255, (64, 28, 28)), jnp.uint8)
    labels = jnp.arange(64, dtype=jnp.int32) % 10
    indices = jnp.arange(4 * 8, dtype=jnp.int32).reshape(4, 8)
    state, _ = steps.train_steps(state, images, labels, indices, jnp.int32(2), augmentation="flip")
    compiled = steps.train_steps._cache_size()
    for num_steps in (4, 1, 3):
        state, totals = steps.train_steps(state, images, labels, indices, jnp.int32(num_steps),
                                          augmentation="flip")
        assert int(totals["steps"]) == num_steps
    assert steps.train_steps._cache_size() == compiled
    assert int(state.step) == 10


@pytest.mark.parametrize("augmentation", ["flip", "trivial"])
def test_train_steps_matches_single_steps(augmentation):
    # Each step augments with the key fold_in(rng, step), whichever chunk it runs in.
    state = make_state().replace(step=jnp.int32(7))
    images = jnp.asarray(np.random.default_rng(0).integers(0, 255, (64, 28, 28)), jnp.uint8)
    labels = jnp.arange(64, dtype=jnp.int32) % 10
    indices = jnp.asarray(np.random.default_rng(1).permutation(64)[:24].reshape(3, 8), jnp.int32)
    expected = state
    for row in indices:
        key = jax.random.fold_in(expected.rng, expected.step)
        image = augment.apply(augmentation, key, steps.images_to_float(images[row]))
        expected, _ = steps.train_step(expected, {"image": image, "label": labels[row]})
    looped, totals = steps.train_steps(state, images, labels, indices, jnp.int32(3),
                                       augmentation=augmentation)
    assert int(totals["steps"]) == 3
    assert int(looped.step) == 10
    chex.assert_trees_all_close(looped.params, expected.params, rtol=1e-5, atol=1e-6)


def test_train_steps_chunk_split_is_bitwise_equal():
    # The same 4 steps run as one chunk and as chunks of 1 and 3 (with a padded row),
    # as a resume or an epoch's shorter last chunk splits them, on the CPU model.
    config = TrainConfig(width=4, batch_size=9, augment="trivial")
    state = steps.create_train_state(build_model(4, "matmul"), optim.build_direction(config),
                                     optim.build_schedule(config, 0, steps_per_epoch=10), seed=0)
    assert state.apply_fn.__self__.batch_slices == 2
    images = jnp.asarray(np.random.default_rng(0).integers(0, 255, (64, 28, 28)), jnp.uint8)
    labels = jnp.arange(64, dtype=jnp.int32) % 10
    rows = np.random.default_rng(1).permutation(64)[:36].reshape(4, 9)

    def run(state, chunks):
        state = jax.tree.map(jnp.copy, state)  # train_steps donates its input state
        for start, length in chunks:
            chunk = np.zeros((4, 9), np.int32)
            chunk[:length] = rows[start:start + length]
            state, _ = steps.train_steps(state, images, labels, jnp.asarray(chunk),
                                         jnp.int32(length), augmentation="trivial")
        return state

    whole = run(state, [(0, 4)])
    split = run(state, [(0, 1), (1, 3)])
    assert int(whole.step) == int(split.step) == 4
    chex.assert_trees_all_equal(whole.params, split.params)
    chex.assert_trees_all_equal(whole.opt_state, split.opt_state)


def test_train_steps_precomputed_is_bitwise_equal():
    # The trainer passes augment.precompute's tables, and the result must not depend on them.
    config = TrainConfig(width=4, batch_size=9, augment="trivial")
    state = steps.create_train_state(build_model(4, "matmul"), optim.build_direction(config),
                                     optim.build_schedule(config, 0, steps_per_epoch=10), seed=0)
    images = jnp.asarray(np.random.default_rng(0).integers(0, 255, (64, 28, 28)), jnp.uint8)
    labels = jnp.arange(64, dtype=jnp.int32) % 10
    indices = jnp.asarray(np.random.default_rng(1).permutation(64)[:36].reshape(4, 9), jnp.int32)

    def run(precomputed):
        start = jax.tree.map(jnp.copy, state)  # train_steps donates its input state
        return steps.train_steps(start, images, labels, indices, jnp.int32(4),
                                 augmentation="trivial", precomputed=precomputed)[0]

    drawn_ops = [augment.draw("trivial", jax.random.fold_in(state.rng, step), (9, 28, 28, 1))[1]
                 for step in range(4)]
    assert list(augment.OPS).index("equalize") in np.concatenate(drawn_ops)

    with_tables = run(augment.precompute("trivial", images))
    without = run(())
    assert int(with_tables.step) == 4
    chex.assert_trees_all_equal(with_tables.params, without.params)
    chex.assert_trees_all_equal(with_tables.opt_state, without.opt_state)
    # A wrong table changes the params, which shows that the tables are used.
    wrong_tables = run((jnp.zeros_like(images),))
    assert not np.array_equal(wrong_tables.params["Dense_0"]["kernel"], without.params["Dense_0"]["kernel"])


def test_train_steps_stops_before_nonfinite_loss():
    state = make_state()
    images = jnp.zeros((16, 28, 28), jnp.uint8)
    labels = jnp.zeros((16,), jnp.int32)
    indices = jnp.zeros((3, 8), jnp.int32)
    poisoned = state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
    before = leaves_as_numpy(poisoned.params)
    new_state, totals = steps.train_steps(poisoned, images, labels, indices, jnp.int32(3),
                                          augmentation="none")
    assert bool(totals["nonfinite"])
    assert int(totals["steps"]) == 0
    assert int(new_state.step) == 0
    for old, new in zip(before, leaves_as_numpy(new_state.params)):
        np.testing.assert_array_equal(old, new)


def test_loss_falls_on_fixed_batch():
    state, batch = make_state(lr=3e-3), make_batch(size=16)
    _, first = steps.train_step(state, batch)
    for _ in range(40):
        state, metrics = steps.train_step(state, batch)
    assert float(metrics["loss"]) < 0.5 * float(first["loss"])


def test_metrics_report_scheduled_lr():
    config = TrainConfig(width=2, lr=0.1, schedule="cosine", epochs=1)
    schedule = optim.build_schedule(config, 0, steps_per_epoch=4)
    state = steps.create_train_state(CNN(width=2), optim.build_direction(config), schedule, 0)
    for step in range(3):
        state, metrics = steps.train_step(state, make_batch())
        assert float(metrics["lr"]) == pytest.approx(float(schedule(step)))
    assert float(metrics["lr"]) < 0.1


def test_update_is_minus_lr_times_adam_direction():
    state, batch = make_state(lr=0.05), make_batch()
    grads = jax.grad(lambda p: steps._loss_and_logits(p, state, batch)[0])(state.params)
    reference = optax.adam(0.05)
    updates, _ = reference.update(grads, reference.init(state.params), state.params)
    new_state, _ = steps.train_step(state, batch)
    expected = optax.apply_updates(state.params, updates)
    chex.assert_trees_all_close(new_state.params, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("conv", ["matmul", "xla"])
def test_gradients_match_finite_differences(conv):
    # Central differences along random directions, in float64 so rounding stays far below the tolerance.
    with jax.enable_x64(True):
        model = CNN(width=2, conv=conv)
        rng = np.random.default_rng(0)
        images = jnp.asarray(rng.random((3, 28, 28, 1)), jnp.float64)
        labels = jnp.asarray([0, 3, 9])
        params = jax.tree.map(lambda p: p.astype(jnp.float64),
                              model.init(jax.random.PRNGKey(1), images)["params"])

        def loss(params):
            logits = model.apply({"params": params}, images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        grads = jax.grad(loss)(params)
        eps = 1e-6
        for seed in range(3):
            direction_rng = np.random.default_rng(seed)
            direction = jax.tree.map(lambda p: jnp.asarray(direction_rng.standard_normal(p.shape)),
                                     params)
            analytic = sum(float(jnp.vdot(g, d)) for g, d in
                           zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
            plus = loss(jax.tree.map(lambda p, d: p + eps * d, params, direction))
            minus = loss(jax.tree.map(lambda p, d: p - eps * d, params, direction))
            numeric = float(plus - minus) / (2 * eps)
            assert numeric == pytest.approx(analytic, rel=1e-6, abs=1e-9)


def test_eval_step_counts_exactly():
    state = make_state(width=2)
    # Zero weights and a bias that favours class 3 make every prediction 3.
    params = jax.tree.map(jnp.zeros_like, state.params)
    params["Dense_0"]["bias"] = jnp.arange(10.0) * (jnp.arange(10) == 3)
    state = state.replace(params=params)
    labels = jnp.asarray([3, 3, 1, 3, 0, 3, 9, 2], jnp.int32)
    mask = jnp.asarray([True, True, True, True, True, True, False, False])
    metrics = steps.eval_step(state, {"image": jnp.zeros((8, 28, 28, 1)), "label": labels,
                                      "mask": mask})
    assert int(metrics["correct"]) == 4
    assert int(metrics["count"]) == 6
    expected_loss = float(optax.softmax_cross_entropy_with_integer_labels(
        params["Dense_0"]["bias"][None].repeat(6, 0), labels[:6]).sum())
    assert float(metrics["loss_sum"]) == pytest.approx(expected_loss, rel=1e-6)


def test_eval_batches_matches_eval_step():
    state = make_state(width=2)
    rng = np.random.default_rng(3)
    images = jnp.asarray(rng.integers(0, 255, (3, 5, 28, 28)), jnp.uint8)
    labels = jnp.asarray(rng.integers(0, 10, (3, 5)), jnp.int32)
    mask = jnp.ones((3, 5), bool).at[2, 3:].set(False)
    totals = steps.eval_batches(state, images, labels, mask)
    expected = [steps.eval_step(state, {"image": steps.images_to_float(images[i]),
                                        "label": labels[i], "mask": mask[i]}) for i in range(3)]
    assert int(totals["count"]) == 13
    assert int(totals["correct"]) == sum(int(m["correct"]) for m in expected)
    assert float(totals["loss_sum"]) == pytest.approx(sum(float(m["loss_sum"]) for m in expected),
                                                      rel=1e-5)
