#!/usr/bin/env python3
"""Kill the trainer with SIGKILL at random moments, resume after each kill, and compare.

Trains a reference run without interruption, then the same run again while
killing it `--kills` times at random moments (some of them during a checkpoint
write), resuming after each kill. Prints a JSON summary: whether every resume
succeeded, whether a finished checkpoint was ever lost, and whether the final
parameters and optimizer state equal the reference bit for bit.

Example (about 20 minutes on 2 CPU cores):
  python scripts/chaos.py --kills 30 --data-dir /usr/share/datasets/fashion-mnist
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import jax  # noqa: E402

from fmnist_jax.checkpoint import RunCheckpoints  # noqa: E402
from fmnist_jax.config import TrainConfig  # noqa: E402
from fmnist_jax.runs import checkpoint_steps  # noqa: E402
from fmnist_jax.train_loop import restore_template  # noqa: E402


def train_command(root: pathlib.Path, run: str, settings: list[str], resume: bool) -> list[str]:
    command = [sys.executable, str(REPO / "scripts" / "train.py"), "--ckpt-dir", str(root),
               "--run", run, "--no-plots", "--no-progress", *settings]
    return command + ["--resume"] if resume else command


def final_leaves(run_dir: pathlib.Path) -> list[np.ndarray]:
    """Return every array of the run's latest checkpoint, restored without the training loop."""
    checkpoints = RunCheckpoints(run_dir / "checkpoints", keep=1)
    try:
        step = checkpoints.latest_step()
        config = TrainConfig.from_dict(checkpoints.read_metadata(step)["config"])
        state = checkpoints.restore(step, restore_template(config))
    finally:
        checkpoints.close()
    return [np.asarray(leaf) for leaf in jax.tree.leaves(
        (state.params, state.opt_state, state.rng, state.step))]


def unfinished_saves(run_dir: pathlib.Path) -> int:
    folder = run_dir / "checkpoints"
    return sum(1 for entry in folder.iterdir() if "tmp" in entry.name) if folder.is_dir() else 0


def run_chaos(root: pathlib.Path, settings: list[str], kills: int, min_delay: float,
              max_delay: float, seed: int, env: dict[str, str]) -> dict:
    """Return the summary of a reference run and a run killed `kills` times, both under `root`."""
    rng = random.Random(seed)
    started = time.monotonic()
    reference = subprocess.run(train_command(root, "reference", settings, resume=False),
                               env=env, capture_output=True, text=True)
    if reference.returncode != 0:
        raise RuntimeError(f"reference run failed:\n{reference.stderr}")

    chaos_dir = root / "chaos"
    lost, failed_resumes, during_save, in_training, kill_steps = [], 0, 0, 0, []
    for kill in range(kills):
        before = set(checkpoint_steps(chaos_dir))
        process = subprocess.Popen(train_command(root, "chaos", settings, resume=kill > 0),
                                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   text=True)
        # The delay counts from the "starting" or "resuming" line, so that start-up time
        # does not use up the kills before training is reached.
        head = []
        for line in process.stderr:
            head.append(line)
            if line.startswith(("starting ", "resuming ")):
                break
        try:
            process.wait(timeout=rng.uniform(min_delay, max_delay))
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            in_training += 1
        _, stderr = process.communicate()
        if process.returncode not in (0, -signal.SIGKILL):
            failed_resumes += 1
            print("".join(head) + stderr, file=sys.stderr)
        during_save += unfinished_saves(chaos_dir) > 0
        after = set(checkpoint_steps(chaos_dir))
        # The runs keep every checkpoint, so any finished step that disappears was lost.
        lost += sorted(before - after)
        kill_steps.append(max(after, default=0))

    final = subprocess.run(train_command(root, "chaos", settings, resume=True), env=env,
                           capture_output=True, text=True)
    failed_resumes += final.returncode != 0
    equal = final.returncode == 0 and all(
        np.array_equal(a, b) for a, b in zip(final_leaves(root / "reference"),
                                             final_leaves(chaos_dir)))
    return {
        "kills": kills,
        "kills_while_running": in_training,
        "kills_during_a_save": during_save,
        "latest_step_after_each_kill": kill_steps,
        "failed_resumes": failed_resumes,
        "lost_checkpoints": lost,
        "unrestorable_checkpoints": sorted(
            entry.name for entry in (chaos_dir / "unrestorable").glob("*")),
        "final_state_equal_to_reference": equal,
        "seconds": round(time.monotonic() - started, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=30, help="SIGKILLs to send (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=15,
                        help="epochs of each run; enough that every kill lands before the end "
                             "(default: %(default)s)")
    parser.add_argument("--train-examples", type=int, default=0,
                        help="train on the first N examples only, 0 for all (default: %(default)s)")
    parser.add_argument("--save-every-steps", type=int, default=200,
                        help="extra checkpoint cadence, so kills land during saves "
                             "(default: %(default)s)")
    parser.add_argument("--min-delay", type=float, default=0.5,
                        help="minimum wait from start-up to a kill, in seconds (default: %(default)s)")
    parser.add_argument("--max-delay", type=float, default=8.0,
                        help="maximum wait from start-up to a kill, in seconds (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times (default: %(default)s)")
    parser.add_argument("--data-dir", help="folder of the four Fashion-MNIST .gz files "
                                           "(default: the trainer's search order)")
    parser.add_argument("--workdir", type=pathlib.Path,
                        help="where the two runs go (default: a new temporary folder)")
    args = parser.parse_args()

    settings = ["--epochs", str(args.epochs), "--train-examples", str(args.train_examples),
                "--save-every-steps", str(args.save_every_steps), "--keep", "1000"]
    env = dict(os.environ)
    if args.data_dir:
        env["FMNIST_DATA_DIR"] = args.data_dir
    root = args.workdir or pathlib.Path(tempfile.mkdtemp(prefix="fmnist-chaos-"))
    summary = run_chaos(root, settings, args.kills, args.min_delay, args.max_delay, args.seed, env)
    print(json.dumps({"workdir": str(root), **summary}, indent=2))
    ok = summary["final_state_equal_to_reference"] and not summary["failed_resumes"] \
        and not summary["lost_checkpoints"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
