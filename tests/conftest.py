"""Shared fixtures: the real data folder, small synthetic data and tiny configs."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest

from fmnist_jax.data import Dataset

REPO = pathlib.Path(__file__).resolve().parent.parent


def shared_data_dir() -> pathlib.Path:
    """Return the folder of the real Fashion-MNIST files the tests read.

    $FMNIST_SHARED_DATA if set, else `../shared/fashion-mnist` beside the clone (as CI
    lays it out), else Debian's dataset-fashion-mnist package.
    """
    if "FMNIST_SHARED_DATA" in os.environ:
        return pathlib.Path(os.environ["FMNIST_SHARED_DATA"])
    beside = REPO.parent / "shared" / "fashion-mnist"
    return beside if beside.is_dir() else pathlib.Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session")
def real_data_dir() -> pathlib.Path:
    folder = shared_data_dir()
    if not (folder / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"real Fashion-MNIST files not found in {folder}; install the Debian package "
                    "dataset-fashion-mnist or set FMNIST_SHARED_DATA to a folder of the four files")
    return folder


def synthetic_dataset(train: int = 256, test: int = 64, seed: int = 0) -> Dataset:
    """Return random uint8 images whose label is learnable: the mean brightness band."""
    rng = np.random.default_rng(seed)

    def split(count: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 10, count).astype(np.uint8)
        images = rng.integers(0, 40, (count, 28, 28)).astype(np.uint8) + labels[:, None, None] * 20
        return images, labels

    train_images, train_labels = split(train)
    test_images, test_labels = split(test)
    return Dataset(train_images, train_labels, test_images, test_labels, source="synthetic")


@pytest.fixture
def tiny_dataset() -> Dataset:
    return synthetic_dataset()
