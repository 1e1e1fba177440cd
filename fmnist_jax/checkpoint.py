"""Rolling Orbax checkpoints of one run folder, each with JSON metadata beside the state.

A checkpoint at step N contains the `TrainState` after N updates (params, optimizer
state, step and PRNG key) and a JSON item with the format version, the config,
the epoch, the metric history and the training segments. Orbax writes each step
to a temporary folder and renames it when complete, so an interrupted save is
never listed as a step.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from fmnist_jax.errors import CheckpointError, UnrestorableCheckpointError
from fmnist_jax.steps import TrainState

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
STATE_ITEM = "state"
METADATA_ITEM = "metadata"
# The metric that ranks epoch-end checkpoints for keeping the best. Mid-epoch saves have none.
BEST_METRIC = "val/accuracy"


class RunCheckpoints:
    """The checkpoints of one run: save, list, read metadata, restore and wait."""

    def __init__(self, directory: pathlib.Path, keep: int, *, keep_best: bool = False,
                 asynchronous: bool = True):
        policies = [checkpoint_managers.LatestN(n=keep)]
        if keep_best:
            policies.append(checkpoint_managers.BestN(
                get_metric_fn=_best_metric, n=1, keep_checkpoints_without_metrics=False))
        # cleanup_tmp_directories removes only unfinished saves, such as one cut by kill -9.
        # best_fn makes Orbax write each step's metrics beside it, so that BestN still
        # finds the best step after the run folder is reopened on resume.
        options = ocp.CheckpointManagerOptions(
            create=True, enable_async_checkpointing=asynchronous, cleanup_tmp_directories=True,
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            best_fn=_best_metric if keep_best else None, best_mode="max")
        # Orbax rejects relative paths when it finalises an asynchronous save.
        self.directory = pathlib.Path(directory).absolute()
        # Naming the handlers lets a reopened manager read a step's array metadata.
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(),
                           METADATA_ITEM: ocp.JsonCheckpointHandler()})

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """Return the kept step with the highest validation accuracy, or None if none has one.

        Needs `keep_best=True`, under which Orbax stores each step's metrics.
        """
        return self._manager.best_step()

    def save(self, state: TrainState, metadata: dict[str, Any],
             metrics: dict[str, float] | None = None) -> None:
        """Start saving `state` and `metadata` at `state.step`; the write finishes in the background."""
        step = int(state.step)
        # A deep copy through JSON: Orbax serialises in a background thread, while the
        # caller goes on changing its history and sums.
        metadata = json.loads(json.dumps(
            {"format_version": FORMAT_VERSION, "step": step, "metrics": metrics, **metadata}))
        # Any failure here, including one of the previous save's background write, must
        # stop training rather than leave it running without checkpoints.
        try:
            self._manager.save(step, metrics=metrics, force=True, args=ocp.args.Composite(**{
                STATE_ITEM: ocp.args.StandardSave(_arrays_of(state)),
                METADATA_ITEM: ocp.args.JsonSave(metadata),
            }))
        except Exception as error:
            raise self._save_failed(step, error) from error
        logger.debug("saving step %d to %s", step, self.directory)

    def read_metadata(self, step: int) -> dict[str, Any]:
        """Return the JSON metadata of `step`, checking its format version."""
        restored = self._manager.restore(step, args=ocp.args.Composite(**{
            METADATA_ITEM: ocp.args.JsonRestore()}))
        metadata = restored[METADATA_ITEM]
        version = metadata.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} has format version {version}, but this "
                f"fmnist-jax reads version {FORMAT_VERSION}; use the fmnist-jax that wrote it "
                "or start a new run with --run NAME")
        return metadata

    def restore(self, step: int, template: TrainState) -> TrainState:
        """Return `template` with the arrays of checkpoint `step`, placed as `template`'s are."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _arrays_of(template))
        path = self.directory / str(step)
        try:
            stored = self._stored_params(step)
        except (ValueError, OSError) as error:
            raise UnrestorableCheckpointError(
                f"checkpoint {path} has unreadable array metadata ({_first_line(error)}); "
                "resume from another step with --resume-from") from error
        # Checked before reading because a restore that fails on a shape leaves Orbax's
        # read tasks pending, with their errors logged later from another thread.
        mismatch = _params_mismatch(stored, abstract["params"])
        if mismatch:
            raise UnrestorableCheckpointError(
                f"checkpoint {path} cannot be restored into this model ({mismatch}); resume "
                "with the settings it was saved with, or from another step with --resume-from")
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**{
                STATE_ITEM: ocp.args.StandardRestore(abstract)}))
        except Exception as error:
            # Orbax 0.12.8 raises a bare Exception when TensorStore cannot read an
            # array's data, for example from a truncated or garbled file.
            raise UnrestorableCheckpointError(
                f"checkpoint {path} cannot be read ({_first_line(error)}); resume from "
                "another step with --resume-from") from error
        logger.debug("restored step %d from %s", step, self.directory)
        return template.replace(**restored[STATE_ITEM])

    def _stored_params(self, step: int) -> Any:
        """Return the shape and dtype metadata of the parameters saved at `step`."""
        stored = self._manager.item_metadata(step)[STATE_ITEM]
        tree = getattr(stored, "tree", stored)
        if not isinstance(tree, dict) or not isinstance(tree.get("params"), dict):
            raise ValueError(f"the array metadata of item '{STATE_ITEM}' is missing or has no params")
        return tree["params"]

    def wait(self) -> None:
        """Block until every pending save is on disk; raise CheckpointError if one failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as error:
            raise self._save_failed(None, error) from error

    def _save_failed(self, step: int | None, error: Exception) -> CheckpointError:
        what = f"saving step {step}" if step is not None else "a pending save"
        return CheckpointError(
            f"{what} to {self.directory} failed ({_first_line(error)}); check free "
            "disk space and permissions, then continue with --resume")

    def close(self) -> None:
        """Finish pending saves and release the manager; raise CheckpointError if a save failed."""
        try:
            self._manager.close()
        except Exception as error:
            raise self._save_failed(None, error) from error


def _params_mismatch(stored: Any, expected: Any) -> str | None:
    """Describe the first parameter whose saved shape or dtype differs from `expected`'s, if any."""
    saved_by_path = dict(jax.tree_util.tree_flatten_with_path(stored)[0])
    for path, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]:
        name = "params" + jax.tree_util.keystr(path)
        saved = saved_by_path.get(path)
        if saved is None:
            return f"{name} is not in the checkpoint"
        if tuple(saved.shape) != tuple(leaf.shape) or saved.dtype != leaf.dtype:
            return (f"{name} is {saved.dtype}{list(saved.shape)} in the checkpoint and "
                    f"{leaf.dtype}{list(leaf.shape)} in this model")
    return None


def unreadable_metrics(directory: pathlib.Path) -> list[tuple[int, ValueError]]:
    """Return the steps under `directory` whose metrics file is not valid JSON, with the error.

    Orbax parses every step's metrics file when a manager with `best_fn` opens the
    folder, so one garbled file would stop `RunCheckpoints` from opening the run.
    """
    unreadable = []
    for metrics_file in sorted(pathlib.Path(directory).glob("*/metrics/metrics")):
        step = metrics_file.parent.parent.name
        if not step.isdigit():
            continue
        try:
            json.loads(metrics_file.read_text())
        except (ValueError, OSError) as error:  # ValueError includes UnicodeDecodeError
            unreadable.append((int(step), ValueError(f"metrics file {metrics_file}: {error}")))
    return sorted(unreadable)


def _best_metric(metrics: dict[str, float]) -> float:
    return metrics[BEST_METRIC]


def _arrays_of(state: TrainState) -> dict[str, Any]:
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state,
            "rng": state.rng}


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
