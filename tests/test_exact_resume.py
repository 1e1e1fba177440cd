"""A run stopped at any step and resumed reproduces the unbroken run bit for bit."""

from __future__ import annotations

import dataclasses
import pickle

import jax
import numpy as np
import pytest

import orbax.checkpoint as ocp

from fmnist_jax import train_loop
from fmnist_jax.checkpoint import RunCheckpoints
from fmnist_jax.errors import CheckpointError
from fmnist_jax.interrupt import Interrupted
from tests.conftest import synthetic_dataset
from tests.test_resume import CONFIG, STEPS_PER_EPOCH, resume_point, train

TWO_EPOCHS = dataclasses.replace(CONFIG, epochs=2, steps_per_dispatch=3, keep=50)


def assert_states_equal(left, right) -> None:
    for name in ("params", "opt_state", "rng", "step"):
        left_leaves = jax.tree.leaves(getattr(left, name))
        right_leaves = jax.tree.leaves(getattr(right, name))
        assert len(left_leaves) == len(right_leaves)
        for a, b in zip(left_leaves, right_leaves):
            assert np.array_equal(np.asarray(a), np.asarray(b)), name


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    return train(tmp_path_factory.mktemp("unbroken"), TWO_EPOCHS)


# Mid-epoch steps, an epoch boundary, and a step inside a dispatch chunk.
@pytest.mark.parametrize("stop_step", [1, 5, STEPS_PER_EPOCH, 13])
def test_stop_and_resume_matches_unbroken(unbroken, tmp_path, stop_step):
    with pytest.raises(Interrupted):
        train_loop.train_and_evaluate(TWO_EPOCHS, tmp_path, synthetic_dataset(), None,
                                      show_progress=False, draw_plots=False,
                                      stop_at_step=stop_step)
    point = resume_point(tmp_path)
    assert point.step == stop_step
    resumed = train(tmp_path, TWO_EPOCHS, point)
    assert_states_equal(resumed.state, unbroken.state)
    assert [row["epoch"] for row in resumed.history] == [1, 2]
    for ours, theirs in zip(resumed.history, unbroken.history):
        assert ours["test/accuracy"] == theirs["test/accuracy"]
        assert ours["train/loss"] == pytest.approx(theirs["train/loss"], rel=1e-6)


def test_restore_never_unpickles(unbroken, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    checkpoints = RunCheckpoints(unbroken.checkpoint_dir, keep=50)
    state = checkpoints.restore(checkpoints.latest_step(), train_loop.restore_template(TWO_EPOCHS))
    checkpoints.close()
    assert_states_equal(state, unbroken.state)
    assert_states_equal(resume_point(unbroken.checkpoint_dir.parent).state, unbroken.state)


def test_failed_background_save_stops_training(tmp_path, monkeypatch):
    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", disk_full)
    with pytest.raises(CheckpointError, match="failed .*No space left on device"):
        train(tmp_path, TWO_EPOCHS)


def test_failed_save_stops_training(tmp_path, monkeypatch):
    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", disk_full)
    with pytest.raises(CheckpointError, match="saving step 8 .* failed .*No space left on device"):
        train(tmp_path, TWO_EPOCHS)
