"""The simulation on an existing Ray cluster (``ray-address``): a real ``ray start --head`` on this machine,
a run against it, and the head stopped by its own pid (never ``ray stop``, which stops every Ray on the machine)."""

import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from fedunlearn import config as run_config
from fedunlearn.environment import RAY_TEMP_DIR_MAX_LENGTH
from fedunlearn.errors import ConfigError
from simulations.processes import free_port
from simulations.runner import backend_config

RAY = Path(sys.executable).with_name("ray")
JOB = (
    "dataset=mnist1d mnist1d-samples=2000 model=logreg num-clients=4 num-rounds=2 local-epochs=1 lr=0.05 "
    "unlearn-methods=hf-kcu mia-shadows=0 retrain-cache=false seed=1"
)


def _psutil():
    try:
        import psutil
    except ImportError:
        # Ray ships psutil in ray/thirdparty_files and puts that folder on sys.path when imported.
        import ray  # noqa: F401

        psutil = importlib.import_module("psutil")
    return psutil


def _environment(cache: Path, **extra: str) -> dict[str, str]:
    # A cluster's workers get the environment of `ray start`, not of the driver (Flower forwards only
    # PYTHONPATH): the project cache must be set there for them to find the cached data set.
    env = dict(os.environ, FEDUNLEARN_CACHE=str(cache), RAY_USAGE_STATS_ENABLED="0", COLUMNS="120")
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


@contextmanager
def ray_head(cache: Path, stopped: list):
    """A Ray head on 127.0.0.1 with 2 CPUs and its own temp dir under the project cache.

    Every port that has a fixed default (client server 10001, dashboard 8265, agent 52365) gets a
    free one, so this head cannot collide with another Ray on the machine.
    """
    # Ray's Unix sockets live under the temp dir and their paths must stay under 107 bytes.
    temp_dir = cache / "rh"
    if len(str(temp_dir)) > RAY_TEMP_DIR_MAX_LENGTH:
        temp_dir = Path(tempfile.mkdtemp(prefix="fu-rh-"))
    port = free_port()
    command = [
        str(RAY), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
        "--num-cpus", "2", "--num-gpus", "0", "--temp-dir", str(temp_dir), "--include-dashboard=false",
        "--ray-client-server-port", str(free_port()), "--dashboard-port", str(free_port()),
        "--dashboard-agent-listen-port", str(free_port()),
    ]
    with open(cache / "ray-head.log", "w") as log:
        # --block keeps `ray start` in the foreground: its SIGTERM handler stops every process of this node.
        head = subprocess.Popen(command, env=_environment(cache), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while not (temp_dir / "ray_current_cluster").exists():
                if head.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"ray start --head did not come up: {(cache / 'ray-head.log').read_text()[-3000:]}")
                time.sleep(0.5)
            yield f"127.0.0.1:{port}", temp_dir
        finally:
            stopped.extend(_stop(head))


def _stop(head: subprocess.Popen) -> list:
    """SIGTERM to the head's pid; returns the processes it started that were still alive after 60 s."""
    psutil = _psutil()
    try:
        started = psutil.Process(head.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        started = []
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait()
    _, alive = psutil.wait_procs(started, timeout=60)
    for process in alive:  # only processes this head started, by pid
        process.kill()
    return alive


def _run(cache: Path, cwd: Path, out: Path, overrides: str, **env: str) -> tuple[subprocess.CompletedProcess, int]:
    process = subprocess.Popen(
        [sys.executable, "-m", "fedunlearn.cli", "run", "--run-config", f"{JOB} {overrides}", "--out", str(out)],
        cwd=cwd, env=_environment(cache, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    stdout, stderr = process.communicate(timeout=900)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), process.pid


def _driver_logs(temp_dir: Path, pid: int) -> list[Path]:
    # Ray names each connected driver's core log after its pid, in the session of the cluster it joined.
    return list((temp_dir / "session_latest" / "logs").glob(f"python-core-driver-*_{pid}.log"))


def _local_sessions(cache: Path) -> set[str]:
    from fedunlearn.environment import ray_temp_dir

    return {path.name for path in ray_temp_dir().glob("session_*") if path.name != "session_latest"}


def _comparable(results: dict) -> dict:
    rounds = [{k: v for k, v in entry.items() if k != "seconds"} for entry in results["rounds"]]
    methods = {
        name: {k: values.get(k) for k in ("test_accuracy", "forget_accuracy", "retain_accuracy", "kl_to_retrain")}
        for name, values in results["methods"].items()
    }
    return {"rounds": rounds, "methods": methods, "partitions": results["partitions"]}


@pytest.mark.simulation
def test_a_run_joins_an_existing_ray_cluster_and_matches_a_local_run(project_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDUNLEARN_CACHE", str(project_cache))
    leftovers: list = []
    with ray_head(project_cache, leftovers) as (address, head_temp_dir):
        sessions_before = _local_sessions(project_cache)
        on_cluster, cluster_pid = _run(project_cache, tmp_path, tmp_path / "cluster", f"ray-address={address}")
        assert on_cluster.returncode == 0, on_cluster.stderr[-3000:]
        assert _driver_logs(head_temp_dir, cluster_pid), "the run did not connect to the cluster's head"
        assert _local_sessions(project_cache) == sessions_before, "the run started a local Ray instead"
        assert list((head_temp_dir / "session_latest" / "logs").glob("python-core-worker-*.log"))  # clients ran there

        # An empty ray-address starts a local Ray even when $RAY_ADDRESS names this cluster.
        local, local_pid = _run(project_cache, tmp_path, tmp_path / "local", "", RAY_ADDRESS=address)
        assert local.returncode == 0, local.stderr[-3000:]
        assert not _driver_logs(head_temp_dir, local_pid)
        assert len(_local_sessions(project_cache) - sessions_before) == 1
    assert leftovers == [], f"processes of the head still alive after SIGTERM: {leftovers}"

    cluster_results = json.loads((tmp_path / "cluster" / "results.json").read_text())
    local_results = json.loads((tmp_path / "local" / "results.json").read_text())
    assert cluster_results["config"]["ray-address"] == address
    assert cluster_results["methods"]["retrain"]["retrain_from_cache"] is False
    # Same seed, same code, one CPU per client either way: the same numbers.
    assert _comparable(cluster_results) == _comparable(local_results)


def test_ray_address_is_passed_to_ray_init_and_checked():
    local = backend_config(run_config.resolve({}))["init_args"]
    assert local["address"] == "local" and "_temp_dir" in local
    remote = backend_config(run_config.resolve({"ray-address": "10.0.0.5:6379", "client-num-gpus": 0.5}))
    assert remote["init_args"]["address"] == "10.0.0.5:6379" and "_temp_dir" not in remote["init_args"]
    assert remote["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.5}
    assert backend_config(run_config.resolve({"ray-address": "auto"}))["init_args"]["address"] == "auto"
    for bad in ("ray://10.0.0.5:10001", "10.0.0.5", "head:port"):
        with pytest.raises(ConfigError) as caught:
            run_config.resolve({"ray-address": bad})
        assert caught.value.key == "ray-address" and "empty, auto or HOST:PORT" in caught.value.one_line()
