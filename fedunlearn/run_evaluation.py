"""Evaluate every model of a run (original, retrain, each method) against the retrained oracle.

Test data is the held-out test set; ``forget`` is the deleted clients' data, ``retain`` every other
client's. The membership attack's members are the forget data, its non-members the test set, and its
shadow models train on the retain data (disjoint from both).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Subset

from fedunlearn.data.backdoor import attack_success_rate, trigger_for, triggered_test_set
from fedunlearn.federation import Federation
from fedunlearn.files import json_ready
from fedunlearn.environment import cache_dir
from fedunlearn.metrics import ULIRA_KEYS, LiraShadows, MembershipInference, UnlearningEvaluator
from fedunlearn.metrics.evaluator import MIA_KEYS
from fedunlearn.training import LocalTrainingConfig, derive_seed, loss_and_accuracy, streamed_accuracy


def forget_and_retain_sets(federation: Federation, forget_clients: list[int]) -> tuple[Subset | None, Subset]:
    partitioning = federation.partitioning
    forget_rows = [partitioning.rows_of(k) for k in forget_clients]
    retain_rows = [partitioning.rows_of(k) for k in range(partitioning.num_clients) if k not in set(forget_clients)]
    train = federation.data.train
    forget = Subset(train, np.concatenate(forget_rows).tolist()) if forget_rows else None
    return forget, Subset(train, np.concatenate(retain_rows).tolist())


def evaluate_models(
    federation: Federation,
    model: nn.Module,
    states: dict[str, dict[str, torch.Tensor]],
    forget_clients: list[int],
    device: torch.device,
    config: dict[str, Any],
    predictors: dict[str, nn.Module] | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    """Scores of every state (loaded into ``model``) and every predictor that is not one model's
    weights (SISA's ensembles), by name; and what the U-LiRA shadows were (None without them)."""
    forget_set, retain_set = forget_and_retain_sets(federation, forget_clients)
    if forget_set is None or "retrain" not in states:
        # Nothing deleted: the trained model's own scores only.
        model.load_state_dict(states["original"])
        test = loss_and_accuracy(model, federation.data.test, device)
        return {"original": {"test_accuracy": test["accuracy"], "test_loss": test["loss"],
                             "retain_accuracy": loss_and_accuracy(model, retain_set, device)["accuracy"]}}, None

    original = federation.new_model().to(device)
    original.load_state_dict(states["original"])
    retrained = federation.new_model().to(device)
    retrained.load_state_dict(states["retrain"])
    membership = None
    if config["mia-shadows"] > 0:
        membership = MembershipInference(
            model_factory=federation.new_model,
            shadow_pool=retain_set,
            shadow_training=LocalTrainingConfig(
                epochs=config["mia-shadow-epochs"], batch_size=config["batch-size"],
                lr=config["lr"], momentum=config["momentum"],
            ),
            device=device,
            seed=derive_seed(config["seed"], "membership-inference"),
            num_shadows=config["mia-shadows"],
        )
    evaluator = UnlearningEvaluator(
        original=original, retrained=retrained, test_set=federation.data.test,
        forget_set=forget_set, retain_set=retain_set, device=device, membership=membership,
    )
    lira = None
    if config["lira-shadows"] > 0:
        # Shadow federations with and without each client (cached; shared by every deletion).
        lira = LiraShadows.fit(federation, config, forget_clients, config["lira-shadows"], device,
                               cache_dir() / "lira", progress=on_phase)

    def score(name: str, predictor: nn.Module) -> None:
        try:
            scores[name] = evaluator.evaluate(predictor.to(device))
        except ValueError as error:
            # A diverged model (naive-ga's collapse) has infinite losses: the attack has nothing to rank.
            scores[name] = json_ready(evaluator.compare(predictor.to(device)))
            scores[name].update({key: None for key in MIA_KEYS}, mia_note=str(error))
        if lira is not None:
            try:
                scores[name].update(json_ready(lira.attack(predictor.to(device), retrained)))
            except ValueError as error:
                scores[name].update({key: None for key in ULIRA_KEYS}, ulira_note=str(error))
        scores[name]["test_loss"] = loss_and_accuracy(predictor, federation.data.test, device)["loss"]

    scores: dict[str, dict[str, Any]] = {}
    for name, state in states.items():
        model.load_state_dict(state)
        score(name, model)
    for name, predictor in (predictors or {}).items():
        score(name, predictor)
        if hasattr(predictor, "vote"):
            for split, dataset in (("test", federation.data.test), ("forget", forget_set), ("retain", retain_set)):
                scores[name][f"{split}_accuracy_vote"] = vote_accuracy(predictor, dataset, device)
    if config["backdoor-client"] >= 0:
        add_attack_success_rates(federation, model, states, scores, device, config, predictors or {})
    return scores, (None if lira is None else lira.summary)


def vote_accuracy(ensemble: nn.Module, dataset, device: torch.device) -> float:
    """Accuracy of the ensemble's majority vote (the main keys use its mean probability)."""
    ensemble.to(device).eval()
    return streamed_accuracy(ensemble.vote, dataset, device)


def add_attack_success_rates(federation, model, states, scores, device, config, predictors) -> None:
    """``asr`` per model and ``asr_reduction`` = (ASR(original) − ASR(model)) / ASR(original)."""
    trigger = trigger_for(config, federation.data.train.tensors[0])
    triggered = triggered_test_set(federation.data.test, trigger, config["target-class"])
    for name, state in states.items():
        model.load_state_dict(state)
        scores[name]["asr"] = attack_success_rate(model, triggered, config["target-class"], device)
    for name, predictor in predictors.items():
        scores[name]["asr"] = attack_success_rate(predictor.to(device), triggered, config["target-class"], device)
    baseline = scores["original"]["asr"]
    for name in scores:
        scores[name]["asr_reduction"] = (baseline - scores[name]["asr"]) / baseline if baseline > 0 else None
