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

import torch.nn as nn

from fedunlearn.curvature import CGInverse, flatten, resolve_param_names, unflatten
from fedunlearn.curvature.settings import SolverSettings
from fedunlearn.unlearning.api import RemainingClients, Requirements, ServerUpdate
from fedunlearn.unlearning.objective import objective_curvature_product, objective_gradient
from fedunlearn.unlearning.server_side import ServerSideMethod
from fedunlearn.unlearning.registry import client_query, register


@client_query("gradient")
def _gradient_query(model: nn.Module, names, batches, message_config, vector):
    """``query.gradient``: ∇L_j(θ*) of this client's objective (the right-hand side)."""
    return objective_gradient(model, names, batches)


@client_query("curvature")
def _curvature_query(model: nn.Module, names, batches, message_config, vector):
    """``query.curvature``: H_j v or G_j v of this client's objective (one CG iteration)."""
    return objective_curvature_product(model, names, batches, vector, str(message_config["curvature"]))


@register("hf-kcu-global")
class HFKCUGlobal(ServerSideMethod):
    summary = "server-side CG on the remaining clients' damped curvature (one query round per product)"
    requirements = Requirements(client_queries=("gradient", "curvature"))

    def server_step(self, model: nn.Module, remaining: RemainingClients) -> ServerUpdate:
        """θ_u − θ* by CG over the remaining clients' damped curvature (one round per product)."""
        start = time.perf_counter()
        settings = SolverSettings.from_config(self.config)
        names = resolve_param_names(model)
        like = [dict(model.named_parameters())[name].detach() for name in names]
        gradient = remaining.gradient(names)  # round 1

        def product(curvature: str, flat_vector):  # one round per call
            return flatten(remaining.curvature_product(names, unflatten(flat_vector, like), curvature))

        inverse = CGInverse.from_callable(product, like, settings, param_names=names)
        delta = inverse @ [-g for g in gradient]
        cg = inverse.diagnostics
        diagnostics = {
            "solver": "cg (server, remaining clients' curvature)",
            "curvature": cg["curvature"],
            "damping": cg["damping"],
            "cg_iterations": cg["cg_iterations"],
            "cg_stop_reason": cg["stop_reason"],
            "cg_residual_history": cg["residual_history"],
            "attempts": cg["attempts"],
            "remaining_gradient_norm": float(flatten(gradient).norm()),
            "seconds": time.perf_counter() - start,
        }
        return ServerUpdate(param_names=names, delta=delta, communication_rounds=1 + cg["products"], diagnostics=diagnostics)
