"""Smoke tests of the benchmark on a tiny subset: JSON keys and positive figures, no timing limits."""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import pytest

from fmnist_jax import benchmark
from fmnist_jax.errors import ConfigError
from tests.conftest import REPO, synthetic_dataset

# Prints rows shaped like the PyTorch peer's, with test accuracy 0.5, 0.6, 0.7, ...
STUB_PEER = """
import argparse, json
parser = argparse.ArgumentParser()
for flag in ("--epochs", "--width", "--batch-size", "--seed"):
    parser.add_argument(flag, type=int)
parser.add_argument("--data-dir")
args = parser.parse_args()
print("a line that is not JSON")
for epoch in range(1, args.epochs + 1):
    print(json.dumps({"epoch": epoch, "train_s": 0.25, "eval_s": 0.05,
                      "test_accuracy": 0.4 + 0.1 * epoch, "threads": 1}), flush=True)
"""

# 256 synthetic examples at batch 32 make 8 steps an epoch: two chunks of 4.
TINY = {"train_examples": 256, "steps_per_dispatch": 4, "width": 4}


@pytest.fixture
def stub_peer(tmp_path) -> pathlib.Path:
    script = tmp_path / "stub_peer.py"
    script.write_text(STUB_PEER)
    return script


def assert_positive(section: dict, *names: str) -> None:
    for name in names:
        assert name in section, f"missing key {name}"
        assert section[name] > 0, f"{name} is {section[name]}"


def test_epochs_with_peer_and_extras(stub_peer):
    options = benchmark.Options(preset="original", overrides=TINY, rounds=2, peer_script=stub_peer,
                                compare_augment=True, checkpoint_overhead=True)
    result = benchmark.run(options, synthetic_dataset())
    json.dumps(result)

    assert result["machine"]["cpu_count"] > 0
    assert result["machine"]["device_count"] > 0
    assert result["machine"]["backend"]
    assert_positive(result["compile"], "train_first_call_s", "train_compile_s", "eval_first_call_s")
    assert_positive(result["train"], "median_epoch_s", "images_per_s")
    assert result["train"]["images_per_epoch"] == 256
    assert len(result["train"]["epoch_s"]) == 2
    assert_positive(result["eval"], "median_s")
    assert_positive(result, "peak_rss_mib")

    peer = result["peer"]
    assert peer["train_epoch_s"] == [0.25, 0.25]
    assert_positive(peer, "median_train_epoch_s", "ratio_ours_to_peer")
    assert peer["recipe_differences"] == ["train_examples 256 (peer: 0)"]

    augment = result["augment"]
    assert augment["augmentation"] == "flip"
    assert set(augment["median_epoch_s"]) == {"none", "flip"}
    assert_positive(augment, "ratio_to_none")

    checkpoint = result["checkpoint"]
    assert len(checkpoint["epoch_with_save_s"]) == 2
    assert all(seconds > 0 for seconds in checkpoint["save_call_s"])
    assert math.isfinite(checkpoint["overhead_pct"])
    assert_positive(checkpoint, "blocking_overhead_pct", "serial_overhead_pct")
    assert len(checkpoint["serial_save_s"]) == 2


def test_time_to_accuracy_with_peer_cap(stub_peer):
    options = benchmark.Options(preset="default", overrides={**TINY, "epochs": 2, "val_split": 64},
                                peer_script=stub_peer, target_accuracy=0.65, peer_max_epochs=2)
    result = benchmark.run(options, synthetic_dataset())

    ours = result["time_to_accuracy"]
    assert ours["epochs_run"] == 2
    assert len(ours["test_accuracy"]) == 2
    assert_positive(ours, "run_seconds")
    if ours["reached"]:
        assert_positive(ours, "epochs", "seconds")

    peer = result["peer_time_to_accuracy"]
    assert peer["reached"] is False
    assert peer["epochs_run"] == 2
    assert peer["seconds"] is None
    assert "schedule 'warmup_cosine' (peer: 'constant')" in result["peer"]["recipe_differences"]


def test_peer_time_to_accuracy_stops_at_target(stub_peer):
    options = benchmark.Options(overrides={**TINY, "epochs": 1}, peer_script=stub_peer,
                                target_accuracy=0.55,
                                peer_max_epochs=10)
    peer = benchmark.run(options, synthetic_dataset())["peer_time_to_accuracy"]
    assert peer["reached"] is True
    assert peer["epochs"] == 2
    assert_positive(peer, "seconds")


def test_time_to_accuracy_runs_alone():
    options = benchmark.Options(target_accuracy=0.9, checkpoint_overhead=True)
    with pytest.raises(ConfigError, match="runs alone"):
        benchmark.run(options, synthetic_dataset())


def test_compare_augment_rejects_none():
    options = benchmark.Options(overrides={**TINY, "augment": "none"}, rounds=1,
                                compare_augment=True)
    with pytest.raises(ConfigError, match="compare-augment"):
        benchmark.run(options, synthetic_dataset())


@pytest.mark.slow
def test_cli_prints_json(real_data_dir):
    completed = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--data-dir", str(real_data_dir),
         "--train-examples", "512", "--steps-per-dispatch", "8", "--rounds", "1"],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    assert_positive(result["train"], "median_epoch_s", "images_per_s")
    assert result["train"]["images_per_epoch"] == 512
    assert_positive(result, "peak_rss_mib")
