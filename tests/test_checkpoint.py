"""Orbax round trips, rolling retention and the metadata checks of `RunCheckpoints`."""

from __future__ import annotations

import chex
import pytest

from fmnist_jax import checkpoint, optim, steps
from fmnist_jax.checkpoint import RunCheckpoints, unreadable_metrics
from fmnist_jax.config import TrainConfig
from fmnist_jax.errors import CheckpointError
from fmnist_jax.model import CNN
from tests.test_steps import make_batch


def fresh_state(width: int = 4, seed: int = 0) -> steps.TrainState:
    config = TrainConfig(width=width)
    return steps.create_train_state(CNN(width=width, conv="matmul"), optim.build_direction(config),
                                    optim.build_schedule(config, 0, 10), seed)


def state_at(step: int) -> steps.TrainState:
    return fresh_state().replace(step=step)


def test_round_trip_restores_every_leaf(tmp_path):
    state = fresh_state()
    for seed in range(2):
        state, _ = steps.train_step(state, make_batch(seed=seed))
    saved = RunCheckpoints(tmp_path, keep=3)
    saved.save(state, {"note": "two steps"})
    saved.wait()
    saved.close()

    restored_from = RunCheckpoints(tmp_path, keep=3)
    restored = restored_from.restore(2, fresh_state(seed=7))
    metadata = restored_from.read_metadata(2)
    restored_from.close()
    chex.assert_trees_all_equal(restored.params, state.params)
    chex.assert_trees_all_equal(restored.opt_state, state.opt_state)
    chex.assert_trees_all_equal(restored.rng, state.rng)
    assert int(restored.step) == 2
    assert metadata["note"] == "two steps"
    assert metadata["format_version"] == checkpoint.FORMAT_VERSION


def test_keeps_only_latest_n(tmp_path):
    checkpoints = RunCheckpoints(tmp_path, keep=3)
    for step in range(1, 6):
        checkpoints.save(state_at(step), {})
    checkpoints.wait()
    assert checkpoints.steps() == [3, 4, 5]
    checkpoints.close()


def test_keeps_best_besides_latest(tmp_path):
    checkpoints = RunCheckpoints(tmp_path, keep=2, keep_best=True)
    accuracies = {10: 0.5, 20: 0.9, 30: 0.6, 40: 0.7, 50: 0.65}
    for step, accuracy in accuracies.items():
        checkpoints.save(state_at(step), {}, {checkpoint.BEST_METRIC: accuracy})
        if step == 30:
            checkpoints.save(state_at(35), {})  # a mid-epoch save carries no metric
    checkpoints.wait()
    assert checkpoints.steps() == [20, 40, 50]
    assert checkpoints.best_step() == 20
    checkpoints.close()


def test_best_survives_reopening(tmp_path):
    first = RunCheckpoints(tmp_path, keep=2, keep_best=True)
    for step, accuracy in {10: 0.5, 20: 0.9, 30: 0.6}.items():
        first.save(state_at(step), {}, {checkpoint.BEST_METRIC: accuracy})
    first.wait()
    first.close()
    second = RunCheckpoints(tmp_path, keep=2, keep_best=True)
    for step, accuracy in {40: 0.7, 50: 0.65}.items():
        second.save(state_at(step), {}, {checkpoint.BEST_METRIC: accuracy})
    second.wait()
    assert second.steps() == [20, 40, 50]
    assert second.best_step() == 20
    second.close()


def test_metadata_is_copied_at_save(tmp_path):
    checkpoints = RunCheckpoints(tmp_path, keep=1)
    history = [{"epoch": 1}]
    checkpoints.save(state_at(1), {"history": history})
    history.append({"epoch": 2})  # the caller goes on while the write is in flight
    checkpoints.wait()
    assert checkpoints.read_metadata(1)["history"] == [{"epoch": 1}]
    checkpoints.close()


def test_newer_format_version_is_rejected(tmp_path, monkeypatch):
    checkpoints = RunCheckpoints(tmp_path, keep=1)
    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", 99)
    checkpoints.save(state_at(1), {})
    checkpoints.wait()
    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", 1)
    with pytest.raises(CheckpointError, match="format version 99"):
        checkpoints.read_metadata(1)
    checkpoints.close()


def test_missing_array_metadata_is_unrestorable(tmp_path):
    checkpoints = RunCheckpoints(tmp_path, keep=1)
    checkpoints.save(fresh_state(width=4).replace(step=1), {})
    checkpoints.wait()
    (tmp_path / "1" / "state" / "_METADATA").unlink()
    with pytest.raises(CheckpointError, match="has unreadable array metadata") as info:
        checkpoints.restore(1, fresh_state(width=4))
    assert "array metadata of item 'state' is missing" in str(info.value)
    checkpoints.close()


def test_truncated_array_data_is_unrestorable(tmp_path):
    checkpoints = RunCheckpoints(tmp_path, keep=1)
    checkpoints.save(fresh_state(width=4).replace(step=1), {})
    checkpoints.wait()
    data_files = [p for p in (tmp_path / "1" / "state").glob("ocdbt.process_*/d/*")]
    assert data_files
    for path in data_files:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cannot be read"):
        checkpoints.restore(1, fresh_state(width=4))
    checkpoints.close()


def test_unreadable_metrics_are_listed(tmp_path):
    checkpoints = RunCheckpoints(tmp_path, keep=3, keep_best=True)
    for step in (1, 2):
        checkpoints.save(fresh_state(width=4).replace(step=step), {},
                         metrics={"val/accuracy": 0.5 + step / 10})
    checkpoints.close()
    (tmp_path / "2" / "metrics" / "metrics").write_text("{not json")
    assert [step for step, _ in unreadable_metrics(tmp_path)] == [2]
    with pytest.raises(ValueError):
        RunCheckpoints(tmp_path, keep=3, keep_best=True)


def test_other_width_is_rejected(tmp_path):
    checkpoints = RunCheckpoints(tmp_path, keep=1)
    checkpoints.save(fresh_state(width=4).replace(step=1), {})
    checkpoints.wait()
    with pytest.raises(CheckpointError, match="cannot be restored into this model") as info:
        checkpoints.restore(1, fresh_state(width=6))
    assert ("params['Conv3x3_0']['bias'] is float32[4] in the checkpoint and float32[6] "
            "in this model") in str(info.value)
    checkpoints.close()
