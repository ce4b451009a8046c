"""Each baseline does what it claims on a deletion that matters, in seconds (tests/fake_grid.py: the real
ClientApp and server side in-process, no Ray).

The case: logreg on digits, 4 Dirichlet(0.3) clients, seed 7; client 0, deleted, holds 660 of the 1437
training images and most of classes 1, 2, 3 and 7, so the FedAvg retrain without it is far from the
trained model (KL 0.52 on the test set after 5 rounds). The oracle is what the job retrains: the same
FedAvg from the same initial model on the remaining clients.

- finetune, federaser, sisa and hf-kcu-global claim to move toward the retrained model: each must land
  closer to it than the trained model θ* (sisa: than its own ensemble before the deletion) by a margin;
- sisa is exact for its own ensemble: the retrained shard equals FedAvg by hand on its other clients;
- naive-ga and fisher make no such claim; their tests assert what they do instead.
"""

from __future__ import annotations

import pytest
import torch

from fake_grid import fedavg_by_hand, grid_port
from fedunlearn import config as run_config
from fedunlearn.environment import quiet_logging
from fedunlearn.metrics import kl_divergence, model_outputs
from fedunlearn.training import derive_seed
from fedunlearn.unlearning import Deletion, create_method
from fedunlearn.unlearning.methods.fisher import diagonal_fisher
from fedunlearn.unlearning.objective import batches_of

quiet_logging()

DELETED = 0
REMAINING = [1, 2, 3]
CASE = {"model": "logreg", "num-clients": 4, "dirichlet-alpha": 0.3, "seed": 7, "num-rounds": 5, "local-epochs": 1,
        "mia-shadows": 0, "retrain-cache": False, "forget-clients": str(DELETED)}
# hf-kcu-global is a Newton step on the remaining objective: it heads for argmin L_{-K}, which the FedAvg
# retrain approaches only when training gets near an optimum (docs/methods.md). 5 rounds at lr 0.01 are far
# from one (there it lands at KL 1.26 against θ*'s 0.52); 8 rounds of 2 epochs at lr 0.2 get close enough.
CONVERGED = {**CASE, "num-rounds": 8, "local-epochs": 2, "lr": 0.2, "batch-size": 128}


class Case:
    """θ* trained with the hooks the methods need, the retrained oracle, and the port to unlearn through."""

    def __init__(self, tmp_path, settings, methods=()):
        self.config = run_config.resolve({**settings, "out-dir": str(tmp_path), "unlearn-methods": ",".join(methods) or "finetune"})
        self.grid, self.port, self.federation = grid_port(self.config)
        self.methods = {name: create_method(name, self.config) for name in methods}
        method_hooks = [hook for method in self.methods.values() for hook in method.training_hooks()]
        hooks = self.port.history_hooks([method.requirements for method in self.methods.values()]) + method_hooks
        self.rounds = self.config["num-rounds"]
        seed = derive_seed(self.config["seed"], "sampling")
        self.trained = self.port.train(list(self.port.clients), self.port.initial_state, self.rounds, seed=seed, hooks=hooks).state
        for hook in method_hooks:
            hook.after_training(self.port, self.trained, self.rounds)
        self.retrained = self.port.train(REMAINING, self.port.initial_state, self.rounds, seed=seed).state
        self.test = self.federation.data.test
        self.retrain_logits = self.logits(self.retrained)

    def deletion(self) -> Deletion:
        return Deletion(forget_clients=(DELETED,), trained_state=self.trained, trained_rounds=self.rounds)

    def unlearn(self, name, **overrides):
        method = self.methods.get(name) if not overrides else None
        method = method or create_method(name, {**self.config, **overrides})
        return method.unlearn(self.port, self.deletion())

    def model(self, state):
        model = self.federation.new_model()
        model.load_state_dict(state)
        return model

    def logits(self, state_or_model, dataset=None):
        model = state_or_model if isinstance(state_or_model, torch.nn.Module) else self.model(state_or_model)
        return model_outputs(model, dataset or self.test)[0]

    def kl(self, state_or_model) -> float:
        return kl_divergence(self.retrain_logits, self.logits(state_or_model))

    def accuracy(self, state_or_model, dataset) -> float:
        logits, labels = model_outputs(state_or_model if isinstance(state_or_model, torch.nn.Module) else self.model(state_or_model), dataset)
        return float((logits.argmax(dim=1) == labels).double().mean())


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return Case(tmp_path_factory.mktemp("case"), CASE, methods=("federaser", "sisa"))


def test_the_deletion_matters(case):
    sizes = case.federation.partitioning.sizes
    assert sizes[DELETED] > 0.4 * sum(sizes)
    assert case.kl(case.trained) > 0.3  # measured 0.52


def test_finetune_moves_toward_retrain(case):
    """Measured: KL 0.52 -> 0.15 after 2 rounds on the remaining clients."""
    outcome = case.unlearn("finetune", **{"finetune-rounds": 2})
    assert case.kl(outcome.state) < 0.5 * case.kl(case.trained)


def test_federaser_moves_toward_retrain(case):
    """Measured: KL 0.52 -> 0.0060 (the replay restarts from the initial model without client 0)."""
    outcome = case.unlearn("federaser")
    assert outcome.communication_rounds == 2  # rounds 1, 3, 5 stored (interval 2); round 1 is averaged, not calibrated
    assert case.kl(outcome.state) < 0.1 * case.kl(case.trained)


def test_sisa_is_exact_for_its_ensemble_and_moves_it_toward_retrain(case):
    """The retrained shard equals FedAvg by hand, stage by stage, on its clients other than client 0; the
    other shards are untouched. Measured: the ensemble's KL 0.24 before the deletion, 0.15 after."""
    sisa = case.methods["sisa"]
    outcome = case.unlearn("sisa")
    plan, training = sisa.training.plan, sisa.training
    shard, _ = plan.locate(DELETED)
    after = torch.load(case.port.out_dir / "sisa" / "constituents-after-deletion.pt")
    deleted = frozenset({DELETED})
    for other in range(plan.num_shards):
        if other != shard:
            assert all(torch.equal(after[other][name], value) for name, value in training.constituents[other].items())
    expected = case.port.initial_state
    for stage, rounds in enumerate(plan.stage_rounds[shard]):
        clients = plan.stage_clients(shard, stage, deleted)
        if clients:
            expected = fedavg_by_hand(case.federation, case.config, expected, clients, rounds)
    assert plan.clients_of(shard) != [DELETED]  # the shard keeps a constituent
    for name, value in expected.items():
        torch.testing.assert_close(after[shard][name], value, rtol=1e-5, atol=1e-6)
    before = outcome.also_evaluate["ensemble_before_deletion"]
    assert case.kl(outcome.predictor) < 0.8 * case.kl(before)


def test_naive_ga_lowers_accuracy_on_the_deleted_data_more_than_on_the_rest(case):
    """naive-ga claims no closeness to retrain: it climbs the deleted client's loss. With the paper's setting
    (10 epochs, 64-example batches: 110 steps on client 0's 660 images) it reaches 0 on the deleted data and
    takes the rest down with it, less far. Measured: accuracy on client 0's data 0.91 -> 0.00, on the
    remaining clients' 0.67 -> 0.18."""
    outcome = case.unlearn("naive-ga")
    forget = case.federation.client_data(DELETED)
    retain = torch.utils.data.ConcatDataset([case.federation.client_data(k) for k in REMAINING])
    forget_drop = case.accuracy(case.trained, forget) - case.accuracy(outcome.state, forget)
    retain_drop = case.accuracy(case.trained, retain) - case.accuracy(outcome.state, retain)
    assert case.accuracy(outcome.state, forget) < 0.1
    assert forget_drop > retain_drop + 0.2
    assert outcome.details["clients"]["0"]["optimizer_steps"] == 10 * -(-len(forget) // case.config["batch-size"])


def test_fisher_adds_noise_scaled_by_the_remaining_clients_inverse_fisher(case):
    """fisher claims no step toward retrain (its noise has mean 0): it perturbs θ* with the reference's
    variance, F the remaining clients' example-weighted Fisher, through one real query.fisher round. logreg
    is all last layer (both tensors have 10 = C rows): v = 10 α · min(1/F, 10²), the weight's averaged over
    each row. With α = 1e-2 (not the default 1e-6, so that the noise is large enough to measure) the
    standardised noise over the 650 parameters must have mean 0 and variance 1. No class is held by client
    0 alone here, so no row is zeroed. The per-kind rules are checked by hand in tests/test_fisher.py."""
    alpha = 1e-2
    outcome = case.unlearn("fisher", **{"fisher-alpha": alpha})
    assert outcome.details["server"]["forgotten_classes"] == []
    assert outcome.details["server"]["last_layer_parameters"] == ["linear.weight", "linear.bias"]
    model = case.model(case.trained)
    names = [name for name, _ in model.named_parameters()]
    sizes = {k: len(case.federation.client_data(k)) for k in range(4)}
    total = sum(sizes[k] for k in REMAINING)
    fisher = [torch.zeros_like(p) for p in model.parameters()]
    for k in REMAINING:
        batches = batches_of(case.federation.client_data(k), case.config["curvature-batch-size"])
        for f, value in zip(fisher, diagonal_fisher(model, names, batches)):
            f += (sizes[k] / total) * value
    weight, bias = [10 * alpha * (1 / (f.double() + 1e-8)).clamp(max=1e2) for f in fisher]
    variance = torch.cat([weight.mean(dim=1, keepdim=True).expand_as(weight).flatten(), bias]).double()
    noise = torch.cat([(outcome.state[name] - case.trained[name]).flatten() for name in names]).double()
    z = noise / variance.sqrt()
    n = len(z)
    assert abs(float(z.mean())) < 5 / n**0.5
    assert abs(float(z.var()) - 1) < 5 * (2 / n) ** 0.5
    assert outcome.details["queried_clients"] == REMAINING


def test_hf_kcu_global_moves_toward_retrain_near_an_optimum(tmp_path):
    """Measured: KL 0.75 -> 0.50 (λ = 0.01, 10 CG iterations)."""
    converged = Case(tmp_path, CONVERGED)
    outcome = converged.unlearn("hf-kcu-global", **{"damping": 0.01, "cg-iters": 10})
    assert converged.kl(converged.trained) > 0.3
    assert converged.kl(outcome.state) < 0.8 * converged.kl(converged.trained)
