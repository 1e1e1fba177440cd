"""The training loop: epochs, progress, evaluation, history and when to save."""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm import tqdm

from fmnist_jax import batches, distributed, optim, plots
from fmnist_jax.distributed import make_mesh, to_global
from fmnist_jax.checkpoint import BEST_METRIC, RunCheckpoints
from fmnist_jax.config import SCHEDULE_FIELDS, SEGMENT_FIELDS, TrainConfig
from fmnist_jax.data import Dataset
from fmnist_jax.errors import ConfigError, NonFiniteLossError
from fmnist_jax.interrupt import Interrupted, StopRequest
from fmnist_jax.model import build_model
from fmnist_jax.splits import Splits, evaluate, place_splits
from fmnist_jax.steps import TrainState, create_train_state, train_steps

logger = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class Resume:
    """A resume point: a checkpoint step, the metadata saved with it and its restored state."""

    step: int
    metadata: dict[str, Any]
    state: TrainState  # as saved, with the optimizer and schedule of the saved config


@dataclasses.dataclass(frozen=True)
class RunResult:
    state: TrainState
    history: list[dict[str, float]]
    segments: list[dict[str, Any]]
    checkpoint_dir: pathlib.Path


def build_state(config: TrainConfig, schedule_start: int, steps_per_epoch: int,
                 mesh: Mesh) -> TrainState:
    model = build_model(config.width, config.conv)
    state = create_train_state(model, optim.build_direction(config),
                               optim.build_schedule(config, schedule_start, steps_per_epoch),
                               config.seed)
    return state.replace(**to_global(
        {"params": state.params, "opt_state": state.opt_state, "step": state.step,
         "rng": state.rng}, distributed.replicated(mesh)))


def restore_template(config: TrainConfig) -> TrainState:
    """Return an abstract state: the structure, shapes and placement that a checkpoint of `config` restores into."""
    mesh = make_mesh()
    model = build_model(config.width, config.conv)
    abstract = jax.eval_shape(lambda: create_train_state(
        model, optim.build_direction(config), optim.build_schedule(config, 0, 1), config.seed))
    replicated = distributed.replicated(mesh)
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                          sharding=replicated), abstract)


def _segment(config: TrainConfig, start_step: int, steps_per_epoch: int, reason: str,
             schedule_start_step: int) -> dict:
    settings = {name: getattr(config, name) for name in SEGMENT_FIELDS}
    return {"start_step": start_step, "start_epoch": start_step / steps_per_epoch,
            "schedule_start_step": schedule_start_step, "reason": reason, **settings}


def _continue(resume: Resume, config: TrainConfig, steps_per_epoch: int,
              mesh: Mesh) -> tuple[TrainState, list[dict]]:
    """Return the resumed state under `config` and the segments, appending one if settings changed.

    The learning-rate curve restarts at the resume step only when a field of
    SCHEDULE_FIELDS changed. Optimizer moments are kept within an optimizer family.
    """
    saved = TrainConfig.from_dict(resume.metadata["config"])
    segments = list(resume.metadata["segments"])
    last = segments[-1]
    changes = [f"{name} {last[name]!r} -> {getattr(config, name)!r}"
               for name in SEGMENT_FIELDS if last[name] != getattr(config, name)]
    if changes:
        new_curve = any(last[name] != getattr(config, name) for name in SCHEDULE_FIELDS)
        schedule_start = resume.step if new_curve else last["schedule_start_step"]
        segments.append(_segment(config, resume.step, steps_per_epoch,
                                 "resumed with " + ", ".join(changes), schedule_start))
        logger.info("new training segment from step %d: %s", resume.step, ", ".join(changes))

    tx = optim.build_direction(config)
    schedule = optim.build_schedule(config, segments[-1]["schedule_start_step"], steps_per_epoch)
    state = resume.state
    opt_state = state.opt_state
    if optim.family(saved.optimizer) != optim.family(config.optimizer):
        opt_state = jax.jit(tx.init, out_shardings=distributed.replicated(mesh))(state.params)
        logger.warning("optimizer changed from %s to %s, so its state (moments) starts afresh",
                       saved.optimizer, config.optimizer)
    return state.replace(tx=tx, lr_schedule=schedule, opt_state=opt_state), segments


def train_and_evaluate(config: TrainConfig, run_dir: pathlib.Path, dataset: Dataset,
                       resume: Resume | None = None, *, show_progress: bool = True,
                       draw_plots: bool = True, stop: StopRequest | None = None,
                       stop_at_step: int | None = None) -> RunResult:
    """Train under `config`, saving into `run_dir`, from scratch or from `resume`.

    Args:
      config: the settings of this run, with any resume overrides already applied.
      run_dir: the run folder; checkpoints go to `run_dir / "checkpoints"`.
      dataset: Fashion-MNIST as uint8 arrays.
      resume: the restored checkpoint to continue from, or None for a fresh start.
      show_progress: draw a progress bar per epoch.
      draw_plots: write the curves and the prediction grid into `run_dir` at the end.
      stop: polled after each dispatch of steps; once requested, the loop saves and
        raises Interrupted.
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
            state = build_state(config, 0, steps_per_epoch, mesh)
            segments = [_segment(config, 0, steps_per_epoch, "fresh start", 0)]
            history: list[dict[str, float]] = []
            progress: dict[str, float] = {}
        else:
            state, segments = _continue(resume, config, steps_per_epoch, mesh)
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
            state, step = self._run_epoch(state, step)
            if step < total_steps and self._agree(self._stop_requested(step))[0]:
                self._stop(state, step, saved=True)
        return state

    def _stop_requested(self, step: int) -> bool:
        return self.stop.requested or step == self.stop_at_step

    @staticmethod
    def _agree(*flags: bool) -> tuple[bool, ...]:
        """Return each flag or-ed over all processes, so that every process saves and stops together."""
        if jax.process_count() == 1:
            return flags
        gathered = np.asarray(multihost_utils.process_allgather(np.array(flags)))
        return tuple(bool(flag) for flag in gathered.reshape(-1, len(flags)).any(axis=0))

    def _stop(self, state: TrainState, step: int, saved: bool) -> None:
        """Save unless `saved`, wait for every pending save, then raise Interrupted."""
        if not saved:
            self._save(state, step)
        self.checkpoints.wait()
        raise Interrupted(
            f"stopped at step {step} (epoch {step / self.steps_per_epoch:.2f}) after saving it to "
            f"{self.checkpoints.directory}", self.stop.exit_code)

    def _run_epoch(self, state: TrainState, step: int) -> tuple[TrainState, int]:
        """Train from `step` to the end of its epoch, evaluate and save; return the state and step."""
        config = self.config
        started = time.monotonic()
        epoch = step // self.steps_per_epoch
        order = batches.epoch_order(config.seed, epoch, len(self.splits.train[0]))
        position = step - epoch * self.steps_per_epoch
        bar = tqdm(total=self.steps_per_epoch, initial=position, unit="step",
                   desc=f"epoch {epoch + 1}/{config.epochs}",
                   disable=not (self.show_progress and distributed.is_primary()),
                   leave=False, dynamic_ncols=True)
        with bar:
            while position < self.steps_per_epoch:
                num_steps = self._chunk_length(step, position)
                chunk = batches.chunk_indices(order, position, num_steps, config.batch_size,
                                              config.steps_per_dispatch)
                state, totals = train_steps(
                    state, *self.splits.train, to_global(chunk, self.index_sharding),
                    jnp.int32(num_steps), augmentation=config.augment,
                    precomputed=self.splits.train_precomputed)
                self._accumulate(jax.device_get(totals), step)
                step += num_steps
                position += num_steps
                bar.update(num_steps)
                bar.set_postfix(loss=f"{self.progress['loss_sum'] / self.progress['steps']:.4f}",
                                lr=f"{float(totals['last_lr']):.2e}")
                if position < self.steps_per_epoch:
                    stop, save = self._agree(self._stop_requested(step), self._due_for_save(step))
                    if stop:
                        self._stop(state, step, saved=False)
                    if save:
                        self._save(state, step)
                        logger.info("saved step %d (epoch %.2f)", step, step / self.steps_per_epoch)
        self._finish_epoch(state, epoch, step, time.monotonic() - started)
        return state, step

    def _chunk_length(self, step: int, position: int) -> int:
        length = min(self.config.steps_per_dispatch, self.steps_per_epoch - position)
        every = self.config.save_every_steps
        if every:
            length = min(length, every - step % every)
        if self.stop_at_step is not None and step < self.stop_at_step:
            length = min(length, self.stop_at_step - step)
        return length

    def _accumulate(self, totals: dict[str, np.ndarray], step: int) -> None:
        """Add a dispatch's host-side totals to the epoch's sums; raise on a non-finite loss."""
        if totals["nonfinite"]:
            failed_step = step + int(totals["steps"]) + 1
            raise NonFiniteLossError(
                f"the loss became non-finite at step {failed_step}, so training stopped without "
                f"saving; resume from the last checkpoint with a lower learning rate, for "
                f"example --resume --lr {self.config.lr / 10:g}")
        self.progress["loss_sum"] += float(totals["loss_sum"])
        self.progress["accuracy_sum"] += float(totals["accuracy_sum"])
        self.progress["steps"] += int(totals["steps"])

    def _due_for_save(self, step: int) -> bool:
        every_steps, every_minutes = self.config.save_every_steps, self.config.save_every_minutes
        if every_steps and step % every_steps == 0:
            return True
        return bool(every_minutes) and time.monotonic() - self.last_save_time >= 60 * every_minutes

    def _save(self, state: TrainState, step: int,
              metrics: dict[str, float] | None = None) -> None:
        metadata = {
            "config": self.config.to_dict(),
            "epoch": step / self.steps_per_epoch,
            "history": self.history,
            "segments": self.segments,
            "epoch_progress": self.progress,
        }
        self.checkpoints.save(state, metadata, metrics)
        self.last_save_time = time.monotonic()

    def _finish_epoch(self, state: TrainState, epoch: int, step: int, seconds: float) -> None:
        steps = max(self.progress["steps"], 1)
        row = {"epoch": epoch + 1, "step": step,
               "train/loss": self.progress["loss_sum"] / steps,
               "train/accuracy": self.progress["accuracy_sum"] / steps,
               "lr": float(state.lr_schedule(step - 1)), "seconds": seconds}
        if self.splits.val is not None:
            row.update(_prefixed("val", evaluate(state, self.splits.val)))
        row.update(_prefixed("test", evaluate(state, self.splits.test)))
        self.history.append(row)
        self.progress = {"loss_sum": 0.0, "accuracy_sum": 0.0, "steps": 0}
        metrics = {BEST_METRIC: row["val/accuracy"]} if "val/accuracy" in row else None
        self._save(state, step, metrics)
        logger.info("%s | saved step %d", _summary_line(row, self.config.epochs), step)


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

