"""HF-KCU (Hessian-Free Krylov Causal Unlearning), the paper's client-side method.

Each affected client solves (H_k + λI) x = ∇L_k(θ*) by conjugate gradient on Hessian- (or GGN-)
vector products of its *own* data — the only curvature a client holds — and sends
Δ_k = n_k/(n − n_K) · x. Causal weights and adaptive scaling are applied by the server.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from fedunlearn.curvature import Batches
from fedunlearn.unlearning.base import ClientUpdate
from fedunlearn.unlearning.influence import influence_step


class HFKCU:
    name = "hf-kcu"
    runs_on = "client"
    # The paper's adaptive scaling (eq. 21) is part of HF-KCU; the strategy applies it on request.
    uses_adaptive_scaling = True

    def solve(self, model: nn.Module, forget_batches: Batches, influence_weight: float, config: dict[str, Any]) -> ClientUpdate:
        update, _ = influence_step(model, forget_batches, influence_weight, config, solver="cg")
        return update
