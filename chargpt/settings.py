"""Layered command settings: flags, then a config file, then ``CHARGPT_*`` environment
variables, then defaults, in that order of precedence.

Click reads flags, environment variables and defaults itself; ``LayeredCommand`` adds the
config file (``--config``, TOML or JSON, keys named like the flags) between flags and the
environment.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from click.core import ParameterSource

ENV_PREFIX = "CHARGPT_"
F = TypeVar("F", bound=Callable[..., Any])


class InputError(click.ClickException):
    """Bad input found before any work was done: one line, exit code 2."""

    exit_code = 2


def option(*decls: str, **attrs: Any) -> Callable[[F], F]:
    """``click.option`` that also reads ``CHARGPT_<NAME>``; --help shows it and the default."""
    name = max((d for d in decls if d.startswith("--")), key=len).lstrip("-").split("/")[0]
    attrs.setdefault("envvar", ENV_PREFIX + name.replace("-", "_").upper())
    attrs.setdefault("show_envvar", True)
    attrs.setdefault("show_default", True)
    return click.option(*decls, **attrs)


def read_config_file(path: str) -> dict[str, Any]:
    """A flat table of settings from a .toml or .json file; keys may use - or _."""
    file = Path(path)
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = json.loads(raw) if file.suffix == ".json" else tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(
            f"config file {path} is not valid {file.suffix[1:] or 'TOML'}: {exc}"
        ) from None
    if not isinstance(data, dict):
        raise InputError(f"config file {path} must hold a table of settings")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


class LayeredCommand(click.Command):
    """A command whose ``--config`` file fills every setting not given as a flag."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        rest = super().parse_args(ctx, args)
        config_path = ctx.params.get("config")
        if config_path:
            self._apply_config(ctx, config_path)
        return rest

    def _apply_config(self, ctx: click.Context, config_path: str) -> None:
        settings = read_config_file(config_path)
        params = {p.name: p for p in self.params if p.name and p.name != "config"}
        unknown = sorted(set(settings) - set(params))
        if unknown:
            raise InputError(f"config file {config_path}: unknown settings {', '.join(unknown)}")
        for name, value in settings.items():
            source = ctx.get_parameter_source(name)
            if source not in (ParameterSource.DEFAULT, ParameterSource.ENVIRONMENT, None):
                continue  # a flag on the command line wins
            param = params[name]
            try:
                ctx.params[name] = param.type_cast_value(ctx, value)
            except click.BadParameter as exc:
                raise InputError(
                    f"config file {config_path}: invalid value for {name}: {exc.format_message()}"
                ) from None
            ctx.set_parameter_source(name, ParameterSource.DEFAULT_MAP)


def config_option() -> Callable[[F], F]:
    return option(
        "--config",
        type=click.Path(dir_okay=False),
        default=None,
        help="TOML or JSON file of settings (keys named like the flags). "
        "Flags override it; it overrides environment variables.",
    )
