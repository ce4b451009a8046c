"""ClientApp: ``train`` and ``evaluate`` on the Message API.

A client learns which partition it holds from ``context.node_config`` (``partition-id``,
``num-partitions``) and everything else from the run config. Under ``flwr run`` that is
``context.run_config``; ``flwr.simulation.run_simulation`` passes no run config, so the CLI binds
the resolved config when it builds the app (:func:`build_client_app`).
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedunlearn import config as run_config
from fedunlearn.federation import Federation, build_federation
from fedunlearn.training import derive_seed, evaluate, resolve_device, train_local


def _federation_for(context: Context, bound_config: dict[str, Any] | None) -> tuple[Federation, int]:
    config = bound_config if bound_config is not None else run_config.resolve(context.run_config)
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    return build_federation(config, num_partitions=num_partitions), partition_id


def _client_identity(partition_id: int) -> ConfigRecord:
    # Ids go in a ConfigRecord: FedAvg would average every MetricRecord key.
    return ConfigRecord({"partition-id": partition_id})


def build_client_app(bound_config: dict[str, Any] | None = None) -> ClientApp:
    app = ClientApp()

    @app.query("identify")
    def identify(message: Message, context: Context) -> Message:
        """Tell the server which partition this node holds (it routes deletions by it)."""
        federation, partition_id = _federation_for(context, bound_config)
        histogram = federation.partitioning.label_histograms(federation.data.train_labels, federation.data.num_classes)
        record = _client_identity(partition_id)
        record["num-examples"] = len(federation.partitioning.rows_of(partition_id))
        record["label-histogram"] = histogram[partition_id]
        return Message(content=RecordDict({"client": record}), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        federation, partition_id = _federation_for(context, bound_config)
        config = federation.config
        server_round = int(message.content["config"]["server-round"])
        model = federation.new_model()
        model.load_state_dict(message.content["arrays"].to_torch_state_dict())
        local_data = federation.client_data(partition_id)
        train_loss = train_local(
            model,
            local_data,
            federation.local_training,
            resolve_device(config["device"]),
            seed=derive_seed(config["seed"], "train", server_round, partition_id),
        )
        content = RecordDict(
            {
                "arrays": ArrayRecord(model.cpu().state_dict()),
                "metrics": MetricRecord({"train-loss": train_loss, "num-examples": len(local_data)}),
                "client": _client_identity(partition_id),
            }
        )
        return Message(content=content, reply_to=message)

    @app.evaluate()
    def evaluate_local(message: Message, context: Context) -> Message:
        federation, partition_id = _federation_for(context, bound_config)
        model = federation.new_model()
        model.load_state_dict(message.content["arrays"].to_torch_state_dict())
        local_data = federation.client_data(partition_id)
        scores = evaluate(model, local_data, resolve_device(federation.config["device"]))
        content = RecordDict(
            {
                "metrics": MetricRecord(
                    {"local-loss": scores["loss"], "local-accuracy": scores["accuracy"], "num-examples": len(local_data)}
                ),
                "client": _client_identity(partition_id),
            }
        )
        return Message(content=content, reply_to=message)

    return app


# Entry point for `flwr run` (pyproject's [tool.flwr.app.components]).
app = build_client_app()
