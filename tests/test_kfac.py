"""KFAC factors (curvlinops) and the KFAC inverse against dense Kronecker products."""


import pytest
import torch
from torch import nn

from fedunlearn.curvature import (
    KFACInverse,
    SolverSettings,
    build_inverse,
    compute_kfac_factors,
    inverse_from_config,
    loss_gradient,
)
from fedunlearn.curvature.products import dense_curvature
from fedunlearn.errors import ConfigError

F64 = torch.float64


def settings(**changes):
    return SolverSettings.defaults().replace(**changes)


def conv_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()
    x = torch.randn(10, 1, 4, 4, dtype=F64)
    y = torch.randint(0, 3, (10,))
    return model, [(x[:6], y[:6]), (x[6:], y[6:])]


def joint(weight, bias):
    return torch.cat([weight.reshape(weight.shape[0], -1), bias.reshape(-1, 1)], dim=1)


def test_factors_reproduce_the_exact_ggn_of_a_linear_layer_on_one_example():
    # With one example and no weight sharing, KFAC (type-2) is exact: GGN block = G kron A.
    model, batches = conv_model()
    one = [(batches[0][0][:1], batches[0][1][:1])]
    factors, _, _ = compute_kfac_factors(model, one)
    a, g = factors["3"]
    assert a.shape == (33, 33) and g.shape == (3, 3)  # bias appended to the inputs
    ggn = dense_curvature(model, ["3.weight", "3.bias"], one, "ggn")
    order = torch.arange(99).reshape(3, 33)  # joint (W | b) row-major index -> [vec W, b] position
    position = torch.cat([order[:, :32].reshape(-1), order[:, 32]])
    ggn_joint = torch.empty_like(ggn)
    ggn_joint[position[:, None], position[None, :]] = ggn
    assert torch.allclose(ggn_joint, torch.kron(g, a), atol=1e-12)


def test_dense_kfac_inverse_equals_the_inverse_of_the_damped_kronecker_product():
    model, batches = conv_model(1)
    damping = 0.05
    inverse = KFACInverse(model, batches, settings(damping=damping, factor_solver="dense"))
    forget_gradient = loss_gradient(model, None, batches[:1])
    update = dict(zip(inverse.param_names, inverse @ forget_gradient))
    gradient = dict(zip(inverse.param_names, forget_gradient))
    for layer in ("0", "3"):
        a, g = inverse.factors[layer]
        a_hat = a + damping * torch.eye(a.shape[0], dtype=F64)
        g_hat = g + damping * torch.eye(g.shape[0], dtype=F64)
        rhs = joint(gradient[f"{layer}.weight"], gradient[f"{layer}.bias"]).reshape(-1)
        expected = torch.linalg.solve(torch.kron(g_hat, a_hat), rhs)
        got = joint(update[f"{layer}.weight"], update[f"{layer}.bias"]).reshape(-1)
        assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12)
        assert inverse.diagnostics["layers"][layer]["A"]["solver"] == "dense"
        assert inverse.diagnostics["layers"][layer]["theorem1_truncation_bound"] == 0.0


@pytest.mark.parametrize("solver", ["kfac-mpo", "kfac-nystrom"])
def test_exact_mpo_and_nystrom_factors_reproduce_dense_kfac(solver):
    # At full bond dimension / rank the approximations are exact, so the updates must agree.
    model, batches = conv_model(2)
    damping = 0.05
    forget_gradient = loss_gradient(model, None, batches[:1])
    dense = build_inverse("kfac", model, batches, settings(damping=damping, factor_solver="dense"))
    approx = build_inverse(solver, model, batches, settings(damping=damping, kfac_rank=10_000, nystrom_rank=10_000, mpo_threshold=4))
    assert approx.diagnostics["factor_solver"] == solver.removeprefix("kfac-")
    for d, a in zip(dense @ forget_gradient, approx @ forget_gradient):
        assert torch.allclose(d, a, rtol=1e-7, atol=1e-10)
    used = {f["solver"] for layer in approx.diagnostics["layers"].values() for f in (layer["A"], layer["G"])}
    assert used == {solver.removeprefix("kfac-"), "dense"} or used == {solver.removeprefix("kfac-")}


def test_uncovered_parameters_get_damped_identity_or_zero():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(8, 4, dtype=F64), torch.randint(0, 3, (8,))
    batches = [(x, y)]
    gradient = loss_gradient(model, None, batches)
    damping = 0.2
    identity = KFACInverse(model, batches, settings(damping=damping, kfac_uncovered="identity"))
    assert identity.uncovered == ["1.weight", "1.bias"]
    updates = dict(zip(identity.param_names, identity @ gradient))
    by_name = dict(zip(identity.param_names, gradient))
    assert torch.allclose(updates["1.weight"], by_name["1.weight"] / damping)
    zero = KFACInverse(model, batches, settings(damping=damping, kfac_uncovered="zero"))
    assert torch.count_nonzero(dict(zip(zero.param_names, zero @ gradient))["1.bias"]) == 0


def test_config_resolution_and_errors():
    model, batches = conv_model()
    operator = inverse_from_config(model, batches, {"damping": 0.1, "factor-solver": "dense"}, solver="kfac")
    assert isinstance(operator, KFACInverse) and operator.damping == 0.1
    with pytest.raises(ConfigError) as info:
        build_inverse("newton", model, batches, settings(damping=0.1))
    assert info.value.key == "solver"
    with pytest.raises(ConfigError):
        KFACInverse(model, batches, settings(damping=0.1, factor_solver="svd"))
    with pytest.raises(ConfigError):
        KFACInverse(model, batches, settings(damping=0.1, kfac_uncovered="diagonal"))
    with pytest.raises(ConfigError) as info:
        KFACInverse(model, batches, settings(damping=0.0))
    assert info.value.key == "damping"


def test_clients_factors_weighted_by_their_sizes_are_the_factors_of_the_pooled_data():
    # The server adds the remaining clients' factors with q_j = n_j / n: that must be KFAC of their
    # union (uneven sizes and batch splits, so a plain mean or a per-batch weighting would fail).
    from fedunlearn.curvature.kfac import factors_from_arrays, factors_to_arrays, sum_factors

    model, _ = conv_model(seed=3)
    torch.manual_seed(4)
    sizes = (3, 11, 17)
    data = [(torch.randn(n, 1, 4, 4, dtype=F64), torch.randint(0, 3, (n,))) for n in sizes]
    per_client = {}
    for client, (x, y) in enumerate(data):
        batches = [(x[i : i + 5], y[i : i + 5]) for i in range(0, len(x), 5)]
        factors, _, _ = compute_kfac_factors(model, batches)
        per_client[client] = factors_from_arrays(factors_to_arrays(factors))  # as a reply carries them
    weights = {client: n / sum(sizes) for client, n in enumerate(sizes)}
    x_all, y_all = torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])
    pooled, _, _ = compute_kfac_factors(model, [(x_all[i : i + 8], y_all[i : i + 8]) for i in range(0, len(x_all), 8)])
    summed = sum_factors(per_client, weights)
    assert sorted(summed) == sorted(pooled)
    for layer, (a, g) in pooled.items():
        torch.testing.assert_close(summed[layer][0], a, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(summed[layer][1], g, rtol=1e-10, atol=1e-12)
    unweighted = sum_factors(per_client, {client: 1 / len(sizes) for client in per_client})
    assert not torch.allclose(unweighted["0"][0], pooled["0"][0], rtol=1e-3)


def test_an_inverse_from_given_factors_equals_the_one_computed_from_the_data():
    model, batches = conv_model(seed=5)
    config = settings(damping=0.05)
    direct = KFACInverse(model, batches, config)
    factors, _, _ = compute_kfac_factors(model, batches)
    given = KFACInverse.from_factors(factors, model, config)
    gradient = loss_gradient(model, None, batches)
    for a, b in zip(direct @ gradient, given @ gradient):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="KFAC layers"):
        KFACInverse.from_factors({"0": factors["0"]}, model, config)
