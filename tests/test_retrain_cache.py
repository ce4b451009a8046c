"""The retrain oracle's cache (fedunlearn/retrain_cache.py) gives back exactly what a fresh retrain gives.

In-process (tests/fake_grid.py): the real ServerApp job and ClientApp, no Ray. A cache that stored the
wrong model (the trained one, a half-trained one), loaded a stale entry for another deletion, or
retrained anyway fails here.
"""

from __future__ import annotations

import torch

from clients.client_app import build_client_app
from fake_grid import FakeGrid
from fedunlearn import config as run_config
from fedunlearn.environment import quiet_logging
from strategies.server_app import FederatedJob

quiet_logging()

BASE = {"model": "logreg", "num-clients": 4, "num-rounds": 3, "local-epochs": 1, "mia-shadows": 0,
        "unlearn-methods": "finetune", "finetune-rounds": 1, "forget-clients": "1"}


def _run(out_dir, **overrides):
    """One job; returns (its retrained state, the retrain info the job used, the record)."""
    config = run_config.resolve({**BASE, "out-dir": str(out_dir)}, overrides)
    job = FederatedJob(FakeGrid(build_client_app(bound_config=config), 4), config, None, None)
    retrain, seen = job._retrain, {}

    def recording_retrain(*args, **kwargs):
        state, info = retrain(*args, **kwargs)
        if "state" not in seen:  # the oracle (a later call may retrain again for other purposes)
            seen.update(state={name: value.clone() for name, value in state.items()}, info=info)
        return state, info

    job._retrain = recording_retrain
    record = job.run()
    return seen["state"], seen["info"], record


def _retrain_messages(record) -> int:
    return sum(1 for entry in record.communication["log"] if entry["phase"] == "retrain")


def test_a_cached_oracle_equals_a_fresh_retrain_bit_for_bit(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDUNLEARN_CACHE", str(tmp_path / "cache"))
    first_state, first_info, first = _run(tmp_path / "first")
    assert first_info["from_cache"] is False and _retrain_messages(first) > 0

    cached_state, cached_info, cached = _run(tmp_path / "cached")
    assert cached_info["from_cache"] is True
    assert cached.methods["retrain"]["retrain_from_cache"] is True
    assert _retrain_messages(cached) == 0  # loaded, not retrained
    assert cached.methods["retrain"]["seconds"] == first.methods["retrain"]["seconds"]  # the run that trained it

    fresh_state, fresh_info, fresh = _run(tmp_path / "fresh", **{"retrain-cache": False})
    assert fresh_info["from_cache"] is False and _retrain_messages(fresh) > 0
    assert cached_state.keys() == fresh_state.keys()
    for name in fresh_state:
        assert torch.equal(cached_state[name], fresh_state[name]), name
    # The oracle is not the trained model: a cache that kept θ* would have failed above.
    trained = torch.load(tmp_path / "fresh" / "global_model.pt")
    assert not all(torch.equal(trained[name], fresh_state[name]) for name in fresh_state)
    # And every score against the oracle is the same whether it came from the cache or not.
    for name in ("original", "finetune"):
        for key in ("kl_to_retrain", "logit_mse_to_retrain", "param_gap", "agreement_with_retrain"):
            assert cached.methods[name][key] == fresh.methods[name][key], (name, key)


def test_another_deletion_or_seed_does_not_hit_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDUNLEARN_CACHE", str(tmp_path / "cache"))
    _, first_info, _ = _run(tmp_path / "first")
    assert first_info["from_cache"] is False
    for label, overrides in (("other-client", {"forget-clients": "2"}), ("other-rounds", {"num-rounds": 2})):
        _, info, _ = _run(tmp_path / label, **overrides)
        assert info["from_cache"] is False, label
