"""Multinomial logistic regression: the convex model.

With its L2 term the objective is strongly convex, so the full and the remaining objectives
have unique optima; later tests check unlearning against exactly retrained optima with it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

DEFAULT_L2 = 1e-3


class LogisticRegression(nn.Module):
    """Linear map from the flattened input (pixels or signal samples) to class logits.

    ``l2`` is the coefficient λ of the penalty (λ/2)‖W‖² (bias unpenalized) that the
    training objective adds; it lives on the model so every trainer and every curvature
    computation sees the same objective.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, l2: float = DEFAULT_L2):
        super().__init__()
        self.input_features = math.prod(input_shape)
        self.linear = nn.Linear(self.input_features, num_classes)
        self.l2 = float(l2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(start_dim=1))

    def regularizer(self) -> torch.Tensor:
        return 0.5 * self.l2 * self.linear.weight.pow(2).sum()
