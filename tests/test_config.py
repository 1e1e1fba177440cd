"""Config validation and the rule for what a resume may change."""

from __future__ import annotations

import dataclasses

import pytest

from fmnist_jax import config as config_lib
from fmnist_jax.config import TrainConfig
from fmnist_jax.errors import ConfigError


@pytest.mark.parametrize("field, value, message", [
    ("epochs", 0, "invalid --epochs 0"),
    ("batch_size", -4, "invalid --batch-size -4"),
    ("seed", -1, "invalid --seed -1"),
    ("seed", 2**32, "invalid --seed"),
    ("lr", 0.0, "invalid --lr 0.0"),
    ("lr", float("inf"), "invalid --lr inf"),
    ("momentum", 1.0, "invalid --momentum 1.0"),
    ("optimizer", "lion", "invalid --optimizer 'lion'"),
    ("schedule", "linear", "invalid --schedule 'linear'"),
    ("warmup_epochs", 1.0, "invalid --warmup 1.0"),
    ("val_split", -1, "invalid --val-split -1"),
])
def test_validate_rejects(field, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        config_lib.validate(dataclasses.replace(TrainConfig(), **{field: value}))


def test_presets_are_valid():
    for name in config_lib.PRESETS:
        config_lib.validate(config_lib.PRESETS[name])


def test_adam_rejects_weight_decay():
    with pytest.raises(ConfigError, match="use --optimizer adamw"):
        config_lib.validate(TrainConfig(weight_decay=1e-4))


def test_resume_may_change_schedule():
    config = config_lib.resume_overrides(TrainConfig(), {"lr": 3e-4, "schedule": "cosine"})
    assert config.lr == 3e-4
    assert config.schedule == "cosine"


@pytest.mark.parametrize("field, value", [("width", 16), ("batch_size", 64), ("seed", 1),
                                          ("val_split", 100), ("train_examples", 10)])
def test_resume_rejects_fixed_fields(field, value):
    with pytest.raises(ConfigError, match=f"cannot change on resume"):
        config_lib.resume_overrides(TrainConfig(), {field: value})


def test_resume_accepts_fixed_field_unchanged():
    assert config_lib.resume_overrides(TrainConfig(), {"width": 8}).width == 8


def test_saved_config_with_unknown_field_is_rejected():
    with pytest.raises(ConfigError, match="newer fmnist-jax"):
        TrainConfig.from_dict({**TrainConfig().to_dict(), "dropout": 0.1})
