"""Resuming a run: restored state, new segments, and learning rates that change on resume."""

from __future__ import annotations

import dataclasses
import logging
import shutil

import chex
import jax
import optax
import pytest

from fmnist_jax import runs, steps, train_loop
from fmnist_jax.config import TrainConfig
from tests.conftest import synthetic_dataset
from tests.test_steps import make_batch

# 256 synthetic examples at batch 32: 8 steps an epoch.
CONFIG = TrainConfig(width=4, batch_size=32, epochs=1, lr=1e-2, steps_per_dispatch=4)
STEPS_PER_EPOCH = 8


def train(run_dir, config=CONFIG, resume=None):
    return train_loop.train_and_evaluate(config, run_dir, synthetic_dataset(), resume,
                                         show_progress=False, draw_plots=False)


def resume_point(run_dir) -> train_loop.Resume:
    return runs.find_resume_point(run_dir)[0]


def restore(run_dir, config):
    return train_loop._continue(resume_point(run_dir), config, STEPS_PER_EPOCH,
                                train_loop.make_mesh())


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    return run_dir, train(run_dir)


def test_restore_equals_saved_state(one_epoch):
    run_dir, result = one_epoch
    new_lr = dataclasses.replace(CONFIG, epochs=2, lr=3e-4)
    state, segments = restore(run_dir, new_lr)
    chex.assert_trees_all_equal(state.params, result.state.params)
    chex.assert_trees_all_equal(state.opt_state, result.state.opt_state)
    chex.assert_trees_all_equal(state.rng, result.state.rng)
    assert int(state.step) == STEPS_PER_EPOCH
    assert len(segments) == 2
    assert segments[1]["start_step"] == STEPS_PER_EPOCH
    assert segments[1]["lr"] == 3e-4


def test_first_update_after_resume_uses_new_lr(one_epoch):
    run_dir, _ = one_epoch
    state, _ = restore(run_dir, dataclasses.replace(CONFIG, epochs=2, lr=3e-4))
    batch = make_batch(size=32)
    new_state, metrics = jax.jit(steps._train_step)(state, batch)
    grads = jax.grad(lambda p: steps._loss_and_logits(p, state, batch)[0])(state.params)
    direction, _ = state.tx.update(grads, state.opt_state, state.params)
    expected = optax.apply_updates(state.params, jax.tree.map(lambda d: -3e-4 * d, direction))
    assert float(metrics["lr"]) == pytest.approx(3e-4)
    chex.assert_trees_all_close(new_state.params, expected, rtol=1e-6, atol=1e-8)


def test_augment_change_keeps_lr_curve(one_epoch):
    run_dir, _ = one_epoch
    _, segments = restore(run_dir, dataclasses.replace(CONFIG, augment="none"))
    assert len(segments) == 2
    assert segments[1]["augment"] == "none"
    assert segments[1]["schedule_start_step"] == 0


def test_lr_change_restarts_lr_curve(one_epoch):
    run_dir, _ = one_epoch
    _, segments = restore(run_dir, dataclasses.replace(CONFIG, epochs=2, lr=3e-4))
    assert segments[1]["schedule_start_step"] == STEPS_PER_EPOCH


def test_unchanged_resume_keeps_segment(one_epoch):
    run_dir, _ = one_epoch
    state, segments = restore(run_dir, CONFIG)
    assert len(segments) == 1
    assert float(state.lr_schedule(state.step)) == pytest.approx(CONFIG.lr)


def test_optimizer_family_change_resets_state(one_epoch, caplog):
    run_dir, result = one_epoch
    with caplog.at_level(logging.WARNING):
        state, segments = restore(run_dir, dataclasses.replace(CONFIG, epochs=2, optimizer="sgd"))
    chex.assert_trees_all_equal(state.params, result.state.params)
    chex.assert_trees_all_equal_structs(state.opt_state, optax.chain(
        optax.add_decayed_weights(0.0), optax.trace(0.9)).init(state.params))
    assert "optimizer changed from adam to sgd" in caplog.text
    assert segments[-1]["optimizer"] == "sgd"


def test_adamw_keeps_adam_moments(one_epoch):
    run_dir, result = one_epoch
    state, _ = restore(run_dir, dataclasses.replace(CONFIG, epochs=2, optimizer="adamw",
                                                    weight_decay=1e-4))
    chex.assert_trees_all_equal(state.opt_state, result.state.opt_state)


def test_resume_continues_to_total_epochs(one_epoch, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(one_epoch[0], run_dir)
    result = train(run_dir, dataclasses.replace(CONFIG, epochs=3, lr=3e-4), resume_point(run_dir))
    assert int(result.state.step) == 3 * STEPS_PER_EPOCH
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert [row["lr"] for row in result.history][1:] == [pytest.approx(3e-4)] * 2
