"""Command settings declared once, on a frozen dataclass, and layered from four sources:
the click adapter of ``chargpt.declare``'s click-free declarations.

Each field carries its default, its help text and its range or choices::

    @dataclass(frozen=True)
    class Config:
        batch_size: int = setting(16, "Sequences per step, per process.", minimum=1)
        dropout: float = setting(0.0, "Dropout probability.", minimum=0, below=1)
        norm: str = setting("layernorm", "Normalisation.", choices=("layernorm", "rmsnorm"))
        bias: bool = setting(True, "Biases in linear layers.", negatable=True)

        def __post_init__(self) -> None:
            check_settings(self)  # every field's declared range and choices
            ...  # checks that involve several fields

    @click.command(cls=LayeredCommand)
    @options(Config)
    @config_option()
    def command(config: str | None, **values: object) -> None:
        cfg = build(Config, values)

``options`` turns every ``setting`` field into a click option, in declaration order: the
flag is the field's name in kebab case (``--batch-size``; ``--bias/--no-bias`` for a
``negatable`` bool, a plain ``--flag`` for other bools), the click type follows the
annotation (int and float get an ``IntRange`` or ``FloatRange`` from the bounds, str with
``choices`` a ``Choice``; ``type=`` overrides it), and ``--help`` shows the default and the
``CHARGPT_<NAME>`` environment variable. A float must be finite wherever it comes from
(``inf``, ``1e309`` and ``nan`` are refused). ``check_settings`` applies the same bounds,
choices and finiteness to an instance built in Python, so no range is written twice.
``build`` makes the instance from click's values and turns a ``ValueError`` from its checks
into an ``InputError``: one ``Error:`` line, exit 2. ``setting(REQUIRED, ...)`` declares a
field without a default, whose flag must be given. Fields declared without ``setting`` are
not options; pass them to ``build`` yourself (a nested dataclass, for instance). Several
classes can share one command: ``@options(ServerConfig, Limits)``, then
``build(ServerConfig, values, limits=build(Limits, values))``.

Precedence, highest first: a flag on the command line, the ``--config`` file (TOML or
JSON, keys named like the flags with ``-`` or ``_``; other extensions are refused), a
``CHARGPT_*`` environment variable, a preset (a table of settings that a command's
``preset`` setting names: ``LayeredCommand(read_preset=...)``), the default. The file
beats the environment on purpose: the container image bakes ``CHARGPT_*`` defaults into
its environment, and a config file mounted into the container must be able to override
them without the operator unsetting variables the image set. Click reads flags,
environment variables and defaults itself; ``LayeredCommand`` slots the file (and the
preset) in between. Every value in the file is
checked, also one that a flag overrides, and strictly by type: an integer setting takes an
integer (not 4.7, not true), a number setting a number, a switch true or false, text a
string.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import click
from click.core import ParameterSource

# The declarations themselves are click-free (chargpt.declare); they are named here too, so
# that a command's settings come from one import.
from chargpt.declare import REQUIRED, Setting, check_settings, setting, settings_of

__all__ = [
    "REQUIRED",
    "InputError",
    "LayeredCommand",
    "Setting",
    "build",
    "check_settings",
    "config_option",
    "option",
    "options",
    "sampling_options",
    "setting",
    "settings_of",
]

ENV_PREFIX = "CHARGPT_"
F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


class InputError(click.ClickException):
    """Bad input found before any work was done: one line, exit code 2."""

    exit_code = 2


def click_type(spec: Setting, annotation: Any) -> click.ParamType | None:
    """The click type of a ``setting`` field: its own ``type``, else one that follows the
    annotation and the declared range or choices."""
    if spec.type is not None:
        return spec.type  # type: ignore[no-any-return]
    if spec.choices is not None:
        return click.Choice(spec.choices)
    if annotation is float:
        return FiniteFloat(**_range(spec))
    if annotation is int:
        bounded = (spec.minimum, spec.above, spec.maximum, spec.below) != (None,) * 4
        return click.IntRange(**_range(spec)) if bounded else click.INT
    return None  # click's default: text


def _range(spec: Setting) -> dict[str, Any]:
    return {
        "min": spec.above if spec.above is not None else spec.minimum,
        "max": spec.below if spec.below is not None else spec.maximum,
        "min_open": spec.above is not None,
        "max_open": spec.below is not None,
    }


class FiniteFloat(click.FloatRange):
    """A float in an optional range that is also finite: click's ``FloatRange`` lets
    ``inf``, ``1e309`` (which parses as inf) and ``nan`` through."""

    def __init__(self, **bounds: Any) -> None:
        super().__init__(**bounds)
        if self.min is None and self.max is None:
            self.name = "float"  # shown as FLOAT, not FLOAT RANGE

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


class SettingOption(click.Option):
    """An option whose error names its environment variable only when the value came
    from there (click names it whenever ``show_envvar`` is set, also for a bad flag)."""

    def get_error_hint(self, ctx: click.Context | None) -> str:
        if ctx is not None and ctx.get_parameter_source(self.name or "") is not (
            ParameterSource.ENVIRONMENT
        ):
            return click.Parameter.get_error_hint(self, ctx)
        return super().get_error_hint(ctx)


def options(*classes: type) -> Callable[[F], F]:
    """Decorator: one click option per ``setting`` field of ``classes``, in order."""

    def decorate(f: F) -> F:
        # Click lists options in the reverse order of the decorators applied.
        for cls in reversed(classes):
            hints = get_type_hints(cls)
            for field, spec in reversed(settings_of(cls)):
                f = _option(field, spec, _unwrap_optional(hints[field.name]))(f)
        return f

    return decorate


def _option(field: dataclasses.Field[Any], spec: Setting, annotation: Any) -> Callable[[F], F]:
    flag = "--" + field.name.replace("_", "-")
    attrs: dict[str, Any] = {"help": spec.help}
    if field.default is REQUIRED:
        attrs["required"] = True
    else:
        attrs["default"] = field.default
    if annotation is bool:
        if spec.negatable:
            return option(f"{flag}/--no-{flag[2:]}", **attrs)
        return option(flag, is_flag=True, **attrs)
    return option(flag, type=click_type(spec, annotation), **attrs)


def _unwrap_optional(annotation: Any) -> Any:
    """``X | None`` -> ``X``; anything else unchanged."""
    if get_origin(annotation) not in (Union, types.UnionType):
        return annotation
    args = [a for a in get_args(annotation) if a is not type(None)]
    return args[0] if len(args) == 1 else annotation


def build(cls: type[T], values: Mapping[str, Any], **extra: Any) -> T:
    """``cls`` from the entries of ``values`` that name its fields, plus ``extra``; a
    ValueError from its checks becomes an InputError (one ``Error:`` line, exit 2)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    try:
        return cls(**{k: v for k, v in values.items() if k in names}, **extra)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def option(*decls: str, **attrs: Any) -> Callable[[F], F]:
    """``click.option`` that also reads ``CHARGPT_<NAME>``; --help shows it and the default."""
    name = max((d for d in decls if d.startswith("--")), key=len).lstrip("-").split("/")[0]
    attrs.setdefault("envvar", ENV_PREFIX + name.replace("-", "_").upper())
    attrs.setdefault("show_envvar", True)
    attrs.setdefault("show_default", True)
    attrs.setdefault("cls", SettingOption)
    return click.option(*decls, **attrs)


SEED_LIMIT = 1 << 64  # seeds are unsigned 64-bit integers, as the server's


def sampling_options(*, on_server: bool, seed_help: str) -> Callable[[F], F]:
    """``--temperature``, ``--top-k``, ``--top-p`` and ``--seed``, declared once for
    ``chargpt sample`` and ``chargpt generate`` with the bounds the server checks.

    ``on_server``: an unset option is left to the server (which applies the same defaults)
    and each option also reads ``CHARGPT_<NAME>``, as the client's other options do.
    """
    declare = option if on_server else click.option

    def default(value: float) -> float | None:
        return None if on_server else value

    unset = " (unset: 1.0)" if on_server else ""
    declared = [
        declare(
            "--temperature",
            type=click.FloatRange(min=0),
            default=default(1.0),
            show_default=True,
            help=f"Softmax temperature; 0 = greedy{unset}.",
        ),
        declare(
            "--top-k",
            type=click.IntRange(min=0),
            default=0,
            show_default=True,
            help="Sample among the k most likely characters (0 = all).",
        ),
        declare(
            "--top-p",
            type=click.FloatRange(min=0, max=1, min_open=True),
            default=default(1.0),
            show_default=True,
            help=f"Sample from the smallest set with this much probability{unset}.",
        ),
        declare(
            "--seed", type=click.IntRange(min=0, max=SEED_LIMIT - 1), default=None, help=seed_help
        ),
    ]

    def decorate(f: F) -> F:
        for add in reversed(declared):
            f = add(f)
        return f

    return decorate


def read_config_file(path: str) -> dict[str, Any]:
    """A flat table of settings from a .toml or .json file; keys may use - or _."""
    file = Path(path)
    if file.suffix.lower() not in (".toml", ".json"):
        raise InputError(f"config file {path}: unsupported extension; use .toml or .json")
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        is_json = file.suffix.lower() == ".json"
        data = json.loads(raw) if is_json else tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(
            f"config file {path} is not valid {'JSON' if is_json else 'TOML'}: {exc}"
        ) from None
    if not isinstance(data, dict):
        raise InputError(f"config file {path} must hold a table of settings")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


class LayeredCommand(click.Command):
    """A command whose ``--config`` file fills every setting not given as a flag (it beats
    the environment: see the module docstring), and, given ``read_preset``, whose
    ``preset`` setting names a table of settings that replaces the defaults (and nothing
    else)."""

    def __init__(
        self, *args: Any, read_preset: Callable[[str], Mapping[str, Any]] | None = None, **kw: Any
    ) -> None:
        super().__init__(*args, **kw)
        self.read_preset = read_preset

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        rest = super().parse_args(ctx, args)
        config_path = ctx.params.get("config")
        if config_path:
            replaced = (ParameterSource.DEFAULT, ParameterSource.ENVIRONMENT, None)
            self._apply(ctx, read_config_file(config_path), f"config file {config_path}", replaced)
        preset = ctx.params.get("preset")
        if self.read_preset is not None and preset:
            replaced = (ParameterSource.DEFAULT, None)
            self._apply(ctx, self.read_preset(preset), f"preset {preset}", replaced)
        return rest

    def _apply(
        self,
        ctx: click.Context,
        settings: Mapping[str, Any],
        origin: str,
        replaced: tuple[ParameterSource | None, ...],
    ) -> None:
        """Set ``settings`` (from ``origin``) where the value's source is in ``replaced``."""
        params = {p.name: p for p in self.params if p.name and p.name != "config"}
        unknown = sorted(set(settings) - set(params))
        if unknown:
            raise InputError(f"{origin}: unknown settings {', '.join(unknown)}")
        for name, value in settings.items():
            param = params[name]
            wrong_type = _type_problem(param, value)
            if wrong_type:
                raise InputError(f"{origin}: {name} {wrong_type}")
            try:
                value = param.type_cast_value(ctx, value)  # checked even if overridden
            except click.BadParameter as exc:
                raise InputError(
                    f"{origin}: invalid value for {name}: {exc.format_message()}"
                ) from None
            if ctx.get_parameter_source(name) in replaced:  # else what overrides it wins
                ctx.params[name] = value
                ctx.set_parameter_source(name, ParameterSource.DEFAULT_MAP)


def _type_problem(param: click.Parameter, value: Any) -> str | None:
    """Why ``value`` from a config file is the wrong type for ``param`` (``"must be ..."``),
    or None. Strict: click would turn 4.7 or true into the integer 4 or 1."""
    if isinstance(param, click.Option) and param.is_flag:
        expected, ok = "true or false", isinstance(value, bool)
    elif isinstance(param.type, click.types.IntParamType):
        expected, ok = "an integer", isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(param.type, click.types.FloatParamType):
        expected = "a number"
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        expected, ok = "a string", isinstance(value, str)
    return None if ok else f"must be {expected}, got {_describe(value)}"


def _describe(value: Any) -> str:
    """``value`` as the config file spelled it, roughly."""
    if isinstance(value, (bool, type(None), str)):
        return json.dumps(value)
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return repr(value)


def config_option() -> Callable[[F], F]:
    return option(
        "--config",
        type=click.Path(dir_okay=False),
        default=None,
        help="TOML or JSON file of settings (keys named like the flags). "
        "Flags override it; it overrides environment variables.",
    )
