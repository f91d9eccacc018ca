"""``chargpt.settings``: settings declared once on a dataclass, layered flag > config file >
environment > default."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from chargpt.settings import (
    REQUIRED,
    InputError,
    LayeredCommand,
    build,
    check_settings,
    config_option,
    options,
    setting,
)


@dataclass(frozen=True)
class Example:
    steps: int = setting(10, "Steps to take.", minimum=1)
    rate: float = setting(0.5, "A rate.", above=0, below=1)
    mode: str = setting("fast", "How.", choices=("fast", "slow"))
    name: str | None = setting(None, "A name.")
    verbose: bool = setting(False, "Say more.")
    bias: bool = setting(True, "Use biases.", negatable=True)
    port: int = setting(0, "A port (0 = off).", minimum=0, maximum=65535)
    scale: float = setting(1.0, "A scale.", minimum=0)
    not_an_option: int = 3

    def __post_init__(self) -> None:
        check_settings(self)
        if self.mode == "slow" and self.steps > 100:
            raise ValueError("mode slow takes at most 100 steps")


@click.command(cls=LayeredCommand)
@options(Example)
@config_option()
def command(config: str | None, **values: object) -> None:
    click.echo(json.dumps(build(Example, values).__dict__))


def invoke(*args: str, env: dict[str, str] | None = None) -> click.testing.Result:
    return CliRunner().invoke(command, list(args), env=env, standalone_mode=False)


def test_every_setting_field_becomes_an_option_with_its_help_default_and_range() -> None:
    help_text = CliRunner().invoke(command, ["--help"], terminal_width=200).output
    for line in (
        "--steps INTEGER RANGE",
        "Steps to take.  [env var: CHARGPT_STEPS; default: 10; x>=1]",
        "--rate FLOAT RANGE",
        "[env var: CHARGPT_RATE; default: 0.5; 0<x<1]",
        "--mode [fast|slow]",
        "--name TEXT",
        "--verbose",
        "--bias / --no-bias",
        "[env var: CHARGPT_BIAS; default: bias]",
        "0<=x<=65535",
    ):
        assert line in help_text, line
    assert "--not-an-option" not in help_text
    # In declaration order, --config last.
    flags = ["--steps", "--rate", "--mode", "--name", "--verbose", "--bias", "--port", "--config"]
    positions = [help_text.index(flag) for flag in flags]
    assert positions == sorted(positions)


def test_defaults_build_the_dataclass_defaults() -> None:
    result = invoke()
    assert result.exception is None, result.output
    assert json.loads(result.output) == Example().__dict__


def test_flag_beats_config_file_beats_environment_beats_default(tmp_path: Path) -> None:
    config = tmp_path / "settings.toml"
    config.write_text('steps = 20\nmode = "slow"\n')
    env = {"CHARGPT_STEPS": "30", "CHARGPT_MODE": "fast", "CHARGPT_RATE": "0.25"}
    result = invoke("--config", str(config), "--mode", "fast", "--no-bias", env=env)
    assert result.exception is None, result.output
    values = json.loads(result.output)
    assert values["mode"] == "fast"  # flag beats config
    assert values["steps"] == 20  # config beats environment
    assert values["rate"] == 0.25  # environment beats default
    assert values["bias"] is False and values["verbose"] is False and values["port"] == 0


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--steps", "0"], None, "'--steps'"),
        (["--rate", "1"], None, "'--rate'"),
        (["--mode", "medium"], None, "'--mode'"),
        ([], {"CHARGPT_PORT": "70000"}, "CHARGPT_PORT"),
        (["--mode", "slow", "--steps", "101"], None, "mode slow takes at most 100 steps"),
    ],
)
def test_bad_values_are_input_errors(
    args: list[str], env: dict[str, str] | None, message: str
) -> None:
    result = invoke(*args, env=env)
    assert isinstance(result.exception, click.ClickException), result.output
    assert result.exception.exit_code == 2
    assert message in result.exception.format_message()


def test_the_declared_ranges_hold_for_instances_built_in_python() -> None:
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        Example(steps=0)
    with pytest.raises(ValueError, match=r"rate must be > 0 and < 1, got 1\.5"):
        Example(rate=1.5)
    with pytest.raises(ValueError, match="rate must be > 0 and < 1, got nan"):
        Example(rate=float("nan"))
    with pytest.raises(ValueError, match="mode must be one of fast, slow, got 'medium'"):
        Example(mode="medium")
    with pytest.raises(InputError, match="port must be >= 0 and <= 65535, got 70000"):
        build(Example, {"port": 70000, "unrelated": "ignored"})
    assert build(Example, {"steps": 5}, not_an_option=7) == Example(steps=5, not_an_option=7)


@dataclass(frozen=True)
class Inner:
    size: int = setting(4, "A nested setting.", minimum=1)


@dataclass(frozen=True)
class Outer:
    path: str = setting(REQUIRED, "A required setting.", type=click.Path(dir_okay=False))
    inner: Inner = Inner()


@click.command(cls=LayeredCommand)
@options(Outer, Inner)
def nested(**values: object) -> None:
    click.echo(repr(build(Outer, values, inner=build(Inner, values))))


def test_required_settings_and_several_classes_in_one_command() -> None:
    missing = CliRunner().invoke(nested, [], standalone_mode=False)
    assert isinstance(missing.exception, click.MissingParameter)
    assert "--path" in missing.exception.format_message()
    result = CliRunner().invoke(nested, ["--path", "a.txt", "--size", "9"], standalone_mode=False)
    assert result.exception is None, result.output
    assert result.output.strip() == repr(Outer(path="a.txt", inner=Inner(size=9)))


@pytest.mark.parametrize("value", ["inf", "1e309", "nan", "-inf"])
def test_non_finite_numbers_are_refused_from_flags_environment_and_config_files(
    value: str, tmp_path: Path
) -> None:
    toml = tmp_path / "settings.toml"
    toml.write_text(f"scale = {value.replace('1e309', 'inf')}\n")
    json_file = tmp_path / "settings.json"
    json_file.write_text(f'{{"scale": {value.replace("inf", "Infinity").replace("nan", "NaN")}}}')
    for args, env in (
        (["--scale", value], None),
        ([], {"CHARGPT_SCALE": value}),
        (["--config", str(toml)], None),
        (["--config", str(json_file)], None),
    ):
        result = invoke(*args, env=env)
        assert isinstance(result.exception, click.ClickException), (args, env, result.output)
        assert "scale" in result.exception.format_message(), (args, env)
    with pytest.raises(ValueError, match="scale must be a finite number, got inf"):
        Example(scale=float("inf"))
    with pytest.raises(ValueError, match="scale must be >= 0, got nan"):  # NaN fails any bound
        Example(scale=float("nan"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("steps = [1, 2]\n", "steps must be an integer, got a list"),
        ("steps = {a = 1}\n", "steps must be an integer, got a table"),
        ("steps = 4.7\n", "steps must be an integer, got 4.7"),
        ("steps = true\n", "steps must be an integer, got true"),
        ('steps = "7"\n', 'steps must be an integer, got "7"'),
        ("rate = false\n", "rate must be a number, got false"),
        ("verbose = 1\n", "verbose must be true or false, got 1"),
        ("mode = 3\n", "mode must be a string, got 3"),
        ('{"steps": null}', "steps must be an integer, got null"),
        ('{"rate": [0.5]}', "rate must be a number, got a list"),
    ],
)
def test_a_config_value_of_the_wrong_type_is_an_error_naming_its_key(
    content: str, message: str, tmp_path: Path
) -> None:
    config = tmp_path / ("settings.json" if content.startswith("{") else "settings.toml")
    config.write_text(content)
    result = invoke("--config", str(config))
    assert isinstance(result.exception, InputError), result.output
    assert result.exception.format_message() == f"config file {config}: {message}"


def test_a_config_value_that_a_flag_overrides_is_still_checked(tmp_path: Path) -> None:
    config = tmp_path / "settings.toml"
    config.write_text("steps = 0\n")
    result = invoke("--config", str(config), "--steps", "5")
    assert isinstance(result.exception, InputError), result.output
    assert "invalid value for steps" in result.exception.format_message()
    config.write_text("port = [1]\n")
    result = invoke("--config", str(config), "--port", "5")
    assert isinstance(result.exception, InputError), result.output
    assert "port must be an integer, got a list" in result.exception.format_message()


@pytest.mark.parametrize("name", ["settings.yaml", "settings.yml", "settings", "settings.ini"])
def test_config_files_other_than_toml_or_json_are_refused(name: str, tmp_path: Path) -> None:
    config = tmp_path / name
    config.write_text("steps: 5\n")
    result = invoke("--config", str(config))
    assert isinstance(result.exception, InputError), result.output
    assert result.exception.format_message() == (
        f"config file {config}: unsupported extension; use .toml or .json"
    )


def test_a_bad_flag_is_named_without_the_environment_variable() -> None:
    from_flag = invoke("--port", "70000")
    assert isinstance(from_flag.exception, click.BadParameter)
    message = from_flag.exception.format_message()
    assert "'--port'" in message and "CHARGPT_PORT" not in message, message
    from_env = invoke(env={"CHARGPT_PORT": "70000"})
    assert isinstance(from_env.exception, click.BadParameter)
    assert "CHARGPT_PORT" in from_env.exception.format_message()


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--temperature", "-1"), ("--top-p", "0"), ("--top-p", "1.5"), ("--seed", str(2**64))],
)
def test_sample_and_generate_refuse_the_same_sampling_values(flag: str, value: str) -> None:
    """One declaration of the sampling flags: the offline sampler and the gRPC client
    refuse the same values, before loading a model or connecting to a server."""
    from chargpt.cli import cli

    # Through the chargpt group, as users call them (a subcommand invoked on its own would
    # cache a help option without the group's -h, and change the flag reference).
    for args in (["sample", "model.safetensors"], ["generate", "ROMEO:"]):
        result = CliRunner().invoke(cli, [*args, flag, value])
        assert result.exit_code == 2, (args[0], result.output)
        assert f"Invalid value for '{flag}'" in result.output, (args[0], result.output)
