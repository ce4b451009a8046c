"""All metrics of one model at once, against the retrained oracle: what ``results.json`` records.

Build one :class:`UnlearningEvaluator` per run (it evaluates the retrained model's test outputs
and fits the membership attack once) and call ``evaluate(model)`` for ``original``, ``retrain``
and each unlearning method.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from fedunlearn.files import json_ready
from fedunlearn.metrics.functional import (
    CF_MIN_DENOMINATOR,
    _require_examples,
    accuracy,
    causal_faithfulness,
    kl_divergence,
    logit_mse,
    model_outputs,
    parameter_gap,
    prediction_agreement,
)
from fedunlearn.metrics.membership import MembershipInference

RETRAIN_KEYS = (
    "test_accuracy",
    "forget_accuracy",
    "retain_accuracy",
    "kl_to_retrain",
    "logit_mse_to_retrain",
    "agreement_with_retrain",
    "param_gap",
    "cf",
    # Signed: model − retrain (a method that beats retrain by training further is not closer to it).
    "test_accuracy_gap",
    "forget_accuracy_gap",
    "retain_accuracy_gap",
    # The same distances on the deleted data and on the remaining clients' data.
    "forget_kl_to_retrain",
    "forget_logit_mse_to_retrain",
    "forget_agreement_with_retrain",
    "retain_kl_to_retrain",
    "retain_logit_mse_to_retrain",
    "retain_agreement_with_retrain",
)
SPLITS = ("test", "forget", "retain")
MIA_KEYS = (
    "mia_auc",
    "mia_success",
    "mia_attack",
    "mia_shadow_auc",
    "mia_shadow_success",
    "mia_loss_auc",
    "mia_loss_success",
    "mia_members",
    "mia_nonmembers",
    "mia_auc_gap",
)
METRIC_KEYS = RETRAIN_KEYS + MIA_KEYS


class UnlearningEvaluator:
    """Everything a model is measured by, with the per-run work (oracle outputs, shadows) done once.

    ``membership`` is a :class:`MembershipInference` (fitted here if it is not yet); ``None`` runs
    the loss-threshold attack only. Members are ``forget_set``; non-members are
    ``mia_nonmembers`` (default: the whole ``test_set``), which must be disjoint from the shadow pool.
    """

    def __init__(
        self,
        *,
        original: nn.Module,
        retrained: nn.Module,
        test_set: Dataset,
        forget_set: Dataset,
        retain_set: Dataset,
        device: torch.device | str = "cpu",
        membership: MembershipInference | None = None,
        mia_nonmembers: Dataset | None = None,
        batch_size: int = 512,
        cf_min_denominator: float = CF_MIN_DENOMINATOR,
    ):
        for name, dataset in (("test_set", test_set), ("forget_set", forget_set), ("retain_set", retain_set)):
            _require_examples(dataset, name)
        # A copy: callers often load each model's state into one module, the oracle's included.
        self.retrained = copy.deepcopy(retrained)
        self.test_set, self.forget_set, self.retain_set = test_set, forget_set, retain_set
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.cf_min_denominator = cf_min_denominator
        if membership is None:
            membership = MembershipInference(None, None, device=self.device)
        self.membership = membership if membership.fitted else membership.fit()
        self.mia_nonmembers = test_set if mia_nonmembers is None else mia_nonmembers
        self.retrain_attack = self.membership.attack(self.retrained, forget_set, self.mia_nonmembers)
        self.reference = RetrainReference.of(retrained, test_set, forget_set, retain_set, self.device, batch_size)
        self.original_test_accuracy = accuracy(self._outputs(original, test_set)[0], self.reference.labels["test"])

    def _outputs(self, model: nn.Module, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        return model_outputs(model, dataset, self.device, self.batch_size)

    def compare(self, model: nn.Module) -> dict[str, float]:
        """Accuracies (fractions), divergences to the retrained model and CF; NaN where undefined."""
        return _retrain_comparison(
            model, self.retrained, self.reference, self.original_test_accuracy,
            self.test_set, self.forget_set, self.retain_set, self.device, self.batch_size, self.cf_min_denominator,
        )

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """:data:`RETRAIN_KEYS`, the attack's numbers and ``mia_auc_gap`` (the headline AUC minus the
        retrained model's: 0 = as exposed as a retrain), JSON-ready: undefined values are None."""
        metrics: dict[str, Any] = self.compare(model)
        attack = self.membership.attack(model, self.forget_set, self.mia_nonmembers)
        metrics.update(attack)
        metrics["mia_auc_gap"] = attack["mia_auc"] - self.retrain_attack["mia_auc"]
        return json_ready(metrics)


class RetrainReference:
    """The retrained model's logits and the labels on each split, computed once per run."""

    def __init__(self, logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]):
        self.logits, self.labels = logits, labels
        self.accuracy = {split: accuracy(logits[split], labels[split]) for split in logits}

    @classmethod
    def of(cls, retrained, test_set, forget_set, retain_set, device, batch_size) -> RetrainReference:
        logits, labels = {}, {}
        for split, dataset in zip(SPLITS, (test_set, forget_set, retain_set)):
            logits[split], labels[split] = model_outputs(retrained, dataset, device, batch_size)
        return cls(logits, labels)


def compare_to_retrain(
    model: nn.Module,
    retrained: nn.Module,
    original_test_accuracy: float,
    test_set: Dataset,
    forget_set: Dataset,
    retain_set: Dataset,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
) -> dict[str, float]:
    """:data:`RETRAIN_KEYS` for one model, given the original model's test accuracy (fraction); NaN CF if unstable."""
    for name, dataset in (("test_set", test_set), ("forget_set", forget_set), ("retain_set", retain_set)):
        _require_examples(dataset, name)
    reference = RetrainReference.of(retrained, test_set, forget_set, retain_set, device, batch_size)
    return _retrain_comparison(
        model, retrained, reference, original_test_accuracy,
        test_set, forget_set, retain_set, device, batch_size, CF_MIN_DENOMINATOR,
    )


def _retrain_comparison(
    model, retrained, reference: RetrainReference, original_test_accuracy,
    test_set, forget_set, retain_set, device, batch_size, cf_min_denominator,
) -> dict[str, float]:
    """:data:`RETRAIN_KEYS` of ``model``, given the retrained model's outputs (computed once per run)."""
    result: dict[str, float] = {}
    for split, dataset in zip(SPLITS, (test_set, forget_set, retain_set)):
        logits, _ = model_outputs(model, dataset, device, batch_size)
        retrain_logits, labels = reference.logits[split], reference.labels[split]
        prefix = "" if split == "test" else f"{split}_"
        result[f"{split}_accuracy"] = accuracy(logits, labels)
        result[f"{split}_accuracy_gap"] = result[f"{split}_accuracy"] - reference.accuracy[split]
        result[f"{prefix}kl_to_retrain"] = kl_divergence(retrain_logits, logits)
        result[f"{prefix}logit_mse_to_retrain"] = logit_mse(logits, retrain_logits)
        result[f"{prefix}agreement_with_retrain"] = prediction_agreement(logits, retrain_logits)
    # An ensemble (SISA) has no one weight vector to set beside the retrained model's.
    result["param_gap"] = parameter_gap(model, retrained) if getattr(model, "has_single_parameter_vector", True) else float("nan")
    result["cf"] = causal_faithfulness(original_test_accuracy, result["test_accuracy"], reference.accuracy["test"], cf_min_denominator)
    return {key: result[key] for key in RETRAIN_KEYS}


def evaluate_model(model: nn.Module, **evaluator_arguments: Any) -> dict[str, Any]:
    """One-off :meth:`UnlearningEvaluator.evaluate` (``evaluator_arguments``: the evaluator's keywords);
    build the evaluator yourself for several models."""
    return UnlearningEvaluator(**evaluator_arguments).evaluate(model)
