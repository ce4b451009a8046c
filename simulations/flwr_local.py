"""Run the app with ``flwr run .`` on a SuperLink of our own (simulation runtime), then stop it.

Flower's default local connection starts a detached SuperLink that runs ``uv sync`` and downloads a
CUDA build of torch. This starts ``flower-superlink --simulation`` with runtime dependency
installation disabled on a free loopback port, points a connection at it from ``FLWR_HOME`` in the
project cache, streams the run, checks its final status with ``flwr ls`` (``flwr run --stream``
exits 0 even on a failed run) and stops the SuperLink and its children, by process group.

    python -m simulations.flwr_local --run-config "num-rounds=5" [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedunlearn import config as run_config
from fedunlearn.environment import prepare_environment

CONNECTION = "fedunlearn-local"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_connection(flwr_home: Path, port: int) -> None:
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )


def wait_for_port(port: int, process: subprocess.Popen, log_file: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {process.returncode}; see {log_file}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise RuntimeError(f"flower-superlink did not listen on port {port} within {timeout:.0f} s; see {log_file}")


def stop_process_group(process: subprocess.Popen) -> None:
    """Stop the SuperLink we started and everything it started (its own session)."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def run_status(env: dict[str, str], run_id: str) -> str:
    listing = subprocess.run(
        ["flwr", "ls", CONNECTION, "--run-id", run_id, "--format", "json"],
        env=env, capture_output=True, text=True, check=True,
    )
    return json.loads(listing.stdout)["runs"][0]["status"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-config", default="", help="run-config overrides, as for `fedunlearn run`")
    parser.add_argument("--out", help="output directory (absolute; default: runs/flwr-<time>)")
    args = parser.parse_args(argv)

    overrides = run_config.parse_overrides(args.run_config)
    out_dir = Path(args.out or f"runs/flwr-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    overrides["out-dir"] = str(out_dir)
    config = run_config.resolve(overrides)  # fail here, in one line, before anything starts

    cache = prepare_environment()
    env = dict(os.environ)
    # The SuperLink starts `flower-superexec` and `flwr-simulation` from PATH: use this environment's.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    port = free_port()
    write_connection(Path(env["FLWR_HOME"]), port)
    log_file = cache / "superlink.log"
    with open(log_file, "w") as log:
        superlink = subprocess.Popen(
            [
                "flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
                "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port),
            ],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        wait_for_port(port, superlink, log_file)
        run_config_text = " ".join(f"{key}={run_config.toml_value(value)}" for key, value in overrides.items())
        federation_config = (
            f"num-supernodes={config['num-clients']} "
            # The SuperLink's simulation config holds whole CPUs only (fractions work in `fedunlearn run`).
            f"client-resources-num-cpus={math.ceil(config['client-num-cpus'])} "
            f"client-resources-num-gpus={config['client-num-gpus']}"
        )
        streamed = subprocess.run(
            ["flwr", "run", str(PROJECT_ROOT), CONNECTION, "--run-config", run_config_text,
             "--federation-config", federation_config, "--stream"],
            env=env, capture_output=True, text=True,
        )
        (cache / "flwr-run.log").write_text(streamed.stdout + streamed.stderr)
        found = re.search(r"Successfully started run (\d+)", streamed.stdout + streamed.stderr)
        if streamed.returncode != 0 or not found:
            print(f"flwr run failed (exit {streamed.returncode}); log: {cache / 'flwr-run.log'}", file=sys.stderr)
            return 1
        status = run_status(env, found.group(1))
        print(f"run {found.group(1)}: {status}; results in {out_dir}/results.json; log: {cache / 'flwr-run.log'}")
        return 0 if status == "finished:completed" else 1
    finally:
        stop_process_group(superlink)
        print(f"stopped flower-superlink (pid {superlink.pid}) and its process group")


if __name__ == "__main__":
    sys.exit(main())
