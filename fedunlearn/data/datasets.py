"""Loaders: scikit-learn's digits (offline default), torchvision's MNIST / Fashion-MNIST / CIFAR-10 and the
generated MNIST-1D signals.

MNIST and Fashion-MNIST are read from ``data-dir`` in either of two layouts: torchvision's
(``DATA_DIR/FashionMNIST/raw/<file>``, what ``download=true`` fetches) or the four idx files directly in
``data-dir`` (plain or ``.gz``), as Debian's ``dataset-fashion-mnist`` installs them in
``/usr/share/datasets/fashion-mnist``; the latter are read in memory, nothing is written beside them.
"""

from __future__ import annotations

import functools
import gzip
import pickle
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedunlearn.data import mnist1d
from fedunlearn.errors import ConfigError
from fedunlearn.files import atomic_open

DIGITS_SPLIT_SEED = 0  # fixed, not the run's seed: every run sees the same test set
DIGITS_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class DataSplit:
    name: str
    train: TensorDataset
    test: TensorDataset
    # (channels, height, width) for images, (channels, length) for 1-D signals.
    input_shape: tuple[int, ...]
    num_classes: int

    @property
    def train_labels(self) -> np.ndarray:
        return self.train.tensors[1].numpy()


def _standardize(train_x: torch.Tensor, test_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Per-channel statistics of the training split only, so the test set leaks nothing.
    dims = (0, *range(2, train_x.ndim))
    mean = train_x.mean(dim=dims, keepdim=True)
    std = train_x.std(dim=dims, keepdim=True).clamp_min(1e-6)
    return (train_x - mean) / std, (test_x - mean) / std


def _load_digits(data_dir: Path, download: bool) -> DataSplit:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)),
        test_size=DIGITS_TEST_FRACTION,
        random_state=DIGITS_SPLIT_SEED,
        stratify=labels,
    )
    train_x = torch.from_numpy(images[train_idx]).unsqueeze(1)
    test_x = torch.from_numpy(images[test_idx]).unsqueeze(1)
    train_x, test_x = _standardize(train_x, test_x)
    return DataSplit(
        name="digits",
        train=TensorDataset(train_x, torch.from_numpy(labels[train_idx])),
        test=TensorDataset(test_x, torch.from_numpy(labels[test_idx])),
        input_shape=(1, 8, 8),
        num_classes=10,
    )


# Where torchvision looks for each data set below data-dir, and the files it needs there.
TORCHVISION_LAYOUT: dict[str, tuple[str, tuple[str, ...]]] = {
    "mnist": (
        "MNIST/raw",
        ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    ),
    "fashion-mnist": (
        "FashionMNIST/raw",
        ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    ),
    "cifar10": (
        "cifar-10-batches-py",
        ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch", "batches.meta"),
    ),
}


def _missing_files(name: str, data_dir: Path) -> list[Path]:
    folder, files = TORCHVISION_LAYOUT[name]
    return [data_dir / folder / file for file in files if not (data_dir / folder / file).exists()]


def _unpack_gzipped_idx(name: str, data_dir: Path) -> None:
    """Accept the original ``*.gz`` idx files (as Debian's dataset-fashion-mnist installs them).

    torchvision only reads the unpacked files and unpacks only what it downloads itself.
    """
    folder, files = TORCHVISION_LAYOUT[name]
    for file in files:
        target = data_dir / folder / file
        packed = target.with_name(target.name + ".gz")
        if not target.exists() and packed.exists():
            with gzip.open(packed, "rb") as source, atomic_open(target) as sink:
                shutil.copyfileobj(source, sink)


# Data sets stored as the four original idx files, and the Debian package (and folder) that ships them.
IDX_DATASETS = ("mnist", "fashion-mnist")
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DEBIAN_PACKAGES = {"fashion-mnist": ("dataset-fashion-mnist", "/usr/share/datasets/fashion-mnist")}


def _torchvision_layout_present(name: str, data_dir: Path) -> bool:
    folder, files = TORCHVISION_LAYOUT[name]
    return all((data_dir / folder / file).exists() or (data_dir / folder / f"{file}.gz").exists() for file in files)


def _flat_idx_files(data_dir: Path) -> dict[str, Path] | None:
    """The four idx files directly in ``data_dir`` (each plain or ``.gz``), or None unless all four are there."""
    found = {}
    for file in IDX_FILES:
        candidates = [path for path in (data_dir / file, data_dir / f"{file}.gz") if path.is_file()]
        if not candidates:
            return None
        found[file] = candidates[0]
    return found


def read_idx(path: Path) -> np.ndarray:
    """An idx file of unsigned bytes (plain or gzipped): two zero bytes, the type 0x08, the number of
    dimensions d, d big-endian uint32 sizes, then the bytes in C order."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as handle:
            payload = handle.read()
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError
        raise ConfigError("data-dir", str(path.parent), reason=f"cannot read {path}: {error}") from None
    if len(payload) < 4 or payload[:3] != b"\x00\x00\x08":
        raise ConfigError("data-dir", str(path.parent), reason=f"{path} is not an idx file of unsigned bytes")
    dims = payload[3]
    start = 4 + 4 * dims
    shape = struct.unpack(f">{dims}I", payload[4:start]) if len(payload) >= start else None
    if shape is None or len(payload) - start != int(np.prod(shape)):
        raise ConfigError("data-dir", str(path.parent), reason=f"{path} is truncated or its header is wrong")
    return np.frombuffer(payload, dtype=np.uint8, offset=start).reshape(shape).copy()  # writable, for torch


def _read_idx_split(files: dict[str, Path], prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(files[f"{prefix}-images-idx3-ubyte"]), read_idx(files[f"{prefix}-labels-idx1-ubyte"])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ConfigError(
            "data-dir", str(files[f"{prefix}-images-idx3-ubyte"].parent),
            reason=f"{prefix} images {images.shape} and labels {labels.shape} do not match (N x H x W images, N labels)",
        )
    return images, labels


def _missing_message(name: str, data_dir: Path, missing: list[Path]) -> str:
    listing = ", ".join(str(path) for path in missing)
    folder = TORCHVISION_LAYOUT[name][0]
    if name not in IDX_DATASETS:
        return f"{name} not found: put {listing} there, or set download=true (torchvision downloads them into {data_dir / folder})"
    text = (
        f"{name} not found: put {listing} there (or the same names with .gz, or all four directly in {data_dir})"
    )
    if name in DEBIAN_PACKAGES:
        package, location = DEBIAN_PACKAGES[name]
        text += f"; on Debian/Ubuntu `apt-get install {package}` installs them in {location}: set data-dir={location}"
    return text + f"; or set download=true (torchvision downloads them into {data_dir / folder})"


def _require_files(name: str, data_dir: Path, download: bool) -> None:
    if download:
        return
    if name in IDX_DATASETS:
        _unpack_gzipped_idx(name, data_dir)
    missing = _missing_files(name, data_dir)
    if missing:
        raise ConfigError("data-dir", str(data_dir), reason=_missing_message(name, data_dir, missing))


def _images_to_tensor(data: np.ndarray | torch.Tensor) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(data), dtype=torch.float32) / 255.0
    if tensor.ndim == 3:  # N x H x W grey images
        return tensor.unsqueeze(1)
    return tensor.permute(0, 3, 1, 2).contiguous()  # N x H x W x C colour images


def _read_cifar10(root: Path, train: bool, download: bool):
    """torchvision's CIFAR10 reader without its MD5 check of whole files.

    The MD5 check rejects any re-packed or reduced copy (and our format tests); the reader still
    unpickles the real batch files and fails loudly on a malformed one.
    """
    from torchvision.datasets import CIFAR10

    class CIFAR10WithoutChecksum(CIFAR10):
        def _check_integrity(self) -> bool:
            folder = Path(self.root) / self.base_folder
            return all((folder / name).exists() for name, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:
            with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as handle:
                self.classes = pickle.load(handle, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {name: index for index, name in enumerate(self.classes)}

    return CIFAR10WithoutChecksum(root=str(root), train=train, download=download)


def _load_torchvision(name: str, data_dir: Path, download: bool) -> DataSplit:
    from torchvision import datasets as tv

    if name in IDX_DATASETS and not download and not _torchvision_layout_present(name, data_dir):
        if (files := _flat_idx_files(data_dir)) is not None:
            return _load_flat_idx(name, files)
    _require_files(name, data_dir, download)
    if name == "cifar10":
        train, test = (_read_cifar10(data_dir, split, download) for split in (True, False))
        train_x, test_x = _images_to_tensor(train.data), _images_to_tensor(test.data)
        train_y, test_y = torch.tensor(train.targets), torch.tensor(test.targets)
        shape, classes = (3, 32, 32), 10
    else:
        reader = tv.MNIST if name == "mnist" else tv.FashionMNIST
        train, test = (reader(root=str(data_dir), train=split, download=download) for split in (True, False))
        train_x, test_x = _images_to_tensor(train.data), _images_to_tensor(test.data)
        train_y, test_y = train.targets.long(), test.targets.long()
        shape, classes = (1, 28, 28), 10
    train_x, test_x = _standardize(train_x, test_x)
    return DataSplit(name, TensorDataset(train_x, train_y), TensorDataset(test_x, test_y), shape, classes)


def _load_flat_idx(name: str, files: dict[str, Path]) -> DataSplit:
    """The four idx files directly in data-dir (Debian's layout), read in memory as torchvision would."""
    (train_images, train_labels), (test_images, test_labels) = (_read_idx_split(files, prefix) for prefix in ("train", "t10k"))
    train_x, test_x = _standardize(_images_to_tensor(train_images), _images_to_tensor(test_images))
    train_y, test_y = (torch.from_numpy(labels.astype(np.int64)) for labels in (train_labels, test_labels))
    return DataSplit(name, TensorDataset(train_x, train_y), TensorDataset(test_x, test_y), (1, *train_images.shape[1:]), 10)


def _load_mnist1d(data_dir: Path, download: bool, samples: int = mnist1d.MNIST1D_DEFAULT_SAMPLES) -> DataSplit:
    """Generated, so data-dir and download do not apply; the generator's seed is fixed (every run
    sees the same signals, as with digits) and its 80/20 split gives the held-out test set."""
    arrays = mnist1d.load_mnist1d_arrays(samples)
    train_x = torch.from_numpy(arrays["train_x"]).unsqueeze(1)
    test_x = torch.from_numpy(arrays["test_x"]).unsqueeze(1)
    # mnist1d centres with the statistics of all signals; an affine map of it standardised with the
    # training split's statistics equals the raw signals standardised that way, so nothing leaks.
    train_x, test_x = _standardize(train_x, test_x)
    return DataSplit(
        name="mnist1d",
        train=TensorDataset(train_x, torch.from_numpy(arrays["train_y"])),
        test=TensorDataset(test_x, torch.from_numpy(arrays["test_y"])),
        input_shape=(1, mnist1d.SIGNAL_LENGTH),
        num_classes=mnist1d.NUM_CLASSES,
    )


DATASET_LOADERS: dict[str, Callable[..., DataSplit]] = {
    "digits": _load_digits,
    "mnist": functools.partial(_load_torchvision, "mnist"),
    "fashion-mnist": functools.partial(_load_torchvision, "fashion-mnist"),
    "cifar10": functools.partial(_load_torchvision, "cifar10"),
    "mnist1d": _load_mnist1d,
}
# Data sets made by a generator: they take a sample count, the others ignore it.
GENERATED_DATASETS = ("mnist1d",)


@functools.lru_cache(maxsize=4)
def _cached_load(name: str, data_dir: str, download: bool, samples: int | None) -> DataSplit:
    if samples is None:
        return DATASET_LOADERS[name](Path(data_dir), download)
    return DATASET_LOADERS[name](Path(data_dir), download, samples)


def load_dataset(
    name: str = "digits", data_dir: str | Path = "data", download: bool = False, samples: int | None = None
) -> DataSplit:
    """``samples``: how many examples a generated data set makes (train + test; None: its default)."""
    if name not in DATASET_LOADERS:
        raise ConfigError("dataset", name, sorted(DATASET_LOADERS))
    if name not in GENERATED_DATASETS:
        samples = None  # so a sample count never splits the cache of a data set it does not apply to
    elif samples is None:
        samples = mnist1d.MNIST1D_DEFAULT_SAMPLES
    return _cached_load(name, str(Path(data_dir).expanduser().resolve()), bool(download), samples)
