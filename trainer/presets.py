"""Named training recipes: ``chargpt train --preset NAME``.

Each preset is a TOML file in ``trainer/recipes/`` (shipped inside the package), a flat
table of settings named like the flags. Its values replace the defaults; a flag, the
``--config`` file and ``CHARGPT_*`` variables still override them. ``lecture`` is empty:
the defaults are the lecture's.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from typing import Any

PRESETS = ("lecture", "cpu-100s", "cpu-10min", "gpu-shakespeare")


def read_preset(name: str) -> dict[str, Any]:
    """The settings of preset ``name`` (one of ``PRESETS``), keys with ``_``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    text = resources.files("trainer").joinpath("recipes", f"{name}.toml").read_text("utf-8")
    return {key.replace("-", "_"): value for key, value in tomllib.loads(text).items()}
