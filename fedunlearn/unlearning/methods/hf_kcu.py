"""HF-KCU (Hessian-Free Krylov Causal Unlearning), the paper's client-side method.

Each affected client solves (H_k + λI) x = ∇L_k(θ*) by conjugate gradient on Hessian- (or GGN-)
vector products of its *own* data — the only curvature a client holds — and sends
Δ_k = n_k/(n − n_K) · x. The server applies causal weights and the adaptive scaling (eq. 21).
"""

from __future__ import annotations

import torch.nn as nn

from fedunlearn.config import ConfigKey, non_negative_float
from fedunlearn.unlearning.api import ClientContext, ClientUpdate
from fedunlearn.unlearning.client_side import ClientSideMethod
from fedunlearn.unlearning.influence import influence_step
from fedunlearn.unlearning.registry import register


@register("hf-kcu")
class HFKCU(ClientSideMethod):
    summary = "CG on the affected client's damped Hessian/GGN, causal weights, adaptive scaling"
    adaptive_scaling = True
    config_keys = (
        ConfigKey("scaling-constant", 1.0, "HF-KCU's adaptive scaling (eq. 21, reconstructed): a client update longer than this (L2 norm) is shortened to it; 0 disables.", check=non_negative_float),
        ConfigKey("causal-weighting", "on", "HF-KCU's causal weights (eq. 7) on the affected clients' updates, proportional to their forget-gradient norms; off: equal weights (the paper's ablation).", choices=("on", "off")),
    )

    def solve(self, model: nn.Module, forget_batches, context: ClientContext) -> ClientUpdate:
        update, _ = influence_step(model, forget_batches, context.influence_weight, self.config, solver="cg")
        return update
