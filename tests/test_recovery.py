"""Recovery of the CLI on real data: signals, kill -9, corrupt checkpoints, locks, non-finite loss."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import filelock
import numpy as np
import pytest

from tests.conftest import REPO, shared_data_dir
from tests.test_cli import checkpoint_steps, run_cli

# 1024 examples less 128 for validation: 28 steps an epoch, 56 in all.
SETTINGS = ["--train-examples", "1024", "--val-split", "128", "--epochs", "2",
            "--steps-per-dispatch", "4", "--save-every-steps", "8", "--keep", "100",
            "--no-plots", "--no-progress"]
TOTAL_STEPS = 56


def load_chaos():
    spec = importlib.util.spec_from_file_location("chaos", REPO / "scripts" / "chaos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


chaos = load_chaos()


def start_cli(root, run, *extra) -> subprocess.Popen:
    env = {**os.environ, "FMNIST_DATA_DIR": str(shared_data_dir())}
    return subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "train.py"), "--ckpt-dir", str(root), "--run", run,
         *SETTINGS, *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(run_dir, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not any(s >= step for s in checkpoint_steps_or_none(run_dir)):
        assert time.monotonic() < deadline, f"no checkpoint at step {step} within {timeout}s"
        time.sleep(0.1)


def checkpoint_steps_or_none(run_dir) -> list[int]:
    return checkpoint_steps(run_dir) if (run_dir / "checkpoints").is_dir() else []


def assert_same_final_state(run_dir, reference_dir) -> None:
    ours, theirs = chaos.final_leaves(run_dir), chaos.final_leaves(reference_dir)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert np.array_equal(a, b)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, real_data_dir):
    root = tmp_path_factory.mktemp("reference")
    result = run_cli("--ckpt-dir", str(root), "--run", "ref", *SETTINGS)
    assert result.returncode == 0, result.stderr
    return root / "ref"


def copy_run(reference, tmp_path):
    target = tmp_path / "ref"
    shutil.copytree(reference, target)
    return target


def test_stop_at_random_step_resumes_exactly(reference, tmp_path):
    stop_step = int(np.random.default_rng().integers(1, TOTAL_STEPS))
    first = run_cli("--ckpt-dir", str(tmp_path), "--run", "b", *SETTINGS,
                    "--stop-at-step", str(stop_step))
    assert first.returncode == 0, first.stderr
    assert max(checkpoint_steps(tmp_path / "b")) == stop_step
    second = run_cli("--ckpt-dir", str(tmp_path), "--run", "b", "--resume", *SETTINGS)
    assert second.returncode == 0, second.stderr
    assert f"restored step {stop_step} " in second.stderr
    assert_same_final_state(tmp_path / "b", reference)


@pytest.mark.parametrize("signal_number, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
def test_signal_saves_then_resume_matches(reference, tmp_path, signal_number, exit_code):
    process = start_cli(tmp_path, "s")
    wait_for_step(tmp_path / "s", 8)
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == exit_code, stderr
    assert "continue with: python scripts/train.py --resume --run s" in stderr
    stopped_at = max(checkpoint_steps(tmp_path / "s"))
    assert f"stopped at step {stopped_at} " in stderr
    resumed = run_cli("--ckpt-dir", str(tmp_path), "--run", "s", "--resume", *SETTINGS)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_final_state(tmp_path / "s", reference)


def test_second_sigint_aborts_and_keeps_checkpoints(reference, tmp_path):
    process = start_cli(tmp_path, "d")
    wait_for_step(tmp_path / "d", 8)
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=120)
    assert process.returncode != 0
    finished = checkpoint_steps(tmp_path / "d")
    assert finished
    resumed = run_cli("--ckpt-dir", str(tmp_path), "--run", "d", "--resume", *SETTINGS)
    assert resumed.returncode == 0, resumed.stderr
    assert "skipping checkpoint" not in resumed.stderr
    assert_same_final_state(tmp_path / "d", reference)


def test_kill9_chaos_matches_reference(real_data_dir, tmp_path):
    # 256 steps, saving every 2, so that kills land in start-up, training and saves.
    settings = ["--train-examples", "1024", "--val-split", "0", "--epochs", "8",
                "--steps-per-dispatch", "2", "--save-every-steps", "2", "--keep", "1000"]
    env = {**os.environ, "FMNIST_DATA_DIR": str(real_data_dir)}
    summary = chaos.run_chaos(tmp_path, settings, kills=5, min_delay=0.5, max_delay=4.0,
                              seed=int(time.time()), env=env)
    print(json.dumps(summary))
    assert summary["kills_while_running"] >= 4
    assert summary["failed_resumes"] == 0
    assert summary["lost_checkpoints"] == []
    assert summary["unrestorable_checkpoints"] == []
    assert summary["final_state_equal_to_reference"]
    assert (tmp_path / "chaos" / ".lock").exists()  # left by kill -9, and no obstacle


@pytest.mark.parametrize("damage", ["truncate", "garble", "delete", "truncate_array_data",
                                    "garble_metrics"])
def test_corrupt_latest_falls_back(reference, tmp_path, damage):
    run_dir = copy_run(reference, tmp_path)
    latest = run_dir / "checkpoints" / str(TOTAL_STEPS)
    files = sorted(p for p in (latest / "state").rglob("*") if p.is_file() and p.stat().st_size)
    if damage == "truncate_array_data":
        # Damage only the array data, so that the metadata reads and Orbax fails on the arrays.
        files = sorted(p for p in (latest / "state").glob("ocdbt.process_*/d/*") if p.stat().st_size)
        assert files
        damage = "truncate"
    if damage == "garble_metrics":
        files = [latest / "metrics" / "metrics"]
        damage = "garble"
    for path in files:
        if damage == "truncate":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        elif damage == "garble":
            path.write_bytes(bytes(255 - b for b in path.read_bytes()))
        else:
            path.unlink()
    result = run_cli("--ckpt-dir", str(tmp_path), "--run", "ref", "--resume", *SETTINGS)
    assert result.returncode == 0, result.stderr
    assert f"skipping checkpoint step {TOTAL_STEPS}" in result.stderr
    assert "restored step 48 " in result.stderr
    assert list((run_dir / "unrestorable").iterdir())
    assert_same_final_state(run_dir, reference)


def test_second_trainer_on_same_run_is_rejected(reference, tmp_path):
    run_dir = copy_run(reference, tmp_path)
    with filelock.FileLock(run_dir / ".lock", timeout=0):
        result = run_cli("--ckpt-dir", str(tmp_path), "--run", "ref", "--resume", *SETTINGS)
    assert result.returncode == 2
    assert f"run folder {run_dir} is in use by another trainer" in result.stderr


def test_nonfinite_loss_stops_without_saving(reference, tmp_path):
    run_dir = copy_run(reference, tmp_path)
    before = checkpoint_steps(run_dir)
    result = run_cli("--ckpt-dir", str(tmp_path), "--run", "ref", "--resume", *SETTINGS[:-6],
                     "--epochs", "3", "--lr", "1e30")
    assert result.returncode == 2, result.stderr
    assert "non-finite at step" in result.stderr
    assert "lower learning rate" in result.stderr
    assert checkpoint_steps(run_dir) == before


def test_resume_from_best_branches(reference, tmp_path):
    run_dir = copy_run(reference, tmp_path)
    result = run_cli("--ckpt-dir", str(tmp_path), "--run", "ref", "--resume", "--resume-from", "8",
                     *SETTINGS)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ref-from-8" / "checkpoints" / str(TOTAL_STEPS)).is_dir()
    assert_same_final_state(tmp_path / "ref-from-8", reference)
    assert checkpoint_steps(run_dir) == checkpoint_steps(reference)


def test_empty_run_folder_starts_fresh(tmp_path, real_data_dir):
    (tmp_path / "empty").mkdir()
    result = run_cli("--ckpt-dir", str(tmp_path), "--run", "empty", "--resume",
                     "--train-examples", "64", "--val-split", "0", "--epochs", "1", "--no-plots")
    assert result.returncode == 0, result.stderr
    assert f"no checkpoint found in {tmp_path / 'empty'}, so starting a fresh run" in result.stderr
