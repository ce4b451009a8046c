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
