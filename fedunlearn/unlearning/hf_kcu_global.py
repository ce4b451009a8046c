"""HF-KCU-global (ours, beyond the paper): a Newton step on the *remaining* clients' objective.

The server runs CG itself. Every product (H_rem + λI) v costs one federated round in which each
remaining client returns its local H_j v; one more round gathers their gradients g_j(θ*). With
q_j = n_j / Σ_{remaining} n_i (docs/methods.md, eq. M5):

    θ_u = θ* − (Σ_j q_j H_j + λI)⁻¹ Σ_j q_j ∇L_j(θ*).

On a strongly convex objective (logreg with L2) this lands on the retrained optimum up to the
Newton step's second-order error; the price is k + 1 communication rounds for k CG iterations.
"""

from __future__ import annotations

import time
from typing import Any

import torch.nn as nn

from fedunlearn.curvature import NegativeCurvatureError, conjugate_gradient, flatten, resolve_param_names, unflatten
from fedunlearn.curvature.cg import DAMPING_GROWTH, DAMPING_RETRIES
from fedunlearn.unlearning.base import RemainingClients, ServerUpdate


class HFKCUGlobal:
    name = "hf-kcu-global"
    runs_on = "server"

    def solve(self, model: nn.Module, remaining: RemainingClients, config: dict[str, Any]) -> ServerUpdate:
        start = time.perf_counter()
        names = resolve_param_names(model)
        like = [dict(model.named_parameters())[name].detach() for name in names]
        rounds = 1
        gradient = remaining.gradient(names)
        right_hand_side = -flatten(gradient)
        damping, curvature = float(config["damping"]), config["curvature"]
        attempts = []
        while True:
            def damped_product(flat_vector, damping=damping, curvature=curvature):
                nonlocal rounds
                rounds += 1
                product = remaining.curvature_product(names, unflatten(flat_vector, like), curvature)
                return flatten(product) + damping * flat_vector

            result = conjugate_gradient(damped_product, right_hand_side, int(config["cg-iters"]), float(config["cg-tol"]))
            attempts.append(
                {"curvature": curvature, "damping": damping, "iterations": result.iterations, "stop_reason": result.stop_reason,
                 "negative_curvature_value": result.negative_curvature_value}
            )
            retry = self._after_negative_curvature(result, config["negative-curvature"], curvature, damping, len(attempts))
            if retry is None:
                break
            curvature, damping = retry
        delta = unflatten(result.solution, like)
        diagnostics = {
            "solver": "cg (server, remaining clients' curvature)",
            "curvature": curvature,
            "damping": damping,
            "cg_iterations": result.iterations,
            "cg_stop_reason": result.stop_reason,
            "cg_residual_history": [float(r) for r in result.residual_norms],
            "attempts": attempts,
            "remaining_gradient_norm": float(flatten(gradient).norm()),
            "seconds": time.perf_counter() - start,
        }
        return ServerUpdate(param_names=names, delta=delta, communication_rounds=rounds, diagnostics=diagnostics)

    @staticmethod
    def _after_negative_curvature(result, policy: str, curvature: str, damping: float, attempt: int) -> tuple[str, float] | None:
        """The same policies as the client-side CG (curvature core): what to try next, or None to stop."""
        if not result.negative_curvature or policy == "stop":
            return None
        if policy == "raise":
            raise NegativeCurvatureError(
                f"CG on the remaining clients' {curvature} met curvature {result.negative_curvature_value:.3g} <= 0 "
                f"(damping {damping:g}); raise 'damping' or set curvature = ggn"
            )
        if policy == "ggn" and curvature == "hessian":
            return "ggn", damping
        if policy == "damping" and attempt <= DAMPING_RETRIES:
            return curvature, damping * DAMPING_GROWTH
        return None
