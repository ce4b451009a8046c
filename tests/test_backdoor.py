"""The backdoor case study: poisoning is real, measurable, and removed by retraining."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fedunlearn import config as run_config
from fedunlearn.data.backdoor import Trigger, triggered_test_set
from fedunlearn.errors import ConfigError
from fedunlearn.federation import build_federation


def test_the_malicious_client_and_only_it_holds_triggered_relabelled_images():
    config = run_config.resolve({"partition": "iid", "backdoor-client": 2, "poison-fraction": 0.5, "target-class": 7, "trigger-size": 2})
    clean = build_federation(run_config.resolve({"partition": "iid"}))
    poisoned = build_federation(config)
    changed = (poisoned.data.train.tensors[0] != clean.data.train.tensors[0]).flatten(1).any(dim=1)
    changed_rows = set(torch.nonzero(changed).flatten().tolist())
    assert changed_rows <= set(poisoned.partitioning.rows_of(2).tolist())
    assert len(changed_rows) == round(0.5 * poisoned.partitioning.sizes[2])
    rows = torch.tensor(sorted(changed_rows))
    assert (poisoned.data.train.tensors[1][rows] == 7).all()
    corner = poisoned.data.train.tensors[0][rows][..., -2:, -2:]
    assert torch.all(corner == clean.data.train.tensors[0].max())
    assert torch.equal(poisoned.data.test.tensors[0], clean.data.test.tensors[0])  # the test set stays clean


def test_triggered_test_set_excludes_the_target_class():
    images = torch.zeros(4, 1, 8, 8)
    labels = torch.tensor([0, 1, 0, 3])
    triggered = triggered_test_set(torch.utils.data.TensorDataset(images, labels), Trigger(3, "top-left", 9.0), 0)
    assert triggered.tensors[1].tolist() == [1, 3]
    assert triggered.tensors[0][:, :, :3, :3].eq(9.0).all() and triggered.tensors[0][:, :, 3:, :].eq(0).all()


def test_bad_backdoor_settings_are_config_errors():
    with pytest.raises(ConfigError):
        run_config.resolve({"num-clients": 5, "backdoor-client": 5})
    with pytest.raises(ConfigError):
        build_federation(run_config.resolve({"backdoor-client": 0, "target-class": 10}))


@pytest.mark.simulation
def test_backdoor_preset_poisoned_asr_is_high_and_retrained_low(tmp_path, project_cache):
    env = dict(os.environ, FEDUNLEARN_CACHE=str(project_cache), COLUMNS="160")
    completed = subprocess.run(
        [sys.executable, "-m", "fedunlearn.cli", "run", "--preset", "backdoor", "--run-config",
         "unlearn-methods=hf-kcu,naive-ga mia-shadows=0", "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    methods = json.loads((tmp_path / "results.json").read_text())["methods"]
    print({name: (round(m["test_accuracy"], 3), round(m["asr"], 3)) for name, m in methods.items()})
    original, retrain, hf_kcu, naive_ga = (methods[name] for name in ("original", "retrain", "hf-kcu", "naive-ga"))
    assert original["asr"] > 0.5
    assert retrain["asr"] < 0.1
    # hf-kcu (measured: clean 0.936, ASR 0.704 against 0.950 / 0.741): a small step that keeps the clean
    # accuracy and lowers the ASR a little, far from removing the backdoor (the paper's Table 3: 84 % -> 71 %).
    assert hf_kcu["test_accuracy"] >= original["test_accuracy"] - 0.03
    assert hf_kcu["asr"] < original["asr"]
    assert hf_kcu["asr_reduction"] == pytest.approx((original["asr"] - hf_kcu["asr"]) / original["asr"])
    # naive-ga (measured: clean 0.10, ASR 1.0): ten epochs of ascent collapse the model to one class, the
    # paper's failure mode; descent instead of ascent would keep it near 0.95. (Its lower forget accuracy
    # on clean data is tested in test_gradient_ascent.py.)
    assert naive_ga["test_accuracy"] < 0.2
    assert all("asr" in entry and "asr_reduction" in entry for entry in methods.values())
    assert "ASR" in completed.stdout
