"""Fine-tuning (SIFU's "fine-tuning" baseline; Fraboni et al. 2024): k FedAvg rounds on the remaining
clients, starting from the trained model θ*.

The deleted clients take no part; the rounds continue θ*'s numbering (the clients' shuffling seeds
are those of rounds T+1, …, T+k), sampled as ``fraction-train`` says with a generator of their own.
Fine-tuning removes the deleted data's influence only as far as k rounds of training on the rest
overwrite it: it has no guarantee, and is the baseline every approximate method must beat.
"""

from __future__ import annotations

from fedunlearn.config import ConfigKey, positive_int
from fedunlearn.training import derive_seed
from fedunlearn.unlearning.api import Deletion, FederationPort, Method, Outcome
from fedunlearn.unlearning.registry import register


@register("finetune")
class FineTune(Method):
    summary = "k FedAvg rounds on the remaining clients from the trained model (SIFU's fine-tuning)"
    config_keys = (
        ConfigKey("finetune-rounds", 2, "finetune: FedAvg rounds on the remaining clients, from the trained model.", check=positive_int),
    )

    def unlearn(self, port: FederationPort, deletion: Deletion) -> Outcome:
        remaining = port.remaining(deletion)
        rounds = int(self.config["finetune-rounds"])
        training = port.train(
            remaining, deletion.trained_state, rounds,
            seed=derive_seed(self.config["seed"], "finetune"), first_round=deletion.trained_rounds + 1,
        )
        return Outcome(
            state=training.state,
            affected_clients=sorted(deletion.forget_clients),
            communication_rounds=rounds,
            details={"rounds": rounds, "client_trainings": training.client_trainings, "trained_clients": remaining},
            headline={"client_trainings": training.client_trainings},
        )
