import json
import pytest
import torch

from fedunlearn import config as run_config
from fedunlearn.errors import ConfigError
from fedunlearn.training import derive_seed
from fedunlearn.unlearning.methods.sisa import ShardHistory, SisaEnsemble, plan_shards, retrained_fraction


def test_plan_deals_every_client_to_exactly_one_shard_and_slice():
    plan = plan_shards(list(range(10)), num_shards=3, num_slices=2, rounds=5, seed=7)
    dealt = [client for shard in range(3) for client in plan.clients_of(shard)]
    assert sorted(dealt) == list(range(10))
    assert sorted(len(plan.clients_of(shard)) for shard in range(3)) == [3, 3, 4]
    assert all(sum(rounds) == 5 for rounds in plan.stage_rounds)  # every constituent trains num-rounds rounds
    assert plan == plan_shards(list(range(10)), 3, 2, 5, seed=7)
    assert plan != plan_shards(list(range(10)), 3, 2, 5, seed=8)
    # Stages are cumulative: stage 1 trains on slices 0 and 1.
    shard = 0
    assert plan.stage_clients(shard, 1) == sorted(plan.clients_of(shard))
    assert plan.stage_clients(shard, 0) == sorted(plan.slices[shard][0])


def test_a_shard_never_gets_more_slices_than_clients_or_rounds():
    plan = plan_shards(list(range(4)), num_shards=2, num_slices=5, rounds=3, seed=0)
    assert [len(parts) for parts in plan.slices] == [2, 2]
    plan = plan_shards(list(range(8)), num_shards=1, num_slices=5, rounds=3, seed=0)
    assert len(plan.slices[0]) == 3 and plan.stage_rounds[0] == (1, 1, 1)


def test_deletion_restarts_from_the_checkpoint_before_the_deleted_slice():
    plan = plan_shards(list(range(8)), num_shards=2, num_slices=2, rounds=4, seed=3)
    late_client = plan.slices[0][1][0]
    early_client = plan.slices[0][0][0]
    assert plan.locate(late_client) == (0, 1)
    assert plan.first_stage_to_redo(0, frozenset({late_client})) == 1
    assert plan.first_stage_to_redo(0, frozenset({early_client})) == 0
    assert plan.first_stage_to_redo(1, frozenset({late_client})) is None
    assert late_client not in plan.stage_clients(0, 1, frozenset({late_client}))


def test_retrained_fraction_counts_redone_local_trainings():
    histories = [ShardHistory(initial={}, client_trainings=[4, 8]), ShardHistory(initial={}, client_trainings=[4, 8])]
    assert retrained_fraction(6, histories) == pytest.approx(6 / 24)


class Fixed(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, inputs):
        return self.logits.expand(len(inputs), -1)


def test_ensemble_mean_probability_and_majority_vote():
    # Two constituents say class 0 mildly, one says class 2 strongly.
    members = [Fixed([0.5, 0.0, 0.0]), Fixed([0.5, 0.0, 0.0]), Fixed([0.0, 0.0, 9.0])]
    ensemble = SisaEnsemble(members)
    inputs = torch.zeros(3, 1)
    probabilities = torch.stack([torch.softmax(m(inputs), -1) for m in members]).mean(0)
    assert torch.allclose(torch.softmax(ensemble(inputs), -1), probabilities, atol=1e-6)
    assert ensemble(inputs).argmax(-1).tolist() == [2, 2, 2]  # the mean probability follows the confident one
    assert ensemble.vote(inputs).tolist() == [0, 0, 0]  # the vote follows the majority
    # A 1–1 tie goes to the class of higher mean probability.
    tie = SisaEnsemble([Fixed([1.0, 0.0]), Fixed([0.0, 3.0])])
    assert tie.vote(torch.zeros(1, 1)).tolist() == [1]


def test_more_shards_than_clients_is_refused_naming_the_key():
    with pytest.raises(ConfigError) as error:
        run_config.resolve({"num-clients": 3, "sisa-shards": 4, "unlearn-methods": "hf-kcu, sisa"})
    assert "sisa-shards" in error.value.one_line() and "1..3" in error.value.one_line()


@pytest.mark.simulation
def test_sisa_deletion_retrains_one_shard_and_leaves_the_others_bit_identical(tmp_path, run_cli):
    num_clients, rounds = 6, 4
    plan = plan_shards(list(range(num_clients)), 2, 2, rounds, seed=derive_seed(0, "sisa-shards"))
    deleted = plan.slices[1][1][0]  # a client of the second slice: stage 0 of its shard is kept
    run = (f"num-clients={num_clients} num-rounds={rounds} local-epochs=1 sisa-shards=2 sisa-slices=2 seed=0 "
           f"forget-clients={deleted} unlearn-methods=sisa mia-shadows=0")
    completed = run_cli("run", "--run-config", run, "--out", str(tmp_path), timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    entry = results["methods"]["sisa"]
    assert entry["details"]["plan"]["slices"] == [[list(part) for part in parts] for parts in plan.slices]
    assert entry["details"]["retrained_shards"] == {"1": {"restarted_from": "stage 0 checkpoint", "redone_stages": [1], "dropped": False}}

    before = torch.load(tmp_path / "sisa" / "constituents.pt")
    after = torch.load(tmp_path / "sisa" / "constituents-after-deletion.pt")
    assert all(torch.equal(before[0][name], after[0][name]) for name in before[0])  # shard 0: untouched
    assert not all(torch.equal(before[1][name], after[1][name]) for name in before[1])  # shard 1: retrained

    # Only stage 1 of shard 1 was redone, on its remaining clients, from the stage-0 checkpoint.
    unlearning = [e for e in results["communication"]["log"] if e["phase"] == "unlearning: sisa"]
    stage_clients = plan.stage_clients(1, 1, frozenset({deleted}))
    assert sorted({e["partition"] for e in unlearning}) == stage_clients
    assert len(unlearning) == plan.stage_rounds[1][1] * len(stage_clients)
    trained = [e for e in results["communication"]["log"] if e["phase"].startswith("sisa-training") and e["type"] == "train"]
    assert entry["retrained_fraction"] == pytest.approx(len(unlearning) / len(trained))
    assert 0 < entry["retrained_fraction"] < 0.5
    for key in ("test_accuracy", "forget_accuracy", "kl_to_retrain", "test_accuracy_vote", "seconds", "speedup"):
        assert entry[key] is not None, key
    assert entry["param_gap"] is None  # an ensemble has no single weight vector
