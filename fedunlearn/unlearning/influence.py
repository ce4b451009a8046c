"""The client-side influence step shared by HF-KCU and TensorUnlearn.

Deleting client k from FedAvg's objective L = Σ_j p_j L_j (p_j = n_j / n) moves its optimum, to first
order, by (docs/methods.md, eq. M3; HF-KCU eqs. 3 and 33)

    Δ_k = n_k / (n − n_K) · (C + λI)⁻¹ ∇L_k(θ*),

with C the curvature the method can afford. HF-KCU and TensorUnlearn differ only in the inverse
operator: CG on Hessian/GGN products, or the KFAC (dense / MPO / Nyström) inverse.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn as nn

from fedunlearn.curvature import Batches, inverse_from_config, resolve_param_names
from fedunlearn.unlearning.api import ClientUpdate
from fedunlearn.unlearning.objective import count_examples, objective_gradient, regularizer_curvature


def norm_of(vectors) -> float:
    return math.sqrt(sum(float(torch.sum(v.double() ** 2)) for v in vectors))


def influence_step(
    model: nn.Module,
    forget_batches: Batches,
    influence_weight: float,
    config: dict[str, Any],
    solver: str,
) -> tuple[ClientUpdate, list[torch.Tensor]]:
    """Δ_k for ``solver`` (``cg``, ``kfac``, ``kfac-mpo``), with the client's own data as curvature.

    Returns the update and the forget gradient (TensorUnlearn's certificate needs it).
    """
    start = time.perf_counter()
    names = resolve_param_names(model)
    forget_gradient = objective_gradient(model, names, forget_batches)
    # The regulariser's curvature (logreg's L2) joins the damping: the products here are of the data loss.
    solver_config = dict(config, damping=config["damping"] + regularizer_curvature(model))
    inverse = inverse_from_config(model, forget_batches, solver_config, param_names=names, solver=solver)
    step = inverse @ forget_gradient
    delta = [influence_weight * part for part in step]
    diagnostics = dict(inverse.diagnostics)
    diagnostics["solve_seconds"] = time.perf_counter() - start
    update = ClientUpdate(
        param_names=names,
        delta=delta,
        forget_gradient_norm=norm_of(forget_gradient),
        num_forget_examples=count_examples(forget_batches),
        diagnostics=diagnostics,
    )
    return update, forget_gradient
