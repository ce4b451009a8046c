"""Evaluation of unlearning: each model against the retrained oracle, and membership inference.

``UnlearningEvaluator(...).evaluate(model)`` gives every number ``results.json`` records per model
(:data:`METRIC_KEYS`); the functions below it are usable on their own. Definitions: docs/metrics.md.
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
from fedunlearn.metrics.membership import (
    MembershipInference,
    attack_features,
    auc_and_success,
    class_matching_weights,
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
    "MembershipInference",
    "attack_features",
    "auc_and_success",
    "class_matching_weights",
    "per_example_loss",
    "speedup",
    "stopwatch",
]
