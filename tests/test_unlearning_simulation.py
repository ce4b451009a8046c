"""Client deletion end to end on real Flower simulations: routing, ledger, failure, oracle cache."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.simulation

BASE = "num-clients=4 num-rounds=3 local-epochs=2 lr=0.05 seed=5 forget-clients=1"


def _run(project_cache, out, run_config):
    env = dict(os.environ, FEDUNLEARN_CACHE=str(project_cache), COLUMNS="160")
    completed = subprocess.run(
        [sys.executable, "-m", "fedunlearn.cli", "run", "--run-config", run_config, "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    ledger = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]
    return results, ledger, completed


@pytest.fixture(scope="module")
def deletion_runs(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    methods = "unlearn-methods=hf-kcu,hf-kcu-global,kfac"
    first = _run(cache, tmp_path_factory.mktemp("first"), f"{BASE} {methods}")
    again = _run(cache, tmp_path_factory.mktemp("again"), f"{BASE} {methods}")
    return first, again


def test_train_unlearn_goes_to_the_affected_client_only(deletion_runs):
    (results, _, _), _ = deletion_runs
    communication = results["communication"]
    assert communication["train_unlearn_sent_to"] == [1]
    # hf-kcu: one train.unlearn, to client 1; hf-kcu-global and kfac ask the *other* clients
    # (curvature products / KFAC factors) and kfac asks client 1 for its gradient.
    assert communication["messages_by_type"]["train.unlearn"] == 1
    assert communication["messages_by_type"]["query.kfac_factors"] == 3
    for method in ("hf-kcu-global", "kfac"):
        assert results["methods"][method]["details"]["queried_clients"] == [0, 2, 3]
    details = results["methods"]["hf-kcu"]["details"]
    assert list(details["clients"]) == ["1"]  # replies came from client 1 alone
    assert details["causal_weights"] == {"1": 1.0}


def test_every_method_is_reported_with_the_same_keys(deletion_runs):
    (results, _, completed), _ = deletion_runs
    methods = results["methods"]
    assert list(methods) == ["original", "retrain", "retrain-2", "hf-kcu", "hf-kcu-global", "kfac"]
    for name in ("hf-kcu", "hf-kcu-global", "kfac"):
        entry = methods[name]
        for key in ("test_accuracy", "forget_accuracy", "retain_accuracy", "seconds", "speedup"):
            assert isinstance(entry[key], float), (name, key)
        assert entry["speedup"] == pytest.approx(methods["retrain"]["seconds"] / entry["seconds"])
    assert methods["hf-kcu-global"]["communication_rounds"] >= 2
    assert "hf-kcu-global" in completed.stdout and "speedup" in completed.stdout


def test_ledger_records_each_requests_life(deletion_runs):
    (_, ledger, _), _ = deletion_runs
    assert [event["status"] for event in ledger] == ["pending", "applied", "applied", "applied"]
    assert len({event["request_id"] for event in ledger}) == 1
    assert [event.get("method") for event in ledger[1:]] == ["hf-kcu", "hf-kcu-global", "kfac"]
    assert all(event["affected_clients"] == [1] and event["seconds"] > 0 for event in ledger[1:])


def test_the_retrain_oracle_is_cached_and_identical(deletion_runs):
    (first, _, _), (again, _, _) = deletion_runs
    assert first["methods"]["retrain"]["retrain_from_cache"] is False
    assert again["methods"]["retrain"]["retrain_from_cache"] is True
    # Same seed: the same trained model and the same unlearned models. (That the cached oracle equals a
    # fresh retrain bit for bit is tests/test_retrain_cache.py.)
    for name in ("original", "hf-kcu", "hf-kcu-global", "kfac"):
        for key in ("test_accuracy", "kl_to_retrain"):
            assert again["methods"][name][key] == first["methods"][name][key], (name, key)
    assert again["methods"]["retrain"]["seconds"] == first["methods"]["retrain"]["seconds"]


def test_a_failing_client_fails_the_request_and_leaves_the_model_alone(tmp_path, project_cache):
    # A Hessian with negative curvature and the policy "raise": the client's solve fails for real.
    results, ledger, _ = _run(
        project_cache, tmp_path / "out",
        f"{BASE} unlearn-methods=hf-kcu curvature=hessian negative-curvature=raise damping=0.0",
    )
    assert [event["status"] for event in ledger] == ["pending", "failed"]
    assert "curvature" in ledger[1]["reason"]
    assert set(results["methods"]["hf-kcu"]) == {"failed"}
    assert results["methods"]["original"]["test_accuracy"] == results["final"]["test_accuracy"]


def test_membership_inference_on_the_retrained_model_is_near_chance(deletion_runs):
    (results, _, _), _ = deletion_runs
    retrain = results["methods"]["retrain"]
    # Large enough to say so: hundreds of members (client 1's data) against the 360 test images.
    assert retrain["mia_members"] >= 200 and retrain["mia_nonmembers"] >= 300
    assert abs(retrain["mia_auc"] - 0.5) <= 0.1
    # The oracle really left client 1 out: a retrain over every client (same seed, same rounds) would be
    # the trained model itself, at KL 0 and parameter gap 0 from it.
    original = results["methods"]["original"]
    assert original["kl_to_retrain"] > 1e-6 and original["param_gap"] > 1e-4


def test_deletion_mid_training_continues_without_the_deleted_client(tmp_path, project_cache):
    results, ledger, _ = _run(
        project_cache, tmp_path / "out", f"{BASE} num-rounds=4 unlearn-after-round=2 unlearn-methods=hf-kcu",
    )
    rounds = results["rounds"]
    assert [entry["round"] for entry in rounds] == [0, 1, 2, 3, 4]
    assert [entry.get("phase") for entry in rounds] == [None, None, None] + ["after-deletion (hf-kcu)"] * 2
    assert [event["status"] for event in ledger] == ["pending", "applied"]
    # The deleted client takes no part in the rounds after the deletion.
    after = [e for e in results["communication"]["log"] if e.get("phase") == "after-deletion"]
    assert after and all(e["partition"] != 1 for e in after)
