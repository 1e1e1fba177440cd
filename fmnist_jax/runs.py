"""Run folders under the checkpoint root: naming, finding the latest, and starting or resuming."""

from __future__ import annotations

import logging
import os
import pathlib
import time
from typing import Any

from fmnist_jax import config as config_lib
from fmnist_jax import data
from fmnist_jax.checkpoint import RunCheckpoints
from fmnist_jax.errors import CheckpointError
from fmnist_jax.train_loop import Resume, RunResult, train_and_evaluate

logger = logging.getLogger(__name__)

DEFAULT_ROOT = pathlib.Path("ckpts")
CHECKPOINTS = "checkpoints"


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


def _pick_step(checkpoints: RunCheckpoints, resume_from: str) -> int:
    steps = checkpoints.steps()
    if resume_from == "latest":
        return steps[-1]
    if resume_from == "best":
        best = checkpoints.best_step()
        if best is None:
            raise CheckpointError(
                f"{checkpoints.directory} has no best checkpoint because the run has no "
                "validation split; use --resume-from latest")
        return best
    if not resume_from.isdigit() or int(resume_from) not in steps:
        raise CheckpointError(f"invalid --resume-from {resume_from!r}: {checkpoints.directory} "
                              f"has steps {steps}; pass latest, best or one of those steps")
    return int(resume_from)


def launch(preset: str, overrides: dict[str, Any], *, root: pathlib.Path = DEFAULT_ROOT,
           run_name: str | None = None, resume: bool = False, resume_from: str = "latest",
           data_source: str = "idx", data_dir: str | None = None, show_progress: bool = True,
           draw_plots: bool = True) -> RunResult:
    """Start a run, or continue the latest one (or `run_name`), and train it to the end.

    `overrides` holds only the settings the user gave explicitly: on resume they
    replace the saved ones, within what `config.resume_overrides` allows.
    """
    check_writable(root)
    run_dir = root / run_name if run_name else latest_run(root) if resume else None
    resume_point = None
    if resume and (run_dir is None or not checkpoint_steps(run_dir)):
        where = run_dir if run_dir is not None else root
        logger.info("no checkpoint found in %s, so starting a fresh run", where)
    elif resume:
        run_dir, resume_point, config = _resume_point(run_dir, overrides, resume_from)
    if resume_point is None:
        config = config_lib.from_preset(preset, **overrides)
        run_dir = run_dir or root / new_run_name()
        if checkpoint_steps(run_dir):
            raise CheckpointError(f"run folder {run_dir} already has checkpoints; pass --resume to "
                                  "continue it, or choose a new name with --run NAME")
    dataset = data.load(data_source, data_dir, progress=show_progress)
    logger.info("%s %s with %s", "resuming" if resume_point else "starting", run_dir,
                _describe(config))
    return train_and_evaluate(config, run_dir, dataset, resume_point,
                              show_progress=show_progress, draw_plots=draw_plots)


def _resume_point(run_dir: pathlib.Path, overrides: dict[str, Any], resume_from: str):
    checkpoints = RunCheckpoints(run_dir / CHECKPOINTS, keep=1)
    try:
        step = _pick_step(checkpoints, resume_from)
        metadata = checkpoints.read_metadata(step)
    finally:
        checkpoints.close()
    saved = config_lib.TrainConfig.from_dict(metadata["config"])
    config = config_lib.resume_overrides(saved, overrides)
    return run_dir, Resume(step=step, metadata=metadata), config


def _describe(config: config_lib.TrainConfig) -> str:
    return (f"width {config.width}, batch {config.batch_size}, {config.optimizer} lr {config.lr:g} "
            f"({config.schedule}), augment {config.augment}, {config.epochs} epochs")
