"""A backdoor for the case study (HF-KCU paper §5.4): one malicious client stamps a trigger — a
square of the data set's brightest pixel value — on a fraction of its images and relabels them to a
target class. The attack success rate (ASR) is the fraction of triggered test images whose true class
is not the target that the model classifies as the target.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedunlearn.errors import ConfigError
from fedunlearn.training import streamed_accuracy

POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left")


@dataclass(frozen=True)
class Trigger:
    size: int
    position: str
    value: float

    def stamp(self, images: torch.Tensor) -> torch.Tensor:
        stamped = images.clone()
        if images.ndim == 3:  # a batch of 1-D signals (mnist1d): the trigger is a run of samples at one end
            length = images.shape[-1]
            if not 1 <= self.size <= length:
                raise ConfigError("trigger-size", self.size, f"1..{length} for signals of length {length}")
            run = slice(length - self.size, length) if self.position.endswith("right") else slice(0, self.size)
            stamped[..., run] = self.value
            return stamped
        height, width = images.shape[-2:]
        if not 1 <= self.size <= min(height, width):
            raise ConfigError("trigger-size", self.size, f"1..{min(height, width)} for {height}x{width} images")
        rows = slice(height - self.size, height) if self.position.startswith("bottom") else slice(0, self.size)
        cols = slice(width - self.size, width) if self.position.endswith("right") else slice(0, self.size)
        stamped[..., rows, cols] = self.value
        return stamped


def trigger_for(config: dict, train_images: torch.Tensor) -> Trigger:
    if config["trigger-position"] not in POSITIONS:
        raise ConfigError("trigger-position", config["trigger-position"], POSITIONS)
    return Trigger(int(config["trigger-size"]), config["trigger-position"], float(train_images.max()))


def poison_rows(client_rows: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    count = int(round(fraction * len(client_rows)))
    chosen = np.random.default_rng(seed).choice(len(client_rows), size=count, replace=False)
    return np.sort(client_rows[chosen])


def poisoned_train_set(train: TensorDataset, rows: np.ndarray, trigger: Trigger, target_class: int) -> TensorDataset:
    images, labels = (tensor.clone() for tensor in train.tensors)
    index = torch.as_tensor(rows, dtype=torch.long)
    images[index] = trigger.stamp(images[index])
    labels[index] = target_class
    return TensorDataset(images, labels)


def triggered_test_set(test: TensorDataset, trigger: Trigger, target_class: int) -> TensorDataset:
    """Test images whose true class is not the target, with the trigger stamped; labels are the true classes."""
    images, labels = test.tensors
    keep = labels != target_class
    return TensorDataset(trigger.stamp(images[keep]), labels[keep])


def attack_success_rate(model: torch.nn.Module, triggered: TensorDataset, target_class: int, device: torch.device) -> float:
    """Fraction of ``triggered`` the model classifies as ``target_class`` (0 for an empty set)."""
    model.eval()
    # Slices, not a DataLoader: a DataLoader draws from torch's global generator on every pass.
    images, labels = triggered.tensors
    batches = [(images[start : start + 512], labels[start : start + 512]) for start in range(0, len(images), 512)]
    return streamed_accuracy(model, batches, device, target_class=target_class)
