import torch
import torch.nn as nn
import torch.nn.functional as F

from fedunlearn import config as run_config
from fedunlearn.training import derive_seed
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


def test_fisher_forgetting_noise_has_the_inverse_fisher_variance():
    model, batches = _tiny()
    remaining = InProcessRemainingClients(model, {1: batches[:1], 2: batches[1:]})
    config = run_config.resolve({"fisher-alpha": 1e-4, "seed": 3})
    update = create_method("fisher", config).server_step(model, remaining)
    fisher = remaining.diagonal_fisher(update.param_names)  # the same weighted average the method used
    generator = torch.Generator().manual_seed(derive_seed(3, "fisher-forgetting"))
    for delta, value in zip(update.delta, fisher):
        standard_deviation = (1e-4 * (1.0 / (value + 1e-8)).clamp(max=1e3)).sqrt()
        torch.testing.assert_close(delta, standard_deviation * torch.randn(value.shape, generator=generator, dtype=value.dtype))
    assert update.communication_rounds == 1
