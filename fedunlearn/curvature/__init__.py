"""Curvature products, inverse operators and the (epsilon, delta) certificate.

Every inverse is an :class:`InverseOperator`: ``apply(vectors) -> vectors`` on lists of
parameter-shaped tensors ordered as its ``param_names``, plus a ``diagnostics`` dict. The unlearning
methods differ only in which one they build (:func:`build_inverse`, one place resolving the strings)
and apply to a forget gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from fedunlearn.curvature.certificate import (
    DEFAULT_DELTA,
    epsilon,
    kronecker_inverse_gap,
    sensitivity,
    sigma_for_epsilon,
    theorem1_bound,
)
from fedunlearn.curvature.cg import (
    CURVATURES,
    NEGATIVE_CURVATURE_POLICIES,
    CGInverse,
    CGResult,
    DampedCurvature,
    NegativeCurvatureError,
    NonFiniteCurvatureError,
    conjugate_gradient,
)
from fedunlearn.curvature.factor_solvers import (
    DEFAULT_FACTOR_MEMORY_BUDGET,
    DEFAULT_KFAC_RANK,
    DEFAULT_MPO_THRESHOLD,
    DEFAULT_NYSTROM_RANK,
    FACTOR_SOLVERS,
    PROP2_FALLBACKS,
    DenseFactorInverse,
    MPOFactorInverse,
    NystromFactorInverse,
    Prop2Error,
    make_factor_inverse,
)
from fedunlearn.curvature.kfac import (
    UNCOVERED_POLICIES,
    KFACInverse,
    compute_kfac_factors,
)
from fedunlearn.curvature.products import (
    Batches,
    cross_entropy,
    flatten,
    ggn_vp,
    hvp,
    loss_gradient,
    resolve_param_names,
    unflatten,
)
from fedunlearn.errors import ConfigError


@runtime_checkable
class InverseOperator(Protocol):
    param_names: list[str]
    diagnostics: dict

    def apply(self, vectors: Sequence[Tensor]) -> list[Tensor]: ...


SOLVERS = ("cg", "kfac", "kfac-mpo", "kfac-nystrom")
_SOLVER_FACTOR = {"kfac-mpo": "mpo", "kfac-nystrom": "nystrom"}

# Run-config keys (kebab-case) read by inverse_from_config, with their defaults.
CONFIG_DEFAULTS: dict[str, Any] = {
    "solver": "cg",
    "damping": 0.01,
    "curvature": "ggn",
    "cg-iters": 100,
    "cg-tol": 1e-6,
    "negative-curvature": "stop",
    "factor-solver": "dense",
    "kfac-rank": DEFAULT_KFAC_RANK,
    "nystrom-rank": DEFAULT_NYSTROM_RANK,
    "mpo-threshold": DEFAULT_MPO_THRESHOLD,
    "factor-memory-budget": DEFAULT_FACTOR_MEMORY_BUDGET,
    "prop2-fallback": "dense",
    "kfac-uncovered": "identity",
    "seed": 0,
}


def build_inverse(
    solver: str,
    model: nn.Module,
    batches: Batches,
    damping: float,
    curvature: str = "ggn",
    cg_iters: int = 100,
    cg_tol: float = 1e-6,
    negative_curvature: str = "stop",
    factor_solver: str = "dense",
    kfac_rank: int = DEFAULT_KFAC_RANK,
    nystrom_rank: int = DEFAULT_NYSTROM_RANK,
    mpo_threshold: int = DEFAULT_MPO_THRESHOLD,
    factor_memory_budget: int = DEFAULT_FACTOR_MEMORY_BUDGET,
    prop2_fallback: str = "dense",
    kfac_uncovered: str = "identity",
    param_names: Sequence[str] | None = None,
    loss: nn.Module | None = None,
    seed: int = 0,
) -> InverseOperator:
    """The inverse operator for ``solver``: ``cg`` ((C + lambda I)^{-1} by CG, C = ``curvature``),
    ``kfac`` (per-factor ``factor_solver``), ``kfac-mpo`` / ``kfac-nystrom`` (kfac with that factor
    solver). ``batches`` must be re-iterable (a DataLoader or a list of (x, y))."""
    if solver not in SOLVERS:
        raise ConfigError("solver", solver, SOLVERS)
    loss = loss if loss is not None else nn.CrossEntropyLoss(reduction="mean")
    if solver == "cg":
        return CGInverse(
            model,
            batches,
            damping,
            curvature=curvature,
            cg_iters=cg_iters,
            cg_tol=cg_tol,
            negative_curvature=negative_curvature,
            param_names=param_names,
            loss_fn=loss,
        )
    return KFACInverse(
        model,
        batches,
        damping,
        factor_solver=_SOLVER_FACTOR.get(solver, factor_solver),
        kfac_rank=kfac_rank,
        nystrom_rank=nystrom_rank,
        mpo_threshold=mpo_threshold,
        factor_memory_budget=factor_memory_budget,
        prop2_fallback=prop2_fallback,
        uncovered=kfac_uncovered,
        param_names=param_names,
        loss_module=loss,
        seed=seed,
    )


def inverse_from_config(
    model: nn.Module,
    batches: Batches,
    config: Mapping[str, Any],
    param_names: Sequence[str] | None = None,
    solver: str | None = None,
) -> InverseOperator:
    """:func:`build_inverse` from a kebab-case run config (missing keys take CONFIG_DEFAULTS)."""
    value = {key: config.get(key, default) for key, default in CONFIG_DEFAULTS.items()}
    return build_inverse(
        solver or value["solver"],
        model,
        batches,
        damping=float(value["damping"]),
        curvature=value["curvature"],
        cg_iters=int(value["cg-iters"]),
        cg_tol=float(value["cg-tol"]),
        negative_curvature=value["negative-curvature"],
        factor_solver=value["factor-solver"],
        kfac_rank=int(value["kfac-rank"]),
        nystrom_rank=int(value["nystrom-rank"]),
        mpo_threshold=int(value["mpo-threshold"]),
        factor_memory_budget=int(value["factor-memory-budget"]),
        prop2_fallback=value["prop2-fallback"],
        kfac_uncovered=value["kfac-uncovered"],
        param_names=param_names,
        seed=int(value["seed"]),
    )


__all__ = [
    "CONFIG_DEFAULTS",
    "CURVATURES",
    "DEFAULT_DELTA",
    "FACTOR_SOLVERS",
    "NEGATIVE_CURVATURE_POLICIES",
    "PROP2_FALLBACKS",
    "SOLVERS",
    "UNCOVERED_POLICIES",
    "Batches",
    "CGInverse",
    "CGResult",
    "DampedCurvature",
    "DenseFactorInverse",
    "InverseOperator",
    "KFACInverse",
    "MPOFactorInverse",
    "NegativeCurvatureError",
    "NonFiniteCurvatureError",
    "NystromFactorInverse",
    "Prop2Error",
    "build_inverse",
    "compute_kfac_factors",
    "conjugate_gradient",
    "cross_entropy",
    "epsilon",
    "flatten",
    "ggn_vp",
    "hvp",
    "inverse_from_config",
    "kronecker_inverse_gap",
    "loss_gradient",
    "make_factor_inverse",
    "resolve_param_names",
    "sensitivity",
    "sigma_for_epsilon",
    "theorem1_bound",
    "unflatten",
]
