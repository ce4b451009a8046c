"""What the server and every client agree on for one run, rebuilt from the run config alone.

Both sides call :func:`build_federation` with the same config and get the same data, partitions
and model shape; nothing is shipped between them but model arrays and small records. The local
training settings of a round (:meth:`Federation.local_training_for`, the ``lr-decay`` schedule) are
derived from the config and the round number alone, too.
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
from fedunlearn.models import build_model, model_options
from fedunlearn.training import LocalTrainingConfig, derive_seed, round_lr


@dataclass(frozen=True)
class Federation:
    config: dict[str, Any]
    data: DataSplit
    partitioning: Partitioning

    def new_model(self) -> nn.Module:
        name = self.config["model"]
        return build_model(name, self.data.input_shape, self.data.num_classes, **model_options(name, self.config))

    def initial_model(self) -> nn.Module:
        """The round-0 global model: the same weights for every run with this seed."""
        torch.manual_seed(derive_seed(self.config["seed"], "init"))
        return self.new_model()

    def client_data(self, client: int) -> Subset:
        return Subset(self.data.train, self.partitioning.rows_of(client).tolist())

    @property
    def local_training(self) -> LocalTrainingConfig:
        """The local training settings of round 1 (every round's when ``lr-decay`` is 1)."""
        return LocalTrainingConfig(
            epochs=self.config["local-epochs"],
            batch_size=self.config["batch-size"],
            lr=self.config["lr"],
            momentum=self.config["momentum"],
        )

    @property
    def last_training_round(self) -> int:
        """The round the trained model θ* ends with: ``unlearn-after-round``, or ``num-rounds`` when 0."""
        return self.config["unlearn-after-round"] or self.config["num-rounds"]

    def local_training_for(self, server_round: int) -> LocalTrainingConfig:
        """The settings of the train message of ``server-round`` t: lr × lr-decay^(t−1)."""
        lr = round_lr(self.config["lr"], self.config["lr-decay"], server_round)
        return replace(self.local_training, lr=lr)


def build_federation(config: dict[str, Any], num_partitions: int | None = None) -> Federation:
    data = load_dataset(config["dataset"], config["data-dir"], config["download"], config["mnist1d-samples"])
    num_clients = num_partitions or config["num-clients"]
    exclusive_class = config["exclusive-class"]
    if not -1 <= exclusive_class < data.num_classes:
        raise ConfigError("exclusive-class", exclusive_class, f"-1 (off) or a class of {config['dataset']}: 0..{data.num_classes - 1}")
    partitioning = partition_labels(
        data.train_labels,
        num_clients=num_clients,
        scheme=config["partition"],
        alpha=config["dirichlet-alpha"],
        min_size=config["min-partition-size"],
        seed=config["seed"],
        holder=data_holder(config, num_clients),
        forget_share=config["forget-share"],
        exclusive_class=exclusive_class,
    )
    if config["backdoor-client"] >= 0:
        data = _with_backdoor(config, data, partitioning)
    return Federation(config=config, data=data, partitioning=partitioning)


def data_holder(config: dict[str, Any], num_clients: int) -> int:
    """The client ``forget-share`` / ``exclusive-class`` give their data to: the first of ``forget-clients``
    (0 when both are off, where it does not matter)."""
    if config["forget-share"] == 0 and config["exclusive-class"] < 0:
        return 0
    which = "forget-share" if config["forget-share"] > 0 else "exclusive-class"
    text = str(config["forget-clients"])
    first = next((part.strip() for part in text.split(",") if part.strip()), "")
    valid = f"a comma list of partition ids in 0..{num_clients - 1}, the first holding the data {which} sets aside"
    if not first:
        raise ConfigError("forget-clients", text, valid, reason=f"{which} needs a client to give its data to")
    try:
        holder = int(first)
    except ValueError:
        raise ConfigError("forget-clients", text, valid) from None
    if not 0 <= holder < num_clients:
        raise ConfigError("forget-clients", text, valid)
    return holder


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
