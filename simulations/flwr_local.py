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
import math
import sys
import time
from pathlib import Path

from fedunlearn import config as run_config
from simulations import flwr_cli
from simulations.processes import LOOPBACK, ProcessFailed, free_port, stop_process_group

CONNECTION = "fedunlearn-local"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-config", default="", help="run-config overrides, as for `fedunlearn run`")
    parser.add_argument("--out", help="output directory (absolute; default: runs/flwr-<time>)")
    args = parser.parse_args(argv)

    overrides = run_config.parse_overrides(args.run_config)
    out_dir = Path(args.out or f"runs/flwr-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    overrides["out-dir"] = str(out_dir)
    config = run_config.resolve(overrides)  # fail here, in one line, before anything starts

    env = flwr_cli.flwr_env()
    cache = Path(env["FEDUNLEARN_CACHE"])
    port = free_port()
    flwr_cli.write_connection(Path(env["FLWR_HOME"]), CONNECTION, f"{LOOPBACK}:{port}")
    try:
        superlink = flwr_cli.start_superlink(env, port, cache / "superlink.log", simulation=True, timeout=60.0)
    except ProcessFailed as error:
        print(f"flower-superlink did not start: {error}", file=sys.stderr)
        return 1
    run_log = cache / "flwr-run.log"
    try:
        federation_config = (
            f"num-supernodes={config['num-clients']} "
            # The SuperLink's simulation config holds whole CPUs only (fractions work in `fedunlearn run`).
            f"client-resources-num-cpus={math.ceil(config['client-num-cpus'])} "
            f"client-resources-num-gpus={config['client-num-gpus']}"
        )
        outcome = flwr_cli.run_app(env, CONNECTION, overrides, run_log, federation_config=federation_config)
        if outcome.returncode != 0:
            print(f"flwr run failed (exit {outcome.returncode}); log: {run_log}", file=sys.stderr)
            return 1
        print(f"run {outcome.run_id}: {outcome.status}; results in {out_dir}/results.json; log: {run_log}")
        return 0 if outcome.completed else 1
    except ProcessFailed as error:
        print(f"flwr run failed: {error}", file=sys.stderr)
        return 1
    finally:
        stop_process_group(superlink)
        print(f"stopped flower-superlink (pid {superlink.pid}) and its process group")


if __name__ == "__main__":
    sys.exit(main())
