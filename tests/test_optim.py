"""Learning-rate schedules per segment, and the optimizer families."""

from __future__ import annotations

import dataclasses

import pytest

from fmnist_jax import optim
from fmnist_jax.config import TrainConfig

# 10 epochs of 10 steps: 100 steps in all.
STEPS_PER_EPOCH = 10


def lr_at(config: TrainConfig, step: int, start_step: int = 0) -> float:
    return float(optim.build_schedule(config, start_step, STEPS_PER_EPOCH)(step))


@pytest.mark.parametrize("schedule, step, start, expected", [
    ("constant", 0, 0, 0.1),
    ("constant", 99, 0, 0.1),
    ("cosine", 0, 0, 0.1),
    ("cosine", 50, 0, 0.05),
    ("cosine", 100, 0, 0.0),
    # A segment from step 60 decays over the 40 steps left.
    ("cosine", 60, 60, 0.1),
    ("cosine", 80, 60, 0.05),
    ("step", 49, 0, 0.1),
    ("step", 50, 0, 0.01),
    ("step", 75, 0, 0.001),
    ("step", 80, 60, 0.01),
])
def test_schedule_values(schedule, step, start, expected):
    config = TrainConfig(lr=0.1, epochs=10, schedule=schedule)
    assert lr_at(config, step, start) == pytest.approx(expected, abs=1e-6)


def test_warmup_cosine_ramps_then_decays():
    config = TrainConfig(lr=0.1, epochs=10, schedule="warmup_cosine", warmup_epochs=2)
    assert lr_at(config, 0) == pytest.approx(0.1 / optim.WARMUP_START_DIVISOR)
    assert lr_at(config, 20) == pytest.approx(0.1)
    assert lr_at(config, 100) == pytest.approx(0.0, abs=1e-7)
    assert lr_at(config, 10) < lr_at(config, 20)
    assert lr_at(config, 60) < lr_at(config, 20)


def test_short_segment_warmup_still_decays():
    config = TrainConfig(lr=0.1, epochs=10, schedule="warmup_cosine", warmup_epochs=2)
    # 5 steps remain: warmup is capped at 2, so the last step is far below the peak.
    assert lr_at(config, 97, start_step=95) == pytest.approx(0.1)
    assert lr_at(config, 99, start_step=95) < 0.05


def test_step_schedule_decays_twice_in_tiny_segment():
    config = TrainConfig(lr=0.1, epochs=10, schedule="step")
    # 2 steps remain: both boundaries fall on step 1 of the segment.
    assert lr_at(config, 98, start_step=98) == pytest.approx(0.1)
    assert lr_at(config, 99, start_step=98) == pytest.approx(0.001)


def test_schedule_counts_global_steps():
    config = TrainConfig(lr=0.1, epochs=10, schedule="cosine")
    schedule = optim.build_schedule(config, 60, STEPS_PER_EPOCH)
    assert float(schedule(60)) == pytest.approx(0.1)
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("first, second, same", [
    ("adam", "adamw", True), ("adamw", "adam", True), ("adam", "sgd", False),
])
def test_optimizer_families(first, second, same):
    assert (optim.family(first) == optim.family(second)) is same


def test_adam_and_adamw_share_state_layout():
    import jax
    import jax.numpy as jnp
    params = {"w": jnp.ones(3)}
    adam = optim.build_direction(TrainConfig(optimizer="adam")).init(params)
    adamw = optim.build_direction(
        dataclasses.replace(TrainConfig(), optimizer="adamw", weight_decay=1e-4)).init(params)
    assert jax.tree.structure(adam) == jax.tree.structure(adamw)
