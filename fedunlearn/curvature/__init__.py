"""Curvature products, inverse operators and the (epsilon, delta) certificate.

Every inverse is an :class:`InverseOperator`: ``inverse @ vectors`` on lists of parameter-shaped
tensors ordered as its ``param_names``, plus a ``diagnostics`` dict. The unlearning methods differ
only in which one they build (:func:`build_inverse`, one place resolving the strings, from one
:class:`SolverSettings`) and apply to a forget gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from torch import nn

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
    DAMPING_GROWTH,
    DAMPING_RETRIES,
    NEGATIVE_CURVATURE_POLICIES,
    CallableCurvature,
    CGInverse,
    CGResult,
    CurvatureProduct,
    DampedCurvature,
    DampedOperator,
    NegativeCurvatureError,
    NonFiniteCurvatureError,
    after_negative_curvature,
    conjugate_gradient,
)
from fedunlearn.curvature.factor_solvers import (
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
from fedunlearn.curvature.operators import FactorInverse, InverseOperator
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
from fedunlearn.curvature.settings import SolverSettings
from fedunlearn.errors import ConfigError


SOLVERS = ("cg", "kfac", "kfac-mpo", "kfac-nystrom")
_SOLVER_FACTOR = {"kfac-mpo": "mpo", "kfac-nystrom": "nystrom"}


def build_inverse(
    solver: str,
    model: nn.Module,
    batches: Batches,
    settings: SolverSettings,
    param_names: Sequence[str] | None = None,
    loss: nn.Module | None = None,
) -> InverseOperator:
    """The inverse operator for ``solver``: ``cg`` ((C + lambda I)^{-1} by CG on the local
    curvature, C = ``settings.curvature``), ``kfac`` (per-factor ``settings.factor_solver``),
    ``kfac-mpo`` / ``kfac-nystrom`` (kfac with that factor solver). ``batches`` must be re-iterable
    (a DataLoader or a list of (x, y))."""
    if solver not in SOLVERS:
        raise ConfigError("solver", solver, SOLVERS)
    loss = loss if loss is not None else nn.CrossEntropyLoss(reduction="mean")
    if solver == "cg":
        return CGInverse.from_local(model, batches, settings, param_names, loss_fn=loss)
    if solver in _SOLVER_FACTOR:
        settings = replace(settings, factor_solver=_SOLVER_FACTOR[solver])
    return KFACInverse(model, batches, settings, param_names=param_names, loss_module=loss)


def inverse_from_config(
    model: nn.Module,
    batches: Batches,
    config: Mapping[str, Any],
    param_names: Sequence[str] | None = None,
    solver: str | None = None,
) -> InverseOperator:
    """:func:`build_inverse` (``solver``, default ``cg``) with :meth:`SolverSettings.from_config` of a
    kebab-case run config (missing keys take ``fedunlearn.config``'s defaults)."""
    return build_inverse(solver or "cg", model, batches, SolverSettings.from_config(config), param_names=param_names)


__all__ = [
    "CURVATURES",
    "DAMPING_GROWTH",
    "DAMPING_RETRIES",
    "DEFAULT_DELTA",
    "FACTOR_SOLVERS",
    "NEGATIVE_CURVATURE_POLICIES",
    "PROP2_FALLBACKS",
    "SOLVERS",
    "UNCOVERED_POLICIES",
    "Batches",
    "CGInverse",
    "CGResult",
    "CallableCurvature",
    "CurvatureProduct",
    "DampedCurvature",
    "DampedOperator",
    "DenseFactorInverse",
    "FactorInverse",
    "InverseOperator",
    "KFACInverse",
    "MPOFactorInverse",
    "NegativeCurvatureError",
    "NonFiniteCurvatureError",
    "NystromFactorInverse",
    "Prop2Error",
    "SolverSettings",
    "after_negative_curvature",
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
