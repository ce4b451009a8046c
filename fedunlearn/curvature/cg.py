"""Conjugate gradient for (C + lambda I) x = b, C the Hessian or the GGN, and the CG inverse operator.

CG needs only products with C, never the matrix: from local data (``products.hvp`` /
``products.ggn_vp``, :class:`DampedCurvature`) or from any function computing them, e.g. a sum over
a federation of clients, one round per product (:class:`CallableCurvature`). After k
iterations from x0 = 0 on an SPD system with condition number kappa (HF-KCU eq. 6 / Thm. 3):

    ||x_k - x*||_A <= 2 ((sqrt(kappa) - 1) / (sqrt(kappa) + 1))^k ||x0 - x*||_A.

The Hessian of a non-convex loss may be indefinite even after damping: CG then meets a direction
with p^T A p <= 0, where its step is undefined. We detect that, stop, and report it; the CG inverse
can instead switch to the GGN (PSD for cross-entropy) or multiply the damping and start again
(:func:`after_negative_curvature`, the one place deciding that).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fedunlearn.curvature.products import (
    Batches,
    LossFn,
    cross_entropy,
    flatten,
    ggn_vp,
    hvp,
    resolve_param_names,
    unflatten,
)
from fedunlearn.curvature.settings import SolverSettings
from fedunlearn.errors import ConfigError

CURVATURES = ("hessian", "ggn")
NEGATIVE_CURVATURE_POLICIES = ("stop", "ggn", "damping", "raise")
# How much the "damping" policy multiplies lambda by on each retry, and how often it retries.
DAMPING_GROWTH = 10.0
DAMPING_RETRIES = 4


class NonFiniteCurvatureError(FloatingPointError):
    """A curvature product or a CG quantity became NaN or Inf."""


class NegativeCurvatureError(ArithmeticError):
    """CG met a direction p with p^T A p <= 0 and the policy says to raise."""


@dataclass
class CGResult:
    solution: Tensor
    iterations: int
    # ||r_k||_2 for k = 0..iterations, r_k = b - A x_k.
    residual_norms: list[float] = field(default_factory=list)
    converged: bool = False
    negative_curvature: bool = False
    # The curvature p^T A p / p^T p of the direction that stopped CG (None if none did).
    negative_curvature_value: float | None = None
    stop_reason: str = "max-iters"


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    max_iters: int,
    tol: float,
    x0: Tensor | None = None,
) -> CGResult:
    """Solve A x = b for symmetric A given only ``matvec``; stop when ||r|| <= tol ||b||.

    On a direction of non-positive curvature CG stops (``stop_reason="negative-curvature"``) and
    returns the iterate it had, which is the minimiser of the quadratic model over the Krylov
    subspace explored so far (Steihaug's rule without the trust region).
    """
    if max_iters < 0:
        raise ConfigError("cg-iters", max_iters, "an integer >= 0")
    if not tol > 0:
        raise ConfigError("cg-tol", tol, "a number > 0")
    if not torch.isfinite(b).all():
        raise NonFiniteCurvatureError("the right-hand side b contains NaN or Inf")
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - matvec(x) if x0 is not None else b.clone()
    p = r.clone()
    rs = torch.dot(r, r)
    b_norm = torch.linalg.vector_norm(b)
    result = CGResult(solution=x, iterations=0, residual_norms=[float(rs.sqrt())])
    if b_norm == 0 or rs.sqrt() <= tol * b_norm:
        result.converged, result.stop_reason = True, "converged"
        return result
    for k in range(max_iters):
        ap = matvec(p)
        curvature = torch.dot(p, ap)
        if not torch.isfinite(curvature):
            raise NonFiniteCurvatureError(
                f"p^T A p is {float(curvature)} at CG iteration {k + 1}: the curvature product returned NaN/Inf "
                "(diverged model, overflow, or a bad input batch)"
            )
        if curvature <= 0:
            result.negative_curvature = True
            result.negative_curvature_value = float(curvature / torch.dot(p, p))
            result.stop_reason = "negative-curvature"
            break
        alpha = rs / curvature
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = torch.dot(r, r)
        result.iterations = k + 1
        result.residual_norms.append(float(rs_new.sqrt()))
        if rs_new.sqrt() <= tol * b_norm:
            result.converged, result.stop_reason = True, "converged"
            rs = rs_new
            break
        p = r + (rs_new / rs) * p
        rs = rs_new
    result.solution = x
    return result


def _check_choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(key, value, choices)


def after_negative_curvature(
    result: CGResult, policy: str, curvature: str, damping: float, attempt: int
) -> tuple[str, float] | None:
    """The ``negative-curvature`` policy after CG attempt number ``attempt`` (1 for the first) ran on
    the damped ``curvature`` with ``damping`` and returned ``result``: the (curvature, damping) to
    solve with next, or None to keep ``result``.

    ``stop``: None. ``ggn``: the GGN at the same damping, once (None if already on the GGN).
    ``damping``: the same curvature at DAMPING_GROWTH times the damping, while attempt <= DAMPING_RETRIES.
    ``raise``: :class:`NegativeCurvatureError`. A result without negative curvature always gives None.
    """
    _check_choice("negative-curvature", policy, NEGATIVE_CURVATURE_POLICIES)
    if not result.negative_curvature or policy == "stop":
        return None
    if policy == "raise":
        raise NegativeCurvatureError(
            f"CG met curvature {result.negative_curvature_value:.3g} <= 0 at iteration {result.iterations + 1} "
            f"of the damped {curvature} (damping {damping:g}); raise 'damping', or set curvature = ggn "
            "or negative-curvature = ggn"
        )
    if policy == "ggn" and curvature == "hessian":
        return "ggn", damping
    if policy == "damping" and attempt <= DAMPING_RETRIES:
        return curvature, damping * DAMPING_GROWTH
    return None


class DampedOperator:
    """The linear operator C + lambda I, C the Hessian or the GGN given by :meth:`curvature_product`.

    Apply it with ``@`` to a list of parameter-shaped tensors or ``.matvec`` to a flat vector:
    ``matvec(v) = curvature_product(v) + damping * v``. ``replace`` gives the same operator with
    another curvature or damping (what the negative-curvature policy retries with).
    """

    def __init__(self, like: Sequence[Tensor], damping: float, curvature: str, param_names: Sequence[str]):
        _check_choice("curvature", curvature, CURVATURES)
        if not damping >= 0:
            raise ConfigError("damping", damping, "a number >= 0")
        self.damping, self.curvature = float(damping), curvature
        self.param_names = list(param_names)
        self._like = list(like)
        self.num_products = 0

    @property
    def dim(self) -> int:
        return sum(t.numel() for t in self._like)

    @property
    def like(self) -> list[Tensor]:
        return list(self._like)

    def curvature_product(self, flat: Tensor) -> Tensor:
        """C v for a flat v, flat."""
        raise NotImplementedError

    def matvec(self, flat: Tensor) -> Tensor:
        self.num_products += 1
        return self.curvature_product(flat) + self.damping * flat

    def __matmul__(self, vectors: Sequence[Tensor]) -> list[Tensor]:
        return unflatten(self.matvec(flatten(vectors)), self._like)

    def replace(self, curvature: str | None = None, damping: float | None = None) -> DampedOperator:
        curvature = self.curvature if curvature is None else curvature
        damping = self.damping if damping is None else damping
        _check_choice("curvature", curvature, CURVATURES)
        if not damping >= 0:
            raise ConfigError("damping", damping, "a number >= 0")
        other = copy.copy(self)
        other.curvature, other.damping, other.num_products = curvature, float(damping), 0
        return other


class DampedCurvature(DampedOperator):
    """C + lambda I with C the Hessian or GGN of the mean loss over local ``batches``.

    ``batches`` must be re-iterable (a DataLoader or a list): every product makes one pass.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Batches,
        damping: float,
        curvature: str,
        param_names: Sequence[str] | None = None,
        loss_fn: LossFn = cross_entropy,
    ):
        names = resolve_param_names(model, param_names)
        params = dict(model.named_parameters())
        super().__init__([params[name].detach() for name in names], damping, curvature, names)
        self.model, self.batches, self.loss_fn = model, batches, loss_fn

    def curvature_product(self, flat: Tensor) -> Tensor:
        product = hvp if self.curvature == "hessian" else ggn_vp
        return flatten(product(self.model, self.param_names, self.batches, unflatten(flat, self._like), self.loss_fn))


CurvatureProduct = Callable[[str, Tensor], Tensor]


class CallableCurvature(DampedOperator):
    """C + lambda I with C v = ``product(curvature, v)`` on flat vectors: any curvature product,
    e.g. one summed over a federation of clients (one round per call). ``like`` are the
    parameter-shaped tensors the flat vectors unflatten to (ordered as ``param_names``)."""

    def __init__(
        self,
        product: CurvatureProduct,
        like: Sequence[Tensor],
        damping: float,
        curvature: str,
        param_names: Sequence[str] | None = None,
    ):
        names = [str(i) for i in range(len(like))] if param_names is None else list(param_names)
        if len(names) != len(like):
            raise ValueError(f"{len(names)} parameter names for {len(like)} tensors")
        super().__init__([t.detach() for t in like], damping, curvature, names)
        self.product = product

    def curvature_product(self, flat: Tensor) -> Tensor:
        return self.product(self.curvature, flat)


class CGInverse:
    """(C + lambda I)^{-1} applied by CG over a :class:`DampedOperator`: the HF-KCU inverse operator.

    ``inverse @ vectors`` takes and returns lists of parameter-shaped tensors (ordered as
    ``param_names``); ``solve_flat(b)`` is the same on a flat vector and returns the final
    :class:`CGResult`. The operator's curvature and damping are where each solve starts;
    ``settings`` gives ``cg_iters``, ``cg_tol`` and the ``negative_curvature`` policy
    (:func:`after_negative_curvature`). ``diagnostics`` describes the last solve: iterations, residual
    history, whether and where negative curvature stopped CG, which curvature and damping finally
    produced the answer, and every attempt.
    """

    def __init__(self, operator: DampedOperator, settings: SolverSettings):
        _check_choice("negative-curvature", settings.negative_curvature, NEGATIVE_CURVATURE_POLICIES)
        self.operator, self.settings = operator, settings
        self.param_names = operator.param_names
        self.cg_iters, self.cg_tol, self.negative_curvature = settings.cg_iters, settings.cg_tol, settings.negative_curvature
        self.diagnostics: dict = {}

    @classmethod
    def from_local(
        cls,
        model: nn.Module,
        batches: Batches,
        settings: SolverSettings,
        param_names: Sequence[str] | None = None,
        loss_fn: LossFn = cross_entropy,
    ) -> CGInverse:
        """CG on the ``settings.curvature`` of the mean loss over ``batches``, damped by ``settings.damping``."""
        return cls(DampedCurvature(model, batches, settings.damping, settings.curvature, param_names, loss_fn), settings)

    @classmethod
    def from_callable(
        cls,
        product: CurvatureProduct,
        like: Sequence[Tensor],
        settings: SolverSettings,
        param_names: Sequence[str] | None = None,
    ) -> CGInverse:
        """CG on ``product(curvature, flat v) -> flat C v``, starting at ``settings.curvature`` and ``settings.damping``."""
        return cls(CallableCurvature(product, like, settings.damping, settings.curvature, param_names), settings)

    def solve_flat(self, b: Tensor) -> CGResult:
        start = time.perf_counter()
        operator = self.operator
        attempts = []
        while True:
            products_before = operator.num_products
            result = conjugate_gradient(operator.matvec, b, self.cg_iters, self.cg_tol)
            attempts.append(
                {
                    "curvature": operator.curvature,
                    "damping": operator.damping,
                    "iterations": result.iterations,
                    "stop_reason": result.stop_reason,
                    "negative_curvature_value": result.negative_curvature_value,
                    "products": operator.num_products - products_before,
                }
            )
            retry = after_negative_curvature(result, self.negative_curvature, operator.curvature, operator.damping, len(attempts))
            if retry is None:
                break
            curvature, damping = retry
            operator = operator.replace(curvature=curvature, damping=damping)
        self.diagnostics = {
            "solver": "cg",
            "curvature": operator.curvature,
            "damping": operator.damping,
            "cg_iterations": result.iterations,
            "residual_history": result.residual_norms,
            "relative_residual": result.residual_norms[-1] / max(float(torch.linalg.vector_norm(b)), 1e-300),
            "converged": result.converged,
            "stop_reason": result.stop_reason,
            "negative_curvature": any(a["stop_reason"] == "negative-curvature" for a in attempts),
            "attempts": attempts,
            "products": sum(a["products"] for a in attempts),
            "seconds": time.perf_counter() - start,
        }
        return result

    def apply(self, vectors: Sequence[Tensor]) -> list[Tensor]:
        return unflatten(self.solve_flat(flatten(vectors)).solution, vectors)

    def __matmul__(self, vectors: Sequence[Tensor]) -> list[Tensor]:
        return self.apply(vectors)
