"""Conjugate gradient for (C + lambda I) x = b, C the Hessian or the GGN, and the CG inverse operator.

CG needs only products with C (``products.hvp`` / ``products.ggn_vp``), never the matrix. After k
iterations from x0 = 0 on an SPD system with condition number kappa (HF-KCU eq. 6 / Thm. 3):

    ||x_k - x*||_A <= 2 ((sqrt(kappa) - 1) / (sqrt(kappa) + 1))^k ||x0 - x*||_A.

The Hessian of a non-convex loss may be indefinite even after damping: CG then meets a direction
with p^T A p <= 0, where its step is undefined. We detect that, stop, and report it; the CG inverse
can instead switch to the GGN (PSD for cross-entropy) or multiply the damping and start again.
"""

from __future__ import annotations

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
    tol: float = 1e-6,
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


class DampedCurvature:
    """The linear operator C + lambda I (C = Hessian or GGN of the mean loss over ``batches``).

    Apply it with ``@`` to a list of parameter-shaped tensors or ``.matvec`` to a flat vector.
    ``batches`` must be re-iterable (a DataLoader or a list): every product makes one pass.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Batches,
        damping: float,
        curvature: str = "ggn",
        param_names: Sequence[str] | None = None,
        loss_fn: LossFn = cross_entropy,
    ):
        _check_choice("curvature", curvature, CURVATURES)
        if not damping >= 0:
            raise ConfigError("damping", damping, "a number >= 0")
        self.model, self.batches, self.damping, self.curvature = model, batches, float(damping), curvature
        self.loss_fn = loss_fn
        self.param_names = resolve_param_names(model, param_names)
        params = dict(model.named_parameters())
        self._like = [params[name].detach() for name in self.param_names]
        self.num_products = 0

    @property
    def dim(self) -> int:
        return sum(t.numel() for t in self._like)

    def __matmul__(self, vectors: Sequence[Tensor]) -> list[Tensor]:
        product = hvp if self.curvature == "hessian" else ggn_vp
        self.num_products += 1
        cv = product(self.model, self.param_names, self.batches, vectors, self.loss_fn)
        return [c + self.damping * v for c, v in zip(cv, vectors)]

    def matvec(self, flat: Tensor) -> Tensor:
        return flatten(self @ unflatten(flat, self._like))


class CGInverse:
    """(C + lambda I)^{-1} applied by CG: the HF-KCU inverse operator.

    ``apply`` takes and returns lists of parameter-shaped tensors (ordered as ``param_names``).
    ``diagnostics`` describes the last solve: iterations, residual history, whether and where
    negative curvature stopped CG, which curvature and damping finally produced the answer.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Batches,
        damping: float,
        curvature: str = "ggn",
        cg_iters: int = 100,
        cg_tol: float = 1e-6,
        negative_curvature: str = "stop",
        param_names: Sequence[str] | None = None,
        loss_fn: LossFn = cross_entropy,
    ):
        _check_choice("negative-curvature", negative_curvature, NEGATIVE_CURVATURE_POLICIES)
        if not (isinstance(cg_iters, int) and cg_iters >= 1):
            raise ConfigError("cg-iters", cg_iters, "an integer >= 1")
        if not cg_tol > 0:
            raise ConfigError("cg-tol", cg_tol, "a number > 0")
        self.operator = DampedCurvature(model, batches, damping, curvature, param_names, loss_fn)
        self.param_names = self.operator.param_names
        self.cg_iters, self.cg_tol, self.negative_curvature = cg_iters, cg_tol, negative_curvature
        self.diagnostics: dict = {}

    def apply(self, vectors: Sequence[Tensor]) -> list[Tensor]:
        start = time.perf_counter()
        b = flatten(vectors)
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
            if not result.negative_curvature or self.negative_curvature == "stop":
                break
            if self.negative_curvature == "raise":
                raise NegativeCurvatureError(
                    f"CG met curvature {result.negative_curvature_value:.3g} <= 0 at iteration "
                    f"{result.iterations + 1} of the damped {operator.curvature} (damping {operator.damping:g}); "
                    "raise 'damping' or use curvature='ggn'"
                )
            if self.negative_curvature == "ggn" and operator.curvature == "hessian":
                operator = DampedCurvature(
                    operator.model, operator.batches, operator.damping, "ggn", operator.param_names, operator.loss_fn
                )
                continue
            if self.negative_curvature == "damping" and len(attempts) <= DAMPING_RETRIES:
                operator = DampedCurvature(
                    operator.model,
                    operator.batches,
                    operator.damping * DAMPING_GROWTH,
                    operator.curvature,
                    operator.param_names,
                    operator.loss_fn,
                )
                continue
            break
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
            "seconds": time.perf_counter() - start,
        }
        return unflatten(result.solution, vectors)
