"""Per-factor inverses of a damped Kronecker factor A_hat = A + lambda I: dense, MPO, Nystrom, auto.

Every solver is a :class:`~fedunlearn.curvature.operators.FactorInverse`: ``inverse @ rhs`` (or
``solve(rhs)``) is A_hat^{-1} rhs for rhs of shape (d,) or (d, m), and ``diagnostics`` describes it.
:func:`make_factor_inverse` resolves the ``factor-solver`` string in one place, from the
:class:`~fedunlearn.curvature.settings.SolverSettings`.

Factors of dimension <= ``mpo_threshold`` are always solved densely: below it a low-rank or
tensor-train approximation saves nothing worth its error.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import Tensor

from fedunlearn.curvature.mpo import (
    MPO,
    als_solve,
    lanczos_extremes,
    mode_sizes,
    smooth_dim,
    tt_svd,
)
from fedunlearn.curvature.nystrom import MatMat, NystromApproximation
from fedunlearn.curvature.operators import FactorInverse  # noqa: F401  (re-exported; the protocol lives in operators.py)
from fedunlearn.curvature.settings import SolverSettings
from fedunlearn.errors import ConfigError

FACTOR_SOLVERS = ("dense", "mpo", "nystrom", "auto")
PROP2_FALLBACKS = ("dense", "raise")
# Probe vectors for auto's error estimate of the MPO and Nystrom approximations.
AUTO_PROBES = 8


class Prop2Error(ArithmeticError):
    """The MPO truncation is too coarse for the poster's Proposition 2 and the config says raise."""


def _check_damping(damping: float) -> None:
    if not (damping > 0 and math.isfinite(damping)):
        raise ConfigError("damping", damping, "a number > 0 (the factor inverses need A + lambda I > 0)")


class DenseFactorInverse:
    """Cholesky of A_hat = A + lambda I (eigendecomposition with floored eigenvalues if float
    round-off makes Cholesky fail)."""

    def __init__(self, factor: Tensor, damping: float):
        _check_damping(damping)
        start = time.perf_counter()
        self.dim = factor.shape[0]
        # Cholesky in place of the damped copy: one d x d buffer besides the factor (2.4 GB each at
        # d = 25088 in float32).
        damped = factor.clone()
        damped.diagonal().add_(damping)
        info = torch.empty((), dtype=torch.int32, device=factor.device)
        torch.linalg.cholesky_ex(damped, out=(damped, info))
        self._chol, self._eig = damped, None
        if int(info) != 0:
            del damped
            damped = factor + damping * torch.eye(self.dim, dtype=factor.dtype, device=factor.device)
            evals, evecs = torch.linalg.eigh((damped + damped.T) / 2)
            self._eig = (evals.clamp_min(damping), evecs)
            self._chol = None
        self.diagnostics = {
            "solver": "dense",
            "dim": self.dim,
            "bytes": self.dim * self.dim * factor.element_size(),
            "truncation_error": 0.0,
            "seconds": time.perf_counter() - start,
        }

    def solve(self, rhs: Tensor) -> Tensor:
        vector = rhs.ndim == 1
        block = rhs.reshape(self.dim, -1)
        if self._chol is not None:
            out = torch.cholesky_solve(block.to(self._chol.dtype), self._chol)
        else:
            evals, evecs = self._eig
            out = evecs @ ((evecs.T @ block.to(evecs.dtype)) / evals[:, None])
        out = out.to(rhs.dtype)
        return out.reshape(-1) if vector else out

    def __matmul__(self, rhs: Tensor) -> Tensor:
        return self.solve(rhs)


def prop2_inverse_bound(spectral_error: float, norm: float, kappa: float) -> float:
    """||A_tilde^{-1} - A_hat^{-1}||_2 <= kappa^2 eps / (||A_hat|| (||A_hat|| - kappa eps)) when kappa eps < ||A_hat||.

    This is the Neumann-series bound the poster's Proposition 2 proves; its printed eq. (2) has
    (kappa ||A_hat|| - kappa eps) in the denominator, which is violated already by diagonal
    examples (docs/methods.md)."""
    if kappa * spectral_error >= norm:
        return math.inf
    return kappa**2 * spectral_error / (norm * (norm - kappa * spectral_error))


class MPOFactorInverse:
    """TensorUnlearn's factor inverse: TT-SVD of A_hat at bond dimension ``rank``, solved by ALS.

    The poster's Proposition 2 needs ||A_hat - A_tilde||_2 / ||A_hat||_2 < 1 / kappa_A with
    kappa_A <= ||A_hat||_2 / lambda, i.e. a spectral truncation error below lambda. It is checked at
    construction (Lanczos on A_hat and on the error operator, both through products only); where it
    fails the MPO inverse is not trustworthy (A_tilde may even be indefinite) and we either fall back
    to the dense solve or raise :class:`Prop2Error`, per ``prop2_fallback``.
    """

    def __init__(
        self,
        factor: Tensor,
        damping: float,
        rank: int,
        prop2_fallback: str,
        *,
        seed: int,
        als_rank: int | None = None,
        als_sweeps: int = 4,
        max_mode: int = 4,
        check_prop2: bool = True,
        lanczos_steps: int = 30,
    ):
        _check_damping(damping)
        if prop2_fallback not in PROP2_FALLBACKS:
            raise ConfigError("prop2-fallback", prop2_fallback, PROP2_FALLBACKS)
        if not (isinstance(rank, int) and rank >= 1):
            raise ConfigError("kfac-rank", rank, "an integer >= 1")
        start = time.perf_counter()
        self.dim = factor.shape[0]
        self.damping, self.rank, self.seed = float(damping), rank, seed
        self.lanczos_steps = lanczos_steps
        self.als_rank = als_rank or rank
        self.als_sweeps = als_sweeps
        padded = smooth_dim(self.dim)
        self.modes = mode_sizes(padded, max_mode)
        source = self._padded(factor, padded)
        compressed, self.truncation_error = tt_svd(source, self.modes, rank, shift=self.damping)
        # The cores are small; ALS's local solves want float64 whatever the factor's dtype.
        self.mpo = MPO([core.to(torch.float64) for core in compressed.cores])
        compress_seconds = time.perf_counter() - start
        source_fro2 = float(torch.linalg.matrix_norm(source)) ** 2
        damped_fro = math.sqrt(max(source_fro2 + 2 * self.damping * float(torch.trace(source)) + self.damping**2 * padded, 0.0))
        self.diagnostics = {
            "solver": "mpo",
            "dim": self.dim,
            "padded_dim": padded,
            "modes": self.modes,
            "bond_dimension": rank,
            "mpo_ranks": self.mpo.ranks,
            "bytes": self.mpo.nbytes,
            # epsilon_A of the poster's Theorem 1: ||A_hat - A_tilde||_F
            "truncation_error": self.truncation_error,
            "frobenius_norm": damped_fro,
            "compress_seconds": compress_seconds,
        }
        self.fallback: DenseFactorInverse | None = None
        if check_prop2:
            self._check_prop2(source, factor, prop2_fallback)
        del source
        self.diagnostics["seconds"] = time.perf_counter() - start

    def _padded(self, factor: Tensor, padded: int) -> Tensor:
        # Padding with a multiple of the identity keeps the block diagonal: the padded coordinates
        # of the solution are zero for zero right-hand-side entries (up to the TT truncation).
        if padded == self.dim:
            return factor
        out = torch.zeros(padded, padded, dtype=factor.dtype)
        out[: self.dim, : self.dim] = factor
        pad_value = float(torch.diagonal(factor).mean())
        idx = torch.arange(self.dim, padded)
        out[idx, idx] = pad_value
        return out

    def _check_prop2(self, source: Tensor, factor: Tensor, prop2_fallback: str) -> None:
        dim = source.shape[0]
        mpo, mpo_t = self.mpo, self.mpo.transpose()
        damping = self.damping

        def damped(v: Tensor) -> Tensor:  # A_hat v without a damped copy of A
            return source @ v + damping * v

        def error_normal(v: Tensor) -> Tensor:  # E^T E v with E = A_hat - A_tilde (A_tilde may be non-symmetric)
            ev = damped(v) - (mpo @ v).to(source.dtype)
            return damped(ev) - (mpo_t @ ev).to(source.dtype)

        def mpo_symmetric(v: Tensor) -> Tensor:
            return 0.5 * (mpo @ v + mpo_t @ v)

        steps = self.lanczos_steps
        norm = lanczos_extremes(damped, dim, source.dtype, steps, self.seed)[1]
        spectral_error = math.sqrt(max(lanczos_extremes(error_normal, dim, source.dtype, steps, self.seed)[1], 0.0))
        approx_min = lanczos_extremes(mpo_symmetric, dim, torch.float64, steps, self.seed)[0]
        kappa = norm / self.damping
        holds = spectral_error / norm < 1.0 / kappa
        self.diagnostics["prop2"] = {
            "holds": bool(holds),
            "relative_spectral_error": spectral_error / norm,
            "one_over_kappa": 1.0 / kappa,
            "kappa_bound": kappa,
            "spectral_norm": norm,
            "spectral_error": spectral_error,
            "mpo_min_eigenvalue": approx_min,
            "mpo_indefinite": approx_min <= 0,
            "inverse_error_bound": prop2_inverse_bound(spectral_error, norm, kappa) if holds else None,
        }
        if holds:
            return
        message = (
            f"Proposition 2 fails for a {self.dim}x{self.dim} factor at bond dimension {self.rank}: "
            f"||A_hat - A_tilde||_2 / ||A_hat||_2 = {spectral_error / norm:.3g} >= 1/kappa = {1.0 / kappa:.3g}"
            + (f"; the MPO is indefinite (lambda_min ~ {approx_min:.3g})" if approx_min <= 0 else "")
        )
        if prop2_fallback == "raise":
            raise Prop2Error(message + "; raise kfac-rank or damping, or set prop2-fallback = dense")
        self.diagnostics["fallback"] = "dense"
        self.diagnostics["fallback_reason"] = message
        self.fallback = DenseFactorInverse(factor, self.damping)

    @property
    def used(self) -> str:
        return "dense" if self.fallback is not None else "mpo"

    def solve(self, rhs: Tensor) -> Tensor:
        if self.fallback is not None:
            return self.fallback.solve(rhs)
        vector = rhs.ndim == 1
        block = rhs.reshape(self.dim, -1)
        padded = torch.zeros(self.mpo.dim, block.shape[1], dtype=self.mpo.cores[0].dtype)
        padded[: self.dim] = block
        solution, info = als_solve(self.mpo, padded, self.als_rank, sweeps=self.als_sweeps, seed=self.seed)
        self.diagnostics["als"] = {
            "sweeps": info.sweeps,
            "residual_history": info.residual_history,
            "solution_ranks": info.solution_ranks,
            "max_local_size": info.max_local_size,
        }
        out = solution[: self.dim].to(rhs.dtype)
        return out.reshape(-1) if vector else out

    def __matmul__(self, rhs: Tensor) -> Tensor:
        return self.solve(rhs)


class NystromFactorInverse:
    """(A_k + lambda I)^{-1} with A_k the rank-k randomized Nystrom approximation of A."""

    def __init__(self, factor: Tensor | MatMat, damping: float, rank: int, *, seed: int, dim: int | None = None, dtype=None):
        _check_damping(damping)
        if not (isinstance(rank, int) and rank >= 1):
            raise ConfigError("nystrom-rank", rank, "an integer >= 1")
        start = time.perf_counter()
        if isinstance(factor, Tensor):
            dim = factor.shape[0]
        if dim is None:
            raise ValueError("a Nystrom factor given as a product function needs dim=")
        self.dim, self.damping = dim, float(damping)
        # float64 whatever the factor's dtype: the stabilising shift scales with the machine epsilon
        # and in float32 it can exceed the damping.
        self.approximation = NystromApproximation(factor, dim, rank, dtype or torch.float64, seed)
        self.diagnostics = {
            "solver": "nystrom",
            "dim": dim,
            "rank": self.approximation.rank,
            "bytes": self.approximation.nbytes,
            "seconds": time.perf_counter() - start,
        }
        if isinstance(factor, Tensor):
            # epsilon_A = ||A - U L U^T||_F from ||A||^2 - 2 sum_i l_i u_i^T A u_i + sum_i l_i^2:
            # d^2 k work and no second d x d buffer.
            u, lam = self.approximation.eigenvectors, self.approximation.eigenvalues
            projected = (u * (factor @ u.to(factor.dtype)).to(u.dtype)).sum(dim=0)
            squared = float(torch.linalg.matrix_norm(factor)) ** 2 - 2 * float((lam * projected).sum()) + float((lam**2).sum())
            self.diagnostics["truncation_error"] = math.sqrt(max(squared, 0.0))

    def solve(self, rhs: Tensor) -> Tensor:
        return self.approximation.damped_inverse_matmat(rhs, self.damping).to(rhs.dtype)

    def __matmul__(self, rhs: Tensor) -> Tensor:
        return self.solve(rhs)


def _probe_relative_error(exact: Callable[[Tensor], Tensor], approx: Callable[[Tensor], Tensor], dim: int, dtype, seed: int) -> float:
    """||(A - B) Z||_F / ||A Z||_F with Gaussian Z: an unbiased-in-square Frobenius error estimate."""
    generator = torch.Generator().manual_seed(seed + 1)
    probes = torch.randn(dim, AUTO_PROBES, generator=generator, dtype=dtype)
    reference = exact(probes)
    return float(torch.linalg.matrix_norm(reference - approx(probes)) / torch.linalg.matrix_norm(reference))


def make_factor_inverse(factor: Tensor, settings: SolverSettings) -> DenseFactorInverse | MPOFactorInverse | NystromFactorInverse:
    """Resolve ``settings.factor_solver`` for one undamped factor A (d x d) and build A_hat^{-1},
    A_hat = A + ``settings.damping`` I.

    Also read: ``kfac_rank`` (MPO bond dimension), ``nystrom_rank``, ``mpo_threshold``,
    ``factor_memory_budget``, ``prop2_fallback``, ``seed``. ``auto``: dense while d^2 *
    bytes-per-entry fits ``factor_memory_budget``; else both approximations are built and the one
    with the smaller probe-estimated relative error is kept (MPO only if it also passes Proposition 2).
    """
    damping, solver, rank = settings.damping, settings.factor_solver, settings.kfac_rank
    nystrom_rank, mpo_threshold = settings.nystrom_rank, settings.mpo_threshold
    memory_budget, prop2_fallback, seed = settings.factor_memory_budget, settings.prop2_fallback, settings.seed
    if solver not in FACTOR_SOLVERS:
        raise ConfigError("factor-solver", solver, FACTOR_SOLVERS)
    if prop2_fallback not in PROP2_FALLBACKS:
        raise ConfigError("prop2-fallback", prop2_fallback, PROP2_FALLBACKS)
    if not (isinstance(mpo_threshold, int) and mpo_threshold >= 1):
        raise ConfigError("mpo-threshold", mpo_threshold, "an integer >= 1")
    if not memory_budget > 0:
        raise ConfigError("factor-memory-budget", memory_budget, "a number of bytes > 0")
    _check_damping(damping)
    dim = factor.shape[0]
    if solver == "dense" or dim <= mpo_threshold:
        inverse = DenseFactorInverse(factor, damping)
        inverse.diagnostics["requested"] = solver
        return inverse
    if solver == "mpo":
        inverse = MPOFactorInverse(factor, damping, rank, prop2_fallback, seed=seed)
    elif solver == "nystrom":
        inverse = NystromFactorInverse(factor, damping, nystrom_rank, seed=seed)
    else:
        if dim * dim * factor.element_size() <= memory_budget:
            inverse = DenseFactorInverse(factor, damping)
            inverse.diagnostics["requested"] = solver
            inverse.diagnostics["auto_reason"] = "fits factor-memory-budget"
            return inverse
        nystrom = NystromFactorInverse(factor, damping, nystrom_rank, seed=seed)
        mpo = MPOFactorInverse(factor, damping, rank, "dense", seed=seed)
        eye_pad = mpo.mpo.dim - dim

        def mpo_apply(z: Tensor) -> Tensor:
            padded = torch.cat([z, torch.zeros(eye_pad, z.shape[1], dtype=z.dtype)]) if eye_pad else z
            return (mpo.mpo @ padded.to(mpo.mpo.cores[0].dtype))[:dim].to(z.dtype) - damping * z

        estimates = {
            "mpo": _probe_relative_error(lambda z: factor @ z, mpo_apply, dim, factor.dtype, seed),
            "nystrom": _probe_relative_error(
                lambda z: factor @ z, lambda z: nystrom.approximation.matmat(z).to(z.dtype), dim, factor.dtype, seed
            ),
        }
        pick_mpo = estimates["mpo"] < estimates["nystrom"] and mpo.used == "mpo"
        inverse = mpo if pick_mpo else nystrom
        inverse.diagnostics["auto_estimates"] = estimates
    inverse.diagnostics["requested"] = solver
    return inverse
