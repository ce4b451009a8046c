import tomllib

import pytest

from fedunlearn import config as run_config
from fedunlearn.errors import ConfigError
from tests.conftest import PROJECT_ROOT


def test_defaults_cover_the_keys_the_issue_names():
    required = {
        "dataset", "model", "num-clients", "partition", "dirichlet-alpha", "num-rounds", "local-epochs",
        "batch-size", "lr", "seed", "fraction-train", "data-dir", "device",
    }
    assert required <= set(run_config.defaults())


def test_pyproject_run_config_is_generated_from_the_schema():
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == run_config.defaults()


def test_readme_key_table_is_generated_from_the_schema():
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert run_config.with_readme_table(readme) == readme
    assert run_config.markdown_table() in readme


def test_overrides_parse_flower_syntax_with_and_without_quotes():
    overrides = run_config.parse_overrides('num-clients=4 dataset="mnist" lr=0.1 download=true model=logreg')
    config = run_config.resolve(overrides)
    assert config["num-clients"] == 4 and config["dataset"] == "mnist" and config["model"] == "logreg"
    assert config["lr"] == 0.1 and config["download"] is True


def test_later_layers_win_and_ints_widen_to_floats():
    config = run_config.resolve({"lr": 1, "seed": 3}, {"seed": 4})
    assert config["lr"] == 1.0 and isinstance(config["lr"], float) and config["seed"] == 4


@pytest.mark.parametrize(
    "overrides, key, fragment",
    [
        ({"dataset": "imagenet"}, "dataset", "digits, mnist, fashion-mnist, cifar10"),
        ({"num-clients": 0}, "num-clients", "an integer >= 1"),
        ({"num-clients": 2.5}, "num-clients", "an integer >= 1"),
        ({"dirichlet-alpha": -1.0}, "dirichlet-alpha", "a number > 0"),
        ({"fraction-train": 1.5}, "fraction-train", "(0, 1]"),
        ({"device": "tpu"}, "device", "auto, cpu, cuda"),
        ({"download": "maybe"}, "download", "true, false"),
        ({"num-rouns": 3}, "num-rouns", "unknown key"),
    ],
)
def test_bad_values_name_the_key_the_value_and_the_valid_choices(overrides, key, fragment):
    with pytest.raises(ConfigError) as caught:
        run_config.resolve(overrides)
    message = caught.value.one_line()
    assert caught.value.key == key
    assert repr(next(iter(overrides.values()))) in message
    assert fragment in message
    assert "\n" not in message


def test_unknown_key_lists_the_valid_keys():
    with pytest.raises(ConfigError) as caught:
        run_config.resolve({"num-rouns": 3})
    assert "num-rounds" in caught.value.one_line()


def test_bad_config_on_the_command_line_is_one_line_exit_2_and_writes_nothing(run_cli, tmp_path):
    out = tmp_path / "out"
    result = run_cli("run", "--run-config", "num-clients=10 partition=striped", "--out", str(out))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "partition" in lines[0] and "'striped'" in lines[0] and "dirichlet, iid" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not out.exists()


def test_unknown_preset_and_missing_config_file_are_bad_input(run_cli, tmp_path):
    result = run_cli("run", "--preset", "no-such-preset")
    assert result.returncode == 2 and "default" in result.stderr
    result = run_cli("run", "--config", str(tmp_path / "missing.toml"))
    assert result.returncode == 2 and "file not found" in result.stderr


def test_presets_lists_the_default_preset(run_cli):
    result = run_cli("presets")
    assert result.returncode == 0
    assert result.stdout.split()[0] == "default" or "default " in result.stdout


def test_deletion_point_after_the_last_round_is_refused():
    with pytest.raises(ConfigError) as caught:
        run_config.resolve({"num-rounds": 5, "unlearn-after-round": 6})
    assert caught.value.key == "unlearn-after-round" and "1..5" in caught.value.one_line()


def test_a_missing_request_file_is_bad_input_before_anything_runs(run_cli, tmp_path):
    result = run_cli("run", "--run-config", f"deletion-requests='{tmp_path / 'nope.json'}'", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "deletion-requests" in result.stderr and "file not found" in result.stderr
    assert not (tmp_path / "o").exists()


def test_every_method_declares_a_summary_and_its_keys_reach_the_schema_and_the_cli_listing():
    from fedunlearn.cli import main
    from fedunlearn.unlearning.registry import describe_methods, method_classes

    schema = {key.name for key in run_config.keys()}
    listing = describe_methods()
    for name, cls in method_classes().items():
        assert cls.summary, f"{name} has no summary"
        assert f"{name}: {cls.summary}" in listing
        for key in cls.config_keys:
            assert key.name in schema and run_config.defaults()[key.name] == key.default
    assert main(["methods"]) == 0
