import os
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): on two
    cores shared with other jobs, one thread avoids oversubscription stalls in many small products."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def project_cache(tmp_path_factory) -> Path:
    """One cache for the whole test session (partitions, Ray's temp dir), never the user's."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def run_cli(project_cache, tmp_path):
    """Run the real ``fedunlearn`` CLI in a subprocess (Ray and Flower start fresh each time)."""

    def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        env = dict(os.environ, FEDUNLEARN_CACHE=str(project_cache), COLUMNS="120")
        return subprocess.run(
            [sys.executable, "-m", "fedunlearn.cli", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run
