"""Data parallelism over 4 forced host devices, in subprocesses, against a 1-device run."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, shared_data_dir
from tests.test_cli import metadata, run_cli
from tests.test_recovery import chaos

FOUR_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
# 512 examples at batch 32: 16 steps an epoch. The runs use TrivialAugment so that
# its precomputed table is placed on every device too.
SETTINGS = ["--train-examples", "512", "--val-split", "0", "--augment", "trivial", "--epochs", "2",
            "--no-plots", "--no-progress"]


def run_on(devices: dict, *args: str):
    saved = {name: os.environ.get(name) for name in devices}
    os.environ.update(devices)
    try:
        return run_cli(*args)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def runs(tmp_path_factory, real_data_dir):
    root = tmp_path_factory.mktemp("devices")
    one = run_on({}, "--ckpt-dir", str(root), "--run", "one", *SETTINGS)
    assert one.returncode == 0, one.stderr
    four = run_on(FOUR_DEVICES, "--ckpt-dir", str(root), "--run", "four", *SETTINGS)
    assert four.returncode == 0, four.stderr
    assert "on 1 cpu device(s)" in one.stderr
    assert "on 4 cpu device(s)" in four.stderr
    return root


def assert_close_states(left, right, tolerance: float) -> None:
    for a, b in zip(chaos.final_leaves(left), chaos.final_leaves(right)):
        np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance)


def test_four_devices_match_one(runs):
    # Only the order of the gradient sum differs, so the runs agree to float rounding.
    one, four = metadata(runs / "one", 32)["history"], metadata(runs / "four", 32)["history"]
    for ours, theirs in zip(four, one):
        assert ours["train/loss"] == pytest.approx(theirs["train/loss"], rel=1e-4)
        assert ours["test/loss"] == pytest.approx(theirs["test/loss"], rel=1e-4)
    assert_close_states(runs / "four", runs / "one", 1e-3)


def test_four_device_checkpoint_resumes_on_one(runs, tmp_path):
    shutil.copytree(runs / "four", tmp_path / "four")
    shutil.copytree(runs / "one", tmp_path / "one")
    for run in ("four", "one"):
        result = run_on({}, "--ckpt-dir", str(tmp_path), "--run", run, "--resume", *SETTINGS[:-4],
                        "--epochs", "3", "--no-plots", "--no-progress")
        assert result.returncode == 0, result.stderr
        assert "restored step 32 " in result.stderr
    assert_close_states(tmp_path / "four", tmp_path / "one", 1e-3)


def test_one_device_checkpoint_resumes_on_four(runs, tmp_path):
    shutil.copytree(runs / "one", tmp_path / "one")
    result = run_on(FOUR_DEVICES, "--ckpt-dir", str(tmp_path), "--run", "one", "--resume",
                    "--epochs", "3", "--no-plots", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "restored step 32 " in result.stderr
    assert metadata(tmp_path / "one", 48)["history"][-1]["epoch"] == 3


def test_batch_not_divisible_by_devices_fails(tmp_path, real_data_dir):
    result = run_on(FOUR_DEVICES, "--ckpt-dir", str(tmp_path), "--batch-size", "30", *SETTINGS)
    assert result.returncode == 2
    assert "invalid --batch-size 30: it must be divisible by the 4 devices" in result.stderr


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_on_loopback_match_one(runs, tmp_path):
    # Two processes of one CPU device each, joined through a coordinator on 127.0.0.1
    # and Gloo collectives, write one shared checkpoint.
    address = f"127.0.0.1:{free_port()}"
    command = [sys.executable, str(REPO / "scripts" / "train.py"), "--ckpt-dir", str(tmp_path),
               "--run", "two", *SETTINGS]
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=REPO, env={**os.environ, "FMNIST_DATA_DIR": str(shared_data_dir()),
                                        "JAX_COORDINATOR_ADDRESS": address,
                                        "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(rank)})
        for rank in range(2)]
    outputs = [process.communicate(timeout=600)[1] for process in processes]
    for process, stderr in zip(processes, outputs):
        assert process.returncode == 0, stderr
        assert "on 2 cpu device(s) in 2 process(es)" in stderr
    assert_close_states(tmp_path / "two", runs / "one", 1e-3)
