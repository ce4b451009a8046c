"""FedRecover (Cao, Jia, Zhang & Gong, IEEE S&P 2023): re-run training without the deleted clients from the
initial model, estimating most of the remaining clients' updates from the stored history instead of asking.

During training the server keeps, every round t, the global model w_t it sent and each sampled client's update
U_k^t = θ_k^t − w_t (``Requirements(round_history=Every())``). Our clients send model *deltas* after several
local epochs, not gradients; we take the client's "model update" (the paper's g, a gradient the server steps
against with the learning rate) to be

    g_k^t = −U_k^t / η_t,        η_t = lr · lr-decay^(t−1)   (round t's local learning rate),

so that a round is w_{t+1} = w_t − η_t Σ_k p_k g_k^t = w_t + Σ_k p_k U_k^t, p_k = n_k / Σ_{j∈R_t} n_j over R_t,
the clients of round t that remain (sampled in t, not deleted). Dividing by η_t keeps the curvature pairs of
different rounds in the same units when the lr decays (with lr-decay = 1 it is a constant factor, which the
L-BFGS estimate is invariant to). ``fedrecover-update-scale = "lr"`` divides by the base lr instead, so pairs
of earlier (larger-lr) rounds over-correct later ones; kept because it measured closer to retrain on the
decaying-lr preset (docs/methods.md).

Recovery replays rounds t = 1..T from ŵ_1 = w_1 (the initial model). In round t client k's update at the
recovered model is either *exact* (a ``train`` message numbered t: its ordinary local training with round t's lr
and shuffling seed, ĝ = −(θ̂_k − ŵ_t)/η_t) or *estimated* by the Cauchy mean-value form with an L-BFGS
Hessian-vector product,

    ĝ_k^t = g_k^t + H̃_k^t (ŵ_t − w_t),   H̃_k^t = L-BFGS(ΔW_k, ΔG_k),

and the global step is the FedAvg of the round's (exact or estimated) updates. Client k's buffer holds the last
``fedrecover-buffer-size`` (s) pairs (Δw_r, Δg_k^r) = (ŵ_r − w_r, ĝ_k^r − g_k^r) from rounds r where k was exact;
a pair enters only if it has positive curvature (Δwᵀ Δg > 10⁻¹⁰ ‖Δw‖ ‖Δg‖; round 1's pair is always zero, since
ŵ_1 = w_1). The Hessian-vector product is the compact form of Byrd, Nocedal & Schnabel (1994, Thm 2.3) with
B_0 = σI, σ = y_mᵀ s_m / s_mᵀ s_m (the newest pair), as in FLDetector's ``lbfgs`` from the same group:

    B v = σ v − [σS  Y] [[σ SᵀS, L], [Lᵀ, −D]]⁻¹ [σ Sᵀ v; Yᵀ v],   SᵀY = L + D + (strictly upper),

which equals the BFGS recursion B_{j+1} = B_j − B_j s sᵀ B_j / sᵀB_j s + y yᵀ / yᵀs over the pairs in order.

Which updates are exact (a round's exact clients get one message together):

- *warm-up*: rounds 1..T_w (``fedrecover-warmup``), every remaining participant;
- *periodic correction*: rounds T_w + T_c, T_w + 2T_c, … (``fedrecover-correction-period``), every participant;
- *final tuning*: the last T_f rounds (``fedrecover-final-tuning``), every participant;
- *abnormality fixing*: a client whose estimate has a coordinate larger in magnitude than τ. τ = max_t τ_t,
  τ_t the smallest value that at most a fraction α (``fedrecover-tolerance``) of the coordinates of round t's
  stored updates g_k^t of the remaining clients exceed in magnitude (α = 0: the largest coordinate);
- *no pairs*: a client whose buffer is still empty (with ``fraction-train`` < 1, one not yet sampled in an
  exact round after round 1) cannot be estimated and is asked;
- an estimate that is not finite is asked too (listed as abnormal).

Each exact update refreshes that client's buffer. With every round exact (T_w ≥ T) recovery is FedAvg over the
remaining clients with training's round numbers and seeds, i.e. the retrained oracle (``fraction-train`` = 1).
With ``fraction-train`` < 1 each round replays the clients training sampled in it, minus the deleted ones (the
history has nothing else); a round with no remaining participant is skipped.

Where this differs from the paper (docs/methods.md): the update is the client's model delta over several local
epochs divided by the round's lr, not a gradient; the paper's text updates the shared ΔW buffer only in rounds
where *all* clients were exact but each ΔG_k whenever k was, which misaligns the pairs after an abnormality fix;
we keep, per client, the pairs of its own exact rounds (Δw and Δg always of the same round); pairs without
positive curvature are skipped (not specified there); "larger than τ" is read as larger in magnitude; the
defaults are scaled to runs of 20–50 rounds.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from fedunlearn.config import ConfigKey, closed_unit_interval, non_negative_int, positive_int
from fedunlearn.errors import UnlearningFailed
from fedunlearn.training import round_lr
from fedunlearn.unlearning.api import TRAIN, Deletion, Every, FederationPort, Method, Outcome, Requirements, State
from fedunlearn.unlearning.history import StoredRound, storage_bytes
from fedunlearn.unlearning.registry import register

# A pair (s, y) enters a client's buffer only if sᵀy > CURVATURE_COSINE · ‖s‖ ‖y‖ (BFGS needs sᵀy > 0).
CURVATURE_COSINE = 1e-10

WARMUP, PERIODIC, FINAL, ABNORMAL, NO_PAIRS = "warm-up", "periodic", "final", "abnormal", "no-pairs"

# What a stored or fresh update U is divided by to give the paper's g: round t's lr, or the base lr.
UPDATE_SCALES = ("round-lr", "lr")


def update_scale(config: Mapping[str, Any]) -> Callable[[int], float]:
    """η_t with g = −U/η_t: ``round-lr`` (lr · lr-decay^(t−1)) or ``lr`` (the base lr every round)."""
    lr, decay = float(config["lr"]), float(config["lr-decay"])
    if config["fedrecover-update-scale"] == "round-lr":
        return lambda t: round_lr(lr, decay, t)
    return lambda t: lr


@dataclass(frozen=True)
class Schedule:
    """The rounds in which every remaining participant is asked for its exact update."""

    rounds: int  # T, the last round replayed
    warmup: int  # T_w
    period: int  # T_c
    final: int  # T_f

    def reason(self, server_round: int) -> str | None:
        if server_round <= self.warmup:
            return WARMUP
        if server_round > self.rounds - self.final:
            return FINAL
        if (server_round - self.warmup) % self.period == 0:
            return PERIODIC
        return None

    def exact_rounds(self) -> list[int]:
        return [t for t in range(1, self.rounds + 1) if self.reason(t) is not None]


# --- L-BFGS -------------------------------------------------------------------------------------------


def lbfgs_hvp(S: Tensor, Y: Tensor, v: Tensor) -> Tensor:
    """B v for the L-BFGS matrix of the pairs (columns of S and Y, oldest first), compact form (BNS 1994)."""
    StY = S.T @ Y
    L = torch.tril(StY, diagonal=-1)
    D = torch.diag(torch.diagonal(StY))
    s_last, y_last = S[:, -1], Y[:, -1]
    sigma = (y_last @ s_last) / (s_last @ s_last)
    middle = torch.cat([torch.cat([sigma * (S.T @ S), L], dim=1), torch.cat([L.T, -D], dim=1)], dim=0)
    rhs = torch.cat([sigma * (S.T @ v), Y.T @ v])
    coefficients = torch.linalg.solve(middle, rhs)
    return sigma * v - torch.cat([sigma * S, Y], dim=1) @ coefficients


class CurvaturePairs:
    """One client's L-BFGS buffer: the last ``size`` pairs (Δw, Δg) of rounds where it was exact."""

    def __init__(self, size: int):
        self.pairs: deque[tuple[int, Tensor, Tensor]] = deque(maxlen=size)
        self.rejected: list[int] = []  # rounds whose pair failed the curvature condition

    def add(self, server_round: int, s: Tensor, y: Tensor) -> bool:
        curvature = float(s @ y)
        if not curvature > CURVATURE_COSINE * float(s.norm()) * float(y.norm()):
            self.rejected.append(server_round)
            return False
        self.pairs.append((server_round, s, y))
        return True

    def __len__(self) -> int:
        return len(self.pairs)

    def rounds(self) -> list[int]:
        return [r for r, _, _ in self.pairs]

    def hvp(self, v: Tensor) -> Tensor:
        S = torch.stack([s for _, s, _ in self.pairs], dim=1)
        Y = torch.stack([y for _, _, y in self.pairs], dim=1)
        return lbfgs_hvp(S, Y, v)


# --- vectors --------------------------------------------------------------------------------------------


def _float_names(state: State) -> list[str]:
    return [name for name, tensor in state.items() if torch.is_floating_point(tensor)]


def _vector(state: State, names: Sequence[str]) -> Tensor:
    return torch.cat([state[name].reshape(-1).to(torch.float64) for name in names])


def _unflatten(vector: Tensor, like: State, names: Sequence[str]) -> State:
    out, offset = {}, 0
    for name in names:
        size = like[name].numel()
        out[name] = vector[offset:offset + size].reshape(like[name].shape).to(like[name].dtype)
        offset += size
    return out


def abnormality_threshold(
    stored: Mapping[int, StoredRound], remaining: Sequence[int], lr_of: Callable[[int], float], names: Sequence[str], alpha: float
) -> float:
    """τ = max_t τ_t; τ_t the smallest value exceeded in magnitude by at most a fraction ``alpha`` of the
    coordinates of round t's stored updates g = −U/η_t of the remaining clients (alpha = 0: their largest)."""
    kept, tau = set(remaining), 0.0
    for t, entry in stored.items():
        participants = sorted(k for k in entry.client_updates if k in kept)
        if not participants:
            continue
        magnitudes = torch.cat([_vector(entry.client_updates[k], names).abs() for k in participants]) / lr_of(t)
        allowed = math.floor(alpha * magnitudes.numel() + 1e-9)  # at most this many coordinates above τ_t
        if allowed >= magnitudes.numel():
            tau_t = 0.0
        else:
            tau_t = float(torch.topk(magnitudes, allowed + 1).values[-1])
        tau = max(tau, tau_t)
    return tau


# --- recovery -------------------------------------------------------------------------------------------


class ExactClients(Protocol):
    """The named clients' ordinary local training from a given model, replaying a round (one federated round)."""

    def train(self, state: State, partitions: Sequence[int], replayed_round: int) -> dict[int, State]:
        """The models ``partitions`` return after training from ``state`` as in round ``replayed_round``."""


def recover(
    stored: Mapping[int, StoredRound],
    remaining: Sequence[int],
    sizes: Mapping[int, int],
    clients: ExactClients,
    schedule: Schedule,
    buffer_size: int,
    lr_of: Callable[[int], float],
    tolerance: float | None,
) -> tuple[State, dict[str, Any]]:
    """The recovered state after replaying rounds 1..``schedule.rounds`` of ``stored``; diagnostics say what it cost.

    ``tolerance``: α of the abnormality threshold; None switches abnormality fixing off (τ = ∞).
    """
    start = time.perf_counter()
    rounds = [t for t in sorted(stored) if t <= schedule.rounds]
    if rounds != list(range(1, schedule.rounds + 1)):
        raise UnlearningFailed(
            f"fedrecover: needs the history of every round 1..{schedule.rounds}, got rounds {rounds[:5]}…"
            " (it must be listed before training starts)"
        )
    kept = set(remaining)
    state = {name: tensor.clone() for name, tensor in stored[1].global_state.items()}
    names = _float_names(state)
    tau = None if tolerance is None else abnormality_threshold(
        {t: stored[t] for t in rounds}, remaining, lr_of, names, tolerance
    )
    buffers: dict[int, CurvaturePairs] = {}
    exact_rounds: dict[str, str] = {}
    exact_clients: dict[str, list[int]] = {}
    abnormal: dict[str, list[int]] = {}
    no_pairs: dict[str, list[int]] = {}
    estimation_error: dict[str, float] = {}
    stored_update_error: dict[str, float] = {}
    estimated_rounds, skipped, participants_of = [], [], {}
    client_trainings = estimated_updates = retrain_trainings = 0

    for t in rounds:
        entry = stored[t]
        participants = sorted(k for k in entry.client_updates if k in kept)
        if not participants:
            skipped.append(t)
            continue
        participants_of[str(t)] = participants
        retrain_trainings += len(participants)
        eta = lr_of(t)
        recovered = _vector(state, names)
        delta_w = recovered - _vector(entry.global_state, names)
        stored_g = {k: -_vector(entry.client_updates[k], names) / eta for k in participants}
        for k in participants:
            buffers.setdefault(k, CurvaturePairs(buffer_size))

        reason = schedule.reason(t)
        estimates: dict[int, Tensor] = {}
        for k in participants:
            if len(buffers[k]):
                estimates[k] = stored_g[k] + buffers[k].hvp(delta_w)
        if reason is not None:
            ask = list(participants)
        else:
            ask = []
            for k in participants:
                if k not in estimates:
                    no_pairs.setdefault(str(t), []).append(k)
                    ask.append(k)
                elif not bool(torch.isfinite(estimates[k]).all()):
                    abnormal.setdefault(str(t), []).append(k)
                    ask.append(k)
                elif tau is not None and float(estimates[k].abs().max()) > tau:
                    abnormal.setdefault(str(t), []).append(k)
                    ask.append(k)
            if ask:
                reasons = ([ABNORMAL] if str(t) in abnormal else []) + ([NO_PAIRS] if str(t) in no_pairs else [])
                reason = "+".join(reasons)
                exact_clients[str(t)] = sorted(ask)

        returned: dict[int, State] = {}
        if ask:
            exact_rounds[str(t)] = reason
            replies = clients.train(state, sorted(ask), t)
            client_trainings += len(ask)
            exact_g = {}
            for k in sorted(ask):
                returned[k] = replies[k]
                exact_g[k] = -(_vector(replies[k], names) - recovered) / eta
            # How far the estimate was from the exact update where both exist (before the new pairs enter):
            # relative error of the example-weighted mean over those clients.
            compared = [k for k in sorted(ask) if k in estimates]
            if compared and t > schedule.warmup:
                total = sum(sizes[k] for k in compared)
                estimate_mean = sum((sizes[k] / total) * estimates[k] for k in compared)
                stored_mean = sum((sizes[k] / total) * stored_g[k] for k in compared)
                exact_mean = sum((sizes[k] / total) * exact_g[k] for k in compared)
                estimation_error[str(t)] = float((estimate_mean - exact_mean).norm() / exact_mean.norm())
                # The same without the curvature term (H̃ = 0: the stored updates replayed as they are).
                stored_update_error[str(t)] = float((stored_mean - exact_mean).norm() / exact_mean.norm())
            for k in sorted(ask):
                buffers[k].add(t, delta_w, exact_g[k] - stored_g[k])
        estimated = [k for k in participants if k not in returned]
        if estimated:
            estimated_rounds.append(t)
            estimated_updates += len(estimated)
        for k in estimated:
            # θ̂_k = ŵ_t + Û_k, Û_k = −η_t ĝ_k.
            returned[k] = {**state, **_unflatten(recovered - eta * estimates[k], state, names)}
        # FedAvg of the returned models, example-weighted, summed in partition order (as the strategy does).
        total = sum(sizes[k] for k in participants)
        state = {
            name: (sum(returned[k][name] * (sizes[k] / total) for k in participants) if name in names else tensor)
            for name, tensor in state.items()
        }

    return state, {
        "exact_rounds": exact_rounds,
        "exact_clients": exact_clients,
        "abnormal": abnormal,
        "no_pairs": no_pairs,
        "estimated_rounds": estimated_rounds,
        "estimated_updates": estimated_updates,
        "client_trainings": client_trainings,
        "retrain_client_trainings": retrain_trainings,
        "estimation_error": estimation_error,
        "stored_update_error": stored_update_error,
        "abnormality_threshold": tau,
        "tolerance": tolerance,
        "schedule": {"rounds": schedule.rounds, "warmup": schedule.warmup, "correction_period": schedule.period,
                     "final_tuning": schedule.final},
        "buffer_size": buffer_size,
        "buffer_rounds": {str(k): buffer.rounds() for k, buffer in sorted(buffers.items())},
        "rejected_pairs": {str(k): buffer.rejected for k, buffer in sorted(buffers.items()) if buffer.rejected},
        "skipped_rounds": skipped,
        "participants": participants_of,
        "storage_bytes": storage_bytes({t: stored[t] for t in rounds}),
        "global_model_bytes": sum(
            tensor.numel() * tensor.element_size() for t in rounds for tensor in stored[t].global_state.values()
        ),
        "seconds": time.perf_counter() - start,
    }


class _PortExactClients:
    """An exact update: a ``train`` message numbered as the replayed round, so the client trains with that
    round's lr (lr-decay) and shuffling seed, exactly as in training and in the retrained oracle."""

    def __init__(self, port: FederationPort):
        self.port = port
        self.rounds = 0

    def train(self, state: State, partitions: Sequence[int], replayed_round: int) -> dict[int, State]:
        self.rounds += 1
        replies = self.port.send(TRAIN, sorted(partitions), {"arrays": state}, {"server-round": replayed_round})
        return {k: reply.arrays["arrays"] for k, reply in replies.items()}


@register("fedrecover")
class FedRecover(Method):
    summary = "re-run training without the deleted clients, estimating most updates from the stored history (L-BFGS)"
    requirements = Requirements(round_history=Every())
    config_keys = (
        ConfigKey("fedrecover-warmup", 3, "fedrecover: rounds at the start in which every remaining client computes its exact update (T_w; > buffer size, round 1 gives no pair).", check=positive_int),
        ConfigKey("fedrecover-correction-period", 5, "fedrecover: after warm-up, every this many rounds every remaining client computes its exact update (T_c).", check=positive_int),
        ConfigKey("fedrecover-final-tuning", 2, "fedrecover: last rounds in which every remaining client computes its exact update (T_f).", check=non_negative_int),
        ConfigKey("fedrecover-buffer-size", 2, "fedrecover: L-BFGS pairs kept per client (s).", check=positive_int),
        ConfigKey("fedrecover-tolerance", 0.0, "fedrecover: tolerance rate α of the abnormality threshold τ (at most this fraction of the stored update coordinates of any round exceed τ; 0: τ is their largest).", check=closed_unit_interval),
        ConfigKey("fedrecover-abnormality-fixing", True, "fedrecover: ask a client for its exact update when its estimate has a coordinate above τ (false: τ = ∞)."),
        ConfigKey(
            "fedrecover-update-scale", "round-lr",
            "fedrecover: the client's update g = −(returned − sent model) / η_t with η_t the round's lr (round-lr: g is lr-free, as the paper's gradient) or the base lr (lr); the same unless lr-decay < 1.",
            choices=UPDATE_SCALES,
        ),
    )

    def unlearn(self, port: FederationPort, deletion: Deletion) -> Outcome:
        stored = port.history(self.requirements.round_history)
        if not stored:
            raise UnlearningFailed("fedrecover: no training updates were stored (it must be listed before training starts)")
        config = self.config
        remaining = port.remaining(deletion)
        schedule = Schedule(
            rounds=deletion.trained_rounds,
            warmup=int(config["fedrecover-warmup"]),
            period=int(config["fedrecover-correction-period"]),
            final=int(config["fedrecover-final-tuning"]),
        )
        clients = _PortExactClients(port)
        sizes = {k: info.num_examples for k, info in port.clients.items()}
        tolerance = float(config["fedrecover-tolerance"]) if config["fedrecover-abnormality-fixing"] else None
        state, details = recover(
            stored, remaining, sizes, clients, schedule, int(config["fedrecover-buffer-size"]),
            update_scale(config), tolerance,
        )
        return Outcome(
            state=state,
            affected_clients=sorted(deletion.forget_clients),
            communication_rounds=clients.rounds,
            details=details,
            headline={"storage_bytes": details["storage_bytes"], "client_trainings": details["client_trainings"]},
        )
