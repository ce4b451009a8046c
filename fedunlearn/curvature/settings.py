"""The solver settings of the curvature core, as one typed, immutable object.

Every field is a run-config key (``cg_iters`` is ``cg-iters``, and so on). There are no defaults
here: :meth:`SolverSettings.from_config` takes every key missing from a mapping from
``fedunlearn.config`` (the single source of truth) and checks every value against that schema.
Variants are made with :meth:`SolverSettings.replace` (``dataclasses.replace``), which checks again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedunlearn import config as run_config


def config_key(field_name: str) -> str:
    """The run-config key of a settings field: ``cg_iters`` -> ``cg-iters``."""
    return field_name.replace("_", "-")


@dataclass(frozen=True)
class SolverSettings:
    damping: float
    curvature: str
    negative_curvature: str
    cg_iters: int
    cg_tol: float
    curvature_batch_size: int
    factor_solver: str
    kfac_rank: int
    nystrom_rank: int
    mpo_threshold: int
    factor_memory_budget: int
    prop2_fallback: str
    kfac_uncovered: str
    seed: int

    def __post_init__(self) -> None:
        # Coerced to the schema's type and checked against its choices / range (ConfigError naming the key).
        schema = run_config.keys_by_name()
        for field in dataclasses.fields(self):
            key = schema[config_key(field.name)]
            object.__setattr__(self, field.name, run_config.coerce_value(key, getattr(self, field.name)))

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The run-config keys the settings read, in field order."""
        return tuple(config_key(field.name) for field in dataclasses.fields(cls))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SolverSettings:
        """The settings from a kebab-case run config; keys it lacks take ``fedunlearn.config.defaults()``.
        Keys that are not solver settings are ignored."""
        defaults = run_config.defaults()
        return cls(
            **{field.name: config.get(config_key(field.name), defaults[config_key(field.name)]) for field in dataclasses.fields(cls)}
        )

    @classmethod
    def defaults(cls) -> SolverSettings:
        return cls.from_config({})

    def replace(self, **changes: Any) -> SolverSettings:
        return dataclasses.replace(self, **changes)

    def with_damping(self, damping: float) -> SolverSettings:
        return dataclasses.replace(self, damping=damping)

    def to_config(self) -> dict[str, Any]:
        """The settings as kebab-case run-config entries."""
        return {config_key(field.name): getattr(self, field.name) for field in dataclasses.fields(self)}
