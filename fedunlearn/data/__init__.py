"""Data sets and their federated partitions.

``load_dataset(name, data_dir, download, samples)`` gives tensors in memory (train and a held-out test set);
``partition_labels(...)`` splits the training set over clients. Both are cached per process: every
simulated client and the server call them with the same arguments and get the same answer, so the
cache only saves work, it holds no state a deployment could lose.
"""

from fedunlearn.data.datasets import DATASET_LOADERS, DataSplit, load_dataset
from fedunlearn.data.partition import Partitioning, partition_labels

__all__ = ["DATASET_LOADERS", "DataSplit", "load_dataset", "Partitioning", "partition_labels"]
