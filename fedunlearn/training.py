"""Local training and evaluation: plain PyTorch, shared by clients, the server and the oracle."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
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


def round_lr(lr: float, decay: float, server_round: int) -> float:
    """The local learning rate of round ``server_round``: ``lr * decay**(t - 1)`` for round t = 1, 2, ...

    Rounds after the last training round (fine-tuning's T+1, T+2, ...) go on decaying; FedEraser's
    calibration of stored round t is numbered t, so it trains at round t's rate.
    """
    if server_round < 1:
        raise ValueError(f"server rounds start at 1, got {server_round}")
    return lr * decay ** (server_round - 1)


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


# A model, or any function from a batch of inputs to its logits (N x C) or predicted classes (N).
Predict = Callable[[torch.Tensor], torch.Tensor]
# A data set, or already a sequence of (inputs, targets) batches.
Examples = Dataset | Iterable[tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def batch_outputs(
    predict: Predict, data: Examples, device: torch.device | str | None = None, batch_size: int = 512
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(predict(inputs), targets)`` for every batch of ``data``, in its own order, without gradients.

    ``data`` is a data set (cut into batches of ``batch_size`` by a DataLoader, which draws one
    number from torch's global generator per pass) or already a sequence of ``(inputs, targets)``
    batches (no draw). Inputs and targets go to ``device`` (None: they stay where they
    are). ``predict`` is a model (logits) or any function of a batch, e.g. an ensemble's vote; the
    caller puts the model on the device and in the mode it wants. This is the one evaluation loop:
    :func:`loss_and_accuracy`, :func:`streamed_accuracy` and ``metrics.model_outputs`` reduce it.
    """
    batches = DataLoader(data, batch_size=batch_size, shuffle=False) if isinstance(data, Dataset) else data
    for inputs, targets in batches:
        if device is not None:
            inputs, targets = inputs.to(device), targets.to(device)
        yield predict(inputs), targets


@torch.no_grad()
def loss_and_accuracy(model: nn.Module, data: Dataset, device: torch.device, batch_size: int = 512) -> dict[str, float]:
    """Mean cross-entropy (without regulariser) and accuracy; leaves the model in eval mode."""
    model.to(device).eval()
    total_loss, correct, count = 0.0, 0, 0
    for logits, targets in batch_outputs(model, data, device, batch_size):
        total_loss += F.cross_entropy(logits, targets, reduction="sum").item()
        correct += (logits.argmax(dim=1) == targets).sum().item()
        count += len(targets)
    return {"loss": total_loss / max(count, 1), "accuracy": correct / max(count, 1)}


@torch.no_grad()
def streamed_accuracy(
    predict: Predict, data: Examples, device: torch.device | str | None = None, batch_size: int = 512,
    target_class: int | None = None,
) -> float:
    """Fraction (0..1; 0 for no examples) of examples whose predicted class is their label, or
    ``target_class`` when given (a backdoor's success rate), over :func:`batch_outputs`.

    ``predict`` returns logits (N x C: the arg-max is the prediction) or predicted classes (N).
    It does not touch the model's mode or device: set them first (``model.eval()``).
    """
    hits, total = 0, 0
    for outputs, targets in batch_outputs(predict, data, device, batch_size):
        predictions = outputs.argmax(dim=1) if outputs.ndim == 2 else outputs
        hits += int((predictions == (targets if target_class is None else target_class)).sum())
        total += len(targets)
    return hits / max(total, 1)
