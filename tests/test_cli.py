"""End to end: `scripts/train.py` as a subprocess on a subset of the real data."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests.conftest import REPO, shared_data_dir

SUBSET = 2048  # training examples: 64 steps an epoch at batch 32


def run_cli(*args: str, timeout: float = 600, cwd: pathlib.Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "FMNIST_DATA_DIR": str(shared_data_dir()), "FMNIST_CACHE_DIR": "/nonexistent"}
    return subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def checkpoint_steps(run_dir: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def metadata(run_dir: pathlib.Path, step: int) -> dict:
    return json.loads((run_dir / "checkpoints" / str(step) / "metadata" / "metadata").read_text())


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, real_data_dir):
    root = tmp_path_factory.mktemp("ckpts")
    common = ["--ckpt-dir", str(root), "--run", "e2e", "--no-plots", "--val-split", "0"]
    first = run_cli(*common, "--train-examples", str(SUBSET), "--epochs", "2", "--keep", "3")
    assert first.returncode == 0, first.stderr
    second = run_cli(*common, "--resume", "--epochs", "3", "--lr", "3e-4")
    assert second.returncode == 0, second.stderr
    return root / "e2e", first, second


def test_resume_continues_from_checkpoint(resumed_run):
    run_dir, _, second = resumed_run
    assert checkpoint_steps(run_dir) == [64, 128, 192]
    assert "resuming" in second.stderr
    assert "epoch 3/3" in second.stderr
    assert "epoch 1/3" not in second.stderr


def test_resume_records_new_segment(resumed_run):
    run_dir, _, _ = resumed_run
    segments = metadata(run_dir, 192)["segments"]
    assert [segment["start_step"] for segment in segments] == [0, 128]
    assert segments[0]["lr"] == 3e-3
    assert segments[1]["lr"] == 3e-4
    assert segments[1]["epochs"] == 3


def test_history_shows_learning(resumed_run):
    run_dir, _, _ = resumed_run
    history = metadata(run_dir, 192)["history"]
    assert [row["epoch"] for row in history] == [1, 2, 3]
    # The new segment runs warmup-cosine from step 128 with a 3e-4 peak, decaying to 0.
    assert 0 < history[-1]["lr"] < 3e-4
    assert history[0]["lr"] > 3e-4
    assert history[-1]["test/accuracy"] > 0.5  # chance is 0.1


def test_output_has_progress_and_summary(resumed_run):
    _, first, second = resumed_run
    assert "step/s" in first.stderr
    assert "epoch 2/2 | train loss" in first.stderr
    assert "final test accuracy" in second.stderr
    assert str(pathlib.Path("e2e") / "checkpoints") in second.stderr


def test_plots_are_written(tmp_path, real_data_dir):
    result = run_cli("--ckpt-dir", str(tmp_path), "--run", "p", "--train-examples", "320",
                     "--val-split", "64",
                     "--epochs", "1", "--no-progress")
    assert result.returncode == 0, result.stderr
    for name in ("curves.png", "predictions.png"):
        assert (tmp_path / "p" / name).read_bytes().startswith(b"\x89PNG")


def test_relative_checkpoint_folder_works(tmp_path, real_data_dir):
    # The default --ckpt-dir is the relative path ckpts.
    args = ["--train-examples", "320", "--val-split", "64", "--epochs", "2", "--no-plots"]
    first = run_cli("--run", "r", *args, "--epochs", "1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    second = run_cli("--resume", *args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert checkpoint_steps(tmp_path / "ckpts" / "r") == [8, 16]


def test_help_lists_every_flag_with_default():
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in ("--resume", "--epochs", "--lr", "--schedule", "--warmup", "--optimizer",
                 "--ckpt-dir", "--run", "--data-dir", "--val-split", "--keep"):
        assert flag in result.stdout
    assert result.stdout.count("default") >= 20


@pytest.mark.parametrize("args, message", [
    (["--epochs", "-1"], "invalid --epochs -1"),
    (["--optimizer", "lion"], "invalid --optimizer 'lion'"),
    (["--lr", "nan"], "invalid --lr nan"),
])
def test_bad_settings_fail_in_one_line(tmp_path, args, message):
    result = run_cli("--ckpt-dir", str(tmp_path), *args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {result.stderr.strip()[7:]}"]
    assert message in result.stderr
    assert not list(tmp_path.glob("*/checkpoints"))


def test_resume_with_other_width_fails(resumed_run):
    run_dir, _, _ = resumed_run
    before = checkpoint_steps(run_dir)
    result = run_cli("--ckpt-dir", str(run_dir.parent), "--resume", "--width", "16")
    assert result.returncode == 2
    assert "width=8, not 16" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert checkpoint_steps(run_dir) == before


def test_checkpoint_folder_that_is_a_file_fails(tmp_path):
    target = tmp_path / "ckpts"
    target.write_text("not a folder")
    result = run_cli("--ckpt-dir", str(target))
    assert result.returncode == 2
    assert f"checkpoint folder {target} is a file" in result.stderr
    assert target.read_text() == "not a folder"


def test_unwritable_checkpoint_folder_fails(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run_cli("--ckpt-dir", str(blocker / "ckpts"))
    assert result.returncode == 2
    assert "cannot write to checkpoint folder" in result.stderr
