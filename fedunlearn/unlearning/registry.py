"""The method registry: every module in :mod:`fedunlearn.unlearning.methods` registers its class
with ``@register("name")``; the modules are found by listing that package, so adding a method is
adding one file there (and its test), nothing else.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from typing import Any

from fedunlearn.errors import ConfigError
from fedunlearn.unlearning.api import Method

_METHODS: dict[str, type[Method]] = {}
_QUERIES: dict[str, Callable] = {}
_loaded = False


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: ``@register("hf-kcu") class HFKCU(ClientSideMethod): ...``."""

    def decorate(cls: type[Method]) -> type[Method]:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"two unlearning methods are registered as {name!r}: {_METHODS[name]} and {cls}")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorate


def client_query(kind: str) -> Callable[[Callable], Callable]:
    """Function decorator: a ``query.<kind>`` the clients answer with ``function(model, names, batches, message_config)``."""

    if not kind.isidentifier():  # Flower registers ``query.<kind>`` handlers only under identifiers
        raise ValueError(f"client query kind {kind!r} must be a Python identifier (e.g. {kind.replace('-', '_')!r})")

    def decorate(function: Callable) -> Callable:
        _QUERIES[kind] = function
        return function

    return decorate


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from fedunlearn.unlearning import methods

    for module in sorted(pkgutil.iter_modules(methods.__path__), key=lambda m: m.name):
        importlib.import_module(f"{methods.__name__}.{module.name}")


def method_classes() -> Mapping[str, type[Method]]:
    _load()
    return dict(sorted(_METHODS.items()))


def split_label(label: str) -> tuple[str, dict[str, str]]:
    """``"hf-kcu[causal-weighting=off;scaling-constant=0]"`` -> ("hf-kcu", {key: text}): a method
    run with some of its own keys (or the solver's) set apart from the run's, e.g. an ablation."""
    label = label.strip()
    if "[" not in label:
        return label, {}
    base, _, rest = label.partition("[")
    if not rest.endswith("]") or not rest[:-1].strip():
        raise ConfigError("unlearn-methods", label, "a method name, optionally followed by [key=value;key=value]")
    overrides: dict[str, str] = {}
    for item in rest[:-1].split(";"):
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise ConfigError("unlearn-methods", label, "a method name, optionally followed by [key=value;key=value]")
        overrides[key.strip()] = value.strip()
    return base.strip(), overrides


def method_class(name: str) -> type[Method]:
    classes = method_classes()
    try:
        return classes[split_label(name)[0]]
    except KeyError:
        raise ConfigError("unlearn-methods", name, sorted(classes)) from None


def variant_config(label: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """The run config with a variant label's overrides, each checked against the schema. Only the
    method's own keys, the solver settings and ``PER_METHOD_KEYS`` (repair rounds) may be set per
    method: training is shared."""
    from fedunlearn import config as run_config
    from fedunlearn.curvature.settings import SolverSettings

    cls = method_class(label)
    _, overrides = split_label(label)
    allowed = {key.name for key in cls.config_keys} | set(SolverSettings.keys()) | set(run_config.PER_METHOD_KEYS)
    schema = run_config.keys_by_name()
    merged = dict(config)
    for key, text in overrides.items():
        if key not in allowed:
            raise ConfigError("unlearn-methods", label, sorted(allowed), reason=f"{key!r} cannot be set per method")
        merged[key] = run_config.coerce_value(schema[key], text)
    return merged


def create_method(name: str, config: Mapping[str, Any]) -> Method:
    """A fresh instance for one job (methods may keep state across training and unlearning). ``name``
    may be a variant label (:func:`split_label`); the instance then carries the label as its name
    and the overridden config."""
    method = method_class(name)(variant_config(name, config))
    if name != method.name:
        method.name = name  # results, ledger and the clients' train.unlearn requests use the label
    return method


def client_queries() -> Mapping[str, Callable]:
    _load()
    return dict(_QUERIES)


def parse_methods(text: str) -> list[str]:
    """The labels of ``unlearn-methods``: names, or variants ``name[key=value;...]``, each once."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    for name in names:
        method_class(name)
        if names.count(name) > 1:
            raise ConfigError("unlearn-methods", text, "each method (or variant) once", reason=f"{name!r} is listed twice")
    return names


def method_config_keys() -> list:
    """Every method's own run-config keys, in method order (deduplicated by name)."""
    seen, keys = set(), []
    for cls in method_classes().values():
        for key in cls.config_keys:
            if key.name not in seen:
                seen.add(key.name)
                keys.append(key)
    return keys


def describe_methods() -> str:
    """One paragraph per method: name, what it does, what it needs of training and the federation, its keys."""
    lines = []
    for name, cls in method_classes().items():
        needs = []
        requirements = cls.requirements
        if requirements.round_history is not None:
            every = requirements.round_history.interval_key
            needs.append(f"round history ({'every round' if every is None else 'every ' + every + ' rounds'})")
        if requirements.trains_constituents:
            needs.append("trains its own models after training")
        if requirements.per_round_statistics:
            needs.append("statistics every round")
        if requirements.client_solve:
            needs.append("solves on the affected clients (train.unlearn)")
        needs += [f"query.{kind}" for kind in requirements.client_queries]
        lines.append(f"{name}: {cls.summary or cls.__doc__ or ''}".rstrip())
        lines.append(f"    needs: {'; '.join(needs) or 'the trained model only'}")
        if cls.config_keys:
            lines.append(f"    keys: {', '.join(key.name for key in cls.config_keys)}")
    return "\n".join(lines) + "\n"
