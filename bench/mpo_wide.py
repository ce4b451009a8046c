"""MPO against dense on the KFAC factor of a wide layer: one JSON object per line on stdout.

    python bench/mpo_wide.py                       # everything: ~45 min on 2 quiet cores, < 6.5 GB per process
    python bench/mpo_wide.py --only prepare        # train simple-cnn-wide, KFAC factors of fc1 (cached)
    python bench/mpo_wide.py --only main --ranks 8,16,32,64 --damping 0.01
    python bench/mpo_wide.py --only search --only at-prop2 --ranks 32

The layer is fc1 of ``simple-cnn-wide`` on 28x28 Fashion-MNIST: 32 channels x 28 x 28 = 25088 inputs
(the width of VGG-11's first FC layer on ImageNet-size inputs, which the TensorUnlearn poster's MPO
targets), plus the bias's trailing 1: its KFAC factor A is 25089 x 25089 (2.5 GB in float32); G is
128 x 128 and always dense. ``prepare`` trains the model briefly (one pass of SGD over
``--train-examples`` training images), computes the factors with
``fedunlearn.curvature.compute_kfac_factors`` on ``--kfac-examples`` training images, and the real
right-hand side of A's solve: the forget gradient of fc1 (``--forget-examples`` sandal images, the
class the fashion-mnist preset deletes), ``B = grad_{W_joint}^T`` (25089 x 128). Everything goes to
``--work`` (default .cache/mpo-wide in the repository, ~2.6 GB) and is reused when present, dense rows included
(delete ``dense-<lambda>.json`` there to measure one again).

Every configuration runs in its own subprocess, so ``maxrss_bytes`` (``resource.getrusage``'s
``ru_maxrss`` of that process) is its peak resident memory, everything included; ``baseline_rss_bytes``
is the process's RSS after loading the factor, so ``maxrss_bytes - baseline_rss_bytes`` is what the
method itself added. ``held_bytes``: what the built inverse keeps (dense: the Cholesky factor; MPO: the
cores and the bias border).

Cases (``case``):

- ``prepare``: the model, its test accuracy, KFAC seconds and peak memory, spectrum of A.
- ``dense``: ``make_factor_inverse`` with factor-solver = dense at a damping: build (Cholesky) and solve
  seconds; its solution is the reference of every MPO row at that damping (saved to ``--work``).
- ``mpo``: ``make_factor_inverse`` with factor-solver = mpo, kfac-rank = r, prop2-fallback = dense: the
  path a ``kfac-mpo`` run takes. ``used`` is what solves (``dense`` after a Proposition 2 failure);
  ``build_seconds`` includes TT-SVD, the Proposition 2 check and any dense fallback;
  ``rel_error`` is ``||X - X_dense||_F / ||X_dense||_F`` of what the main path returns. ``mpo_*`` columns
  are the MPO's own ALS solve, run even where Proposition 2 failed (what the fallback avoids).
  ``theorem1_truncation`` is the poster's eq. (1) MPO term ``eps_A ||G_hat||_F + (||A_hat||_F + eps_A) eps_G``
  of the MPO (eps_G = 0: G is dense), also relative to ``||A_hat||_F ||G_hat||_F``.
- ``prop2-search``: per rank, the damping at which Proposition 2 holds. The condition is
  ``||A_hat - A_tilde||_2 < lambda`` (``||.||/||A_hat|| < 1/kappa`` with ``kappa = ||A_hat||/lambda``); the
  TT truncation error barely depends on lambda (the identity has TT rank 1), so from lambda_0 the search
  tries ``lambda = 1.25 * eps(lambda_prev)`` until it holds, then ``0.8 * eps`` to bracket it from below.
- ``at-prop2``: ``dense`` and ``mpo`` rows at each rank's damping from the search (the MPO is then used).
- ``prop2-probe`` (``layout``): TT-SVD error and Prop. 2 numbers with modes that follow fc1's
  (channel, row, column) layout, [4, 4, 2, 4, 7, 4, 7], against the default [4, 4, 4, 4, 2, 7, 7].

``scaled_identity_rel_error`` of a dense row is the error of the curvature-free answer B / lambda.
docs/BENCHMARKS.md has the measured tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

# Before torch loads libgomp: idle OpenMP threads sleep instead of spinning. On a shared, loaded
# machine spinning made the MPO's many small products ~7x slower (3.5 s vs 27 s for one d = 2049
# factor at load average 8 on 2 cores); large BLAS calls are unaffected.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import machine, rel_error  # noqa: E402  (bench/common.py; the script's directory is on sys.path)

PAGE = os.sysconf("SC_PAGE_SIZE")
LAYER = "fc1"
FORGET_CLASS = 5  # sandal, the class simulations/fashion-mnist.toml deletes
DATA_DIR = "/usr/share/datasets/fashion-mnist"


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def emit(**record):
    print(json.dumps(record), flush=True)


# --------------------------------------------------------------------------- prepare
def prepare(work: Path, train_examples: int, kfac_examples: int, forget_examples: int, seed: int) -> dict:
    """Train simple-cnn-wide briefly, compute fc1's KFAC factors and forget gradient, save them."""
    from fedunlearn.curvature import compute_kfac_factors, loss_gradient
    from fedunlearn.data import load_dataset
    from fedunlearn.models import build_model

    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    split = load_dataset("fashion-mnist", DATA_DIR)
    x, y = split.train.tensors
    model = build_model("simple-cnn-wide", split.input_shape, split.num_classes)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=generator)
    train_idx, kfac_idx = order[:train_examples], order[train_examples : train_examples + kfac_examples]
    # One pass of local-style SGD (the FedAvg clients' optimiser: lr 0.01, momentum 0.9, batch 64).
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    start = time.perf_counter()
    model.train()
    for i in range(0, len(train_idx), 64):
        idx = train_idx[i : i + 64]
        optimizer.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        optimizer.step()
    train_seconds = time.perf_counter() - start
    model.eval()
    tx, ty = split.test.tensors
    with torch.no_grad():
        accuracy = float(sum((model(tx[i : i + 1000]).argmax(1) == ty[i : i + 1000]).sum() for i in range(0, len(tx), 1000)) / len(tx))
    torch.save(model.state_dict(), work / "model.pt")

    batches = [(x[kfac_idx[i : i + 128]], y[kfac_idx[i : i + 128]]) for i in range(0, len(kfac_idx), 128)]
    rss_before = current_rss()
    start = time.perf_counter()
    factors, layers, _ = compute_kfac_factors(model, batches)
    kfac_seconds = time.perf_counter() - start
    kfac_maxrss = maxrss()
    a, g = (t.contiguous() for t in factors[LAYER])
    shapes = {name: (tuple(fa.shape), tuple(fg.shape)) for name, (fa, fg) in factors.items()}
    del factors

    # The real right-hand side: fc1's forget gradient on sandal images the factors did not see.
    forget_pool = order[train_examples + kfac_examples :]
    forget_idx = forget_pool[y[forget_pool] == FORGET_CLASS][:forget_examples]
    names = [layers[LAYER]["weight"], layers[LAYER]["bias"]]
    weight_grad, bias_grad = loss_gradient(model, names, [(x[forget_idx], y[forget_idx])])
    joint = torch.cat([weight_grad, bias_grad[:, None]], dim=1)  # (128, 25089) = [W | b]
    torch.save(a, work / "A.pt")
    torch.save(g, work / "G.pt")
    torch.save(joint.T.contiguous(), work / "B.pt")  # A_hat X = B, B = grad_{W_joint}^T

    # Spectrum of A (float64 eigvalsh would need 5 GB more; Lanczos on products is enough).
    from fedunlearn.curvature.mpo import lanczos_extremes

    smallest, largest = lanczos_extremes(lambda v: a @ v, a.shape[0], a.dtype, steps=60, seed=0)
    rank = min(kfac_examples, a.shape[0])  # rank(A) <= N (the covariance of N inputs)
    record = {
        "case": "prepare", "model": "simple-cnn-wide", "dataset": "fashion-mnist", "layer": LAYER,
        "dim": a.shape[0], "factor_shapes": shapes, "train_examples": train_examples, "train_seconds": train_seconds,
        "test_accuracy": accuracy, "kfac_examples": kfac_examples, "kfac_seconds": kfac_seconds,
        "kfac_rss_growth_bytes": kfac_maxrss - rss_before, "kfac_maxrss_bytes": kfac_maxrss,
        "forget_examples": int(len(forget_idx)), "forget_class": FORGET_CLASS, "rhs_columns": joint.shape[0],
        "a_trace": float(torch.trace(a)), "a_largest_eigenvalue": largest, "a_rank_at_most": rank,
        "a_frobenius": float(torch.linalg.matrix_norm(a)), "g_frobenius": float(torch.linalg.matrix_norm(g)),
        "factor_bytes": a.numel() * a.element_size(), "seed": seed, "maxrss_bytes": maxrss(),
    }
    (work / "prepare.json").write_text(json.dumps(record))
    return record


# --------------------------------------------------------------------------- workers (one per subprocess)
def load_inputs(work: Path):
    """A memory-mapped (file-backed, read in once: its pages count in the RSS like an ordinary copy,
    without torch.load's transient second copy), G and B."""
    a = torch.load(work / "A.pt", mmap=True)
    float(a.sum())  # touch every page, so the baseline RSS holds the factor
    g = torch.load(work / "G.pt")
    b = torch.load(work / "B.pt")
    return a, g, b


def reference_path(work: Path, damping: float) -> Path:
    return work / f"dense-{damping:.6g}.pt"


def settings_for(solver: str, damping: float, rank: int = 16, fallback: str = "dense"):
    from fedunlearn.curvature import SolverSettings

    return SolverSettings.defaults().replace(factor_solver=solver, damping=damping, kfac_rank=rank, prop2_fallback=fallback)


def worker_dense(work: Path, damping: float) -> dict:
    from fedunlearn.curvature.factor_solvers import make_factor_inverse

    a, _, b = load_inputs(work)
    baseline = current_rss()
    start = time.perf_counter()
    inverse = make_factor_inverse(a, settings_for("dense", damping))
    build = time.perf_counter() - start
    start = time.perf_counter()
    x = inverse @ b
    solve = time.perf_counter() - start
    residual = float(torch.linalg.matrix_norm((a @ x + damping * x - b).double()) / torch.linalg.matrix_norm(b.double()))
    torch.save(x, reference_path(work, damping))
    record = {"case": "dense", "method": "dense", "dim": a.shape[0], "damping": damping, "build_seconds": build,
              "solve_seconds": solve, "seconds": build + solve, "held_bytes": inverse.diagnostics["bytes"],
              "relative_residual": residual, "baseline_rss_bytes": baseline, "maxrss_bytes": maxrss(), "rel_error": 0.0,
              # The curvature-free answer B / lambda against the dense solve: what damping alone gives.
              "scaled_identity_rel_error": rel_error(b / damping, x)}
    reference_path(work, damping).with_suffix(".json").write_text(json.dumps(record))
    return record


def dense_row(work: Path, damping: float) -> dict:
    """The dense row at this damping: measured once, then read back (its solution is the reference)."""
    cached = reference_path(work, damping).with_suffix(".json")
    if reference_path(work, damping).exists() and cached.exists():
        return {**json.loads(cached.read_text()), "cached": True}
    return run_worker("dense", work, damping=damping)


def worker_mpo(work: Path, damping: float, rank: int, mpo_solve: bool = True) -> dict:
    from fedunlearn.curvature.factor_solvers import make_factor_inverse

    a, g, b = load_inputs(work)
    baseline = current_rss()
    start = time.perf_counter()
    inverse = make_factor_inverse(a, settings_for("mpo", damping, rank))
    build = time.perf_counter() - start
    diagnostics = inverse.diagnostics
    # What KFACInverse keeps besides the factor: the MPO cores (and border), or the fallback's Cholesky.
    held = diagnostics["bytes"] + (inverse.fallback.diagnostics["bytes"] if inverse.fallback is not None else 0)
    start = time.perf_counter()
    x = inverse @ b
    solve = time.perf_counter() - start
    reference = torch.load(reference_path(work, damping)) if reference_path(work, damping).exists() else None
    g_fro = math.sqrt(float(torch.linalg.matrix_norm(g.double())) ** 2 + 2 * damping * float(torch.trace(g.double())) + damping**2 * g.shape[0])
    eps_a = diagnostics["mpo_truncation_error"]
    a_fro = diagnostics["frobenius_norm"]
    prop2 = diagnostics["prop2"]
    record = {
        "case": "mpo", "method": "mpo", "dim": a.shape[0], "rank": rank, "damping": damping, "used": inverse.used,
        "build_seconds": build, "solve_seconds": solve, "seconds": build + solve,
        "compress_seconds": diagnostics["compress_seconds"], "prop2_seconds": diagnostics["prop2_seconds"],
        "fallback_seconds": diagnostics.get("fallback_seconds"), "held_bytes": held, "mpo_bytes": diagnostics["bytes"],
        # Peak of the main path (build, any fallback, solve); maxrss_bytes is updated after the MPO's own solve.
        "baseline_rss_bytes": baseline, "maxrss_main_bytes": maxrss(), "maxrss_bytes": maxrss(),
        "rel_error": rel_error(x, reference) if reference is not None else None,
        "modes": diagnostics["modes"], "border": diagnostics["border"], "mpo_ranks": diagnostics["mpo_ranks"],
        "factor_rel_error": eps_a / a_fro, "truncation_error": eps_a,
        "theorem1_truncation": eps_a * g_fro, "theorem1_truncation_relative": eps_a / a_fro,
        "prop2_holds": prop2["holds"], "prop2_relative_spectral_error": prop2["relative_spectral_error"],
        "prop2_one_over_kappa": prop2["one_over_kappa"], "prop2_spectral_error": prop2["spectral_error"],
        "spectral_norm": prop2["spectral_norm"], "mpo_min_eigenvalue": prop2["mpo_min_eigenvalue"],
        "mpo_indefinite": prop2["mpo_indefinite"], "inverse_error_bound": prop2["inverse_error_bound"],
    }
    if inverse.used == "mpo":  # the main path's solve was the MPO's own
        record["mpo_solve_seconds"], record["mpo_rel_error"] = solve, record["rel_error"]
    elif mpo_solve:
        start = time.perf_counter()
        x_mpo = inverse.solve_mpo(b)
        record["mpo_solve_seconds"] = time.perf_counter() - start
        record["mpo_rel_error"] = rel_error(x_mpo, reference) if reference is not None else None
    if "als" in inverse.diagnostics:
        als = inverse.diagnostics["als"]
        record.update(als_rank=als["rank"], als_sweeps=als["sweeps"], als_residual=als["residual"],
                      als_max_local_size=als["max_local_size"])
        record["maxrss_bytes"] = maxrss()
    return record


def worker_prop2(work: Path, damping: float, rank: int, modes: list[int] | None = None) -> dict:
    """TT-SVD and the Proposition 2 check only (prop2-fallback = raise: no dense fallback is built)."""
    from fedunlearn.curvature.factor_solvers import MPOFactorInverse, Prop2Error

    a, _, _ = load_inputs(work)
    start = time.perf_counter()
    try:
        diagnostics = MPOFactorInverse(a, damping, rank, "raise", seed=0, modes=modes).diagnostics
    except Prop2Error as error:
        diagnostics = error.diagnostics
    prop2 = diagnostics["prop2"]
    return {"case": "prop2-probe", "rank": rank, "damping": damping, "modes": diagnostics["modes"],
            "factor_rel_error": diagnostics["mpo_truncation_error"] / diagnostics["frobenius_norm"], "holds": prop2["holds"],
            "spectral_error": prop2["spectral_error"], "relative_spectral_error": prop2["relative_spectral_error"],
            "one_over_kappa": prop2["one_over_kappa"], "spectral_norm": prop2["spectral_norm"],
            "mpo_min_eigenvalue": prop2["mpo_min_eigenvalue"], "truncation_error": diagnostics["mpo_truncation_error"],
            "seconds": time.perf_counter() - start, "maxrss_bytes": maxrss()}


WORKERS = {"prepare": prepare, "dense": worker_dense, "mpo": worker_mpo, "prop2": worker_prop2}


def run_worker(kind: str, work: Path, **kwargs) -> dict:
    """One configuration in a fresh process (its own ru_maxrss); returns its JSON record."""
    spec = json.dumps({"kind": kind, "work": str(work), **kwargs})
    done = subprocess.run([sys.executable, __file__, "--worker", spec], capture_output=True, text=True)
    if done.returncode != 0:
        return {"case": kind, "error": done.stderr.strip().splitlines()[-1:] if done.stderr else "failed", **kwargs}
    record = json.loads(done.stdout.strip().splitlines()[-1])
    record["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    return record


# --------------------------------------------------------------------------- the search for Prop. 2's damping
def prop2_search(work: Path, rank: int, damping: float, max_steps: int = 5) -> dict:
    probes = []
    lam = damping
    holding = None
    for _ in range(max_steps):
        probe = run_worker("prop2", work, damping=lam, rank=rank)
        probes.append(probe)
        if "error" in probe:
            break
        if probe["holds"]:
            holding = probe
            break
        lam = float(f"{1.25 * probe['spectral_error']:.3g}")
    failing = None
    if holding is not None:
        below = float(f"{0.8 * holding['spectral_error']:.3g}")
        if below > damping:
            failing = run_worker("prop2", work, damping=below, rank=rank)
            probes.append(failing)
        else:
            failing = next((p for p in probes if not p.get("holds", True)), None)
    return {"case": "prop2-search", "rank": rank, "start_damping": damping,
            "holds_at": holding["damping"] if holding else None,
            "fails_at": failing["damping"] if failing and not failing.get("holds") else None,
            "spectral_error_at_holds": holding["spectral_error"] if holding else None,
            "spectral_norm": probes[-1].get("spectral_norm"),
            "probes": [{k: p.get(k) for k in ("damping", "holds", "spectral_error", "relative_spectral_error", "one_over_kappa", "mpo_min_eigenvalue", "seconds", "maxrss_bytes")} for p in probes]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(__file__).resolve().parents[1] / ".cache" / "mpo-wide")
    parser.add_argument("--only", choices=["prepare", "main", "search", "at-prop2", "layout"], action="append",
                        help="prepare: model and factors; main: dense and MPO at --damping; search: Prop. 2's damping per rank; "
                        "at-prop2: dense and MPO at each rank's damping from search; layout: TT-SVD error with modes that follow "
                        "fc1's (channel, row, column) = (32, 28, 28) layout, [4, 4, 2 | 4, 7 | 4, 7], against the default split")
    parser.add_argument("--ranks", default="8,16,32,64", help="kfac-rank values (MPO bond dimensions)")
    parser.add_argument("--damping", type=float, default=0.01, help="the run-config default")
    parser.add_argument("--train-examples", type=int, default=12000)
    parser.add_argument("--kfac-examples", type=int, default=512)
    parser.add_argument("--forget-examples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-mpo-solve", action="store_true", help="skip the MPO's own ALS solve where Prop. 2 fails")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.worker:
        spec = json.loads(args.worker)
        kind, work = spec.pop("kind"), Path(spec.pop("work"))
        print(json.dumps(WORKERS[kind](work, **spec)), flush=True)
        return
    emit(**machine())
    ranks = [int(r) for r in args.ranks.split(",") if r]
    selected = set(args.only or ["prepare", "main", "search", "at-prop2", "layout"])
    work = args.work
    if "prepare" in selected or not (work / "prepare.json").exists():
        if (work / "prepare.json").exists():
            record = json.loads((work / "prepare.json").read_text())
            record["cached"] = True
        else:
            record = run_worker("prepare", work, train_examples=args.train_examples, kfac_examples=args.kfac_examples,
                                forget_examples=args.forget_examples, seed=args.seed)
        emit(**record)
    if "main" in selected:
        emit(**dense_row(work, args.damping))
        for rank in ranks:
            emit(**run_worker("mpo", work, damping=args.damping, rank=rank, mpo_solve=not args.no_mpo_solve))
    searches = {}
    if "search" in selected:
        for rank in ranks:
            result = prop2_search(work, rank, args.damping)
            searches[rank] = result
            (work / f"search-{rank}.json").write_text(json.dumps(result))
            emit(**result)
    if "layout" in selected:
        # The default split of 25088 = 2^9 7^2 is [4, 4, 4, 4, 2, 7, 7]: it cuts the row index h and
        # mixes row and column bits; this one keeps channel, row and column modes apart.
        for rank in ranks:
            emit(**run_worker("prop2", work, damping=args.damping, rank=rank, modes=[4, 4, 2, 4, 7, 4, 7]))
    if "at-prop2" in selected:
        for rank in ranks:
            path = work / f"search-{rank}.json"
            result = searches.get(rank) or (json.loads(path.read_text()) if path.exists() else None)
            if not result or result["holds_at"] is None:
                continue
            lam = result["holds_at"]
            emit(**dense_row(work, lam))
            emit(**run_worker("mpo", work, damping=lam, rank=rank))


if __name__ == "__main__":
    main()
