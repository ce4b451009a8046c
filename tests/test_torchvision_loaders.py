"""The torchvision loaders, run on tiny files written in the real on-disk formats."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from fedunlearn.data import datasets as data_module
from fedunlearn.data import load_dataset
from fedunlearn.errors import ConfigError


def _write_idx_images(path, images: np.ndarray, packed: bool = False) -> None:
    # idx3-ubyte: magic 0x00000803, then count, rows, cols as big-endian int32, then uint8 pixels.
    payload = struct.pack(">IIII", 0x0803, *images.shape) + images.astype(np.uint8).tobytes()
    (gzip.open if packed else open)(path, "wb").write(payload)


def _write_idx_labels(path, labels: np.ndarray, packed: bool = False) -> None:
    payload = struct.pack(">II", 0x0801, len(labels)) + labels.astype(np.uint8).tobytes()
    (gzip.open if packed else open)(path, "wb").write(payload)


def _write_mnist_layout(root, folder: str, train_count: int, test_count: int, packed: bool = False):
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if packed else ""
    splits = {"train": train_count, "t10k": test_count}
    expected = {}
    for prefix, count in splits.items():
        images = rng.integers(0, 256, size=(count, 28, 28))
        labels = np.arange(count) % 10
        _write_idx_images(raw / f"{prefix}-images-idx3-ubyte{suffix}", images, packed)
        _write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte{suffix}", labels, packed)
        expected[prefix] = (images, labels)
    return expected


@pytest.fixture(autouse=True)
def fresh_loader_cache():
    data_module._cached_load.cache_clear()
    yield
    data_module._cached_load.cache_clear()


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_style_idx_files_load_through_torchvision(tmp_path, name, folder):
    expected = _write_mnist_layout(tmp_path, folder, train_count=30, test_count=20)
    split = load_dataset(name, data_dir=tmp_path)
    assert split.input_shape == (1, 28, 28) and split.num_classes == 10
    assert split.train.tensors[0].shape == (30, 1, 28, 28) and len(split.test) == 20
    assert np.array_equal(split.train.tensors[1].numpy(), expected["train"][1])
    # Pixels survive up to the standardisation (a monotone per-data-set affine map).
    raw = expected["train"][0].reshape(30, -1).astype(float)
    loaded = split.train.tensors[0].numpy().reshape(30, -1)
    assert np.corrcoef(raw.ravel(), loaded.ravel())[0, 1] > 0.9999


def test_gzipped_idx_files_as_debian_ships_them_are_accepted(tmp_path):
    expected = _write_mnist_layout(tmp_path, "FashionMNIST", train_count=12, test_count=8, packed=True)
    split = load_dataset("fashion-mnist", data_dir=tmp_path)
    assert np.array_equal(split.test.tensors[1].numpy(), expected["t10k"][1])


def test_cifar10_pickled_batches_load_through_torchvision(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    per_batch = 4
    all_labels = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        # CIFAR-10's python format: a pickled dict, "data" rows of 3072 bytes (R, G, B planes),
        # "labels" a list; the original files are Python 2 pickles whose keys load as str.
        labels = [int(label) for label in rng.integers(0, 10, size=per_batch)]
        batch = {"data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8), "labels": labels}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle)
        all_labels.append(labels)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, handle)
    split = load_dataset("cifar10", data_dir=tmp_path)
    assert split.input_shape == (3, 32, 32)
    assert split.train.tensors[0].shape == (5 * per_batch, 3, 32, 32)
    assert split.train.tensors[1].tolist() == [int(label) for labels in all_labels[:5] for label in labels]
    assert split.test.tensors[1].tolist() == [int(label) for label in all_labels[5]]


@pytest.mark.parametrize("name, expected_file", [
    ("mnist", "MNIST/raw/train-images-idx3-ubyte"),
    ("fashion-mnist", "FashionMNIST/raw/t10k-labels-idx1-ubyte"),
    ("cifar10", "cifar-10-batches-py/data_batch_1"),
])
def test_missing_files_say_which_files_to_put_where(tmp_path, name, expected_file):
    with pytest.raises(ConfigError) as caught:
        load_dataset(name, data_dir=tmp_path)
    message = caught.value.one_line()
    assert caught.value.key == "data-dir"
    assert str(tmp_path / expected_file) in message and "download=true" in message


# --- the four idx files directly in data-dir (Debian's dataset-fashion-mnist layout) --------------

def _write_flat(folder, train_count: int, test_count: int, packed: bool = True, seed: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    suffix = ".gz" if packed else ""
    expected = {}
    for prefix, count in {"train": train_count, "t10k": test_count}.items():
        images, labels = rng.integers(0, 256, size=(count, 28, 28)), rng.integers(0, 10, size=count)
        _write_idx_images(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, packed)
        _write_idx_labels(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, packed)
        expected[prefix] = (images, labels)
    return expected


@pytest.mark.parametrize("packed", [True, False])
def test_idx_files_directly_in_data_dir_load_as_torchvision_loads_them_and_nothing_is_written(tmp_path, packed):
    debian = tmp_path / "usr/share/datasets/fashion-mnist"
    expected = _write_flat(debian, train_count=25, test_count=15, packed=packed)
    before = sorted(path.name for path in debian.iterdir())
    split = load_dataset("fashion-mnist", data_dir=debian)
    assert sorted(path.name for path in debian.iterdir()) == before  # read in memory, nothing unpacked beside
    assert split.input_shape == (1, 28, 28) and split.num_classes == 10
    assert np.array_equal(split.train.tensors[1].numpy(), expected["train"][1])
    assert np.array_equal(split.test.tensors[1].numpy(), expected["t10k"][1])
    # The same bytes in torchvision's layout, read by torchvision, give the same tensors.
    raw = tmp_path / "tv" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for file in debian.iterdir():
        (raw / file.name).write_bytes(file.read_bytes())
    data_module._cached_load.cache_clear()
    reference = load_dataset("fashion-mnist", data_dir=tmp_path / "tv")
    for ours, theirs in zip((*split.train.tensors, *split.test.tensors), (*reference.train.tensors, *reference.test.tensors)):
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)


def test_the_missing_data_message_names_the_debian_package_its_folder_and_download(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    message = caught.value.one_line()
    assert caught.value.key == "data-dir"
    for fragment in ("apt-get install dataset-fashion-mnist", "data-dir=/usr/share/datasets/fashion-mnist",
                     "download=true", str(tmp_path / "FashionMNIST" / "raw")):
        assert fragment in message


def test_three_of_four_idx_files_are_not_a_data_set(tmp_path):
    _write_flat(tmp_path, 5, 5)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ConfigError) as caught:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    assert "t10k-labels-idx1-ubyte" in caught.value.one_line()


@pytest.mark.parametrize("damage, fragment", [
    (lambda payload: b"\x00\x00\x0d\x03" + payload[4:], "not an idx file of unsigned bytes"),  # float idx
    (lambda payload: payload[:-5], "truncated"),
    (lambda payload: b"PK\x03\x04" + payload, "not an idx file"),
])
def test_a_damaged_idx_file_is_a_config_error_naming_it(tmp_path, damage, fragment):
    _write_flat(tmp_path, 6, 4)
    target = tmp_path / "train-images-idx3-ubyte.gz"
    target.write_bytes(gzip.compress(damage(gzip.decompress(target.read_bytes()))))
    with pytest.raises(ConfigError) as caught:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    assert caught.value.key == "data-dir" and fragment in caught.value.one_line() and str(target) in caught.value.one_line()


def test_images_and_labels_of_different_lengths_are_refused(tmp_path):
    _write_flat(tmp_path, 6, 4)
    _write_idx_labels(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(5), packed=True)
    with pytest.raises(ConfigError) as caught:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    assert "do not match" in caught.value.one_line()
