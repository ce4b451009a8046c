"""MNIST-1D (Greydanus & Kalinowski, 2020): 1-D signals of length 40, ten classes, made offline.

The ``mnist1d`` package's ``get_dataset`` downloads a pickle from GitHub; we never call it. We call its
generator ``make_dataset`` with the package's default arguments except the sample count, then keep
the result in the project cache: generating 20,000 signals takes about 14 s, and every Ray actor
would otherwise pay that (plus 2 s to import the package, which pulls in matplotlib) on its first
message.
"""

from __future__ import annotations

import hashlib
import json
import random
from importlib import metadata
from pathlib import Path

import numpy as np

from fedunlearn.errors import ConfigError
from fedunlearn.files import atomic_savez

MNIST1D_DEFAULT_SAMPLES = 20_000
MNIST1D_MIN_SAMPLES = 100
SIGNAL_LENGTH = 40  # mnist1d's final_seq_length
NUM_CLASSES = 10


def _generator_args(samples: int) -> dict:
    from mnist1d.data import get_dataset_args

    args = get_dataset_args(as_dict=True)
    args["num_samples"] = int(samples)
    # Only the generator's inputs define the data; the download URL does not.
    args.pop("url", None)
    return args


def _cache_path(samples: int) -> Path:
    from fedunlearn.environment import cache_dir

    identity = {
        "samples": int(samples),
        # The signals depend on the generator's code and on numpy's legacy RNG and scipy's filters.
        "versions": {name: metadata.version(name) for name in ("mnist1d", "numpy", "scipy")},
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "datasets" / f"mnist1d-{int(samples)}-{digest}.npz"


def _generate(samples: int) -> dict[str, np.ndarray]:
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    # make_dataset seeds the process-wide `random` and `np.random` with its own seed (42); put
    # them back so loading data never changes what other code in this process draws.
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        generated = make_dataset(ObjectView(_generator_args(samples)))
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    return {
        "train_x": generated["x"].astype(np.float32),
        "train_y": generated["y"].astype(np.int64),
        "test_x": generated["x_test"].astype(np.float32),
        "test_y": generated["y_test"].astype(np.int64),
    }


def load_mnist1d_arrays(samples: int = MNIST1D_DEFAULT_SAMPLES) -> dict[str, np.ndarray]:
    """Train and test signals (N x 40, float32) and labels, from the project cache or generated once."""
    if samples < MNIST1D_MIN_SAMPLES:
        raise ConfigError("mnist1d-samples", samples, f"an integer >= {MNIST1D_MIN_SAMPLES}")
    path = _cache_path(samples)
    if path.exists():
        with np.load(path) as stored:
            return {name: stored[name] for name in stored.files}
    arrays = _generate(samples)
    # Several processes may generate at once (the CLI, then Ray actors): each writes its own file
    # and renames it into place, so a reader never sees a half-written one.
    atomic_savez(path, arrays)
    return arrays
