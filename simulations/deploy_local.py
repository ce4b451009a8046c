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
The pieces: simulations/credentials.py (CA, certificate, SuperNode keys), simulations/flwr_cli.py
(Flower's processes and ``flwr`` commands), simulations/processes.py (start, wait, stop by pid).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedunlearn import config as run_config
from fedunlearn.errors import ConfigError
from simulations import flwr_cli
from simulations.credentials import make_certificates, make_supernode_keys
from simulations.flwr_cli import RunOutcome, flwr_env
from simulations.processes import LOOPBACK, ProcessFailed, free_port, stop_processes, wait_for_log_line

CONNECTION = "fedunlearn-deploy"


@dataclass
class LocalDeployment:
    """A SuperLink and ``num_supernodes`` authenticated SuperNodes on loopback; a context manager.

    Leaving the ``with`` block (also on an error) stops every process it started.
    """

    directory: Path
    num_supernodes: int
    data_dir: Path | None = None  # each SuperNode gets <data_dir>/node-<i> in its node config
    env: dict[str, str] = field(default_factory=flwr_env)
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
        flwr_cli.write_connection(Path(self.env["FLWR_HOME"]), CONNECTION, self.address, self.certificates.ca)
        keys = [make_supernode_keys(self.directory / "keys", f"supernode-{i}") for i in range(self.num_supernodes)]
        self.superlink = flwr_cli.start_superlink(
            self.env, self.port, self.logs / "superlink.log", certificates=self.certificates
        )
        self.processes.append(self.superlink)
        self.node_ids = flwr_cli.register_supernodes(self.env, [public_key for _, public_key in keys], CONNECTION)
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
        supernode = flwr_cli.start_supernode(
            self.env, self.address, self.certificates.ca, private_key, node_config, free_port(), log_file
        )
        self.processes.append(supernode)
        return supernode

    def list_supernodes(self) -> list[dict]:
        return flwr_cli.list_supernodes(self.env, CONNECTION)

    def run(self, overrides: dict[str, object], timeout: float = 1800.0) -> RunOutcome:
        return flwr_cli.run_app(self.env, CONNECTION, overrides, self.logs / "flwr-run.log", timeout=timeout)

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

    env = flwr_env()
    directory = Path(env["FEDUNLEARN_CACHE"]) / "deploy" / stamp
    data_dir = Path(args.data_dir).resolve() if args.data_dir else None
    try:
        with LocalDeployment(directory, config["num-clients"], data_dir=data_dir, env=env) as deployment:
            print(f"SuperLink {deployment.address} (TLS, SuperNode authentication); "
                  f"{config['num-clients']} SuperNodes registered as nodes {deployment.node_ids}; logs in {deployment.logs}")
            outcome = deployment.run(overrides)
    except ProcessFailed as error:
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
