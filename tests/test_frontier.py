"""The cost–quality frontier (``fedunlearn frontier``): dominance, the do-nothing and exact anchors, the
backdoor objective, and the table a run's results.json gives."""

from __future__ import annotations

import json

from fedunlearn.cli import main
from fedunlearn.frontier import dominates, frontier_table, pareto


def test_dominance_needs_no_worse_everywhere_and_better_somewhere():
    assert dominates((1.0, 0.1), (2.0, 0.1)) and dominates((1.0, 0.1), (1.0, 0.2))
    assert not dominates((1.0, 0.1), (1.0, 0.1))  # a tie dominates nothing: both stay on the frontier
    assert not dominates((1.0, 0.3), (2.0, 0.1)) and not dominates((2.0, 0.1), (1.0, 0.3))  # a trade-off
    points = {"cheap-far": (1.0, 0.5), "dear-near": (10.0, 0.01), "dominated": (5.0, 0.6), "twin": (1.0, 0.5)}
    assert pareto(points) == {"cheap-far", "dear-near", "twin"}


def _entry(**metrics):
    return {"runs": 1, "metrics": {name: {"mean": value, "ci95": None, "n": 1} for name, value in metrics.items()}}


def _results(with_asr: bool):
    extra = (lambda asr: {"asr": asr}) if with_asr else (lambda asr: {})
    return {"summary": {"methods": {
        # The original's seconds are its training time; as "do nothing" it costs 0.
        "original": _entry(seconds=50.0, kl_to_retrain=0.01, forget_kl_to_retrain=1.9, test_accuracy_gap=-0.003, **extra(0.74)),
        "retrain": _entry(seconds=20.0, kl_to_retrain=0.0, forget_kl_to_retrain=0.0, test_accuracy_gap=0.0, client_trainings=180, **extra(0.0)),
        "retrain-2": _entry(seconds=20.0, kl_to_retrain=1e-3, forget_kl_to_retrain=6e-3, **extra(0.0)),
        "fast-useless": _entry(seconds=1.0, kl_to_retrain=0.02, forget_kl_to_retrain=2.0, **extra(0.80)),
        "slow-close": _entry(seconds=10.0, kl_to_retrain=0.3, forget_kl_to_retrain=0.5, client_trainings=54, **extra(0.01)),
        "slow-far-low-asr": _entry(seconds=12.0, kl_to_retrain=0.4, forget_kl_to_retrain=0.6, **extra(0.0)),
        "broken": _entry(seconds=0.5, kl_to_retrain=float("inf"), forget_kl_to_retrain=float("nan"), **extra(1.0)),
    }}}


def _marked(table: str) -> set[str]:
    rows = [line.split("|") for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    return {cells[1].strip() for cells in rows if cells[-2].strip() == "★"}


def test_the_frontier_is_read_against_doing_nothing_and_retraining():
    table = frontier_table(_results(with_asr=False))
    # fast-useless costs 1 s and is farther than doing nothing (cost 0): dominated. slow-far is dominated by
    # slow-close; a non-finite distance never counts as near. The noise-floor retrain is not a method.
    assert _marked(table) == {"original", "retrain", "slow-close"}
    assert "retrain-2" not in table and "ASR" not in table and "| original | 0 | 0 |" in table
    assert "1 run (single seed)" in table


def test_on_backdoor_runs_the_attack_success_rate_is_a_third_objective():
    table = frontier_table(_results(with_asr=True))
    # slow-far-low-asr removes the backdoor completely (ASR 0) where slow-close leaves 1 %: both stay.
    assert _marked(table) == {"original", "retrain", "slow-close", "slow-far-low-asr"}
    assert "ASR %" in table and "| 1.0 |" in table  # slow-close's ASR in percent


def test_the_command_reads_a_run_folder_and_refuses_a_missing_one(tmp_path, capsys):
    (tmp_path / "results.json").write_text(json.dumps(_results(with_asr=False)))
    assert main(["frontier", str(tmp_path)]) == 0
    assert "| slow-close |" in capsys.readouterr().out
    assert main(["frontier", str(tmp_path / "nothing-here")]) == 2
    assert "results" in capsys.readouterr().err
