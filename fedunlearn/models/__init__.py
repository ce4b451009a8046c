"""Model registry: ``build_model("simple-cnn", input_shape, num_classes)``.

One module per architecture; adding a model is one new file and one line in ``MODEL_BUILDERS``
(plus one in ``IMAGE_ONLY`` if it needs 2-D images). Input shape and class count always come from
the data set, never from the model: (channels, height, width) for images, (channels, length) for
1-D signals.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch.nn as nn

from fedunlearn.errors import ConfigError
from fedunlearn.models.cnn1d import CNN1D
from fedunlearn.models.logreg import LogisticRegression
from fedunlearn.models.resnet import build_resnet18
from fedunlearn.models.simple_cnn import SimpleCNN, build_simple_cnn_wide
from fedunlearn.models.vit_lite import ViTLite

InputShape = tuple[int, ...]

MODEL_BUILDERS: dict[str, Callable[[InputShape, int], nn.Module]] = {
    "logreg": LogisticRegression,
    "simple-cnn": SimpleCNN,
    "simple-cnn-wide": build_simple_cnn_wide,
    "resnet18": build_resnet18,
    "vit-lite": ViTLite,
    "cnn1d": CNN1D,
}
# Run-config keys a model's builder takes, as {model: {run-config key: builder keyword}};
# :func:`model_options` picks them from a config (the federation builds every model with them).
MODEL_OPTIONS: dict[str, dict[str, str]] = {
    "logreg": {"l2-bias": "l2_bias"},
}
# Models built from 2-D convolutions or patches over (height, width); the rest flatten or read a sequence.
IMAGE_ONLY = frozenset({"simple-cnn", "simple-cnn-wide", "resnet18", "vit-lite"})


def models_for(input_shape: InputShape) -> list[str]:
    """The registered models that accept inputs of this shape."""
    is_signal = len(input_shape) == 2
    return sorted(name for name in MODEL_BUILDERS if not (is_signal and name in IMAGE_ONLY))


def model_options(name: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """The builder keywords of model ``name`` that ``config`` sets (:data:`MODEL_OPTIONS`)."""
    return {keyword: config[key] for key, keyword in MODEL_OPTIONS.get(name, {}).items() if key in config}


def build_model(name: str, input_shape: InputShape, num_classes: int, **options: Any) -> nn.Module:
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
    return builder(input_shape, int(num_classes), **options)


__all__ = ["MODEL_BUILDERS", "MODEL_OPTIONS", "IMAGE_ONLY", "build_model", "model_options", "models_for", "InputShape"]
