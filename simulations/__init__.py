"""Presets (TOML files of run-config keys) and the in-process simulation runner."""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

from fedunlearn.errors import ConfigError


def preset_paths() -> dict[str, Path]:
    folder = resources.files(__name__)
    return {
        Path(entry.name).stem: Path(str(entry))
        for entry in folder.iterdir()
        if entry.name.endswith(".toml")
    }


def preset_path(name: str) -> Path:
    presets = preset_paths()
    if name not in presets:
        raise ConfigError("--preset", name, sorted(presets))
    return presets[name]


def preset_description(path: Path) -> str:
    with path.open("rb") as handle:
        return str(tomllib.load(handle).get("description", ""))
