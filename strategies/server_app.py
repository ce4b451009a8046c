"""ServerApp: identify clients, train with FedAvg, take deletion requests, unlearn with each
configured method, retrain the oracle, evaluate everything against it, write the results.

Under ``flwr run`` the config comes from ``context.run_config``; the CLI, which uses
``flwr.simulation.run_simulation`` (no run config there), binds it with :func:`build_server_app`
along with progress callbacks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedunlearn import config as run_config
from fedunlearn import retrain_cache
from fedunlearn.evaluation import evaluate_models
from fedunlearn.federation import build_federation
from fedunlearn.ledger import Ledger, requests_from_config, requests_from_file, screen_requests
from fedunlearn.results import RunRecord
from fedunlearn.training import derive_seed, evaluate, resolve_device
from fedunlearn.unlearning import get_method, parse_methods
from fedunlearn.unlearning.sisa import ensemble_of
from strategies.fedavg import UnlearningFedAvg, UnlearningFailed
from strategies.sisa import SisaTraining, train_constituents
from strategies.unlearning import UnlearningOutcome, apply_method

RoundCallback = Callable[[int, dict[str, Any]], None]
PhaseCallback = Callable[[str], None]


def _new_strategy(config: dict[str, Any], excluded: tuple[int, ...] = (), store_every: int = 0) -> UnlearningFedAvg:
    return UnlearningFedAvg(
        store_every=store_every,
        num_clients=config["num-clients"],
        seed=derive_seed(config["seed"], "sampling"),
        fraction_train=config["fraction-train"],
        fraction_evaluate=config["fraction-evaluate"],
        round_timeout=config["round-timeout"],
        excluded_partitions=excluded,
    )


def deletion_round(config: dict[str, Any]) -> int:
    return config["unlearn-after-round"] or config["num-rounds"]


class FederatedJob:
    """One run on a Flower grid; every phase writes into one :class:`RunRecord`."""

    def __init__(self, grid: Grid, config: dict[str, Any], on_round: RoundCallback | None, on_phase: PhaseCallback | None):
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
        # A method that replays training (FedEraser) declares it up front: training then stores updates.
        needs_storage = any(
            getattr(get_method(name), "needs_stored_updates", False) for name in parse_methods(config["unlearn-methods"])
        )
        self.strategy = _new_strategy(config, store_every=config["federaser-interval"] if needs_storage else 0)
        # SISA trains its own shard constituents beside the global model; it declares that too.
        self.trains_constituents = any(get_method(name).runs_on == "shards" for name in parse_methods(config["unlearn-methods"]))
        self.sisa_training: SisaTraining | None = None

    # --- phases --------------------------------------------------------------------------------

    def run(self) -> RunRecord:
        config = self.config
        clients = self.strategy.discover_clients(self.grid)
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
        methods = parse_methods(config["unlearn-methods"])
        accepted = screen_requests(requests, clients, ledger)
        forget = sorted({client for request in accepted for client in request.clients})
        stop_round = deletion_round(config)

        self.on_phase("training")
        trained_state = self._train(self.initial_state, rounds=stop_round, first_round=1, strategy=self.strategy)
        self.record.methods["original"] = {"seconds": self.record.rounds[-1]["seconds"]}
        torch.save(trained_state, self.out_dir / "global_model.pt")
        if self.trains_constituents and forget:
            self.sisa_training = train_constituents(
                self.grid, self.strategy.clients, config, self.initial_state, stop_round, self.out_dir, self.on_phase,
            )
            self.strategy.message_log.extend(self.sisa_training.message_log)

        outcomes: dict[str, UnlearningOutcome] = {}
        if forget:
            for method in methods:
                self.on_phase(f"unlearning: {method}")
                self.strategy.phase = f"unlearning: {method}"
                try:
                    outcome = apply_method(
                        self.strategy, self.grid, trained_state, self.model, method, forget, config,
                        sisa_training=self.sisa_training, new_model=self.federation.new_model,
                    )
                except UnlearningFailed as failure:
                    for request in accepted:
                        ledger.append(request, "failed", method=method, affected_clients=forget, reason=str(failure))
                    self.record.methods[method] = {"failed": str(failure)}
                    continue
                outcomes[method] = outcome
                for request in accepted:
                    ledger.append(
                        request, "applied", method=method, affected_clients=outcome.affected_clients,
                        seconds=round(outcome.seconds, 4), epsilon=outcome.epsilon,
                    )
            self.on_phase("retraining the oracle")
            retrained_state, retrain_info = self._retrain(forget, stop_round)
            self.on_phase("evaluating")
            self._evaluate(trained_state, retrained_state, retrain_info, outcomes, forget)
            if stop_round < config["num-rounds"] and outcomes:
                self._continue_after_deletion(outcomes, forget, stop_round)
        else:
            self._evaluate(trained_state, None, None, {}, [])
        self.record.communication = self._communication_summary()
        self.record.write(self.out_dir)
        return self.record

    def _train(self, start_state, rounds: int, first_round: int, strategy: UnlearningFedAvg, phase: str = "training"):
        config, record, data = self.config, self.record, self.federation.data
        offset = first_round - 1

        def evaluate_on_test_set(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0 and offset > 0:
                return None  # the starting model of a later phase is already evaluated (methods.<name>)
            self.model.load_state_dict(arrays.to_torch_state_dict())
            scores = evaluate(self.model, data.test, self.device)
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

        return strategy.train_from(self.grid, start_state, rounds, evaluate_fn=evaluate_on_test_set)

    def _retrain(self, forget: list[int], rounds: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """FedAvg from the same initial model and seed without the deleted clients, timed like training."""
        key = retrain_cache.retrain_key(self.config, forget, rounds)
        if self.config["retrain-cache"] and (cached := retrain_cache.load(key)) is not None:
            state, info = cached
            return state, {**info, "from_cache": True}
        strategy = _new_strategy(self.config, excluded=tuple(forget))
        strategy.clients = dict(self.strategy.clients)
        strategy.phase = "retrain"
        start = time.perf_counter()
        state = strategy.train_from(self.grid, self.initial_state, rounds)
        seconds = time.perf_counter() - start
        self.strategy.message_log.extend(strategy.message_log)
        info = {"seconds": seconds, "rounds": rounds, "forget_clients": forget, "key": key}
        retrain_cache.store(key, state, info)
        return state, {**info, "from_cache": False}

    def _evaluate(self, trained_state, retrained_state, retrain_info, outcomes, forget) -> None:
        states = {"original": trained_state}
        if retrained_state is not None:
            states["retrain"] = retrained_state
        states.update({name: outcome.state for name, outcome in outcomes.items() if outcome.state is not None})
        predictors = {name: outcome.predictor for name, outcome in outcomes.items() if outcome.predictor is not None}
        if self.sisa_training is not None and "sisa" in predictors:
            predictors["sisa-before-deletion"] = ensemble_of(self.sisa_training.constituents, self.federation.new_model)
        scores = evaluate_models(self.federation, self.model, states, forget, self.device, self.config, predictors)
        if "sisa-before-deletion" in scores:
            # SISA's own starting point (its ensemble before the deletion), not a method of its own.
            before = scores.pop("sisa-before-deletion")
            outcomes["sisa"].details["ensemble_before_deletion"] = {
                key: before[key] for key in ("test_accuracy", "test_accuracy_vote", "forget_accuracy", "asr") if key in before
            }
        for name, values in scores.items():
            entry = self.record.methods.setdefault(name, {})
            entry.update(values)
        if retrain_info is not None:
            retrain_seconds = retrain_info["seconds"]
            self.record.methods["retrain"].update(seconds=retrain_seconds, speedup=1.0, retrain_from_cache=retrain_info["from_cache"])
            for name, outcome in outcomes.items():
                for headline in ("storage_bytes", "retrained_fraction"):
                    if headline in outcome.details:
                        self.record.methods[name][headline] = outcome.details[headline]
                self.record.methods[name].update(
                    seconds=outcome.seconds,
                    speedup=retrain_seconds / outcome.seconds if outcome.seconds > 0 else None,
                    communication_rounds=outcome.communication_rounds,
                    affected_clients=outcome.affected_clients,
                    epsilon=outcome.epsilon,
                    details=outcome.details,
                )

    def _continue_after_deletion(self, outcomes, forget, stop_round) -> None:
        """Rounds after the deletion point go on without the deleted clients, from the first method's model."""
        with_model = [outcome for outcome in outcomes.values() if outcome.state is not None]
        if not with_model:
            return  # an ensemble (SISA) is not a global model to go on training
        first = with_model[0]
        self.on_phase(f"training after the deletion (from {first.method})")
        strategy = _new_strategy(self.config, excluded=tuple(forget))
        strategy.clients = dict(self.strategy.clients)
        strategy.phase = "after-deletion"
        final_state = self._train(
            first.state, rounds=self.config["num-rounds"] - stop_round, first_round=stop_round + 1,
            strategy=strategy, phase=f"after-deletion ({first.method})",
        )
        self.strategy.message_log.extend(strategy.message_log)
        torch.save(final_state, self.out_dir / "global_model_after_deletion.pt")

    def _communication_summary(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for entry in self.strategy.message_log:
            counts[str(entry["type"])] = counts.get(str(entry["type"]), 0) + 1
        unlearn_targets = sorted({int(e["partition"]) for e in self.strategy.message_log if e["type"] == "train.unlearn"})
        return {"messages_by_type": counts, "train_unlearn_sent_to": unlearn_targets, "log": self.strategy.message_log}


def build_server_app(
    bound_config: dict[str, Any] | None = None,
    on_round: RoundCallback | None = None,
    on_record: Callable[[RunRecord], None] | None = None,
    on_phase: PhaseCallback | None = None,
) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = bound_config if bound_config is not None else run_config.resolve(context.run_config)
        record = FederatedJob(grid, config, on_round, on_phase).run()
        if on_record is not None:
            on_record(record)

    return app


# Entry point for `flwr run` (pyproject's [tool.flwr.app.components]).
app = build_server_app()
