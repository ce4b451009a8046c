import pytest
import torch

from fedunlearn.unlearning.causal import adaptive_scale, causal_weights


def test_unaffected_clients_get_exactly_zero_weight():
    weights = causal_weights({1: 2.0, 3: 6.0}, affected=[1, 3], all_clients=range(5))
    assert weights[0] == weights[2] == weights[4] == 0.0
    # Proportional to the forget-gradient norms, mean 1 over the affected clients.
    assert weights[1] == pytest.approx(0.5) and weights[3] == pytest.approx(1.5)


def test_a_single_affected_client_keeps_its_influence_step():
    assert causal_weights({0: 123.0}, affected=[0], all_clients=range(3))[0] == 1.0


def test_adaptive_scaling_shortens_only_long_updates():
    update = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])]  # norm 5
    assert adaptive_scale(update, scaling_constant=10.0) == 1.0
    assert adaptive_scale(update, scaling_constant=2.0) == pytest.approx(0.4)
    assert adaptive_scale(update, scaling_constant=0.0) == 1.0  # off
