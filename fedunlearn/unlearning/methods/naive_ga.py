"""Naive gradient ascent (NaiveGA, the HF-KCU paper's baseline): the affected client climbs the loss
on its own data for ``ga-epochs`` epochs and sends the change.

Without a stop rule it reproduces the paper's collapse (its Table 1: 10 % accuracy on CIFAR-10);
``ga-stop-forget-accuracy`` > 0 stops as soon as the client's accuracy on its data falls to that level.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn

from fedunlearn.config import ConfigKey, closed_unit_interval, positive_float, positive_int
from fedunlearn.curvature import Batches, resolve_param_names
from fedunlearn.training import derive_seed, objective, streamed_accuracy
from fedunlearn.unlearning.api import ClientContext, ClientUpdate
from fedunlearn.unlearning.client_side import ClientSideMethod
from fedunlearn.unlearning.influence import norm_of
from fedunlearn.unlearning.objective import count_examples, objective_gradient
from fedunlearn.unlearning.registry import register


@register("naive-ga")
class NaiveGradientAscent(ClientSideMethod):
    summary = "gradient ascent on the deleted client's data (the HF-KCU paper's NaiveGA)"
    config_keys = (
        ConfigKey("ga-epochs", 10, "naive-ga: epochs of gradient ascent on the deleted client's data (the HF-KCU paper's 10).", check=positive_int),
        ConfigKey("ga-lr", 0.01, "naive-ga: ascent learning rate (plain SGD).", check=positive_float),
        ConfigKey("ga-stop-forget-accuracy", 0.0, "naive-ga: stop once the client's accuracy on its data is at most this; 0 = never (the paper's setting).", check=closed_unit_interval),
    )

    def solve(self, model: nn.Module, forget_batches: Batches, context: ClientContext) -> ClientUpdate:
        start = time.perf_counter()
        config = self.config
        names = resolve_param_names(model)
        forget_gradient_norm = norm_of(objective_gradient(model, names, forget_batches))
        original = {name: p.detach().clone() for name, p in model.named_parameters()}
        stop_at = float(config["ga-stop-forget-accuracy"])
        optimizer = torch.optim.SGD(model.parameters(), lr=float(config["ga-lr"]))
        generator = torch.Generator().manual_seed(derive_seed(context.seed, "naive-ga", context.partition_id))
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
            accuracy_by_epoch.append(streamed_accuracy(model.eval(), forget_batches))
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
                "final_forget_accuracy": accuracy_by_epoch[-1] if accuracy_by_epoch else streamed_accuracy(model.eval(), forget_batches),
                "seconds": time.perf_counter() - start,
            },
        )
