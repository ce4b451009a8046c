"""``fedunlearn`` command line: ``run``, ``presets``, ``methods``, ``keys``, ``frontier``.

Bad input (unknown key, bad value, missing data) prints one line naming the key, the value and the
valid choices, and exits with code 2 before anything is written.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from fedunlearn import config as run_config
from fedunlearn.errors import ConfigError, RunFailed

EXIT_BAD_INPUT = 2
EXIT_RUN_FAILED = 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedunlearn", description="Federated unlearning simulator (Flower + PyTorch).")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train with FedAvg on Flower's simulation engine and write results")
    source = run.add_mutually_exclusive_group()
    source.add_argument("--preset", help="a preset from simulations/ (see `fedunlearn presets`); default: default")
    source.add_argument("--config", help="a TOML file of run-config keys")
    run.add_argument("--run-config", default="", help='overrides, e.g. "num-rounds=5 dirichlet-alpha=0.1"')
    run.add_argument("--out", help="output directory (default: runs/<preset>-<time>)")
    run.add_argument("--verbose", action="store_true", help="show Flower's and Ray's own logs")
    commands.add_parser("presets", help="list the presets in simulations/")
    commands.add_parser("methods", help="list the unlearning methods, what each needs and its own keys")
    commands.add_parser("keys", help="list every run-config key with its default and valid values")
    frontier = commands.add_parser("frontier", help="a run's methods by cost and distance from retrain, the Pareto frontier marked")
    frontier.add_argument("results", help="a run folder or its results.json")
    return parser


def resolve_job(preset: str | None, config_file: str | None, overrides: str, out: str | None) -> dict[str, Any]:
    from simulations import preset_path

    if config_file:
        layer, name = run_config.load_toml(config_file, "--config"), Path(config_file).stem
    else:
        name = preset or "default"
        layer = run_config.load_toml(preset_path(name), "--preset")
    override_layer = run_config.parse_overrides(overrides)
    if out:
        override_layer["out-dir"] = out
    elif "out-dir" not in override_layer and "out-dir" not in layer:
        override_layer["out-dir"] = str(Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    return run_config.resolve(layer, override_layer)


def _command_run(args: argparse.Namespace) -> int:
    config = resolve_job(args.preset, args.config, args.run_config, args.out)
    from fedunlearn.environment import prepare_environment

    prepare_environment()
    from fedunlearn.federation import build_federation

    # Load data and partitions here first: a missing file or an impossible partition is bad
    # input, reported in one line before Ray starts or anything is written.
    build_federation(config)
    from fedunlearn.ledger import requests_from_config, requests_from_file

    requests = requests_from_config(config["forget-clients"])
    if config["deletion-requests"]:
        requests += requests_from_file(config["deletion-requests"])
    from fedunlearn.report import print_summary, progress_over_rounds
    from simulations.runner import run_job

    with progress_over_rounds(config["num-rounds"]) as progress:
        record = run_job(config, on_round=progress.on_round, on_phase=progress.on_phase, verbose=args.verbose)
    print_summary(record)
    return 0


def _command_presets(_: argparse.Namespace) -> int:
    from simulations import preset_description, preset_paths

    for name, path in sorted(preset_paths().items()):
        print(f"{name:<16} {preset_description(path)}")
    return 0


def _command_methods(_: argparse.Namespace) -> int:
    from fedunlearn.unlearning.registry import describe_methods

    sys.stdout.write(describe_methods())
    return 0


def _command_keys(_: argparse.Namespace) -> int:
    sys.stdout.write(run_config.markdown_table())
    return 0


def _command_frontier(args: argparse.Namespace) -> int:
    from fedunlearn.frontier import frontier_table, load_results

    path = Path(args.results)
    if not (path / "results.json" if path.is_dir() else path).is_file():
        raise ConfigError("results", args.results, "a run folder holding results.json, or a results.json file")
    sys.stdout.write(frontier_table(load_results(path)))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {
        "run": _command_run, "presets": _command_presets, "methods": _command_methods, "keys": _command_keys,
        "frontier": _command_frontier,
    }
    try:
        return handlers[args.command](args)
    except ConfigError as error:
        print(f"fedunlearn: {error.one_line()}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RunFailed as error:
        print(f"fedunlearn: run failed: {error}", file=sys.stderr)
        return EXIT_RUN_FAILED


if __name__ == "__main__":
    sys.exit(main())
