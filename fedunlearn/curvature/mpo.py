"""Matrix product operators (tensor-train matrices): TT-SVD compression and an ALS linear solver.

A d x d matrix with d = n_1 n_2 ... n_K is stored as K cores ``C_k`` of shape (r_{k-1}, n_k, n_k, r_k)
(r_0 = r_K = 1, row index before column index in each core), so that

    M[(i_1..i_K), (j_1..j_K)] = C_1[:, i_1, j_1, :] C_2[:, i_2, j_2, :] ... C_K[:, i_K, j_K, :]

with row-major multi-indices. Storage is sum_k r_{k-1} n_k^2 r_k numbers instead of d^2.

The solver never forms the d x d matrix: it solves M X = B (B is d x m) by one-site block ALS on the
energy functional tr(X^T M X) - 2 tr(X^T B) with X in tensor-train format of rank <= R, the m
columns carried as a block index by the core being optimised (Holtz, Rohwedder & Schneider 2012;
Dolgov et al. 2014 for the block format). Each local problem is a dense (R n R) x (R n R) system.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

SMOOTH_PRIMES = (2, 3, 5, 7)
QR_CHUNK_ENTRIES = 1 << 22  # float64 entries per TSQR / Gram chunk (32 MB)
QR_MAX_ENTRIES = 1 << 26  # float64 unfoldings up to this size get the exact TSQR route
MATMAT_CHUNK_ENTRIES = 1 << 24  # d * columns * bond numbers per MPO.matmat chunk (128 MB in float64)


def smooth_dim(dim: int) -> int:
    """The smallest d' >= dim whose prime factors are all <= 7 (so it splits into small modes)."""
    if dim < 1:
        raise ValueError(f"dimension must be >= 1, got {dim}")
    candidate = dim
    while True:
        rest = candidate
        for p in SMOOTH_PRIMES:
            while rest % p == 0:
                rest //= p
        if rest == 1:
            return candidate
        candidate += 1


def mode_sizes(dim: int, max_mode: int = 4) -> list[int]:
    """Split a 7-smooth ``dim`` into mode sizes, 2-groups first (channel-major layouts put the
    power-of-two channel count first, e.g. 25088 = 512 * 49 -> [4, 4, 4, 4, 2, 7, 7])."""
    if smooth_dim(dim) != dim:
        raise ValueError(f"{dim} has a prime factor > 7; pad it to smooth_dim({dim}) = {smooth_dim(dim)}")
    if dim == 1:
        return [1]
    modes: list[int] = []
    rest = dim
    for p in SMOOTH_PRIMES:
        while rest % p == 0:
            rest //= p
            # Merge into the last mode while it stays <= max_mode and holds the same prime.
            if modes and modes[-1] * p <= max(max_mode, p) and _only_prime(modes[-1], p):
                modes[-1] *= p
            else:
                modes.append(p)
    return modes


def _only_prime(value: int, p: int) -> bool:
    while value % p == 0:
        value //= p
    return value == 1


@dataclass
class MPO:
    """A d x d matrix as a chain of cores (r_{k-1}, n_k, n_k, r_k)."""

    cores: list[Tensor]

    @property
    def modes(self) -> list[int]:
        return [c.shape[1] for c in self.cores]

    @property
    def dim(self) -> int:
        return math.prod(self.modes)

    @property
    def ranks(self) -> list[int]:
        return [c.shape[3] for c in self.cores[:-1]]

    @property
    def nbytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.cores)

    def transpose(self) -> MPO:
        return MPO([c.transpose(1, 2) for c in self.cores])

    def matmat(self, x: Tensor) -> Tensor:
        """M @ x for x of shape (d,) or (d, m), contracting core by core.

        The intermediates hold d * m * r numbers (r the largest bond), so wide blocks go through in
        column chunks of at most MATMAT_CHUNK_ENTRIES of them: 25088 x 129 columns at r = 32 would
        otherwise need ~2.5 GB of float64 temporaries."""
        vector = x.ndim == 1
        block = x.reshape(self.dim, -1).to(self.cores[0].dtype)
        m = block.shape[1]
        bond = max([c.shape[0] for c in self.cores] + [1])
        columns = max(1, MATMAT_CHUNK_ENTRIES // (self.dim * bond))
        if m > columns:
            out = torch.cat([self._matmat(block[:, i : i + columns]) for i in range(0, m, columns)], dim=1)
        else:
            out = self._matmat(block)
        return out.reshape(-1) if vector else out

    def _matmat(self, block: Tensor) -> Tensor:
        m = block.shape[1]
        # work holds (done output indices, bond, remaining input indices * m)
        work = block.reshape(1, 1, self.dim * m)
        done = 1
        for core in self.cores:
            r, n_out, n_in, s = core.shape
            work = work.reshape(done, r, n_in, -1)
            rest = work.shape[3]
            # (P, r, j, Q) x (r, i, j, s) -> (P, i, s, Q) as one matmul over (r, j)
            lhs = work.permute(0, 3, 1, 2).reshape(done * rest, r * n_in)
            rhs = core.permute(0, 2, 1, 3).reshape(r * n_in, n_out * s)
            work = (lhs @ rhs).reshape(done, rest, n_out, s).permute(0, 2, 3, 1)
            done *= n_out
            work = work.reshape(done, s, -1)
        return work.reshape(self.dim, m)

    def __matmul__(self, x: Tensor) -> Tensor:
        return self.matmat(x)

    def to_dense(self) -> Tensor:
        """The full d x d matrix (tests and small diagnostics only)."""
        full = self.cores[0].reshape(-1, self.cores[0].shape[-1])  # (n1 n1, r1)
        for core in self.cores[1:]:
            r = core.shape[0]
            full = (full @ core.reshape(r, -1)).reshape(-1, core.shape[-1])
        modes = self.modes
        full = full.reshape([n for n in modes for _ in range(2)])
        k = len(modes)
        order = [2 * i for i in range(k)] + [2 * i + 1 for i in range(k)]
        return full.permute(order).reshape(self.dim, self.dim)

    def frobenius_norm(self) -> float:
        env = torch.ones(1, 1, dtype=self.cores[0].dtype)
        for core in self.cores:
            env = torch.einsum("ab,aijc,bije->ce", env, core, core)
        return float(env.squeeze().clamp_min(0).sqrt())


def _interleave(matrix: Tensor, modes: list[int], shift: float = 0.0) -> Tensor:
    # (i_1..i_K, j_1..j_K) -> (i_1 j_1, i_2 j_2, ...): one permuted copy of the matrix, with
    # ``shift`` added to its diagonal there (so damping never needs another d x d copy).
    k = len(modes)
    tensor = matrix.reshape(modes + modes)
    order = [idx for pair in zip(range(k), range(k, 2 * k)) for idx in pair]
    flat = tensor.permute(order).reshape(-1)
    if flat.data_ptr() == matrix.data_ptr():
        flat = flat.clone()
    if shift:
        diagonal = torch.zeros(math.prod(modes), dtype=torch.long)
        index = torch.arange(math.prod(modes))
        stride = 1
        for n in reversed(modes):
            digit = index % n
            index = index // n
            diagonal += digit * (n + 1) * stride  # position of (i_k, i_k) in the (n_k, n_k) pair
            stride *= n * n
        flat[diagonal] += shift
    return flat


def _top_left_singular(unfolding: Tensor, rank: int, rel_tol: float) -> tuple[Tensor, float]:
    """Left singular vectors kept and the squared Frobenius mass discarded.

    Unfoldings of factors are short and very wide. For float64 input the SVD is taken of R^T from a
    QR of the transposed unfolding, accumulated over column chunks (TSQR): as accurate as a full
    SVD, with one chunk at a time in memory."""
    rows, cols = unfolding.shape
    if unfolding.dtype != torch.float64 or unfolding.numel() > QR_MAX_ENTRIES:
        # Big float32 factors: the float64 Gram matrix of the short side, eigendecomposed. It
        # resolves singular values down to ~1e-8 of the largest, finer than float32 data (~1e-7),
        # at a tenth of TSQR's time (a gemm instead of Householder QR).
        gram = torch.zeros(rows, rows, dtype=torch.float64)
        chunk = max(1, QR_CHUNK_ENTRIES // max(rows, 1))
        for start in range(0, cols, chunk):
            piece = unfolding[:, start : start + chunk].to(torch.float64)
            gram += piece @ piece.T
        evals, evecs = torch.linalg.eigh(gram)
        s = evals.flip(0).clamp_min(0).sqrt()
        u = evecs.flip(1)
    elif rows >= cols:
        u, s, _ = torch.linalg.svd(unfolding.to(torch.float64), full_matrices=False)
    else:
        chunk = max(rows, QR_CHUNK_ENTRIES // max(rows, 1))
        triangle = None
        for start in range(0, cols, chunk):
            piece = unfolding[:, start : start + chunk].to(torch.float64).T
            if triangle is not None:
                piece = torch.cat([triangle, piece])
            triangle = torch.linalg.qr(piece, mode="r").R
        u, s, _ = torch.linalg.svd(triangle.T, full_matrices=False)
    eigenvalues, eigenvectors = s**2, u
    total = float(eigenvalues.sum())
    keep = min(rank, int((eigenvalues > 0).sum()) or 1)
    if rel_tol > 0:
        # Smallest rank whose discarded mass stays below rel_tol^2 of the total.
        tail = torch.cumsum(eigenvalues.flip(0), 0).flip(0)
        within = (tail <= (rel_tol**2) * total).nonzero()
        if within.numel():
            keep = min(keep, max(1, int(within[0])))
    discarded = float(eigenvalues[keep:].sum())
    return eigenvectors[:, :keep].to(unfolding.dtype), discarded


def tt_svd(matrix: Tensor, modes: list[int], rank: int, rel_tol: float = 0.0, shift: float = 0.0) -> tuple[MPO, float]:
    """Compress ``matrix + shift * I`` (d x d) into an MPO of bond dimension <= ``rank`` by
    sequential truncated SVDs.

    Returns the MPO and its exact truncation error ||matrix - mpo||_F: TT-SVD is a composition of
    orthogonal projections, so the squared error is the sum of the discarded squared singular values.
    """
    dim = math.prod(modes)
    if matrix.shape != (dim, dim):
        raise ValueError(f"matrix of shape {tuple(matrix.shape)} does not match modes {modes} (d = {dim})")
    carry = _interleave(matrix, modes, shift)
    cores: list[Tensor] = []
    bond = 1
    discarded_total = 0.0
    for n in modes[:-1]:
        unfolding = carry.reshape(bond * n * n, -1)
        basis, discarded = _top_left_singular(unfolding, rank, rel_tol)
        discarded_total += discarded
        cores.append(basis.reshape(bond, n, n, basis.shape[1]))
        carry = _project_rows(basis, unfolding)
        bond = basis.shape[1]
        del unfolding
    # A copy: carry may be a view of the interleaved d x d buffer (see _project_rows).
    cores.append(carry.reshape(bond, modes[-1], modes[-1], 1).clone())
    return MPO(cores), math.sqrt(discarded_total)


def _project_rows(basis: Tensor, unfolding: Tensor) -> Tensor:
    """basis^T @ unfolding (k x cols, k <= rows), written over the unfolding's first k rows one
    column chunk at a time: the unfolding is TT-SVD's own interleaved copy, so the first (largest)
    step needs no second d x d buffer (2.5 GB at d = 25088 in float32). Each chunk's product is
    complete before it overwrites the chunk, and it only reads that chunk's columns."""
    rows, cols = unfolding.shape
    k = basis.shape[1]
    if k > rows or not unfolding.is_contiguous() or unfolding.numel() <= QR_CHUNK_ENTRIES:
        return basis.T @ unfolding
    projector = basis.T.contiguous()
    chunk = max(1, QR_CHUNK_ENTRIES // rows)
    for start in range(0, cols, chunk):
        piece = unfolding[:, start : start + chunk]
        piece[:k] = projector @ piece
    return unfolding[:k]


@dataclass
class ALSInfo:
    sweeps: int = 0
    # ||M X - B||_F / ||B||_F after each half-sweep
    residual_history: list[float] = field(default_factory=list)
    solution_ranks: list[int] = field(default_factory=list)
    max_local_size: int = 0
    best_residual: float = math.inf


def _right_orthogonal_start(rhs: Tensor, modes: list[int], rank: int, seed: int) -> list[Tensor]:
    """Right-orthogonal cores 2..K spanning the right-hand side's TT bases, topped up with random
    directions to rank ``rank`` so ALS (which cannot grow ranks by itself) has room to move."""
    generator = torch.Generator().manual_seed(seed)
    dim = rhs.shape[0]
    noise = torch.randn(dim, min(rank, dim), generator=generator, dtype=rhs.dtype)
    scale = 1e-3 * float(torch.linalg.matrix_norm(rhs)) / max(float(torch.linalg.matrix_norm(noise)), 1e-300)
    block = torch.cat([rhs, scale * noise if scale > 0 else noise], dim=1)  # (d, m + rank)
    width = block.shape[1]
    # TT-SVD from the right: the block index stays with core 1, which ALS solves for anyway.
    carry = block.reshape(modes + [width]).movedim(-1, 0)  # (width, n_1..n_K)
    cores: list[Tensor] = []
    bond = 1
    for n in reversed(modes[1:]):
        unfolding = carry.reshape(-1, n * bond)  # (width n_1 .. n_{k-1}, n_k r_k)
        basis, _ = _top_left_singular(unfolding.T, rank, 0.0)  # columns: right singular vectors
        cores.insert(0, basis.T.reshape(basis.shape[1], n, bond))
        carry = unfolding @ basis
        bond = basis.shape[1]
    return cores


def als_solve(
    mpo: MPO,
    rhs: Tensor,
    rank: int,
    sweeps: int = 4,
    tol: float = 1e-10,
    seed: int = 0,
) -> tuple[Tensor, ALSInfo]:
    """Solve ``mpo @ X = rhs`` (rhs of shape (d,) or (d, m)) with X of TT rank <= ``rank``.

    Never forms the d x d matrix: the largest dense object is one local system of size
    (r n r) x (r n r). Stops after ``sweeps`` full sweeps, when the relative residual is below
    ``tol``, or when a full sweep improved it by less than 1%. Returns X as a dense d x m block (the caller needs
    the update in parameter shape anyway) and the per-half-sweep residual history; the iterate
    returned is the half-sweep with the smallest residual.
    """
    vector = rhs.ndim == 1
    dtype = mpo.cores[0].dtype
    b = rhs.reshape(mpo.dim, -1).to(dtype)
    m = b.shape[1]
    modes = mpo.modes
    k_cores = len(modes)
    info = ALSInfo()
    b_norm = max(float(torch.linalg.matrix_norm(b)), 1e-300)
    if k_cores == 1:
        solution = torch.linalg.solve(mpo.cores[0].reshape(modes[0], modes[0]), b)
        info.residual_history.append(float(torch.linalg.matrix_norm(mpo @ solution - b)) / b_norm)
        return (solution.reshape(-1) if vector else solution), info

    # x_cores[k]: (R_{k-1}, n_k, R_k); cores right of the centre are right-orthogonal.
    x_cores: list[Tensor | None] = [None] + _right_orthogonal_start(b, modes, rank, seed)
    one = torch.ones(1, 1, 1, dtype=dtype)
    # Operator environments and dense interface bases (<= d * R numbers each).
    left_env: list[Tensor | None] = [one] + [None] * k_cores
    right_env: list[Tensor | None] = [None] * k_cores + [one]
    left_basis: list[Tensor | None] = [torch.ones(1, 1, dtype=dtype)] + [None] * k_cores
    right_basis: list[Tensor | None] = [None] * k_cores + [torch.ones(1, 1, dtype=dtype)]

    def extend_right(k: int) -> None:  # environment and basis right of core k-1 from core k
        core, a = x_cores[k], mpo.cores[k]
        right_env[k] = torch.einsum("aib,pijq,cjd,bqd->apc", core, a, core, right_env[k + 1])
        rb = torch.einsum("aib,bz->aiz", core, right_basis[k + 1].reshape(core.shape[2], -1))
        right_basis[k] = rb.reshape(core.shape[0], -1)

    def extend_left(k: int) -> None:  # environment and basis left of core k+1 from core k
        core, a = x_cores[k], mpo.cores[k]
        left_env[k + 1] = torch.einsum("apc,aib,pijq,cjd->bqd", left_env[k], core, a, core)
        lb = torch.einsum("za,aib->zib", left_basis[k].reshape(-1, core.shape[0]), core)
        left_basis[k + 1] = lb.reshape(-1, core.shape[2])

    for k in range(k_cores - 1, 0, -1):
        extend_right(k)

    def solve_local(k: int) -> Tensor:
        left, right, a = left_env[k], right_env[k + 1], mpo.cores[k]
        ra, rb = left.shape[0], right.shape[0]
        n = modes[k]
        local = torch.einsum("apc,pijq,bqd->aibcjd", left, a, right).reshape(ra * n * rb, ra * n * rb)
        info.max_local_size = max(info.max_local_size, local.shape[0])
        lb, rbasis = left_basis[k], right_basis[k + 1]
        block = b.reshape(lb.shape[0], n, rbasis.shape[1], m)
        local_rhs = torch.einsum("la,lirm,br->aibm", lb, block, rbasis).reshape(ra * n * rb, m)
        try:
            solved = torch.linalg.solve(local, local_rhs)
        except RuntimeError:  # singular local system (an indefinite or rank-deficient MPO)
            solved = torch.linalg.lstsq(local, local_rhs).solution
        return solved.reshape(ra, n, rb, m)

    def residual_of(solution: Tensor) -> float:
        return float(torch.linalg.matrix_norm(mpo @ solution - b)) / b_norm

    solution = b
    previous = math.inf
    # Truncating the block index back to rank R between steps can raise the residual when the
    # solution needs more rank than R, so the best half-sweep's iterate is the one returned.
    best, best_residual = None, math.inf

    def keep_best(candidate: Tensor) -> None:
        nonlocal best, best_residual
        residual = residual_of(candidate)
        info.residual_history.append(residual)
        if residual < best_residual:
            best, best_residual = candidate, residual
    for sweep in range(sweeps):
        # Left to right: solve core k, keep its left singular vectors as the new left-orthogonal core.
        for k in range(k_cores - 1):
            local = solve_local(k)
            ra, n, rb, _ = local.shape
            unfolding = local.reshape(ra * n, rb * m)
            u, _, _ = torch.linalg.svd(unfolding, full_matrices=False)
            x_cores[k] = u[:, : min(rank, u.shape[1])].reshape(ra, n, -1)
            # The next core's bond changes, so its old right bases no longer fit; rebuild lazily:
            extend_left(k)
            if k + 1 < k_cores - 1:
                x_cores[k + 1] = _fit_bond_left(x_cores[k + 1], x_cores[k].shape[2])
        local = solve_local(k_cores - 1)
        solution = (left_basis[k_cores - 1] @ local.reshape(local.shape[0], -1)).reshape(mpo.dim, m)
        keep_best(solution)
        # Right to left, mirror image.
        for k in range(k_cores - 1, 0, -1):
            local = solve_local(k)
            ra, n, rb, _ = local.shape
            unfolding = local.permute(0, 3, 1, 2).reshape(ra * m, n * rb)
            _, _, vh = torch.linalg.svd(unfolding, full_matrices=False)
            x_cores[k] = vh[: min(rank, vh.shape[0])].reshape(-1, n, rb)
            extend_right(k)
            if k - 1 > 0:
                x_cores[k - 1] = _fit_bond_right(x_cores[k - 1], x_cores[k].shape[0])
        local = solve_local(0)
        solution = (local.reshape(modes[0], local.shape[2], m).permute(0, 2, 1) @ right_basis[1]).permute(0, 2, 1)
        solution = solution.reshape(mpo.dim, m)
        keep_best(solution)
        info.sweeps = sweep + 1
        # Stop once a full sweep improves the best residual by less than 1%, or it is below tol.
        if best_residual <= tol or best_residual > 0.99 * previous:
            break
        previous = best_residual
    info.solution_ranks = [c.shape[2] for c in x_cores[:-1] if c is not None]
    info.best_residual = best_residual
    solution = best
    return (solution.reshape(-1) if vector else solution), info


def _fit_bond_left(core: Tensor, new_left: int) -> Tensor:
    """Placeholder core with a resized left bond; ALS only needs its shape, it is re-solved next."""
    if core.shape[0] == new_left:
        return core
    return torch.zeros(new_left, core.shape[1], core.shape[2], dtype=core.dtype)


def _fit_bond_right(core: Tensor, new_right: int) -> Tensor:
    if core.shape[2] == new_right:
        return core
    return torch.zeros(core.shape[0], core.shape[1], new_right, dtype=core.dtype)


def lanczos_extremes(matvec, dim: int, dtype: torch.dtype, steps: int = 40, seed: int = 0) -> tuple[float, float]:
    """(smallest, largest) Ritz values of a symmetric operator after ``steps`` Lanczos steps with full
    reorthogonalisation: a fixed cost of ``steps`` products; the extremes converge first."""
    generator = torch.Generator().manual_seed(seed)
    steps = min(steps, dim)
    basis = torch.zeros(dim, steps, dtype=dtype)
    v = torch.randn(dim, generator=generator, dtype=dtype)
    v /= torch.linalg.vector_norm(v)
    alphas, betas = [], []
    for j in range(steps):
        basis[:, j] = v
        w = matvec(v).to(dtype)
        alpha = torch.dot(w, v)
        w = w - basis[:, : j + 1] @ (basis[:, : j + 1].T @ w)
        w = w - basis[:, : j + 1] @ (basis[:, : j + 1].T @ w)
        alphas.append(float(alpha))
        beta = float(torch.linalg.vector_norm(w))
        if beta <= 1e-12 * max(abs(a) for a in alphas) or j == steps - 1:
            break
        betas.append(beta)
        v = w / beta
    k = len(alphas)
    tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[: k - 1], dtype=torch.float64)
        tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
    ritz = torch.linalg.eigvalsh(tridiagonal)
    return float(ritz[0]), float(ritz[-1])
