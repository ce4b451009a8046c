"""Naive gradient ascent (NaiveGA, the HF-KCU paper's baseline): the affected client climbs the loss
on its own data for ``ga-epochs`` epochs and sends the change.

Without a stop rule it reproduces the paper's collapse (its Table 1: 10 % accuracy on CIFAR-10);
``ga-stop-forget-accuracy`` > 0 stops as soon as the client's accuracy on its data falls to that level.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn as nn

from fedunlearn.curvature import Batches, resolve_param_names
from fedunlearn.training import derive_seed, objective
from fedunlearn.unlearning.base import ClientUpdate
from fedunlearn.unlearning.influence import norm_of
from fedunlearn.unlearning.objective import count_examples, objective_gradient


@torch.no_grad()
def _accuracy(model: nn.Module, batches: Batches) -> float:
    correct = sum(int((model(x).argmax(dim=1) == y).sum()) for x, y in batches)
    return correct / max(count_examples(batches), 1)


class NaiveGradientAscent:
    name = "naive-ga"
    runs_on = "client"

    def solve(self, model: nn.Module, forget_batches: Batches, influence_weight: float, config: dict[str, Any]) -> ClientUpdate:
        start = time.perf_counter()
        names = resolve_param_names(model)
        forget_gradient_norm = norm_of(objective_gradient(model, names, forget_batches))
        original = {name: p.detach().clone() for name, p in model.named_parameters()}
        stop_at = float(config["ga-stop-forget-accuracy"])
        optimizer = torch.optim.SGD(model.parameters(), lr=float(config["ga-lr"]))
        generator = torch.Generator().manual_seed(derive_seed(config["seed"], "naive-ga", config.get("partition-id", 0)))
        epochs = int(config["ga-epochs"])
        epochs_run, stopped_early, accuracy_by_epoch = 0, False, []
        for _ in range(epochs):
            model.train()
            for index in torch.randperm(len(forget_batches), generator=generator).tolist():
                inputs, targets = forget_batches[index]
                optimizer.zero_grad(set_to_none=True)
                (-objective(model, model(inputs), targets)).backward()  # ascent: minimise the negated loss
                optimizer.step()
            epochs_run += 1
            accuracy_by_epoch.append(_accuracy(model.eval(), forget_batches))
            if stop_at > 0 and accuracy_by_epoch[-1] <= stop_at:
                stopped_early = epochs_run < epochs
                break
        model.eval()
        params = dict(model.named_parameters())
        delta = [(params[name].detach() - original[name]) for name in names]
        return ClientUpdate(
            param_names=names,
            delta=delta,
            forget_gradient_norm=forget_gradient_norm,
            num_forget_examples=count_examples(forget_batches),
            diagnostics={
                "epochs_run": epochs_run,
                "stopped_early": stopped_early,
                "forget_accuracy_by_epoch": accuracy_by_epoch,
                "final_forget_accuracy": accuracy_by_epoch[-1] if accuracy_by_epoch else _accuracy(model, forget_batches),
                "seconds": time.perf_counter() - start,
            },
        )
