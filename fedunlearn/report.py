"""Terminal output: a progress bar over rounds and the end-of-run summary table."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedunlearn.summary import StudyRecord

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


# (key, header, format, scale): accuracies are shown in percent, their gaps in points.
SUMMARY_COLUMNS = (
    ("test_accuracy", "test", "{:.1f}", 100),
    ("test_accuracy_gap", "Δtest", "{:+.1f}", 100),
    ("forget_accuracy", "forget", "{:.1f}", 100),
    ("kl_to_retrain", "KL", "short", 1),
    ("forget_kl_to_retrain", "KL fgt", "short", 1),
    ("mia_auc_gap", "ΔMIA", "{:+.2f}", 1),
    ("asr", "ASR", "{:.1f}", 100),
    ("epsilon", "ε", "short", 1),
    ("speedup", "speedup", "times", 1),
)
SUMMARY_CAPTION = (
    "test / forget: accuracy (%) on the test set / the deleted data; Δtest: test accuracy minus the retrained "
    "model's (points; above retrain is not closer to it); KL / KL fgt: KL divergence (nats) from the retrained "
    "model on the test set / the deleted data; ΔMIA: membership-inference AUC of the deleted data minus the "
    "retrained model's; floor: the larger KL over the same KL between two retrains that differ only in training "
    "randomness (retrain-2); ASR: backdoor attack success rate (%); speedup = retrain seconds / method seconds"
)


def _number(value: Any, template: str) -> str:
    # Undefined (null in results.json): None, or NaN before json_ready (a speedup over 0 s).
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if not isinstance(value, (int, float)):
        return str(value)
    if template == "short":
        return _short(value)
    if template == "times":
        return _times(value)
    return template.format(value)


def _short(value: float) -> str:
    """Two significant digits in at most six characters: 0.058, 12, 1.3e-4."""
    if value == 0:
        return "0"
    if 0.01 <= abs(value) < 1000:
        return f"{value:.2g}"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _times(value: float) -> str:
    return f"{value:.0f}x" if abs(value) >= 10 else f"{value:.1f}x"


def _cell(statistics: dict[str, Any] | None, template: str, scale: float) -> str:
    """``mean`` for one run; ``mean`` over ``±ci95`` for several."""
    if statistics is None:
        return "–"
    text = _number(_scaled(statistics["mean"], scale), template)
    if statistics["n"] > 1 and statistics["ci95"] is not None:
        text += "\n±" + _number(_scaled(statistics["ci95"], scale), template.replace("+", ""))
    return text


def _scaled(value: Any, scale: float) -> Any:
    return value * scale if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _floor(entry: dict[str, Any]) -> str:
    ratios = [entry["floors"].get(metric) for metric in ("kl_to_retrain", "forget_kl_to_retrain") if metric in entry["floors"]]
    if not ratios:
        return "–"
    if any(ratio is None for ratio in ratios):
        return "> 0"
    worst = max(ratios)
    return "within" if worst <= 1 else _times(worst)


def _label(name: str) -> str:
    """A method's label for the table: a variant's overrides on lines of their own (the column stays
    narrow), brackets escaped so rich does not read them as markup."""
    if "[" in name:
        base, _, rest = name.partition("[")
        name = base + "\n [" + rest.replace(";", ";\n  ")
    return escape(name)


def print_summary(study: StudyRecord) -> None:
    config = study.config
    summary = study.summary
    runs = summary["runs"]
    scope = "1 run, single seed" if runs == 1 else f"{runs} runs, mean ± 95 % CI"
    methods = summary["methods"]
    table = Table(
        title=f"fedunlearn: {config['model']} on {config['dataset']}, {config['num-clients']} clients ({scope})",
        caption=SUMMARY_CAPTION if len(methods) > 1 else None,
        box=None,  # no borders: every character goes to numbers (80 columns hold the whole table)
        padding=(0, 1),
        header_style="bold underline",
    )
    # Only columns with at least one value (ε appears once a method certifies one).
    shown = [column for column in SUMMARY_COLUMNS if any(column[0] in entry["metrics"] for entry in methods.values())]
    headers = ["method"] + [header for _, header, _, _ in shown] + (["floor"] if summary["noise_floor"] else [])
    failed = {name: record.methods[name]["failed"] for _, record in study.runs for name in record.methods
              if "failed" in record.methods[name]}
    rows = []
    for name, entry in methods.items():
        if entry["runs"] == 0:
            rows.append([_label(name), "failed"] + [""] * (len(headers) - 2))
            continue
        cells = [_cell(entry["metrics"].get(key), template, scale) for key, _, template, scale in shown]
        if summary["noise_floor"]:
            cells.append(_floor(entry))
        rows.append([_label(name) if not entry["failed_runs"] else f"{_label(name)} ({entry['failed_runs']} failed)", *cells])
    # Each column as wide as its widest line, so rich never cuts a number.
    widths = [max([len(header)] + [len(line) for row in rows for line in row[index].split("\n")])
              for index, header in enumerate(headers)]
    for index, (header, width) in enumerate(zip(headers, widths)):
        table.add_column(header, justify="left" if index == 0 else "right", no_wrap=True, min_width=width)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for name, reason in failed.items():
        console.print(f"[red]{escape(name)} failed[/red]: {escape(str(reason))}")
    for _, record in study.runs[:1]:
        for request in record.refused_requests:
            console.print(
                f"[yellow]deletion of client(s) {request['clients']} refused[/yellow]: {escape(request['reason'])} "
                f"(the ledger in {escape(str(record.config['out-dir']))}; write to another --out to start afresh)"
            )
    for spec, record in study.runs[:1]:
        sizes = record.partitions.get("sizes", [])
        if sizes and runs == 1:
            console.print(
                f"partitions ({config['partition']}, alpha={config['dirichlet-alpha']}): "
                f"sizes min {min(sizes)} / max {max(sizes)} of {sum(sizes)} training examples"
            )
        retrain = record.methods.get("retrain", {})
        if retrain.get("retrain_from_cache") and runs == 1:
            console.print("retrain: loaded from the cache (its seconds are those of the run that trained it)")
    console.print(f"wall time {study.elapsed():.1f} s; results in {config['out-dir']}/results.json")
