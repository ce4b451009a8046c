"""Run one configured job in-process on Flower's simulation engine (Ray backend)."""

from __future__ import annotations

import logging
from typing import Any

from fedunlearn.environment import prepare_environment, quiet_logging, ray_temp_dir
from fedunlearn.errors import RunFailed
from fedunlearn.summary import StudyRecord


def backend_config(config: dict[str, Any]) -> dict[str, Any]:
    """Flower's RayBackend passes ``init_args`` to ``ray.init`` as keyword arguments."""
    init_args: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False, "include_dashboard": False}
    if config["ray-address"]:
        # Join a running cluster. Its head chose its own temp dir (`ray start --temp-dir`); a
        # driver-side one would only split this run's logs from the cluster's session.
        init_args["address"] = config["ray-address"]
    else:
        # "local", not None: with None, ray.init joins the cluster in $RAY_ADDRESS or the one a
        # `ray start` recorded in the temp dir, if any; an empty ray-address promises a fresh local Ray.
        init_args["address"] = "local"
        init_args["_temp_dir"] = str(ray_temp_dir())
    return {
        "client_resources": {"num_cpus": config["client-num-cpus"], "num_gpus": config["client-num-gpus"]},
        "init_args": init_args,
    }


def check_before_start(config: dict[str, Any]) -> None:
    """What would otherwise fail inside the simulation, after Ray has started: the model against the
    data's input shape, and the device (the server evaluates on it too)."""
    from fedunlearn.federation import build_federation
    from fedunlearn.training import resolve_device

    resolve_device(config["device"])
    build_federation(config).new_model()


def run_job(config: dict[str, Any], on_round=None, on_phase=None, verbose: bool = False) -> StudyRecord:
    """Train (and, in later stages, unlearn and evaluate) as ``config`` says; returns the record."""
    prepare_environment()
    check_before_start(config)
    from flwr.simulation import run_simulation

    quiet_logging(verbose)

    from clients.client_app import build_client_app
    from strategies.server_app import build_server_app

    records: list[StudyRecord] = []
    server_app = build_server_app(bound_config=config, on_round=on_round, on_record=records.append, on_phase=on_phase)
    run_simulation(
        server_app=server_app,
        client_app=build_client_app(bound_config=config),
        num_supernodes=config["num-clients"],
        backend_config=backend_config(config),
        verbose_logging=verbose,
    )
    if not records:
        raise RunFailed("the simulation ended without a result; run again with --verbose to see Flower's log")
    return records[0]
