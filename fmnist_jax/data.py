"""Load Fashion-MNIST as NumPy arrays, from IDX files or tensorflow-datasets.

The IDX loader looks for Zalando's four ``.gz`` files in a fixed order of
folders and downloads them into a cache folder when no folder has them. Every
file it reads must be valid gzip, parse as IDX with the expected shape, and
match the sha256 of the original decompressed bytes. Checking the decompressed
bytes lets re-packed copies pass, such as Debian's ``dataset-fashion-mnist``,
whose gzip headers differ from Zalando's.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import logging
import os
import pathlib
import tempfile
import urllib.error
import urllib.request
import zlib

import numpy as np
from tqdm import tqdm

from fmnist_jax.errors import UserError

logger = logging.getLogger(__name__)

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# File name -> sha256 of the decompressed IDX bytes and the array shape it
# contains. The hashes are those of Zalando's original release.
FILES: dict[str, dict] = {
    "train-images-idx3-ubyte.gz": {
        "sha256": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "shape": (60000, 28, 28),
    },
    "train-labels-idx1-ubyte.gz": {
        "sha256": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "shape": (60000,),
    },
    "t10k-images-idx3-ubyte.gz": {
        "sha256": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "shape": (10000, 28, 28),
    },
    "t10k-labels-idx1-ubyte.gz": {
        "sha256": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        "shape": (10000,),
    },
}

# Dataset field -> file name.
_FIELD_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

DEBIAN_DATA_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")

# Zalando's S3 bucket is the location tensorflow-datasets and torchvision use.
# The GitHub copy is tried when the bucket cannot be reached.
DEFAULT_MIRRORS: tuple[str, ...] = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)

# Seconds that a connection attempt or a single read may block.
DOWNLOAD_TIMEOUT_S = 30.0

_CHUNK_BYTES = 1 << 20
_INSTALL_HINT = (
    "install the Debian package dataset-fashion-mnist, or download the four files "
    f"from {DEFAULT_MIRRORS[0]} into a folder and pass it as data_dir (--data-dir) "
    "or set FMNIST_DATA_DIR"
)
_REPLACE_HINT = (
    "replace it with an intact copy of Zalando's original file "
    "(or delete it if it is in the cache folder, so that it is downloaded again)"
)


class DataError(UserError):
    """Fashion-MNIST files that are missing, invalid or cannot be fetched.

    The message is one line that names the file, folder or URL, the problem
    and what to do about it.
    """


# eq=False because the generated __eq__ and __hash__ would compare arrays
# elementwise, which raises instead of returning a bool.
@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Fashion-MNIST splits as uint8 arrays, with labels 0-9 indexing CLASS_NAMES."""

    train_images: np.ndarray = dataclasses.field(repr=False)  # (60000, 28, 28)
    train_labels: np.ndarray = dataclasses.field(repr=False)  # (60000,)
    test_images: np.ndarray = dataclasses.field(repr=False)  # (10000, 28, 28)
    test_labels: np.ndarray = dataclasses.field(repr=False)  # (10000,)
    source: str  # the folder the files came from, or the tfds data dir


def default_cache_dir() -> pathlib.Path:
    """Return $FMNIST_CACHE_DIR, else $XDG_CACHE_HOME/fmnist-jax, else ~/.cache/fmnist-jax."""
    override = os.environ.get("FMNIST_CACHE_DIR")
    if override:
        return pathlib.Path(override).expanduser()

    # The XDG Base Directory spec says to ignore a relative XDG_CACHE_HOME.
    xdg_cache = os.environ.get("XDG_CACHE_HOME")
    if xdg_cache and os.path.isabs(xdg_cache):
        return pathlib.Path(xdg_cache) / "fmnist-jax"

    return pathlib.Path.home() / ".cache" / "fmnist-jax"


def load(
    source: str = "idx",
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    mirror: str | None = None,
    progress: bool = True,
) -> Dataset:
    """Load Fashion-MNIST from IDX files (source="idx") or tensorflow-datasets (source="tfds").

    For "idx", the files come from the first folder that contains all four:
    data_dir, $FMNIST_DATA_DIR, DEBIAN_DATA_DIR, then default_cache_dir().
    A data_dir that lacks a file raises DataError without trying the other
    folders. When no folder has them and download is true, the missing files
    are downloaded into the cache folder from mirror (a base URL), or by
    default from DEFAULT_MIRRORS in order.

    For "tfds", data_dir is optional and is passed to tensorflow-datasets as
    manual_dir, so it can prepare the dataset from local files without network.
    The prepared dataset is stored under default_cache_dir() / "tensorflow_datasets".

    Raises DataError for missing, invalid or unreachable data, and ValueError
    for an unknown source.
    """
    if source == "idx":
        return _load_idx(data_dir, download=download, mirror=mirror, progress=progress)
    if source == "tfds":
        from fmnist_jax import data_tfds  # imports tensorflow only when asked for

        return data_tfds.load(data_dir, download=download, progress=progress)
    raise ValueError(f"unknown data source {source!r}: expected 'idx' or 'tfds'")


# --- IDX files -------------------------------------------------------------


class _IdxFormatError(Exception):
    """Invalid content in one file. The caller adds the file or URL and the fix to the message."""


def missing_files(folder: pathlib.Path) -> list[str]:
    return [name for name in FILES if not (folder / name).is_file()]


def _load_idx(
    data_dir: str | os.PathLike | None, *, download: bool, mirror: str | None, progress: bool
) -> Dataset:
    if data_dir is not None:
        folder = pathlib.Path(data_dir).expanduser()
        if not folder.is_dir():
            raise DataError(
                f"data folder {folder} does not exist: pass a folder that contains "
                f"{', '.join(FILES)}"
            )
        missing = missing_files(folder)
        if missing:
            raise DataError(
                f"data folder {folder} is missing {', '.join(missing)}: copy the four "
                f"Fashion-MNIST files there, or {_INSTALL_HINT}"
            )
        return _read_folder(folder, f"{folder} (data_dir)")

    candidates = []
    env_dir = os.environ.get("FMNIST_DATA_DIR")
    if env_dir:
        candidates.append((pathlib.Path(env_dir).expanduser(), "FMNIST_DATA_DIR"))
    candidates.append((DEBIAN_DATA_DIR, "Debian package dataset-fashion-mnist"))
    cache_dir = default_cache_dir()
    candidates.append((cache_dir, "cache"))

    for folder, origin in candidates:
        missing = missing_files(folder)
        if not missing:
            return _read_folder(folder, f"{folder} ({origin})")
        if origin == "FMNIST_DATA_DIR":
            logger.warning(
                "FMNIST_DATA_DIR=%s is missing %s, so it is skipped", folder, ", ".join(missing)
            )

    searched = ", ".join(str(folder) for folder, _ in candidates)
    if not download:
        raise DataError(
            f"Fashion-MNIST files not found in {searched} and download is disabled: {_INSTALL_HINT}"
        )

    bases = (mirror,) if mirror else DEFAULT_MIRRORS
    arrays = _download_missing(cache_dir, bases, progress=progress)
    return _read_folder(cache_dir, f"{cache_dir} (cache, downloaded)", arrays)


def _read_folder(
    folder: pathlib.Path, description: str, preloaded: dict[str, np.ndarray] | None = None
) -> Dataset:
    """Read and verify the four files in folder, reusing arrays already verified in preloaded."""
    preloaded = preloaded or {}
    arrays = {}
    for field, name in _FIELD_FILES.items():
        if name in preloaded:
            arrays[field] = preloaded[name]
            continue
        path = folder / name
        try:
            arrays[field] = _read_idx(path, name)
        except _IdxFormatError as err:
            raise DataError(
                f"invalid Fashion-MNIST file {path}: {err}. Fix: {_REPLACE_HINT}"
            ) from None
        except OSError as err:
            raise DataError(
                f"cannot read Fashion-MNIST file {path}: {err.strerror or err}. "
                f"Fix: check that the file exists and is readable"
            ) from None
    return Dataset(source=description, **arrays)


def _read_idx(path: pathlib.Path, name: str) -> np.ndarray:
    """Decompress and parse one IDX file, checking structure first and the sha256 last.

    Raises _IdxFormatError for bad content and OSError when the file cannot be opened.
    """
    expected_shape = FILES[name]["shape"]
    # IDX magic: two zero bytes, type code 0x08 (unsigned byte), number of dimensions.
    expected_magic = 0x00000800 | len(expected_shape)
    digest = hashlib.sha256()

    with open(path, "rb") as raw_file, gzip.GzipFile(fileobj=raw_file, mode="rb") as stream:
        try:
            magic_bytes = _read_exact(stream, 4, "IDX magic number")
            magic = int.from_bytes(magic_bytes, "big")
            if magic != expected_magic:
                raise _IdxFormatError(
                    f"bad magic number 0x{magic:08x} (expected 0x{expected_magic:08x})"
                )
            dims_bytes = _read_exact(stream, 4 * len(expected_shape), "IDX dimensions")
            shape = tuple(
                int.from_bytes(dims_bytes[4 * i : 4 * i + 4], "big")
                for i in range(len(expected_shape))
            )
            if shape != expected_shape:
                raise _IdxFormatError(f"wrong dimensions {shape} (expected {expected_shape})")
            digest.update(magic_bytes)
            digest.update(dims_bytes)

            # Decompress straight into the array so no second copy is made.
            array = np.empty(expected_shape, dtype=np.uint8)
            view = memoryview(array).cast("B")
            filled = 0
            while filled < len(view):
                count = stream.readinto(view[filled : filled + _CHUNK_BYTES])
                if count == 0:
                    raise _IdxFormatError(
                        f"data ends after {filled} of {len(view)} bytes following the header"
                    )
                filled += count
            digest.update(view)

            # Reading past the end also makes gzip check the CRC in the trailer.
            if stream.read(1):
                raise _IdxFormatError(f"unexpected data after the {len(view)} bytes of IDX data")
        except EOFError:
            raise _IdxFormatError("truncated gzip data (the file is incomplete)") from None
        except gzip.BadGzipFile as err:
            raise _IdxFormatError(f"not a valid gzip file ({err})") from None
        except zlib.error as err:
            raise _IdxFormatError(f"corrupt gzip data ({err})") from None

    if array.ndim == 1 and array.size:
        out_of_range = np.flatnonzero(array > 9)
        if out_of_range.size:
            index = int(out_of_range[0])
            raise _IdxFormatError(
                f"{out_of_range.size} labels are outside 0-9, the first is "
                f"{int(array[index])} at index {index}"
            )

    actual = digest.hexdigest()
    if actual != FILES[name]["sha256"]:
        raise _IdxFormatError(
            f"checksum mismatch: sha256 of the decompressed data is {actual}, "
            f"expected {FILES[name]['sha256']}"
        )
    return array


def _read_exact(stream: gzip.GzipFile, size: int, what: str) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise _IdxFormatError(f"file ends inside the {what} ({len(data)} of {size} bytes)")
    return data


# --- Download ---------------------------------------------------------------


def _download_missing(
    cache_dir: pathlib.Path, bases: tuple[str, ...], *, progress: bool
) -> dict[str, np.ndarray]:
    """Download the files missing from cache_dir and return their verified arrays by file name."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(
            f"cannot create cache folder {cache_dir}: {err.strerror or err}. "
            f"Fix: set FMNIST_CACHE_DIR to a writable folder, or {_INSTALL_HINT}"
        ) from None

    arrays = {}
    for name in missing_files(cache_dir):
        arrays[name] = _download_file(cache_dir, name, bases, progress=progress)
    return arrays


def _download_file(
    cache_dir: pathlib.Path, name: str, bases: tuple[str, ...], *, progress: bool
) -> np.ndarray:
    """Fetch name from the first base URL that serves a valid copy, then move it into cache_dir.

    The file is written to a temporary file in cache_dir and renamed only after
    it is verified, so a failed download leaves no partial file behind.
    """
    failures = []
    for base in bases:
        url = base.rstrip("/") + "/" + name
        descriptor, temp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=cache_dir)
        temp_path = pathlib.Path(temp_name)
        try:
            with os.fdopen(descriptor, "wb") as temp_file:
                _fetch(url, temp_file, name, progress=progress)
            array = _read_idx(temp_path, name)
            # mkstemp creates the file readable by its owner only.
            os.chmod(temp_path, 0o644)
            os.replace(temp_path, cache_dir / name)
            return array
        # URLError and HTTPError are subclasses of OSError. ValueError is raised
        # for a URL that urllib cannot parse.
        except (OSError, http.client.HTTPException, ValueError, _IdxFormatError) as err:
            reason = _describe_download_error(err)
            failures.append(f"{url} ({reason})")
            logger.warning("Download of %s from %s failed: %s", name, url, reason)
        finally:
            temp_path.unlink(missing_ok=True)

    raise DataError(
        f"download of {name} failed from {', '.join(failures)}. "
        f"Fix: check the network or pass another mirror, or {_INSTALL_HINT}"
    )


def _fetch(url: str, destination, name: str, *, progress: bool) -> None:
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        received = 0
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=name,
            disable=not progress,
        ) as bar:
            while chunk := response.read(_CHUNK_BYTES):
                destination.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        if total is not None and received != total:
            raise _IdxFormatError(f"connection closed after {received} of {total} bytes")


def _describe_download_error(err: Exception) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return f"{err.reason}"
    if isinstance(err, TimeoutError):
        return f"timed out after {DOWNLOAD_TIMEOUT_S:g} s"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err)
