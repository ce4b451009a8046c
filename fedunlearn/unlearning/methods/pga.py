"""Projected gradient ascent (PGA; Halimi, Kadhe, Rawat & Baracaldo 2022, "Federated Unlearning: How to
Efficiently Erase a Client in FL?", arXiv:2207.05521), checked against the authors' notebook
(``federated_unlearning.ipynb`` of github.com/IBM/federated-unlearning).

The deleted client climbs the cross-entropy of its own data, starting from a *reference model* and kept
inside an L2 ball around it:

- **Reference model** w_ref: the average of the other clients' local models of the last training round
  T, w_ref = Σ_{k≠i} n_k w_k^T / Σ_{k≠i} n_k (the paper: (N w^T − w_i^T) / (N − 1), equal weights; with
  FedAvg's example weights that is (n w^T − n_i w_i^T) / (n − n_i)). The paper lets the client compute it
  from its own last local model; our clients keep no state between messages, so training keeps the last
  round's returned models (this module's training hook: one round, overwritten every round) and the server
  forms w_ref as the example-weighted mean of the last round's participants that remain.
- **Radius** δ: from ``pga-random-models`` fresh initialisations r_1..r_R of the run's model (seeded from
  the run seed, not the run's initial model), over the parameters (not buffers):
  ``pga-radius-average = "squared-distance"`` (default, the authors' code, whose "distance" is the squared
  norm): δ² = f · mean_k ‖w_ref − r_k‖²; ``"distance"``: δ = f · mean_k ‖w_ref − r_k‖; f =
  ``pga-radius-fraction`` (1/3). ``pga-radius`` > 0 sets δ directly (the paper treats it as a hyperparameter).
- **Ascent** (on the deleted client, one ``train.unlearn`` message carrying w_ref and δ): SGD at ``pga-lr``
  with ``pga-momentum``, mini-batches of the run's ``batch-size`` reshuffled every epoch, the gradient of
  −CE clipped to norm ``pga-clip-norm``, and after every step the exact projection onto
  {w : ‖w − w_ref‖ ≤ δ} (parameters only), for at most ``pga-epochs`` epochs.
- **Early stopping** (the paper): stop once the accuracy on the client's own data is at most τ =
  ``pga-stop-accuracy``, checked at w_ref and every ``pga-check-every`` steps (0: at the end of each epoch).

θ_u = w_ref + Δ, with Δ the client's change of the parameters (buffers keep w_ref's). With several deleted
clients each ascends from the same w_ref in the same ball and the server takes the example-weighted mean of
their changes (still in the ball: it is convex). The paper then runs FedAvg "post-training" rounds on the
remaining clients; that is not part of this method (docs/methods.md).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fedunlearn.config import ConfigKey, closed_unit_interval, momentum_range, non_negative_float, non_negative_int, positive_float, positive_int
from fedunlearn.curvature import Batches, loss_gradient, resolve_param_names
from fedunlearn.errors import UnlearningFailed
from fedunlearn.training import derive_seed, streamed_accuracy
from fedunlearn.unlearning.api import (
    UNLEARN,
    ClientContext,
    ClientUpdate,
    Deletion,
    FederationPort,
    Method,
    Outcome,
    Requirements,
    State,
    TrainingHook,
)
from fedunlearn.unlearning.history import weighted_mean
from fedunlearn.unlearning.influence import norm_of
from fedunlearn.unlearning.objective import count_examples
from fedunlearn.unlearning.registry import register

RADIUS_AVERAGES = ("squared-distance", "distance")
RADIUS_KEY = "pga-radius"  # the train.unlearn config entry carrying δ to the client
RANDOM_MODEL_SALT = "pga-random-model"


class LastRound(TrainingHook):
    """Keeps the models the clients returned in the latest training round (and their example counts),
    dropping the previous round's: one round of storage, not the whole history."""

    def __init__(self) -> None:
        self.round: int | None = None
        self.client_states: dict[int, State] = {}
        self.num_examples: dict[int, int] = {}

    def after_round(self, server_round: int, client_states: Mapping[int, State], num_examples: Mapping[int, int]) -> None:
        self.round = server_round
        self.client_states = {k: dict(state) for k, state in client_states.items()}
        self.num_examples = {k: int(n) for k, n in num_examples.items()}

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for state in self.client_states.values() for t in state.values())


def l2_distance(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return math.sqrt(sum(float(((x.detach().double() - y.detach().double()) ** 2).sum()) for x, y in zip(a, b)))


def radius_from(distances: Sequence[float], fraction: float, average: str) -> float:
    """δ from the distances between w_ref and the random models (module docstring)."""
    if not distances:
        raise ValueError("no random models")
    if average == "squared-distance":
        return math.sqrt(fraction * sum(d * d for d in distances) / len(distances))
    if average == "distance":
        return fraction * sum(distances) / len(distances)
    raise ValueError(f"average must be one of {RADIUS_AVERAGES}, got {average!r}")


@torch.no_grad()
def project_onto_ball(params: Sequence[Tensor], centre: Sequence[Tensor], radius: float) -> float:
    """Replace ``params`` (in place) by their Euclidean projection onto {w : ‖w − centre‖ ≤ radius}, the
    norm taken over all tensors together; returns ‖params − centre‖ before the projection."""
    distance = l2_distance(params, centre)
    if distance > radius:
        scale = radius / distance
        for p, c in zip(params, centre):
            p.copy_(c + (p - c) * scale)
    return distance


@register("pga")
class ProjectedGradientAscent(Method):
    summary = "projected gradient ascent of the deleted client from the other clients' mean model (Halimi et al. 2022)"
    requirements = Requirements(client_solve=True, per_round_statistics=True)
    config_keys = (
        ConfigKey("pga-epochs", 5, "pga: at most this many epochs of projected gradient ascent on the deleted client's data (the authors' 5).", check=positive_int),
        ConfigKey("pga-lr", 0.01, "pga: ascent learning rate (SGD; the authors' 0.01).", check=positive_float),
        ConfigKey("pga-momentum", 0.9, "pga: SGD momentum of the ascent (the authors' 0.9).", check=momentum_range),
        ConfigKey("pga-clip-norm", 5.0, "pga: clip each ascent gradient to this L2 norm (the authors' 5); 0 = no clipping.", check=non_negative_float),
        ConfigKey(
            "pga-stop-accuracy", 0.12,
            "pga: early stopping threshold τ: stop once the client's accuracy on its own data is at most this (0 = never).",
            check=closed_unit_interval,
        ),
        ConfigKey(
            "pga-check-every", 1,
            "pga: check the early-stopping accuracy every this many ascent steps; 0 = at the end of each epoch.",
            check=non_negative_int,
        ),
        ConfigKey("pga-radius-fraction", 1 / 3, "pga: the ball's radius is this fraction of the reference model's average distance to random models (the authors' 1/3).", check=positive_float),
        ConfigKey(
            "pga-radius-average", "squared-distance",
            "pga: which average pga-radius-fraction scales: the mean squared distance, δ² = f · mean ‖w_ref − r‖² "
            "(the authors' code), or the mean distance, δ = f · mean ‖w_ref − r‖.",
            choices=RADIUS_AVERAGES,
        ),
        ConfigKey("pga-random-models", 10, "pga: fresh initialisations of the model averaged over for the radius (the authors' 10).", check=positive_int),
        ConfigKey("pga-radius", 0.0, "pga: the ball's radius δ itself; 0 = from the random models (pga-radius-fraction).", check=non_negative_float),
    )

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        self.last_round = LastRound()

    def training_hooks(self) -> list[TrainingHook]:
        return [self.last_round]

    # --- server side -------------------------------------------------------------------------------

    def reference_model(self, port: FederationPort, deletion: Deletion) -> tuple[State, list[int]]:
        """w_ref and the clients it averages (the last round's participants that remain)."""
        kept = self.last_round
        if kept.round is None:
            raise UnlearningFailed("pga: training kept no client models (the method must be listed before training starts)")
        if kept.round != deletion.trained_rounds:
            raise UnlearningFailed(f"pga: the kept client models are of round {kept.round}, the trained model of round {deletion.trained_rounds}")
        remaining = set(port.remaining(deletion))
        others = sorted(k for k in kept.client_states if k in remaining)
        if not others:
            raise UnlearningFailed(
                f"pga: no remaining client trained in round {kept.round} (its participants: {sorted(kept.client_states)}), so there is no reference model"
            )
        total = sum(kept.num_examples[k] for k in others)
        weights = {k: kept.num_examples[k] / total for k in others}
        trained = deletion.trained_state
        floats = [name for name, tensor in trained.items() if torch.is_floating_point(tensor)]
        # Float entries: the weighted mean; other entries (none in this project's models): θ*'s.
        mean = weighted_mean(kept.client_states, weights, floats)
        return {name: mean[name] if name in mean else tensor.clone() for name, tensor in trained.items()}, others

    def random_model_distances(self, port: FederationPort, reference: State) -> list[float]:
        """‖w_ref − r_k‖ over the parameters for ``pga-random-models`` fresh initialisations r_k."""
        distances = []
        for index in range(int(self.config["pga-random-models"])):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(self.config["seed"], RANDOM_MODEL_SALT, index))
                model = port.new_model()
            named = dict(model.named_parameters())
            distances.append(l2_distance([reference[n] for n in named], [p.detach() for p in named.values()]))
        return distances

    def unlearn(self, port: FederationPort, deletion: Deletion) -> Outcome:
        start = time.perf_counter()
        affected = sorted(deletion.forget_clients)
        reference, averaged = self.reference_model(port, deletion)
        param_names = [name for name, _ in port.new_model().named_parameters()]
        trained = deletion.trained_state
        if self.config["pga-radius"] > 0:
            distances, radius = [], float(self.config["pga-radius"])
        else:
            distances = self.random_model_distances(port, reference)
            radius = radius_from(distances, float(self.config["pga-radius-fraction"]), str(self.config["pga-radius-average"]))
        request = {"method": self.name, RADIUS_KEY: radius}
        server_seconds = time.perf_counter() - start
        replies = port.send(UNLEARN, affected, {"arrays": reference}, request)
        sizes = {k: int(replies[k].metrics["num-examples"]) for k in affected}
        total = sum(sizes.values())
        state = {name: tensor.clone() for name, tensor in reference.items()}
        clients = {}
        for k in affected:
            update = replies[k].arrays["update"]
            for name, delta in update.items():
                state[name] = state[name] + (sizes[k] / total) * delta.to(state[name].dtype)
            clients[str(k)] = {"seconds": float(replies[k].metrics["seconds"]), **_diagnostics(replies[k].info)}
        names = [n for n in param_names if n in state]
        final_distance = l2_distance([state[n] for n in names], [reference[n] for n in names])
        details: dict[str, Any] = {
            "radius": radius,
            "radius_rule": "pga-radius" if self.config["pga-radius"] > 0 else str(self.config["pga-radius-average"]),
            "random_model_distances": distances,
            "distance_from_reference": final_distance,
            "reference_distance_from_trained": l2_distance([reference[n] for n in names], [trained[n] for n in names]),
            "unlearned_distance_from_trained": l2_distance([state[n] for n in names], [trained[n] for n in names]),
            "reference_round": self.last_round.round,
            "reference_clients": averaged,
            "storage_bytes": self.last_round.storage_bytes(),
            "server_seconds": server_seconds,
            "clients": clients,
        }
        if len(affected) == 1:  # the single client's numbers at the top level too
            only = clients[str(affected[0])]
            for key in ("optimizer_steps", "epochs_run", "stopped_early", "forget_accuracy_by_epoch", "reference_forget_accuracy", "final_forget_accuracy"):
                if key in only:
                    details[key] = only[key]
        return Outcome(
            state=state,
            affected_clients=affected,
            communication_rounds=1,
            details=details,
            headline={"storage_bytes": details["storage_bytes"]},
        )

    # --- client side -------------------------------------------------------------------------------

    def solve(self, model: nn.Module, forget_batches: Batches, context: ClientContext) -> ClientUpdate:
        start = time.perf_counter()
        config = self.config
        if RADIUS_KEY not in context.request:
            raise ValueError(f"pga: the train.unlearn request carries no {RADIUS_KEY!r}")
        radius = float(context.request[RADIUS_KEY])
        names = resolve_param_names(model)
        named = dict(model.named_parameters())
        params = [named[name] for name in names]
        centre = [p.detach().clone() for p in params]
        forget_gradient_norm = norm_of(loss_gradient(model, names, forget_batches))
        stop_at = float(config["pga-stop-accuracy"])
        check_every = int(config["pga-check-every"])
        clip = float(config["pga-clip-norm"])
        optimizer = torch.optim.SGD(params, lr=float(config["pga-lr"]), momentum=float(config["pga-momentum"]))
        generator = torch.Generator().manual_seed(derive_seed(context.seed, "pga", context.partition_id))
        # The client app cuts the data at curvature-batch-size; the ascent uses the training batch size.
        inputs_all = torch.cat([inputs for inputs, _ in forget_batches])
        targets_all = torch.cat([targets for _, targets in forget_batches])
        batch_size = int(config["batch-size"])

        def accuracy() -> float:
            value = streamed_accuracy(model.eval(), forget_batches)
            model.train()
            return value

        reference_accuracy = accuracy()
        checks = [(0, reference_accuracy)]  # (step, accuracy on the client's data)
        stopped = stop_at > 0 and reference_accuracy <= stop_at
        epochs_run, steps, accuracy_by_epoch = 0, 0, []
        distances, distances_before = [], []  # after / before the projection, every step
        model.train()
        for _ in range(int(config["pga-epochs"])):
            if stopped:
                break
            order = torch.randperm(len(targets_all), generator=generator).to(targets_all.device)
            for batch in order.split(batch_size):
                optimizer.zero_grad(set_to_none=True)
                (-F.cross_entropy(model(inputs_all[batch]), targets_all[batch])).backward()  # ascent
                if clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, clip)
                optimizer.step()
                distances_before.append(project_onto_ball(params, centre, radius))
                distances.append(l2_distance(params, centre))
                steps += 1
                if check_every and steps % check_every == 0:
                    checks.append((steps, accuracy()))
                    if stop_at > 0 and checks[-1][1] <= stop_at:
                        stopped = True
                        break
            epochs_run += 1
            if checks[-1][0] != steps:
                checks.append((steps, accuracy()))
            accuracy_by_epoch.append(checks[-1][1])
            if stop_at > 0 and checks[-1][1] <= stop_at:
                stopped = True
        model.eval()
        budget = int(config["pga-epochs"]) * -(-len(targets_all) // batch_size)
        return ClientUpdate(
            param_names=names,
            delta=[(p.detach() - c) for p, c in zip(params, centre)],
            forget_gradient_norm=forget_gradient_norm,
            num_forget_examples=count_examples(forget_batches),
            diagnostics={
                "radius": radius,
                "batch_size": batch_size,
                "optimizer_steps": steps,
                "epochs_run": epochs_run,
                # τ was reached (at w_ref or after some step), and before the step budget ran out.
                "stop_accuracy_reached": stopped,
                "stopped_early": stopped and steps < budget,
                "reference_forget_accuracy": reference_accuracy,
                "final_forget_accuracy": checks[-1][1],
                "forget_accuracy_by_epoch": accuracy_by_epoch,
                "accuracy_checks": checks,
                "distance_by_step": distances,
                "distance_before_projection_by_step": distances_before,
                "projected_steps": sum(1 for d in distances_before if d > radius),
                "seconds": time.perf_counter() - start,
            },
        )


def _diagnostics(info: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(str(info["diagnostics"])) if "diagnostics" in info else {}
