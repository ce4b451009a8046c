"""ServerApp: identify clients, train with FedAvg, take deletion requests, unlearn with each
configured method, retrain the oracle, evaluate everything against it, write the results.

Under ``flwr run`` the config comes from ``context.run_config``; the CLI, which uses
``flwr.simulation.run_simulation`` (no run config there), binds it with :func:`build_server_app`
along with progress callbacks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedunlearn import config as run_config
from fedunlearn import retrain_cache
from fedunlearn.errors import UnlearningFailed
from fedunlearn.federation import build_federation
from fedunlearn.files import atomic_torch_save
from fedunlearn.ledger import Ledger, requests_from_config, requests_from_file, screen_requests
from fedunlearn.metrics.timing import speedup
from fedunlearn.results import RunRecord
from fedunlearn.run_evaluation import evaluate_models
from fedunlearn.summary import NOISE_FLOOR_ROW, StudyRecord, distances, plan_runs
from fedunlearn.training import derive_seed, loss_and_accuracy, resolve_device
from fedunlearn.unlearning import Deletion, Outcome, create_method, parse_methods
from fedunlearn.unlearning.certify import release
from fedunlearn.unlearning.repair import repair
from strategies.port import GridPort
from strategies.roster import MessageLog, Roster

RoundCallback = Callable[[int, dict[str, Any]], None]
PhaseCallback = Callable[[str], None]

# The second retrain's training randomness (sampling seed and local shuffling) differs by this salt.
NOISE_FLOOR_SALT = "noise-floor"

# What the evaluation of a method's extra predictors (Outcome.also_evaluate) keeps in its details.
ALSO_EVALUATED_KEYS = ("test_accuracy", "test_accuracy_vote", "forget_accuracy", "asr")


def client_cost(messages: dict[str, int]) -> dict[str, Any]:
    """What a phase cost the clients: ``client_trainings`` (train messages: one local training each, as
    many epochs as the message says), ``client_computations`` (every message a client computed on: local
    trainings, client solves, gradient / curvature / factor queries) and the messages by type."""
    return {
        "client_trainings": messages.get("train", 0),
        "client_computations": sum(messages.values()),
        "client_messages": messages,
    }


def deletion_round(config: dict[str, Any]) -> int:
    return config["unlearn-after-round"] or config["num-rounds"]


class FederatedJob:
    """One run on a Flower grid; every phase writes into one :class:`RunRecord`.

    The job knows the phases (train, delete, unlearn, retrain, evaluate) and nothing of any method
    beyond the seam: each method's requirements subscribe training hooks, and each unlearns through
    ``method.unlearn(port, deletion)``.
    """

    def __init__(
        self, grid: Grid, config: dict[str, Any], on_round: RoundCallback | None, on_phase: PhaseCallback | None,
        stamp: dict[str, Any] | None = None,
    ):
        self.grid, self.config = grid, config
        self.on_round, self.on_phase = on_round, on_phase or (lambda phase: None)
        self.record = RunRecord(config=config)
        self.out_dir = Path(config["out-dir"])
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # The evaluator sees the whole data set: in simulation the server rebuilds every partition
        # from the run config (a real deployment needs an evaluator that holds the data).
        self.federation = build_federation(config)
        self.device = resolve_device(config["device"])
        self.model = self.federation.initial_model()
        self.initial_state = {name: value.clone() for name, value in self.model.state_dict().items()}
        self.methods = [create_method(name, config) for name in parse_methods(config["unlearn-methods"])]
        self.roster, self.log = Roster(), MessageLog()
        self.port = GridPort(
            grid, config, self.roster, self.log, self.initial_state, self.federation.new_model, self.out_dir, self.on_phase,
            stamp=stamp,
        )
        self.sampling_seed = derive_seed(config["seed"], "sampling")

    # --- phases --------------------------------------------------------------------------------

    def run(self) -> RunRecord:
        config = self.config
        clients = self.roster.discover(self.grid, config["num-clients"], config["round-timeout"], self.port.stamp)
        self.record.partitions = {
            "scheme": config["partition"],
            "num_clients": len(clients),
            "train_examples": sum(info.num_examples for info in clients.values()),
            "sizes": [info.num_examples for info in clients.values()],
            "label_histograms": [list(info.label_histogram) for info in clients.values()],
        }
        ledger = Ledger(self.out_dir / "ledger.jsonl")
        requests = requests_from_config(config["forget-clients"])
        if config["deletion-requests"]:
            requests += requests_from_file(config["deletion-requests"])
        refused: list = []
        accepted = screen_requests(requests, clients, ledger, refused)
        self.record.refused_requests = [{"clients": list(request.clients), "grain": request.grain, "reason": reason} for request, reason in refused]
        forget = sorted({client for request in accepted for client in request.clients})
        stop_round = deletion_round(config)

        # Training hooks: the round history the methods require, then each method's own hooks.
        method_hooks = [hook for method in self.methods for hook in method.training_hooks()]
        round_hooks = self.port.history_hooks(method.requirements for method in self.methods) + method_hooks
        self.on_phase("training")
        start = time.perf_counter()
        trained_state = self._train(self.initial_state, rounds=stop_round, first_round=1, participants=list(clients), hooks=round_hooks)
        self.record.methods["original"] = {"seconds": time.perf_counter() - start, **client_cost(self.log.counts(["training"]))}
        atomic_torch_save(trained_state, self.out_dir / "global_model.pt")

        outcomes: dict[str, tuple[Outcome, float]] = {}
        if forget:
            for hook in method_hooks:
                hook.after_training(self.port, trained_state, stop_round)
            deletion = Deletion(forget_clients=tuple(forget), trained_state=trained_state, trained_rounds=stop_round)
            for method in self.methods:
                try:
                    with self.port.phase(f"unlearning: {method.name}"):
                        start = time.perf_counter()
                        outcome = method.unlearn(self.port, deletion)
                        seconds = time.perf_counter() - start
                    release(self.port, method.name, deletion, outcome)  # noise once, and ε where it is sound
                    with self.port.phase(f"repair: {method.name}"):
                        seconds += repair(self.port, deletion, outcome, int(method.config["repair-rounds"]))
                    outcome.headline.update(client_cost(self.log.counts([f"unlearning: {method.name}", f"repair: {method.name}"])))
                except UnlearningFailed as failure:
                    for request in accepted:
                        ledger.append(request, "failed", method=method.name, affected_clients=forget, reason=str(failure))
                    self.record.methods[method.name] = {"failed": str(failure)}
                    continue
                outcomes[method.name] = (outcome, seconds)
                for request in accepted:
                    ledger.append(
                        request, "applied", method=method.name, affected_clients=outcome.affected_clients,
                        seconds=round(seconds, 4), epsilon=outcome.epsilon,
                    )
            self.on_phase("retraining the oracle")
            retrained_state, retrain_info = self._retrain(forget, stop_round)
            second = None
            if config["noise-floor"]:
                self.on_phase("retraining the oracle again (noise floor)")
                second = self._retrain(forget, stop_round, noise_floor=True)
            self.on_phase("evaluating")
            self._evaluate(trained_state, retrained_state, retrain_info, outcomes, forget, second)
            if stop_round < config["num-rounds"] and outcomes:
                self._continue_after_deletion(outcomes, forget, stop_round)
        else:
            self._evaluate(trained_state, None, None, {}, [])
        self.record.communication = self.log.summary()
        self.record.write(self.out_dir)
        return self.record

    def _train(self, start_state, rounds: int, first_round: int, participants: list[int], hooks=(), phase: str = "training"):
        """FedAvg over ``participants``, the test set evaluated after every round (``rounds`` in results.json)."""
        record, data = self.record, self.federation.data
        offset = first_round - 1
        strategy = self.port.fedavg(participants, seed=self.sampling_seed, evaluate_on_clients=True, hooks=hooks)

        def evaluate_on_test_set(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0 and offset > 0:
                return None  # the starting model of a later phase is already evaluated (methods.<name>)
            self.model.load_state_dict(arrays.to_torch_state_dict())
            scores = loss_and_accuracy(self.model, data.test, self.device)
            entry = record.round_entry(server_round + offset)
            if phase != "training":
                entry["phase"] = phase
            client_metrics = strategy.client_metrics.get(server_round, {})
            if "train-loss" in client_metrics:
                entry["train_loss"] = client_metrics["train-loss"]
            if "local-accuracy" in client_metrics:
                entry["local_accuracy"] = client_metrics["local-accuracy"]
            entry.update(test_loss=scores["loss"], test_accuracy=scores["accuracy"], seconds=round(record.elapsed(), 3))
            if self.on_round is not None:
                self.on_round(server_round + offset, entry)
            return MetricRecord({"test-loss": scores["loss"], "test-accuracy": scores["accuracy"]})

        return self.port.run_fedavg(strategy, start_state, rounds, evaluate_fn=evaluate_on_test_set)

    def _retrain(self, forget: list[int], rounds: int, noise_floor: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """FedAvg from the same initial model and seed without the deleted clients, timed like training.

        ``noise_floor``: the second retrain, on the same data from the same initial model, with other
        training randomness (client sampling and local shuffling)."""
        salt = NOISE_FLOOR_SALT if noise_floor else ""
        key = retrain_cache.retrain_key(self.config, forget, rounds) + (f"-{salt}" if salt else "")
        if self.config["retrain-cache"] and (cached := retrain_cache.load(key)) is not None:
            state, info = cached
            return state, {**info, "from_cache": True}
        remaining = [k for k in self.roster.clients if k not in set(forget)]
        start = time.perf_counter()
        seed = derive_seed(self.config["seed"], "sampling", salt) if noise_floor else self.sampling_seed
        with self.port.phase("retrain (noise floor)" if noise_floor else "retrain"):
            training = self.port.train(
                remaining, self.initial_state, rounds, seed=seed, evaluate_on_clients=True, shuffle_salt=salt,
            )
        seconds = time.perf_counter() - start
        state = training.state
        info = {"seconds": seconds, "rounds": rounds, "forget_clients": forget, "key": key, "client_trainings": training.client_trainings}
        retrain_cache.store(key, state, info)
        return state, {**info, "from_cache": False}

    def _evaluate(self, trained_state, retrained_state, retrain_info, outcomes, forget, second=None) -> None:
        states = {"original": trained_state}
        if retrained_state is not None:
            states["retrain"] = retrained_state
        if second is not None:
            states[NOISE_FLOOR_ROW] = second[0]
        states.update({name: outcome.state for name, (outcome, _) in outcomes.items() if outcome.state is not None})
        predictors = {name: outcome.predictor for name, (outcome, _) in outcomes.items() if outcome.predictor is not None}
        extra = {
            (name, label): predictor
            for name, (outcome, _) in outcomes.items()
            for label, predictor in outcome.also_evaluate.items()
        }
        predictors.update({f"{name} ({label})": predictor for (name, label), predictor in extra.items()})
        scores, lira_summary = evaluate_models(
            self.federation, self.model, states, forget, self.device, self.config, predictors, on_phase=self.on_phase,
        )
        if lira_summary is not None:
            self.record.lira = lira_summary
        for name, label in extra:
            values = scores.pop(f"{name} ({label})")
            outcomes[name][0].details[label] = {key: values[key] for key in ALSO_EVALUATED_KEYS if key in values}
        for name, values in scores.items():
            self.record.methods.setdefault(name, {}).update(values)
        if retrain_info is not None:
            retrain_seconds = retrain_info["seconds"]
            self.record.methods["retrain"].update(
                seconds=retrain_seconds, speedup=1.0, retrain_from_cache=retrain_info["from_cache"],
                client_trainings=retrain_info.get("client_trainings"), client_computations=retrain_info.get("client_trainings"),
                communication_rounds=retrain_info["rounds"],
            )
            if second is not None:
                self.record.methods[NOISE_FLOOR_ROW].update(seconds=second[1]["seconds"], retrain_from_cache=second[1]["from_cache"])
                self.record.noise_floor = distances(self.record.methods[NOISE_FLOOR_ROW])
            for name, (outcome, seconds) in outcomes.items():
                self.record.methods[name].update(outcome.headline)
                self.record.methods[name].update(
                    seconds=seconds,
                    speedup=speedup(retrain_seconds, seconds),
                    communication_rounds=outcome.communication_rounds,
                    affected_clients=outcome.affected_clients,
                    epsilon=outcome.epsilon,
                    details=outcome.details,
                )

    def _continue_after_deletion(self, outcomes, forget, stop_round) -> None:
        """Rounds after the deletion point go on without the deleted clients, from the first method's model."""
        with_model = [(name, outcome) for name, (outcome, _) in outcomes.items() if outcome.state is not None]
        if not with_model:
            return  # an ensemble (SISA) is not a global model to go on training
        name, first = with_model[0]
        remaining = [k for k in self.roster.clients if k not in set(forget)]
        with self.port.phase("after-deletion"):
            self.on_phase(f"training after the deletion (from {name})")
            final_state = self._train(
                first.state, rounds=self.config["num-rounds"] - stop_round, first_round=stop_round + 1,
                participants=remaining, phase=f"after-deletion ({name})",
            )
        atomic_torch_save(final_state, self.out_dir / "global_model_after_deletion.pt")


def run_study(grid: Grid, config: dict[str, Any], on_round: RoundCallback | None = None, on_phase: PhaseCallback | None = None) -> StudyRecord:
    """Every run the config asks for (seeds, each client deleted in turn) on the same clients, then the summary.

    With several runs every message carries the run's overrides (``run-overrides``), so the clients
    rebuild that run's partitions and seeds: one Ray start serves every run."""
    runs = plan_runs(config)
    study = StudyRecord(config=config)
    for index, spec in enumerate(runs):
        run_config_ = run_config.resolve(config, {**spec.overrides, "out-dir": str(spec.out_dir)})
        stamp = {"run-overrides": json.dumps(spec.overrides)} if len(runs) > 1 else None
        label = f"run {index + 1}/{len(runs)} (seed {spec.seed}, delete {spec.forget_clients or 'nothing'}): "
        announce = on_phase if len(runs) == 1 or on_phase is None else (lambda phase, label=label: on_phase(label + phase))
        study.runs.append((spec, FederatedJob(grid, run_config_, on_round, announce, stamp=stamp).run()))
    study.write()
    return study


def build_server_app(
    bound_config: dict[str, Any] | None = None,
    on_round: RoundCallback | None = None,
    on_record: Callable[[StudyRecord], None] | None = None,
    on_phase: PhaseCallback | None = None,
) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = bound_config if bound_config is not None else run_config.resolve(context.run_config)
        study = run_study(grid, config, on_round, on_phase)
        if on_record is not None:
            on_record(study)

    return app


# Entry point for `flwr run` (pyproject's [tool.flwr.app.components]).
app = build_server_app()
