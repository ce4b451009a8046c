"""Causal weighting (HF-KCU eq. 7, Prop. 6) and adaptive scaling (eq. 21), as reconstructed in docs/methods.md."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor


def causal_weights(forget_gradient_norms: Mapping[int, float], affected: Sequence[int], all_clients: Sequence[int]) -> dict[int, float]:
    """w_k = 0 for clients without deleted data; for affected clients, proportional to ‖∇L(D_f,k)‖.

    Normalised to mean 1 over the affected clients (Σ w_k = |K|), so a single affected client gets
    weight 1 and the influence step keeps the magnitude its derivation gives.
    """
    affected_set = set(affected)
    weights = {client: 0.0 for client in all_clients if client not in affected_set}
    total = sum(forget_gradient_norms[client] for client in affected)
    for client in affected:
        if total > 0 and math.isfinite(total):
            weights[client] = len(affected) * forget_gradient_norms[client] / total
        else:
            weights[client] = 1.0
    return weights


def adaptive_scale(update: Sequence[Tensor], scaling_constant: float) -> float:
    """s = min(1, c / ‖Δ‖₂): bounds one unlearning step the way a trust region would; c ≤ 0 turns it off."""
    if scaling_constant <= 0:
        return 1.0
    norm = math.sqrt(sum(float(torch.sum(part.double() ** 2)) for part in update))
    return 1.0 if norm <= scaling_constant else scaling_constant / norm
