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


# ALS local systems are dense (R n R)^2 float64: at most this many rows (537 MB).
MAX_LOCAL_SIZE = 8192


class Prop2Error(ArithmeticError):
    """The MPO truncation is too coarse for the poster's Proposition 2 and the config says raise.
    ``diagnostics`` holds the MPO's diagnostics, ``diagnostics["prop2"]`` the check's numbers."""

    def __init__(self, message: str, diagnostics: dict | None = None):
        super().__init__(message)
        self.diagnostics = diagnostics if diagnostics is not None else {}


def default_border(dim: int) -> int:
    """Trailing coordinates an MPO factor keeps outside the tensor train: 1 when ``dim`` is not
    7-smooth but ``dim - 1`` is (KFAC's bias coordinate on a smooth layer width), else 0 (pad)."""
    return 1 if dim > 2 and smooth_dim(dim) != dim and smooth_dim(dim - 1) == dim - 1 else 0


def damped_frobenius(factor: Tensor, damping: float) -> float:
    """||A + damping I||_F of a symmetric A without forming the damped copy (d^2 numbers):
    sqrt(||A||_F^2 + 2 damping tr A + damping^2 d), the norm taken in float64 below 2^24 entries."""
    fro2 = float(torch.linalg.matrix_norm(factor.to(torch.float64) if factor.numel() < 1 << 24 else factor)) ** 2
    return math.sqrt(max(fro2 + 2 * damping * float(torch.trace(factor)) + damping**2 * factor.shape[0], 0.0))


def _check_damping(damping: float) -> None:
    if not (damping > 0 and math.isfinite(damping)):
        raise ConfigError("damping", damping, "a number > 0 (the factor inverses need A + lambda I > 0)")


class DenseFactorInverse:
    """Cholesky of A_hat = A + lambda I (eigendecomposition with floored eigenvalues if float
    round-off makes Cholesky fail).

    Memory: one d x d buffer besides the factor (2.5 GB at d = 25089 in float32). LAPACK works on
    column-major matrices; the row-major damped copy's transpose view is one (A_hat is symmetric),
    so the Cholesky overwrites it in place and the solves are two triangular solves on views of it.
    ``torch.linalg.cholesky_ex(out=)`` on the row-major buffer and ``torch.cholesky_solve`` would
    each make a column-major copy of their own: two more d x d buffers, 7.5 GB instead of 2.5 GB on
    top of the factor at d = 25089 (bench/mpo_wide.py).
    """

    def __init__(self, factor: Tensor, damping: float):
        _check_damping(damping)
        start = time.perf_counter()
        self.dim = factor.shape[0]
        damped = factor.clone(memory_format=torch.contiguous_format)
        damped.diagonal().add_(damping)
        lower = damped.mT  # column-major view of A_hat (= A_hat^T)
        info = torch.empty((), dtype=torch.int32, device=factor.device)
        torch.linalg.cholesky_ex(lower, out=(lower, info))
        self._lower, self._eig = lower, None
        if int(info) != 0:
            self._lower = lower = None
            damped.copy_(factor)
            damped.diagonal().add_(damping)
            # eigh reads one triangle only, so the damped copy need not be symmetrised first.
            evals, evecs = torch.linalg.eigh(damped)
            del damped
            self._eig = (evals.clamp_min(damping), evecs)
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
        if self._lower is not None:
            lower = self._lower
            half = torch.linalg.solve_triangular(lower, block.to(lower.dtype), upper=False)
            out = torch.linalg.solve_triangular(lower.mT, half, upper=True)
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

    **Bias border.** KFAC's A of a layer with a bias appends a trailing 1 to the inputs, so its
    dimension is d_in + 1 (25089 for a 25088-wide layer, 289 for a 32-channel 3x3 conv): padding that
    to a 7-smooth size would scramble the layer's (channel, row, column) index layout into unrelated
    modes. ``border`` trailing coordinates are therefore kept outside the MPO, exactly: with
    A_hat = [[A11, A12], [A21, A22]] only A11 (d_in x d_in) is compressed, and the solve is block
    elimination, Ã11 [X1 Z] = [B1 A12] by one ALS run, S = A22 - A21 Z, Y = S^{-1}(B2 - A21 X1),
    X1 <- X1 - Z Y. ``border=None`` (default) takes 1 when d is not 7-smooth and d - 1 is (the bias
    case), else 0 (padding). The truncation error is then that of A11 alone (the border is exact).

    The poster's Proposition 2 needs ||A_hat - A_tilde||_2 / ||A_hat||_2 < 1 / kappa_A with
    kappa_A <= ||A_hat||_2 / lambda, i.e. a spectral truncation error below lambda. It is checked at
    construction (Lanczos on A_hat and on the error operator, both through products only); where it
    fails the MPO inverse is not trustworthy (A_tilde may even be indefinite) and we either fall back
    to the dense solve or raise :class:`Prop2Error`, per ``prop2_fallback``. After a fallback
    ``diagnostics["truncation_error"]`` is 0 (the factor solved is exact, so Theorem 1's MPO term is
    0 too) and the MPO's own error stays in ``diagnostics["mpo_truncation_error"]``.

    ALS's local systems are dense (R n R) x (R n R) with R the solution's TT rank: ``als_rank``
    (default ``rank``) is capped so that R * max(modes) * R <= ``max_local_size`` (8192: a 537 MB
    float64 system; at rank 64 and a 7-mode it would be 28672^2, 6.6 GB). ``diagnostics["als_rank"]``
    is the rank used.
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
        border: int | None = None,
        modes: list[int] | None = None,
        max_local_size: int = MAX_LOCAL_SIZE,
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
        self.als_sweeps = als_sweeps
        self.border = default_border(self.dim) if border is None else int(border)
        if not 0 <= self.border < self.dim:
            raise ValueError(f"border {self.border} out of range for a {self.dim} x {self.dim} factor")
        core_dim = self.dim - self.border
        if modes is not None:
            if math.prod(modes) != core_dim:
                raise ValueError(f"modes {modes} multiply to {math.prod(modes)}, not {core_dim} (= dim - border)")
            padded, self.modes = core_dim, list(modes)
        else:
            padded = smooth_dim(core_dim)
            self.modes = mode_sizes(padded, max_mode)
        self.core_dim = core_dim
        cap = max(1, math.isqrt(max(max_local_size // max(self.modes), 1)))
        self.als_rank = min(als_rank or rank, cap)
        # A view of the leading block: TT-SVD's one interleaved copy is made from it directly.
        source = self._padded(factor[:core_dim, :core_dim], padded)
        compressed, self.truncation_error = tt_svd(source, self.modes, rank, shift=self.damping)
        # The cores are small; ALS's local solves want float64 whatever the factor's dtype.
        self.mpo = MPO([core.to(torch.float64) for core in compressed.cores])
        if self.border:
            self._a12 = factor[:core_dim, core_dim:].to(torch.float64).clone()
            self._a22 = factor[core_dim:, core_dim:].to(torch.float64) + self.damping * torch.eye(self.border, dtype=torch.float64)
        else:
            self._a12 = self._a22 = None
        compress_seconds = time.perf_counter() - start
        damped_fro = damped_frobenius(factor, self.damping)
        border_bytes = 0 if self._a12 is None else (self._a12.numel() + self._a22.numel()) * 8
        self.diagnostics = {
            "solver": "mpo",
            "dim": self.dim,
            "border": self.border,
            "padded_dim": padded,
            "modes": self.modes,
            "bond_dimension": rank,
            "mpo_ranks": self.mpo.ranks,
            "als_rank": self.als_rank,
            "bytes": self.mpo.nbytes + border_bytes,
            # epsilon_A of the poster's Theorem 1: ||A_hat - A_tilde||_F (0 after a dense fallback)
            "truncation_error": self.truncation_error,
            "mpo_truncation_error": self.truncation_error,
            "frobenius_norm": damped_fro,
            "compress_seconds": compress_seconds,
        }
        self.fallback: DenseFactorInverse | None = None
        if check_prop2:
            self._check_prop2(source, factor, prop2_fallback)
        del source
        self.diagnostics["seconds"] = time.perf_counter() - start

    def _padded(self, block: Tensor, padded: int) -> Tensor:
        # Padding with a multiple of the identity keeps the block diagonal: the padded coordinates
        # of the solution are zero for zero right-hand-side entries (up to the TT truncation).
        size = block.shape[0]
        if padded == size:
            return block
        out = torch.zeros(padded, padded, dtype=block.dtype)
        out[:size, :size] = block
        pad_value = float(torch.diagonal(block).mean())
        idx = torch.arange(size, padded)
        out[idx, idx] = pad_value
        return out

    def _core_apply(self, mpo: MPO, v: Tensor) -> Tensor:
        """The MPO block on the first core_dim coordinates (zero-padded in, cut out)."""
        padded = torch.zeros(mpo.dim, v.shape[1], dtype=torch.float64)
        padded[: self.core_dim] = v
        return (mpo @ padded)[: self.core_dim]

    def approx_matmat(self, v: Tensor, transpose: bool = False) -> Tensor:
        """A_tilde v (or A_tilde^T v) on the factor's own d coordinates, damping included: the MPO
        block and the exact bias border. ``v`` of shape (d,) or (d, m); float64 out."""
        vector = v.ndim == 1
        block = v.reshape(self.dim, -1).to(torch.float64)
        mpo = self.mpo.transpose() if transpose else self.mpo
        top = self._core_apply(mpo, block[: self.core_dim])
        if self.border:
            tail = block[self.core_dim :]
            top = top + self._a12 @ tail
            bottom = self._a12.T @ block[: self.core_dim] + self._a22 @ tail
            top = torch.cat([top, bottom])
        return top.reshape(-1) if vector else top

    def _check_prop2(self, source: Tensor, factor: Tensor, prop2_fallback: str) -> None:
        start = time.perf_counter()
        dim = source.shape[0]
        mpo, mpo_t = self.mpo, self.mpo.transpose()
        damping = self.damping

        def damped(v: Tensor) -> Tensor:  # A_hat v without a damped copy of A
            return factor @ v + damping * v

        def damped_core(v: Tensor) -> Tensor:  # the compressed (padded) block, damped
            return source @ v + damping * v

        def error_normal(v: Tensor) -> Tensor:
            # E^T E v with E = A_hat - A_tilde (A_tilde may be non-symmetric); the border is exact,
            # so E lives on the compressed block.
            ev = damped_core(v) - (mpo @ v).to(source.dtype)
            return damped_core(ev) - (mpo_t @ ev).to(source.dtype)

        def mpo_symmetric(v: Tensor) -> Tensor:
            return 0.5 * (self.approx_matmat(v) + self.approx_matmat(v, transpose=True))

        steps = self.lanczos_steps
        norm = lanczos_extremes(damped, self.dim, factor.dtype, steps, self.seed)[1]
        spectral_error = math.sqrt(max(lanczos_extremes(error_normal, dim, source.dtype, steps, self.seed)[1], 0.0))
        approx_min = lanczos_extremes(mpo_symmetric, self.dim, torch.float64, steps, self.seed)[0]
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
        self.diagnostics["prop2_seconds"] = time.perf_counter() - start
        if holds:
            return
        message = (
            f"Proposition 2 fails for a {self.dim}x{self.dim} factor at bond dimension {self.rank}: "
            f"||A_hat - A_tilde||_2 / ||A_hat||_2 = {spectral_error / norm:.3g} >= 1/kappa = {1.0 / kappa:.3g}"
            + (f"; the MPO is indefinite (lambda_min ~ {approx_min:.3g})" if approx_min <= 0 else "")
        )
        if prop2_fallback == "raise":
            raise Prop2Error(message + "; raise kfac-rank or damping, or set prop2-fallback = dense", self.diagnostics)
        start = time.perf_counter()
        self.fallback = DenseFactorInverse(factor, self.damping)
        self.diagnostics["fallback"] = "dense"
        self.diagnostics["fallback_reason"] = message
        self.diagnostics["fallback_seconds"] = time.perf_counter() - start
        # Theorem 1's epsilon is that of the factor actually solved: the dense one is exact.
        self.diagnostics["truncation_error"] = 0.0

    @property
    def used(self) -> str:
        return "dense" if self.fallback is not None else "mpo"

    def solve(self, rhs: Tensor) -> Tensor:
        if self.fallback is not None:
            return self.fallback.solve(rhs)
        return self.solve_mpo(rhs)

    def solve_mpo(self, rhs: Tensor) -> Tensor:
        """A_tilde^{-1} rhs by ALS (and block elimination of the border), whatever Proposition 2
        said: :meth:`solve` is what callers want; this is for measuring what a fallback avoided."""
        vector = rhs.ndim == 1
        block = rhs.reshape(self.dim, -1).to(torch.float64)
        m = block.shape[1]
        core_rhs = block[: self.core_dim]
        if self.border:
            core_rhs = torch.cat([core_rhs, self._a12], dim=1)  # solve for Z = Ã11^{-1} A12 alongside
        padded = torch.zeros(self.mpo.dim, core_rhs.shape[1], dtype=torch.float64)
        padded[: self.core_dim] = core_rhs
        solution, info = als_solve(self.mpo, padded, self.als_rank, sweeps=self.als_sweeps, seed=self.seed)
        solution = solution[: self.core_dim]
        self.diagnostics["als"] = {
            "rank": self.als_rank,
            "sweeps": info.sweeps,
            "residual_history": info.residual_history,
            "solution_ranks": info.solution_ranks,
            "max_local_size": info.max_local_size,
        }
        if self.border:
            x1, z = solution[:, :m], solution[:, m:]
            schur = self._a22 - self._a12.T @ z
            y = torch.linalg.solve(schur, block[self.core_dim :] - self._a12.T @ x1)
            solution = torch.cat([x1 - z @ y, y])
        # ||A_tilde X - B||_F / ||B||_F of what is returned (with a border this is not ALS's own
        # residual: the errors of X1 and Z combine as r_X - r_Z Y).
        b_norm = max(float(torch.linalg.matrix_norm(block)), 1e-300)
        self.diagnostics["als"]["residual"] = float(torch.linalg.matrix_norm(self.approx_matmat(solution) - block)) / b_norm
        out = solution.to(rhs.dtype)
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


def make_factor_inverse(
    factor: Tensor, settings: SolverSettings, *, border: int | None = None
) -> DenseFactorInverse | MPOFactorInverse | NystromFactorInverse:
    """Resolve ``settings.factor_solver`` for one undamped factor A (d x d) and build A_hat^{-1},
    A_hat = A + ``settings.damping`` I.

    ``border``: trailing coordinates an MPO keeps out of the tensor train (1 for the A factor of a
    layer with a bias, whose last coordinate is the bias's 1; 0 for G and bias-free layers); None
    guesses it from d (:func:`default_border`), which cannot tell a bias when d itself is 7-smooth.

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
        inverse = MPOFactorInverse(factor, damping, rank, prop2_fallback, seed=seed, border=border)
    elif solver == "nystrom":
        inverse = NystromFactorInverse(factor, damping, nystrom_rank, seed=seed)
    else:
        if dim * dim * factor.element_size() <= memory_budget:
            inverse = DenseFactorInverse(factor, damping)
            inverse.diagnostics["requested"] = solver
            inverse.diagnostics["auto_reason"] = "fits factor-memory-budget"
            return inverse
        nystrom = NystromFactorInverse(factor, damping, nystrom_rank, seed=seed)
        mpo = MPOFactorInverse(factor, damping, rank, "dense", seed=seed, border=border)

        def mpo_apply(z: Tensor) -> Tensor:
            return mpo.approx_matmat(z).to(z.dtype) - damping * z

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
