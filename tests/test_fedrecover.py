"""FedRecover (Cao et al., S&P 2023): the L-BFGS product against dense references, the estimated trajectory
against the exact recovery where estimation is exact, abnormality fixing, the exact-round schedule, and, through
the real ClientApp on the in-process grid, "every round exact" against the retrained oracle. References are
computed here by hand (dense BFGS recursion, FedAvg written out), not with the module's own helpers."""

from __future__ import annotations

import random

import pytest
import torch

from clients.client_app import build_client_app
from fake_grid import FakeGrid, grid_port
from fedunlearn import config as run_config
from fedunlearn.environment import quiet_logging
from fedunlearn.errors import ConfigError
from fedunlearn.training import derive_seed, train_local
from fedunlearn.unlearning import Deletion, create_method
from fedunlearn.unlearning.api import Every
from fedunlearn.unlearning.history import StoredRound
from fedunlearn.unlearning.methods.fedrecover import (
    CurvaturePairs,
    Schedule,
    abnormality_threshold,
    lbfgs_hvp,
    recover,
    update_scale,
)
from strategies.server_app import FederatedJob

quiet_logging()
pytestmark = pytest.mark.usefixtures("one_thread")


# --- the compact L-BFGS product ------------------------------------------------------------------------


def _bfgs_by_recursion(pairs, dim):
    """B_0 = σI, σ = yᵀs / sᵀs of the newest pair; then B ← B − B s sᵀ B / sᵀBs + y yᵀ / yᵀs, oldest pair first."""
    s_last, y_last = pairs[-1]
    B = (y_last @ s_last) / (s_last @ s_last) * torch.eye(dim, dtype=torch.float64)
    for s, y in pairs:
        Bs = B @ s
        B = B - torch.outer(Bs, Bs) / (s @ Bs) + torch.outer(y, y) / (y @ s)
    return B


def test_the_compact_lbfgs_product_is_the_bfgs_matrix_of_the_explicit_recursion():
    generator = torch.Generator().manual_seed(0)
    dim, m = 7, 4
    A = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    A = A @ A.T + 0.5 * torch.eye(dim, dtype=torch.float64)
    pairs = []
    for _ in range(m):  # not conjugate, not exact: y = A s + noise, kept only with positive curvature
        s = torch.randn(dim, generator=generator, dtype=torch.float64)
        y = A @ s + 0.3 * torch.randn(dim, generator=generator, dtype=torch.float64)
        assert s @ y > 0
        pairs.append((s, y))
    B = _bfgs_by_recursion(pairs, dim)
    S = torch.stack([s for s, _ in pairs], dim=1)
    Y = torch.stack([y for _, y in pairs], dim=1)
    for _ in range(3):
        v = torch.randn(dim, generator=generator, dtype=torch.float64)
        torch.testing.assert_close(lbfgs_hvp(S, Y, v), B @ v, rtol=1e-10, atol=1e-10)
    # The secant condition of the newest pair; and the buffer class keeps the last m in order.
    torch.testing.assert_close(lbfgs_hvp(S, Y, pairs[-1][0]), pairs[-1][1], rtol=1e-10, atol=1e-10)
    buffer = CurvaturePairs(size=3)
    for index, (s, y) in enumerate(pairs):
        assert buffer.add(index, s, y)
    assert buffer.rounds() == [1, 2, 3]
    v = torch.randn(dim, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(buffer.hvp(v), _bfgs_by_recursion(pairs[1:], dim) @ v, rtol=1e-10, atol=1e-10)


def test_on_a_quadratic_with_exact_conjugate_pairs_lbfgs_reproduces_the_hessian():
    generator = torch.Generator().manual_seed(1)
    dim = 5
    H = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    H = H @ H.T + torch.eye(dim, dtype=torch.float64)
    # H-conjugate steps (Gram–Schmidt in the H inner product) and exact pairs y = H s.
    steps = []
    for _ in range(dim):
        s = torch.randn(dim, generator=generator, dtype=torch.float64)
        for p in steps:
            s = s - (p @ H @ s) / (p @ H @ p) * p
        steps.append(s)
    S = torch.stack(steps, dim=1)
    Y = H @ S
    v = torch.randn(dim, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(lbfgs_hvp(S, Y, v), H @ v, rtol=1e-9, atol=1e-9)
    # With fewer pairs it is exact on their span (hereditary secant conditions), not beyond.
    for j in range(3):
        torch.testing.assert_close(lbfgs_hvp(S[:, :3], Y[:, :3], S[:, j]), Y[:, j], rtol=1e-9, atol=1e-9)
    assert not torch.allclose(lbfgs_hvp(S[:, :3], Y[:, :3], v), H @ v, rtol=1e-3)


def test_a_pair_without_positive_curvature_does_not_enter_the_buffer():
    buffer = CurvaturePairs(size=2)
    zero = torch.zeros(3, dtype=torch.float64)
    assert not buffer.add(1, zero, zero)  # round 1: ŵ_1 = w_1
    assert not buffer.add(2, torch.tensor([1.0, 0, 0], dtype=torch.float64), torch.tensor([-1.0, 0, 0], dtype=torch.float64))
    assert len(buffer) == 0 and buffer.rejected == [1, 2]


# --- the schedule and the threshold ---------------------------------------------------------------------


def test_the_schedule_asks_in_warm_up_periodic_and_final_rounds():
    schedule = Schedule(rounds=20, warmup=3, period=5, final=2)
    reasons = {t: schedule.reason(t) for t in range(1, 21) if schedule.reason(t)}
    assert reasons == {1: "warm-up", 2: "warm-up", 3: "warm-up", 8: "periodic", 13: "periodic", 18: "periodic",
                       19: "final", 20: "final"}
    assert Schedule(rounds=6, warmup=6, period=1, final=0).exact_rounds() == [1, 2, 3, 4, 5, 6]
    assert Schedule(rounds=10, warmup=2, period=100, final=0).exact_rounds() == [1, 2]


def test_the_abnormality_threshold_is_the_largest_per_round_quantile_of_the_remaining_updates():
    def round_of(updates):
        return StoredRound({"w": torch.zeros(4)}, {k: {"w": torch.tensor(u)} for k, u in updates.items()})

    stored = {
        1: round_of({0: [1.0, -8.0, 2.0, 0.0], 1: [3.0, 0.5, -4.0, 1.0], 2: [100.0, 0, 0, 0]}),  # client 2 is deleted
        2: round_of({0: [0.5, 0.5, -0.5, 0.5], 1: [6.0, 0.0, 0.0, 0.0]}),
    }
    lrs = {1: 1.0, 2: 0.5}  # g = −U / η_t: round 2's magnitudes double
    # α = 0: the largest |g| of any round: max(8, 12).
    assert abnormality_threshold(stored, [0, 1], lrs.get, ["w"], 0.0) == 12.0
    # α = 0.25 of 8 coordinates: 2 may exceed. Round 1 |g|: 8,4,3,2,1,1,0.5,0 → 3; round 2: 12,1,1,1,1,0,0,0 → 1.
    assert abnormality_threshold(stored, [0, 1], lrs.get, ["w"], 0.25) == 3.0
    # The deleted client's coordinates do not count; with it round 1's largest would be 100.
    assert abnormality_threshold(stored, [0, 1, 2], lrs.get, ["w"], 0.0) == 100.0


# --- recovery where estimation is exact: local training affine in w, isotropic curvature --------------------


SHAPES = {"w": (3, 2), "b": (2,)}


class _QuadraticClients:
    """Client k: one full-batch GD step on a_k/2 ‖w − c_k‖² at round t's lr, so its update
    U = −η_t a_k (w − c_k) is affine in w and g = −U/η_t = a_k (w − c_k) has Hessian a_k I, which L-BFGS
    recovers exactly from any pair (σ = a_k, the correction terms vanish)."""

    def __init__(self, num_clients, seed, lr_of):
        generator = torch.Generator().manual_seed(seed)
        self.a = {k: 0.5 + 2.5 * float(torch.rand(1, generator=generator)) for k in range(num_clients)}
        self.c = {k: {n: 3 * torch.randn(shape, generator=generator, dtype=torch.float64) for n, shape in SHAPES.items()}
                  for k in range(num_clients)}
        self.lr_of = lr_of
        self.calls = []

    def local(self, state, k, t):
        return {n: state[n] - self.lr_of(t) * self.a[k] * (state[n] - self.c[k][n]) for n in state}

    def train(self, state, partitions, replayed_round):
        self.calls.append((replayed_round, list(partitions)))
        return {k: self.local(state, k, replayed_round) for k in partitions}


def _fedavg(models, sizes, participants):
    total = sum(sizes[k] for k in participants)
    return {n: sum(models[k][n] * (sizes[k] / total) for k in participants) for n in SHAPES}


def _history(clients, sizes, rounds, sample):
    """Training by hand: FedAvg of every sampled client (the deleted one included), keeping every round."""
    state = {n: torch.zeros(shape, dtype=torch.float64) for n, shape in SHAPES.items()}
    stored = {}
    for t in range(1, rounds + 1):
        models = {k: clients.local(state, k, t) for k in sample[t]}
        stored[t] = StoredRound({n: v.clone() for n, v in state.items()}, {k: {n: models[k][n] - state[n] for n in state} for k in sample[t]})
        state = _fedavg(models, sizes, sample[t])
    return stored, state


@pytest.mark.parametrize("fraction", [1.0, 0.6])
def test_with_zero_estimation_error_the_estimated_trajectory_is_the_exact_recovery(fraction):
    num_clients, rounds, deleted = 6, 14, 2
    lr_of = lambda t: 0.3 * 0.9 ** (t - 1)  # decaying: pairs of earlier rounds are only comparable as g = −U/η_t  # noqa: E731
    sizes = {k: 10 + 7 * k for k in range(num_clients)}
    clients = _QuadraticClients(num_clients, seed=3, lr_of=lr_of)
    sampler = random.Random(5)
    sample = {t: sorted(sampler.sample(range(num_clients), round(fraction * num_clients))) for t in range(1, rounds + 1)}
    stored, original = _history(clients, sizes, rounds, sample)
    remaining = [k for k in range(num_clients) if k != deleted]

    # The exact recovery, by hand: FedAvg of each round's sampled remaining clients from the initial model.
    state = {n: v.clone() for n, v in stored[1].global_state.items()}
    for t in range(1, rounds + 1):
        participants = [k for k in sample[t] if k != deleted]
        if participants:
            state = _fedavg({k: clients.local(state, k, t) for k in participants}, sizes, participants)
    assert all((state[n] - original[n]).abs().max() > 1e-2 for n in SHAPES)  # the deleted client mattered

    schedule = Schedule(rounds=rounds, warmup=3, period=4, final=2)  # exact: 1, 2, 3, 7, 11, 13, 14
    estimated, details = recover(stored, remaining, sizes, clients, schedule, buffer_size=2, lr_of=lr_of, tolerance=None)
    for n in SHAPES:
        torch.testing.assert_close(estimated[n], state[n], rtol=1e-9, atol=1e-9)
    # It really estimated: scheduled rounds asked every sampled remaining client, the others only clients without pairs.
    scheduled = {1: "warm-up", 2: "warm-up", 3: "warm-up", 7: "periodic", 11: "periodic", 13: "final", 14: "final"}
    for t, partitions in clients.calls:
        expected = [k for k in sample[t] if k != deleted] if t in scheduled else details["no_pairs"][str(t)]
        assert partitions == expected and deleted not in partitions
    assert details["estimated_updates"] > 0 and details["abnormal"] == {}
    assert details["client_trainings"] + details["estimated_updates"] == details["retrain_client_trainings"]
    if fraction == 1.0:
        assert [t for t, _ in clients.calls] == sorted(scheduled) and details["no_pairs"] == {}
        assert details["estimated_rounds"] == [4, 5, 6, 8, 9, 10, 12]
        assert details["exact_rounds"] == {str(t): reason for t, reason in scheduled.items()}
    else:
        assert details["no_pairs"]  # a client first sampled after warm-up is asked, not guessed
    assert all(error < 1e-9 for error in details["estimation_error"].values())
    # Without the curvature term (H̃ = 0: the stored updates as they are) the same rounds are far off.
    assert details["stored_update_error"].keys() == details["estimation_error"].keys()
    assert all(error > 1e-3 for error in details["stored_update_error"].values())


def test_with_a_decaying_lr_only_the_round_lr_scale_keeps_the_pairs_of_different_rounds_comparable():
    num_clients, rounds = 5, 10
    lr_of = lambda t: 0.3 * 0.8 ** (t - 1)  # noqa: E731
    sizes = {k: 10 + k for k in range(num_clients)}
    clients = _QuadraticClients(num_clients, seed=11, lr_of=lr_of)
    stored, _ = _history(clients, sizes, rounds, {t: list(range(num_clients)) for t in range(1, rounds + 1)})
    schedule, remaining = Schedule(rounds=rounds, warmup=3, period=4, final=1), [0, 2, 3, 4]
    exact, _ = recover(stored, remaining, sizes, clients, Schedule(rounds, rounds, 1, 0), 2, lr_of, None)
    scaled, _ = recover(stored, remaining, sizes, clients, schedule, 2, lr_of, None)
    base, _ = recover(stored, remaining, sizes, clients, schedule, 2, lambda t: 0.3, None)
    torch.testing.assert_close(scaled["w"], exact["w"], rtol=1e-9, atol=1e-9)
    assert (base["w"] - exact["w"]).abs().max() > 1e-3
    config = run_config.resolve({"lr": 0.3, "lr-decay": 0.8})
    assert update_scale(config)(3) == pytest.approx(0.3 * 0.64)
    assert update_scale({**config, "fedrecover-update-scale": "lr"})(3) == 0.3
    with pytest.raises(ConfigError, match="round-lr, lr"):
        run_config.resolve({"fedrecover-update-scale": "per-round"})


def test_an_abnormal_estimate_is_replaced_by_the_clients_exact_update():
    """A corrupted stored update of client 1 in round 5 makes its estimate abnormal; fixing asks the client,
    so the recovery is still exact; without fixing the corruption enters the model."""
    num_clients, rounds = 4, 8
    lr_of = lambda t: 0.3  # noqa: E731
    sizes = {k: 10 for k in range(num_clients)}
    clients = _QuadraticClients(num_clients, seed=7, lr_of=lr_of)
    sample = {t: list(range(num_clients)) for t in range(1, rounds + 1)}
    stored, _ = _history(clients, sizes, rounds, sample)
    stored[5].client_updates[1]["w"][0, 0] += 40.0  # one coordinate of what the server stored
    remaining = [0, 1, 2]
    schedule = Schedule(rounds=rounds, warmup=3, period=100, final=3)  # rounds 4 and 5 estimated
    exact, _ = recover(stored, remaining, sizes, clients, Schedule(rounds, rounds, 1, 0), 2, lr_of, None)
    # α: one coordinate of each round's 3 × 8 may exceed τ_t, so the spike itself does not set τ.
    fixed, details = recover(stored, remaining, sizes, clients, schedule, 2, lr_of, tolerance=1 / 24)
    assert details["abnormal"] == {"5": [1]} and details["exact_clients"] == {"5": [1]}
    assert details["exact_rounds"]["5"] == "abnormal" and 4 in details["estimated_rounds"]
    assert 40.0 / 0.3 > details["abnormality_threshold"] > 0
    for n in SHAPES:
        torch.testing.assert_close(fixed[n], exact[n], rtol=1e-9, atol=1e-9)
    unfixed, details = recover(stored, remaining, sizes, clients, schedule, 2, lr_of, tolerance=None)
    assert details["abnormal"] == {} and "5" not in details["exact_rounds"]
    assert (unfixed["w"] - exact["w"]).abs().max() > 1.0


# --- through the ClientApp ---------------------------------------------------------------------------------


def _config(tmp_path, **overrides):
    base = {"model": "logreg", "num-clients": 4, "num-rounds": 5, "local-epochs": 1, "mia-shadows": 0,
            "retrain-cache": False, "out-dir": str(tmp_path), "unlearn-methods": "fedrecover", "lr-decay": 0.8}
    return run_config.resolve(base, overrides)


def _trained(config, method, rounds, seed=0):
    grid, port, federation = grid_port(config)
    trained = port.train(list(port.clients), port.initial_state, rounds, seed=seed, hooks=port.history_hooks([method.requirements])).state
    return grid, port, federation, trained


@pytest.mark.parametrize("how", ["warm-up covers every round", "every estimate abnormal (α = 1: τ = 0)"])
def test_with_every_round_exact_fedrecover_is_the_retrained_oracle(tmp_path, how):
    rounds = 5
    keys = {"fedrecover-warmup": rounds} if how.startswith("warm-up") else {
        "fedrecover-warmup": 2, "fedrecover-correction-period": 10, "fedrecover-final-tuning": 0, "fedrecover-tolerance": 1.0}
    config = _config(tmp_path, **keys)
    method = create_method("fedrecover", config)
    grid, port, federation, trained = _trained(config, method, rounds)
    before = len(grid.sent)
    outcome = method.unlearn(port, Deletion(forget_clients=(1,), trained_state=trained, trained_rounds=rounds))
    sent = grid.sent[before:]
    assert sent == [("train", k) for _ in range(rounds) for k in (0, 2, 3)]
    assert outcome.communication_rounds == rounds and outcome.details["estimated_updates"] == 0
    if how.startswith("every"):
        assert outcome.details["exact_rounds"] == {"1": "warm-up", "2": "warm-up", "3": "abnormal", "4": "abnormal", "5": "abnormal"}
    # The oracle: FedAvg over the remaining clients from the initial model, rounds numbered 1.. (lr-decay, seeds).
    retrained = port.train([0, 2, 3], port.initial_state, rounds, seed=derive_seed(config["seed"], "sampling")).state
    for name, value in retrained.items():
        torch.testing.assert_close(outcome.state[name], value, rtol=1e-5, atol=1e-6)
    assert (trained["linear.weight"] - retrained["linear.weight"]).abs().max() > 1e-3


def test_exact_rounds_go_only_to_remaining_clients_at_the_scheduled_rounds(tmp_path):
    rounds = 8
    config = _config(tmp_path, **{"num-rounds": rounds, "fedrecover-warmup": 2, "fedrecover-correction-period": 3,
                                   "fedrecover-final-tuning": 1, "fedrecover-buffer-size": 1, "fedrecover-abnormality-fixing": False})
    method = create_method("fedrecover", config)
    grid, port, federation, trained = _trained(config, method, rounds)
    before = len(grid.sent)
    with port.phase("unlearning: fedrecover"):
        outcome = method.unlearn(port, Deletion(forget_clients=(2,), trained_state=trained, trained_rounds=rounds))
    # Warm-up 1, 2; periodic 2 + 3 = 5; 8 would be periodic but is the final round.
    assert grid.sent[before:] == [("train", k) for _ in (1, 2, 5, 8) for k in (0, 1, 3)]
    details = outcome.details
    assert details["exact_rounds"] == {"1": "warm-up", "2": "warm-up", "5": "periodic", "8": "final"}
    assert details["estimated_rounds"] == [3, 4, 6, 7] and details["estimated_updates"] == 12
    assert outcome.communication_rounds == 4 and details["client_trainings"] == 12 and details["retrain_client_trainings"] == 24
    assert details["buffer_rounds"] == {"0": [8], "1": [8], "3": [8]}  # s = 1: the newest exact round
    assert details["rejected_pairs"] == {"0": [1], "1": [1], "3": [1]}  # round 1: ŵ_1 = w_1
    assert details["abnormality_threshold"] is None
    model_bytes = sum(t.numel() * t.element_size() for t in trained.values())
    assert details["storage_bytes"] == rounds * 4 * model_bytes and outcome.headline["client_trainings"] == 12
    # The estimated recovery lands nearer the oracle than the trained model does.
    retrained = port.train([0, 1, 3], port.initial_state, rounds, seed=0).state
    gap = lambda state: sum(float((state[n] - retrained[n]).norm()) for n in retrained)  # noqa: E731
    assert gap(outcome.state) < 0.5 * gap(trained)


def test_with_fraction_train_below_one_each_round_replays_its_own_sampled_remaining_clients(tmp_path):
    rounds, deleted = 4, 1
    config = _config(tmp_path, **{"num-clients": 5, "num-rounds": rounds, "fraction-train": 0.6, "fedrecover-warmup": rounds})
    method = create_method("fedrecover", config)
    grid, port, federation, trained = _trained(config, method, rounds, seed=3)
    stored = port.history(Every())
    sampled = {t: sorted(entry.client_updates) for t, entry in stored.items()}
    assert all(len(s) == 3 for s in sampled.values()) and any(deleted in s for s in sampled.values())
    before = len(grid.sent)
    outcome = method.unlearn(port, Deletion(forget_clients=(deleted,), trained_state=trained, trained_rounds=rounds))
    expected = {t: [k for k in sampled[t] if k != deleted] for t in sampled}
    assert grid.sent[before:] == [("train", k) for t in sorted(expected) for k in expected[t]]
    # FedAvg written out: round t's sampled remaining clients, each with round t's lr and shuffling seed.
    state = {n: v.clone() for n, v in port.initial_state.items()}
    for t in range(1, rounds + 1):
        models, sizes = [], []
        for k in expected[t]:
            model = federation.new_model()
            model.load_state_dict(state)
            data = federation.client_data(k)
            train_local(model, data, federation.local_training_for(t), torch.device("cpu"), seed=derive_seed(config["seed"], "train", t, k))
            models.append(model.state_dict())
            sizes.append(len(data))
        state = {n: sum(m[n] * (size / sum(sizes)) for m, size in zip(models, sizes)) for n in state}
    for name, value in state.items():
        torch.testing.assert_close(outcome.state[name], value, rtol=1e-5, atol=1e-6)


def test_in_a_job_fedrecover_reports_its_cost_and_every_round_exact_is_the_jobs_own_retrain(tmp_path):
    config = _config(tmp_path, **{"num-rounds": 4, "forget-clients": "1", "noise-floor": False,
                                   "unlearn-methods": "fedrecover[fedrecover-warmup=4],fedrecover[fedrecover-warmup=2;fedrecover-final-tuning=1]"})
    grid = FakeGrid(build_client_app(bound_config=config), 4)
    record = FederatedJob(grid, config, None, None).run()
    exact = record.methods["fedrecover[fedrecover-warmup=4]"]
    assert exact["kl_to_retrain"] < 1e-9 and exact["test_accuracy"] == record.methods["retrain"]["test_accuracy"]
    assert exact["communication_rounds"] == 4 and exact["client_trainings"] == 12
    cheap = record.methods["fedrecover[fedrecover-warmup=2;fedrecover-final-tuning=1]"]
    assert cheap["communication_rounds"] == 3 and cheap["details"]["estimated_rounds"] == [3]
    assert cheap["client_trainings"] == 9 and cheap["details"]["retrain_client_trainings"] == 12
    assert cheap["storage_bytes"] == exact["storage_bytes"] > 0
    phases = [entry for entry in record.communication["log"] if entry["phase"].startswith("unlearning: fedrecover")]
    assert phases and all(entry["partition"] != 1 for entry in phases)


# --- configuration -------------------------------------------------------------------------------------------


def test_the_keys_have_defaults_and_refuse_bad_values():
    config = run_config.resolve({})
    assert (config["fedrecover-warmup"], config["fedrecover-correction-period"], config["fedrecover-final-tuning"],
            config["fedrecover-buffer-size"]) == (3, 5, 2, 2)
    assert config["fedrecover-abnormality-fixing"] is True and 0 <= config["fedrecover-tolerance"] <= 1
    for key, value in [("fedrecover-warmup", 0), ("fedrecover-correction-period", 0), ("fedrecover-final-tuning", -1),
                       ("fedrecover-buffer-size", 0), ("fedrecover-tolerance", 1.5)]:
        with pytest.raises(ConfigError):
            run_config.resolve({key: value})
