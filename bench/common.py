"""What every benchmark script here shares: the machine record and the relative error."""

from __future__ import annotations

import os
import platform

import torch


def rel_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    """‖x − reference‖_F / ‖reference‖_F in float64."""
    x, reference = x.to(torch.float64), reference.to(torch.float64)
    return float(torch.linalg.matrix_norm(x - reference) / torch.linalg.matrix_norm(reference))


def machine() -> dict:
    """The ``machine`` record: CPU model, cores, torch threads and version, OpenMP wait policy, load average."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/loadavg") as f:
            load = f.read().split()[:3]
    except OSError:
        load = None
    return {"case": "machine", "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "torch": torch.__version__,
            "python": platform.python_version(), "load_average": load}
