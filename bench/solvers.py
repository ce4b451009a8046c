"""Curvature and solver benchmark: one JSON object per line on stdout.

    python bench/solvers.py            # everything, a few minutes on 2 cores
    python bench/solvers.py --skip-wide  # without the d = 25088 cases (the slowest, ~5 GB peak)

Every line has ``case``, ``method``, ``dim``, ``rank``, ``seconds``, ``peak_bytes``, ``rel_error``:

- ``seconds``: wall-clock seconds of the method (build + solve, split in ``build_seconds`` /
  ``solve_seconds`` where both exist).
- ``peak_bytes``: the largest growth of the process's resident set size above its size at the start
  of the method, sampled every 2 ms (so it counts every intermediate, torch's and LAPACK's alike).
- ``factor_bytes``: storage of the factor representation (dense d^2, MPO cores, Nystrom U and Lambda).
- ``rel_error``: ||X - X_ref||_F / ||X_ref||_F against the dense float64 (d = 4096) or float32
  (d = 25088) Cholesky solution, or as stated per case.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import machine, rel_error  # noqa: E402  (bench/common.py; the script's directory is on sys.path)

from fedunlearn.curvature import CGInverse, SolverSettings, flatten, ggn_vp, hvp, unflatten
from fedunlearn.curvature.factor_solvers import (
    DenseFactorInverse,
    MPOFactorInverse,
    NystromFactorInverse,
)
from fedunlearn.curvature.mpo import als_solve
from fedunlearn.curvature.nystrom import covariance_matmat

PAGE = os.sysconf("SC_PAGE_SIZE")
# d = 25088: bond dimension of the MPO and TT rank of the ALS solution (local systems r_x * 7 * r_x).
WIDE_MPO_RANK = 32
WIDE_ALS_RANK = 16


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakMemory:
    """Peak RSS growth over a block, sampled by a background thread."""

    def __enter__(self):
        self.start = current_rss()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss())
        self.bytes = self.peak - self.start


def emit(**record):
    base = {"case": None, "method": None, "dim": None, "rank": None, "seconds": None, "peak_bytes": None, "rel_error": None}
    base.update(record)
    print(json.dumps(base), flush=True)


def digits():
    from fedunlearn.data import load_dataset

    return load_dataset("digits")


# --------------------------------------------------------------------------- HVP / gradient ratio
def bench_hvp_ratio(split, repeats: int = 50):
    from torch.func import functional_call, grad

    from fedunlearn.models import build_model

    torch.manual_seed(0)
    model = build_model("simple-cnn", split.input_shape, split.num_classes)
    x, y = split.train.tensors[0][:256], split.train.tensors[1][:256]
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    vector = [torch.randn_like(params[n]) for n in names]

    def loss(p):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    def gradient():
        grad(loss)(params)

    def hessian_vector():
        hvp(model, names, [(x, y)], vector)

    def ggn_vector():
        ggn_vp(model, names, [(x, y)], vector)

    # Interleaved, minimum over repeats: other load on the 2 cores inflates single timings, the
    # minimum is the least disturbed one, and interleaving exposes all three to the same drift.
    functions = {"gradient": gradient, "hvp": hessian_vector, "ggn": ggn_vector}
    for fn in functions.values():
        for _ in range(3):
            fn()
    samples = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    gradient_seconds, hvp_seconds, ggn_seconds = (min(samples[k]) for k in ("gradient", "hvp", "ggn"))
    with PeakMemory() as memory:
        hessian_vector()
    # Check the forward-over-reverse product against reverse-over-reverse double backprop.
    flat_params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    g = torch.autograd.grad(loss(dict(zip(names, flat_params))), flat_params, create_graph=True)
    reference = torch.autograd.grad(g, flat_params, grad_outputs=vector)
    got = hvp(model, names, [(x, y)], vector)
    dim = sum(p.numel() for p in model.parameters())
    error = float(torch.linalg.vector_norm(flatten(got) - flatten(reference)) / torch.linalg.vector_norm(flatten(reference)))
    emit(case="hvp-ratio", method="gradient", dim=dim, seconds=gradient_seconds, batch=256, model="simple-cnn")
    emit(
        case="hvp-ratio",
        method="hvp-forward-over-reverse",
        dim=dim,
        seconds=hvp_seconds,
        peak_bytes=memory.bytes,
        rel_error=error,
        ratio=hvp_seconds / gradient_seconds,
        batch=256,
        model="simple-cnn",
        rel_error_reference="reverse-over-reverse double backprop",
    )
    emit(case="hvp-ratio", method="ggn-vp", dim=dim, seconds=ggn_seconds, ratio=ggn_seconds / gradient_seconds, batch=256, model="simple-cnn")


# --------------------------------------------------------------------------- CG against the exact solve
def bench_cg(split):
    from torch.func import functional_call

    from fedunlearn.models import build_model

    torch.manual_seed(0)
    model = build_model("logreg", split.input_shape, split.num_classes).double()
    x, y = split.train.tensors[0].double(), split.train.tensors[1]
    # A few full-batch gradient steps so the curvature is that of a partly trained model.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(50):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    batches = [(x[i : i + 256], y[i : i + 256]) for i in range(0, len(x), 256)]
    names = [n for n, _ in model.named_parameters()]
    like = [p.detach() for p in model.parameters()]
    damping = 1e-2

    def flat_loss(flat):
        return F.cross_entropy(functional_call(model, dict(zip(names, unflatten(flat, like))), (x,)), y)

    # Independent reference: autograd's dense Hessian (= GGN for a linear model under cross-entropy).
    hessian = torch.autograd.functional.hessian(flat_loss, flatten(like))
    forget = (x[y == 0][:20], y[y == 0][:20])
    from fedunlearn.curvature import loss_gradient

    forget_gradient = loss_gradient(model, None, [forget])
    b = flatten(forget_gradient)
    exact = torch.linalg.solve(hessian + damping * torch.eye(hessian.shape[0], dtype=torch.float64), b)
    # The GGN with the stop policy, as this case has always measured (not the run defaults).
    settings = SolverSettings.defaults().replace(damping=damping, curvature="ggn", negative_curvature="stop", cg_tol=1e-10)
    for cg_iters in (10, 50, 500):
        inverse = CGInverse.from_local(model, batches, settings.replace(cg_iters=cg_iters))
        with PeakMemory() as memory:
            start = time.perf_counter()
            solution = flatten(inverse @ forget_gradient)
            seconds = time.perf_counter() - start
        emit(
            case="cg-vs-exact",
            method="cg-ggn",
            dim=b.numel(),
            seconds=seconds,
            peak_bytes=memory.bytes,
            rel_error=float(torch.linalg.vector_norm(solution - exact) / torch.linalg.vector_norm(exact)),
            cg_iters=cg_iters,
            iterations=inverse.diagnostics["cg_iterations"],
            relative_residual=inverse.diagnostics["relative_residual"],
            damping=damping,
            model="logreg",
            dtype="float64",
        )


# --------------------------------------------------------------------------- per-factor solves
def run_factor_methods(case, factor, rhs, damping, mpo_ranks, nystrom_ranks, extra=None, activations=None, reference=None):
    """Dense, MPO at each bond dimension, Nystrom at each rank on one factor; returns the dense solution."""
    extra = extra or {}
    dim = factor.shape[0]
    if reference is None:
        with PeakMemory() as memory:
            start = time.perf_counter()
            dense = DenseFactorInverse(factor, damping)
            build = time.perf_counter() - start
            reference = dense @ rhs
            total = time.perf_counter() - start
        emit(case=case, method="dense", dim=dim, rank=None, seconds=total, build_seconds=build, solve_seconds=total - build,
             peak_bytes=memory.bytes, rel_error=0.0, factor_bytes=dense.diagnostics["bytes"], **extra)
        del dense
    mpo_bytes = {}
    for rank in mpo_ranks:
        with PeakMemory() as memory:
            start = time.perf_counter()
            inverse = MPOFactorInverse(factor, damping, rank=rank, prop2_fallback="dense", seed=0)
            build = time.perf_counter() - start
            # The MPO's own ALS solve, even where Proposition 2 failed, to show what the fallback avoids.
            padded = torch.zeros(inverse.mpo.dim, rhs.shape[1], dtype=torch.float64)
            padded[:dim] = rhs
            solution, info = als_solve(inverse.mpo, padded, inverse.als_rank, sweeps=inverse.als_sweeps)
            solution = solution[:dim]
            total = time.perf_counter() - start
        prop2 = inverse.diagnostics["prop2"]
        mpo_bytes[rank] = inverse.mpo.nbytes
        emit(
            case=case, method="mpo", dim=dim, rank=rank, seconds=total, build_seconds=build, solve_seconds=total - build,
            peak_bytes=memory.bytes, rel_error=rel_error(solution, reference),
            factor_bytes=inverse.mpo.nbytes,
            factor_rel_error=inverse.truncation_error / inverse.diagnostics["frobenius_norm"],
            modes=inverse.modes, mpo_ranks=inverse.mpo.ranks,
            prop2_holds=prop2["holds"], prop2_relative_spectral_error=prop2["relative_spectral_error"],
            prop2_one_over_kappa=prop2["one_over_kappa"], mpo_min_eigenvalue=prop2["mpo_min_eigenvalue"],
            mpo_indefinite=prop2["mpo_indefinite"], fallback=inverse.diagnostics.get("fallback"),
            rel_error_after_fallback=rel_error(inverse @ rhs, reference),
            als_sweeps=info.sweeps, als_residual=info.best_residual, **extra,
        )
        del inverse
    for rank in nystrom_ranks:
        if isinstance(rank, tuple):  # ("equal-memory", mpo rank): as many columns as the MPO's bytes
            _, mpo_rank = rank
            rank = max(1, mpo_bytes[mpo_rank] // (dim * 8))
        else:
            mpo_rank = None
        source = covariance_matmat(activations) if activations is not None else factor
        with PeakMemory() as memory:
            start = time.perf_counter()
            inverse = NystromFactorInverse(source, damping, rank=rank, seed=0, dim=dim, dtype=torch.float64)
            build = time.perf_counter() - start
            solution = inverse @ rhs
            total = time.perf_counter() - start
        factor_error = None
        if activations is None:
            approx = inverse.approximation
            probes = torch.randn(dim, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            exact_probe = factor.to(torch.float64) @ probes
            factor_error = float(torch.linalg.matrix_norm(exact_probe - approx.matmat(probes)) / torch.linalg.matrix_norm(exact_probe))
        emit(
            case=case, method="nystrom", dim=dim, rank=rank, seconds=total, build_seconds=build, solve_seconds=total - build,
            peak_bytes=memory.bytes, rel_error=rel_error(solution, reference), factor_bytes=inverse.approximation.nbytes,
            factor_rel_error_estimate=factor_error, equal_memory_to_mpo_rank=mpo_rank,
            from_activations=activations is not None, **extra,
        )
        del inverse
    return reference


def smooth_rhs(dim, columns, dtype):
    t = torch.linspace(0, 1, dim, dtype=dtype)
    return torch.stack([torch.sin((j + 1) * math.pi * t) + t**j for j in range(columns)], dim=1)


def bench_kernel(dim=4096):
    t = torch.linspace(0, 1, dim, dtype=torch.float64)
    kernel = torch.exp(-((t[:, None] - t[None, :]) ** 2) / (2 * 0.1**2))
    damping = 1e-2
    rhs = smooth_rhs(dim, 16, torch.float64)
    run_factor_methods(
        "factor-kernel-4096", kernel, rhs, damping, mpo_ranks=(8, 16, 32),
        nystrom_ranks=(("equal-memory", 16), ("equal-memory", 32), 64, 256),
        extra={"matrix": "gaussian kernel exp(-(t_i-t_j)^2 / (2 * 0.1^2)) on a uniform grid", "damping": damping, "rhs": "16 smooth columns"},
    )


def conv_activations(split, width=64, epochs=2):
    """Post-ReLU conv1 outputs (width x 8 x 8 = 4096 features) of a briefly trained simple-cnn."""
    from fedunlearn.models.simple_cnn import SimpleCNN

    torch.manual_seed(0)
    model = SimpleCNN(split.input_shape, split.num_classes, width=width)
    x, y = split.train.tensors
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = order[i : i + 64]
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    accuracy = float((model(split.test.tensors[0]).argmax(1) == split.test.tensors[1]).float().mean())
    with torch.no_grad():
        features = torch.relu(model.conv1(x)).flatten(start_dim=1)
    return features.double(), y, accuracy


def bench_conv(split):
    activations, labels, accuracy = conv_activations(split)
    n = activations.shape[0]
    covariance = activations.T @ activations / n
    damping = 1e-2
    # Gradient-shaped right-hand side: grad_W^T = sum_i a_i g_i^T over a forget set (class 0).
    forget = activations[labels == 0][:64]
    g = torch.randn(forget.shape[0], 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rhs = forget.T @ g / forget.shape[0]
    run_factor_methods(
        "factor-conv-4096", covariance, rhs, damping, mpo_ranks=(8, 16, 32),
        nystrom_ranks=(("equal-memory", 8), ("equal-memory", 16), ("equal-memory", 32), 256),
        extra={"matrix": f"activation covariance of simple-cnn(width=64).conv1 on digits, N={n}, test acc {accuracy:.3f}",
               "damping": damping, "rhs": "forget-gradient shaped, 16 columns"},
    )


def structured_activations(channels=512, side=7, profiles=6, seed=0):
    """Activations a[c, h, w] = alpha_p phi_p(c) * beta_q u_q(h) * gamma_s v_s(w) for every
    combination (p, q, s) of ``profiles`` smooth channel, row and column profiles (a full factorial
    design, n = profiles^3 samples): channel-major, 512 x 7 x 7 = 25088 wide. Their covariance is
    exactly A_c kron A_h kron A_w with smooth factors, the structure MPO compression presumes."""
    generator = torch.Generator().manual_seed(seed)
    c = torch.linspace(0, 1, channels)
    h = torch.linspace(0, 1, side)

    def profile_set(grid):
        phases = torch.rand(profiles, generator=generator) * math.pi
        amplitudes = 0.5 + torch.rand(profiles, generator=generator)
        return torch.stack([amplitudes[p] * torch.cos((p + 1) * math.pi * grid + phases[p]) for p in range(profiles)])

    phi, u, v = profile_set(c), profile_set(h), profile_set(h)
    features = torch.einsum("pc,qh,sw->pqschw", phi, u, v)
    return features.reshape(profiles**3, channels * side * side).contiguous()


def bench_wide(dim_channels=512):
    activations = structured_activations(channels=dim_channels)
    n, dim = activations.shape
    damping = 1e-2
    g = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    rhs = activations[:64].T @ g / 64  # float32, like the factor
    extra = {"matrix": f"covariance of {n} structured activations (512 ch x 7 x 7, exactly Kronecker), float32", "damping": damping}
    with PeakMemory() as memory:
        start = time.perf_counter()
        covariance = activations.T @ activations / n
        formed = time.perf_counter() - start
        dense = DenseFactorInverse(covariance, damping)
        build = time.perf_counter() - start
        reference = dense @ rhs
        total = time.perf_counter() - start
    emit(case="factor-wide-25088", method="dense", dim=dim, seconds=total, build_seconds=build, solve_seconds=total - build,
         form_seconds=formed, peak_bytes=memory.bytes, rel_error=0.0, factor_bytes=dim * dim * 4, **extra)
    del dense
    with PeakMemory() as memory:
        start = time.perf_counter()
        inverse = MPOFactorInverse(covariance, damping, rank=WIDE_MPO_RANK, prop2_fallback="dense", seed=0, als_rank=WIDE_ALS_RANK)
        build = time.perf_counter() - start
        del covariance  # the solve needs only the cores
        solution, info = als_solve(inverse.mpo, rhs.double(), inverse.als_rank, sweeps=2)
        total = time.perf_counter() - start
    prop2 = inverse.diagnostics["prop2"]
    emit(case="factor-wide-25088", method="mpo", dim=dim, rank=WIDE_MPO_RANK, als_rank=WIDE_ALS_RANK, seconds=total, build_seconds=build, solve_seconds=total - build,
         peak_bytes=memory.bytes, rel_error=rel_error(solution, reference), factor_bytes=inverse.mpo.nbytes,
         factor_rel_error=inverse.truncation_error / inverse.diagnostics["frobenius_norm"], modes=inverse.modes,
         mpo_ranks=inverse.mpo.ranks, prop2_holds=prop2["holds"], prop2_relative_spectral_error=prop2["relative_spectral_error"],
         prop2_one_over_kappa=prop2["one_over_kappa"], mpo_indefinite=prop2["mpo_indefinite"], fallback=inverse.diagnostics.get("fallback"),
         als_sweeps=info.sweeps, als_residual=info.best_residual, note="build needs the dense factor (TT-SVD); the solve does not", **extra)
    del inverse
    for rank in (64, 256):
        with PeakMemory() as memory:
            start = time.perf_counter()
            nystrom = NystromFactorInverse(covariance_matmat(activations), damping, rank=rank, seed=0, dim=dim, dtype=torch.float64)
            build = time.perf_counter() - start
            solution = nystrom @ rhs
            total = time.perf_counter() - start
        emit(case="factor-wide-25088", method="nystrom", dim=dim, rank=rank, seconds=total, build_seconds=build,
             solve_seconds=total - build, peak_bytes=memory.bytes, rel_error=rel_error(solution, reference),
             factor_bytes=nystrom.approximation.nbytes, from_activations=True, **extra)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-wide", action="store_true", help="skip the d = 25088 cases")
    parser.add_argument("--only", choices=["hvp", "cg", "kernel", "conv", "wide"], action="append")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print(json.dumps(machine()), flush=True)
    selected = set(args.only or ["hvp", "cg", "kernel", "conv", "wide"])
    if args.skip_wide:
        selected.discard("wide")
    split = digits() if selected & {"hvp", "cg", "conv"} else None
    if "hvp" in selected:
        bench_hvp_ratio(split)
    if "cg" in selected:
        bench_cg(split)
    if "kernel" in selected:
        bench_kernel()
    if "conv" in selected:
        bench_conv(split)
    if "wide" in selected:
        bench_wide()


if __name__ == "__main__":
    main()
