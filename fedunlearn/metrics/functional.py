"""How close a model is to the retrained one: accuracy, output divergence, weight distance, CF.

Every function here is deterministic: no sampling, models evaluated in eval mode without gradients.
Definitions (reconstructed from the HF-KCU paper, whose formulas were lost in extraction) are in
``docs/metrics.md``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from fedunlearn.training import batch_outputs

# Below this |Acc(original) - Acc(retrain)| (a fraction, 1e-3 = 0.1 percentage point) CF is noise
# divided by noise; the paper's own denominator was 0.0097 (§5.3, App. A.11).
CF_MIN_DENOMINATOR = 1e-3


def _require_examples(dataset: Dataset, name: str) -> None:
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty: there is nothing to evaluate the model on")


@torch.no_grad()
def model_outputs(
    model: nn.Module, dataset: Dataset, device: torch.device | str = "cpu", batch_size: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N x C, float32, on the CPU) and labels (N, int64) of ``dataset`` in its own order.

    The model is put in eval mode for the pass (dropout off, batch norm uses running statistics)
    and put back in the mode it was in, so a caller mid-training is not surprised.
    """
    _require_examples(dataset, "dataset")
    device = torch.device(device)
    was_training = model.training
    model.to(device).eval()
    logits, labels = [], []
    try:
        for batch_logits, targets in batch_outputs(model, dataset, device, batch_size):
            logits.append(batch_logits.float().cpu())
            labels.append(targets.cpu())
    finally:
        model.train(was_training)
    return torch.cat(logits), torch.cat(labels).long()


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction (0..1) of examples whose arg-max logit is the label."""
    if len(labels) == 0:
        raise ValueError("accuracy of zero examples is undefined")
    return float((logits.argmax(dim=1) == labels).double().mean())


def _check_same_shape(logits: torch.Tensor, reference_logits: torch.Tensor) -> None:
    if logits.shape != reference_logits.shape or logits.ndim != 2 or len(logits) == 0:
        raise ValueError(
            f"need two non-empty N x C logit matrices of one shape, got {tuple(logits.shape)} "
            f"and {tuple(reference_logits.shape)}"
        )


def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over examples of KL(p_reference || p_model) in nats (>= 0).

    The reference (the retrained model) is the "true" distribution: the divergence weighs each
    class by how likely retraining thinks it is, and is large where the model under test puts
    little mass on classes retraining predicts.
    """
    _check_same_shape(logits, reference_logits)
    # float64 log-softmax: differences of near-equal log-probabilities are what is being summed.
    log_p = F.log_softmax(reference_logits.double(), dim=1)
    log_q = F.log_softmax(logits.double(), dim=1)
    per_example = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    return max(float(per_example.mean()), 0.0)  # rounding can leave -1e-17 for identical models


def logit_mse(logits: torch.Tensor, reference_logits: torch.Tensor) -> float:
    """Mean over examples and classes of (z_model - z_reference)^2, in squared logit units.

    Logits are compared raw (not centred): a constant shift of all logits changes no prediction
    but is counted; the paper's definition does the same.
    """
    _check_same_shape(logits, reference_logits)
    return float((logits.double() - reference_logits.double()).pow(2).mean())


def prediction_agreement(logits: torch.Tensor, reference_logits: torch.Tensor) -> float:
    """Fraction (0..1) of examples on which both models predict the same class."""
    _check_same_shape(logits, reference_logits)
    return float((logits.argmax(dim=1) == reference_logits.argmax(dim=1)).double().mean())


def _floating_tensors(model: nn.Module, include_buffers: bool) -> dict[str, torch.Tensor]:
    tensors = dict(model.named_parameters())
    if include_buffers:
        tensors.update((name, buffer) for name, buffer in model.named_buffers() if buffer.is_floating_point())
    return tensors


@torch.no_grad()
def parameter_gap(model: nn.Module, reference: nn.Module, include_buffers: bool = False) -> float:
    """Normalised distance ||theta_model - theta_reference||_2 / ||theta_reference||_2 (unitless).

    Over all learnable parameters, flattened into one vector. Buffers (batch-norm running
    statistics) are left out by default: they are not weights any method updates by gradient, and
    running variances near 1 would dominate the norm of small models.
    """
    mine = _floating_tensors(model, include_buffers)
    theirs = _floating_tensors(reference, include_buffers)
    if mine.keys() != theirs.keys():
        differing = sorted(mine.keys() ^ theirs.keys())
        raise ValueError(f"models differ in their parameters {differing[:5]}: not the same architecture")
    squared_gap, squared_norm = 0.0, 0.0
    for name, reference_tensor in theirs.items():
        if mine[name].shape != reference_tensor.shape:
            shapes = f"{tuple(mine[name].shape)} vs {tuple(reference_tensor.shape)}"
            raise ValueError(f"parameter {name!r} has shape {shapes}: not the same architecture")
        reference64 = reference_tensor.detach().double().cpu()
        squared_gap += float((mine[name].detach().double().cpu() - reference64).pow(2).sum())
        squared_norm += float(reference64.pow(2).sum())
    if squared_norm == 0.0:
        raise ValueError("the reference model's parameters are all zero: a relative gap is undefined")
    return math.sqrt(squared_gap / squared_norm)


def causal_faithfulness(
    original_accuracy: float,
    unlearned_accuracy: float,
    retrain_accuracy: float,
    min_denominator: float = CF_MIN_DENOMINATOR,
) -> float:
    """CF = (Acc(original) - Acc(unlearned)) / (Acc(original) - Acc(retrain)), test accuracies.

    1 means the unlearned model lost exactly as much test accuracy as retraining did, 0 that it
    lost none. Returns NaN (written as null) when |denominator| < ``min_denominator``: the ratio is
    then dominated by evaluation noise, and is undefined at 0 (paper §5.3, App. A.11).
    Accuracies are fractions in [0, 1]; ``min_denominator`` is in the same unit.
    """
    named = (("original", original_accuracy), ("unlearned", unlearned_accuracy), ("retrain", retrain_accuracy))
    for name, value in named:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} accuracy must be a fraction in [0, 1], got {value!r}")
    denominator = original_accuracy - retrain_accuracy
    if abs(denominator) < min_denominator:
        return math.nan
    return (original_accuracy - unlearned_accuracy) / denominator

