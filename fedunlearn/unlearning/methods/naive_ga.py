"""Naive gradient ascent (NaiveGA, the HF-KCU paper's baseline): the affected client climbs the
cross-entropy on its own data for ``ga-epochs`` epochs of plain SGD at ``ga-lr``, in mini-batches of the
run's ``batch-size`` reshuffled every epoch (as local training draws them), and sends the change.

Without a stop rule it reproduces the paper's collapse (its Table 1: 10 % accuracy on CIFAR-10);
``ga-stop-forget-accuracy`` > 0 stops as soon as the client's accuracy on its data falls to that level.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from fedunlearn.config import ConfigKey, closed_unit_interval, positive_float, positive_int
from fedunlearn.curvature import Batches, resolve_param_names
from fedunlearn.training import derive_seed, streamed_accuracy
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
        # The client app cuts the data at curvature-batch-size; the ascent uses the training batch size.
        inputs_all = torch.cat([inputs for inputs, _ in forget_batches])
        targets_all = torch.cat([targets for _, targets in forget_batches])
        batch_size = int(config["batch-size"])
        epochs_run, stopped_early, accuracy_by_epoch, steps = 0, False, [], 0
        for _ in range(epochs):
            model.train()
            order = torch.randperm(len(targets_all), generator=generator).to(targets_all.device)
            for batch in order.split(batch_size):
                inputs, targets = inputs_all[batch], targets_all[batch]
                optimizer.zero_grad(set_to_none=True)
                (-F.cross_entropy(model(inputs), targets)).backward()  # ascent: minimise the negated loss
                optimizer.step()
                steps += 1
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
                "batch_size": batch_size,
                "optimizer_steps": steps,
                "stopped_early": stopped_early,
                "forget_accuracy_by_epoch": accuracy_by_epoch,
                "final_forget_accuracy": accuracy_by_epoch[-1] if accuracy_by_epoch else streamed_accuracy(model.eval(), forget_batches),
                "seconds": time.perf_counter() - start,
            },
        )
