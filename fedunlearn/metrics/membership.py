"""Membership inference of the deleted data: is the forget set distinguishable from unseen data?

Two population attacks (one rule for every example), both scored as AUC and as "success" (balanced
accuracy at a threshold):

* loss threshold (Yeom et al. 2018): score = -cross-entropy; members were fitted, so lower loss;
* shadow models (Shokri et al. 2017): models of the target's architecture trained on one half of a
  held-out pool and not on the other teach a classifier what "seen" outputs look like; that
  classifier scores the target's outputs.

Everything the attacks fit — the attack classifier and both thresholds — is fit on the shadow
models' in/out examples only, never on the members and non-members they are evaluated on, so
``*_success`` is what an attacker would really get. The headline ``mia_auc`` / ``mia_success`` is
one attack named up front (``mia_attack``): the shadow-model attack when there are shadows, else the
loss attack — never the better of the two on a given model.

A model that never saw the deleted data is the reference, not 0.5: read a method's numbers against
the retrained model's. :class:`MembershipInference` trains the shadows once per run and then attacks
every model. The per-example attack (U-LiRA) is in :mod:`fedunlearn.metrics.lira`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import Dataset, Subset, TensorDataset

from fedunlearn.metrics.functional import accuracy, model_outputs
from fedunlearn.training import LocalTrainingConfig, derive_seed, train_local

ATTACK_NAMES = {"shadow": "shadow-model", "loss": "loss-threshold"}
MIN_SHADOW_POOL = 20
# Log-probabilities below this carry no further information and would be huge outliers for the
# attack classifier's feature scaling (a confident model gives log p = -80 for wrong classes).
LOG_PROB_FLOOR = math.log(1e-12)


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Cross-entropy of each example in nats (float64), without any regulariser."""
    return F.cross_entropy(logits.double(), labels, reduction="none").numpy()


def logit_scaled_confidence(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """φ = log p_y − log(1 − p_y) per example (float64), computed from the logits as
    z_y − logsumexp_{c≠y} z_c: exact where p_y rounds to 1 (a confident model) and never log(0).

    The LiRA statistic (Carlini et al. 2022): roughly Gaussian over models, unlike p_y itself.
    """
    z = logits.double()
    correct_logit = z.gather(1, labels[:, None]).squeeze(1)
    others = z.scatter(1, labels[:, None], -math.inf)
    return (correct_logit - torch.logsumexp(others, dim=1)).numpy()


def attack_features(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """What the shadow-model attack sees per example (N x (C + 4)).

    Sorted log-probabilities (the class-agnostic shape of the output, as in Shokri et al.), the
    correct class's log-odds log p_y - log(1 - p_y) (well spread where p_y is near 1, unlike p_y
    itself), the loss, the entropy and whether the prediction is right.
    """
    z = logits.double()
    log_p = F.log_softmax(z, dim=1)
    sorted_log_p = log_p.sort(dim=1, descending=True).values.clamp_min(LOG_PROB_FLOOR)
    log_odds = torch.from_numpy(logit_scaled_confidence(logits, labels))
    loss = -log_p.gather(1, labels[:, None]).squeeze(1)
    entropy = -(log_p.exp() * log_p).sum(dim=1)
    correct = (z.argmax(dim=1) == labels).double()
    return torch.column_stack([sorted_log_p, log_odds, loss, entropy, correct]).numpy()


def class_matching_weights(member_labels: np.ndarray, nonmember_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weights that give the non-members the members' label histogram.

    A client's data is label-skewed (Dirichlet partitions); if its classes are easier than
    average, even a model that never saw it has lower loss on it and would "leak" membership.
    Members of a class no non-member has get weight 0 (nothing to compare them with), and so do
    non-members of classes no member has. Each side's weights sum to its matched count.
    """
    member_labels, nonmember_labels = np.asarray(member_labels), np.asarray(nonmember_labels)
    classes = int(max(member_labels.max(), nonmember_labels.max())) + 1
    member_counts = np.bincount(member_labels, minlength=classes).astype(float)
    nonmember_counts = np.bincount(nonmember_labels, minlength=classes).astype(float)
    shared = (member_counts > 0) & (nonmember_counts > 0)
    if not shared.any():
        raise ValueError("members and non-members share no class: their losses cannot be compared")
    member_weights = shared[member_labels].astype(float)
    share_wanted = np.where(shared, member_counts / member_counts[shared].sum(), 0.0)
    per_class = np.divide(share_wanted, nonmember_counts, out=np.zeros(classes), where=nonmember_counts > 0)
    nonmember_weights = per_class[nonmember_labels] * nonmember_counts[shared].sum()
    return member_weights, nonmember_weights


def _scores_and_weights(scores: np.ndarray, weights: np.ndarray | None, side: str) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, float)
    if len(scores) == 0:
        raise ValueError(f"membership inference needs at least one {side}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("membership scores contain NaN or infinity (did the model diverge?)")
    weights = np.ones(len(scores)) if weights is None else np.asarray(weights, float)
    return scores, weights


def membership_auc(
    member_scores: np.ndarray,
    nonmember_scores: np.ndarray,
    member_weights: np.ndarray | None = None,
    nonmember_weights: np.ndarray | None = None,
) -> float:
    """ROC AUC of "member" scores against "non-member" scores (higher score = "member").

    The (weighted) probability that a random member scores above a random non-member, ties
    counting one half. Threshold-free, so nothing is fit on the evaluated data. It weighs both
    sides equally whatever their sizes, so neither side is subsampled.
    """
    member_scores, member_weights = _scores_and_weights(member_scores, member_weights, "member")
    nonmember_scores, nonmember_weights = _scores_and_weights(nonmember_scores, nonmember_weights, "non-member")
    truth = np.concatenate([np.ones(len(member_scores)), np.zeros(len(nonmember_scores))])
    scores = np.concatenate([member_scores, nonmember_scores])
    weights = np.concatenate([member_weights, nonmember_weights])
    keep = weights > 0
    return float(roc_auc_score(truth[keep], scores[keep], sample_weight=weights[keep]))


def balanced_accuracy(
    member_scores: np.ndarray,
    nonmember_scores: np.ndarray,
    threshold: float,
    member_weights: np.ndarray | None = None,
    nonmember_weights: np.ndarray | None = None,
) -> float:
    """(TPR + TNR) / 2 of the rule "member iff score >= threshold" (weighted rates)."""
    member_scores, member_weights = _scores_and_weights(member_scores, member_weights, "member")
    nonmember_scores, nonmember_weights = _scores_and_weights(nonmember_scores, nonmember_weights, "non-member")
    true_positive = np.sum(member_weights * (member_scores >= threshold)) / np.sum(member_weights)
    true_negative = np.sum(nonmember_weights * (nonmember_scores < threshold)) / np.sum(nonmember_weights)
    return float((true_positive + true_negative) / 2.0)


def fit_threshold(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """The threshold of highest balanced accuracy on these (shadow) scores, "member iff score >= t".

    Candidates are the midpoints between adjacent distinct scores (and ±inf); the lowest of equally
    good ones wins. Fit it on shadow data: the best threshold on the evaluated data is an oracle's.
    """
    members = np.sort(_scores_and_weights(member_scores, None, "member")[0])
    nonmembers = np.sort(_scores_and_weights(nonmember_scores, None, "non-member")[0])
    distinct = np.unique(np.concatenate([members, nonmembers]))
    candidates = np.concatenate([[-np.inf], (distinct[:-1] + distinct[1:]) / 2.0, [np.inf]])
    true_positive = 1.0 - np.searchsorted(members, candidates, side="left") / len(members)
    true_negative = np.searchsorted(nonmembers, candidates, side="left") / len(nonmembers)
    return float(candidates[np.argmax(true_positive + true_negative)])


def _labels_of(dataset: Dataset) -> np.ndarray:
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].numpy()
    if isinstance(dataset, Subset):
        return _labels_of(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))])


def _ordered_rows(dataset: Dataset) -> list[int]:
    if isinstance(dataset, Subset):
        inner = _ordered_rows(dataset.dataset)
        return [inner[int(i)] for i in dataset.indices]
    return list(range(len(dataset)))


def _base_of(dataset: Dataset) -> Dataset:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def _shared_rows(first: Dataset, second: Dataset) -> int:
    """How many rows two views of one underlying data set have in common (0 if unrelated)."""
    if _base_of(first) is not _base_of(second):
        return 0
    return len(set(_ordered_rows(first)) & set(_ordered_rows(second)))


def _stratified_halves(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two halves of ``range(len(labels))`` with (up to one per class) equal label histograms."""
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(labels))
    order = shuffled[np.argsort(labels[shuffled], kind="stable")]  # grouped by class, random within
    return np.sort(order[0::2]), np.sort(order[1::2])


class MembershipInference:
    """Both attacks, with the shadow models trained once and reused for every target model.

    :meth:`fit` trains the shadows and fits, on their in/out examples only, the attack classifier
    and one threshold per attack (``loss_threshold`` on -loss, ``shadow_threshold`` on the
    classifier's decision function). Without a shadow pool nothing can be fit: the loss attack's
    AUC is reported and its success is NaN.

    ``model_factory()`` must build an untrained model of the target's architecture;
    ``shadow_training`` should roughly mimic how much the target fitted each training example
    (see docs/metrics.md). ``shadow_pool`` must be disjoint from the members and non-members
    that are attacked later; ``None`` runs the loss-threshold attack only.
    """

    def __init__(
        self,
        model_factory: Callable[[], nn.Module] | None,
        shadow_pool: Dataset | None,
        shadow_training: LocalTrainingConfig | None = None,
        device: torch.device | str = "cpu",
        seed: int = 0,
        num_shadows: int = 4,
        match_classes: bool = True,
        batch_size: int = 512,
    ):
        if shadow_pool is not None:
            if model_factory is None or shadow_training is None:
                raise ValueError("a shadow pool needs a model_factory and shadow_training settings")
            if len(shadow_pool) < MIN_SHADOW_POOL:
                raise ValueError(
                    f"shadow_pool has {len(shadow_pool)} examples; the shadow-model attack needs at least "
                    f"{MIN_SHADOW_POOL} (half to train each shadow, half held out)"
                )
            if num_shadows < 1:
                raise ValueError(f"num_shadows must be >= 1, got {num_shadows}")
        self.model_factory = model_factory
        self.shadow_pool = shadow_pool
        self.shadow_training = shadow_training
        self.device = torch.device(device)
        self.seed = seed
        self.num_shadows = num_shadows
        self.match_classes = match_classes
        self.batch_size = batch_size
        self.attack_model = None
        # Fit on the shadows' in/out examples (member iff score >= threshold); NaN until fitted.
        self.loss_threshold = math.nan
        self.shadow_threshold = math.nan
        # The shadows' own scores the thresholds were fit on: {"loss" | "shadow": (in, out)}.
        self.shadow_scores: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.summary: dict[str, float | int] = {}

    @property
    def uses_shadow_models(self) -> bool:
        return self.shadow_pool is not None

    @property
    def headline(self) -> str:
        """The attack ``mia_auc`` / ``mia_success`` report, fixed before any model is attacked."""
        return "shadow" if self.uses_shadow_models else "loss"

    @property
    def fitted(self) -> bool:
        return not self.uses_shadow_models or self.attack_model is not None

    def fit(self) -> MembershipInference:
        """Train the shadow models and the attack classifier (deterministic given ``seed``)."""
        if not self.uses_shadow_models:
            return self
        pool_labels = _labels_of(self.shadow_pool)
        features, truth, losses, in_accuracies, out_accuracies = [], [], [], [], []
        for shadow in range(self.num_shadows):
            inside, outside = _stratified_halves(pool_labels, derive_seed(self.seed, "mia-shadow-split", shadow))
            with torch.random.fork_rng(devices=[]):  # seeded init without moving the caller's RNG
                torch.manual_seed(derive_seed(self.seed, "mia-shadow-init", shadow))
                model = self.model_factory()
            train_local(
                model,
                Subset(self.shadow_pool, inside.tolist()),
                self.shadow_training,
                self.device,
                seed=derive_seed(self.seed, "mia-shadow-train", shadow),
            )
            for rows, is_member, accuracies in ((inside, 1, in_accuracies), (outside, 0, out_accuracies)):
                part = Subset(self.shadow_pool, rows.tolist())
                logits, labels = model_outputs(model, part, self.device, self.batch_size)
                features.append(attack_features(logits, labels))
                losses.append(per_example_loss(logits, labels))
                truth.append(np.full(len(labels), is_member))
                accuracies.append(accuracy(logits, labels))
        features_all, truth_all = np.concatenate(features), np.concatenate(truth)
        # A linear model on standardised features: with a few hundred shadow examples a flexible
        # classifier would learn the shadows' noise; AUC only needs a good ranking.
        self.attack_model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
        self.attack_model.fit(features_all, truth_all)
        is_in = truth_all == 1
        loss_scores = -np.concatenate(losses)
        decision = self.attack_model.decision_function(features_all)
        self.shadow_scores = {
            "loss": (loss_scores[is_in], loss_scores[~is_in]),
            "shadow": (decision[is_in], decision[~is_in]),
        }
        self.loss_threshold = fit_threshold(*self.shadow_scores["loss"])
        self.shadow_threshold = fit_threshold(*self.shadow_scores["shadow"])
        self.summary = {
            "num_shadows": self.num_shadows,
            "shadow_pool_size": len(self.shadow_pool),
            "shadow_in_accuracy": float(np.mean(in_accuracies)),
            "shadow_out_accuracy": float(np.mean(out_accuracies)),
            "attack_train_auc": float(roc_auc_score(truth_all, decision)),
            # "member iff loss <= this" (nats), fit on the shadows
            "loss_threshold_nats": -self.loss_threshold,
            "shadow_threshold": self.shadow_threshold,
        }
        return self

    def attack(self, model: nn.Module, members: Dataset, nonmembers: Dataset) -> dict[str, float | int | str]:
        """Attack ``model``: members (the forget set) against non-members (unseen test examples)."""
        for name, dataset in (("members (forget set)", members), ("non-members", nonmembers)):
            if len(dataset) == 0:
                raise ValueError(f"{name} is empty: membership inference needs examples on both sides")
        overlap = _shared_rows(members, nonmembers)
        if overlap:
            raise ValueError(f"members and non-members share {overlap} rows of the same data set")
        if self.uses_shadow_models:
            for name, dataset in (("members", members), ("non-members", nonmembers)):
                overlap = _shared_rows(self.shadow_pool, dataset)
                if overlap:
                    raise ValueError(f"shadow_pool shares {overlap} rows with the {name}; pass disjoint data")
        member_logits, member_labels = model_outputs(model, members, self.device, self.batch_size)
        nonmember_logits, nonmember_labels = model_outputs(model, nonmembers, self.device, self.batch_size)
        return self.attack_outputs(member_logits, member_labels, nonmember_logits, nonmember_labels)

    def attack_outputs(
        self,
        member_logits: torch.Tensor,
        member_labels: torch.Tensor,
        nonmember_logits: torch.Tensor,
        nonmember_labels: torch.Tensor,
    ) -> dict[str, float | int | str]:
        """The same attack on logits computed elsewhere (labels int64, logits N x C)."""
        if not self.fitted:
            raise RuntimeError("MembershipInference.fit() must run before attack()")
        if self.match_classes:
            member_weights, nonmember_weights = class_matching_weights(member_labels.numpy(), nonmember_labels.numpy())
        else:
            member_weights, nonmember_weights = np.ones(len(member_labels)), np.ones(len(nonmember_labels))

        def numbers(member_scores: np.ndarray, nonmember_scores: np.ndarray, threshold: float) -> tuple[float, float]:
            auc = membership_auc(member_scores, nonmember_scores, member_weights, nonmember_weights)
            if math.isnan(threshold):  # no shadows: nothing to fit a threshold on
                return auc, math.nan
            return auc, balanced_accuracy(member_scores, nonmember_scores, threshold, member_weights, nonmember_weights)

        loss_auc, loss_success = numbers(
            -per_example_loss(member_logits, member_labels),
            -per_example_loss(nonmember_logits, nonmember_labels),
            self.loss_threshold,
        )
        result: dict[str, float | int | str] = {
            "mia_loss_auc": loss_auc,
            "mia_loss_success": loss_success,
            "mia_shadow_auc": math.nan,
            "mia_shadow_success": math.nan,
        }
        if self.uses_shadow_models:
            shadow_auc, shadow_success = numbers(
                self.attack_model.decision_function(attack_features(member_logits, member_labels)),
                self.attack_model.decision_function(attack_features(nonmember_logits, nonmember_labels)),
                self.shadow_threshold,
            )
            result.update(mia_shadow_auc=shadow_auc, mia_shadow_success=shadow_success)
        # The headline is one attack chosen before seeing any model (both of its numbers, so AUC and
        # success describe one attack): a maximum over attacks would be biased above chance.
        chosen = self.headline
        result.update(
            mia_auc=result[f"mia_{chosen}_auc"],
            mia_success=result[f"mia_{chosen}_success"],
            mia_attack=ATTACK_NAMES[chosen],
            mia_members=int(np.count_nonzero(member_weights)),
            mia_nonmembers=int(np.count_nonzero(nonmember_weights)),
        )
        return result
