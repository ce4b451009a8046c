"""Client-side methods: the affected clients solve, the server weighs and adds their updates.

``train.unlearn`` goes only to the clients that held the deleted data (causal routing). Each runs
:meth:`Method.solve` on its own data and sends Δ_k with ‖∇L(D_f,k)‖; the server forms

    θ_u = θ* + Σ_{k affected} s_k w_k Δ_k

with causal weights w_k (HF-KCU eq. 7) and, for methods that ask for it, adaptive scaling s_k (eq. 21).
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import torch

from fedunlearn.unlearning.api import UNLEARN, Deletion, FederationPort, Method, Outcome, Requirements, with_delta
from fedunlearn.unlearning.causal import adaptive_scale, causal_weights


class ClientSideMethod(Method):
    requirements: ClassVar[Requirements] = Requirements(client_solve=True)
    # HF-KCU's adaptive scaling (eq. 21): the server shortens each weighted update to `scaling-constant`.
    adaptive_scaling: ClassVar[bool] = False

    def unlearn(self, port: FederationPort, deletion: Deletion) -> Outcome:
        state = deletion.trained_state
        affected = sorted(deletion.forget_clients)
        total_examples = sum(info.num_examples for info in port.clients.values())
        forgotten_examples = sum(port.clients[k].num_examples for k in affected)
        config = {
            "method": self.name,
            # One record goes to every affected client; each multiplies by its own n_k
            # to get its influence weight n_k / (n − n_K).
            "influence-weight-per-example": 1.0 / (total_examples - forgotten_examples),
            "num-total-examples": total_examples,
        }
        replies = port.send(UNLEARN, affected, {"arrays": state}, config)
        norms, deltas, client_details, epsilons = {}, {}, {}, []
        names: list[str] = []
        for partition, reply in replies.items():
            update = reply.arrays["update"]
            names = list(update)
            deltas[partition] = [update[name] for name in names]
            norms[partition] = float(reply.metrics["forget-gradient-norm"])
            details = json.loads(str(reply.info["diagnostics"]))
            if "epsilon" in reply.info:
                epsilons.append(float(reply.info["epsilon"]))
            client_details[partition] = {"seconds": float(reply.metrics["seconds"]), **details}
        # The ablation without causal weighting (HF-KCU Table 4): every affected client weighs 1.
        weighting = str(self.config.get("causal-weighting", "on"))
        if weighting == "on":
            weights = causal_weights(norms, affected, sorted(port.clients))
        else:
            weights = {client: float(client in affected) for client in sorted(port.clients)}
        total_delta = [torch.zeros_like(state[name]) for name in names]
        scales, norms_before_scaling = {}, {}
        scaling_constant = float(self.config["scaling-constant"]) if self.adaptive_scaling else 0.0
        for partition in affected:
            weighted = [weights[partition] * part for part in deltas[partition]]
            norms_before_scaling[partition] = float(torch.sqrt(sum((w.double() ** 2).sum() for w in weighted)))
            scales[partition] = adaptive_scale(weighted, scaling_constant) if self.adaptive_scaling else 1.0
            total_delta = [t + scales[partition] * w for t, w in zip(total_delta, weighted)]
        details: dict[str, Any] = {
            "causal_weighting": weighting,
            "causal_weights": {str(k): w for k, w in weights.items() if w},
            "adaptive_scales": {str(k): s for k, s in scales.items()},
            "update_norms_before_scaling": {str(k): n for k, n in norms_before_scaling.items()},
            "clients": {str(k): v for k, v in client_details.items()},
        }
        return Outcome(
            state=with_delta(state, names, total_delta),
            affected_clients=affected,
            communication_rounds=1,
            # Each affected client releases its own noisy update: their ε add up (basic composition).
            epsilon=sum(epsilons) if epsilons and len(epsilons) == len(affected) else None,
            details=details,
        )
