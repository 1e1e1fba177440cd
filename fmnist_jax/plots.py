"""Figures of a run: loss and accuracy curves, and a grid of sample test predictions."""

from __future__ import annotations

import pathlib
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, so training works with no display

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402

from fmnist_jax.data import CLASS_NAMES, Dataset  # noqa: E402
from fmnist_jax.steps import TrainState, images_to_float  # noqa: E402

CURVES_FILE = "curves.png"
PREDICTIONS_FILE = "predictions.png"


def plot_curves(history: list[dict[str, float]], segments: list[dict[str, Any]],
                path: pathlib.Path) -> None:
    """Save loss and accuracy per epoch, with a dashed line where each resumed segment starts."""
    epochs = [row["epoch"] for row in history]
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(11, 4))
    for split in ("train", "val", "test"):
        if f"{split}/loss" in history[0]:
            loss_axes.plot(epochs, [row[f"{split}/loss"] for row in history], label=split)
            accuracy_axes.plot(epochs, [row[f"{split}/accuracy"] for row in history], label=split)
    for segment in segments[1:]:
        for axes in (loss_axes, accuracy_axes):
            axes.axvline(segment["start_epoch"], color="grey", linestyle="--", linewidth=1)
    loss_axes.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    accuracy_axes.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_predictions(state: TrainState, images: np.ndarray, labels: np.ndarray,
                     path: pathlib.Path, rows: int = 4, columns: int = 8) -> None:
    """Save a grid of test images titled with the predicted class: green when right, red when wrong.

    A wrong prediction's title also names the true class.
    """
    count = rows * columns
    logits = state.apply_fn({"params": state.params}, images_to_float(jnp.asarray(images[:count])))
    predictions = np.asarray(jnp.argmax(logits, -1))
    figure, grid = plt.subplots(rows, columns, figsize=(columns * 1.5, rows * 1.9))
    for axes, image, label, prediction in zip(grid.flat, images, labels, predictions):
        axes.imshow(image, cmap="gray_r")
        right = prediction == label
        title = CLASS_NAMES[prediction] if right else f"{CLASS_NAMES[prediction]}\n(true: {CLASS_NAMES[label]})"
        axes.set_title(title, fontsize=8, color="green" if right else "red")
        axes.axis("off")
    figure.suptitle("Test predictions (green: right, red: wrong, with the true class)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def save_run_plots(run_dir: pathlib.Path, history: list[dict[str, float]],
                   segments: list[dict[str, Any]], state: TrainState, dataset: Dataset) -> None:
    """Write the curves and the prediction grid into `run_dir`."""
    plot_curves(history, segments, run_dir / CURVES_FILE)
    plot_predictions(state, dataset.test_images, dataset.test_labels, run_dir / PREDICTIONS_FILE)
