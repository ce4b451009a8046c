"""TensorUnlearn (the poster): a Newton step with the KFAC inverse of the training data's curvature,
MPO-compressed for wide factors.

The poster's factors are means over the N training examples, Â = (1/N) Σ aᵢaᵢᵀ + λI (and Ĝ alike).
Federated, the curvature that matters is the objective left after the deletion, so:

- each remaining client j returns its undamped factors (A_j, G_j) per layer (``query.kfac_factors``);
  both are example means, so the server's Σ_j q_j A_j (q_j = n_j / n_rem) equals the factors of the
  remaining clients' pooled data;
- each deleted client returns ∇L_k(θ*) (``query.gradient``); these two queries go to disjoint
  clients and do not depend on each other: one round;
- the server solves, per layer, with the forget gradient ∇L(D_f) = Σ_k (n_k / n_f) ∇L_k:

      θ_u = θ* + n_f / n_rem · Ĝ⁻¹ ∇_W L(D_f, θ*) Â⁻¹        (docs/methods.md, eq. M3 with KFAC)

``kfac`` solves each factor as ``factor-solver`` says (dense by default); ``kfac-mpo`` uses the MPO
(TT-SVD + ALS) inverse for factors wider than ``mpo-threshold``, as the poster does.
``kfac-forget`` keeps the variant that builds the factors from the deleted client's own data on that
client (no query to the remaining clients), for comparison.
"""

from __future__ import annotations

import time

import torch.nn as nn

from fedunlearn.curvature import Batches, KFACInverse, compute_kfac_factors, flatten, resolve_param_names
from fedunlearn.curvature.kfac import factors_to_arrays
from fedunlearn.curvature.settings import SolverSettings
from fedunlearn.unlearning.api import (
    ClientContext,
    ClientUpdate,
    Deletion,
    FederationPort,
    Method,
    Outcome,
    RemainingClients,
    Requirements,
    ServerUpdate,
    with_delta,
)
from fedunlearn.unlearning.client_side import ClientSideMethod
from fedunlearn.unlearning.influence import influence_step
from fedunlearn.unlearning.objective import regularizer_curvature
from fedunlearn.unlearning.registry import client_query, register


@client_query("kfac_factors")
def _kfac_factors_query(model: nn.Module, names, batches: Batches, message_config, vector):
    """``query.kfac_factors``: this client's undamped KFAC factors at the model sent, ``<layer>::A`` / ``::G``."""
    factors, _, _ = compute_kfac_factors(model, batches, names)
    return factors_to_arrays(factors)


class TensorUnlearn(Method):
    """The KFAC Newton step on the remaining clients' curvature, solved by the server."""

    factor_solver: str | None = None  # None: the run's factor-solver
    requirements = Requirements(client_queries=("kfac_factors", "gradient"))

    def unlearn(self, port: FederationPort, deletion: Deletion) -> Outcome:
        state = deletion.trained_state
        affected = sorted(deletion.forget_clients)
        remaining = port.remaining(deletion)
        model = port.new_model()
        model.load_state_dict(state)
        forgotten_examples = sum(port.clients[k].num_examples for k in affected)
        remaining_examples = sum(port.clients[k].num_examples for k in remaining)
        update = self.newton_step(
            model,
            remaining=port.remaining_objective(remaining, state),
            forgotten=port.remaining_objective(affected, state),
            influence_weight=forgotten_examples / remaining_examples,
        )
        return Outcome(
            state=with_delta(state, update.param_names, update.delta),
            affected_clients=affected,
            communication_rounds=update.communication_rounds,
            details={"server": update.diagnostics, "queried_clients": remaining},
        )

    def newton_step(
        self, model: nn.Module, remaining: RemainingClients, forgotten: RemainingClients, influence_weight: float
    ) -> ServerUpdate:
        """θ_u − θ* = ``influence_weight`` · (Ĝ ⊗ Â)⁻¹ ∇L(D_f): factors from ``remaining``, the
        (example-weighted) forget gradient from ``forgotten``. In-process objectives
        (``fedunlearn.unlearning.remaining``) run it without Flower."""
        start = time.perf_counter()
        names = resolve_param_names(model)
        factors = remaining.kfac_factors(names)
        forget_gradient = forgotten.gradient(names)
        # logreg's L2 curvature joins the damping: the factors are of the data loss only.
        settings = SolverSettings.from_config(self.config)
        settings = settings.replace(damping=settings.damping + regularizer_curvature(model))
        if self.factor_solver is not None:
            settings = settings.replace(factor_solver=self.factor_solver)
        inverse = KFACInverse.from_factors(factors, model, settings, names)
        delta = [influence_weight * part for part in inverse @ forget_gradient]
        diagnostics = dict(inverse.diagnostics)
        diagnostics.update(
            curvature_data="remaining clients (pooled KFAC factors)",
            influence_weight=influence_weight,
            forget_gradient_norm=float(flatten(forget_gradient).norm()),
            update_norm=float(flatten(delta).norm()),
            seconds=time.perf_counter() - start,
        )
        return ServerUpdate(param_names=names, delta=delta, communication_rounds=1, diagnostics=diagnostics)


@register("kfac")
class KFACUnlearn(TensorUnlearn):
    summary = "TensorUnlearn: server-side KFAC Newton step on the remaining clients' pooled factors (factor-solver per factor)"


@register("kfac-mpo")
class KFACMPOUnlearn(TensorUnlearn):
    summary = "TensorUnlearn with MPO (TT-SVD + ALS) inverses for factors wider than mpo-threshold"
    factor_solver = "mpo"


@register("kfac-forget")
class KFACForgetUnlearn(ClientSideMethod):
    """The KFAC step with factors of the deleted client's own data, solved on that client."""

    summary = "KFAC inverse of the deleted client's own data, on that client (the factors the poster does not use)"

    def solve(self, model: nn.Module, forget_batches: Batches, context: ClientContext) -> ClientUpdate:
        update, _ = influence_step(model, forget_batches, context.influence_weight, self.config, solver="kfac")
        return update
