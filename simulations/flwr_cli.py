"""Flower's processes and its ``flwr`` CLI, as the local runs use them: the environment, a connection in
``FLWR_HOME``, ``flower-superlink`` / ``flower-supernode``, ``flwr supernode register|list``, ``flwr run``
and the run's final status from ``flwr ls`` (``flwr run --stream`` exits 0 even on a failed run).

Every ``flwr`` command that fails raises :class:`~simulations.processes.ProcessFailed` with its output.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedunlearn import config as run_config
from fedunlearn.environment import prepare_environment
from simulations.credentials import Certificates
from simulations.processes import LOOPBACK, ProcessFailed, start_process, stop_processes, wait_for_port

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FINISHED = "finished:completed"


def flwr_env() -> dict[str, str]:
    """The environment of every Flower process we start (FLWR_HOME in the project cache, telemetry off)."""
    prepare_environment()
    env = dict(os.environ)
    # SuperLink and SuperNodes start flower-superexec, flwr-serverapp / flwr-simulation and
    # flwr-clientapp from PATH: this environment's.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # Log lines must reach the log files as they happen: we wait on them.
    env["PYTHONUNBUFFERED"] = "1"
    return env


def config_text(values: Mapping[str, object]) -> str:
    """``key=value ...`` with TOML values, as ``--run-config`` and ``--node-config`` take them."""
    return " ".join(f"{key}={run_config.toml_value(value)}" for key, value in values.items())


def write_connection(flwr_home: Path, name: str, address: str, root_certificates: Path | None = None) -> None:
    """The ``flwr`` CLI's default connection ``name`` to the SuperLink at ``address``: TLS trusting
    ``root_certificates``, or ``insecure`` (plain loopback) without them."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = f'root-certificates = "{root_certificates.resolve()}"' if root_certificates else "insecure = true"
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{security}\n'
    )


def start_superlink(
    env: dict[str, str],
    port: int,
    log_file: Path,
    *,
    certificates: Certificates | None = None,
    simulation: bool = False,
    host: str = LOOPBACK,
    timeout: float = 120.0,
) -> subprocess.Popen:
    """flower-superlink, listening once this returns; Fleet, Control and Runtime APIs share ``port``.

    With ``certificates``: TLS and SuperNode authentication; without: ``--insecure``.
    ``simulation``: the simulation runtime instead of SuperNodes. If it does not listen within
    ``timeout`` it is stopped and :class:`ProcessFailed` raised.
    """
    command = ["flower-superlink"]
    if certificates is None:
        command += ["--insecure"]
    else:
        command += [
            "--ssl-ca-certfile", str(certificates.ca),
            "--ssl-certfile", str(certificates.cert),
            "--ssl-keyfile", str(certificates.key),
            "--enable-supernode-auth",
        ]
    if simulation:
        command += ["--simulation"]
    command += [
        "--isolation", "subprocess",
        # Without it the SuperLink runs `uv sync` on the app and installs a CUDA torch.
        "--disable-runtime-dependency-installation",
        "--host", host, "--port", str(port),
    ]
    superlink = start_process(command, env, log_file)
    try:
        wait_for_port(port, superlink, log_file, timeout=timeout)
    except ProcessFailed:
        stop_processes([superlink])
        raise
    return superlink


def start_supernode(
    env: dict[str, str],
    superlink_address: str,
    root_certificates: Path,
    private_key: Path | None,
    node_config: dict[str, object],
    runtime_port: int,
    log_file: Path,
) -> subprocess.Popen:
    """flower-supernode over TLS, signing its requests with ``private_key`` (None: no key of its own)."""
    command = [
        "flower-supernode",
        "--superlink", superlink_address,
        "--root-certificates", str(root_certificates),
        "--node-config", config_text(node_config),
        "--isolation", "subprocess",
        # Its Runtime API (for its own ClientApp processes) stays on loopback; one port per SuperNode.
        "--host", LOOPBACK, "--port", str(runtime_port),
    ]
    if private_key is not None:
        command += ["--auth-supernode-private-key", str(private_key)]
    return start_process(command, env, log_file)


def _parsed(what: str, stdout: str, stderr: str, returncode: int | None, read):
    """``read(json.loads(stdout))``, or :class:`ProcessFailed` naming the command and its output."""
    try:
        return read(json.loads(stdout))
    except (ValueError, KeyError, IndexError, TypeError) as error:
        raise ProcessFailed(f"{what} failed (exit {returncode}): {(stdout + stderr).strip()[-500:]}") from error


def _flwr_json(env: dict[str, str], arguments: list[str], what: str, read):
    """``flwr <arguments> --format json``, its answer read by ``read``."""
    completed = subprocess.run(
        ["flwr", *arguments, "--format", "json"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    return _parsed(what, completed.stdout, completed.stderr, completed.returncode, read)


def register_supernodes(env: dict[str, str], public_keys: list[Path], connection: str) -> list[int]:
    """Register SuperNodes' public keys with the SuperLink (``flwr supernode register``); return their node ids.

    The registrations run side by side: each is a ``flwr`` process that spends seconds importing.
    """
    commands = [["flwr", "supernode", "register", str(key), connection, "--format", "json"] for key in public_keys]
    running = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for command in commands]
    node_ids = []
    for key, process in zip(public_keys, running):
        try:
            stdout, stderr = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        what = f"flwr supernode register {key}"
        node_ids.append(_parsed(what, stdout, stderr, process.returncode, lambda answer: int(answer["node-id"])))
    return node_ids


def list_supernodes(env: dict[str, str], connection: str) -> list[dict]:
    return _flwr_json(env, ["supernode", "list", connection], "flwr supernode list", lambda answer: list(answer["nodes"]))


def run_status(env: dict[str, str], run_id: str, connection: str) -> str:
    """The SuperLink's status of run ``run_id`` (``finished:completed`` when it succeeded)."""
    what = f"flwr ls --run-id {run_id}"
    return _flwr_json(env, ["ls", connection, "--run-id", run_id], what, lambda answer: str(answer["runs"][0]["status"]))


@dataclass
class RunOutcome:
    run_id: str
    status: str
    log_file: Path
    returncode: int | None  # of `flwr run` (None: it did not end within the timeout)

    @property
    def completed(self) -> bool:
        return self.status == FINISHED


def run_app(
    env: dict[str, str],
    connection: str,
    overrides: dict[str, object],
    log_file: Path,
    federation_config: str | None = None,
    timeout: float | None = None,
) -> RunOutcome:
    """``flwr run <project> <connection> --stream`` (its output to ``log_file``), then the final status
    from ``flwr ls``; :class:`ProcessFailed` if no run started."""
    command = ["flwr", "run", str(PROJECT_ROOT), connection, "--run-config", config_text(overrides)]
    if federation_config is not None:
        command += ["--federation-config", federation_config]
    try:
        streamed = subprocess.run(command + ["--stream"], env=env, capture_output=True, text=True, timeout=timeout, check=False)
        output, returncode = streamed.stdout + streamed.stderr, streamed.returncode
    except subprocess.TimeoutExpired as expired:
        output = _text(expired.stdout) + _text(expired.stderr) + f"\n(flwr run did not end within {timeout:.0f} s)\n"
        returncode = None
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.write_text(output)
    found = re.search(r"Successfully started run (\d+)", output)
    if not found:
        raise ProcessFailed(f"flwr run did not start a run (exit {returncode}); see {log_file}")
    return RunOutcome(found.group(1), run_status(env, found.group(1), connection), log_file, returncode)


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value
