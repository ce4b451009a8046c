"""U-LiRA: per-example membership inference of the deleted clients' data, against shadow federations.

LiRA (Carlini et al. 2022, "Membership inference attacks from first principles") in the unlearning
form of Hayes et al. (2024, "Inexact unlearning needs more careful evaluations to avoid a false sense
of privacy"): instead of one threshold for the whole population, every target example x gets its own
test, calibrated on shadow models that did (IN) and did not (OUT) train on it.

* **Shadow federations.** Shadow s runs the run's own FedAvg (same model, partitions, local training,
  rounds, fraction-train; in-process, plain PyTorch) over a random half of the clients. Shadows come in
  complementary pairs (the LiRA "paired" design): shadow 2j includes each client with probability
  1/2 (seeded), shadow 2j+1 exactly the clients 2j leaves out, so every client is IN half the shadows
  and OUT of the other half. Each shadow's weights are cached on disk by a hash of what determines it.
* **Statistic.** φ(x) = log p_y − log(1 − p_y), the logit-scaled confidence in the true label,
  computed from the logits as z_y − logsumexp_{c≠y} z_c (never from probabilities).
* **Scores.** Gaussians N(μ_in, σ_in²) and N(μ_out, σ_out²) of φ(x) over the IN and OUT shadows; the
  online score of a model is log N(φ; μ_in, σ_in²) − log N(φ; μ_out, σ_out²); the offline score (OUT
  only) is the one-sided test of Carlini et al.: −log Pr[Z ≥ φ], Z ~ N(μ_out, σ_out²) (their
  Λ = 1 − Pr[Z > φ] ranks the same; this form does not saturate).
* **The unlearning evaluation.** ``ulira_auc``: AUC of the scores of the evaluated model M against
  those of the retrained model R on the same forget examples (positives = M). 0.5: M looks exactly
  like a retrain to this attacker; 1: every forget example betrays M.

Definitions, choices and cost: docs/metrics.md (U-LiRA).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from scipy.stats import norm
from sklearn.metrics import roc_auc_score
from torch.utils.data import Dataset, Subset

from fedunlearn.errors import ConfigError
from fedunlearn.files import atomic_torch_save, atomic_write_text
from fedunlearn.metrics.functional import model_outputs
from fedunlearn.metrics.membership import logit_scaled_confidence
from fedunlearn.retrain_cache import TRAINING_KEYS, training_key
from fedunlearn.training import derive_seed, train_local

State = dict[str, torch.Tensor]
Progress = Callable[[str], None]

# Bump when the shadow training procedure changes: cached shadows of an older procedure are not reused.
SHADOW_PROCEDURE = "lira-paired-fedavg-1"
# Paired design: 4 shadows give every client >= 2 IN and >= 2 OUT shadows, the least a Gaussian fit needs.
MIN_SHADOWS = 4
# Shadows per side (for every target) before per-example variances replace one pooled variance per
# side. Carlini et al. find a global ("fixed") variance better with few (below ~64) shadow models.
PER_EXAMPLE_VARIANCE_MIN = 32
# Floor of a standard deviation (logit units): identical shadows would otherwise give σ = 0.
MIN_STD = 1e-4
FPR_LEVELS = (("1pct", 0.01), ("0.1pct", 0.001))
VARIANTS = ("auto", "online", "offline")

ULIRA_KEYS = (
    "ulira_auc",
    "ulira_tpr_at_1pct_fpr",
    "ulira_tpr_at_0.1pct_fpr",
    "ulira_variant",
    "ulira_examples",
    "lira_auc",
    "lira_tpr_at_1pct_fpr",
    "lira_tpr_at_0.1pct_fpr",
    "lira_variant",
    "lira_members",
    "lira_nonmembers",
    "lira_shadows",
    "lira_variance",
)


# --- the statistics, on numbers -------------------------------------------------------------------


def tpr_at_fpr(positive_scores: np.ndarray, negative_scores: np.ndarray, fpr: float) -> float | None:
    """The largest true-positive rate of a threshold whose false-positive rate is at most ``fpr``.

    Positive = score above the threshold. With n negatives at most k = ⌊fpr · n⌋ of them may score
    above it, so the threshold sits just above the (k+1)-th highest negative score and TPR is the
    fraction of positives strictly above that score. With k = 0 (fewer than 1/fpr negatives) the
    rate is not "at fpr" but at 0 false positives: undefined, ``None``.
    """
    positive, negative = np.asarray(positive_scores, float), np.asarray(negative_scores, float)
    if len(positive) == 0 or len(negative) == 0:
        raise ValueError("TPR at a FPR needs at least one positive and one negative score")
    allowed = math.floor(fpr * len(negative) + 1e-9)
    if allowed < 1:
        return None
    if allowed >= len(negative):
        return 1.0
    cut = np.sort(negative)[::-1][allowed]  # the (allowed+1)-th highest negative score
    return float(np.mean(positive > cut))


def roc_numbers(positive_scores: np.ndarray, negative_scores: np.ndarray, prefix: str) -> dict[str, float | None]:
    """``{prefix}_auc`` and ``{prefix}_tpr_at_{1pct,0.1pct}_fpr`` of positives against negatives."""
    positive, negative = np.asarray(positive_scores, float), np.asarray(negative_scores, float)
    scores = np.concatenate([positive, negative])
    if not np.all(np.isfinite(scores)):
        raise ValueError("LiRA scores contain NaN or infinity (did the model diverge?)")
    truth = np.concatenate([np.ones(len(positive)), np.zeros(len(negative))])
    result: dict[str, float | None] = {f"{prefix}_auc": float(roc_auc_score(truth, scores))}
    for label, level in FPR_LEVELS:
        result[f"{prefix}_tpr_at_{label}_fpr"] = tpr_at_fpr(positive, negative, level)
    return result


@dataclass(frozen=True)
class GaussianFit:
    """Per-target Gaussians of φ over the IN and OUT shadows (NaN where a side has < 2 shadows)."""

    mu_in: np.ndarray
    sd_in: np.ndarray
    mu_out: np.ndarray
    sd_out: np.ndarray
    count_in: np.ndarray
    count_out: np.ndarray
    variance: str  # "pooled" (one σ per side) or "per-example"


def _side(phi: np.ndarray, mask: np.ndarray, per_example: bool) -> tuple[np.ndarray, np.ndarray]:
    counts = mask.sum(axis=0)
    sums = np.where(mask, phi, 0.0).sum(axis=0)
    mu = np.divide(sums, counts, out=np.full(phi.shape[1], np.nan), where=counts > 0)
    squares = np.where(mask, (phi - mu) ** 2, 0.0).sum(axis=0)
    usable = counts >= 2
    if per_example:
        sd = np.sqrt(np.divide(squares, counts - 1, out=np.full(phi.shape[1], np.nan), where=usable))
    else:
        degrees = (counts[usable] - 1).sum()
        pooled = math.sqrt(squares[usable].sum() / degrees) if degrees > 0 else math.nan
        sd = np.where(usable, pooled, np.nan)
    sd = np.where(np.isnan(sd), np.nan, np.maximum(sd, MIN_STD))
    return np.where(usable, mu, np.nan), sd


def fit_gaussians(phi: np.ndarray, inside: np.ndarray, variance: str = "auto") -> GaussianFit:
    """Mean and standard deviation of φ per target over its IN shadows and over its OUT shadows.

    ``phi`` and ``inside`` are (shadows x targets); ``inside[s, i]``: shadow s trained on target i.
    Means are per target. Variances are per target (unbiased, n − 1) or, with few shadows, one
    pooled within-target variance per side: Σ_i Σ_s (φ_si − μ_i)² / Σ_i (n_i − 1) over the targets
    with ≥ 2 shadows on that side (``variance="auto"``: per target when every target with shadows
    on a side has at least PER_EXAMPLE_VARIANCE_MIN of them).
    """
    phi, inside = np.asarray(phi, float), np.asarray(inside, bool)
    if phi.shape != inside.shape or phi.ndim != 2:
        raise ValueError(f"phi {phi.shape} and inside {inside.shape} must both be (shadows x targets)")
    if variance not in ("auto", "pooled", "per-example"):
        raise ValueError(f"variance must be auto, pooled or per-example, not {variance!r}")
    count_in, count_out = inside.sum(axis=0), (~inside).sum(axis=0)
    if variance == "auto":
        fewest = min(count_in[count_in > 0].min(initial=PER_EXAMPLE_VARIANCE_MIN),
                     count_out[count_out > 0].min(initial=PER_EXAMPLE_VARIANCE_MIN))
        variance = "per-example" if fewest >= PER_EXAMPLE_VARIANCE_MIN else "pooled"
    mu_in, sd_in = _side(phi, inside, variance == "per-example")
    mu_out, sd_out = _side(phi, ~inside, variance == "per-example")
    return GaussianFit(mu_in, sd_in, mu_out, sd_out, count_in, count_out, variance)


def online_scores(phi: np.ndarray, fit: GaussianFit) -> np.ndarray:
    """log N(φ; μ_in, σ_in²) − log N(φ; μ_out, σ_out²) per target (higher = looks trained on it)."""
    return norm.logpdf(phi, fit.mu_in, fit.sd_in) - norm.logpdf(phi, fit.mu_out, fit.sd_out)


def offline_scores(phi: np.ndarray, fit: GaussianFit) -> np.ndarray:
    """−log Pr[Z ≥ φ], Z ~ N(μ_out, σ_out²): the one-sided test against the OUT shadows only."""
    return -norm.logsf(phi, fit.mu_out, fit.sd_out)


# --- shadow federations -----------------------------------------------------------------------------


def paired_memberships(num_clients: int, num_shadows: int, seed: int) -> np.ndarray:
    """(shadows x clients) booleans: which clients each shadow federation includes.

    Shadow 2j includes each client independently with probability 1/2 (seeded by ``seed`` and j,
    redrawn while either half is empty); shadow 2j+1 includes exactly the others. Shadow s is the same
    whatever the number of shadows, so a larger ``num_shadows`` reuses the cached ones.
    """
    if num_clients < 2:
        raise ValueError(f"shadow federations need at least 2 clients to split, got {num_clients}")
    rows = []
    for pair in range((num_shadows + 1) // 2):
        attempt = 0
        while True:
            rng = np.random.default_rng(derive_seed(seed, "lira-membership", pair, attempt))
            first = rng.random(num_clients) < 0.5
            if 0 < first.sum() < num_clients:
                break
            attempt += 1
        rows += [first, ~first]
    return np.array(rows[:num_shadows], dtype=bool).reshape(num_shadows, num_clients)


def federated_averaging(
    federation,
    clients: Sequence[int],
    start: State,
    rounds: int,
    device: torch.device | str,
    train_seed: Callable[[int, int], int],
    sampler: random.Random | None = None,
    fraction: float = 1.0,
    on_round: Callable[[int], None] | None = None,
) -> State:
    """FedAvg in-process: each round every sampled client trains locally (``train_local``, the run's
    local settings of that round, seed ``train_seed(round, client)``) from the global model, and the server takes
    the mean of their states weighted by their example counts (accumulated in float64, in client
    order, cast back to each tensor's dtype). Sampling as the run's strategy does:
    ``sorted(sampler.sample(clients, max(int(len(clients) * fraction), 1)))`` per round; no sampler
    trains every client every round.
    """
    clients = sorted(clients)
    if not clients:
        raise ValueError("FedAvg needs at least one client")
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):  # building a model draws weights: leave the caller's RNG alone
        model = federation.new_model()
    sizes = {k: len(federation.partitioning.rows_of(k)) for k in clients}
    size = min(len(clients), max(int(len(clients) * fraction), 1))
    state = {name: tensor.detach().cpu().clone() for name, tensor in start.items()}
    for server_round in range(1, rounds + 1):
        chosen = sorted(sampler.sample(clients, size)) if sampler is not None else clients
        total = sum(sizes[k] for k in chosen)
        accumulated = {name: torch.zeros(tensor.shape, dtype=torch.float64) for name, tensor in state.items()}
        settings = federation.local_training_for(server_round)  # the run's lr schedule (lr-decay)
        for k in chosen:
            model.load_state_dict(state)
            train_local(model, federation.client_data(k), settings, device, seed=train_seed(server_round, k))
            weight = sizes[k] / total
            for name, tensor in model.state_dict().items():
                accumulated[name] += tensor.detach().cpu().double() * weight
        state = {
            name: (value if state[name].is_floating_point() else value.round()).to(state[name].dtype)
            for name, value in accumulated.items()
        }
        if on_round is not None:
            on_round(server_round)
    return state


@dataclass(frozen=True)
class ShadowInfo:
    index: int
    clients: tuple[int, ...]
    seconds: float  # of training (the cached entry keeps the seconds it took when it was trained)
    from_cache: bool
    key: str


def partition_digest(partitioning) -> str:
    """A hash of which training rows each client holds, in order."""
    digest = hashlib.sha256()
    for rows in partitioning.client_indices:
        digest.update(np.asarray(rows, dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:24]


def shadow_key(federation, config: dict[str, Any], rounds: int, index: int, clients: Sequence[int]) -> str:
    """Hash of everything that determines shadow ``index``: the run's training keys (data, partition,
    model, local training, seed, ...), the partition itself and the local settings of every round
    (so a key that changes them is caught even if it is not among the training keys), rounds, the
    shadow's index and clients, the procedure and the library versions."""
    schedule = [dataclasses.asdict(federation.local_training_for(r)) for r in range(1, rounds + 1)]
    return training_key(
        config, rounds, purpose="lira-shadow", procedure=SHADOW_PROCEDURE, shadow=index,
        clients=sorted(int(k) for k in clients), partition=partition_digest(federation.partitioning),
        local_training=schedule,
    )


def _load_cached(folder: Path | None, key: str) -> tuple[State, dict[str, Any]] | None:
    if folder is None:
        return None
    weights, info = folder / f"{key}.pt", folder / f"{key}.json"
    if not (weights.exists() and info.exists()):
        return None
    try:
        return torch.load(weights, weights_only=True), json.loads(info.read_text())
    except Exception:  # a damaged entry is retrained (and overwritten)
        return None


def _store(folder: Path | None, key: str, state: State, info: dict[str, Any]) -> None:
    if folder is None:
        return
    # The weights first: a reader needs both files, so a crash between the two leaves no half entry.
    atomic_torch_save(state, folder / f"{key}.pt")
    atomic_write_text(folder / f"{key}.json", json.dumps(info, indent=2))


class LiraShadows:
    """Shadow federations and each one's φ on the forget and test examples; :meth:`attack` scores a model.

    Build with :meth:`fit`. Only φ is kept in memory (shadows x examples), not the shadows' weights.
    """

    def __init__(
        self,
        *,
        forget_set: Dataset,
        test_set: Dataset,
        forget_client_of: np.ndarray,
        memberships: np.ndarray,
        forget_phi: np.ndarray,
        test_phi: np.ndarray,
        shadows: Sequence[ShadowInfo],
        rounds: int,
        device: torch.device | str = "cpu",
        batch_size: int = 512,
    ):
        self.forget_set, self.test_set = forget_set, test_set
        self.forget_client_of = np.asarray(forget_client_of)
        self.memberships = np.asarray(memberships, bool)
        self.forget_inside = self.memberships[:, self.forget_client_of]  # shadows x forget examples
        self.forget_phi, self.test_phi = np.asarray(forget_phi, float), np.asarray(test_phi, float)
        self.shadows, self.rounds = list(shadows), rounds
        self.device, self.batch_size = torch.device(device), batch_size
        # One fit over all targets: forget examples (IN in some shadows) then test examples (OUT in all).
        phi = np.concatenate([self.forget_phi, self.test_phi], axis=1)
        inside = np.concatenate([self.forget_inside, np.zeros_like(self.test_phi, dtype=bool)], axis=1)
        self.gaussians = fit_gaussians(phi, inside)

    @classmethod
    def fit(
        cls,
        federation,
        config: dict[str, Any],
        forget_clients: Sequence[int],
        num_shadows: int,
        device: torch.device | str,
        cache_dir: str | Path | None,
        progress: Progress | None = None,
        rounds: int | None = None,
        batch_size: int = 512,
    ) -> LiraShadows:
        """Train (or load from ``cache_dir``; ``None``: no cache) ``num_shadows`` shadow federations of
        ``rounds`` rounds (default: the rounds the run trained before the deletion) and record each
        one's φ on the forget clients' examples and on the test set. ``progress`` gets one line per
        shadow round ("U-LiRA shadow 3/8: round 12/20")."""
        if isinstance(num_shadows, bool) or not isinstance(num_shadows, int) or num_shadows < MIN_SHADOWS:
            raise ConfigError("lira-shadows", num_shadows, f"0 (off) or an integer >= {MIN_SHADOWS}",
                              reason="each client needs >= 2 shadows with it and >= 2 without it")
        num_clients = federation.partitioning.num_clients
        forget_clients = sorted(set(int(k) for k in forget_clients))
        if not forget_clients:
            raise ValueError("U-LiRA needs at least one deleted client (forget_clients is empty)")
        for k in forget_clients:
            if not 0 <= k < num_clients:
                raise ConfigError("forget-clients", k, f"client ids 0..{num_clients - 1}")
        differing = [key for key in (*TRAINING_KEYS, "num-rounds", "unlearn-after-round")
                     if key in config and config[key] != federation.config.get(key)]
        if differing:
            raise ValueError(f"config and federation.config disagree on {', '.join(differing)}: pass the run's config")
        rounds = federation.last_training_round if rounds is None else rounds
        report = progress or (lambda text: None)
        folder = Path(cache_dir) if cache_dir is not None else None
        seed = config["seed"]
        memberships = paired_memberships(num_clients, num_shadows, seed)
        rows = [federation.partitioning.rows_of(k) for k in forget_clients]
        forget_set = Subset(federation.data.train, np.concatenate(rows).tolist())
        forget_client_of = np.concatenate([np.full(len(r), k) for r, k in zip(rows, forget_clients)])
        test_set = federation.data.test
        with torch.random.fork_rng(devices=[]):
            start = {name: tensor.clone() for name, tensor in federation.initial_model().state_dict().items()}
            model = federation.new_model()
        infos, forget_phi, test_phi = [], [], []
        for s in range(num_shadows):
            clients = tuple(int(k) for k in np.flatnonzero(memberships[s]))
            key = shadow_key(federation, config, rounds, s, clients)
            cached = _load_cached(folder, key)
            if cached is not None:
                state, info = cached
                report(f"U-LiRA shadow {s + 1}/{num_shadows}: from the cache")
                infos.append(ShadowInfo(s, clients, float(info["seconds"]), True, key))
            else:
                begin = time.perf_counter()
                state = federated_averaging(
                    federation, clients, start, rounds, device,
                    train_seed=lambda server_round, k, s=s: derive_seed(seed, "lira-train", s, server_round, k),
                    sampler=random.Random(derive_seed(seed, "lira-sampling", s)),
                    fraction=config["fraction-train"],
                    on_round=lambda r, s=s: report(f"U-LiRA shadow {s + 1}/{num_shadows}: round {r}/{rounds}"),
                )
                seconds = time.perf_counter() - begin
                _store(folder, key, state, {"shadow": s, "clients": list(clients), "rounds": rounds,
                                            "seconds": seconds, "procedure": SHADOW_PROCEDURE})
                infos.append(ShadowInfo(s, clients, seconds, False, key))
            model.load_state_dict(state)
            forget_phi.append(logit_scaled_confidence(*model_outputs(model, forget_set, device, batch_size)))
            test_phi.append(logit_scaled_confidence(*model_outputs(model, test_set, device, batch_size)))
        return cls(
            forget_set=forget_set, test_set=test_set, forget_client_of=forget_client_of, memberships=memberships,
            forget_phi=np.stack(forget_phi), test_phi=np.stack(test_phi), shadows=infos, rounds=rounds,
            device=device, batch_size=batch_size,
        )

    # --- scoring ------------------------------------------------------------------------------------

    def _phi(self, model: nn.Module, dataset: Dataset) -> np.ndarray:
        phi = logit_scaled_confidence(*model_outputs(model, dataset, self.device, self.batch_size))
        if not np.all(np.isfinite(phi)):
            raise ValueError("U-LiRA: the model's outputs contain NaN or infinity (did it diverge?)")
        return phi

    def variant(self, requested: str = "auto") -> str:
        """``online`` when every forget example has >= 2 IN and >= 2 OUT shadows (``auto``), else ``offline``."""
        if requested not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, not {requested!r}")
        forget = slice(0, self.forget_phi.shape[1])
        online_possible = (self.gaussians.count_in[forget] >= 2).all() and (self.gaussians.count_out[forget] >= 2).all()
        if requested == "online" and not online_possible:
            raise ValueError("the online test needs >= 2 IN and >= 2 OUT shadows for every forget example")
        if not (self.gaussians.count_out[forget] >= 2).all():
            raise ValueError("U-LiRA needs >= 2 OUT shadows for every forget example")
        if requested == "auto":
            return "online" if online_possible else "offline"
        return requested

    def scores(self, phi: np.ndarray, variant: str, targets: slice) -> np.ndarray:
        """Scores of φ values of the targets ``targets`` (indices into forget then test examples)."""
        g = self.gaussians
        part = GaussianFit(g.mu_in[targets], g.sd_in[targets], g.mu_out[targets], g.sd_out[targets],
                           g.count_in[targets], g.count_out[targets], g.variance)
        return online_scores(phi, part) if variant == "online" else offline_scores(phi, part)

    def attack(self, model: nn.Module, retrained: nn.Module, variant: str = "auto") -> dict[str, Any]:
        """U-LiRA of ``model`` against ``retrained`` on the forget examples, and the population LiRA
        of ``model`` (forget examples against test examples, offline). Keys: :data:`ULIRA_KEYS`;
        a TPR that is undefined (too few negatives for that FPR) is ``None``."""
        chosen = self.variant(variant)
        n_forget, n_test = self.forget_phi.shape[1], self.test_phi.shape[1]
        forget, test = slice(0, n_forget), slice(n_forget, n_forget + n_test)
        model_forget_phi = self._phi(model, self.forget_set)
        retrained_forget_phi = self._phi(retrained, self.forget_set)
        result: dict[str, Any] = {}
        result.update(roc_numbers(self.scores(model_forget_phi, chosen, forget),
                                  self.scores(retrained_forget_phi, chosen, forget), "ulira"))
        result.update(ulira_variant=chosen, ulira_examples=n_forget)
        model_test_phi = self._phi(model, self.test_set)
        result.update(roc_numbers(self.scores(model_forget_phi, "offline", forget),
                                  self.scores(model_test_phi, "offline", test), "lira"))
        result.update(lira_variant="offline", lira_members=n_forget, lira_nonmembers=n_test,
                      lira_shadows=len(self.shadows), lira_variance=self.gaussians.variance)
        return {key: result[key] for key in ULIRA_KEYS}

    @property
    def summary(self) -> dict[str, Any]:
        """What the shadows were, for results.json: clients per shadow, rounds, seconds, cache hits."""
        return {
            "num_shadows": len(self.shadows),
            "rounds": self.rounds,
            "clients": [list(info.clients) for info in self.shadows],
            "seconds": [round(info.seconds, 3) for info in self.shadows],
            "from_cache": sum(info.from_cache for info in self.shadows),
            "variance": self.gaussians.variance,
            "forget_in_shadows": int(self.gaussians.count_in[: self.forget_phi.shape[1]].min()),
            "forget_out_shadows": int(self.gaussians.count_out[: self.forget_phi.shape[1]].min()),
        }
