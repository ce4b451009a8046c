"""GPU placement: clients train where ``device`` says, with the GPUs Ray gives them (``client-num-gpus``).

The CUDA tests run only where ``torch.cuda.is_available()``; on a CPU-only machine the CPU-side tests
check that ``device=cuda`` is refused in one line before Ray starts, and that the train replies carry
the device the client trained on (the evidence the CUDA test relies on).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine (torch.cuda.is_available() is False)")
needs_no_cuda = pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA, so device=cuda is valid here")

SMALL_JOB = "num-clients=4 num-rounds=3 local-epochs=2 lr=0.05 seed=2 unlearn-methods=hf-kcu mia-shadows=0 retrain-cache=false"

# One train message to every node through the project's real ClientApp on Flower's Ray backend;
# prints {partition id: the device its train reply names}.
TRAIN_ONCE = """
import json, sys, time
from fedunlearn.environment import prepare_environment, quiet_logging
prepare_environment()
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation
quiet_logging()
from fedunlearn import config as run_config
from fedunlearn.federation import build_federation
from clients.client_app import build_client_app
from simulations.runner import backend_config

config = run_config.resolve(run_config.parse_overrides(sys.argv[1]))
devices = {}
server = ServerApp()

@server.main()
def main(grid, context):
    while len(nodes := sorted(grid.get_node_ids())) < config["num-clients"]:
        time.sleep(0.2)
    state = build_federation(config).initial_model().state_dict()
    record = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord({"server-round": 1})})
    messages = [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=node) for node in nodes]
    for reply in grid.send_and_receive(messages, timeout=600):
        if reply.has_error():
            devices["error"] = reply.error.reason
        else:
            devices[int(reply.content["client"]["partition-id"])] = str(reply.content["client"]["device"])

run_simulation(server_app=server, client_app=build_client_app(bound_config=config),
               num_supernodes=config["num-clients"], backend_config=backend_config(config))
print("DEVICES " + json.dumps(devices))
"""


def _environment(project_cache: Path) -> dict[str, str]:
    return dict(os.environ, FEDUNLEARN_CACHE=str(project_cache), COLUMNS="160")


def _train_devices(project_cache: Path, tmp_path: Path, overrides: str) -> dict[str, str]:
    script = tmp_path / "train_once.py"
    script.write_text(TRAIN_ONCE)
    completed = subprocess.run(
        [sys.executable, str(script), f"num-clients=2 {overrides}"],
        cwd=tmp_path, env=_environment(project_cache), capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    line = next(line for line in completed.stdout.splitlines() if line.startswith("DEVICES "))
    return json.loads(line.removeprefix("DEVICES "))


def _run(project_cache: Path, out: Path, overrides: str) -> dict:
    completed = subprocess.run(
        [sys.executable, "-m", "fedunlearn.cli", "run", "--run-config", f"{SMALL_JOB} {overrides}", "--out", str(out)],
        env=_environment(project_cache), capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.simulation
def test_train_replies_name_the_device_the_client_trained_on(project_cache, tmp_path):
    assert _train_devices(project_cache, tmp_path, "device=cpu") == {"0": "cpu", "1": "cpu"}


@needs_no_cuda
def test_device_cuda_without_a_gpu_is_one_config_error_line_before_ray_starts(run_cli, project_cache, tmp_path, monkeypatch):
    from fedunlearn.environment import ray_temp_dir

    monkeypatch.setenv("FEDUNLEARN_CACHE", str(project_cache))  # so ray_temp_dir() names the run's
    sessions = set(ray_temp_dir().glob("session_*"))
    completed = run_cli("run", "--run-config", "device=cuda num-rounds=1", "--out", "out")
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [
        "fedunlearn: bad value for 'device': 'cuda' (no CUDA device on this node); valid: auto, cpu"
    ]
    assert set(ray_temp_dir().glob("session_*")) == sessions  # refused before Ray started
    assert not (tmp_path / "out").exists()


@needs_cuda
@pytest.mark.simulation
def test_clients_train_on_half_a_gpu_each(project_cache, tmp_path):
    devices = _train_devices(project_cache, tmp_path, "device=cuda client-num-gpus=0.5")
    assert devices == {"0": "cuda", "1": "cuda"}


@needs_cuda
@pytest.mark.simulation
def test_a_cuda_run_matches_a_cpu_run_within_float_tolerance(project_cache, tmp_path):
    on_cpu = _run(project_cache, tmp_path / "cpu", "device=cpu")
    on_gpu = _run(project_cache, tmp_path / "gpu", "device=cuda client-num-gpus=0.5")
    assert on_gpu["config"]["device"] == "cuda" and on_gpu["config"]["client-num-gpus"] == 0.5
    assert on_gpu["partitions"] == on_cpu["partitions"]
    # Different kernels sum in different orders: the runs agree to float tolerance, not bit for bit.
    for gpu_round, cpu_round in zip(on_gpu["rounds"], on_cpu["rounds"], strict=True):
        assert gpu_round["test_loss"] == pytest.approx(cpu_round["test_loss"], rel=2e-2, abs=1e-3)
        assert gpu_round["test_accuracy"] == pytest.approx(cpu_round["test_accuracy"], abs=0.02)
    for method in ("original", "retrain", "hf-kcu"):
        assert on_gpu["methods"][method]["test_accuracy"] == pytest.approx(on_cpu["methods"][method]["test_accuracy"], abs=0.03)
