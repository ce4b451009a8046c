"""Model registry: ``build_model("simple-cnn", input_shape, num_classes)``.

One module per architecture; adding a model is one new file and one line in ``MODEL_BUILDERS``.
Input shape and class count always come from the data set, never from the model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from fedunlearn.errors import ConfigError
from fedunlearn.models.logreg import LogisticRegression
from fedunlearn.models.resnet import build_resnet18
from fedunlearn.models.simple_cnn import SimpleCNN
from fedunlearn.models.vit_lite import ViTLite

InputShape = tuple[int, int, int]

MODEL_BUILDERS: dict[str, Callable[[InputShape, int], nn.Module]] = {
    "logreg": LogisticRegression,
    "simple-cnn": SimpleCNN,
    "resnet18": build_resnet18,
    "vit-lite": ViTLite,
}


def build_model(name: str, input_shape: InputShape, num_classes: int) -> nn.Module:
    try:
        builder = MODEL_BUILDERS[name]
    except KeyError:
        raise ConfigError("model", name, sorted(MODEL_BUILDERS)) from None
    return builder(tuple(input_shape), int(num_classes))


def l2_penalty(model: nn.Module) -> float:
    """The L2 coefficient a model carries into its training objective (0 for most)."""
    return float(getattr(model, "l2", 0.0))


__all__ = ["MODEL_BUILDERS", "build_model", "l2_penalty", "InputShape"]
