"""Randomized Nystrom approximation of a PSD factor and the Woodbury inverse of its damped version.

A ~ A_k = U diag(Lambda) U^T from k products with A (Gaussian test matrix, seeded), following the
numerically stable variant of Tropp, Yurtsever, Udell & Cevher (2017, Alg. 3): shift by a tiny nu,
Cholesky of Omega^T Y, an SVD, un-shift. Lambda >= 0 by construction, so for any damping lambda > 0

    (A_k + lambda I)^{-1} = U diag(1 / (Lambda + lambda)) U^T + (I - U U^T) / lambda

is symmetric positive definite: unlike a truncated MPO, it can never make the factor indefinite.
Only products with A are needed, so for A = X^T X / N the d x d matrix is never formed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

MatMat = Callable[[Tensor], Tensor]


def as_matmat(factor: Tensor | MatMat) -> MatMat:
    if callable(factor) and not isinstance(factor, Tensor):
        return factor
    return lambda block: factor @ block.to(factor.dtype)


def covariance_matmat(activations: Tensor) -> MatMat:
    """Products with A = X^T X / N from the N x d activations X, never forming A."""
    n = activations.shape[0]
    return lambda block: activations.T @ (activations @ block.to(activations.dtype)) / n


class NystromApproximation:
    def __init__(self, factor: Tensor | MatMat, dim: int, rank: int, dtype=torch.float64, seed: int = 0, device=None):
        if rank < 1:
            raise ValueError(f"Nystrom rank must be >= 1, got {rank}")
        rank = min(rank, dim)
        matmat = as_matmat(factor)
        generator = torch.Generator().manual_seed(seed)
        if device is None:
            device = factor.device if isinstance(factor, Tensor) else "cpu"
        # The sketch is drawn on the CPU so a seed gives the same sketch on every device.
        omega = torch.randn(dim, rank, generator=generator, dtype=dtype).to(device)
        omega, _ = torch.linalg.qr(omega)
        products = matmat(omega)
        # The shift must dominate the round-off of the products, so it uses their precision
        # (float32 activations give float32 products even when the rest runs in float64).
        precision = torch.finfo(products.dtype).eps if products.is_floating_point() else torch.finfo(dtype).eps
        y = products.to(dtype)
        shift = precision * float(torch.linalg.matrix_norm(y))
        y_shifted = y + shift * omega
        core = omega.T @ y_shifted
        core = (core + core.T) / 2
        chol, info = torch.linalg.cholesky_ex(core)
        if int(info) != 0:
            # Omega^T A Omega numerically singular beyond the shift (A of rank < k): a pseudo-inverse
            # square root that drops the round-off directions instead of amplifying them.
            evals, evecs = torch.linalg.eigh(core)
            keep = evals > max(float(evals.max()), 0.0) * precision * rank
            inv_sqrt = evecs[:, keep] @ torch.diag(evals[keep].rsqrt()) @ evecs[:, keep].T
            b = y_shifted @ inv_sqrt
        else:
            b = torch.linalg.solve_triangular(chol, y_shifted.T, upper=False).T
        u, s, _ = torch.linalg.svd(b, full_matrices=False)
        self.eigenvectors = u
        self.eigenvalues = (s**2 - shift).clamp_min(0)
        self.dim, self.rank = dim, rank

    @property
    def nbytes(self) -> int:
        return self.eigenvectors.numel() * self.eigenvectors.element_size() + self.eigenvalues.numel() * self.eigenvalues.element_size()

    def matmat(self, block: Tensor) -> Tensor:
        u = self.eigenvectors
        return u @ (self.eigenvalues[:, None] * (u.T @ block.to(u.dtype)))

    def damped_inverse_matmat(self, block: Tensor, damping: float) -> Tensor:
        """(A_k + damping I)^{-1} block by Woodbury; block is (d,) or (d, m)."""
        if not damping > 0:
            raise ValueError(f"the Nystrom inverse needs damping > 0, got {damping}")
        vector = block.ndim == 1
        x = block.reshape(self.dim, -1).to(self.eigenvectors.dtype)
        u = self.eigenvectors
        coefficients = u.T @ x
        weights = 1.0 / (self.eigenvalues + damping) - 1.0 / damping
        out = x / damping + u @ (weights[:, None] * coefficients)
        return out.reshape(-1) if vector else out
