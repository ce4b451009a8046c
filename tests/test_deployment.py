"""The app on Flower's deployment engine: a TLS SuperLink with SuperNode authentication and two
authenticated SuperNodes on loopback (simulations/deploy_local.py), a real ``flwr run``, a deletion."""

import json
import os
import socket
import ssl
import subprocess
import time

import pytest
from flwr.app import Context, RecordDict

from clients.client_app import _federation_for
from fedunlearn.data import datasets as data_module
from fedunlearn.errors import ConfigError
from simulations import deploy_local, flwr_cli, processes
from simulations.credentials import make_supernode_keys
from tests.test_torchvision_loaders import _write_mnist_layout

NUM_CLIENTS = 2
RUN_CONFIG = {
    "num-clients": NUM_CLIENTS,
    "num-rounds": 2,
    "model": "logreg",
    "forget-clients": "0",
    "unlearn-methods": "hf-kcu",
    "mia-shadows": 0,
    "retrain-cache": False,
    # A lost node fails the run in minutes, not after Flower's default hour.
    "round-timeout": 300.0,
    "unlearn-timeout": 300.0,
}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """SuperLink + 2 registered SuperNodes; every process it started is stopped, also on failure."""
    root = tmp_path_factory.mktemp("deploy")
    with pytest.MonkeyPatch.context() as patch:
        # prepare_environment() writes FLWR_HOME & co. into os.environ: keep that out of other tests.
        patch.setattr(os, "environ", dict(os.environ, FEDUNLEARN_CACHE=str(root / "cache")))
        env = flwr_cli.flwr_env()
    local = deploy_local.LocalDeployment(root / "deploy", NUM_CLIENTS, data_dir=root / "node-data", env=env)
    try:
        local.start()
        yield local
    finally:
        local.stop()


def _started_pids(local) -> set[int]:
    started = {process.pid for process in local.processes}
    return started | processes.descendants_of(started)


@pytest.mark.simulation
def test_superlink_speaks_tls_with_a_certificate_for_the_loopback_address(deployment):
    context = ssl.create_default_context(cafile=str(deployment.certificates.ca))
    with (
        socket.create_connection(("127.0.0.1", deployment.port), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,  # verifies the chain and the SAN
    ):
        assert ("IP Address", "127.0.0.1") in tls.getpeercert()["subjectAltName"]
    # And nothing else: a client that does not trust our CA is refused during the handshake.
    with (
        socket.create_connection(("127.0.0.1", deployment.port), timeout=30) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")


@pytest.mark.simulation
def test_supernode_without_a_registered_key_is_refused(deployment):
    nodes = {node["node-id"]: node["status"] for node in deployment.list_supernodes()}
    assert nodes == {str(node_id): "online" for node_id in deployment.node_ids}

    private_key, _ = make_supernode_keys(deployment.directory / "keys", "stranger")
    log_file = deployment.logs / "stranger.log"
    stranger = deployment.start_supernode(private_key, {"partition-id": 1, "num-partitions": NUM_CLIENTS}, log_file)
    # The SuperLink answers its activation with 412 "No SuperNode found with the given public key",
    # which the SuperNode does not retry: it exits (Flower exit code 305).
    try:
        stranger.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"an unregistered SuperNode was still running after 120 s; see {log_file}")
    log = log_file.read_text()
    assert stranger.returncode != 0, log
    assert "Failed to activate SuperNode" in log, log
    assert "SuperNode ID" not in log
    nodes_after = {node["node-id"] for node in deployment.list_supernodes()}
    assert nodes_after == {str(node_id) for node_id in deployment.node_ids}


@pytest.mark.simulation
def test_flwr_run_trains_deletes_client_0_on_its_node_only_and_completes(deployment, tmp_path):
    out = tmp_path / "out"
    started = time.monotonic()
    outcome = deployment.run(dict(RUN_CONFIG, **{"out-dir": str(out)}), timeout=600)
    run_log = outcome.log_file.read_text()
    # `flwr run --stream` exits 0 on a failed run: the SuperLink's own record of the run decides.
    assert outcome.status == "finished:completed", f"{outcome.status}; see {outcome.log_file}\n{run_log[-3000:]}"
    print(f"flwr run on the deployment engine: {time.monotonic() - started:.1f} s")

    events = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]
    assert [event["status"] for event in events] == ["pending", "applied"]
    applied = events[1]
    assert applied["clients"] == [0] and applied["affected_clients"] == [0] and applied["method"] == "hf-kcu"

    results = json.loads((out / "results.json").read_text())
    assert [entry["round"] for entry in results["rounds"]] == [0, 1, 2]
    assert len(results["partitions"]["sizes"]) == NUM_CLIENTS
    communication = results["communication"]
    assert communication["train_unlearn_sent_to"] == [0]
    assert communication["messages_by_type"]["train.unlearn"] == 1
    assert {"original", "retrain", "hf-kcu"} <= set(results["methods"])
    for method in ("original", "retrain", "hf-kcu"):
        assert 0.0 <= results["methods"][method]["test_accuracy"] <= 1.0
    assert results["methods"]["retrain"]["retrain_from_cache"] is False

    # The nodes' side of the routing: only partition 0's SuperNode ever received train.unlearn.
    received = {
        partition: (deployment.logs / f"supernode-{partition}.log").read_text().count("Receiving: train.unlearn message")
        for partition in range(NUM_CLIENTS)
    }
    assert received == {0: 1, 1: 0}


@pytest.mark.simulation
def test_stopping_the_deployment_leaves_nothing_running(deployment):
    pids = _started_pids(deployment)
    assert len(pids) >= 1 + NUM_CLIENTS
    deployment.stop()
    assert [pid for pid in pids if processes.alive(pid)] == []


def test_node_config_data_dir_overrides_the_run_config(tmp_path):
    """A SuperNode's --node-config data-dir is where its ClientApp reads the data, not the run config's."""
    node_data = tmp_path / "node-data"
    _write_mnist_layout(node_data, "MNIST", train_count=30, test_count=20)
    run_config = {"dataset": "mnist", "data-dir": str(tmp_path / "empty"), "num-clients": 2, "partition": "iid"}
    data_module._cached_load.cache_clear()
    try:
        with_node_dir = Context(0, 1, {"partition-id": 1, "num-partitions": 2, "data-dir": str(node_data)}, RecordDict(), run_config)
        federation, partition_id = _federation_for(with_node_dir, None)
        assert partition_id == 1 and len(federation.data.train) == 30
        assert federation.config["data-dir"] == str(node_data)

        without = Context(0, 1, {"partition-id": 1, "num-partitions": 2}, RecordDict(), run_config)
        with pytest.raises(ConfigError) as refused:
            _federation_for(without, None)
        assert refused.value.key == "data-dir" and refused.value.value == str((tmp_path / "empty").resolve())
    finally:
        data_module._cached_load.cache_clear()
