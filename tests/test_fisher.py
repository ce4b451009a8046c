import torch
import torch.nn as nn
import torch.nn.functional as F

from fedunlearn import config as run_config
from fedunlearn.unlearning import create_method
from fedunlearn.unlearning.methods.fisher import diagonal_fisher
from fedunlearn.unlearning.remaining import InProcessRemainingClients


def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(10, 1, 2, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    return model, [(x[:6], y[:6]), (x[6:], y[6:])]


def test_diagonal_fisher_equals_the_expectation_over_the_models_own_labels():
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


def _zero_softmax_regression():
    """Linear(4, 3) at zero: p(c|x) = 1/3 for every x, so the diagonal Fisher is known in closed form,
    F(W[c, j]) = E[x_j²] p_c (1 − p_c) = (2/9) E[x_j²] and F(b[c]) = 2/9."""
    model = nn.Linear(4, 3).double()
    with torch.no_grad():
        model.weight.zero_(), model.bias.zero_()
    return model


def _client(n, features):
    """n examples whose feature j is ±features[j] (alternating signs): E[x_j²] = features[j]²."""
    signs = torch.tensor([(-1.0) ** i for i in range(n)], dtype=torch.float64)
    x = signs[:, None] * torch.tensor(features, dtype=torch.float64)[None, :]
    return [(x, torch.zeros(n, dtype=torch.long))]


class _Memoised:
    """The remaining clients' Fisher computed once (by the real in-process code), then reused per seed."""

    def __init__(self, remaining):
        self.remaining, self.fisher = remaining, None

    def diagonal_fisher(self, names):
        if self.fisher is None:
            self.fisher = self.remaining.diagonal_fisher(names)
        return [value.clone() for value in self.fisher]


def test_fisher_forgetting_noise_has_the_inverse_remaining_fisher_as_variance():
    """Over many seeds, each parameter's noise variance is α · min(1/F, 10³) with F the remaining clients'
    example-weighted Fisher, here in closed form:

    - feature 0 (±3 on both clients, pinned down): F = 2, variance α/2;
    - feature 1 (±0.5 on both): F = 1/18;
    - feature 2 (±1 on the 10-example client only, 0 on the 30-example one): F = (10/40)(2/9) = 1/18,
      so an unweighted mean of the clients' Fishers would double F;
    - feature 3 (0 on every remaining client: only deleted data could have used it): F = 0, the cap binds
      and the variance is α · 10³;
    - the bias: F = 2/9.

    Catches a variance of α·F instead of α/F, a missing square root, a missing cap, unweighted client
    means, and noise reused across tensors or seeds."""
    alpha, seeds = 1e-2, 400
    model = _zero_softmax_regression()
    remaining = _Memoised(InProcessRemainingClients(model, {1: _client(30, [3.0, 0.5, 0.0, 0.0]), 2: _client(10, [3.0, 0.5, 1.0, 0.0])}))
    fisher_weight = torch.tensor([2.0, 1 / 18, 1 / 18, 0.0], dtype=torch.float64).expand(3, 4)
    fisher_bias = torch.full((3,), 2 / 9, dtype=torch.float64)
    expected = [alpha * (1 / (f + 1e-8)).clamp(max=1e3) for f in (fisher_weight, fisher_bias)]
    assert expected[0][0, 3] == alpha * 1e3  # the cap binds on feature 3

    config = run_config.resolve({"fisher-alpha": alpha})
    draws = []
    for seed in range(seeds):
        update = create_method("fisher", {**config, "seed": seed}).server_step(model, remaining)
        assert update.param_names == ["weight", "bias"] and update.communication_rounds == 1
        draws.append(torch.cat([d.flatten() for d in update.delta]))
    draws = torch.stack(draws)  # (seeds, 15)
    variance = torch.cat([e.flatten() for e in expected])
    standardised = draws / variance.sqrt()
    # Mean 0 and variance 1 per parameter within sampling error (SE of a variance: sqrt(2/seeds) = 0.07).
    assert standardised.mean(dim=0).abs().max() < 5 / seeds**0.5
    ratio = standardised.var(dim=0)
    assert ((ratio > 0.7) & (ratio < 1.3)).all(), ratio.reshape(-1).tolist()
    # Independent draws: no two parameters' noises are correlated (e.g. one generator restarted per tensor).
    correlation = torch.corrcoef(standardised.T) - torch.eye(15, dtype=torch.float64)
    assert correlation.abs().max() < 5 / seeds**0.5
    # The behaviour in words: what the remaining data pins down moves least, what it never used moves most.
    spread = draws.pow(2).mean(dim=0)[:12].reshape(3, 4).mean(dim=0)
    assert spread[0] < spread[1] < spread[3] and spread[3] > 1000 * spread[0]
