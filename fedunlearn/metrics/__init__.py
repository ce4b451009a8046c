"""Evaluation of unlearning: each model against the retrained oracle, and membership inference.

``UnlearningEvaluator(...).evaluate(model)`` gives every number ``results.json`` records per model
(:data:`METRIC_KEYS`); the functions below it are usable on their own. The per-example attack
against shadow federations (U-LiRA) is :class:`LiraShadows` (:data:`ULIRA_KEYS`). Definitions:
docs/metrics.md.
"""

from fedunlearn.metrics.evaluator import (
    METRIC_KEYS,
    MIA_KEYS,
    RETRAIN_KEYS,
    UnlearningEvaluator,
    compare_to_retrain,
    evaluate_model,
)
from fedunlearn.metrics.functional import (
    CF_MIN_DENOMINATOR,
    accuracy,
    causal_faithfulness,
    kl_divergence,
    logit_mse,
    model_outputs,
    parameter_gap,
    prediction_agreement,
)
from fedunlearn.metrics.lira import ULIRA_KEYS, LiraShadows, tpr_at_fpr
from fedunlearn.metrics.membership import (
    MembershipInference,
    attack_features,
    balanced_accuracy,
    class_matching_weights,
    fit_threshold,
    logit_scaled_confidence,
    membership_auc,
    per_example_loss,
)
from fedunlearn.metrics.timing import speedup, stopwatch

__all__ = [
    "METRIC_KEYS",
    "MIA_KEYS",
    "RETRAIN_KEYS",
    "UnlearningEvaluator",
    "compare_to_retrain",
    "evaluate_model",
    "CF_MIN_DENOMINATOR",
    "accuracy",
    "causal_faithfulness",
    "kl_divergence",
    "logit_mse",
    "model_outputs",
    "parameter_gap",
    "prediction_agreement",
    "LiraShadows",
    "ULIRA_KEYS",
    "tpr_at_fpr",
    "MembershipInference",
    "attack_features",
    "balanced_accuracy",
    "class_matching_weights",
    "fit_threshold",
    "logit_scaled_confidence",
    "membership_auc",
    "per_example_loss",
    "speedup",
    "stopwatch",
]
