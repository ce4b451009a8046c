"""Local training and evaluation: plain PyTorch, shared by clients, the server and the oracle."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from fedunlearn.errors import ConfigError


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", requested, ("auto", "cpu"), reason="no CUDA device on this node")
    if requested not in ("cpu", "cuda"):
        raise ConfigError("device", requested, ("auto", "cpu", "cuda"))
    return torch.device(requested)


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from the run seed and a context (round, client, purpose).

    Python's ``hash`` is salted per process, so Ray workers would disagree; a digest does not.
    """
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def objective(model: nn.Module, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy plus the model's own regulariser (the L2 term of ``logreg``)."""
    loss = F.cross_entropy(logits, targets)
    regularizer = getattr(model, "regularizer", None)
    return loss + regularizer() if callable(regularizer) else loss


@dataclass(frozen=True)
class LocalTrainingConfig:
    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.0


def train_local(
    model: nn.Module,
    data: Dataset,
    settings: LocalTrainingConfig,
    device: torch.device,
    seed: int,
) -> float:
    """Local SGD on one client's data; returns the mean training loss of the last epoch."""
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=settings.batch_size, shuffle=True, generator=generator)
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum)
    last_epoch_loss = float("nan")
    for _ in range(settings.epochs):
        total, count = 0.0, 0
        for inputs, targets in loader:
            inputs, targets = inputs.to(device), targets.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = objective(model, model(inputs), targets)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(targets)
            count += len(targets)
        last_epoch_loss = total / max(count, 1)
    if last_epoch_loss != last_epoch_loss:  # NaN: training diverged; say so instead of averaging garbage
        raise FloatingPointError("local training diverged (loss is NaN); lower 'lr'")
    return last_epoch_loss


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, device: torch.device, batch_size: int = 512) -> dict[str, float]:
    """Mean cross-entropy (without regulariser) and accuracy."""
    model.to(device).eval()
    total_loss, correct, count = 0.0, 0, 0
    for inputs, targets in DataLoader(data, batch_size=batch_size):
        inputs, targets = inputs.to(device), targets.to(device)
        logits = model(inputs)
        total_loss += F.cross_entropy(logits, targets, reduction="sum").item()
        correct += (logits.argmax(dim=1) == targets).sum().item()
        count += len(targets)
    return {"loss": total_loss / max(count, 1), "accuracy": correct / max(count, 1)}
