"""SolverSettings: one source of defaults (fedunlearn.config), checked values, and inverses applied with @."""

import dataclasses

import pytest
import torch
from torch import nn

import fedunlearn.curvature as curvature
from fedunlearn import config as run_config
from fedunlearn.curvature import (
    CGInverse,
    DenseFactorInverse,
    FactorInverse,
    InverseOperator,
    KFACInverse,
    MPOFactorInverse,
    NystromFactorInverse,
    SolverSettings,
    build_inverse,
    inverse_from_config,
    loss_gradient,
)
from fedunlearn.curvature import factor_solvers
from fedunlearn.curvature.settings import config_key
from fedunlearn.errors import ConfigError

F64 = torch.float64


def test_from_empty_config_equals_the_schema_defaults_key_by_key():
    defaults = run_config.defaults()
    settings = SolverSettings.from_config({})
    for field in dataclasses.fields(SolverSettings):
        key = config_key(field.name)
        assert key in defaults, f"{field.name} has no run-config key {key}"
        value = getattr(settings, field.name)
        assert value == defaults[key] and type(value) is type(defaults[key]), key
    assert SolverSettings.defaults() == settings
    assert settings.to_config() == {key: defaults[key] for key in SolverSettings.keys()}


def test_no_second_copy_of_the_defaults():
    assert not hasattr(curvature, "CONFIG_DEFAULTS")
    for name in ("DEFAULT_KFAC_RANK", "DEFAULT_MPO_THRESHOLD", "DEFAULT_NYSTROM_RANK", "DEFAULT_FACTOR_MEMORY_BUDGET"):
        assert not hasattr(factor_solvers, name) and not hasattr(curvature, name)
    # Every field is required: the dataclass itself holds no default.
    assert all(field.default is dataclasses.MISSING for field in dataclasses.fields(SolverSettings))


def test_from_config_reads_kebab_keys_coerces_and_ignores_other_keys():
    settings = SolverSettings.from_config(
        {"damping": 1, "cg-iters": "7", "negative-curvature": "raise", "kfac-rank": 4.0, "dataset": "mnist", "solver": "kfac"}
    )
    assert settings.damping == 1.0 and isinstance(settings.damping, float)
    assert settings.cg_iters == 7 and isinstance(settings.cg_iters, int)
    assert settings.kfac_rank == 4 and isinstance(settings.kfac_rank, int)
    assert settings.negative_curvature == "raise"
    assert settings.curvature == run_config.defaults()["curvature"]


def test_values_are_checked_against_the_schema_and_the_object_is_frozen():
    with pytest.raises(ConfigError) as info:
        SolverSettings.from_config({"curvature": "fisher"})
    assert info.value.key == "curvature"
    defaults = SolverSettings.defaults()
    with pytest.raises(ConfigError) as info:
        defaults.replace(cg_iters=0)
    assert info.value.key == "cg-iters"
    with pytest.raises(ConfigError) as info:
        dataclasses.replace(defaults, damping=-1.0)
    assert info.value.key == "damping"
    with pytest.raises(dataclasses.FrozenInstanceError):
        defaults.damping = 1.0
    assert defaults.with_damping(0.5) == dataclasses.replace(defaults, damping=0.5)
    assert defaults.with_damping(0.5).damping == 0.5 and defaults.damping == run_config.defaults()["damping"]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(12, 3, dtype=F64)
    y = torch.randint(0, 3, (12,))
    return model, [(x[:7], y[:7]), (x[7:], y[7:])]


def test_inverse_from_config_uses_the_schema_defaults():
    model, batches = tiny_model()
    inverse = inverse_from_config(model, batches, {})
    defaults = run_config.defaults()
    assert isinstance(inverse, CGInverse)
    assert inverse.cg_iters == defaults["cg-iters"] and inverse.cg_tol == defaults["cg-tol"]
    assert inverse.negative_curvature == defaults["negative-curvature"]
    assert inverse.operator.curvature == defaults["curvature"] and inverse.operator.damping == defaults["damping"]
    assert inverse.settings == SolverSettings.defaults()
    kfac = inverse_from_config(model, batches, {"damping": 0.2}, solver="kfac")
    assert isinstance(kfac, KFACInverse) and kfac.settings == SolverSettings.defaults().with_damping(0.2)


@pytest.mark.parametrize("solver", ["cg", "kfac", "kfac-mpo", "kfac-nystrom"])
def test_matmul_equals_apply_for_every_parameter_space_inverse(solver):
    model, batches = tiny_model(1)
    gradient = loss_gradient(model, None, batches[:1])
    settings = SolverSettings.defaults().replace(damping=0.05, mpo_threshold=2, kfac_rank=2, nystrom_rank=2)
    inverse = build_inverse(solver, model, batches, settings)
    assert isinstance(inverse, InverseOperator)
    product = inverse @ gradient
    applied = inverse.apply(gradient)
    assert len(product) == len(inverse.param_names)
    for p, a in zip(product, applied):
        assert torch.equal(p, a)


def test_matmul_equals_solve_for_every_factor_inverse():
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(0), dtype=F64)
    factor = x.T @ x / 40
    rhs = torch.randn(64, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    damping = 0.1
    inverses = [
        DenseFactorInverse(factor, damping),
        MPOFactorInverse(factor, damping, rank=4, prop2_fallback="dense", seed=0, check_prop2=False),
        NystromFactorInverse(factor, damping, rank=8, seed=0),
    ]
    for inverse in inverses:
        assert isinstance(inverse, FactorInverse)
        assert torch.equal(inverse @ rhs, inverse.solve(rhs))
        assert torch.equal(inverse @ rhs[:, 0], inverse.solve(rhs[:, 0]))
    exact = torch.linalg.solve(factor + damping * torch.eye(64, dtype=F64), rhs)
    assert torch.allclose(inverses[0] @ rhs, exact, rtol=1e-10, atol=1e-12)
