"""Unlearning against the exact optimum of a convex model (no Flower).

logreg with L2 on digits over non-IID clients: the full objective Σ_k p_k L_k is minimised to
optimality with L-BFGS (float64), client 0 is deleted, and the remaining objective is minimised the
same way as the reference. hf-kcu-global must land on it. hf-kcu and kfac-forget (the deleted client's
own curvature) and kfac (KFAC of the remaining clients' pooled data, as the poster builds it) only get closer; at this exact optimum their step must lower the KL to the reference and
the same step negated must raise it, so a flipped sign in the client's step (forget gradient, inverse,
influence weight) fails.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from fedunlearn import config as run_config
from fedunlearn.federation import build_federation
from fedunlearn.models.logreg import LogisticRegression
from fedunlearn.unlearning import ClientContext, create_method
from fedunlearn.unlearning.objective import batches_of
from fedunlearn.unlearning.remaining import InProcessRemainingClients

DELETED = 0
# Stronger than logreg's default so L-BFGS reaches a 1e-8 gradient in seconds, not minutes.
L2 = 1e-2


def _full_batch(federation, clients):
    rows = torch.cat([torch.as_tensor(federation.partitioning.rows_of(k)) for k in clients])
    x, y = federation.data.train.tensors
    return x[rows].double(), y[rows]


def _solve_to_optimum(model, inputs, targets):
    optimizer = torch.optim.LBFGS(
        model.parameters(), lr=1, max_iter=200, tolerance_grad=1e-11, tolerance_change=1e-14,
        history_size=50, line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(model(inputs), targets) + model.regularizer()
        loss.backward()
        return loss

    for _ in range(20):
        optimizer.step(closure)
        gradient_norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
        if gradient_norm < 1e-8:
            break
    assert gradient_norm < 1e-6, gradient_norm
    return model


def _kl_to(reference, model, inputs):
    with torch.no_grad():
        log_p = F.log_softmax(reference(inputs), dim=1)
        log_q = F.log_softmax(model(inputs), dim=1)
    return float((log_p.exp() * (log_p - log_q)).sum(dim=1).mean())


def _accuracy(model, inputs, targets):
    with torch.no_grad():
        return float((model(inputs).argmax(dim=1) == targets).double().mean())


def _apply(model, names, delta):
    updated = copy.deepcopy(model)
    params = dict(updated.named_parameters())
    with torch.no_grad():
        for name, change in zip(names, delta):
            params[name].add_(change)
    return updated


@pytest.fixture(scope="module")
def convex_setup():
    config = run_config.resolve({"model": "logreg", "num-clients": 5, "dirichlet-alpha": 0.3, "seed": 1})
    federation = build_federation(config)
    torch.manual_seed(0)
    clients = list(range(5))
    remaining_clients = [k for k in clients if k != DELETED]
    model = LogisticRegression(federation.data.input_shape, federation.data.num_classes, l2=L2).double()
    full = _solve_to_optimum(model, *_full_batch(federation, clients))
    reference = _solve_to_optimum(copy.deepcopy(full), *_full_batch(federation, remaining_clients))
    test_x, test_y = federation.data.test.tensors
    client_batches = {
        k: [(x.double(), y) for x, y in batches_of(federation.client_data(k), 256)] for k in clients
    }
    return federation, full, reference, test_x.double(), test_y, client_batches, remaining_clients


def test_hf_kcu_global_lands_on_the_retrained_optimum(convex_setup):
    federation, full, reference, test_x, test_y, client_batches, remaining_clients = convex_setup
    remaining = InProcessRemainingClients(full, {k: client_batches[k] for k in remaining_clients})
    config = run_config.resolve({"damping": 0.0, "curvature": "hessian", "cg-iters": 300, "cg-tol": 1e-10})
    update = create_method("hf-kcu-global", config).server_step(full, remaining)
    unlearned = _apply(full, update.param_names, update.delta)

    kl_original = _kl_to(reference, full, test_x)
    kl_unlearned = _kl_to(reference, unlearned, test_x)
    print(f"\nKL to retrained optimum: original {kl_original:.3e}, hf-kcu-global {kl_unlearned:.3e} "
          f"(ratio {kl_original / kl_unlearned:.0f}x), CG iterations {update.diagnostics['cg_iterations']}")
    assert kl_original > 1e-3  # deleting client 0 really moves the optimum
    assert kl_unlearned <= kl_original / 20
    assert abs(_accuracy(unlearned, test_x, test_y) - _accuracy(reference, test_x, test_y)) <= 0.005
    assert update.communication_rounds == update.diagnostics["cg_iterations"] + 1


# kfac-forget at λ = 0.01 overshoots here (KL 4.06e-3 -> 2.22e-2: λ on each factor of the deleted
# client's own, low-rank factors amplifies the directions its output gradients miss); at λ = 0.1 its
# step is a descent step like hf-kcu's.
@pytest.mark.parametrize(("method", "damping"), [("hf-kcu", 0.01), ("kfac-forget", 0.1)])
def test_the_local_step_points_toward_the_retrained_optimum(convex_setup, method, damping):
    """Measured: hf-kcu 4.06e-3 -> 2.54e-3 (negated: 1.32e-2); kfac-forget 4.06e-3 -> 2.32e-3 (negated: 8.9e-3)."""
    federation, full, reference, test_x, test_y, client_batches, _ = convex_setup
    sizes = federation.partitioning.sizes
    influence_weight = sizes[DELETED] / (sum(sizes) - sizes[DELETED])
    config = run_config.resolve({"damping": damping, "curvature": "hessian", "cg-iters": 300, "cg-tol": 1e-10})
    context = ClientContext(partition_id=DELETED, num_examples=sizes[DELETED], total_examples=sum(sizes),
                            influence_weight=influence_weight, seed=0, device=torch.device("cpu"))
    update = create_method(method, config).solve(full, client_batches[DELETED], context)
    kl_original = _kl_to(reference, full, test_x)
    kl_step = _kl_to(reference, _apply(full, update.param_names, update.delta), test_x)
    kl_negated = _kl_to(reference, _apply(full, update.param_names, [-d for d in update.delta]), test_x)
    print(f"\n{method} (λ = {damping}): KL to retrained optimum original {kl_original:.3e} -> step {kl_step:.3e}, "
          f"negated step {kl_negated:.3e}")
    assert update.forget_gradient_norm > 0
    assert kl_step < 0.8 * kl_original
    assert kl_negated > 1.5 * kl_original


def _kfac_steps(convex_setup, damping):
    federation, full, reference, test_x, _, client_batches, remaining_clients = convex_setup
    sizes = federation.partitioning.sizes
    influence_weight = sizes[DELETED] / (sum(sizes) - sizes[DELETED])
    config = run_config.resolve({"damping": damping})
    remaining = InProcessRemainingClients(full, {k: client_batches[k] for k in remaining_clients})
    forgotten = InProcessRemainingClients(full, {DELETED: client_batches[DELETED]})
    update = create_method("kfac", config).newton_step(full, remaining, forgotten, influence_weight)
    context = ClientContext(partition_id=DELETED, num_examples=sizes[DELETED], total_examples=sum(sizes),
                            influence_weight=influence_weight, seed=0, device=torch.device("cpu"))
    local = create_method("kfac-forget", config).solve(full, client_batches[DELETED], context)
    kl = {
        "original": _kl_to(reference, full, test_x),
        "kfac": _kl_to(reference, _apply(full, update.param_names, update.delta), test_x),
        "kfac negated": _kl_to(reference, _apply(full, update.param_names, [-d for d in update.delta]), test_x),
        "kfac-forget": _kl_to(reference, _apply(full, local.param_names, local.delta), test_x),
    }
    return kl, update


@pytest.mark.parametrize("damping", [0.01, 0.1])
def test_kfac_on_the_remaining_clients_factors_beats_the_forget_data_factors(convex_setup, damping):
    """Measured (KL to the retrained optimum; original 4.06e-3):
    λ = 0.01: kfac 3.00e-3 (negated 2.70e-2), kfac-forget 2.22e-2 (an overshoot);
    λ = 0.1:  kfac 1.55e-3 (negated 8.07e-3), kfac-forget 2.32e-3.
    (Below λ = 0.01 both overshoot: at 1e-3 kfac 8.7e-3, kfac-forget 5.0e-2; the Kronecker
    approximation of logreg's curvature, not the solve, limits it there.)"""
    kl, update = _kfac_steps(convex_setup, damping)
    print(f"\nλ = {damping}: KL to retrained optimum " + ", ".join(f"{k} {v:.3e}" for k, v in kl.items()))
    assert kl["kfac"] < 0.8 * kl["original"]
    assert kl["kfac negated"] > 1.5 * kl["original"]
    assert kl["kfac"] < 0.7 * kl["kfac-forget"]
    assert update.diagnostics["curvature_data"].startswith("remaining clients")
    assert update.communication_rounds == 1
