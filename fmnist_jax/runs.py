"""Run folders under the checkpoint root: naming, finding the latest, and starting or resuming."""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import shlex
import time
from typing import Any, Iterator

import filelock
import jax

from fmnist_jax import config as config_lib
from fmnist_jax import data, distributed
from fmnist_jax.checkpoint import RunCheckpoints, unreadable_metrics
from fmnist_jax.errors import CheckpointError, ConfigError, UnrestorableCheckpointError
from fmnist_jax.interrupt import Interrupted, StopRequest
from fmnist_jax.train_loop import Resume, RunResult, restore_template, train_and_evaluate

logger = logging.getLogger(__name__)

DEFAULT_ROOT = pathlib.Path("ckpts")
CHECKPOINTS = "checkpoints"
LOCK_FILE = ".lock"
UNRESTORABLE = "unrestorable"
# Exception types that Orbax, TensorStore and json raise on missing, truncated or garbled checkpoint files.
CORRUPTION_ERRORS = (ValueError, KeyError, TypeError, EOFError, FileNotFoundError,
                     NotADirectoryError)


def new_run_name() -> str:
    return time.strftime("run-%Y%m%d-%H%M%S")


def checkpoint_steps(run_dir: pathlib.Path) -> list[int]:
    """Return the finished checkpoint steps of `run_dir`, oldest first."""
    folder = run_dir / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(int(entry.name) for entry in folder.iterdir()
                  if entry.is_dir() and entry.name.isdigit())


def latest_run(root: pathlib.Path) -> pathlib.Path | None:
    """Return the run folder under `root` whose newest checkpoint was written last."""
    newest: tuple[float, pathlib.Path] | None = None
    for run_dir in root.iterdir() if root.is_dir() else ():
        steps = checkpoint_steps(run_dir)
        if steps:
            written = (run_dir / CHECKPOINTS / str(steps[-1])).stat().st_mtime
            if newest is None or written > newest[0]:
                newest = (written, run_dir)
    return newest[1] if newest else None


def check_writable(root: pathlib.Path) -> None:
    """Raise CheckpointError unless `root` is, or can be made, a writable folder."""
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"checkpoint folder {root} is a file; pass --ckpt-dir with a folder path")
    probe = root / f".write-test-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise CheckpointError(
            f"cannot write to checkpoint folder {root} ({error.strerror}); "
            "pass --ckpt-dir with a writable folder") from error


def _pick_steps(checkpoints: RunCheckpoints, resume_from: str) -> list[int]:
    """Return the steps to try restoring, in order: `latest` falls back to older ones."""
    steps = checkpoints.steps()
    if resume_from == "latest":
        return steps[::-1]
    if resume_from == "best":
        best = checkpoints.best_step()
        if best is None:
            raise CheckpointError(
                f"{checkpoints.directory} has no checkpoint with a validation accuracy: the run "
                "has no validation split (--val-split) or no finished epoch; use --resume-from latest")
        return [best]
    if not resume_from.isdigit() or int(resume_from) not in steps:
        raise CheckpointError(f"invalid --resume-from {resume_from!r}: {checkpoints.directory} "
                              f"has steps {steps}; pass latest, best or one of those steps")
    return [int(resume_from)]


def find_resume_point(run_dir: pathlib.Path, resume_from: str = "latest",
                      overrides: dict[str, Any] | None = None) -> tuple[Resume, config_lib.TrainConfig]:
    """Restore the newest requested checkpoint that restores cleanly; return it and the resumed config.

    `overrides` are checked against the saved config before any array is read. A
    checkpoint with missing, truncated or garbled files is moved to
    `<run>/unrestorable/` with a warning, and the next older one is tried.
    """
    # NOTE: with several processes only process 0 moves such a step. Another process
    # can open the folder before the move, and then it fails to start.
    for step, error in unreadable_metrics(run_dir / CHECKPOINTS):
        _set_aside(step, run_dir / CHECKPOINTS, error)
    checkpoints = RunCheckpoints(run_dir / CHECKPOINTS, keep=1, keep_best=True)
    try:
        for step in _pick_steps(checkpoints, resume_from):
            try:
                metadata = checkpoints.read_metadata(step)
            except CORRUPTION_ERRORS as error:
                _set_aside(step, checkpoints.directory, error)
                continue
            saved = config_lib.TrainConfig.from_dict(metadata["config"])
            config = config_lib.resume_overrides(saved, overrides or {})
            if config.epochs < metadata["epoch"]:
                raise ConfigError(
                    f"invalid --epochs {config.epochs}: the run has already trained "
                    f"{metadata['epoch']:g} epochs; pass a larger total")
            try:
                state = checkpoints.restore(step, restore_template(saved))
            except (UnrestorableCheckpointError, *CORRUPTION_ERRORS) as error:
                _set_aside(step, checkpoints.directory, error)
                continue
            logger.info("restored step %d (epoch %.2f) from %s", step, metadata["epoch"],
                        checkpoints.directory)
            return Resume(step=step, metadata=metadata, state=state), config
    finally:
        checkpoints.close()
    raise CheckpointError(f"no checkpoint in {checkpoints.directory} can be restored; the "
                          "warnings above name each one, so start a new run with --run NAME")


def _set_aside(step: int, directory: pathlib.Path, error: Exception) -> None:
    """Move an unrestorable step out of Orbax's view, so that training can save that step again."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
    logger.warning("skipping checkpoint step %d: it cannot be restored (%s: %s)",
                   step, type(error).__name__, reason)
    if not distributed.is_primary():
        return  # process 0 moves it; the others skip it alike
    target = directory.parent / UNRESTORABLE / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        target.parent.mkdir(exist_ok=True)
        (directory / str(step)).rename(target)
    except OSError as move_error:
        raise CheckpointError(f"cannot move unrestorable checkpoint {directory / str(step)} to "
                              f"{target} ({move_error.strerror}); move or delete it by hand, "
                              "then resume again") from move_error
    logger.warning("moved checkpoint step %d to %s", step, target)


@contextlib.contextmanager
def _run_lock(run_dir: pathlib.Path) -> Iterator[None]:
    """Hold the run folder's lock so that only one trainer writes to it.

    The lock is an flock on `run_dir/.lock`, which the OS releases when the holder
    exits, even on kill -9, so a stale lock file never blocks a resume.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    if not distributed.is_primary():
        yield  # the processes of one job share the folder, and process 0 holds its lock
        return
    lock = filelock.FileLock(run_dir / LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise CheckpointError(f"run folder {run_dir} is in use by another trainer; wait for it to "
                              "finish, or choose a new name with --run NAME") from None
    try:
        yield
    finally:
        lock.release()


def launch(preset: str, overrides: dict[str, Any], *, root: pathlib.Path = DEFAULT_ROOT,
           run_name: str | None = None, resume: bool = False, resume_from: str = "latest",
           data_source: str = "idx", data_dir: str | None = None, show_progress: bool = True,
           draw_plots: bool = True, stop_at_step: int | None = None) -> RunResult:
    """Start a run, or continue the latest one (or `run_name`), and train it to the end.

    `overrides` holds only the settings the user gave explicitly: on resume they
    replace the saved ones, within what `config.resume_overrides` allows. A run
    resumed from an older step than its latest continues in a new folder,
    `<run>-from-<step>`, so that no checkpoint is overwritten.
    """
    distributed.initialize_from_env()
    check_writable(root)
    run_dir = None
    if run_name:
        run_dir = root / run_name
    elif resume:
        run_dir = latest_run(root)
    if resume and (run_dir is None or not checkpoint_steps(run_dir)):
        logger.info("no checkpoint found in %s, so starting a fresh run",
                    run_dir if run_dir is not None else root)
        resume = False
    if run_dir is None and jax.process_count() > 1:
        raise ConfigError("a job of several processes needs --run NAME, so that every "
                                     "process writes to the same run folder")
    run_dir = run_dir or root / new_run_name()
    with _run_lock(run_dir):
        resume_point = None
        if resume:
            resume_point, config = find_resume_point(run_dir, resume_from, overrides)
            if resume_point.step != checkpoint_steps(run_dir)[-1]:
                return _launch_branch(run_dir, resume_point, config, data_source, data_dir,
                                      show_progress, draw_plots, stop_at_step)
        else:
            config = config_lib.from_preset(preset, **overrides)
            if checkpoint_steps(run_dir):
                raise CheckpointError(f"run folder {run_dir} already has checkpoints; pass --resume "
                                      "to continue it, or choose a new name with --run NAME")
        return _train(run_dir, config, resume_point, data_source, data_dir, show_progress,
                      draw_plots, stop_at_step)


def _launch_branch(run_dir: pathlib.Path, resume_point: Resume, config, *rest) -> RunResult:
    branch = run_dir.with_name(f"{run_dir.name}-from-{resume_point.step}")
    if checkpoint_steps(branch):
        raise CheckpointError(f"run folder {branch} already exists; resume it with --run "
                              f"{branch.name}, or delete it to branch from step "
                              f"{resume_point.step} again")
    logger.info("step %d is older than the run's latest, so training continues in %s",
                resume_point.step, branch)
    with _run_lock(branch):
        return _train(branch, config, resume_point, *rest)


def _resume_command(run_dir: pathlib.Path, data_source: str, data_dir: str | None) -> str:
    """Return the command line that continues `run_dir`, with the data flags of this one."""
    words = ["python", "scripts/train.py", "--resume", "--run", run_dir.name,
             "--ckpt-dir", str(run_dir.parent)]
    if data_source != "idx":
        words += ["--data-source", data_source]
    if data_dir:
        words += ["--data-dir", data_dir]
    return shlex.join(words)


def _train(run_dir: pathlib.Path, config: config_lib.TrainConfig, resume_point: Resume | None,
           data_source: str, data_dir: str | None, show_progress: bool, draw_plots: bool,
           stop_at_step: int | None) -> RunResult:
    dataset = data.load(data_source, data_dir, progress=show_progress)
    logger.info("%s %s with %s, on %d %s device(s) in %d process(es)",
                "resuming" if resume_point else "starting", run_dir, _describe(config),
                jax.device_count(), jax.default_backend(), jax.process_count())
    with StopRequest() as stop:
        try:
            return train_and_evaluate(config, run_dir, dataset, resume_point,
                                      show_progress=show_progress, draw_plots=draw_plots,
                                      stop=stop, stop_at_step=stop_at_step)
        except Interrupted as interrupted:
            command = _resume_command(run_dir, data_source, data_dir)
            raise Interrupted(f"{interrupted}; continue with: {command}",
                              interrupted.exit_code) from None


def _describe(config: config_lib.TrainConfig) -> str:
    return (f"width {config.width}, batch {config.batch_size}, {config.optimizer} lr {config.lr:g} "
            f"({config.schedule}), augment {config.augment}, {config.epochs} epochs")
