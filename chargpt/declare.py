"""Settings declared once, on a frozen dataclass: each field carries its default, its help
text and its range or choices, without knowing about any command line.

    @dataclass(frozen=True)
    class Config:
        batch_size: int = setting(16, "Sequences per step, per process.", minimum=1)
        dropout: float = setting(0.0, "Dropout probability.", minimum=0, below=1)

        def __post_init__(self) -> None:
            check_settings(self)  # every field's declared range and choices

``chargpt.settings`` turns these fields into click options (its module docstring says how);
the model (``chargpt.model.GPTConfig``) declares its fields here so that it needs no click,
and another dataclass takes one of them over whole with ``setting_from``.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")
_SETTING = "chargpt.setting"
REQUIRED: Any = dataclasses.MISSING  # setting(REQUIRED, ...): no default; the flag is required


@dataclasses.dataclass(frozen=True)
class Setting:
    """What a ``setting`` field says about itself besides its default."""

    help: str
    minimum: float | None = None  # value >= minimum
    maximum: float | None = None  # value <= maximum
    above: float | None = None  # value > above
    below: float | None = None  # value < below
    choices: tuple[str, ...] | None = None
    type: Any = None  # a click.ParamType that overrides the one inferred from the annotation
    negatable: bool = False  # a bool shown as --name/--no-name rather than a bare --name

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` (``"must be ..."``), or None."""
        if value is None:
            return None
        if self.choices is not None:
            return None if value in self.choices else f"must be one of {', '.join(self.choices)}"
        declared = (
            (self.minimum, ">=", operator.ge),
            (self.above, ">", operator.gt),
            (self.maximum, "<=", operator.le),
            (self.below, "<", operator.lt),
        )
        bounds = [(bound, sign, holds) for bound, sign, holds in declared if bound is not None]
        if not all(holds(value, bound) for bound, _, holds in bounds):  # NaN satisfies none
            return "must be " + " and ".join(f"{s} {_number(bound)}" for bound, s, _ in bounds)
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        return None


def _number(bound: float) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def setting(
    default: T,
    help: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    choices: Sequence[str] | None = None,
    type: Any = None,
    negatable: bool = False,
) -> T:
    """A dataclass field that is also a setting (see the module docstring).

    ``minimum``/``maximum`` are inclusive bounds, ``above``/``below`` exclusive ones. A
    ``default`` of ``REQUIRED`` makes a field without a default and a required option.
    ``type``: a click parameter type for the command line (``chargpt.settings``).
    """
    spec = Setting(
        help=help,
        minimum=minimum,
        maximum=maximum,
        above=above,
        below=below,
        choices=tuple(choices) if choices is not None else None,
        type=type,
        negatable=negatable,
    )
    return dataclasses.field(default=default, metadata={_SETTING: spec})  # type: ignore[no-any-return]


def setting_from(cls: type, name: str) -> Any:
    """The ``setting`` field ``name`` of the dataclass ``cls`` again, for another dataclass:
    the same default, help and range, declared once in ``cls``."""
    field = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    if field is None or _SETTING not in field.metadata:
        raise TypeError(f"{cls.__name__} has no setting {name}")
    return dataclasses.field(default=field.default, metadata=field.metadata)


def settings_of(cls: type) -> list[tuple[dataclasses.Field[Any], Setting]]:
    """The ``setting`` fields of a dataclass, in declaration order."""
    return [(f, f.metadata[_SETTING]) for f in dataclasses.fields(cls) if _SETTING in f.metadata]


def check_settings(instance: object) -> None:
    """Raise ValueError naming the first field outside its declared range or choices."""
    for field, spec in settings_of(type(instance)):
        value = getattr(instance, field.name)
        problem = spec.problem(value)
        if problem:
            raise ValueError(f"{field.name} {problem}, got {value!r}")
