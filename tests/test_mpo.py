"""MPO (TT-SVD + ALS) and the MPO factor inverse against dense matrices; Theorem 1 and Proposition 2."""

import math

import pytest
import torch

from fedunlearn.curvature import SolverSettings
from fedunlearn.curvature.certificate import theorem1_bound
from fedunlearn.curvature.factor_solvers import (
    MPOFactorInverse,
    Prop2Error,
    make_factor_inverse,
    prop2_inverse_bound,
)
from fedunlearn.curvature.mpo import als_solve, mode_sizes, smooth_dim, tt_svd

F64 = torch.float64


def settings(**changes):
    return SolverSettings.defaults().replace(**changes)


def smooth_kernel(dim, length=0.2):
    t = torch.linspace(0, 1, dim, dtype=F64)
    return torch.exp(-((t[:, None] - t[None, :]) ** 2) / (2 * length**2))


def random_psd(dim, seed=0):
    x = torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return x @ x.T / dim


def test_mode_sizes_and_padding():
    assert mode_sizes(4096) == [4, 4, 4, 4, 4, 4]
    assert mode_sizes(4096, max_mode=8) == [8, 8, 8, 8]
    assert mode_sizes(25088) == [4, 4, 4, 4, 2, 7, 7]  # 512 channels x 7 x 7, channel-major
    assert math.prod(mode_sizes(288)) == 288
    assert smooth_dim(289) == 294 and smooth_dim(4096) == 4096  # 289 = 17^2 is padded
    with pytest.raises(ValueError):
        mode_sizes(17)


def test_tt_svd_is_exact_at_full_rank_and_products_match():
    a = random_psd(64)
    mpo, error = tt_svd(a, [4, 4, 4], rank=1000)
    assert torch.allclose(mpo.to_dense(), a, atol=1e-12)
    assert error < 1e-10
    x = torch.randn(64, 3, dtype=F64)
    assert torch.allclose(mpo @ x, a @ x, atol=1e-12)
    assert torch.allclose(mpo.transpose().to_dense(), a.T, atol=1e-12)
    assert mpo.frobenius_norm() == pytest.approx(float(torch.linalg.matrix_norm(a)), rel=1e-12)


def test_kronecker_product_has_bond_dimension_one():
    factors = [random_psd(n, seed) for seed, n in enumerate([2, 3, 4])]
    a = torch.kron(torch.kron(factors[0], factors[1]), factors[2])
    mpo, error = tt_svd(a, [2, 3, 4], rank=1)
    assert mpo.ranks == [1, 1]
    assert torch.allclose(mpo.to_dense(), a, atol=1e-12) and error < 1e-10


def test_reported_truncation_error_is_the_frobenius_error():
    a = random_psd(64, seed=1)
    for rank in (2, 5, 9):
        mpo, error = tt_svd(a, [4, 4, 4], rank)
        exact_error = float(torch.linalg.matrix_norm(a - mpo.to_dense()))
        assert error == pytest.approx(exact_error, rel=1e-8)
        assert max(mpo.ranks) <= rank


def test_als_solve_equals_dense_solve_of_the_mpo():
    a = random_psd(64, seed=2) + 0.1 * torch.eye(64, dtype=F64)
    b = torch.randn(64, 5, dtype=F64)
    mpo, _ = tt_svd(a, [4, 4, 4], rank=1000)
    x, info = als_solve(mpo, b, rank=64)
    assert torch.allclose(x, torch.linalg.solve(a, b), rtol=1e-9, atol=1e-10)
    assert info.residual_history[-1] < 1e-10
    # A truncated MPO: ALS solves the compressed system, whatever its error to the original.
    coarse, _ = tt_svd(a, [4, 4, 4], rank=6)
    x, _ = als_solve(coarse, b, rank=64)
    assert torch.allclose(x, torch.linalg.solve(coarse.to_dense(), b), rtol=1e-8, atol=1e-9)


def test_mpo_inverse_on_a_smooth_kernel_is_accurate_and_passes_prop2():
    dim, damping = 256, 1e-2
    kernel = smooth_kernel(dim)
    t = torch.linspace(0, 1, dim, dtype=F64)
    rhs = torch.stack([torch.sin((j + 1) * math.pi * t) for j in range(4)], 1)
    inverse = MPOFactorInverse(kernel, damping, rank=12, prop2_fallback="dense", seed=0)
    prop2 = inverse.diagnostics["prop2"]
    assert prop2["holds"] and inverse.used == "mpo"
    damped = kernel + damping * torch.eye(dim, dtype=F64)
    exact = torch.linalg.solve(damped, rhs)
    got = inverse @ rhs
    assert float(torch.linalg.matrix_norm(got - exact) / torch.linalg.matrix_norm(exact)) < 1e-3
    assert torch.equal(inverse.solve(rhs), got)
    # Proposition 2's bound (Neumann-series form) holds for the compressed inverse.
    approx = inverse.mpo.to_dense()
    inverse_gap = float(torch.linalg.matrix_norm(torch.linalg.inv(approx) - torch.linalg.inv(damped), ord=2))
    assert inverse_gap <= prop2["inverse_error_bound"] * 1.01
    assert inverse.diagnostics["truncation_error"] == pytest.approx(
        float(torch.linalg.matrix_norm(approx - damped)), rel=1e-6, abs=1e-12
    )


def test_prop2_failure_falls_back_to_dense_or_raises():
    # A rank-deficient random covariance has no tensor-train structure: the coarse MPO is useless.
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(3), dtype=F64)
    covariance = x.T @ x / 40
    damping = 1e-3
    inverse = MPOFactorInverse(covariance, damping, rank=3, prop2_fallback="dense", seed=0)
    assert not inverse.diagnostics["prop2"]["holds"]
    assert inverse.used == "dense" and inverse.diagnostics["fallback"] == "dense"
    b = torch.randn(64, 2, dtype=F64)
    exact = torch.linalg.solve(covariance + damping * torch.eye(64, dtype=F64), b)
    assert torch.allclose(inverse @ b, exact, rtol=1e-8, atol=1e-8)
    with pytest.raises(Prop2Error, match="Proposition 2"):
        MPOFactorInverse(covariance, damping, rank=3, prop2_fallback="raise", seed=0)


def test_factor_solver_registry_threshold_and_padding():
    a = random_psd(289, seed=4)  # 289 = 32 * 9 + bias: the last coordinate is the border, 288 = [4, 4, 2, 3, 3]
    damping = 0.5
    b = torch.randn(289, 3, dtype=F64)
    exact = torch.linalg.solve(a + damping * torch.eye(289, dtype=F64), b)
    small = make_factor_inverse(a, settings(damping=damping, factor_solver="mpo", mpo_threshold=300))
    assert small.diagnostics["solver"] == "dense"  # below the threshold
    full = make_factor_inverse(a, settings(damping=damping, factor_solver="mpo", kfac_rank=10_000, mpo_threshold=256))
    assert full.diagnostics["padded_dim"] == 288 and full.diagnostics["border"] == 1 and full.used == "mpo"
    assert full.diagnostics["modes"] == [4, 4, 2, 3, 3]
    assert torch.allclose(full @ b, exact, rtol=1e-7, atol=1e-8)
    assert torch.allclose(small @ b, exact, rtol=1e-9, atol=1e-10)


def test_theorem1_bound_holds_for_compressed_factors():
    a_hat = smooth_kernel(64, 0.3) + 0.1 * torch.eye(64, dtype=F64)
    g_hat = random_psd(16, seed=5) + 0.1 * torch.eye(16, dtype=F64)
    a_mpo, eps_a = tt_svd(a_hat, [4, 4, 4], rank=2)
    g_mpo, eps_g = tt_svd(g_hat, [4, 4], rank=2)
    a_tilde, g_tilde = a_mpo.to_dense(), g_mpo.to_dense()
    # F := A_hat kron G_hat exactly, so eps_KFAC = 0 and only the MPO part remains.
    actual = float(torch.linalg.matrix_norm(torch.kron(a_hat, g_hat) - torch.kron(a_tilde, g_tilde)))
    bound = theorem1_bound(0.0, eps_a, eps_g, float(torch.linalg.matrix_norm(a_hat)), float(torch.linalg.matrix_norm(g_hat)))
    assert eps_a > 0 and eps_g > 0
    assert actual <= bound


def test_prop2_bound_is_tight_on_a_diagonal_example_and_the_printed_eq2_is_not_a_bound():
    # A_hat = diag(L, lam), A_tilde = diag(L, lam - e): ||A_tilde^-1 - A_hat^-1|| = e / (lam (lam - e)).
    big, lam, e = 10.0, 1.0, 0.1
    kappa = big / lam
    actual = e / (lam * (lam - e))
    assert prop2_inverse_bound(e, big, kappa) == pytest.approx(actual, rel=1e-12)
    printed_eq2 = kappa**2 * e / (big * (kappa * big - kappa * e))
    assert printed_eq2 < actual  # the poster's printed denominator under-estimates the gap


# --------------------------------------------------------------------------- bias border, fallback reporting, memory
def bias_covariance(dim_in, samples=200, seed=0):
    """A KFAC-style input covariance of a layer with a bias: inputs with a trailing 1 (d = dim_in + 1)."""
    x = torch.randn(samples, dim_in + 1, generator=torch.Generator().manual_seed(seed), dtype=F64)
    x[:, -1] = 1.0
    return x.T @ x / samples


def test_bias_border_keeps_the_layer_layout_and_solves_exactly_at_full_rank():
    a = bias_covariance(64)  # 65 = 64 + bias: not 7-smooth, 64 = 4^3 is
    damping = 0.1
    damped = a + damping * torch.eye(65, dtype=F64)
    b = torch.randn(65, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    inverse = MPOFactorInverse(a, damping, rank=1000, prop2_fallback="raise", seed=0)
    d = inverse.diagnostics
    assert d["border"] == 1 and d["modes"] == [4, 4, 4] and d["padded_dim"] == 64
    assert inverse.used == "mpo" and d["truncation_error"] < 1e-10
    assert torch.allclose(inverse.approx_matmat(b), damped @ b, atol=1e-12)
    assert torch.allclose(inverse.approx_matmat(b, transpose=True), damped @ b, atol=1e-12)
    # Block elimination of the border around the ALS solve of the 64 x 64 block.
    assert torch.allclose(inverse @ b, torch.linalg.solve(damped, b), rtol=1e-9, atol=1e-11)
    assert torch.allclose(inverse @ b[:, 0], torch.linalg.solve(damped, b[:, 0]), rtol=1e-9, atol=1e-11)
    # Without the border the 65 coordinates are padded to 70 = [2, 5, 7] instead.
    padded = MPOFactorInverse(a, damping, rank=1000, prop2_fallback="raise", seed=0, border=0)
    assert padded.diagnostics["padded_dim"] == 70 and padded.diagnostics["border"] == 0
    assert torch.allclose(padded @ b, torch.linalg.solve(damped, b), rtol=1e-8, atol=1e-10)


def test_border_rule_and_explicit_modes():
    from fedunlearn.curvature.factor_solvers import default_border

    assert default_border(289) == 1 and default_border(257) == 1 and default_border(25089) == 1  # conv2, fc1, wide fc1
    assert default_border(256) == 0 and default_border(294) == 0  # smooth already
    assert default_border(263) == 0  # 262 = 2 * 131 is not smooth either: padded
    # 49 = 48 + bias is 7-smooth itself, so only the caller knows there is a bias: border=1 says so.
    assert default_border(49) == 0
    a = bias_covariance(48)
    inverse = MPOFactorInverse(a, 0.1, rank=1000, prop2_fallback="raise", seed=0, border=1, modes=[2, 4, 6])
    assert inverse.diagnostics["modes"] == [2, 4, 6] and inverse.diagnostics["border"] == 1
    b = torch.randn(49, 2, dtype=F64)
    assert torch.allclose(inverse @ b, torch.linalg.solve(a + 0.1 * torch.eye(49, dtype=F64), b), rtol=1e-9, atol=1e-11)
    via_settings = make_factor_inverse(a, settings(damping=0.1, factor_solver="mpo", kfac_rank=1000, mpo_threshold=16), border=1)
    assert via_settings.diagnostics["border"] == 1 and via_settings.diagnostics["modes"] == [4, 4, 3]
    with pytest.raises(ValueError, match="modes"):
        MPOFactorInverse(a, 0.1, rank=4, prop2_fallback="raise", seed=0, border=1, modes=[4, 4, 4])


def test_fallback_reports_the_exactness_of_the_factor_it_solves():
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(3), dtype=F64)
    covariance = x.T @ x / 40
    inverse = MPOFactorInverse(covariance, 1e-3, rank=3, prop2_fallback="dense", seed=0)
    d = inverse.diagnostics
    assert inverse.used == "dense"
    # Theorem 1's epsilon is that of the factor solved (exact), the MPO's own stays on record.
    assert d["truncation_error"] == 0.0 and d["mpo_truncation_error"] > 0.1
    assert d["fallback_seconds"] >= 0 and d["prop2_seconds"] >= 0
    with pytest.raises(Prop2Error) as caught:
        MPOFactorInverse(covariance, 1e-3, rank=3, prop2_fallback="raise", seed=0)
    assert caught.value.diagnostics["prop2"]["holds"] is False
    assert caught.value.diagnostics["mpo_truncation_error"] == pytest.approx(d["mpo_truncation_error"])


def test_als_rank_is_capped_so_local_systems_stay_small():
    a = smooth_kernel(112)  # 112 = 16 * 7 -> modes [4, 4, 7]
    inverse = MPOFactorInverse(a, 0.1, rank=64, prop2_fallback="dense", seed=0)
    assert inverse.modes == [4, 4, 7]
    assert inverse.diagnostics["als_rank"] == 34  # 34 * 7 * 34 <= 8192 < 35 * 7 * 35
    small = MPOFactorInverse(a, 0.1, rank=64, prop2_fallback="dense", seed=0, max_local_size=700)
    assert small.diagnostics["als_rank"] == 10


def test_tt_svd_projects_the_first_unfolding_in_place_and_returns_no_view_of_it():
    from fedunlearn.curvature.mpo import QR_CHUNK_ENTRIES, _project_rows

    generator = torch.Generator().manual_seed(0)
    unfolding = torch.randn(16, QR_CHUNK_ENTRIES // 16 * 3 + 5, generator=generator)
    basis = torch.linalg.qr(torch.randn(16, 5, generator=generator)).Q
    expected = basis.T @ unfolding
    projected = _project_rows(basis, unfolding.clone())
    assert torch.allclose(projected, expected, atol=1e-5)
    # d = 2048: the interleaved copy (4.2M float32 entries) is projected in place; the last core
    # must not keep that buffer alive.
    a = smooth_kernel(2048).float()
    mpo, error = tt_svd(a, mode_sizes(2048), rank=8)
    for core in mpo.cores:
        assert core.untyped_storage().nbytes() == core.numel() * core.element_size()
    probe = torch.randn(2048, 2, generator=generator)
    assert torch.allclose((mpo @ probe).double(), (a @ probe).double(), rtol=0, atol=1e-3 * float(torch.linalg.matrix_norm(a @ probe)))


def test_dense_factor_inverse_in_place_cholesky_and_eigh_fallback():
    from fedunlearn.curvature.factor_solvers import DenseFactorInverse

    a = random_psd(300, seed=6)
    b = torch.randn(300, 4, generator=torch.Generator().manual_seed(7), dtype=F64)
    exact = torch.linalg.solve(a + 0.5 * torch.eye(300, dtype=F64), b)
    for source in (a, a.T, a.float()):  # contiguous, transposed view, float32
        got = DenseFactorInverse(source, 0.5) @ b.to(source.dtype)
        assert torch.allclose(got.double(), exact, rtol=1e-4 if source.dtype == torch.float32 else 1e-10, atol=1e-6)
    assert torch.equal(a, random_psd(300, seed=6))  # the factor is not modified
    # Not positive definite after damping: Cholesky fails, eigenvalues are floored at the damping.
    indefinite = torch.diag(torch.tensor([5.0] + [-2.0] * 9, dtype=F64))
    inverse = DenseFactorInverse(indefinite, 0.1)
    assert inverse._lower is None
    assert torch.allclose(inverse @ torch.ones(10, dtype=F64), torch.tensor([1 / 5.1] + [10.0] * 9, dtype=F64))


# --------------------------------------------------------------------------- a real wide-ish factor
@pytest.fixture(scope="module")
def wide_digits_factor():
    """fc1's KFAC factor A of simple-cnn-wide on 8x8 digits: 32 x 8 x 8 inputs + bias = 2049, after
    ten SGD steps, from compute_kfac_factors on 256 images; and 8 columns of fc1's real forget
    gradient (class 0) as the right-hand side B = grad_{W_joint}^T. One thread: the MPO's many small
    products are slower with two on a loaded machine."""
    import torch.nn.functional as F

    from fedunlearn.curvature import compute_kfac_factors, loss_gradient
    from fedunlearn.data import load_dataset
    from fedunlearn.models import build_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        split = load_dataset("digits")
        x, y = split.train.tensors
        model = build_model("simple-cnn-wide", split.input_shape, split.num_classes)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        for i in range(0, 640, 64):
            optimizer.zero_grad()
            F.cross_entropy(model(x[i : i + 64]), y[i : i + 64]).backward()
            optimizer.step()
        names = ["fc1.weight", "fc1.bias"]
        # A is the same for every Fisher type (it is the layer's input covariance); empirical needs one backward pass.
        factors, _, _ = compute_kfac_factors(model, [(x[:256], y[:256])], param_names=names, fisher_type="empirical")
        weight_grad, bias_grad = loss_gradient(model, names, [(x[y == 0][:32], y[y == 0][:32])])
        rhs = torch.cat([weight_grad, bias_grad[:, None]], dim=1).T[:, :8].double().contiguous()
        yield factors["fc1"][0].double(), rhs
    finally:
        torch.set_num_threads(threads)


def test_real_wide_factor_fails_prop2_at_the_default_damping_and_falls_back(wide_digits_factor):
    a, b = wide_digits_factor
    assert a.shape == (2049, 2049)
    damping = 0.01  # the run-config default
    inverse = make_factor_inverse(a, settings(damping=damping, factor_solver="mpo", kfac_rank=16))
    d, prop2 = inverse.diagnostics, inverse.diagnostics["prop2"]
    assert d["border"] == 1 and d["modes"] == [4, 4, 4, 4, 4, 2]  # 2048 = 32 channels x 8 x 8, bias apart
    # The TT truncation of a real activation covariance is far coarser than the damping: Prop. 2
    # fails by orders of magnitude and the MPO is indefinite.
    assert not prop2["holds"] and prop2["spectral_error"] > 100 * damping
    assert prop2["mpo_indefinite"] and prop2["mpo_min_eigenvalue"] < -damping
    assert inverse.used == "dense" and d["truncation_error"] == 0.0
    exact = torch.linalg.solve(a + damping * torch.eye(2049, dtype=F64), b)
    assert torch.allclose(inverse @ b, exact, rtol=1e-6, atol=1e-8 * float(exact.abs().max()))
    # The Lanczos estimate of ||A_hat - A_tilde||_2 against plain power iteration on E^T E.
    def error(v, transpose=False):
        return a @ v + damping * v - inverse.approx_matmat(v, transpose=transpose)

    v = torch.randn(2049, generator=torch.Generator().manual_seed(1), dtype=F64)
    for _ in range(200):
        v = error(error(v), transpose=True)
        v /= torch.linalg.vector_norm(v)
    power = float(torch.linalg.vector_norm(error(v)))
    assert prop2["spectral_error"] == pytest.approx(power, rel=1e-2)


def test_real_wide_factor_prop2_holds_above_the_truncation_error_and_bounds_the_solve(wide_digits_factor):
    a, b = wide_digits_factor
    rank = 16
    # The spectral truncation error barely depends on the damping (the identity has TT rank 1).
    with pytest.raises(Prop2Error) as caught:
        MPOFactorInverse(a, 0.01, rank, "raise", seed=0)
    eps = caught.value.diagnostics["prop2"]["spectral_error"]
    with pytest.raises(Prop2Error) as caught:
        MPOFactorInverse(a, 0.5 * eps, rank, "raise", seed=0)
    assert caught.value.diagnostics["prop2"]["spectral_error"] == pytest.approx(eps, rel=0.1)
    damping = 4 * eps
    inverse = make_factor_inverse(a, settings(damping=damping, factor_solver="mpo", kfac_rank=rank))
    prop2 = inverse.diagnostics["prop2"]
    assert prop2["holds"] and inverse.used == "mpo" and not prop2["mpo_indefinite"]
    exact = torch.linalg.solve(a + damping * torch.eye(2049, dtype=F64), b)
    got = inverse @ b
    b_norm = float(torch.linalg.matrix_norm(b))
    residual = float(torch.linalg.matrix_norm(inverse.approx_matmat(got) - b))
    assert inverse.diagnostics["als"]["residual"] == pytest.approx(residual / b_norm, rel=1e-9)
    # X - A_hat^-1 B = A_tilde^-1 (A_tilde X - B) + (A_tilde^-1 - A_hat^-1) B, with
    # ||A_tilde^-1|| <= 1 / (lambda - eps) (Weyl) and Proposition 2's bound on the second term.
    bound = residual / (damping - prop2["spectral_error"]) + prop2["inverse_error_bound"] * b_norm
    assert float(torch.linalg.matrix_norm(got - exact)) <= bound
    # ... and the solve is no mere scaling of B: well inside the trivial error 1 of X = 0.
    assert float(torch.linalg.matrix_norm(got - exact) / torch.linalg.matrix_norm(exact)) < 0.6


def test_mpo_matmat_in_column_chunks_equals_one_block(monkeypatch):
    import fedunlearn.curvature.mpo as mpo_module

    a = random_psd(64, seed=8)
    mpo, _ = tt_svd(a, [4, 4, 4], rank=1000)
    x = torch.randn(64, 37, generator=torch.Generator().manual_seed(9), dtype=F64)
    whole = mpo @ x
    assert torch.allclose(whole, a @ x, atol=1e-12)
    # 64 * 16 * 3 entries per chunk: 3 columns at a time (bond 16), 13 chunks, the last one short.
    monkeypatch.setattr(mpo_module, "MATMAT_CHUNK_ENTRIES", 64 * 16 * 3)
    assert torch.allclose(mpo @ x, whole, rtol=0, atol=1e-12)
    assert torch.allclose(mpo @ x[:, 0], whole[:, 0], atol=1e-12)
