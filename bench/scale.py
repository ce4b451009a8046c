"""Scale check: the main job (train, unlearn one client with hf-kcu, retrain the oracle) on mnist1d with
10, 100 and 200 simulated clients; prints one JSON line per client count.

Each run is ``fedunlearn run`` in a subprocess with a fresh Ray. While it runs, a sampler walks the
process tree under it (the driver, which hosts the ServerApp and Flower's simulation engine, plus
every process Ray starts below it: gcs_server, raylet, the agents, the client actors) every
``--interval`` seconds and sums their memory:

- ``peak_tree_rss_bytes``: the largest sum of resident set sizes. Pages shared between processes
  (torch's libraries in every actor) count once per process, so this overstates real use;
- ``peak_tree_pss_bytes``: the largest sum of proportional set sizes (shared pages split between the
  processes that map them): what the tree really occupies;
- ``peak_driver_rss_bytes``, ``peak_processes``: the driver alone, and the most processes seen at once.

Timings come from the run's results.json (seconds on the server's clock): ``startup_seconds`` is
from the server's start to the round-0 evaluation (it includes asking every node which partition it
holds), ``round_seconds`` the mean of the training rounds, ``unlearning_seconds`` hf-kcu's and
``retrain_seconds`` the oracle's. ``wall_seconds`` is the subprocess's whole life, Ray's start and
stop included.

Two probes find where the time per client goes:

- ``--handler-cost``: calls the ClientApp's ``train`` and ``query.identify`` handlers in this process
  (no Ray, no Flower engine) once per client, and reports milliseconds per message, and of them the
  milliseconds inside ``train_local``;
- ``--store-sweeps``: runs the job in-process with Flower's simulation engine and times every sweep of
  its message extractor (``flwr/server/superlink/fleet/vce/vce_api.py: add_messages_to_queue``, which
  every 0.1 s asks the in-memory LinkState for each node's next message): the extractor is
  re-implemented here line for line, with timers around the loop.

Usage::

    python bench/scale.py                      # 10, 100, 200 clients, 3 rounds
    python bench/scale.py --clients 200 --rounds 2
    python bench/scale.py --handler-cost
    python bench/scale.py --store-sweeps --rounds 1
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _psutil():
    try:
        import psutil
    except ImportError:
        # Ray ships psutil in ray/thirdparty_files and puts that folder on sys.path when imported.
        import ray  # noqa: F401

        psutil = importlib.import_module("psutil")
    return psutil


class TreeMemorySampler:
    """Samples the memory of a process and all its descendants in a background thread."""

    def __init__(self, pid: int, interval: float):
        self.psutil = _psutil()
        self.root = self.psutil.Process(pid)
        self.interval = interval
        self.peak_rss = self.peak_pss = self.peak_driver_rss = self.peak_processes = 0
        self.samples = 0
        self.names_at_peak: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> TreeMemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        psutil = self.psutil
        while not self._stop.is_set():
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            rss = pss = 0
            names = []
            for process in processes:
                try:
                    # smaps_rollup: one read per process gives both numbers.
                    info = process.memory_full_info()
                    names.append(process.name())
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                rss += info.rss
                pss += info.pss
                if process.pid == self.root.pid:
                    self.peak_driver_rss = max(self.peak_driver_rss, info.rss)
            self.samples += 1
            if rss > self.peak_rss:
                self.peak_rss, self.names_at_peak = rss, sorted(names)
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_processes = max(self.peak_processes, len(names))
            self._stop.wait(self.interval)


def run_config_for(args: argparse.Namespace, clients: int) -> str:
    return " ".join(
        [
            "dataset=mnist1d",
            f"mnist1d-samples={args.samples}",
            f"model={args.model}",
            f"num-clients={clients}",
            f"num-rounds={args.rounds}",
            f"local-epochs={args.local_epochs}",
            f"lr={args.lr}",
            f"fraction-train={args.fraction_train}",
            "forget-clients=0",
            "unlearn-methods=hf-kcu",
            "mia-shadows=0",
            "retrain-cache=false",
            f"seed={args.seed}",
        ]
    )


def fedunlearn_command() -> list[str]:
    script = Path(sys.executable).with_name("fedunlearn")
    return [str(script)] if script.exists() else [sys.executable, "-m", "fedunlearn.cli"]


def measure(args: argparse.Namespace, clients: int, out_root: Path, env: dict[str, str]) -> dict:
    out = out_root / f"scale-{clients}"
    run_config = run_config_for(args, clients)
    command = [*fedunlearn_command(), "run", "--run-config", run_config, "--out", str(out)]
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with TreeMemorySampler(process.pid, args.interval) as sampler:
        stdout, stderr = process.communicate()
    wall = time.perf_counter() - start
    line: dict = {"clients": clients, "rounds": args.rounds, "run_config": run_config, "returncode": process.returncode}
    if process.returncode != 0:
        line["error"] = (stderr or stdout)[-2000:]
        return line
    results = json.loads((out / "results.json").read_text())
    rounds = results["rounds"]
    round_ends = [entry["seconds"] for entry in rounds]
    methods = results["methods"]
    line.update(
        wall_seconds=round(wall, 2),
        server_wall_seconds=round(results["wall_seconds"], 2),
        startup_seconds=round_ends[0],
        round_seconds=round((round_ends[-1] - round_ends[0]) / max(len(round_ends) - 1, 1), 2),
        training_seconds=methods["original"]["seconds"],
        unlearning_seconds=round(methods["hf-kcu"]["seconds"], 3),
        retrain_seconds=round(methods["retrain"]["seconds"], 2),
        test_accuracy=methods["original"]["test_accuracy"],
        hf_kcu_test_accuracy=methods["hf-kcu"]["test_accuracy"],
        retrain_test_accuracy=methods["retrain"]["test_accuracy"],
        messages=results["communication"]["messages_by_type"],
        partition_sizes_min_max=[min(results["partitions"]["sizes"]), max(results["partitions"]["sizes"])],
        peak_tree_rss_bytes=sampler.peak_rss,
        peak_tree_pss_bytes=sampler.peak_pss,
        peak_driver_rss_bytes=sampler.peak_driver_rss,
        peak_processes=sampler.peak_processes,
        processes_at_peak=sampler.names_at_peak,
        memory_samples=sampler.samples,
    )
    return line


def handler_cost(args: argparse.Namespace, clients: int) -> dict:
    """Per-message cost of the app's own handlers, without Ray or Flower's engine."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    import clients.client_app as client_app_module
    from fedunlearn import config as run_config
    from fedunlearn.federation import build_federation

    # Messages made outside a Flower process need the identity a node would have.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    config = run_config.resolve(run_config.parse_overrides(run_config_for(args, clients)))
    app = client_app_module.build_client_app(bound_config=config)
    state = build_federation(config).initial_model().state_dict()
    inside_training = [0.0]
    train_local = client_app_module.train_local

    def timed_train_local(*positional, **named):
        start = time.perf_counter()
        try:
            return train_local(*positional, **named)
        finally:
            inside_training[0] += time.perf_counter() - start

    client_app_module.train_local = timed_train_local

    def message(kind: str, partition: int) -> Message:
        content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord({"server-round": 1})})
        sent = Message(content=content, dst_node_id=partition + 1, message_type=kind)
        sent.metadata.__dict__["_message_id"] = f"probe-{kind}-{partition}"  # a reply must point to an id
        return sent

    def context(partition: int) -> Context:
        node_config = {"partition-id": partition, "num-partitions": clients}
        return Context(run_id=1, node_id=partition + 1, node_config=node_config, state=RecordDict(), run_config={})

    app(message=message(MessageType.TRAIN, 0), context=context(0))  # imports and caches, as an actor's first message
    line: dict = {"probe": "handler-cost", "clients": clients, "model": args.model, "local_epochs": args.local_epochs}
    for kind, label in ((MessageType.TRAIN, "train"), (f"{MessageType.QUERY}.identify", "identify")):
        inside_training[0] = 0.0
        start = time.perf_counter()
        for partition in range(clients):
            app(message=message(kind, partition), context=context(partition))
        line[f"{label}_ms_per_message"] = round((time.perf_counter() - start) / clients * 1000, 2)
        if label == "train":
            line["train_local_ms_per_message"] = round(inside_training[0] / clients * 1000, 2)
    client_app_module.train_local = train_local
    return line


def store_probe(run_config_text: str) -> None:
    """In a fresh process: the job on Flower's engine, with the message extractor's sweeps timed."""
    from fedunlearn import config as run_config
    from fedunlearn.environment import prepare_environment

    config = run_config.resolve(run_config.parse_overrides(run_config_text))
    prepare_environment()
    from flwr.server.superlink.fleet.vce import vce_api

    sweeps: list[tuple[float, float, int]] = []

    def add_messages_to_queue(state, queue, nodes_mapping, f_stop):
        # vce_api.add_messages_to_queue of flwr 1.41, with timers.
        while not f_stop.is_set():
            wall, cpu = time.perf_counter(), time.thread_time()
            for node_id in nodes_mapping.keys():
                for message in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(message)
            sweeps.append((time.perf_counter() - wall, time.thread_time() - cpu, state.num_message_ins()))
            f_stop.wait(0.1)

    vce_api.add_messages_to_queue = add_messages_to_queue
    from simulations.runner import run_job

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedunlearn-store-probe-") as out_dir:
        run_job(dict(config, **{"out-dir": out_dir}))
    busy = [(wall, cpu) for wall, cpu, stored in sweeps if stored >= 0.9 * config["num-clients"]]
    print(
        json.dumps(
            {
                "probe": "store-sweeps",
                "clients": config["num-clients"],
                "rounds": config["num-rounds"],
                "run_seconds": round(time.perf_counter() - start, 2),
                "sweeps": len(sweeps),
                "extractor_cpu_seconds": round(sum(cpu for _, cpu, _ in sweeps), 2),
                "sweeps_with_a_message_per_node_stored": len(busy),
                "ms_per_such_sweep": round(sum(wall for wall, _ in busy) / max(len(busy), 1) * 1000, 1),
                "cpu_ms_per_such_sweep": round(sum(cpu for _, cpu in busy) / max(len(busy), 1) * 1000, 1),
            }
        ),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="10,100,200", help="comma list of client counts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--fraction-train", type=float, default=1.0)
    parser.add_argument("--model", default="cnn1d")
    parser.add_argument("--samples", type=int, default=20000, help="mnist1d-samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between memory samples")
    parser.add_argument("--out-root", help="where the runs write (default: a temporary folder, removed)")
    parser.add_argument("--handler-cost", action="store_true", help="probe: the app's handlers alone, per message")
    parser.add_argument("--store-sweeps", action="store_true", help="probe: time Flower's message extractor")
    parser.add_argument("--store-probe-config", help=argparse.SUPPRESS)  # the child process of --store-sweeps
    args = parser.parse_args()
    if args.store_probe_config:
        store_probe(args.store_probe_config)
        return

    # The project cache (or $FEDUNLEARN_CACHE) as the CLI would use it: mnist1d and the partitions
    # are generated once, before the first timed run, so no run pays for them.
    from fedunlearn.environment import prepare_environment

    prepare_environment()
    env = dict(os.environ, COLUMNS="120")
    from fedunlearn import config as run_config
    from fedunlearn.federation import build_federation

    counts = [int(part) for part in args.clients.split(",")]
    for clients in counts:
        build_federation(run_config.resolve(run_config.parse_overrides(run_config_for(args, clients))))

    if args.handler_cost:
        for clients in counts:
            print(json.dumps(handler_cost(args, clients)), flush=True)
        return
    if args.store_sweeps:
        for clients in counts:
            probe = [sys.executable, __file__, "--store-probe-config", run_config_for(args, clients)]
            subprocess.run(probe, env=env, check=True)
        return
    with tempfile.TemporaryDirectory(prefix="fedunlearn-scale-") as scratch:
        out_root = Path(args.out_root) if args.out_root else Path(scratch)
        for clients in counts:
            print(json.dumps(measure(args, clients, out_root, env)), flush=True)


if __name__ == "__main__":
    main()
