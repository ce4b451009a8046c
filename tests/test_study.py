"""Several runs in one job (seeds, each client deleted in turn), the noise floor and the summary,
on the in-process grid (the real ClientApp; no Ray)."""

from __future__ import annotations

import csv
import json
import math

import pytest

from clients.client_app import build_client_app
from fake_grid import FakeGrid
from fedunlearn import config as run_config
from fedunlearn.environment import quiet_logging
from fedunlearn.errors import ConfigError
from fedunlearn.summary import NOISE_FLOOR_ROW, distances, plan_runs, summarize, t_interval
from strategies.server_app import run_study

quiet_logging()

BASE = {"model": "logreg", "num-clients": 4, "num-rounds": 2, "local-epochs": 1, "mia-shadows": 0,
        "retrain-cache": False, "unlearn-methods": "hf-kcu,finetune"}


def _study(out, **overrides):
    config = run_config.resolve({**BASE, "out-dir": str(out)}, overrides)
    return run_study(FakeGrid(build_client_app(bound_config=config), config["num-clients"]), config)


def test_t_interval_is_students_95_percent_half_width():
    mean, half_width = t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert half_width == pytest.approx(4.302652729911275 * 1.0 / math.sqrt(3))  # t(0.975, 2) · s / √n
    assert t_interval([5.0]) == (5.0, None)


def test_seeds_and_explicit_lists_plan_one_run_each(tmp_path):
    config = run_config.resolve({"seed": 4, "seeds": "3", "out-dir": str(tmp_path)})
    assert [run.seed for run in plan_runs(config)] == [4, 5, 6]
    config = run_config.resolve({"seeds": "7,2", "out-dir": str(tmp_path)})
    assert [(run.seed, run.out_dir.name) for run in plan_runs(config)] == [(7, "seed-7"), (2, "seed-2")]
    with pytest.raises(ConfigError, match="seeds"):
        run_config.resolve({"seeds": "1,x"})
    with pytest.raises(ConfigError, match="forget-share"):
        plan_runs(run_config.resolve({"forget-each-client": True, "forget-share": 0.2, "out-dir": str(tmp_path)}))


def test_each_run_of_a_study_equals_the_same_seed_run_on_its_own(tmp_path):
    """One set of clients serves every seed: the server tells them which run a message belongs to."""
    _study(tmp_path / "study", seeds="0,1")
    for seed in (0, 1):
        alone = _study(tmp_path / f"alone-{seed}", seed=seed)
        together = json.loads((tmp_path / "study" / f"seed-{seed}" / "results.json").read_text())
        single = json.loads((tmp_path / f"alone-{seed}" / "results.json").read_text())
        assert together["partitions"]["sizes"] == single["partitions"]["sizes"]
        for method in ("original", "retrain", "hf-kcu", "finetune", NOISE_FLOOR_ROW):
            for key in ("test_accuracy", "kl_to_retrain", "forget_kl_to_retrain", "param_gap"):
                assert together["methods"][method][key] == single["methods"][method][key], (seed, method, key)
        assert alone.runs[0][1].methods["original"]["test_accuracy"] == single["methods"]["original"]["test_accuracy"]
    # The two seeds really are different federations.
    first, second = (json.loads((tmp_path / "study" / f"seed-{s}" / "results.json").read_text()) for s in (0, 1))
    assert first["partitions"]["sizes"] != second["partitions"]["sizes"]
    summary = json.loads((tmp_path / "study" / "results.json").read_text())["summary"]
    values = summary["methods"]["original"]["metrics"]["test_accuracy"]["values"]
    assert values == [first["methods"]["original"]["test_accuracy"], second["methods"]["original"]["test_accuracy"]]
    assert summary["methods"]["original"]["metrics"]["test_accuracy"]["ci95"] > 0


def test_the_noise_floor_is_a_second_retrain_on_the_same_clients_with_other_randomness(tmp_path):
    study = _study(tmp_path, **{"forget-clients": "1"})
    record = study.runs[0][1]
    log = record.communication["log"]
    first = [(e["partition"]) for e in log if e["phase"] == "retrain" and e["type"] == "train"]
    second = [(e["partition"]) for e in log if e["phase"] == "retrain (noise floor)" and e["type"] == "train"]
    assert sorted(set(first)) == sorted(set(second)) == [0, 2, 3]
    floor = record.noise_floor
    assert floor["kl_to_retrain"] > 0  # other shuffling: not the same model
    assert floor == distances(record.methods[NOISE_FLOOR_ROW])
    summary = study.summary
    assert summary["methods"][NOISE_FLOOR_ROW]["floors"]["kl_to_retrain"] == pytest.approx(1.0)
    assert summary["methods"]["retrain"]["verdict"] == "within the floor"
    original = summary["methods"]["original"]
    assert original["floors"]["kl_to_retrain"] == pytest.approx(record.methods["original"]["kl_to_retrain"] / floor["kl_to_retrain"])


def test_forget_each_client_deletes_every_client_once_and_rows_name_their_run(tmp_path):
    _study(tmp_path, **{"forget-each-client": True, "unlearn-methods": "finetune", "noise-floor": False})
    document = json.loads((tmp_path / "results.json").read_text())
    assert [run["forget_clients"] for run in document["runs"]] == ["0", "1", "2", "3"]
    for run in document["runs"]:
        routed = json.loads((tmp_path / run["dir"] / "results.json").read_text())["methods"]["finetune"]["affected_clients"]
        assert routed == [int(run["forget_clients"])]
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    per_run = [row for row in rows if row["seed"] != "all"]
    assert {(row["forget_clients"], row["method"]) for row in per_run} >= {(str(k), "finetune") for k in range(4)}
    assert all(row["dataset"] == "digits" and row["model"] == "logreg" and row["num_clients"] == "4" for row in rows)
    summary_rows = [row for row in rows if row["seed"] == "all"]
    assert {row["method"] for row in summary_rows} == {"original", "retrain", "finetune"}


def test_summary_ratios_and_verdicts_against_hand_values():
    tables = [
        {"retrain-2": {"kl_to_retrain": 0.01, "forget_kl_to_retrain": 0.02}, "m": {"kl_to_retrain": 0.03, "forget_kl_to_retrain": 0.01}},
        {"retrain-2": {"kl_to_retrain": 0.03, "forget_kl_to_retrain": 0.02}, "m": {"kl_to_retrain": 0.05, "forget_kl_to_retrain": 0.01}},
    ]
    summary = summarize(tables)
    assert summary["noise_floor"]["kl_to_retrain"]["mean"] == pytest.approx(0.02)
    assert summary["methods"]["m"]["floors"]["kl_to_retrain"] == pytest.approx(2.0)  # 0.04 / 0.02
    assert summary["methods"]["m"]["floors"]["forget_kl_to_retrain"] == pytest.approx(0.5)
    assert summary["methods"]["m"]["verdict"] == "2.0x the floor"
    tables[1]["m"]["kl_to_retrain"] = 0.01
    assert summarize(tables)["methods"]["m"]["verdict"] == "within the floor"
