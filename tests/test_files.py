"""Atomic writes and strict JSON (fedunlearn/files.py)."""

import json
import math

import numpy as np
import pytest
import torch

from fedunlearn.files import (
    atomic_open,
    atomic_savez,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_text,
    json_ready,
    temporary_name,
)


def _leftovers(folder):
    return [path.name for path in folder.iterdir() if path.name.endswith(".tmp")]


def test_every_writer_replaces_the_file_and_leaves_no_temporary(tmp_path):
    text, raw, arrays = tmp_path / "a" / "x.json", tmp_path / "b" / "x.bin", tmp_path / "c" / "x.npz"
    atomic_write_text(text, "old")
    atomic_write_text(text, "new é\n")
    assert text.read_text(encoding="utf-8") == "new é\n"
    atomic_write_bytes(raw, b"\x00\x01")
    assert raw.read_bytes() == b"\x00\x01"
    atomic_savez(arrays, {"rows": np.arange(5)})  # no second .npz appended by numpy
    with np.load(arrays) as stored:
        assert stored.files == ["rows"] and np.array_equal(stored["rows"], np.arange(5))
    state = {"weight": torch.randn(3, 2)}
    atomic_torch_save(state, tmp_path / "d" / "model.pt")
    assert torch.equal(torch.load(tmp_path / "d" / "model.pt", weights_only=True)["weight"], state["weight"])
    for folder in ("a", "b", "c", "d"):
        assert _leftovers(tmp_path / folder) == []


def test_a_failed_write_keeps_the_previous_file_and_removes_its_temporary(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_text(path, "previous")
    with pytest.raises(RuntimeError), atomic_open(path, "w") as handle:
        handle.write("half")
        assert temporary_name(path).exists() and temporary_name(path).parent == path.parent
        raise RuntimeError("crash mid-write")
    assert path.read_text() == "previous" and _leftovers(tmp_path) == []
    with pytest.raises(ValueError):
        atomic_open(path, "a").__enter__()


def test_json_ready_turns_nan_and_inf_into_null_at_any_depth():
    document = {"cf": math.nan, "nested": {"speedup": math.inf, "list": [1.0, -math.inf, (2, math.nan)]},
                "tensor": torch.tensor([0.5, float("nan")]), "name": "loss-threshold", "n": 3}
    cleaned = json_ready(document)
    assert json.loads(json.dumps(cleaned, allow_nan=False)) == {
        "cf": None, "nested": {"speedup": None, "list": [1.0, None, [2, None]]},
        "tensor": [0.5, None], "name": "loss-threshold", "n": 3,
    }
    assert json_ready(np.float64(math.nan)) is None and json_ready(0.25) == 0.25
