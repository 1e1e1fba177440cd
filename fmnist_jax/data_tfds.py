"""Fashion-MNIST through tensorflow-datasets, as the same uint8 arrays as the IDX loader."""

from __future__ import annotations

import os
import pathlib

import numpy as np

from fmnist_jax.data import FILES, DataError, Dataset, missing_files, default_cache_dir


def load(data_dir: str | os.PathLike | None, *, download: bool, progress: bool) -> Dataset:
    """Load Fashion-MNIST with tensorflow-datasets, preparing it from `data_dir` as manual_dir if given."""
    tfds = _import_tfds()
    from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError

    tfds_dir = default_cache_dir() / "tensorflow_datasets"
    download_config = None
    if data_dir is not None:
        manual_dir = pathlib.Path(data_dir).expanduser()
        missing = missing_files(manual_dir) if manual_dir.is_dir() else list(FILES)
        if missing:
            raise DataError(
                f"data folder {manual_dir} is missing {', '.join(missing)}: "
                f"tensorflow-datasets needs the four original .gz files there"
            )
        download_config = tfds.download.DownloadConfig(manual_dir=str(manual_dir))

    tfds.display_progress_bar(progress)
    try:
        builder = tfds.builder("fashion_mnist", data_dir=str(tfds_dir))
        if not builder.is_prepared():
            if data_dir is None and not download:
                raise DataError(
                    f"tensorflow-datasets has not prepared fashion_mnist in {tfds_dir} and "
                    "download is disabled. Fix: pass a folder with the four original .gz "
                    "files as data_dir, or allow the download"
                )
            builder.download_and_prepare(download_config=download_config)
        train = tfds.as_numpy(builder.as_dataset(split="train", batch_size=-1, as_supervised=True))
        test = tfds.as_numpy(builder.as_dataset(split="test", batch_size=-1, as_supervised=True))
    except NonMatchingChecksumError:
        # tensorflow-datasets checks the sha256 of the .gz files, which differs
        # for re-packed copies such as Debian's even when the data is identical.
        raise DataError(
            f"tensorflow-datasets rejected the .gz files in {data_dir} because their checksums "
            "differ from Zalando's originals (re-packed copies such as Debian's differ). "
            "Fix: use source 'idx', which checks the decompressed data, or use the original files"
        ) from None
    # NOTE: a module that is missing during the first prepare, such as tensorflow,
    # arrives as tensorflow-datasets' ExtractError. No clause catches it, so it ends
    # in a traceback.
    except ModuleNotFoundError as err:
        # tensorflow-datasets 4.9.10 imports importlib_resources without
        # declaring it as a dependency.
        raise DataError(
            f"tensorflow-datasets failed to import its dependency {err.name}. "
            f"Fix: pip install {err.name}"
        ) from None
    except tfds.download.DownloadError as err:
        raise DataError(
            f"tensorflow-datasets failed to download fashion_mnist: {err}. Fix: pass a folder "
            "with the four original .gz files as data_dir"
        ) from None

    return Dataset(
        train_images=_tfds_images(train[0]),
        train_labels=train[1].astype(np.uint8),
        test_images=_tfds_images(test[0]),
        test_labels=test[1].astype(np.uint8),
        source=f"tfds fashion_mnist {builder.version} in {tfds_dir}",
    )


def _import_tfds():
    """Return tensorflow-datasets' public API, or raise DataError naming why it is unavailable."""
    try:
        import tensorflow_datasets  # noqa: F401
    except ImportError:
        raise DataError(
            "tensorflow-datasets is not installed, so source 'tfds' is unavailable. "
            "Fix: pip install 'fmnist-jax[tfds]', or use source 'idx'"
        ) from None
    # tensorflow-datasets 4.9.10 catches and only logs any error raised while
    # importing its public API, which leaves a package without `builder` or
    # `download`. Importing that module directly raises the error instead.
    try:
        from tensorflow_datasets import public_api
    except Exception as err:
        raise DataError(
            f"tensorflow-datasets is installed but failed to import: {type(err).__name__}: {err}. "
            "Fix: if that names a missing or broken package, run pip install --force-reinstall "
            "'fmnist-jax[tfds]'; otherwise use source 'idx'"
        ) from err
    return public_api


def _tfds_images(images: np.ndarray) -> np.ndarray:
    # tensorflow-datasets returns (N, 28, 28, 1). Dropping the channel axis is a view.
    return images.reshape(images.shape[:3])
