"""Server-side methods: the server computes the step from the remaining clients' objective.

The remaining clients are seen only through ``query.*`` rounds (``port.remaining_objective``);
``server_step`` returns Δ and what it cost, and θ_u = θ* + Δ. The same ``server_step`` runs on an
in-process objective (``fedunlearn.unlearning.remaining``) in tests and studies.
"""

from __future__ import annotations

import torch.nn as nn

from fedunlearn.unlearning.api import Deletion, FederationPort, Method, Outcome, RemainingClients, ServerUpdate, with_delta


class ServerSideMethod(Method):
    def unlearn(self, port: FederationPort, deletion: Deletion) -> Outcome:
        remaining = port.remaining(deletion)
        model = port.new_model()
        model.load_state_dict(deletion.trained_state)
        update = self.server_step(model, port.remaining_objective(remaining, deletion.trained_state))
        return Outcome(
            state=with_delta(deletion.trained_state, update.param_names, update.delta),
            affected_clients=sorted(deletion.forget_clients),
            communication_rounds=update.communication_rounds,
            epsilon=update.epsilon,
            details={"server": update.diagnostics, "queried_clients": remaining},
        )

    def server_step(self, model: nn.Module, remaining: RemainingClients) -> ServerUpdate:
        raise NotImplementedError
