import json
import math
import os
import subprocess
import sys

import pytest
import torch

from fedunlearn.models import build_model
from fedunlearn.unlearning.methods.federaser import calibrated_update


def test_calibration_keeps_the_stored_magnitude_and_the_fresh_direction():
    stored = {"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.5])}
    fresh = {"w": torch.tensor([0.0, -2.0]), "b": torch.tensor([0.0])}
    calibrated = calibrated_update(stored, fresh)
    assert torch.allclose(calibrated["w"], torch.tensor([0.0, -5.0]))  # norm 5, direction of fresh
    assert torch.equal(calibrated["b"], torch.zeros(1))  # no fresh direction: no step


@pytest.mark.simulation
def test_federaser_stores_rounds_over_interval_times_clients_updates(tmp_path, project_cache):
    env = dict(os.environ, FEDUNLEARN_CACHE=str(project_cache), COLUMNS="160")
    run_config = "num-clients=4 num-rounds=5 federaser-interval=2 local-epochs=1 forget-clients=1 unlearn-methods=federaser mia-shadows=0"
    completed = subprocess.run(
        [sys.executable, "-m", "fedunlearn.cli", "run", "--run-config", run_config, "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    entry = results["methods"]["federaser"]
    stored_rounds = math.ceil(5 / 2)  # rounds 1, 3, 5
    assert entry["details"]["replayed_rounds"] == [1, 3, 5]
    model_bytes = sum(p.numel() * 4 for p in build_model("simple-cnn", (1, 8, 8), 10).state_dict().values())
    assert entry["storage_bytes"] == stored_rounds * 4 * model_bytes
    # Calibration trains the remaining clients only, one round per stored round.
    assert entry["communication_rounds"] == stored_rounds
    calibration = [e for e in results["communication"]["log"] if e["phase"] == "unlearning: federaser"]
    assert len(calibration) == stored_rounds * 3 and all(e["partition"] != 1 for e in calibration)
