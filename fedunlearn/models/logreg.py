"""Multinomial logistic regression: the convex model.

The training objective is mean cross-entropy plus (λ/2)‖W‖² (and + (λ/2)‖b‖² with ``l2_bias``).
The cross-entropy is convex in (W, b) but unchanged when the same constant is added to every bias,
so without the bias penalty the objective is strongly convex in W only and its optima need not be
unique in b. With ``l2_bias`` (run-config ``l2-bias = true``) the whole objective is λ-strongly
convex: every remaining objective has one minimiser, and ‖θ − θ_r*‖ ≤ ‖∇L_r(θ)‖ / λ for every θ,
which the release certificate (``fedunlearn/unlearning/certify.py``) uses.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

DEFAULT_L2 = 1e-3


class LogisticRegression(nn.Module):
    """Linear map from the flattened input (pixels or signal samples) to class logits.

    ``l2`` is the coefficient λ of the penalty (λ/2)‖W‖² that the training objective adds, on the
    bias too when ``l2_bias``; it lives on the model so every trainer and every curvature
    computation sees the same objective.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, l2: float = DEFAULT_L2, l2_bias: bool = False):
        super().__init__()
        self.input_features = math.prod(input_shape)
        self.linear = nn.Linear(self.input_features, num_classes)
        self.l2 = float(l2)
        self.l2_bias = bool(l2_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(start_dim=1))

    def regularizer(self) -> torch.Tensor:
        if not self.l2_bias:
            return 0.5 * self.l2 * self.linear.weight.pow(2).sum()
        return 0.5 * self.l2 * (self.linear.weight.pow(2).sum() + self.linear.bias.pow(2).sum())

    def strong_convexity(self) -> float:
        """μ such that mean cross-entropy + :meth:`regularizer` is μ-strongly convex in every
        parameter: λ with the bias penalised, else 0 (the objective is flat along a shift of all biases)."""
        return self.l2 if self.l2_bias else 0.0
