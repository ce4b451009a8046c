"""Run the app on Flower's deployment engine on this machine: TLS, authenticated SuperNodes, ``flwr run``.

The loopback rehearsal of a multi-machine deployment (docs/deployment.md; ``deploy/`` holds one
script per role for real machines). It makes a self-signed CA and a SuperLink certificate, one
key pair per SuperNode, starts ``flower-superlink`` with TLS and ``--enable-supernode-auth``,
registers every SuperNode's public key with ``flwr supernode register``, starts one
``flower-supernode`` per client (its ``partition-id``, ``num-partitions`` and ``data-dir`` in
``--node-config``), runs ``flwr run . <connection> --stream``, reads the run's final status with
``flwr ls`` (``flwr run --stream`` exits 0 even on a failed run) and stops every process it
started, and their children, by pid.

    python -m simulations.deploy_local --run-config "num-clients=2 num-rounds=2" [--out DIR] [--data-dir DIR]

Certificates, keys, logs and this deployment's ``FLWR_HOME`` go to ``.cache/deploy/<date>-<time>/``.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedunlearn import config as run_config
from fedunlearn.environment import prepare_environment
from fedunlearn.errors import ConfigError
from simulations.flwr_local import PROJECT_ROOT, free_port, stop_process_group, wait_for_port

CONNECTION = "fedunlearn-deploy"
LOOPBACK = "127.0.0.1"
FINISHED = "finished:completed"


class DeploymentError(RuntimeError):
    """A step of the deployment failed; the message names the step and its log."""


# --- credentials ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    ca: Path  # what SuperNodes and the flwr CLI trust (--root-certificates, root-certificates)
    cert: Path  # the SuperLink's certificate, signed by the CA
    key: Path  # the SuperLink's private key


def _openssl(*args: str, log_dir: Path) -> None:
    completed = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        log = log_dir / "openssl.log"
        log.write_text(" ".join(["openssl", *args]) + "\n" + completed.stdout + completed.stderr)
        raise DeploymentError(f"openssl {args[0]} failed (exit {completed.returncode}); see {log}")


def make_certificates(directory: Path, hosts: tuple[str, ...] = (), days: int = 365) -> Certificates:
    """A self-signed CA and a SuperLink certificate for ``hosts`` (the commands of deploy/make-certs.sh).

    The certificate must name every address a client dials: SuperNodes and ``flwr`` dial the
    SuperLink's public name or IP (``hosts``); its own SuperExec dials 127.0.0.1 when it binds
    0.0.0.0, so 127.0.0.1 and localhost are always added.
    """
    hosts = tuple(dict.fromkeys((*hosts, LOOPBACK, "localhost")))
    directory.mkdir(parents=True, exist_ok=True)
    certificates = Certificates(directory / "ca.crt", directory / "server.pem", directory / "server.key")
    ca_key, request = directory / "ca.key", directory / "server.csr"
    names = ",".join(f"IP:{host}" if _is_ip(host) else f"DNS:{host}" for host in hosts)
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384", "-nodes", "-sha384",
        "-days", str(days), "-subj", "/CN=fedunlearn SuperLink CA", "-keyout", str(ca_key), "-out", str(certificates.ca),
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        log_dir=directory,
    )
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384", "-nodes",
        "-subj", f"/CN={hosts[0]}", "-keyout", str(certificates.key), "-out", str(request),
        log_dir=directory,
    )
    extensions = directory / "server.ext"
    extensions.write_text(
        f"subjectAltName={names}\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
    )
    _openssl(
        "x509", "-req", "-in", str(request), "-CA", str(certificates.ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", str(days), "-sha384", "-extfile", str(extensions), "-out", str(certificates.cert),
        log_dir=directory,
    )
    ca_key.chmod(0o600)
    certificates.key.chmod(0o600)
    return certificates


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def make_supernode_keys(directory: Path, name: str) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair in OpenSSH format, as ``ssh-keygen -t ecdsa -b 384`` writes it.

    ``flower-supernode --auth-supernode-private-key`` reads the private half with
    ``load_ssh_private_key``; ``flwr supernode register`` reads the public half with
    ``load_ssh_public_key`` (a NIST curve is required). The ``cryptography`` package comes with
    flwr, so no ssh-keygen is needed here.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory.mkdir(parents=True, exist_ok=True)
    private_key = ec.generate_private_key(ec.SECP384R1())
    private_path, public_path = directory / name, directory / f"{name}.pub"
    private_path.write_bytes(
        private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    private_path.chmod(0o600)
    public_path.write_bytes(
        private_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        + f" {name}\n".encode()
    )
    return private_path, public_path


def write_connection(flwr_home: Path, address: str, root_certificates: Path, name: str = CONNECTION) -> None:
    """The ``flwr`` CLI's connection to the SuperLink: TLS, trusting our CA (no ``insecure``)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n'
        f'[superlink.{name}]\naddress = "{address}"\nroot-certificates = "{root_certificates.resolve()}"\n'
    )


# --- processes -----------------------------------------------------------------------------------


def deployment_env() -> dict[str, str]:
    """The environment of every Flower process we start (FLWR_HOME in the project cache, telemetry off)."""
    prepare_environment()
    env = dict(os.environ)
    # SuperLink and SuperNodes start flower-superexec, flwr-serverapp and flwr-clientapp from PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # Log lines must reach the log files as they happen: we wait on them.
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _start(command: list[str], env: dict[str, str], log_file: Path) -> subprocess.Popen:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as log:
        # Its own session, so that stopping it reaches the children it starts (stop_processes).
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def start_superlink(
    env: dict[str, str], certificates: Certificates, port: int, log_file: Path, host: str = LOOPBACK
) -> subprocess.Popen:
    """flower-superlink with TLS and SuperNode authentication; Fleet, Control and Runtime APIs share ``port``."""
    command = [
        "flower-superlink",
        "--ssl-ca-certfile", str(certificates.ca),
        "--ssl-certfile", str(certificates.cert),
        "--ssl-keyfile", str(certificates.key),
        "--enable-supernode-auth",
        "--isolation", "subprocess",
        # Without it the SuperLink runs `uv sync` on the app and installs a CUDA torch.
        "--disable-runtime-dependency-installation",
        "--host", host, "--port", str(port),
    ]
    superlink = _start(command, env, log_file)
    try:
        wait_for_port(port, superlink, log_file, timeout=120.0)
    except RuntimeError as error:
        stop_processes([superlink])
        raise DeploymentError(str(error)) from error
    return superlink


def register_supernodes(env: dict[str, str], public_keys: list[Path], connection: str = CONNECTION) -> list[int]:
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
        try:
            node_ids.append(int(json.loads(stdout)["node-id"]))
        except (ValueError, KeyError, TypeError) as error:
            raise DeploymentError(
                f"flwr supernode register {key} failed (exit {process.returncode}): {(stdout + stderr).strip()[-500:]}"
            ) from error
    return node_ids


def list_supernodes(env: dict[str, str], connection: str = CONNECTION) -> list[dict]:
    completed = subprocess.run(
        ["flwr", "supernode", "list", connection, "--format", "json"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    try:
        return list(json.loads(completed.stdout)["nodes"])
    except (ValueError, KeyError, TypeError) as error:
        raise DeploymentError(
            f"flwr supernode list failed (exit {completed.returncode}): {(completed.stdout + completed.stderr).strip()[-500:]}"
        ) from error


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
        "--node-config", " ".join(f"{key}={run_config.toml_value(value)}" for key, value in node_config.items()),
        "--isolation", "subprocess",
        # Its Runtime API (for its own ClientApp processes) stays on loopback; one port per SuperNode.
        "--host", LOOPBACK, "--port", str(runtime_port),
    ]
    if private_key is not None:
        command += ["--auth-supernode-private-key", str(private_key)]
    return _start(command, env, log_file)


def wait_for_log_line(
    process: subprocess.Popen, log_file: Path, pattern: str, timeout: float, what: str
) -> re.Match:
    """Wait until ``pattern`` appears in ``log_file``; fail early if the process exits."""
    deadline = time.monotonic() + timeout
    while True:
        found = re.search(pattern, log_file.read_text(errors="replace")) if log_file.exists() else None
        if found:
            return found
        if process.poll() is not None:
            raise DeploymentError(f"{what} exited with code {process.returncode}; see {log_file}")
        if time.monotonic() > deadline:
            raise DeploymentError(f"{what}: no '{pattern}' in its log within {timeout:.0f} s; see {log_file}")
        time.sleep(0.3)


def _stat(pid: int) -> list[str] | None:
    """Fields 3… of /proc/<pid>/stat (state, ppid, …), or None when the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _children_of(pids: set[int]) -> set[int]:
    """Every live descendant of ``pids`` (SuperExec starts app processes in sessions of their own)."""
    parents = {}
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat(int(entry.name))
        if fields is not None and fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    found, frontier = set(), set(pids)
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _start_time(pid: int) -> str | None:
    fields = _stat(pid)
    return None if fields is None or fields[0] == "Z" else fields[19]  # starttime: tells a reused pid apart


def _alive(pid: int, start_time: str | None = None) -> bool:
    now = _start_time(pid)
    return now is not None and (start_time is None or now == start_time)


def stop_processes(processes: list[subprocess.Popen], timeout: float = 20.0) -> None:
    """Stop the processes we started and everything they started, by pid; nothing is left running.

    Each started process leads its own process group: all groups get SIGTERM at once (SuperNodes
    deactivate themselves on it), then stop_process_group waits for each and kills what hangs.
    flower-superexec is detached into a session of its own and exits when its parent dies (it
    polls every 0.2 s), its app processes likewise; the descendants found before stopping are
    waited for and, if still alive after ``timeout``, killed by pid (the same process: its start
    time is checked, so a reused pid is never hit).
    """
    descendants = {pid: _start_time(pid) for pid in _children_of({process.pid for process in processes})}
    for process in processes:
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for process in processes:
        try:
            stop_process_group(process)
        except ProcessLookupError:  # the group ended between poll() and killpg()
            process.wait()
    deadline = time.monotonic() + timeout
    while (alive := [pid for pid, started in descendants.items() if _alive(pid, started)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --- the run -------------------------------------------------------------------------------------


@dataclass
class RunOutcome:
    run_id: str
    status: str
    log_file: Path

    @property
    def completed(self) -> bool:
        return self.status == FINISHED


def run_app(
    env: dict[str, str], overrides: dict[str, object], log_file: Path, connection: str = CONNECTION, timeout: float = 1800.0
) -> RunOutcome:
    """``flwr run <project> <connection> --stream``, then the final status from ``flwr ls``."""
    run_config_text = " ".join(f"{key}={run_config.toml_value(value)}" for key, value in overrides.items())
    try:
        streamed = subprocess.run(
            ["flwr", "run", str(PROJECT_ROOT), connection, "--run-config", run_config_text, "--stream"],
            env=env, capture_output=True, text=True, timeout=timeout, check=False,
        )
        output, returncode = streamed.stdout + streamed.stderr, streamed.returncode
    except subprocess.TimeoutExpired as expired:
        output = _text(expired.stdout) + _text(expired.stderr) + f"\n(flwr run did not end within {timeout:.0f} s)\n"
        returncode = None
    log_file.write_text(output)
    found = re.search(r"Successfully started run (\d+)", output)
    if not found:
        raise DeploymentError(f"flwr run did not start a run (exit {returncode}); see {log_file}")
    return RunOutcome(found.group(1), run_status(env, found.group(1), connection), log_file)


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def run_status(env: dict[str, str], run_id: str, connection: str = CONNECTION) -> str:
    listing = subprocess.run(
        ["flwr", "ls", connection, "--run-id", run_id, "--format", "json"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    try:
        return str(json.loads(listing.stdout)["runs"][0]["status"])
    except (ValueError, KeyError, IndexError, TypeError) as error:
        raise DeploymentError(
            f"flwr ls --run-id {run_id} failed (exit {listing.returncode}): {(listing.stdout + listing.stderr).strip()[-500:]}"
        ) from error


@dataclass
class LocalDeployment:
    """A SuperLink and ``num_supernodes`` authenticated SuperNodes on loopback; a context manager.

    Leaving the ``with`` block (also on an error) stops every process it started.
    """

    directory: Path
    num_supernodes: int
    data_dir: Path | None = None  # each SuperNode gets <data_dir>/node-<i> in its node config
    env: dict[str, str] = field(default_factory=deployment_env)
    port: int = field(default_factory=free_port)
    processes: list[subprocess.Popen] = field(default_factory=list)
    node_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Its own FLWR_HOME (connection, installed app) beside its certificates and logs: the
        # rehearsal neither reads nor rewrites the connections of .cache/flwr-home.
        self.env = dict(self.env, FLWR_HOME=str(self.directory / "flwr-home"))

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def logs(self) -> Path:
        return self.directory / "logs"

    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self, node_timeout: float = 120.0) -> None:
        self.certificates = make_certificates(self.directory / "certificates")
        write_connection(Path(self.env["FLWR_HOME"]), self.address, self.certificates.ca)
        keys = [make_supernode_keys(self.directory / "keys", f"supernode-{i}") for i in range(self.num_supernodes)]
        self.superlink = start_superlink(self.env, self.certificates, self.port, self.logs / "superlink.log")
        self.processes.append(self.superlink)
        self.node_ids = register_supernodes(self.env, [public_key for _, public_key in keys])
        supernodes = []
        for partition_id, (private_key, _) in enumerate(keys):
            node_config: dict[str, object] = {"partition-id": partition_id, "num-partitions": self.num_supernodes}
            if self.data_dir is not None:
                node_config["data-dir"] = str(self.data_dir / f"node-{partition_id}")
            log_file = self.logs / f"supernode-{partition_id}.log"
            supernodes.append((self.start_supernode(private_key, node_config, log_file), log_file, partition_id))
        for supernode, log_file, partition_id in supernodes:
            # Logged once the SuperLink has activated the node, i.e. accepted its signed key.
            wait_for_log_line(supernode, log_file, r"SuperNode ID: \d+", node_timeout, f"flower-supernode {partition_id}")

    def start_supernode(self, private_key: Path | None, node_config: dict[str, object], log_file: Path) -> subprocess.Popen:
        supernode = start_supernode(
            self.env, self.address, self.certificates.ca, private_key, node_config, free_port(), log_file
        )
        self.processes.append(supernode)
        return supernode

    def run(self, overrides: dict[str, object], timeout: float = 1800.0) -> RunOutcome:
        return run_app(self.env, overrides, self.logs / "flwr-run.log", timeout=timeout)

    def stop(self) -> None:
        # SuperNodes first: they leave the SuperLink cleanly instead of retrying against a dead one.
        stop_processes(list(reversed(self.processes)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-config", default="", help="run-config overrides, as for `fedunlearn run`")
    parser.add_argument("--out", help="output directory (default: runs/deploy-<time>)")
    parser.add_argument("--data-dir", help="each SuperNode's data-dir is DATA_DIR/node-<partition-id> (node config)")
    args = parser.parse_args(argv)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.out or f"runs/deploy-{stamp}").resolve()
    try:
        overrides = run_config.parse_overrides(args.run_config)
        # The ServerApp runs in a process the SuperLink starts: a relative out-dir would follow its cwd.
        overrides["out-dir"] = str(out_dir)
        config = run_config.resolve(overrides)  # fail here, in one line, before anything starts
    except ConfigError as error:
        print(f"deploy_local: {error}", file=sys.stderr)
        return 2

    env = deployment_env()
    directory = Path(env["FEDUNLEARN_CACHE"]) / "deploy" / stamp
    data_dir = Path(args.data_dir).resolve() if args.data_dir else None
    try:
        with LocalDeployment(directory, config["num-clients"], data_dir=data_dir, env=env) as deployment:
            print(f"SuperLink {deployment.address} (TLS, SuperNode authentication); "
                  f"{config['num-clients']} SuperNodes registered as nodes {deployment.node_ids}; logs in {deployment.logs}")
            outcome = deployment.run(overrides)
    except DeploymentError as error:
        print(f"deployment failed: {error}", file=sys.stderr)
        return 1
    finally:
        print(f"stopped every process started (logs: {directory / 'logs'})")
    if not outcome.completed:
        print(f"run {outcome.run_id}: {outcome.status}; see {outcome.log_file}", file=sys.stderr)
        return 1
    print(f"run {outcome.run_id}: {outcome.status}; results in {out_dir}/results.json; log: {outcome.log_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
