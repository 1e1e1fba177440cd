"""The training loop: epochs, progress, evaluation, history and when to save."""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from tqdm import tqdm

from fmnist_jax import batches, distributed, optim, plots
from fmnist_jax.distributed import make_mesh, to_global
from fmnist_jax.checkpoint import BEST_METRIC, RunCheckpoints
from fmnist_jax.config import SEGMENT_FIELDS, TrainConfig
from fmnist_jax.data import Dataset
from fmnist_jax.errors import CheckpointError, ConfigError, NonFiniteLossError
from fmnist_jax.interrupt import Interrupted, StopRequest
from fmnist_jax.model import CNN, resolve_conv
from fmnist_jax.splits import Splits, evaluate, place_splits
from fmnist_jax.steps import TrainState, create_train_state, train_steps

logger = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class Resume:
    """A resume point: a checkpoint step, its folder and the metadata saved with it."""

    step: int
    metadata: dict[str, Any]
    directory: pathlib.Path  # the checkpoint folder holding `step`


@dataclasses.dataclass(frozen=True)
class RunResult:
    state: TrainState
    history: list[dict[str, float]]
    segments: list[dict[str, Any]]
    checkpoint_dir: pathlib.Path


def _build_state(config: TrainConfig, schedule_start: int, steps_per_epoch: int,
                 mesh: Mesh) -> TrainState:
    model = CNN(width=config.width, conv=resolve_conv(config.conv))
    state = create_train_state(model, optim.build_direction(config),
                               optim.build_schedule(config, schedule_start, steps_per_epoch),
                               config.seed)
    return state.replace(**to_global(
        {"params": state.params, "opt_state": state.opt_state, "step": state.step,
         "rng": state.rng}, distributed.replicated(mesh)))


def restore_template(config: TrainConfig) -> TrainState:
    """Return a state with the structure, shapes and placement that a checkpoint of `config` restores into."""
    return _build_state(config, 0, 1, make_mesh())


def _segment(config: TrainConfig, start_step: int, steps_per_epoch: int, reason: str) -> dict:
    settings = {name: getattr(config, name) for name in SEGMENT_FIELDS}
    return {"start_step": start_step, "start_epoch": start_step / steps_per_epoch,
            "reason": reason, **settings}


def _restore(checkpoints: RunCheckpoints, resume: Resume, config: TrainConfig,
             steps_per_epoch: int, mesh: Mesh) -> tuple[TrainState, list[dict]]:
    """Return the restored state under `config` and the segments, appending one if settings changed."""
    saved = TrainConfig.from_dict(resume.metadata["config"])
    if saved.width != config.width:
        raise CheckpointError(
            f"checkpoint {checkpoints.directory / str(resume.step)} contains a model of width "
            f"{saved.width}, not {config.width}; resume without --width or start a new run")
    segments = list(resume.metadata["segments"])
    last = segments[-1]
    changes = [f"{name} {last[name]!r} -> {getattr(config, name)!r}"
               for name in SEGMENT_FIELDS if last[name] != getattr(config, name)]
    if changes:
        segments.append(_segment(config, resume.step, steps_per_epoch,
                                 "resumed with " + ", ".join(changes)))
        logger.info("new training segment from step %d: %s", resume.step, ", ".join(changes))

    template = _build_state(saved, last["start_step"], steps_per_epoch, mesh)
    state = checkpoints.restore(resume.step, template)
    logger.info("restored step %d (epoch %.2f) from %s", resume.step,
                resume.step / steps_per_epoch, checkpoints.directory)
    fresh = _build_state(config, segments[-1]["start_step"], steps_per_epoch, mesh)
    opt_state = state.opt_state
    if optim.family(saved.optimizer) != optim.family(config.optimizer):
        opt_state = fresh.tx.init(state.params)
        logger.warning("optimizer changed from %s to %s, so its state (moments) starts afresh",
                       saved.optimizer, config.optimizer)
    state = state.replace(tx=fresh.tx, lr_schedule=fresh.lr_schedule, opt_state=opt_state)
    return state, segments


def train_and_evaluate(config: TrainConfig, run_dir: pathlib.Path, dataset: Dataset,
                       resume: Resume | None = None, *, show_progress: bool = True,
                       draw_plots: bool = True, stop: StopRequest | None = None,
                       stop_at_step: int | None = None) -> RunResult:
    """Train under `config`, saving into `run_dir`, from scratch or from `resume`.

    Args:
      config: the settings of this run, with any resume overrides already applied.
      run_dir: the run folder; checkpoints go to `run_dir / "checkpoints"`.
      dataset: Fashion-MNIST as uint8 arrays.
      resume: the checkpoint to continue from, or None for a fresh start.
      show_progress: draw a progress bar per epoch.
      draw_plots: write the curves and the prediction grid into `run_dir` at the end.
      stop: polled between steps; once it is requested, the loop saves and raises Interrupted.
      stop_at_step: save and raise Interrupted on reaching this step, as on SIGTERM.

    Returns:
      The final state, the per-epoch history, the segments and the checkpoint folder.
    """
    mesh = make_mesh()
    if config.batch_size % mesh.size:
        raise ConfigError(f"invalid --batch-size {config.batch_size}: it must be divisible by the "
                          f"{mesh.size} devices, for example {mesh.size * 32}")
    splits = place_splits(dataset, config, mesh)
    steps_per_epoch = len(splits.train[0]) // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"invalid --batch-size {config.batch_size}: it exceeds the "
                          f"{len(splits.train[0])} training examples")
    checkpoints = RunCheckpoints(run_dir / "checkpoints", config.keep,
                                 keep_best=splits.val is not None)
    try:
        if resume is None:
            state = _build_state(config, 0, steps_per_epoch, mesh)
            segments = [_segment(config, 0, steps_per_epoch, "fresh start")]
            history: list[dict[str, float]] = []
            progress: dict[str, float] = {}
        else:
            source = checkpoints
            if resume.directory != checkpoints.directory:
                source = RunCheckpoints(resume.directory, keep=config.keep)
            try:
                state, segments = _restore(source, resume, config, steps_per_epoch, mesh)
            finally:
                if source is not checkpoints:
                    source.close()
            history = list(resume.metadata["history"])
            progress = dict(resume.metadata.get("epoch_progress", {}))
        loop = _Loop(config, checkpoints, splits, steps_per_epoch, mesh, segments, history,
                     progress, show_progress, stop or StopRequest(), stop_at_step)
        state = loop.run(state)
        checkpoints.wait()
    finally:
        checkpoints.close()

    if history:
        last = history[-1]
        logger.info("final test accuracy %.4f after %d epochs; checkpoints in %s",
                    last["test/accuracy"], last["epoch"], checkpoints.directory)
    if draw_plots and history and distributed.is_primary():
        plots.save_run_plots(run_dir, history, segments, state, dataset)
    return RunResult(state, history, segments, checkpoints.directory)


class _Loop:
    """The epoch loop of one run; `run` is the only entry point."""

    def __init__(self, config: TrainConfig, checkpoints: RunCheckpoints, splits: Splits,
                 steps_per_epoch: int, mesh: Mesh, segments: list[dict], history: list[dict],
                 progress: dict[str, float], show_progress: bool, stop: StopRequest,
                 stop_at_step: int | None):
        self.config = config
        self.stop = stop
        self.stop_at_step = stop_at_step
        self.checkpoints = checkpoints
        self.splits = splits
        self.steps_per_epoch = steps_per_epoch
        self.segments = segments
        self.history = history
        self.progress = progress or {"loss_sum": 0.0, "accuracy_sum": 0.0, "steps": 0}
        self.show_progress = show_progress
        self.index_sharding = distributed.batch_sharded(mesh)
        self.last_save_time = time.monotonic()

    def run(self, state: TrainState) -> TrainState:
        total_steps = self.config.epochs * self.steps_per_epoch
        step = int(state.step)
        if step > total_steps:
            raise ConfigError(
                f"invalid --epochs {self.config.epochs}: the run has already trained "
                f"{step / self.steps_per_epoch:g} epochs; pass a larger total")
        if step == total_steps:
            logger.info("the run has already trained %d epochs; pass a larger --epochs "
                        "to continue it", self.config.epochs)
        while step < total_steps:
            state = self._run_epoch(state, step // self.steps_per_epoch)
            step = int(state.step)
            if step < total_steps and self._stop_requested(step):
                self._stop(state, saved=True)
        return state

    def _stop_requested(self, step: int) -> bool:
        return self.stop.requested or step == self.stop_at_step

    def _stop(self, state: TrainState, saved: bool) -> None:
        """Save unless `saved`, wait for every pending save, then raise Interrupted."""
        if not saved:
            self._save(state)
        self.checkpoints.wait()
        step = int(state.step)
        raise Interrupted(
            f"stopped at step {step} (epoch {step / self.steps_per_epoch:.2f}) after saving it to "
            f"{self.checkpoints.directory}", self.stop.exit_code)

    def _run_epoch(self, state: TrainState, epoch: int) -> TrainState:
        config = self.config
        started = time.monotonic()
        order = batches.epoch_order(config.seed, epoch, len(self.splits.train[0]))
        position = int(state.step) - epoch * self.steps_per_epoch
        bar = tqdm(total=self.steps_per_epoch, initial=position, unit="step",
                   desc=f"epoch {epoch + 1}/{config.epochs}",
                   disable=not (self.show_progress and distributed.is_primary()),
                   leave=False, dynamic_ncols=True)
        with bar:
            while position < self.steps_per_epoch:
                num_steps = self._chunk_length(int(state.step), position)
                chunk = batches.chunk_indices(order, position, num_steps, config.batch_size,
                                              config.steps_per_dispatch)
                state, totals = train_steps(
                    state, *self.splits.train, to_global(chunk, self.index_sharding),
                    jnp.int32(num_steps), augmentation=config.augment)
                self._accumulate(totals, int(state.step))
                position += num_steps
                bar.update(num_steps)
                bar.set_postfix(loss=f"{self.progress['loss_sum'] / self.progress['steps']:.4f}",
                                lr=f"{totals['last_lr'].item():.2e}")
                if position < self.steps_per_epoch:
                    if self._stop_requested(int(state.step)):
                        self._stop(state, saved=False)
                    if self._due_for_save(int(state.step)):
                        self._save(state)
        self._finish_epoch(state, epoch, time.monotonic() - started)
        return state

    def _chunk_length(self, step: int, position: int) -> int:
        length = min(self.config.steps_per_dispatch, self.steps_per_epoch - position)
        every = self.config.save_every_steps
        if every:
            length = min(length, every - step % every)
        if self.stop_at_step is not None and step < self.stop_at_step:
            length = min(length, self.stop_at_step - step)
        return length

    def _accumulate(self, totals: dict[str, jax.Array], step: int) -> None:
        if totals["nonfinite"].item():
            raise NonFiniteLossError(
                f"the loss became non-finite at step {step + 1}, so training stopped without "
                f"saving; resume from the last checkpoint with a lower learning rate, for "
                f"example --resume --lr {self.config.lr / 10:g}")
        self.progress["loss_sum"] += totals["loss_sum"].item()
        self.progress["accuracy_sum"] += totals["accuracy_sum"].item()
        self.progress["steps"] += totals["steps"].item()

    def _due_for_save(self, step: int) -> bool:
        every_steps, every_minutes = self.config.save_every_steps, self.config.save_every_minutes
        if every_steps and step % every_steps == 0:
            return True
        return bool(every_minutes) and time.monotonic() - self.last_save_time >= 60 * every_minutes

    def _save(self, state: TrainState, metrics: dict[str, float] | None = None) -> None:
        steps = int(state.step)
        metadata = {
            "config": self.config.to_dict(),
            "epoch": steps / self.steps_per_epoch,
            "history": self.history,
            "segments": self.segments,
            "epoch_progress": self.progress,
        }
        self.checkpoints.save(state, metadata, metrics)
        self.last_save_time = time.monotonic()

    def _finish_epoch(self, state: TrainState, epoch: int, seconds: float) -> None:
        steps = max(self.progress["steps"], 1)
        row = {"epoch": epoch + 1, "step": int(state.step),
               "train/loss": self.progress["loss_sum"] / steps,
               "train/accuracy": self.progress["accuracy_sum"] / steps,
               "lr": float(state.lr_schedule(state.step - 1)), "seconds": seconds}
        if self.splits.val is not None:
            row.update(_prefixed("val", evaluate(state, self.splits.val)))
        row.update(_prefixed("test", evaluate(state, self.splits.test)))
        self.history.append(row)
        self.progress = {"loss_sum": 0.0, "accuracy_sum": 0.0, "steps": 0}
        metrics = {BEST_METRIC: row["val/accuracy"]} if "val/accuracy" in row else None
        self._save(state, metrics)
        logger.info(_summary_line(row, self.config.epochs))


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}/{name}": value for name, value in metrics.items()}


def _summary_line(row: dict[str, float], epochs: int) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}",
             f"train loss {row['train/loss']:.4f} acc {row['train/accuracy']:.4f}"]
    if "val/accuracy" in row:
        parts.append(f"val loss {row['val/loss']:.4f} acc {row['val/accuracy']:.4f}")
    parts += [f"test loss {row['test/loss']:.4f} acc {row['test/accuracy']:.4f}",
              f"lr {row['lr']:.2e}", f"{row['seconds']:.1f}s"]
    return " | ".join(parts)

