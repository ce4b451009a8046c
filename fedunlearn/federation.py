"""What the server and every client agree on for one run, rebuilt from the run config alone.

Both sides call :func:`build_federation` with the same config and get the same data, partitions
and model shape; nothing is shipped between them but model arrays and small records.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import Subset

from fedunlearn.data import DataSplit, Partitioning, load_dataset, partition_labels
from fedunlearn.data.backdoor import poison_rows, poisoned_train_set, trigger_for
from fedunlearn.errors import ConfigError
from fedunlearn.models import build_model
from fedunlearn.training import LocalTrainingConfig, derive_seed


@dataclass(frozen=True)
class Federation:
    config: dict[str, Any]
    data: DataSplit
    partitioning: Partitioning

    def new_model(self) -> nn.Module:
        return build_model(self.config["model"], self.data.input_shape, self.data.num_classes)

    def initial_model(self) -> nn.Module:
        """The round-0 global model: the same weights for every run with this seed."""
        torch.manual_seed(derive_seed(self.config["seed"], "init"))
        return self.new_model()

    def client_data(self, client: int) -> Subset:
        return Subset(self.data.train, self.partitioning.rows_of(client).tolist())

    @property
    def local_training(self) -> LocalTrainingConfig:
        return LocalTrainingConfig(
            epochs=self.config["local-epochs"],
            batch_size=self.config["batch-size"],
            lr=self.config["lr"],
            momentum=self.config["momentum"],
        )


def build_federation(config: dict[str, Any], num_partitions: int | None = None) -> Federation:
    data = load_dataset(config["dataset"], config["data-dir"], config["download"], config["mnist1d-samples"])
    partitioning = partition_labels(
        data.train_labels,
        num_clients=num_partitions or config["num-clients"],
        scheme=config["partition"],
        alpha=config["dirichlet-alpha"],
        min_size=config["min-partition-size"],
        seed=config["seed"],
    )
    if config["backdoor-client"] >= 0:
        data = _with_backdoor(config, data, partitioning)
    return Federation(config=config, data=data, partitioning=partitioning)


def _with_backdoor(config: dict[str, Any], data: DataSplit, partitioning: Partitioning) -> DataSplit:
    """The malicious client's share of the training set, poisoned (every party derives the same)."""
    trigger = trigger_for(config, data.train.tensors[0])
    if not 0 <= config["target-class"] < data.num_classes:
        raise ConfigError("target-class", config["target-class"], f"0..{data.num_classes - 1}")
    rows = poison_rows(
        partitioning.rows_of(config["backdoor-client"]), config["poison-fraction"], derive_seed(config["seed"], "backdoor")
    )
    train = poisoned_train_set(data.train, rows, trigger, config["target-class"])
    return replace(data, train=train)
