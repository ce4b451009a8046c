"""The run configuration: every key, its default, its type and its valid values, in one place.

This table is the single source of truth. ``pyproject.toml``'s ``[tool.flwr.app.config]`` and the
README's key table are generated from it (``python -m fedunlearn.config --write``) and a test
keeps them in sync. Keys are kebab-case, as Flower's run config is.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedunlearn.errors import ConfigError

ConfigValue = bool | int | float | str


@dataclass(frozen=True)
class ConfigKey:
    name: str
    default: ConfigValue
    help: str
    choices: tuple[str, ...] | None = None
    # Returns a description of the valid range when the value is out of it, else None.
    check: Callable[[Any], str | None] | None = None

    @property
    def kind(self) -> type:
        return type(self.default)

    def valid_description(self) -> str:
        if self.choices is not None:
            return ", ".join(self.choices)
        probe = self.check(_OUT_OF_RANGE_PROBE) if self.check else None
        return probe or f"a {self.kind.__name__}"


_OUT_OF_RANGE_PROBE = object()


def _range(description: str, predicate: Callable[[float], bool]) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value is _OUT_OF_RANGE_PROBE:
            return description
        return None if predicate(value) else description

    return check


positive_int = _range("an integer >= 1", lambda v: v >= 1)
non_negative_int = _range("an integer >= 0", lambda v: v >= 0)
positive_float = _range("a number > 0", lambda v: v > 0 and math.isfinite(v))
non_negative_float = _range("a number >= 0", lambda v: v >= 0 and math.isfinite(v))
unit_interval = _range("a number in (0, 1]", lambda v: 0 < v <= 1)
closed_unit_interval = _range("a number in [0, 1]", lambda v: 0 <= v <= 1)
momentum_range = _range("a number in [0, 1)", lambda v: 0 <= v < 1)

def _parse_seeds_ok(value: str) -> bool:
    text = str(value).strip()
    if not text:
        return True
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in parts):
        return False
    return int(parts[0]) >= 1 if len(parts) == 1 else True


def seed_list(config: Mapping[str, Any]) -> list[int]:
    """The seeds a run covers: ``seeds`` = n gives seed..seed+n-1, a comma list gives those; empty: [seed]."""
    text = str(config.get("seeds", "")).strip()
    if not text:
        return [int(config["seed"])]
    parts = [int(part) for part in text.split(",")]
    if len(parts) == 1:
        return list(range(int(config["seed"]), int(config["seed"]) + parts[0]))
    if len(set(parts)) != len(parts):
        raise ConfigError("seeds", text, "distinct seeds")
    return parts


def _method_list(value: Any) -> str | None:
    from fedunlearn.unlearning.registry import method_classes, split_label

    methods = method_classes()
    description = "a comma list of " + ", ".join(methods) + " (each optionally with [key=value;...])"
    if value is _OUT_OF_RANGE_PROBE:
        return description
    names = [part.strip() for part in str(value).split(",") if part.strip()]
    try:
        return None if all(split_label(name)[0] in methods for name in names) else description
    except ConfigError as error:
        return f"{description}: {error}"


open_unit_interval = _range("a number in (0, 1)", lambda v: 0 < v < 1)

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "mnist1d")
MODELS = ("logreg", "simple-cnn", "simple-cnn-wide", "resnet18", "vit-lite", "cnn1d")

# Run keys a variant label may set per method (``hf-kcu[repair-rounds=2]``), beside the method's own
# keys and the solver settings: what happens to the method's model after its update.
PER_METHOD_KEYS = ("repair-rounds",)

# The keys of the run itself; each unlearning method declares its own keys in its module
# (``config_keys``), and :func:`keys` appends them, so adding a method never edits this file.
CORE_KEYS: tuple[ConfigKey, ...] = (
    ConfigKey("dataset", "digits", "Data set; digits ships with scikit-learn, mnist1d is generated offline, the others load from data-dir.", DATASETS),
    ConfigKey("data-dir", "data", "Folder holding torchvision data sets (relative to the working directory)."),
    ConfigKey("download", False, "Download mnist / fashion-mnist / cifar10 into data-dir when missing."),
    ConfigKey("mnist1d-samples", 20000, "mnist1d: signals generated offline (fixed generator seed), split 80/20 into train and test; cached in the project cache.", check=_range("an integer >= 100", lambda v: v >= 100)),
    ConfigKey("model", "simple-cnn", "Model architecture.", MODELS),
    ConfigKey("l2-bias", False, "logreg: the L2 penalty covers the bias too, which makes the objective strongly convex (the release certificate needs it)."),
    ConfigKey("num-clients", 10, "Number of clients (Flower SuperNodes / partitions).", check=positive_int),
    ConfigKey("partition", "dirichlet", "How the training set is split over clients.", ("dirichlet", "iid")),
    ConfigKey("dirichlet-alpha", 0.5, "Dirichlet concentration per label; small is more skewed.", check=positive_float),
    ConfigKey("min-partition-size", 10, "Smallest client data set the Dirichlet partitioner accepts.", check=positive_int),
    ConfigKey("num-rounds", 20, "FedAvg rounds.", check=positive_int),
    ConfigKey("local-epochs", 5, "Local epochs per round on each sampled client.", check=positive_int),
    ConfigKey("batch-size", 64, "Local mini-batch size.", check=positive_int),
    ConfigKey("lr", 0.01, "Local SGD learning rate.", check=positive_float),
    ConfigKey("momentum", 0.9, "Local SGD momentum (buffer reset every round).", check=momentum_range),
    ConfigKey("seed", 0, "Drives partitions, initialisation, client sampling and shuffling.", check=non_negative_int),
    ConfigKey("fraction-train", 1.0, "Fraction of clients sampled for training each round.", check=unit_interval),
    ConfigKey("fraction-evaluate", 0.0, "Fraction of clients that evaluate the global model on their own data each round.", check=closed_unit_interval),
    ConfigKey("device", "auto", "Where clients and server compute; auto takes a GPU when the node has one.", ("auto", "cpu", "cuda")),
    ConfigKey("client-num-cpus", 1.0, "CPUs Ray reserves per simulated client.", check=positive_float),
    ConfigKey("client-num-gpus", 0.0, "GPUs (fractions allowed) Ray reserves per simulated client.", check=non_negative_float),
    ConfigKey("ray-address", "", "An existing Ray cluster to run the simulated clients on (HOST:PORT of its head, or auto); empty starts a local Ray.", check=_range("empty, auto or HOST:PORT", lambda v: v in ("", "auto") or ("://" not in v and bool(v.rpartition(":")[0]) and v.rpartition(":")[2].isdigit()))),
    ConfigKey("round-timeout", 3600.0, "Seconds the server waits for the replies of one round (Flower's default).", check=positive_float),
    ConfigKey("out-dir", "runs/latest", "Where results.json and results.csv go (the CLI's --out sets it)."),
    # --- deletion requests and unlearning ---
    ConfigKey("forget-clients", "0", "Partition ids whose whole data is deleted (comma list; empty: none)."),
    ConfigKey("deletion-requests", "", "A JSON file of deletion requests (client / samples / class grain), added to forget-clients."),
    ConfigKey("unlearn-after-round", 0, "Round after which requests are applied; 0 means after the last round.", check=non_negative_int),
    ConfigKey("unlearn-methods", "hf-kcu,hf-kcu-global,kfac", "Methods applied, each from the same trained model (comma list).", check=_method_list),
    ConfigKey("repair-rounds", 0, "FedAvg rounds on the remaining clients after each method's update (post-training); their time and client trainings count in the method's cost. Settable per method: hf-kcu[repair-rounds=2].", check=non_negative_int),
    ConfigKey("unlearn-timeout", 600.0, "Seconds to wait for the affected clients' replies before the request fails.", check=positive_float),
    ConfigKey("damping", 0.01, "λ added to the curvature (HF-KCU eq. 20; both KFAC factors for kfac).", check=non_negative_float),
    ConfigKey("curvature", "hessian", "Curvature whose products CG uses.", ("hessian", "ggn")),
    ConfigKey("negative-curvature", "ggn", "When CG meets curvature <= 0: keep the iterate (stop), redo on the GGN, raise damping x10, or fail.", ("stop", "ggn", "damping", "raise")),
    ConfigKey("cg-iters", 20, "CG iteration cap (hf-kcu-global: one communication round each).", check=positive_int),
    ConfigKey("cg-tol", 1e-6, "CG stops when the residual norm is below cg-tol times the right-hand side's.", check=positive_float),
    ConfigKey("curvature-batch-size", 256, "Batch size of the curvature and gradient passes.", check=positive_int),
    ConfigKey("factor-solver", "dense", "How kfac inverts each Kronecker factor.", ("dense", "mpo", "nystrom", "auto")),
    ConfigKey("kfac-rank", 16, "MPO bond dimension r for factors wider than mpo-threshold.", check=positive_int),
    ConfigKey("nystrom-rank", 128, "Rank of the Nyström approximation of a factor.", check=positive_int),
    ConfigKey("mpo-threshold", 256, "Factors of at most this dimension are always solved dense.", check=positive_int),
    ConfigKey("factor-memory-budget", 268435456, "Bytes one dense factor may take before factor-solver=auto compresses it.", check=positive_int),
    ConfigKey("prop2-fallback", "dense", "When the poster's Proposition 2 condition fails for an MPO factor: solve dense, or fail.", ("dense", "raise")),
    ConfigKey("kfac-uncovered", "identity", "Parameters outside Linear/Conv2d layers under kfac: damped identity (g/λ) or no update.", ("identity", "zero")),
    # --- the release step: noise on every unlearned model, and the certificate where it is sound ---
    ConfigKey("noise-sigma", 0.0, "σ of the Gaussian noise the server adds once to every parameter of each method's unlearned model; > 0 on logreg with l2-bias certifies an (ε, δ).", check=non_negative_float),
    ConfigKey("delta", 1e-5, "δ of the (ε, δ) certificate.", check=open_unit_interval),
    ConfigKey("sensitivity-budget", 0.0, "An ℓ2 bound B fixed before the deletion: the release certifies ε(B) when the measured distance bound Δ ≤ B and no ε otherwise; 0: ε of the measured Δ.", check=non_negative_float),
    ConfigKey("target-epsilon", 0.0, "With sensitivity-budget: σ is calibrated so that the budget gives this ε (analytic Gaussian mechanism), noise-sigma must be 0; 0: off.", check=non_negative_float),
    ConfigKey("backdoor-client", -1, "Partition id of a malicious client that plants a backdoor (-1: none).", check=_range("an integer >= -1", lambda v: v >= -1)),
    ConfigKey("poison-fraction", 0.5, "Share of the malicious client's images that carry the trigger.", check=unit_interval),
    ConfigKey("target-class", 0, "Class the triggered images are relabelled to.", check=non_negative_int),
    ConfigKey("trigger-size", 2, "Side of the square trigger, in pixels.", check=positive_int),
    ConfigKey("trigger-position", "bottom-right", "Corner of the trigger.", ("bottom-right", "bottom-left", "top-right", "top-left")),
    ConfigKey("mia-shadows", 2, "Shadow models of the membership-inference attack (0: loss-threshold attack only).", check=non_negative_int),
    ConfigKey("mia-shadow-epochs", 20, "Epochs each shadow model trains on its half of the remaining clients' data.", check=positive_int),
    ConfigKey("seeds", "", "Run the whole job once per seed and report mean ± 95 % CI: a count n (seeds seed..seed+n-1) or a comma list of seeds; empty: just seed.", check=_range("empty, a count >= 1 or a comma list of integers >= 0", lambda v: _parse_seeds_ok(v))),
    ConfigKey("forget-each-client", False, "Run the job once per client, deleting each in turn (forget-clients is ignored), and average (with seeds: every seed x client)."),
    ConfigKey("noise-floor", True, "Retrain a second oracle that differs only in training randomness (shuffling and sampling): its distance to the first is the floor every distance is read against."),
    ConfigKey("forget-share", 0.0, "Share of the training set the first client of forget-clients holds (stratified); the others split the rest; 0: the partition decides.", check=_range("a number in [0, 1)", lambda v: 0 <= v < 1)),
    ConfigKey("exclusive-class", -1, "A class whose every training example goes to the first client of forget-clients and to no other (-1: none).", check=_range("an integer >= -1", lambda v: v >= -1)),
    ConfigKey("lr-decay", 1.0, "Local learning rate of round t is lr * lr-decay^(t-1) (1: constant).", check=unit_interval),
    ConfigKey("lira-shadows", 0, "U-LiRA: shadow federations (each client in half of them) for the per-example likelihood-ratio attack; 0: off. Each costs about one training run (cached).", check=_range("0 (off) or an integer >= 4", lambda v: v == 0 or v >= 4)),
    ConfigKey("retrain-cache", True, "Reuse a retrained oracle model with the same configuration from the project cache."),
)

_all_keys: tuple[ConfigKey, ...] | None = None


def keys() -> tuple[ConfigKey, ...]:
    """Every run-config key: the core keys, then each method's own (in method-name order)."""
    global _all_keys
    if _all_keys is None:
        from fedunlearn.unlearning.registry import method_config_keys

        method_keys = tuple(method_config_keys())
        clashes = {key.name for key in method_keys} & {key.name for key in CORE_KEYS}
        if clashes:
            raise ValueError(f"unlearning methods redefine core run-config keys: {sorted(clashes)}")
        _all_keys = CORE_KEYS + method_keys
    return _all_keys


def keys_by_name() -> dict[str, ConfigKey]:
    return {key.name: key for key in keys()}


def defaults() -> dict[str, ConfigValue]:
    return {key.name: key.default for key in keys()}


def coerce_value(key: ConfigKey, value: Any) -> ConfigValue:
    """Turn a value from TOML, Flower's run config or the command line into the key's type."""
    kind = key.kind
    if isinstance(value, str) and kind is not str:
        value = _parse_scalar(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key.name, value, ("true", "false"))
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise ConfigError(key.name, value, key.valid_description())
        value = int(value)
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key.name, value, key.valid_description())
        value = float(value)
    elif kind is str:
        value = str(value)
    if key.choices is not None and value not in key.choices:
        raise ConfigError(key.name, value, key.choices)
    if key.check is not None and key.check(value) is not None:
        raise ConfigError(key.name, value, key.valid_description())
    return value


def _parse_scalar(text: str) -> Any:
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def resolve(*layers: Mapping[str, Any]) -> dict[str, ConfigValue]:
    """Defaults, then each layer on top (preset, then overrides); every key checked."""
    config = defaults()
    by_name = keys_by_name()
    for layer in layers:
        for name, value in layer.items():
            key = by_name.get(name)
            if key is None:
                raise ConfigError(name, value, sorted(by_name), reason="unknown key")
            config[name] = coerce_value(key, value)
    _check_consistency(config)
    return config


def _check_consistency(config: dict[str, ConfigValue]) -> None:
    """Checks that involve two keys."""
    if config["backdoor-client"] >= config["num-clients"]:
        raise ConfigError("backdoor-client", config["backdoor-client"], f"-1 or 0..{config['num-clients'] - 1}")
    from fedunlearn.unlearning.registry import method_class, parse_methods, variant_config

    for name in parse_methods(str(config["unlearn-methods"])):
        method_class(name).check_config(variant_config(name, config))
    if config["target-epsilon"] > 0:
        if config["sensitivity-budget"] <= 0:
            raise ConfigError("target-epsilon", config["target-epsilon"], "0 (off) unless sensitivity-budget > 0",
                              reason="σ is calibrated to the budget, fixed before any data is seen")
        if config["noise-sigma"] > 0:
            raise ConfigError("noise-sigma", config["noise-sigma"], "0 when target-epsilon sets σ")
    if config["unlearn-after-round"] > config["num-rounds"]:
        raise ConfigError(
            "unlearn-after-round", config["unlearn-after-round"], f"0 (after the last round) or 1..{config['num-rounds']} (num-rounds)"
        )


def parse_overrides(text: str) -> dict[str, Any]:
    """Parse Flower's ``--run-config`` syntax: ``"key=value key2=value2"`` (TOML values, quotes optional)."""
    overrides: dict[str, Any] = {}
    for item in _split_respecting_quotes(text):
        if "=" not in item:
            raise ConfigError("--run-config", item, "key=value pairs separated by spaces")
        name, raw = item.split("=", 1)
        name = name.strip()
        raw = raw.strip()
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":
            overrides[name] = raw[1:-1]
        else:
            overrides[name] = raw
    return overrides


def _split_respecting_quotes(text: str) -> list[str]:
    items, current, quote = [], [], ""
    for char in text:
        if quote:
            current.append(char)
            if char == quote:
                quote = ""
        elif char in "\"'":
            quote = char
            current.append(char)
        elif char.isspace():
            if current:
                items.append("".join(current))
                current = []
        else:
            current.append(char)
    if current:
        items.append("".join(current))
    return items


def load_toml(path: str | Path, key_for_errors: str = "--config") -> dict[str, Any]:
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(key_for_errors, str(path), "an existing TOML file", reason="file not found") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(key_for_errors, str(path), "a valid TOML file", reason=str(error)) from None
    # A preset keeps its keys under [run-config] beside a description; a plain file has them at top level.
    if "run-config" in data:
        return dict(data["run-config"])
    data.pop("description", None)
    return data


# --- generated artefacts ---------------------------------------------------------------------

def toml_value(value: ConfigValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def pyproject_config_block() -> str:
    lines = ["[tool.flwr.app.config]"]
    lines += [f"{key.name} = {toml_value(key.default)}" for key in keys()]
    return "\n".join(lines) + "\n"


def markdown_table() -> str:
    rows = ["| key | default | valid values | meaning |", "|---|---|---|---|"]
    for key in keys():
        rows.append(f"| `{key.name}` | `{toml_value(key.default)}` | {key.valid_description()} | {key.help} |")
    return "\n".join(rows) + "\n"


PYPROJECT_BLOCK_HEADER = "[tool.flwr.app.config]"
README_TABLE_START = "<!-- keys:start (generated by `python -m fedunlearn.config --write`) -->"
README_TABLE_END = "<!-- keys:end -->"


def with_pyproject_block(pyproject_text: str) -> str:
    """``pyproject_text`` with its run-config block replaced by the generated one."""
    head, header, tail = pyproject_text.partition(PYPROJECT_BLOCK_HEADER)
    if not header:
        return pyproject_text.rstrip("\n") + "\n\n" + pyproject_config_block()
    following = tail.find("\n[")
    rest = tail[following + 1 :] if following >= 0 else ""
    return head + pyproject_config_block() + ("\n" + rest if rest else "")


def with_readme_table(readme_text: str) -> str:
    head, start, tail = readme_text.partition(README_TABLE_START)
    if not start:
        return readme_text
    _, end, rest = tail.partition(README_TABLE_END)
    return head + start + "\n" + markdown_table() + end + rest


def _write_generated(root: Path) -> None:
    for name, transform in (("pyproject.toml", with_pyproject_block), ("README.md", with_readme_table)):
        path = root / name
        if path.exists():
            path.write_text(transform(path.read_text()))


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--write"]:
        _write_generated(Path.cwd())
    else:
        sys.stdout.write(pyproject_config_block())
