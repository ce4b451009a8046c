"""Model registry: ``build_model("simple-cnn", input_shape, num_classes)``.

One module per architecture; adding a model is one new file and one line in ``MODEL_BUILDERS``
(plus one in ``IMAGE_ONLY`` if it needs 2-D images). Input shape and class count always come from
the data set, never from the model: (channels, height, width) for images, (channels, length) for
1-D signals.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from fedunlearn.errors import ConfigError
from fedunlearn.models.cnn1d import CNN1D
from fedunlearn.models.logreg import LogisticRegression
from fedunlearn.models.resnet import build_resnet18
from fedunlearn.models.simple_cnn import SimpleCNN
from fedunlearn.models.vit_lite import ViTLite

InputShape = tuple[int, ...]

MODEL_BUILDERS: dict[str, Callable[[InputShape, int], nn.Module]] = {
    "logreg": LogisticRegression,
    "simple-cnn": SimpleCNN,
    "resnet18": build_resnet18,
    "vit-lite": ViTLite,
    "cnn1d": CNN1D,
}
# Models built from 2-D convolutions or patches over (height, width); the rest flatten or read a sequence.
IMAGE_ONLY = frozenset({"simple-cnn", "resnet18", "vit-lite"})


def models_for(input_shape: InputShape) -> list[str]:
    """The registered models that accept inputs of this shape."""
    is_signal = len(input_shape) == 2
    return sorted(name for name in MODEL_BUILDERS if not (is_signal and name in IMAGE_ONLY))


def build_model(name: str, input_shape: InputShape, num_classes: int) -> nn.Module:
    try:
        builder = MODEL_BUILDERS[name]
    except KeyError:
        raise ConfigError("model", name, sorted(MODEL_BUILDERS)) from None
    input_shape = tuple(int(size) for size in input_shape)
    if name not in models_for(input_shape):
        raise ConfigError(
            "model",
            name,
            models_for(input_shape),
            reason=f"it needs 2-D images; the data set gives 1-D signals of shape {input_shape}",
        )
    return builder(input_shape, int(num_classes))


__all__ = ["MODEL_BUILDERS", "IMAGE_ONLY", "build_model", "models_for", "InputShape"]
