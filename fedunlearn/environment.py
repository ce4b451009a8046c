"""Process environment for quiet, tidy runs: a project-local cache, telemetry off, no log spam.

Must run before ``flwr`` or ``ray`` is imported: both read these variables at import time.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path

# Ray puts Unix sockets under its temp dir; their paths must stay under 107 bytes.
RAY_TEMP_DIR_MAX_LENGTH = 60


def cache_dir() -> Path:
    """``$FEDUNLEARN_CACHE`` or ``.cache`` in the working directory (gitignored)."""
    return Path(os.environ.get("FEDUNLEARN_CACHE", ".cache")).expanduser().resolve()


def ray_temp_dir() -> Path:
    preferred = cache_dir() / "ray"
    if len(str(preferred)) <= RAY_TEMP_DIR_MAX_LENGTH:
        return preferred
    return Path(tempfile.gettempdir()) / f"fedunlearn-ray-{os.getuid()}"


def prepare_environment() -> Path:
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    # Absolute, so Ray workers (other processes, maybe another cwd) find the same cache.
    os.environ["FEDUNLEARN_CACHE"] = str(cache)
    os.environ.setdefault("FLWR_HOME", str(cache / "flwr-home"))
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DISABLE_IMPORT_WARNING", "1")
    os.environ.setdefault("HF_DATASETS_CACHE", str(cache / "hf-datasets"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return cache


class _DropKnownNoise(logging.Filter):
    """Drop Flower's per-run notices that say nothing about this run."""

    NOISE = ("run_simulation` function is deprecated", "DEPRECATED FEATURE", "fraction_evaluate is set to 0.0")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.NOISE)


def quiet_logging(verbose: bool = False) -> None:
    """Call after importing flwr: its import sets its logger to DEBUG and adds a console handler."""
    level = logging.INFO if verbose else logging.WARNING
    flower = logging.getLogger("flwr")
    for handler in flower.handlers:
        handler.setLevel(level)
        handler.addFilter(_DropKnownNoise())
    logging.getLogger("ray").setLevel(logging.INFO if verbose else logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="ray")
