"""Tests for fmnist_jax.data against the real Fashion-MNIST files.

The real files are read from $FMNIST_SHARED_DATA, else from the
shared/fashion-mnist folder beside the repository, else from Debian's
dataset-fashion-mnist package. No test uses the network: the
download tests use an HTTP server on 127.0.0.1, and the default mirrors are
replaced by an unreachable loopback address.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import importlib.util
import os
import pathlib
import sys
import threading
import time

import numpy as np
import pytest

from fmnist_jax import data
from fmnist_jax.errors import UserError
from tests.conftest import shared_data_dir

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"
ALL_BUT_TEST_LABELS = [TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES]

# Pixel sums and first labels of the original release, computed with NumPy
# from the decompressed IDX files.
TRAIN_PIXEL_SUM = 3431114169
TEST_PIXEL_SUM = 573469082
TRAIN_FIRST_LABELS = [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
TEST_FIRST_LABELS = [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]

HAS_TFDS = importlib.util.find_spec("tensorflow_datasets") is not None

# sha256 of Zalando's published .gz files, which tensorflow-datasets checks.
ORIGINAL_GZIP_SHA256 = {
    "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}


# --- Fixtures ---------------------------------------------------------------


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """Return the folder with the four Fashion-MNIST files, as `conftest.shared_data_dir` finds it."""
    folder = shared_data_dir()
    missing = [name for name in data.FILES if not (folder / name).is_file()]
    if missing:
        pytest.fail(
            f"Fashion-MNIST test data folder {folder} is missing {', '.join(missing)}: "
            "install the Debian package dataset-fashion-mnist or set FMNIST_SHARED_DATA "
            "to a folder with the four files"
        )
    return folder


def has_original_gzip_files(folder: pathlib.Path) -> bool:
    """Return whether `folder` has Zalando's .gz files byte for byte, as tensorflow-datasets requires."""
    return all(hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
               for name, digest in ORIGINAL_GZIP_SHA256.items())


@pytest.fixture(scope="session")
def real_dataset(shared_dir) -> data.Dataset:
    return data.load(data_dir=shared_dir, download=False, progress=False)


@pytest.fixture(scope="session")
def original_test_labels(shared_dir) -> bytes:
    """Return the decompressed bytes of the original t10k labels file."""
    return gzip.decompress((shared_dir / TEST_LABELS).read_bytes())


@pytest.fixture(autouse=True)
def isolated_locations(tmp_path, monkeypatch) -> pathlib.Path:
    """Point every search location at empty folders under tmp_path and block the default mirrors.

    Returns the cache folder.
    """
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("FMNIST_CACHE_DIR", str(cache_dir))
    monkeypatch.delenv("FMNIST_DATA_DIR", raising=False)
    monkeypatch.setattr(data, "DEBIAN_DATA_DIR", tmp_path / "no-debian-package")
    # Port 9 (discard) on loopback is closed, so an accidental default download
    # fails at once instead of reaching the internet.
    monkeypatch.setattr(data, "DEFAULT_MIRRORS", ("http://127.0.0.1:9/",))
    return cache_dir


def link_files(source: pathlib.Path, destination: pathlib.Path, names=None) -> pathlib.Path:
    """Create destination with symbolic links to the named files (default: all four) in source."""
    destination.mkdir(parents=True, exist_ok=True)
    for name in names if names is not None else data.FILES:
        (destination / name).symlink_to(source / name)
    return destination


def replace_file(folder: pathlib.Path, name: str, content: bytes) -> None:
    path = folder / name
    path.unlink(missing_ok=True)
    path.write_bytes(content)


def idx_header(magic: int, *dims: int) -> bytes:
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)


class RecordingHandler(http.server.SimpleHTTPRequestHandler):
    """Serve files from a folder, record request paths and keep test output quiet."""

    requests: list[str]

    def do_GET(self):
        self.requests.append(self.path)
        super().do_GET()

    def log_message(self, format, *args):
        pass


@pytest.fixture
def http_mirror(tmp_path):
    """Serve tmp_path / "served" on 127.0.0.1.

    Yields (base URL, served folder, list of request paths).
    """
    served = tmp_path / "served"
    served.mkdir()
    requests: list[str] = []
    handler = functools.partial(
        type("Handler", (RecordingHandler,), {"requests": requests}), directory=str(served)
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", served, requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# --- Constants and paths ----------------------------------------------------


def test_class_names_order():
    assert len(data.CLASS_NAMES) == 10
    assert data.CLASS_NAMES[0] == "T-shirt/top"
    assert data.CLASS_NAMES[5] == "Sandal"
    assert data.CLASS_NAMES[9] == "Ankle boot"


def test_files_table_lists_four_files():
    assert set(data.FILES) == {TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS}
    assert data.FILES[TRAIN_IMAGES]["shape"] == (60000, 28, 28)
    assert data.FILES[TEST_LABELS]["shape"] == (10000,)
    for entry in data.FILES.values():
        assert len(entry["sha256"]) == 64


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("FMNIST_CACHE_DIR", str(tmp_path / "custom"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.default_cache_dir() == tmp_path / "custom"


def test_cache_dir_xdg_and_home(monkeypatch, tmp_path):
    monkeypatch.delenv("FMNIST_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.default_cache_dir() == tmp_path / "xdg" / "fmnist-jax"

    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.default_cache_dir() == tmp_path / "home" / ".cache" / "fmnist-jax"

    # The XDG spec says a relative XDG_CACHE_HOME is invalid and must be ignored.
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert data.default_cache_dir() == tmp_path / "home" / ".cache" / "fmnist-jax"


def test_data_error_is_user_error():
    assert issubclass(data.DataError, UserError)


def test_unknown_source_rejected():
    with pytest.raises(ValueError, match="unknown data source 'csv'"):
        data.load(source="csv")


# --- Real files ---------------------------------------------------------------


def test_real_files_shapes_and_dtypes(real_dataset):
    assert real_dataset.train_images.shape == (60000, 28, 28)
    assert real_dataset.train_labels.shape == (60000,)
    assert real_dataset.test_images.shape == (10000, 28, 28)
    assert real_dataset.test_labels.shape == (10000,)
    for array in (
        real_dataset.train_images,
        real_dataset.train_labels,
        real_dataset.test_images,
        real_dataset.test_labels,
    ):
        assert array.dtype == np.uint8


def test_real_files_labels_balanced(real_dataset):
    assert real_dataset.train_labels.max() == 9
    assert real_dataset.test_labels.max() == 9
    assert np.bincount(real_dataset.train_labels, minlength=10).tolist() == [6000] * 10
    assert np.bincount(real_dataset.test_labels, minlength=10).tolist() == [1000] * 10


def test_real_files_known_values(real_dataset):
    assert int(real_dataset.train_images.sum(dtype=np.int64)) == TRAIN_PIXEL_SUM
    assert int(real_dataset.test_images.sum(dtype=np.int64)) == TEST_PIXEL_SUM
    assert real_dataset.train_labels[:10].tolist() == TRAIN_FIRST_LABELS
    assert real_dataset.test_labels[:10].tolist() == TEST_FIRST_LABELS


def test_real_files_source_names_folder(real_dataset, shared_dir):
    assert str(shared_dir) in real_dataset.source
    assert "data_dir" in real_dataset.source


def test_dataset_is_frozen(real_dataset):
    with pytest.raises(AttributeError):
        real_dataset.source = "elsewhere"


def test_load_accepts_repacked_gzip(shared_dir, tmp_path):
    """A copy with another gzip header, as in Debian's package, has the same decompressed bytes."""
    folder = link_files(shared_dir, tmp_path / "repacked", ALL_BUT_TEST_LABELS)
    content = gzip.decompress((shared_dir / TEST_LABELS).read_bytes())
    (folder / TEST_LABELS).write_bytes(gzip.compress(content, compresslevel=1, mtime=0))
    assert (folder / TEST_LABELS).read_bytes() != (shared_dir / TEST_LABELS).read_bytes()

    dataset = data.load(data_dir=folder, download=False, progress=False)

    assert dataset.test_labels[:10].tolist() == TEST_FIRST_LABELS


# --- Search order ---------------------------------------------------------------


def test_search_order(shared_dir, tmp_path, monkeypatch, isolated_locations):
    explicit_dir = link_files(shared_dir, tmp_path / "explicit_dir")
    env_dir = link_files(shared_dir, tmp_path / "env")
    debian_dir = link_files(shared_dir, tmp_path / "debian")
    cache_dir = link_files(shared_dir, isolated_locations)
    monkeypatch.setenv("FMNIST_DATA_DIR", str(env_dir))
    monkeypatch.setattr(data, "DEBIAN_DATA_DIR", debian_dir)

    dataset = data.load(data_dir=explicit_dir, download=False, progress=False)
    assert str(explicit_dir) in dataset.source

    dataset = data.load(download=False, progress=False)
    assert str(env_dir) in dataset.source
    assert "FMNIST_DATA_DIR" in dataset.source

    monkeypatch.delenv("FMNIST_DATA_DIR")
    dataset = data.load(download=False, progress=False)
    assert str(debian_dir) in dataset.source
    assert "Debian" in dataset.source

    monkeypatch.setattr(data, "DEBIAN_DATA_DIR", tmp_path / "absent")
    dataset = data.load(download=False, progress=False)
    assert str(cache_dir) in dataset.source
    assert "cache" in dataset.source


def test_incomplete_env_dir_skipped(shared_dir, tmp_path, monkeypatch, caplog):
    env_dir = link_files(shared_dir, tmp_path / "env", [TRAIN_IMAGES, TRAIN_LABELS])
    debian_dir = link_files(shared_dir, tmp_path / "debian")
    monkeypatch.setenv("FMNIST_DATA_DIR", str(env_dir))
    monkeypatch.setattr(data, "DEBIAN_DATA_DIR", debian_dir)

    dataset = data.load(download=False, progress=False)

    assert str(debian_dir) in dataset.source
    assert TEST_IMAGES in caplog.text


def test_data_dir_missing_file_no_fallthrough(shared_dir, tmp_path, monkeypatch):
    explicit_dir = link_files(shared_dir, tmp_path / "explicit_dir", ALL_BUT_TEST_LABELS)
    monkeypatch.setenv("FMNIST_DATA_DIR", str(link_files(shared_dir, tmp_path / "env")))

    with pytest.raises(data.DataError) as info:
        data.load(data_dir=explicit_dir, progress=False)

    message = str(info.value)
    assert str(explicit_dir) in message
    assert TEST_LABELS in message
    assert TRAIN_IMAGES not in message
    assert "\n" not in message


def test_data_dir_not_a_folder(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.load(data_dir=tmp_path / "absent", progress=False)


def test_nothing_found_without_download(tmp_path, isolated_locations):
    with pytest.raises(data.DataError) as info:
        data.load(download=False, progress=False)

    message = str(info.value)
    assert str(isolated_locations) in message
    assert "download is disabled" in message
    assert "dataset-fashion-mnist" in message
    assert not isolated_locations.exists()


# --- Invalid files ---------------------------------------------------------------


def corrupt_truncated_gzip(shared_dir, original):
    return (shared_dir / TEST_LABELS).read_bytes()[:2000]


def corrupt_not_gzip(shared_dir, original):
    return original


def corrupt_bad_magic(shared_dir, original):
    return gzip.compress(idx_header(0x00000803) + original[4:])


def corrupt_wrong_count(shared_dir, original):
    return gzip.compress(idx_header(0x00000801, 9999) + original[8:-1])


def corrupt_short_data(shared_dir, original):
    return gzip.compress(original[:-100])


def corrupt_trailing_data(shared_dir, original):
    return gzip.compress(original + b"\x00" * 16)


def corrupt_label_range(shared_dir, original):
    content = bytearray(original)
    content[8 + 123] = 10
    return gzip.compress(bytes(content))


def corrupt_swapped_labels(shared_dir, original):
    content = bytearray(original)
    # Labels 0 and 1 are 9 and 2, so swapping keeps the structure valid.
    content[8], content[9] = content[9], content[8]
    return gzip.compress(bytes(content))


INVALID_LABEL_FILES = [
    pytest.param(corrupt_truncated_gzip, "truncated gzip", id="truncated-gzip"),
    pytest.param(corrupt_not_gzip, "not a valid gzip file", id="not-gzip"),
    pytest.param(
        corrupt_bad_magic, "bad magic number 0x00000803 (expected 0x00000801)", id="bad-magic"
    ),
    pytest.param(
        corrupt_wrong_count, "wrong dimensions (9999,) (expected (10000,))", id="wrong-count"
    ),
    pytest.param(corrupt_short_data, "data ends after 9900 of 10000 bytes", id="short-data"),
    pytest.param(corrupt_trailing_data, "unexpected data after", id="trailing-data"),
    pytest.param(
        corrupt_label_range, "outside 0-9, the first is 10 at index 123", id="label-range"
    ),
    pytest.param(corrupt_swapped_labels, "checksum mismatch", id="checksum"),
]


@pytest.mark.parametrize(("corrupt", "problem"), INVALID_LABEL_FILES)
def test_invalid_label_file(shared_dir, tmp_path, original_test_labels, corrupt, problem):
    folder = link_files(shared_dir, tmp_path / "bad", ALL_BUT_TEST_LABELS)
    replace_file(folder, TEST_LABELS, corrupt(shared_dir, original_test_labels))

    with pytest.raises(data.DataError) as info:
        data.load(data_dir=folder, download=False, progress=False)

    message = str(info.value)
    assert str(folder / TEST_LABELS) in message
    assert problem in message
    assert "\n" not in message
    assert "intact copy" in message
    assert info.value.__suppress_context__


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        pytest.param(idx_header(0x00000801, 10000), "bad magic number 0x00000801", id="bad-magic"),
        pytest.param(
            idx_header(0x00000803, 10000, 28, 27),
            "wrong dimensions (10000, 28, 27)",
            id="wrong-shape",
        ),
        pytest.param(
            idx_header(0x00000803, 10000, 28),
            "file ends inside the IDX dimensions",
            id="short-header",
        ),
    ],
)
def test_invalid_image_header(shared_dir, tmp_path, header, problem):
    folder = link_files(shared_dir, tmp_path / "bad", [TRAIN_IMAGES, TRAIN_LABELS, TEST_LABELS])
    replace_file(folder, TEST_IMAGES, gzip.compress(header))

    with pytest.raises(data.DataError) as info:
        data.load(data_dir=folder, download=False, progress=False)

    message = str(info.value)
    assert str(folder / TEST_IMAGES) in message
    assert problem in message
    assert "\n" not in message


def test_invalid_file_in_cache_raises(shared_dir, isolated_locations, http_mirror):
    base_url, _served, requests = http_mirror
    link_files(shared_dir, isolated_locations, ALL_BUT_TEST_LABELS)
    replace_file(isolated_locations, TEST_LABELS, b"not gzip")

    with pytest.raises(data.DataError) as info:
        data.load(mirror=base_url, progress=False)

    assert str(isolated_locations / TEST_LABELS) in str(info.value)
    assert requests == []


def test_dangling_link_reported_missing(shared_dir, tmp_path):
    folder = link_files(shared_dir, tmp_path / "bad", ALL_BUT_TEST_LABELS)
    (folder / TEST_LABELS).symlink_to(tmp_path / "absent")

    with pytest.raises(data.DataError) as info:
        data.load(data_dir=folder, download=False, progress=False)

    message = str(info.value)
    assert "missing" in message
    assert TEST_LABELS in message


# --- Download ---------------------------------------------------------------


def test_download_into_empty_cache(shared_dir, isolated_locations, http_mirror):
    base_url, served, requests = http_mirror
    link_files(shared_dir, served)

    dataset = data.load(mirror=base_url, progress=False)

    assert sorted(requests) == sorted(f"/{name}" for name in data.FILES)
    assert sorted(os.listdir(isolated_locations)) == sorted(data.FILES)
    for name in data.FILES:
        assert (isolated_locations / name).read_bytes() == (shared_dir / name).read_bytes()
    assert str(isolated_locations) in dataset.source
    assert int(dataset.train_images.sum(dtype=np.int64)) == TRAIN_PIXEL_SUM
    assert dataset.test_labels[:10].tolist() == TEST_FIRST_LABELS

    # The next load finds the cache and makes no request.
    requests.clear()
    dataset = data.load(mirror=base_url, progress=False)
    assert requests == []
    assert "cache" in dataset.source


def test_download_only_missing_files(shared_dir, isolated_locations, http_mirror):
    base_url, served, requests = http_mirror
    link_files(shared_dir, served)
    link_files(shared_dir, isolated_locations, ALL_BUT_TEST_LABELS)

    data.load(mirror=base_url, progress=False)

    assert requests == [f"/{TEST_LABELS}"]
    assert (isolated_locations / TEST_LABELS).is_file()


def test_download_progress_bar(shared_dir, isolated_locations, http_mirror, capsys):
    base_url, served, _requests = http_mirror
    link_files(shared_dir, served)
    link_files(shared_dir, isolated_locations, ALL_BUT_TEST_LABELS)

    data.load(mirror=base_url, progress=True)

    assert TEST_LABELS in capsys.readouterr().err


@pytest.mark.parametrize(
    ("corrupt", "problem"),
    [
        pytest.param(corrupt_swapped_labels, "checksum mismatch", id="checksum"),
        pytest.param(corrupt_truncated_gzip, "truncated gzip", id="truncated-gzip"),
    ],
)
def test_download_corrupt_file_leaves_nothing(
    shared_dir, isolated_locations, http_mirror, original_test_labels, corrupt, problem
):
    base_url, served, _requests = http_mirror
    link_files(shared_dir, served, ALL_BUT_TEST_LABELS)
    (served / TEST_LABELS).write_bytes(corrupt(shared_dir, original_test_labels))

    with pytest.raises(data.DataError) as info:
        data.load(mirror=base_url, progress=False)

    message = str(info.value)
    assert f"{base_url}{TEST_LABELS}" in message
    assert problem in message
    assert "dataset-fashion-mnist" in message
    assert "\n" not in message
    # The three valid files were moved into place, the corrupt one left no file.
    assert sorted(os.listdir(isolated_locations)) == sorted(ALL_BUT_TEST_LABELS)


def test_download_http_404(isolated_locations, http_mirror):
    base_url, _served, requests = http_mirror

    with pytest.raises(data.DataError) as info:
        data.load(mirror=base_url, progress=False)

    message = str(info.value)
    assert f"{base_url}{TRAIN_IMAGES}" in message
    assert "HTTP 404" in message
    assert "data_dir" in message
    assert requests == [f"/{TRAIN_IMAGES}"]
    assert os.listdir(isolated_locations) == []


def test_download_tries_mirrors_in_order(shared_dir, isolated_locations, http_mirror, monkeypatch):
    base_url, served, _requests = http_mirror
    link_files(shared_dir, served)
    link_files(shared_dir, isolated_locations, ALL_BUT_TEST_LABELS)
    monkeypatch.setattr(data, "DEFAULT_MIRRORS", ("http://127.0.0.1:9/", base_url))

    dataset = data.load(progress=False)

    assert dataset.test_labels[:10].tolist() == TEST_FIRST_LABELS


def test_download_connection_refused(isolated_locations):
    with pytest.raises(data.DataError) as info:
        data.load(progress=False)

    message = str(info.value)
    assert f"http://127.0.0.1:9/{TRAIN_IMAGES}" in message
    assert "refused" in message
    assert sorted(os.listdir(isolated_locations)) == []


# --- tensorflow-datasets ---------------------------------------------------------


def test_tfds_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)

    with pytest.raises(data.DataError, match=r"pip install 'fmnist-jax\[tfds\]'"):
        data.load(source="tfds")


@pytest.fixture
def tfds_with_broken_api(tmp_path, monkeypatch):
    """Put a tensorflow_datasets package first on sys.path whose public API fails to import.

    Its __init__ swallows the error, as tensorflow-datasets 4.9.10's does, so
    `import tensorflow_datasets` succeeds and returns a package without `builder`.
    """
    package = tmp_path / "site" / "tensorflow_datasets"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "try:\n    from tensorflow_datasets.public_api import *\nexcept Exception:\n    pass\n")
    (package / "public_api.py").write_text(
        "raise ImportError('libtensorflow_framework.so.2: cannot allocate memory in static TLS block')\n")
    real = {name: module for name, module in sys.modules.items()
            if name.partition(".")[0] == "tensorflow_datasets"}
    for name in real:
        del sys.modules[name]
    monkeypatch.syspath_prepend(str(package.parent))
    yield
    for name in [name for name in sys.modules if name.partition(".")[0] == "tensorflow_datasets"]:
        del sys.modules[name]
    sys.modules.update(real)


def test_tfds_import_error_is_named(tfds_with_broken_api, shared_dir):
    with pytest.raises(data.DataError) as info:
        data.load(source="tfds", data_dir=shared_dir, progress=False)

    message = str(info.value)
    assert "failed to import: ImportError: libtensorflow_framework.so.2" in message
    assert "source 'idx'" in message


@pytest.mark.skipif(not HAS_TFDS, reason="needs tensorflow-datasets: pip install .[tfds]")
def test_tfds_manual_dir_missing_file(shared_dir, tmp_path):
    folder = link_files(shared_dir, tmp_path / "manual", ALL_BUT_TEST_LABELS)

    with pytest.raises(data.DataError) as info:
        data.load(source="tfds", data_dir=folder, progress=False)

    assert str(folder) in str(info.value)
    assert TEST_LABELS in str(info.value)


@pytest.mark.skipif(not HAS_TFDS, reason="needs tensorflow-datasets: pip install .[tfds]")
def test_tfds_rejects_repacked_gzip(shared_dir, tmp_path):
    folder = link_files(shared_dir, tmp_path / "manual", ALL_BUT_TEST_LABELS)
    content = gzip.decompress((shared_dir / TEST_LABELS).read_bytes())
    (folder / TEST_LABELS).write_bytes(gzip.compress(content, mtime=0))

    with pytest.raises(data.DataError) as info:
        data.load(source="tfds", data_dir=folder, progress=False)

    message = str(info.value)
    assert str(folder) in message
    assert "checksums differ" in message
    assert "source 'idx'" in message


# NOTE: tensorflow-datasets 4.9.10 encodes all 70000 images as PNG while
# preparing, so this test took 31-35 s on a shared 2-core CPU machine.
@pytest.mark.skipif(not HAS_TFDS, reason="needs tensorflow-datasets: pip install .[tfds]")
def test_tfds_from_manual_dir(shared_dir, isolated_locations):
    if not has_original_gzip_files(shared_dir):
        pytest.skip("runs where Zalando's original .gz files are the test data, as in CI with "
                    "../shared/fashion-mnist; Debian's re-packed files fail tfds's checksums")
    start = time.monotonic()
    dataset = data.load(source="tfds", data_dir=shared_dir, download=False, progress=False)
    print(f"tfds prepare and load took {time.monotonic() - start:.1f} s")

    assert dataset.train_images.shape == (60000, 28, 28)
    assert dataset.test_images.shape == (10000, 28, 28)
    assert dataset.train_images.dtype == np.uint8
    assert dataset.train_labels.dtype == np.uint8
    assert dataset.source.startswith("tfds")
    assert (isolated_locations / "tensorflow_datasets" / "fashion_mnist").is_dir()
    # tensorflow-datasets shuffles examples, so compare order-independent sums.
    assert int(dataset.train_images.sum(dtype=np.int64)) == TRAIN_PIXEL_SUM
    assert int(dataset.test_images.sum(dtype=np.int64)) == TEST_PIXEL_SUM
    assert np.bincount(dataset.train_labels, minlength=10).tolist() == [6000] * 10
    assert np.bincount(dataset.test_labels, minlength=10).tolist() == [1000] * 10
