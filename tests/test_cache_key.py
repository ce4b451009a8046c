"""The retrain cache key changes with what determines the retrained model, and only with that."""

import sys

from fedunlearn import config as run_config
from fedunlearn import retrain_cache


def _key(**overrides):
    return retrain_cache.retrain_key(run_config.resolve(overrides), [0], 5)


def test_the_key_follows_the_training_code(tmp_path, monkeypatch):
    module = tmp_path / "fedunlearn_probe_trainer.py"
    module.write_text("STEP = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(retrain_cache, "TRAINING_MODULES", retrain_cache.TRAINING_MODULES + ("fedunlearn_probe_trainer",))
    retrain_cache.training_code_hash.cache_clear()
    before = _key()
    module.write_text("STEP = -1  # a changed update rule\n")
    retrain_cache.training_code_hash.cache_clear()
    assert _key() != before
    retrain_cache.training_code_hash.cache_clear()
    sys.modules.pop("fedunlearn_probe_trainer", None)


def test_the_key_follows_training_settings_and_not_evaluation_or_unlearning_settings():
    base = _key()
    for changed in ({"lr": 0.02}, {"seed": 1}, {"lr-decay": 0.9}, {"forget-share": 0.2}):
        assert _key(**changed) != base, changed
    for unchanged in ({"unlearn-methods": "kfac"}, {"mia-shadows": 0}, {"damping": 0.5}, {"seeds": "3"}):
        assert _key(**unchanged) == base, unchanged
