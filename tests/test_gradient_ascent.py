import copy

import torch

from fedunlearn import config as run_config
from fedunlearn.federation import build_federation
from fedunlearn.training import LocalTrainingConfig, train_local
from fedunlearn.unlearning import ClientContext, create_method
from fedunlearn.unlearning.objective import batches_of


def _trained_client_model():
    federation = build_federation(run_config.resolve({"num-clients": 4, "seed": 2}))
    torch.manual_seed(0)
    model = federation.new_model()
    data = federation.client_data(0)
    train_local(model, data, LocalTrainingConfig(epochs=15, batch_size=32, lr=0.05, momentum=0.9), torch.device("cpu"), seed=0)
    return model, batches_of(data, 64)


def _accuracy(model, batches):
    with torch.no_grad():
        return sum(int((model(x).argmax(1) == y).sum()) for x, y in batches) / sum(len(y) for _, y in batches)


def _apply(model, update):
    changed = copy.deepcopy(model)
    params = dict(changed.named_parameters())
    with torch.no_grad():
        for name, delta in zip(update.param_names, update.delta):
            params[name].add_(delta)
    return changed


def _context():
    return ClientContext(partition_id=0, num_examples=0, total_examples=0, influence_weight=1.0, seed=0, device=torch.device("cpu"))


def test_naive_ga_lowers_forget_accuracy_and_can_stop_early():
    model, batches = _trained_client_model()
    before = _accuracy(model, batches)
    assert before > 0.9
    config = run_config.resolve({"ga-lr": 0.05})
    update = create_method("naive-ga", config).solve(copy.deepcopy(model), batches, _context())
    after = _accuracy(_apply(model, update), batches)
    assert update.diagnostics["epochs_run"] == 10 and not update.diagnostics["stopped_early"]
    assert after < 0.5 * before
    assert after == update.diagnostics["final_forget_accuracy"]

    stopping = run_config.resolve({"ga-lr": 0.05, "ga-stop-forget-accuracy": 0.95})
    stopped = create_method("naive-ga", stopping).solve(copy.deepcopy(model), batches, _context())
    assert stopped.diagnostics["stopped_early"] and stopped.diagnostics["epochs_run"] < 10
    assert stopped.diagnostics["final_forget_accuracy"] <= 0.95


def test_naive_ga_ascends_in_mini_batches_of_the_training_batch_size():
    """The client app hands the forget data over cut at curvature-batch-size (256); the ascent must use the
    run's batch-size (64, the paper's), reshuffled every epoch: ⌈n / 64⌉ optimiser steps per epoch, every
    example once per epoch, and batches that change between epochs. (With the 256-batches it took
    ⌈314 / 256⌉ = 2 steps per epoch on this client instead of 5.)"""
    model, _ = _trained_client_model()
    data = run_config.resolve({"num-clients": 4, "seed": 2})
    federation = build_federation(data)
    n = len(federation.client_data(0))
    curvature_batches = batches_of(federation.client_data(0), 256)
    assert n == 314 and len(curvature_batches) == 2  # as the client app cuts it
    config = run_config.resolve({"ga-epochs": 3, "batch-size": 64, "curvature-batch-size": 256})
    assert config["batch-size"] == 64

    model.eval()  # only the ascent runs in training mode (solve switches it)
    seen = []  # the inputs of every forward pass in training mode
    handle = model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()) if module.training else None)
    steps = []
    original_step = torch.optim.SGD.step

    def counting_step(self, *args, **kwargs):
        steps.append(1)
        return original_step(self, *args, **kwargs)

    torch.optim.SGD.step = counting_step
    try:
        update = create_method("naive-ga", config).solve(model, curvature_batches, _context())
    finally:
        torch.optim.SGD.step = original_step
        handle.remove()

    per_epoch = -(-n // 64)
    assert len(steps) == 3 * per_epoch == update.diagnostics["optimizer_steps"]
    assert [len(x) for x in seen] == ([64] * (n // 64) + ([n % 64] if n % 64 else [])) * 3
    epochs = [torch.cat(seen[e * per_epoch : (e + 1) * per_epoch]) for e in range(3)]
    everything = torch.cat([x for x, _ in curvature_batches])
    for epoch in epochs:  # every example exactly once per epoch
        assert torch.equal(epoch.flatten(1).sum(1).sort().values, everything.flatten(1).sum(1).sort().values)
    assert not torch.equal(seen[0], seen[per_epoch])  # reshuffled, not the same first batch again
