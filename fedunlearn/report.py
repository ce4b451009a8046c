"""Terminal output: a progress bar over rounds and the end-of-run summary table."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedunlearn.federation import Federation
from fedunlearn.results import RunRecord

console = Console()


@contextlib.contextmanager
def progress_over_rounds(num_rounds: int) -> Iterator[Callable[[int, dict[str, Any]], None]]:
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

    def on_round(server_round: int, entry: dict[str, Any]) -> None:
        status = f"test acc {entry['test_accuracy']:.3f}  loss {entry['test_loss']:.3f}"
        progress.update(task, completed=server_round, status=status)

    with progress:
        yield on_round


def print_summary(record: RunRecord, federation: Federation) -> None:
    config = record.config
    table = Table(title=f"fedunlearn: {config['model']} on {config['dataset']}, {config['num-clients']} clients")
    table.add_column("model")
    table.add_column("test accuracy", justify="right")
    table.add_column("test loss", justify="right")
    table.add_column("seconds", justify="right")
    for name, values in record.models.items():
        table.add_row(name, f"{values['test_accuracy']:.4f}", f"{values['test_loss']:.4f}", f"{values['seconds']:.1f}")
    console.print(table)
    sizes = record.partitions.get("sizes", [])
    if sizes:
        console.print(
            f"partitions ({config['partition']}, alpha={config['dirichlet-alpha']}): "
            f"sizes min {min(sizes)} / max {max(sizes)} of {sum(sizes)} training examples"
        )
    console.print(f"wall time {record.elapsed():.1f} s; results in {config['out-dir']}/results.json")
