"""`flwr run .` on a SuperLink of our own (simulation runtime, loopback), status checked, all stopped."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.simulation


def test_flwr_run_on_our_own_superlink_completes_and_leaves_nothing_running(project_cache, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, FEDUNLEARN_CACHE=str(project_cache))
    completed = subprocess.run(
        [sys.executable, "-m", "simulations.flwr_local", "--run-config", "num-clients=3 num-rounds=2", "--out", str(out)],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "finished:completed" in completed.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["num-clients"] == 3 and len(results["partitions"]["sizes"]) == 3
    assert [entry["round"] for entry in results["rounds"]] == [0, 1, 2]
    assert results["final"]["test_accuracy"] > results["rounds"][0]["test_accuracy"]
    # Nothing of the SuperLink's process group is left running (zombies are dead, only unreaped).
    superlink_pid = int(re.search(r"flower-superlink \(pid (\d+)\)", completed.stdout).group(1))
    survivors = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, process_group = fields[0], int(fields[3])
        if process_group == superlink_pid and state != "Z":
            survivors.append(stat.parent.name)
    assert survivors == []
