"""ServerApp: identify clients, run FedAvg with server-side test evaluation every round, write results.

Under ``flwr run`` the config comes from ``context.run_config``; the CLI, which uses
``flwr.simulation.run_simulation`` (no run config there), binds it with :func:`build_server_app`
along with a progress callback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedunlearn import config as run_config
from fedunlearn.data import load_dataset
from fedunlearn.models import build_model
from fedunlearn.results import RunRecord
from fedunlearn.training import derive_seed, evaluate, resolve_device
from strategies.fedavg import UnlearningFedAvg

RoundCallback = Callable[[int, dict[str, Any]], None]

logger = logging.getLogger("fedunlearn")


def run_federated_training(grid: Grid, config: dict[str, Any], on_round: RoundCallback | None = None) -> RunRecord:
    record = RunRecord(config=config)
    data = load_dataset(config["dataset"], config["data-dir"], config["download"])
    device = resolve_device(config["device"])
    torch.manual_seed(derive_seed(config["seed"], "init"))
    global_model = build_model(config["model"], data.input_shape, data.num_classes)

    strategy = UnlearningFedAvg(
        num_clients=config["num-clients"],
        seed=derive_seed(config["seed"], "sampling"),
        fraction_train=config["fraction-train"],
        fraction_evaluate=config["fraction-evaluate"],
    )
    clients = strategy.discover_clients(grid)
    record.partitions = {
        "scheme": config["partition"],
        "num_clients": len(clients),
        "train_examples": sum(info.num_examples for info in clients.values()),
        "sizes": [info.num_examples for info in clients.values()],
        "label_histograms": [list(info.label_histogram) for info in clients.values()],
    }

    def evaluate_on_test_set(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        global_model.load_state_dict(arrays.to_torch_state_dict())
        scores = evaluate(global_model, data.test, device)
        entry = record.round_entry(server_round)
        client_metrics = strategy.client_metrics.get(server_round, {})
        if "train-loss" in client_metrics:
            entry["train_loss"] = client_metrics["train-loss"]
        if "local-accuracy" in client_metrics:
            entry["local_accuracy"] = client_metrics["local-accuracy"]
        entry.update(test_loss=scores["loss"], test_accuracy=scores["accuracy"], seconds=round(record.elapsed(), 3))
        if on_round is not None:
            on_round(server_round, entry)
        return MetricRecord({"test-loss": scores["loss"], "test-accuracy": scores["accuracy"]})

    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(global_model.state_dict()),
        num_rounds=config["num-rounds"],
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
        evaluate_fn=evaluate_on_test_set,
    )
    trained_state = result.arrays.to_torch_state_dict()
    global_model.load_state_dict(trained_state)
    final = record.rounds[-1]
    record.models["original"] = {
        "test_accuracy": final["test_accuracy"],
        "test_loss": final["test_loss"],
        "seconds": final["seconds"],
    }
    out_dir = Path(config["out-dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(trained_state, out_dir / "global_model.pt")
    record.write(out_dir)
    return record


def build_server_app(
    bound_config: dict[str, Any] | None = None,
    on_round: RoundCallback | None = None,
    on_record: Callable[[RunRecord], None] | None = None,
) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = bound_config if bound_config is not None else run_config.resolve(context.run_config)
        record = run_federated_training(grid, config, on_round)
        if on_record is not None:
            on_record(record)

    return app


# Entry point for `flwr run` (pyproject's [tool.flwr.app.components]).
app = build_server_app()
