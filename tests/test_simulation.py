"""Real Flower simulations on Ray (no mocks): learning, determinism, the files a run writes."""

import csv
import json

import pytest

pytestmark = pytest.mark.simulation

# Training only (no deletion): the foundation's checks; unlearning runs have their own tests.
SMALL_RUN = "num-clients=6 num-rounds=5 local-epochs=3 lr=0.05 fraction-train=0.5 seed=3 forget-clients=''"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, project_cache):
    import os
    import subprocess
    import sys

    outputs = []
    for name in ("first", "second"):
        out = tmp_path_factory.mktemp(name)
        env = dict(os.environ, FEDUNLEARN_CACHE=str(project_cache), COLUMNS="120")
        completed = subprocess.run(
            [sys.executable, "-m", "fedunlearn.cli", "run", "--run-config", SMALL_RUN, "--out", str(out)],
            env=env, capture_output=True, text=True, timeout=900,
        )
        assert completed.returncode == 0, completed.stderr[-3000:]
        outputs.append((out, completed))
    return outputs


def test_fedavg_on_digits_learns_well_above_chance(two_runs):
    out, _ = two_runs[0]
    results = json.loads((out / "results.json").read_text())
    accuracies = [entry["test_accuracy"] for entry in results["rounds"]]
    assert [entry["round"] for entry in results["rounds"]] == list(range(6))
    assert accuracies[0] < 0.25  # the untrained model guesses (10 classes)
    assert results["final"]["test_accuracy"] > 0.6
    assert results["final"]["test_accuracy"] == accuracies[-1]


def test_results_json_holds_config_rounds_final_partitions_time_and_versions(two_runs):
    out, _ = two_runs[0]
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["num-clients"] == 6 and results["config"]["fraction-train"] == 0.5
    assert results["config"]["out-dir"] == str(out)
    partitions = results["partitions"]
    assert len(partitions["sizes"]) == 6 and sum(partitions["sizes"]) == 1437 == partitions["train_examples"]
    assert [sum(histogram) for histogram in partitions["label_histograms"]] == partitions["sizes"]
    assert all("train_loss" in entry for entry in results["rounds"][1:])
    assert results["wall_seconds"] > 0
    assert {"torch", "flwr", "python"} <= set(results["versions"])
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert rows[0]["method"] == "original"
    assert float(rows[0]["test_accuracy"]) == pytest.approx(results["final"]["test_accuracy"])
    with open(out / "rounds.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 6
    assert (out / "global_model.pt").exists()


def test_same_seed_gives_the_same_partitions_and_numbers(two_runs):
    (first, _), (second, _) = two_runs
    a = json.loads((first / "results.json").read_text())
    b = json.loads((second / "results.json").read_text())
    assert a["partitions"] == b["partitions"]
    strip = lambda rounds: [{k: v for k, v in entry.items() if k != "seconds"} for entry in rounds]  # noqa: E731
    assert strip(a["rounds"]) == strip(b["rounds"])


def test_terminal_output_is_a_progress_bar_and_a_table_without_log_spam(two_runs):
    _, completed = two_runs[0]
    output = completed.stdout + completed.stderr
    assert "method" in completed.stdout and "original" in completed.stdout and "test acc 0." in completed.stdout
    for noise in ("INFO", "WARNING", "DeprecationWarning", "Traceback", "(raylet)", "ray.init"):
        assert noise not in output, output
