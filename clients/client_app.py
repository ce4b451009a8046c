"""ClientApp: ``train`` and ``evaluate`` on the Message API.

A client learns which partition it holds from ``context.node_config`` (``partition-id``,
``num-partitions``, and optionally its own ``data-dir``) and everything else from the run config. Under ``flwr run`` that is
``context.run_config``; ``flwr.simulation.run_simulation`` passes no run config, so the CLI binds
the resolved config when it builds the app (:func:`build_client_app`).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedunlearn import config as run_config
from fedunlearn.federation import Federation, build_federation
from fedunlearn.training import derive_seed, loss_and_accuracy, resolve_device, train_local
from fedunlearn.unlearning import ClientContext, client_queries, create_method
from fedunlearn.unlearning.objective import batches_of


RUN_OVERRIDES = "run-overrides"


def _federation_for(context: Context, bound_config: dict[str, Any] | None, message: Message | None = None) -> tuple[Federation, int]:
    config = bound_config if bound_config is not None else run_config.resolve(context.run_config)
    if message is not None and "config" in message.content and RUN_OVERRIDES in message.content["config"]:
        # One job, several runs (seeds, each client deleted in turn): the server says which run this is.
        config = run_config.resolve(config, json.loads(str(message.content["config"][RUN_OVERRIDES])))
    if "data-dir" in context.node_config:
        # On a deployment each data holder keeps its data where it likes (flower-supernode
        # --node-config); the run config's data-dir, the same for every node, is only the default.
        config = dict(config, **{"data-dir": str(context.node_config["data-dir"])})
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    return build_federation(config, num_partitions=num_partitions), partition_id


def _shuffling_seed(seed: int, server_round: int, partition_id: int, message: Message) -> int:
    """The local shuffling seed; a ``shuffle-salt`` in the message gives other training randomness
    on the same data (the noise floor's second retrain)."""
    salt = message.content["config"].get("shuffle-salt", "") if "config" in message.content else ""
    return derive_seed(seed, "train", server_round, partition_id, *([str(salt)] if salt else []))


def _client_identity(partition_id: int) -> ConfigRecord:
    # Ids go in a ConfigRecord: FedAvg would average every MetricRecord key.
    return ConfigRecord({"partition-id": partition_id})


def build_client_app(bound_config: dict[str, Any] | None = None) -> ClientApp:
    app = ClientApp()

    @app.query("identify")
    def identify(message: Message, context: Context) -> Message:
        """Tell the server which partition this node holds (it routes deletions by it)."""
        federation, partition_id = _federation_for(context, bound_config, message)
        histogram = federation.partitioning.label_histogram(partition_id, federation.data.train_labels, federation.data.num_classes)
        record = _client_identity(partition_id)
        record["num-examples"] = len(federation.partitioning.rows_of(partition_id))
        record["label-histogram"] = histogram
        return Message(content=RecordDict({"client": record}), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        federation, partition_id = _federation_for(context, bound_config, message)
        config = federation.config
        server_round = int(message.content["config"]["server-round"])
        model = federation.new_model()
        model.load_state_dict(message.content["arrays"].to_torch_state_dict())
        local_data = federation.client_data(partition_id)
        settings = federation.local_training_for(server_round)  # lr-decay: the lr of this round
        if "local-epochs" in message.content["config"]:  # FedEraser's shorter calibration training
            settings = replace(settings, epochs=int(message.content["config"]["local-epochs"]))
        device = resolve_device(config["device"])
        train_loss = train_local(
            model,
            local_data,
            settings,
            device,
            seed=_shuffling_seed(config["seed"], server_round, partition_id, message),
        )
        identity = _client_identity(partition_id)
        # device=auto resolves on each node, and Ray decides which GPUs a client sees: the reply says
        # where training really ran (tests check GPU placement with it).
        identity["device"] = str(device)
        content = RecordDict(
            {
                "arrays": ArrayRecord(model.cpu().state_dict()),
                "metrics": MetricRecord({"train-loss": train_loss, "num-examples": len(local_data)}),
                "client": identity,
            }
        )
        return Message(content=content, reply_to=message)

    @app.evaluate()
    def evaluate_local(message: Message, context: Context) -> Message:
        federation, partition_id = _federation_for(context, bound_config, message)
        model = federation.new_model()
        model.load_state_dict(message.content["arrays"].to_torch_state_dict())
        local_data = federation.client_data(partition_id)
        scores = loss_and_accuracy(model, local_data, resolve_device(federation.config["device"]))
        content = RecordDict(
            {
                "metrics": MetricRecord(
                    {"local-loss": scores["loss"], "local-accuracy": scores["accuracy"], "num-examples": len(local_data)}
                ),
                "client": _client_identity(partition_id),
            }
        )
        return Message(content=content, reply_to=message)

    @app.train("unlearn")
    def unlearn(message: Message, context: Context) -> Message:
        """Run the requested method on this client's own data (all of it: client-grain deletion)."""
        federation, partition_id = _federation_for(context, bound_config, message)
        request = message.content["config"]
        method = create_method(str(request["method"]), federation.config)
        device = resolve_device(federation.config["device"])
        model = federation.new_model()
        model.load_state_dict(message.content["arrays"].to_torch_state_dict())
        model.to(device)
        forget_data = federation.client_data(partition_id)
        forget_batches = _on_device(batches_of(forget_data, federation.config["curvature-batch-size"]), device)
        start = time.perf_counter()
        client_context = ClientContext(
            partition_id=partition_id,
            num_examples=len(forget_data),
            # Influence-step methods send these two; others (pga) need not.
            total_examples=int(request.get("num-total-examples", 0)),
            influence_weight=len(forget_data) * float(request.get("influence-weight-per-example", 0.0)),
            seed=int(federation.config["seed"]),
            device=device,
            request=dict(request),
        )
        update = method.solve(model, forget_batches, client_context)
        seconds = time.perf_counter() - start
        identity = _client_identity(partition_id)
        identity["diagnostics"] = json.dumps(update.diagnostics, default=_jsonable)
        if update.epsilon is not None:
            identity["epsilon"] = float(update.epsilon)
        content = RecordDict(
            {
                "update": ArrayRecord({name: d.detach().cpu().contiguous() for name, d in zip(update.param_names, update.delta)}),
                "metrics": MetricRecord(
                    {
                        "num-examples": update.num_forget_examples,
                        "forget-gradient-norm": update.forget_gradient_norm,
                        "seconds": seconds,
                    }
                ),
                "client": identity,
            }
        )
        return Message(content=content, reply_to=message)

    def answer_query(compute, message: Message, context: Context) -> Message:
        """``query.<kind>``: the registered query function on this client's data at the model sent."""
        federation, partition_id = _federation_for(context, bound_config, message)
        device = resolve_device(federation.config["device"])
        model = federation.new_model()
        model.load_state_dict(message.content["arrays"].to_torch_state_dict())
        model.to(device)
        message_config = message.content["config"]
        names = [str(name) for name in message_config["param-names"]]
        vector = None
        if "vector" in message.content:
            vector_record = message.content["vector"].to_torch_state_dict()
            vector = [vector_record[name].to(device) for name in names]
        local_data = federation.client_data(partition_id)
        batches = _on_device(batches_of(local_data, federation.config["curvature-batch-size"]), device)
        if bool(message_config.get("float64", False)):  # exact arithmetic for the release certificate (unlearning/certify.py)
            model.double()
            batches = [(inputs.double(), targets) for inputs, targets in batches]
            vector = None if vector is None else [v.double() for v in vector]
        result = compute(model, names, batches, message_config, vector)
        content = RecordDict(
            {
                "result": ArrayRecord({name: r.detach().cpu().contiguous() for name, r in _named(result, names).items()}),
                "metrics": MetricRecord({"num-examples": len(local_data)}),
                "client": _client_identity(partition_id),
            }
        )
        return Message(content=content, reply_to=message)

    # Every query a method registered (gradient, curvature, fisher, ...): one handler each.
    for kind, compute in client_queries().items():
        app.query(kind)(functools.partial(answer_query, compute))

    return app


def _named(result, names) -> dict:
    """A query's answer by name: parameter-shaped lists follow ``names``; a mapping (e.g. KFAC
    factors per layer) keeps its own keys."""
    return dict(result) if isinstance(result, Mapping) else dict(zip(names, result))


def _on_device(batches, device):
    return [(inputs.to(device), targets.to(device)) for inputs, targets in batches]


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)


# Entry point for `flwr run` (pyproject's [tool.flwr.app.components]).
app = build_client_app()
