"""Training configuration: one frozen dataclass, its presets and its validation.

A config is plain data. `validate` is the single place that rejects bad values,
and `resume_overrides` contains the rule for which fields a resume may change.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fmnist_jax.errors import ConfigError

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "step")
AUGMENTATIONS = ("none", "flip", "trivial")
CONV_IMPLEMENTATIONS = ("auto", "xla", "matmul")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides what a training run computes."""

    # Model.
    width: int = 8  # filters in every convolution; the PyTorch original used 8
    conv: str = "auto"  # convolution implementation: auto (by backend), xla or matmul

    # Data.
    batch_size: int = 32  # global batch, split across devices
    val_split: int = 0  # training examples held out for validation (0: none)
    train_examples: int = 0  # use only the first N training examples (0: all), for quick runs
    augment: str = "flip"  # none, flip (random horizontal flip) or trivial (flip + TrivialAugment-Wide)
    seed: int = 0  # parameter init, data order and augmentation all derive from it

    # Optimisation.
    epochs: int = 100  # total epochs of the run, counted from step 0
    optimizer: str = "adam"  # adam, adamw or sgd (with momentum)
    lr: float = 1e-3  # peak learning rate
    schedule: str = "constant"  # constant, cosine, warmup_cosine or step
    warmup_epochs: float = 0.0  # linear warmup length for warmup_cosine, in epochs
    weight_decay: float = 0.0  # decoupled for adamw, added to the gradient for sgd
    momentum: float = 0.9  # sgd only

    # Checkpoints.
    keep: int = 3  # most recent checkpoints kept for resuming
    save_every_steps: int = 0  # extra saves every N steps (0: only at epoch ends)
    save_every_minutes: float = 0.0  # extra saves every M minutes of wall time (0: off)
    steps_per_dispatch: int = 64  # training steps run by one compiled call

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build a config from saved JSON, rejecting fields this version does not know."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"saved config has unknown fields {unknown}; it was written by a newer "
                "fmnist-jax, so upgrade fmnist-jax or start a new run with --run NAME")
        return cls(**values)


PRESETS: dict[str, TrainConfig] = {
    # The PyTorch recipe as first published: Adam 1e-3, batch 32, flips, 100 epochs.
    "original": TrainConfig(),
    # The same model and batch with a one-cycle schedule at a higher peak learning
    # rate, holding out 5000 examples to pick the best checkpoint.
    "default": TrainConfig(
        epochs=12, lr=3e-3, schedule="warmup_cosine", warmup_epochs=1.0, val_split=5000),
}

# Fields a resume may change. The others fix the model, the data order or the
# split, so changing them would not continue the same run.
RESUMABLE_FIELDS = frozenset({
    "epochs", "optimizer", "lr", "schedule", "warmup_epochs", "weight_decay", "momentum",
    "augment", "conv", "keep", "save_every_steps", "save_every_minutes", "steps_per_dispatch",
})

# Fields whose change on resume starts a new training segment.
SEGMENT_FIELDS = ("epochs", "optimizer", "lr", "schedule", "warmup_epochs", "weight_decay",
                  "momentum", "augment")
# Of those, the fields whose change also restarts the learning-rate curve at the resume step.
SCHEDULE_FIELDS = ("epochs", "lr", "schedule", "warmup_epochs")


def from_preset(name: str, **overrides: Any) -> TrainConfig:
    """Return preset `name` with `overrides` applied, validated."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    config = dataclasses.replace(PRESETS[name], **overrides)
    validate(config)
    return config


def resume_overrides(saved: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """Apply command-line `overrides` to a saved config, rejecting fields a resume cannot change."""
    for name, value in overrides.items():
        if name not in RESUMABLE_FIELDS and getattr(saved, name) != value:
            flag = flag_for(name)
            raise ConfigError(
                f"the checkpoint was trained with {name}={getattr(saved, name)!r}, not {value!r}; "
                f"{name} cannot change on resume, so drop {flag} or start a new run with --run NAME")
    config = dataclasses.replace(saved, **overrides)
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Raise ConfigError naming the first invalid field and the fix."""
    _check_choice("optimizer", config.optimizer, OPTIMIZERS)
    _check_choice("schedule", config.schedule, SCHEDULES)
    _check_choice("augment", config.augment, AUGMENTATIONS)
    _check_choice("conv", config.conv, CONV_IMPLEMENTATIONS)
    for name in ("width", "batch_size", "epochs", "keep", "steps_per_dispatch"):
        if getattr(config, name) < 1:
            _reject(name, getattr(config, name), "must be at least 1")
    for name in ("val_split", "train_examples", "save_every_steps"):
        if getattr(config, name) < 0:
            _reject(name, getattr(config, name), "must be 0 or more")
    for name in ("warmup_epochs", "weight_decay", "save_every_minutes"):
        if not getattr(config, name) >= 0:
            _reject(name, getattr(config, name), "must be 0 or more")
    if not 0 <= config.seed < 2**32:
        _reject("seed", config.seed, "must be in [0, 2**32)")
    if not 0 < config.lr < float("inf"):
        _reject("lr", config.lr, "must be a positive number such as 1e-3")
    if not 0 <= config.momentum < 1:
        _reject("momentum", config.momentum, "must be in [0, 1)")
    if config.optimizer == "adam" and config.weight_decay:
        _reject("weight_decay", config.weight_decay,
                "applies to adamw and sgd only; use --optimizer adamw for decoupled weight decay")
    if config.warmup_epochs and config.schedule != "warmup_cosine":
        _reject("warmup_epochs", config.warmup_epochs,
                "applies only to --schedule warmup_cosine; drop --warmup or change the schedule")
    if config.warmup_epochs > config.epochs:
        _reject("warmup_epochs", config.warmup_epochs, f"exceeds the {config.epochs} epochs of the run")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _reject(name, value, f"must be one of {', '.join(choices)}")


def flag_for(name: str) -> str:
    """Return the command-line flag that sets config field `name`."""
    return "--warmup" if name == "warmup_epochs" else "--" + name.replace("_", "-")


def _reject(name: str, value: Any, rule: str) -> None:
    raise ConfigError(f"invalid {flag_for(name)} {value!r}: it {rule}")
