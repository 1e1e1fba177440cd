"""Benchmarks of the trainer: compilation, epoch times, augmentation, checkpoints and the PyTorch peer.

`run` returns every figure of one invocation as a JSON-ready dict. Epochs run the
trainer's own pieces (`place_splits`, `train_steps`, `batches.chunk_indices`) and
read each chunk's metrics before the next one starts, as the trainer does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp

from fmnist_jax import batches, data, distributed, train_loop
from fmnist_jax import config as config_lib
from fmnist_jax.checkpoint import RunCheckpoints
from fmnist_jax.config import TrainConfig
from fmnist_jax.errors import ConfigError, NonFiniteLossError, UserError
from fmnist_jax.splits import evaluate, place_splits
from fmnist_jax.steps import train_steps

logger = logging.getLogger(__name__)

# The recipe the PyTorch peer hard-codes; `_peer_differences` lists where a config departs from it.
PEER_RECIPE = {"optimizer": "adam", "lr": 1e-3, "schedule": "constant", "weight_decay": 0.0,
               "augment": "flip", "val_split": 0, "train_examples": 0}


class PeerError(UserError):
    """The PyTorch peer script failed or printed output that is not its per-epoch JSON."""


@dataclasses.dataclass(frozen=True)
class Options:
    """The measurements and settings of one benchmark invocation."""

    preset: str = "original"
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # TrainConfig fields
    data_dir: str | None = None  # None: the trainer's search order in `data.load`
    rounds: int = 3  # timed epochs of each variant, after one warm-up epoch
    peer_script: pathlib.Path | None = None  # the PyTorch peer; None: no peer
    compare_augment: bool = False
    checkpoint_overhead: bool = False
    target_accuracy: float | None = None  # test accuracy for the time-to-accuracy run
    peer_max_epochs: int = 100  # cap on the peer's time-to-accuracy run
    started: float | None = None  # time.time() at process start; None: when `run` starts


def run(options: Options, dataset: data.Dataset | None = None) -> dict[str, Any]:
    """Measure what `options` selects and return all figures, with the machine they ran on."""
    started = options.started or time.time()
    config = config_lib.from_preset(options.preset, **options.overrides)
    _validate(options, config)
    result: dict[str, Any] = {"machine": _machine(), "preset": options.preset,
                              "config": config.to_dict(), "rounds": options.rounds}
    if dataset is None:
        dataset = data.load(data_dir=options.data_dir, progress=False)
    peer = _Peer(options.peer_script, config, options.data_dir) if options.peer_script else None

    if options.target_accuracy is not None:
        result["time_to_accuracy"] = _time_to_accuracy(config, dataset, options.target_accuracy,
                                                       started)
        if peer:
            result["peer_time_to_accuracy"] = peer.time_to_accuracy(options.target_accuracy,
                                                                    options.peer_max_epochs)
    else:
        mesh = distributed.make_mesh()
        result.update(_measure_epochs(_EpochRunner(config, dataset, mesh), options.rounds, peer))
        if options.compare_augment:
            result["augment"] = _compare_augment(config, dataset, mesh, options.rounds)
        if options.checkpoint_overhead:
            result["checkpoint"] = _checkpoint_overhead(config, dataset, mesh, options.rounds)

    # Linux reports ru_maxrss in KiB. The peer's peak is not reported, because a spawned
    # child's ru_maxrss can include this process's resident pages from before its exec.
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if peer:
        result["peer"] = {**result.get("peer", {}), **peer.describe()}
    result["machine"]["load_average_end"] = list(os.getloadavg())
    return result


def _validate(options: Options, config: TrainConfig) -> None:
    if options.rounds < 1:
        raise ConfigError(f"invalid --rounds {options.rounds}: it must be at least 1")
    if options.peer_max_epochs < 1:
        raise ConfigError(f"invalid --peer-max-epochs {options.peer_max_epochs}: it must be at least 1")
    if options.peer_script and not options.peer_script.is_file():
        raise ConfigError(f"peer script {options.peer_script} not found; pass --peer-script PATH")
    target = options.target_accuracy
    if target is not None and not 0 < target <= 1:
        raise ConfigError(f"invalid --time-to-accuracy {target}: it must be in (0, 1], such as 0.90")
    if target is not None and (options.compare_augment or options.checkpoint_overhead):
        # Time to accuracy must start from a cold process, so that compilation counts in it.
        raise ConfigError("--time-to-accuracy runs alone; drop --compare-augment and "
                          "--checkpoint-overhead, and measure them in a separate invocation")
    if options.compare_augment and config.augment == "none":
        raise ConfigError("--compare-augment compares against --augment none, so pass another "
                          f"augmentation: one of {', '.join(config_lib.AUGMENTATIONS[1:])}")


def _machine() -> dict[str, Any]:
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "cpu_count": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "platform": platform.platform(), "python": platform.python_version(),
            "jax": jax.__version__, "backend": jax.default_backend(),
            "device_count": jax.device_count(), "load_average_start": list(os.getloadavg())}


def _seconds(values: list[float]) -> list[float]:
    return [round(value, 3) for value in values]


class _EpochRunner:
    """One training state on device and the trainer's chunked epoch loop over it."""

    def __init__(self, config: TrainConfig, dataset: data.Dataset, mesh: jax.sharding.Mesh):
        if config.batch_size % mesh.size:
            raise ConfigError(f"invalid --batch-size {config.batch_size}: it must be divisible "
                              f"by the {mesh.size} devices")
        self.config = config
        self.splits = place_splits(dataset, config, mesh)
        self.steps_per_epoch = len(self.splits.train[0]) // config.batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(f"invalid --batch-size {config.batch_size}: it exceeds the "
                              f"{len(self.splits.train[0])} training examples")
        self.state = train_loop.build_state(config, 0, self.steps_per_epoch, mesh)
        self.index_sharding = distributed.batch_sharded(mesh)
        self.epoch = 0
        self.chunk_seconds: list[tuple[int, float]] = []  # (steps, seconds) of each chunk in the last epoch

    @property
    def images_per_epoch(self) -> int:
        return self.steps_per_epoch * self.config.batch_size

    def train_epoch(self) -> float:
        """Train one epoch as `train_loop` does and return its wall seconds."""
        # NOTE: this repeats the chunk loop of train_loop's `_Loop._run_epoch`, less
        # its progress bar and mid-epoch saves, because that loop is not public.
        config = self.config
        started = time.perf_counter()
        order = batches.epoch_order(config.seed, self.epoch, len(self.splits.train[0]))
        self.chunk_seconds = []
        position = 0
        while position < self.steps_per_epoch:
            chunk_started = time.perf_counter()
            num_steps = min(config.steps_per_dispatch, self.steps_per_epoch - position)
            chunk = batches.chunk_indices(order, position, num_steps, config.batch_size,
                                          config.steps_per_dispatch)
            self.state, totals = train_steps(
                self.state, *self.splits.train, distributed.to_global(chunk, self.index_sharding),
                jnp.int32(num_steps), augmentation=config.augment,
                precomputed=self.splits.train_precomputed)
            self._read_totals(totals)
            self.chunk_seconds.append((num_steps, time.perf_counter() - chunk_started))
            position += num_steps
        self.epoch += 1
        return time.perf_counter() - started

    def _read_totals(self, totals: dict[str, jax.Array]) -> None:
        # The trainer copies these scalars to the host after every chunk, which waits for the chunk.
        if jax.device_get(totals)["nonfinite"]:
            raise NonFiniteLossError(f"the loss became non-finite in epoch {self.epoch + 1} of the "
                                     "benchmark, so its times would not be a real run's; check "
                                     "that these settings train with scripts/train.py")

    def evaluate(self) -> float:
        """Evaluate on the validation split (if any) and the test split; return the wall seconds."""
        started = time.perf_counter()
        for eval_set in (self.splits.val, self.splits.test):
            if eval_set is not None:
                evaluate(self.state, eval_set)
        return time.perf_counter() - started


def _measure_epochs(runner: _EpochRunner, rounds: int, peer: _Peer | None) -> dict[str, Any]:
    """Time compilation, then `rounds` train and eval epochs, each round followed by a peer epoch."""
    warm_up_s = runner.train_epoch()
    (first_steps, first_call_s), *later = runner.chunk_seconds
    later_chunks = [seconds for steps, seconds in later if steps == first_steps]
    first_eval_s = runner.evaluate()

    train_s, eval_s, peer_rows = [], [], []
    for number in range(1, rounds + 1):
        train_s.append(runner.train_epoch())
        eval_s.append(runner.evaluate())
        logger.info("round %d/%d: train %.2f s, eval %.2f s", number, rounds, train_s[-1], eval_s[-1])
        if peer:
            peer_rows.append(peer.run_epoch())
            logger.info("round %d/%d: peer train %.2f s", number, rounds, peer_rows[-1]["train_s"])

    # NOTE: with no later chunk of the first one's length there is nothing to subtract,
    # so the compile time then also contains one chunk of training.
    steady_chunk_s = statistics.median(later_chunks) if later_chunks else 0.0
    median_train_s = statistics.median(train_s)
    result = {
        "compile": {"train_first_call_s": round(first_call_s, 3),
                    "train_chunk_s": round(steady_chunk_s, 3),
                    "train_compile_s": round(first_call_s - steady_chunk_s, 3),
                    "warm_up_epoch_s": round(warm_up_s, 3),
                    "eval_first_call_s": round(first_eval_s, 3),
                    "eval_compile_s": round(first_eval_s - statistics.median(eval_s), 3)},
        "train": {"epoch_s": _seconds(train_s), "median_epoch_s": round(median_train_s, 3),
                  "images_per_epoch": runner.images_per_epoch,
                  "images_per_s": round(runner.images_per_epoch / median_train_s, 1)},
        "eval": {"epoch_s": _seconds(eval_s), "median_s": round(statistics.median(eval_s), 3)},
    }
    if peer:
        result["peer"] = _summarize_peer(peer_rows, median_train_s)
    return result


def _summarize_peer(rows: list[dict[str, Any]], median_train_s: float) -> dict[str, Any]:
    peer_train_s = statistics.median(row["train_s"] for row in rows)
    return {"train_epoch_s": [row["train_s"] for row in rows],
            "eval_s": [row["eval_s"] for row in rows],
            "median_train_epoch_s": peer_train_s,
            "threads": rows[0].get("threads"),
            "ratio_ours_to_peer": round(median_train_s / peer_train_s, 3)}


def _in_turn(names: tuple[str, ...], number: int) -> tuple[str, ...]:
    """Return `names` forwards in odd rounds and backwards in even ones, so neither always goes first."""
    return names if number % 2 else names[::-1]


def _compare_augment(config: TrainConfig, dataset: data.Dataset, mesh: jax.sharding.Mesh,
                     rounds: int) -> dict[str, Any]:
    """Alternate train epochs with no augmentation and with `config.augment`; return the time ratio."""
    runners = {"none": _EpochRunner(dataclasses.replace(config, augment="none"), dataset, mesh),
               config.augment: _EpochRunner(config, dataset, mesh)}
    for runner in runners.values():
        runner.train_epoch()  # compiles this augmentation's loop

    times: dict[str, list[float]] = {name: [] for name in runners}
    for number in range(1, rounds + 1):
        for name in _in_turn(tuple(runners), number):
            times[name].append(runners[name].train_epoch())
            logger.info("round %d/%d: augment %s train %.2f s", number, rounds, name, times[name][-1])

    medians = {name: statistics.median(values) for name, values in times.items()}
    return {"augmentation": config.augment,
            "epoch_s": {name: _seconds(values) for name, values in times.items()},
            "median_epoch_s": {name: round(value, 3) for name, value in medians.items()},
            "ratio_to_none": round(medians[config.augment] / medians["none"], 3)}


def _checkpoint_overhead(config: TrainConfig, dataset: data.Dataset, mesh: jax.sharding.Mesh,
                         rounds: int) -> dict[str, Any]:
    """Alternate epochs (train and eval) without and with an asynchronous Orbax save; return the cost."""
    runner = _EpochRunner(config, dataset, mesh)
    runner.train_epoch()
    runner.evaluate()
    plain_s: list[float] = []
    serial_s: list[float] = []
    saved: list[dict[str, float]] = []
    with (tempfile.TemporaryDirectory(prefix="fmnist-benchmark-") as folder,
          contextlib.closing(RunCheckpoints(pathlib.Path(folder) / "overlapped", config.keep))
          as overlapped,
          contextlib.closing(RunCheckpoints(pathlib.Path(folder) / "serial", config.keep))
          as serial):
        # The first save of each folder starts Orbax's threads, so it is not timed.
        _time_serial_save(serial, runner)
        _time_saved_epoch(overlapped, runner)
        for number in range(1, rounds + 1):
            for name in _in_turn(("plain", "saved"), number):
                if name == "plain":
                    plain_s.append(runner.train_epoch() + runner.evaluate())
                    serial_s.append(_time_serial_save(serial, runner))
                else:
                    saved.append(_time_saved_epoch(overlapped, runner))
            logger.info("round %d/%d: epoch %.2f s, with save %.2f s", number, rounds,
                        plain_s[-1], saved[-1]["epoch_s"])
    return _summarize_overhead(plain_s, saved, serial_s)


def _metadata(runner: _EpochRunner) -> dict[str, Any]:
    """Return metadata shaped like the trainer's epoch-end checkpoint metadata."""
    epoch = runner.epoch
    return {"config": runner.config.to_dict(), "epoch": epoch,
            "history": [{"epoch": number} for number in range(1, epoch + 1)],
            "segments": [], "epoch_progress": {"loss_sum": 0.0, "accuracy_sum": 0.0, "steps": 0}}


def _time_serial_save(checkpoints: RunCheckpoints, runner: _EpochRunner) -> float:
    """Save the current state and wait until it is on disk; return the seconds of both."""
    started = time.perf_counter()
    checkpoints.save(runner.state, _metadata(runner))
    checkpoints.wait()
    return time.perf_counter() - started


def _time_saved_epoch(checkpoints: RunCheckpoints, runner: _EpochRunner) -> dict[str, float]:
    """Start a save as the trainer does at an epoch end, then train and evaluate one epoch while it writes.

    Returns the seconds of the whole, of the save call, and of the wait for the
    write after the epoch, which the trainer's next save would block on.
    """
    started = time.perf_counter()
    checkpoints.save(runner.state, _metadata(runner))
    call_s = time.perf_counter() - started
    runner.train_epoch()
    runner.evaluate()
    waited = time.perf_counter()
    checkpoints.wait()
    finished = time.perf_counter()
    return {"epoch_s": finished - started, "call_s": call_s, "wait_s": finished - waited}


def _summarize_overhead(plain_s: list[float], saved: list[dict[str, float]],
                        serial_s: list[float]) -> dict[str, Any]:
    plain = statistics.median(plain_s)
    blocking_s = statistics.median(row["call_s"] + row["wait_s"] for row in saved)
    # Each round pairs a plain and a saved epoch run back to back, so the paired
    # difference cancels slow drifts in machine load that the two medians would not.
    paired_pct = [100 * (row["epoch_s"] - seconds) / seconds for row, seconds in zip(saved, plain_s)]
    # blocking_overhead_pct counts only the time training waits for the save, a lower
    # bound. serial_overhead_pct counts a whole save and write run alone, an upper
    # bound unless the overlapped write slows training by more than its own length.
    return {"epoch_s": _seconds(plain_s),
            "epoch_with_save_s": _seconds([row["epoch_s"] for row in saved]),
            "save_call_s": _seconds([row["call_s"] for row in saved]),
            "save_wait_s": _seconds([row["wait_s"] for row in saved]),
            "serial_save_s": _seconds(serial_s),
            "overhead_pct": round(statistics.median(paired_pct), 2),
            "blocking_overhead_pct": round(100 * blocking_s / plain, 2),
            "serial_overhead_pct": round(100 * statistics.median(serial_s) / plain, 2)}


class _EpochEndTimes(logging.Handler):
    """Records when train_loop logs each epoch's summary line, which follows its evaluation."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.times: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        # NOTE: this relies on train_loop logging one line starting "epoch " per epoch.
        if record.getMessage().startswith("epoch "):
            self.times.append(record.created)


def _time_to_accuracy(config: TrainConfig, dataset: data.Dataset, target: float,
                      started: float) -> dict[str, Any]:
    """Run the trainer for the preset's epochs; return when test accuracy first reached `target`."""
    loop_logger = logging.getLogger(train_loop.__name__)
    recorder, previous_level = _EpochEndTimes(), loop_logger.level
    loop_logger.addHandler(recorder)
    loop_logger.setLevel(logging.INFO)
    try:
        with tempfile.TemporaryDirectory(prefix="fmnist-benchmark-") as folder:
            history = train_loop.train_and_evaluate(config, pathlib.Path(folder), dataset,
                                                    show_progress=False, draw_plots=False).history
    finally:
        loop_logger.removeHandler(recorder)
        loop_logger.setLevel(previous_level)
    finished = time.time()

    accuracies = [row["test/accuracy"] for row in history]
    reached = next((index for index, accuracy in enumerate(accuracies) if accuracy >= target), None)
    return {"target": target, "reached": reached is not None,
            "epochs": None if reached is None else reached + 1,
            "seconds": None if reached is None else round(recorder.times[reached] - started, 3),
            "epochs_run": len(history), "run_seconds": round(finished - started, 3),
            "test_accuracy": accuracies}


class _Peer:
    """The PyTorch peer script, run as a subprocess on the recipe of `config`."""

    def __init__(self, script: pathlib.Path, config: TrainConfig, data_dir: str | None):
        self.script = script
        self.config = config
        self.data_dir = data_dir

    def command(self, epochs: int) -> list[str]:
        config = self.config
        command = [sys.executable, str(self.script), "--epochs", str(epochs),
                   "--width", str(config.width), "--batch-size", str(config.batch_size),
                   "--seed", str(config.seed)]
        if self.data_dir is not None:
            command += ["--data-dir", str(self.data_dir)]
        return command

    def describe(self) -> dict[str, Any]:
        return {"script": str(self.script), "command": self.command(1),
                "recipe_differences": _peer_differences(self.config)}

    def run_epoch(self) -> dict[str, Any]:
        """Run the peer for one epoch in a new process; return its JSON row."""
        completed = subprocess.run(self.command(1), capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            raise self._failed(completed.returncode, completed.stderr)
        rows = [_parse_peer_line(line, self.script) for line in completed.stdout.splitlines()]
        rows = [row for row in rows if row is not None]
        if len(rows) != 1:
            raise PeerError(f"peer {self.script} printed {len(rows)} epoch rows for --epochs 1, "
                            "expected 1; check that it is the PyTorch peer script")
        return rows[0]

    def time_to_accuracy(self, target: float, max_epochs: int) -> dict[str, Any]:
        """Run the peer until its test accuracy reaches `target`, at most `max_epochs` epochs."""
        started = time.time()
        rows, reached_s = [], None
        with tempfile.TemporaryFile("w+") as errors, subprocess.Popen(
                self.command(max_epochs), stdout=subprocess.PIPE, stderr=errors, text=True) as process:
            try:
                for line in process.stdout:
                    row = _parse_peer_line(line, self.script)
                    if row is not None:
                        rows.append(row)
                        logger.info("peer epoch %d: test accuracy %.4f", row["epoch"],
                                    row["test_accuracy"])
                    if row is not None and row["test_accuracy"] >= target:
                        reached_s = time.time() - started
                        break
            finally:
                process.terminate()
                process.wait()
            if reached_s is None and process.returncode != 0:
                errors.seek(0)
                raise self._failed(process.returncode, errors.read())
        return {"target": target, "reached": reached_s is not None, "max_epochs": max_epochs,
                "epochs": len(rows) if reached_s is not None else None,
                "seconds": None if reached_s is None else round(reached_s, 3),
                "epochs_run": len(rows), "run_seconds": round(time.time() - started, 3),
                "test_accuracy": [row["test_accuracy"] for row in rows]}

    def _failed(self, returncode: int, stderr: str) -> PeerError:
        lines = stderr.strip().splitlines()
        return PeerError(f"peer {self.script} failed with exit code {returncode}: "
                         f"{lines[-1] if lines else 'no error output'}; it needs torch "
                         "(pip install torch) and the Fashion-MNIST files (--data-dir)")


def _parse_peer_line(line: str, script: pathlib.Path) -> dict[str, Any] | None:
    """Return the JSON row of a peer output line, or None for a line that is not JSON."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(row, dict):
        return None
    missing = {"epoch", "train_s", "eval_s", "test_accuracy"} - set(row)
    if missing:
        raise PeerError(f"peer {script} printed a row without {', '.join(sorted(missing))}: "
                        f"{line.strip()}")
    return row


def _peer_differences(config: TrainConfig) -> list[str]:
    """Return the settings of `config` that differ from the recipe the peer hard-codes."""
    return [f"{name} {getattr(config, name)!r} (peer: {value!r})"
            for name, value in PEER_RECIPE.items() if getattr(config, name) != value]
