"""Fisher forgetting as the authors' reference code runs it (Golatkar et al. 2020, ``get_mean_var``).

Every expected variance here is written out from the rule, not taken from the module:

    v = α · min(1 / (F + 1e-8), cap),  cap = 10² for a last-layer tensor (first dimension = classes), else 10³;
    a tensor of ≥ 2 dimensions takes its mean over dimension 1;  ×10 for last-layer and 1-D tensors;
    a class the deletion removes entirely: that row of every last-layer tensor gets mean 0, variance 10⁻³.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fedunlearn import config as run_config
from fedunlearn.models import build_model
from fedunlearn.unlearning import Deletion, create_method
from fedunlearn.unlearning.api import ClientInfo
from fedunlearn.unlearning.methods.fisher import (
    diagonal_fisher,
    forgetting_variance,
    is_last_layer,
    number_of_classes,
    wholly_deleted_classes,
)
from fedunlearn.unlearning.remaining import InProcessRemainingClients


def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(10, 1, 2, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    return model, [(x[:6], y[:6]), (x[6:], y[6:])]


def test_diagonal_fisher_equals_the_expectation_over_the_models_own_labels():
    """The true Fisher, per example (the reference's ``hessian``: batch size 1, Σ_y p(y|x) g_y², over the
    examples), not the empirical one (the data's labels) nor squared batch gradients."""
    model, batches = _tiny()
    names = [name for name, _ in model.named_parameters()]
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for inputs, _ in batches:
        for x in inputs:
            probabilities = F.softmax(model(x.unsqueeze(0)), dim=1)[0].detach()
            for label in range(3):
                model.zero_grad()
                F.cross_entropy(model(x.unsqueeze(0)), torch.tensor([label])).backward()
                for total, p in zip(expected, model.parameters()):
                    total += probabilities[label] * p.grad.pow(2)
    expected = [e / 10 for e in expected]
    for got, want in zip(diagonal_fisher(model, names, batches), expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _client(n, features):
    """n examples whose feature j is ±features[j] (alternating signs): E[x_j²] = features[j]²."""
    signs = torch.tensor([(-1.0) ** i for i in range(n)], dtype=torch.float64)
    x = signs[:, None] * torch.tensor(features, dtype=torch.float64)[None, :]
    return [(x, torch.zeros(n, dtype=torch.long))]


def test_remaining_fisher_is_the_example_weighted_mean_of_the_clients_in_closed_form():
    """Linear(4, 3) at zero: p(c|x) = 1/3, so F(W[c, j]) = E[x_j²] · (2/9) and F(b[c]) = 2/9 over the
    pooled remaining examples. Feature 2 is ±1 on the 10-example client only: F = (10/40)(2/9) = 1/18
    (an unweighted mean of the two clients' Fishers would give 1/9)."""
    model = nn.Linear(4, 3).double()
    with torch.no_grad():
        model.weight.zero_(), model.bias.zero_()
    remaining = InProcessRemainingClients(model, {1: _client(30, [3.0, 0.5, 0.0, 0.0]), 2: _client(10, [3.0, 0.5, 1.0, 0.0])})
    weight, bias = remaining.diagonal_fisher(["weight", "bias"])
    torch.testing.assert_close(weight, torch.tensor([2.0, 1 / 18, 1 / 18, 0.0], dtype=torch.float64).expand(3, 4))
    torch.testing.assert_close(bias, torch.full((3,), 2 / 9, dtype=torch.float64))


# --- the variance rule, on a hand example --------------------------------------------------------------

ALPHA = 1e-3
CLASSES = 3


def _mlp():
    """A hidden layer (Linear 2→4, 2-D weight and 1-D bias), batch norm (two 1-D tensors), and the last
    layer (Linear 4→3: first dimension 3 = the number of classes)."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, CLASSES)).double()


# Hand-chosen diagonal Fishers, one per parameter tensor of _mlp().
HAND_FISHER = {
    "0.weight": [[0.0, 1.0], [2.0, 4.0], [1e-4, 0.5], [1.0, 1.0]],
    "0.bias": [0.0, 0.5, 4.0, 0.002],
    "1.weight": [1.0, 1e-5, 0.1, 10.0],
    "1.bias": [0.25, 0.25, 0.25, 0.25],
    "3.weight": [[0.0, 1.0, 1.0, 1.0], [0.004, 0.02, 2.0, 4.0], [1.0, 1.0, 1.0, 1.0]],
    "3.bias": [0.0, 0.05, 2.0],
}


def _inverse(f, cap):
    return min(1.0 / (f + 1e-8), cap)


def _expected_variance(forgotten=()):
    """The rule written out per kind of tensor, in plain Python."""
    hidden_weight = [[ALPHA * sum(_inverse(f, 1e3) for f in row) / len(row)] * len(row) for row in HAND_FISHER["0.weight"]]
    one_dimensional = {name: [10 * ALPHA * _inverse(f, 1e3) for f in HAND_FISHER[name]] for name in ("0.bias", "1.weight", "1.bias")}
    last_weight = [[10 * ALPHA * sum(_inverse(f, 1e2) for f in row) / len(row)] * len(row) for row in HAND_FISHER["3.weight"]]
    last_bias = [10 * ALPHA * _inverse(f, 1e2) for f in HAND_FISHER["3.bias"]]
    for c in forgotten:
        last_weight[c] = [10 * 1e-4] * len(last_weight[c])
        last_bias[c] = 10 * 1e-4
    expected = {"0.weight": hidden_weight, **one_dimensional, "3.weight": last_weight, "3.bias": last_bias}
    return {name: torch.tensor(value, dtype=torch.float64) for name, value in expected.items()}


def test_the_hand_example_in_numbers():
    """The same rule as literal numbers (α = 10⁻³), so that the formula above is not the only witness."""
    v = {name: value / ALPHA for name, value in _expected_variance().items()}
    # hidden 2-D: cap 10³, mean over the row, no boost
    torch.testing.assert_close(v["0.weight"][:, 0], torch.tensor([500.5, 0.375, 501.0, 1.0], dtype=torch.float64), rtol=1e-6, atol=0)
    # hidden 1-D (a bias, batch norm's scale): cap 10³, no mean, ×10
    torch.testing.assert_close(v["0.bias"], torch.tensor([1e4, 20.0, 2.5, 5e3], dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(v["1.weight"], torch.tensor([10.0, 1e4, 100.0, 1.0], dtype=torch.float64), rtol=1e-6, atol=0)
    # last layer: cap 10², mean over the row for the weight, ×10 (once, the bias being 1-D too)
    torch.testing.assert_close(v["3.weight"][:, 0], torch.tensor([257.5, 376.875, 10.0], dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(v["3.bias"], torch.tensor([1e3, 200.0, 5.0], dtype=torch.float64), rtol=1e-6, atol=0)


def test_forgetting_variance_follows_the_reference_per_kind_of_tensor():
    model = _mlp()
    expected = _expected_variance()
    for name, p in model.named_parameters():
        fisher = torch.tensor(HAND_FISHER[name], dtype=torch.float64)
        assert is_last_layer(p.shape, number_of_classes(model)) == name.startswith("3.")
        got = forgetting_variance(fisher, ALPHA, last_layer=name.startswith("3."))
        torch.testing.assert_close(got, expected[name], rtol=1e-12, atol=0)


def test_a_convolutions_variance_is_averaged_over_its_input_channels_only():
    """(out, in, kh, kw): the reference's mean over dimension 1 keeps each output channel and kernel position."""
    fisher = torch.tensor([[[[0.0, 1.0]], [[1.0, 0.5]], [[4.0, 0.25]]], [[[1.0, 1.0]], [[1.0, 1.0]], [[1.0, 1.0]]]], dtype=torch.float64)
    assert fisher.shape == (2, 3, 1, 2)
    expected = torch.empty_like(fisher)
    expected[0, :, 0, 0] = ALPHA * (1e3 + 1.0 + 0.25) / 3
    expected[0, :, 0, 1] = ALPHA * (1.0 + 2.0 + 4.0) / 3
    expected[1] = ALPHA * 1.0
    torch.testing.assert_close(forgetting_variance(fisher, ALPHA, last_layer=False), expected, rtol=1e-6, atol=0)


class _HandFisher:
    """The remaining clients' objective, answering query.fisher with the hand-chosen Fishers."""

    def __init__(self):
        self.calls = 0

    def diagonal_fisher(self, names):
        assert list(names) == list(HAND_FISHER)
        self.calls += 1
        return [torch.tensor(HAND_FISHER[name], dtype=torch.float64) for name in names]


@pytest.mark.parametrize("forgotten", [(), (1,)])
def test_the_noise_has_the_reference_mean_and_variance_per_kind_of_tensor(forgotten):
    """Over many seeds each parameter of θ_u = θ* + Δ has the expected mean (θ*, or 0 on a wholly deleted
    class's last-layer row) and the expected variance. Catches the caps per kind (10² vs 10³), the ×10 on
    the last layer and on 1-D tensors, the mean over dimension 1, a missing square root, the class row,
    and noise reused across tensors."""
    seeds = 600
    model = _mlp()
    names = list(HAND_FISHER)
    trained = torch.cat([p.detach().flatten() for p in model.parameters()])
    expected = _expected_variance(forgotten)
    variance = torch.cat([expected[name].flatten() for name in names])
    mean = trained.clone()
    offsets, offset = {}, 0
    for name, p in model.named_parameters():
        offsets[name] = (offset, offset + p.numel())
        offset += p.numel()
    for c in forgotten:
        lo, _ = offsets["3.weight"]
        mean[lo + 4 * c : lo + 4 * (c + 1)] = 0.0
        mean[offsets["3.bias"][0] + c] = 0.0

    config = run_config.resolve({"fisher-alpha": ALPHA})
    draws = []
    for seed in range(seeds):
        update = create_method("fisher", {**config, "seed": seed}).server_step(model, _HandFisher(), forgotten_classes=forgotten)
        assert update.param_names == names and update.communication_rounds == 1
        assert update.diagnostics["last_layer_parameters"] == ["3.weight", "3.bias"]
        assert update.diagnostics["forgotten_classes"] == list(forgotten)
        draws.append(trained + torch.cat([d.flatten() for d in update.delta]))
    draws = torch.stack(draws)  # (seeds, 27): θ_u per seed
    standardised = (draws - mean) / variance.sqrt()
    assert standardised.mean(dim=0).abs().max() < 5 / seeds**0.5
    ratio = standardised.var(dim=0)
    assert ((ratio > 0.7) & (ratio < 1.3)).all(), ratio.tolist()
    correlation = torch.corrcoef(standardised.T) - torch.eye(len(variance), dtype=torch.float64)
    assert correlation.abs().max() < 5.5 / seeds**0.5


def test_in_every_registered_model_the_last_layer_rule_picks_exactly_the_output_layer():
    """The reference's test (first dimension = number of classes) applied to our models with 10 classes."""
    shapes = {"logreg": (1, 8, 8), "simple-cnn": (1, 8, 8), "resnet18": (3, 32, 32), "vit-lite": (3, 32, 32), "cnn1d": (1, 40)}
    for name, shape in shapes.items():
        model = build_model(name, shape, 10)
        head = [module for module in model.modules() if isinstance(module, nn.Linear)][-1]
        picked = [p for p in model.parameters() if is_last_layer(p.shape, number_of_classes(model))]
        assert number_of_classes(model) == 10
        assert len(picked) == 2 and picked[0] is head.weight and picked[1] is head.bias, name


def _port(histograms, forget):
    clients = {k: ClientInfo(partition_id=k, node_id=k, num_examples=sum(h), label_histogram=tuple(h)) for k, h in histograms.items()}
    return SimpleNamespace(clients=clients, remaining=lambda deletion: [k for k in clients if k not in forget])


def test_a_class_is_wholly_deleted_only_when_no_remaining_client_holds_it():
    histograms = {0: (5, 3, 0, 2), 1: (4, 0, 0, 1), 2: (1, 0, 0, 7)}
    deletion = Deletion(forget_clients=(0,), trained_state={}, trained_rounds=1)
    # class 1: only client 0 holds it; class 2: nobody does (not a deletion of it); 0 and 3: others hold some
    assert wholly_deleted_classes(_port(histograms, {0}), deletion) == (1,)
    both = Deletion(forget_clients=(0, 1), trained_state={}, trained_rounds=1)
    assert wholly_deleted_classes(_port(histograms, {0, 1}), both) == (1,)
    assert wholly_deleted_classes(_port({**histograms, 2: (1, 1, 0, 7)}, {0}), deletion) == ()


def test_unlearn_zeroes_the_output_row_of_a_class_the_deletion_removes():
    """Through the method's entry point: client 0 alone holds class 2, so θ_u's class-2 output row is
    N(0, 10⁻³) and the rest is θ* plus noise."""
    model = _mlp()
    trained = {name: t.clone() for name, t in model.state_dict().items()}
    histograms = {0: (2, 1, 9), 1: (5, 3, 0), 2: (4, 4, 0)}
    port = _port(histograms, {0})
    port.new_model = _mlp
    port.remaining_objective = lambda partitions, state: _HandFisher()
    config = run_config.resolve({"fisher-alpha": 1e-12})
    outcome = create_method("fisher", {**config, "seed": 3}).unlearn(port, Deletion((0,), trained, 1))
    assert outcome.details["server"]["forgotten_classes"] == [2]
    assert outcome.details["queried_clients"] == [1, 2]
    state = outcome.state
    assert state["3.weight"][2].abs().max() < 0.2 and state["3.bias"][2].abs() < 0.2
    assert state["3.weight"][2].abs().max() > 0  # noise, not an exact zero
    torch.testing.assert_close(state["3.weight"][:2], trained["3.weight"][:2], rtol=0, atol=1e-4)
    torch.testing.assert_close(state["0.weight"], trained["0.weight"], rtol=0, atol=1e-4)
    assert trained["3.weight"][2].abs().max() > 0.2  # the row did move to 0
