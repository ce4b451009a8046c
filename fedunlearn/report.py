"""Terminal output: a progress bar over rounds and the end-of-run summary table."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedunlearn.results import RunRecord

console = Console()


class RunProgress:
    """A bar over training rounds, then one status line per later phase (unlearning, retraining…)."""

    def __init__(self, progress: Progress, task):
        self.progress, self.task = progress, task

    def on_round(self, server_round: int, entry: dict[str, Any]) -> None:
        status = f"test acc {entry['test_accuracy']:.3f}  loss {entry['test_loss']:.3f}"
        if "phase" in entry:
            status = f"{entry['phase']}: {status}"
        self.progress.update(self.task, completed=server_round, status=status)

    def on_phase(self, phase: str) -> None:
        self.progress.update(self.task, status=phase)


@contextlib.contextmanager
def progress_over_rounds(num_rounds: int) -> Iterator[RunProgress]:
    progress = Progress(
        TextColumn("[bold]FedAvg"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    task = progress.add_task("rounds", total=num_rounds, status="starting Ray and the clients")
    with progress:
        yield RunProgress(progress, task)


SUMMARY_COLUMNS = (
    ("test_accuracy", "test", "{:.3f}"),
    ("forget_accuracy", "forget", "{:.3f}"),
    ("retain_accuracy", "retain", "{:.3f}"),
    ("kl_to_retrain", "KL", "{:.2g}"),
    ("mia_auc", "MIA", "{:.3f}"),
    ("asr", "ASR", "{:.3f}"),
    ("epsilon", "ε", "{:.3g}"),
    ("seconds", "sec", "{:.2f}"),
    ("speedup", "speedup", "{:.1f}x"),
)
SUMMARY_CAPTION = (
    "test / forget / retain: accuracy on the test set, the deleted data, the other clients' data; "
    "KL: to the retrained model on the test set (nats); MIA: membership-inference AUC of the deleted "
    "data (0.5 = chance); ASR: backdoor attack success rate on triggered test images; sec: seconds of training (original), retraining or unlearning; speedup = retrain s / method s"
)


def _cell(values: dict[str, Any], key: str, template: str) -> str:
    value = values.get(key)
    # Undefined (null in results.json): None, or NaN before json_ready (a speedup over 0 s).
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return template.format(value) if isinstance(value, (int, float)) else str(value)


def print_summary(record: RunRecord) -> None:
    config = record.config
    table = Table(
        title=f"fedunlearn: {config['model']} on {config['dataset']}, {config['num-clients']} clients",
        caption=SUMMARY_CAPTION if len(record.methods) > 1 else None,
    )
    table.add_column("method", no_wrap=True)
    # Only columns with at least one value (ε appears once a method certifies one).
    shown = [
        column for column in SUMMARY_COLUMNS if any(values.get(column[0]) is not None for values in record.methods.values())
    ]
    for _, header, _ in shown:
        table.add_column(header, justify="right")
    for name, values in record.methods.items():
        if "failed" in values:
            table.add_row(name, f"[red]failed: {values['failed']}")
            continue
        table.add_row(name, *(_cell(values, key, template) for key, _, template in shown))
    console.print(table)
    sizes = record.partitions.get("sizes", [])
    if sizes:
        console.print(
            f"partitions ({config['partition']}, alpha={config['dirichlet-alpha']}): "
            f"sizes min {min(sizes)} / max {max(sizes)} of {sum(sizes)} training examples"
        )
    retrain = record.methods.get("retrain", {})
    if retrain.get("retrain_from_cache"):
        console.print("retrain: loaded from the cache (its seconds are those of the run that trained it)")
    console.print(f"wall time {record.elapsed():.1f} s; results in {config['out-dir']}/results.json")
