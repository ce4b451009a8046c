"""Files the project writes: atomically (a reader sees the old file or the new one, never half of one)
and, for JSON, strictly (no NaN).

Every writer goes through :func:`atomic_open`: it writes to a temporary name in the target's own
folder (unique per process, so concurrent writers — the CLI and Ray actors filling one cache — never
share one), flushes and fsyncs it, then renames it over the target. A failed write removes its
temporary file and leaves the previous file, if any, as it was.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch


def temporary_name(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place: same folder, hidden, per process."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """``with atomic_open(path) as handle: ...``: a handle on a temporary file that becomes ``path``
    when the block ends without an error. ``mode`` is ``"wb"`` or ``"w"`` (UTF-8 text)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes whole files: mode 'wb' or 'w', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_name(path)
    try:
        with temporary.open(mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_torch_save(obj: object, path: str | Path) -> None:
    """``torch.save(obj, path)``, atomically; ``torch.load`` reads it as any other checkpoint."""
    with atomic_open(path, "wb") as handle:
        torch.save(obj, handle)


def atomic_savez(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez(path, **arrays)``, atomically (to a handle, so numpy adds no ``.npz`` of its own)."""
    with atomic_open(path, "wb") as handle:
        np.savez(handle, **arrays)


def json_ready(value: Any) -> Any:
    """``value`` with every NaN and infinity replaced by None, so ``json.dumps(..., allow_nan=False)``
    writes null; recursive over dicts, lists and tuples (a tuple becomes a list), a tensor becomes its
    ``tolist()``. Anything else is returned as it is."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if isinstance(value, torch.Tensor):
        return json_ready(value.tolist())
    return value
